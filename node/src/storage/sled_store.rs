//! The sled-backed [`GraphStore`].
//!
//! Layout: one sled database per node at `<data-dir>/db`; tree `meta` holds
//! the layout version and the shard map; each shard has one tree named
//! `shard-NNNN` whose keys start with a one-byte table tag:
//!
//! | tag | key                      | value          |
//! |-----|--------------------------|----------------|
//! | `i` | type `\0` value          | owner profile id |
//! | `p` | profile id               | [`Profile`]    |
//! | `a` | merged-away profile id   | survivor id    |
//! | `e` | event id                 | [`EventRecord`] |
//! | `m` | merge id                 | [`MergeRecord`] |
//! | `h` | type `\0` value          | [`HubRecord`]  |
//! | `c` | (empty)                  | [`Counters`]   |
//! | `x` | name                     | bookkeeping of the layer above (e.g. last applied Raft log id) |
//!
//! A shard's current Raft snapshot image is a file of its own
//! ([`super::ImageFile`]); builds before kept it in tree `shard-NNNN-image`
//! ([`SledDb::move_legacy_image`]), and before that in the shard's own tree.
//! Raft logs live in the node's log ([`super::NodeLog`]);
//! older builds kept each in a tree `shard-NNNN-raft` ([`SledRaftLog`]),
//! which is moved there when its replica opens.
//!
//! A change set is applied atomically, also across a crash, and written
//! into its tree behind the apply by the node's writer thread (see
//! [`SledStore`]). sled fsyncs by itself every 500 ms; nothing waits for
//! it: an applied change is durable because its log entry is, and
//! [`GraphStore::flush`] makes the graph durable before a snapshot lets
//! openraft purge the log.

use super::{decode, encode_record, redact_key, GraphRead, GraphStore, StoreError};
use idgraph_core::model::{
    Change, ChangeSet, Counters, EventRecord, GroupId, HubRecord, Identifier, MergeRecord, Profile, ProfileId, ShardId,
};
use sled::IVec;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Layout 2 places records on shards by slot ranges
/// ([`idgraph_core::graph::SLOTS`]); layout 1 placed them by hash modulo the
/// shard count, the same placement for a single shard.
const LAYOUT_VERSION: &str = "idgraph-layout-2";
const LAYOUT_MODULO: &str = "idgraph-layout-1";
/// 20 ms waits for a data directory's lock before opening it fails (sled's
/// flusher thread lets go of it up to a flush interval after the last
/// handle is dropped, later on a loaded machine).
const LOCK_WAITS: u32 = 250;

fn io(e: sled::Error) -> StoreError {
    match &e {
        sled::Error::Io(ioe) if super::note_disk_full(ioe) => StoreError::DiskFull,
        _ => StoreError::Io(e.to_string()),
    }
}

/// The node's sled database: opened once per process, shared by its shards,
/// with the thread that writes their applied change sets into it (see
/// [`SledStore`]).
#[derive(Clone)]
pub struct SledDb {
    db: sled::Db,
    writer: Arc<Writer>,
    /// [`StoreOptions::snapshot_backlog_bytes`].
    backlog_bytes: usize,
}

/// The way to the writer thread. When the database's last handle goes, it
/// waits until the writer has written (and let go of) everything handed to
/// it, so that a reopen in the same process (a node restarting in place, a
/// test) does not find the database still held by the writer.
struct Writer(mpsc::Sender<WriteJob>);

impl Writer {
    /// Waits until the writer thread has written every change set handed
    /// to it so far (or given up on it after a failed write), those it holds
    /// back while a snapshot reads their shard included.
    fn wait(&self) {
        let (done, written) = mpsc::sync_channel(1);
        if self.0.send(WriteJob::Barrier(done)).is_ok() {
            let _ = written.recv();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.wait();
    }
}

/// How the node's sled database is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// Memory sled may use for its page cache.
    pub cache_bytes: u64,
    /// Whether sled compresses what it writes (zstd): about 0.6 of the disk
    /// for about 0.6 of one node's ingest rate (`bench/analysis.md`).
    /// Applies to new data directories; an existing one keeps the setting it
    /// was created with.
    pub compression: bool,
    /// How much of a shard's applied writes may wait in memory while a
    /// snapshot reads the shard (they reach the tree once it is read);
    /// applies wait beyond it.
    pub snapshot_backlog_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions { cache_bytes: 1 << 30, compression: false, snapshot_backlog_bytes: 1 << 30 }
    }
}

/// zstd's fastest level: most of the space saved (records repeat ids,
/// identifier kinds and sled's own page headers), at the least CPU per
/// write.
const COMPRESSION_LEVEL: i32 = 1;

/// Deletes the snapshot files sled left half-written. sled writes its page
/// table snapshot to `snap.<lsn>.generating`, syncs it and renames it to
/// `snap.<lsn>`; a write that fails (a full disk) leaves the `.generating`
/// file behind, and sled 0.34 takes it for the newest snapshot when it
/// opens the database and refuses to open ("empty/corrupt snapshot file").
/// Such a file is never a complete snapshot, so it can go: sled then starts
/// from the last complete one, or replays its whole log if there is none.
fn remove_partial_snapshots(db_dir: &Path) -> Result<(), StoreError> {
    let entries = match std::fs::read_dir(db_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(StoreError::Io(format!("cannot list {}: {e}", db_dir.display()))),
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            tracing::warn!(file = %name, "removing a snapshot file sled left half-written");
            std::fs::remove_file(entry.path()).map_err(|e| StoreError::Io(format!("cannot remove {}: {e}", entry.path().display())))?;
        }
    }
    Ok(())
}

/// The compression setting an existing sled database was created with, read
/// from the `conf` file sled writes beside its data (`use_compression: bool`
/// on a line of its own, then a checksum); `None` for a new database.
fn stored_compression(db_dir: &Path) -> Option<bool> {
    // The file ends in a binary checksum: read it as bytes.
    let conf = std::fs::read(db_dir.join("conf")).ok()?;
    String::from_utf8_lossy(&conf).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "use_compression").then(|| v.trim() == "true")
    })
}

/// Whether opening a database failed because its lock is held. sled 0.34
/// reports it as an error of kind `Other` whose text names the lock (the
/// lock's own `WouldBlock` only in its text).
fn lock_taken(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
        || (e.kind() == std::io::ErrorKind::Other && e.to_string().starts_with("could not acquire lock"))
}

/// Starts the writer thread of a database being opened.
fn spawn_writer() -> Result<Arc<Writer>, StoreError> {
    let (writer, jobs) = mpsc::channel();
    std::thread::Builder::new()
        .name("sled-writer".into())
        .spawn(move || write_applied(jobs))
        .map_err(|e| StoreError::Io(format!("cannot start the storage writer thread: {e}")))?;
    Ok(Arc::new(Writer(writer)))
}

impl SledDb {
    /// Opens (or creates) the database under `dir` and checks that it was
    /// written by this layout with the same shard count; default options.
    pub fn open(dir: &Path, shard_count: u32) -> Result<SledDb, StoreError> {
        SledDb::open_with(dir, shard_count, &StoreOptions::default())
    }

    /// [`SledDb::open`] with the given cache size and compression.
    pub fn open_with(dir: &Path, shard_count: u32, options: &StoreOptions) -> Result<SledDb, StoreError> {
        let (db, stored) = SledDb::open_adopting(dir, shard_count, options)?;
        if stored != shard_count {
            return Err(StoreError::Layout(format!("data directory was created with {stored} shards, configured {shard_count}")));
        }
        Ok(db)
    }

    /// Opens (or creates, with `shard_count` shards) the database under
    /// `dir` and returns it with the shard count it was created with.
    pub fn open_adopting(dir: &Path, shard_count: u32, options: &StoreOptions) -> Result<(SledDb, u32), StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("db");
        // sled fixes compression when it creates a database: an existing one
        // keeps its own setting (sled refuses to open it with the other).
        let compression = match stored_compression(&path) {
            Some(stored) => {
                if stored != options.compression {
                    tracing::warn!(
                        stored,
                        configured = options.compression,
                        "storage compression is fixed when a data directory is created; keeping the stored setting"
                    );
                }
                stored
            }
            None => options.compression,
        };
        remove_partial_snapshots(&path)?;
        let backlog_bytes = usize::try_from(options.snapshot_backlog_bytes).unwrap_or(usize::MAX);
        let config = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(Some(500))
            .use_compression(compression)
            .compression_factor(COMPRESSION_LEVEL);
        // sled's background flusher lets go of the file lock a moment after
        // the last handle of a database is dropped: a reopen in the same
        // process (a restarted node in a test) waits for it, for a while.
        let mut waits = 0;
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e)) if lock_taken(&e) && waits < LOCK_WAITS => {
                    waits += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(sled::Error::Io(e)) if super::note_disk_full(&e) => return Err(StoreError::DiskFull),
                opened => break opened.map_err(|e| StoreError::Io(format!("cannot open {}: {e}", path.display())))?,
            }
        };
        let meta = db.open_tree("meta").map_err(io)?;
        match meta.get("layout").map_err(io)? {
            None => {
                let mut batch = sled::Batch::default();
                batch.insert("layout", LAYOUT_VERSION);
                batch.insert("shards", shard_count.to_be_bytes().to_vec());
                meta.apply_batch(batch).map_err(io)?;
                db.flush().map_err(io)?;
            }
            Some(v) if v.as_ref() != LAYOUT_VERSION.as_bytes() && v.as_ref() != LAYOUT_MODULO.as_bytes() => {
                return Err(StoreError::Layout(format!(
                    "data directory has layout {}, this build reads {LAYOUT_VERSION}",
                    String::from_utf8_lossy(&v)
                )));
            }
            Some(v) => {
                let stored = meta
                    .get("shards")
                    .map_err(io)?
                    .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
                    .map(u32::from_be_bytes)
                    .ok_or_else(|| StoreError::Layout("data directory has no shard count".into()))?;
                if v.as_ref() == LAYOUT_MODULO.as_bytes() {
                    if stored != 1 {
                        return Err(StoreError::Layout(format!(
                            "data directory was written by an older build that placed records on its {stored} shards by hash \
                             modulo the shard count; this build places them by slot ranges: start a new cluster and load the \
                             events again"
                        )));
                    }
                    // One shard holds every slot either way: the same data.
                    meta.insert("layout", LAYOUT_VERSION).map_err(io)?;
                    db.flush().map_err(io)?;
                }
                return Ok((SledDb { db, writer: spawn_writer()?, backlog_bytes }, stored));
            }
        }
        Ok((SledDb { db, writer: spawn_writer()?, backlog_bytes }, shard_count))
    }

    /// A shard's store. A replica reopened (its actor restarted) may leave
    /// change sets of its last store with the writer: they are written
    /// first, so that the new store reads its tree (and finishes a redo
    /// record) with nothing of the old one still to land.
    pub fn shard(&self, group: GroupId) -> Result<SledStore, StoreError> {
        self.writer.wait();
        let tree = self.db.open_tree(format!("shard-{group}")).map_err(io)?;
        SledStore::open(tree, self.writer.0.clone(), self.backlog_bytes)
    }

    /// Moves a group's snapshot image from where builds before image files
    /// kept it (tree `shard-NNNN-image`) to `image`, then drops the tree;
    /// whether there was one. A crash in between finds the tree again, and
    /// the file already kept.
    pub fn move_legacy_image(&self, group: GroupId, image: &super::ImageFile) -> Result<bool, StoreError> {
        let name = format!("shard-{group}-image");
        if !self.db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes()) {
            return Ok(false);
        }
        if image.bytes() == 0 {
            if let Some(bytes) = self.db.open_tree(&name).map_err(io)?.get(LEGACY_IMAGE_KEY).map_err(io)? {
                image.keep_bytes(&bytes)?;
            }
        }
        self.db.drop_tree(name).map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(true)
    }

    pub fn raft_log(&self, group: GroupId) -> Result<SledRaftLog, StoreError> {
        Ok(SledRaftLog { tree: self.db.open_tree(format!("shard-{group}-raft")).map_err(io)? })
    }

    /// Makes everything applied to the database's shards so far durable:
    /// waits for the writer to write what was handed to it, then fsyncs.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.writer.wait();
        self.db.flush().map(|_| ()).map_err(io)
    }

    /// A group's Raft log as an older build kept it (a tree of this
    /// database), if this database still holds one.
    pub fn legacy_raft_log(&self, group: GroupId) -> Result<Option<SledRaftLog>, StoreError> {
        let name = format!("shard-{group}-raft");
        if !self.db.tree_names().iter().any(|n| n.as_ref() == name.as_bytes()) {
            return Ok(None);
        }
        self.raft_log(group).map(Some)
    }

    /// Deletes a group's Raft log tree (moved to the node's log), durably.
    pub fn drop_raft_log(&self, group: GroupId) -> Result<(), StoreError> {
        self.db.drop_tree(format!("shard-{group}-raft")).map_err(io)?;
        self.flush()
    }

    /// The groups whose Raft log this database holds (the layout of older
    /// builds: the node's log holds them now).
    pub fn groups(&self) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|name| {
                let name = std::str::from_utf8(name).ok()?.strip_prefix("shard-")?.strip_suffix("-raft")?;
                if name == GroupId::Meta.to_string() {
                    Some(GroupId::Meta)
                } else {
                    name.parse().ok().map(|n| GroupId::Shard(ShardId(n)))
                }
            })
            .collect();
        out.sort();
        out
    }

    /// Deletes a replica's log, Raft metadata and graph, durably. The
    /// replica has stopped applying: what it applied last is written first,
    /// so that no write of the writer thread lands in a dropped tree.
    pub fn discard(&self, group: GroupId) -> Result<(), StoreError> {
        self.writer.wait();
        self.db.drop_tree(format!("shard-{group}-raft")).map_err(io)?;
        self.db.drop_tree(format!("shard-{group}")).map_err(io)?;
        self.db.drop_tree(format!("shard-{group}-image")).map_err(io)?;
        self.flush()
    }

    /// Whether the node has started from this directory before (and so
    /// must never initialise a Raft group again).
    pub fn started(&self) -> Result<bool, StoreError> {
        Ok(self.db.open_tree("meta").map_err(io)?.get("started").map_err(io)?.is_some())
    }

    pub fn mark_started(&self) -> Result<(), StoreError> {
        self.db.open_tree("meta").map_err(io)?.insert("started", &[1u8]).map_err(io)?;
        self.flush()
    }
}

