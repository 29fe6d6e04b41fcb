//! Shard actors: one ractor actor per shard replica, supervised.
//!
//! A [`ShardActor`] owns a [`ShardReplica`]: the shard's openraft instance
//! and its graph store. Reads are served on the replica in the caller's
//! task ([`serve`]), steps of membership and leadership as tasks the actor
//! spawns. Writes are batched:
//! while a proposal is in flight (by default one at a time,
//! [`PROPOSALS_IN_FLIGHT`]), the
//! writes that arrive wait in the actor and go out together as the next
//! log entry, so under load one entry, and one fsync, carries many
//! commands; the state machine applies each entry as one atomic write.
//!
//! Admission control: at most `max_waiting_writes` writes that start new
//! work wait in an actor; past it such writes are refused at once
//! (RESOURCE_EXHAUSTED, nothing done). Once the node's disk was found full,
//! a replica that leads its group alone refuses them too; where other
//! replicas exist, the write goes on to Raft, whose storage error stops the
//! group here so that another replica takes over.
//! Steps that finish work already started (commits, applies, aborts) are
//! always taken, so a transaction admitted is never stranded half-way.
//!
//! Settling steps ride along: a committed transaction's `Apply` on a
//! secondary and its `Forget` on the primary start no proposal of their
//! own. They wait in the actor until the next entry goes out, or until
//! [`settle_delay`] passes with none, so that on a busy shard they cost no
//! replicated entry of their own (the cross-shard protocol's applies and
//! forgets were about a third of its entries). They go first in the entry
//! they join. Until an apply lands, its records stay locked: readers wait
//! and other writers to them retry, for about that delay (longer when the
//! shard's proposals are all in flight).
//!
//! The [`NodeSupervisor`] spawns the shard actors linked to itself. When one
//! fails, it shuts that shard's Raft instance down and opens it again from
//! disk (log, vote, state machine), then starts a new actor; callers find
//! the current actor by name ([`shard_actor_name`]), so a restart is
//! invisible to them but for the calls in flight, which fail as
//! `UNAVAILABLE`.

use crate::raft::{Replicas, ShardCommand, ShardFailure, ShardReplica, ShardReply, ShardRequest};
use futures::future::BoxFuture;
use idgraph_core::model::GroupId;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::sync::Arc;
use tracing::{error, info, instrument};

pub type Reply = RpcReplyPort<Result<ShardReply, ShardFailure>>;

/// Messages a shard actor handles.
pub enum ShardMsg {
    Request(Box<ShardRequest>, Reply),
    /// Sent by the actor to itself when a proposal has been answered.
    ProposalDone,
    /// Sent by the actor to itself when the oldest deferred settling step
    /// has waited its delay.
    SettleDue,
    /// Test hook: panic inside the handler (exercises supervision).
    #[doc(hidden)]
    Crash,
}

/// The node's actor of `shard`, if it runs (not while it restarts).
pub fn actor(node: &str, shard: GroupId) -> Option<ActorRef<ShardMsg>> {
    ActorRef::where_is(shard_actor_name(node, shard))
}

/// Hands a request to a shard's actor and waits at most `timeout` for its
/// answer: the one way for writes into a local replica, for the router and
/// for requests other nodes forward ([`serve`]), so that every write is
/// batched and admitted the same way.
pub async fn call(
    actor: &ActorRef<ShardMsg>,
    shard: GroupId,
    req: ShardRequest,
    timeout: std::time::Duration,
) -> Result<ShardReply, ShardFailure> {
    let unavailable = |reason: String| ShardFailure::Unavailable { shard, reason };
    match actor.call(|port| ShardMsg::Request(Box::new(req), port), Some(timeout)).await {
        Ok(CallResult::Success(r)) => r,
        Ok(CallResult::Timeout) => Err(unavailable(format!("no answer within {} ms; a write's outcome is unknown", timeout.as_millis()))),
        Ok(CallResult::SenderError) => Err(unavailable("the shard stopped while serving the request; its outcome is unknown".into())),
        Err(e) => Err(unavailable(e.to_string())),
    }
}

