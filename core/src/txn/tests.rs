//! The participant steps one by one, on an in-memory shard: validation of
//! reads, locks, the primary's one decision. The coordinators that drive
//! them across shards are tested in `idgraph-node`'s `txn::tests`.

use super::participant;
use super::*;
use crate::graph::{GraphKey, GraphRead, GraphStore, MemStore, StoreError};
use crate::model::{Change, ChangeSet, Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId, ShardId};

fn step(s: &MemStore, op: TxnOp) -> TxnReply {
    let (cs, reply) = apply_op(s, &op).unwrap();
    s.apply(&cs).unwrap();
    reply
}

fn owner_write(v: &str, p: &str) -> ChangeSet {
    ChangeSet { changes: vec![Change::PutOwner(Identifier::new("email", v), p.into())], counters: Counters::default() }
}

fn read_of(s: &MemStore, key: &GraphKey) -> (GraphKey, u128) {
    (key.clone(), key.read(s).unwrap().digest())
}

fn prepare(txn: &str, reads: Vec<(GraphKey, u128)>, writes: ChangeSet) -> TxnOp {
    TxnOp::Prepare { txn: txn.into(), primary: ShardId(0), at_ms: 1_000, reads, writes }
}

fn commit(txn: &str, reads: Vec<(GraphKey, u128)>, writes: ChangeSet) -> TxnOp {
    TxnOp::Commit { txn: txn.into(), reads, writes }
}

#[test]
fn a_value_changed_since_it_was_read_refuses_the_prepare() {
    let s = MemStore::new();
    let key = GraphKey::Owner(Identifier::new("email", "a@b.co"));
    let read = read_of(&s, &key);
    assert_eq!(step(&s, TxnOp::Single { reads: vec![], writes: owner_write("a@b.co", "p_1") }), TxnReply::Applied);
    assert_eq!(step(&s, prepare("t1", vec![read], owner_write("a@b.co", "p_2"))), TxnReply::Conflict { lock: None });
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap().as_deref(), Some("p_1"));
    assert_eq!(participant::prepared_count(&s).unwrap(), 0, "a refused prepare keeps nothing");
}

#[test]
fn a_prepared_lock_refuses_other_writers_until_the_part_is_applied() {
    let s = MemStore::new();
    let key = GraphKey::Owner(Identifier::new("email", "a@b.co"));
    let read = read_of(&s, &key);
    assert_eq!(step(&s, prepare("t1", vec![read.clone()], owner_write("a@b.co", "p_1"))), TxnReply::Prepared);
    assert_eq!(step(&s, prepare("t1", vec![read.clone()], owner_write("a@b.co", "p_1"))), TxnReply::Prepared, "idempotent");
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap(), None, "kept, not applied");
    let lock = lock_on(&s, &key).unwrap().expect("locked");
    assert_eq!(lock.txn, "t1");
    let blocked = step(&s, TxnOp::Single { reads: vec![read.clone()], writes: owner_write("a@b.co", "p_9") });
    assert_eq!(blocked, TxnReply::Conflict { lock: Some(lock) });
    assert_eq!(step(&s, TxnOp::Apply { txn: "t1".into() }), TxnReply::Applied);
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap().as_deref(), Some("p_1"));
    assert_eq!(lock_on(&s, &key).unwrap(), None, "released");
    assert_eq!(step(&s, TxnOp::Apply { txn: "t1".into() }), TxnReply::Applied, "a repeated apply changes nothing");
    assert_eq!(s.meta_prefix("txn.").unwrap(), vec![]);
}

/// A store that applies a prepared part right after the first read a
/// reader makes of it, as a shard's state machine may between two reads.
struct ApplyAfterFirstRead {
    store: MemStore,
    part: std::sync::Mutex<Option<TxnOp>>,
}

impl ApplyAfterFirstRead {
    fn after<T>(&self, v: T) -> T {
        if let Some(op) = self.part.lock().unwrap().take() {
            step(&self.store, op);
        }
        v
    }
}

