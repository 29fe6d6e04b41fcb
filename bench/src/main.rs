//! `idgraph-bench`: one benchmark run against one system; `bench/run.sh`
//! runs the whole comparison and writes BENCHMARKS.md.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use idgraph_bench::peers::{BatchStitch, Idgraph, Peer, Postgres, Routing, SledCeiling};
use idgraph_bench::run::{self, Measured, Workload};
use idgraph_bench::world::{normalized_key, pairwise, raw_from_key, Accuracy, Event, EventStream, RawId, World, WorldSpec};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(name = "idgraph-bench", about = "benchmark idgraph and its peers on generated identity events")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs one workload against one system and prints what it measured.
    Run(Box<RunArgs>),
    /// Prints the generated world's size (persons, events, identifiers).
    World {
        #[command(flatten)]
        world: WorldArgs,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
enum Target {
    Idgraph,
    Postgres,
    Sled,
    /// etcd members (`--etcd`); needs a build with the `etcd` feature.
    Etcd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Clone)]
struct WorldArgs {
    /// Persons in the generated world (about seven identifiers each).
    #[arg(long, default_value_t = 10_000)]
    persons: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Share of persons with very large profiles.
    #[arg(long, default_value_t = 0.001)]
    skew: f64,
    /// Share of events delivered twice.
    #[arg(long, default_value_t = 0.02)]
    redelivery: f64,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long, value_enum)]
    target: Target,
    #[arg(long, value_enum, default_value = "ingest")]
    workload: Workload,
    #[command(flatten)]
    world: WorldArgs,
    /// Concurrent clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// idgraph nodes to spread clients over (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:50051")]
    endpoints: Vec<String>,
    /// idgraph: ingest over IdentifyStream instead of unary calls.
    #[arg(long)]
    stream: bool,
    /// Events in flight per stream.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// idgraph: stale reads from any replica instead of linearizable ones.
    #[arg(long)]
    stale: bool,
    /// idgraph: how clients pick a node: `leader` (each request to the node
    /// leading its home shard, as the client library does) or `spread`
    /// (client c to endpoint c, the node forwarding what it does not lead).
    #[arg(long, value_enum, default_value = "leader")]
    routing: Routing,
    /// PostgreSQL connection string.
    #[arg(long, default_value = "host=127.0.0.1 port=5432 user=postgres dbname=postgres")]
    pg: String,
    /// etcd members' client URLs (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    /// Directory for the sled ceiling's database (must not exist).
    #[arg(long, default_value = "target/bench-sled")]
    sled_dir: std::path::PathBuf,
    /// Look-ups of the lookup workload.
    #[arg(long, default_value_t = 20_000)]
    lookups: usize,
    /// Lookup workload at this many look-ups a second in all, released at
    /// evenly spaced moments to whichever client is idle (open loop: a
    /// look-up's latency counts from when it was due, so a slow answer
    /// delays no measurement); unset: as fast as the clients go.
    #[arg(long)]
    rate: Option<f64>,
    /// Persons whose identifiers are looked up afterwards for precision and
    /// recall (0: skip).
    #[arg(long, default_value_t = 1_000)]
    accuracy_sample: usize,
    /// Ingest in this many consecutive parts, each measured on its own
    /// (throughput as the graph grows).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// A process whose memory is reported after each step (a node's pid).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// A directory whose size is reported after each step (a data dir).
    #[arg(long)]
    watch_dir: Option<std::path::PathBuf>,
    /// A label carried into the output (e.g. the setup: "3 nodes").
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, value_enum, default_value = "table")]
    output: Output,
}

/// One result line.
#[derive(Serialize)]
struct Result {
    label: String,
    target: Target,
    system: String,
    workload: Workload,
    clients: usize,
    stream: bool,
    stale: bool,
    /// idgraph: how clients picked a node.
    routing: Option<Routing>,
    /// The lookup workload's pace, look-ups a second in all (unset: as
    /// fast as the clients go).
    #[serde(skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    persons: usize,
    identifiers: usize,
    preloaded_events: usize,
    measured: Measured,
    accuracy: Option<Accuracy>,
    /// With `--steps`: each step's throughput as the graph grows.
    growth: Vec<GrowthStep>,
    /// `--workload batch`: the phases of the batch job.
    batch: Option<BatchStitch>,
}

