//! Shard actors: one ractor actor per shard replica, supervised.
//!
//! A [`ShardActor`] owns its shard's store and runs every command through the
//! pure engine, one at a time, so that commands never race. Durability uses
//! group commit: each command's changes are applied to the store at once
//! (visible, not yet durable) and the reply is parked; the first command of a
//! batch also posts a `Flush` message to the actor's own mailbox. Everything
//! that arrived before that `Flush` is made durable by one fsync, and only
//! then are the parked replies sent. Reads that arrive while replies are
//! parked are parked too, so a client never sees a change that could still
//! be lost.
//!
//! The [`NodeSupervisor`] spawns the shard actors linked to itself and
//! restarts a failed one from disk; callers find the current actor by name
//! ([`shard_actor_name`]), so a restart is invisible to them but for the
//! calls that were in flight, which fail as `UNAVAILABLE`.

use crate::engine::{self, Command, EngineError, FoundProfile, Outcome, ProfileRef};
use crate::model::{Counters, HubRecord, Identifier, MergeRecord, ShardId};
use crate::rules::RuleSet;
use crate::storage::{GraphStore, StoreError};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::sync::Arc;
use tracing::{debug, error, info, instrument, warn};

pub type Reply<T> = RpcReplyPort<Result<T, EngineError>>;

/// Messages a shard actor handles.
pub enum ShardMsg {
    Execute(Box<Command>, Reply<Outcome>),
    GetProfile(ProfileRef, Reply<FoundProfile>),
    GetMerge(String, Reply<MergeRecord>),
    ListHubs(usize, Reply<Vec<(Identifier, HubRecord)>>),
    Counters(Reply<Counters>),
    /// Sent by the actor to itself: make the batch durable, then reply.
    Flush,
    /// Test hook: panic inside the handler (exercises supervision).
    #[doc(hidden)]
    Crash,
}

/// Opens a shard's store; called on start and on every restart.
pub type StoreOpener = Arc<dyn Fn(ShardId) -> Result<Arc<dyn GraphStore>, StoreError> + Send + Sync>;

/// Actor names are global in a process; the node tag keeps several nodes
/// (as in tests) apart.
pub fn shard_actor_name(node: &str, shard: ShardId) -> String {
    format!("idgraph-{node}-shard-{shard}")
}

pub struct ShardActor;

#[derive(Clone)]
pub struct ShardArgs {
    pub node: Arc<str>,
    pub shard: ShardId,
    pub open: StoreOpener,
    pub rules: Arc<RuleSet>,
}

type Parked = Box<dyn FnOnce(&Result<(), StoreError>) + Send>;

pub struct ShardState {
    node: Arc<str>,
    shard: ShardId,
    store: Arc<dyn GraphStore>,
    rules: Arc<RuleSet>,
    parked: Vec<Parked>,
    flush_posted: bool,
    /// Changes were applied since the last successful flush.
    unsynced: bool,
}

impl ShardState {
    /// Sends `result` now if everything applied so far is durable, else
    /// after the next flush.
    fn reply<T: Send + 'static>(
        &mut self,
        myself: &ActorRef<ShardMsg>,
        port: Reply<T>,
        result: Result<T, EngineError>,
    ) -> Result<(), ActorProcessingErr> {
        if self.unsynced {
            self.park(port, result);
            self.post_flush(myself)?;
        } else {
            let _ = port.send(result);
        }
        Ok(())
    }

    fn post_flush(&mut self, myself: &ActorRef<ShardMsg>) -> Result<(), ActorProcessingErr> {
        if !self.flush_posted {
            self.flush_posted = true;
            myself.send_message(ShardMsg::Flush)?;
        }
        Ok(())
    }

    /// Sends `result` after the next flush, or the flush's error instead.
    fn park<T: Send + 'static>(&mut self, port: Reply<T>, result: Result<T, EngineError>) {
        self.parked.push(Box::new(move |flushed: &Result<(), StoreError>| {
            let _ = match flushed {
                Ok(()) => port.send(result),
                Err(e) => port.send(Err(EngineError::Store(StoreError::Io(format!("flush failed: {e}"))))),
            };
        }));
    }
}

impl Actor for ShardActor {
    type Msg = ShardMsg;
    type State = ShardState;
    type Arguments = ShardArgs;

    async fn pre_start(&self, _myself: ActorRef<ShardMsg>, args: ShardArgs) -> Result<ShardState, ActorProcessingErr> {
        let store = (args.open)(args.shard)?;
        // After a restart the store may hold changes of the failed actor that
        // were never fsync'd (nor acknowledged): make them durable before
        // anything is served from them.
        store.flush()?;
        info!(shard = %args.shard, rule_version = args.rules.version(), "shard started");
        Ok(ShardState {
            node: args.node,
            shard: args.shard,
            store,
            rules: args.rules,
            parked: Vec::new(),
            flush_posted: false,
            unsynced: false,
        })
    }

