//! One log per node for every Raft group's log: [`NodeLog`], and a group's
//! view of it, [`GroupLog`] (a [`RaftLog`]).
//!
//! # Why
//!
//! Each group's log used to be a sled tree, and every append was made
//! durable by flushing the whole sled database (graph included): a few
//! small synced writes per append, per group. Here every group appends to
//! one file, and one writer thread takes every record waiting, of every
//! group, writes them with one `write` and makes them durable with one
//! `fdatasync`, then answers every waiting callback (group commit). Under
//! load one fdatasync covers the appends of all the node's groups.
//!
//! # Format
//!
//! The log is a sequence of segment files `log/<number>.log`, each a
//! sequence of records: a 4-byte length and a 4-byte CRC-32 of the body,
//! little-endian, then the body: a kind byte, the group (4 bytes), and the
//! kind's fields (entries with their indexes, a truncation point, a purge
//! point, a metadata value, or the removal of the whole group). Truncation
//! and purge are records too, so a group's state is the replay of its
//! records in order.
//!
//! # Invariants
//!
//! - Records reach the file in the order their writes were made (one queue,
//!   filled under the same lock that updates the in-memory state), so a
//!   record that survives a crash has every earlier record with it.
//! - A callback waiting for durability is answered only after an
//!   `fdatasync` that followed the write of every record enqueued before it.
//! - Recovery reads the segments in order and stops at the first record
//!   whose length or checksum is wrong: in the last segment that is a torn
//!   tail (the crash cut a write short) and is cut off; anywhere else it is
//!   corruption and the log refuses to open.
//! - After a write error the log takes nothing more (a failed write may
//!   have left a partial record, after which nothing would be recovered):
//!   every later write fails until the log is opened again.
//! - A new segment starts with a checkpoint of every group's metadata and
//!   purge point, so older segments are needed only for the entries they
//!   hold. A segment is deleted once no live entry is in it (entries of a
//!   group that is not purged for long are written again into the new
//!   segment first, so an idle group does not pin old segments).
//!
//! Live entries are indexed in memory with their place in the file; the
//! most recent ones keep their bytes (a bounded cache per group, for
//! replication), older ones are read back from the file.

use super::{io_error, RaftLog, StoreError};
use idgraph_core::model::GroupId;
use std::collections::{BTreeMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard};

/// Sizes a log works with.
#[derive(Clone, Copy, Debug)]
pub struct LogLimits {
    /// A segment is closed once it holds this many bytes.
    pub segment_bytes: u64,
    /// Bytes of recent entries kept in memory per group.
    pub cache_bytes: usize,
}

impl Default for LogLimits {
    fn default() -> Self {
        LogLimits { segment_bytes: 64 << 20, cache_bytes: 8 << 20 }
    }
}

/// Entries in a segment this many segments older than the newest are
/// written again at the next roll, so that the old segment can go.
const PINNING_SEGMENTS: u64 = 4;
const HEADER: usize = 8;
/// A metadata value every opened group has, so that the log lists it.
const OPENED: &str = "idgraph.opened";

const ENTRIES: u8 = 1;
const TRUNCATE: u8 = 2;
const PURGE: u8 = 3;
const META: u8 = 4;
const DROP: u8 = 5;

