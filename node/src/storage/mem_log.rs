//! An in-memory [`RaftLog`] for tests: the same semantics as the node's
//! log, without durability.

use super::{RaftLog, StoreError};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// An in-memory [`RaftLog`] for tests.
#[derive(Default, Debug)]
pub struct MemRaftLog {
    entries: Mutex<BTreeMap<u64, Vec<u8>>>,
    meta: Mutex<BTreeMap<String, Vec<u8>>>,
}

fn poisoned<T>(_: T) -> StoreError {
    StoreError::Io("memory raft log lock poisoned".into())
}

impl RaftLog for MemRaftLog {
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    fn append(&self, entries: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        let mut e = self.entries.lock().map_err(poisoned)?;
        for (i, b) in entries {
            e.insert(*i, b.clone());
        }
        Ok(())
    }
    fn range(&self, from: u64, until: u64) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if from >= until {
            return Ok(Vec::new());
        }
        Ok(self.entries.lock().map_err(poisoned)?.range(from..until).map(|(i, b)| (*i, b.clone())).collect())
    }
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self.entries.lock().map_err(poisoned)?.iter().next_back().map(|(i, b)| (*i, b.clone())))
    }
    fn truncate_from(&self, from: u64) -> Result<(), StoreError> {
        self.entries.lock().map_err(poisoned)?.retain(|i, _| *i < from);
        Ok(())
    }
    fn purge_upto(&self, upto: u64) -> Result<(), StoreError> {
        self.entries.lock().map_err(poisoned)?.retain(|i, _| *i > upto);
        Ok(())
    }
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.meta.lock().map_err(poisoned)?.insert(key.to_string(), value.to_vec());
        Ok(())
    }
    fn stage_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_meta(key, value)
    }
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.meta.lock().map_err(poisoned)?.get(key).cloned())
    }
}
