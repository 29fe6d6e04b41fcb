//! Sending each request to the node that leads its home shard.
//!
//! Any node serves any request: one that does not lead the shard a request
//! starts on forwards it to the node that does, and forwards the answer
//! back. That hop costs a second node's CPU and a round trip; on three
//! nodes, two requests in three take it. [`Cluster`] asks the nodes who
//! leads each shard (`IdentityGraph.GetRoutes`) and sends each request to
//! the leader of its home shard: for an event, the shard of its smallest
//! normalised identifier (where the event's own records go,
//! [`idgraph_core::engine::home_shard`]); for a look-up, the shard of its
//! identifier. Identifiers are normalised with the built-in rules: under
//! other rules a home shard may come out wrong, which costs the hop again
//! and nothing else.
//!
//! Routes are hints, never needed for a right answer. They are fetched when
//! the cluster is connected, every [`REFRESH`] after, and after a call that
//! could not reach its node; until a shard's leader is known, its requests
//! go to the endpoints given, in turn. A leader's address is the one the
//! nodes reach each other at (the same port serves clients), dialled with
//! the scheme and credentials of the endpoints given.

use crate::{Client, ClientError, Credentials};
use idgraph_core::engine::{home_shard, RawIdentifier};
use idgraph_core::rules::RuleSet;
use idgraph_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often routes are fetched again.
pub const REFRESH: Duration = Duration::from_secs(1);
/// How long one node may take to answer `GetRoutes`.
const ROUTES_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to a cluster that sends each request to the node leading
/// its home shard (see the module doc). Cheap to clone; the routes are
/// refreshed in the background while a clone lives.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    /// The endpoints given, connected, with their `host:port`.
    seeds: Vec<(String, Client)>,
    credentials: Credentials,
    /// Whether the endpoints given use TLS (leaders are dialled alike).
    tls: bool,
    rules: RuleSet,
    routes: RwLock<Routes>,
    next_seed: AtomicUsize,
}

/// What the nodes said about where shards are led.
#[derive(Default)]
struct Routes {
    shard_count: u32,
    /// Per shard: the leading node and the term it was seen leading in.
    leaders: BTreeMap<u32, (u64, u64)>,
    /// A connection per node the routes named, by node id.
    nodes: HashMap<u64, Client>,
}

fn bare(endpoint: &str) -> &str {
    endpoint.strip_prefix("http://").or_else(|| endpoint.strip_prefix("https://")).unwrap_or(endpoint).trim_end_matches('/')
}

