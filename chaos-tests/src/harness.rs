//! A whole run: start the cluster, run the workload while the nemesis
//! injects faults, heal, settle, check, report.

use crate::checker::{self, CheckResult};
use crate::cluster::{lazy_channel, Cluster, ClusterSpec};
use crate::nemesis::{FaultKind, Nemesis};
use crate::report::Report;
use crate::workload::{self, Group, Op, WorkloadSpec};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What a run does.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub seed: u64,
    pub nodes: usize,
    pub shards: u32,
    pub clients: usize,
    pub duration: Duration,
    pub faults: Vec<FaultKind>,
    pub node_bin: PathBuf,
    pub dir: PathBuf,
    /// Step budget of the linearizability search per group.
    pub max_steps: u64,
    /// The command line that replays this run (for the report).
    pub replay: String,
    /// Run a canary rollout through the faults (see [`crate::canary`]).
    pub canary: bool,
}

/// Faulty run: the workload and the nemesis side by side.
pub async fn run(spec: &RunSpec) -> anyhow::Result<Report> {
    let mut cluster = Cluster::start(cluster_spec(spec, spec.nodes)).await?;
    let rollout = match spec.canary {
        true => Some(crate::canary::start(lazy_channel(&cluster.nodes[0].endpoint())?, spec.duration).await?),
        false => None,
    };
    let started = Instant::now();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let wl = WorkloadSpec {
        seed: spec.seed,
        epoch: 0,
        clients: spec.clients,
        first_client: 0,
        duration: spec.duration,
        timeout: Duration::from_secs(5),
    };
    let mut nemesis = Nemesis::new(spec.seed, spec.faults.clone(), spec.clients, started);
    let until = started + spec.duration;
    let (history, nemesis_result) = tokio::join!(workload::run(&wl, &endpoints, started), nemesis.run(&mut cluster, until));
    let mut history = history?;
    // The overload bursts' operations, in completion order with the rest.
    history.append(&mut nemesis.burst_ops);
    history.sort_by_key(|op| op.return_us);
    let mut start_errors = Vec::new();
    if let Err(e) = nemesis_result {
        start_errors.push(format!("nemesis stopped: {e:#}"));
        if let Err(e) = cluster.heal_all().await {
            start_errors.push(format!("healing failed: {e:#}"));
        }
    }
    let workload_s = started.elapsed().as_secs_f64();
    let exits = nemesis.exits.clone();
    let mut report = conclude_checks(spec, &mut cluster, &history, &exits, start_errors).await;
    if let Some(id) = rollout {
        let check = match lazy_channel(&cluster.nodes[0].endpoint()) {
            Ok(channel) => crate::canary::check(channel, &id).await,
            Err(e) => unavailable("canary", e.to_string()),
        };
        report.checks.push(check);
    }
    conclude(spec, &mut cluster, &history, report, nemesis.log, workload_s).await
}

/// Crash loop: one node under heavy load, `kill -9`'d at a random moment,
/// `cycles` times; each restart must open the data directory, and in the
/// end every acknowledged event of every cycle must be there.
pub async fn crash_loop(spec: &RunSpec, cycles: u64) -> anyhow::Result<Report> {
    let mut cluster = Cluster::start(cluster_spec(spec, 1)).await?;
    let started = Instant::now();
    let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
    let mut rng = fastrand::Rng::with_seed(spec.seed);
    let mut history = Vec::new();
    let mut log = Vec::new();
    let mut start_errors = Vec::new();
    for cycle in 0..cycles {
        let load = Duration::from_millis(rng.u64(1500..4000));
        let kill_at = Duration::from_millis(rng.u64(500..load.as_millis() as u64));
        let wl = WorkloadSpec {
            seed: spec.seed,
            epoch: cycle,
            clients: spec.clients,
            first_client: 0,
            duration: load,
            timeout: Duration::from_secs(5),
        };
        let killer = async {
            tokio::time::sleep(kill_at).await;
            cluster.kill(0).await;
        };
        let (ops, ()) = tokio::join!(workload::run(&wl, &endpoints, started), killer);
        history.extend(ops?);
        log.push(crate::nemesis::FaultEvent {
            at_ms: started.elapsed().as_millis() as u64,
            kind: Some(FaultKind::Kill),
            action: "start",
            detail: format!("cycle {cycle}: kill -9 after {} ms of load", kill_at.as_millis()),
        });
        // The data directory must open again.
        if let Err(e) = cluster.spawn(0, None).await {
            start_errors.push(format!("cycle {cycle}: the node did not restart after kill -9: {e:#}"));
            break;
        }
    }
    let workload_s = started.elapsed().as_secs_f64();
    let exits = cluster.reap();
    let report = conclude_checks(spec, &mut cluster, &history, &exits, start_errors).await;
    let mut report = conclude(spec, &mut cluster, &history, report, log, workload_s).await?;
    report.mode = "crash-loop";
    report.nodes = 1;
    report.duration_s = workload_s;
    Ok(report)
}