/// One shard's tables in one sled tree.
///
/// **Atomic change sets.** A change set is written as plain sled writes,
/// not as a `sled::Batch`: sled writes out and syncs (`sync_file_range`,
/// waiting) its I/O buffer twice for every batch, which made each applied
/// log entry two synchronous disk writes. Atomicity comes from a redo
/// record instead: the change set's writes are first kept whole under one
/// key (one sled write is atomic), then made, then the record is removed.
/// sled recovers a prefix of its writes, so after a crash either the redo
/// record is there (and opening the store makes its writes again, which
/// are blind puts and removals: the same result however many of them had
/// landed) or every write of the change set is.
///
/// **Written behind.** `apply` does not write the tree: it adds the change
/// set's writes to the shard's pending writes, where every read finds them
/// at once, and hands them to the node's writer thread (see [`SledDb`]),
/// which writes them into the tree as above and then drops them from the
/// pending writes. So the state machine decides the next log entry while
/// the writer stores the last one (openraft applies a group's entries on
/// one task, and sled's inserts were about half of its time). Invariants:
/// - a key's newest applied value is pending from the moment `apply`
///   returns until the tree holds it, and a read looks at the pending
///   writes first: it never sees less than was applied before it began,
///   nor half of a change set;
/// - the writer writes a shard's change sets in the order they were
///   applied, and after a failed one none of the later ones (the tree, like
///   sled's log, only ever holds a prefix of the applied change sets);
/// - durability is as before: an applied change set is durable through its
///   Raft log entry, and [`GraphStore::flush`] first waits until every
///   applied change set is in the tree;
/// - at most `MAX_PENDING` (4) change sets of a shard wait; `apply` waits for
///   room beyond that, so the memory they take stays bounded;
/// - a failed write (a full disk) fails every later `apply` and `flush`
///   with its error, while reads keep being served, pending writes
///   included.
///
/// Scans merge the pending writes over the tree. `restore` waits until
/// nothing is pending, and holds applies off meanwhile.
///
/// **Frozen while a snapshot reads it.** A snapshot build reads the whole
/// tree: tens of seconds for a shard of ten million identifiers. Holding
/// applies off that long failed the writes waiting for them
/// (`bench/analysis.md`). Instead [`GraphStore::frozen`] waits until
/// nothing is pending, then marks the shard frozen: applies go on, and
/// their writes stay pending (where every read finds them) instead of
/// reaching the tree, which keeps the one point in time the snapshot reads.
/// The writer holds the shard's change sets back until the last frozen view
/// is dropped, then writes them in order as it writes any change set, one
/// between two other jobs, so the tree keeps holding a prefix of the
/// applied change sets and the other shards' writes go on. (Writing every
/// pending value as one `sled::Batch` was tried: sled applies a batch
/// under its database-wide write lock and one epoch guard, so every read of
/// every shard waited for it, 10 to 46 s, and the node's memory grew by
/// gigabytes.) Meanwhile:
/// - `MAX_PENDING` does not bound the applies; `snapshot_backlog_bytes` of
///   writes not yet in the tree does (applies wait beyond it, as they all
///   did before); the pending values and the held change sets share those
///   bytes;
/// - once thawed, applies go on at about half the writer's pace until it
///   has written the held change sets (`PendingWrites::catch_up`);
/// - a build's view joins one held already (its image is labelled from the
///   frozen tree); a digest's or backup's (`snapshot`) waits until none is
///   held, since its position is read from the live store, and a restore
///   waits too, since it replaces the tree a view may be reading;
/// - [`GraphStore::flush`], `restore` and the writer's barrier
///   ([`SledDb::flush`], opening a shard's store again) wait until the
///   held change sets are written.
pub struct SledStore {
    tables: Arc<ShardTables>,
    writer: mpsc::Sender<WriteJob>,
}

/// Change sets of one shard that may wait for the writer thread.
const MAX_PENDING: u64 = 4;

struct ShardTables {
    tree: sled::Tree,
    /// Pending bytes beyond which applies wait while the shard is frozen.
    backlog_bytes: usize,
    pending: Mutex<PendingWrites>,
    /// Notified when the writer has written a change set, or failed.
    written: Condvar,
    /// Keys in `pending.values`: a read skips the lock at 0.
    pending_keys: AtomicUsize,
    /// Exclusive for an apply while it adds its change set (one shard's
    /// applies never run at once anyway) and for `restore`; shared by scans
    /// and `snapshot`, so that no change set arrives while they read.
    lock: RwLock<()>,
    /// The hub records the shard holds, so that a look-up of a value that
    /// never collided skips sled.
    hub_keys: RwLock<HubKeys>,
}

/// Hub records a shard holds or has held, by the hash of their key.
///
/// The engine looks up the hub record of every identifier of every event,
/// and nearly every value has none: in the streamed ingest those look-ups
/// were a tenth of the apply's time, each a walk down sled's tree to find
/// nothing (`bench/analysis.md`). A key whose hash is not here has no
/// record, so its look-up answers at once. The set only grows: a key's hash
/// is added before its record is (by an apply, a restore, or the store's
/// opening), and a removal leaves it, since another key may share it; an
/// extra hash only costs a look-up in sled. Past [`HUB_KEYS_MAX`] hashes
/// the set is dropped and every look-up goes to sled, so its memory stays
/// bounded (about 16 bytes a hash) on a graph of many hubs.
struct HubKeys {
    /// `None` once more than `limit` were added.
    hashes: Option<std::collections::HashSet<u64>>,
    limit: usize,
}

/// Hub keys a shard keeps hashes of, at most ([`HubKeys`]).
const HUB_KEYS_MAX: usize = 1 << 18;

impl HubKeys {
    fn new(limit: usize) -> Self {
        HubKeys { hashes: Some(std::collections::HashSet::new()), limit }
    }

    fn hash(key: &[u8]) -> u64 {
        xxhash_rust::xxh3::xxh3_64(key)
    }

    /// Whether a record may be stored under `key` (false: there is none).
    fn may_hold(&self, key: &[u8]) -> bool {
        self.hashes.as_ref().is_none_or(|h| h.contains(&Self::hash(key)))
    }

    fn add(&mut self, key: &[u8]) {
        if let Some(hashes) = &mut self.hashes {
            hashes.insert(Self::hash(key));
            if hashes.len() > self.limit {
                tracing::info!(limit = self.limit, "a shard holds more hub records than it keeps hashes of; hub look-ups go to the store");
                self.hashes = None;
            }
        }
    }

    /// Whether `key` names a hub record.
    fn is_hub(key: &[u8]) -> bool {
        key.first() == Some(&b'h')
    }
}

#[derive(Default)]
struct PendingWrites {
    /// The newest pending value of each key (`None`: removed) and the
    /// number of the change set that wrote it.
    values: BTreeMap<IVec, (u64, Option<IVec>)>,
    /// Change sets applied so far; those numbered below `written` are in
    /// the tree.
    applied: u64,
    written: u64,
    /// The error the writer met; nothing is written after it.
    failed: Option<StoreError>,
    /// Frozen views of the tree ([`FrozenTree`]) still held.
    frozen: u32,
    /// Change sets the writer holds back, in order: those it got while the
    /// shard was frozen, and every later one until these are written. It
    /// writes them ([`ShardTables::drain_one`]) once no view is held.
    held: VecDeque<(u64, Writes)>,
    /// When the writer began writing the held change sets, and how many
    /// there were by then.
    drain_began: Option<(std::time::Instant, usize)>,
    /// About how much memory the writes of change sets applied and not
    /// yet in the tree take (pending values, the writer's queue and `held`
    /// share their bytes; a replaced value counts until its change set is
    /// written).
    bytes: usize,
    /// Once thawed, how many change sets may wait for the writer while it
    /// writes the held ones: as many as waited at the thaw, one less for
    /// every two it writes. Applies thus go on at about half the writer's
    /// pace until it has caught up, instead of keeping the backlog (and
    /// every read's walk through it) as long as they keep coming.
    catch_up: u64,
    /// Held change sets written since the thaw.
    caught_up: u64,
}

/// What a write costs besides its key's and value's bytes, about: its entry
/// in the pending map and in the writer's queue, each a key and a value
/// `IVec` (which hold a key or value of up to 22 bytes themselves, a copy
/// each, instead of sharing it).
const ENTRY_OVERHEAD: usize = 128;