/// Serves a request on a local replica whose actor runs: writes and the
/// other steps through the actor ([`call`]), reads on the replica itself in
/// the caller's task (the actor would only spawn a task for them: one
/// hand-off and one wake-up fewer per read), within `timeout` alike.
pub async fn serve(
    actor: &ActorRef<ShardMsg>,
    replica: &ShardReplica,
    req: ShardRequest,
    timeout: std::time::Duration,
) -> Result<ShardReply, ShardFailure> {
    match req {
        ShardRequest::Read(_) => match tokio::time::timeout(timeout, replica.serve(req)).await {
            Ok(answer) => answer,
            Err(_) => {
                Err(ShardFailure::Unavailable { shard: replica.group, reason: format!("no answer within {} ms", timeout.as_millis()) })
            }
        },
        req => call(actor, replica.group, req, timeout).await,
    }
}

/// Actor names are global in a process; the node tag keeps several nodes
/// (as in tests) apart.
pub fn shard_actor_name(node: &str, shard: GroupId) -> String {
    format!("idgraph-{node}-shard-{shard}")
}

pub struct ShardActor;

/// Proposals in flight at once per shard, by default. One: the writes that
/// arrive while an entry is replicated and applied go out together in the
/// next, so entries grow with the load (group commit, self-clocked); on a
/// machine whose cores are all busy, a second proposal in flight split the
/// same writes over twice the entries and cost more per write than it
/// overlapped (bench/analysis.md). `proposals_in_flight` sets it.
pub const PROPOSALS_IN_FLIGHT: usize = 1;
/// How long a proposal may wait for its entry to be applied.
pub const PROPOSAL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);
/// Commands in one proposal at most.
pub const MAX_BATCH: usize = 512;
/// New work waiting for a proposal slot, at most: past it a write that would
/// start new work (an engine command, a one-shard transaction or a prepare)
/// is refused at once as overloaded, so that under a burst the writes taken
/// keep a bounded wait and the node a bounded memory. Steps that finish work
/// already started (commits, applies, aborts) are always taken.
/// The default; `max_waiting_writes` sets it.
pub const MAX_WAITING: usize = 4 * MAX_BATCH;

/// How long a settling step waits for an entry to ride along with before it
/// is proposed by itself; `None` for a command proposed at once. A
/// secondary's `Apply` releases locks that readers may wait on, so it waits
/// briefly; a `Forget` only drops the primary's decision record.
pub fn settle_delay(cmd: &ShardCommand) -> Option<std::time::Duration> {
    match cmd {
        ShardCommand::Txn(crate::txn::TxnOp::Apply { .. }) => Some(std::time::Duration::from_millis(20)),
        ShardCommand::Txn(crate::txn::TxnOp::Forget { .. }) => Some(std::time::Duration::from_millis(50)),
        _ => None,
    }
}

/// Bounds on one shard actor's writes (from the node's configuration).
#[derive(Clone, Copy, Debug)]
pub struct WriteLimits {
    /// Writes that start new work waiting, at most (`max_waiting_writes`).
    pub max_waiting: usize,
    /// Proposals in flight at once (`proposals_in_flight`).
    pub in_flight: usize,
}

pub struct ShardState {
    node: Arc<str>,
    limits: WriteLimits,
    replica: ShardReplica,
    waiting: Vec<(ShardCommand, Reply)>,
    /// Settling steps waiting for an entry to ride along with, each with
    /// the time it is due to go out by itself.
    deferred: Vec<(ShardCommand, Reply, tokio::time::Instant)>,
    in_flight: usize,
}

impl ShardState {
    /// Why a write that starts new work is refused at once, if it is: the
    /// node's disk is full and no other replica could take the write over,
    /// or too many writes are waiting already.
    fn refusal(&self, cmd: &ShardCommand) -> Option<ShardFailure> {
        if !starts_work(cmd) {
            return None;
        }
        let shard = self.replica.group;
        if crate::storage::disk_full_seen() && self.replica.sole_voter_leading() {
            return Some(ShardFailure::DiskFull { shard });
        }
        (self.waiting.len() >= self.limits.max_waiting).then_some(ShardFailure::Overloaded { shard, waiting: self.waiting.len() })
    }

    /// Keeps a settling step until an entry goes out, and makes sure the
    /// actor hears when it is due.
    fn defer(&mut self, myself: &ActorRef<ShardMsg>, cmd: ShardCommand, port: Reply, delay: std::time::Duration) {
        let due = tokio::time::Instant::now() + delay;
        let earliest = self.deferred.iter().map(|(_, _, d)| *d).min();
        self.deferred.push((cmd, port, due));
        if earliest.is_none_or(|e| due < e) {
            myself.send_after(delay, || ShardMsg::SettleDue);
        }
    }

