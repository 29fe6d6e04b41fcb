//! The storage conformance suite: one set of checks that every
//! [`GraphStore`] implementation must pass. Each implementation's tests call
//! [`run_all`] with a constructor of fresh, empty stores.

use super::GraphStore;
use idgraph_core::model::{
    AbsorbedProfile, Change, ChangeSet, Counters, EventRecord, HubRecord, Identifier, MergeCause, MergeRecord, Profile, TraitState,
};
use std::collections::BTreeMap;

fn profile(id: &str, ids: &[(&str, &str)]) -> Profile {
    let mut traits = BTreeMap::new();
    traits.insert("plan".to_string(), TraitState { value: serde_json::json!({"tier": "gold", "seats": 3}), ts: 5, event_id: "e1".into() });
    Profile {
        id: id.into(),
        identifiers: ids.iter().map(|(k, v)| Identifier::new(*k, *v)).collect(),
        traits,
        merged_from: vec!["p_old".into()],
        lineage: vec!["m_1".into()],
        created_ms: 1,
        updated_ms: 2,
        rule_version: "v1".into(),
    }
}

/// A change set of one change.
pub fn one(c: Change) -> ChangeSet {
    ChangeSet { changes: vec![c], counters: Counters::default() }
}

/// Every record kind written comes back equal; deletes remove it.
pub fn records_round_trip<S: GraphStore>(s: &S) {
    let id = Identifier::new("email", "a@b.co");
    let p = profile("p_1", &[("email", "a@b.co"), ("user_id", "u\u{0}weird")]);
    let m = MergeRecord {
        id: "m_1".into(),
        survivor: "p_1".into(),
        absorbed: vec![AbsorbedProfile { profile: profile("p_2", &[("phone", "15550100000")]) }],
        added: vec![id.clone()],
        cause: MergeCause::Event { event_id: "e1".into(), source: "web".into() },
        rule_version: "v1".into(),
        at_ms: 9,
        forced: false,
        undone_at_ms: None,
    };
    let hub = HubRecord { colliding_profiles: vec!["p_1".into()], limit_type: "user_id".into(), listed_at_ms: Some(4), reason: "r".into() };
    let ev = EventRecord { profile_id: "p_1".into(), applied_ms: 3, slot: Some(7) };
    let cs = ChangeSet {
        changes: vec![
            Change::PutOwner(id.clone(), "p_1".into()),
            Change::PutProfile(p.clone()),
            Change::PutAlias("p_2".into(), "p_1".into()),
            Change::PutEvent("e1".into(), ev.clone()),
            Change::PutMerge(m.clone()),
            Change::PutHub(id.clone(), hub.clone()),
        ],
        counters: Counters { profiles: 1, identifiers: 2, ..Default::default() },
    };
    s.apply(&cs).unwrap();
    assert_eq!(s.owner(&id).unwrap().as_deref(), Some("p_1"));
    assert_eq!(s.profile("p_1").unwrap(), Some(p.clone()));
    assert_eq!(s.alias("p_2").unwrap().as_deref(), Some("p_1"));
    assert_eq!(s.event("e1").unwrap(), Some(ev));
    assert_eq!(s.merge_record("m_1").unwrap(), Some(m.clone()));
    assert_eq!(s.all_merges().unwrap(), vec![m]);
    assert_eq!(s.hub(&id).unwrap(), Some(hub.clone()));
    assert_eq!(s.listed_hubs(10).unwrap(), vec![(id.clone(), hub)]);
    assert_eq!(s.all_profiles().unwrap(), vec![p]);
    assert_eq!(s.counters().unwrap().identifiers, 2);

    let cs = ChangeSet {
        changes: vec![
            Change::DeleteOwner(id.clone()),
            Change::DeleteProfile("p_1".into()),
            Change::DeleteAlias("p_2".into()),
            Change::DeleteMerge("m_1".into()),
            Change::DeleteHub(id.clone()),
        ],
        counters: Counters { profiles: -1, identifiers: -2, ..Default::default() },
    };
    s.apply(&cs).unwrap();
    assert_eq!(s.owner(&id).unwrap(), None);
    assert_eq!(s.profile("p_1").unwrap(), None);
    assert_eq!(s.alias("p_2").unwrap(), None);
    assert_eq!(s.merge_record("m_1").unwrap(), None);
    assert_eq!(s.hub(&id).unwrap(), None);
    assert!(s.listed_hubs(10).unwrap().is_empty());
    assert_eq!(s.counters().unwrap(), Counters::default());
}