/// One step of an ingest measured in `--steps` parts.
#[derive(Serialize)]
struct GrowthStep {
    events: usize,
    /// Distinct identifiers (normalised) sent so far.
    identifiers: usize,
    ops_per_s: f64,
    p99_us: u64,
    /// Resident memory of `--watch-pid` after the step (0: not watched).
    rss_bytes: u64,
    /// Bytes under `--watch-dir` after the step (0: not watched).
    disk_bytes: u64,
}

/// Resident set size of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Bytes of the files under `dir`.
fn disk_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::World { world } => {
            // Streamed: any size counts in bounded memory.
            let started = Instant::now();
            let mut stream = EventStream::new(&spec(&world));
            let events = stream.by_ref().count();
            println!(
                "{} persons, {} events, {} identifiers with an owner (generated in {:.1} s)",
                world.persons,
                events,
                stream.identifiers_with_owner(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Run(args) => runtime.block_on(run_bench(*args)),
    }
}

fn spec(w: &WorldArgs) -> WorldSpec {
    WorldSpec { persons: w.persons, seed: w.seed, skew: w.skew, redelivery: w.redelivery }
}

async fn run_bench(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.clients >= 1, "--clients must be at least 1");
    let result = match args.target {
        Target::Idgraph => {
            let peer = Arc::new(Idgraph::connect(&args.endpoints, args.routing, args.stale).await.map_err(anyhow::Error::msg)?);
            measure(peer, &args).await?
        }
        Target::Postgres => {
            let peer =
                Arc::new(Postgres::connect(&args.pg, args.clients).await.map_err(anyhow::Error::msg).context("connecting to PostgreSQL")?);
            if args.workload == Workload::Batch {
                batch(&peer, &World::generate(&spec(&args.world)), &args).await?
            } else {
                measure(peer, &args).await?
            }
        }
        #[cfg(feature = "etcd")]
        Target::Etcd => {
            let peer = Arc::new(
                idgraph_bench::peers::Etcd::connect(&args.etcd, args.clients)
                    .await
                    .map_err(anyhow::Error::msg)
                    .context("connecting to etcd")?,
            );
            measure(peer, &args).await?
        }
        #[cfg(not(feature = "etcd"))]
        Target::Etcd => {
            anyhow::bail!("this idgraph-bench was built without the etcd feature (cargo build -p idgraph-bench --features etcd)")
        }
        Target::Sled => {
            anyhow::ensure!(!args.sled_dir.exists(), "{} exists; the ceiling starts from an empty database", args.sled_dir.display());
            let peer = Arc::new(SledCeiling::open(&args.sled_dir).map_err(anyhow::Error::msg)?);
            let r = measure(peer, &args).await;
            let _ = std::fs::remove_dir_all(&args.sled_dir);
            r?
        }
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string(&result)?),
        Output::Table => {
            let m = &result.measured;
            println!(
                "{} · {:?} · {} clients{}",
                result.system,
                result.workload,
                result.clients,
                if result.stream { " · stream" } else { "" }
            );
            println!("  {} ops in {:.2} s: {:.0} ops/s, {} errors", m.ops, m.seconds, m.ops_per_s, m.errors);
            println!("  latency p50 {} µs, p99 {} µs, p999 {} µs, max {} µs", m.p50_us, m.p99_us, m.p999_us, m.max_us);
            if let Some(e) = &m.first_error {
                println!("  first error: {e}");
            }
            if let Some(a) = result.accuracy {
                println!("  pairwise precision {:.4}, recall {:.4} over {} identifiers", a.precision, a.recall, a.identifiers);
            }
        }
    }
    Ok(())
}

