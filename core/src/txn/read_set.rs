//! [`ReadSet`]: the values a coordinator fetched from several shards, seen
//! by the engine as one graph.
//!
//! The engine discovers what it needs as it goes (an identifier's owner,
//! then that profile, then its hub entries). A read of a key that was not
//! fetched yet answers "absent" and is remembered as a miss; the
//! coordinator fetches every miss of a run in one round, per shard in
//! parallel, and runs the engine again. A run without misses decided on
//! fetched values only, and its read set is what the commit validates.

use crate::graph::{GraphKey, GraphRead, GraphValue, StoreError};
use crate::model::{Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

#[derive(Debug)]
pub struct ReadSet {
    shards: u32,
    values: BTreeMap<GraphKey, GraphValue>,
    misses: Mutex<BTreeSet<GraphKey>>,
}

impl ReadSet {
    /// An empty view of a graph spread over `shards` shards.
    pub fn new(shards: u32) -> ReadSet {
        ReadSet { shards: shards.max(1), values: BTreeMap::new(), misses: Mutex::default() }
    }

    pub fn insert(&mut self, key: GraphKey, value: GraphValue) {
        self.values.insert(key, value);
    }

    /// The keys read since the last call that had not been fetched.
    pub fn take_misses(&self) -> BTreeSet<GraphKey> {
        std::mem::take(&mut *self.misses.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn values(&self) -> &BTreeMap<GraphKey, GraphValue> {
        &self.values
    }

    fn get<T>(&self, key: GraphKey, pick: impl FnOnce(&GraphValue) -> Option<T>) -> Result<Option<T>, StoreError> {
        match self.values.get(&key) {
            Some(v) => Ok(pick(v)),
            None => {
                self.misses.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                Ok(None)
            }
        }
    }

    fn not_here(what: &str) -> StoreError {
        StoreError::Io(format!("{what} is not available to a cross-shard command"))
    }
}

impl GraphRead for ReadSet {
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        self.get(GraphKey::Owner(id.clone()), |v| if let GraphValue::Owner(o) = v { o.clone() } else { None })
    }
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.get(GraphKey::Profile(id.to_string()), |v| if let GraphValue::Profile(p) = v { p.clone() } else { None })
    }
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError> {
        self.get(GraphKey::Alias(id.to_string()), |v| if let GraphValue::Alias(a) = v { a.clone() } else { None })
    }
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.get(GraphKey::Event(event_id.to_string()), |v| if let GraphValue::Event(e) = v { e.clone() } else { None })
    }
    fn event_at(&self, event_id: &str, slot: u32) -> Result<Option<EventRecord>, StoreError> {
        self.get(GraphKey::EventAt(event_id.to_string(), slot), |v| if let GraphValue::Event(e) = v { e.clone() } else { None })
    }
    fn shard_count(&self) -> u32 {
        self.shards
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError> {
        self.get(GraphKey::Merge(id.to_string()), |v| if let GraphValue::Merge(m) = v { m.clone() } else { None })
    }
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError> {
        self.get(GraphKey::Hub(id.clone()), |v| if let GraphValue::Hub(h) = v { h.clone() } else { None })
    }
    fn listed_hubs(&self, _limit: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError> {
        Err(Self::not_here("the hub list"))
    }
    fn counters(&self) -> Result<Counters, StoreError> {
        Err(Self::not_here("the counters"))
    }
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        Err(Self::not_here("a scan of all profiles"))
    }
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError> {
        Err(Self::not_here("a scan of all merges"))
    }
    fn meta(&self, _key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Err(Self::not_here("shard bookkeeping"))
    }
    fn meta_prefix(&self, _prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Err(Self::not_here("shard bookkeeping"))
    }
}
