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
//! could not reach its node (one fetch at a time: callers that fail
//! meanwhile wait for the fetch under way). A request goes to a shard's
//! leader only if that node answered the last fetch, and over the
//! connection it answered on: an endpoint given reaches its node even when
//! the address the node advertises does not (one inside another network,
//! say), and an address no connection reaches is never used. A node a call
//! could not reach is left out until it answers a fetch again. Until a
//! shard's leader is known, its requests go to the endpoints given, in
//! turn, skipping those that did not answer the last fetch. A node that is
//! not among the endpoints given is dialled at the address the nodes reach
//! each other at (the same port serves clients), with the scheme and
//! credentials of the endpoints given.

use crate::{bare_address, Client, ClientError, Credentials};
use idgraph_core::engine::{home_shard, RawIdentifier};
use idgraph_core::rules::RuleSet;
use idgraph_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// Held while routes are fetched: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

/// What the nodes said about where shards are led.
#[derive(Default)]
struct Routes {
    shard_count: u32,
    /// Per shard: the leading node and the term it was seen leading in.
    leaders: BTreeMap<u32, (u64, u64)>,
    /// A connection per node the routes named, by node id, with its
    /// address (dialled again if the address changes).
    nodes: HashMap<u64, (String, Client)>,
    /// Nodes that answered the last fetch and no call failed to reach
    /// since: the only ones requests are routed to.
    reachable: HashSet<u64>,
    /// Endpoints given (by `host:port`) that did not answer the last fetch.
    seeds_down: HashSet<String>,
}