/// Loads what the workload needs first (untimed), runs it, and measures
/// accuracy afterwards. An ingest with no accuracy to score streams its
/// world as it is sent (memory holds one step, not the world); every other
/// workload generates the whole world first.
async fn measure<P: Peer>(peer: Arc<P>, args: &RunArgs) -> anyhow::Result<Result> {
    let spec = spec(&args.world);
    let streamed = args.workload == Workload::Ingest && args.accuracy_sample == 0;
    let world = (!streamed).then(|| World::generate(&spec));
    let (preload, timed) = world.as_ref().map(|w| run::split(w, args.workload)).unwrap_or_default();
    if !preload.is_empty() {
        let loaded = run::ingest_unary(peer.clone(), Arc::new(preload.clone()), args.clients.max(8)).await;
        anyhow::ensure!(loaded.errors == 0, "preloading failed: {:?}", loaded.first_error);
    }
    // Look-ups ask for identifiers the rules accept (not the placeholders).
    let rules = idgraph_core::rules::RuleSet::builtin();
    let known: Arc<Vec<RawId>> = Arc::new(
        preload.iter().flat_map(|e| e.ids.iter()).filter(|i| normalized_key(&rules, i.kind, &i.value).is_some()).cloned().collect(),
    );
    let timed = Arc::new(timed);
    let ingest = |events: Arc<Vec<Event>>| {
        let peer = peer.clone();
        async move {
            match (args.stream, args.target) {
                (true, Target::Idgraph) => {
                    let idgraph = Idgraph::connect(&args.endpoints, args.routing, args.stale).await.map_err(anyhow::Error::msg)?;
                    Ok(run::ingest_stream(&idgraph, events, args.clients, args.window).await)
                }
                (true, _) => anyhow::bail!("--stream applies to idgraph only"),
                (false, _) => Ok(run::ingest_unary(peer, events, args.clients).await),
            }
        }
    };
    let mut stream = streamed.then(|| EventStream::new(&spec));
    let mut growth = Vec::new();
    let measured = match args.workload {
        Workload::Batch => anyhow::bail!("--workload batch applies to --target postgres only"),
        Workload::Ingest | Workload::MergeHeavy if args.steps > 1 || stream.is_some() => {
            // The parts: of the streamed world, or of the timed events.
            let parts: Box<dyn Iterator<Item = Vec<Event>> + '_> = match stream.as_mut() {
                Some(stream) => Box::new(stream.parts(args.steps)),
                None => Box::new(timed.chunks(timed.len().div_ceil(args.steps).max(1)).map(<[Event]>::to_vec)),
            };
            // Identifiers sent so far, as 64-bit hashes of their normalised
            // keys: a tenth of the keys' memory, and about one chance in
            // 3,700 that two of 100 million collide (n² / 2⁶⁵).
            let (mut seen, mut sent, mut last) = (std::collections::HashSet::<u64>::new(), 0, None);
            let (mut ops, mut errors, mut seconds) = (0, 0, 0.0);
            let hash = |key: String| {
                use std::hash::{BuildHasher, BuildHasherDefault};
                BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
            };
            for part in parts {
                seen.extend(part.iter().flat_map(|e| e.ids.iter()).filter_map(|i| normalized_key(&rules, i.kind, &i.value)).map(hash));
                sent += part.len();
                let m = ingest(Arc::new(part)).await?;
                if args.steps > 1 {
                    growth.push(GrowthStep {
                        events: sent,
                        identifiers: seen.len(),
                        ops_per_s: m.ops_per_s,
                        p99_us: m.p99_us,
                        rss_bytes: args.watch_pid.map_or(0, rss_bytes),
                        disk_bytes: args.watch_dir.as_deref().map_or(0, disk_bytes),
                    });
                }
                (ops, errors, seconds) = (ops + m.ops, errors + m.errors, seconds + m.seconds);
                last = Some(m);
            }
            // Totals over the steps; latencies are the last (largest) step's.
            let mut m = last.ok_or_else(|| anyhow::anyhow!("no events to ingest"))?;
            (m.ops, m.errors, m.seconds, m.ops_per_s) = (ops, errors, seconds, ops as f64 / f64::max(seconds, 1e-9));
            m
        }
        Workload::Ingest | Workload::MergeHeavy => ingest(timed.clone()).await?,
        Workload::Lookup => run::lookups(peer.clone(), known.clone(), args.clients, args.lookups, args.rate, args.world.seed).await,
        Workload::Mixed => run::mixed(peer.clone(), known.clone(), timed.clone(), args.clients, args.world.seed).await,
    };
    // sled and etcd store identifiers without resolving them: no profiles to score.
    let resolves = !matches!(args.target, Target::Sled | Target::Etcd);
    let accuracy = match &world {
        Some(world) if args.accuracy_sample > 0 && resolves && args.workload != Workload::Mixed => {
            Some(accuracy(&*peer, world, args.accuracy_sample).await?)
        }
        _ => None,
    };
    let identifiers = match (&world, &stream) {
        (Some(world), _) => world.identifier_count(),
        (None, Some(stream)) => stream.identifiers_with_owner(),
        (None, None) => 0,
    };
    Ok(Result {
        label: args.label.clone(),
        target: args.target,
        system: peer.name(),
        workload: args.workload,
        clients: args.clients,
        stream: args.stream,
        stale: args.stale,
        routing: (args.target == Target::Idgraph).then_some(args.routing),
        rate: args.rate.filter(|_| args.workload == Workload::Lookup),
        persons: spec.persons,
        identifiers,
        preloaded_events: preload.len(),
        measured,
        accuracy,
        growth,
        batch: None,
    })
}

