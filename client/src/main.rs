//! `idgraphctl`: operate an idgraph node from the shell.

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use comfy_table::{presets::UTF8_FULL_CONDENSED, ContentArrangement, Table};
use idgraph_client::idgraph_proto::json;
use idgraph_client::idgraph_proto::v1 as pb;
use idgraph_client::{load, parse_identifier, parse_jsonl, Client};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "idgraphctl", version, about = "Operate an idgraph identity graph", propagate_version = true)]
struct Cli {
    /// Node to talk to.
    #[arg(long, global = true, env = "IDGRAPH_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Send one identity event.
    Identify(IdentifyArgs),
    /// Bulk-load identity events from a JSON-lines file through IdentifyStream.
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
    /// The active rule set.
    #[command(subcommand)]
    Rules(RulesCmd),
    /// Graph counters.
    Stats,
    /// The cluster as the node sees it: nodes, where each shard's replicas
    /// are, moves under way, and its own replicas' leaders, log indexes, lag.
    #[command(subcommand)]
    Cluster(ClusterCmd),
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
    /// JSON-lines file, one event per line (see README).
    file: std::path::PathBuf,
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
    /// Print the active rule set (TOML).
    Show,
}

fn parse_trait(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.to_string(), value))
}

fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_content_arrangement(ContentArrangement::Dynamic).set_header(header.to_vec());
    t
}

