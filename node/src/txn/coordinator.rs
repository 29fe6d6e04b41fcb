//! The coordinator: runs one command across the shards it touches.
//!
//! It is the I/O shell around the pure engine and the pure participant
//! steps: it fetches what the engine reads ([`gather`]), runs the engine,
//! and commits the change set with one [`TxnOp::Single`] when one shard
//! holds everything, or with prepare / commit / apply otherwise. It talks to
//! shards through [`ShardAccess`], which the node's router implements over
//! Raft and gRPC and the tests implement over in-memory stores.

use super::TxnError;
use crate::crash::crash_point;
use futures::future::join_all;
use idgraph_core::engine::{self, Command, Outcome};
use idgraph_core::graph::{GraphKey, GraphValue};
use idgraph_core::model::{ChangeSet, ShardId};
use idgraph_core::rules::RuleSet;
use idgraph_core::txn::{KeyRead, LockRecord, ReadSet, TxnOp, TxnReply};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::Duration;

/// A lock older than this is presumed abandoned by a dead coordinator: whoever
/// meets it asks the transaction's primary shard to decide.
pub const LOCK_TIMEOUT_MS: i64 = 3_000;
/// Attempts of one command before it gives up under contention, if it has
/// also tried for longer than [`RETRY_FOR_MS`].
const MAX_ATTEMPTS: u32 = 40;
/// How long a command keeps retrying at least (a dead coordinator's locks
/// hold for [`LOCK_TIMEOUT_MS`]).
const RETRY_FOR_MS: i64 = 3 * LOCK_TIMEOUT_MS;
/// Read rounds of one engine run (its dependency depth is about three).
const MAX_ROUNDS: usize = 32;
/// How long a read waits behind locks, one after another, in all.
const LOCK_WAIT_MS: i64 = 10 * LOCK_TIMEOUT_MS;

/// How fresh a read must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadMode {
    /// The leader confirms its leadership first (read index).
    Linearizable,
    /// The leader's state as it is: what a transaction reads, since its
    /// commit validates every value it read.
    Leader,
    /// The receiving node's own replica.
    Local,
}

/// How the coordinator reaches shards (cheap to clone: the settling of a
/// committed transaction runs as its own task).
pub trait ShardAccess: Clone + Send + Sync + 'static {
    fn shard_count(&self) -> u32;
    /// Wall-clock milliseconds (lock ages).
    fn now_ms(&self) -> i64;
    /// Reads records of one shard; one answer per key, in order.
    fn read(&self, shard: ShardId, keys: Vec<GraphKey>, mode: ReadMode) -> impl Future<Output = Result<Vec<KeyRead>, TxnError>> + Send;
    /// Applies one step through the shard's log, on its leader.
    fn step(&self, shard: ShardId, op: TxnOp) -> impl Future<Output = Result<TxnReply, TxnError>> + Send;
    /// Called when a command's attempt must be run again (metrics).
    fn retried(&self) {}
}

/// Jittered exponential backoff between attempts.
struct Backoff(u64);

impl Backoff {
    fn new() -> Backoff {
        Backoff(1)
    }
    async fn wait(&mut self) {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=self.0))).await;
        self.0 = (self.0 * 2).min(100);
    }
}

/// Runs the engine over records fetched from their shards until a run reads
/// nothing it had not fetched; returns that run's result and read set.
pub async fn gather<A: ShardAccess, T>(a: &A, mode: ReadMode, run: impl Fn(&ReadSet) -> T) -> Result<(ReadSet, T), TxnError> {
    gather_into(a, mode, ReadSet::new(a.shard_count()), run).await
}

/// [`gather`], starting from records read already.
async fn gather_into<A: ShardAccess, T>(
    a: &A,
    mode: ReadMode,
    mut view: ReadSet,
    run: impl Fn(&ReadSet) -> T,
) -> Result<(ReadSet, T), TxnError> {
    for _ in 0..MAX_ROUNDS {
        let out = run(&view);
        let misses = view.take_misses();
        if misses.is_empty() {
            return Ok((view, out));
        }
        for (k, v) in fetch_all(a, misses, mode).await? {
            view.insert(k, v);
        }
    }
    Err(TxnError::Internal(format!("a command read records in more than {MAX_ROUNDS} rounds")))
}

