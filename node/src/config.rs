//! Node configuration: serde defaults, then a TOML file, then `IDGRAPH_*`
//! environment variables, then command-line flags; validated once.
//! `node/idgraph.example.toml` lists every field
//! with its default and meaning.

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use idgraph_core::rules::{RuleSet, RuleSetError};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration field `{field}`: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("rules file {path}: {source}")]
    Rules { path: PathBuf, source: RuleSetError },
    #[error("rules file {path}: {source}")]
    RulesIo { path: PathBuf, source: std::io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// gRPC listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where the node keeps its data (created if missing).
    pub data_dir: PathBuf,
    /// A rule-set TOML file; none = the built-in rule set.
    pub rules_file: Option<PathBuf>,
    /// Shards of the graph (each its own Raft group), fixed when the cluster
    /// is created; a joining node takes the cluster's count.
    /// Unset: one per `replication_factor` initial members, rounded up, for
    /// a new cluster, and the data directory's count for a restarted node
    /// (see [`NodeConfig::shard_count`]).
    pub shards: Option<u32>,
    /// Replicas of each shard (and of the metadata group) the cluster keeps,
    /// fixed when it is created; fewer while it has fewer nodes.
    pub replication_factor: u32,
    /// Whether the node leading the metadata group evens out shard
    /// leaderships over the nodes (one transfer every few seconds at most).
    pub balance_leaders: bool,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Events of one IdentifyStream in flight at once.
    pub stream_window: usize,
    /// Deadline for one request inside the node, in milliseconds.
    pub request_timeout_ms: u64,
    /// Writes that start new work waiting for one shard's log, at most;
    /// past it such a write is refused at once with RESOURCE_EXHAUSTED
    /// (nothing done), so a burst above what the log sustains keeps the
    /// latency of the writes taken, and the node's memory, bounded.
    pub max_waiting_writes: usize,
    /// Proposals one shard has in flight at once: the writes that arrive
    /// meanwhile wait and go out together in the next entry.
    pub proposals_in_flight: usize,
    /// Threads that serve requests and run the shards' Raft groups (the
    /// async runtime's workers); 0: one per core.
    pub worker_threads: usize,
    /// On shutdown, how long in-flight requests may take before connections
    /// are cut, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    pub log_level: String,
    pub log_format: LogFormat,
    /// This node's id in the cluster (1 or more).
    pub node_id: u64,
    /// The cluster's members at bootstrap, `ID=HOST:PORT,...`; empty means a
    /// single-node cluster of this node. Shard `s` is initialised by the
    /// `s mod n`-th member (by id), which leads it first: leaders start
    /// spread over the members.
    pub initial_cluster: String,
    /// Raft heartbeat interval, in milliseconds; elections time out after 3
    /// to 6 heartbeats without a leader.
    pub raft_heartbeat_ms: u64,
    /// A shard replica snapshots its graph after this many log entries (but
    /// no sooner after its last build than nine times that build's length,
    /// `raft::pace`) and then compacts its log; a replica that fell further
    /// behind catches up from the snapshot.
    pub raft_snapshot_logs: u64,
    /// Memory sled may use to cache the node's data, in MiB. It is not a
    /// bound on the node's memory, which grows with the graph beyond it
    /// (`BENCHMARKS.md`).
    pub storage_cache_mb: u64,
    /// Whether sled compresses the pages it writes (zstd, fastest level):
    /// the graph's files shrink to about 0.6 of their size, and one node
    /// ingests about 0.6 as many events a second (`bench/analysis.md`). Off
    /// by default. Fixed when a data directory is created; an existing one
    /// keeps its setting.
    pub storage_compression: bool,
    /// How much of a shard's applied writes may wait in memory while a
    /// snapshot build reads the shard, in MiB: entries go on being applied
    /// during a build, and their writes reach sled's tree once it has been
    /// read. Applies wait beyond it until the build ends.
    pub storage_snapshot_backlog_mb: u64,
    /// How long an event's dedup record is kept, in seconds: a re-delivery
    /// of the event within this window is answered as a duplicate, one
    /// after it is applied again. 0: kept forever (a shard's disk then
    /// grows with every event ever sent).
    pub event_retention_secs: u64,
    /// Address of any member of a running cluster to join (instead of
    /// bootstrapping with `initial_cluster`).
    pub join: String,
    /// Peers to dial at another address than the one they advertise,
    /// `ADVERTISED=DIAL,...` (a local proxy or tunnel in front of a peer);
    /// empty: dial every peer at its advertised address.
    pub peer_routes: String,
    /// The address peers and clients reach this node at, `HOST:PORT` (a DNS
    /// name is fine: a StatefulSet pod's stable name); empty: the address
    /// the node listens on.
    pub advertise: String,
    /// Where to serve Prometheus metrics (`GET /metrics`) and, in plain
    /// text, the gRPC health service (for probes that cannot speak TLS);
    /// none: not served.
    pub metrics_listen: Option<SocketAddr>,
    /// A file of bearer tokens, one `NAME:ROLE:SECRET` per line (roles
    /// `client`, `admin`, `peer`; `#` starts a comment); with
    /// `auth_tokens`, every call must carry one. Read again when it changes.
    pub auth_tokens_file: Option<PathBuf>,
    /// Bearer tokens as `NAME:ROLE:SECRET`, separated by commas (for an
    /// environment variable); none here and no file: calls are not
    /// authenticated.
    pub auth_tokens: String,
    /// PEM certificate chain this node serves TLS with (and, with
    /// `tls_peer_mtls`, presents to peers); with `tls_key_file`, the node
    /// serves TLS only. Read again when the file changes.
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// PEM certificates of the authority that signed the peers'
    /// certificates: trusted when dialling peers, and checked on peers'
    /// client certificates with `tls_peer_mtls`.
    pub tls_ca_file: Option<PathBuf>,
    /// Mutual TLS between nodes: the node presents its certificate to the
    /// peers it dials, and takes peer calls only from a client certificate
    /// that `tls_ca_file` signed.
    pub tls_peer_mtls: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("./idgraph-data"),
            rules_file: None,
            shards: None,
            replication_factor: 3,
            balance_leaders: true,
            max_message_bytes: 4 * 1024 * 1024,
            stream_window: 256,
            request_timeout_ms: 30_000,
            max_waiting_writes: crate::shard::MAX_WAITING,
            proposals_in_flight: crate::shard::PROPOSALS_IN_FLIGHT,
            worker_threads: 0,
            shutdown_grace_ms: 10_000,
            log_level: "info".into(),
            log_format: LogFormat::Text,
            node_id: 1,
            initial_cluster: String::new(),
            raft_heartbeat_ms: 100,
            raft_snapshot_logs: 10_000,
            storage_cache_mb: 1024,
            storage_compression: false,
            storage_snapshot_backlog_mb: 1024,
            event_retention_secs: DEFAULT_EVENT_RETENTION_SECS,
            join: String::new(),
            peer_routes: String::new(),
            advertise: String::new(),
            metrics_listen: None,
            auth_tokens_file: None,
            auth_tokens: String::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            tls_peer_mtls: false,
        }
    }
}

