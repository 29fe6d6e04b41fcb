//! The workload: concurrent clients sending `Identify`, `Merge`, `Unmerge`
//! and `GetProfile` to random nodes, and the history they record.
//!
//! Identifiers come in *groups*. A group is one to three persons, each with
//! an e-mail, two devices and an anonymous id; its events link a person's
//! identifiers and sometimes two persons' (a shared device), and its merges
//! join two of its identifiers' profiles. Groups never link to each other,
//! so each group's history can be checked on its own, and a group never
//! holds more identifiers of a type than the built-in rules allow (at most
//! three e-mails, six devices), so that every link it asks for is made:
//! within a group the graph is a pure union, the model the linearizability
//! checker knows. Identifiers hash to different shards, so most events are
//! cross-shard transactions.
//!
//! Every fifth group also sees `Unmerge` (an identifier split out of its
//! profile). Those groups are left out of the linearizability check and the
//! "acknowledged events stay together" check, which assume a pure union;
//! the graph invariants and "every acknowledged identifier resolves" still
//! cover them.
//!
//! Clients pick groups from a window that slides as operations complete, so
//! that several clients work on the same few groups at once and race.

use idgraph_proto::v1 as pb;
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::Code;

/// Groups a client chooses among at a time.
const WINDOW: u64 = 4;
/// Operations after which the window moves on by one group.
const OPS_PER_STEP: u64 = 32;

/// Group indexes reserved for one epoch.
const GROUPS_PER_EPOCH: u64 = 1_000_000;

/// An identifier as the history writes it: `type:value`.
pub type Id = String;

pub fn id_string(kind: &str, value: &str) -> Id {
    format!("{kind}:{value}")
}

pub fn to_pb(id: &str) -> pb::Identifier {
    let (kind, value) = id.split_once(':').unwrap_or(("", id));
    pb::Identifier { r#type: kind.into(), value: value.into() }
}

/// The identifiers of one group.
#[derive(Clone, Debug)]
pub struct Group {
    pub index: u64,
    pub persons: Vec<Vec<Id>>,
    /// Also sees unmerges (left out of the union-only checks).
    pub unmerges: bool,
}

impl Group {
    /// Group `index` of a run with `seed`: the same every time.
    pub fn new(seed: u64, index: u64) -> Group {
        let mut rng = fastrand::Rng::with_seed(seed ^ index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let persons = (0..rng.usize(1..=3))
            .map(|p| {
                vec![
                    id_string("email", &format!("g{index}.p{p}@chaos-mail.dev")),
                    id_string("device_id", &format!("dev-{index}-{p}-a")),
                    id_string("device_id", &format!("dev-{index}-{p}-b")),
                    id_string("anonymous_id", &format!("anon-{index}-{p}")),
                ]
            })
            .collect();
        Group { index, persons, unmerges: index % 5 == 4 }
    }

    pub fn all(&self) -> impl Iterator<Item = &Id> {
        self.persons.iter().flatten()
    }
}

/// What an operation was.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OpKind {
    Identify {
        event_id: String,
        ids: Vec<Id>,
    },
    /// Merge of the profiles of two identifiers.
    Merge {
        ids: Vec<Id>,
    },
    /// Split one identifier out of its profile.
    Unmerge {
        id: Id,
    },
    /// Linearizable `GetProfile` by identifier; `found` is the profile's
    /// identifiers, None for NOT_FOUND (set when the read succeeded).
    Read {
        id: Id,
        found: Option<BTreeSet<Id>>,
    },
}

/// How an operation ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", content = "detail", rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    /// Definitely did not take effect.
    Failed(String),
    /// May or may not have taken effect (timeout, node unreachable).
    Unknown(String),
}

impl Outcome {
    /// Failed with NOT_FOUND.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Outcome::Failed(detail) if detail.starts_with("NotFound:"))
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Op {
    pub client: usize,
    pub group: u64,
    /// The node (index) the request went to.
    pub node: usize,
    #[serde(flatten)]
    pub kind: OpKind,
    /// Microseconds since the run started.
    pub call_us: u64,
    pub return_us: u64,
    #[serde(flatten)]
    pub outcome: Outcome,
}

impl Op {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            OpKind::Identify { .. } => "identify",
            OpKind::Merge { .. } => "merge",
            OpKind::Unmerge { .. } => "unmerge",
            OpKind::Read { .. } => "read",
        }
    }

    /// The identifiers a write asked to join, if it is one.
    pub fn linked(&self) -> Option<&[Id]> {
        match &self.kind {
            OpKind::Identify { ids, .. } | OpKind::Merge { ids } => Some(ids),
            _ => None,
        }
    }
}

