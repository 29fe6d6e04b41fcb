//! `idgraph-node`: runs one idgraph node. With no arguments it serves
//! 127.0.0.1:50051 with data in ./idgraph-data and the built-in rules.

use anyhow::Context;
use clap::Parser;
use idgraph_node::config::{LogFormat, NodeConfig, Overrides};
use std::net::SocketAddr;
use std::path::PathBuf;

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
    /// Shards of a new cluster (default: 16 with --initial-cluster of several
    /// nodes, else 1); fixed once created.
    #[arg(long)]
    shards: Option<u32>,
    /// Join a running cluster through any member (HOST:PORT).
    #[arg(long)]
    join: Option<String>,
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

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.print_default_rules {
        print!("{}", idgraph_node::rules::BUILTIN_RULES_TOML);
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
    };
    let config = NodeConfig::load(args.config.as_deref(), &overrides)?;
    init_logs(&config);
    // Crash tests configure crash points with FAILPOINTS (see `idgraph_node::crash`).
    #[cfg(feature = "failpoints")]
    let _crash_points = fail::FailScenario::setup();
    let node = idgraph_node::server::start(&config).await.context("starting the node")?;
    // The first line on stdout says where the node listens (scripts and
    // tests that start it on port 0 read it).
    println!("idgraph-node listening on {}", node.addr());
    node.run_until(terminated()).await.context("serving")?;
    Ok(())
}
