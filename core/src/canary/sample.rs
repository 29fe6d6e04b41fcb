//! What the nodes count for the judge: per rule-set version, the outcomes,
//! latencies and traffic mix of the events it resolved.

use super::plan::Kpi;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Upper bounds, in microseconds, of the latency histogram's buckets; one
/// more bucket holds everything slower.
pub const LATENCY_BOUNDS_US: [u64; 14] =
    [250, 500, 1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000, 512_000, 1_024_000, 2_048_000];

/// Distinct identifier types or sources a tally keeps apart; the rest are
/// counted as [`OTHER`] (sources are whatever clients send).
pub const MIX_KEYS: usize = 32;
pub const OTHER: &str = "(other)";

/// Counts of one rule-set version over some time, from one node or summed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KpiCounts {
    /// Identify calls resolved (duplicates excluded).
    pub events: u64,
    pub merges: u64,
    /// Identifiers a type limit kept out of a profile.
    pub conflicts: u64,
    pub created: u64,
    /// Identify calls that failed.
    pub errors: u64,
    /// Sum over events of the identifiers the event's profile held after it.
    pub identifiers: u64,
    /// The most identifiers a profile held after an event.
    pub largest: u64,
    /// Identify latency, one count per bucket of [`LATENCY_BOUNDS_US`] plus one.
    pub latency: Vec<u64>,
    /// Identifiers sent, per type.
    pub types: BTreeMap<String, u64>,
    /// Events, per source.
    pub sources: BTreeMap<String, u64>,
    /// Events, per shard of their anchor (counted while a rollout runs).
    #[serde(default)]
    pub by_shard: BTreeMap<u32, u64>,
}

fn bump(map: &mut BTreeMap<String, u64>, key: &str, n: u64) {
    if let Some(v) = map.get_mut(key) {
        *v += n;
    } else if map.len() < MIX_KEYS {
        map.insert(key.to_string(), n);
    } else {
        *map.entry(OTHER.to_string()).or_default() += n;
    }
}

impl KpiCounts {
    pub fn is_empty(&self) -> bool {
        self.events == 0 && self.errors == 0
    }

    /// Counts one call's latency.
    pub fn observe_latency(&mut self, micros: u64) {
        if self.latency.len() != LATENCY_BOUNDS_US.len() + 1 {
            self.latency.resize(LATENCY_BOUNDS_US.len() + 1, 0);
        }
        let bucket = LATENCY_BOUNDS_US.iter().position(|b| micros <= *b).unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket] += 1;
    }

    /// Counts the traffic mix of one event.
    pub fn observe_mix<'a>(&mut self, source: &str, types: impl IntoIterator<Item = &'a str>) {
        bump(&mut self.sources, source, 1);
        for t in types {
            bump(&mut self.types, t, 1);
        }
    }

    pub fn add(&mut self, o: &KpiCounts) {
        self.events += o.events;
        self.merges += o.merges;
        self.conflicts += o.conflicts;
        self.created += o.created;
        self.errors += o.errors;
        self.identifiers += o.identifiers;
        self.largest = self.largest.max(o.largest);
        if self.latency.len() < o.latency.len() {
            self.latency.resize(o.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            *a += b;
        }
        for (k, v) in &o.types {
            bump(&mut self.types, k, *v);
        }
        for (k, v) in &o.sources {
            bump(&mut self.sources, k, *v);
        }
        for (s, n) in &o.by_shard {
            *self.by_shard.entry(*s).or_default() += n;
        }
    }

    /// The 99th percentile latency in milliseconds (its bucket's upper
    /// bound; the slowest bucket reports twice the last bound).
    pub fn p99_ms(&self) -> Option<f64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total * 99).div_ceil(100);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let us = LATENCY_BOUNDS_US.get(i).copied().unwrap_or(LATENCY_BOUNDS_US[LATENCY_BOUNDS_US.len() - 1] * 2);
                return Some(us as f64 / 1000.0);
            }
        }
        None
    }

    /// The KPI's value over these counts; none without the events it needs.
    pub fn value(&self, kpi: Kpi) -> Option<f64> {
        let per_event = |n: u64| (self.events > 0).then(|| n as f64 / self.events as f64);
        match kpi {
            Kpi::MergeRate => per_event(self.merges),
            Kpi::ConflictRate => per_event(self.conflicts),
            Kpi::NewProfileRate => per_event(self.created),
            Kpi::IdentifiersPerProfile => per_event(self.identifiers),
            Kpi::LargestProfile => (self.events > 0).then_some(self.largest as f64),
            Kpi::ErrorRate => {
                let calls = self.events + self.errors;
                (calls > 0).then(|| self.errors as f64 / calls as f64)
            }
            Kpi::IdentifyP99Ms => self.p99_ms(),
        }
    }
}

/// The counts of one sampling interval, by rule-set version.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IntervalSample {
    /// End of the interval.
    pub at_ms: i64,
    /// Index of the rollout step the interval belongs to.
    pub step: usize,
    /// Counts of events resolved by the candidate version.
    pub canary: KpiCounts,
    /// Counts of events resolved by the control version.
    pub control: KpiCounts,
    /// Canary shards during the interval.
    pub canary_shards: u32,
    pub shard_count: u32,
    /// A shadow interval: `canary` counts what the candidate would have
    /// done with the same events `control` counts.
    #[serde(default)]
    pub shadow: bool,
}

