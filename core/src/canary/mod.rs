//! Canary rollouts of rule-set versions: a proof of concept on a few
//! shards, judged against the others, widened step by step or rolled back.
//!
//! # The method
//!
//! Shards are hash partitions of the same traffic, so a few shards are a
//! random sample of the customers and the rest are the control group. A
//! rollout ([`Rollout`]) follows an operator's [`CanaryPlan`]: the candidate
//! version first runs on the shards of step 1; after the step's bake time
//! the judge ([`judge::judge`]) compares the KPIs of events the candidate
//! resolved with those of events the control version resolved over the
//! same sampling intervals; a pass widens to the next step, a failure
//! rolls back, an inconclusive judgement (too little data, or canary
//! traffic unlike control traffic) bakes the step again.
//!
//! # One version per event
//!
//! An event is resolved under exactly one version: that of the shard
//! owning its *anchor*, the identifier of highest priority (ties: the
//! smallest type, then value), normalised under the cluster's version
//! ([`anchor_shard`]). The anchor does not depend on where the event's
//! other identifiers live, so a cross-shard event has one version too, and
//! a person's events (anchored by the same user id or e-mail) keep to one
//! version through a step. Operator commands (merge, unmerge, delete) run
//! under the cluster's version: they are not part of the experiment.
//!
//! # Invariants
//!
//! - One rollout at a time; its state lives in the metadata group and only
//!   changes through [`CanaryCommand`]s applied in log order, so a new
//!   metadata leader continues a rollout where it stood.
//! - Every shard runs the cluster's version unless the rollout under way
//!   assigns it the candidate ([`Rollout::assignments`]); a rollout that
//!   fails or is aborted assigns nothing from that entry on.
//! - A rollback finishes only after the merges made under the candidate
//!   have been undone through their lineage, newest first.
//! - Stored rule sets are immutable: a version names one text forever.

pub mod judge;
pub mod plan;
pub mod rollout;
pub mod sample;

pub use judge::{judge, judge_shadow, KpiJudgement, KpiOutcome, MixJudgement, StepJudgement, Verdict};
pub use plan::{CanaryPlan, Direction, Kpi, KpiSpec, PlanError, StepSpec};
pub use rollout::{CanaryCommand, CanaryRefusal, Decision, Phase, Rollout};
pub use sample::{identifier_hash, Components, IntervalSample, KpiCounts};

use crate::engine::{normalize_raw, RawIdentifier};
use crate::graph::GraphKey;
use crate::model::{Identifier, ShardId};
use crate::rules::RuleSet;

/// The KPI ledger's key for what a version would have done in the shadow.
pub fn shadow_key(version: &str) -> String {
    format!("shadow:{version}")
}

/// A merge made under some version, as a rollback lists it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MergeStamp {
    pub id: String,
    pub at_ms: i64,
    pub undone: bool,
}

impl MergeStamp {
    pub fn of(m: &crate::model::MergeRecord) -> MergeStamp {
        MergeStamp { id: m.id.clone(), at_ms: m.at_ms, undone: m.undone_at_ms.is_some() }
    }
}

/// The order a rollback undoes merges in: newest first, so that a merge
/// built on an earlier one is undone before it (oldest last).
pub fn rollback_order(merges: &mut [MergeStamp]) {
    merges.sort_by(|a, b| (b.at_ms, &b.id).cmp(&(a.at_ms, &a.id)));
}

/// The identifier an event is anchored by: of those that normalise under
/// `rules`, the one of highest priority, then smallest type and value.
pub fn anchor(rules: &RuleSet, ids: &[RawIdentifier]) -> Option<Identifier> {
    ids.iter()
        .filter_map(|raw| normalize_raw(rules, raw).map(|(rule, id)| (rule.priority, id)))
        .min_by(|a, b| (a.0, &a.1.kind, &a.1.value).cmp(&(b.0, &b.1.kind, &b.1.value)))
        .map(|(_, id)| id)
}

/// The shard whose version resolves an event with identifiers `ids`.
pub fn anchor_shard(rules: &RuleSet, ids: &[RawIdentifier], shard_count: u32) -> Option<ShardId> {
    anchor(rules, ids).map(|id| GraphKey::Owner(id).shard(shard_count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(kind: &str, value: &str) -> RawIdentifier {
        RawIdentifier { kind: kind.into(), value: value.into() }
    }

    #[test]
    fn the_anchor_is_the_valid_identifier_of_highest_priority_in_any_order() {
        let rules = RuleSet::builtin();
        let ids = [raw("cookie_id", "c-1"), raw("email", " Ann@Example.com "), raw("user_id", "u-7")];
        let top = rules.type_names().min_by_key(|t| rules.priority(t)).unwrap().to_string();
        let a = anchor(&rules, &ids).unwrap();
        assert_eq!(a.kind, top);
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(anchor(&rules, &reversed), Some(a));
        assert_eq!(anchor(&rules, &[raw("no_such_type", "x")]), None);
        assert!(anchor_shard(&rules, &ids, 16).is_some_and(|s| s.0 < 16));
    }

    #[test]
    fn a_rollback_undoes_the_newest_merge_first() {
        let stamp = |id: &str, at_ms| MergeStamp { id: id.into(), at_ms, undone: false };
        let mut merges = vec![stamp("m_a", 10), stamp("m_c", 30), stamp("m_b", 20), stamp("m_d", 30)];
        rollback_order(&mut merges);
        assert_eq!(merges.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m_d", "m_c", "m_b", "m_a"]);
    }
}
