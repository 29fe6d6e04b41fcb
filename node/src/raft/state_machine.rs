//! openraft's state machine: the pure engine applied to a shard's
//! [`GraphStore`].

use super::image::{read_image, read_meta, write_image, ImageData};
use super::{decode, encode, read_err, write_err, LogId, Refusal, ShardCommand, ShardRaft, ShardResponse, StorageError};
use crate::storage::{GraphStore, ImageFile, PartialImage, Staged};
use crate::txn;
use idgraph_core::engine;
use idgraph_core::meta::MetaError;
use idgraph_core::model::{Change, ChangeSet};
use idgraph_core::rules::RuleSet;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{BasicNode, Entry, EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StoredMembership};
use std::sync::Arc;

const APPLIED: &str = "raft.applied";
/// The last command applied inside a (possibly not yet complete) entry.
const APPLIED_COMMAND: &str = "raft.applied_command";
const MEMBERSHIP: &str = "raft.membership";
const SNAPSHOT: &str = "raft.snapshot";

type Membership = StoredMembership<u64, BasicNode>;

/// A digest of a replica's state, as `Admin.GetDigests` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaDigest {
    /// Last log index applied to the state digested.
    pub applied_index: u64,
    /// xxh3-64 of the records in key order, Raft bookkeeping left out.
    pub digest: u64,
    pub bytes: u64,
    /// False when entries were applied while the records were read.
    pub settled: bool,
}

/// Where a replica's state stands in its log: the raw applied position
/// and membership records. Every applied batch changes the first or the
/// second, in the same atomic write as its records.
#[derive(PartialEq, Eq)]
struct Position {
    applied: Option<Vec<u8>>,
    applied_command: Option<Vec<u8>>,
    membership: Option<Vec<u8>>,
}

impl Position {
    fn read<S: GraphStore>(store: &S) -> Result<Position, crate::storage::StoreError> {
        Position::read_from(|key| store.meta(key))
    }

    fn read_from(
        meta: impl Fn(&str) -> Result<Option<Vec<u8>>, crate::storage::StoreError>,
    ) -> Result<Position, crate::storage::StoreError> {
        Ok(Position { applied: meta(APPLIED)?, applied_command: meta(APPLIED_COMMAND)?, membership: meta(MEMBERSHIP)? })
    }

    fn applied(&self) -> Result<Option<LogId>, crate::storage::StoreError> {
        Ok(match &self.applied {
            Some(b) => decode::<Option<LogId>>(b)?,
            None => None,
        })
    }

    /// Whether some commands of the entry after `applied` are applied
    /// already (an entry's commands are written one batch each).
    fn mid_entry(&self) -> Result<bool, crate::storage::StoreError> {
        let done: Option<(LogId, usize)> = match &self.applied_command {
            Some(b) => Some(decode(b)?),
            None => None,
        };
        let applied = self.applied()?;
        Ok(done.is_some_and(|(id, _)| applied.is_none_or(|a| a.index < id.index)))
    }

    fn membership(&self) -> Result<Membership, crate::storage::StoreError> {
        Ok(match &self.membership {
            Some(b) => decode(b)?,
            None => Membership::default(),
        })
    }
}

/// Something read from a replica's records (its image) and the log
/// position they reflect, read while entries may be applied (a digest is
/// taken while its replica serves). `read` sees one point in time (a
/// frozen view of the store) and is given the position read just before;
/// the position is read again
/// after it, and when the two differ an apply slipped in between and
/// `read` runs again. `None` after `attempts` tries.
fn read_at_position<S: GraphStore, T>(
    store: &S,
    attempts: usize,
    mut read: impl FnMut(&Position) -> Result<T, crate::storage::StoreError>,
) -> Result<Option<(T, Position)>, crate::storage::StoreError> {
    for _ in 0..attempts {
        let before = Position::read(store)?;
        let value = read(&before)?;
        if Position::read(store)? == before {
            return Ok(Some((value, before)));
        }
    }
    Ok(None)
}

/// A shard's records as a backup keeps them: everything but the Raft
/// bookkeeping (applied position, membership, kept image), which belongs
/// to the cluster the image is restored into. One point in time.
pub fn backup_image<S: GraphStore>(store: &S) -> Result<Vec<u8>, crate::storage::StoreError> {
    store.snapshot(&[APPLIED, APPLIED_COMMAND, SNAPSHOT, MEMBERSHIP])
}