/// About how much memory one write takes.
fn write_size(key: &[u8], value: &Option<IVec>) -> usize {
    key.len() + value.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD
}

/// What [`ShardTables::drain_one`] left.
#[derive(Debug, PartialEq, Eq)]
enum Drain {
    /// More held change sets to write.
    More,
    /// None left (or the shard failed).
    Done,
    /// The shard was frozen again: its next thaw resumes.
    Paused,
}

impl PendingWrites {
    /// Adds a write of change set `number`. Its bytes are taken until the
    /// change set is in the tree, even once a later write replaces its
    /// pending value: the writer's queue still holds them.
    fn put(&mut self, key: IVec, number: u64, value: Option<IVec>) {
        self.bytes += write_size(&key, &value);
        self.values.insert(key, (number, value));
    }

    /// Lets go of change set `number`, now in the tree: its writes' bytes,
    /// and its pending values that no later change set replaced.
    fn let_go(&mut self, number: u64, writes: &Writes) {
        for (k, v) in writes {
            self.bytes = self.bytes.saturating_sub(write_size(k, v));
            if self.values.get(k).is_some_and(|(n, _)| *n == number) {
                self.values.remove(k);
            }
        }
        self.written = number + 1;
    }

    /// Counts a held change set stored since the thaw: every second one
    /// lowers the catch-up bound.
    fn stored_held(&mut self) {
        self.caught_up += 1;
        if self.caught_up.is_multiple_of(2) {
            self.catch_up = self.catch_up.saturating_sub(1);
        }
    }

    /// Whether an apply must wait for the writer before it adds a change
    /// set.
    fn full(&self, backlog_bytes: usize) -> bool {
        let waiting = self.applied - self.written;
        if self.frozen > 0 {
            self.bytes >= backlog_bytes
        } else if !self.held.is_empty() {
            self.bytes >= backlog_bytes || waiting >= self.catch_up.max(MAX_PENDING)
        } else {
            waiting >= MAX_PENDING
        }
    }
}

/// Work for the writer thread.
enum WriteJob {
    /// One applied change set of a shard.
    ChangeSet { tables: Arc<ShardTables>, number: u64, writes: Writes },
    /// Answered once every change set handed over before it is written.
    Barrier(mpsc::SyncSender<()>),
    /// A shard's last frozen view was dropped: write what was held back,
    /// a change set at a time between other jobs.
    Thawed(Arc<ShardTables>),
}

/// The node's writer thread: writes every shard's applied change sets into
/// sled, one at a time and in order (two threads writing sled were slower
/// than one, `bench/analysis.md`). Ends when the database and every store
/// of it are dropped.
fn write_applied(jobs: mpsc::Receiver<WriteJob>) {
    let jobs = WriterJobs(jobs);
    let mut writer = WriterState::default();
    loop {
        // Held change sets are written one between two jobs, or one after
        // another while no job waits, so that the other shards' writes go
        // on while a frozen shard catches up.
        let job = if writer.draining.is_empty() {
            match jobs.0.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        } else {
            writer.drain_step();
            match jobs.0.try_recv() {
                Ok(job) => job,
                Err(mpsc::TryRecvError::Empty) => continue,
                Err(mpsc::TryRecvError::Disconnected) => {
                    // Every store is gone: the held change sets still go
                    // into the tree (a reopen would replay them otherwise).
                    while !writer.draining.is_empty() {
                        writer.drain_step();
                    }
                    break;
                }
            }
        };
        writer.run(job);
    }
}

fn panicked() -> StoreError {
    StoreError::Io("the storage writer panicked".into())
}

/// What the writer thread keeps between jobs.
#[derive(Default)]
struct WriterState {
    /// Shards that hold change sets back.
    holding: Vec<Arc<ShardTables>>,
    /// Thawed shards whose held change sets are being written.
    draining: Vec<Arc<ShardTables>>,
    /// Barriers waiting for held change sets: each with the shards holding
    /// some when it came, and the last one each held then.
    barriers: Vec<WaitingBarrier>,
}

/// A barrier's answer, and the shards it waits for with the number of the
/// last change set each held when it came.
type WaitingBarrier = (mpsc::SyncSender<()>, Vec<(Arc<ShardTables>, u64)>);

impl WriterState {
    fn run(&mut self, job: WriteJob) {
        match job {
            WriteJob::ChangeSet { tables, number, writes } => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tables.write_behind(number, writes))) {
                    Err(_) => tables.fail(panicked()),
                    Ok(true) if !self.holding.iter().any(|t| Arc::ptr_eq(t, &tables)) => self.holding.push(tables),
                    Ok(_) => {}
                }
            }
            WriteJob::Thawed(tables) => {
                if !self.draining.iter().any(|t| Arc::ptr_eq(t, &tables)) {
                    self.draining.push(tables);
                }
            }
            WriteJob::Barrier(done) => {
                self.holding.retain(|t| t.holds_back());
                if self.holding.is_empty() {
                    let _ = done.send(());
                } else {
                    let waiting = self.holding.iter().filter_map(|t| Some((t.clone(), t.last_held()?))).collect();
                    self.barriers.push((done, waiting));
                }
            }
        }
    }

    /// Writes one held change set of each draining shard.
    fn drain_step(&mut self) {
        self.draining.retain(|tables| match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tables.drain_one())) {
            Ok(Drain::More) => true,
            Ok(Drain::Done | Drain::Paused) => false,
            Err(_) => {
                tables.fail(panicked());
                false
            }
        });
        self.holding.retain(|t| t.holds_back());
        self.barriers.retain(|(done, waiting)| {
            let passed = waiting.iter().all(|(t, number)| t.stored(*number));
            if passed {
                let _ = done.send(());
            }
            !passed
        });
    }
}

/// The writer's queue. Should the thread end with jobs still queued, their
/// shards fail rather than wait forever for them.
struct WriterJobs(mpsc::Receiver<WriteJob>);

impl Drop for WriterJobs {
    fn drop(&mut self) {
        while let Ok(job) = self.0.try_recv() {
            if let WriteJob::ChangeSet { tables, .. } = job {
                tables.fail(StoreError::Io("the storage writer thread has stopped".into()));
            }
        }
    }
}

/// A change set's writes, in order: a put, or a removal (`None`). The
/// bytes are shared (`sled::IVec` counts references): the pending values,
/// the writer's queue and sled's page cache hold one copy.
type Writes = Vec<(IVec, Option<IVec>)>;

fn id_key(tag: u8, id: &Identifier) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + id.kind.len() + id.value.len());
    k.push(tag);
    k.extend_from_slice(id.kind.as_bytes());
    k.push(0);
    k.extend_from_slice(id.value.as_bytes());
    k
}

fn str_key(tag: u8, s: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + s.len());
    k.push(tag);
    k.extend_from_slice(s.as_bytes());
    k
}

fn parse_id_key(key: &[u8]) -> Option<Identifier> {
    let body = key.get(1..)?;
    let nul = body.iter().position(|b| *b == 0)?;
    Some(Identifier::new(String::from_utf8(body[..nul].to_vec()).ok()?, String::from_utf8(body[nul + 1..].to_vec()).ok()?))
}

/// A redo record: the MessagePack list of a change set's writes, each a
/// pair of byte strings (`bin`), the value `nil` for a removal. Older
/// builds wrote the bytes as lists of integers (each byte of 128 or more
/// taking two, and slow to write), which [`decode_redo`] still reads.
fn encode_redo(writes: &Writes) -> Vec<u8> {
    let size: usize = writes.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()) + 11).sum();
    let mut out = Vec::with_capacity(size + 5);
    // Writing into a Vec cannot fail, and no write is 4 GiB long.
    let _ = rmp::encode::write_array_len(&mut out, writes.len() as u32);
    for (k, v) in writes {
        let _ = rmp::encode::write_array_len(&mut out, 2);
        let _ = rmp::encode::write_bin(&mut out, k);
        match v {
            Some(v) => {
                let _ = rmp::encode::write_bin(&mut out, v);
            }
            None => {
                let _ = rmp::encode::write_nil(&mut out);
            }
        }
    }
    out
}

/// Reads a redo record of this build ([`encode_redo`]) or of an older one:
/// rmp-serde reads a byte string or a list of integers into a `Vec<u8>`.
fn decode_redo(bytes: &[u8]) -> Result<Writes, StoreError> {
    decode(REDO_KEY, bytes).map(shared_writes)
}

