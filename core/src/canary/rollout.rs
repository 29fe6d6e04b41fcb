//! A rollout's replicated state and its transitions. The metadata group
//! applies [`CanaryCommand`]s through [`Rollout::apply`], a pure function:
//! every replica holds the same rollout, and whoever leads the group next
//! continues it where it stood.

use super::judge::{StepJudgement, Verdict};
use super::plan::CanaryPlan;
use super::sample::IntervalSample;
use crate::model::ShardId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a rollout stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Before the first step: the candidate resolves every event beside
    /// the cluster's version, writing nothing.
    Shadow,
    /// The current step runs and is judged once it has baked.
    Baking,
    /// The step passed (or was marginal) and waits for `canary promote`.
    AwaitingPromotion,
    /// Every shard runs the candidate; a KPI breach still rolls back until
    /// `watch_until_ms`.
    Watching,
    /// Canary shards are back on the control version; merges made under
    /// the candidate are being undone.
    RollingBack,
    /// Finished: the candidate is the cluster's version.
    Promoted,
    /// Finished: the candidate is gone and its merges are undone.
    RolledBack,
}

impl Phase {
    pub fn is_finished(&self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Shadow => "shadow",
            Phase::Baking => "baking",
            Phase::AwaitingPromotion => "awaiting promotion",
            Phase::Watching => "watching",
            Phase::RollingBack => "rolling back",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled back",
        }
    }
}

/// One line of a rollout's history.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at_ms: i64,
    pub text: String,
}

/// The replicated state of one rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    pub id: String,
    pub plan: CanaryPlan,
    /// The plan as the operator wrote it.
    pub plan_toml: String,
    /// The version the rest of the cluster runs.
    pub control: String,
    pub shard_count: u32,
    pub started_ms: i64,
    pub step: usize,
    pub step_started_ms: i64,
    /// When the coordinator judges the step next.
    pub judge_at_ms: i64,
    pub watch_until_ms: Option<i64>,
    pub phase: Phase,
    pub samples: Vec<IntervalSample>,
    pub judgements: Vec<StepJudgement>,
    pub history: Vec<Decision>,
    /// Merges made under the candidate that the rollback undid.
    pub merges_undone: u64,
    #[serde(default)]
    pub merges_skipped: u64,
    pub finished_ms: Option<i64>,
}

/// A change of the rollout (an entry of the metadata group's log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CanaryCommand {
    Start {
        id: String,
        plan_toml: String,
        control: String,
        shard_count: u32,
        at_ms: i64,
    },
    Sample {
        id: String,
        sample: IntervalSample,
    },
    Judged {
        id: String,
        judgement: StepJudgement,
    },
    /// Widens a step waiting for a person, or one judged inconclusive (an
    /// operator's override); `step` (from 0), when given, must be the
    /// current one, so a late retry never passes a later gate.
    Promote {
        id: String,
        step: Option<usize>,
        at_ms: i64,
    },
    Abort {
        id: String,
        reason: String,
        at_ms: i64,
    },
    /// The rollback has undone `merges` merges in all; `skipped` could not
    /// be undone (their profiles were erased or their identifiers moved on).
    Undone {
        id: String,
        merges: u64,
        skipped: u64,
    },
    /// Ends a rollback, or a watch window that ran out.
    Finish {
        id: String,
        at_ms: i64,
    },
}

impl CanaryCommand {
    pub fn rollout_id(&self) -> &str {
        match self {
            CanaryCommand::Start { id, .. }
            | CanaryCommand::Sample { id, .. }
            | CanaryCommand::Judged { id, .. }
            | CanaryCommand::Promote { id, .. }
            | CanaryCommand::Abort { id, .. }
            | CanaryCommand::Undone { id, .. }
            | CanaryCommand::Finish { id, .. } => id,
        }
    }
}

/// Why a rollout command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CanaryRefusal {
    #[error("canary plan field `{field}`: {reason}")]
    InvalidPlan { field: String, reason: String },
    #[error("rollout {running} is under way; one rollout runs at a time")]
    Running { running: String },
    #[error("no rollout is under way")]
    NoneRunning,
    #[error("rollout {0} is not the one under way")]
    NotCurrent(String),
    #[error("rollout {id} is {phase}: {reason}")]
    WrongPhase { id: String, phase: String, reason: String },
    /// The cluster cannot run a rollout as it is.
    #[error("{0}")]
    Cluster(String),
}

