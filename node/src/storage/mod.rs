//! Storage of the identity graph, behind two traits so that the engine and
//! the shard actors never name sled.
//!
//! - [`GraphRead`]: point reads the engine needs to decide.
//! - [`GraphStore`]: applies one [`ChangeSet`] atomically (all or nothing,
//!   also across a crash) and makes everything applied so far durable with
//!   [`GraphStore::flush`]. A change is acknowledged to a client once its
//!   Raft log entry is durable; the graph is flushed before a snapshot lets
//!   the log go.
//!
//! - [`RaftLog`]: one shard replica's Raft log and Raft metadata; on a node,
//!   a [`GroupLog`] of the node's one log ([`NodeLog`], group commit, see
//!   `docs/storage.md`).
//! - [`Staged`]: change sets staged over a store, read through, then
//!   applied as one (a log entry's commands).
//!
//! Implementations: [`MemStore`] / [`MemRaftLog`] (tests, property tests),
//! [`SledStore`] and [`GroupLog`] (the node), [`SledRaftLog`] (logs of
//! older data directories, moved into the node's log). [`conformance`] is one
//! suite run against both.

pub mod conformance;
mod mem;
mod node_log;
mod sled_store;
mod staged;

pub use mem::{MemRaftLog, MemStore};
pub use node_log::{Durable, GroupLog, LogLimits, NodeLog};
pub use sled_store::{SledDb, SledRaftLog, SledStore, StoreOptions};
pub use staged::Staged;

use crate::model::{ChangeSet, Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId};
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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage i/o failed: {0}")]
    Io(String),
    /// A write found no space left on the data directory's disk.
    #[error("the data directory's disk is full")]
    DiskFull,
    #[error("stored record {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error("storage layout mismatch: {0}")]
    Layout(String),
}

pub trait GraphRead {
    /// The live profile an identifier belongs to.
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError>;
    /// A live profile by id (merged-away ids are aliases, see [`Self::alias`]).
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError>;
    /// Where a merged-away profile id now points.
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError>;
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError>;
    /// An event's record where [`EventRecord::slot`] places it. A shard's
    /// store keeps events by id, so it looks the record up by id alone.
    fn event_at(&self, event_id: &str, _slot: u32) -> Result<Option<EventRecord>, StoreError> {
        self.event(event_id)
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError>;
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError>;
    /// Identifiers listed as hubs, at most `limit`.
    fn listed_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError>;
    fn counters(&self) -> Result<Counters, StoreError>;
    /// Every live profile, in id order (for checks and digests; not a hot path).
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError>;
    /// A value written with `Change::PutMeta`.
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every meta value whose key starts with `prefix`, in key order.
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// How many shards the records this view reads are spread over: one for
    /// a shard's own store. The engine places the records it creates on the
    /// shard of an identifier they belong to (see `engine::make_id_near`).
    fn shard_count(&self) -> u32 {
        1
    }
}

pub trait GraphStore: GraphRead + Send + Sync + 'static {
    /// Applies the whole change set atomically. Visible to reads at once,
    /// durable only after the next [`Self::flush`].
    fn apply(&self, changes: &ChangeSet) -> Result<(), StoreError>;
    /// Makes every applied change durable (fsync).
    fn flush(&self) -> Result<(), StoreError>;
    /// Everything the store holds but the named meta values, as opaque bytes
    /// that [`Self::restore`] of the same implementation reads back. One
    /// point in time: no [`Self::apply`] lands half-way through it.
    fn snapshot(&self, without_meta: &[&str]) -> Result<Vec<u8>, StoreError>;
    /// Replaces everything the store holds with a snapshot's content (the
    /// kept image, [`Self::put_image`], is not part of it).
    fn restore(&self, snapshot: &[u8]) -> Result<(), StoreError>;
    /// Keeps the replica's current Raft snapshot image, replacing the last
    /// one; durable after the next [`Self::flush`]. It is kept apart from
    /// the records: it is as large as the graph, and among them every write
    /// near it rewrote it.
    fn put_image(&self, image: &[u8]) -> Result<(), StoreError>;
    /// The image last kept by [`Self::put_image`].
    fn image(&self) -> Result<Option<Vec<u8>>, StoreError>;
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

/// Encoding of stored records: MessagePack with field names, so that records
/// survive added fields.
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("domain records always serialise")
}

/// A graph record as stored: MessagePack with the fields in declaration
/// order and no names, about a third smaller than [`encode`]'s named form
/// (which digests, locks and messages keep). [`decode`] reads both, so
/// records written before stay readable. Hence, for every stored struct:
/// fields are only added at the end, each with `#[serde(default)]` (older
/// records are shorter), and only the last one may be left out when absent
/// (`skip_serializing_if`), as `EventRecord::slot` is. An older build cannot
/// read records or log entries written by this one (no downgrade).
pub(crate) fn encode_record<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("domain records always serialise")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: redact_key(key), reason: e.to_string() })
}

/// A storage key as it may appear in errors and logs: its table tag and a
/// hash, since keys hold identity values.
pub(crate) fn redact_key(key: &[u8]) -> String {
    let tag = key.first().map_or('?', |b| *b as char);
    format!("{tag}#{:012x}", xxhash_rust::xxh3::xxh3_64(key) & 0xffff_ffff_ffff)
}
