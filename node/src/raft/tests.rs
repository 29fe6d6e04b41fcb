//! openraft's storage conformance suite against the shard's Raft storage,
//! on sled and in memory.

use super::{LogFlusher, ShardLogStore, ShardRaft, ShardStateMachine, StorageError};
use crate::storage::{GroupLog, ImageFile, MemRaftLog, MemStore, NodeLog, SledDb, SledRaftLog, SledStore};
use idgraph_core::model::{GroupId, ShardId};
use idgraph_core::rules::RuleSet;
use openraft::testing::{StoreBuilder, Suite};
use std::sync::Arc;

/// A replica's image file, in a directory of its own that lives as long
/// as the returned guard.
fn image() -> (tempfile::TempDir, ImageFile) {
    let dir = tempfile::tempdir().expect("temp dir");
    let images = ImageFile::open_dir(dir.path()).expect("image directory");
    (dir, ImageFile::of(&images, GroupId::Shard(ShardId(0))))
}

/// Group 0's image file in a data directory.
fn image_in(data_dir: &std::path::Path) -> ImageFile {
    ImageFile::of(&ImageFile::open_dir(data_dir).expect("image directory"), GroupId::Shard(ShardId(0)))
}

struct SledBuilder;

impl StoreBuilder<ShardRaft, ShardLogStore<SledRaftLog>, ShardStateMachine<SledStore>, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore<SledRaftLog>, ShardStateMachine<SledStore>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = SledDb::open(dir.path(), 1).expect("open sled");
        let log = Arc::new(db.raft_log(GroupId::Shard(ShardId(0))).expect("raft log"));
        let log = ShardLogStore::new(log.clone(), LogFlusher::for_log(log));
        let sm = ShardStateMachine::new(
            Arc::new(db.shard(GroupId::Shard(ShardId(0))).expect("shard")),
            Arc::new(RuleSet::builtin()),
            image_in(dir.path()),
        );
        Ok((dir, log, sm))
    }
}

/// The node's own storage: groups in the node's log, graphs in sled.
struct NodeLogBuilder;

impl StoreBuilder<ShardRaft, ShardLogStore<GroupLog>, ShardStateMachine<SledStore>, tempfile::TempDir> for NodeLogBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore<GroupLog>, ShardStateMachine<SledStore>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = SledDb::open(&dir.path().join("db"), 1).expect("open sled");
        let log = NodeLog::open(&dir.path().join("log")).expect("open the node log");
        let group = Arc::new(log.open_group(GroupId::Shard(ShardId(0)), &db).expect("group log"));
        let log = ShardLogStore::new(group, LogFlusher::node_log(log));
        let sm = ShardStateMachine::new(
            Arc::new(db.shard(GroupId::Shard(ShardId(0))).expect("shard")),
            Arc::new(RuleSet::builtin()),
            image_in(dir.path()),
        );
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<ShardRaft, ShardLogStore<MemRaftLog>, ShardStateMachine<MemStore>, tempfile::TempDir> for MemBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore<MemRaftLog>, ShardStateMachine<MemStore>), StorageError> {
        let (dir, image) = image();
        Ok((
            dir,
            {
                let log = Arc::new(MemRaftLog::default());
                ShardLogStore::new(log.clone(), LogFlusher::for_log(log))
            },
            ShardStateMachine::new(Arc::new(MemStore::new()), Arc::new(RuleSet::builtin()), image),
        ))
    }
}

/// An identity event for `p{i}@shop.com`, as a stamped command.
fn identify(i: usize) -> idgraph_core::engine::Command {
    use idgraph_core::engine::{Command, CommandKind, IdentifyEvent, RawIdentifier};
    Command {
        at_ms: 1000,
        op_id: format!("op{i}"),
        kind: CommandKind::Identify(IdentifyEvent {
            event_id: format!("e{i}"),
            timestamp_ms: 0,
            identifiers: vec![RawIdentifier::new("email", format!("p{i}@shop.com"))],
            traits: Default::default(),
            source: String::new(),
        }),
    }
}

/// Log entry `i`: one new event, `identify(i)`, in term 1.
fn entry(i: u64) -> openraft::Entry<ShardRaft> {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};
    openraft::Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 0), i),
        payload: EntryPayload::Normal(super::Proposal { commands: vec![super::ShardCommand::Engine(identify(i as usize))] }),
    }
}

