//! Process wiring: opens the data directory, starts the shard actors under
//! their supervisor, serves gRPC (idgraph.v1, health, reflection) and shuts
//! all of it down in order.

use crate::config::NodeConfig;
use crate::peer::{Peers, RaftTransportService, ShardNetworkFactory};
use crate::raft::{LogFlusher, Replicas, ShardLogStore, ShardReplica, ShardStateMachine};
use crate::router::{ShardMap, ShardRouter};
use crate::service::{status, AdminService, IdentityGraphService};
use crate::shard::{shard_actor_name, NodeSupervisor, ReplicaOpener, SupervisorArgs, SupervisorMsg};
use crate::storage::{ImageFile, NodeLog, SledDb, StoreOptions};
use idgraph_core::meta::ClusterMap;
use idgraph_core::model::GroupId;
use idgraph_core::rules::RuleSet;
use idgraph_proto::v1::admin_server::AdminServer;
use idgraph_proto::v1::identity_graph_server::IdentityGraphServer;
use idgraph_proto::v1::raft_transport_server::RaftTransportServer;
use openraft::BasicNode;
use ractor::{Actor, ActorRef};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] crate::storage::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the shard actors: {0}")]
    Actors(String),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Tokens(#[from] crate::auth::TokenError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("configuration field `{field}`: {reason}")]
    Security { field: &'static str, reason: String },
}

/// A started node. Drop it without [`RunningNode::shutdown`] only in a
/// crash test.
pub struct RunningNode {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    router: ShardRouter,
    db: SledDb,
    log: NodeLog,
    node: Arc<str>,
    replicas: Replicas,
    grace: Duration,
    supervisor: ActorRef<SupervisorMsg>,
    /// Set to true (or dropped) to stop serving.
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
    sweeper: JoinHandle<()>,
    /// Asks each replica's Raft for a snapshot when one is due.
    pacer: JoinHandle<()>,
    /// The retention sweep of event dedup records (none when they are kept
    /// forever).
    retention: Option<JoinHandle<()>>,
    placement: JoinHandle<()>,
    canary: JoinHandle<()>,
    /// Readiness, certificate and token reloads, the metrics endpoint.
    background: Vec<JoinHandle<()>>,
}

/// Why a node's storage must be reopened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageFailure {
    /// A write found the data directory's disk full.
    DiskFull,
}