/// Reads keys of one shard, waiting while another transaction holds a lock
/// on any of them, and resolving the locks of dead coordinators.
async fn fetch<A: ShardAccess>(
    a: &A,
    shard: ShardId,
    keys: Vec<GraphKey>,
    mut mode: ReadMode,
) -> Result<Vec<(GraphKey, GraphValue)>, TxnError> {
    let started = a.now_ms();
    let mut backoff = Backoff::new();
    loop {
        let reads = a.read(shard, keys.clone(), mode).await?;
        if reads.len() != keys.len() {
            return Err(TxnError::Internal(format!("shard {shard} answered {} of {} reads", reads.len(), keys.len())));
        }
        let mut locks: Vec<LockRecord> = reads.iter().filter_map(|r| r.lock.clone()).collect();
        if locks.is_empty() {
            return Ok(keys.into_iter().zip(reads.into_iter().map(|r| r.value)).collect());
        }
        // A replica that lags (or cannot hear its leader) may show locks
        // long released: they are read again on the leader before anyone
        // waits for them or settles them.
        if mode == ReadMode::Local {
            mode = ReadMode::Leader;
            continue;
        }
        locks.sort_by(|x, y| x.txn.cmp(&y.txn));
        locks.dedup();
        // An abandoned lock is settled here (an unreachable primary fails the
        // read); a live one is waited for, behind one after another for at
        // most LOCK_WAIT_MS.
        for lock in &locks {
            resolve(a, shard, lock).await?;
        }
        if a.now_ms() - started > LOCK_WAIT_MS {
            return Err(TxnError::Unavailable { shard, reason: "records stayed locked by other transactions".into() });
        }
        backoff.wait().await;
    }
}

/// Settles a lock met on `shard` whose coordinator may be dead: a lock
/// younger than [`LOCK_TIMEOUT_MS`] is left alone; otherwise the primary
/// decides (an undecided transaction is decided aborted there, so its
/// coordinator can no longer commit it) and this shard's part is applied or
/// released accordingly.
pub async fn resolve<A: ShardAccess>(a: &A, shard: ShardId, lock: &LockRecord) -> Result<(), TxnError> {
    if a.now_ms() - lock.at_ms < LOCK_TIMEOUT_MS {
        return Ok(());
    }
    let txn = lock.txn.clone();
    match a.step(lock.primary, TxnOp::Resolve { txn: txn.clone() }).await? {
        TxnReply::Committed => a.step(shard, TxnOp::Apply { txn }).await?,
        _ => a.step(shard, TxnOp::Abort { txn }).await?,
    };
    Ok(())
}

/// Settles every lock a shard reports as older than the lock timeout (run
/// periodically by each shard leader, for locks nobody else meets).
pub async fn sweep<A: ShardAccess>(a: &A, shard: ShardId, stale: Vec<LockRecord>) -> Result<(), TxnError> {
    for lock in stale {
        resolve(a, shard, &lock).await?;
    }
    Ok(())
}

enum Decision {
    Committed,
    Retry,
}

/// Runs a state-changing command across shards: read, decide with the
/// engine, commit; again with fresh reads when another transaction got in
/// the way.
pub async fn execute<A: ShardAccess>(a: &A, rules: &RuleSet, cmd: &Command) -> Result<Outcome, TxnError> {
    execute_attempts(a, rules, cmd, |_| {}).await
}

/// What a shadow version would have done with a command: its outcome or
/// refusal, or none when its records could not be read.
pub type ShadowOutcome = Option<Result<Outcome, engine::EngineError>>;

/// [`execute`], also returning the records its first attempt read: the
/// state the command was decided on, for a shadow version to be run over
/// ([`shadow`]).
pub async fn execute_keeping_reads<A: ShardAccess>(a: &A, rules: &RuleSet, cmd: &Command) -> (Result<Outcome, TxnError>, Option<ReadSet>) {
    let mut first = None;
    let result = execute_attempts(a, rules, cmd, |reads| {
        if first.is_none() {
            let mut copy = ReadSet::new(a.shard_count());
            for (k, v) in reads.values() {
                copy.insert(k.clone(), v.clone());
            }
            first = Some(copy);
        }
    })
    .await;
    (result, first)
}

