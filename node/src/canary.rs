//! The canary coordinator: the I/O shell around [`idgraph_core::canary`].
//!
//! One task per node ([`spawn`]) acts only while its node leads the
//! metadata group, twice a second:
//! 1. read the rollout under way (linearizable), if any;
//! 2. at the end of each sampling interval, collect every node's KPI counts
//!    (in the shadow step, what the candidate would have done with each
//!    event, evaluated by the event's coordinator over the records the
//!    event read, beside what the cluster's version did)
//!    (each node's router counts the events each version resolved; asking
//!    resets them) and record the candidate's and control's sums as one
//!    [`IntervalSample`]; the first collection after this node took over,
//!    or after the step changed, only resets the counts, so an interval
//!    never mixes two steps or two coordinators;
//! 3. once the step has baked, judge it ([`judge()`]) and record the
//!    judgement, which widens, waits, bakes again or rolls back (the
//!    transition is [`idgraph_core::canary::Rollout::apply`]'s);
//! 4. while rolling back, after a grace period that lets every node see the
//!    canary shards back on the control version, undo the merges made under
//!    the candidate since the rollout started, newest first, through their
//!    lineage (an unmerge, run under the control version), then finish.
//!
//! Every step is recorded in the metadata group before it takes effect, and
//! each is safe to repeat: a new leader resumes the rollout where the log
//! says it stood (undone merges are marked undone, so a second pass skips
//! them).

use crate::error::RequestError;
use crate::router::ShardRouter;
use idgraph_core::canary::{
    judge, judge_shadow, rollback_order, shadow_key, CanaryCommand, IntervalSample, KpiCounts, MergeStamp, Phase, Rollout,
};
use idgraph_core::engine::{CommandKind, EngineError, UnmergeTarget};
use idgraph_core::meta::MetaCommand;
use idgraph_core::model::GroupId;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How often the coordinator looks at the rollout.
const EVERY: Duration = Duration::from_millis(500);
/// How long a rollback waits before it undoes merges: every node reads the
/// map twice a second, and an event already resolving under the candidate
/// commits within its request timeout.
const ROLLBACK_GRACE_MS: i64 = 3_000;
/// Passes of a rollback over the merges left to undo.
const MAX_UNDO_PASSES: usize = 5;
/// How far the clocks of the nodes stamping merges may be behind the
/// metadata leader's (a merge stamped before the rollout started is not
/// the candidate's doing, unless the stamping clock was behind).
const CLOCK_SLACK_MS: i64 = 10_000;

pub fn spawn(router: ShardRouter) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut c = Coordinator { router, sampling: None };
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if let Err(e) = c.round().await {
                tracing::debug!(error = %e, "canary round did not complete; will retry");
            }
        }
    })
}

struct Coordinator {
    router: ShardRouter,
    /// The rollout, step and shadow flag this node samples, and when the
    /// interval began.
    sampling: Option<((String, usize, bool), i64)>,
}

impl Coordinator {
    fn leads(&self) -> bool {
        self.router.local_leader(GroupId::Meta) == Some(self.router.node_id())
    }

    async fn propose(&self, cmd: CanaryCommand) -> Result<(), RequestError> {
        self.router.change_cluster(MetaCommand::Canary(cmd)).await.map(|_| ())
    }

