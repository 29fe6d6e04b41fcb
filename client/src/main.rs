//! `idgraphctl`: operate an idgraph node from the shell.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use idgraph_client::idgraph_proto::json;
use idgraph_client::idgraph_proto::v1 as pb;
use idgraph_client::{count_events, load, parse_identifier, Client, Cluster, EventLines, LoadOptions};
use indicatif::{ProgressBar, ProgressStyle};
use render::{show, Output};

mod backup;
mod render;
mod report;

#[derive(Parser)]
#[command(name = "idgraphctl", version, about = "Operate an idgraph identity graph", propagate_version = true)]
struct Cli {
    /// Node to talk to.
    #[arg(long, global = true, env = "IDGRAPH_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Bearer token to send (a cluster that checks tokens needs one: role
    /// client for events and profiles, admin for everything else).
    #[arg(long, global = true, env = "IDGRAPH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM certificate of the authority that signed the node's certificate;
    /// with it (or an https:// endpoint) the connection uses TLS.
    #[arg(long, global = true, env = "IDGRAPH_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    /// Name the node's certificate must carry, when it differs from the
    /// endpoint's host.
    #[arg(long, global = true, env = "IDGRAPH_TLS_DOMAIN")]
    tls_domain: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Send one identity event.
    Identify(IdentifyArgs),
    /// Bulk-load identity events from a JSON-lines file through IdentifyStream, to each event's shard leader.
    Load(LoadArgs),
    /// Show a profile, by identifier or profile id.
    Get(GetArgs),
    /// Merge two or more profiles (named by identifier or id).
    Merge(MergeArgs),
    /// Undo a recorded merge, or split identifiers out into a new profile.
    Unmerge(UnmergeArgs),
    /// Erase a profile (GDPR): identifiers, traits and lineage.
    Delete(ProfileKey),
    /// Merge lineage.
    #[command(subcommand, name = "merge-record")]
    MergeRecord(MergeRecordCmd),
    /// Values listed as hubs.
    #[command(subcommand)]
    Hubs(HubsCmd),
    /// Rule-set versions: store, list, show, compare.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Canary rollouts of a rule-set version, shard by shard.
    #[command(subcommand)]
    Canary(CanaryCmd),
    /// Graph counters.
    Stats,
    /// The cluster as the node sees it: nodes, where each shard's replicas
    /// are, moves under way, and its own replicas' leaders, log indexes, lag.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// The audit log: operator actions, who made them, when, on what.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Whether the node serves its shards (grpc.health.v1; no token
    /// needed): exits 0 when it does, 1 when not.
    Health,
    /// Back up every shard, consistently, while the cluster serves, into a
    /// new directory.
    Backup {
        /// Directory to create (must not exist, or be empty).
        dir: std::path::PathBuf,
    },
    /// Restore a backup into a new cluster (same shard count, no records yet).
    Restore {
        /// A directory written by `idgraphctl backup`.
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Entries, oldest first.
    List {
        /// Only entries after this entry id.
        #[arg(long, default_value = "")]
        after: String,
        /// At most this many (up to 10000).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// The cluster map (nodes, replica placement, moves under way) and the
    /// node's own replicas: Raft state, leader, term, log indexes, members.
    Status,
    /// Register a node (already started); replicas then move to it until
    /// every node holds about as many.
    AddNode {
        #[arg(long)]
        id: u64,
        /// HOST:PORT the other nodes reach it at.
        #[arg(long)]
        addr: String,
    },
    /// Remove a node: its replicas move to other nodes first, then it is
    /// forgotten (waits up to two minutes).
    RemoveNode {
        #[arg(long)]
        id: u64,
    },
    /// Move one shard's leadership to another voter.
    TransferLeader {
        #[arg(long)]
        shard: u32,
        /// The node to lead the shard.
        #[arg(long)]
        to: u64,
    },
}

#[derive(Args)]
struct IdentifyArgs {
    /// Identifier as TYPE=VALUE; repeat for several.
    #[arg(long = "id", required = true, value_parser = parse_identifier)]
    ids: Vec<pb::Identifier>,
    /// Event id (default: a new unique id).
    #[arg(long)]
    event_id: Option<String>,
    /// Event time in ms since the epoch (default: now).
    #[arg(long, default_value_t = 0)]
    timestamp_ms: i64,
    /// Trait as KEY=VALUE; VALUE is JSON if it parses, else a string.
    #[arg(long = "trait", value_parser = parse_trait)]
    traits: Vec<(String, serde_json::Value)>,
    #[arg(long, default_value = "idgraphctl")]
    source: String,
}

#[derive(Args)]
struct LoadArgs {
    /// JSON-lines file, one event per line (see README). Every line is
    /// checked before any is sent; each event goes to its home shard's
    /// leader (`--endpoint` may name several nodes, comma-separated), and
    /// is sent again if its node is lost.
    file: std::path::PathBuf,
    /// Events in flight per node, at most.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Clone)]
#[group(required = true, multiple = false)]
struct ProfileKey {
    /// Identifier as TYPE=VALUE.
    #[arg(long = "id", value_parser = parse_identifier)]
    id: Option<pb::Identifier>,
    /// Profile id (a merged-away id resolves to its survivor).
    #[arg(long)]
    profile: Option<String>,
}

#[derive(Args)]
struct GetArgs {
    #[command(flatten)]
    key: ProfileKey,
    /// Read this node's replica without asking the leader (faster; may lag).
    #[arg(long)]
    stale: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// Identifier (TYPE=VALUE) of a profile to merge; repeat.
    #[arg(long = "id", value_parser = parse_identifier)]
    ids: Vec<pb::Identifier>,
    /// Profile id to merge; repeat.
    #[arg(long = "profile")]
    profiles: Vec<String>,
    /// Merge even if the result breaks a rule limit.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Args)]
struct UnmergeArgs {
    /// Undo this recorded merge.
    #[arg(long, conflicts_with_all = ["profile", "ids"], required_unless_present = "profile")]
    merge_id: Option<String>,
    /// Split identifiers out of this profile...
    #[arg(long, requires = "ids")]
    profile: Option<String>,
    /// ...these ones (TYPE=VALUE; repeat).
    #[arg(long = "id", value_parser = parse_identifier)]
    ids: Vec<pb::Identifier>,
    #[arg(long, default_value = "")]
    reason: String,
}

#[derive(Subcommand)]
enum MergeRecordCmd {
    /// Show one merge's lineage.
    Show { merge_id: String },
}

#[derive(Subcommand)]
enum HubsCmd {
    /// List values that stopped causing merges.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

#[derive(Subcommand)]
enum RulesCmd {
    /// Print a stored rule set (TOML): VERSION, or the cluster's.
    Show {
        #[arg(value_name = "VERSION")]
        rule_version: Option<String>,
    },
    /// Every stored version, which one the cluster runs, and which shards
    /// run another (canary shards).
    List,
    /// Store a new version from a TOML file (immutable once stored; a
    /// canary rollout puts it to work).
    Put { file: std::path::PathBuf },
    /// Line diff of two stored versions.
    Diff { from: String, to: String },
}

#[derive(Subcommand)]
enum CanaryCmd {
    /// Start rolling a stored version out with a canary plan (TOML; see docs/canary.md).
    Start { plan: std::path::PathBuf },
    /// The rollout under way: step, shards, KPIs canary against control
    /// with the judge's verdicts.
    Status,
    /// Widen a step that waits for a person (manual gate or marginal
    /// verdict), or one judged inconclusive.
    Promote {
        /// The step (from 1) being promoted: refused if another is current.
        #[arg(long, default_value_t = 0, hide_default_value = true)]
        step: u32,
    },
    /// Roll back now: canary shards return to the control version and
    /// merges made under the candidate are undone.
    Abort {
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Every rollout, finished or not.
    History,
    /// Write a rollout's POC report as Markdown and as a self-contained
    /// HTML page with KPI charts.
    Report {
        /// Rollout id (see `canary history`).
        id: String,
        /// Directory to write `canary-ID.md` and `canary-ID.html` into.
        #[arg(long, default_value = ".")]
        dir: std::path::PathBuf,
    },
}

fn parse_trait(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

fn key_of(k: ProfileKey) -> (Option<pb::Identifier>, Option<String>) {
    (k.id, k.profile)
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli).await {
        match e.downcast_ref::<tonic::Status>() {
            Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
            None => eprintln!("error: {e:#}"),
        }
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let output = cli.output;
    let credentials = idgraph_client::Credentials { token: cli.token, ca_cert: cli.ca_cert, tls_domain: cli.tls_domain };
    let command = match cli.command {
        Command::Load(a) => return load_file(&cli.endpoint, &credentials, a, output).await,
        other => other,
    };
    let mut client = Client::connect_with(&cli.endpoint, &credentials).await?;
    match command {
        Command::Identify(a) => {
            let req = pb::IdentifyRequest {
                event_id: a.event_id.unwrap_or_else(|| format!("ctl-{}", ulid::Ulid::new())),
                timestamp_ms: a.timestamp_ms,
                identifiers: a.ids,
                traits: (!a.traits.is_empty()).then(|| json::to_struct(&a.traits.into_iter().collect())),
                source: a.source,
            };
            show(&client.graph().identify(req).await?.into_inner(), output)
        }
        // Taken above, before a single node is connected.
        Command::Load(_) => bail!("load takes the endpoints itself"),
        Command::Get(GetArgs { key: k, stale }) => {
            let key = match key_of(k) {
                (Some(id), _) => pb::get_profile_request::Key::Identifier(id),
                (None, Some(p)) => pb::get_profile_request::Key::ProfileId(p),
                (None, None) => bail!("name a profile with --id or --profile"),
            };
            let consistency = if stale { pb::ReadConsistency::Stale } else { pb::ReadConsistency::Linearizable } as i32;
            show(&client.graph().get_profile(pb::GetProfileRequest { key: Some(key), consistency }).await?.into_inner(), output)
        }
        Command::Merge(a) => {
            let mut profiles: Vec<pb::ProfileRef> =
                a.ids.into_iter().map(|i| pb::ProfileRef { key: Some(pb::profile_ref::Key::Identifier(i)) }).collect();
            profiles.extend(a.profiles.into_iter().map(|p| pb::ProfileRef { key: Some(pb::profile_ref::Key::ProfileId(p)) }));
            if profiles.len() < 2 {
                bail!("name at least two profiles with --id and/or --profile");
            }
            show(&client.graph().merge(pb::MergeRequest { profiles, force: a.force, reason: a.reason }).await?.into_inner(), output)
        }
        Command::Unmerge(a) => {
            let target = match (a.merge_id, a.profile) {
                (Some(m), _) => pb::unmerge_request::Target::MergeId(m),
                (None, Some(p)) => pb::unmerge_request::Target::Split(pb::SplitIdentifiers { profile_id: p, identifiers: a.ids }),
                (None, None) => bail!("give --merge-id, or --profile with --id"),
            };
            show(&client.graph().unmerge(pb::UnmergeRequest { target: Some(target), reason: a.reason }).await?.into_inner(), output)
        }
        Command::Delete(k) => {
            let key = match key_of(k) {
                (Some(id), _) => pb::delete_profile_request::Key::Identifier(id),
                (None, Some(p)) => pb::delete_profile_request::Key::ProfileId(p),
                (None, None) => bail!("name a profile with --id or --profile"),
            };
            show(&client.graph().delete_profile(pb::DeleteProfileRequest { key: Some(key) }).await?.into_inner(), output)
        }
        Command::MergeRecord(MergeRecordCmd::Show { merge_id }) => {
            show(&client.graph().get_merge_record(pb::GetMergeRecordRequest { merge_id }).await?.into_inner(), output)
        }
        Command::Hubs(HubsCmd::List { limit }) => {
            show(&client.admin().list_hubs(pb::ListHubsRequest { limit }).await?.into_inner(), output)
        }
        Command::Rules(cmd) => rules(&mut client, cmd, output).await,
        Command::Canary(cmd) => canary(&mut client, cmd, output).await,
        Command::Audit(AuditCmd::List { after, limit }) => {
            show(&client.admin().list_audit(pb::ListAuditRequest { after, limit }).await?.into_inner(), output)
        }
        Command::Backup { dir } => {
            let summary = backup::write(&mut client, &dir, output == Output::Table).await?;
            show(&summary, output)
        }
        Command::Restore { dir } => {
            let (chunks, failed) = backup::read(&dir)?;
            let answer = client.admin().restore(chunks).await;
            if let Some(e) = failed.lock().ok().and_then(|mut e| e.take()) {
                bail!(
                    "reading the backup in {}: {e} (the node refused the torn backup; nothing was restored from it past that point)",
                    dir.display()
                );
            }
            let r = answer?.into_inner();
            show(&backup::Restored { dir: dir.display().to_string(), shards: r.shards, bytes: r.bytes }, output)
        }
        Command::Health => {
            let serving = client.serving().await?;
            show(&render::Health { serving }, output)?;
            if !serving {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Stats => show(&client.admin().get_stats(pb::GetStatsRequest {}).await?.into_inner(), output),
        Command::Cluster(cmd) => {
            let c = match cmd {
                ClusterCmd::Status => client.admin().get_cluster(pb::GetClusterRequest {}).await?.into_inner(),
                ClusterCmd::AddNode { id, addr } => client.admin().add_node(pb::AddNodeRequest { node_id: id, addr }).await?.into_inner(),
                ClusterCmd::RemoveNode { id } => client.admin().remove_node(pb::RemoveNodeRequest { node_id: id }).await?.into_inner(),
                ClusterCmd::TransferLeader { shard, to } => {
                    let r = client.admin().transfer_leader(pb::TransferLeaderRequest { shard, node_id: to }).await?.into_inner();
                    if output == Output::Table {
                        println!("shard {shard} is led by node {}", r.leader_id);
                    }
                    client.admin().get_cluster(pb::GetClusterRequest {}).await?.into_inner()
                }
            };
            show(&c, output)
        }
    }
}

/// `idgraphctl load`: every line checked, then each event sent to its home
/// shard's leader among the nodes `endpoints` (comma-separated) lead to.
async fn load_file(endpoints: &str, credentials: &idgraph_client::Credentials, a: LoadArgs, output: Output) -> Result<()> {
    let count = count_events(EventLines::open(&a.file)?).with_context(|| format!("checking {}", a.file.display()))?;
    let endpoints: Vec<String> = endpoints.split(',').map(|e| e.trim().to_string()).filter(|e| !e.is_empty()).collect();
    let cluster = Cluster::connect(&endpoints, credentials).await?;
    let bar = if a.quiet || output == Output::Json { ProgressBar::hidden() } else { ProgressBar::new(count) };
    bar.set_style(ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, eta {eta})")?);
    let options = LoadOptions { window: a.window, ..LoadOptions::default() };
    let s = load(&cluster, EventLines::open(&a.file)?, &options, |n| bar.set_position(n)).await?;
    bar.finish_and_clear();
    show(&s, output)?;
    if output == Output::Table {
        // JSON lists them in its `errors` field.
        s.errors.iter().for_each(|e| eprintln!("error: {e}"));
    }
    if s.failed > 0 {
        std::process::exit(2);
    }
    Ok(())
}

async fn rules(client: &mut Client, cmd: RulesCmd, output: Output) -> Result<()> {
    let admin = client.admin();
    match cmd {
        RulesCmd::Show { rule_version } => {
            show(&admin.get_rule_set(pb::GetRuleSetRequest { version: rule_version.unwrap_or_default() }).await?.into_inner(), output)
        }
        RulesCmd::List => show(&admin.list_rule_sets(pb::ListRuleSetsRequest {}).await?.into_inner(), output),
        RulesCmd::Put { file } => {
            let toml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let stored = admin.put_rule_set(pb::PutRuleSetRequest { toml }).await?.into_inner();
            if output == Output::Table {
                println!("stored rule set version {}", stored.version);
                return Ok(());
            }
            show(&stored, output)
        }
        RulesCmd::Diff { from, to } => {
            let a = admin.get_rule_set(pb::GetRuleSetRequest { version: from.clone() }).await?.into_inner();
            let b = admin.get_rule_set(pb::GetRuleSetRequest { version: to.clone() }).await?.into_inner();
            let diff = similar::TextDiff::from_lines(&a.toml, &b.toml);
            print!("{}", diff.unified_diff().context_radius(3).header(&from, &to));
            Ok(())
        }
    }
}

async fn canary(client: &mut Client, cmd: CanaryCmd, output: Output) -> Result<()> {
    let admin = client.admin();
    match cmd {
        CanaryCmd::Start { plan } => {
            let plan_toml = std::fs::read_to_string(&plan).with_context(|| format!("reading {}", plan.display()))?;
            show(&admin.start_canary(pb::StartCanaryRequest { plan_toml }).await?.into_inner(), output)
        }
        CanaryCmd::Status => show(&admin.get_canary(pb::GetCanaryRequest { id: String::new() }).await?.into_inner(), output),
        CanaryCmd::Promote { step } => show(&admin.promote_canary(pb::PromoteCanaryRequest { step }).await?.into_inner(), output),
        CanaryCmd::Abort { reason } => show(&admin.abort_canary(pb::AbortCanaryRequest { reason }).await?.into_inner(), output),
        CanaryCmd::History => show(&admin.list_canaries(pb::ListCanariesRequest {}).await?.into_inner(), output),
        CanaryCmd::Report { id, dir } => {
            let r = admin.get_canary(pb::GetCanaryRequest { id: id.clone() }).await?.into_inner();
            let record = render::rollout_record(&r)?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let md = dir.join(format!("canary-{id}.md"));
            let html = dir.join(format!("canary-{id}.html"));
            std::fs::write(&md, report::markdown(&record)).with_context(|| format!("writing {}", md.display()))?;
            std::fs::write(&html, report::html(&record)).with_context(|| format!("writing {}", html.display()))?;
            if output == Output::Json {
                println!("{}", serde_json::json!({ "markdown": md, "html": html }));
            } else {
                println!("wrote {} and {}", md.display(), html.display());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
