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
//! - `txn.status/<txn>` (primary shard only): the decision, `Committed` or
//!   `Aborted`, written once; writing `Committed` is the commit point.

use crate::graph::{decode, encode, GraphKey, GraphRead, GraphValue, StoreError};
use crate::model::{Change, ChangeSet, ShardId};
use serde::{Deserialize, Serialize};

/// One record as a shard read it, with the lock on it if any.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRead {
    pub value: GraphValue,
    pub lock: Option<LockRecord>,
}

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
    /// On a secondary shard: validate the reads, lock every read and written
    /// record, keep the writes until the decision.
    Prepare { txn: TxnId, primary: ShardId, at_ms: i64, reads: Vec<(GraphKey, u128)>, writes: ChangeSet },
    /// On the primary, once every secondary prepared: the commit point.
    /// Validates the primary's own reads, applies its writes and records the
    /// transaction committed, in one step; or records it aborted (a record
    /// changed or is locked, or a recovery aborted it first).
    Commit { txn: TxnId, reads: Vec<(GraphKey, u128)>, writes: ChangeSet },
    /// On a secondary, after the commit: apply the kept writes, release.
    Apply { txn: TxnId },
    /// On a secondary, when the transaction did not commit: release without
    /// applying.
    Abort { txn: TxnId },
    /// On the primary, asked by whoever meets an abandoned lock: the
    /// decision; an undecided transaction is decided aborted.
    Resolve { txn: TxnId },
    /// On the primary, once every secondary applied: drop the record.
    Forget { txn: TxnId },
}

/// A shard's answer to a [`TxnOp`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TxnReply {
    Applied,
    Prepared,
    Committed,
    Aborted,
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

/// The decision on a transaction, kept by its primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    Committed,
    Aborted,
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

/// A record with the lock on it, as a reader fetches it while parts may be
/// applied beside it. The lock is read first: a part applied between the
/// two reads then shows either its lock or its new value. Read the other
/// way round, the old value could come back with no lock (the apply
/// releasing it in between), a state no transaction ever left.
pub fn read_key<R: GraphRead + ?Sized>(r: &R, key: &GraphKey) -> Result<KeyRead, StoreError> {
    let lock = lock_on(r, key)?;
    Ok(KeyRead { lock, value: key.read(r)? })
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

fn decide(cs: &mut ChangeSet, txn: &str, state: TxnState) {
    cs.push(Change::PutMeta(format!("{STATUS}{txn}"), encode(&state)));
}

/// Applies one transaction step to a shard's state: the changes to write
/// atomically, and the answer. Deterministic: every replica computes the
/// same from the same state.
pub fn apply_op<R: GraphRead + ?Sized>(r: &R, op: &TxnOp) -> Result<(ChangeSet, TxnReply), StoreError> {
    let prepared = |txn: &str| get::<PreparedPart, R>(r, &format!("{PREPARED}{txn}"));
    let decision = |txn: &str| get::<TxnState, R>(r, &format!("{STATUS}{txn}"));
    let mut cs = ChangeSet::default();
    let reply = match op {
        TxnOp::Single { reads, writes } => match validate(r, None, reads, writes)? {
            Some(conflict) => conflict,
            None => {
                cs = writes.clone();
                TxnReply::Applied
            }
        },
        TxnOp::Prepare { txn, primary, at_ms, reads, writes } => {
            if prepared(txn)?.is_some() {
                return Ok((cs, TxnReply::Prepared));
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
            TxnReply::Prepared
        }
        TxnOp::Commit { txn, reads, writes } => match decision(txn)? {
            Some(TxnState::Committed) => TxnReply::Committed,
            Some(TxnState::Aborted) => TxnReply::Aborted,
            None => match validate(r, None, reads, writes)? {
                Some(conflict) => {
                    decide(&mut cs, txn, TxnState::Aborted);
                    conflict
                }
                None => {
                    cs = writes.clone();
                    decide(&mut cs, txn, TxnState::Committed);
                    TxnReply::Committed
                }
            },
        },
        TxnOp::Apply { txn } => {
            if let Some(part) = prepared(txn)? {
                cs = finish(&part, txn, true);
            }
            TxnReply::Applied
        }
        TxnOp::Abort { txn } => {
            if let Some(part) = prepared(txn)? {
                cs = finish(&part, txn, false);
            }
            TxnReply::Aborted
        }
        TxnOp::Resolve { txn } => match decision(txn)? {
            Some(TxnState::Committed) => TxnReply::Committed,
            Some(TxnState::Aborted) => TxnReply::Aborted,
            None => {
                decide(&mut cs, txn, TxnState::Aborted);
                TxnReply::Aborted
            }
        },
        TxnOp::Forget { txn } => {
            if decision(txn)? == Some(TxnState::Committed) {
                cs.push(Change::DeleteMeta(format!("{STATUS}{txn}")));
            }
            TxnReply::Applied
        }
    };
    Ok((cs, reply))
}