/// Called once the writes enqueued before it are durable, or failed.
pub type Durable = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// A change to one group's log, as a record says it.
enum Record<'a> {
    Entries(Vec<(u64, &'a [u8])>),
    Truncate(u64),
    Purge(u64),
    Meta(&'a str, &'a [u8]),
    Drop,
}

/// Where an entry's bytes start inside a record's frame, by entry.
type Placement = Vec<(u64, usize, usize)>;

impl Record<'_> {
    /// The framed record, and where each entry's bytes sit in it.
    fn frame(&self, group: GroupId) -> (Vec<u8>, Placement) {
        let mut body = Vec::new();
        let mut placed = Vec::new();
        let kind = match self {
            Record::Entries(_) => ENTRIES,
            Record::Truncate(_) => TRUNCATE,
            Record::Purge(_) => PURGE,
            Record::Meta(..) => META,
            Record::Drop => DROP,
        };
        body.push(kind);
        body.extend_from_slice(&group.wire().to_le_bytes());
        match self {
            Record::Entries(entries) => {
                body.extend_from_slice(&(entries.len() as u32).to_le_bytes());
                for (index, bytes) in entries {
                    body.extend_from_slice(&index.to_le_bytes());
                    body.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
                    placed.push((*index, HEADER + body.len(), bytes.len()));
                    body.extend_from_slice(bytes);
                }
            }
            Record::Truncate(i) | Record::Purge(i) => body.extend_from_slice(&i.to_le_bytes()),
            Record::Meta(key, value) => {
                body.extend_from_slice(&(key.len() as u32).to_le_bytes());
                body.extend_from_slice(key.as_bytes());
                body.extend_from_slice(&(value.len() as u32).to_le_bytes());
                body.extend_from_slice(value);
            }
            Record::Drop => {}
        }
        let mut frame = Vec::with_capacity(HEADER + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        frame.extend_from_slice(&body);
        (frame, placed)
    }

    /// Reads the record at the start of `buf`: the record, its group, its
    /// entries' placement and its framed length; `None` if `buf` does not
    /// start with a whole, intact record.
    fn parse(buf: &[u8]) -> Option<(Record<'_>, GroupId, Placement, usize)> {
        let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
        let body = buf.get(HEADER..HEADER.checked_add(len)?)?;
        if crc32fast::hash(body) != crc {
            return None;
        }
        let mut r = Reader { buf: body, at: 0 };
        let kind = r.take(1)?[0];
        let group = GroupId::from(r.u32()?);
        let mut placed = Vec::new();
        let record = match kind {
            ENTRIES => {
                let n = r.u32()? as usize;
                let mut entries = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    let index = r.u64()?;
                    let len = r.u32()? as usize;
                    placed.push((index, HEADER + r.at, len));
                    entries.push((index, r.take(len)?));
                }
                Record::Entries(entries)
            }
            TRUNCATE => Record::Truncate(r.u64()?),
            PURGE => Record::Purge(r.u64()?),
            META => {
                let klen = r.u32()? as usize;
                let key = std::str::from_utf8(r.take(klen)?).ok()?;
                let vlen = r.u32()? as usize;
                Record::Meta(key, r.take(vlen)?)
            }
            DROP => Record::Drop,
            _ => return None,
        };
        (r.at == body.len()).then_some((record, group, placed, HEADER + len))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let out = self.buf.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(out)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

/// A live entry: where its bytes are, and the bytes while cached.
struct Entry {
    segment: u64,
    offset: u64,
    len: usize,
    /// The queue position of its record: readable from the file once the
    /// writer has written that far.
    seq: u64,
    bytes: Option<Arc<[u8]>>,
}

#[derive(Default)]
struct Group {
    entries: BTreeMap<u64, Entry>,
    metas: BTreeMap<String, Vec<u8>>,
    purged: Option<u64>,
    /// Indexes whose bytes are cached, oldest first (may name entries gone
    /// since).
    cached: VecDeque<u64>,
    cached_bytes: usize,
}

impl Group {
    /// Replays one record (at `segment`, starting at `at`, queue position
    /// `seq`); `keep` keeps the entries' bytes in memory.
    fn apply(&mut self, record: &Record<'_>, placed: &Placement, segment: u64, at: u64, seq: u64, keep: bool) {
        match record {
            Record::Entries(entries) => {
                for ((index, bytes), (_, offset, len)) in entries.iter().zip(placed) {
                    let cached = keep.then(|| Arc::<[u8]>::from(*bytes));
                    if cached.is_some() {
                        self.cached.push_back(*index);
                        self.cached_bytes += len;
                    }
                    let entry = Entry { segment, offset: at + *offset as u64, len: *len, seq, bytes: cached };
                    if let Some(old) = self.entries.insert(*index, entry) {
                        self.uncache(&old);
                    }
                }
            }
            Record::Truncate(from) => {
                for (_, old) in self.entries.split_off(from) {
                    self.uncache(&old);
                }
            }
            Record::Purge(upto) => {
                let rest = self.entries.split_off(&upto.saturating_add(1));
                for (_, old) in std::mem::replace(&mut self.entries, rest) {
                    self.uncache(&old);
                }
                self.purged = self.purged.max(Some(*upto));
            }
            Record::Meta(key, value) => {
                self.metas.insert(key.to_string(), value.to_vec());
            }
            Record::Drop => *self = Group::default(),
        }
    }

    fn uncache(&mut self, e: &Entry) {
        if e.bytes.is_some() {
            self.cached_bytes -= e.len;
        }
    }

    /// Drops cached bytes beyond `budget`, oldest first, of entries the
    /// writer has written (and forgets indexes no longer cached).
    fn evict(&mut self, budget: usize, written: u64) {
        while let Some(index) = self.cached.front().copied() {
            match self.entries.get_mut(&index) {
                Some(e) if e.bytes.is_some() => {
                    if self.cached_bytes <= budget || e.seq > written {
                        break;
                    }
                    e.bytes = None;
                    self.cached_bytes -= e.len;
                }
                _ => {}
            }
            self.cached.pop_front();
        }
    }

    fn first_segment(&self) -> Option<u64> {
        self.entries.values().map(|e| e.segment).min()
    }
}

enum Job {
    Write(Vec<u8>),
    /// Makes everything written so far durable, then continues in a new
    /// segment.
    Roll(u64),
    /// Deletes segments below this number once what was written before it
    /// is durable.
    Reclaim(u64),
    Notify(Durable),
}

struct State {
    groups: BTreeMap<GroupId, Group>,
    segment: u64,
    /// Bytes enqueued into the current segment.
    offset: u64,
    /// Records enqueued so far.
    seq: u64,
    failed: Option<String>,
    readers: BTreeMap<u64, Arc<File>>,
    jobs: mpsc::Sender<Job>,
}

struct Shared {
    dir: PathBuf,
    /// Held (locked) while the log is open: one process, one log.
    lock: Mutex<Option<File>>,
    limits: LogLimits,
    state: Mutex<State>,
    /// Records written (not necessarily synced) by the writer.
    written: Arc<AtomicU64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The node's log of every group's Raft log. Cheap to clone.
#[derive(Clone)]
pub struct NodeLog {
    shared: Arc<Shared>,
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:016}.log"))
}

/// The numbers of the segments in `dir`, in order.
fn segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|e| io_error("listing the log directory", e))?
        .filter_map(|f| f.ok()?.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    numbers.sort();
    Ok(numbers)
}

/// Takes the log directory's lock, waiting up to 2 s for a handle of this
/// process that is going away (a node restarted in a test) to let go.
fn lock(dir: &Path) -> Result<File, StoreError> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(|e| io_error("opening the log's lock file", e))?;
    for _ in 0..100 {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) => std::thread::sleep(std::time::Duration::from_millis(20)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_error("locking the log", e)),
        }
    }
    Err(StoreError::Io(format!("the log in {} is in use by another process", dir.display())))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("syncing the log directory", e))
}

