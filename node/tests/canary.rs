//! Canary rollouts of rule-set versions on a real three-node cluster with
//! four shards (real processes, real sockets, real Raft and disks): a good
//! candidate widens to every shard, a bad one is stopped at its first step
//! and its merges undone, unlike traffic is inconclusive, and the rollout
//! survives the death of the node coordinating it.
//!
//! The tests run one at a time (each starts three node processes on a
//! machine that may have two cores).

mod common;

use common::*;
use idgraph_core::canary::{Phase, Rollout, Verdict};
use idgraph_core::engine::{self, Command, CommandKind, IdentifyEvent, ProfileRef, RawIdentifier};
use idgraph_core::graph::{GraphStore, MemStore};
use idgraph_core::rules::{RuleSet, RuleSetSpec};
use idgraph_proto::v1 as pb;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SHARDS: u32 = 4;

/// One cluster at a time on this machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<NodeProcess>>,
}

impl Cluster {
    async fn start() -> Cluster {
        let ports = free_ports(3);
        let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let members = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let listen = format!("127.0.0.1:{}", ports[i]);
            let id = (i + 1).to_string();
            let shards = SHARDS.to_string();
            nodes.push(Some(
                start_process(dir.path(), &["--listen", &listen, "--id", &id, "--initial-cluster", &members, "--shards", &shards]).await,
            ));
        }
        let c = Cluster { _dirs: dirs, nodes };
        // The cluster's first rule set is seeded once the map is up.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(l) = c.admin().await.list_rule_sets(pb::ListRuleSetsRequest {}).await {
                if l.into_inner().rule_sets.iter().any(|r| r.active) {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "the cluster did not store its first rule set within 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        c
    }

