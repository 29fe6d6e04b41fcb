//! Cross-shard transactions: how one command that reads and writes records
//! on several shards changes them atomically.
//!
//! # Why
//!
//! Records are spread over shards by what names them ([`GraphKey::shard`]):
//! an identifier's owner entry by the identifier, a profile by its id, an
//! event's dedup record by the event id. An identity event that joins two
//! profiles reads and writes records on several shards, each its own Raft
//! group. Whatever crashes, and whatever runs concurrently, afterwards every
//! identifier is in exactly one live profile, no owner entry points at a
//! missing profile, merged-away ids resolve, no unforced change breaks a
//! limit, and an acknowledged event is applied exactly once.
//!
//! # Protocol (optimistic reads, two-phase commit with a primary)
//!
//! 1. **Read.** The coordinator (the router of the node that received the
//!    request) runs the pure engine over a [`ReadSet`]: records it lacks are
//!    fetched from the shard leaders, per shard in parallel, and the engine
//!    runs again, until a run needs nothing new. The engine is unchanged: it
//!    cannot tell a read set from a local store. Reads wait while a record
//!    is locked.
//! 2. **One shard.** If every record read and written is on one shard, one
//!    [`TxnOp::Single`] validates that each read value is unchanged (by
//!    digest) and unlocked, and applies the writes, in one log entry.
//! 3. **Prepare.** Otherwise one shard is the *primary* (the shard of the
//!    first write) and the others are secondaries. Each secondary gets
//!    [`TxnOp::Prepare`] with its reads and writes: it validates them, locks
//!    every record named (the lock names the transaction and its primary)
//!    and keeps the writes.
//! 4. **Commit.** When every secondary prepared, [`TxnOp::Commit`] on the
//!    primary validates the primary's own reads, applies its writes and
//!    records the decision `Committed`, in one log entry; or records
//!    `Aborted` if a record changed, is locked, or a recovery decided first.
//!    **Recording `Committed` is the commit point**; the command is answered
//!    right after it.
//! 5. **Apply.** In the background, every secondary applies its kept writes
//!    and releases its locks ([`TxnOp::Apply`]); then the primary forgets
//!    the decision. Until a secondary has applied, its records stay locked,
//!    so a reader waits and sees the whole transaction or none of it.
//!
//! A secondary that refuses to prepare (a record changed or is locked), or
//! a primary that decides `Aborted`, makes the coordinator release the
//! prepared parts ([`TxnOp::Abort`]) and start again from step 1 with fresh
//! reads, after a jittered backoff. Prepares never wait, so there are no
//! deadlocks. Transaction ids are unique per attempt.
//!
//! # Recovery rule
//!
//! Whoever meets a lock older than [`LOCK_TIMEOUT_MS`] (a reader, a
//! coordinator whose prepare it refused, or the shard leader's periodic
//! sweep of its own prepared parts) asks the primary ([`TxnOp::Resolve`]):
//! `Committed` means apply this shard's kept part; `Aborted`, or no decision
//! at all, which the primary then records as `Aborted` in the same step (so
//! a late commit of that transaction fails), means release it. A
//! coordinator that dies before the commit point leaves a transaction that
//! will be aborted, and its client, which got no answer, retries with the
//! same event id; one that dies after it leaves one that is rolled forward,
//! and the retry reads the event's dedup record and is answered as a
//! duplicate.
//!
//! # Why the invariants hold
//!
//! The graph changes only by applying a change set the engine computed from
//! a read set that was still current at every secondary's prepare (and then
//! locked there until applied) and at the primary's commit (which applies
//! at once); so the result is that of running the commands one after
//! another in commit order, and the engine's single-shard invariants carry
//! over. Each step is a Raft command, so it is durable and replicated
//! before anyone relies on it. The decision is recorded once, in the
//! primary's log; a part is applied only after `Committed` and released
//! only after `Aborted`; the decision is forgotten only after every part
//! applied.
//!
//! The property tests in `txn::tests` run concurrent commands over in-memory
//! shards with coordinators that crash at every step, then check the graph.

pub mod coordinator;

#[cfg(test)]
mod tests;

pub use coordinator::{gather, ReadMode, ShardAccess, LOCK_TIMEOUT_MS};
// The pure steps live in `idgraph-core`; the protocol is told here.
pub use idgraph_core::graph::{GraphKey, GraphValue};
pub use idgraph_core::txn::{apply_op, lock_on, prepared_before, read_key, KeyRead, LockRecord, ReadSet, TxnOp, TxnReply};

use crate::storage::StoreError;
use idgraph_core::engine::EngineError;
use idgraph_core::model::ShardId;

/// Why a cross-shard command failed, by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum TxnError {
    /// The engine refused the command (the caller's fault); nothing changed.
    #[error(transparent)]
    Refused(EngineError),
    /// A shard could not be reached or has no leader; the outcome of a
    /// write is unknown: retry (an event with the same id is applied once).
    #[error("shard {shard} unavailable: {reason}")]
    Unavailable { shard: ShardId, reason: String },
    /// A shard refused new work (too many writes waiting); nothing changed.
    #[error("shard {shard} is overloaded: {reason}")]
    Overloaded { shard: ShardId, reason: String },
    /// A shard's disk is full, so it took no new work; nothing changed.
    #[error("the disk of the node leading shard {shard} is full")]
    DiskFull { shard: ShardId },
    /// Other commands kept changing the same records; nothing changed.
    #[error("gave up after {attempts} attempts: concurrent requests kept changing the same profiles")]
    Contention { attempts: u32 },
    #[error("{0}")]
    Internal(String),
}

impl TxnError {
    /// A shard refused new work (overloaded, or its disk full): it took
    /// nothing, and retrying at once would meet the same refusal.
    pub fn refused_new_work(&self) -> bool {
        matches!(self, TxnError::Overloaded { .. } | TxnError::DiskFull { .. })
    }

    fn from_engine(e: EngineError) -> TxnError {
        match e {
            EngineError::Store(s) => TxnError::from(s),
            e => TxnError::Refused(e),
        }
    }
}

impl From<StoreError> for TxnError {
    fn from(e: StoreError) -> TxnError {
        TxnError::Internal(e.to_string())
    }
}
