//! openraft's log storage over a shard replica's [`RaftLog`] tables.

use super::{decode, encode, read_err, write_err, LogId, ShardRaft, StorageError};
use crate::storage::{NodeLog, RaftLog};
use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, OptionalSend, RaftLogId, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use tokio::sync::mpsc;

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Completes openraft's append callbacks once the appends are durable.
///
/// Appends are group-committed: `append` writes the entries and hands
/// openraft's completion callback on, to be completed after one fsync that
/// covers every append waiting. openraft keeps appending meanwhile, so one
/// fsync covers many client writes. The node's groups share one log
/// ([`NodeLog`]), whose writer thread completes the callbacks itself:
/// under load one fdatasync covers the appends of every group. Logs of
/// their own (tests) use a flusher task that calls their `sync`.
#[derive(Clone)]
pub struct LogFlusher {
    to: Flush,
}

#[derive(Clone)]
enum Flush {
    Task(mpsc::UnboundedSender<LogFlushed<ShardRaft>>),
    Log(NodeLog),
}

impl LogFlusher {
    /// The flusher of groups kept in the node's log.
    pub fn node_log(log: NodeLog) -> LogFlusher {
        LogFlusher { to: Flush::Log(log) }
    }

    /// Completes `callback` once every append made so far is durable.
    fn when_durable(&self, callback: LogFlushed<ShardRaft>) {
        match &self.to {
            Flush::Log(log) => {
                log.when_durable(Box::new(move |r| callback.log_io_completed(r.map_err(|e| std::io::Error::other(e.to_string())))))
            }
            Flush::Task(tx) => {
                if let Err(mpsc::error::SendError(cb)) = tx.send(callback) {
                    cb.log_io_completed(Err(std::io::Error::other("the log flusher has stopped")));
                }
            }
        }
    }

    /// Starts the flusher task (inside a tokio runtime); `sync` makes every
    /// append made so far, to any log it serves, durable.
    pub fn spawn(sync: impl Fn() -> Result<(), crate::storage::StoreError> + Send + Sync + 'static) -> LogFlusher {
        let (tx, mut rx) = mpsc::unbounded_channel::<LogFlushed<ShardRaft>>();
        let sync = Arc::new(sync);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut waiting = vec![first];
                while let Ok(more) = rx.try_recv() {
                    waiting.push(more);
                }
                let sync = sync.clone();
                crate::crash::crash_point("raft::before-fsync");
                let synced = tokio::task::spawn_blocking(move || sync())
                    .await
                    .unwrap_or_else(|e| Err(crate::storage::StoreError::Io(format!("fsync task failed: {e}"))));
                crate::crash::crash_point("raft::after-fsync");
                for cb in waiting {
                    cb.log_io_completed(synced.as_ref().map(|_| ()).map_err(|e| std::io::Error::other(e.to_string())));
                }
            }
        });
        LogFlusher { to: Flush::Task(tx) }
    }

    /// A flusher for one log alone.
    pub fn for_log<L: RaftLog>(log: Arc<L>) -> LogFlusher {
        LogFlusher::spawn(move || log.sync())
    }
}

/// A shard replica's Raft log. Cheap to clone (it is also its own reader).
pub struct ShardLogStore<L: RaftLog> {
    log: Arc<L>,
    flusher: LogFlusher,
}

impl<L: RaftLog> Clone for ShardLogStore<L> {
    fn clone(&self) -> Self {
        ShardLogStore { log: self.log.clone(), flusher: self.flusher.clone() }
    }
}

impl<L: RaftLog> ShardLogStore<L> {
    /// `flusher` must make this log's appends durable.
    pub fn new(log: Arc<L>, flusher: LogFlusher) -> Self {
        ShardLogStore { log, flusher }
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        match self.log.get_meta(key).map_err(read_err)? {
            Some(b) => decode(&b).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }
}

impl<L: RaftLog> RaftLogReader<ShardRaft> for ShardLogStore<L> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<ShardRaft>>, StorageError> {
        let from = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let until = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        self.log.range(from, until).map_err(read_err)?.iter().map(|(_, b)| decode(b).map_err(read_err)).collect()
    }
}

impl<L: RaftLog> RaftLogStorage<ShardRaft> for ShardLogStore<L> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<ShardRaft>, StorageError> {
        let last_purged_log_id: Option<LogId> = self.meta(LAST_PURGED)?;
        let last = match self.log.last().map_err(read_err)? {
            Some((_, b)) => Some(*decode::<Entry<ShardRaft>>(&b).map_err(read_err)?.get_log_id()),
            None => None,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<u64>) -> Result<(), StorageError> {
        self.log.put_meta(VOTE, &encode(vote)).map_err(|e| openraft::StorageIOError::write_vote(openraft::AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<u64>>, StorageError> {
        self.meta(VOTE)
    }

    /// openraft allows the committed id to be lost (it is re-learnt from the
    /// leader), so it is not fsync'd on its own: that fsync, once per commit
    /// advance, used to stall every shard's Raft loop.
    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.log.stage_meta(COMMITTED, &encode(&committed)).map_err(write_err)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.meta::<Option<LogId>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<ShardRaft>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<ShardRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let batch: Vec<(u64, Vec<u8>)> = entries.into_iter().map(|e| (e.get_log_id().index, encode(&e))).collect();
        self.log.append(&batch).map_err(|e| openraft::StorageIOError::write_logs(openraft::AnyError::new(&e)))?;
        // Durable, and reported as such, once the flusher has fsync'd.
        self.flusher.when_durable(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.log.truncate_from(log_id.index).map_err(write_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash in between leaves entries
        // that are merely ignored, never a hole. Neither write is fsync'd
        // here: sled recovers a prefix of its writes, so a removal that
        // survives a crash has its purge point with it, and the snapshot
        // that covers the purged entries was made durable when it was built.
        self.log.stage_meta(LAST_PURGED, &encode(&log_id)).map_err(write_err)?;
        self.log.purge_upto(log_id.index).map_err(write_err)
    }
}
