//! The judge: canary against control over one step's sampling intervals.
//!
//! Per KPI it combines a plain threshold on the pooled values (is the
//! canary worse than control by more than the plan allows?) with a
//! Mann-Whitney U test over the per-interval values (is the difference
//! more than noise?), as Kayenta does: a breach that is significant fails
//! the KPI, a breach that is not is marginal. The score is the share of
//! judged KPIs that pass (a marginal one counts half). Before any of that,
//! the step must be judgeable: enough events on both sides, at least
//! [`MIN_INTERVALS`] intervals with events on each, and a traffic mix on
//! the canary shards like the control shards' (identifier types, sources,
//! events per shard). Otherwise the step is *inconclusive*, never passed.

use super::plan::{CanaryPlan, Direction, Kpi, KpiSpec};
use super::sample::{mix_distance, IntervalSample, KpiCounts};
use serde::{Deserialize, Serialize};
use statrs::stats_tests::mannwhitneyu::{mannwhitneyu, MannWhitneyUMethod};
use statrs::stats_tests::Alternative;

/// Intervals with events each side needs before a step is judged (with
/// four against four, the smallest one-sided p-value is 1/70).
pub const MIN_INTERVALS: usize = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KpiOutcome {
    Pass,
    /// Worse than the threshold allows, but not significantly.
    Marginal,
    /// Worse than the threshold allows, significantly.
    Fail,
    /// Too few intervals with a value on one side.
    NoData,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KpiJudgement {
    pub kpi: Kpi,
    /// Pooled over the step's intervals.
    pub canary: Option<f64>,
    pub control: Option<f64>,
    /// One-sided (two-sided for `either`) Mann-Whitney U p-value.
    pub p_value: Option<f64>,
    pub outcome: KpiOutcome,
    pub critical: bool,
}

/// How alike the traffic of canary and control was.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MixJudgement {
    pub type_distance: Option<f64>,
    pub source_distance: Option<f64>,
    /// Canary events per canary shard over control events per control shard.
    pub rate_ratio: Option<f64>,
    pub representative: bool,
    /// Why not, when not.
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Pass,
    /// Neither pass nor fail: a person decides (promote or abort).
    Marginal,
    Fail,
    /// Not judgeable yet: too little data or an unlike traffic mix.
    Inconclusive,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Pass => "pass",
            Verdict::Marginal => "marginal",
            Verdict::Fail => "fail",
            Verdict::Inconclusive => "inconclusive",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepJudgement {
    pub step: usize,
    pub at_ms: i64,
    pub canary_events: u64,
    pub control_events: u64,
    pub intervals: usize,
    /// Whether control came from earlier steps (the last step has no live
    /// control shards).
    pub historical_control: bool,
    /// A judgement of the shadow step (before the first step).
    #[serde(default)]
    pub shadow: bool,
    pub kpis: Vec<KpiJudgement>,
    pub mix: MixJudgement,
    pub score: f64,
    pub verdict: Verdict,
    pub reason: String,
}

/// How much worse `canary` is than `control` in the KPI's direction.
fn deterioration(direction: Direction, canary: f64, control: f64) -> f64 {
    match direction {
        Direction::LowerIsBetter => canary - control,
        Direction::HigherIsBetter => control - canary,
        Direction::Either => (canary - control).abs(),
    }
}

fn judge_kpi(spec: &KpiSpec, alpha: f64, canary: &[&KpiCounts], control: &[&KpiCounts]) -> KpiJudgement {
    let series = |side: &[&KpiCounts]| side.iter().filter_map(|c| c.value(spec.name)).filter(|v| v.is_finite()).collect::<Vec<f64>>();
    let pooled = |side: &[&KpiCounts]| {
        let mut sum = KpiCounts::default();
        side.iter().for_each(|c| sum.add(c));
        sum.value(spec.name)
    };
    let (xs, ys) = (series(canary), series(control));
    let (cv, kv) = (pooled(canary), pooled(control));
    let mut j =
        KpiJudgement { kpi: spec.name, canary: cv, control: kv, p_value: None, outcome: KpiOutcome::NoData, critical: spec.critical };
    let (Some(cv), Some(kv)) = (cv, kv) else { return j };
    if xs.len() < MIN_INTERVALS || ys.len() < MIN_INTERVALS {
        return j;
    }
    let alternative = match spec.direction {
        Direction::LowerIsBetter => Alternative::Greater,
        Direction::HigherIsBetter => Alternative::Less,
        Direction::Either => Alternative::TwoSided,
    };
    j.p_value = mannwhitneyu(&xs, &ys, MannWhitneyUMethod::Automatic, alternative).ok().map(|(_, p)| p);
    let allowed = (spec.threshold * kv.abs()).max(spec.floor);
    let breach = deterioration(spec.direction, cv, kv) > allowed;
    let significant = j.p_value.is_some_and(|p| p < alpha);
    j.outcome = match (breach, significant) {
        (false, _) => KpiOutcome::Pass,
        (true, true) => KpiOutcome::Fail,
        (true, false) => KpiOutcome::Marginal,
    };
    j
}

fn judge_mix(plan: &CanaryPlan, canary: &KpiCounts, control: &KpiCounts, rate_ratio: Option<f64>) -> MixJudgement {
    let type_distance = mix_distance(&canary.types, &control.types);
    let source_distance = mix_distance(&canary.sources, &control.sources);
    let mut reasons = Vec::new();
    if let Some(d) = type_distance.filter(|d| *d > plan.mix.max_type_distance) {
        reasons.push(format!("identifier types differ (distance {d:.2} > {:.2})", plan.mix.max_type_distance));
    }
    if let Some(d) = source_distance.filter(|d| *d > plan.mix.max_source_distance) {
        reasons.push(format!("event sources differ (distance {d:.2} > {:.2})", plan.mix.max_source_distance));
    }
    if let Some(r) = rate_ratio.filter(|r| *r > plan.mix.max_rate_ratio || *r * plan.mix.max_rate_ratio < 1.0) {
        reasons.push(format!("events per shard differ ({r:.2}x, allowed 1/{0} to {0})", plan.mix.max_rate_ratio));
    }
    MixJudgement { type_distance, source_distance, rate_ratio, representative: reasons.is_empty(), reason: reasons.join("; ") }
}

/// Judges step `step` of `plan` at `at_ms` over `samples` (every interval
/// recorded so far; those of the step are the canary's evidence, and
/// control comes from the same intervals or, when the step left no control
/// shard, from the earlier steps and the shadow).
pub fn judge(plan: &CanaryPlan, step: usize, samples: &[IntervalSample], at_ms: i64) -> StepJudgement {
    let here: Vec<&IntervalSample> = samples.iter().filter(|s| s.step == step && !s.shadow).collect();
    let canary: Vec<&KpiCounts> = here.iter().map(|s| &s.canary).filter(|c| !c.is_empty()).collect();
    let live_control: Vec<&KpiCounts> = here.iter().map(|s| &s.control).filter(|c| !c.is_empty()).collect();
    // Every shard on the candidate: stray control counts (events without a
    // valid anchor, nodes a moment behind the map) are not a control group.
    let historical_control = !here.is_empty() && here.iter().all(|s| s.canary_shards >= s.shard_count);
    let control: Vec<&KpiCounts> = if historical_control {
        // Not the shadow's intervals: its evaluations share the shards with
        // control's requests and would flatter the candidate's latency.
        samples.iter().filter(|s| s.step < step && !s.shadow).map(|s| &s.control).filter(|c| !c.is_empty()).collect()
    } else {
        live_control
    };
    let (canary_total, control_total) = (total(&canary), total(&control));
    // Events per shard: only comparable while both groups run side by side.
    let rate_ratio = if historical_control {
        None
    } else {
        let canary_shards: u32 = here.iter().map(|s| s.canary_shards).max().unwrap_or(0);
        let control_shards = here.iter().map(|s| s.shard_count.saturating_sub(s.canary_shards)).max().unwrap_or(0);
        (canary_shards > 0 && control_shards > 0 && control_total.events > 0)
            .then(|| (canary_total.events as f64 / canary_shards as f64) / (control_total.events as f64 / control_shards as f64))
    };
    let mix = judge_mix(plan, &canary_total, &control_total, rate_ratio);
    let evidence = Evidence { step, at_ms, intervals: here.len(), canary, control, historical_control, shadow: false };
    decide(plan, evidence, mix)
}

/// Judges the shadow step: what the candidate would have done with the
/// events it could evaluate (a sample of all events: those that found a
/// free slot and whose records were not locked) against what the cluster's
/// version did with every event. The traffic is the same, so there is no
/// mix to compare; latency is not measured in the shadow, and neither is
/// the error rate (a shadow evaluation that cannot read its records is
/// dropped, not counted as a failure, so the two sides' errors differ in
/// kind).
pub fn judge_shadow(plan: &CanaryPlan, samples: &[IntervalSample], at_ms: i64) -> StepJudgement {
    let here: Vec<&IntervalSample> = samples.iter().filter(|s| s.shadow).collect();
    let canary: Vec<&KpiCounts> = here.iter().map(|s| &s.canary).filter(|c| !c.is_empty()).collect();
    let control: Vec<&KpiCounts> = here.iter().map(|s| &s.control).filter(|c| !c.is_empty()).collect();
    let mix = MixJudgement {
        type_distance: None,
        source_distance: None,
        rate_ratio: None,
        representative: true,
        reason: "the shadow evaluated a sample of the events control resolved".into(),
    };
    let evidence = Evidence { step: 0, at_ms, intervals: here.len(), canary, control, historical_control: false, shadow: true };
    let mut shadow_plan = plan.clone();
    shadow_plan.kpis.retain(|k| !matches!(k.name, Kpi::ErrorRate | Kpi::IdentifyP99Ms));
    decide(&shadow_plan, evidence, mix)
}

fn total(side: &[&KpiCounts]) -> KpiCounts {
    let mut sum = KpiCounts::default();
    side.iter().for_each(|c| sum.add(c));
    sum
}

/// What a judgement rests on.
struct Evidence<'a> {
    step: usize,
    at_ms: i64,
    intervals: usize,
    canary: Vec<&'a KpiCounts>,
    control: Vec<&'a KpiCounts>,
    historical_control: bool,
    shadow: bool,
}

