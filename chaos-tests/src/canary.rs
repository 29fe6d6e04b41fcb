//! A canary rollout running through the faults (`run --canary`): before
//! the workload starts, a candidate rule set that resolves exactly like the
//! cluster's (one more blocked value nobody sends) is stored and rolled out
//! with a plan whose KPIs cannot fail, so the rollout widens or waits but
//! never rolls back (a rollback undoes merges, which the workload's model
//! does not expect). After healing, the `canary` check reads the rollout
//! back: it must still be recorded, never restarted, and never rolled back;
//! the other checks must pass with it running.

use crate::checker::CheckResult;
use idgraph_core::canary::{Phase, Rollout};
use idgraph_proto::v1 as pb;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The candidate's version.
const CANDIDATE: &str = "chaos-canary";

fn plan(duration: Duration) -> String {
    let bake = (duration.as_secs() / 2).max(2);
    format!(
        r#"
objective = "a rollout running through the chaos schedule's faults"
candidate = "{CANDIDATE}"
interval_secs = 1
steps = [{{ shards = 1, bake_secs = {bake} }}, {{ percent = 100, bake_secs = 3600 }}]
kpis = [{{ name = "merge_rate", direction = "lower_is_better", threshold = 1.0, floor = 1.0 }}]
"#
    )
}

/// Stores the candidate and starts the rollout; returns its id.
pub async fn start(channel: Channel, duration: Duration) -> anyhow::Result<String> {
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = async {
            let active = admin.get_rule_set(pb::GetRuleSetRequest::default()).await?.into_inner();
            let toml = active.toml.replacen(&format!("version = \"{}\"", active.version), &format!("version = \"{CANDIDATE}\""), 1);
            anyhow::ensure!(toml.contains(CANDIDATE), "the cluster's rule set names no version line to replace");
            let toml = toml.replacen("[blocked]\nvalues = [", "[blocked]\nvalues = [\"chaos-canary-placeholder\", ", 1);
            admin.put_rule_set(pb::PutRuleSetRequest { toml }).await?;
            let r = admin.start_canary(pb::StartCanaryRequest { plan_toml: plan(duration) }).await?.into_inner();
            Ok::<String, anyhow::Error>(r.id)
        };
        match attempt.await {
            Ok(id) => return Ok(id),
            Err(e) if Instant::now() > deadline => return Err(e.context("starting the canary rollout")),
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

/// The rollout after the faults: recorded, started once, not rolled back.
pub async fn check(channel: Channel, id: &str) -> CheckResult {
    let mut c = CheckResult::new("canary");
    c.checked = 1;
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let got = admin.get_canary(pb::GetCanaryRequest { id: id.to_string() }).await;
    let record = match got {
        Ok(r) => serde_json::from_str::<Rollout>(&r.into_inner().record_json).map_err(|e| e.to_string()),
        Err(s) => Err(format!("{:?}: {}", s.code(), s.message())),
    };
    let r = match record {
        Ok(r) => r,
        Err(e) => {
            c.fail(format!("rollout {id} could not be read back: {e}"));
            return c;
        }
    };
    let starts = r.history.iter().filter(|d| d.text.starts_with("started")).count();
    if starts != 1 {
        c.fail(format!("rollout {id} was started {starts} times"));
    }
    if matches!(r.phase, Phase::RollingBack | Phase::RolledBack) {
        c.fail(format!("rollout {id} rolled back although its KPIs cannot fail: {:?}", r.history.last()));
    }
    c.notes.insert("phase".into(), r.phase.name().into());
    c.notes.insert("step".into(), (r.step + 1).into());
    c.notes.insert("samples".into(), r.samples.len().into());
    c.notes.insert("judgements".into(), r.judgements.len().into());
    c
}
