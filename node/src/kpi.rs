//! The KPI ledger: what this node's router counted of the events each
//! rule-set version resolved, until the canary coordinator collects it
//! (see [`idgraph_core::canary`]). Counts are samples, not records: a node
//! that restarts loses the counts not collected yet, which only shortens
//! one interval's evidence.

use crate::error::RequestError;
use idgraph_core::canary::{identifier_hash, Components, KpiCounts};
use idgraph_core::engine::{EngineError, IdentifyEvent, Outcome, RawIdentifier};
use idgraph_core::rules::RuleSet;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Counts by rule-set version, shared by the router and the peer service.
#[derive(Clone)]
pub struct KpiLedger {
    counts: Arc<Mutex<BTreeMap<String, KpiCounts>>>,
    /// The shadow version's would-be components, and which version they are of.
    shadow: Arc<Mutex<Option<(String, Components)>>>,
    /// Shadow evaluations running at once; an event past the bound is not
    /// evaluated in the shadow (it is a sample, not a record).
    shadow_slots: Arc<tokio::sync::Semaphore>,
}

/// Shadow evaluations a node runs at once.
const SHADOW_SLOTS: usize = 256;

impl Default for KpiLedger {
    fn default() -> Self {
        KpiLedger {
            counts: Default::default(),
            shadow: Default::default(),
            shadow_slots: Arc::new(tokio::sync::Semaphore::new(SHADOW_SLOTS)),
        }
    }
}

/// What the ledger keeps of an event before it is resolved: its traffic
/// mix, and its identifiers (for a shadow's components, which keep only
/// hashes of them).
#[derive(Clone)]
pub struct EventMix {
    source: String,
    types: Vec<String>,
    ids: Vec<RawIdentifier>,
}

impl EventMix {
    pub fn of(ev: &IdentifyEvent) -> EventMix {
        EventMix {
            source: ev.source.clone(),
            types: ev.identifiers.iter().map(|i| i.kind.trim().to_ascii_lowercase()).collect(),
            ids: ev.identifiers.clone(),
        }
    }
}

impl KpiLedger {
    /// Counts one identify call resolved (or refused) under `version`.
    /// `took` is none for what a version would have done in the shadow.
    /// `shard` is the shard of the event's anchor, when known.
    pub fn record(
        &self,
        version: &str,
        shard: Option<u32>,
        mix: &EventMix,
        result: &Result<Outcome, RequestError>,
        took: Option<Duration>,
    ) {
        let Ok(mut counts) = self.counts.lock() else { return };
        // No allocation for a version already counted (every event but the
        // first of an interval).
        if !counts.contains_key(version) {
            counts.insert(version.to_string(), KpiCounts::default());
        }
        let Some(c) = counts.get_mut(version) else { return };
        match result {
            Ok(Outcome::Identify(o)) if o.duplicate => return,
            Ok(Outcome::Identify(o)) => {
                c.events += 1;
                c.merges += u64::from(o.merge_id.is_some());
                c.conflicts += o.conflicts.len() as u64;
                c.created += u64::from(o.created);
                c.identifiers += u64::from(o.profile_identifiers);
                c.largest = c.largest.max(u64::from(o.profile_identifiers));
                if let Some(shard) = shard {
                    *c.by_shard.entry(shard).or_default() += 1;
                }
            }
            Ok(_) => return,
            // A refusal of the event itself is the candidate's doing (say,
            // every identifier blocked); so is any other failure to us.
            Err(RequestError::Engine(EngineError::NotFound { .. })) => return,
            Err(_) => c.errors += 1,
        }
        if let Some(took) = took {
            c.observe_latency(took.as_micros() as u64);
        }
        c.observe_mix(&mix.source, mix.types.iter().map(String::as_str));
    }

    /// A slot for one shadow evaluation, if one is free.
    pub fn shadow_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.shadow_slots.clone().try_acquire_owned().ok()
    }

    /// Counts what `rules` would have done with an event in the shadow of
    /// rollout `rollout`, joining the identifiers it would have kept (valid
    /// under `rules`, not refused by a limit) into its would-be components:
    /// the largest of those is its `largest` profile.
    pub fn record_shadow(&self, rollout: &str, rules: &RuleSet, mix: &EventMix, would: Result<Outcome, EngineError>) {
        let mut joined = 0;
        if let (Ok(Outcome::Identify(o)), Ok(mut shadow)) = (&would, self.shadow.lock()) {
            if o.duplicate {
                return;
            }
            if shadow.as_ref().is_none_or(|(id, _)| id != rollout) {
                *shadow = Some((rollout.to_string(), Components::default()));
            }
            if let Some((_, components)) = shadow.as_mut() {
                let kept: Vec<u64> = mix
                    .ids
                    .iter()
                    .filter_map(|raw| {
                        let kind = raw.kind.trim().to_ascii_lowercase();
                        let value = rules.normalize(rules.type_rule(&kind)?, &raw.value).ok()?;
                        let refused = o.conflicts.iter().any(|c| c.identifier.kind == kind && c.identifier.value == value);
                        (!refused).then(|| identifier_hash(&kind, &value))
                    })
                    .collect();
                joined = components.join(&kept);
            }
        }
        let key = idgraph_core::canary::shadow_key(rules.version());
        self.record(&key, None, mix, &would.map_err(RequestError::Engine), None);
        if let Ok(mut counts) = self.counts.lock() {
            let c = counts.entry(key).or_default();
            c.largest = c.largest.max(joined);
        }
    }

    /// Forgets the would-be components of a shadow that ended.
    pub fn end_shadow(&self) {
        if let Ok(mut shadow) = self.shadow.lock() {
            *shadow = None;
        }
    }

    /// Everything counted since the last drain, by version.
    pub fn drain(&self) -> BTreeMap<String, KpiCounts> {
        self.counts.lock().map(|mut c| std::mem::take(&mut *c)).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_core::engine::{IdentifyOutcome, RawIdentifier};

    #[test]
    fn the_ledger_counts_outcomes_by_version_and_drains() {
        let ledger = KpiLedger::default();
        let ev = IdentifyEvent {
            event_id: "e".into(),
            timestamp_ms: 0,
            identifiers: vec![RawIdentifier { kind: "Email".into(), value: "a@b.c".into() }],
            traits: Default::default(),
            source: "web".into(),
        };
        let mix = EventMix::of(&ev);
        let merged = IdentifyOutcome { merge_id: Some("m".into()), profile_identifiers: 4, ..Default::default() };
        ledger.record("v2", Some(3), &mix, &Ok(Outcome::Identify(merged)), Some(Duration::from_millis(3)));
        let dup = IdentifyOutcome { duplicate: true, ..Default::default() };
        ledger.record("v2", Some(3), &mix, &Ok(Outcome::Identify(dup)), Some(Duration::from_millis(3)));
        ledger.record("v1", None, &mix, &Err(RequestError::Internal("x".into())), Some(Duration::from_millis(1)));
        let got = ledger.drain();
        let v2 = &got["v2"];
        assert_eq!((v2.events, v2.merges, v2.largest, v2.types["email"], v2.sources["web"], v2.by_shard[&3]), (1, 1, 4, 1, 1, 1));
        assert_eq!((got["v1"].events, got["v1"].errors), (0, 1));
        assert!(ledger.drain().is_empty());
    }
}