impl Cluster {
    /// Connects to every endpoint of `endpoints` that answers (an error if
    /// none does), fetches the routes, and keeps them fresh.
    pub async fn connect(endpoints: &[String], credentials: &Credentials) -> Result<Cluster, ClientError> {
        let mut seeds = Vec::new();
        let mut last_error = None;
        for e in endpoints {
            match Client::connect_with(e, credentials).await {
                Ok(c) => seeds.push((bare_address(e).to_string(), c)),
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
            fetching: tokio::sync::Mutex::new(()),
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

    /// Fetches the routes again now, or waits for the fetch under way.
    pub async fn refresh(&self) {
        self.inner.refresh().await
    }

    /// Where an event with identifiers `ids` goes: the leader of its home
    /// shard, or one of the endpoints given.
    pub fn for_event(&self, ids: &[pb::Identifier]) -> Client {
        self.node_client(self.shard_node(self.event_home(ids)))
    }

    /// The node requests of shard `shard` go to now: its leader, if known
    /// and reachable (None: one of the endpoints given, as
    /// [`Cluster::node_client`] picks).
    pub fn shard_node(&self, shard: Option<u32>) -> Option<u64> {
        let routes = self.inner.routes.read().unwrap_or_else(|p| p.into_inner());
        let (node, _) = routes.leaders.get(&shard?)?;
        (routes.reachable.contains(node) && routes.nodes.contains_key(node)).then_some(*node)
    }

    /// A connection to `node` (None, or a node the routes no longer name:
    /// one of the endpoints given).
    pub fn node_client(&self, node: Option<u64>) -> Client {
        let routes = self.inner.routes.read().unwrap_or_else(|p| p.into_inner());
        match node.and_then(|n| routes.nodes.get(&n)) {
            Some((_, c)) => c.clone(),
            None => {
                drop(routes);
                self.any()
            }
        }
    }

    /// Leaves `node` out of the routes until it answers a fetch of routes
    /// again: a call could not reach it, or lost its connection to it.
    pub fn lost(&self, node: u64) {
        self.inner.routes.write().unwrap_or_else(|p| p.into_inner()).reachable.remove(&node);
    }

    /// Where a look-up of profile `key` goes: for an identifier, the leader
    /// of its shard; for a profile id, any endpoint given.
    pub fn for_lookup(&self, key: &pb::get_profile_request::Key) -> Client {
        self.node_client(self.shard_node(self.lookup_home(key)))
    }

    /// The shard a look-up of `key` starts on: its identifier's (None for a
    /// profile id, which names no shard a client can compute).
    fn lookup_home(&self, key: &pb::get_profile_request::Key) -> Option<u32> {
        match key {
            pb::get_profile_request::Key::Identifier(id) => self.event_home(std::slice::from_ref(id)),
            pb::get_profile_request::Key::ProfileId(_) => None,
        }
    }

    /// The leader of shard `shard` if known and reachable, otherwise one of
    /// the endpoints given.
    pub fn for_shard(&self, shard: u32) -> Client {
        self.node_client(self.shard_node(Some(shard)))
    }

    /// One of the endpoints given, in turn, skipping those that did not
    /// answer the last fetch of routes (unless none did).
    pub fn any(&self) -> Client {
        let down = self.inner.routes.read().unwrap_or_else(|p| p.into_inner()).seeds_down.clone();
        let n = self.inner.seeds.len();
        let start = self.inner.next_seed.fetch_add(1, Ordering::Relaxed);
        let up = (0..n).map(|k| &self.inner.seeds[(start + k) % n]).find(|(addr, _)| !down.contains(addr));
        up.unwrap_or(&self.inner.seeds[start % n]).1.clone()
    }

    /// How many shards the routes say the cluster has (0 before any node
    /// answered).
    pub fn shard_count(&self) -> u32 {
        self.inner.routes.read().unwrap_or_else(|p| p.into_inner()).shard_count
    }

    /// The node each shard's requests go to: its leader, as far as the
    /// routes know, if that node answered the last fetch.
    pub fn leaders(&self) -> BTreeMap<u32, u64> {
        let routes = self.inner.routes.read().unwrap_or_else(|p| p.into_inner());
        routes.leaders.iter().filter(|(_, (node, _))| routes.reachable.contains(node)).map(|(s, (node, _))| (*s, *node)).collect()
    }

    /// The home shard of an event with identifiers `ids` (None before any
    /// node answered, or when no identifier normalises): where
    /// [`Cluster::for_event`] sends it, kept by a caller that sends an event
    /// several times.
    pub fn event_home(&self, ids: &[pb::Identifier]) -> Option<u32> {
        let count = self.shard_count();
        if count == 0 {
            return None;
        }
        let raw: Vec<RawIdentifier> = ids.iter().map(|i| RawIdentifier::new(i.r#type.as_str(), i.value.as_str())).collect();
        home_shard(&self.inner.rules, &raw, count).map(|s| s.0)
    }

    /// Sends `call` to the leader of `shard` (or an endpoint given). If
    /// that node cannot be reached or drops the connection during the call
    /// ([`node_lost`]), it is left out of the routes, the routes are
    /// fetched again, and the call is sent once more where they now point;
    /// a second lost connection is answered as UNAVAILABLE (outcome
    /// unknown, retry), as the API promises.
    async fn call<T, F, Fut>(&self, shard: Option<u32>, call: F) -> Result<T, tonic::Status>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let node = self.shard_node(shard);
        match call(self.node_client(node)).await {
            Err(s) if node_lost(&s) => {
                if let Some(node) = node {
                    self.lost(node);
                }
                self.refresh().await;
                call(self.node_client(self.shard_node(shard))).await.map_err(|s| {
                    if node_lost(&s) && s.code() != tonic::Code::Unavailable {
                        let why =
                            format!("the connection to the node was lost during the call, so its outcome is unknown: {}", s.message());
                        tonic::Status::unavailable(why)
                    } else {
                        s
                    }
                })
            }
            other => other,
        }
    }

    /// Applies one identity event at the leader of its home shard, sent
    /// once more if that node cannot be reached (an event id is applied
    /// once: a second delivery of an applied event answers `duplicate`).
    pub async fn identify(&self, request: pb::IdentifyRequest) -> Result<pb::IdentifyResponse, tonic::Status> {
        let shard = self.event_home(&request.identifiers);
        self.call(shard, |mut c| {
            let request = request.clone();
            async move { c.graph().identify(request).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Looks a profile up at the leader of its identifier's shard (by
    /// profile id: at an endpoint given), retried as [`Cluster::identify`]
    /// is.
    pub async fn get_profile(&self, request: pb::GetProfileRequest) -> Result<pb::Profile, tonic::Status> {
        let shard = request.key.as_ref().and_then(|k| self.lookup_home(k));
        self.call(shard, |mut c| {
            let request = request.clone();
            async move { c.graph().get_profile(request).await.map(|r| r.into_inner()) }
        })
        .await
    }
}

/// Whether a call failed for want of its node, so that its outcome is
/// unknown and it may be sent again: UNAVAILABLE; CANCELLED, which a caller
/// still awaiting the call did not ask for (the connection ended with the
/// call pending, or the node reset it while shutting down); or the
/// connection lost during the call (tonic's transport error, which it
/// reports as UNKNOWN).
fn node_lost(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Cancelled)
        || (s.code() == tonic::Code::Unknown && std::error::Error::source(s).is_some_and(|e| e.is::<tonic::transport::Error>()))
}

impl Inner {
    /// Fetches the routes, unless a fetch is under way: then waits for it.
    async fn refresh(&self) {
        match self.fetching.try_lock() {
            Ok(_fetching) => self.fetch().await,
            Err(_) => drop(self.fetching.lock().await),
        }
    }

    /// Asks every endpoint given and every node known for its routes, and
    /// keeps, per shard, the leader seen in the highest term. Only nodes
    /// that answered are routed to, each over the connection it answered
    /// on (an endpoint given reaches its node even when the address the
    /// node advertises does not); if none answered, the routes stay.
    async fn fetch(&self) {
        let known: Vec<Client> = self.routes.read().unwrap_or_else(|p| p.into_inner()).nodes.values().map(|(_, c)| c.clone()).collect();
        let asked = self.seeds.iter().map(|(a, c)| (Some(a.clone()), c.clone())).chain(known.into_iter().map(|c| (None, c)));
        let answers = futures::future::join_all(asked.map(|(seed, c)| async move {
            let mut call = c.clone();
            let answer = tokio::time::timeout(ROUTES_TIMEOUT, call.graph().get_routes(pb::GetRoutesRequest {})).await;
            (seed, c, answer.ok().and_then(Result::ok).map(|r| r.into_inner()))
        }))
        .await;
        let mut shard_count = 0;
        let mut leaders: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
        let mut addrs: HashMap<u64, String> = HashMap::new();
        // Node -> the connection it answered on; an endpoint given first.
        let mut answered: HashMap<u64, Client> = HashMap::new();
        let mut seeds_down = HashSet::new();
        for (seed, client, routes) in answers {
            let Some(routes) = routes else {
                seeds_down.extend(seed);
                continue;
            };
            if seed.is_some() || !answered.contains_key(&routes.node_id) {
                answered.insert(routes.node_id, client);
            }
            shard_count = shard_count.max(routes.shard_count);
            addrs.extend(routes.nodes.into_iter().map(|n| (n.node_id, n.addr)));
            for s in routes.shards.into_iter().filter(|s| s.leader_id != 0) {
                if leaders.get(&s.shard).is_none_or(|(_, term)| s.term > *term) {
                    leaders.insert(s.shard, (s.leader_id, s.term));
                }
            }
        }
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        routes.seeds_down = seeds_down;
        if shard_count == 0 {
            routes.reachable.clear();
            return;
        }
        for (node, addr) in &addrs {
            if let Some(c) = answered.get(node) {
                routes.nodes.insert(*node, (addr.clone(), c.clone()));
            } else if routes.nodes.get(node).is_none_or(|(known, _)| known != addr) {
                match self.client_for(addr) {
                    Some(c) => routes.nodes.insert(*node, (addr.clone(), c)),
                    None => routes.nodes.remove(node),
                };
            }
        }
        routes.nodes.retain(|node, _| addrs.contains_key(node));
        routes.leaders = leaders;
        routes.reachable = answered.into_keys().filter(|n| routes.nodes.contains_key(n)).collect();
        routes.shard_count = shard_count;
    }

    /// A connection to the node at `addr`: the endpoint given for it, if
    /// any, otherwise a new one dialled when first used.
    fn client_for(&self, addr: &str) -> Option<Client> {
        if let Some((_, c)) = self.seeds.iter().find(|(a, _)| a == bare_address(addr)) {
            return Some(c.clone());
        }
        let scheme = if self.tls { "https" } else { "http" };
        Client::connect_lazy(&format!("{scheme}://{}", bare_address(addr)), &self.credentials).ok()
    }
}