impl GraphRead for ApplyAfterFirstRead {
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        self.after(self.store.owner(id))
    }
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.after(self.store.profile(id))
    }
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError> {
        self.after(self.store.alias(id))
    }
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.after(self.store.event(event_id))
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError> {
        self.after(self.store.merge_record(id))
    }
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError> {
        self.after(self.store.hub(id))
    }
    fn listed_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError> {
        self.after(self.store.listed_hubs(limit))
    }
    fn counters(&self) -> Result<Counters, StoreError> {
        self.after(self.store.counters())
    }
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        self.after(self.store.all_profiles())
    }
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError> {
        self.after(self.store.all_merges())
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.after(self.store.meta(key))
    }
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.after(self.store.meta_prefix(prefix))
    }
}

/// Found by the chaos harness: a reader that read a record's value, then
/// its lock, could get the value from before a committed part's apply and
/// no lock (released by that apply), and answer a state no transaction
/// left. Whichever read comes first, the apply lands between the two.
#[test]
fn a_part_applied_between_the_reads_of_a_record_shows_its_lock_or_its_new_value() {
    let key = GraphKey::Owner(Identifier::new("email", "a@b.co"));
    let s = ApplyAfterFirstRead { store: MemStore::new(), part: std::sync::Mutex::new(None) };
    let read = read_of(&s.store, &key);
    assert_eq!(step(&s.store, prepare("t1", vec![read], owner_write("a@b.co", "p_1"))), TxnReply::Prepared);
    *s.part.lock().unwrap() = Some(TxnOp::Apply { txn: "t1".into() });
    let got = read_key(&s, &key).unwrap();
    assert!(s.part.lock().unwrap().is_none(), "the part was applied during the read");
    let before = crate::graph::GraphValue::Owner(None);
    assert!(got.lock.is_some() || got.value != before, "the old value came back without the lock that guarded it: {got:?}");
}

#[test]
fn the_primary_decides_once_and_a_decision_never_changes() {
    let s = MemStore::new();
    let key = GraphKey::Owner(Identifier::new("email", "a@b.co"));
    let read = read_of(&s, &key);
    assert_eq!(step(&s, commit("t1", vec![read.clone()], owner_write("a@b.co", "p_1"))), TxnReply::Committed);
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap().as_deref(), Some("p_1"), "the primary's part applies at the commit");
    assert_eq!(
        step(&s, commit("t1", vec![read.clone()], owner_write("a@b.co", "p_1"))),
        TxnReply::Committed,
        "a repeated commit reads the decision back"
    );
    assert_eq!(step(&s, TxnOp::Resolve { txn: "t1".into() }), TxnReply::Committed);
    assert_eq!(step(&s, TxnOp::Forget { txn: "t1".into() }), TxnReply::Applied);
    assert_eq!(s.meta_prefix("txn.").unwrap(), vec![]);

    // A commit whose read went stale is decided aborted, for good.
    assert_eq!(step(&s, commit("t2", vec![read.clone()], owner_write("a@b.co", "p_2"))), TxnReply::Conflict { lock: None });
    assert_eq!(step(&s, TxnOp::Resolve { txn: "t2".into() }), TxnReply::Aborted);
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap().as_deref(), Some("p_1"));

    // A recovery that finds no decision decides aborted; the late commit of
    // that transaction then fails.
    assert_eq!(step(&s, TxnOp::Resolve { txn: "t3".into() }), TxnReply::Aborted);
    let fresh = read_of(&s, &key);
    assert_eq!(step(&s, commit("t3", vec![fresh], owner_write("a@b.co", "p_3"))), TxnReply::Aborted);
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap().as_deref(), Some("p_1"), "an aborted commit changes nothing");
}

#[test]
fn a_secondary_lock_blocks_the_primary_commit_of_another_transaction() {
    let s = MemStore::new();
    let key = GraphKey::Owner(Identifier::new("email", "a@b.co"));
    let read = read_of(&s, &key);
    assert_eq!(step(&s, prepare("t1", vec![read.clone()], owner_write("a@b.co", "p_1"))), TxnReply::Prepared);
    let reply = step(&s, commit("t2", vec![read.clone()], owner_write("a@b.co", "p_2")));
    assert!(matches!(reply, TxnReply::Conflict { lock: Some(ref l) } if l.txn == "t1"), "{reply:?}");
    assert_eq!(step(&s, TxnOp::Abort { txn: "t1".into() }), TxnReply::Aborted);
    assert_eq!(s.owner(&Identifier::new("email", "a@b.co")).unwrap(), None, "an aborted part changes nothing");
    assert!(s.meta_prefix("txn.lock/").unwrap().is_empty());
}