/// What `rules` would have done with `cmd` over the state the command's
/// first attempt read (`before`, from [`execute_keeping_reads`]); records
/// the command did not read are read now from the local replicas (the
/// command did not write them). Nothing is written: a record under a
/// transaction's lock ends the evaluation (none) instead of settling the
/// lock, as a command's own reads would.
pub async fn shadow<A: ShardAccess>(a: &A, rules: &RuleSet, cmd: &Command, mut view: ReadSet) -> ShadowOutcome {
    for _ in 0..MAX_ROUNDS {
        let outcome = engine::execute(&view, rules, cmd);
        let misses = view.take_misses();
        if misses.is_empty() {
            return match outcome {
                Err(engine::EngineError::Store(_)) => None,
                other => Some(other.map(|(_, o)| o)),
            };
        }
        let mut by_shard: BTreeMap<ShardId, Vec<GraphKey>> = BTreeMap::new();
        for k in misses {
            by_shard.entry(k.shard(a.shard_count())).or_default().push(k);
        }
        for (shard, keys) in by_shard {
            let reads = a.read(shard, keys.clone(), ReadMode::Local).await.ok()?;
            if reads.len() != keys.len() || reads.iter().any(|r| r.lock.is_some()) {
                return None;
            }
            for (k, r) in keys.into_iter().zip(reads) {
                view.insert(k, r.value);
            }
        }
    }
    None
}

async fn execute_attempts<A: ShardAccess>(
    a: &A,
    rules: &RuleSet,
    cmd: &Command,
    mut first_read: impl FnMut(&ReadSet),
) -> Result<Outcome, TxnError> {
    let mut backoff = Backoff::new();
    let started = a.now_ms();
    let mut attempt = 0;
    while attempt < MAX_ATTEMPTS || a.now_ms() - started < RETRY_FOR_MS {
        attempt += 1;
        // The first attempt reads the nearest replica (this node's own, when
        // it holds one): the commit validates every value read, so a stale
        // one costs a retry, never a wrong result. A retry reads the leaders.
        let mode = if attempt == 1 { ReadMode::Local } else { ReadMode::Leader };
        let (reads, result) = gather(a, mode, |view| engine::execute(view, rules, cmd)).await?;
        first_read(&reads);
        let (changes, outcome) = match result {
            Ok((changes, outcome)) if !changes.is_empty() => (changes, outcome),
            // Nothing to commit: the answer stands if what it rests on was
            // one consistent state, which a second read shows.
            done => {
                if unchanged(a, &reads, ReadMode::Leader).await? {
                    return done.map(|(_, outcome)| outcome).map_err(TxnError::from_engine);
                }
                a.retried();
                backoff.wait().await;
                continue;
            }
        };
        // Unique per run and attempt: a retried request may carry the same
        // operation id as a run that crashed with its parts still prepared.
        let txn = format!("{}.{attempt}.{:016x}", cmd.op_id, fastrand::u64(..));
        #[cfg(not(feature = "unsafe-early-ack"))]
        let decision = commit(a, &txn, &reads, changes).await?;
        #[cfg(feature = "unsafe-early-ack")]
        let decision = unsafe_early_ack(a, txn, reads, changes);
        match decision {
            Decision::Committed => return Ok(outcome),
            Decision::Retry => {
                a.retried();
                backoff.wait().await
            }
        }
    }
    Err(TxnError::Contention { attempts: attempt })
}

/// DELIBERATELY BROKEN, for the chaos harness's own test only (feature
/// `unsafe-early-ack`): answers as if committed and commits in the
/// background, giving up on a refusal. The client is acknowledged before
/// the commit point, so a read right after the answer can miss the write
/// and a crash or a conflict loses it; the harness's checkers must say so.
#[cfg(feature = "unsafe-early-ack")]
fn unsafe_early_ack<A: ShardAccess>(a: &A, txn: String, reads: ReadSet, changes: ChangeSet) -> Decision {
    let a = a.clone();
    tokio::spawn(async move {
        let _ = commit(&a, &txn, &reads, changes).await;
    });
    Decision::Committed
}

