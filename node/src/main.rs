//! `idgraph-node`: runs one idgraph node. With no arguments it serves
//! 127.0.0.1:50051 with data in ./idgraph-data and the built-in rules.

use anyhow::Context;
use clap::Parser;
use idgraph_node::config::{LogFormat, NodeConfig, Overrides};
use std::net::SocketAddr;
use std::path::PathBuf;

/// sled allocates and frees a node of its page cache for most reads and
/// writes: with glibc's allocator, malloc and free took about half of a
/// streaming node's CPU (`bench/analysis.md`).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(name = "idgraph-node", version, about = "idgraph identity-graph node")]
struct Args {
    /// TOML configuration file (see idgraph.example.toml).
    #[arg(long, env = "IDGRAPH_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Rule-set TOML file (default: the built-in rule set).
    #[arg(long)]
    rules: Option<PathBuf>,
    /// Log level or tracing filter.
    #[arg(long)]
    log_level: Option<String>,
    /// This node's id in the cluster.
    #[arg(long = "id")]
    node_id: Option<u64>,
    /// Bootstrap members: ID=HOST:PORT,... (default: a single-node cluster).
    #[arg(long)]
    initial_cluster: Option<String>,
    /// Shards of a new cluster (default: one per replication factor (3)
    /// initial members, rounded up); fixed once created.
    #[arg(long)]
    shards: Option<u32>,
    /// Join a running cluster through any member (HOST:PORT).
    #[arg(long)]
    join: Option<String>,
    /// The address peers and clients reach this node at (HOST:PORT; default:
    /// the listen address).
    #[arg(long)]
    advertise: Option<String>,
    /// Serve Prometheus metrics and plain-text gRPC health on this address.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Print the built-in rule set and exit.
    #[arg(long)]
    print_default_rules: bool,
    /// Print the crash points this build can stop at, one per line, and
    /// exit (none unless built with the `failpoints` feature).
    #[arg(long)]
    crash_points: bool,
}

fn init_logs(config: &NodeConfig) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn terminated() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_rules {
        print!("{}", idgraph_core::rules::BUILTIN_RULES_TOML);
        return Ok(());
    }
    if args.crash_points {
        for point in idgraph_node::crash::available() {
            println!("{point}");
        }
        return Ok(());
    }
    let overrides = Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        rules_file: args.rules,
        log_level: args.log_level,
        node_id: args.node_id,
        initial_cluster: args.initial_cluster,
        join: args.join,
        shards: args.shards,
        advertise: args.advertise,
        metrics_listen: args.metrics_listen,
    };
    let config = NodeConfig::load(args.config.as_deref(), &overrides)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        runtime.worker_threads(config.worker_threads);
    }
    runtime.enable_all().build().context("starting the async runtime")?.block_on(serve(config))
}

/// Runs the node until it is stopped (or restarts itself in place).
async fn serve(config: NodeConfig) -> anyhow::Result<()> {
    init_logs(&config);
    // Crash tests configure crash points with FAILPOINTS (see `idgraph_node::crash`).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    // A full disk at start (a restart in place whose room was taken again)
    // is waited out, not an exit: the node opens once it has room, in a
    // fresh process image (the failed start may still hold its storage
    // open, and sled's lock on it, from tasks it had started).
    let node = match idgraph_node::server::start(&config).await {
        Err(idgraph_node::server::ServerError::Store(idgraph_node::storage::StoreError::DiskFull)) => {
            tracing::error!("the data directory's disk is full; the node opens its storage once the disk has room");
            tokio::select! {
                _ = terminated() => return Ok(()),
                () = wait_for_room(&config.data_dir) => {}
            }
            return Err(restart_in_place(config.listen).context("restarting the node to open its storage"));
        }
        started => started.context("starting the node")?,
    };
    // A line on stdout says where the node listens (scripts and tests that
    // start it on port 0 read it), after one saying where its metrics are
    // served, when they are. A reader that has gone (after
    // the first line, before a restart in place) is no reason to stop.
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        if let Some(metrics) = node.metrics_addr() {
            let _ = writeln!(out, "idgraph-node metrics on {metrics}");
        }
        let _ = writeln!(out, "idgraph-node listening on {}", node.addr()).and_then(|()| out.flush());
    }
    let addr = node.addr();
    let failure = node.storage_failure();
    let mut reopen = false;
    let stop = async {
        let terminated = terminated();
        tokio::pin!(terminated);
        tokio::select! {
            _ = &mut terminated => {}
            idgraph_node::server::StorageFailure::DiskFull = failure => {
                tracing::error!("the data directory's disk is full; the node restarts its storage once the disk has room");
                // A stop asked for meanwhile is a stop, not a restart.
                tokio::select! {
                    _ = &mut terminated => {}
                    () = wait_for_room(&config.data_dir) => reopen = true,
                }
            }
        }
    };
    // A node whose storage failed cannot flush it on the way out: that is
    // expected, and the restart replays what the flush would have kept.
    let served = node.run_until(stop).await;
    if reopen {
        if let Err(e) = served {
            tracing::warn!(error = %e, "the node stopped with its storage failed");
        }
        return Err(restart_in_place(addr).context("restarting the node to reopen its storage"));
    }
    served.context("serving")?;
    Ok(())
}

/// Waits until the data directory's file system has room again: 64 MiB, or
/// a tenth of a smaller file system. Meanwhile the node keeps serving what
/// it can: reads of other nodes' shards, and a precise refusal of every new
/// write.
async fn wait_for_room(dir: &std::path::Path) {
    let needed = idgraph_node::storage::disk_space(dir).map_or(64 << 20, |s| (64 << 20).min(s.total / 10));
    let mut logged = false;
    loop {
        match idgraph_node::storage::disk_space(dir).map(|s| s.free) {
            Ok(free) if free >= needed => {
                tracing::info!(free_mib = free >> 20, "the data directory's disk has room again");
                return;
            }
            Ok(free) if !logged => {
                tracing::warn!(free_mib = free >> 20, needed_mib = needed >> 20, "waiting for room on the data directory's disk");
                logged = true;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the data directory's free space"),
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

/// Replaces this process with a fresh start of the same binary, arguments
/// and environment, on the address it was serving (a node started on port 0
/// keeps its port). Same process id, so a supervisor sees no exit; opening
/// the data directory again clears sled's stored write error and replays
/// the Raft logs, as after a crash. Returns only if the exec failed.
fn restart_in_place(addr: SocketAddr) -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut given = std::env::args_os().skip(1);
    while let Some(arg) = given.next() {
        if arg == "--listen" {
            given.next();
        } else if !arg.to_string_lossy().starts_with("--listen=") {
            args.push(arg);
        }
    }
    tracing::warn!(%addr, "restarting the node in place to reopen its storage");
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => return e.into(),
    };
    std::process::Command::new(exe).args(args).arg("--listen").arg(addr.to_string()).exec().into()
}
