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
//! 3. **Prepare.** Otherwise each shard involved gets [`TxnOp::Prepare`]
//!    with its reads and writes: it validates them, locks every record named
//!    and keeps the writes. The *primary* (the shard of the first write)
//!    also records the transaction as pending.
//! 4. **Commit.** When every shard prepared, [`TxnOp::Commit`] on the primary
//!    turns pending into committed and applies the primary's part. **This
//!    is the commit point**; the command is acknowledged after it.
//! 5. **Apply.** Every other shard applies its kept writes and releases its
//!    locks ([`TxnOp::Apply`]); the primary then forgets the record.
//!
//! A shard that refuses to prepare (a record changed or is locked) makes the
//! coordinator abort the others and start again from step 1 with fresh
//! reads, after a jittered backoff. Prepares never wait, so there are no
//! deadlocks.
//!
//! # Recovery rule
//!
//! A lock names its transaction, its primary and when it was taken. Whoever
//! meets a lock older than [`LOCK_TIMEOUT_MS`] (a reader, a writer, or the
//! shard leader's periodic sweep) asks the primary ([`TxnOp::Resolve`]):
//! committed means apply this shard's kept part; pending and expired, or
//! unknown, is aborted *at the primary* first (so a late commit finds it
//! aborted), then the part is released. A coordinator that dies before the
//! commit point leaves a transaction that will be aborted, and its client,
//! which got no answer, retries with the same event id; one that dies after
//! it leaves one that is rolled forward, and the retry finds the event
//! applied (a duplicate).
//!
//! # Why the invariants hold
//!
//! The graph changes only by applying a change set the engine computed from
//! a read set that was, at every shard's prepare, still current and then
//! locked until the change set was applied there; so the result is that of
//! running the commands one after another in commit order, and the engine's
//! single-shard invariants carry over. Each step is a Raft command, so it is
//! durable and replicated before anyone relies on it. The decision is made
//! once, by a compare-and-set in the primary's log.
//!
//! The property tests in `txn::tests` run concurrent commands over in-memory
//! shards with coordinators that crash at every step, then check the graph.

pub mod coordinator;
pub mod keys;
pub mod participant;
pub mod read_set;

#[cfg(test)]
mod tests;

pub use coordinator::{gather, KeyRead, ReadMode, ShardAccess, LOCK_TIMEOUT_MS};
pub use keys::{GraphKey, GraphValue};
pub use participant::{apply_op, lock_on, prepared_before, LockRecord, TxnOp, TxnReply};
pub use read_set::ReadSet;

use crate::engine::EngineError;
use crate::model::ShardId;
use crate::storage::StoreError;

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
    /// Other commands kept changing the same records; nothing changed.
    #[error("gave up after {attempts} attempts: concurrent requests kept changing the same profiles")]
    Contention { attempts: u32 },
    #[error("{0}")]
    Internal(String),
}

impl TxnError {
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

/// A place where, in a build with the `failpoints` feature and
/// `FAILPOINTS=<name>=return`, the process exits at once, as a crash there
/// would end it (used by the crash tests).
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    fail::fail_point!(name, |_| {
        eprintln!("crash point {name} reached: exiting");
        std::process::exit(86)
    });
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}
