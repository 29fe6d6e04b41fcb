//! Raft for one shard: the shard's commands go through an openraft log
//! before the engine applies them.
//!
//! # Protocol and invariants
//!
//! A shard replica is a Raft group member. A client command (a
//! [`Command`](idgraph_core::engine::Command): an identity event or an operator
//! call, stamped once by the proposer with its time and operation id) is
//! appended to the group's log; once a quorum holds it, every replica applies
//! it to its own graph with the same pure engine. Because the engine reads no
//! clock and draws no randomness, the same log applied to the same snapshot
//! gives the same graph on every replica.
//!
//! - The log ([`ShardLogStore`], over the [`RaftLog`](crate::storage::RaftLog)
//!   tables) is durable before openraft is told so: every append, vote and
//!   truncation is fsync'd before its callback fires or its call returns.
//! - The state machine ([`ShardStateMachine`], over a
//!   [`GraphStore`](crate::storage::GraphStore)) writes each entry's graph
//!   changes and its log id in one atomic batch, so the graph never holds an
//!   entry's changes without knowing it applied that entry. It does not fsync
//!   per entry: after a crash openraft re-applies the log from the last
//!   applied id the store kept.
//! - A snapshot is the whole shard graph plus the last applied log id and
//!   membership. The store is fsync'd before a snapshot is taken, so the log
//!   it allows openraft to purge is never needed again. Its image is a file
//!   (`image`), written as the records are read, sent and received in
//!   chunks, and kept by an atomic rename.
//! - Commands are proposed in batches ([`Proposal`]); the state machine runs
//!   an entry's commands in order through one [`Staged`](crate::storage::Staged)
//!   view (each sees the writes of those before it) and writes the entry's
//!   records, counters and log id as one atomic change set: an entry is
//!   applied whole or not at all. (Data directories written before kept
//!   `(log id, command index)` per command; replay still skips the commands
//!   such a half-applied entry had applied.)
//! - A linearizable read on the leader waits for a round of heartbeats
//!   confirming its leadership (shared by the reads waiting,
//!   `read_barrier`), or reads at once while the lease of a recent round
//!   holds (`lease`, whose essay argues why no other leader can exist
//!   meanwhile). A leadership transfer revokes the lease first.
//! - A refused command (bad input, a limit) is a deterministic outcome, not
//!   a storage error: it is applied as "no change" and answered on every
//!   replica alike.
//!
//! The storage implementations are checked with openraft's own conformance
//! suite (`openraft::testing::Suite`) in this module's tests.

// openraft's trait methods return its `StorageError` by value; our helpers
// return the same type rather than boxing and unboxing it.
#![allow(clippy::result_large_err)]

mod image;
pub mod lease;
mod log_store;
pub mod pace;
mod read_barrier;
pub mod replica;
mod state_machine;

pub use log_store::{LogFlusher, ShardLogStore};
pub use replica::{
    GroupMember, LeadershipStep, MembershipChange, RaftRole, ReplicaStatus, Replicas, ShardFailure, ShardRead, ShardReplica, ShardReply,
    ShardRequest,
};
pub use state_machine::{replica_digest, ReplicaDigest, ShardStateMachine};

use idgraph_core::engine::{EngineError, Outcome};
use serde::{Deserialize, Serialize};

openraft::declare_raft_types!(
    /// Types of a shard's Raft group.
    pub ShardRaft:
        D = Proposal,
        R = Vec<ShardResponse>,
        SnapshotData = image::ImageData,
);

/// One log entry: the commands a shard leader batched together. Batching
/// amortises Raft's per-entry cost, and the state machine applies the whole
/// entry as one atomic write, so that a crash part-way through an entry
/// neither loses nor repeats a command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub commands: Vec<ShardCommand>,
}

