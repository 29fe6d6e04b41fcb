//! Event dedup records past their retention.
//!
//! Every applied event leaves a dedup record (its id, the profile it went
//! to, when it was applied), so that a re-delivery of the same event is
//! answered as a duplicate instead of being applied twice. Events arrive far
//! more often than new identifiers do, so kept forever these records would
//! make a shard's disk grow with its traffic, not with its graph. They are
//! kept for a retention window (`event_retention_secs`, seven days by
//! default, as long as senders retry an event), then forgotten: an event
//! delivered again after that is applied again.
//!
//! Forgetting is a command of the shard's log, so every replica forgets the
//! same records at the same log position. The shard's leader picks the
//! candidates from a scan of its own records and names them with a cut-off
//! time chosen once ([`forget_events`] checks each again as it applies, on
//! the state of that moment, so the choice needs no lock). A record locked
//! by a cross-shard transaction under way is kept for a later sweep.

use crate::graph::{GraphKey, GraphRead, StoreError};
use crate::model::{Change, ChangeSet};

/// The changes that forget those of `event_ids` whose dedup record was
/// applied before `before_ms` and is not locked by a transaction; ids
/// without a record, younger ones and locked ones are left alone.
pub fn forget_events<R: GraphRead + ?Sized>(r: &R, before_ms: i64, event_ids: &[String]) -> Result<ChangeSet, StoreError> {
    let mut cs = ChangeSet::default();
    for id in event_ids {
        let Some(rec) = r.event(id)? else { continue };
        if rec.applied_ms >= before_ms {
            continue;
        }
        if crate::txn::lock_on(r, &GraphKey::of_event(id, &rec))?.is_some() {
            continue;
        }
        cs.push(Change::DeleteEvent(id.clone()));
    }
    Ok(cs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{GraphStore, MemStore};
    use crate::model::{EventRecord, ShardId};
    use crate::txn::{apply_op, TxnOp, TxnReply};

    fn record(applied_ms: i64, slot: Option<u32>) -> EventRecord {
        EventRecord { profile_id: "p_1".into(), applied_ms, slot }
    }

    #[test]
    fn only_records_older_than_the_cut_off_and_unlocked_are_forgotten() {
        let store = MemStore::default();
        let mut cs = ChangeSet::default();
        for (id, at, slot) in [("old", 10, Some(3)), ("old-unplaced", 20, None), ("young", 100, Some(3)), ("locked", 10, Some(5))] {
            cs.push(Change::PutEvent(id.into(), record(at, slot)));
        }
        store.apply(&cs).unwrap();
        // A transaction under way read one old record: its prepare locked it.
        let locked = GraphKey::EventAt("locked".into(), 5);
        let digest = locked.read(&store).unwrap().digest();
        let prepare = TxnOp::Prepare {
            txn: "t1".into(),
            primary: ShardId(0),
            at_ms: 5,
            reads: vec![(locked.clone(), digest)],
            writes: ChangeSet::default(),
        };
        let (cs, reply) = apply_op(&store, &prepare).unwrap();
        assert_eq!(reply, TxnReply::Prepared);
        store.apply(&cs).unwrap();
        assert!(crate::txn::lock_on(&store, &locked).unwrap().is_some());

        let ids: Vec<String> = ["old", "old-unplaced", "young", "locked", "never-seen"].into_iter().map(String::from).collect();
        let forget = forget_events(&store, 50, &ids).unwrap();
        assert_eq!(forget.changes, vec![Change::DeleteEvent("old".into()), Change::DeleteEvent("old-unplaced".into())]);
        assert_eq!(forget.counters, Default::default(), "forgetting changes no counter");
        store.apply(&forget).unwrap();
        assert_eq!(store.event("old").unwrap(), None);
        assert_eq!(store.event("young").unwrap(), Some(record(100, Some(3))));
        assert_eq!(store.event("locked").unwrap(), Some(record(10, Some(5))));
        // The same command again finds nothing left to forget.
        assert!(forget_events(&store, 50, &ids).unwrap().changes.is_empty());
    }
}