    async fn round(&mut self) -> Result<(), RequestError> {
        if !self.leads() {
            self.sampling = None;
            return Ok(());
        }
        let (Some(r), _) = self.router.rollouts(false).await? else {
            self.sampling = None;
            return Ok(());
        };
        let now = self.router.now_ms();
        match r.phase {
            Phase::RollingBack => return self.roll_back(&r, now).await,
            Phase::Promoted | Phase::RolledBack => return Ok(()),
            Phase::Shadow | Phase::Baking | Phase::AwaitingPromotion | Phase::Watching => {}
        }
        let interval_ms = r.plan.interval_secs as i64 * 1000;
        let shadow = r.shadow().is_some();
        let stage = (r.id.clone(), r.step, shadow);
        match &self.sampling {
            Some((sampled, since)) if *sampled == stage => {
                if now - since >= interval_ms {
                    let mut counts = self.router.collect_kpis().await;
                    // In the shadow, the candidate's counts are what it
                    // would have done with the events control resolved.
                    let canary_key = if shadow { shadow_key(&r.plan.candidate) } else { r.plan.candidate.clone() };
                    let sample = IntervalSample {
                        at_ms: now,
                        step: r.step,
                        canary: counts.remove(&canary_key).unwrap_or_default(),
                        control: counts.remove(&r.control).unwrap_or_default(),
                        canary_shards: r.canary_count(),
                        shard_count: r.shard_count,
                        shadow,
                    };
                    self.sampling = Some((stage, now));
                    self.propose(CanaryCommand::Sample { id: r.id.clone(), sample }).await?;
                }
            }
            _ => {
                let _: BTreeMap<String, KpiCounts> = self.router.collect_kpis().await;
                info!(rollout = %r.id, step = r.step + 1, shadow, canary_shards = r.canary_count(), "canary sampling step");
                self.sampling = Some((stage, now));
                return Ok(());
            }
        }
        if matches!(r.phase, Phase::Shadow | Phase::Baking | Phase::Watching) && now >= r.judge_at_ms {
            let (Some(r), _) = self.router.rollouts(false).await? else { return Ok(()) };
            let j = if shadow { judge_shadow(&r.plan, &r.samples, now) } else { judge(&r.plan, r.step, &r.samples, now) };
            info!(
                rollout = %r.id, step = r.step + 1, verdict = %j.verdict, score = j.score,
                canary_events = j.canary_events, control_events = j.control_events, reason = %j.reason,
                "canary step judged"
            );
            self.propose(CanaryCommand::Judged { id: r.id.clone(), judgement: j }).await?;
        } else if r.phase == Phase::Watching && r.watch_until_ms.is_some_and(|w| now >= w) {
            info!(rollout = %r.id, "canary watch window ended");
            self.propose(CanaryCommand::Finish { id: r.id.clone(), at_ms: now }).await?;
        }
        Ok(())
    }

    /// Undoes the merges made under the candidate, newest first, then
    /// finishes the rollback. Passes repeat until one finds nothing left to
    /// undo (a node a moment behind the map may still have merged under the
    /// candidate during the previous pass); the totals recorded are counted
    /// from the merge records, so a pass cut short, or run twice by two
    /// leaders, counts nothing twice.
    async fn roll_back(&mut self, r: &Rollout, now: i64) -> Result<(), RequestError> {
        let since = r.history.last().map(|d| d.at_ms).unwrap_or(now);
        if now - since < ROLLBACK_GRACE_MS {
            return Ok(());
        }
        let mut cannot = std::collections::BTreeSet::new();
        for pass in 1..=MAX_UNDO_PASSES {
            let mut pending: Vec<MergeStamp> =
                self.merges_of(r).await?.into_iter().filter(|m| !m.undone && !cannot.contains(&m.id)).collect();
            if pending.is_empty() {
                break;
            }
            rollback_order(&mut pending);
            info!(rollout = %r.id, pass, merges = pending.len(), "canary rollback undoing merges made under the candidate");
            for m in pending {
                if !self.leads() {
                    return Ok(());
                }
                let reason = format!("rollback of canary {} ({})", r.id, r.plan.candidate);
                match self.router.execute(CommandKind::Unmerge { target: UnmergeTarget::MergeId(m.id.clone()), reason }).await {
                    Ok(_) => {}
                    Err(RequestError::Engine(EngineError::FailedPrecondition { reason, .. })) => {
                        warn!(rollout = %r.id, merge = %m.id, %reason, "a merge made under the candidate cannot be undone");
                        cannot.insert(m.id);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Merges still listed now could not be undone, or were made after
        // the last pass (a node far behind the map).
        let merges = self.merges_of(r).await?;
        let undone = merges.iter().filter(|m| m.undone).count() as u64;
        let skipped = merges.len() as u64 - undone;
        if skipped > cannot.len() as u64 {
            warn!(rollout = %r.id, left = skipped - cannot.len() as u64, "merges made under the candidate are left after the last rollback pass");
        }
        self.propose(CanaryCommand::Undone { id: r.id.clone(), merges: undone, skipped }).await?;
        self.propose(CanaryCommand::Finish { id: r.id.clone(), at_ms: self.router.now_ms() }).await?;
        info!(rollout = %r.id, undone, skipped, "canary rolled back");
        Ok(())
    }

    /// Merges made under the rollout's candidate since it started (with a
    /// slack for the clocks of the nodes that stamped them), on every shard.
    async fn merges_of(&self, r: &Rollout) -> Result<Vec<MergeStamp>, RequestError> {
        let mut merges = Vec::new();
        for shard in self.router.map().shards() {
            let on_shard = self.router.merges_under(shard, &r.plan.candidate).await?;
            merges.extend(on_shard.into_iter().filter(|m| m.at_ms >= r.started_ms - CLOCK_SLACK_MS));
        }
        Ok(merges)
    }
}