/// Digests a replica's state without stopping it. Replicas of one shard
/// that applied the same log hold the same records, whatever mix of entries
/// and snapshots brought them there. Not `settled` when entries kept being
/// applied while it was read.
pub fn replica_digest<S: GraphStore>(store: &S) -> Result<ReplicaDigest, crate::storage::StoreError> {
    let without = [APPLIED, APPLIED_COMMAND, SNAPSHOT];
    let (records, position, settled) = match read_at_position(store, 3, |_| store.snapshot(&without))? {
        Some((records, position)) => (records, position, true),
        None => (store.snapshot(&without)?, Position::read(store)?, false),
    };
    Ok(ReplicaDigest {
        applied_index: position.applied()?.map_or(0, |l| l.index),
        digest: xxhash_rust::xxh3::xxh3_64(&records),
        bytes: records.len() as u64,
        // Half an entry applied is not a state another replica reports.
        settled: settled && !position.mid_entry()?,
    })
}

/// Keeps `partial` (an image at `position`) as `image` unless a newer one
/// is kept already; whether it was kept. openraft builds a snapshot in a
/// task of its own, beside the applies and beside an install, and does not
/// wait for it when a replica shuts down: a build that read the records
/// before an install (or before its replica was reopened) must not replace
/// the newer image with its older one when it finishes. After a restart
/// openraft takes the kept image as its snapshot, and a log already purged
/// past it would break openraft's invariant that the log continues the
/// snapshot. One lock for the whole process, so that replicas opened again
/// on the same file share it; the kept image's position is read from the
/// file under it.
fn keep_unless_newer(image: &ImageFile, position: Option<LogId>, partial: PartialImage) -> Result<bool, crate::storage::StoreError> {
    static KEEPING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _keeping = KEEPING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let current = match image.open()? {
        Some(mut file) => read_meta(&mut file)?.last_log_id,
        None => None,
    };
    if current > position {
        return Ok(false);
    }
    image.keep(partial)?;
    Ok(true)
}

/// A shard replica's state machine.
pub struct ShardStateMachine<S: GraphStore> {
    store: Arc<S>,
    rules: Arc<RuleSet>,
    /// Where the replica's snapshot image is kept.
    image: ImageFile,
    snapshots_built: u64,
    /// When builds end and how long they take ([`super::pace`]).
    pace: Arc<super::pace::SnapshotPace>,
}

impl<S: GraphStore> ShardStateMachine<S> {
    pub fn new(store: Arc<S>, rules: Arc<RuleSet>, image: ImageFile) -> Self {
        ShardStateMachine { store, rules, image, snapshots_built: 0, pace: Arc::default() }
    }