impl RunningNode {
    /// The address the node serves on (the bound port when configured 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address metrics and plain-text health are served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn router(&self) -> &ShardRouter {
        &self.router
    }

    /// Serves until `signal` completes, then shuts down cleanly.
    pub async fn run_until(mut self, signal: impl std::future::Future<Output = ()>) -> Result<(), ServerError> {
        tokio::select! {
            _ = signal => {}
            r = &mut self.serve => {
                // The server ended by itself: report why after cleaning up.
                self.shutdown.take();
                self.stop_actors().await;
                self.db.flush()?;
                self.log.close()?;
                return match r { Ok(r) => r.map_err(ServerError::from), Err(e) => Err(ServerError::Actors(e.to_string())) };
            }
        }
        self.shutdown().await
    }

    /// Stops taking requests, lets in-flight ones finish, stops the shard
    /// actors and flushes the database.
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        info!("shutting down");
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        // In-flight requests get a grace period; connections still open after
        // it are cut. (hyper's HTTP/2 graceful shutdown can wait for idle
        // client connections indefinitely: hyperium/hyper#4170.)
        let served = match tokio::time::timeout(self.grace, &mut self.serve).await {
            Ok(r) => r,
            Err(_) => {
                warn!(grace_ms = self.grace.as_millis() as u64, "connections still open after the grace period; closing them");
                self.serve.abort();
                Ok(Ok(()))
            }
        };
        self.stop_actors().await;
        self.db.flush()?;
        self.log.close()?;
        info!("stopped");
        match served {
            Ok(r) => r.map_err(ServerError::from),
            Err(e) => Err(ServerError::Actors(e.to_string())),
        }
    }

    /// Resolves when a write found the data directory's disk full (noted by
    /// the storage layer) or a replica's Raft group stopped on a storage
    /// error, saying which. sled keeps a write error for its whole database
    /// until it is reopened, and a stopped group takes nothing more: the
    /// process must reopen its storage (`idgraph-node` restarts itself in
    /// place once the disk has room; another storage error is logged, and
    /// its group stays stopped, since a restart would meet it again).
    pub fn storage_failure(&self) -> impl std::future::Future<Output = StorageFailure> + Send + 'static {
        let replicas = self.replicas.clone();
        let mut reported = std::collections::BTreeSet::new();
        async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if crate::storage::disk_full_seen() {
                    return StorageFailure::DiskFull;
                }
                let failed = replicas.read().ok().and_then(|m| {
                    m.iter().find_map(|(shard, r)| r.storage_failure().filter(|_| !reported.contains(shard)).map(|e| (*shard, e)))
                });
                if let Some((shard, error)) = failed {
                    // Reported once; a full disk found later still resolves.
                    reported.insert(shard);
                    tracing::error!(%shard, error = %error.lines().next().unwrap_or_default(), "a replica's storage failed; its group stays stopped until the node restarts");
                }
            }
        }
    }

    async fn stop_actors(&self) {
        self.sweeper.abort();
        self.pacer.abort();
        if let Some(r) = &self.retention {
            r.abort();
        }
        self.placement.abort();
        self.canary.abort();
        for task in &self.background {
            task.abort();
        }
        for shard in self.router.hosted() {
            if let Some(a) = ActorRef::<crate::shard::ShardMsg>::where_is(shard_actor_name(&self.node, shard)) {
                let _ = a.stop_and_wait(Some("node shutting down".into()), Some(Duration::from_secs(10))).await;
            }
        }
        let _ = self.supervisor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        let replicas: Vec<_> = self.replicas.write().map(|mut m| m.drain().map(|(_, r)| r).collect()).unwrap_or_default();
        for r in replicas {
            let _ = r.raft.shutdown().await;
        }
    }
}

