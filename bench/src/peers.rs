//! The systems a benchmark drives, behind one trait: idgraph over gRPC
//! (unary or streaming), PostgreSQL doing the online resolution a team
//! would build on it, and sled alone (the storage ceiling: the same flush
//! before acknowledging, no resolution, no Raft, no network).

use crate::world::{normalized_key, normalized_value, Event, RawId};
use idgraph_core::rules::RuleSet;
use idgraph_proto::v1 as pb;
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use tonic::transport::Channel;

/// What a benchmark asks of a system; `client` is the caller's index (a
/// peer may keep one connection per client).
pub trait Peer: Send + Sync + 'static {
    fn name(&self) -> String;
    fn ingest(&self, client: usize, event: &Event) -> impl Future<Output = Result<(), String>> + Send;
    /// Looks an identifier up; the profile id found (None: not found).
    fn lookup(&self, client: usize, id: &RawId) -> impl Future<Output = Result<Option<String>, String>> + Send;
}

pub fn to_request(e: &Event) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        event_id: e.event_id.clone(),
        timestamp_ms: 0,
        identifiers: e.ids.iter().map(|i| pb::Identifier { r#type: i.kind.into(), value: i.value.clone() }).collect(),
        traits: None,
        source: "bench".into(),
    }
}

/// How the benchmark's idgraph clients pick a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Routing {
    /// As the client library does ([`idgraph_client::Cluster`]): each
    /// request to the node leading its home shard.
    Leader,
    /// Client `c` sends everything to endpoint `c` modulo their number (the
    /// node forwards what it does not lead), as a client unaware of the
    /// cluster's layout does.
    Spread,
}

/// idgraph through its gRPC API.
pub struct Idgraph {
    nodes: Nodes,
    /// How many endpoints were given.
    endpoints: usize,
    stale: bool,
}

/// The connections of [`Idgraph`], by its [`Routing`].
enum Nodes {
    Leader(idgraph_client::Cluster),
    /// One connection per endpoint, in the order given.
    Spread(Vec<Channel>),
}

impl Idgraph {
    pub async fn connect(endpoints: &[String], routing: Routing, stale: bool) -> Result<Idgraph, String> {
        if endpoints.is_empty() {
            return Err("no endpoint".into());
        }
        let nodes = match routing {
            Routing::Leader => Nodes::Leader(
                idgraph_client::Cluster::connect(endpoints, &idgraph_client::Credentials::default()).await.map_err(|e| e.to_string())?,
            ),
            Routing::Spread => {
                let mut channels = Vec::new();
                for e in endpoints {
                    channels.push(idgraph_client::Client::connect(e).await.map_err(|err| err.to_string())?.channel());
                }
                Nodes::Spread(channels)
            }
        };
        Ok(Idgraph { nodes, endpoints: endpoints.len(), stale })
    }

    /// The one connection client `client` sends over when it keeps one (a
    /// stream, or any call when spread): spread, endpoint `client` modulo
    /// their number; routed, the leader of shard `client` modulo the shard
    /// count (a stream carries events of every shard).
    pub fn channel_of(&self, client: usize) -> Channel {
        match &self.nodes {
            Nodes::Leader(cluster) => {
                let shards = cluster.shard_count().max(1) as usize;
                cluster.for_shard((client % shards) as u32).channel()
            }
            Nodes::Spread(channels) => channels[client % channels.len()].clone(),
        }
    }
}