    /// What decides when the replica's next build is due.
    pub fn pace(&self) -> Arc<super::pace::SnapshotPace> {
        self.pace.clone()
    }

    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        match self.store.meta(key).map_err(read_err)? {
            Some(b) => decode(&b).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    fn applied(&self) -> Result<(Option<LogId>, Membership), StorageError> {
        Ok((self.meta::<Option<LogId>>(APPLIED)?.flatten(), self.meta(MEMBERSHIP)?.unwrap_or_default()))
    }

    /// The current snapshot, kept in its file so that it survives restarts.
    /// A data directory of a build that kept it as the meta value
    /// `SNAPSHOT` has it moved to the file first.
    fn stored_snapshot(&self) -> Result<Option<Snapshot<ShardRaft>>, StorageError> {
        let mut file = self.image.open().map_err(read_err)?;
        if file.is_none() {
            match self.store.meta(SNAPSHOT).map_err(read_err)? {
                Some(bytes) if !bytes.is_empty() => {
                    self.image.keep_bytes(&bytes).map_err(write_err)?;
                    file = self.image.open().map_err(read_err)?;
                }
                _ => {}
            }
        }
        let Some(mut file) = file else { return Ok(None) };
        let meta = read_meta(&mut file).map_err(read_err)?;
        Ok(Some(Snapshot { meta, snapshot: Box::new(ImageData::kept(file)) }))
    }
}

impl<S: GraphStore> RaftStateMachine<ShardRaft> for ShardStateMachine<S> {
    type SnapshotBuilder = Self;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        self.applied()
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<ShardResponse>>, StorageError>
    where
        I: IntoIterator<Item = Entry<ShardRaft>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        // The records never go back: an entry the store has applied already
        // (openraft may hand it again after an older snapshot was offered,
        // see `install_snapshot`) is answered and not applied twice.
        let already: Option<LogId> = self.meta::<Option<LogId>>(APPLIED)?.flatten();
        for entry in entries {
            let log_id = entry.log_id;
            if already.is_some_and(|a| a.index >= log_id.index) {
                let commands = match &entry.payload {
                    EntryPayload::Normal(p) => p.commands.len(),
                    _ => 1,
                };
                out.push(vec![ShardResponse::Nothing; commands]);
                continue;
            }
            let failed = |e: crate::storage::StoreError| -> StorageError {
                openraft::StorageIOError::apply(log_id, openraft::AnyError::new(&e)).into()
            };
            let mut responses = Vec::new();
            let mut last = ChangeSet::default();
            match entry.payload {
                EntryPayload::Blank => responses.push(ShardResponse::Nothing),
                EntryPayload::Membership(m) => {
                    last.push(Change::PutMeta(MEMBERSHIP.into(), encode(&Membership::new(Some(log_id), m))));
                    responses.push(ShardResponse::Nothing);
                }
                EntryPayload::Normal(proposal) => {
                    // A data directory written before entries were applied
                    // whole may hold part of this entry: those commands are
                    // not applied again.
                    let done: Option<(LogId, usize)> = self.meta(APPLIED_COMMAND)?;
                    let skip = match done {
                        Some((id, i)) if id == log_id => i + 1,
                        _ => 0,
                    };
                    // Every command reads the writes of those before it; the
                    // entry lands as one atomic write.
                    let mut staged = Staged::new(&*self.store);
                    let mut staged_any = false;
                    let mut marked = false;
                    for (i, cmd) in proposal.commands.iter().enumerate() {
                        if i < skip {
                            responses.push(ShardResponse::Nothing);
                            continue;
                        }
                        let (cs, response) = match cmd {
                            ShardCommand::Engine(cmd) => match engine::execute(&staged, &self.rules, cmd) {
                                Ok((cs, outcome)) => (cs, ShardResponse::Applied(outcome)),
                                Err(e) => (ChangeSet::default(), ShardResponse::Refused(Refusal::from_engine(e).map_err(failed)?)),
                            },
                            ShardCommand::Txn(op) => {
                                let (cs, reply) = txn::apply_op(&staged, op).map_err(failed)?;
                                (cs, ShardResponse::Txn(reply))
                            }
                            ShardCommand::Meta(cmd) => match idgraph_core::meta::execute(&staged, cmd) {
                                Ok((cs, map)) => (cs, ShardResponse::Map(map)),
                                Err(MetaError::Store(e)) => return Err(failed(e)),
                                Err(e) => (ChangeSet::default(), ShardResponse::Refused(Refusal::from_meta(e))),
                            },
                            ShardCommand::ForgetEvents { before_ms, event_ids } => {
                                let cs = idgraph_core::retention::forget_events(&staged, *before_ms, event_ids).map_err(failed)?;
                                let forgotten = cs.changes.len() as u64;
                                (cs, ShardResponse::Forgotten(forgotten))
                            }
                            ShardCommand::Restore(image) => {
                                // Only into a shard without records, alone in its
                                // entry's writes: nothing acknowledged is replaced.
                                if staged_any || self.store.holds_records().map_err(failed)? {
                                    let reason = "the shard holds records; restore into a new cluster".to_string();
                                    responses.push(ShardResponse::Refused(Refusal::FailedPrecondition { reason, limit: None }));
                                    continue;
                                }
                                // The image replaces the records whole, in one atomic
                                // write with the Raft bookkeeping: the position kept
                                // and this command marked applied (a crash replays the
                                // entry's later commands only, like any entry
                                // interrupted half-way).
                                let mut bookkeeping = vec![(APPLIED_COMMAND.to_string(), encode(&(log_id, i)))];
                                for key in [APPLIED, MEMBERSHIP] {
                                    if let Some(v) = self.store.meta(key).map_err(failed)? {
                                        bookkeeping.push((key.to_string(), v));
                                    }
                                }
                                marked = true;
                                drop(staged);
                                self.store.restore_with_meta(image, &bookkeeping).map_err(failed)?;
                                staged = Staged::new(&*self.store);
                                (ChangeSet::default(), ShardResponse::Restored(image.len() as u64))
                            }
                        };
                        staged_any |= !cs.is_empty();
                        staged.stage(cs);
                        responses.push(response);
                    }
                    last = staged.into_changes();
                    if done.is_some() || marked {
                        last.push(Change::DeleteMeta(APPLIED_COMMAND.into()));
                    }
                }
            }
            last.push(Change::PutMeta(APPLIED.into(), encode(&Some(log_id))));
            self.store.apply(&last).map_err(failed)?;
            out.push(responses);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.builder()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<ImageData>, StorageError> {
        Ok(Box::new(ImageData::receiving(self.image.partial().map_err(write_err)?)))
    }

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<u64, BasicNode>, snapshot: Box<ImageData>) -> Result<(), StorageError> {
        let read = |e: crate::storage::StoreError| -> StorageError {
            openraft::StorageIOError::read_snapshot(Some(meta.signature()), openraft::AnyError::new(&e)).into()
        };
        let write = |e: crate::storage::StoreError| -> StorageError {
            openraft::StorageIOError::write_snapshot(Some(meta.signature()), openraft::AnyError::new(&e)).into()
        };
        let mut partial = snapshot.into_partial(&self.image).await?;
        // Never back: a snapshot older than the records (a restarted
        // follower offered the leader's older image while its own log was
        // already purged past it) is not installed over them. Restoring it
        // would leave the records behind a log purged further, which
        // openraft refuses at the next start; the entries after the offered
        // snapshot are skipped by `apply` as already applied.
        let (applied, _) = self.applied()?;
        if applied > meta.last_log_id {
            tracing::warn!(
                applied = applied.map(|a| a.index),
                snapshot = meta.last_log_id.map(|l| l.index),
                "a snapshot older than the applied records was offered; keeping the records"
            );
            return Ok(());
        }
        let img = read_image(partial.file()).map_err(read)?;
        self.store.restore(&img.graph).map_err(write)?;
        drop(img);
        crate::crash::crash_point("raft::snapshot-install");
        let mut cs = ChangeSet::default();
        cs.push(Change::PutMeta(APPLIED.into(), encode(&meta.last_log_id)));
        cs.push(Change::PutMeta(MEMBERSHIP.into(), encode(&meta.last_membership)));
        // The restore removed any image kept the old way (as meta `SNAPSHOT`):
        // images never carry that value.
        self.store.apply(&cs).map_err(write)?;
        // The records and their position are durable before the image is
        // kept: a crash in between leaves the records ahead of the kept
        // image, which `repair_interrupted_install` mends.
        self.store.flush().map_err(write)?;
        keep_unless_newer(&self.image, meta.last_log_id, partial).map_err(write)?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<ShardRaft>>, StorageError> {
        self.stored_snapshot()
    }
}

impl<S: GraphStore> ShardStateMachine<S> {
    /// Run before openraft opens the replica, with the indexes of the log's
    /// last entry and of its last purged one. Whether the kept image had to
    /// be rebuilt.
    ///
    /// An install restores the records, makes them and their position
    /// durable, then keeps the received image; openraft may purge the log
    /// up to the installed position meanwhile. A crash in between leaves
    /// the records ahead of the kept image, and the log either ends before
    /// the records (openraft would purge it up to the applied position and
    /// find no snapshot covering it) or is purged past the kept image (a
    /// follower sent that image would need entries that are gone). Either
    /// way the image is rebuilt from the records here.
    ///
    /// An image ahead of the records is one this replica never kept for
    /// them: a build or install of an earlier replica of the group on this
    /// node that finished after the replica was discarded (openraft does
    /// not wait for a build at shutdown). A build flushes its records
    /// before keeping its image and an install before keeping its own, so
    /// a kept image is never ahead of durable records otherwise. It is
    /// deleted.
    pub async fn repair_interrupted_install(
        &mut self,
        last_log_index: Option<u64>,
        last_purged_index: Option<u64>,
    ) -> Result<bool, StorageError> {
        let (applied, _) = self.applied()?;
        let kept = self.stored_snapshot()?.and_then(|s| s.meta.last_log_id);
        if kept.is_some() && kept > applied {
            tracing::warn!(
                applied = applied.map(|a| a.index),
                kept = kept.map(|k| k.index),
                "the kept snapshot image is ahead of the records; it belongs to an earlier replica and is deleted"
            );
            self.image.remove().map_err(write_err)?;
            return Ok(false);
        }
        let Some(applied) = applied else { return Ok(false) };
        if kept >= Some(applied) {
            return Ok(false);
        }
        let log_behind = last_log_index.is_none_or(|last| last < applied.index);
        let purged_past_image = last_purged_index.is_some_and(|purged| kept.is_none_or(|k| k.index < purged));
        if !log_behind && !purged_past_image {
            return Ok(false);
        }
        tracing::warn!(
            applied = applied.index,
            kept = kept.map(|k| k.index),
            "a snapshot install was interrupted; keeping an image of the records"
        );
        self.build_snapshot().await?;
        Ok(true)
    }