/// Writes of owned bytes as the store keeps them.
fn shared_writes(writes: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Writes {
    writes.into_iter().map(|(k, v)| (IVec::from(k), v.map(IVec::from))).collect()
}

const COUNTERS_KEY: &[u8] = b"c";
/// The redo record of the change set being applied.
const REDO_KEY: &[u8] = b"w";
/// The key of the image in an older build's tree `shard-NNNN-image`.
const LEGACY_IMAGE_KEY: &[u8] = b"image";

impl ShardTables {
    fn pending(&self) -> MutexGuard<'_, PendingWrites> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.lock.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exclusive(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the hashes of the hub keys among `keys` ([`HubKeys`]).
    fn add_hub_keys<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        let mut keys = keys.into_iter().filter(|k| HubKeys::is_hub(k)).peekable();
        if keys.peek().is_some() {
            let mut hub_keys = self.hub_keys.write().unwrap_or_else(|p| p.into_inner());
            keys.for_each(|k| hub_keys.add(k));
        }
    }

    /// Whether the hub-key set is kept (not dropped past its limit).
    fn keeps_hub_keys(&self) -> bool {
        self.hub_keys.read().unwrap_or_else(|p| p.into_inner()).hashes.is_some()
    }

    fn may_hold_hub(&self, key: &[u8]) -> bool {
        self.hub_keys.read().unwrap_or_else(|p| p.into_inner()).may_hold(key)
    }

    /// Writes change set `number` into the tree (on the writer thread); or,
    /// while the shard is frozen or earlier ones are held, holds it back
    /// (true).
    fn write_behind(&self, number: u64, writes: Writes) -> bool {
        {
            let mut pending = self.pending();
            if pending.failed.is_some() {
                return false;
            }
            if pending.frozen > 0 || !pending.held.is_empty() {
                pending.held.push_back((number, writes));
                return true;
            }
        }
        self.write_numbered(number, &writes);
        false
    }

    /// Writes change set `number`, then lets go of its pending values that
    /// no later change set replaced.
    fn write_numbered(&self, number: u64, writes: &Writes) {
        let result = self.write_change_set(writes);
        let mut pending = self.pending();
        match result {
            Ok(()) => {
                pending.let_go(number, writes);
                self.pending_keys.store(pending.values.len(), Ordering::Release);
            }
            Err(e) => {
                tracing::error!(error = %e, "writing applied changes into the shard's tree failed; the shard takes no more writes");
                pending.failed = Some(e);
            }
        }
        drop(pending);
        self.written.notify_all();
    }

    /// Writes the oldest change set held back (on the writer thread), unless
    /// the shard is frozen again.
    fn drain_one(&self) -> Drain {
        let (number, writes) = {
            let mut pending = self.pending();
            if pending.failed.is_some() {
                return Drain::Done;
            }
            if pending.frozen > 0 {
                return Drain::Paused;
            }
            let held = pending.held.len();
            pending.drain_began.get_or_insert((std::time::Instant::now(), held));
            match pending.held.pop_front() {
                Some(job) => job,
                None => return Drain::Done,
            }
        };
        crate::crash::crash_point("storage::mid-drain");
        self.write_numbered(number, &writes);
        let mut pending = self.pending();
        pending.stored_held();
        if !pending.held.is_empty() && pending.failed.is_none() {
            return Drain::More;
        }
        if let Some((began, held)) = pending.drain_began.take() {
            tracing::debug!(
                held,
                elapsed_ms = began.elapsed().as_millis() as u64,
                "wrote the change sets held back while a snapshot read the shard"
            );
        }
        drop(pending);
        self.written.notify_all();
        Drain::Done
    }

    /// Whether change sets are held back and not written yet.
    fn holds_back(&self) -> bool {
        let pending = self.pending();
        !pending.held.is_empty() && pending.failed.is_none()
    }

    /// The number of the last change set held back now, if any.
    fn last_held(&self) -> Option<u64> {
        self.pending().held.back().map(|(n, _)| *n)
    }

    /// Whether change set `number` is in the tree (or never will be).
    fn stored(&self, number: u64) -> bool {
        let pending = self.pending();
        pending.written > number || pending.failed.is_some()
    }

    /// Holds the tree as it is until [`Self::thaw`], once every applied
    /// change set is in it. With `join`, a view held already lends its
    /// point in time (a snapshot build: its image is labelled from the
    /// frozen tree itself); without, it waits until no view is held, so the
    /// point in time is now (a digest or backup, whose position is read
    /// from the live store). The wait is not under the lock: applies go on.
    fn freeze(&self, join: bool) -> Result<(), StoreError> {
        loop {
            if !join {
                drop(self.wait_while(self.pending(), |p| p.frozen > 0)?);
            }
            let _applying = self.exclusive();
            {
                let mut pending = self.pending();
                if pending.frozen > 0 {
                    if join {
                        pending.frozen += 1;
                        return Ok(());
                    }
                    // Another view came first: wait for it again.
                    continue;
                }
            }
            // No view can start meanwhile: it would need the lock.
            self.settle()?.frozen += 1;
            return Ok(());
        }
    }

    /// Waits, under the lock the caller holds, until no view is held and
    /// every applied change set is in the tree: a restore replaces the tree,
    /// and must not do it under a view still reading it.
    fn settle_thawed(&self) -> Result<(), StoreError> {
        self.wait_while(self.pending(), |p| p.frozen > 0 || p.written < p.applied).map(drop)
    }

    /// Lets go of one frozen view; the last one asks the writer to write
    /// what it held back.
    fn thaw(self: &Arc<Self>, writer: &mpsc::Sender<WriteJob>) {
        let mut pending = self.pending();
        pending.frozen -= 1;
        if pending.frozen > 0 {
            return;
        }
        // A restore or an unjoined freeze may wait for no view to be held.
        self.written.notify_all();
        if pending.held.is_empty() {
            return;
        }
        pending.catch_up = pending.applied - pending.written;
        pending.caught_up = 0;
        if writer.send(WriteJob::Thawed(self.clone())).is_err() {
            pending.failed.get_or_insert(StoreError::Io("the storage writer thread has stopped".into()));
            drop(pending);
            self.written.notify_all();
        }
    }

    /// Records a failure that ends the shard's writes (unless one is
    /// recorded already), and wakes whoever waits for the writer.
    fn fail(&self, e: StoreError) {
        self.pending().failed.get_or_insert(e);
        self.written.notify_all();
    }

    /// One change set into the tree, atomically across a crash.
    fn write_change_set(&self, writes: &Writes) -> Result<(), StoreError> {
        match writes.as_slice() {
            [] => Ok(()),
            // One write is atomic by itself.
            [(k, Some(v))] => self.tree.insert(k, v.clone()).map(|_| ()).map_err(io),
            [(k, None)] => self.tree.remove(k).map(|_| ()).map_err(io),
            _ => {
                self.tree.insert(REDO_KEY, encode_redo(writes)).map_err(io)?;
                crate::crash::crash_point("storage::mid-apply");
                self.write_all(writes)
            }
        }
    }

    /// Makes `writes`, then removes the redo record.
    fn write_all(&self, writes: &Writes) -> Result<(), StoreError> {
        for (k, v) in writes {
            match v {
                Some(v) => self.tree.insert(k, v.clone()).map_err(io)?,
                None => self.tree.remove(k).map_err(io)?,
            };
        }
        self.tree.remove(REDO_KEY).map_err(io)?;
        Ok(())
    }

    /// Waits until every change set applied so far is in the tree; the
    /// pending writes, still locked.
    fn settle(&self) -> Result<MutexGuard<'_, PendingWrites>, StoreError> {
        let pending = self.pending();
        let target = pending.applied;
        self.wait_while(pending, |p| p.written < target)
    }

    /// Waits on `written` (the writer stored something or failed, or a view
    /// was dropped) while `waiting` holds; the pending writes, still
    /// locked, or the error the writer failed with.
    fn wait_while<'a>(
        &self,
        pending: MutexGuard<'a, PendingWrites>,
        mut waiting: impl FnMut(&PendingWrites) -> bool,
    ) -> Result<MutexGuard<'a, PendingWrites>, StoreError> {
        let pending = self.written.wait_while(pending, |p| p.failed.is_none() && waiting(p)).unwrap_or_else(|p| p.into_inner());
        match &pending.failed {
            Some(e) => Err(e.clone()),
            None => Ok(pending),
        }
    }

    /// A key's newest applied value: pending, or in the tree.
    fn value(&self, key: &[u8]) -> Result<Option<sled::IVec>, StoreError> {
        if self.pending_keys.load(Ordering::Acquire) > 0 {
            if let Some((_, v)) = self.pending().values.get(key) {
                return Ok(v.clone());
            }
        }
        self.tree.get(key).map_err(io)
    }

    /// Every record whose key starts with `prefix`, in key order, pending
    /// writes laid over the tree. The caller holds the lock (shared), so
    /// no change set is added meanwhile; one being written into the tree is
    /// still pending, and its pending values are the ones taken.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        self.scan_after(prefix, None, usize::MAX)
    }

    /// [`Self::scan`] of the keys after `after` (all when `None`), at most
    /// `limit` records.
    fn scan_after(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        use std::ops::Bound;
        let start = || match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let over: Vec<(IVec, Option<IVec>)> = self
            .pending()
            .values
            .range::<[u8], _>((start(), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        let mut over = over.into_iter().peekable();
        let mut out = Vec::new();
        let take = |out: &mut Vec<(IVec, IVec)>, (k, v): (IVec, Option<IVec>)| {
            if let Some(v) = v {
                out.push((k, v));
            }
        };
        for kv in self.tree.range::<&[u8], _>((start(), Bound::Unbounded)) {
            let (k, v) = kv.map_err(io)?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            while let Some(pending) = over.next_if(|(p, _)| p[..] < k[..]) {
                take(&mut out, pending);
            }
            match over.next_if(|(p, _)| p[..] == k[..]) {
                Some(pending) => take(&mut out, pending),
                None => out.push((k, v)),
            }
        }
        for pending in over {
            take(&mut out, pending);
        }
        out.truncate(limit);
        Ok(out)
    }
}

fn snapshot_write_err(e: std::io::Error) -> StoreError {
    super::io_error("cannot write a snapshot", e)
}

/// MessagePack's marker of a list with a four-byte length.
const ARRAY32: u8 = 0xdd;

/// A shard's tree held as it is ([`GraphStore::frozen`]) until dropped.
struct FrozenTree {
    tables: Arc<ShardTables>,
    writer: mpsc::Sender<WriteJob>,
    /// Keys of the meta values the image leaves out.
    skip: Vec<Vec<u8>>,
}

impl FrozenTree {
    /// Writes the tree's records but the meta values left out and the redo
    /// record, each as a MessagePack (key, value) pair; how many.
    fn write_pairs<W: std::io::Write + ?Sized>(&self, out: &mut W) -> Result<u32, StoreError> {
        let mut pairs: u32 = 0;
        let mut pair = Vec::new();
        for kv in self.tables.tree.iter() {
            let (k, v) = kv.map_err(io)?;
            if k.as_ref() != REDO_KEY && !self.skip.iter().any(|s| s.as_slice() == k.as_ref()) {
                pair.clear();
                rmp_serde::encode::write(&mut pair, &(k.as_ref(), v.as_ref()))
                    .map_err(|e| StoreError::Io(format!("cannot encode a snapshot record: {e}")))?;
                out.write_all(&pair).map_err(snapshot_write_err)?;
                pairs = pairs.checked_add(1).ok_or_else(|| StoreError::Io("a shard of more than 4 billion records".into()))?;
            }
        }
        Ok(pairs)
    }
}

impl super::FrozenImage for FrozenTree {
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        // The tree, not the pending writes: they came after.
        Ok(self.tables.tree.get(str_key(b'x', key)).map_err(io)?.map(|v| v.to_vec()))
    }

    fn write_to(&self, out: &mut dyn super::ImageSink) -> Result<(), StoreError> {
        let failed = snapshot_write_err;
        // As `snapshot`, into a file: the list's header takes its longest
        // form (a marker and four bytes of length), written again once the
        // pairs are counted.
        let start = out.stream_position().map_err(failed)?;
        out.write_all(&[ARRAY32, 0, 0, 0, 0]).map_err(failed)?;
        let pairs = self.write_pairs(out)?;
        let end = out.stream_position().map_err(failed)?;
        out.seek(std::io::SeekFrom::Start(start + 1)).map_err(failed)?;
        out.write_all(&pairs.to_be_bytes()).map_err(failed)?;
        out.seek(std::io::SeekFrom::Start(end)).map_err(failed)?;
        Ok(())
    }
}

impl Drop for FrozenTree {
    fn drop(&mut self) {
        self.tables.thaw(&self.writer);
    }
}

impl SledStore {
    /// About how much memory the applied writes not yet in the tree take
    /// (those held back while a snapshot reads the shard included).
    pub fn pending_bytes(&self) -> usize {
        self.tables.pending().bytes
    }

    /// The shard's tree, frozen ([`GraphStore::frozen`]; `join`: see
    /// [`ShardTables::freeze`]).
    fn freeze(&self, without_meta: &[&str], join: bool) -> Result<FrozenTree, StoreError> {
        self.tables.freeze(join)?;
        let skip = without_meta.iter().map(|k| str_key(b'x', k)).collect();
        Ok(FrozenTree { tables: self.tables.clone(), writer: self.writer.clone(), skip })
    }