/// Runs a read-only engine function (a look-up) over fetched records. Each
/// record is read at its own moment, so a result that rests on records read
/// while a transaction moved them (an identifier pointing at a profile just
/// merged away) is checked by reading again, and retried.
pub async fn query<A: ShardAccess, T>(
    a: &A,
    mode: ReadMode,
    run: impl Fn(&ReadSet) -> Result<T, engine::EngineError>,
) -> Result<T, TxnError> {
    let mut backoff = Backoff::new();
    for _ in 0..MAX_ATTEMPTS {
        let (reads, result) = gather(a, mode, &run).await?;
        match result {
            Ok(found) => return Ok(found),
            Err(e) if unchanged(a, &reads, mode).await? => return Err(TxnError::from_engine(e)),
            Err(_) => backoff.wait().await,
        }
    }
    Err(TxnError::Contention { attempts: MAX_ATTEMPTS })
}

/// Whether every record of a read set still has the value read: then all of
/// them held those values together at the moment of the last first read.
async fn unchanged<A: ShardAccess>(a: &A, reads: &ReadSet, mode: ReadMode) -> Result<bool, TxnError> {
    let again = fetch_all(a, reads.values().keys().cloned(), mode).await?;
    Ok(again.iter().all(|(k, v)| reads.values().get(k) == Some(v)))
}

/// Reads keys from their shards, one request per shard, in parallel.
async fn fetch_all<A: ShardAccess>(
    a: &A,
    keys: impl IntoIterator<Item = GraphKey>,
    mode: ReadMode,
) -> Result<Vec<(GraphKey, GraphValue)>, TxnError> {
    let mut by_shard: BTreeMap<ShardId, Vec<GraphKey>> = BTreeMap::new();
    for k in keys {
        by_shard.entry(k.shard(a.shard_count())).or_default().push(k);
    }
    let mut out = Vec::new();
    for fetched in join_all(by_shard.into_iter().map(|(shard, keys)| fetch(a, shard, keys, mode))).await {
        out.extend(fetched?);
    }
    Ok(out)
}

/// One shard's part of a change set: the reads to validate and the writes.
type Part = (Vec<(GraphKey, u128)>, ChangeSet);