fn ids(list: &[pb::Identifier]) -> String {
    list.iter().map(|i| format!("{}={}", i.r#type, i.value)).collect::<Vec<_>>().join("\n")
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn key_of(k: ProfileKey) -> (Option<pb::Identifier>, Option<String>) {
    (k.id, k.profile)
}

fn print_identify(r: &pb::IdentifyResponse) {
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
    println!("{t}");
}

fn print_profile(p: &pb::Profile) {
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
    println!("{t}");
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
    let json_out = cli.output == Output::Json;
    let mut client = Client::connect(&cli.endpoint).await?;
    match cli.command {
        Command::Identify(a) => {
            let req = pb::IdentifyRequest {
                event_id: a.event_id.unwrap_or_else(|| format!("ctl-{}", ulid::Ulid::new())),
                timestamp_ms: a.timestamp_ms,
                identifiers: a.ids,
                traits: (!a.traits.is_empty()).then(|| json::to_struct(&a.traits.into_iter().collect())),
                source: a.source,
            };
            let r = client.graph().identify(req).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                print_identify(&r)
            }
        }
        Command::Load(a) => {
            let text = std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?;
            let events = parse_jsonl(&text)?;
            let bar = if a.quiet || json_out { ProgressBar::hidden() } else { ProgressBar::new(events.len() as u64) };
            bar.set_style(ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} events ({per_sec}, eta {eta})",
            )?);
            let s = load(&mut client, events, |n| bar.set_position(n)).await?;
            bar.finish_and_clear();
            if json_out {
                print_json(&s)?;
            } else {
                let mut t =
                    table(&["events", "profiles created", "merges", "conflicts", "duplicates", "ignored ids", "failed", "events/s"]);
                t.add_row(vec![
                    s.events.to_string(),
                    s.profiles_created.to_string(),
                    s.merges.to_string(),
                    s.conflicts.to_string(),
                    s.duplicates.to_string(),
                    s.ignored_identifiers.to_string(),
                    s.failed.to_string(),
                    format!("{:.0}", s.events_per_second),
                ]);
                println!("{t}");
                for e in &s.errors {
                    eprintln!("error: {e}");
                }
            }
            if s.failed > 0 {
                std::process::exit(2);
            }
        }
        Command::Get(GetArgs { key: k, stale }) => {
            let key = match key_of(k) {
                (Some(id), _) => pb::get_profile_request::Key::Identifier(id),
                (None, Some(p)) => pb::get_profile_request::Key::ProfileId(p),
                (None, None) => bail!("name a profile with --id or --profile"),
            };
            let consistency = if stale { pb::ReadConsistency::Stale } else { pb::ReadConsistency::Linearizable } as i32;
            let p = client.graph().get_profile(pb::GetProfileRequest { key: Some(key), consistency }).await?.into_inner();
            if json_out {
                print_json(&p)?
            } else {
                print_profile(&p)
            }
        }
        Command::Merge(a) => {
            let mut profiles: Vec<pb::ProfileRef> =
                a.ids.into_iter().map(|i| pb::ProfileRef { key: Some(pb::profile_ref::Key::Identifier(i)) }).collect();
            profiles.extend(a.profiles.into_iter().map(|p| pb::ProfileRef { key: Some(pb::profile_ref::Key::ProfileId(p)) }));
            if profiles.len() < 2 {
                bail!("name at least two profiles with --id and/or --profile");
            }
            let r = client.graph().merge(pb::MergeRequest { profiles, force: a.force, reason: a.reason }).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                let mut t = table(&["profile_id", "merged", "merge_id", "forced limits"]);
                t.add_row(vec![r.profile_id, r.merged_profile_ids.join("\n"), r.merge_id, r.forced_limits.join("\n")]);
                println!("{t}");
            }
        }
        Command::Unmerge(a) => {
            let target = match (a.merge_id, a.profile) {
                (Some(m), _) => pb::unmerge_request::Target::MergeId(m),
                (None, Some(p)) => pb::unmerge_request::Target::Split(pb::SplitIdentifiers { profile_id: p, identifiers: a.ids }),
                (None, None) => bail!("give --merge-id, or --profile with --id"),
            };
            let r = client.graph().unmerge(pb::UnmergeRequest { target: Some(target), reason: a.reason }).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                let mut t = table(&["profile_id", "new/restored profiles", "identifiers moved"]);
                t.add_row(vec![r.profile_id, r.new_profile_ids.join("\n"), r.identifiers_moved.to_string()]);
                println!("{t}");
            }
        }
        Command::Delete(k) => {
            let key = match key_of(k) {
                (Some(id), _) => pb::delete_profile_request::Key::Identifier(id),
                (None, Some(p)) => pb::delete_profile_request::Key::ProfileId(p),
                (None, None) => bail!("name a profile with --id or --profile"),
            };
            let r = client.graph().delete_profile(pb::DeleteProfileRequest { key: Some(key) }).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                let mut t = table(&["erased profile", "identifiers erased", "merge records erased"]);
                t.add_row(vec![r.profile_id, r.identifiers_erased.to_string(), r.merge_records_erased.to_string()]);
                println!("{t}");
            }
        }
        Command::MergeRecord(MergeRecordCmd::Show { merge_id }) => {
            let m = client.graph().get_merge_record(pb::GetMergeRecordRequest { merge_id }).await?.into_inner();
            if json_out {
                print_json(&m)?
            } else {
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
                println!("{t}");
            }
        }
        Command::Hubs(HubsCmd::List { limit }) => {
            let r = client.admin().list_hubs(pb::ListHubsRequest { limit }).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                let mut t = table(&["identifier", "profile", "reason", "listed_at_ms"]);
                for h in r.hubs {
                    t.add_row(vec![ids(h.identifier.as_slice()), h.profile_id, h.reason, h.listed_at_ms.to_string()]);
                }
                println!("{t}");
            }
        }
        Command::Rules(RulesCmd::Show) => {
            let r = client.admin().get_rule_set(pb::GetRuleSetRequest {}).await?.into_inner();
            if json_out {
                print_json(&r)?
            } else {
                print!("{}", r.toml)
            }
        }
        Command::Cluster(cmd) => {
            let c = match cmd {
                ClusterCmd::Status => client.admin().get_cluster(pb::GetClusterRequest {}).await?.into_inner(),
                ClusterCmd::AddNode { id, addr } => client.admin().add_node(pb::AddNodeRequest { node_id: id, addr }).await?.into_inner(),
                ClusterCmd::RemoveNode { id } => client.admin().remove_node(pb::RemoveNodeRequest { node_id: id }).await?.into_inner(),
                ClusterCmd::TransferLeader { shard, to } => {
                    let r = client.admin().transfer_leader(pb::TransferLeaderRequest { shard, node_id: to }).await?.into_inner();
                    if !json_out {
                        println!("shard {shard} is led by node {}", r.leader_id);
                    }
                    client.admin().get_cluster(pb::GetClusterRequest {}).await?.into_inner()
                }
            };
            if json_out {
                print_json(&c)?
            } else {
                println!(
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
                println!("{nodes}");
                let mut placement = table(&["group", "replicas on nodes", "moving"]);
                for p in &c.placement {
                    let on: Vec<String> = p.node_ids.iter().map(u64::to_string).collect();
                    placement.add_row(vec![p.group.clone(), on.join(" "), p.moving.clone()]);
                }
                println!("{placement}");
                let mut t =
                    table(&["shard", "state", "leader", "term", "last log", "applied", "snapshot", "txns", "members (id addr matched)"]);
                for s in c.metadata.into_iter().chain(c.shards) {
                    let members: Vec<String> = s.members.iter().map(|m| format!("{} {} {}", m.node_id, m.addr, m.matched_index)).collect();
                    let group = if s.shard == u32::MAX { "meta".to_string() } else { s.shard.to_string() };
                    t.add_row(vec![
                        group,
                        s.state,
                        s.leader_id.to_string(),
                        s.term.to_string(),
                        s.last_log_index.to_string(),
                        s.applied_index.to_string(),
                        s.snapshot_index.to_string(),
                        s.prepared_txns.to_string(),
                        members.join("\n"),
                    ]);
                }
                println!("replicas on this node:\n{t}");
            }
        }
        Command::Stats => {
            let s = client.admin().get_stats(pb::GetStatsRequest {}).await?.into_inner();
            if json_out {
                print_json(&s)?
            } else {
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
                    s.rule_version,
                ]);
                println!("{t}");
            }
        }
    }
    Ok(())
}