    fn open(tree: sled::Tree, writer: mpsc::Sender<WriteJob>, backlog_bytes: usize) -> Result<SledStore, StoreError> {
        let tables = ShardTables {
            tree,
            backlog_bytes,
            pending: Mutex::new(PendingWrites::default()),
            written: Condvar::new(),
            pending_keys: AtomicUsize::new(0),
            lock: RwLock::new(()),
            hub_keys: RwLock::new(HubKeys::new(HUB_KEYS_MAX)),
        };
        // A change set interrupted by a crash is finished before anything
        // reads the store.
        if let Some(redo) = tables.tree.get(REDO_KEY).map_err(io)? {
            let writes = decode_redo(&redo)?;
            tracing::info!(writes = writes.len(), "finishing a change set interrupted by a crash");
            tables.write_all(&writes)?;
        }
        for k in tables.tree.scan_prefix(b"h").keys() {
            tables.add_hub_keys([k.map_err(io)?.as_ref()]);
            if !tables.keeps_hub_keys() {
                break;
            }
        }
        Ok(SledStore { tables: Arc::new(tables), writer })
    }

    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tables.value(key)? {
            Some(v) => decode(key, &v).map(Some),
            None => Ok(None),
        }
    }

    fn get_string(&self, key: &[u8]) -> Result<Option<String>, StoreError> {
        match self.tables.value(key)? {
            Some(v) => {
                String::from_utf8(v.to_vec()).map(Some).map_err(|e| StoreError::Corrupt { key: redact_key(key), reason: e.to_string() })
            }
            None => Ok(None),
        }
    }

    /// [`ShardTables::scan`] with the lock held.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        let _scan = self.tables.shared();
        self.tables.scan(prefix)
    }
}

impl GraphRead for SledStore {
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        self.get_string(&id_key(b'i', id))
    }
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.get(&str_key(b'p', id))
    }
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError> {
        self.get_string(&str_key(b'a', id))
    }
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.get(&str_key(b'e', event_id))
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError> {
        self.get(&str_key(b'm', id))
    }
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError> {
        let key = id_key(b'h', id);
        if !self.tables.may_hold_hub(&key) {
            return Ok(None);
        }
        self.get(&key)
    }
    fn listed_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.scan(b"h")? {
            let rec: HubRecord = decode(&k, &v)?;
            if rec.listed_at_ms.is_some() {
                let id =
                    parse_id_key(&k).ok_or_else(|| StoreError::Corrupt { key: redact_key(&k), reason: "bad identifier key".into() })?;
                out.push((id, rec));
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
    fn counters(&self) -> Result<Counters, StoreError> {
        Ok(self.get(COUNTERS_KEY)?.unwrap_or_default())
    }
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError> {
        self.scan(b"m")?.into_iter().map(|(k, v)| decode(&k, &v)).collect()
    }
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        self.scan(b"p")?.into_iter().map(|(k, v)| decode(&k, &v)).collect()
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tables.value(&str_key(b'x', key))?.map(|v| v.to_vec()))
    }
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.scan(&str_key(b'x', prefix))?
            .into_iter()
            .map(|(k, v)| {
                let key = String::from_utf8(k[1..].to_vec())
                    .map_err(|_| StoreError::Corrupt { key: super::redact_key(&k), reason: "meta key is not UTF-8".into() })?;
                Ok((key, v.to_vec()))
            })
            .collect()
    }
}

impl GraphStore for SledStore {
    fn apply(&self, cs: &ChangeSet) -> Result<(), StoreError> {
        let tables = &self.tables;
        let _applying = tables.exclusive();
        let put = |k: Vec<u8>, v: Vec<u8>| (IVec::from(k), Some(IVec::from(v)));
        let del = |k: Vec<u8>| (IVec::from(k), None);
        let mut writes: Writes = cs
            .changes
            .iter()
            .map(|c| match c {
                Change::PutOwner(k, v) => put(id_key(b'i', k), v.as_bytes().to_vec()),
                Change::DeleteOwner(k) => del(id_key(b'i', k)),
                Change::PutProfile(p) => put(str_key(b'p', &p.id), encode_record(p)),
                Change::DeleteProfile(id) => del(str_key(b'p', id)),
                Change::PutAlias(k, v) => put(str_key(b'a', k), v.as_bytes().to_vec()),
                Change::DeleteAlias(k) => del(str_key(b'a', k)),
                Change::PutEvent(k, v) => put(str_key(b'e', k), encode_record(v)),
                Change::DeleteEvent(k) => del(str_key(b'e', k)),
                Change::PutMerge(m) => put(str_key(b'm', &m.id), encode_record(m)),
                Change::DeleteMerge(id) => del(str_key(b'm', id)),
                Change::PutHub(k, v) => put(id_key(b'h', k), encode_record(v)),
                Change::DeleteHub(k) => del(id_key(b'h', k)),
                Change::PutMeta(k, v) => put(str_key(b'x', k), v.clone()),
                Change::DeleteMeta(k) => del(str_key(b'x', k)),
            })
            .collect();
        if cs.counters != Counters::default() {
            // Only the shard's state machine applies: nothing changes the
            // counters between this read and the write.
            let mut counters: Counters = self.get(COUNTERS_KEY)?.unwrap_or_default();
            counters.add(&cs.counters);
            writes.push(put(COUNTERS_KEY.to_vec(), encode_record(&counters)));
        }
        if writes.is_empty() {
            return Ok(());
        }
        let mut pending = tables.wait_while(tables.pending(), |p| p.full(tables.backlog_bytes))?;
        let number = pending.applied;
        // Before the records: a read that finds a hub record's hash may
        // still find no record, never the other way round.
        tables.add_hub_keys(writes.iter().filter(|(_, v)| v.is_some()).map(|(k, _)| &k[..]));
        let values = writes.clone();
        // Sent under the lock, so that change sets reach the writer in the
        // order they are numbered; the writer takes the lock before it lets
        // go of pending values, so they are in place first.
        if self.writer.send(WriteJob::ChangeSet { tables: tables.clone(), number, writes }).is_err() {
            let e = StoreError::Io("the storage writer thread has stopped".into());
            drop(pending);
            tables.fail(e.clone());
            return Err(e);
        }
        for (k, v) in values {
            pending.put(k, number, v);
        }
        tables.pending_keys.store(pending.values.len(), Ordering::Release);
        pending.applied += 1;
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        drop(self.tables.settle()?);
        self.tables.tree.flush().map(|_| ()).map_err(io)
    }

    fn snapshot(&self, without_meta: &[&str]) -> Result<Vec<u8>, StoreError> {
        // The image is the MessagePack of the list of (key, value) pairs,
        // written pair by pair as the frozen tree is read: no list of the
        // shard's records is held besides the image (a list of pairs, each
        // two allocations, took about twice the image's memory at 10 million
        // identifiers). The list's length comes first in MessagePack, so
        // room for the longest header is kept and the header written once
        // the pairs are counted; the bytes equal `encode` of the list.
        let frozen = self.freeze(without_meta, false)?;
        const HEADER_ROOM: usize = 5;
        let mut image = vec![0u8; HEADER_ROOM];
        let pairs = frozen.write_pairs(&mut image)?;
        drop(frozen);
        let mut header = Vec::with_capacity(HEADER_ROOM);
        rmp::encode::write_array_len(&mut header, pairs).map_err(|e| StoreError::Io(format!("cannot encode a snapshot header: {e}")))?;
        let start = HEADER_ROOM - header.len();
        image[start..HEADER_ROOM].copy_from_slice(&header);
        image.drain(..start);
        Ok(image)
    }

    fn frozen(&self, without_meta: &[&str]) -> Result<Box<dyn super::FrozenImage>, StoreError> {
        Ok(Box::new(self.freeze(without_meta, true)?))
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        self.restore_with_meta(snapshot, &[])?;
        self.tables.tree.flush().map(|_| ()).map_err(io)
    }

    fn restore_with_meta(&self, snapshot: &[u8], meta: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt { key: "snapshot".into(), reason };
        // Read pair by pair into the batch ([`GraphStore::snapshot`]'s
        // format), with no list of the records besides.
        let mut rest = snapshot;
        let pairs = rmp::decode::read_array_len(&mut rest).map_err(|e| corrupt(format!("no list of records: {e}")))?;
        let mut de = rmp_serde::Deserializer::from_read_ref(rest);
        let _write = self.tables.exclusive();
        // Nothing applied before may land over the restored records, and
        // no snapshot may be reading the tree it replaces.
        self.tables.settle_thawed()?;
        let tree = &self.tables.tree;
        // One sled batch: atomic, whatever a crash interrupts.
        let mut batch = sled::Batch::default();
        for k in tree.iter().keys() {
            batch.remove(k.map_err(io)?);
        }
        for _ in 0..pairs {
            let (k, v): (Vec<u8>, Vec<u8>) = serde::Deserialize::deserialize(&mut de).map_err(|e| corrupt(e.to_string()))?;
            // Added before the batch lands (the hashes of the records it
            // replaces stay: more hashes only cost look-ups).
            self.tables.add_hub_keys([k.as_slice()]);
            batch.insert(k, v);
        }
        for (k, v) in meta {
            batch.insert(str_key(b'x', k), v.clone());
        }
        tree.apply_batch(batch).map_err(io)
    }