    /// A state machine on the same store, to build snapshots beside the
    /// applies.
    fn builder(&self) -> Self {
        ShardStateMachine {
            store: self.store.clone(),
            rules: self.rules.clone(),
            image: self.image.clone(),
            snapshots_built: self.snapshots_built,
            pace: self.pace.clone(),
        }
    }

    /// The first half of a snapshot build: the records written into a
    /// partial image labelled with their log position, and made durable.
    /// Entries go on being applied meanwhile: the records are read frozen
    /// ([`GraphStore::frozen`]).
    pub(super) fn write_image(&mut self) -> Result<(SnapshotMeta<u64, BasicNode>, PartialImage), StorageError> {
        let built = self.snapshots_built + 1;
        // The image must not contain the previous image (older builds kept
        // it among the records). The previous one stays the current
        // snapshot until the new one replaces it: a lagging follower may be
        // sent it meanwhile.
        let records = self.store.frozen(&[SNAPSHOT]).map_err(read_err)?;
        crate::crash::wait_point("raft::snapshot-view");
        // The image and the log position it is labelled with must match: a
        // follower installing it applies the entries after that position,
        // and would apply twice any the image already holds. Both are read
        // from the frozen records. The position is a change set's, never
        // half of one; half an entry (a restore splits its entry) is
        // labelled with the entry before and carries the marker of the
        // commands applied (`APPLIED_COMMAND`), as on the replica itself.
        let position = Position::read_from(|key| records.meta(key)).map_err(read_err)?;
        let (last_log_id, last_membership) = (position.applied().map_err(read_err)?, position.membership().map_err(read_err)?);
        let snapshot_id = match &last_log_id {
            Some(l) => format!("{}-{}-{built}", l.leader_id, l.index),
            None => format!("empty-{built}"),
        };
        let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
        let mut partial = self.image.partial().map_err(write_err)?;
        write_image(&*records, &meta, &mut partial).map_err(write_err)?;
        drop(records);
        // Durable before the image is kept: the log this snapshot lets
        // openraft purge must not be needed to rebuild the records it holds
        // (the flush waits until the writes held back while the records
        // were read are in the tree, then syncs).
        self.store.flush().map_err(write_err)?;
        self.snapshots_built = built;
        Ok((meta, partial))
    }