    /// Moves the deferred steps that are due (all of them when `all`) to
    /// the waiting writes; schedules a reminder for the next one not due.
    fn release_deferred(&mut self, myself: &ActorRef<ShardMsg>, all: bool) {
        let now = tokio::time::Instant::now();
        let mut kept = Vec::new();
        let mut released = Vec::new();
        for (cmd, port, due) in std::mem::take(&mut self.deferred) {
            if all || due <= now {
                released.push((cmd, port));
            } else {
                kept.push((cmd, port, due));
            }
        }
        // First in the entry: an apply releases locks that a command in the
        // same entry may need (settling steps validate nothing, and their
        // transaction's earlier steps have all been answered).
        self.waiting.splice(0..0, released);
        // (With `all`, nothing is kept.)
        if let Some(next) = kept.iter().map(|(_, _, d)| *d).min() {
            myself.send_after(next.saturating_duration_since(now), || ShardMsg::SettleDue);
        }
        self.deferred = kept;
    }

    fn propose(&mut self, myself: &ActorRef<ShardMsg>) {
        while self.in_flight < self.limits.in_flight && !self.waiting.is_empty() {
            // An entry goes out: the deferred settling steps ride along.
            if self.waiting.len() < MAX_BATCH {
                self.release_deferred(myself, true);
            }
            let take = self.waiting.len().min(MAX_BATCH);
            let (commands, ports): (Vec<_>, Vec<_>) = self.waiting.drain(..take).unzip();
            self.in_flight += 1;
            let replica = self.replica.clone();
            let myself = myself.clone();
            tokio::spawn(async move {
                // A proposal whose entry is neither applied nor truncated
                // here (a deposed leader that catches up from a snapshot
                // is never told) must not hold its slot for ever: its
                // callers learn that the outcome is unknown.
                let answered = tokio::time::timeout(PROPOSAL_WAIT, replica.write_batch(commands)).await.unwrap_or_else(|_| {
                    Err(ShardFailure::Unavailable {
                        shard: replica.group,
                        reason: format!("the proposal was not answered within {PROPOSAL_WAIT:?}; its outcome is unknown"),
                    })
                });
                match answered {
                    Ok(answers) => {
                        for (port, answer) in ports.into_iter().zip(answers) {
                            let _ = port.send(answer);
                        }
                    }
                    Err(failure) => {
                        for port in ports {
                            let _ = port.send(Err(failure.clone()));
                        }
                    }
                }
                let _ = myself.send_message(ShardMsg::ProposalDone);
            });
        }
    }
}

/// Whether a write starts new work (admission control refuses those first).
fn starts_work(cmd: &ShardCommand) -> bool {
    match cmd {
        ShardCommand::Engine(_) | ShardCommand::Restore(_) => true,
        ShardCommand::Txn(op) => matches!(op, crate::txn::TxnOp::Single { .. } | crate::txn::TxnOp::Prepare { .. }),
        ShardCommand::Meta(_) | ShardCommand::ForgetEvents { .. } => false,
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    /// Node tag, bounds on writes, the replica.
    type Arguments = (Arc<str>, WriteLimits, ShardReplica);

    async fn pre_start(
        &self,
        _myself: ActorRef<ShardMsg>,
        (node, limits, replica): Self::Arguments,
    ) -> Result<ShardState, ActorProcessingErr> {
        info!(shard = %replica.group, rule_version = replica.rules.version(), "shard replica started");
        Ok(ShardState { node, limits, replica, waiting: Vec::new(), deferred: Vec::new(), in_flight: 0 })
    }

    #[instrument(skip_all, fields(node = %state.node, shard = %state.replica.group))]
    async fn handle(&self, myself: ActorRef<ShardMsg>, msg: ShardMsg, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Request(req, port) => match *req {
                ShardRequest::Write(cmd) => {
                    if let Some(refusal) = state.refusal(&cmd) {
                        let _ = port.send(Err(refusal));
                        return Ok(());
                    }
                    match settle_delay(&cmd) {
                        Some(delay) => state.defer(&myself, *cmd, port, delay),
                        None => {
                            state.waiting.push((*cmd, port));
                            state.propose(&myself);
                        }
                    }
                }
                other => {
                    let replica = state.replica.clone();
                    tokio::spawn(async move {
                        let _ = port.send(replica.serve(other).await);
                    });
                }
            },
            ShardMsg::ProposalDone => {
                state.in_flight = state.in_flight.saturating_sub(1);
                state.propose(&myself);
            }
            ShardMsg::SettleDue => {
                state.release_deferred(&myself, false);
                state.propose(&myself);
            }
            ShardMsg::Crash => panic!("shard actor asked to crash (test hook)"),
        }
        Ok(())
    }
}

