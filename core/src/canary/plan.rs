//! The canary plan: what an operator writes to roll a rule-set version out
//! (TOML), validated once like the node's configuration.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("canary plan is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("canary plan field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PlanError {
    PlanError::Invalid { field: field.into(), reason: reason.into() }
}

/// A key performance indicator, measured per sampling interval on the
/// events each rule-set version resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kpi {
    /// Merges per event.
    MergeRate,
    /// Identifiers refused by a type limit, per event.
    ConflictRate,
    /// New profiles per event.
    NewProfileRate,
    /// Identifiers of the largest profile an event left behind.
    LargestProfile,
    /// Identifiers of the profile an event left behind, on average.
    IdentifiersPerProfile,
    /// Failed identify calls per call.
    ErrorRate,
    /// 99th percentile of `Identify` latency, milliseconds (upper bound of
    /// its histogram bucket).
    IdentifyP99Ms,
}

impl Kpi {
    pub const ALL: [Kpi; 7] = [
        Kpi::MergeRate,
        Kpi::ConflictRate,
        Kpi::NewProfileRate,
        Kpi::LargestProfile,
        Kpi::IdentifiersPerProfile,
        Kpi::ErrorRate,
        Kpi::IdentifyP99Ms,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kpi::MergeRate => "merge_rate",
            Kpi::ConflictRate => "conflict_rate",
            Kpi::NewProfileRate => "new_profile_rate",
            Kpi::LargestProfile => "largest_profile",
            Kpi::IdentifiersPerProfile => "identifiers_per_profile",
            Kpi::ErrorRate => "error_rate",
            Kpi::IdentifyP99Ms => "identify_p99_ms",
        }
    }
}

impl std::fmt::Display for Kpi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Which way a KPI gets worse.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (merge rate, largest profile, errors, latency).
    LowerIsBetter,
    /// Lower is worse.
    HigherIsBetter,
    /// Any change beyond the threshold is worse.
    Either,
}

/// One KPI of the plan and how much worse the canary may be.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KpiSpec {
    pub name: Kpi,
    pub direction: Direction,
    /// Largest allowed deterioration relative to the control value
    /// (0.25: 25 % worse).
    pub threshold: f64,
    /// Deterioration always allowed, in the KPI's unit (for KPIs whose
    /// control value is near zero).
    #[serde(default)]
    pub floor: f64,
    /// A critical KPI that fails fails the step whatever the score.
    #[serde(default)]
    pub critical: bool,
}

/// One step of the rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Canary shards as a count...
    #[serde(default)]
    pub shards: Option<u32>,
    /// ...or as a share of all shards (rounded up).
    #[serde(default)]
    pub percent: Option<u32>,
    /// Events each of canary and control must have resolved in the step
    /// before it is judged.
    #[serde(default)]
    pub min_events: u64,
    /// How long the step runs before it is judged (and again after an
    /// inconclusive judgement).
    pub bake_secs: u64,
    /// Wait for `idgraphctl canary promote` after the step passes.
    #[serde(default)]
    pub manual: bool,
}

/// The overall score's bounds (0 to 100).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScoreSpec {
    #[serde(default = "default_pass")]
    pub pass: f64,
    #[serde(default = "default_marginal")]
    pub marginal: f64,
}

fn default_pass() -> f64 {
    95.0
}
fn default_marginal() -> f64 {
    75.0
}

impl Default for ScoreSpec {
    fn default() -> Self {
        ScoreSpec { pass: default_pass(), marginal: default_marginal() }
    }
}

/// How alike canary and control traffic must be for a step to be judged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixSpec {
    /// Largest total variation distance between the identifier-type mixes.
    #[serde(default = "default_type_distance")]
    pub max_type_distance: f64,
    /// Largest total variation distance between the event-source mixes.
    #[serde(default = "default_source_distance")]
    pub max_source_distance: f64,
    /// Largest ratio of events per shard between the two groups (either way).
    #[serde(default = "default_rate_ratio")]
    pub max_rate_ratio: f64,
}

fn default_type_distance() -> f64 {
    0.15
}
fn default_source_distance() -> f64 {
    0.25
}
fn default_rate_ratio() -> f64 {
    2.0
}