impl Cluster {
    /// Connects to every endpoint of `endpoints` that answers (an error if
    /// none does), fetches the routes, and keeps them fresh.
    pub async fn connect(endpoints: &[String], credentials: &Credentials) -> Result<Cluster, ClientError> {
        let mut seeds = Vec::new();
        let mut last_error = None;
        for e in endpoints {
            match Client::connect_with(e, credentials).await {
                Ok(c) => seeds.push((bare(e).to_string(), c)),
                Err(err) => last_error = Some(err),
            }
        }
        if seeds.is_empty() {
            return Err(last_error.unwrap_or_else(|| ClientError::Endpoint { endpoint: String::new(), reason: "no endpoint given".into() }));
        }
        let tls = credentials.ca_cert.is_some() || endpoints.iter().any(|e| e.starts_with("https://"));
        let inner = Arc::new(Inner {
            seeds,
            credentials: credentials.clone(),
            tls,
            rules: RuleSet::builtin(),
            routes: RwLock::new(Routes::default()),
            next_seed: AtomicUsize::new(0),
        });
        inner.refresh().await;
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                match weak.upgrade() {
                    Some(inner) => inner.refresh().await,
                    None => break,
                }
            }
        });
        Ok(Cluster { inner })
    }

    /// Fetches the routes again now.
    pub async fn refresh(&self) {
        self.inner.refresh().await
    }

    /// Where an event with identifiers `ids` goes: the leader of its home
    /// shard, or one of the endpoints given.
    pub fn for_event(&self, ids: &[pb::Identifier]) -> Client {
        let raw: Vec<RawIdentifier> = ids.iter().map(|i| RawIdentifier::new(i.r#type.as_str(), i.value.as_str())).collect();
        self.for_identifiers(&raw)
    }

    /// Where a look-up of profile `key` goes: for an identifier, the leader
    /// of its shard; for a profile id, any endpoint given.
    pub fn for_lookup(&self, key: &pb::get_profile_request::Key) -> Client {
        match key {
            pb::get_profile_request::Key::Identifier(id) => self.for_event(std::slice::from_ref(id)),
            pb::get_profile_request::Key::ProfileId(_) => self.any(),
        }
    }

    /// The leader of shard `shard` if known, otherwise one of the endpoints
    /// given.
    pub fn for_shard(&self, shard: u32) -> Client {
        let routes = self.inner.routes.read().unwrap_or_else(|p| p.into_inner());
        match routes.leaders.get(&shard).and_then(|(node, _)| routes.nodes.get(node)) {
            Some(c) => c.clone(),
            None => {
                drop(routes);
                self.any()
            }
        }
    }

    /// One of the endpoints given, in turn.
    pub fn any(&self) -> Client {
        let i = self.inner.next_seed.fetch_add(1, Ordering::Relaxed);
        self.inner.seeds[i % self.inner.seeds.len()].1.clone()
    }

    /// How many shards the routes say the cluster has (0 before any node
    /// answered).
    pub fn shard_count(&self) -> u32 {
        self.inner.routes.read().unwrap_or_else(|p| p.into_inner()).shard_count
    }

    /// The node leading each shard, as far as the routes know.
    pub fn leaders(&self) -> BTreeMap<u32, u64> {
        let routes = self.inner.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.leaders.iter().map(|(s, (node, _))| (*s, *node)).collect()
    }

    fn for_identifiers(&self, raw: &[RawIdentifier]) -> Client {
        let count = self.shard_count();
        match home_shard(&self.inner.rules, raw, count.max(1)) {
            Some(shard) if count > 0 => self.for_shard(shard.0),
            _ => self.any(),
        }
    }

    /// Applies one identity event at the leader of its home shard. A call
    /// that cannot reach that node is sent once more, to an endpoint given,
    /// after the routes are fetched again (an event id is applied once).
    pub async fn identify(&self, request: pb::IdentifyRequest) -> Result<pb::IdentifyResponse, tonic::Status> {
        let mut routed = self.for_event(&request.identifiers);
        match routed.graph().identify(request.clone()).await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                self.refresh().await;
                self.any().graph().identify(request).await.map(|r| r.into_inner())
            }
            other => other.map(|r| r.into_inner()),
        }
    }

    /// Looks a profile up at the leader of its identifier's shard, retried
    /// as [`Cluster::identify`] is.
    pub async fn get_profile(&self, request: pb::GetProfileRequest) -> Result<pb::Profile, tonic::Status> {
        let mut routed = match &request.key {
            Some(key) => self.for_lookup(key),
            None => self.any(),
        };
        match routed.graph().get_profile(request.clone()).await {
            Err(s) if s.code() == tonic::Code::Unavailable => {
                self.refresh().await;
                self.any().graph().get_profile(request).await.map(|r| r.into_inner())
            }
            other => other.map(|r| r.into_inner()),
        }
    }
}

impl Inner {
    /// Asks every endpoint given and every node known for its routes, and
    /// keeps, per shard, the leader seen in the highest term. A node that
    /// does not answer keeps nothing from changing.
    async fn refresh(&self) {
        let mut asked: Vec<Client> = self.seeds.iter().map(|(_, c)| c.clone()).collect();
        asked.extend(self.routes.read().unwrap_or_else(|p| p.into_inner()).nodes.values().cloned());
        let answers = futures::future::join_all(asked.into_iter().map(|mut c| async move {
            tokio::time::timeout(ROUTES_TIMEOUT, c.graph().get_routes(pb::GetRoutesRequest {})).await.ok()?.ok().map(|r| r.into_inner())
        }))
        .await;
        let mut shard_count = 0;
        let mut leaders: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let mut addrs: HashMap<u64, String> = HashMap::new();
        for routes in answers.into_iter().flatten() {
            shard_count = shard_count.max(routes.shard_count);
            addrs.extend(routes.nodes.into_iter().map(|n| (n.node_id, n.addr)));
            for s in routes.shards.into_iter().filter(|s| s.leader_id != 0) {
                let newer = leaders.get(&s.shard).is_none_or(|(_, term)| s.term > *term);
                if newer {
                    leaders.insert(s.shard, (s.leader_id, s.term));
                }
            }
        }
        if shard_count == 0 {
            return;
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        for (node, addr) in &addrs {
            if !routes.nodes.contains_key(node) {
                if let Some(c) = self.client_for(addr) {
                    routes.nodes.insert(*node, c);
                }
            }
        }
        routes.nodes.retain(|node, _| addrs.contains_key(node));
        routes.leaders = leaders.into_iter().filter(|(_, (node, _))| routes.nodes.contains_key(node)).collect();
        routes.shard_count = shard_count;
    }

    /// A connection to the node at `addr`: the endpoint given for it, if
    /// any, otherwise a new one dialled when first used.
    fn client_for(&self, addr: &str) -> Option<Client> {
        if let Some((_, c)) = self.seeds.iter().find(|(a, _)| a == bare(addr)) {
            return Some(c.clone());
        }
        let scheme = if self.tls { "https" } else { "http" };
        Client::connect_lazy(&format!("{scheme}://{}", bare(addr)), &self.credentials).ok()
    }
}