/// What a status means for the operation's effect.
pub fn classify(status: &tonic::Status) -> Outcome {
    let detail = format!("{:?}: {}", status.code(), status.message());
    match status.code() {
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
        | Code::PermissionDenied
        // A write refused by admission control (too many waiting, a full
        // disk) did nothing: the node promises it, and the checkers hold it
        // to that (a read that sees such a write fails linearizability).
        | Code::ResourceExhausted => Outcome::Failed(detail),
        _ => Outcome::Unknown(detail),
    }
}

pub struct WorkloadSpec {
    pub seed: u64,
    /// Runs against the same data (the crash loop's cycles) use different
    /// epochs, hence different groups and event ids.
    pub epoch: u64,
    pub clients: usize,
    /// Id of the first client: the clients are numbered from it, so that
    /// the clients of two workloads on one history (an `overload` burst
    /// beside the run's own) are told apart.
    pub first_client: usize,
    pub duration: Duration,
    /// Per-request deadline; a request past it has an unknown outcome.
    pub timeout: Duration,
}

/// Shared by the clients of one run.
struct Shared {
    started: Instant,
    ops: AtomicU64,
    /// Identifiers of acknowledged events, per group (merge candidates).
    acked: Mutex<HashMap<u64, Vec<Id>>>,
    history: Mutex<Vec<Op>>,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.started.elapsed().as_micros() as u64
    }
}