/// Asks a member of a running cluster to add this node, until it is done.
async fn join_cluster(peers: Peers, via: String, node_id: u64, addr: String) {
    let mut backoff = Duration::from_millis(200);
    loop {
        let attempt = async {
            let mut admin = peers.admin(&via)?;
            admin.add_node(idgraph_proto::v1::AddNodeRequest { node_id, addr: addr.clone() }).await.map_err(|s| s.message().to_string())
        };
        match attempt.await {
            Ok(_) => {
                info!(node_id, %via, "joined the cluster");
                return;
            }
            Err(e) => {
                warn!(node_id, %via, error = %e, "joining the cluster failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Starts a node as configured and returns once it is serving.
pub async fn start(config: &NodeConfig) -> Result<RunningNode, ServerError> {
    let rules = Arc::new(config.rule_set()?);
    start_with_rules(config, rules).await
}

fn raft_config(config: &NodeConfig) -> Result<Arc<openraft::Config>, ServerError> {
    let hb = config.raft_heartbeat_ms;
    let c = openraft::Config {
        cluster_name: "idgraph".into(),
        heartbeat_interval: hb,
        election_timeout_min: hb * 3,
        election_timeout_max: hb * 6,
        // Each replica asks for its builds itself (`raft::pace`): after
        // `raft_snapshot_logs` entries, and not while builds would take more
        // than a tenth of the time.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: config.raft_snapshot_logs / 10,
        // Purged in batches: each purge is a write to the log's tree, and
        // one per applied entry used to cost an entry's worth of I/O again.
        purge_batch_size: (config.raft_snapshot_logs / 10).max(1),
        ..Default::default()
    };
    Ok(Arc::new(c.validate().map_err(|e| ServerError::Actors(format!("raft configuration: {e}")))?))
}

/// What every shard replica of a node is opened with.
#[derive(Clone)]
struct ReplicaSetup {
    db: SledDb,
    log: NodeLog,
    /// Where the replicas keep their snapshot images.
    images: std::path::PathBuf,
    node_id: u64,
    /// The groups this node initialises, with their first members: on the
    /// first start of a static cluster only, each taken at its first open
    /// (a replica opened again later never initialises its group anew).
    initialise: Arc<Mutex<BTreeMap<GroupId, BTreeMap<u64, BasicNode>>>>,
    raft_config: Arc<openraft::Config>,
    peers: Peers,
    rules: Arc<RuleSet>,
    flusher: LogFlusher,
}

impl ReplicaSetup {
    /// Opens one shard replica (log, vote, state machine) from the node's
    /// database and starts its Raft instance.
    async fn open(self, shard: GroupId) -> Result<ShardReplica, String> {
        let ReplicaSetup { db, log, images, node_id, initialise, raft_config, peers, rules, flusher } = self;
        let raft_log = Arc::new(log.open_group(shard, &db).map_err(|e| e.to_string())?);
        let mut log = ShardLogStore::new(raft_log, flusher);
        let state = openraft::storage::RaftLogStorage::get_log_state(&mut log).await.map_err(|e| e.to_string())?;
        let (last_log_index, last_purged_index) = (state.last_log_id.map(|l| l.index), state.last_purged_log_id.map(|l| l.index));
        let store = Arc::new(db.shard(shard).map_err(|e| e.to_string())?);
        let image = ImageFile::of(&images, shard);
        db.move_legacy_image(shard, &image).map_err(|e| e.to_string())?;
        let mut sm = ShardStateMachine::new(store.clone(), rules.clone(), image);
        let pace = sm.pace();
        sm.repair_interrupted_install(last_log_index, last_purged_index).await.map_err(|e| format!("shard {shard}: {e}"))?;
        let raft =
            openraft::Raft::new(node_id, raft_config, ShardNetworkFactory { shard, peers }, log, sm).await.map_err(|e| e.to_string())?;
        let members = initialise.lock().map_err(|_| "bootstrap table lock poisoned".to_string())?.remove(&shard);
        if let Some(members) = members.filter(|m| !m.is_empty()) {
            if raft.is_initialized().await.map_err(|e| e.to_string())? {
                return Ok(ShardReplica::new(shard, raft, store, rules, pace));
            }
            match raft.initialize(members).await {
                Ok(()) | Err(openraft::error::RaftError::APIError(openraft::error::InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(format!("initialising shard {shard}: {e}")),
            }
        }
        Ok(ShardReplica::new(shard, raft, store, rules, pace))
    }
}

/// The cluster map of the cluster a node joins, as the member it joins
/// through knows it (retried while that member is not reachable yet).
async fn cluster_to_join(peers: &Peers, via: &str) -> Result<ClusterMap, ServerError> {
    let mut last = String::new();
    for _ in 0..30 {
        match peers.cluster_map(via).await {
            Ok(map) if map.is_bootstrapped() => return Ok(map),
            Ok(_) => last = "its cluster map is not bootstrapped yet".into(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Err(ServerError::Actors(format!("join: cannot read the cluster map from {via}: {last}")))
}

/// Which member initialises a group of a new static cluster, and so leads
/// it first: shard `s` the `s mod n`-th (leaders start spread over the
/// members), the metadata group its lowest id.
fn initialiser(map: &ClusterMap, group: GroupId) -> Option<u64> {
    if group == GroupId::Meta {
        return map.groups.get(&GroupId::Meta).and_then(|m| m.first().copied());
    }
    map.nodes.keys().nth(group.wire() as usize % map.nodes.len().max(1)).copied()
}

pub async fn start_with_rules(config: &NodeConfig, rules: Arc<RuleSet>) -> Result<RunningNode, ServerError> {
    let joining = !config.join.is_empty();
    let tokens = crate::auth::Tokens::load(&config.auth_tokens, config.auth_tokens_file.as_deref())?;
    let book = tokens.current();
    if !book.is_empty() && book.peer_secret().is_none() && (joining || !config.initial_cluster.is_empty()) {
        return Err(ServerError::Security {
            field: "auth_tokens",
            reason: "a cluster that checks tokens needs a token with the role peer, which its nodes send to each other".into(),
        });
    }
    let security = crate::tls::PeerSecurity::from_config(config, crate::auth::PeerCredentials::new(tokens.clone()))?;
    let peers = Peers::new(config.routes().map_err(|reason| ServerError::Actors(format!("peer_routes: {reason}")))?, security);
    let joined = if joining { Some(cluster_to_join(&peers, &config.join).await?) } else { None };
    // The shard count is fixed when a cluster is created: a joining node
    // takes the cluster's, a restarted one its data directory's unless one
    // is configured (then they must agree).
    let options = StoreOptions {
        cache_bytes: config.storage_cache_mb << 20,
        compression: config.storage_compression,
        snapshot_backlog_bytes: config.storage_snapshot_backlog_mb << 20,
    };
    let (db, count) = match (&joined, config.shards) {
        (Some(map), _) => (SledDb::open_with(&config.data_dir, map.shard_count, &options)?, map.shard_count),
        (None, Some(n)) => (SledDb::open_with(&config.data_dir, n, &options)?, n),
        (None, None) => SledDb::open_adopting(&config.data_dir, config.shard_count(), &options)?,
    };
    let shards = ShardMap::new(count);
    // Before the node listens: partial images a crash left are gone by then.
    let images = ImageFile::open_dir(&config.data_dir)?;
    let node: Arc<str> = ulid::Ulid::new().to_string().to_lowercase().into();

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let advertised = if config.advertise.is_empty() { addr.to_string() } else { config.advertise.clone() };

    // A static cluster (or a standalone node: a cluster of itself) starts
    // from the map every member computes alike; a joining node from the
    // map of the cluster it joins.
    let mut members = config.members().map_err(|reason| ServerError::Actors(format!("initial_cluster: {reason}")))?;
    let standalone = members.is_empty() && !joining;
    if standalone {
        members.insert(config.node_id, advertised.clone());
    }
    let initial = (!joining).then(|| ClusterMap::initial(&members, shards.count(), config.replication_factor, rules.version()));
    // Groups are initialised on a static cluster's first start only (and
    // always on a standalone node, its only member): never twice.
    let first_start = !db.started()?;
    let log = NodeLog::open(&config.data_dir.join("log"))?;
    let mut open_now: std::collections::BTreeSet<GroupId> = db.groups().into_iter().chain(log.groups()).collect();
    let mut initialise = BTreeMap::new();
    if let Some(map) = initial.as_ref().filter(|_| first_start || standalone) {
        for group in map.groups_of(config.node_id) {
            open_now.insert(group);
            if initialiser(map, group) == Some(config.node_id) {
                let first: BTreeMap<u64, BasicNode> =
                    map.groups[&group].iter().map(|id| (*id, BasicNode { addr: members[id].clone() })).collect();
                initialise.insert(group, first);
            }
        }
    }
    let replicas: Replicas = Default::default();
    let raft_config = raft_config(config)?;
    let (db_for_discard, log_for_discard, images_for_discard) = (db.clone(), log.clone(), images.clone());
    let open: ReplicaOpener = {
        // One fdatasync of the node's log makes every group's appends durable.
        let flusher = LogFlusher::node_log(log.clone());
        let setup = ReplicaSetup {
            db: db.clone(),
            log: log.clone(),
            images,
            node_id: config.node_id,
            initialise: Arc::new(Mutex::new(initialise)),
            raft_config,
            peers: peers.clone(),
            rules: rules.clone(),
            flusher,
        };
        Arc::new(move |shard| Box::pin(setup.clone().open(shard)))
    };
    let router = ShardRouter::new(
        &node,
        config.node_id,
        shards.clone(),
        rules.clone(),
        Duration::from_millis(config.request_timeout_ms),
        peers.clone(),
        replicas.clone(),
    );
    let metrics = router.metrics().clone();
    if let Some(map) = initial.clone().or(joined) {
        router.set_cluster(map);
    }
    // The Raft transport must be reachable while the replicas start: peers
    // may already be electing.
    // Shutdown: the server stops taking connections, and peers' exchanges
    // stop taking calls and end once the calls in flight are answered.
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let transport = RaftTransportServer::new(RaftTransportService {
        node: node.clone(),
        timeout: Duration::from_millis(config.request_timeout_ms),
        replicas: replicas.clone(),
        cluster: router.cluster_handle(),
        kpis: router.kpis().clone(),
        metrics: metrics.clone(),
        stopping: rx.clone(),
    })
    .max_decoding_message_size(256 << 20)
    .max_encoding_message_size(256 << 20);
    // Not serving until the node serves its shards (see `readiness`).
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, false).await;
    // Reflection, both protocol versions, over the same descriptors.
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(idgraph_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection = descriptors().build_v1().map_err(|e| ServerError::Actors(format!("reflection: {e}")))?;
    let reflection_alpha = descriptors().build_v1alpha().map_err(|e| ServerError::Actors(format!("reflection: {e}")))?;

    let max = config.max_message_bytes;
    let graph = IdentityGraphServer::new(IdentityGraphService::new(router.clone(), config.stream_window))
        .max_decoding_message_size(max)
        // Responses are bounded by the rule set's caps, not by the request limit.
        .max_encoding_message_size(64 * 1024 * 1024);
    let admin = AdminServer::new(AdminService::new(router.clone())).max_decoding_message_size(max);

    let mut background = Vec::new();
    let routes = tonic::transport::Server::builder()
        .layer(crate::metrics::RequestMetricsLayer(metrics.clone()))
        .layer(crate::auth::AuthLayer::new(tokens.clone(), config.tls_peer_mtls))
        .layer(tower::util::MapResponseLayer::new(status::fix_oversized_response))
        .add_service(health_service.clone())
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(transport)
        .add_service(graph)
        .add_service(admin);
    let stopped = async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let serve = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => {
            let certificate = crate::tls::ServerCertificate::load(cert, key)?;
            background.push(certificate.spawn_reloader(RELOAD_EVERY));
            let incoming = crate::tls::incoming(listener, crate::tls::server_config(config, certificate)?);
            tokio::spawn(routes.serve_with_incoming_shutdown(incoming, stopped))
        }
        _ => {
            // Small request/response messages: no Nagle delay.
            let incoming = tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .with_keepalive(Some(Duration::from_secs(60)));
            tokio::spawn(routes.serve_with_incoming_shutdown(incoming, stopped))
        }
    };
    background.push(tokens.spawn_reloader(RELOAD_EVERY));
    let metrics_addr = match config.metrics_listen {
        Some(listen) => {
            let listener = tokio::net::TcpListener::bind(listen).await.map_err(|source| ServerError::Bind { addr: listen, source })?;
            let bound = listener.local_addr().map_err(|source| ServerError::Bind { addr: listen, source })?;
            background.push(serve_metrics(listener, router.clone(), config.data_dir.clone(), health_service));
            info!(addr = %bound, "serving metrics and plain-text health");
            Some(bound)
        }
        None => None,
    };
    background.push(tokio::spawn(readiness(router.clone(), health)));

    let (supervisor, _) = Actor::spawn(
        Some(format!("idgraph-{node}-supervisor")),
        NodeSupervisor,
        SupervisorArgs {
            node: node.clone(),
            shards: open_now.into_iter().collect(),
            open,
            discard: Arc::new(move |shard| {
                // The image first: one left by a crash after the records went
                // would be taken for the snapshot of a later replica.
                ImageFile::of(&images_for_discard, shard).remove().map_err(|e| e.to_string())?;
                log_for_discard.drop_group(shard).map_err(|e| e.to_string())?;
                db_for_discard.discard(shard).map_err(|e| e.to_string())
            }),
            replicas: replicas.clone(),
            limits: crate::shard::WriteLimits { max_waiting: config.max_waiting_writes, in_flight: config.proposals_in_flight },
        },
    )
    .await
    .map_err(|e| ServerError::Actors(e.to_string()))?;
    // Every group this node initialises is initialised now.
    db.mark_started()?;
    let placement = crate::placement::spawn(crate::placement::Placement {
        router: router.clone(),
        supervisor: supervisor.clone(),
        bootstrap: initial,
        addr: advertised.clone(),
        balance_leaders: config.balance_leaders,
    });

    let canary = crate::canary::spawn(router.clone());
    if joining {
        tokio::spawn(join_cluster(peers.clone(), config.join.clone(), config.node_id, advertised.clone()));
    }
    let sweeper = {
        let router = router.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1_000));
            loop {
                every.tick().await;
                router.sweep_abandoned().await;
            }
        })
    };
    // Snapshots as each replica's pace says (`raft::pace`).
    let pacer = {
        let replicas = replicas.clone();
        let every = config.raft_snapshot_logs;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let all: Vec<ShardReplica> = replicas.read().map(|r| r.values().cloned().collect()).unwrap_or_default();
                for r in all {
                    r.snapshot_if_due(every).await;
                }
            }
        })
    };
    // Its own task: a page waits for its entry, and must not hold up the
    // settling of abandoned locks.
    let retention = (config.event_retention_secs > 0).then(|| {
        let router = router.clone();
        let retention = Duration::from_secs(config.event_retention_secs);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1_000));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut cursors = HashMap::new();
            loop {
                every.tick().await;
                router.forget_expired_events(retention, &mut cursors).await;
            }
        })
    });
    info!(%addr, node_id = config.node_id, data_dir = %config.data_dir.display(), rule_version = rules.version(), shards = shards.count(), "idgraph node serving");
    Ok(RunningNode {
        addr,
        metrics_addr,
        router,
        db,
        log,
        node,
        replicas,
        grace: Duration::from_millis(config.shutdown_grace_ms),
        supervisor,
        shutdown: Some(tx),
        serve,
        sweeper,
        pacer,
        retention,
        placement,
        canary,
        background,
    })
}