/// Within one change set, the last write to a key wins.
pub fn last_write_in_a_change_set_wins<S: GraphStore>(s: &S) {
    let id = Identifier::new("user_id", "u1");
    let cs = ChangeSet {
        changes: vec![
            Change::PutOwner(id.clone(), "p_a".into()),
            Change::DeleteOwner(id.clone()),
            Change::PutOwner(id.clone(), "p_b".into()),
        ],
        counters: Counters::default(),
    };
    s.apply(&cs).unwrap();
    assert_eq!(s.owner(&id).unwrap().as_deref(), Some("p_b"));
}

/// Keys of different tables and identifier types never collide.
pub fn tables_are_separate<S: GraphStore>(s: &S) {
    s.apply(&one(Change::PutOwner(Identifier::new("email", "x"), "p_email".into()))).unwrap();
    s.apply(&one(Change::PutOwner(Identifier::new("emai", "lx"), "p_other".into()))).unwrap();
    s.apply(&one(Change::PutAlias("x".into(), "p_alias".into()))).unwrap();
    assert_eq!(s.owner(&Identifier::new("email", "x")).unwrap().as_deref(), Some("p_email"));
    assert_eq!(s.owner(&Identifier::new("emai", "lx")).unwrap().as_deref(), Some("p_other"));
    assert_eq!(s.profile("x").unwrap(), None);
    assert_eq!(s.alias("x").unwrap().as_deref(), Some("p_alias"));
}

/// Counters add up over change sets; hubs not yet listed are not listed.
pub fn counters_accumulate_and_unlisted_hubs_hide<S: GraphStore>(s: &S) {
    for _ in 0..3 {
        s.apply(&ChangeSet { changes: vec![], counters: Counters { events: 2, merges: 1, ..Default::default() } }).unwrap();
    }
    let c = s.counters().unwrap();
    assert_eq!((c.events, c.merges), (6, 3));
    s.apply(&one(Change::PutHub(Identifier::new("device_id", "d"), HubRecord::default()))).unwrap();
    assert!(s.listed_hubs(10).unwrap().is_empty());
    assert!(s.hub(&Identifier::new("device_id", "d")).unwrap().is_some());
    s.flush().unwrap();
}

/// A snapshot restored into another store of the same kind reproduces every
/// table, meta values included, and replaces what that store held.
pub fn snapshot_restores_everything<S: GraphStore>(a: &S, b: &S) {
    let id = Identifier::new("email", "snap@shop.co");
    a.apply(&ChangeSet {
        changes: vec![
            Change::PutOwner(id.clone(), "p_1".into()),
            Change::PutProfile(profile("p_1", &[("email", "snap@shop.co")])),
            Change::PutHub(id.clone(), HubRecord { colliding_profiles: vec!["p_0".into()], ..Default::default() }),
            Change::PutMeta("applied".into(), vec![1, 2, 3]),
        ],
        counters: Counters { profiles: 1, identifiers: 1, ..Default::default() },
    })
    .unwrap();
    b.apply(&one(Change::PutOwner(Identifier::new("user_id", "stale"), "p_old".into()))).unwrap();
    a.apply(&one(Change::PutMeta("private".into(), vec![9]))).unwrap();
    b.restore(&a.snapshot(&["private"]).unwrap()).unwrap();
    assert_eq!(b.meta("private").unwrap(), None, "excluded meta values stay out");
    assert_eq!(b.owner(&id).unwrap().as_deref(), Some("p_1"));
    assert_eq!(b.hub(&id).unwrap(), a.hub(&id).unwrap());
    assert!(b.hub(&id).unwrap().is_some());
    assert_eq!(b.owner(&Identifier::new("user_id", "stale")).unwrap(), None, "restore replaces");
    assert_eq!(b.all_profiles().unwrap(), a.all_profiles().unwrap());
    assert_eq!(b.meta("applied").unwrap(), Some(vec![1, 2, 3]));
    assert_eq!(b.counters().unwrap(), a.counters().unwrap());
}

