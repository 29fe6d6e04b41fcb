//! A run's report: what ran, what was injected, what the checkers found.
//! Written as JSON and summarised for humans.

use crate::checker::CheckResult;
use crate::nemesis::FaultEvent;
use crate::workload::{Op, Outcome};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Serialize)]
pub struct Report {
    /// `run` or `crash-loop`.
    pub mode: &'static str,
    pub seed: u64,
    pub nodes: usize,
    pub shards: u32,
    pub clients: usize,
    pub duration_s: f64,
    /// The command that replays the run's choices.
    pub replay: String,
    /// Operations by kind, then by outcome (ok, failed, unknown).
    pub operations: BTreeMap<&'static str, BTreeMap<&'static str, u64>>,
    /// Completed operations per second over the workload.
    pub ops_per_s: f64,
    /// Per kind of fault, how many were started.
    pub faults_by_kind: BTreeMap<String, u64>,
    pub faults: Vec<FaultEvent>,
    /// How long the cluster took to settle after healing, in milliseconds.
    pub settle_ms: Option<u64>,
    pub checks: Vec<CheckResult>,
    pub passed: bool,
}

impl Report {
    pub fn count(history: &[Op]) -> BTreeMap<&'static str, BTreeMap<&'static str, u64>> {
        let mut out: BTreeMap<&'static str, BTreeMap<&'static str, u64>> = BTreeMap::new();
        for op in history {
            let outcome = match op.outcome {
                Outcome::Ok => "ok",
                Outcome::Failed(_) => "failed",
                Outcome::Unknown(_) => "unknown",
            };
            *out.entry(op.kind_name()).or_default().entry(outcome).or_default() += 1;
        }
        out
    }

    pub fn fault_counts(faults: &[FaultEvent]) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for f in faults.iter().filter(|f| f.action == "start") {
            if let Some(k) = f.kind {
                let name = serde_json::to_value(k).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
                *out.entry(name).or_default() += 1;
            }
        }
        let exits = faults.iter().filter(|f| f.action == "exit").count() as u64;
        if exits > 0 {
            out.insert("node-exits".into(), exits);
        }
        out
    }

    /// A short summary for a terminal.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "idgraph-chaos {}: seed {}, {} nodes, {} shards, {} clients, {:.0} s",
            self.mode, self.seed, self.nodes, self.shards, self.clients, self.duration_s
        );
        let _ = writeln!(s, "replay: {}", self.replay);
        let _ = writeln!(s, "operations ({:.0}/s):", self.ops_per_s);
        for (kind, outcomes) in &self.operations {
            let parts: Vec<String> = outcomes.iter().map(|(o, n)| format!("{n} {o}")).collect();
            let _ = writeln!(s, "  {kind:<9} {}", parts.join(", "));
        }
        let faults: Vec<String> = self.faults_by_kind.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = writeln!(s, "faults: {}", if faults.is_empty() { "none".into() } else { faults.join(", ") });
        if let Some(ms) = self.settle_ms {
            let _ = writeln!(s, "settled {ms} ms after healing");
        }
        for c in &self.checks {
            let verdict = if c.passed { "PASS" } else { "FAIL" };
            let notes: Vec<String> = c.notes.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let _ = writeln!(s, "  {verdict} {:<18} checked {} {}", c.name, c.checked, notes.join(" "));
            for f in &c.failures {
                let _ = writeln!(s, "       - {f}");
            }
            if c.failed > c.failures.len() as u64 {
                let _ = writeln!(s, "       ... {} more", c.failed - c.failures.len() as u64);
            }
        }
        let _ = writeln!(s, "{}", if self.passed { "all checks passed" } else { "CHECKS FAILED" });
        s
    }
}