    #[instrument(skip_all, fields(node = %state.node, shard = %state.shard))]
    async fn handle(&self, myself: ActorRef<ShardMsg>, msg: ShardMsg, state: &mut ShardState) -> Result<(), ActorProcessingErr> {
        match msg {
            ShardMsg::Execute(cmd, port) => {
                let result = engine::execute(&*state.store, &state.rules, &cmd);
                match result {
                    Ok((changes, outcome)) => {
                        if let Outcome::Identify(o) = &outcome {
                            for c in &o.conflicts {
                                debug!(identifier = %c.identifier.redacted(), kind = ?c.kind, limit_type = %c.limit_type, "identifier dropped by merge protection");
                            }
                        }
                        if changes.is_empty() {
                            state.reply(&myself, port, Ok(outcome))?;
                        } else if let Err(e) = state.store.apply(&changes) {
                            warn!(error = %e, "applying a change set failed");
                            state.reply(&myself, port, Err(EngineError::Store(e)))?;
                        } else {
                            state.unsynced = true;
                            state.park(port, Ok(outcome));
                            state.post_flush(&myself)?;
                        }
                    }
                    Err(e) => state.reply(&myself, port, Err(e))?,
                }
            }
            ShardMsg::GetProfile(r, port) => {
                let result = engine::find_profile(&*state.store, &state.rules, &r, "key");
                state.reply(&myself, port, result)?;
            }
            ShardMsg::GetMerge(id, port) => {
                let result = engine::find_merge(&*state.store, &id);
                state.reply(&myself, port, result)?;
            }
            ShardMsg::ListHubs(limit, port) => {
                let result = state.store.listed_hubs(limit).map_err(EngineError::from);
                state.reply(&myself, port, result)?;
            }
            ShardMsg::Counters(port) => {
                let result = state.store.counters().map_err(EngineError::from);
                state.reply(&myself, port, result)?;
            }
            ShardMsg::Flush => {
                state.flush_posted = false;
                let parked = std::mem::take(&mut state.parked);
                let store = state.store.clone();
                let flushed = tokio::task::spawn_blocking(move || store.flush())
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Io(format!("flush task failed: {e}"))));
                for p in parked {
                    p(&flushed);
                }
                if let Err(e) = flushed {
                    // What the store holds in memory may never reach disk: fail,
                    // so that the supervisor reopens the store and flushes it
                    // before anything is served again.
                    error!(error = %e, "fsync failed; restarting the shard");
                    return Err(Box::new(e));
                }
                state.unsynced = false;
            }
            ShardMsg::Crash => panic!("shard actor asked to crash (test hook)"),
        }
        Ok(())
    }
}

/// Supervises the node's shard actors and restarts a failed one from disk.
pub struct NodeSupervisor;

pub struct SupervisorArgs {
    pub node: Arc<str>,
    pub shards: Vec<ShardId>,
    pub open: StoreOpener,
    pub rules: Arc<RuleSet>,
}

pub struct SupervisorState {
    args: Vec<ShardArgs>,
    restarts: u64,
}

async fn spawn_shard(sup: &ActorRef<()>, args: ShardArgs) -> Result<(), ActorProcessingErr> {
    Actor::spawn_linked(Some(shard_actor_name(&args.node, args.shard)), ShardActor, args, sup.get_cell()).await?;
    Ok(())
}

impl Actor for NodeSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(&self, myself: ActorRef<()>, a: SupervisorArgs) -> Result<SupervisorState, ActorProcessingErr> {
        let args: Vec<ShardArgs> =
            a.shards.iter().map(|s| ShardArgs { node: a.node.clone(), shard: *s, open: a.open.clone(), rules: a.rules.clone() }).collect();
        for sa in &args {
            spawn_shard(&myself, sa.clone()).await?;
        }
        Ok(SupervisorState { args, restarts: 0 })
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            let name = cell.get_name().unwrap_or_default();
            if let Some(sa) = state.args.iter().find(|a| shard_actor_name(&a.node, a.shard) == name).cloned() {
                state.restarts += 1;
                error!(shard = %sa.shard, error = %err, restarts = state.restarts, "shard actor failed; restarting it from disk");
                // The failed actor's name is released once it has stopped.
                for _ in 0..100 {
                    if ractor::registry::where_is(name.clone()).is_none() {
                        break;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                spawn_shard(&myself, sa).await?;
            }
        }
        Ok(())
    }
}
