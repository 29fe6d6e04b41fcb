//! What one shard does with a transaction step: pure functions from the
//! shard's state and a [`TxnOp`] to the changes to write (in the same atomic
//! batch as the Raft bookkeeping) and the reply.
//!
//! A shard keeps three kinds of transaction records, as meta values that
//! snapshots carry:
//! - `txn.lock/<key hash>`: a [`LockRecord`] on a graph record, held from
//!   prepare to apply or abort;
//! - `txn.prepared/<txn>`: the shard's part of the change set and the locks
//!   it holds, waiting for the decision;
//! - `txn.status/<txn>` (primary shard only): the transaction's state,
//!   whose move from `Pending` to `Committed` is the commit point.

use super::keys::GraphKey;
use crate::model::{Change, ChangeSet, ShardId};
use crate::storage::{decode, encode, GraphRead, StoreError};
use serde::{Deserialize, Serialize};

pub type TxnId = String;

const LOCK: &str = "txn.lock/";
const PREPARED: &str = "txn.prepared/";
const STATUS: &str = "txn.status/";

/// A transaction step, applied through the shard's Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Every record the command read and wrote is on this shard: validate
    /// the reads and apply the writes in one step.
    Single { reads: Vec<(GraphKey, u128)>, writes: ChangeSet },
    /// Validate the reads, lock every read and written record, keep the
    /// writes until the decision. On the primary, also records the
    /// transaction as pending.
    Prepare { txn: TxnId, primary: ShardId, is_primary: bool, at_ms: i64, reads: Vec<(GraphKey, u128)>, writes: ChangeSet },
    /// On the primary: the commit point. Pending becomes committed and the
    /// primary's own part is applied; an aborted transaction stays aborted.
    Commit { txn: TxnId },
    /// On a participant, after the commit: apply the kept writes, release.
    Apply { txn: TxnId },
    /// Release without applying. On the primary, the transaction becomes
    /// aborted unless it is already committed (then nothing happens).
    Abort { txn: TxnId, is_primary: bool },
    /// On the primary, asked by whoever meets one of the transaction's
    /// locks: its state; a pending one that began before
    /// `expire_before_ms`, or an unknown one, is aborted first.
    Resolve { txn: TxnId, expire_before_ms: i64 },
    /// On the primary, once every participant applied: drop the record.
    Forget { txn: TxnId },
}

/// A shard's answer to a [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TxnReply {
    Applied,
    Prepared,
    Committed,
    Aborted,
    Pending,
    /// The step was refused because a record it names is locked by another
    /// transaction (`lock`) or changed since it was read (`lock: None`).
    Conflict {
        lock: Option<LockRecord>,
    },
}

/// A lock on one record: whose it is, where its decision is kept, since
/// when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    pub txn: TxnId,
    pub primary: ShardId,
    pub at_ms: i64,
}

/// A shard's part of a transaction while it waits for the decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreparedPart {
    pub lock: LockRecord,
    pub locks: Vec<String>,
    pub writes: ChangeSet,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    Pending,
    Committed,
    Aborted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TxnStatus {
    state: TxnState,
    at_ms: i64,
}

fn get<T: serde::de::DeserializeOwned, R: GraphRead + ?Sized>(r: &R, key: &str) -> Result<Option<T>, StoreError> {
    match r.meta(key)? {
        Some(bytes) => decode(key.as_bytes(), &bytes).map(Some),
        None => Ok(None),
    }
}

/// The lock on a record, if any.
pub fn lock_on<R: GraphRead + ?Sized>(r: &R, key: &GraphKey) -> Result<Option<LockRecord>, StoreError> {
    get(r, &format!("{LOCK}{}", key.lock_name()))
}

/// Prepared parts on this shard whose lock was taken before `before_ms`.
pub fn prepared_before<R: GraphRead + ?Sized>(r: &R, before_ms: i64) -> Result<Vec<LockRecord>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in r.meta_prefix(PREPARED)? {
        let part: PreparedPart = decode(k.as_bytes(), &v)?;
        if part.lock.at_ms < before_ms {
            out.push(part.lock);
        }
    }
    Ok(out)
}

/// Number of prepared parts on this shard (for stats and tests).
pub fn prepared_count<R: GraphRead + ?Sized>(r: &R) -> Result<usize, StoreError> {
    Ok(r.meta_prefix(PREPARED)?.len())
}