impl NodeLog {
    /// Opens (or creates) the log in `dir`, replaying every segment, and
    /// starts its writer thread.
    pub fn open(dir: &Path) -> Result<NodeLog, StoreError> {
        NodeLog::open_with(dir, LogLimits::default())
    }

    /// [`NodeLog::open`] with other sizes.
    pub fn open_with(dir: &Path, limits: LogLimits) -> Result<NodeLog, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating the log directory", e))?;
        let lock = lock(dir)?;
        let segments = segments(dir)?;
        let mut groups: BTreeMap<GroupId, Group> = BTreeMap::new();
        let (mut last, mut end) = (1, 0u64);
        for (i, &n) in segments.iter().enumerate() {
            let path = segment_path(dir, n);
            let buf = std::fs::read(&path).map_err(|e| io_error("reading a log segment", e))?;
            let mut at = 0usize;
            while at < buf.len() {
                let Some((record, group, placed, len)) = Record::parse(&buf[at..]) else { break };
                groups.entry(group).or_default().apply(&record, &placed, n, at as u64, 0, false);
                if matches!(record, Record::Drop) {
                    groups.remove(&group);
                }
                at += len;
            }
            if at < buf.len() {
                if i + 1 != segments.len() {
                    return Err(StoreError::Corrupt {
                        key: path.display().to_string(),
                        reason: format!("a damaged record at byte {at} of a segment that is not the last"),
                    });
                }
                tracing::warn!(segment = n, at, dropped = buf.len() - at, "the log ends in a torn record; cutting it off");
                let f = OpenOptions::new().write(true).open(&path).map_err(|e| io_error("opening a log segment", e))?;
                f.set_len(at as u64).and_then(|_| f.sync_all()).map_err(|e| io_error("cutting a torn log tail", e))?;
            }
            (last, end) = (n, at as u64);
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(segment_path(dir, last))
            .map_err(|e| io_error("opening the log's last segment", e))?;
        if segments.is_empty() {
            sync_dir(dir)?;
        }
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            lock: Mutex::new(Some(lock)),
            limits,
            state: Mutex::new(State { groups, segment: last, offset: end, seq: 0, failed: None, readers: BTreeMap::new(), jobs: tx }),
            written: Arc::new(AtomicU64::new(0)),
            writer: Mutex::new(None),
        });
        let writer = {
            // The writer holds the log weakly: once every handle is gone,
            // its queue closes and the thread ends.
            let w = Writer {
                dir: dir.to_path_buf(),
                written: shared.written.clone(),
                shared: Arc::downgrade(&shared),
                file,
                sync_pending: false,
                reclaim: None,
            };
            std::thread::Builder::new()
                .name("idgraph-log".into())
                .spawn(move || w.run(rx))
                .map_err(|e| StoreError::Io(format!("starting the log writer: {e}")))?
        };
        *shared.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
        Ok(NodeLog { shared })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One group's log.
    pub fn group(&self, group: GroupId) -> GroupLog {
        GroupLog { log: self.clone(), group }
    }

    /// One group's log, for a replica being opened: from now on the log
    /// lists the group (among [`NodeLog::groups`], after a restart too),
    /// and a log an older build kept in `db` moves here first.
    pub fn open_group(&self, group: GroupId, db: &super::SledDb) -> Result<GroupLog, StoreError> {
        let log = self.group(group);
        let known = self.state().groups.get(&group).is_some_and(|g| !g.metas.is_empty() || !g.entries.is_empty());
        if let Some(legacy) = db.legacy_raft_log(group)? {
            // A crash after the move and before the tree's removal leaves
            // both: the moved copy is the one.
            if !known {
                for (key, value) in legacy.metas()? {
                    log.stage_meta(&key, &value)?;
                }
                for chunk in legacy.range(0, u64::MAX)?.chunks(256) {
                    log.append(chunk)?;
                }
                tracing::info!(%group, "moved a raft log from the graph database to the node's log");
            }
            log.stage_meta(OPENED, b"")?;
            self.sync()?;
            db.drop_raft_log(group)?;
        } else if !known {
            log.stage_meta(OPENED, b"")?;
        }
        Ok(log)
    }

    /// The groups with anything in the log.
    pub fn groups(&self) -> Vec<GroupId> {
        self.state().groups.iter().filter(|(_, g)| !g.entries.is_empty() || !g.metas.is_empty()).map(|(id, _)| *id).collect()
    }

    /// Removes a group's log and metadata, durably.
    pub fn drop_group(&self, group: GroupId) -> Result<(), StoreError> {
        self.write(group, Record::Drop)?;
        self.state().groups.remove(&group);
        self.sync()
    }

    /// Calls `done` once every write made so far is durable.
    pub fn when_durable(&self, done: Durable) {
        let st = self.state();
        if let Some(reason) = &st.failed {
            let reason = reason.clone();
            drop(st);
            return done(Err(StoreError::Io(reason)));
        }
        if let Err(mpsc::SendError(Job::Notify(done))) = st.jobs.send(Job::Notify(done)) {
            drop(st);
            done(Err(StoreError::Io("the log writer has stopped".into())));
        }
    }

    /// Makes every write made so far durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.when_durable(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().unwrap_or_else(|_| Err(StoreError::Io("the log writer has stopped".into())))
    }

    /// Makes every write durable and stops the writer.
    pub fn close(&self) -> Result<(), StoreError> {
        let synced = self.sync();
        // The writer ends once its queue's sender is gone.
        let (tx, _) = mpsc::channel();
        let old = std::mem::replace(&mut self.state().jobs, tx);
        drop(old);
        if let Some(w) = self.shared.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = w.join();
        }
        self.shared.lock.lock().unwrap_or_else(|p| p.into_inner()).take();
        synced
    }

    /// Enqueues one record for `group` and applies it to the in-memory
    /// state, in one step (so the file and the state agree in order).
    fn write(&self, group: GroupId, record: Record<'_>) -> Result<(), StoreError> {
        let mut st = self.state();
        if let Some(reason) = &st.failed {
            return Err(StoreError::Io(reason.clone()));
        }
        let (frame, placed) = record.frame(group);
        self.enqueue(&mut st, group, &record, &placed, frame, true);
        if st.offset >= self.shared.limits.segment_bytes {
            self.roll(&mut st);
        }
        let written = self.shared.written.load(Ordering::Acquire);
        if let Some(g) = st.groups.get_mut(&group) {
            g.evict(self.shared.limits.cache_bytes, written);
        }
        Ok(())
    }

    fn enqueue(&self, st: &mut State, group: GroupId, record: &Record<'_>, placed: &Placement, frame: Vec<u8>, keep: bool) {
        st.seq += 1;
        let (segment, at, seq) = (st.segment, st.offset, st.seq);
        st.offset += frame.len() as u64;
        st.groups.entry(group).or_default().apply(record, placed, segment, at, seq, keep);
        // A stopped writer fails the next sync, which every caller awaits.
        let _ = st.jobs.send(Job::Write(frame));
    }

    /// Starts a new segment with a checkpoint of every group, writes again
    /// the entries that pin old segments, and lets the writer delete the
    /// segments no live entry needs.
    fn roll(&self, st: &mut State) {
        st.segment += 1;
        st.offset = 0;
        let _ = st.jobs.send(Job::Roll(st.segment));
        let pinning = st.segment.saturating_sub(PINNING_SEGMENTS);
        let ids: Vec<GroupId> = st.groups.keys().copied().collect();
        for id in ids {
            let g = &st.groups[&id];
            let metas: Vec<(String, Vec<u8>)> = g.metas.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            let purged = g.purged;
            let old: Vec<u64> =
                if g.first_segment().is_some_and(|s| s <= pinning) { g.entries.keys().copied().collect() } else { Vec::new() };
            for (k, v) in &metas {
                let record = Record::Meta(k, v);
                let (frame, placed) = record.frame(id);
                self.enqueue(st, id, &record, &placed, frame, false);
            }
            if let Some(p) = purged {
                let record = Record::Purge(p);
                let (frame, placed) = record.frame(id);
                self.enqueue(st, id, &record, &placed, frame, false);
            }
            // Moved only when every entry reads back (the writer may not
            // have written all of them yet): until then they stay where
            // they are, and so does their segment.
            let moved: Option<Vec<(u64, Vec<u8>)>> =
                old.iter().map(|i| self.read_entry(st, id, *i).ok().flatten().map(|b| (*i, b))).collect();
            for chunk in moved.unwrap_or_default().chunks(256) {
                let record = Record::Entries(chunk.iter().map(|(i, b)| (*i, b.as_slice())).collect());
                let (frame, placed) = record.frame(id);
                self.enqueue(st, id, &record, &placed, frame, false);
            }
        }
        let oldest_needed = st.groups.values().filter_map(Group::first_segment).min().unwrap_or(st.segment).min(st.segment);
        let _ = st.jobs.send(Job::Reclaim(oldest_needed));
        st.readers.retain(|n, _| *n >= oldest_needed);
    }

    /// An entry's bytes, from the cache or the file.
    fn read_entry(&self, st: &mut State, group: GroupId, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        let Some(e) = st.groups.get(&group).and_then(|g| g.entries.get(&index)) else { return Ok(None) };
        if let Some(b) = &e.bytes {
            return Ok(Some(b.to_vec()));
        }
        let (segment, offset, len) = (e.segment, e.offset, e.len);
        let file = match st.readers.get(&segment) {
            Some(f) => f.clone(),
            None => {
                let f = Arc::new(File::open(segment_path(&self.shared.dir, segment)).map_err(|e| io_error("opening a log segment", e))?);
                st.readers.insert(segment, f.clone());
                f
            }
        };
        let mut buf = vec![0; len];
        file.read_exact_at(&mut buf, offset).map_err(|e| io_error("reading a log entry", e))?;
        Ok(Some(buf))
    }
}

