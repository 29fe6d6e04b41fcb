//! Nemeses: the faults a run injects, chosen by its seed.
//!
//! The schedule alternates quiet and faulty periods: wait 1 to 3 s, start a
//! fault of a kind chosen among those enabled, hold it 2 to 5 s, heal it.
//! Each start and end is logged with its time since the run started, so a
//! failing run's report says what happened when, and the same seed chooses
//! the same faults (the cluster's timing still varies from run to run).
//!
//! While the schedule runs, the nemesis also reaps nodes that exited on
//! their own: one stopped at a crash point is restarted; any other exit is
//! a finding (a panic, a store that would not open) and is restarted too,
//! so that the run goes on and the report lists it.
//!
//! An `overload` burst's operations are kept in [`Nemesis::burst_ops`]; the
//! harness adds them to the run's history, so every checker covers them.

use crate::cluster::{Cluster, UnexpectedExit, CRASH_POINT_EXIT};
use crate::workload::{self, Op, WorkloadSpec};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Kinds of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum FaultKind {
    /// `kill -9` of a node (often the one leading most shards), restarted
    /// on the same data directory.
    Kill,
    /// SIGSTOP of a node for longer than an election timeout, then SIGCONT.
    Pause,
    /// One node cut off from all others, or (five nodes) a minority of two
    /// from the majority.
    Partition,
    /// Two sides that reach each other only through one bridge node.
    Bridge,
    /// Added latency on every link between nodes.
    Slow,
    /// A node restarted with a crash point armed (needs a node built with
    /// the `failpoints` feature): it exits at that step of a commit, an
    /// fsync or a snapshot install.
    CrashPoint,
    /// A node's disk full: a ballast file fills the tmpfs its data
    /// directory lives on, and is deleted when the fault heals (needs root:
    /// the harness mounts one tmpfs per node).
    DiskFull,
    /// A burst of extra clients, several times the run's, for the fault's
    /// time; their operations join the run's history.
    Overload,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Kill,
        FaultKind::Pause,
        FaultKind::Partition,
        FaultKind::Bridge,
        FaultKind::Slow,
        FaultKind::CrashPoint,
        FaultKind::DiskFull,
        FaultKind::Overload,
    ];
}

/// An `overload` burst runs this many times the run's clients, and at least
/// [`OVERLOAD_MIN_CLIENTS`].
const OVERLOAD_FACTOR: usize = 8;
const OVERLOAD_MIN_CLIENTS: usize = 32;
/// Burst `k` is workload epoch `OVERLOAD_EPOCH + k` (groups and event ids
/// of its own), and its clients are numbered from `OVERLOAD_CLIENTS * (k +
/// 1)`, above any run's own clients.
const OVERLOAD_EPOCH: u64 = 1000;
const OVERLOAD_CLIENTS: usize = 10_000;

/// Crash points a `crash-point` fault arms, with how often each fires when
/// reached (`idgraph_node::crash` lists them).
const CRASH_POINTS: [(&str, &str); 10] = [
    ("txn::before-commit", "20%return"),
    ("txn::after-commit", "20%return"),
    ("txn::between-applies", "20%return"),
    ("log::mid-write", "2%return"),
    ("raft::before-fsync", "2%return"),
    ("raft::after-fsync", "2%return"),
    ("storage::mid-apply", "1%return"),
    ("storage::mid-drain", "20%return"),
    ("raft::mid-snapshot", "20%return"),
    ("raft::snapshot-install", "return"),
];

/// The crash points the nemesis arms.
pub fn crash_point_names() -> impl Iterator<Item = &'static str> {
    CRASH_POINTS.iter().map(|(name, _)| *name)
}

/// One logged nemesis event.
#[derive(Clone, Debug, Serialize)]
pub struct FaultEvent {
    /// Milliseconds since the run started.
    pub at_ms: u64,
    pub kind: Option<FaultKind>,
    /// `start`, `heal`, `exit` (a node ended on its own) or `restart`.
    pub action: &'static str,
    pub detail: String,
}

pub struct Nemesis {
    rng: fastrand::Rng,
    seed: u64,
    kinds: Vec<FaultKind>,
    started: Instant,
    /// The run's own clients (an `overload` burst runs several times more).
    clients: usize,
    /// `overload` bursts so far.
    bursts: u64,
    pub log: Vec<FaultEvent>,
    pub exits: Vec<UnexpectedExit>,
    /// The operations of the `overload` bursts, for the run's history.
    pub burst_ops: Vec<Op>,
}