    fn running(&self) -> impl Iterator<Item = (usize, &NodeProcess)> {
        self.nodes.iter().enumerate().filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    async fn admin(&self) -> pb::admin_client::AdminClient<tonic::transport::Channel> {
        self.running().next().expect("a running node").1.admin().await
    }

    /// The node leading the metadata group (where the coordinator runs).
    async fn meta_leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, n) in self.running() {
                if let Ok(s) = n.admin().await.get_cluster(pb::GetClusterRequest {}).await {
                    if s.into_inner().metadata.is_some_and(|m| m.state == "Leader") {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no metadata leader within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The built-in rules changed by `f`, as TOML.
fn rules_with(version: &str, f: impl FnOnce(&mut RuleSetSpec)) -> String {
    let mut spec = RuleSet::builtin().spec().clone();
    spec.version = version.into();
    f(&mut spec);
    RuleSet::from_spec(spec).unwrap().source().to_string()
}

fn plan(candidate: &str, steps: &str) -> String {
    format!(
        r#"
objective = "prove {candidate} on a few shards before it runs everywhere"
candidate = "{candidate}"
interval_secs = 1
steps = [{steps}]
kpis = [
  {{ name = "merge_rate", direction = "lower_is_better", threshold = 1.0, floor = 0.1, critical = true }},
  {{ name = "largest_profile", direction = "lower_is_better", threshold = 1.0, floor = 3, critical = true }},
  {{ name = "new_profile_rate", direction = "either", threshold = 0.5, floor = 0.2 }},
  {{ name = "identifiers_per_profile", direction = "lower_is_better", threshold = 1.0, floor = 2 }},
  {{ name = "conflict_rate", direction = "lower_is_better", threshold = 1.0, floor = 0.1 }},
  {{ name = "error_rate", direction = "lower_is_better", threshold = 1.0, floor = 0.05 }},
  {{ name = "identify_p99_ms", direction = "lower_is_better", threshold = 4.0, floor = 2000 }},
]
[mix]
max_rate_ratio = 3.0
"#
    )
}

async fn put_rules(c: &Cluster, toml: String) {
    c.admin().await.put_rule_set(pb::PutRuleSetRequest { toml }).await.expect("the rule set is stored");
}

async fn start_canary(c: &Cluster, plan_toml: String) -> String {
    c.admin().await.start_canary(pb::StartCanaryRequest { plan_toml }).await.expect("the rollout starts").into_inner().id
}

async fn rollout(c: &Cluster, id: &str) -> Option<Rollout> {
    let r = c.admin().await.get_canary(pb::GetCanaryRequest { id: id.into() }).await.ok()?.into_inner();
    Some(serde_json::from_str(&r.record_json).expect("a rollout record"))
}

async fn wait_for(c: &Cluster, id: &str, what: &str, timeout: Duration, done: impl Fn(&Rollout) -> bool) -> Rollout {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        if let Some(r) = rollout(c, id).await {
            if done(&r) {
                return r;
            }
            last = Some(r);
        }
        if Instant::now() > deadline {
            let history = last.as_ref().map(|r| r.history.iter().map(|d| d.text.clone()).collect::<Vec<_>>());
            let judged = last.as_ref().and_then(|r| r.judgements.last());
            panic!("rollout {id}: {what} did not happen within {timeout:?}; history: {history:#?}; last judgement: {judged:#?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Events sent one at a time, in order, until stopped; each is retried
/// (same event id) until acknowledged, on any running node.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<Mutex<Vec<pb::IdentifyRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(endpoints: Vec<String>, mut next: impl FnMut(usize) -> pb::IdentifyRequest + Send + 'static) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (s, log) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let mut clients = Vec::new();
            for e in &endpoints {
                clients.push(pb::identity_graph_client::IdentityGraphClient::connect(e.clone()).await.ok());
            }
            let mut k = 0;
            while !s.load(Ordering::Relaxed) {
                let ev = next(k);
                k += 1;
                let mut attempt = 0;
                loop {
                    let i = attempt % clients.len();
                    attempt += 1;
                    let Some(client) = clients[i].as_mut() else { continue };
                    match client.identify(ev.clone()).await {
                        Ok(_) => break,
                        Err(_) if attempt < 200 => tokio::time::sleep(Duration::from_millis(50)).await,
                        Err(e) => panic!("event {} was never acknowledged: {e}", ev.event_id),
                    }
                }
                log.lock().unwrap().push(ev);
            }
        });
        Traffic { stop, sent, task }
    }

    async fn stop(self) -> Vec<pb::IdentifyRequest> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the traffic task ends");
        Arc::try_unwrap(self.sent).map(|m| m.into_inner().unwrap()).unwrap_or_else(|a| a.lock().unwrap().clone())
    }
}

fn endpoints(c: &Cluster) -> Vec<String> {
    c.running().map(|(_, n)| n.endpoint().to_string()).collect()
}

/// A person seen anonymously, then by e-mail, then both together (a merge).
fn shopper(k: usize) -> pb::IdentifyRequest {
    let p = k / 3;
    let (anon, email) = (format!("anon-{p}"), format!("shopper{p}@shop.example"));
    match k % 3 {
        0 => event(&format!("s{k}"), &[("anonymous_id", &anon)]),
        1 => event(&format!("s{k}"), &[("email", &email)]),
        _ => event(&format!("s{k}"), &[("anonymous_id", &anon), ("email", &email)]),
    }
}

fn finished(r: &Rollout) -> bool {
    r.phase.is_finished()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_candidate_widens_through_every_step_to_all_shards() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    put_rules(&c, rules_with("v2-more-blocked", |s| s.blocked.values.push("placeholder-shopper".into()))).await;
    let traffic = Traffic::start(endpoints(&c), shopper);
    let id = start_canary(
        &c,
        plan(
            "v2-more-blocked",
            "{ shards = 1, bake_secs = 6, min_events = 10 }, { percent = 50, bake_secs = 6 }, { percent = 100, bake_secs = 6 }",
        ),
    )
    .await;
    let r = wait_for(&c, &id, "promotion", Duration::from_secs(150), finished).await;
    let sent = traffic.stop().await;
    assert_eq!(r.phase, Phase::Promoted, "history: {:#?}\njudgements: {:#?}", r.history, r.judgements);
    let passes: Vec<usize> = r.judgements.iter().filter(|j| j.verdict == Verdict::Pass).map(|j| j.step).collect();
    assert_eq!(passes, vec![0, 1, 2], "every step passed once");
    assert!(r.judgements.iter().all(|j| j.canary_events > 0 && j.control_events > 0));
    // KPIs are counted per shard too: at step 1 the candidate resolved the
    // events anchored on shard 0, and only those.
    let (mut canary_shards, mut control_shards) = (std::collections::BTreeSet::new(), std::collections::BTreeSet::new());
    for s in r.samples.iter().filter(|s| s.step == 0) {
        canary_shards.extend(s.canary.by_shard.keys().copied());
        control_shards.extend(s.control.by_shard.keys().copied());
    }
    assert_eq!(canary_shards.into_iter().collect::<Vec<_>>(), vec![0]);
    // (A node a moment behind the map may still resolve a shard-0 event
    // under control right after the start: control may list shard 0 too.)
    assert!(control_shards.iter().any(|s| *s > 0), "{control_shards:?}");
    // The whole cluster now runs the candidate.
    let listing = c.admin().await.list_rule_sets(pb::ListRuleSetsRequest {}).await.unwrap().into_inner();
    assert_eq!(listing.active_version, "v2-more-blocked");
    assert!(listing.rule_sets.iter().all(|r| r.canary_shards.is_empty()));
    let stats = c.admin().await.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.rule_version, "v2-more-blocked");
    assert!(sent.len() > 30, "traffic ran: {} events", sent.len());
    // Events after the promotion are resolved under the new version.
    let out = c.running().next().unwrap().1.client().await.identify(event("after", &[("email", "after@shop.example")])).await.unwrap();
    assert_eq!(out.into_inner().rule_version, "v2-more-blocked");
}

/// Persons already in the graph, then events that pair each with the
/// placeholder user id "guest" (blocked by the cluster's rules), among new
/// persons.
fn known_person(p: usize) -> pb::IdentifyRequest {
    event(&format!("k{p}"), &[("email", &format!("person{p}@shop.example")), ("anonymous_id", &format!("a-{p}"))])
}

const KNOWN: usize = 120;

fn guest_or_new(k: usize) -> pb::IdentifyRequest {
    if k.is_multiple_of(2) {
        let p = (k / 2 * 7) % KNOWN;
        event(&format!("g{k}"), &[("email", &format!("person{p}@shop.example")), ("user_id", "guest")])
    } else {
        event(&format!("n{k}"), &[("email", &format!("new{k}@shop.example")), ("anonymous_id", &format!("na-{k}"))])
    }
}

/// The bad version: no blocklist and no user-id limit, so the placeholder
/// "guest" joins strangers.
fn no_blocklist() -> String {
    rules_with("v2-no-blocklist", |s| {
        s.blocked.values.clear();
        s.blocked.patterns.clear();
        for t in s.types.values_mut() {
            t.blocked.clear();
            t.blocked_patterns.clear();
        }
        s.types.get_mut("user_id").unwrap().limit = None;
    })
}

fn to_event(r: &pb::IdentifyRequest) -> IdentifyEvent {
    IdentifyEvent {
        event_id: r.event_id.clone(),
        timestamp_ms: 0,
        identifiers: r.identifiers.iter().map(|i| RawIdentifier { kind: i.r#type.clone(), value: i.value.clone() }).collect(),
        traits: Default::default(),
        source: r.source.clone(),
    }
}

/// Pairwise precision and recall of the cluster's grouping of `ids`
/// against a reference grouping (both: identifier -> profile id).
fn pairwise(ids: &[RawIdentifier], cluster: &HashMap<String, String>, reference: &HashMap<String, String>) -> (f64, f64) {
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    let (mut both, mut by_cluster, mut by_ref) = (HashMap::new(), HashMap::new(), HashMap::new());
    for id in ids {
        let key = format!("{}={}", id.kind, id.value);
        let (c, r) = (&cluster[&key], &reference[&key]);
        *both.entry((c.clone(), r.clone())).or_insert(0u64) += 1;
        *by_cluster.entry(c.clone()).or_insert(0u64) += 1;
        *by_ref.entry(r.clone()).or_insert(0u64) += 1;
    }
    let tp: u64 = both.values().map(|n| pairs(*n)).sum();
    let (cp, rp): (u64, u64) = (by_cluster.values().map(|n| pairs(*n)).sum(), by_ref.values().map(|n| pairs(*n)).sum());
    (if cp == 0 { 1.0 } else { tp as f64 / cp as f64 }, if rp == 0 { 1.0 } else { tp as f64 / rp as f64 })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_candidate_is_stopped_at_its_first_step_and_its_merges_are_undone() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    put_rules(&c, no_blocklist()).await;
    let mut all: Vec<pb::IdentifyRequest> = Vec::new();
    let mut g = c.running().next().unwrap().1.client().await;
    for p in 0..KNOWN {
        let ev = known_person(p);
        g.identify(ev.clone()).await.expect("a known person is stored");
        all.push(ev);
    }
    let id =
        start_canary(&c, plan("v2-no-blocklist", "{ shards = 1, bake_secs = 6, min_events = 10 }, { percent = 100, bake_secs = 6 }")).await;
    let traffic = Traffic::start(endpoints(&c), guest_or_new);
    let r = wait_for(&c, &id, "the rollback", Duration::from_secs(150), finished).await;
    all.extend(traffic.stop().await);
    assert_eq!(r.phase, Phase::RolledBack, "history: {:#?}", r.history);
    let failed = r.judgements.iter().find(|j| j.verdict == Verdict::Fail).expect("a failed judgement");
    assert_eq!(failed.step, 0, "stopped at its first step");
    assert!(r.merges_undone > 0, "merges made under the candidate were undone: {:#?}", r.history);
    assert_eq!(r.merges_skipped, 0);
    let listing = c.admin().await.list_rule_sets(pb::ListRuleSetsRequest {}).await.unwrap().into_inner();
    assert_ne!(listing.active_version, "v2-no-blocklist");
    assert!(listing.rule_sets.iter().all(|r| r.canary_shards.is_empty()));

    // The same events through the engine under the cluster's rules alone:
    // the run that never had the canary.
    let rules = RuleSet::builtin();
    let store = MemStore::default();
    for (i, ev) in all.iter().enumerate() {
        let cmd = Command { at_ms: i as i64 + 1, op_id: format!("op{i}"), kind: CommandKind::Identify(to_event(ev)) };
        let (cs, _) = engine::execute(&store, &rules, &cmd).expect("the reference run resolves every event");
        store.apply(&cs).unwrap();
    }
    // Every identifier the cluster's rules accept, in the cluster and in the reference.
    let mut ids: Vec<RawIdentifier> = Vec::new();
    for ev in &all {
        for i in &ev.identifiers {
            let raw = RawIdentifier { kind: i.r#type.clone(), value: i.value.clone() };
            if engine::find_profile(&store, &rules, &ProfileRef::Identifier(raw.clone()), "id").is_ok() && !ids.contains(&raw) {
                ids.push(raw);
            }
        }
    }
    let mut g = c.running().next().unwrap().1.client().await;
    let (mut in_cluster, mut in_reference) = (HashMap::new(), HashMap::new());
    for raw in &ids {
        let key = format!("{}={}", raw.kind, raw.value);
        let p = g.get_profile(by_id(&raw.kind, &raw.value)).await.expect("every identifier has a profile").into_inner();
        in_cluster.insert(key.clone(), p.profile_id);
        let f = engine::find_profile(&store, &rules, &ProfileRef::Identifier(raw.clone()), "id").unwrap();
        in_reference.insert(key, f.profile.id);
    }
    let (precision, recall) = pairwise(&ids, &in_cluster, &in_reference);
    println!(
        "after the rollback: {} identifiers, pairwise precision {precision:.4}, recall {recall:.4}, {} merges undone",
        ids.len(),
        r.merges_undone
    );
    assert!(precision >= 0.99 && recall >= 0.99, "precision {precision}, recall {recall}");
    let by_profile: BTreeMap<&String, usize> = in_cluster.values().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(p).or_default() += 1;
        m
    });
    assert!(by_profile.values().all(|n| *n <= 3), "no profile keeps strangers together: {by_profile:?}");
}

/// Events anchored on shard 0 (the first canary shard) carry a device id,
/// the others an anonymous id: the canary sees other traffic than control.
fn lopsided(k: usize) -> pb::IdentifyRequest {
    let email = format!("lop{k}@shop.example");
    let raw = [RawIdentifier { kind: "email".into(), value: email.clone() }];
    let on_canary = idgraph_core::canary::anchor_shard(&RuleSet::builtin(), &raw, SHARDS) == Some(idgraph_core::model::ShardId(0));
    let other = if on_canary { ("device_id", format!("dev-{k}")) } else { ("anonymous_id", format!("anon-{k}")) };
    event(&format!("l{k}"), &[("email", &email), (other.0, &other.1)])
}

fn code_and_message(r: Result<tonic::Response<impl std::fmt::Debug>, tonic::Status>) -> (tonic::Code, String) {
    let s = r.expect_err("the call is refused");
    (s.code(), s.message().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlike_canary_traffic_is_inconclusive_and_bad_requests_change_nothing() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    let mut a = c.admin().await;
    // Bad input: precise errors, nothing stored or started.
    let (code, msg) = code_and_message(
        a.put_rule_set(pb::PutRuleSetRequest { toml: rules_with("v9", |_| {}).replace("priority = 1", "priority = 0") }).await,
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("toml.types.user_id.priority"), "{msg}");
    let (code, msg) = code_and_message(
        a.start_canary(pb::StartCanaryRequest { plan_toml: plan("v9", "{ shards = 1, bake_secs = 5 }, { percent = 100, bake_secs = 5 }") })
            .await,
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("plan.candidate") && msg.contains("v9"), "{msg}");
    let (code, msg) = code_and_message(
        a.start_canary(pb::StartCanaryRequest { plan_toml: plan("v9", "{ shards = 1, bake_secs = 5 }, { percent = 90, bake_secs = 5 }") })
            .await,
    );
    assert_eq!(code, tonic::Code::InvalidArgument);
    assert!(msg.starts_with("plan_toml.steps[1].percent"), "{msg}");
    assert_eq!(code_and_message(a.abort_canary(pb::AbortCanaryRequest::default()).await).0, tonic::Code::FailedPrecondition);
    assert_eq!(code_and_message(a.promote_canary(pb::PromoteCanaryRequest::default()).await).0, tonic::Code::FailedPrecondition);
    assert_eq!(code_and_message(a.get_canary(pb::GetCanaryRequest::default()).await).0, tonic::Code::NotFound);
    assert_eq!(a.list_rule_sets(pb::ListRuleSetsRequest {}).await.unwrap().into_inner().rule_sets.len(), 1, "nothing was stored");
    assert!(a.list_canaries(pb::ListCanariesRequest {}).await.unwrap().into_inner().rollouts.is_empty(), "nothing was started");

    let v2 = rules_with("v2", |s| s.blocked.values.push("placeholder-lop".into()));
    put_rules(&c, v2.clone()).await;
    // The same text again is fine; other rules under a stored version are not.
    put_rules(&c, v2).await;
    let (code, msg) = code_and_message(a.put_rule_set(pb::PutRuleSetRequest { toml: rules_with("v2", |_| {}) }).await);
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(msg.contains("never changes"), "{msg}");

    let traffic = Traffic::start(endpoints(&c), lopsided);
    let id = start_canary(&c, plan("v2", "{ shards = 1, bake_secs = 6, min_events = 10 }, { percent = 100, bake_secs = 6 }")).await;
    let (code, msg) = code_and_message(
        a.start_canary(pb::StartCanaryRequest { plan_toml: plan("v2", "{ shards = 2, bake_secs = 5 }, { percent = 100, bake_secs = 5 }") })
            .await,
    );
    assert_eq!(code, tonic::Code::FailedPrecondition);
    assert!(msg.contains(&id), "{msg}");
    let r = wait_for(&c, &id, "a judgement", Duration::from_secs(90), |r| !r.judgements.is_empty()).await;
    let j = &r.judgements[0];
    assert_eq!(j.verdict, Verdict::Inconclusive, "{j:#?}");
    assert!(j.reason.contains("identifier types differ"), "{}", j.reason);
    assert_eq!((r.step, r.phase.clone()), (0, Phase::Baking), "an inconclusive step neither widens nor stops");
    // Shard 0 runs the candidate, the others the control version.
    let v = a.list_rule_sets(pb::ListRuleSetsRequest {}).await.unwrap().into_inner();
    assert_eq!(v.rule_sets.iter().find(|r| r.version == "v2").unwrap().canary_shards, vec![0]);
    assert_ne!(v.active_version, "v2", "shards 1 to 3 run the cluster's version");

    a.abort_canary(pb::AbortCanaryRequest { reason: "the sample is not representative".into() }).await.unwrap();
    let r = wait_for(&c, &id, "the rollback", Duration::from_secs(60), finished).await;
    traffic.stop().await;
    assert_eq!(r.phase, Phase::RolledBack);
    assert!(r.history.iter().any(|d| d.text.contains("the sample is not representative")), "{:#?}", r.history);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_coordinators_node_neither_loses_nor_restarts_the_rollout() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start().await;
    put_rules(&c, rules_with("v2-more-blocked", |s| s.blocked.values.push("placeholder-shopper".into()))).await;
    let traffic = Traffic::start(endpoints(&c), shopper);
    let id = start_canary(&c, plan("v2-more-blocked", "{ shards = 1, bake_secs = 10, min_events = 10 }, { percent = 100, bake_secs = 6 }"))
        .await;
    let before = wait_for(&c, &id, "two samples", Duration::from_secs(60), |r| r.samples.len() >= 2).await;
    let coordinator = c.meta_leader().await;
    c.nodes[coordinator].take().expect("the coordinator's node runs").kill().await;
    let r = wait_for(&c, &id, "promotion", Duration::from_secs(150), finished).await;
    traffic.stop().await;
    assert_eq!(r.phase, Phase::Promoted, "history: {:#?}\njudgements: {:#?}", r.history, r.judgements);
    assert_eq!(r.started_ms, before.started_ms, "the same rollout went on");
    assert_eq!(r.history.iter().filter(|d| d.text.starts_with("started")).count(), 1, "it was not restarted: {:#?}", r.history);
    assert_eq!(&r.samples[..before.samples.len()], &before.samples[..], "samples taken before the kill are kept");
    assert_eq!(r.judgements.iter().map(|j| j.step).collect::<Vec<_>>(), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_step_stops_a_bad_candidate_before_it_writes_anything() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start().await;
    put_rules(&c, no_blocklist()).await;
    let mut g = c.running().next().unwrap().1.client().await;
    for p in 0..KNOWN {
        g.identify(known_person(p)).await.expect("a known person is stored");
    }
    let shadowed = plan("v2-no-blocklist", "{ shards = 1, bake_secs = 6 }, { percent = 100, bake_secs = 6 }")
        .replace("interval_secs = 1", "interval_secs = 1\nshadow_secs = 6");
    let id = start_canary(&c, shadowed).await;
    let in_shadow = rollout(&c, &id).await.unwrap();
    assert_eq!(in_shadow.phase, Phase::Shadow);
    let listing = c.admin().await.list_rule_sets(pb::ListRuleSetsRequest {}).await.unwrap().into_inner();
    assert!(listing.rule_sets.iter().all(|r| r.canary_shards.is_empty()), "the shadow runs on no shard");
    let traffic = Traffic::start(endpoints(&c), guest_or_new);
    let r = wait_for(&c, &id, "the rollback", Duration::from_secs(120), finished).await;
    traffic.stop().await;
    assert_eq!(r.phase, Phase::RolledBack, "history: {:#?}", r.history);
    let first = r.judgements.iter().find(|j| j.verdict != Verdict::Inconclusive).expect("a judgement on data");
    assert!(first.shadow && first.verdict == Verdict::Fail, "{first:#?}");
    assert!(r.judgements.iter().all(|j| j.shadow), "it never left the shadow");
    assert!(first.canary_events > 0 && first.control_events > 0);
    // Each shadow event reads the real graph, where "guest" joins nobody
    // yet; the would-be components show the strangers it would join.
    let largest = first.kpis.iter().find(|k| k.kpi == idgraph_core::canary::Kpi::LargestProfile).unwrap();
    assert_eq!(largest.outcome, idgraph_core::canary::KpiOutcome::Fail, "{largest:?}");
    assert!(largest.canary.unwrap() > 10.0 * largest.control.unwrap(), "{largest:?}");
    assert_eq!((r.merges_undone, r.merges_skipped), (0, 0), "the shadow wrote nothing to undo");
    // Every known person kept exactly their own identifiers.
    for p in 0..KNOWN {
        let got = g.get_profile(by_id("email", &format!("person{p}@shop.example"))).await.unwrap().into_inner();
        assert_eq!(got.identifiers.len(), 2, "person {p}: {:?}", got.identifiers);
        assert_ne!(got.rule_version, "v2-no-blocklist");
    }
}