/// One command of a shard's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ShardCommand {
    /// A client command the engine runs on this shard alone (a one-shard
    /// map: every record is here).
    Engine(idgraph_core::engine::Command),
    /// A step of a cross-shard transaction (see [`crate::txn`]).
    Txn(crate::txn::TxnOp),
    /// A change of the cluster map (metadata group only, see [`idgraph_core::meta`]).
    Meta(idgraph_core::meta::MetaCommand),
    /// Replaces a shard's records, which must be empty, with a backup's
    /// image of them (`Admin.Restore`).
    Restore(Vec<u8>),
    /// Forgets those of the named events' dedup records applied before
    /// `before_ms` (see [`idgraph_core::retention`]); proposed by the
    /// shard leader's retention sweep.
    ForgetEvents { before_ms: i64, event_ids: Vec<String> },
}

/// Log commands a build applies beyond those every build applies, as the
/// peer transport's `Features` answers them: a leader proposes such a
/// command only once every member of its group names it (an older follower
/// could not read the entry, and would refuse every later one).
pub const LOG_FEATURES: &[&str] = &[FORGET_EVENTS];

/// [`ShardCommand::ForgetEvents`].
pub const FORGET_EVENTS: &str = "forget-events";

/// What applying one log entry answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ShardResponse {
    /// A blank or membership entry.
    Nothing,
    Applied(Outcome),
    /// The engine refused the command; nothing changed.
    Refused(Refusal),
    Txn(crate::txn::TxnReply),
    /// The cluster map after a [`ShardCommand::Meta`].
    Map(idgraph_core::meta::ClusterMap),
    /// A [`ShardCommand::Restore`] took the image: its size in bytes.
    Restored(u64),
    /// A [`ShardCommand::ForgetEvents`] forgot this many records.
    Forgotten(u64),
}

/// An engine refusal as it travels through Raft (the caller maps it to a
/// status).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Refusal {
    InvalidArgument { field: String, reason: String },
    NotFound { field: String, what: String },
    FailedPrecondition { reason: String, limit: Option<String> },
}

impl Refusal {
    /// A refusal from an engine error; storage errors are not refusals.
    pub fn from_engine(e: EngineError) -> Result<Refusal, crate::storage::StoreError> {
        match e {
            EngineError::InvalidArgument { field, reason } => Ok(Refusal::InvalidArgument { field, reason }),
            EngineError::NotFound { field, what } => Ok(Refusal::NotFound { field, what }),
            EngineError::FailedPrecondition { reason, limit } => Ok(Refusal::FailedPrecondition { reason, limit }),
            EngineError::Store(s) => Err(s),
        }
    }

    /// A refusal of the metadata group (never a storage error).
    pub fn from_meta(e: idgraph_core::meta::MetaError) -> Refusal {
        use idgraph_core::canary::CanaryRefusal;
        match e {
            idgraph_core::meta::MetaError::Canary(CanaryRefusal::InvalidPlan { field, reason }) => {
                Refusal::InvalidArgument { field: format!("plan.{field}"), reason }
            }
            other => Refusal::FailedPrecondition { reason: other.to_string(), limit: None },
        }
    }

    pub fn into_engine(self) -> EngineError {
        match self {
            Refusal::InvalidArgument { field, reason } => EngineError::InvalidArgument { field, reason },
            Refusal::NotFound { field, what } => EngineError::NotFound { field, what },
            Refusal::FailedPrecondition { reason, limit } => EngineError::FailedPrecondition { reason, limit },
        }
    }
}

pub type NodeId = u64;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Raft records (log entries, vote, bookkeeping) and peer messages are
/// encoded as stored graph records are: MessagePack with the fields in
/// declaration order and no names. [`decode`] also reads the named form
/// that builds before it wrote, so logs and peers of those stay readable.
pub(crate) use crate::storage::encode_record as encode;

/// Reads back what [`encode`] wrote.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, crate::storage::StoreError> {
    crate::storage::decode(b"raft record", bytes)
}

fn read_err(e: crate::storage::StoreError) -> StorageError {
    openraft::StorageIOError::read(openraft::AnyError::new(&e)).into()
}

fn write_err(e: crate::storage::StoreError) -> StorageError {
    openraft::StorageIOError::write(openraft::AnyError::new(&e)).into()
}

#[cfg(test)]
mod tests;