#[test]
fn openraft_suite_passes_on_sled() {
    Suite::test_all(SledBuilder).unwrap();
}

#[test]
fn openraft_suite_passes_on_the_node_log() {
    Suite::test_all(NodeLogBuilder).unwrap();
}

#[test]
fn openraft_suite_passes_in_memory() {
    Suite::test_all(MemBuilder).unwrap();
}

/// Snapshots do not nest: the second one is no bigger than the first plus
/// what was applied in between.
#[test]
fn snapshots_do_not_contain_earlier_snapshots() {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let (_dir, image) = image();
        let mut sm = ShardStateMachine::new(Arc::new(MemStore::new()), Arc::new(RuleSet::builtin()), image.clone());
        sm.apply((1..=50).map(entry)).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let first = image.bytes();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        let second = image.bytes();
        assert!(first > 0);
        assert!(second <= first + 64, "first {first} bytes, second {second}");
        let current = sm.get_current_snapshot().await.unwrap().expect("a current snapshot");
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(50));
    });
}

/// A crash after some commands of an entry were applied (their progress
/// recorded) must not apply them again when the entry is replayed.
#[test]
fn replaying_a_partly_applied_entry_skips_the_commands_already_applied() {
    use crate::storage::{GraphRead, GraphStore};
    use idgraph_core::engine::execute;
    use idgraph_core::model::Change;
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let rules = Arc::new(RuleSet::builtin());
        let store = Arc::new(MemStore::new());
        let (_dir, image) = image();
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image);
        let cmd = identify;
        let log_id = LogId::new(CommittedLeaderId::new(1, 0), 7);
        // What the state machine had written for command 0 before a crash.
        let (mut cs, _) = execute(&*store, &rules, &cmd(0)).unwrap();
        cs.push(Change::PutMeta("raft.applied_command".into(), rmp_serde::to_vec_named(&(log_id, 0usize)).unwrap()));
        store.apply(&cs).unwrap();
        let entry = Entry::<ShardRaft> {
            log_id,
            payload: EntryPayload::Normal(super::Proposal { commands: (0..3).map(|i| super::ShardCommand::Engine(cmd(i))).collect() }),
        };
        let answers = sm.apply([entry]).await.unwrap();
        assert_eq!(answers[0].len(), 3);
        let c = store.counters().unwrap();
        assert_eq!((c.events, c.duplicates, c.profiles), (3, 0, 3), "command 0 applied once, not twice");
    });
}

/// openraft builds snapshots in a task of its own while entries go on being
/// applied. A snapshot must hold exactly the entries up to the position it
/// is labelled with: a follower installing it applies the later ones, and
/// would apply twice any the image already held. Every entry here is one
/// new event, so a replica restored from a snapshot that then applies the
/// next entry, as a follower does, must count as many events as that
/// entry's index.
#[test]
fn a_snapshot_built_while_entries_are_applied_matches_its_log_position() {
    use crate::storage::GraphRead;
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let db = SledDb::open(dir.path(), 2).unwrap();
        let rules = Arc::new(RuleSet::builtin());
        let images = ImageFile::open_dir(dir.path()).unwrap();
        let mut sm = ShardStateMachine::new(
            Arc::new(db.shard(GroupId::Shard(ShardId(0))).unwrap()),
            rules.clone(),
            ImageFile::of(&images, GroupId::Shard(ShardId(0))),
        );
        let mut builder = sm.get_snapshot_builder().await;
        let applier = tokio::spawn(async move {
            for i in 1..=400u64 {
                sm.apply([entry(i)]).await.unwrap();
            }
        });
        let mut checked = 0;
        while !applier.is_finished() {
            let snap = builder.build_snapshot().await.unwrap();
            let follower_store = Arc::new(db.shard(GroupId::Shard(ShardId(1))).unwrap());
            let mut follower =
                ShardStateMachine::new(follower_store.clone(), rules.clone(), ImageFile::of(&images, GroupId::Shard(ShardId(1))));
            follower.install_snapshot(&snap.meta, snap.snapshot).await.unwrap();
            let next = snap.meta.last_log_id.map_or(0, |l| l.index) + 1;
            follower.apply([entry(next)]).await.unwrap();
            assert_eq!(follower_store.counters().unwrap().events, next as i64, "a snapshot labelled {} holds other entries", next - 1);
            checked += 1;
        }
        applier.await.unwrap();
        assert!(checked > 0);
    });
}