/// The writer thread: takes every job waiting, writes, syncs once,
/// answers.
struct Writer {
    dir: PathBuf,
    written: Arc<AtomicU64>,
    shared: std::sync::Weak<Shared>,
    file: File,
    sync_pending: bool,
    reclaim: Option<u64>,
}

impl Writer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while let Ok(more) = rx.try_recv() {
                jobs.push(more);
            }
            let mut waiting = Vec::new();
            let result = self.batch(jobs, &mut waiting);
            if let Err(e) = &result {
                tracing::error!(error = %e, "the log failed a write; it takes no more until reopened");
                if let Some(shared) = self.shared.upgrade() {
                    shared.state.lock().unwrap_or_else(|p| p.into_inner()).failed.get_or_insert_with(|| e.to_string());
                }
            }
            for done in waiting {
                done(match &result {
                    Ok(()) => Ok(()),
                    Err(StoreError::DiskFull) => Err(StoreError::DiskFull),
                    Err(e) => Err(StoreError::Io(e.to_string())),
                });
            }
            if result.is_err() {
                // Everything after a failed write fails too.
                while let Ok(job) = rx.recv() {
                    if let Job::Notify(done) = job {
                        done(Err(StoreError::Io("an earlier log write failed".into())));
                    }
                }
                return;
            }
        }
        let _ = self.file.sync_data();
    }

    fn batch(&mut self, jobs: Vec<Job>, waiting: &mut Vec<Durable>) -> Result<(), StoreError> {
        let mut buf = Vec::new();
        let mut records = 0u64;
        for job in jobs {
            match job {
                Job::Write(frame) => {
                    buf.extend_from_slice(&frame);
                    records += 1;
                }
                Job::Roll(n) => {
                    self.write(&buf, records)?;
                    (buf, records) = (Vec::new(), 0);
                    self.sync()?;
                    self.file = OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(segment_path(&self.dir, n))
                        .map_err(|e| io_error("creating a log segment", e))?;
                    sync_dir(&self.dir)?;
                }
                Job::Reclaim(below) => self.reclaim = Some(below),
                Job::Notify(done) => waiting.push(done),
            }
        }
        self.write(&buf, records)?;
        if !waiting.is_empty() || self.reclaim.is_some() {
            self.sync()?;
        }
        if let Some(below) = self.reclaim.take() {
            self.delete_below(below)?;
        }
        Ok(())
    }

    fn write(&mut self, buf: &[u8], records: u64) -> Result<(), StoreError> {
        if buf.is_empty() {
            return Ok(());
        }
        // A crash here leaves a torn record for recovery to cut off.
        let (first, rest) = buf.split_at(buf.len() / 2);
        self.file.write_all(first).map_err(|e| io_error("writing the log", e))?;
        crate::crash::crash_point("log::mid-write");
        self.file.write_all(rest).map_err(|e| io_error("writing the log", e))?;
        self.written.fetch_add(records, Ordering::Release);
        self.sync_pending = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<(), StoreError> {
        if !self.sync_pending {
            return Ok(());
        }
        crate::crash::crash_point("raft::before-fsync");
        self.file.sync_data().map_err(|e| io_error("syncing the log", e))?;
        crate::crash::crash_point("raft::after-fsync");
        self.sync_pending = false;
        Ok(())
    }

    fn delete_below(&self, below: u64) -> Result<(), StoreError> {
        let mut deleted = 0;
        for n in segments(&self.dir)?.into_iter().take_while(|n| *n < below) {
            std::fs::remove_file(segment_path(&self.dir, n)).map_err(|e| io_error("deleting a log segment", e))?;
            deleted += 1;
        }
        if deleted > 0 {
            tracing::debug!(deleted, below, "reclaimed log segments");
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// One group's Raft log and metadata inside the node's log.
#[derive(Clone)]
pub struct GroupLog {
    log: NodeLog,
    group: GroupId,
}

impl GroupLog {
    /// The node's log this group's log is part of.
    pub fn node_log(&self) -> &NodeLog {
        &self.log
    }
}

impl RaftLog for GroupLog {
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        self.log.write(self.group, Record::Entries(entries.iter().map(|(i, b)| (*i, b.as_slice())).collect()))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.log.sync()
    }

    fn range(&self, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= until {
            return Ok(Vec::new());
        }
        let mut st = self.log.state();
        let indexes: Vec<u64> = match st.groups.get(&self.group) {
            Some(g) => g.entries.range(from..until).map(|(i, _)| *i).collect(),
            None => return Ok(Vec::new()),
        };
        let mut out = Vec::with_capacity(indexes.len());
        for i in indexes {
            if let Some(b) = self.log.read_entry(&mut st, self.group, i)? {
                out.push((i, b));
            }
        }
        Ok(out)
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let mut st = self.log.state();
        let Some(last) = st.groups.get(&self.group).and_then(|g| g.entries.keys().next_back().copied()) else { return Ok(None) };
        Ok(self.log.read_entry(&mut st, self.group, last)?.map(|b| (last, b)))
    }

    fn truncate_from(&self, from: u64) -> Result<(), StoreError> {
        self.log.write(self.group, Record::Truncate(from))?;
        self.log.sync()
    }

    fn purge_upto(&self, upto: u64) -> Result<(), StoreError> {
        self.log.write(self.group, Record::Purge(upto))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.log.write(self.group, Record::Meta(key, value))?;
        self.log.sync()
    }

    fn stage_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.log.write(self.group, Record::Meta(key, value))
    }

    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.log.state().groups.get(&self.group).and_then(|g| g.metas.get(key).cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_core::model::ShardId;

    #[test]
    fn group_logs_conform() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(dir.path()).unwrap();
        super::super::conformance::raft_log_conforms(&log.group(GroupId::Shard(ShardId(0))));
        super::super::conformance::raft_log_conforms(&log.group(GroupId::Meta));
    }

    fn entries(from: u64, to: u64, size: usize) -> Vec<(u64, Vec<u8>)> {
        (from..=to).map(|i| (i, vec![(i % 251) as u8; size])).collect()
    }

    #[test]
    fn a_reopened_log_holds_every_group_as_written() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = NodeLog::open(dir.path()).unwrap();
            let (a, b) = (log.group(GroupId::Shard(ShardId(0))), log.group(GroupId::Shard(ShardId(1))));
            a.append(&entries(1, 20, 10)).unwrap();
            b.append(&entries(1, 5, 3)).unwrap();
            a.truncate_from(15).unwrap();
            a.append(&[(15, vec![9])]).unwrap();
            a.purge_upto(3).unwrap();
            b.put_meta("vote", b"v").unwrap();
            b.stage_meta("committed", b"c").unwrap();
            log.group(GroupId::Shard(ShardId(2))).append(&entries(1, 2, 1)).unwrap();
            log.drop_group(GroupId::Shard(ShardId(2))).unwrap();
            log.close().unwrap();
        }
        let log = NodeLog::open(dir.path()).unwrap();
        let (a, b) = (log.group(GroupId::Shard(ShardId(0))), log.group(GroupId::Shard(ShardId(1))));
        let mut want = entries(4, 14, 10);
        want.push((15, vec![9]));
        assert_eq!(a.range(0, 100).unwrap(), want);
        assert_eq!(b.range(0, 100).unwrap(), entries(1, 5, 3));
        assert_eq!(b.get_meta("vote").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(b.get_meta("committed").unwrap().as_deref(), Some(&b"c"[..]));
        assert_eq!(log.groups(), vec![GroupId::Shard(ShardId(0)), GroupId::Shard(ShardId(1))], "a dropped group is gone");
    }

    /// A crash in the middle of a write leaves a torn record: every record
    /// before it opens, the torn one is cut off, and the log goes on.
    #[test]
    fn recovery_cuts_a_torn_tail_and_keeps_every_whole_record() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = NodeLog::open(dir.path()).unwrap();
            log.group(GroupId::Shard(ShardId(0))).append(&entries(1, 10, 100)).unwrap();
            log.group(GroupId::Shard(ShardId(0))).append(&entries(11, 12, 100)).unwrap();
            log.close().unwrap();
        }
        let seg = segment_path(dir.path(), 1);
        let len = std::fs::metadata(&seg).unwrap().len();
        // Tear the second record anywhere inside it, and flip a byte in it.
        for cut in [len - 1, len - 150, len - 205] {
            let f = OpenOptions::new().write(true).open(&seg).unwrap();
            f.set_len(cut).unwrap();
            drop(f);
            let log = NodeLog::open(dir.path()).unwrap();
            let g = log.group(GroupId::Shard(ShardId(0)));
            assert_eq!(g.range(0, 100).unwrap(), entries(1, 10, 100), "cut at {cut}");
            g.append(&entries(11, 12, 100)).unwrap();
            log.close().unwrap();
            let log = NodeLog::open(dir.path()).unwrap();
            assert_eq!(
                log.group(GroupId::Shard(ShardId(0))).range(0, 100).unwrap(),
                entries(1, 12, 100),
                "appends after a cut tail survive"
            );
            log.close().unwrap();
        }
        let mut bytes = std::fs::read(&seg).unwrap();
        let at = bytes.len() - 10;
        bytes[at] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let log = NodeLog::open(dir.path()).unwrap();
        assert_eq!(
            log.group(GroupId::Shard(ShardId(0))).range(0, 100).unwrap(),
            entries(1, 10, 100),
            "a record failing its checksum is cut"
        );
    }

    /// A damaged record in a segment other than the last is corruption, not
    /// a torn tail: the log refuses to open rather than lose what follows.
    #[test]
    fn a_damaged_record_before_the_last_segment_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(dir.path()).unwrap();
        log.group(GroupId::Shard(ShardId(0))).append(&entries(1, 3, 10)).unwrap();
        log.close().unwrap();
        std::fs::write(segment_path(dir.path(), 2), b"").unwrap();
        let seg = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[12] ^= 0xff;
        std::fs::write(&seg, &bytes).unwrap();
        let err = NodeLog::open(dir.path()).err().expect("refused");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }

    /// Segments roll over; old ones are deleted once their entries are
    /// purged, and a group that is never purged does not keep old segments
    /// alive: its entries move to a new segment. Entries evicted from the
    /// cache read back from the file.
    #[test]
    fn old_segments_are_reclaimed_and_evicted_entries_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let limits = LogLimits { segment_bytes: 1 << 20, cache_bytes: 64 << 10 };
        let log = NodeLog::open_with(dir.path(), limits).unwrap();
        let (busy, idle) = (log.group(GroupId::Shard(ShardId(0))), log.group(GroupId::Shard(ShardId(1))));
        idle.append(&entries(1, 3, 50)).unwrap();
        idle.put_meta("vote", b"idle").unwrap();
        let size = 16 << 10;
        let mut next = 1;
        for _ in 0..(12 * limits.segment_bytes / size as u64 / 8) {
            busy.append(&entries(next, next + 7, size)).unwrap();
            // As openraft does: it waits for its appends to be durable.
            log.sync().unwrap();
            next += 8;
            busy.purge_upto(next - 9).unwrap();
        }
        log.sync().unwrap();
        // Once more, so the writer has reclaimed after its last roll.
        busy.append(&entries(next, next, 1)).unwrap();
        log.sync().unwrap();
        let segments = segments(dir.path()).unwrap().len();
        assert!(segments <= PINNING_SEGMENTS as usize + 2, "{segments} segments kept");
        assert_eq!(idle.range(0, 10).unwrap(), entries(1, 3, 50), "the idle group's entries moved, not lost");
        let evicted = busy.range(next - 8, next).unwrap();
        assert_eq!(evicted, entries(next - 8, next - 1, size));
        log.close().unwrap();
        let log = NodeLog::open_with(dir.path(), limits).unwrap();
        assert_eq!(log.group(GroupId::Shard(ShardId(1))).range(0, 10).unwrap(), entries(1, 3, 50));
        assert_eq!(log.group(GroupId::Shard(ShardId(1))).get_meta("vote").unwrap().as_deref(), Some(&b"idle"[..]));
        assert_eq!(log.group(GroupId::Shard(ShardId(0))).range(next - 8, next).unwrap(), entries(next - 8, next - 1, size));
    }

    /// Many groups' appends waiting together share one fdatasync; each
    /// callback is answered after the sync that covers its writes.
    #[test]
    fn callbacks_are_answered_after_the_writes_before_them() {
        let dir = tempfile::tempdir().unwrap();
        let log = NodeLog::open(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel();
        for g in 0..16 {
            log.group(GroupId::Shard(ShardId(g))).append(&entries(1, 4, 64)).unwrap();
            let tx = tx.clone();
            log.when_durable(Box::new(move |r| tx.send((g, r.is_ok())).unwrap()));
        }
        let answered: Vec<(u32, bool)> = (0..16).map(|_| rx.recv().unwrap()).collect();
        assert_eq!(answered, (0..16).map(|g| (g, true)).collect::<Vec<_>>(), "in order, all durable");
        // What was answered durable is in the file.
        let bytes = std::fs::read(segment_path(dir.path(), 1)).unwrap();
        let mut at = 0;
        let mut groups = 0;
        while let Some((_, _, _, len)) = Record::parse(&bytes[at..]) {
            at += len;
            groups += 1;
        }
        assert_eq!(groups, 16);
    }
}

