//! One shard replica as the rest of the node sees it: its Raft handle and
//! its graph store, answering requests on the leader and saying who the
//! leader is elsewhere.

use super::lease::{LeaderLease, Leadership};
use super::read_barrier::ReadBarrier;
use super::{Proposal, Refusal, ShardCommand, ShardRaft, ShardResponse};
use crate::storage::{GraphRead, SledStore};
use crate::txn::{self, GraphKey, KeyRead, LockRecord, ReadMode, TxnReply};
use idgraph_core::canary::{MergeStamp, Rollout};
use idgraph_core::engine::{self, FoundProfile, Outcome, ProfileRef};
use idgraph_core::model::{Counters, GroupId, HubRecord, Identifier, MergeRecord};
use idgraph_core::rules::RuleSet;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{BasicNode, Raft};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// A request to a shard.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ShardRequest {
    Write(Box<ShardCommand>),
    Read(ShardRead),
    Membership(MembershipChange),
    Leadership(LeadershipStep),
}

impl ShardRequest {
    /// Whether only the group's leader can serve the request: writes and
    /// reads other than local ones (membership and leadership steps have
    /// rules of their own).
    pub fn needs_leader(&self) -> bool {
        match self {
            ShardRequest::Write(_) => true,
            ShardRequest::Read(r) => r.mode() != ReadMode::Local,
            ShardRequest::Membership(_) | ShardRequest::Leadership(_) => false,
        }
    }
}

/// The steps of a leader transfer (see `ShardReplica::leadership`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum LeadershipStep {
    /// On the leader: stop campaigning, wait until `to` holds the whole log;
    /// answers the target's address (none when `to` is this leader).
    Hand { to: u64 },
    /// On the target: campaign now.
    Campaign,
    /// On the former leader: campaign again when elections time out.
    Resume,
}

/// A change of a group's voters, served by its leader: `add` joins as a
/// learner, catches up, then replaces `remove` as a voter, in one
/// membership change. Repeating a change that is done changes nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MembershipChange {
    pub add: Option<(u64, String)>,
    pub remove: Option<u64>,
}

/// Reads; linearizable (the leader confirms its leadership first) unless
/// named stale.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ShardRead {
    Profile(ProfileRef),
    /// Read this replica's graph as it is, leader or not.
    StaleProfile(ProfileRef),
    Merge(String),
    Hubs(usize),
    Counters,
    /// Records for a cross-shard command, with their locks.
    Keys {
        keys: Vec<GraphKey>,
        mode: ReadMode,
    },
    /// Transactions with a part prepared here before `before_ms` (for the
    /// sweep of abandoned locks; read on the leader).
    PreparedBefore {
        before_ms: i64,
    },
    /// Of the next `scan` dedup records after event id `after`, those
    /// applied before `before_ms` (for the retention sweep; read on the
    /// leader).
    ExpiredEvents {
        before_ms: i64,
        after: Option<String>,
        scan: usize,
    },
    /// Who this replica believes leads (no leadership check).
    Leader,
    /// The addresses of the shard's members, as this replica knows them.
    Members,
    /// The cluster map (metadata group only).
    ClusterMap {
        mode: ReadMode,
    },
    /// Every stored rule set (metadata group only).
    RuleSets,
    /// The rollout under way, and the finished ones if asked (metadata
    /// group only).
    Rollouts {
        finished: bool,
    },
    /// Merges made under a rule-set version.
    MergesUnder {
        rule_version: String,
    },
    /// Audit log entries after `after`, at most `limit` (metadata group
    /// only).
    Audit {
        after: String,
        limit: usize,
    },
    /// The shard's records as one image, for a backup (read on the leader).
    Image,
    /// What a backup keeps of the metadata group.
    MetaBackup,
}

impl ShardRead {
    /// How the read is served: on this replica as it is, on the replica
    /// that believes it leads, or linearizably.
    pub fn mode(&self) -> ReadMode {
        match self {
            // A stale read skips the leadership check: it reads this replica as is.
            ShardRead::StaleProfile(_) | ShardRead::Leader | ShardRead::Members => ReadMode::Local,
            ShardRead::Keys { mode, .. } | ShardRead::ClusterMap { mode } => *mode,
            ShardRead::PreparedBefore { .. } | ShardRead::ExpiredEvents { .. } => ReadMode::Leader,
            _ => ReadMode::Linearizable,
        }
    }