fn decide(plan: &CanaryPlan, e: Evidence<'_>, mix: MixJudgement) -> StepJudgement {
    let (canary, control) = (&e.canary, &e.control);
    let (canary_total, control_total) = (total(canary), total(control));
    let kpis: Vec<KpiJudgement> = plan.kpis.iter().map(|k| judge_kpi(k, plan.alpha, canary, control)).collect();
    let judged: Vec<&KpiJudgement> = kpis.iter().filter(|k| k.outcome != KpiOutcome::NoData).collect();
    let points: f64 = judged
        .iter()
        .map(|k| match k.outcome {
            KpiOutcome::Pass => 1.0,
            KpiOutcome::Marginal => 0.5,
            _ => 0.0,
        })
        .sum();
    let score = if judged.is_empty() { 0.0 } else { 100.0 * points / judged.len() as f64 };
    let min_events = plan.steps.get(e.step).map(|s| s.min_events).unwrap_or(0);
    let failed: Vec<String> = kpis.iter().filter(|k| k.outcome == KpiOutcome::Fail).map(|k| k.kpi.to_string()).collect();
    let critical_failed = kpis.iter().any(|k| k.critical && k.outcome == KpiOutcome::Fail);
    let (verdict, reason) = if canary.len() < MIN_INTERVALS || control.len() < MIN_INTERVALS {
        (
            Verdict::Inconclusive,
            format!(
                "too little data: {} canary and {} control intervals with events, {MIN_INTERVALS} needed on each side",
                canary.len(),
                control.len()
            ),
        )
    } else if canary_total.events < min_events || control_total.events < min_events {
        (
            Verdict::Inconclusive,
            format!(
                "too little data: {} canary and {} control events, {min_events} needed on each side",
                canary_total.events, control_total.events
            ),
        )
    } else if critical_failed {
        (Verdict::Fail, format!("critical KPI failed: {}", failed.join(", ")))
    } else if !mix.representative {
        (Verdict::Inconclusive, format!("the canary shards' traffic is not like the control shards': {}", mix.reason))
    } else if judged.is_empty() {
        (Verdict::Inconclusive, "no KPI had data on both sides".to_string())
    } else if score >= plan.score.pass {
        (Verdict::Pass, format!("score {score:.0} >= {:.0}", plan.score.pass))
    } else if score >= plan.score.marginal {
        (Verdict::Marginal, format!("score {score:.0} between {:.0} and {:.0}", plan.score.marginal, plan.score.pass))
    } else {
        (Verdict::Fail, format!("score {score:.0} < {:.0}; failed: {}", plan.score.marginal, failed.join(", ")))
    };
    StepJudgement {
        step: e.step,
        at_ms: e.at_ms,
        canary_events: canary_total.events,
        control_events: control_total.events,
        intervals: e.intervals,
        historical_control: e.historical_control,
        shadow: e.shadow,
        kpis,
        mix,
        score,
        verdict,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> CanaryPlan {
        CanaryPlan::from_toml(crate::canary::plan::tests::PLAN).unwrap()
    }

    fn counts(events: u64, merges: u64, largest: u64, types: &[(&str, u64)]) -> KpiCounts {
        let mut c = KpiCounts { events, merges, largest, ..Default::default() };
        for (t, n) in types {
            c.types.insert(t.to_string(), *n);
        }
        c.sources.insert("web".into(), events);
        c
    }

    fn step0(canary: impl Fn(usize) -> KpiCounts, control: impl Fn(usize) -> KpiCounts, n: usize) -> Vec<IntervalSample> {
        (0..n)
            .map(|i| IntervalSample {
                at_ms: i as i64 * 1000,
                step: 0,
                canary: canary(i),
                control: control(i),
                canary_shards: 1,
                shard_count: 4,
                shadow: false,
            })
            .collect()
    }

    const MIX: &[(&str, u64)] = &[("email", 20), ("cookie_id", 20)];

    #[test]
    fn a_candidate_like_control_passes() {
        let s = step0(|i| counts(20, 1 + (i % 2) as u64, 3, MIX), |i| counts(60, 3 + (i % 3) as u64, 3, MIX), 6);
        let j = judge(&plan(), 0, &s, 6000);
        assert_eq!(j.verdict, Verdict::Pass, "{j:?}");
        assert_eq!(j.score, 100.0);
    }

    #[test]
    fn a_candidate_that_merges_strangers_fails_on_its_critical_kpi() {
        let s = step0(|i| counts(20, 8 + (i % 3) as u64, 30 + i as u64, MIX), |i| counts(60, 3 + (i % 3) as u64, 3, MIX), 6);
        let j = judge(&plan(), 0, &s, 6000);
        assert_eq!(j.verdict, Verdict::Fail, "{j:?}");
        let merge = &j.kpis[0];
        assert_eq!(merge.outcome, KpiOutcome::Fail);
        assert!(merge.p_value.unwrap() < 0.05);
    }

    #[test]
    fn too_few_intervals_or_events_is_inconclusive_even_for_a_bad_candidate() {
        let s = step0(|_| counts(20, 15, 40, MIX), |_| counts(60, 3, 3, MIX), 3);
        assert_eq!(judge(&plan(), 0, &s, 3000).verdict, Verdict::Inconclusive);
        let s = step0(|_| counts(1, 0, 1, MIX), |_| counts(60, 3, 3, MIX), 6);
        let j = judge(&plan(), 0, &s, 6000);
        assert_eq!(j.verdict, Verdict::Inconclusive);
        assert!(j.reason.contains("6 canary"), "{}", j.reason);
    }

    #[test]
    fn an_unlike_traffic_mix_is_inconclusive_not_passed() {
        let s = step0(|_| counts(20, 1, 3, &[("phone", 40)]), |_| counts(60, 3, 3, MIX), 6);
        let j = judge(&plan(), 0, &s, 6000);
        assert_eq!(j.verdict, Verdict::Inconclusive, "{j:?}");
        assert!(j.reason.contains("identifier types differ"), "{}", j.reason);
        // Ten times the events per shard on the canary: unlike as well.
        let s = step0(|_| counts(200, 10, 3, MIX), |_| counts(60, 3, 3, MIX), 6);
        assert!(judge(&plan(), 0, &s, 6000).reason.contains("events per shard"));
    }

    #[test]
    fn a_breach_within_noise_is_marginal() {
        // Merge rate alike except one wild interval: pooled above the
        // threshold, but the ranks do not say the canary is worse.
        let s = step0(|i| counts(20, if i == 0 { 19 } else { 1 }, 3, MIX), |_| counts(60, 3, 3, MIX), 6);
        let j = judge(&plan(), 0, &s, 6000);
        assert_eq!(j.kpis[0].outcome, KpiOutcome::Marginal, "{j:?}");
        assert_eq!(j.verdict, Verdict::Marginal);
    }

    #[test]
    fn a_shadow_that_would_merge_strangers_fails_and_latency_is_not_judged_in_it() {
        let shadow = |merges: u64| {
            (0..6)
                .map(|i| IntervalSample {
                    at_ms: i,
                    step: 0,
                    canary: counts(40, merges, 3, MIX),
                    control: KpiCounts { latency: vec![5; 15], ..counts(40, 2, 3, MIX) },
                    canary_shards: 0,
                    shard_count: 4,
                    shadow: true,
                })
                .collect::<Vec<_>>()
        };
        let mut plan = plan();
        plan.kpis.push(KpiSpec {
            name: Kpi::IdentifyP99Ms,
            direction: Direction::LowerIsBetter,
            threshold: 0.1,
            floor: 0.0,
            critical: true,
        });
        let j = judge_shadow(&plan, &shadow(20), 6);
        assert!(j.shadow);
        assert_eq!(j.verdict, Verdict::Fail, "{j:?}");
        let good = judge_shadow(&plan, &shadow(2), 6);
        assert_eq!(good.verdict, Verdict::Pass, "{good:?}");
        assert!(good.kpis.iter().all(|k| k.kpi != Kpi::IdentifyP99Ms), "latency is not judged in the shadow");
        // Shadow intervals are not a step's evidence.
        assert_eq!(judge(&plan, 0, &shadow(20), 6).verdict, Verdict::Inconclusive);
    }

    #[test]
    fn the_last_step_is_judged_against_control_of_earlier_steps() {
        let mut s = step0(|_| counts(20, 1, 3, MIX), |_| counts(60, 3, 3, MIX), 6);
        for i in 0..6 {
            s.push(IntervalSample {
                at_ms: 10_000 + i,
                step: 2,
                canary: counts(80, 30, 50, MIX),
                // A straggler resolved under control: not a control group.
                control: if i == 0 { counts(1, 0, 1, MIX) } else { KpiCounts::default() },
                canary_shards: 4,
                shard_count: 4,
                shadow: false,
            });
        }
        let j = judge(&plan(), 2, &s, 20_000);
        assert!(j.historical_control);
        assert_eq!(j.verdict, Verdict::Fail, "{j:?}");
    }
}