/// Values given on the command line; unset ones leave the lower layers be.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rules_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_level: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initial_cluster: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub join: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Seven days: longer than senders' queues retry an event (mobile SDKs keep
/// undelivered events for days).
pub const DEFAULT_EVENT_RETENTION_SECS: u64 = 7 * 24 * 3600;

/// Environment variables read (`IDGRAPH_` + the field name in capitals).
const ENV_FIELDS: &[&str] = &[
    "listen",
    "data_dir",
    "rules_file",
    "shards",
    "replication_factor",
    "balance_leaders",
    "max_message_bytes",
    "stream_window",
    "request_timeout_ms",
    "max_waiting_writes",
    "proposals_in_flight",
    "worker_threads",
    "shutdown_grace_ms",
    "log_level",
    "log_format",
    "node_id",
    "initial_cluster",
    "raft_heartbeat_ms",
    "raft_snapshot_logs",
    "storage_cache_mb",
    "storage_compression",
    "storage_snapshot_backlog_mb",
    "event_retention_secs",
    "join",
    "peer_routes",
    "advertise",
    "metrics_listen",
    "auth_tokens_file",
    "auth_tokens",
    "tls_cert_file",
    "tls_key_file",
    "tls_ca_file",
    "tls_peer_mtls",
];

impl NodeConfig {
    /// Defaults, then `file`, then `IDGRAPH_*` variables, then `overrides`.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<NodeConfig, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::Invalid { field: "--config", reason: format!("{} does not exist", f.display()) });
            }
            fig = fig.merge(Toml::file(f));
        }
        fig = fig.merge(Env::prefixed("IDGRAPH_").only(ENV_FIELDS)).merge(Serialized::defaults(overrides));
        let config: NodeConfig = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, reason: &str| Err(ConfigError::Invalid { field, reason: reason.into() });
        if self.shards.is_some_and(|n| !(1..=1024).contains(&n)) {
            return bad("shards", "must be 1 to 1024");
        }
        if !(1..=7).contains(&self.replication_factor) {
            return bad("replication_factor", "must be 1 to 7");
        }
        if !(64 * 1024..=64 * 1024 * 1024).contains(&self.max_message_bytes) {
            return bad("max_message_bytes", "must be 64 KiB to 64 MiB");
        }
        if !(1..=4096).contains(&self.stream_window) {
            return bad("stream_window", "must be 1 to 4096");
        }
        if !(1..=1_000_000).contains(&self.max_waiting_writes) {
            return bad("max_waiting_writes", "must be 1 to 1000000");
        }
        if !(1..=64).contains(&self.proposals_in_flight) {
            return bad("proposals_in_flight", "must be 1 to 64");
        }
        if self.worker_threads > 1024 {
            return bad("worker_threads", "must be 0 (one per core) to 1024");
        }
        if self.request_timeout_ms < 100 {
            return bad("request_timeout_ms", "must be at least 100");
        }
        if self.data_dir.as_os_str().is_empty() {
            return bad("data_dir", "must not be empty");
        }
        if tracing_subscriber::EnvFilter::try_new(&self.log_level).is_err() {
            return bad("log_level", "not a level or tracing filter");
        }
        if self.node_id == 0 {
            return bad("node_id", "must be at least 1");
        }
        if !(20..=5_000).contains(&self.raft_heartbeat_ms) {
            return bad("raft_heartbeat_ms", "must be 20 to 5000");
        }
        if self.raft_snapshot_logs < 10 {
            return bad("raft_snapshot_logs", "must be at least 10");
        }
        if self.event_retention_secs > 100 * 365 * 24 * 3600 {
            return bad("event_retention_secs", "must be at most 100 years (0 keeps records forever)");
        }
        if !(16..=1024 * 1024).contains(&self.storage_cache_mb) {
            return bad("storage_cache_mb", "must be 16 to 1048576");
        }
        if !(16..=1024 * 1024).contains(&self.storage_snapshot_backlog_mb) {
            return bad("storage_snapshot_backlog_mb", "must be 16 to 1048576");
        }
        if !self.join.is_empty() && !self.initial_cluster.is_empty() {
            return bad("join", "give either join or initial_cluster, not both");
        }
        let members = self.members().map_err(|reason| ConfigError::Invalid { field: "initial_cluster", reason })?;
        if !members.is_empty() && !members.contains_key(&self.node_id) {
            return bad("initial_cluster", "must list this node's node_id");
        }
        self.routes().map_err(|reason| ConfigError::Invalid { field: "peer_routes", reason })?;
        if !self.advertise.is_empty() {
            check_host_port(&self.advertise).map_err(|reason| ConfigError::Invalid { field: "advertise", reason })?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return bad("tls_key_file", "give tls_cert_file and tls_key_file together");
        }
        if self.tls_peer_mtls && (self.tls_cert_file.is_none() || self.tls_ca_file.is_none()) {
            return bad("tls_peer_mtls", "needs tls_cert_file, tls_key_file and tls_ca_file");
        }
        // Peers are dialled over TLS and trust only this authority.
        if self.tls() && self.tls_ca_file.is_none() && (!self.join.is_empty() || members.len() > 1) {
            return bad("tls_ca_file", "a node of a cluster that serves TLS needs the authority that signed its peers' certificates");
        }
        crate::auth::TokenBook::parse(&self.auth_tokens, "auth_tokens")
            .map_err(|e| ConfigError::Invalid { field: "auth_tokens", reason: e.to_string() })?;
        Ok(())
    }

    /// The peer routes from `peer_routes`: advertised address to the
    /// address dialled instead.
    pub fn routes(&self) -> Result<std::collections::HashMap<String, String>, String> {
        let mut out = std::collections::HashMap::new();
        for part in self.peer_routes.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=').map(|(a, b)| (a.trim(), b.trim())) {
                Some((from, to)) if !from.is_empty() && !to.is_empty() => {
                    if out.insert(from.to_string(), to.to_string()).is_some() {
                        return Err(format!("{from:?} is routed twice"));
                    }
                }
                _ => return Err(format!("{part:?} is not ADVERTISED=DIAL")),
            }
        }
        Ok(out)
    }

    /// Whether the node serves TLS.
    pub fn tls(&self) -> bool {
        self.tls_cert_file.is_some()
    }

    /// The bootstrap members from `initial_cluster` (empty: single node).
    /// Shards of a new cluster: as configured, else one per
    /// `replication_factor` initial members, rounded up (1 for a standalone
    /// node or three nodes, 2 for four to six nodes). A shard adds write
    /// capacity only where it gets leaders and replicas of its own, and
    /// every event whose records span shards pays a cross-shard commit of
    /// several replicated rounds (`docs/cluster.md`), so a cluster starts
    /// with as few shards as keep every node busy.
    pub fn shard_count(&self) -> u32 {
        match self.shards {
            Some(n) => n,
            None => {
                let members = self.members().map_or(1, |m| m.len().max(1)) as u32;
                members.div_ceil(self.replication_factor.max(1))
            }
        }
    }

    pub fn members(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut out = std::collections::BTreeMap::new();
        for part in self.initial_cluster.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part.split_once('=').ok_or_else(|| format!("{part:?} is not ID=HOST:PORT"))?;
            let id: u64 = id.trim().parse().map_err(|_| format!("{id:?} is not a node id"))?;
            if id == 0 || check_host_port(addr.trim()).is_err() {
                return Err(format!("{part:?} is not ID=HOST:PORT"));
            }
            if out.insert(id, addr.trim().to_string()).is_some() {
                return Err(format!("node id {id} is listed twice"));
            }
        }
        Ok(out)
    }

    /// The rule set the node runs: the configured file, or the built-in one.
    pub fn rule_set(&self) -> Result<RuleSet, ConfigError> {
        match &self.rules_file {
            None => Ok(RuleSet::builtin()),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::RulesIo { path: path.clone(), source })?;
                RuleSet::from_toml(&text).map_err(|source| ConfigError::Rules { path: path.clone(), source })
            }
        }
    }
}

