//! The graph as the engine sees it, behind two traits, so that the engine
//! never names a storage engine (the node's sled store implements them in
//! `idgraph-node`).
//!
//! - [`GraphRead`]: point reads the engine needs to decide.
//! - [`GraphStore`]: applies one [`ChangeSet`] atomically (all or nothing,
//!   also across a crash) and makes everything applied so far durable with
//!   [`GraphStore::flush`]; [`GraphStore::frozen`] holds its records as
//!   they are at one point in time ([`FrozenImage`]) while applies go on,
//!   and writes them into an [`ImageSink`] (a snapshot image's file).
//! - [`Staged`]: change sets staged over a store, read through, then
//!   applied as one (a log entry's commands).
//! - [`MemStore`]: the in-memory store of tests and property tests; the
//!   node's conformance suite holds it and the sled store to one behaviour.
//! - [`encode_record`], [`encode`], [`decode`]: how records are stored.

mod keys;
mod mem;
mod staged;

pub use keys::{GraphKey, GraphValue, SLOTS};
pub use mem::MemStore;
pub use staged::Staged;

use crate::model::{ChangeSet, Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId};

#[derive(Clone, Debug, thiserror::Error)]
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
    /// Every merge record, in id order (for a rollback's scan; not a hot path).
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError>;
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
    /// The store's records as they are now, held so while later applies go
    /// on: a snapshot build reads a shard for seconds, and must neither
    /// stop its writes nor see them. Reads of the store keep seeing every
    /// apply. The image leaves out the named meta values.
    fn frozen(&self, without_meta: &[&str]) -> Result<Box<dyn FrozenImage>, StoreError>;
    /// Replaces everything the store holds with a snapshot's content.
    fn restore(&self, snapshot: &[u8]) -> Result<(), StoreError>;
    /// [`Self::restore`], then the `meta` values written, as one atomic
    /// write: a crash leaves the old content or all of the new. Durable
    /// after the next [`Self::flush`].
    fn restore_with_meta(&self, snapshot: &[u8], meta: &[(String, Vec<u8>)]) -> Result<(), StoreError>;
    /// Whether the store holds any record besides meta values and counters.
    fn holds_records(&self) -> Result<bool, StoreError>;
    /// Event dedup records in event id order, those after `after` (from the
    /// first when `None`), at most `limit`: a retention sweep's page of
    /// candidates (see [`crate::retention`]).
    fn events_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, EventRecord)>, StoreError>;
}

/// Where [`FrozenImage::write_to`] writes: a file, or a buffer in tests.
pub trait ImageSink: std::io::Write + std::io::Seek {}

impl<T: std::io::Write + std::io::Seek> ImageSink for T {}

/// A store's records at one point in time ([`GraphStore::frozen`]), for as
/// long as it is held.
pub trait FrozenImage: Send {
    /// A meta value as it was at that point (the Raft position an image is
    /// labelled with is read here, never from the live store).
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// The records but the meta values left out, written to `out` from its
    /// current position as they are read (an image may be larger than
    /// memory should hold). [`GraphStore::restore`] of the same
    /// implementation reads the bytes back; they may differ from
    /// [`GraphStore::snapshot`]'s (a header written before its length was
    /// known).
    fn write_to(&self, out: &mut dyn ImageSink) -> Result<(), StoreError>;
}

/// A [`FrozenImage`] as a copy: the meta values and the encoded records,
/// taken together (the memory store's).
pub struct CopiedImage {
    pub meta: std::collections::BTreeMap<String, Vec<u8>>,
    pub records: Vec<u8>,
}

impl FrozenImage for CopiedImage {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.get(key).cloned())
    }

    fn write_to(&self, out: &mut dyn ImageSink) -> Result<(), StoreError> {
        out.write_all(&self.records).map_err(|e| StoreError::Io(format!("cannot write a snapshot: {e}")))
    }
}

/// Encoding of stored records: MessagePack with field names, so that records
/// survive added fields.
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("domain records always serialise")
}

/// A graph record as stored: MessagePack with the fields in declaration
/// order and no names, about a third smaller than [`encode`]'s named form
/// (which digests and locks keep; Raft records and peer messages are
/// encoded this way too). [`decode`] reads both, so
/// records written before stay readable. Hence, for every stored struct:
/// fields are only added at the end, each with `#[serde(default)]` (older
/// records are shorter), and only the last one may be left out when absent
/// (`skip_serializing_if`), as `EventRecord::slot` is. An older build cannot
/// read records or log entries written by this one (no downgrade).
pub fn encode_record<T: serde::Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec(v).expect("domain records always serialise")
}

pub fn decode<T: serde::de::DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: redact_key(key), reason: e.to_string() })
}

/// A storage key as it may appear in errors and logs: its table tag and a
/// hash, since keys hold identity values.
pub fn redact_key(key: &[u8]) -> String {
    let tag = key.first().map_or('?', |b| *b as char);
    format!("{tag}#{:012x}", xxhash_rust::xxh3::xxh3_64(key) & 0xffff_ffff_ffff)
}