    /// The second half: keeps the image as the current snapshot, unless an
    /// install kept a newer one meanwhile; the current snapshot either way.
    pub(super) fn keep_image(
        &mut self,
        meta: SnapshotMeta<u64, BasicNode>,
        partial: PartialImage,
    ) -> Result<Snapshot<ShardRaft>, StorageError> {
        keep_unless_newer(&self.image, meta.last_log_id, partial).map_err(write_err)?;
        if self.store.meta(SNAPSHOT).map_err(read_err)?.is_some() {
            let mut cs = ChangeSet::default();
            cs.push(Change::DeleteMeta(SNAPSHOT.into()));
            self.store.apply(&cs).map_err(write_err)?;
            self.store.flush().map_err(write_err)?;
        }
        self.stored_snapshot()?.ok_or_else(|| read_err(crate::storage::StoreError::Io("the snapshot image just kept is gone".into())))
    }
}

impl<S: GraphStore> RaftSnapshotBuilder<ShardRaft> for ShardStateMachine<S> {
    async fn build_snapshot(&mut self) -> Result<Snapshot<ShardRaft>, StorageError> {
        // A build reads the whole shard and writes it to a file: seconds for
        // a large shard, while entries go on being applied. It runs on a
        // thread of tokio's blocking pool, not on a runtime worker, where
        // the Raft heartbeats and the requests of every group run.
        let mut builder = self.builder();
        let started = std::time::Instant::now();
        let (built, result) = tokio::task::spawn_blocking(move || {
            let result = builder.write_image().and_then(|(meta, partial)| builder.keep_image(meta, partial));
            if result.is_ok() {
                builder.pace.built(started);
            }
            (builder.snapshots_built, result)
        })
        .await
        .map_err(|e| write_err(crate::storage::StoreError::Io(format!("the snapshot build stopped: {e}"))))?;
        self.snapshots_built = built;
        result
    }
}