/// Checks that no other transaction locks the records and that every read
/// value is unchanged; the first violation is the answer.
fn validate<R: GraphRead + ?Sized>(
    r: &R,
    txn: Option<&str>,
    reads: &[(GraphKey, u128)],
    writes: &ChangeSet,
) -> Result<Option<TxnReply>, StoreError> {
    let foreign = |key: &GraphKey| -> Result<Option<TxnReply>, StoreError> {
        Ok(lock_on(r, key)?.filter(|l| Some(l.txn.as_str()) != txn).map(|l| TxnReply::Conflict { lock: Some(l) }))
    };
    for (key, digest) in reads {
        if let Some(c) = foreign(key)? {
            return Ok(Some(c));
        }
        if key.read(r)?.digest() != *digest {
            return Ok(Some(TxnReply::Conflict { lock: None }));
        }
    }
    for c in &writes.changes {
        let key = GraphKey::written_by(c).ok_or_else(|| StoreError::Corrupt {
            key: "transaction".into(),
            reason: "a transaction carries shard bookkeeping among its writes".into(),
        })?;
        if let Some(c) = foreign(&key)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// The writes of a prepared part and the release of its locks.
fn finish(part: &PreparedPart, txn: &str, apply: bool) -> ChangeSet {
    let mut cs = if apply { part.writes.clone() } else { ChangeSet::default() };
    for l in &part.locks {
        cs.push(Change::DeleteMeta(format!("{LOCK}{l}")));
    }
    cs.push(Change::DeleteMeta(format!("{PREPARED}{txn}")));
    cs
}

fn set_status(cs: &mut ChangeSet, txn: &str, state: TxnState, at_ms: i64) {
    cs.push(Change::PutMeta(format!("{STATUS}{txn}"), encode(&TxnStatus { state, at_ms })));
}

/// Applies one transaction step to a shard's state: the changes to write
/// atomically, and the answer. Deterministic: every replica computes the
/// same from the same state.
pub fn apply_op<R: GraphRead + ?Sized>(r: &R, op: &TxnOp) -> Result<(ChangeSet, TxnReply), StoreError> {
    let prepared = |txn: &str| get::<PreparedPart, R>(r, &format!("{PREPARED}{txn}"));
    let status = |txn: &str| get::<TxnStatus, R>(r, &format!("{STATUS}{txn}"));
    let mut cs = ChangeSet::default();
    let reply = match op {
        TxnOp::Single { reads, writes } => match validate(r, None, reads, writes)? {
            Some(conflict) => conflict,
            None => {
                cs = writes.clone();
                TxnReply::Applied
            }
        },
        TxnOp::Prepare { txn, primary, is_primary, at_ms, reads, writes } => {
            if prepared(txn)?.is_some() {
                return Ok((cs, TxnReply::Prepared));
            }
            if *is_primary && status(txn)?.is_some() {
                // Aborted by a recovery before this prepare arrived.
                return Ok((cs, TxnReply::Aborted));
            }
            if let Some(conflict) = validate(r, Some(txn), reads, writes)? {
                return Ok((cs, conflict));
            }
            let lock = LockRecord { txn: txn.clone(), primary: *primary, at_ms: *at_ms };
            let mut locks: Vec<String> = reads
                .iter()
                .map(|(k, _)| k.lock_name())
                .chain(writes.changes.iter().filter_map(GraphKey::written_by).map(|k| k.lock_name()))
                .collect();
            locks.sort();
            locks.dedup();
            for l in &locks {
                cs.push(Change::PutMeta(format!("{LOCK}{l}"), encode(&lock)));
            }
            cs.push(Change::PutMeta(format!("{PREPARED}{txn}"), encode(&PreparedPart { lock, locks, writes: writes.clone() })));
            if *is_primary {
                set_status(&mut cs, txn, TxnState::Pending, *at_ms);
            }
            TxnReply::Prepared
        }
        TxnOp::Commit { txn } => match status(txn)? {
            Some(TxnStatus { state: TxnState::Committed, .. }) => TxnReply::Committed,
            Some(TxnStatus { state: TxnState::Pending, at_ms }) => {
                if let Some(part) = prepared(txn)? {
                    cs = finish(&part, txn, true);
                }
                set_status(&mut cs, txn, TxnState::Committed, at_ms);
                TxnReply::Committed
            }
            Some(TxnStatus { state: TxnState::Aborted, .. }) | None => TxnReply::Aborted,
        },
        TxnOp::Apply { txn } => {
            if let Some(part) = prepared(txn)? {
                cs = finish(&part, txn, true);
            }
            TxnReply::Applied
        }
        TxnOp::Abort { txn, is_primary } => {
            let st = status(txn)?;
            if st.as_ref().is_some_and(|s| s.state == TxnState::Committed) {
                return Ok((cs, TxnReply::Committed));
            }
            if let Some(part) = prepared(txn)? {
                cs = finish(&part, txn, false);
            }
            if *is_primary || st.is_some() {
                set_status(&mut cs, txn, TxnState::Aborted, st.map_or(0, |s| s.at_ms));
            }
            TxnReply::Aborted
        }
        TxnOp::Resolve { txn, expire_before_ms } => match status(txn)? {
            Some(TxnStatus { state: TxnState::Committed, .. }) => TxnReply::Committed,
            Some(TxnStatus { state: TxnState::Pending, at_ms }) if at_ms >= *expire_before_ms => TxnReply::Pending,
            st => {
                if let Some(part) = prepared(txn)? {
                    cs = finish(&part, txn, false);
                }
                set_status(&mut cs, txn, TxnState::Aborted, st.map_or(0, |s| s.at_ms));
                TxnReply::Aborted
            }
        },
        TxnOp::Forget { txn } => {
            if status(txn)?.is_some_and(|s| s.state == TxnState::Committed) {
                cs.push(Change::DeleteMeta(format!("{STATUS}{txn}")));
            }
            TxnReply::Applied
        }
    };
    Ok((cs, reply))
}