/// A restore with meta values replaces the records and writes the values;
/// a store holds records once anything but meta values and counters is in
/// it.
pub fn restore_with_meta_replaces_and_writes<S: GraphStore>(a: &S, b: &S) {
    assert!(!b.holds_records().unwrap(), "a fresh store holds no record");
    b.apply(&ChangeSet {
        changes: vec![Change::PutMeta("raft.membership".into(), vec![5])],
        counters: Counters { events: 0, ..Default::default() },
    })
    .unwrap();
    assert!(!b.holds_records().unwrap(), "meta values are not records");
    let id = Identifier::new("email", "restore@shop.co");
    a.apply(&ChangeSet {
        changes: vec![Change::PutOwner(id.clone(), "p_9".into()), Change::PutProfile(profile("p_9", &[("email", "restore@shop.co")]))],
        counters: Counters { profiles: 1, identifiers: 1, ..Default::default() },
    })
    .unwrap();
    assert!(a.holds_records().unwrap());
    b.restore_with_meta(&a.snapshot(&[]).unwrap(), &[("raft.membership".into(), vec![5]), ("raft.applied".into(), vec![7])]).unwrap();
    assert_eq!(b.owner(&id).unwrap().as_deref(), Some("p_9"));
    assert_eq!(b.meta("raft.membership").unwrap(), Some(vec![5]));
    assert_eq!(b.meta("raft.applied").unwrap(), Some(vec![7]));
    assert_eq!(b.counters().unwrap(), a.counters().unwrap());
    assert!(b.holds_records().unwrap());
}

/// Meta values are found by key prefix, in key order, and deleted.
pub fn meta_prefix_scans_and_deletes<S: GraphStore>(s: &S) {
    for k in ["txn.lock/b", "txn.lock/a", "txn.lockz", "txn.prepared/a", "raft.applied"] {
        s.apply(&one(Change::PutMeta(k.into(), k.as_bytes().to_vec()))).unwrap();
    }
    let keys = |p: &str| s.meta_prefix(p).unwrap().into_iter().map(|(k, _)| k).collect::<Vec<_>>();
    assert_eq!(keys("txn.lock/"), ["txn.lock/a", "txn.lock/b"]);
    assert_eq!(s.meta_prefix("txn.prepared/").unwrap(), vec![("txn.prepared/a".to_string(), b"txn.prepared/a".to_vec())]);
    assert!(keys("nothing").is_empty());
    s.apply(&one(Change::DeleteMeta("txn.lock/a".into()))).unwrap();
    assert_eq!(keys("txn.lock/"), ["txn.lock/b"]);
    assert_eq!(s.meta("txn.lock/a").unwrap(), None);
}

/// A frozen image keeps the records of the moment it was taken while later
/// applies go on and are read at once; what it writes into a file, from
/// wherever the file stands, restores exactly those records; once it is
/// dropped, the later applies are all there.
pub fn a_frozen_image_stays_as_it_was_while_applies_go_on<S: GraphStore>(a: &S, b: &S) {
    let (kept, gone, added) =
        (Identifier::new("email", "x@y.zz"), Identifier::new("email", "gone@y.zz"), Identifier::new("email", "new@y.zz"));
    a.apply(&one(Change::PutOwner(kept.clone(), "p_1".into()))).unwrap();
    a.apply(&one(Change::PutOwner(gone.clone(), "p_1".into()))).unwrap();
    a.apply(&one(Change::PutMeta("raft.applied".into(), vec![0xff, 7]))).unwrap();
    a.apply(&one(Change::PutMeta("raft.membership".into(), vec![1]))).unwrap();
    let before = a.snapshot(&["raft.applied"]).unwrap();
    let frozen = a.frozen(&["raft.applied"]).unwrap();
    // More applies than the sled store lets wait for its writer otherwise.
    for i in 0..20u8 {
        let mut cs = one(Change::PutOwner(added.clone(), format!("p_{i}")));
        cs.push(Change::DeleteOwner(gone.clone()));
        cs.push(Change::PutMeta("raft.applied".into(), vec![i]));
        a.apply(&cs).unwrap();
    }
    assert_eq!(a.owner(&added).unwrap().as_deref(), Some("p_19"), "reads see the applies at once");
    assert_eq!(a.owner(&gone).unwrap(), None);
    assert_eq!(a.meta("raft.applied").unwrap(), Some(vec![19]));
    assert_eq!(frozen.meta("raft.applied").unwrap(), Some(vec![0xff, 7]), "the frozen position is the one of its records");
    assert_eq!(frozen.meta("raft.membership").unwrap(), Some(vec![1]));
    b.apply(&one(Change::PutOwner(Identifier::new("email", "other@y.zz"), "p_2".into()))).unwrap();
    let mut file = std::io::Cursor::new(b"header".to_vec());
    file.set_position(6);
    frozen.write_to(&mut file).unwrap();
    assert_eq!(&file.get_ref()[..6], b"header", "what came before is left alone");
    drop(frozen);
    b.restore(&file.get_ref()[6..]).unwrap();
    assert_eq!(b.snapshot(&[]).unwrap(), before, "the image holds the records as they were frozen, and only those");
    assert_eq!(b.owner(&gone).unwrap().as_deref(), Some("p_1"));
    assert_eq!(b.owner(&added).unwrap(), None);
    assert_eq!(b.meta("raft.applied").unwrap(), None, "the meta value left out stays out");
    a.flush().unwrap();
    assert_eq!(a.owner(&added).unwrap().as_deref(), Some("p_19"), "after the image is dropped");
    assert_eq!(a.owner(&gone).unwrap(), None);
    assert_eq!(a.owner(&kept).unwrap().as_deref(), Some("p_1"));
    let after = a.frozen(&[]).unwrap();
    assert_eq!(after.meta("raft.applied").unwrap(), Some(vec![19]), "a new image starts from every apply");
}

