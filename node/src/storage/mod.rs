//! The node's storage: the graph on sled and the Raft logs.
//!
//! - The graph traits ([`GraphRead`], [`GraphStore`]), their error, the
//!   record encoding, [`Staged`] and the in-memory [`MemStore`] come from
//!   `idgraph-core` (`idgraph_core::graph`) and are re-exported here.
//! - [`SledStore`] implements [`GraphStore`] on one sled tree set per shard
//!   replica, in the node's one [`SledDb`]. The Raft layer (state machine,
//!   snapshots) and the replica hold it by its concrete type; everything
//!   above them reads the graph through the traits.
//! - [`RaftLog`]: one shard replica's Raft log and Raft metadata; on a node,
//!   a [`GroupLog`] of the node's one log ([`NodeLog`], group commit, see
//!   `docs/storage.md`). [`MemRaftLog`] for tests; [`SledRaftLog`] reads
//!   logs of older data directories, moved into the node's log.
//! - [`ImageFile`]: a replica's kept Raft snapshot image, a file of its own.
//! - A change is acknowledged to a client once its Raft log entry is
//!   durable; the graph is flushed before a snapshot lets the log go.
//! - [`conformance`]: one suite run against every implementation.
//! - A full disk: [`disk_full_seen`], [`disk_space`].

pub mod conformance;
mod image_file;
mod mem_log;
mod node_log;
mod sled_store;

pub use idgraph_core::graph::{
    decode, encode, encode_record, redact_key, FrozenImage, GraphRead, GraphStore, ImageSink, MemStore, Staged, StoreError,
};
pub use image_file::{ImageFile, PartialImage};
pub use mem_log::MemRaftLog;
pub use node_log::{Durable, GroupLog, LogLimits, NodeLog};
pub use sled_store::{SledDb, SledRaftLog, SledStore, StoreOptions};

use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write of this process failed because the data directory's
/// disk was full. sled keeps a write error for its whole database until it
/// is reopened, and openraft stops a group whose storage failed, so from
/// then on the node takes no new writes, and it reopens its storage by
/// restarting itself once space is back (`idgraph-node`'s main loop).
static DISK_FULL: AtomicBool = AtomicBool::new(false);

/// Whether a write of this process ran out of disk space.
pub fn disk_full_seen() -> bool {
    DISK_FULL.load(Ordering::Relaxed)
}

/// Forgets a full disk once no database of this process holds its error
/// (an open that failed for lack of room, before opening again).
pub fn forget_disk_full() {
    DISK_FULL.store(false, Ordering::Relaxed);
}

/// Whether an I/O error says the disk is full, noting it if so.
pub(crate) fn note_disk_full(e: &std::io::Error) -> bool {
    let full = e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28);
    if full && !DISK_FULL.swap(true, Ordering::Relaxed) {
        tracing::error!("the data directory's disk is full: new writes are refused until the node has reopened its storage");
    }
    full
}

/// An I/O error as a store error: [`StoreError::DiskFull`] when the disk
/// is full (noted, see [`note_disk_full`]), otherwise [`StoreError::Io`]
/// saying what failed.
pub(crate) fn io_error(what: impl std::fmt::Display, e: std::io::Error) -> StoreError {
    if note_disk_full(&e) {
        StoreError::DiskFull
    } else {
        StoreError::Io(format!("{what}: {e}"))
    }
}

/// Space on the file system holding a directory, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct DiskSpace {
    /// Free for unprivileged writers.
    pub free: u64,
    pub total: u64,
}

/// The space on the file system holding `dir`.
// statvfs's field types differ between platforms (u32 or u64).
#[allow(clippy::unnecessary_cast)]
pub fn disk_space(dir: &std::path::Path) -> Result<DiskSpace, StoreError> {
    let s = nix::sys::statvfs::statvfs(dir).map_err(|e| StoreError::Io(format!("statvfs {}: {e}", dir.display())))?;
    let block = s.fragment_size() as u64;
    Ok(DiskSpace { free: (s.blocks_available() as u64).saturating_mul(block), total: (s.blocks() as u64).saturating_mul(block) })
}

/// One shard replica's Raft log (entries by index, as opaque bytes) and its
/// Raft metadata (vote, committed and purged log ids). Appends, purges and
/// staged metadata become durable with [`RaftLog::sync`]; every other write
/// is durable when it returns. No write is ever reordered before one made
/// earlier.
pub trait RaftLog: Send + Sync + 'static {
    /// Writes entries (index, bytes), replacing any at the same indexes;
    /// durable after the next [`RaftLog::sync`].
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError>;
    /// Makes every append so far durable (fsync).
    fn sync(&self) -> Result<(), StoreError>;
    /// Entries with `from <= index < until`, in index order.
    fn range(&self, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError>;
    /// The entry with the greatest index.
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// Removes entries with `index >= from` (a conflicting suffix).
    fn truncate_from(&self, from: u64) -> Result<(), StoreError>;
    /// Removes entries with `index <= upto` (compacted into a snapshot);
    /// durable after the next [`RaftLog::sync`].
    fn purge_upto(&self, upto: u64) -> Result<(), StoreError>;
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Writes a meta value that may be lost in a crash: durable with the next
    /// [`RaftLog::sync`] or [`RaftLog::put_meta`], and never reordered before
    /// writes made earlier.
    fn stage_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
}