async fn commit<A: ShardAccess>(a: &A, txn: &str, reads: &ReadSet, changes: ChangeSet) -> Result<Decision, TxnError> {
    let n = a.shard_count();
    let mut parts: BTreeMap<ShardId, Part> = BTreeMap::new();
    for (k, v) in reads.values() {
        parts.entry(k.shard(n)).or_default().0.push((k.clone(), v.digest()));
    }
    let mut primary = None;
    for c in changes.changes {
        let key = GraphKey::written_by(&c).ok_or_else(|| TxnError::Internal("the engine emitted shard bookkeeping".into()))?;
        let shard = key.shard(n);
        primary.get_or_insert(shard);
        parts.entry(shard).or_default().1.push(c);
    }
    let primary = primary.or_else(|| parts.keys().next().copied()).unwrap_or(ShardId(0));
    let (primary_reads, mut primary_writes) = parts.remove(&primary).unwrap_or_default();
    primary_writes.counters = changes.counters;

    if parts.is_empty() {
        return match a.step(primary, TxnOp::Single { reads: primary_reads, writes: primary_writes }).await? {
            TxnReply::Applied => Ok(Decision::Committed),
            TxnReply::Conflict { lock: Some(lock) } => {
                resolve(a, primary, &lock).await?;
                Ok(Decision::Retry)
            }
            _ => Ok(Decision::Retry),
        };
    }

    let secondaries: Vec<ShardId> = parts.keys().copied().collect();
    let at_ms = a.now_ms();
    let mut prepares = join_all(
        parts
            .into_iter()
            .map(|(shard, (reads, writes))| a.step(shard, TxnOp::Prepare { txn: txn.to_string(), primary, at_ms, reads, writes })),
    )
    .await;

    if !prepares.iter().all(|p| matches!(p, Ok(TxnReply::Prepared))) {
        let refused = |p: &Result<TxnReply, TxnError>| matches!(p, Err(e) if e.refused_new_work());
        // Release what was, or may have been, prepared (a conflict or a
        // refusal took nothing).
        let maybe_prepared: Vec<ShardId> = secondaries
            .iter()
            .zip(&prepares)
            .filter(|(_, p)| !matches!(p, Ok(TxnReply::Conflict { .. })) && !refused(p))
            .map(|(s, _)| *s)
            .collect();
        abort(a, txn, &maybe_prepared).await;
        // A shard that refused new work: tell the caller, rather than retry
        // into the refusal.
        if let Some(Err(refusal)) = prepares.iter().position(refused).map(|i| prepares.swap_remove(i)) {
            return Err(refusal);
        }
        for (shard, p) in secondaries.iter().zip(&prepares) {
            if let Ok(TxnReply::Conflict { lock: Some(lock) }) = p {
                resolve(a, *shard, lock).await?;
            }
        }
        return Ok(Decision::Retry);
    }

    crash_point("txn::before-commit");
    match commit_at_primary(a, primary, txn, primary_reads, primary_writes).await? {
        TxnReply::Committed => {}
        reply => {
            abort(a, txn, &secondaries).await;
            if let TxnReply::Conflict { lock: Some(lock) } = reply {
                resolve(a, primary, &lock).await?;
            }
            return Ok(Decision::Retry);
        }
    }
    crash_point("txn::after-commit");
    // Committed: the command is answered now. The secondaries apply in the
    // background; until they do, their records stay locked, so readers wait
    // for them and see the whole transaction or none of it.
    let (settler, txn) = (a.clone(), txn.to_string());
    tokio::spawn(async move { settle(&settler, &txn, primary, &secondaries).await });
    Ok(Decision::Committed)
}

/// After the commit point: applies every secondary's part, then lets the
/// primary forget the decision. A part whose apply fails keeps its locks
/// until a reader or the shard's sweep rolls it forward, so the decision is
/// forgotten only when every apply succeeded.
async fn settle<A: ShardAccess>(a: &A, txn: &str, primary: ShardId, secondaries: &[ShardId]) {
    let Some((first, rest)) = secondaries.split_first() else { return };
    let mut all_applied = a.step(*first, TxnOp::Apply { txn: txn.to_string() }).await.is_ok();
    crash_point("txn::between-applies");
    for r in join_all(rest.iter().map(|s| a.step(*s, TxnOp::Apply { txn: txn.to_string() }))).await {
        all_applied &= r.is_ok();
    }
    if all_applied {
        let _ = a.step(primary, TxnOp::Forget { txn: txn.to_string() }).await;
    }
}

/// The commit point. An unanswered commit is sent again (the decision is
/// recorded once; a repeat reads it back) before the outcome is reported
/// unknown.
async fn commit_at_primary<A: ShardAccess>(
    a: &A,
    primary: ShardId,
    txn: &str,
    reads: Vec<(GraphKey, u128)>,
    writes: ChangeSet,
) -> Result<TxnReply, TxnError> {
    let mut last = None;
    for _ in 0..5 {
        match a.step(primary, TxnOp::Commit { txn: txn.to_string(), reads: reads.clone(), writes: writes.clone() }).await {
            Ok(reply) => return Ok(reply),
            Err(e @ TxnError::Unavailable { .. }) => {
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| TxnError::Internal("commit not attempted".into())))
}

/// Releases prepared secondary parts (best effort: a part whose abort is
/// lost is released by recovery once its lock times out).
async fn abort<A: ShardAccess>(a: &A, txn: &str, shards: &[ShardId]) {
    let unique: BTreeSet<ShardId> = shards.iter().copied().collect();
    join_all(unique.into_iter().map(|s| a.step(s, TxnOp::Abort { txn: txn.to_string() }))).await;
}
