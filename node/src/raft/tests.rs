//! openraft's storage conformance suite against the shard's Raft storage,
//! on sled and in memory.

use super::{ShardLogStore, ShardRaft, ShardStateMachine, StorageError};
use crate::model::ShardId;
use crate::rules::RuleSet;
use crate::storage::{MemRaftLog, MemStore, SledDb, SledRaftLog, SledStore};
use openraft::testing::{StoreBuilder, Suite};
use std::sync::Arc;

struct SledBuilder;

impl StoreBuilder<ShardRaft, ShardLogStore<SledRaftLog>, ShardStateMachine<SledStore>, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, ShardLogStore<SledRaftLog>, ShardStateMachine<SledStore>), StorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = SledDb::open(dir.path(), 1).expect("open sled");
        let log = ShardLogStore::new(Arc::new(db.raft_log(ShardId(0)).expect("raft log")));
        let sm = ShardStateMachine::new(Arc::new(db.shard(ShardId(0)).expect("shard")), Arc::new(RuleSet::builtin()));
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<ShardRaft, ShardLogStore<MemRaftLog>, ShardStateMachine<MemStore>> for MemBuilder {
    async fn build(&self) -> Result<((), ShardLogStore<MemRaftLog>, ShardStateMachine<MemStore>), StorageError> {
        Ok((
            (),
            ShardLogStore::new(Arc::new(MemRaftLog::default())),
            ShardStateMachine::new(Arc::new(MemStore::new()), Arc::new(RuleSet::builtin())),
        ))
    }
}

#[test]
fn openraft_suite_passes_on_sled() {
    Suite::test_all(SledBuilder).unwrap();
}

#[test]
fn openraft_suite_passes_in_memory() {
    Suite::test_all(MemBuilder).unwrap();
}

/// Snapshots do not nest: the second one is no bigger than the first plus
/// what was applied in between.
#[test]
fn snapshots_do_not_contain_earlier_snapshots() {
    use crate::engine::{Command, CommandKind, IdentifyEvent, RawIdentifier};
    use openraft::storage::RaftStateMachine;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder};
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    rt.block_on(async {
        let mut sm = ShardStateMachine::new(Arc::new(MemStore::new()), Arc::new(RuleSet::builtin()));
        let entry = |i: u64| Entry::<ShardRaft> {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), i),
            payload: EntryPayload::Normal(super::Proposal {
                commands: vec![Command {
                    at_ms: 1000 + i as i64,
                    op_id: format!("op{i}"),
                    kind: CommandKind::Identify(IdentifyEvent {
                        event_id: format!("e{i}"),
                        timestamp_ms: 0,
                        identifiers: vec![RawIdentifier::new("email", format!("p{i}@shop.com"))],
                        traits: Default::default(),
                        source: String::new(),
                    }),
                }],
            }),
        };
        sm.apply((1..=50).map(entry)).await.unwrap();
        let first = sm.get_snapshot_builder().await.build_snapshot().await.unwrap().snapshot.into_inner().len();
        let second = sm.get_snapshot_builder().await.build_snapshot().await.unwrap().snapshot.into_inner().len();
        assert!(second <= first + 64, "first {first} bytes, second {second}");
        let current = sm.get_current_snapshot().await.unwrap().expect("a current snapshot");
        assert_eq!(current.meta.last_log_id.map(|l| l.index), Some(50));
    });
}