impl Nemesis {
    /// A nemesis for a run with `seed` and `clients` clients of its own,
    /// whose history counts time from `started`.
    pub fn new(seed: u64, kinds: Vec<FaultKind>, clients: usize, started: Instant) -> Nemesis {
        Nemesis {
            rng: fastrand::Rng::with_seed(seed ^ 0x006e_656d_6573_6973),
            seed,
            kinds,
            started,
            clients,
            bursts: 0,
            log: Vec::new(),
            exits: Vec::new(),
            burst_ops: Vec::new(),
        }
    }

    fn record(&mut self, kind: Option<FaultKind>, action: &'static str, detail: String) {
        let at_ms = self.started.elapsed().as_millis() as u64;
        tracing::info!(at_ms, ?kind, action, %detail, "nemesis");
        self.log.push(FaultEvent { at_ms, kind, action, detail });
    }

    /// Injects faults until `until`, then heals everything.
    pub async fn run(&mut self, cluster: &mut Cluster, until: Instant) -> anyhow::Result<()> {
        while Instant::now() < until {
            let quiet = Duration::from_millis(self.rng.u64(1000..3000));
            self.sleep_reaping(cluster, quiet, until).await?;
            if Instant::now() >= until || self.kinds.is_empty() {
                break;
            }
            let kind = self.kinds[self.rng.usize(0..self.kinds.len())];
            let hold = Duration::from_millis(self.rng.u64(2000..5000));
            self.inject(cluster, kind, hold, until).await?;
        }
        self.heal(cluster, None, None).await
    }

    /// Heals everything; `note` says what the fault came to, if anything.
    async fn heal(&mut self, cluster: &mut Cluster, kind: Option<FaultKind>, note: Option<String>) -> anyhow::Result<()> {
        // Space first, so that a node that exited on its full disk is
        // restarted with space.
        let freed = cluster.free_disks();
        self.reap(cluster).await?;
        cluster.heal_all().await?;
        let mut detail = String::from("all nodes running, all links up");
        if !freed.is_empty() {
            detail.push_str(&format!(", ballast deleted on {}", names(&freed)));
        }
        if let Some(note) = note {
            detail.push_str(&format!("; {note}"));
        }
        self.record(kind, "heal", detail);
        Ok(())
    }