/// Runs the clients against `endpoints` for the spec's duration and returns
/// the history, in completion order.
pub async fn run(spec: &WorkloadSpec, endpoints: &[String], started: Instant) -> anyhow::Result<Vec<Op>> {
    let channels: Vec<Channel> = endpoints.iter().map(|e| crate::cluster::lazy_channel(e)).collect::<Result<_, _>>()?;
    let shared = Arc::new(Shared { started, ops: AtomicU64::new(0), acked: Mutex::default(), history: Mutex::default() });
    let deadline = Instant::now() + spec.duration;
    let mut tasks = Vec::new();
    for client in spec.first_client..spec.first_client + spec.clients {
        let shared = shared.clone();
        let channels = channels.clone();
        let (seed, epoch, timeout) = (spec.seed, spec.epoch, spec.timeout);
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(client as u64 + 1));
            let mut n = 0u64;
            while Instant::now() < deadline {
                let op = one_op(&shared, &channels, client, &mut rng, (seed, epoch), n, timeout).await;
                n += 1;
                shared.ops.fetch_add(1, Ordering::Relaxed);
                // A node that is down refuses at once: back off rather than
                // fill the history with refusals.
                if op.iter().any(|o| matches!(o.outcome, Outcome::Unknown(_))) {
                    tokio::time::sleep(Duration::from_millis(rng.u64(50..250))).await;
                }
                shared.history.lock().map_err(|_| anyhow::anyhow!("history lock poisoned"))?.extend(op);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let history = std::mem::take(&mut *shared.history.lock().map_err(|_| anyhow::anyhow!("history lock poisoned"))?);
    Ok(history)
}

/// Chooses and runs one operation (two for an unmerge: the read that finds
/// the profile, then the split).
async fn one_op(
    shared: &Shared,
    channels: &[Channel],
    client: usize,
    rng: &mut fastrand::Rng,
    (seed, epoch): (u64, u64),
    n: u64,
    timeout: Duration,
) -> Vec<Op> {
    let first = epoch * GROUPS_PER_EPOCH;
    let group = Group::new(seed, first + shared.ops.load(Ordering::Relaxed) / OPS_PER_STEP + rng.u64(0..WINDOW));
    let node = rng.usize(0..channels.len());
    let mut graph = pb::identity_graph_client::IdentityGraphClient::new(channels[node].clone());
    let acked: Vec<Id> = shared.acked.lock().map(|m| m.get(&group.index).cloned().unwrap_or_default()).unwrap_or_default();
    let roll = rng.f64();
    let op = |kind, call_us, outcome| Op { client, group: group.index, node, kind, call_us, return_us: shared.now_us(), outcome };
    if roll < 0.5 {
        // An event: two or three identifiers of one person, now and then
        // one of another person's (a shared device, a shared login).
        let person = &group.persons[rng.usize(0..group.persons.len())];
        let mut ids: Vec<Id> = person.clone();
        rng.shuffle(&mut ids);
        ids.truncate(rng.usize(2..=3));
        if group.persons.len() > 1 && rng.f64() < 0.3 {
            let other = &group.persons[rng.usize(0..group.persons.len())];
            ids[0] = other[rng.usize(0..other.len())].clone();
        }
        ids.sort();
        ids.dedup();
        let event_id = format!("ev-{seed}-{epoch}-{client}-{n}");
        let req = pb::IdentifyRequest {
            event_id: event_id.clone(),
            timestamp_ms: 0,
            identifiers: ids.iter().map(|i| to_pb(i)).collect(),
            traits: None,
            source: "chaos".into(),
        };
        let call_us = shared.now_us();
        let outcome = match within(timeout, graph.identify(req)).await {
            Err(s) => classify(&s),
            Ok(r) => match r.error {
                Some(e) => Outcome::Unknown(format!("event error {}: {}", e.code, e.message)),
                None => Outcome::Ok,
            },
        };
        if outcome == Outcome::Ok {
            if let Ok(mut m) = shared.acked.lock() {
                let known = m.entry(group.index).or_default();
                known.extend(ids.iter().cloned());
                known.sort();
                known.dedup();
            }
        }
        return vec![op(OpKind::Identify { event_id, ids }, call_us, outcome)];
    }
    if roll < 0.6 && acked.len() >= 2 {
        let a = acked[rng.usize(0..acked.len())].clone();
        let b = acked[rng.usize(0..acked.len())].clone();
        if a != b {
            let req = pb::MergeRequest {
                profiles: [&a, &b].iter().map(|i| pb::ProfileRef { key: Some(pb::profile_ref::Key::Identifier(to_pb(i))) }).collect(),
                force: false,
                reason: "chaos".into(),
            };
            let call_us = shared.now_us();
            let outcome = within(timeout, graph.merge(req)).await.map_or_else(|s| classify(&s), |_| Outcome::Ok);
            return vec![op(OpKind::Merge { ids: vec![a, b] }, call_us, outcome)];
        }
    }
    let all: Vec<&Id> = group.all().collect();
    let target =
        if !acked.is_empty() && rng.bool() { acked[rng.usize(0..acked.len())].clone() } else { all[rng.usize(0..all.len())].clone() };
    let (read, profile_id) = read(&mut graph, &target, timeout, shared, op).await;
    let mut ops = vec![read];
    if group.unmerges && roll > 0.9 {
        if let Some(profile_id) = profile_id {
            let req = pb::UnmergeRequest {
                target: Some(pb::unmerge_request::Target::Split(pb::SplitIdentifiers { profile_id, identifiers: vec![to_pb(&target)] })),
                reason: "chaos".into(),
            };
            let call_us = shared.now_us();
            let outcome = within(timeout, graph.unmerge(req)).await.map_or_else(|s| classify(&s), |_| Outcome::Ok);
            ops.push(Op {
                client,
                group: group.index,
                node,
                kind: OpKind::Unmerge { id: target },
                call_us,
                return_us: shared.now_us(),
                outcome,
            });
        }
    }
    ops
}

/// Awaits a call until the client's deadline (past it: DEADLINE_EXCEEDED,
/// an unknown outcome).
async fn within<T>(
    timeout: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err(tonic::Status::deadline_exceeded("client deadline")),
        Ok(r) => r.map(tonic::Response::into_inner),
    }
}

/// A linearizable read of one identifier; also returns the profile id.
async fn read(
    graph: &mut pb::identity_graph_client::IdentityGraphClient<Channel>,
    id: &Id,
    timeout: Duration,
    shared: &Shared,
    op: impl Fn(OpKind, u64, Outcome) -> Op,
) -> (Op, Option<String>) {
    let req = pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::Identifier(to_pb(id))), consistency: 0 };
    let call_us = shared.now_us();
    let (found, outcome, profile_id) = match within(timeout, graph.get_profile(req)).await {
        Err(s) if s.code() == Code::NotFound => (None, Outcome::Ok, None),
        Err(s) => (None, classify(&s), None),
        Ok(p) => {
            let ids = p.identifiers.iter().map(|i| id_string(&i.r#type, &i.value)).collect();
            (Some(ids), Outcome::Ok, Some(p.profile_id))
        }
    };
    (op(OpKind::Read { id: id.clone(), found }, call_us, outcome), profile_id)
}