impl Default for MixSpec {
    fn default() -> Self {
        MixSpec {
            max_type_distance: default_type_distance(),
            max_source_distance: default_source_distance(),
            max_rate_ratio: default_rate_ratio(),
        }
    }
}

/// A canary plan as written in TOML.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryPlan {
    /// What the change is for, in words (it opens the report).
    pub objective: String,
    /// The rule-set version rolled out (stored beforehand).
    pub candidate: String,
    /// Length of one sampling interval.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Significance level of the per-KPI Mann-Whitney U tests.
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    /// After the last step, how long a KPI breach still rolls back.
    #[serde(default)]
    pub watch_secs: u64,
    /// Before the first step, how long the candidate runs in the shadow of
    /// the cluster's version on every shard, writing nothing (0: no shadow
    /// step).
    #[serde(default)]
    pub shadow_secs: u64,
    pub steps: Vec<StepSpec>,
    pub kpis: Vec<KpiSpec>,
    #[serde(default)]
    pub score: ScoreSpec,
    #[serde(default)]
    pub mix: MixSpec,
}

fn default_interval() -> u64 {
    10
}
fn default_alpha() -> f64 {
    0.05
}

impl CanaryPlan {
    pub fn from_toml(text: &str) -> Result<CanaryPlan, PlanError> {
        let plan: CanaryPlan = toml::from_str(text)?;
        plan.validate()?;
        Ok(plan)
    }

    pub fn validate(&self) -> Result<(), PlanError> {
        if self.objective.trim().is_empty() {
            return Err(invalid("objective", "say in words what the change is for"));
        }
        if self.candidate.trim().is_empty() {
            return Err(invalid("candidate", "name the rule-set version to roll out"));
        }
        if !(1..=3600).contains(&self.interval_secs) {
            return Err(invalid("interval_secs", "must be 1 to 3600"));
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            return Err(invalid("alpha", "must be above 0 and below 0.5"));
        }
        if self.watch_secs > 30 * 86_400 {
            return Err(invalid("watch_secs", "must be at most 30 days"));
        }
        if self.shadow_secs > 0 && !(self.interval_secs..=7 * 86_400).contains(&self.shadow_secs) {
            return Err(invalid("shadow_secs", "must be 0 (no shadow step) or one sampling interval to 7 days"));
        }
        if self.steps.len() < 2 {
            return Err(invalid("steps", "at least two steps are required: a canary step with control shards, then `percent = 100`"));
        }
        let mut last = 0.0;
        for (i, s) in self.steps.iter().enumerate() {
            let field = format!("steps[{i}]");
            let share = match (s.shards, s.percent) {
                (Some(0), None) => return Err(invalid(format!("{field}.shards"), "must be at least 1")),
                (Some(n), None) => n as f64 / 1e6,
                (None, Some(p)) if (1..=100).contains(&p) => p as f64 / 100.0,
                (None, Some(_)) => return Err(invalid(format!("{field}.percent"), "must be 1 to 100")),
                _ => return Err(invalid(field, "give exactly one of `shards` and `percent`")),
            };
            if share < last {
                return Err(invalid(field, "steps must not shrink the canary"));
            }
            last = share;
            if !(1..=7 * 86_400).contains(&s.bake_secs) {
                return Err(invalid(format!("{field}.bake_secs"), "must be 1 s to 7 days"));
            }
            if s.bake_secs < self.interval_secs {
                return Err(invalid(format!("{field}.bake_secs"), "must be at least one sampling interval (`interval_secs`)"));
            }
        }
        if self.steps.last().and_then(|s| s.percent) != Some(100) {
            return Err(invalid(format!("steps[{}].percent", self.steps.len() - 1), "the last step must be `percent = 100`"));
        }
        if self.kpis.is_empty() {
            return Err(invalid("kpis", "at least one KPI is required"));
        }
        for (i, k) in self.kpis.iter().enumerate() {
            let field = format!("kpis[{i}]");
            if self.kpis[..i].iter().any(|o| o.name == k.name) {
                return Err(invalid(format!("{field}.name"), format!("{} is listed twice", k.name)));
            }
            if !(k.threshold.is_finite() && k.threshold >= 0.0) {
                return Err(invalid(format!("{field}.threshold"), "must be a number of at least 0"));
            }
            if !(k.floor.is_finite() && k.floor >= 0.0) {
                return Err(invalid(format!("{field}.floor"), "must be a number of at least 0"));
            }
        }
        let bounded = |v: f64| v.is_finite() && (0.0..=100.0).contains(&v);
        if !bounded(self.score.pass) || !bounded(self.score.marginal) || self.score.marginal > self.score.pass {
            return Err(invalid("score", "need 0 <= marginal <= pass <= 100"));
        }
        let share = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !share(self.mix.max_type_distance) {
            return Err(invalid("mix.max_type_distance", "must be 0 to 1"));
        }
        if !share(self.mix.max_source_distance) {
            return Err(invalid("mix.max_source_distance", "must be 0 to 1"));
        }
        if !(self.mix.max_rate_ratio.is_finite() && self.mix.max_rate_ratio >= 1.0) {
            return Err(invalid("mix.max_rate_ratio", "must be at least 1"));
        }
        Ok(())
    }