    async fn inject(&mut self, cluster: &mut Cluster, kind: FaultKind, hold: Duration, until: Instant) -> anyhow::Result<()> {
        let n = cluster.nodes.len();
        let mut note = None;
        match kind {
            FaultKind::Kill => {
                let node = self.victim(cluster).await;
                cluster.kill(node).await;
                self.record(Some(kind), "start", format!("kill -9 node {}", node + 1));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::Pause => {
                let node = self.victim(cluster).await;
                cluster.pause(node);
                self.record(Some(kind), "start", format!("SIGSTOP node {} for {} ms", node + 1, hold.as_millis()));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::Partition => {
                let mut nodes: Vec<usize> = (0..n).collect();
                self.rng.shuffle(&mut nodes);
                let minority = if n >= 5 { 2 } else { 1 };
                let (a, b) = nodes.split_at(minority);
                cluster.network.cut_between(a, b);
                self.record(Some(kind), "start", format!("partition {} | {}", names(a), names(b)));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::Bridge => {
                let mut nodes: Vec<usize> = (0..n).collect();
                self.rng.shuffle(&mut nodes);
                let bridge = nodes[0];
                let rest = &nodes[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                cluster.network.cut_between(a, b);
                self.record(Some(kind), "start", format!("bridge {} | node {} | {}", names(a), bridge + 1, names(b)));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::Slow => {
                let delay = self.rng.u64(10..60);
                cluster.network.slow_all(delay);
                self.record(Some(kind), "start", format!("{delay} ms added on every link"));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::CrashPoint => {
                let node = self.rng.usize(0..n);
                let (point, action) = CRASH_POINTS[self.rng.usize(0..CRASH_POINTS.len())];
                cluster.kill(node).await;
                let armed = format!("{point}={action}");
                let started = cluster.spawn(node, Some(&armed)).await;
                self.record(Some(kind), "start", format!("node {} restarted with {armed}", node + 1));
                if let Err(e) = started {
                    // The point can be reached while the node starts (a log
                    // write, an image rebuilt at open), before it listens:
                    // that is the crash this fault asked for. Any other
                    // failure to start is one.
                    let ended = e.downcast_ref::<idgraph_testkit::NotStarted>().and_then(|n| n.status).and_then(|s| s.code());
                    let status = format!("{e:#}");
                    anyhow::ensure!(ended == Some(CRASH_POINT_EXIT), "{status}");
                    self.record(None, "exit", format!("node {} stopped at its crash point while starting", node + 1));
                    cluster.spawn(node, None).await?;
                    self.record(None, "restart", format!("node {}", node + 1));
                    self.exits.push(UnexpectedExit { node, status, crash_point: true });
                }
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::DiskFull => {
                let node = self.victim(cluster).await;
                let ballast = cluster.fill_disk(node).await?;
                self.record(Some(kind), "start", format!("node {}'s disk full ({} MiB of ballast)", node + 1, ballast >> 20));
                self.sleep_reaping(cluster, hold, until).await?;
            }
            FaultKind::Overload => {
                let burst = self.bursts;
                self.bursts += 1;
                let wl = WorkloadSpec {
                    seed: self.seed,
                    epoch: OVERLOAD_EPOCH + burst,
                    clients: (self.clients * OVERLOAD_FACTOR).max(OVERLOAD_MIN_CLIENTS),
                    first_client: OVERLOAD_CLIENTS * (burst as usize + 1),
                    duration: hold.min(until.saturating_duration_since(Instant::now())),
                    timeout: Duration::from_secs(5),
                };
                let endpoints: Vec<String> = cluster.nodes.iter().map(|n| n.endpoint()).collect();
                self.record(
                    Some(kind),
                    "start",
                    format!(
                        "{} more clients ({} to {}) for {} ms",
                        wl.clients,
                        wl.first_client,
                        wl.first_client + wl.clients - 1,
                        wl.duration.as_millis()
                    ),
                );
                let started = self.started;
                let (ops, slept) = tokio::join!(workload::run(&wl, &endpoints, started), self.sleep_reaping(cluster, hold, until));
                let ops = ops?;
                let ok = ops.iter().filter(|o| o.outcome == workload::Outcome::Ok).count();
                note = Some(format!("the burst completed {} operations, {ok} ok", ops.len()));
                self.burst_ops.extend(ops);
                slept?;
            }
        }
        self.heal(cluster, Some(kind), note).await
    }

    /// The node leading most shards half of the time, a random one else.
    async fn victim(&mut self, cluster: &Cluster) -> usize {
        let n = cluster.nodes.len();
        if self.rng.bool() {
            let mut led = vec![0usize; n];
            for id in cluster.leaders().await.values() {
                if let Some(c) = led.get_mut((*id as usize).wrapping_sub(1)) {
                    *c += 1;
                }
            }
            if let Some((i, _)) = led.iter().enumerate().max_by_key(|(_, c)| **c).filter(|(_, c)| **c > 0) {
                return i;
            }
        }
        self.rng.usize(0..n)
    }

    async fn sleep_reaping(&mut self, cluster: &mut Cluster, d: Duration, until: Instant) -> anyhow::Result<()> {
        let end = (Instant::now() + d).min(until.max(Instant::now()));
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(200).min(end.saturating_duration_since(Instant::now()))).await;
            self.reap(cluster).await?;
        }
        Ok(())
    }

    /// Restarts nodes that exited on their own, logging each.
    async fn reap(&mut self, cluster: &mut Cluster) -> anyhow::Result<()> {
        for exit in cluster.reap() {
            let what = if exit.crash_point { "stopped at its crash point" } else { "EXITED UNEXPECTEDLY" };
            self.record(None, "exit", format!("node {} {what} ({})", exit.node + 1, exit.status));
            cluster.spawn(exit.node, None).await?;
            self.record(None, "restart", format!("node {}", exit.node + 1));
            self.exits.push(exit);
        }
        Ok(())
    }
}

fn names(nodes: &[usize]) -> String {
    let mut v: Vec<usize> = nodes.iter().map(|i| i + 1).collect();
    v.sort();
    format!("{{{}}}", v.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","))
}