/// How often certificate and token files are checked for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// Sets the health of the whole server and of its two client services.
async fn set_health(health: &tonic_health::server::HealthReporter, serving: bool) {
    use tonic::server::NamedService;
    use tonic_health::ServingStatus;
    let status = if serving { ServingStatus::Serving } else { ServingStatus::NotServing };
    for service in ["", IdentityGraphServer::<IdentityGraphService>::NAME, AdminServer::<AdminService>::NAME] {
        health.set_service_status(service, status).await;
    }
}

/// Keeps the health service (and `idgraph_ready`) in line with whether the
/// node can serve: it has a cluster map, and every group the map gives it
/// has a replica here that knows its leader. A node that holds no replica
/// yet (just joined) serves by forwarding.
async fn readiness(router: ShardRouter, health: tonic_health::server::HealthReporter) {
    let mut was = None;
    loop {
        let ready = router.serves_its_groups();
        if was != Some(ready) {
            set_health(&health, ready).await;
            router.metrics().ready.set(i64::from(ready));
            info!(ready, "readiness changed");
            was = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serves `GET /metrics` (Prometheus text format) and the gRPC health
/// service in plain text on the metrics listener.
fn serve_metrics<H>(listener: tokio::net::TcpListener, router: ShardRouter, data_dir: std::path::PathBuf, health: H) -> JoinHandle<()>
where
    H: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<tonic::body::Body>, Error = std::convert::Infallible>
        + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let scrape = move || {
        let (router, data_dir) = (router.clone(), data_dir.clone());
        async move {
            let text = tokio::task::spawn_blocking(move || {
                router.refresh_gauges(&data_dir);
                router.metrics().encode()
            })
            .await
            .unwrap_or_default();
            ([(http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text)
        }
    };
    let app = tonic::service::Routes::new(health).into_axum_router().route("/metrics", axum::routing::get(scrape));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the metrics endpoint stopped");
        }
    })
}