    /// Canary shards of step `step` in a cluster of `shard_count` shards:
    /// at least one, and all of them only at the last step.
    pub fn shards_at(&self, step: usize, shard_count: u32) -> u32 {
        let Some(s) = self.steps.get(step) else { return shard_count };
        if step + 1 == self.steps.len() {
            return shard_count;
        }
        let n = match (s.shards, s.percent) {
            (Some(n), _) => n,
            (_, Some(p)) => (p * shard_count).div_ceil(100),
            _ => 1,
        };
        n.clamp(1, shard_count.saturating_sub(1).max(1))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const PLAN: &str = r#"
objective = "block the placeholder user id 'guest'"
candidate = "v2"
interval_secs = 1
steps = [
  { shards = 1, bake_secs = 5, min_events = 10 },
  { percent = 50, bake_secs = 5 },
  { percent = 100, bake_secs = 5 },
]
kpis = [
  { name = "merge_rate", direction = "lower_is_better", threshold = 0.5, floor = 0.02, critical = true },
  { name = "largest_profile", direction = "lower_is_better", threshold = 1.0, floor = 2 },
]
"#;

    #[test]
    fn the_example_plan_is_valid() {
        let p = CanaryPlan::from_toml(include_str!("../../../examples/canary-plan.toml")).unwrap();
        assert_eq!((p.steps.len(), p.kpis.len(), p.shadow_secs), (4, 7, 600));
    }

    #[test]
    fn a_plan_parses_and_sizes_its_steps() {
        let p = CanaryPlan::from_toml(PLAN).unwrap();
        assert_eq!(p.steps.len(), 3);
        assert_eq!((p.shards_at(0, 8), p.shards_at(1, 8), p.shards_at(2, 8)), (1, 4, 8));
        // A step short of the last never takes every shard: control stays.
        assert_eq!(p.shards_at(1, 2), 1);
    }

    fn error_field(text: &str) -> String {
        match CanaryPlan::from_toml(text) {
            Err(PlanError::Invalid { field, .. }) => field,
            other => panic!("expected a field error, got {other:?}"),
        }
    }

    #[test]
    fn bad_plans_name_the_field() {
        assert_eq!(error_field(&PLAN.replace("candidate = \"v2\"", "candidate = \" \"")), "candidate");
        assert_eq!(error_field(&PLAN.replace("{ percent = 100, bake_secs = 5 }", "{ percent = 90, bake_secs = 5 }")), "steps[2].percent");
        assert_eq!(error_field(&PLAN.replace("{ percent = 50, bake_secs = 5 }", "{ bake_secs = 5 }")), "steps[1]");
        assert_eq!(error_field(&PLAN.replace("threshold = 1.0", "threshold = -1.0")), "kpis[1].threshold");
        assert_eq!(error_field(&PLAN.replace("largest_profile", "merge_rate")), "kpis[1].name");
        assert_eq!(error_field(&PLAN.replace("interval_secs = 1", "interval_secs = 10")), "steps[0].bake_secs");
        let one_step = PLAN.replace("  { shards = 1, bake_secs = 5, min_events = 10 },\n  { percent = 50, bake_secs = 5 },\n", "");
        assert_eq!(error_field(&one_step), "steps");
        assert!(matches!(CanaryPlan::from_toml(&PLAN.replace("merge_rate", "merge_speed")), Err(PlanError::Parse(_))));
    }
}
