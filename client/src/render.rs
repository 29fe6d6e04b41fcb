//! How `idgraphctl` shows a result: a table (or text) for people, pretty
//! JSON for scripts (`--output json`). Every result type implements
//! [`Render`] once; a command calls [`show`] with it, so a new command
//! adds one `impl` here and one line in `main`.

use anyhow::Result;
use clap::ValueEnum;
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use idgraph_client::idgraph_proto::json;
use idgraph_client::idgraph_proto::v1 as pb;
use idgraph_client::LoadSummary;
use idgraph_core::canary::{KpiCounts, Phase, Rollout};
use serde::Serialize;

/// The output format, `--output`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// A result as people read it; scripts get its JSON (`Serialize`).
pub trait Render: Serialize {
    /// The text printed for `--output table`.
    fn human(&self) -> String;
}

/// Prints a result in the chosen format.
pub fn show<T: Render>(v: &T, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Output::Table => {
            // Text that ends its own last line (a rule set's TOML) is
            // printed as it is.
            let text = v.human();
            if text.ends_with('\n') {
                print!("{text}")
            } else {
                println!("{text}")
            }
        }
    }
    Ok(())
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic).set_header(header.to_vec());
    t
}

fn ids(list: &[pb::Identifier]) -> String {
    list.iter().map(|i| format!("{}={}", i.r#type, i.value)).collect::<Vec<_>>().join("\n")
}

impl Render for pb::IdentifyResponse {
    fn human(&self) -> String {
        let r = self;
        let mut t = table(&["field", "value"]);
        t.add_row(vec!["profile_id", &r.profile_id]);
        t.add_row(vec!["created", &r.created.to_string()]);
        t.add_row(vec!["duplicate", &r.duplicate.to_string()]);
        if r.merged {
            t.add_row(vec!["merged".to_string(), format!("{} (merge {})", r.merged_profile_ids.join(", "), r.merge_id)]);
        }
        t.add_row(vec!["identifiers_added", &r.identifiers_added.to_string()]);
        for c in &r.conflicts {
            t.add_row(vec!["conflict", &c.message]);
        }
        for i in &r.ignored {
            let id = i.identifier.as_ref().map(|i| i.r#type.clone()).unwrap_or_default();
            t.add_row(vec!["ignored".to_string(), format!("{id}: {} ({})", i.reason, i.detail)]);
        }
        t.add_row(vec!["rule_version", &r.rule_version]);
        t.to_string()
    }
}

impl Render for pb::Profile {
    fn human(&self) -> String {
        let p = self;
        let mut t = table(&["field", "value"]);
        t.add_row(vec!["profile_id", &p.profile_id]);
        if !p.resolved_from.is_empty() {
            t.add_row(vec!["resolved_from", &p.resolved_from]);
        }
        if p.stale {
            t.add_row(vec!["stale", "true (read from this node's replica; may lag)"]);
        }
        t.add_row(vec!["identifiers".to_string(), ids(&p.identifiers)]);
        let traits = p.traits.as_ref().map(json::from_struct).unwrap_or(serde_json::Value::Null);
        if let serde_json::Value::Object(m) = &traits {
            let lines: Vec<String> = m.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            t.add_row(vec!["traits".to_string(), lines.join("\n")]);
        }
        t.add_row(vec!["merged_from".to_string(), p.merged_from.join("\n")]);
        t.add_row(vec!["merge_ids".to_string(), p.merge_ids.join("\n")]);
        t.add_row(vec!["created_ms", &p.created_ms.to_string()]);
        t.add_row(vec!["updated_ms", &p.updated_ms.to_string()]);
        t.add_row(vec!["rule_version", &p.rule_version]);
        t.to_string()
    }
}

impl Render for LoadSummary {
    fn human(&self) -> String {
        let s = self;
        let mut t =
            table(&["events", "profiles created", "merges", "conflicts", "duplicates", "ignored ids", "failed", "sent again", "events/s"]);
        t.add_row(vec![
            s.events.to_string(),
            s.profiles_created.to_string(),
            s.merges.to_string(),
            s.conflicts.to_string(),
            s.duplicates.to_string(),
            s.ignored_identifiers.to_string(),
            s.failed.to_string(),
            s.resent.to_string(),
            format!("{:.0}", s.events_per_second),
        ]);
        t.to_string()
    }
}

impl Render for pb::MergeResponse {
    fn human(&self) -> String {
        let mut t = table(&["profile_id", "merged", "merge_id", "forced limits"]);
        t.add_row(vec![&self.profile_id, &self.merged_profile_ids.join("\n"), &self.merge_id, &self.forced_limits.join("\n")]);
        t.to_string()
    }
}

impl Render for pb::UnmergeResponse {
    fn human(&self) -> String {
        let mut t = table(&["profile_id", "new/restored profiles", "identifiers moved"]);
        t.add_row(vec![self.profile_id.clone(), self.new_profile_ids.join("\n"), self.identifiers_moved.to_string()]);
        t.to_string()
    }
}

impl Render for pb::DeleteProfileResponse {
    fn human(&self) -> String {
        let mut t = table(&["erased profile", "identifiers erased", "merge records erased"]);
        t.add_row(vec![self.profile_id.clone(), self.identifiers_erased.to_string(), self.merge_records_erased.to_string()]);
        t.to_string()
    }
}

impl Render for pb::MergeRecord {
    fn human(&self) -> String {
        let m = self;
        let mut t = table(&["field", "value"]);
        t.add_row(vec!["merge_id", &m.merge_id]);
        t.add_row(vec!["survivor", &m.survivor_profile_id]);
        for a in &m.absorbed {
            t.add_row(vec![format!("absorbed {}", a.profile_id), ids(&a.identifiers)]);
        }
        t.add_row(vec!["added by the event".to_string(), ids(&m.added)]);
        t.add_row(vec!["cause".to_string(), format!("{}: {}", m.cause, m.cause_detail)]);
        t.add_row(vec!["rule_version", &m.rule_version]);
        t.add_row(vec!["merged_at_ms", &m.merged_at_ms.to_string()]);
        t.add_row(vec!["forced", &m.forced.to_string()]);
        t.add_row(vec!["undone", &m.undone.to_string()]);
        t.to_string()
    }
}

impl Render for pb::ListAuditResponse {
    fn human(&self) -> String {
        let mut t = table(&["id", "when (UTC)", "who", "node", "action", "target", "outcome"]);
        for e in &self.entries {
            let when = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(e.at_ms.max(0) as u64));
            t.add_row(vec![
                e.id.clone(),
                when.to_string(),
                e.who.clone(),
                e.node_id.to_string(),
                e.action.clone(),
                e.target.clone(),
                e.outcome.clone(),
            ]);
        }
        t.to_string()
    }
}

/// `idgraphctl health`.
#[derive(Serialize)]
pub struct Health {
    pub serving: bool,
}

impl Render for Health {
    fn human(&self) -> String {
        if self.serving { "SERVING" } else { "NOT_SERVING" }.to_string()
    }
}

impl Render for pb::ListHubsResponse {
    fn human(&self) -> String {
        let mut t = table(&["identifier", "profile", "reason", "listed_at_ms"]);
        for h in &self.hubs {
            t.add_row(vec![ids(h.identifier.as_slice()), h.profile_id.clone(), h.reason.clone(), h.listed_at_ms.to_string()]);
        }
        t.to_string()
    }
}

impl Render for pb::RuleSetInfo {
    /// The rule set's TOML as it is.
    fn human(&self) -> String {
        self.toml.clone()
    }
}

impl Render for pb::Stats {
    fn human(&self) -> String {
        let s = self;
        let mut t = table(&[
            "profiles",
            "identifiers",
            "events",
            "duplicates",
            "merges",
            "conflicts",
            "unmerges",
            "deletions",
            "hubs",
            "rule version",
        ]);
        t.add_row(vec![
            s.profiles.to_string(),
            s.identifiers.to_string(),
            s.events.to_string(),
            s.duplicates.to_string(),
            s.merges.to_string(),
            s.conflicts.to_string(),
            s.unmerges.to_string(),
            s.deletions.to_string(),
            s.hubs.to_string(),
            s.rule_version.clone(),
        ]);
        t.to_string()
    }
}

impl Render for pb::ClusterStatus {
    fn human(&self) -> String {
        let c = self;
        let head = format!(
            "node {} · cluster map version {} · {} shards · replication factor {}",
            c.node_id, c.map_version, c.shard_count, c.replication_factor
        );
        let mut nodes = table(&["node", "addr", "state", "replicas", "leads (seen here)", "rule version"]);
        for n in &c.nodes {
            nodes.add_row(vec![
                n.node_id.to_string(),
                n.addr.clone(),
                n.state.clone(),
                n.replicas.to_string(),
                n.leads.to_string(),
                n.rule_version.clone(),
            ]);
        }
        let mut placement = table(&["group", "replicas on nodes", "moving"]);
        for p in &c.placement {
            let on: Vec<String> = p.node_ids.iter().map(u64::to_string).collect();
            placement.add_row(vec![p.group.clone(), on.join(" "), p.moving.clone()]);
        }
        let mut t = table(&["shard", "state", "leader", "term", "last log", "applied", "snapshot", "txns", "members (id addr matched)"]);
        for s in c.metadata.iter().chain(&c.shards) {
            let members: Vec<String> = s.members.iter().map(|m| format!("{} {} {}", m.node_id, m.addr, m.matched_index)).collect();
            let group = if s.shard == u32::MAX { "meta".to_string() } else { s.shard.to_string() };
            t.add_row(vec![
                group,
                s.state.clone(),
                s.leader_id.to_string(),
                s.term.to_string(),
                s.last_log_index.to_string(),
                s.applied_index.to_string(),
                s.snapshot_index.to_string(),
                s.prepared_txns.to_string(),
                members.join("\n"),
            ]);
        }
        format!("{head}\n{nodes}\n{placement}\nreplicas on this node:\n{t}")
    }
}

impl Render for pb::ListRuleSetsResponse {
    fn human(&self) -> String {
        let mut t = table(&["version", "cluster's version", "canary shards"]);
        for r in &self.rule_sets {
            let shards = r.canary_shards.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
            t.add_row(vec![r.version.clone(), if r.active { "yes".into() } else { String::new() }, shards]);
        }
        t.to_string()
    }
}

/// The replicated rollout record a rollout message carries.
pub fn rollout_record(r: &pb::CanaryRollout) -> Result<Rollout> {
    serde_json::from_str(&r.record_json).map_err(|e| anyhow::anyhow!("the node sent a rollout record this idgraphctl cannot read: {e}"))
}

fn value(v: Option<f64>) -> String {
    v.map_or_else(|| "–".to_string(), |v| format!("{v:.4}"))
}

impl Render for pb::CanaryRollout {
    fn human(&self) -> String {
        let mut out = format!(
            "rollout {}: {} against {}: {}, step {} of {}, {} of {} shards on {}\nobjective: {}\n",
            self.id,
            self.candidate,
            self.control,
            self.phase,
            self.step,
            self.steps,
            self.canary_shards,
            self.shard_count,
            self.candidate,
            self.objective
        );
        let Ok(r) = rollout_record(self) else { return out };
        if self.canary_shards > 0 && self.canary_shards < self.shard_count {
            out.push_str(&format!(
                "shards 0-{} run {}, shards {}-{} run {}\n",
                self.canary_shards - 1,
                self.candidate,
                self.canary_shards,
                self.shard_count - 1,
                self.control
            ));
        }
        // Events per shard of their anchor over the current step, with the
        // version each shard runs.
        let mut by_shard: std::collections::BTreeMap<u32, u64> = Default::default();
        for s in r.samples.iter().filter(|s| s.step == r.step && s.shadow == (r.phase == Phase::Shadow)) {
            for (shard, n) in s.canary.by_shard.iter().chain(&s.control.by_shard) {
                *by_shard.entry(*shard).or_default() += n;
            }
        }
        if !by_shard.is_empty() {
            let line: Vec<String> = by_shard
                .iter()
                .map(|(shard, n)| {
                    let mark = if *shard < self.canary_shards && r.phase != Phase::Shadow { "*" } else { "" };
                    format!("{shard}{mark}: {n}")
                })
                .collect();
            out.push_str(&format!("events per shard this step (* runs {}): {}\n", self.candidate, line.join(", ")));
        }
        let judged = r.judgements.last().filter(|j| j.step == r.step && j.shadow == (r.phase == Phase::Shadow));
        let mut t = table(&["KPI", "canary", "control", "p-value", "verdict"]);
        match judged {
            Some(j) => {
                for k in &j.kpis {
                    let verdict = format!("{:?}{}", k.outcome, if k.critical { " (critical)" } else { "" }).to_lowercase();
                    t.add_row(vec![k.kpi.to_string(), value(k.canary), value(k.control), value(k.p_value), verdict]);
                }
            }
            None => {
                let (mut canary, mut control) = (KpiCounts::default(), KpiCounts::default());
                for s in r.samples.iter().filter(|s| s.step == r.step) {
                    canary.add(&s.canary);
                    control.add(&s.control);
                }
                for k in &r.plan.kpis {
                    t.add_row(vec![
                        k.name.to_string(),
                        value(canary.value(k.name)),
                        value(control.value(k.name)),
                        "–".into(),
                        "not judged yet".into(),
                    ]);
                }
            }
        }
        out.push_str(&t.to_string());
        out.push('\n');
        if let Some(j) = judged {
            out.push_str(&format!("step {} judged {} (score {:.0}): {}\n", j.step + 1, j.verdict, j.score, j.reason));
        }
        for d in r.history.iter().rev().take(5).rev() {
            out.push_str(&format!("{:>8.1}s  {}\n", (d.at_ms - r.started_ms) as f64 / 1000.0, d.text));
        }
        out
    }
}

impl Render for pb::ListCanariesResponse {
    fn human(&self) -> String {
        let mut t = table(&["rollout", "candidate", "control", "phase", "step", "last verdict"]);
        for r in &self.rollouts {
            t.add_row(vec![
                r.id.clone(),
                r.candidate.clone(),
                r.control.clone(),
                r.phase.clone(),
                format!("{} of {}", r.step, r.steps),
                r.last_verdict.clone(),
            ]);
        }
        t.to_string()
    }
}
