//! Process wiring: opens the data directory, starts the shard actors under
//! their supervisor, serves gRPC (idgraph.v1, health, reflection) and shuts
//! all of it down in order.

use crate::config::NodeConfig;
use crate::router::{ShardMap, ShardRouter};
use crate::rules::RuleSet;
use crate::service::{status, AdminService, IdentityGraphService};
use crate::shard::{shard_actor_name, NodeSupervisor, StoreOpener, SupervisorArgs};
use crate::storage::{GraphStore, SledDb};
use idgraph_proto::v1::admin_server::AdminServer;
use idgraph_proto::v1::identity_graph_server::IdentityGraphServer;
use ractor::{Actor, ActorRef};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
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
}

/// A started node. Drop it without [`RunningNode::shutdown`] only in a
/// crash test.
pub struct RunningNode {
    addr: SocketAddr,
    router: ShardRouter,
    db: SledDb,
    node: Arc<str>,
    shards: ShardMap,
    grace: Duration,
    supervisor: ActorRef<()>,
    shutdown: Option<oneshot::Sender<()>>,
    serve: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl RunningNode {
    /// The address the node serves on (the bound port when configured 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
            let _ = tx.send(());
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
        info!("stopped");
        match served {
            Ok(r) => r.map_err(ServerError::from),
            Err(e) => Err(ServerError::Actors(e.to_string())),
        }
    }

    async fn stop_actors(&self) {
        for shard in self.shards.shards() {
            if let Some(a) = ActorRef::<crate::shard::ShardMsg>::where_is(shard_actor_name(&self.node, shard)) {
                let _ = a.stop_and_wait(Some("node shutting down".into()), Some(Duration::from_secs(10))).await;
            }
        }
        let _ = self.supervisor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
    }
}

/// Starts a node as configured and returns once it is serving.
pub async fn start(config: &NodeConfig) -> Result<RunningNode, ServerError> {
    let rules = Arc::new(config.rule_set()?);
    start_with_rules(config, rules).await
}

pub async fn start_with_rules(config: &NodeConfig, rules: Arc<RuleSet>) -> Result<RunningNode, ServerError> {
    let shards = ShardMap::new(config.shards);
    let db = SledDb::open(&config.data_dir, shards.count())?;
    let node: Arc<str> = ulid::Ulid::new().to_string().to_lowercase().into();
    let open_db = db.clone();
    let open: StoreOpener = Arc::new(move |shard| Ok(Arc::new(open_db.shard(shard)?) as Arc<dyn GraphStore>));
    let (supervisor, _) = Actor::spawn(
        Some(format!("idgraph-{node}-supervisor")),
        NodeSupervisor,
        SupervisorArgs { node: node.clone(), shards: shards.shards(), open, rules: rules.clone() },
    )
    .await
    .map_err(|e| ServerError::Actors(e.to_string()))?;
    let router = ShardRouter::new(&node, shards.clone(), rules.clone(), Duration::from_millis(config.request_timeout_ms));

    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|source| ServerError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Bind { addr: config.listen, source })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<IdentityGraphServer<IdentityGraphService>>().await;
    health.set_serving::<AdminServer<AdminService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(idgraph_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Actors(format!("reflection: {e}")))?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(idgraph_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| ServerError::Actors(format!("reflection: {e}")))?;

    let max = config.max_message_bytes;
    let graph = IdentityGraphServer::new(IdentityGraphService::new(router.clone(), config.stream_window))
        .max_decoding_message_size(max)
        // Responses are bounded by the rule set's caps, not by the request limit.
        .max_encoding_message_size(64 * 1024 * 1024);
    let admin = AdminServer::new(AdminService::new(router.clone())).max_decoding_message_size(max);

    let (tx, rx) = oneshot::channel::<()>();
    // Small request/response messages: no Nagle delay.
    let incoming =
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)).with_keepalive(Some(Duration::from_secs(60)));
    let serve = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tower::util::MapResponseLayer::new(status::fix_oversized_response))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(graph)
            .add_service(admin)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            }),
    );
    info!(%addr, data_dir = %config.data_dir.display(), rule_version = rules.version(), shards = shards.count(), "idgraph node serving");
    Ok(RunningNode {
        addr,
        router,
        db,
        node,
        shards,
        grace: Duration::from_millis(config.shutdown_grace_ms),
        supervisor,
        shutdown: Some(tx),
        serve,
    })
}