/// Event dedup records list in id order, page by page, with no other kind
/// of record among them; a deleted one is gone from reads and listings.
pub fn event_records_list_in_pages_and_are_forgotten<S: GraphStore>(s: &S) {
    let ev = |at: i64| EventRecord { profile_id: "p_1".into(), applied_ms: at, slot: Some(1) };
    // Written over several change sets, with neighbours of other kinds.
    for chunk in (0..25).collect::<Vec<i64>>().chunks(7) {
        let mut cs = ChangeSet::default();
        for i in chunk {
            cs.push(Change::PutEvent(format!("e{i:02}"), ev(*i)));
        }
        s.apply(&cs).unwrap();
    }
    s.apply(&ChangeSet {
        changes: vec![
            Change::PutOwner(Identifier::new("email", "e07"), "p_1".into()),
            Change::PutAlias("e07".into(), "p_1".into()),
            Change::PutMeta("e07".into(), b"x".to_vec()),
        ],
        counters: Counters::default(),
    })
    .unwrap();
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.events_after(after.as_deref(), 10).unwrap();
        assert!(page.len() <= 10);
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        listed.extend(page);
    }
    let want: Vec<(String, EventRecord)> = (0..25).map(|i| (format!("e{i:02}"), ev(i))).collect();
    assert_eq!(listed, want);

    // Forgotten in one change set beside a new one.
    s.apply(&ChangeSet {
        changes: vec![Change::DeleteEvent("e03".into()), Change::DeleteEvent("e10".into()), Change::PutEvent("e99".into(), ev(99))],
        counters: Counters::default(),
    })
    .unwrap();
    assert_eq!(s.event("e03").unwrap(), None);
    assert_eq!(s.event("e04").unwrap(), Some(ev(4)));
    let ids: Vec<String> = s.events_after(Some("e02"), 3).unwrap().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, ["e04", "e05", "e06"]);
    let all = s.events_after(None, usize::MAX).unwrap();
    assert_eq!(all.len(), 24);
    assert!(all.iter().all(|(id, _)| id != "e03" && id != "e10"));
    assert_eq!(all.last().map(|(id, _)| id.as_str()), Some("e99"));
}

/// Runs the whole suite, each check on a fresh store.
pub fn run_all<S: GraphStore>(mut fresh: impl FnMut() -> S) {
    records_round_trip(&fresh());
    last_write_in_a_change_set_wins(&fresh());
    tables_are_separate(&fresh());
    counters_accumulate_and_unlisted_hubs_hide(&fresh());
    snapshot_restores_everything(&fresh(), &fresh());
    meta_prefix_scans_and_deletes(&fresh());
    a_frozen_image_stays_as_it_was_while_applies_go_on(&fresh(), &fresh());
    restore_with_meta_replaces_and_writes(&fresh(), &fresh());
    event_records_list_in_pages_and_are_forgotten(&fresh());
}