/// openraft builds a snapshot in a task of its own, so an install can land
/// between a build's read of the records and its keeping of the image. The
/// older image must not replace the installed one: after a restart openraft
/// takes the kept image as its snapshot, and the log it purged past the
/// installed position would no longer continue it.
#[test]
fn a_snapshot_built_before_an_install_does_not_replace_the_installed_image() {
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let rules = Arc::new(RuleSet::builtin());
        // A leader's snapshot at 9, to be installed on the replica below.
        let (_leader_dir, leader_image) = image();
        let mut leader = ShardStateMachine::new(Arc::new(MemStore::new()), rules.clone(), leader_image);
        leader.apply((1..=9).map(entry)).await.unwrap();
        let newer = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let store = Arc::new(MemStore::new());
        let (_dir, image) = image();
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image.clone());
        sm.apply((1..=4).map(entry)).await.unwrap();
        let mut builder = sm.get_snapshot_builder().await;
        let (older_meta, older_image) = builder.write_image().unwrap();
        sm.install_snapshot(&newer.meta, newer.snapshot).await.unwrap();
        let kept = builder.keep_image(older_meta, older_image).unwrap();
        assert_eq!(kept.meta.last_log_id.map(|l| l.index), Some(9), "the build answers with the image kept, the newer one");

        let at = |s: Option<openraft::storage::Snapshot<ShardRaft>>| s.and_then(|s| s.meta.last_log_id).map(|l| l.index);
        assert_eq!(at(sm.get_current_snapshot().await.unwrap()), Some(9), "the installed image stays current");
        // And so it is after a restart (a state machine that reads the kept
        // image back from the store).
        let mut reopened = ShardStateMachine::new(store, rules, image.clone());
        assert_eq!(at(reopened.get_current_snapshot().await.unwrap()), Some(9));
        let names: Vec<_> = std::fs::read_dir(image.path().parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "one image kept, the older build's partial image deleted: {names:?}");
        // A later build at a newer position still replaces it.
        reopened.apply((10..=12).map(entry)).await.unwrap();
        reopened.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(at(reopened.get_current_snapshot().await.unwrap()), Some(12));
    });
}

/// A crash inside an install, after the records were restored and before
/// the new image was kept, leaves the records ahead of the log and of the
/// kept image. openraft purges such a log up to the applied position at
/// startup and then needs a snapshot that covers it: the replica rebuilds
/// its image before openraft opens it. So it does when the log was purged
/// past the kept image; and an image ahead of the records is deleted.
#[test]
fn an_interrupted_install_is_repaired_before_openraft_opens_the_replica() {
    use crate::storage::GraphStore;
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let rules = Arc::new(RuleSet::builtin());
        let leader_store = Arc::new(MemStore::new());
        let (_leader_dir, leader_image) = image();
        let mut leader = ShardStateMachine::new(leader_store.clone(), rules.clone(), leader_image);
        leader.apply((1..=9).map(entry)).await.unwrap();
        leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let store = Arc::new(MemStore::new());
        let (_dir, image) = image();
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image.clone());
        sm.apply((1..=4).map(entry)).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        // The install's first step, then the crash.
        store.restore(&leader_store.snapshot(&[]).unwrap()).unwrap();

        let at = |s: Option<openraft::storage::Snapshot<ShardRaft>>| s.and_then(|s| s.meta.last_log_id).map(|l| l.index);
        let mut reopened = ShardStateMachine::new(store.clone(), rules.clone(), image.clone());
        // A log that reaches the applied position, purged no further than
        // the kept image, needs no repair.
        assert!(!reopened.repair_interrupted_install(Some(9), Some(3)).await.unwrap());
        assert_eq!(at(reopened.get_current_snapshot().await.unwrap()), Some(4));
        assert!(reopened.repair_interrupted_install(Some(4), None).await.unwrap());
        assert_eq!(at(reopened.get_current_snapshot().await.unwrap()), Some(9), "the kept image covers the applied position");
        assert!(!reopened.repair_interrupted_install(Some(4), None).await.unwrap(), "repaired once");

        // openraft purges the log up to an installed position while the
        // install runs: a crash after the records were made durable and
        // before the image was kept leaves a log that goes on past the
        // records but was purged past the kept image.
        let store = Arc::new(MemStore::new());
        let (_purged_dir, image) = self::image();
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image.clone());
        sm.apply((1..=4).map(entry)).await.unwrap();
        sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        store.restore(&leader_store.snapshot(&[]).unwrap()).unwrap();
        let mut reopened = ShardStateMachine::new(store.clone(), rules.clone(), image.clone());
        assert!(reopened.repair_interrupted_install(Some(12), Some(8)).await.unwrap(), "purged past the kept image");
        assert_eq!(at(reopened.get_current_snapshot().await.unwrap()), Some(9));

        // An image ahead of the records (left by an earlier replica of the
        // group on this node, whose build finished after it was discarded)
        // is deleted, not taken for the new replica's snapshot.
        let fresh = Arc::new(MemStore::new());
        let mut readded = ShardStateMachine::new(fresh.clone(), rules.clone(), image.clone());
        assert!(!readded.repair_interrupted_install(None, None).await.unwrap());
        assert_eq!(at(readded.get_current_snapshot().await.unwrap()), None, "the stale image is gone");
        assert_eq!(image.bytes(), 0);
    });
}