/// Total variation distance between two tallies' distributions (0: the
/// same mix, 1: nothing in common); none when either is empty.
pub fn mix_distance(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> Option<f64> {
    let (ta, tb) = (a.values().sum::<u64>() as f64, b.values().sum::<u64>() as f64);
    if ta == 0.0 || tb == 0.0 {
        return None;
    }
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let sum: f64 =
        keys.into_iter().map(|k| (a.get(k).copied().unwrap_or(0) as f64 / ta - b.get(k).copied().unwrap_or(0) as f64 / tb).abs()).sum();
    Some(sum / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p99_is_the_upper_bound_of_the_bucket_holding_the_99th_percentile() {
        let mut c = KpiCounts::default();
        for _ in 0..98 {
            c.observe_latency(300);
        }
        c.observe_latency(3_000);
        c.observe_latency(3_000);
        assert_eq!(c.p99_ms(), Some(4.0));
        c.observe_latency(10_000_000);
        assert_eq!(c.p99_ms(), Some(4.0));
        assert_eq!(KpiCounts::default().p99_ms(), None);
    }

    #[test]
    fn rates_are_per_event_and_sums_keep_the_largest_profile() {
        let mut a = KpiCounts { events: 10, merges: 2, largest: 4, ..Default::default() };
        let b = KpiCounts { events: 30, merges: 2, largest: 9, errors: 10, by_shard: [(3, 30)].into(), ..Default::default() };
        a.add(&b);
        a.add(&b);
        assert_eq!(a.by_shard[&3], 60);
        let a = {
            let mut a = KpiCounts { events: 10, merges: 2, largest: 4, ..Default::default() };
            a.add(&b);
            a
        };
        assert_eq!(a.value(Kpi::MergeRate), Some(0.1));
        assert_eq!(a.value(Kpi::LargestProfile), Some(9.0));
        assert_eq!(a.value(Kpi::ErrorRate), Some(0.2));
        assert_eq!(KpiCounts::default().value(Kpi::MergeRate), None);
    }

    #[test]
    fn mix_distance_is_zero_for_the_same_shares_and_one_for_disjoint_ones() {
        let m = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
        assert_eq!(mix_distance(&m(&[("email", 10), ("cookie", 10)]), &m(&[("email", 3), ("cookie", 3)])), Some(0.0));
        assert_eq!(mix_distance(&m(&[("email", 10)]), &m(&[("phone", 3)])), Some(1.0));
        assert_eq!(mix_distance(&m(&[]), &m(&[("phone", 3)])), None);
    }

    #[test]
    fn a_tally_keeps_a_bounded_number_of_keys() {
        let mut c = KpiCounts::default();
        for i in 0..100 {
            c.observe_mix(&format!("source-{i}"), ["email"]);
        }
        assert_eq!(c.sources.len(), MIX_KEYS + 1);
        assert_eq!(c.sources.values().sum::<u64>(), 100);
    }
}

/// The identifiers a shadow version would have joined, across events: a
/// union-find over hashed identifiers (no value is kept), so the shadow can
/// report the largest component it would have built, which no single
/// event's outcome shows (a placeholder joining strangers grows one
/// component event by event while writing nothing). Bounded: past
/// [`Components::MAX`] identifiers, new ones are not tracked.
#[derive(Clone, Debug, Default)]
pub struct Components {
    parent: std::collections::HashMap<u64, u64>,
    size: std::collections::HashMap<u64, u64>,
}

impl Components {
    pub const MAX: usize = 1_000_000;

    fn root(&mut self, mut x: u64) -> u64 {
        while let Some(&p) = self.parent.get(&x) {
            if p == x {
                break;
            }
            let grand = self.parent.get(&p).copied().unwrap_or(p);
            self.parent.insert(x, grand);
            x = grand;
        }
        x
    }

    fn add(&mut self, x: u64) -> bool {
        if self.parent.contains_key(&x) {
            return true;
        }
        if self.parent.len() >= Self::MAX {
            return false;
        }
        self.parent.insert(x, x);
        self.size.insert(x, 1);
        true
    }

    /// Joins `ids` (hashes) into one component; the size of that component.
    pub fn join(&mut self, ids: &[u64]) -> u64 {
        let tracked: Vec<u64> = ids.iter().copied().filter(|x| self.add(*x)).collect();
        let Some((&first, rest)) = tracked.split_first() else { return 0 };
        let mut root = self.root(first);
        for &x in rest {
            let other = self.root(x);
            if other == root {
                continue;
            }
            let (big, small) = if self.size[&root] >= self.size[&other] { (root, other) } else { (other, root) };
            let moved = self.size.remove(&small).unwrap_or(0);
            *self.size.entry(big).or_insert(0) += moved;
            self.parent.insert(small, big);
            root = big;
        }
        self.size.get(&root).copied().unwrap_or(0)
    }
}

/// How a shadow tracks an identifier: a hash of its type and value.
pub fn identifier_hash(kind: &str, value: &str) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(kind.trim().to_ascii_lowercase().as_bytes());
    h.update(&[0]);
    h.update(value.trim().to_lowercase().as_bytes());
    h.digest()
}

#[cfg(test)]
mod component_tests {
    use super::*;

    #[test]
    fn a_placeholder_grows_one_component_event_by_event() {
        let mut c = Components::default();
        let guest = identifier_hash("user_id", "guest");
        assert_eq!(c.join(&[identifier_hash("email", "a@x.com"), guest]), 2);
        assert_eq!(c.join(&[identifier_hash("email", "b@x.com"), identifier_hash("user_id", " GUEST ")]), 3);
        assert_eq!(c.join(&[identifier_hash("email", "c@x.com"), identifier_hash("anonymous_id", "c")]), 2);
        assert_eq!(c.join(&[identifier_hash("anonymous_id", "c"), guest]), 5);
        assert_eq!(c.join(&[]), 0);
    }
}