/// `HOST:PORT` with a host name or address and a port number.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && !host.contains(char::is_whitespace) && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(format!("{addr:?} is not HOST:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_override_defaults_and_unknown_fields_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("node.toml");
        std::fs::write(&f, "listen = \"127.0.0.1:6000\"\nstream_window = 8\n").unwrap();
        let c = NodeConfig::load(Some(&f), &Overrides { data_dir: Some("/tmp/x".into()), ..Default::default() }).unwrap();
        assert_eq!(c.listen.port(), 6000);
        assert_eq!(c.stream_window, 8);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_message_bytes, 4 * 1024 * 1024);

        std::fs::write(&f, "listne = \"127.0.0.1:6000\"\n").unwrap();
        let err = NodeConfig::load(Some(&f), &Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("listne"), "{err}");

        for (bad, field) in [
            ("stream_window = 0\n", "stream_window"),
            ("storage_cache_mb = 1\n", "storage_cache_mb"),
            ("storage_snapshot_backlog_mb = 0\n", "storage_snapshot_backlog_mb"),
            ("proposals_in_flight = 0\n", "proposals_in_flight"),
            ("worker_threads = 5000\n", "worker_threads"),
        ] {
            std::fs::write(&f, bad).unwrap();
            let err = NodeConfig::load(Some(&f), &Overrides::default()).unwrap_err().to_string();
            assert!(err.contains(field), "{bad}: {err}");
        }
    }

    #[test]
    fn peer_routes_parse_and_bad_ones_name_the_field() {
        let c = NodeConfig { peer_routes: " 10.0.0.1:7000=127.0.0.1:9001 ,10.0.0.2:7000=127.0.0.1:9002".into(), ..NodeConfig::default() };
        c.validate().unwrap();
        let routes = c.routes().unwrap();
        assert_eq!(routes.get("10.0.0.1:7000").map(String::as_str), Some("127.0.0.1:9001"));
        assert_eq!(routes.len(), 2);
        for bad in ["10.0.0.1:7000", "=127.0.0.1:1", "a=b,a=c"] {
            let c = NodeConfig { peer_routes: bad.into(), ..NodeConfig::default() };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("peer_routes"), "{bad}: {err}");
        }
    }

    #[test]
    fn every_field_can_be_set_from_the_environment() {
        let fields: Vec<String> = match serde_json::to_value(NodeConfig::default()).unwrap() {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            _ => unreachable!(),
        };
        let mut env: Vec<&str> = ENV_FIELDS.to_vec();
        env.sort();
        let mut fields: Vec<&str> = fields.iter().map(String::as_str).collect();
        fields.sort();
        assert_eq!(env, fields);
    }

    #[test]
    fn the_kubernetes_config_map_is_a_valid_node_configuration() {
        let manifest = include_str!("../../deploy/kubernetes/configmap.yaml");
        let start = manifest.find("idgraph.toml: |").expect("the ConfigMap holds idgraph.toml");
        let toml: String = manifest[start..].lines().skip(1).map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l))).collect();
        let parsed: NodeConfig = Figment::from(Serialized::defaults(NodeConfig::default())).merge(Toml::string(&toml)).extract().unwrap();
        parsed.validate().unwrap();
        assert!(parsed.tls() && parsed.tls_peer_mtls && parsed.metrics_listen.is_some());
    }

    #[test]
    fn example_config_is_the_defaults() {
        let example = include_str!("../idgraph.example.toml");
        let parsed: NodeConfig = Figment::from(Toml::string(example)).extract().unwrap();
        assert_eq!(parsed, NodeConfig::default());
    }
}