/// After the workload: check, and note nodes that exited while the checkers
/// ran (none were armed any more).
async fn conclude_checks(
    spec: &RunSpec,
    cluster: &mut Cluster,
    history: &[Op],
    exits: &[crate::cluster::UnexpectedExit],
    start_errors: Vec<String>,
) -> Report {
    let mut report = check(spec, cluster, history, exits, start_errors).await;
    if let Some(processes) = report.checks.iter_mut().find(|c| c.name == "processes") {
        for e in cluster.reap() {
            processes.fail(format!("node {} exited while the checkers ran: {}", e.node + 1, e.status));
        }
    }
    report
}

/// The verdict, faults and rate of a checked run; keeps the history and
/// stops the cluster.
async fn conclude(
    spec: &RunSpec,
    cluster: &mut Cluster,
    history: &[Op],
    mut report: Report,
    faults: Vec<crate::nemesis::FaultEvent>,
    workload_s: f64,
) -> anyhow::Result<Report> {
    report.passed = report.checks.iter().all(|c| c.passed);
    report.faults_by_kind = Report::fault_counts(&faults);
    report.faults = faults;
    report.ops_per_s = history.len() as f64 / workload_s.max(0.001);
    write_history(spec, history)?;
    cluster.stop_all().await;
    Ok(report)
}

/// Size of each node's tmpfs with `disk-full` faults. Nothing is used until
/// written; a run's data takes a few MiB.
const TMPFS_BYTES: u64 = 256 << 20;

fn cluster_spec(spec: &RunSpec, nodes: usize) -> ClusterSpec {
    ClusterSpec {
        node_bin: spec.node_bin.clone(),
        nodes,
        shards: spec.shards,
        dir: spec.dir.clone(),
        heartbeat_ms: 100,
        tmpfs_bytes: spec.faults.contains(&FaultKind::DiskFull).then_some(TMPFS_BYTES),
    }
}

fn write_history(spec: &RunSpec, history: &[Op]) -> anyhow::Result<()> {
    let mut out = String::new();
    for op in history {
        out.push_str(&serde_json::to_string(op)?);
        out.push('\n');
    }
    std::fs::write(spec.dir.join("history.jsonl"), out)?;
    Ok(())
}

/// Settles the healed cluster and runs every checker.
async fn check(
    spec: &RunSpec,
    cluster: &Cluster,
    history: &[Op],
    exits: &[crate::cluster::UnexpectedExit],
    start_errors: Vec<String>,
) -> Report {
    let groups: HashMap<u64, Group> =
        history.iter().map(|o| o.group).collect::<BTreeSet<_>>().into_iter().map(|g| (g, Group::new(spec.seed, g))).collect();
    let mut checks: Vec<CheckResult> = vec![checker::processes(exits, &start_errors)];
    let settled = checker::settle(cluster, Duration::from_secs(60)).await;
    let settle_ms = match settled {
        Ok(d) => Some(d.as_millis() as u64),
        Err(e) => {
            checks[0].fail(format!("cluster did not settle: {e}"));
            None
        }
    };
    let ids: BTreeSet<String> = groups.values().flat_map(|g| g.all().cloned()).collect();
    let node0 = cluster.nodes[0].endpoint();
    match lazy_channel(&node0) {
        Ok(channel) => match checker::stable_profiles(channel.clone(), &ids, Duration::from_secs(90)).await {
            Ok(finals) => {
                checks.push(checker::lost_writes(history, &groups, &finals));
                match checker::limits(channel.clone()).await {
                    Ok(limits) => checks.push(checker::invariants(channel, &finals, &limits).await),
                    Err(e) => checks.push(unavailable("graph-invariants", e)),
                }
            }
            Err(e) => checks.push(unavailable("no-lost-writes", e)),
        },
        Err(e) => checks.push(unavailable("no-lost-writes", e.to_string())),
    }
    checks.push(checker::convergence(cluster, Duration::from_secs(60)).await);
    checks.push(checker::linearizability(history, &groups, spec.max_steps));
    let passed = checks.iter().all(|c| c.passed);
    Report {
        mode: "run",
        seed: spec.seed,
        nodes: spec.nodes,
        shards: spec.shards,
        clients: spec.clients,
        duration_s: spec.duration.as_secs_f64(),
        replay: spec.replay.clone(),
        operations: Report::count(history),
        ops_per_s: 0.0,
        faults_by_kind: Default::default(),
        faults: Vec::new(),
        settle_ms,
        checks,
        passed,
    }
}

fn unavailable(name: &'static str, why: String) -> CheckResult {
    let mut c = CheckResult::new(name);
    c.fail(format!("could not read the final state: {why}"));
    c
}