fn status_text(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

impl Peer for Idgraph {
    fn name(&self) -> String {
        format!("idgraph ({} node{})", self.endpoints, if self.endpoints == 1 { "" } else { "s" })
    }

    async fn ingest(&self, client: usize, event: &Event) -> Result<(), String> {
        let request = to_request(event);
        let answer = match &self.nodes {
            Nodes::Leader(cluster) => cluster.identify(request).await,
            Nodes::Spread(_) => {
                pb::identity_graph_client::IdentityGraphClient::new(self.channel_of(client)).identify(request).await.map(|r| r.into_inner())
            }
        };
        answer.map(|_| ()).map_err(status_text)
    }

    async fn lookup(&self, client: usize, id: &RawId) -> Result<Option<String>, String> {
        let consistency = if self.stale { pb::ReadConsistency::Stale } else { pb::ReadConsistency::Linearizable };
        let req = pb::GetProfileRequest {
            key: Some(pb::get_profile_request::Key::Identifier(pb::Identifier { r#type: id.kind.into(), value: id.value.clone() })),
            consistency: consistency as i32,
        };
        let answer = match &self.nodes {
            Nodes::Leader(cluster) => cluster.get_profile(req).await,
            Nodes::Spread(_) => {
                pb::identity_graph_client::IdentityGraphClient::new(self.channel_of(client)).get_profile(req).await.map(|r| r.into_inner())
            }
        };
        match answer {
            Ok(p) => Ok(Some(p.profile_id)),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(status_text(s)),
        }
    }
}

/// PostgreSQL, resolving online: one transaction per event (synchronous
/// commit on) locks the rows of the event's identifiers and the live
/// profiles they lead to, creates a profile or merges the profiles found
/// into the oldest, re-points their identifiers and inserts the new ones. Values are normalised by the same
/// rules idgraph runs, in the client.
pub struct Postgres {
    clients: Vec<tokio::sync::Mutex<tokio_postgres::Client>>,
    rules: Arc<RuleSet>,
}

const PG_SCHEMA: &str = "
DROP TABLE IF EXISTS ident, profile, event_seen;
CREATE TABLE profile (id bigserial PRIMARY KEY, merged_into bigint);
CREATE TABLE ident (kind text, value text, profile bigint NOT NULL, PRIMARY KEY (kind, value));
CREATE INDEX ident_profile ON ident (profile);
CREATE TABLE event_seen (event_id text PRIMARY KEY);
";

impl Postgres {
    /// Connects `clients` sessions and (re)creates the schema.
    pub async fn connect(conninfo: &str, clients: usize) -> Result<Postgres, String> {
        let mut sessions = Vec::new();
        for _ in 0..clients.max(1) {
            let (client, connection) = tokio_postgres::connect(conninfo, tokio_postgres::NoTls).await.map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            sessions.push(tokio::sync::Mutex::new(client));
        }
        sessions[0].lock().await.batch_execute(PG_SCHEMA).await.map_err(|e| e.to_string())?;
        Ok(Postgres { clients: sessions, rules: Arc::new(RuleSet::builtin()) })
    }

    /// One attempt; Ok(false) when a concurrent merge moved a profile it
    /// read (rolled back, to be tried again).
    async fn resolve_once(&self, db: &mut tokio_postgres::Client, event: &Event) -> Result<bool, tokio_postgres::Error> {
        let keys: BTreeSet<(String, String)> =
            event.ids.iter().filter_map(|id| Some((id.kind.to_string(), normalized_value(&self.rules, id.kind, &id.value)?))).collect();
        let tx = db.transaction().await?;
        if tx.execute("INSERT INTO event_seen VALUES ($1) ON CONFLICT DO NOTHING", &[&event.event_id]).await? == 0 {
            return tx.commit().await.map(|_| true);
        }
        let kinds: Vec<&str> = keys.iter().map(|(k, _)| k.as_str()).collect();
        let values: Vec<&str> = keys.iter().map(|(_, v)| v.as_str()).collect();
        let rows = tx
            .query(
                "SELECT i.kind, i.value, i.profile FROM ident i JOIN unnest($1::text[], $2::text[]) AS k(kind, value) \
                 ON i.kind = k.kind AND i.value = k.value ORDER BY i.kind, i.value FOR UPDATE OF i",
                &[&kinds, &values],
            )
            .await?;
        let mut pointed: Vec<i64> = rows.iter().map(|r| r.get::<_, i64>(2)).collect();
        pointed.sort_unstable();
        pointed.dedup();
        // Identifiers may point at profiles merged away since: follow each
        // to its live root, and lock the roots. A root merged by a
        // concurrent transaction meanwhile sends this one round again.
        let roots = tx
            .query(
                "WITH RECURSIVE chain(id, merged_into) AS ( \
                   SELECT id, merged_into FROM profile WHERE id = ANY($1) \
                   UNION SELECT p.id, p.merged_into FROM profile p JOIN chain c ON p.id = c.merged_into) \
                 SELECT id FROM chain WHERE merged_into IS NULL ORDER BY id",
                &[&pointed],
            )
            .await?;
        let found: Vec<i64> = roots.iter().map(|r| r.get(0)).collect();
        let locked =
            tx.query("SELECT id FROM profile WHERE id = ANY($1) AND merged_into IS NULL ORDER BY id FOR UPDATE", &[&found]).await?;
        if locked.len() != found.len() {
            tx.rollback().await?;
            return Ok(false);
        }
        let survivor = match found.first() {
            Some(s) => *s,
            None => tx.query_one("INSERT INTO profile DEFAULT VALUES RETURNING id", &[]).await?.get(0),
        };
        let absorbed: Vec<i64> = found.iter().copied().filter(|p| *p != survivor).collect();
        if !absorbed.is_empty() {
            tx.execute("UPDATE ident SET profile = $1 WHERE profile = ANY($2)", &[&survivor, &absorbed]).await?;
            tx.execute("UPDATE profile SET merged_into = $1 WHERE id = ANY($2)", &[&survivor, &absorbed]).await?;
        }
        let have: std::collections::HashSet<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let missing: Vec<&(String, String)> = keys.iter().filter(|k| !have.contains(*k)).collect();
        if !missing.is_empty() {
            let kinds: Vec<&str> = missing.iter().map(|(k, _)| k.as_str()).collect();
            let values: Vec<&str> = missing.iter().map(|(_, v)| v.as_str()).collect();
            tx.execute(
                "INSERT INTO ident (kind, value, profile) SELECT k, v, $3 FROM unnest($1::text[], $2::text[]) AS t(k, v)",
                &[&kinds, &values, &survivor],
            )
            .await?;
        }
        tx.commit().await.map(|_| true)
    }
}

/// The batch way warehouse CDPs stitch, in SQL: every event's normalised
/// identifiers loaded at once (`edge`), then label propagation until it
/// settles. Each identifier starts with its own label; each round, every
/// event takes the smallest label of its identifiers and every identifier
/// the smallest label of its events. The connected components found are
/// written as profiles into `profile` and `ident`, where the online
/// look-up finds them. There are no blocked-value lists beyond the
/// normalisation rules, no hub detection and no per-type limits: one shared
/// value joins everything it touches, as a plain connected-components job
/// does.
#[derive(Debug, serde::Serialize)]
pub struct BatchStitch {
    /// Rows loaded, rounds of propagation, and seconds of each phase.
    pub edges: u64,
    pub rounds: u32,
    pub load_seconds: f64,
    pub stitch_seconds: f64,
}

const PG_BATCH_SCHEMA: &str = "
DROP TABLE IF EXISTS edge, node_label, event_label;
CREATE UNLOGGED TABLE edge (event_id text NOT NULL, kind text NOT NULL, value text NOT NULL);
";

/// Rows sent per INSERT while loading.
const BATCH_LOAD_ROWS: usize = 10_000;
/// Propagation that has not settled after this many rounds is an error (a
/// chain this long means something is wrong).
const MAX_ROUNDS: u32 = 200;

impl Postgres {
    /// Loads every event and stitches them in one batch job (see
    /// [`BatchStitch`]).
    pub async fn stitch_batch(&self, events: &[Event]) -> Result<BatchStitch, String> {
        let db = self.clients[0].lock().await;
        let err = |e: tokio_postgres::Error| e.to_string();
        db.batch_execute(PG_BATCH_SCHEMA).await.map_err(err)?;
        let started = std::time::Instant::now();
        let mut rows: Vec<(String, String, String)> = Vec::new();
        for e in events {
            for id in &e.ids {
                if let Some(value) = normalized_value(&self.rules, id.kind, &id.value) {
                    rows.push((e.event_id.clone(), id.kind.to_string(), value));
                }
            }
        }
        for chunk in rows.chunks(BATCH_LOAD_ROWS) {
            let ev: Vec<&str> = chunk.iter().map(|r| r.0.as_str()).collect();
            let kinds: Vec<&str> = chunk.iter().map(|r| r.1.as_str()).collect();
            let values: Vec<&str> = chunk.iter().map(|r| r.2.as_str()).collect();
            db.execute("INSERT INTO edge SELECT * FROM unnest($1::text[], $2::text[], $3::text[])", &[&ev, &kinds, &values])
                .await
                .map_err(err)?;
        }
        let load_seconds = started.elapsed().as_secs_f64();
        let started = std::time::Instant::now();
        db.batch_execute(
            "CREATE INDEX edge_event ON edge (event_id);
             CREATE INDEX edge_node ON edge (kind, value);
             CREATE UNLOGGED TABLE node_label AS
               SELECT kind, value, row_number() OVER (ORDER BY kind, value) AS label FROM (SELECT DISTINCT kind, value FROM edge) n;
             ALTER TABLE node_label ADD PRIMARY KEY (kind, value);
             CREATE UNLOGGED TABLE event_label (event_id text PRIMARY KEY, label bigint NOT NULL);
             ANALYZE edge; ANALYZE node_label;",
        )
        .await
        .map_err(err)?;
        let mut rounds = 0;
        loop {
            rounds += 1;
            db.batch_execute(
                "TRUNCATE event_label;
                 INSERT INTO event_label SELECT e.event_id, min(n.label) FROM edge e JOIN node_label n USING (kind, value) GROUP BY e.event_id;",
            )
            .await
            .map_err(err)?;
            let moved = db
                .execute(
                    "UPDATE node_label n SET label = m.label FROM (
                       SELECT e.kind, e.value, min(l.label) AS label FROM edge e JOIN event_label l USING (event_id) GROUP BY e.kind, e.value
                     ) m WHERE n.kind = m.kind AND n.value = m.value AND m.label < n.label",
                    &[],
                )
                .await
                .map_err(err)?;
            if moved == 0 {
                break;
            }
            if rounds >= MAX_ROUNDS {
                return Err(format!("labels still moved after {MAX_ROUNDS} rounds of propagation"));
            }
        }
        // The components become profiles the online look-up reads.
        db.batch_execute(
            "TRUNCATE ident, profile;
             INSERT INTO profile (id) SELECT DISTINCT label FROM node_label;
             INSERT INTO ident (kind, value, profile) SELECT kind, value, label FROM node_label;",
        )
        .await
        .map_err(err)?;
        Ok(BatchStitch { edges: rows.len() as u64, rounds, load_seconds, stitch_seconds: started.elapsed().as_secs_f64() })
    }
}

impl Peer for Postgres {
    fn name(&self) -> String {
        "postgresql (online)".into()
    }

    async fn ingest(&self, client: usize, event: &Event) -> Result<(), String> {
        let mut db = self.clients[client % self.clients.len()].lock().await;
        // Lost races (a key inserted meanwhile, a deadlock) are retried, as
        // an application would.
        for _ in 0..50 {
            match self.resolve_once(&mut db, event).await {
                Ok(true) => return Ok(()),
                Ok(false) => continue,
                Err(e) if e.code().is_some_and(|c| matches!(c.code(), "23505" | "40P01" | "40001")) => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("gave up after 50 conflicting attempts".into())
    }

    async fn lookup(&self, client: usize, id: &RawId) -> Result<Option<String>, String> {
        let Some(value) = normalized_value(&self.rules, id.kind, &id.value) else { return Ok(None) };
        let kind = id.kind;
        let db = self.clients[client % self.clients.len()].lock().await;
        let row = db
            .query_opt(
                "WITH RECURSIVE chain(id, merged_into) AS ( \
                   SELECT p.id, p.merged_into FROM profile p JOIN ident i ON i.profile = p.id WHERE i.kind = $1 AND i.value = $2 \
                   UNION ALL SELECT p.id, p.merged_into FROM profile p JOIN chain c ON p.id = c.merged_into) \
                 SELECT id FROM chain WHERE merged_into IS NULL",
                &[&kind, &value],
            )
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.map(|r| r.get::<_, i64>(0).to_string()))
    }
}

/// sled alone: each event's normalised identifiers written in one batch and
/// flushed (fsync) before it counts as done. No resolution, no Raft, no
/// network.
pub struct SledCeiling {
    db: sled::Db,
    rules: Arc<RuleSet>,
}

impl SledCeiling {
    pub fn open(dir: &std::path::Path) -> Result<SledCeiling, String> {
        let db = sled::open(dir).map_err(|e| e.to_string())?;
        Ok(SledCeiling { db, rules: Arc::new(RuleSet::builtin()) })
    }
}

impl Peer for SledCeiling {
    fn name(&self) -> String {
        "sled alone (ceiling)".into()
    }

    async fn ingest(&self, _client: usize, event: &Event) -> Result<(), String> {
        let mut batch = sled::Batch::default();
        for id in &event.ids {
            if let Some(k) = normalized_key(&self.rules, id.kind, &id.value) {
                batch.insert(k.as_bytes(), event.event_id.as_bytes());
            }
        }
        self.db.apply_batch(batch).map_err(|e| e.to_string())?;
        // As idgraph's log flusher does: a blocking flush off the runtime
        // (sled's flush_async hung under 16 concurrent callers here).
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush()).await.map_err(|e| e.to_string())?.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn lookup(&self, _client: usize, id: &RawId) -> Result<Option<String>, String> {
        let Some(k) = normalized_key(&self.rules, id.kind, &id.value) else { return Ok(None) };
        Ok(self.db.get(k.as_bytes()).map_err(|e| e.to_string())?.map(|v| String::from_utf8_lossy(&v).into_owned()))
    }
}

/// etcd, a proven Raft store: each event's normalised identifiers written
/// as one replicated transaction of puts (one key per identifier, the event
/// id as value), acknowledged once a quorum has it. No resolution: the
/// ceiling of replicated writes on this machine. Built with the `etcd`
/// feature (its client compiles etcd's protos with `protoc`).
#[cfg(feature = "etcd")]
pub struct Etcd {
    clients: Vec<etcd_client::KvClient>,
    members: usize,
    rules: Arc<RuleSet>,
}

#[cfg(feature = "etcd")]
impl Etcd {
    /// One client (its own connection to every member) per caller.
    pub async fn connect(endpoints: &[String], clients: usize) -> Result<Etcd, String> {
        let mut out = Vec::new();
        for _ in 0..clients.max(1) {
            let c = etcd_client::Client::connect(endpoints, None).await.map_err(|e| e.to_string())?;
            out.push(c.kv_client());
        }
        Ok(Etcd { clients: out, members: endpoints.len(), rules: Arc::new(RuleSet::builtin()) })
    }
}

#[cfg(feature = "etcd")]
impl Peer for Etcd {
    fn name(&self) -> String {
        format!("etcd ({} members)", self.members)
    }

    async fn ingest(&self, client: usize, event: &Event) -> Result<(), String> {
        let puts: Vec<etcd_client::TxnOp> = event
            .ids
            .iter()
            .filter_map(|id| normalized_key(&self.rules, id.kind, &id.value))
            .map(|k| etcd_client::TxnOp::put(k, event.event_id.clone(), None))
            .collect();
        if puts.is_empty() {
            return Ok(());
        }
        let mut kv = self.clients[client % self.clients.len()].clone();
        kv.txn(etcd_client::Txn::new().and_then(puts)).await.map(|_| ()).map_err(|e| e.to_string())
    }

    async fn lookup(&self, client: usize, id: &RawId) -> Result<Option<String>, String> {
        let Some(k) = normalized_key(&self.rules, id.kind, &id.value) else { return Ok(None) };
        let mut kv = self.clients[client % self.clients.len()].clone();
        let resp = kv.get(k, None).await.map_err(|e| e.to_string())?;
        Ok(resp.kvs().first().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }
}