/// Opens (or reopens) a shard replica from disk.
pub type ReplicaOpener = Arc<dyn Fn(GroupId) -> BoxFuture<'static, Result<ShardReplica, String>> + Send + Sync>;
/// Deletes a closed replica's data (log, vote, state machine) from disk.
pub type ReplicaDiscarder = Arc<dyn Fn(GroupId) -> Result<(), String> + Send + Sync>;

/// Supervises the node's shard actors.
pub struct NodeSupervisor;

/// What the supervisor is asked to do besides restarting failed actors.
pub enum SupervisorMsg {
    /// Opens a replica (empty when new) and starts its actor; done if open.
    Open(GroupId, RpcReplyPort<Result<(), String>>),
    /// Stops a replica's actor and Raft instance and deletes its data: the
    /// group no longer counts on this node (see [`idgraph_core::meta`]).
    Discard(GroupId, RpcReplyPort<Result<(), String>>),
}

pub struct SupervisorArgs {
    pub node: Arc<str>,
    pub shards: Vec<GroupId>,
    pub open: ReplicaOpener,
    pub discard: ReplicaDiscarder,
    pub replicas: Replicas,
    /// Each shard actor's bounds on writes.
    pub limits: WriteLimits,
}

pub struct SupervisorState {
    args: SupervisorArgs,
    restarts: u64,
}

async fn spawn_shard(sup: &ActorRef<SupervisorMsg>, args: &SupervisorArgs, shard: GroupId) -> Result<(), ActorProcessingErr> {
    let replica = (args.open)(shard).await?;
    args.replicas.write().map_err(|_| "replica table lock poisoned")?.insert(shard, replica.clone());
    Actor::spawn_linked(Some(shard_actor_name(&args.node, shard)), ShardActor, (args.node.clone(), args.limits, replica), sup.get_cell())
        .await?;
    Ok(())
}

/// Stops a shard's Raft instance, after its actor has gone.
async fn close_replica(args: &SupervisorArgs, shard: GroupId) -> Result<(), ActorProcessingErr> {
    let old = args.replicas.write().map_err(|_| "replica table lock poisoned")?.remove(&shard);
    if let Some(old) = old {
        let _ = old.raft.shutdown().await;
    }
    Ok(())
}

/// Waits until an actor's name is free again (it has stopped).
async fn name_released(name: &str) {
    for _ in 0..100 {
        if ractor::registry::where_is(name).is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

impl Actor for NodeSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<SupervisorMsg>, args: SupervisorArgs) -> Result<SupervisorState, ActorProcessingErr> {
        for shard in &args.shards {
            spawn_shard(&myself, &args, *shard).await?;
        }
        Ok(SupervisorState { args, restarts: 0 })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Open(shard, port) => {
                let result = if state.args.shards.contains(&shard) {
                    Ok(())
                } else {
                    match spawn_shard(&myself, &state.args, shard).await {
                        Ok(()) => {
                            state.args.shards.push(shard);
                            info!(%shard, "replica opened");
                            Ok(())
                        }
                        Err(e) => Err(e.to_string()),
                    }
                };
                let _ = port.send(result);
            }
            SupervisorMsg::Discard(shard, port) => {
                // Forgotten first, so that the actor's stop is not taken for a failure.
                state.args.shards.retain(|s| *s != shard);
                let name = shard_actor_name(&state.args.node, shard);
                if let Some(actor) = ActorRef::<ShardMsg>::where_is(name.clone()) {
                    actor.stop(Some("replica discarded".into()));
                }
                name_released(&name).await;
                close_replica(&state.args, shard).await?;
                let result = (state.args.discard)(shard);
                if result.is_ok() {
                    info!(%shard, "replica discarded: the group no longer counts on this node");
                }
                let _ = port.send(result);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            let name = cell.get_name().unwrap_or_default();
            let Some(shard) = state.args.shards.iter().copied().find(|s| shard_actor_name(&state.args.node, *s) == name) else {
                return Ok(());
            };
            state.restarts += 1;
            error!(%shard, error = %err, restarts = state.restarts, "shard actor failed; reopening the replica from disk");
            close_replica(&state.args, shard).await?;
            // The failed actor's name is released once it has stopped.
            name_released(&name).await;
            spawn_shard(&myself, &state.args, shard).await?;
        }
        Ok(())
    }
}
