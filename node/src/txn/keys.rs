//! The graph's records as keys and values that can travel between shards:
//! which shard holds a record, what a coordinator read, and which record a
//! change writes.

use crate::model::{Change, EventRecord, HubRecord, Identifier, MergeId, MergeRecord, Profile, ProfileId, ShardId};
use crate::storage::{GraphRead, StoreError};
use serde::{Deserialize, Serialize};

/// One record of the graph, by what names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum GraphKey {
    Owner(Identifier),
    Hub(Identifier),
    Profile(ProfileId),
    Alias(ProfileId),
    Event(String),
    Merge(MergeId),
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
    /// The shard that holds this record. An identifier's owner entry and hub
    /// entry live together, as do a profile and the alias a merge leaves
    /// under its id.
    pub fn shard(&self, count: u32) -> ShardId {
        let h = match self {
            GraphKey::Owner(id) | GraphKey::Hub(id) => hash_parts(&[b"i", id.kind.as_bytes(), id.value.as_bytes()]),
            GraphKey::Profile(p) | GraphKey::Alias(p) => hash_parts(&[b"p", p.as_bytes()]),
            GraphKey::Event(e) => hash_parts(&[b"e", e.as_bytes()]),
            GraphKey::Merge(m) => hash_parts(&[b"m", m.as_bytes()]),
        };
        ShardId((h % u64::from(count.max(1))) as u32)
    }

    /// A fixed-size name for the key (locks are kept under it): a 128-bit
    /// hash, so identity values never appear in lock tables or logs. Two keys
    /// that collided would only share a lock.
    pub fn lock_name(&self) -> String {
        format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&crate::storage::encode(self)))
    }

    pub fn read<R: GraphRead + ?Sized>(&self, r: &R) -> Result<GraphValue, StoreError> {
        Ok(match self {
            GraphKey::Owner(id) => GraphValue::Owner(r.owner(id)?),
            GraphKey::Hub(id) => GraphValue::Hub(r.hub(id)?),
            GraphKey::Profile(p) => GraphValue::Profile(r.profile(p)?),
            GraphKey::Alias(p) => GraphValue::Alias(r.alias(p)?),
            GraphKey::Event(e) => GraphValue::Event(r.event(e)?),
            GraphKey::Merge(m) => GraphValue::Merge(r.merge_record(m)?),
        })
    }

    /// The record a change writes; `None` for bookkeeping (`PutMeta`) that
    /// the engine never emits.
    pub fn written_by(c: &Change) -> Option<GraphKey> {
        Some(match c {
            Change::PutOwner(id, _) | Change::DeleteOwner(id) => GraphKey::Owner(id.clone()),
            Change::PutHub(id, _) | Change::DeleteHub(id) => GraphKey::Hub(id.clone()),
            Change::PutProfile(p) => GraphKey::Profile(p.id.clone()),
            Change::DeleteProfile(p) => GraphKey::Profile(p.clone()),
            Change::PutAlias(p, _) | Change::DeleteAlias(p) => GraphKey::Alias(p.clone()),
            Change::PutEvent(e, _) => GraphKey::Event(e.clone()),
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
        xxhash_rust::xxh3::xxh3_128(&crate::storage::encode(self))
    }
}