    /// Whether the read walks a whole table of the shard (seconds on a
    /// large one, and a backup's image also waits for a snapshot build's
    /// view of the tree): served on the blocking pool, not a runtime
    /// worker.
    fn reads_whole_shard(&self) -> bool {
        matches!(self, ShardRead::Image | ShardRead::MetaBackup | ShardRead::MergesUnder { .. } | ShardRead::Hubs(_))
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ShardReply {
    Outcome(Outcome),
    Profile(FoundProfile),
    Merge(MergeRecord),
    Hubs(Vec<(Identifier, HubRecord)>),
    Counters(Counters),
    /// The voters after a membership change.
    Voters(Vec<u64>),
    /// A leadership step done; for `Hand`, the target's address.
    Leadership(Option<String>),
    Txn(TxnReply),
    Keys(Vec<KeyRead>),
    Locks(Vec<LockRecord>),
    LeaderId(Option<u64>),
    Members(Vec<String>),
    Map(idgraph_core::meta::ClusterMap),
    /// Version and TOML of each stored rule set.
    RuleSets(Vec<(String, String)>),
    Rollouts {
        current: Option<Box<Rollout>>,
        finished: Vec<Rollout>,
    },
    Merges(Vec<MergeStamp>),
    Audit(Vec<idgraph_core::meta::AuditEntry>),
    Image(Vec<u8>),
    MetaBackup(Box<idgraph_core::meta::MetaBackup>),
    Restored(u64),
    /// Event dedup records forgotten by a retention sweep.
    Forgotten(u64),
    /// A page of a retention sweep: the ids of records past their
    /// retention, and the id to continue after (`None`: the scan reached
    /// the last record).
    ExpiredEvents {
        event_ids: Vec<String>,
        next: Option<String>,
    },
}

/// Why a shard did not answer a request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum ShardFailure {
    /// The engine refused it (the caller's fault); nothing changed.
    #[error("{}", .0.clone().into_engine())]
    Refused(Refusal),
    /// This replica is not the leader; `leader` is where to go, if known.
    #[error("not the leader of group {shard} (leader: {leader:?})")]
    NotLeader { shard: GroupId, leader: Option<(u64, String)> },
    /// The node asked holds no replica of the shard (nothing was done).
    #[error("node holds no replica of group {shard}")]
    NoReplica { shard: GroupId },
    /// Raft or storage failed; the outcome of a write is unknown: retry.
    #[error("group {shard} unavailable: {reason}")]
    Unavailable { shard: GroupId, reason: String },
    /// Too many writes are waiting for the shard's log; this one was not
    /// taken (nothing was done): retry after a backoff.
    #[error("group {shard} is overloaded: {waiting} writes are waiting for its log; retry after a backoff")]
    Overloaded { shard: GroupId, waiting: usize },
    /// The node's disk is full: this write was not taken (nothing was done).
    #[error("the disk of group {shard}'s replica is full")]
    DiskFull { shard: GroupId },
}

/// The replicas a node holds, by group.
pub type Replicas = std::sync::Arc<std::sync::RwLock<std::collections::HashMap<GroupId, ShardReplica>>>;

/// How long a new replica may take to catch up before a move is retried.
const LEARNER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(60);

/// A shard replica's handles.
#[derive(Clone)]
pub struct ShardReplica {
    pub group: GroupId,
    pub raft: Raft<ShardRaft>,
    pub store: Arc<SledStore>,
    pub rules: Arc<RuleSet>,
    /// Leadership confirmations shared by concurrent linearizable reads.
    pub reads: ReadBarrier<ShardFailure>,
    /// Reads served without a round while a recent one holds ([`LeaderLease`]).
    pub lease: Arc<LeaderLease>,
    /// Checks, inside the Raft core, that the lease's vote is still this
    /// replica's, shared by the reads served under the lease meanwhile.
    vote_checks: ReadBarrier<ShardFailure>,
    /// When its next snapshot is due ([`super::pace`]).
    pub pace: Arc<super::pace::SnapshotPace>,
}

/// A replica's role in its Raft group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RaftRole {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
}

