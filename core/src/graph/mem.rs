//! An in-memory [`GraphStore`] for tests: the same semantics as the sled
//! store, without durability.

use super::{GraphRead, GraphStore, StoreError};
use crate::model::{Change, ChangeSet, Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId};
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Default, Debug)]
struct Tables {
    owners: BTreeMap<Identifier, ProfileId>,
    profiles: BTreeMap<ProfileId, Profile>,
    aliases: BTreeMap<ProfileId, ProfileId>,
    events: BTreeMap<String, EventRecord>,
    merges: BTreeMap<String, MergeRecord>,
    hubs: BTreeMap<Identifier, HubRecord>,
    meta: BTreeMap<String, Vec<u8>>,
    counters: Counters,
}

/// The tables as one serialisable value, for snapshots.
#[derive(serde::Serialize, serde::Deserialize)]
struct TablesImage {
    owners: Vec<(Identifier, ProfileId)>,
    profiles: Vec<Profile>,
    aliases: Vec<(ProfileId, ProfileId)>,
    events: Vec<(String, EventRecord)>,
    merges: Vec<MergeRecord>,
    hubs: Vec<(Identifier, HubRecord)>,
    meta: Vec<(String, Vec<u8>)>,
    counters: Counters,
}

impl Tables {
    fn image(&self, without_meta: &[&str]) -> Vec<u8> {
        super::encode(&TablesImage {
            owners: self.owners.clone().into_iter().collect(),
            profiles: self.profiles.values().cloned().collect(),
            aliases: self.aliases.clone().into_iter().collect(),
            events: self.events.clone().into_iter().collect(),
            merges: self.merges.values().cloned().collect(),
            hubs: self.hubs.clone().into_iter().collect(),
            meta: self.meta.iter().filter(|(k, _)| !without_meta.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect(),
            counters: self.counters,
        })
    }
}

#[derive(Default, Debug)]
pub struct MemStore {
    tables: Mutex<Tables>,
}

impl MemStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&Tables) -> T) -> Result<T, StoreError> {
        let t = self.tables.lock().map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        Ok(f(&t))
    }

    /// Every identifier → owner pair (tests check invariants with it).
    pub fn owners(&self) -> Vec<(Identifier, ProfileId)> {
        self.with(|t| t.owners.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }

    pub fn aliases(&self) -> Vec<(ProfileId, ProfileId)> {
        self.with(|t| t.aliases.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
    }
}

impl GraphRead for MemStore {
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        self.with(|t| t.owners.get(id).cloned())
    }
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        self.with(|t| t.profiles.get(id).cloned())
    }
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError> {
        self.with(|t| t.aliases.get(id).cloned())
    }
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        self.with(|t| t.events.get(event_id).cloned())
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError> {
        self.with(|t| t.merges.get(id).cloned())
    }
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError> {
        self.with(|t| t.hubs.get(id).cloned())
    }
    fn listed_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError> {
        self.with(|t| t.hubs.iter().filter(|(_, h)| h.listed_at_ms.is_some()).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn counters(&self) -> Result<Counters, StoreError> {
        self.with(|t| t.counters)
    }
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError> {
        self.with(|t| t.merges.values().cloned().collect())
    }
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        self.with(|t| t.profiles.values().cloned().collect())
    }
    fn meta_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with(|t| {
            t.meta.range(prefix.to_string()..).take_while(|(k, _)| k.starts_with(prefix)).map(|(k, v)| (k.clone(), v.clone())).collect()
        })
    }
    fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|t| t.meta.get(key).cloned())
    }
}

impl GraphStore for MemStore {
    fn apply(&self, cs: &ChangeSet) -> Result<(), StoreError> {
        let mut t = self.tables.lock().map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        for c in &cs.changes {
            match c {
                Change::PutOwner(k, v) => drop(t.owners.insert(k.clone(), v.clone())),
                Change::DeleteOwner(k) => drop(t.owners.remove(k)),
                Change::PutProfile(p) => drop(t.profiles.insert(p.id.clone(), p.clone())),
                Change::DeleteProfile(id) => drop(t.profiles.remove(id)),
                Change::PutAlias(k, v) => drop(t.aliases.insert(k.clone(), v.clone())),
                Change::DeleteAlias(k) => drop(t.aliases.remove(k)),
                Change::PutEvent(k, v) => drop(t.events.insert(k.clone(), v.clone())),
                Change::DeleteEvent(k) => drop(t.events.remove(k)),
                Change::PutMerge(m) => drop(t.merges.insert(m.id.clone(), m.clone())),
                Change::DeleteMerge(id) => drop(t.merges.remove(id)),
                Change::PutHub(k, v) => drop(t.hubs.insert(k.clone(), v.clone())),
                Change::DeleteHub(k) => drop(t.hubs.remove(k)),
                Change::PutMeta(k, v) => drop(t.meta.insert(k.clone(), v.clone())),
                Change::DeleteMeta(k) => drop(t.meta.remove(k)),
            }
        }
        t.counters.add(&cs.counters);
        Ok(())
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn snapshot(&self, without_meta: &[&str]) -> Result<Vec<u8>, StoreError> {
        self.with(|t| t.image(without_meta))
    }

    fn frozen(&self, without_meta: &[&str]) -> Result<Box<dyn super::FrozenImage>, StoreError> {
        // One lock for both: the meta values are those of the records.
        self.with(|t| -> Box<dyn super::FrozenImage> {
            Box::new(super::CopiedImage { meta: t.meta.clone(), records: t.image(without_meta) })
        })
    }

    fn restore(&self, snapshot: &[u8]) -> Result<(), StoreError> {
        self.restore_with_meta(snapshot, &[])
    }

    fn events_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, EventRecord)>, StoreError> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, |a| Bound::Excluded(a.to_string()));
        self.with(|t| t.events.range((start, Bound::Unbounded)).take(limit).map(|(k, v)| (k.clone(), v.clone())).collect())
    }
    fn holds_records(&self) -> Result<bool, StoreError> {
        let t = self.tables.lock().map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        Ok(!(t.owners.is_empty()
            && t.profiles.is_empty()
            && t.aliases.is_empty()
            && t.events.is_empty()
            && t.merges.is_empty()
            && t.hubs.is_empty()))
    }

    fn restore_with_meta(&self, snapshot: &[u8], meta: &[(String, Vec<u8>)]) -> Result<(), StoreError> {
        let img: TablesImage = super::decode(b"snapshot", snapshot)?;
        let mut t = self.tables.lock().map_err(|_| StoreError::Io("memory store lock poisoned".into()))?;
        *t = Tables {
            owners: img.owners.into_iter().collect(),
            profiles: img.profiles.into_iter().map(|p| (p.id.clone(), p)).collect(),
            aliases: img.aliases.into_iter().collect(),
            events: img.events.into_iter().collect(),
            merges: img.merges.into_iter().map(|m| (m.id.clone(), m)).collect(),
            hubs: img.hubs.into_iter().collect(),
            meta: img.meta.into_iter().chain(meta.iter().cloned()).collect(),
            counters: img.counters,
        };
        Ok(())
    }
}