/// The Raft log conformance checks: append, range, last, truncate, purge,
/// metadata.
pub fn raft_log_conforms<L: super::RaftLog>(log: &L) {
    assert_eq!(log.last().unwrap(), None);
    let entries: Vec<(u64, Vec<u8>)> = (1..=10).map(|i| (i, vec![i as u8; 3])).collect();
    log.append(&entries).unwrap();
    log.sync().unwrap();
    assert_eq!(log.range(3, 6).unwrap(), entries[2..5].to_vec());
    assert_eq!(log.range(6, 3).unwrap(), vec![]);
    assert_eq!(log.last().unwrap(), Some((10, vec![10; 3])));
    log.truncate_from(8).unwrap();
    assert_eq!(log.last().unwrap().map(|e| e.0), Some(7));
    log.append(&[(8, vec![80])]).unwrap();
    assert_eq!(log.range(8, 9).unwrap(), vec![(8, vec![80])]);
    log.purge_upto(4).unwrap();
    assert_eq!(log.range(0, 100).unwrap().first().map(|e| e.0), Some(5));
    log.purge_upto(8).unwrap();
    assert_eq!(log.last().unwrap(), None);
    assert_eq!(log.get_meta("vote").unwrap(), None);
    log.put_meta("vote", b"v1").unwrap();
    log.put_meta("vote", b"v2").unwrap();
    log.stage_meta("committed", b"c1").unwrap();
    assert_eq!(log.get_meta("committed").unwrap().as_deref(), Some(&b"c1"[..]), "a staged value reads back at once");
    assert_eq!(log.get_meta("vote").unwrap().as_deref(), Some(&b"v2"[..]));
    // Far indexes sort numerically, not as text.
    log.append(&[(255, vec![1]), (256, vec![2]), (65_536, vec![3])]).unwrap();
    assert_eq!(log.range(200, 70_000).unwrap().iter().map(|e| e.0).collect::<Vec<_>>(), vec![255, 256, 65_536]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{GraphRead, MemStore, SledDb};
    use idgraph_core::model::{GroupId, ShardId};

    #[test]
    fn mem_store_conforms() {
        run_all(MemStore::new);
    }

    #[test]
    fn sled_store_conforms() {
        let dirs: std::cell::RefCell<Vec<tempfile::TempDir>> = Default::default();
        run_all(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = SledDb::open(dir.path(), 1).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
            dirs.borrow_mut().push(dir);
            store
        });
    }

    #[test]
    fn compressed_sled_store_conforms() {
        let dirs: std::cell::RefCell<Vec<tempfile::TempDir>> = Default::default();
        let options = crate::storage::StoreOptions { compression: true, ..Default::default() };
        run_all(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = SledDb::open_with(dir.path(), 1, &options).unwrap().shard(GroupId::Shard(ShardId(0))).unwrap();
            dirs.borrow_mut().push(dir);
            store
        });
    }

    #[test]
    fn a_data_directory_keeps_the_compression_it_was_created_with() {
        use crate::storage::StoreOptions;
        for created in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let id = Identifier::new("email", "k@l.mn");
            {
                let db = SledDb::open_with(dir.path(), 1, &StoreOptions { compression: created, ..Default::default() }).unwrap();
                let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
                s.apply(&one(Change::PutOwner(id.clone(), "p_9".into()))).unwrap();
                s.flush().unwrap();
            }
            // sled refuses a database opened with the other setting; the
            // store adopts the stored one instead.
            let db = SledDb::open_with(dir.path(), 1, &StoreOptions { compression: !created, ..Default::default() })
                .unwrap_or_else(|e| panic!("created with compression {created}, reopened with {}: {e}", !created));
            let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
            assert_eq!(s.owner(&id).unwrap().as_deref(), Some("p_9"));
            let conf = String::from_utf8_lossy(&std::fs::read(dir.path().join("db").join("conf")).unwrap()).into_owned();
            assert!(conf.contains(&format!("use_compression: {created}")), "{conf}");
        }
    }

    #[test]
    fn raft_logs_conform() {
        raft_log_conforms(&crate::storage::MemRaftLog::default());
        let dir = tempfile::tempdir().unwrap();
        raft_log_conforms(&SledDb::open(dir.path(), 1).unwrap().raft_log(GroupId::Shard(ShardId(0))).unwrap());
    }

    #[test]
    fn sled_store_keeps_flushed_changes_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = SledDb::open(dir.path(), 1).unwrap();
            let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
            s.apply(&one(Change::PutOwner(Identifier::new("email", "k@l.mn"), "p_9".into()))).unwrap();
            s.flush().unwrap();
        }
        let db = SledDb::open(dir.path(), 1).unwrap();
        let s = db.shard(GroupId::Shard(ShardId(0))).unwrap();
        assert_eq!(s.owner(&Identifier::new("email", "k@l.mn")).unwrap().as_deref(), Some("p_9"));
        drop(s);
        drop(db);
        let err = SledDb::open(dir.path(), 4).err().expect("a different shard count is refused");
        assert!(err.to_string().contains("shards"), "{err}");
    }
}