impl Rollout {
    /// A new rollout at its first step; `known` says whether a rule-set
    /// version is stored.
    pub fn start(cmd: &CanaryCommand, known: impl Fn(&str) -> bool) -> Result<Rollout, CanaryRefusal> {
        let CanaryCommand::Start { id, plan_toml, control, shard_count, at_ms } = cmd else {
            return Err(CanaryRefusal::NoneRunning);
        };
        let plan = CanaryPlan::from_toml(plan_toml).map_err(|e| match e {
            super::plan::PlanError::Invalid { field, reason } => CanaryRefusal::InvalidPlan { field, reason },
            e @ super::plan::PlanError::Parse(_) => CanaryRefusal::InvalidPlan { field: "<root>".into(), reason: e.to_string() },
        })?;
        let refuse = |reason: String| Err(CanaryRefusal::InvalidPlan { field: "candidate".into(), reason });
        if !known(&plan.candidate) {
            return refuse(format!("no rule set version {:?} is stored (`idgraphctl rules put` it first)", plan.candidate));
        }
        if plan.candidate == *control {
            return refuse(format!("{:?} is already the cluster's version", plan.candidate));
        }
        if control.is_empty() || !known(control) {
            return Err(CanaryRefusal::Cluster("the cluster has no stored rule-set version yet to compare against".into()));
        }
        if *shard_count < 2 {
            return Err(CanaryRefusal::Cluster("a canary needs at least two shards, one canary and one control".into()));
        }
        let shadow = plan.shadow_secs > 0;
        let bake = if shadow { plan.shadow_secs } else { plan.steps[0].bake_secs } as i64 * 1000;
        let mut r = Rollout {
            id: id.clone(),
            plan,
            plan_toml: plan_toml.clone(),
            control: control.clone(),
            shard_count: *shard_count,
            started_ms: *at_ms,
            step: 0,
            step_started_ms: *at_ms,
            judge_at_ms: at_ms + bake,
            watch_until_ms: None,
            phase: if shadow { Phase::Shadow } else { Phase::Baking },
            samples: Vec::new(),
            judgements: Vec::new(),
            history: Vec::new(),
            merges_undone: 0,
            merges_skipped: 0,
            finished_ms: None,
        };
        let text = if shadow {
            format!("started: {} in the shadow of {} on every shard for {} s", r.plan.candidate, r.control, r.plan.shadow_secs)
        } else {
            format!("started: {} on {} of {} shards, control {}", r.plan.candidate, r.canary_count(), r.shard_count, r.control)
        };
        r.note(*at_ms, text);
        Ok(r)
    }

    fn note(&mut self, at_ms: i64, text: String) {
        self.history.push(Decision { at_ms, text });
    }

    /// Canary shards at the current step.
    pub fn canary_count(&self) -> u32 {
        match self.phase {
            Phase::Shadow => 0,
            _ => self.plan.shards_at(self.step, self.shard_count),
        }
    }

    /// The version evaluated in the shadow of the cluster's, if any.
    pub fn shadow(&self) -> Option<&str> {
        (self.phase == Phase::Shadow).then_some(self.plan.candidate.as_str())
    }

    /// The version each shard runs while this rollout stands (shards not
    /// listed run the control version).
    pub fn assignments(&self) -> BTreeMap<ShardId, String> {
        match self.phase {
            Phase::Baking | Phase::AwaitingPromotion | Phase::Watching => {
                (0..self.canary_count()).map(|s| (ShardId(s), self.plan.candidate.clone())).collect()
            }
            Phase::Shadow | Phase::RollingBack | Phase::Promoted | Phase::RolledBack => BTreeMap::new(),
        }
    }

    fn running(&self) -> bool {
        !self.phase.is_finished() && self.phase != Phase::RollingBack
    }

    fn wrong_phase(&self, reason: &str) -> CanaryRefusal {
        CanaryRefusal::WrongPhase { id: self.id.clone(), phase: self.phase.name().into(), reason: reason.into() }
    }

