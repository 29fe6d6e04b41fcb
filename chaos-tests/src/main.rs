//! `idgraph-chaos`: runs a real idgraph cluster under injected faults and
//! checks what it promised. See chaos-tests/README.md.

use anyhow::Context;
use clap::{Parser, Subcommand};
use idgraph_chaos::harness::{self, RunSpec};
use idgraph_chaos::nemesis::FaultKind;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "idgraph-chaos", about = "fault injection and consistency checks for an idgraph cluster")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// A cluster under a concurrent workload while faults are injected;
    /// then heal, settle and check.
    Run {
        #[command(flatten)]
        common: Common,
        /// Nodes of the cluster (3 to 5 is usual).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// How long the workload and the faults run (e.g. 90s, 30m).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Kinds of fault to inject, comma-separated; `crash-point` needs a
        /// node built with `--features failpoints`, `disk-full` needs root.
        #[arg(long, value_delimiter = ',', default_values = ["kill", "pause", "partition", "bridge", "slow"])]
        faults: Vec<FaultKind>,
        /// Run a canary rollout of a rule-set version through the faults
        /// (it must survive them; checked as `canary`).
        #[arg(long)]
        canary: bool,
    },
    /// One node under heavy load, `kill -9`'d at a random moment, again and
    /// again; every restart must open its data directory and keep every
    /// acknowledged event.
    CrashLoop {
        #[command(flatten)]
        common: Common,
        /// Kill-and-restart cycles.
        #[arg(long, default_value_t = 10)]
        cycles: u64,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Seed of the workload's and the nemesis's choices (random if unset).
    #[arg(long)]
    seed: Option<u64>,
    /// Shards of the cluster.
    #[arg(long, default_value_t = 16)]
    shards: u32,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// The idgraph-node binary (default: beside this one).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Directory for data, logs, history and report (default: a new
    /// directory under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Where to write the JSON report (default: DIR/report.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Keep DIR even when every check passed.
    #[arg(long)]
    keep: bool,
    /// Step budget of the linearizability search per group; a group whose
    /// search runs out of it fails the check as undecided.
    #[arg(long, default_value_t = 2_000_000)]
    max_steps: u64,
}

/// Exit status when a checker failed (a harness error exits with 2).
const CHECKS_FAILED: i32 = 1;

fn main() {
    match run() {
        Ok(true) => {}
        Ok(false) => std::process::exit(CHECKS_FAILED),
        Err(e) => {
            eprintln!("idgraph-chaos: {e:#}");
            std::process::exit(2);
        }
    }
}

/// Runs the command; Ok(passed).
fn run() -> anyhow::Result<bool> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHAOS_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let (common, replay_args, report) = match &cli.command {
        Command::Run { common, nodes, duration, faults, canary } => {
            let spec = RunSpec { canary: *canary, ..spec(common, *nodes, *duration, faults.clone())? };
            if faults.contains(&FaultKind::DiskFull) {
                // The nodes' tmpfs mounts, seen by the harness and its nodes
                // only, vanish with it. Unsharing needs a single thread:
                // before the runtime.
                idgraph_chaos::cluster::private_mount_namespace().context("disk-full faults need a mount namespace of their own")?;
            }
            let runtime = runtime()?;
            let faults: Vec<String> =
                faults.iter().map(|f| serde_json::to_value(f).map(|v| v.as_str().unwrap_or("").to_string())).collect::<Result<_, _>>()?;
            let replay = format!(
                "idgraph-chaos run --seed {} --nodes {nodes} --shards {} --clients {} --duration {} --faults {} --max-steps {} --node-bin {}{}",
                spec.seed,
                spec.shards,
                spec.clients,
                humantime::format_duration(*duration),
                faults.join(","),
                spec.max_steps,
                spec.node_bin.display(),
                if *canary { " --canary" } else { "" }
            );
            let spec = RunSpec { replay: replay.clone(), ..spec };
            (common, spec.clone(), runtime.block_on(harness::run(&spec)))
        }
        Command::CrashLoop { common, cycles } => {
            let spec = spec(common, 1, Duration::ZERO, vec![FaultKind::Kill])?;
            let replay = format!(
                "idgraph-chaos crash-loop --seed {} --shards {} --clients {} --cycles {cycles}",
                spec.seed, spec.shards, spec.clients
            );
            let spec = RunSpec { replay: replay.clone(), ..spec };
            (common, spec.clone(), runtime()?.block_on(harness::crash_loop(&spec, *cycles)))
        }
    };
    let report = report.with_context(|| format!("run failed; data and logs kept in {}", replay_args.dir.display()))?;
    let json = serde_json::to_string_pretty(&report)?;
    let path = common.report.clone().unwrap_or_else(|| replay_args.dir.join("report.json"));
    std::fs::write(&path, json).with_context(|| format!("writing {}", path.display()))?;
    print!("{}", report.summary());
    println!("report: {}", path.display());
    if report.passed && !common.keep && common.dir.is_none() {
        let _ = std::fs::remove_dir_all(&replay_args.dir);
    } else {
        println!("data, node logs and history: {}", replay_args.dir.display());
    }
    Ok(report.passed)
}

/// The harness's runtime; its threads start here, after any unshare.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build()
}

fn spec(common: &Common, nodes: usize, duration: Duration, faults: Vec<FaultKind>) -> anyhow::Result<RunSpec> {
    anyhow::ensure!((1..=7).contains(&nodes), "--nodes must be 1 to 7");
    anyhow::ensure!((1..=1024).contains(&common.shards), "--shards must be 1 to 1024");
    anyhow::ensure!((1..=256).contains(&common.clients), "--clients must be 1 to 256");
    let seed = common.seed.unwrap_or_else(|| fastrand::u64(..));
    let dir = match &common.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("idgraph-chaos-{seed}-{}", std::process::id())),
    };
    anyhow::ensure!(
        std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()),
        "{} is not empty (a run starts from fresh data directories)",
        dir.display()
    );
    let node_bin = common.node_bin.clone().unwrap_or_else(idgraph_chaos::cluster::default_node_bin);
    anyhow::ensure!(
        node_bin.exists(),
        "no node binary at {} (build it: cargo build -p idgraph-node, or give --node-bin)",
        node_bin.display()
    );
    if faults.contains(&FaultKind::CrashPoint) {
        let listed =
            std::process::Command::new(&node_bin).arg("--crash-points").output().context("asking the node for its crash points")?;
        let listed = String::from_utf8_lossy(&listed.stdout);
        let missing: Vec<&str> = idgraph_chaos::nemesis::crash_point_names().filter(|p| !listed.lines().any(|l| l == *p)).collect();
        anyhow::ensure!(
            missing.is_empty(),
            "{} cannot stop at {} (crash-point faults need a node built with --features failpoints)",
            node_bin.display(),
            missing.join(", ")
        );
    }
    anyhow::ensure!(
        !faults.contains(&FaultKind::DiskFull) || nix::unistd::geteuid().is_root(),
        "disk-full faults need root (each node's data directory goes on a tmpfs of its own)"
    );
    Ok(RunSpec {
        seed,
        nodes,
        shards: common.shards,
        clients: common.clients,
        duration,
        faults,
        node_bin,
        dir,
        max_steps: common.max_steps,
        replay: String::new(),
        canary: false,
    })
}
