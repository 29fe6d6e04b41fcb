//! The graph's records as keys and values that can travel between shards:
//! which shard holds a record, what a coordinator read, and which record a
//! change writes.

use super::{GraphRead, StoreError};
use crate::model::{Change, EventRecord, HubRecord, Identifier, MergeId, MergeRecord, Profile, ProfileId, ShardId};
use serde::{Deserialize, Serialize};

/// Hash slots records are placed by (see [`GraphKey::shard`]); the most
/// shards a cluster can be split into.
pub const SLOTS: u32 = 4096;

/// The shard of `count` that holds `slot`.
pub fn shard_of_slot(slot: u32, count: u32) -> u32 {
    let count = count.clamp(1, SLOTS);
    ((u64::from(slot) * u64::from(count)) / u64::from(SLOTS)) as u32
}

/// One record of the graph, by what names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GraphKey {
    Owner(Identifier),
    Hub(Identifier),
    Profile(ProfileId),
    Alias(ProfileId),
    /// An event's dedup record placed by the hash of its id (records
    /// written before events were placed by identifier).
    Event(String),
    Merge(MergeId),
    /// An event's dedup record at the slot [`EventRecord::slot`] names.
    EventAt(String, u32),
}

/// A record's value as read (absent included: absence is a fact a decision
/// can rest on, so it is validated like any other value).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum GraphValue {
    Owner(Option<ProfileId>),
    Hub(Option<HubRecord>),
    Profile(Option<Profile>),
    Alias(Option<ProfileId>),
    Event(Option<EventRecord>),
    Merge(Option<MergeRecord>),
}

fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for p in parts {
        h.update(p);
        h.update(&[0xff]);
    }
    h.digest()
}

impl GraphKey {
    /// The hash slot of this record, in `0..SLOTS`. An identifier's owner
    /// entry and hub entry share a slot, as do a profile and the alias a
    /// merge leaves under its id. An event's record is where its key says.
    pub fn slot(&self) -> u32 {
        let h = match self {
            GraphKey::EventAt(_, slot) => return slot % SLOTS,
            GraphKey::Owner(id) | GraphKey::Hub(id) => hash_parts(&[b"i", id.kind.as_bytes(), id.value.as_bytes()]),
            GraphKey::Profile(p) | GraphKey::Alias(p) => hash_parts(&[b"p", p.as_bytes()]),
            GraphKey::Event(e) => hash_parts(&[b"e", e.as_bytes()]),
            GraphKey::Merge(m) => hash_parts(&[b"m", m.as_bytes()]),
        };
        (h % u64::from(SLOTS)) as u32
    }

    /// The shard that holds this record: of `count` shards, slot `k` is on
    /// shard `k * count / SLOTS` (rounded down), so each shard holds one
    /// contiguous slot range. Ranges, not a modulo, so that a later split
    /// moves slot ranges and leaves every other record where it is.
    pub fn shard(&self, count: u32) -> ShardId {
        ShardId(shard_of_slot(self.slot(), count))
    }

    /// The key of event `event_id`'s dedup record `rec`: at the slot the
    /// record names, or by the hash of the event id for a record written
    /// before events were placed by identifier.
    pub fn of_event(event_id: &str, rec: &EventRecord) -> GraphKey {
        match rec.slot {
            Some(slot) => GraphKey::EventAt(event_id.to_string(), slot),
            None => GraphKey::Event(event_id.to_string()),
        }
    }

    /// A fixed-size name for the key (locks are kept under it): a 128-bit
    /// hash, so identity values never appear in lock tables or logs. Two keys
    /// that collided would only share a lock.
    pub fn lock_name(&self) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&super::encode(self)))
    }

    pub fn read<R: GraphRead + ?Sized>(&self, r: &R) -> Result<GraphValue, StoreError> {
        Ok(match self {
            GraphKey::Owner(id) => GraphValue::Owner(r.owner(id)?),
            GraphKey::Hub(id) => GraphValue::Hub(r.hub(id)?),
            GraphKey::Profile(p) => GraphValue::Profile(r.profile(p)?),
            GraphKey::Alias(p) => GraphValue::Alias(r.alias(p)?),
            GraphKey::Event(e) => GraphValue::Event(r.event(e)?),
            GraphKey::EventAt(e, slot) => GraphValue::Event(r.event_at(e, *slot)?),
            GraphKey::Merge(m) => GraphValue::Merge(r.merge_record(m)?),
        })
    }

    /// The record a change writes; `None` for bookkeeping (`PutMeta`) and
    /// retention (`DeleteEvent`) that the engine never emits.
    pub fn written_by(c: &Change) -> Option<GraphKey> {
        Some(match c {
            Change::PutOwner(id, _) | Change::DeleteOwner(id) => GraphKey::Owner(id.clone()),
            Change::PutHub(id, _) | Change::DeleteHub(id) => GraphKey::Hub(id.clone()),
            Change::PutProfile(p) => GraphKey::Profile(p.id.clone()),
            Change::DeleteProfile(p) => GraphKey::Profile(p.clone()),
            Change::PutAlias(p, _) | Change::DeleteAlias(p) => GraphKey::Alias(p.clone()),
            Change::PutEvent(e, rec) => GraphKey::of_event(e, rec),
            // Only a shard's retention sweep deletes a dedup record, through
            // its own log: never part of a transaction (whose check refuses
            // a change without a key).
            Change::DeleteEvent(_) => return None,
            Change::PutMerge(m) => GraphKey::Merge(m.id.clone()),
            Change::DeleteMerge(m) => GraphKey::Merge(m.clone()),
            Change::PutMeta(..) | Change::DeleteMeta(_) => return None,
        })
    }
}

impl GraphValue {
    /// What a participant compares to decide that a value did not change
    /// since the coordinator read it.
    pub fn digest(&self) -> u128 {
        xxhash_rust::xxh3::xxh3_128(&super::encode(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_hold_contiguous_slot_ranges_of_near_equal_size() {
        for count in [1u32, 2, 3, 7, 16, 1024, SLOTS] {
            let mut sizes = vec![0u32; count as usize];
            let mut last = 0;
            for slot in 0..SLOTS {
                let shard = shard_of_slot(slot, count);
                assert!(shard >= last && shard < count, "slot {slot} of {count} shards went to {shard} after {last}");
                last = shard;
                sizes[shard as usize] += 1;
            }
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{count} shards: sizes from {min} to {max}");
        }
    }

    #[test]
    fn splitting_a_shard_moves_only_its_own_records() {
        // From 8 shards to 16: every record of shard s lands on 2s or 2s + 1.
        for i in 0..2000 {
            let key = GraphKey::Event(format!("ev-{i}"));
            let (before, after) = (key.shard(8).0, key.shard(16).0);
            assert_eq!(after / 2, before, "{key:?}");
        }
    }
}