    /// Moves to the next step, or past the last one.
    fn advance(&mut self, at_ms: i64) {
        if self.phase == Phase::Shadow {
            self.phase = Phase::Baking;
            self.step_started_ms = at_ms;
            self.judge_at_ms = at_ms + self.plan.steps[0].bake_secs as i64 * 1000;
            let text = format!("out of the shadow: step 1, {} of {} shards", self.canary_count(), self.shard_count);
            self.note(at_ms, text);
        } else if self.step + 1 < self.plan.steps.len() {
            self.step += 1;
            self.step_started_ms = at_ms;
            self.judge_at_ms = at_ms + self.plan.steps[self.step].bake_secs as i64 * 1000;
            self.phase = Phase::Baking;
            let text = format!("widened to step {}: {} of {} shards", self.step + 1, self.canary_count(), self.shard_count);
            self.note(at_ms, text);
        } else if self.plan.watch_secs > 0 && self.phase != Phase::Watching {
            self.phase = Phase::Watching;
            self.watch_until_ms = Some(at_ms + self.plan.watch_secs as i64 * 1000);
            self.judge_at_ms = at_ms + self.plan.interval_secs as i64 * 1000;
            let text = format!("every shard runs {}; watching for {} s", self.plan.candidate, self.plan.watch_secs);
            self.note(at_ms, text);
        } else {
            self.phase = Phase::Promoted;
            self.finished_ms = Some(at_ms);
            let text = format!("promoted: {} is the cluster's version", self.plan.candidate);
            self.note(at_ms, text);
        }
    }

    fn roll_back(&mut self, at_ms: i64, reason: String) {
        self.phase = Phase::RollingBack;
        self.note(at_ms, format!("rolling back: {reason}"));
    }