impl RaftRole {
    pub fn as_str(self) -> &'static str {
        match self {
            RaftRole::Leader => "Leader",
            RaftRole::Follower => "Follower",
            RaftRole::Candidate => "Candidate",
            RaftRole::Learner => "Learner",
            RaftRole::Shutdown => "Shutdown",
        }
    }
}

/// One member of a replica's Raft group, as the replica sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    pub node_id: u64,
    pub addr: String,
    pub voter: bool,
    /// The last log index known replicated to it (on a leader; else 0).
    pub matched_index: u64,
}

/// A replica's Raft status as its node sees it: what operators read from
/// `Admin.GetCluster`, without openraft's types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    pub group: GroupId,
    pub node_id: u64,
    pub role: RaftRole,
    /// 0 while no leader is known.
    pub leader_id: u64,
    pub term: u64,
    pub last_log_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    pub members: Vec<GroupMember>,
    /// Transaction parts prepared here and waiting for their decision.
    pub prepared_txns: u64,
}

impl ShardReplica {
    /// This replica's Raft status, as of now.
    pub fn status(&self) -> ReplicaStatus {
        let m = self.raft.metrics().borrow().clone();
        let matched = m.replication.clone().unwrap_or_default();
        let voters: std::collections::BTreeSet<u64> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| GroupMember {
                node_id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
                matched_index: matched.get(id).copied().flatten().map_or(0, |l| l.index),
            })
            .collect();
        let role = match m.state {
            openraft::ServerState::Leader => RaftRole::Leader,
            openraft::ServerState::Follower => RaftRole::Follower,
            openraft::ServerState::Candidate => RaftRole::Candidate,
            openraft::ServerState::Learner => RaftRole::Learner,
            openraft::ServerState::Shutdown => RaftRole::Shutdown,
        };
        ReplicaStatus {
            group: self.group,
            node_id: m.id,
            role,
            leader_id: m.current_leader.unwrap_or(0),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map_or(0, |l| l.index),
            snapshot_index: m.snapshot.map_or(0, |l| l.index),
            members,
            prepared_txns: idgraph_core::txn::participant::prepared_count(&*self.store).unwrap_or(0) as u64,
        }
    }
}

/// What callers learn of a group that stopped: no Raft or storage
/// internals, and whether the node is reopening its storage.
fn stopped(shard: GroupId, f: &openraft::error::Fatal<u64>) -> ShardFailure {
    let reason = match f {
        openraft::error::Fatal::StorageError(_) if crate::storage::disk_full_seen() => {
            "its disk is full; the outcome of this write is unknown, and the node reopens its storage once space is freed"
        }
        openraft::error::Fatal::StorageError(_) => {
            "its storage failed; the outcome of this write is unknown, and the node reopens its storage"
        }
        openraft::error::Fatal::Panicked => "its raft group panicked",
        openraft::error::Fatal::Stopped => "its raft group is stopping",
    };
    ShardFailure::Unavailable { shard, reason: reason.to_string() }
}

/// The leadership this replica holds now, if it leads (from its metrics).
fn leadership(raft: &Raft<ShardRaft>) -> Option<Leadership> {
    let m = raft.metrics();
    let m = m.borrow();
    (m.current_leader == Some(m.id) && m.vote.is_committed())
        .then(|| Leadership { vote: m.vote, membership: *m.membership_config.log_id() })
}

fn leader_of(node: Option<(u64, BasicNode)>) -> Option<(u64, String)> {
    node.map(|(id, n)| (id, n.addr))
}

impl ShardReplica {
    /// `pace` is the state machine's ([`super::ShardStateMachine::pace`]).
    pub fn new(
        group: GroupId,
        raft: Raft<ShardRaft>,
        store: Arc<SledStore>,
        rules: Arc<RuleSet>,
        pace: Arc<super::pace::SnapshotPace>,
    ) -> ShardReplica {
        let lease = Arc::new(LeaderLease::for_election_timeout(std::time::Duration::from_millis(raft.config().election_timeout_min)));
        ShardReplica { group, raft, store, rules, reads: ReadBarrier::default(), lease, vote_checks: ReadBarrier::default(), pace }
    }