/// Found by CI's chaos run (crash points armed): a restarted follower whose
/// records were at 451 was offered the leader's older image at 426, the
/// install restored it over the newer records, and the next start found
/// the log purged past the records (openraft refuses that: the replica
/// never came back). The records never go back: the older image is not
/// installed, and the entries after it, handed again, are not applied twice.
#[test]
fn an_older_snapshot_is_not_installed_over_newer_records() {
    use crate::storage::GraphRead;
    use openraft::storage::RaftStateMachine;
    use openraft::RaftSnapshotBuilder;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let rules = Arc::new(RuleSet::builtin());
        let (_leader_dir, leader_image) = image();
        let mut leader = ShardStateMachine::new(Arc::new(MemStore::new()), rules.clone(), leader_image);
        leader.apply((1..=4).map(entry)).await.unwrap();
        let older = leader.get_snapshot_builder().await.build_snapshot().await.unwrap();

        let store = Arc::new(MemStore::new());
        let (_dir, image) = image();
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image);
        sm.apply((1..=9).map(entry)).await.unwrap();
        let before = store.counters().unwrap();
        sm.install_snapshot(&older.meta, older.snapshot).await.unwrap();
        let (applied, _) = sm.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(9), "the records stay at 9");
        assert_eq!(store.counters().unwrap(), before);
        // Entries 5 to 9 again: answered, not applied twice.
        let answers = sm.apply((5..=9).map(entry)).await.unwrap();
        assert_eq!(answers.len(), 5);
        assert_eq!(store.counters().unwrap(), before);
        // Entry 10 is new.
        sm.apply([entry(10)]).await.unwrap();
        assert_eq!(store.counters().unwrap().events, before.events + 1);
    });
}

/// Builds before the compact encoding wrote log entries and the vote as
/// MessagePack with field names: a node upgraded over such a log reads them
/// back. The compact form that replaced it is at least a quarter smaller.
#[test]
fn raft_records_written_with_field_names_by_older_builds_read_back() {
    use crate::storage::RaftLog;
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let log = Arc::new(MemRaftLog::default());
        let named: Vec<(u64, Vec<u8>)> = (1..=3).map(|i| (i, rmp_serde::to_vec_named(&entry(i)).unwrap())).collect();
        let compact = super::encode(&entry(1)).len();
        assert!(compact * 4 <= named[0].1.len() * 3, "compact entry {compact} bytes, named {} bytes", named[0].1.len());
        log.append(&named).unwrap();
        let vote = openraft::Vote::new_committed(3, 2);
        log.put_meta("vote", &rmp_serde::to_vec_named(&vote).unwrap()).unwrap();
        let mut store = ShardLogStore::new(log.clone(), LogFlusher::for_log(log.clone()));
        let read = store.try_get_log_entries(1..=3).await.unwrap();
        let written: Vec<String> = (1..=3).map(|i| format!("{:?}", entry(i))).collect();
        assert_eq!(read.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>(), written);
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        // What this build appends reads back the same way.
        log.append(&[(4, super::encode(&entry(4)))]).unwrap();
        assert_eq!(format!("{:?}", store.try_get_log_entries(4..=4).await.unwrap()[0]), format!("{:?}", entry(4)));
    });
}