#[cfg(test)]
mod moving_tests {
    use super::*;
    use crate::storage::SledDb;
    use idgraph_core::model::ShardId;

    /// A data directory of an older build keeps each group's log in a sled
    /// tree: opening the replica moves it into the node's log, whole, and
    /// drops the tree; the group is listed by the node's log from then on.
    #[test]
    fn a_sled_kept_log_moves_into_the_node_log() {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(&dir.path().join("db"), 1).unwrap();
        let old = db.raft_log(GroupId::Shard(ShardId(0))).unwrap();
        let entries: Vec<(u64, Vec<u8>)> = (5..=9).map(|i| (i, vec![i as u8; 7])).collect();
        old.append(&entries).unwrap();
        old.put_meta("vote", b"v3").unwrap();
        old.sync().unwrap();
        drop(old);
        {
            let log = NodeLog::open(&dir.path().join("log")).unwrap();
            let g = log.open_group(GroupId::Shard(ShardId(0)), &db).unwrap();
            assert_eq!(g.range(0, 100).unwrap(), entries);
            assert_eq!(g.get_meta("vote").unwrap().as_deref(), Some(&b"v3"[..]));
            assert!(db.legacy_raft_log(GroupId::Shard(ShardId(0))).unwrap().is_none(), "the tree is dropped");
            assert!(db.groups().is_empty());
            log.close().unwrap();
        }
        let log = NodeLog::open(&dir.path().join("log")).unwrap();
        assert_eq!(log.groups(), vec![GroupId::Shard(ShardId(0))]);
        assert_eq!(log.group(GroupId::Shard(ShardId(0))).range(0, 100).unwrap(), entries);
        // A group opened with nothing written yet is listed too.
        log.open_group(GroupId::Shard(ShardId(7)), &db).unwrap();
        log.close().unwrap();
        assert_eq!(NodeLog::open(&dir.path().join("log")).unwrap().groups(), vec![GroupId::Shard(ShardId(0)), GroupId::Shard(ShardId(7))]);
    }
}