    /// Applies a command to the rollout under way.
    pub fn apply(&mut self, cmd: &CanaryCommand) -> Result<(), CanaryRefusal> {
        if cmd.rollout_id() != self.id {
            return Err(CanaryRefusal::NotCurrent(cmd.rollout_id().to_string()));
        }
        match cmd {
            CanaryCommand::Start { .. } => return Err(CanaryRefusal::Running { running: self.id.clone() }),
            CanaryCommand::Sample { sample, .. } => {
                if !self.phase.is_finished() {
                    self.samples.push(sample.clone());
                }
            }
            CanaryCommand::Judged { judgement, .. } => {
                let j = judgement.clone();
                let shadow = self.phase == Phase::Shadow;
                if !matches!(self.phase, Phase::Shadow | Phase::Baking | Phase::Watching) || j.step != self.step || j.shadow != shadow {
                    return Err(self.wrong_phase("the judgement is for a step not being judged"));
                }
                let at = j.at_ms;
                let what = if shadow { "shadow".to_string() } else { format!("step {}", j.step + 1) };
                let text = format!("{what} judged {}: {}", j.verdict, j.reason);
                self.note(at, text);
                self.judgements.push(j.clone());
                let watching = self.phase == Phase::Watching;
                match j.verdict {
                    Verdict::Fail => self.roll_back(at, format!("{what} failed: {}", j.reason)),
                    _ if watching => self.judge_at_ms = at + self.plan.interval_secs as i64 * 1000,
                    Verdict::Pass if shadow => self.advance(at),
                    // A person may promote out of the shadow, or abort.
                    Verdict::Marginal | Verdict::Inconclusive if shadow => {
                        self.judge_at_ms = at + self.plan.shadow_secs as i64 * 1000;
                    }
                    Verdict::Pass if self.plan.steps[self.step].manual => {
                        self.phase = Phase::AwaitingPromotion;
                        self.note(at, "waiting for `idgraphctl canary promote` (manual gate)".into());
                    }
                    Verdict::Pass => self.advance(at),
                    Verdict::Marginal => {
                        self.phase = Phase::AwaitingPromotion;
                        self.note(at, "marginal: waiting for `idgraphctl canary promote` or `abort`".into());
                    }
                    Verdict::Inconclusive => self.judge_at_ms = at + self.plan.steps[self.step].bake_secs as i64 * 1000,
                }
            }
            CanaryCommand::Promote { step, at_ms, .. } => {
                let shadow = self.phase == Phase::Shadow;
                let held = |j: &StepJudgement| {
                    j.step == self.step
                        && j.shadow == shadow
                        && (j.verdict == Verdict::Inconclusive || (shadow && j.verdict == Verdict::Marginal))
                };
                let inconclusive = matches!(self.phase, Phase::Baking | Phase::Shadow) && self.judgements.last().is_some_and(held);
                if self.phase != Phase::AwaitingPromotion && !inconclusive {
                    return Err(self.wrong_phase("only a step waiting for promotion, or judged inconclusive, can be promoted"));
                }
                // A step names a step of the rollout, never the shadow.
                if step.is_some_and(|s| s != self.step || shadow) {
                    return Err(self.wrong_phase(&format!(
                        "step {} is the current step, not step {}",
                        self.step + 1,
                        step.unwrap_or(0) + 1
                    )));
                }
                let what = if shadow { "the shadow".to_string() } else { format!("step {}", self.step + 1) };
                self.note(*at_ms, format!("{what} promoted by an operator"));
                self.advance(*at_ms);
            }
            CanaryCommand::Abort { reason, at_ms, .. } => {
                if !self.running() {
                    return Err(self.wrong_phase("only a running rollout can be aborted"));
                }
                self.roll_back(*at_ms, format!("aborted: {reason}"));
            }
            CanaryCommand::Undone { merges, skipped, .. } => {
                if self.phase != Phase::RollingBack {
                    return Err(self.wrong_phase("merges are undone only while rolling back"));
                }
                self.merges_undone = *merges;
                self.merges_skipped = *skipped;
            }
            CanaryCommand::Finish { at_ms, .. } => match self.phase {
                Phase::RollingBack => {
                    self.phase = Phase::RolledBack;
                    self.finished_ms = Some(*at_ms);
                    let text = format!(
                        "rolled back: every shard runs {}; {} merges made under {} undone, {} could not be",
                        self.control, self.merges_undone, self.plan.candidate, self.merges_skipped
                    );
                    self.note(*at_ms, text);
                }
                Phase::Watching if self.watch_until_ms.is_some_and(|w| *at_ms >= w) => self.advance(*at_ms),
                _ => return Err(self.wrong_phase("only a rollback or an ended watch window finishes")),
            },
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::canary::judge::{MixJudgement, StepJudgement};

    fn start(plan: &str) -> Rollout {
        let cmd = CanaryCommand::Start { id: "r1".into(), plan_toml: plan.into(), control: "v1".into(), shard_count: 8, at_ms: 0 };
        Rollout::start(&cmd, |v| v == "v1" || v == "v2").unwrap()
    }

    fn judged(r: &Rollout, verdict: Verdict, at_ms: i64) -> CanaryCommand {
        let judgement = StepJudgement {
            step: r.step,
            at_ms,
            canary_events: 0,
            control_events: 0,
            intervals: 0,
            historical_control: false,
            shadow: r.phase == Phase::Shadow,
            kpis: vec![],
            mix: MixJudgement { type_distance: None, source_distance: None, rate_ratio: None, representative: true, reason: String::new() },
            score: 0.0,
            verdict,
            reason: "test".into(),
        };
        CanaryCommand::Judged { id: r.id.clone(), judgement }
    }

    const PLAN: &str = crate::canary::plan::tests::PLAN;

    #[test]
    fn passing_steps_widen_to_every_shard_and_promote() {
        let mut r = start(PLAN);
        assert_eq!(r.assignments().len(), 1);
        r.apply(&judged(&r, Verdict::Pass, 5_000)).unwrap();
        assert_eq!((r.step, r.assignments().len()), (1, 4));
        r.apply(&judged(&r, Verdict::Inconclusive, 10_000)).unwrap();
        assert_eq!((r.step, r.judge_at_ms), (1, 15_000));
        r.apply(&judged(&r, Verdict::Pass, 15_000)).unwrap();
        assert_eq!((r.step, r.assignments().len()), (2, 8));
        r.apply(&judged(&r, Verdict::Pass, 20_000)).unwrap();
        assert_eq!(r.phase, Phase::Promoted);
        assert!(r.assignments().is_empty());
    }

    #[test]
    fn a_failed_step_rolls_back_and_finishes_after_the_undo() {
        let mut r = start(PLAN);
        r.apply(&judged(&r, Verdict::Fail, 5_000)).unwrap();
        assert_eq!(r.phase, Phase::RollingBack);
        assert!(r.assignments().is_empty(), "canary shards return to control at once");
        // Totals: a coordinator that reports twice does not count twice.
        r.apply(&CanaryCommand::Undone { id: "r1".into(), merges: 3, skipped: 0 }).unwrap();
        r.apply(&CanaryCommand::Undone { id: "r1".into(), merges: 3, skipped: 0 }).unwrap();
        r.apply(&CanaryCommand::Finish { id: "r1".into(), at_ms: 6_000 }).unwrap();
        assert_eq!((r.phase.clone(), r.merges_undone), (Phase::RolledBack, 3));
    }

    #[test]
    fn a_manual_gate_or_a_marginal_step_waits_for_promotion() {
        let mut r = start(&PLAN.replace("{ shards = 1, bake_secs = 5, min_events = 10 }", "{ shards = 1, bake_secs = 5, manual = true }"));
        r.apply(&judged(&r, Verdict::Pass, 5_000)).unwrap();
        assert_eq!(r.phase, Phase::AwaitingPromotion);
        r.apply(&CanaryCommand::Promote { id: "r1".into(), step: Some(0), at_ms: 7_000 }).unwrap();
        assert_eq!((r.step, r.phase.clone()), (1, Phase::Baking));
        r.apply(&judged(&r, Verdict::Marginal, 12_000)).unwrap();
        assert_eq!(r.phase, Phase::AwaitingPromotion);
        // A late retry of the first promotion does not pass this gate.
        let late = CanaryCommand::Promote { id: "r1".into(), step: Some(0), at_ms: 13_000 };
        assert!(matches!(r.apply(&late), Err(CanaryRefusal::WrongPhase { .. })));
        assert_eq!(r.step, 1);
    }

    #[test]
    fn a_shadow_step_comes_first_writes_nothing_and_can_stop_the_rollout() {
        let shadowed = PLAN.replace("interval_secs = 1", "interval_secs = 1\nshadow_secs = 4");
        let mut r = start(&shadowed);
        assert_eq!((r.phase.clone(), r.shadow(), r.assignments().len(), r.judge_at_ms), (Phase::Shadow, Some("v2"), 0, 4_000));
        r.apply(&judged(&r, Verdict::Inconclusive, 4_000)).unwrap();
        assert_eq!((r.phase.clone(), r.judge_at_ms), (Phase::Shadow, 8_000));
        r.apply(&judged(&r, Verdict::Pass, 8_000)).unwrap();
        assert_eq!((r.phase.clone(), r.step, r.shadow(), r.assignments().len()), (Phase::Baking, 0, None, 1));
        let mut bad = start(&shadowed);
        bad.apply(&judged(&bad, Verdict::Fail, 4_000)).unwrap();
        assert_eq!(bad.phase, Phase::RollingBack);
        assert!(bad.assignments().is_empty());
    }

    #[test]
    fn an_operator_may_promote_past_an_inconclusive_step_only() {
        let mut r = start(PLAN);
        let promote = CanaryCommand::Promote { id: "r1".into(), step: None, at_ms: 6_000 };
        assert!(r.apply(&promote).is_err(), "a step not judged yet is not promoted");
        r.apply(&judged(&r, Verdict::Inconclusive, 5_000)).unwrap();
        r.apply(&promote).unwrap();
        assert_eq!((r.step, r.phase.clone()), (1, Phase::Baking));
    }

    #[test]
    fn a_watch_window_still_rolls_back_on_a_breach() {
        let mut r = start(&PLAN.replace("interval_secs = 1", "interval_secs = 1\nwatch_secs = 60"));
        for at in [5_000, 10_000, 15_000] {
            r.apply(&judged(&r, Verdict::Pass, at)).unwrap();
        }
        assert_eq!(r.phase, Phase::Watching);
        assert!(r.apply(&CanaryCommand::Finish { id: "r1".into(), at_ms: 16_000 }).is_err(), "the window has not ended");
        r.apply(&judged(&r, Verdict::Fail, 20_000)).unwrap();
        assert_eq!(r.phase, Phase::RollingBack);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut r = start(PLAN);
        let before = r.clone();
        let promote = CanaryCommand::Promote { id: "r1".into(), step: None, at_ms: 1 };
        assert!(matches!(r.apply(&promote), Err(CanaryRefusal::WrongPhase { .. })));
        assert!(matches!(r.apply(&CanaryCommand::Finish { id: "r1".into(), at_ms: 1 }), Err(CanaryRefusal::WrongPhase { .. })));
        assert!(matches!(
            r.apply(&CanaryCommand::Abort { id: "other".into(), reason: "x".into(), at_ms: 1 }),
            Err(CanaryRefusal::NotCurrent(_))
        ));
        assert_eq!(r, before);
        let unknown = CanaryCommand::Start {
            id: "r2".into(),
            plan_toml: PLAN.replace("\"v2\"", "\"v9\""),
            control: "v1".into(),
            shard_count: 8,
            at_ms: 0,
        };
        assert!(matches!(Rollout::start(&unknown, |v| v == "v1"), Err(CanaryRefusal::InvalidPlan { field, .. }) if field == "candidate"));
        let one_shard = CanaryCommand::Start { id: "r2".into(), plan_toml: PLAN.into(), control: "v1".into(), shard_count: 1, at_ms: 0 };
        assert!(matches!(Rollout::start(&one_shard, |_| true), Err(CanaryRefusal::Cluster(_))));
        let no_control = CanaryCommand::Start { id: "r2".into(), plan_toml: PLAN.into(), control: String::new(), shard_count: 4, at_ms: 0 };
        assert!(matches!(Rollout::start(&no_control, |_| true), Err(CanaryRefusal::Cluster(_))));
    }
}