/// PostgreSQL's batch stitching: load and label propagation timed as one
/// job over every event (one session; no per-event latency).
async fn batch(peer: &Postgres, world: &World, args: &RunArgs) -> anyhow::Result<Result> {
    let started = Instant::now();
    let stitched = peer.stitch_batch(&world.events).await.map_err(anyhow::Error::msg).context("batch stitching in PostgreSQL")?;
    let seconds = started.elapsed().as_secs_f64();
    let measured = Measured {
        ops: world.events.len() as u64,
        seconds,
        ops_per_s: world.events.len() as f64 / f64::max(seconds, 1e-9),
        ..Measured::default()
    };
    let accuracy = if args.accuracy_sample > 0 { Some(accuracy(peer, world, args.accuracy_sample).await?) } else { None };
    Ok(Result {
        label: args.label.clone(),
        target: args.target,
        system: "postgresql (batch)".into(),
        workload: args.workload,
        clients: 1,
        stream: false,
        stale: false,
        routing: None,
        rate: None,
        persons: world.persons.len(),
        identifiers: world.identifier_count(),
        preloaded_events: 0,
        measured,
        accuracy,
        growth: Vec::new(),
        batch: Some(stitched),
    })
}

/// Looks up every identifier of a sample of persons and scores the
/// profiles found against the truth.
async fn accuracy<P: Peer>(peer: &P, world: &World, sample: usize) -> anyhow::Result<Accuracy> {
    let mut rng = fastrand::Rng::with_seed(world.spec.seed ^ 0xacc);
    let mut persons: Vec<usize> = (0..world.persons.len()).collect();
    rng.shuffle(&mut persons);
    persons.truncate(sample);
    let chosen: std::collections::HashSet<usize> = persons.into_iter().collect();
    let mut placed = HashMap::new();
    for (key, person) in &world.truth {
        if !chosen.contains(person) {
            continue;
        }
        let Some(id) = raw_from_key(key) else { continue };
        if let Some(profile) = peer.lookup(0, &id).await.map_err(anyhow::Error::msg)? {
            placed.insert(key.clone(), profile);
        }
    }
    Ok(pairwise(&world.truth, &placed))
}