    fn events_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, EventRecord)>, StoreError> {
        let _scan = self.tables.shared();
        let after = after.map(|a| str_key(b'e', a));
        let mut out = Vec::new();
        for (k, v) in self.tables.scan_after(b"e", after.as_deref(), limit)? {
            let id = String::from_utf8(k[1..].to_vec())
                .map_err(|_| StoreError::Corrupt { key: redact_key(&k), reason: "event key is not UTF-8".into() })?;
            out.push((id, decode(&k, &v)?));
        }
        Ok(out)
    }
    fn holds_records(&self) -> Result<bool, StoreError> {
        let _read = self.tables.shared();
        drop(self.tables.settle()?);
        for k in self.tables.tree.iter().keys() {
            let k = k.map_err(io)?;
            if !(k.first() == Some(&b'x') || k.as_ref() == COUNTERS_KEY || k.as_ref() == REDO_KEY) {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// One shard replica's Raft log in its own sled tree. Appends are fsync'd
/// by [`RaftLog::sync`](super::RaftLog::sync), every other write before it
/// returns.
pub struct SledRaftLog {
    tree: sled::Tree,
}

fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [b'l'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

fn entry_index(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt { key: redact_key(key), reason: "bad log entry key".into() })
}

impl SledRaftLog {
    /// Every metadata value, by name.
    pub fn metas(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.tree
            .scan_prefix([b'm'])
            .map(|kv| {
                let (k, v) = kv.map_err(io)?;
                Ok((String::from_utf8_lossy(&k[1..]).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn durable(&self) -> Result<(), StoreError> {
        self.tree.flush().map(|_| ()).map_err(io)
    }

    fn remove_range(&self, from: u64, until_inclusive: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in self.tree.range(entry_key(from)..=entry_key(until_inclusive)).keys() {
            batch.remove(k.map_err(io)?);
        }
        self.tree.apply_batch(batch).map_err(io)
    }
}

impl super::RaftLog for SledRaftLog {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (i, b) in entries {
            batch.insert(&entry_key(*i), b.as_slice());
        }
        self.tree.apply_batch(batch).map_err(io)
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.durable()
    }
    fn range(&self, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= until {
            return Ok(Vec::new());
        }
        self.tree
            .range(entry_key(from)..entry_key(until))
            .map(|kv| kv.map_err(io).and_then(|(k, v)| Ok((entry_index(&k)?, v.to_vec()))))
            .collect()
    }
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        match self.tree.scan_prefix([b'l']).next_back() {
            Some(kv) => {
                let (k, v) = kv.map_err(io)?;
                Ok(Some((entry_index(&k)?, v.to_vec())))
            }
            None => Ok(None),
        }
    }
    fn truncate_from(&self, from: u64) -> Result<(), StoreError> {
        self.remove_range(from, u64::MAX)?;
        self.durable()
    }
    fn purge_upto(&self, upto: u64) -> Result<(), StoreError> {
        // Not fsync'd: losing a purge in a crash only keeps entries longer.
        self.remove_range(0, upto)
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(str_key(b'm', key), value).map_err(io)?;
        self.durable()
    }
    fn stage_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        // sled recovers a prefix of its writes, so this is never durable
        // without the writes before it.
        self.tree.insert(str_key(b'm', key), value).map_err(io).map(|_| ())
    }
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(str_key(b'm', key)).map_err(io)?.map(|v| v.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{encode, GraphRead};
    use idgraph_core::model::{AbsorbedProfile, EventRecord, HubRecord, Identifier, MergeCause, MergeRecord, Profile, TraitState};

    fn profile() -> Profile {
        Profile {
            id: "p_01J0000000000000000000000".into(),
            identifiers: vec![Identifier::new("email", "ann@shop.com"), Identifier::new("user_id", "u1")],
            traits: [(
                "plan".to_string(),
                TraitState { value: serde_json::json!({"tier": "gold", "seats": 3}), ts: 5, event_id: "e1".into() },
            )]
            .into_iter()
            .collect(),
            merged_from: vec!["p_old".into()],
            lineage: vec!["m_1".into()],
            created_ms: 1,
            updated_ms: 2,
            rule_version: "builtin".into(),
        }
    }

    /// Every stored record reads back from the compact form and from the
    /// named form that older data directories hold; the compact one is the
    /// smaller.
    #[test]
    fn stored_records_read_back_from_the_compact_and_the_named_encoding() {
        fn check<T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
            let (compact, named) = (encode_record(&v), encode(&v));
            assert_eq!(decode::<T>(b"k", &compact).unwrap(), v, "compact");
            assert_eq!(decode::<T>(b"k", &named).unwrap(), v, "named");
            assert!(compact.len() < named.len(), "{v:?}: {} bytes compact, {} named", compact.len(), named.len());
        }
        check(profile());
        check(EventRecord { profile_id: "p_1".into(), applied_ms: 3, slot: Some(7) });
        check(EventRecord { profile_id: "p_1".into(), applied_ms: 3, slot: None });
        check(MergeRecord {
            id: "m_1".into(),
            survivor: "p_1".into(),
            absorbed: vec![AbsorbedProfile { profile: profile() }],
            added: vec![Identifier::new("phone", "+15550100")],
            cause: MergeCause::Event { event_id: "e1".into(), source: "web".into() },
            rule_version: "builtin".into(),
            at_ms: 9,
            forced: false,
            undone_at_ms: None,
        });
        check(HubRecord {
            colliding_profiles: vec!["p_1".into(), "p_2".into()],
            limit_type: "user_id".into(),
            listed_at_ms: Some(4),
            reason: "r".into(),
        });
        check(Counters { events: 3, profiles: 2, ..Default::default() });
    }

    /// A full disk in the middle of sled writing its snapshot leaves a
    /// `.generating` file; the database still opens, with its data.
    #[test]
    fn a_half_written_sled_snapshot_does_not_stop_the_store_from_opening() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identifier::new("email", "a@b.c");
        {
            let db = SledDb::open(dir.path(), 1).unwrap();
            let mut cs = ChangeSet::default();
            cs.push(Change::PutOwner(alice.clone(), "p_1".into()));
            db.shard(GroupId::Shard(ShardId(0))).unwrap().apply(&cs).unwrap();
            db.flush().unwrap();
        }
        // Newer than any snapshot sled wrote, so sled would pick it.
        let partial = dir.path().join("db").join("snap.FFFFFFFFFFFFFF00.generating");
        std::fs::write(&partial, b"cut").unwrap();
        let db = SledDb::open(dir.path(), 1).expect("opens despite the half-written snapshot");
        assert_eq!(db.shard(GroupId::Shard(ShardId(0))).unwrap().owner(&alice).unwrap().as_deref(), Some("p_1"));
        assert!(!partial.exists(), "the half-written snapshot is gone");
    }

    /// A crash between a change set's redo record and its last write: the
    /// reopened store holds the whole change set, whatever part of it had
    /// landed, and no redo record.
    #[test]
    fn a_change_set_interrupted_by_a_crash_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let alice = Identifier::new("email", "a@b.c");
        let hub =
            HubRecord { colliding_profiles: vec!["p_0".into()], limit_type: "email".into(), listed_at_ms: None, reason: String::new() };
        let mut cs = ChangeSet::default();
        cs.push(Change::PutOwner(alice.clone(), "p_2".into()));
        cs.push(Change::DeleteAlias("p_1".into()));
        cs.push(Change::PutHub(alice.clone(), hub.clone()));
        cs.push(Change::PutMeta("raft.applied".into(), b"7".to_vec()));
        cs.counters.events = 1;
        {
            let db = SledDb::open(dir.path(), 1).unwrap();
            let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
            let mut before = ChangeSet::default();
            before.push(Change::PutOwner(alice.clone(), "p_1".into()));
            before.push(Change::PutAlias("p_1".into(), "p_0".into()));
            s.apply(&before).unwrap();
            // In the tree before the writer's next change set starts.
            s.flush().unwrap();
            // What the writer writes before a change set's first record:
            // the redo record; then the crash, after one of the writes.
            let writes = shared_writes(vec![
                (id_key(b'i', &alice), Some(b"p_2".to_vec())),
                (str_key(b'a', "p_1"), None),
                (id_key(b'h', &alice), Some(encode_record(&hub))),
                (str_key(b'x', "raft.applied"), Some(b"7".to_vec())),
                (COUNTERS_KEY.to_vec(), Some(encode_record(&Counters { events: 1, ..Default::default() }))),
            ]);
            s.tables.tree.insert(REDO_KEY, encode_redo(&writes)).unwrap();
            s.tables.tree.insert(&writes[0].0, writes[0].1.clone().unwrap()).unwrap();
            s.flush().unwrap();
        }
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        assert_eq!(s.owner(&alice).unwrap().as_deref(), Some("p_2"));
        assert_eq!(s.alias("p_1").unwrap(), None);
        assert_eq!(s.hub(&alice).unwrap(), Some(hub), "a hub record the redo wrote is found");
        assert_eq!(s.meta("raft.applied").unwrap().as_deref(), Some(&b"7"[..]));
        assert_eq!(s.counters().unwrap().events, 1);
        assert_eq!(s.tables.tree.get(REDO_KEY).unwrap(), None);
        // The same change set applied normally gives the same records.
        let other = tempfile::tempdir().unwrap();
        let t = SledDb::open(other.path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        let mut before = ChangeSet::default();
        before.push(Change::PutOwner(alice.clone(), "p_1".into()));
        before.push(Change::PutAlias("p_1".into(), "p_0".into()));
        t.apply(&before).unwrap();
        t.apply(&cs).unwrap();
        assert_eq!(t.snapshot(&[]).unwrap(), s.snapshot(&[]).unwrap());
    }

    /// A shard keeps hashes of its hub keys only: a value that never
    /// collided is answered without a look-up in the tree, one that did is
    /// found whether it was applied, restored or in the tree at open, and a
    /// removed record's hash stays.
    #[test]
    fn hub_look_ups_skip_the_tree_only_for_values_without_a_hub_record() {
        let dir = tempfile::tempdir().unwrap();
        let (hub_id, restored_id, plain) =
            (Identifier::new("device_id", "shared"), Identifier::new("device_id", "restored"), Identifier::new("email", "a@b.c"));
        let hub =
            HubRecord { colliding_profiles: vec!["p_1".into()], limit_type: "device_id".into(), listed_at_ms: None, reason: String::new() };
        let hashed = |s: &SledStore, id: &Identifier| s.tables.may_hold_hub(&id_key(b'h', id));
        {
            let db = SledDb::open(dir.path(), 2).unwrap();
            let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
            assert!(!hashed(&s, &hub_id));
            let mut cs = ChangeSet::default();
            cs.push(Change::PutOwner(plain.clone(), "p_1".into()));
            cs.push(Change::PutHub(hub_id.clone(), hub.clone()));
            s.apply(&cs).unwrap();
            assert!(hashed(&s, &hub_id), "an apply adds its hub keys");
            assert!(!hashed(&s, &plain), "owner keys are not hub keys");
            assert_eq!(s.hub(&hub_id).unwrap(), Some(hub.clone()));
            assert_eq!(s.hub(&plain).unwrap(), None);

            // A restore adds the hub keys of the image it writes.
            let other = db.shard(GroupId::Shard(ShardId(1))).unwrap();
            other.apply(&crate::storage::conformance::one(Change::PutHub(restored_id.clone(), hub.clone()))).unwrap();
            s.restore(&other.snapshot(&[]).unwrap()).unwrap();
            assert_eq!(s.hub(&restored_id).unwrap(), Some(hub.clone()));
            assert_eq!(s.hub(&hub_id).unwrap(), None, "the restore replaced it");
            assert!(hashed(&s, &hub_id), "a hash outlives its record");
            s.apply(&crate::storage::conformance::one(Change::PutHub(hub_id.clone(), hub.clone()))).unwrap();
            s.apply(&crate::storage::conformance::one(Change::DeleteHub(restored_id.clone()))).unwrap();
            db.flush().unwrap();
        }
        // The store's opening reads the hub keys in the tree.
        let db = SledDb::open(dir.path(), 2).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        assert!(hashed(&s, &hub_id));
        assert!(!hashed(&s, &restored_id), "a removed record is not in the tree at open");
        assert!(!hashed(&s, &plain));
        assert_eq!(s.hub(&hub_id).unwrap(), Some(hub));
        assert_eq!(s.hub(&restored_id).unwrap(), None);
    }

    /// Past its limit a shard's hub-key set is dropped, and every key may
    /// have a record.
    #[test]
    fn hub_keys_past_their_limit_send_every_look_up_to_the_tree() {
        let mut keys = HubKeys::new(2);
        assert!(!keys.may_hold(b"h1"));
        keys.add(b"h1");
        keys.add(b"h2");
        assert!(keys.may_hold(b"h1") && keys.may_hold(b"h2"));
        assert!(!keys.may_hold(b"h3"));
        keys.add(b"h3");
        assert!(keys.hashes.is_none());
        assert!(keys.may_hold(b"h4"), "no set: every key may hold a record");
    }

    /// A snapshot image kept in sled by an older build moves to its file,
    /// once; the tree goes.
    #[test]
    fn an_image_kept_in_sled_by_an_older_build_moves_to_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupId::Shard(ShardId(2));
        let image = super::super::ImageFile::of(&super::super::ImageFile::open_dir(dir.path()).unwrap(), group);
        {
            let db = SledDb::open(&dir.path().join("db"), 4).unwrap();
            db.db.open_tree("shard-0002-image").unwrap().insert(LEGACY_IMAGE_KEY, &b"an older image"[..]).unwrap();
            db.flush().unwrap();
        }
        let db = SledDb::open(&dir.path().join("db"), 4).unwrap();
        assert!(!db.move_legacy_image(GroupId::Shard(ShardId(1)), &image).unwrap(), "another group has none");
        assert!(db.move_legacy_image(group, &image).unwrap());
        assert_eq!(std::fs::read(image.path()).unwrap(), b"an older image");
        assert!(!db.db.tree_names().iter().any(|n| n.as_ref() == b"shard-0002-image"), "the tree is dropped");
        assert!(!db.move_legacy_image(group, &image).unwrap(), "moved once");
        assert_eq!(std::fs::read(image.path()).unwrap(), b"an older image");
    }

    /// The image written pair by pair is byte for byte what encoding the
    /// whole list of pairs wrote (older builds' images and replica digests
    /// stay comparable), with and without the skipped keys and at every
    /// length of MessagePack's list header; it restores to the same records.
    #[test]
    fn a_snapshot_written_pair_by_pair_equals_the_encoded_list_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        let listed = |s: &SledStore, skip: &[Vec<u8>]| -> Vec<u8> {
            let kvs: Vec<(Vec<u8>, Vec<u8>)> = s
                .tables
                .tree
                .iter()
                .map(|kv| kv.unwrap())
                .filter(|(k, _)| k.as_ref() != REDO_KEY && !skip.iter().any(|x| x.as_slice() == k.as_ref()))
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            encode(&kvs)
        };
        assert_eq!(s.snapshot(&[]).unwrap(), listed(&s, &[]), "an empty shard");
        // 10 pairs (one-byte header), then past 15 (three bytes), then past
        // 65,535 (five bytes); values with bytes of 128 and above.
        let mut added = 0usize;
        for target in [10usize, 300, 66_000] {
            let mut cs = ChangeSet::default();
            for i in added..target {
                cs.push(Change::PutOwner(Identifier::new("email", format!("p{i}@shop.com")), format!("p_\u{e9}{i}")));
            }
            cs.push(Change::PutMeta("raft.applied".into(), vec![0xff, 0x80, 7]));
            s.apply(&cs).unwrap();
            added = target;
            assert_eq!(s.snapshot(&[]).unwrap(), listed(&s, &[]), "{target} records");
            let skip = vec![str_key(b'x', "raft.applied")];
            assert_eq!(s.snapshot(&["raft.applied"]).unwrap(), listed(&s, &skip), "{target} records, bookkeeping left out");
            // Into a file (here a buffer after a prefix): the same records,
            // the list's header in its longest form, the position at its end.
            let mut file = std::io::Cursor::new(b"pre".to_vec());
            file.set_position(3);
            s.frozen(&["raft.applied"]).unwrap().write_to(&mut file).unwrap();
            assert_eq!(file.position() as usize, file.get_ref().len(), "{target} records: the writer is left at the end");
            let written = &file.get_ref()[3..];
            assert_eq!(written[0], ARRAY32);
            let pairs: Vec<(Vec<u8>, Vec<u8>)> = crate::storage::decode(b"image", written).unwrap();
            let expected: Vec<(Vec<u8>, Vec<u8>)> = crate::storage::decode(b"image", &listed(&s, &skip)).unwrap();
            assert_eq!(pairs, expected, "{target} records written to a file");
        }
        let mut file = std::io::Cursor::new(Vec::new());
        s.frozen(&[]).unwrap().write_to(&mut file).unwrap();
        let from_file = SledDb::open(tempfile::tempdir().unwrap().path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        from_file.restore(file.get_ref()).unwrap();
        assert_eq!(from_file.snapshot(&[]).unwrap(), s.snapshot(&[]).unwrap(), "an image written to a file restores the same records");
        let other = tempfile::tempdir().unwrap();
        let t = SledDb::open(other.path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        t.apply(&ChangeSet {
            changes: vec![Change::PutOwner(Identifier::new("email", "gone@shop.com"), "p_x".into())],
            ..Default::default()
        })
        .unwrap();
        t.restore(&s.snapshot(&[]).unwrap()).unwrap();
        assert_eq!(t.snapshot(&[]).unwrap(), s.snapshot(&[]).unwrap(), "the restored shard holds the same records, and only those");
        assert_eq!(t.owner(&Identifier::new("email", "p42@shop.com")).unwrap().as_deref(), Some("p_\u{e9}42"));
        assert!(t.restore(&[0x93, 0x01]).is_err(), "a truncated image is refused");
    }

    /// While a shard is frozen its tree does not change: applies beyond
    /// `MAX_PENDING` go on, are read at once and wait in memory; a second
    /// view shares the first one's point in time; the database's flush
    /// waits for the last view to go. Then every held write is in the
    /// tree, and a reopened database reads them.
    #[test]
    fn a_frozen_shard_takes_applies_and_writes_them_once_the_last_view_goes() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        for n in 0..10 {
            s.apply(&owner_change(n, "p_before")).unwrap();
        }
        let tree_of = |s: &SledStore| -> Vec<(sled::IVec, sled::IVec)> { s.tables.tree.iter().map(|kv| kv.unwrap()).collect() };
        let first = s.frozen(&[]).unwrap();
        let at_freeze = tree_of(&s);
        assert_eq!(first.meta("raft.n0").unwrap(), Some(b"9".to_vec()));
        for n in 0..200 {
            s.apply(&owner_change(n, &format!("p_{n}"))).unwrap();
        }
        assert_eq!(s.owner(&Identifier::new("email", "p3@shop.com")).unwrap().as_deref(), Some("p_3"), "reads see the applies");
        assert_eq!(s.counters().unwrap().events, 210);
        let second = s.frozen(&[]).unwrap();
        assert_eq!(second.meta("raft.n0").unwrap(), Some(b"9".to_vec()), "a second view shares the first one's point in time");
        drop(first);
        s.apply(&owner_change(200, "p_200")).unwrap();
        assert_eq!(tree_of(&s), at_freeze, "nothing reaches the tree while a view is held");
        let (done, flushed) = mpsc::channel();
        let flushing = db.clone();
        let flush = std::thread::spawn(move || {
            flushing.flush().unwrap();
            done.send(()).unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(flushed.try_recv().is_err(), "the database's flush waits for the held writes");
        drop(second);
        flushed.recv().unwrap();
        flush.join().unwrap();
        assert_eq!(s.tables.pending_keys.load(Ordering::Acquire), 0, "every held write is in the tree");
        assert_eq!(s.tables.tree.get(str_key(b'x', "raft.n2")).unwrap().as_deref(), Some(b"200".as_slice()));
        drop((s, db));
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        assert_eq!(s.owner(&Identifier::new("email", "p199@shop.com")).unwrap().as_deref(), Some("p_199"));
        assert_eq!(s.owner(&Identifier::new("email", "p200@shop.com")).unwrap().as_deref(), Some("p_200"));
        assert_eq!(s.counters().unwrap().events, 211);
    }

    /// A restore replaces the tree: it waits until no view reads it. A
    /// digest's or backup's `snapshot` does not share an older view's point
    /// in time: it waits for it and sees every apply.
    #[test]
    fn a_restore_and_a_digest_wait_for_the_view_a_build_holds() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = Arc::new(db.shard(GroupId::Shard(ShardId(0))).unwrap());
        s.apply(&owner_change(0, "p_0")).unwrap();
        let image = s.snapshot(&[]).unwrap();
        let view = s.frozen(&[]).unwrap();
        s.apply(&owner_change(1, "p_1")).unwrap();
        let (done, finished) = mpsc::channel();
        let digesting = (s.clone(), done.clone());
        let digest = std::thread::spawn(move || {
            let records = digesting.0.snapshot(&[]).unwrap();
            digesting.1.send("digest").unwrap();
            records
        });
        let other_dir = tempfile::tempdir().unwrap();
        let other_store = SledDb::open(other_dir.path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        other_store.apply(&owner_change(9, "p_9")).unwrap();
        let other = other_store.snapshot(&[]).unwrap();
        let restoring = (s.clone(), other.clone(), done);
        let restore = std::thread::spawn(move || {
            restoring.0.restore(&restoring.1).unwrap();
            restoring.2.send("restore").unwrap();
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        assert!(finished.try_recv().is_err(), "neither the digest nor the restore went ahead under the view");
        let mut file = std::io::Cursor::new(Vec::new());
        view.write_to(&mut file).unwrap();
        let held = SledDb::open(tempfile::tempdir().unwrap().path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        held.restore(file.get_ref()).unwrap();
        assert_eq!(held.snapshot(&[]).unwrap(), image, "the view read the records of its point in time, whole");
        drop(view);
        let records = digest.join().unwrap();
        restore.join().unwrap();
        assert_eq!(finished.try_iter().count(), 2);
        // Whichever went first, the digest saw the apply made under the
        // view (then the restore came after it) or the restored records,
        // never the view's older point in time.
        let same_dir = tempfile::tempdir().unwrap();
        let same = SledDb::open(same_dir.path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
        same.apply(&owner_change(0, "p_0")).unwrap();
        same.apply(&owner_change(1, "p_1")).unwrap();
        let with_apply = same.snapshot(&[]).unwrap();
        assert!(records == with_apply || records == other, "the digest did not take the view's older point in time");
        assert_eq!(s.snapshot(&[]).unwrap(), other, "the restore replaced the records");
    }

    /// Beyond `snapshot_backlog_bytes` of held writes, applies wait until
    /// the view is dropped, then go on.
    #[test]
    fn applies_wait_once_the_held_writes_reach_the_backlog_bound() {
        let dir = tempfile::tempdir().unwrap();
        let options = StoreOptions { snapshot_backlog_bytes: 2_000, ..StoreOptions::default() };
        let db = SledDb::open_with(dir.path(), 1, &options).unwrap();
        let s = Arc::new(db.shard(GroupId::Shard(ShardId(0))).unwrap());
        let frozen = s.frozen(&[]).unwrap();
        let (applied, applies) = mpsc::channel();
        let applying = s.clone();
        let writer = std::thread::spawn(move || {
            for n in 0..100 {
                applying.apply(&owner_change(n, &format!("p_{n}"))).unwrap();
                applied.send(n).unwrap();
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(300));
        let before_thaw: Vec<usize> = applies.try_iter().collect();
        assert!(!before_thaw.is_empty() && before_thaw.len() < 100, "{} applies before the view went", before_thaw.len());
        assert!(s.tables.pending().bytes >= 2_000, "the applies stopped at the bound: {} bytes held", s.tables.pending().bytes);
        drop(frozen);
        writer.join().unwrap();
        assert_eq!(before_thaw.len() + applies.try_iter().count(), 100, "every apply went through once the view was dropped");
        s.flush().unwrap();
        assert_eq!(s.owner(&Identifier::new("email", "p99@shop.com")).unwrap().as_deref(), Some("p_99"));
    }

    /// A write's bytes count from its apply until its change set is in the
    /// tree, also once a later change set replaced its pending value (the
    /// writer's queue still holds it); all are let go once all are written.
    #[test]
    fn pending_bytes_count_each_write_until_its_change_set_is_written() {
        let mut p = PendingWrites::default();
        let long = "a value longer than sled keeps inline".to_string();
        let writes = |v: &str| shared_writes(vec![(b"k".to_vec(), Some(v.as_bytes().to_vec())), (b"j".to_vec(), None)]);
        let (first, second) = (writes(&long), writes("two"));
        let size = |w: &Writes| w.iter().map(|(k, v)| write_size(k, v)).sum::<usize>();
        for (n, w) in [(0, &first), (1, &second)] {
            for (k, v) in w {
                p.put(k.clone(), n, v.clone());
            }
        }
        assert_eq!(p.bytes, size(&first) + size(&second), "a replaced value still counts");
        assert_eq!(p.values.get(&b"k"[..]).and_then(|(_, v)| v.as_deref()), Some(&b"two"[..]));
        p.let_go(0, &first);
        assert_eq!(p.bytes, size(&second));
        assert_eq!(p.values.len(), 2, "the later change set's values stay pending");
        p.let_go(1, &second);
        assert_eq!((p.bytes, p.values.len(), p.written), (0, 0, 2));
    }

    /// Frozen, only the backlog's bytes bound the applies; thawed with
    /// change sets still held, the backlog may not grow: one apply for
    /// every two change sets the writer stores; caught up, `MAX_PENDING`.
    #[test]
    fn a_thawed_shard_lets_applies_in_at_half_the_writers_pace_until_it_has_caught_up() {
        let mut p = PendingWrites { frozen: 1, applied: 50, ..PendingWrites::default() };
        p.held = (0..50).map(|n| (n, Writes::new())).collect();
        assert!(!p.full(1_000), "frozen: 50 change sets wait, far below the bytes bound");
        p.bytes = 1_000;
        assert!(p.full(1_000), "frozen, at the bytes bound");
        p.bytes = 0;
        // Thawed (as `thaw` sets it): the backlog is the bound.
        p.frozen = 0;
        p.catch_up = p.applied - p.written;
        assert!(p.full(1_000), "no apply until the writer has stored some");
        let mut applies = 0;
        for _ in 0..40 {
            // The writer stores one (as `drain_one` counts it) ...
            p.held.pop_front();
            p.written += 1;
            p.stored_held();
            // ... and applies go in while there is room.
            while !p.full(1_000) {
                p.applied += 1;
                p.held.push_back((p.applied, Writes::new()));
                applies += 1;
            }
        }
        assert_eq!(applies, 20, "one apply for two change sets stored");
        assert_eq!(p.applied - p.written, 30, "the backlog shrank from 50 to 30");
        p.held.clear();
        p.written = p.applied - 3;
        assert!(!p.full(1_000), "caught up: MAX_PENDING again");
        p.written = p.applied - MAX_PENDING;
        assert!(p.full(1_000));
    }

    fn owner_change(n: usize, profile: &str) -> ChangeSet {
        let mut cs = ChangeSet::default();
        cs.push(Change::PutOwner(Identifier::new("email", format!("p{n}@shop.com")), profile.into()));
        cs.push(Change::PutMeta(format!("raft.n{}", n % 3), n.to_string().into_bytes()));
        cs.counters.events = 1;
        cs
    }

    /// Change sets applied faster than the writer stores them are read back
    /// at once, scans included, and all are in the tree after a flush, the
    /// later value of a key over the earlier one.
    #[test]
    fn applied_change_sets_are_read_at_once_while_the_writer_stores_them() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        let mut saw_pending = 0;
        for n in 0..400 {
            s.apply(&owner_change(n, &format!("p_{n}"))).unwrap();
            saw_pending += usize::from(s.tables.pending_keys.load(Ordering::Acquire) > 0);
            assert_eq!(s.owner(&Identifier::new("email", format!("p{n}@shop.com"))).unwrap(), Some(format!("p_{n}")));
            assert_eq!(s.counters().unwrap().events, n as i64 + 1);
            let metas = s.meta_prefix("raft.n").unwrap();
            assert_eq!(metas.len(), (n + 1).min(3), "after change set {n}");
            assert!(metas.contains(&(format!("raft.n{}", n % 3), n.to_string().into_bytes())), "after change set {n}");
        }
        assert!(saw_pending > 0, "the writer always kept up: nothing was read while pending");
        // The same key again: the later value stays.
        s.apply(&owner_change(7, "p_later")).unwrap();
        s.flush().unwrap();
        assert_eq!(s.tables.pending_keys.load(Ordering::Acquire), 0, "nothing pending after a flush");
        let in_tree = s.tables.tree.get(id_key(b'i', &Identifier::new("email", "p7@shop.com"))).unwrap();
        assert_eq!(in_tree.as_deref(), Some(&b"p_later"[..]));
        assert_eq!(s.counters().unwrap().events, 401);
    }

    /// A scan lays the pending writes over the tree: pending puts added or
    /// replacing, pending removals hiding a record, in key order.
    #[test]
    fn a_scan_lays_pending_writes_over_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        for k in ["xa1", "xa3", "xa5", "xb1"] {
            s.tables.tree.insert(k, b"tree").unwrap();
        }
        {
            let mut pending = s.tables.pending();
            for (k, v) in [("xa0", Some("new")), ("xa3", None), ("xa5", Some("new")), ("xa6", Some("new")), ("xc", Some("new"))] {
                pending.values.insert(IVec::from(k.as_bytes()), (0, v.map(|v| IVec::from(v.as_bytes()))));
            }
            s.tables.pending_keys.store(pending.values.len(), Ordering::Release);
        }
        let scanned: Vec<(String, String)> = s
            .tables
            .scan(b"xa")
            .unwrap()
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k.to_vec()).unwrap(), String::from_utf8(v.to_vec()).unwrap()))
            .collect();
        let expected = [("xa0", "new"), ("xa1", "tree"), ("xa5", "new"), ("xa6", "new")];
        assert_eq!(scanned, expected.map(|(k, v)| (k.to_string(), v.to_string())).to_vec());
        // Pages: after a key (tree or pending, present or removed), at most
        // a limit, across both.
        let page = |after: Option<&str>, limit: usize| -> Vec<String> {
            let rows = s.tables.scan_after(b"xa", after.map(str::as_bytes), limit).unwrap();
            rows.into_iter().map(|(k, _)| String::from_utf8(k.to_vec()).unwrap()).collect()
        };
        assert_eq!(page(None, 2), ["xa0", "xa1"]);
        assert_eq!(page(Some("xa1"), 2), ["xa5", "xa6"], "the removed xa3 is skipped");
        assert_eq!(page(Some("xa3"), 1), ["xa5"]);
        assert_eq!(page(Some("xa0"), 10), ["xa1", "xa5", "xa6"]);
        assert_eq!(page(Some("xa5"), 10), ["xa6"], "a pending key after the tree's last");
        assert!(page(Some("xa6"), 10).is_empty());
        assert_eq!(page(Some("x"), 1), ["xa0"], "a cursor before the prefix starts at it");
        assert_eq!(s.meta("a3").unwrap(), None, "a pending removal hides the record");
        assert_eq!(s.meta("a1").unwrap().as_deref(), Some(&b"tree"[..]));
        // Let the store go without waiting for the hand-made pending values.
        s.tables.pending().values.clear();
    }

    /// After the writer failed (a full disk), applies and flushes fail with
    /// its error, and reads still see everything applied.
    #[test]
    fn after_a_failed_write_applies_fail_and_reads_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        s.apply(&owner_change(1, "p_1")).unwrap();
        s.flush().unwrap();
        s.tables.pending().failed = Some(StoreError::DiskFull);
        assert!(matches!(s.apply(&owner_change(2, "p_2")), Err(StoreError::DiskFull)));
        assert!(matches!(s.flush(), Err(StoreError::DiskFull)));
        assert!(matches!(s.snapshot(&[]), Err(StoreError::DiskFull)));
        assert_eq!(s.owner(&Identifier::new("email", "p1@shop.com")).unwrap().as_deref(), Some("p_1"));
        assert_eq!(s.owner(&Identifier::new("email", "p2@shop.com")).unwrap(), None, "the refused change set is not applied");
    }

    /// A redo record reads back as written, and one written by an older
    /// build (integer lists) still reads; this build's is the smaller.
    #[test]
    fn redo_records_of_this_and_older_builds_read_back() {
        let raw = vec![
            (b"iemail\0ann@shop.com".to_vec(), Some(vec![0x92, 0xff, 0x80, 0x00, 0x7f])),
            (b"ap_1".to_vec(), None),
            (Vec::new(), Some(Vec::new())),
            (vec![0xc0], Some(vec![0xc0; 300])),
        ];
        let writes = shared_writes(raw.clone());
        let (new, old) = (encode_redo(&writes), encode(&raw));
        assert_eq!(decode_redo(&new).unwrap(), writes);
        assert_eq!(decode_redo(&old).unwrap(), writes);
        assert!(new.len() < old.len(), "{} bytes against {}", new.len(), old.len());
        assert_eq!(decode_redo(&encode_redo(&Vec::new())).unwrap(), Vec::new());
        assert!(decode_redo(&new[..new.len() - 1]).is_err(), "a cut record is refused");
    }

    /// A flush of the whole database (the node's shutdown) waits until the
    /// writer has written every shard's applied change sets.
    #[test]
    fn a_database_flush_waits_for_every_shards_pending_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 2).unwrap();
        let shards = [db.shard(GroupId::Shard(ShardId(0))).unwrap(), db.shard(GroupId::Shard(ShardId(1))).unwrap()];
        for n in 0..200 {
            shards[n % 2].apply(&owner_change(n, &format!("p_{n}"))).unwrap();
        }
        db.flush().unwrap();
        for (i, s) in shards.iter().enumerate() {
            assert_eq!(s.tables.pending_keys.load(Ordering::Acquire), 0, "shard {i} still has pending writes");
            let last = Identifier::new("email", format!("p{}@shop.com", 198 + i));
            assert_eq!(s.tables.tree.get(id_key(b'i', &last)).unwrap().as_deref(), Some(format!("p_{}", 198 + i).as_bytes()));
        }
    }

    /// A replica reopened while its last store still has change sets with
    /// the writer (requests may hold the old store a while) reads all of
    /// them from its tree.
    #[test]
    fn a_reopened_shard_reads_what_its_last_store_applied() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let old = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        for n in 0..300 {
            old.apply(&owner_change(n, &format!("p_{n}"))).unwrap();
        }
        let new = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        assert_eq!(new.counters().unwrap().events, 300);
        assert_eq!(new.owner(&Identifier::new("email", "p299@shop.com")).unwrap().as_deref(), Some("p_299"));
        assert_eq!(new.meta("raft.n2").unwrap().as_deref(), Some(&b"299"[..]));
    }

    /// A change set the writer cannot take is refused whole: reads do not
    /// see it, and nothing waits for it.
    #[test]
    fn a_change_set_the_writer_cannot_take_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let (writer, jobs) = mpsc::channel();
        drop(jobs);
        let tree = db.db.open_tree("shard-lone").unwrap();
        let s = SledStore::open(tree, writer, usize::MAX).unwrap();
        assert!(s.apply(&owner_change(1, "p_1")).is_err());
        assert_eq!(s.owner(&Identifier::new("email", "p1@shop.com")).unwrap(), None);
        assert!(s.flush().is_err(), "a flush reports the failure instead of waiting");
    }

    /// Jobs left in the writer's queue when its thread ends fail their
    /// shard, so that nothing waits for them forever.
    #[test]
    fn jobs_left_when_the_writer_ends_fail_their_shard() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 1).unwrap();
        let (writer, jobs) = mpsc::channel();
        let tree = db.db.open_tree("shard-lone").unwrap();
        let s = SledStore::open(tree, writer, usize::MAX).unwrap();
        s.apply(&owner_change(1, "p_1")).unwrap();
        assert_eq!(s.owner(&Identifier::new("email", "p1@shop.com")).unwrap().as_deref(), Some("p_1"), "pending, and read");
        drop(WriterJobs(jobs));
        assert!(s.flush().is_err(), "the flush ends with the failure");
        assert!(s.apply(&owner_change(2, "p_2")).is_err());
    }
}