    /// Asks openraft for a snapshot when one is due ([`super::pace`]): at
    /// least `every` entries applied since the last, and long enough after
    /// the last build. openraft ignores the ask while a build runs.
    pub async fn snapshot_if_due(&self, every: u64) {
        let (applied, snapshot) = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            (m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index))
        };
        let Some(applied) = applied else { return };
        let entries = match snapshot {
            Some(s) => applied.saturating_sub(s),
            None => applied + 1,
        };
        if self.pace.due(entries, every, std::time::Instant::now()) {
            if let Err(e) = self.raft.trigger().snapshot().await {
                tracing::warn!(shard = %self.group, error = %e, "asking for a snapshot failed");
            }
        }
    }

    fn unavailable(&self, reason: impl ToString) -> ShardFailure {
        ShardFailure::Unavailable { shard: self.group, reason: reason.to_string() }
    }

    /// Confirms that this replica leads and has applied every entry
    /// committed before the call: one round, shared with every read
    /// waiting at the same time ([`ReadBarrier`]). A round that confirms
    /// the leadership it started under renews the lease.
    async fn confirm_leadership(&self) -> Result<(), ShardFailure> {
        let (raft, shard, lease) = (self.raft.clone(), self.group, self.lease.clone());
        self.reads
            .confirm(move || {
                let (raft, lease) = (raft.clone(), lease.clone());
                async move {
                    let started = std::time::Instant::now();
                    let before = leadership(&raft);
                    match raft.ensure_linearizable().await {
                        Ok(_) => {
                            if let Some(of) = before.filter(|b| leadership(&raft) == Some(*b)) {
                                lease.confirmed(of, started);
                            }
                            Ok(())
                        }
                        Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                            Err(ShardFailure::NotLeader { shard, leader: leader_of(f.leader_id.zip(f.leader_node)) })
                        }
                        Err(RaftError::Fatal(f)) => Err(stopped(shard, &f)),
                        Err(e) => Err(ShardFailure::Unavailable { shard, reason: e.to_string() }),
                    }
                }
            })
            .await
    }

    /// Confirms, after a read under the lease, that this replica's Raft
    /// core still holds the lease's vote (it has not voted for a candidate
    /// since; its metrics may lag): one check, shared with the reads
    /// waiting, that started after the call.
    async fn vote_kept(&self) -> bool {
        let (raft, lease, shard) = (self.raft.clone(), self.lease.clone(), self.group);
        let lapsed = move || ShardFailure::Unavailable { shard, reason: "the leader lease lapsed".into() };
        self.vote_checks
            .confirm(move || {
                let (raft, held) = (raft.clone(), lease.held_vote());
                async move {
                    let Some(held) = held else { return Err(lapsed()) };
                    match raft.with_raft_state(move |st| *st.vote_ref() == held).await {
                        Ok(true) => Ok(()),
                        _ => Err(lapsed()),
                    }
                }
            })
            .await
            .is_ok()
    }

    /// Whether this replica leads under a lease that holds now.
    fn leased(&self) -> bool {
        leadership(&self.raft).is_some_and(|of| self.lease.holds(of, std::time::Instant::now()))
    }

    /// Serves a request on this replica (no forwarding). The shard actor
    /// batches writes itself ([`ShardReplica::write_batch`]); a write
    /// served here is an entry of its own.
    pub async fn serve(&self, req: ShardRequest) -> Result<ShardReply, ShardFailure> {
        match req {
            ShardRequest::Write(cmd) => self
                .write_batch(vec![*cmd])
                .await?
                .pop()
                .unwrap_or_else(|| Err(self.unavailable("a proposal was answered without outcomes"))),
            ShardRequest::Read(r) => self.read(r).await,
            ShardRequest::Membership(c) => self.change_membership(c).await,
            ShardRequest::Leadership(step) => self.leadership(step).await,
        }
    }

    fn write_failure(&self, e: RaftError<u64, ClientWriteError<u64, BasicNode>>) -> ShardFailure {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                ShardFailure::NotLeader { shard: self.group, leader: leader_of(f.leader_id.zip(f.leader_node)) }
            }
            RaftError::Fatal(f) => self.stopped(&f),
            e => self.unavailable(e),
        }
    }

    /// One step of a leader transfer. openraft 0.9 has no transfer call: the
    /// leader stops campaigning and waits for the target to hold its whole
    /// log; the target then campaigns, and wins with the leader's own vote
    /// (a leader does not hold a lease on its own vote).
    async fn leadership(&self, step: LeadershipStep) -> Result<ShardReply, ShardFailure> {
        match step {
            LeadershipStep::Hand { to } => {
                self.check_leader()?;
                let m = self.raft.metrics().borrow().clone();
                if to == m.id {
                    return Ok(ShardReply::Leadership(None));
                }
                let Some(target) = m.membership_config.membership().get_node(&to).cloned() else {
                    return Err(ShardFailure::Refused(Refusal::InvalidArgument {
                        field: "node_id".into(),
                        reason: format!("node {to} is not a member of shard {}", self.group),
                    }));
                };
                if !m.membership_config.voter_ids().any(|v| v == to) {
                    return Err(ShardFailure::Refused(Refusal::FailedPrecondition {
                        reason: format!("node {to} is not a voter of shard {}", self.group),
                        limit: None,
                    }));
                }
                // No lease across a transfer: the target campaigns at once.
                self.lease.revoke(m.current_term);
                self.raft.runtime_config().elect(false);
                let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
                loop {
                    let m = self.raft.metrics().borrow().clone();
                    let matched = m.replication.as_ref().and_then(|r| r.get(&to).copied().flatten()).map(|l| l.index);
                    if matched.is_some() && matched == m.last_log_index {
                        return Ok(ShardReply::Leadership(Some(target.addr)));
                    }
                    if tokio::time::Instant::now() > deadline {
                        self.raft.runtime_config().elect(true);
                        self.lease.resume();
                        return Err(self.unavailable(format!("node {to} did not catch up with the leader within 5 s")));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            }
            LeadershipStep::Campaign => {
                self.raft.trigger().elect().await.map_err(|e| self.unavailable(e))?;
                Ok(ShardReply::Leadership(None))
            }
            LeadershipStep::Resume => {
                self.raft.runtime_config().elect(true);
                self.lease.resume();
                Ok(ShardReply::Leadership(None))
            }
        }
    }

    async fn change_membership(&self, change: MembershipChange) -> Result<ShardReply, ShardFailure> {
        self.check_leader()?;
        let current: std::collections::BTreeSet<u64> = self.raft.metrics().borrow().membership_config.voter_ids().collect();
        let mut voters = current.clone();
        if let Some((node_id, addr)) = change.add {
            if !voters.contains(&node_id) {
                // Blocks until the learner holds the leader's log (from a
                // snapshot when it was compacted); bounded, so that a dead
                // target fails the step rather than holding it forever.
                let add = self.raft.add_learner(node_id, BasicNode { addr }, true);
                match tokio::time::timeout(LEARNER_CATCH_UP, add).await {
                    Ok(r) => r.map_err(|e| self.write_failure(e))?,
                    Err(_) => return Err(self.unavailable(format!("node {node_id} did not catch up within {LEARNER_CATCH_UP:?}"))),
                };
            }
            voters.insert(node_id);
        }
        if let Some(node_id) = change.remove {
            voters.remove(&node_id);
        }
        if voters.is_empty() {
            return Err(ShardFailure::Refused(super::Refusal::FailedPrecondition {
                reason: format!("a change would leave shard {} without members", self.group),
                limit: None,
            }));
        }
        if voters != current {
            self.raft.change_membership(voters.clone(), false).await.map_err(|e| self.write_failure(e))?;
        }
        Ok(ShardReply::Voters(voters.into_iter().collect()))
    }

    /// Whether this replica leads its group and is its only voter: no other
    /// replica could take its writes over.
    pub fn sole_voter_leading(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.current_leader == Some(m.id) && m.membership_config.membership().voter_ids().count() == 1
    }

    /// The storage error that stopped this replica's Raft group, if one did.
    pub fn storage_failure(&self) -> Option<String> {
        match &self.raft.metrics().borrow().running_state {
            Err(openraft::error::Fatal::StorageError(e)) => Some(e.to_string()),
            _ => None,
        }
    }

    /// Proposes several commands as one log entry; one answer per command.
    pub async fn write_batch(&self, commands: Vec<ShardCommand>) -> Result<Vec<Result<ShardReply, ShardFailure>>, ShardFailure> {
        let n = commands.len();
        match self.raft.client_write(Proposal { commands }).await {
            Ok(resp) if resp.data.len() == n => Ok(resp
                .data
                .into_iter()
                .map(|r| match r {
                    ShardResponse::Applied(o) => {
                        if let Outcome::Identify(i) = &o {
                            for c in &i.conflicts {
                                tracing::debug!(shard = %self.group, identifier = %c.identifier.redacted(), kind = ?c.kind, limit_type = %c.limit_type, "identifier dropped by merge protection");
                            }
                        }
                        Ok(ShardReply::Outcome(o))
                    }
                    ShardResponse::Txn(t) => Ok(ShardReply::Txn(t)),
                    ShardResponse::Map(m) => Ok(ShardReply::Map(m)),
                    ShardResponse::Restored(bytes) => Ok(ShardReply::Restored(bytes)),
                    ShardResponse::Forgotten(n) => Ok(ShardReply::Forgotten(n)),
                    ShardResponse::Refused(r) => Err(ShardFailure::Refused(r)),
                    ShardResponse::Nothing => Err(self.unavailable("a command was answered as a blank entry")),
                })
                .collect()),
            Ok(resp) => Err(self.unavailable(format!("{n} commands got {} answers", resp.data.len()))),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(ShardFailure::NotLeader { shard: self.group, leader: leader_of(f.leader_id.zip(f.leader_node)) })
            }
            Err(RaftError::Fatal(f)) => Err(self.stopped(&f)),
            Err(e) => Err(self.unavailable(e)),
        }
    }

    fn stopped(&self, f: &openraft::error::Fatal<u64>) -> ShardFailure {
        stopped(self.group, f)
    }

    /// Fails unless this replica believes it leads (no round trip).
    fn check_leader(&self) -> Result<(), ShardFailure> {
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader == Some(m.id) {
            return Ok(());
        }
        let leader = m.current_leader.and_then(|id| m.membership_config.membership().get_node(&id).map(|n| (id, n.addr.clone())));
        Err(ShardFailure::NotLeader { shard: self.group, leader })
    }

    /// The address of the replica this one believes leads its group, when
    /// that is another replica (no round trip: from the last metrics).
    pub fn leader_elsewhere(&self) -> Option<String> {
        match self.check_leader() {
            Err(ShardFailure::NotLeader { leader: Some((_, addr)), .. }) => Some(addr),
            _ => None,
        }
    }

    async fn read(&self, r: ShardRead) -> Result<ShardReply, ShardFailure> {
        let mode = r.mode();
        if mode == ReadMode::Leader {
            self.check_leader()?;
        }
        if mode != ReadMode::Linearizable {
            return self.read_now(r).await;
        }
        // Under a lease: read, then make sure the lease still held once
        // read (a read that outlasted it is served again after a round).
        if self.leased() {
            let answer = self.read_now(r.clone()).await;
            if self.leased() && self.vote_kept().await {
                self.lease.count_read(true);
                if self.lease.claim_renewal(std::time::Instant::now()) {
                    let replica = self.clone();
                    tokio::spawn(async move {
                        // A failed round leaves the lease to lapse.
                        let _ = replica.confirm_leadership().await;
                        replica.lease.renewed();
                    });
                }
                return answer;
            }
        }
        self.confirm_leadership().await?;
        self.lease.count_read(false);
        self.read_now(r).await
    }

    /// [`Self::read_here`], on the blocking pool for a read of the whole
    /// shard ([`ShardRead::reads_whole_shard`]), so that it holds none of
    /// the runtime's few workers meanwhile.
    async fn read_now(&self, r: ShardRead) -> Result<ShardReply, ShardFailure> {
        if !r.reads_whole_shard() {
            return self.read_here(&r);
        }
        let replica = self.clone();
        tokio::task::spawn_blocking(move || replica.read_here(&r))
            .await
            .unwrap_or_else(|e| Err(self.unavailable(format!("the read stopped: {e}"))))
    }

    /// Reads this replica's state as it is.
    fn read_here(&self, r: &ShardRead) -> Result<ShardReply, ShardFailure> {
        let store = &*self.store;
        let refused = |e: engine::EngineError| match Refusal::from_engine(e) {
            Ok(r) => ShardFailure::Refused(r),
            Err(s) => self.unavailable(s),
        };
        Ok(match r {
            ShardRead::Profile(p) | ShardRead::StaleProfile(p) => {
                ShardReply::Profile(engine::find_profile(store, &self.rules, p, "key").map_err(refused)?)
            }
            ShardRead::Merge(id) => ShardReply::Merge(engine::find_merge(store, id).map_err(refused)?),
            ShardRead::Hubs(limit) => ShardReply::Hubs(store.listed_hubs(*limit).map_err(|e| self.unavailable(e))?),
            ShardRead::Counters => ShardReply::Counters(store.counters().map_err(|e| self.unavailable(e))?),
            ShardRead::Keys { keys, .. } => {
                ShardReply::Keys(keys.iter().map(|k| txn::read_key(store, k)).collect::<Result<_, _>>().map_err(|e| self.unavailable(e))?)
            }
            ShardRead::Leader => ShardReply::LeaderId(self.raft.metrics().borrow().current_leader),
            ShardRead::Members => {
                let m = self.raft.metrics().borrow().clone();
                ShardReply::Members(m.membership_config.membership().nodes().map(|(_, n)| n.addr.clone()).collect())
            }
            ShardRead::ClusterMap { .. } => ShardReply::Map(idgraph_core::meta::read_map(store).map_err(|e| self.unavailable(e))?),
            ShardRead::RuleSets => ShardReply::RuleSets(idgraph_core::meta::rule_sets(store).map_err(|e| self.unavailable(e))?),
            ShardRead::Rollouts { finished } => {
                let finished = *finished;
                let current = idgraph_core::meta::current_rollout(store).map_err(|e| self.unavailable(e))?.map(Box::new);
                let finished = match finished {
                    true => idgraph_core::meta::finished_rollouts(store).map_err(|e| self.unavailable(e))?,
                    false => Vec::new(),
                };
                ShardReply::Rollouts { current, finished }
            }
            ShardRead::Image => ShardReply::Image(crate::raft::state_machine::backup_image(store).map_err(|e| self.unavailable(e))?),
            ShardRead::MetaBackup => {
                ShardReply::MetaBackup(Box::new(idgraph_core::meta::meta_backup(store).map_err(|e| self.unavailable(e))?))
            }
            ShardRead::Audit { after, limit } => {
                ShardReply::Audit(idgraph_core::meta::audit_entries(store, after, *limit).map_err(|e| self.unavailable(e))?)
            }
            ShardRead::MergesUnder { rule_version } => {
                let all = store.all_merges().map_err(|e| self.unavailable(e))?;
                ShardReply::Merges(all.iter().filter(|m| m.rule_version == *rule_version).map(MergeStamp::of).collect())
            }
            ShardRead::PreparedBefore { before_ms } => {
                ShardReply::Locks(txn::prepared_before(store, *before_ms).map_err(|e| self.unavailable(e))?)
            }
            ShardRead::ExpiredEvents { before_ms, after, scan } => {
                let page =
                    idgraph_core::graph::GraphStore::events_after(store, after.as_deref(), *scan).map_err(|e| self.unavailable(e))?;
                let next = (page.len() == *scan).then(|| page.last().map(|(id, _)| id.clone())).flatten();
                let event_ids = page.into_iter().filter(|(_, r)| r.applied_ms < *before_ms).map(|(id, _)| id).collect();
                ShardReply::ExpiredEvents { event_ids, next }
            }
        })
    }
}
