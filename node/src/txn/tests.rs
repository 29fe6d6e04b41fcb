//! Cross-shard transaction tests over in-memory shards (the participant
//! steps alone are tested in `idgraph-core`): concurrent coordinators that crash at any step
//! (on a paused tokio clock, so lock timeouts pass instantly), checked
//! against the graph invariants and against the same events applied one by
//! one to a single store.

use super::coordinator::{execute, sweep};
use super::*;
use crate::storage::{GraphRead, GraphStore, MemStore, StoreError};
use idgraph_core::engine::{self, Command, CommandKind, IdentifyEvent, Outcome, RawIdentifier};
use idgraph_core::model::{Counters, EventRecord, HubRecord, Identifier, MergeRecord, Profile, ProfileId, ShardId};
use idgraph_core::rules::RuleSet;
use proptest::prelude::*;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// One participant step on an in-memory shard, its changes applied.
fn step(s: &MemStore, op: TxnOp) -> TxnReply {
    let (cs, reply) = apply_op(s, &op).unwrap();
    s.apply(&cs).unwrap();
    reply
}

// ---- coordinators over in-memory shards -------------------------------

const T0: i64 = 1_700_000_000_000;

/// In-memory shards; each step is applied atomically (one thread). Each
/// shard also has a lagging replica, which `ReadMode::Local` reads: a copy
/// of the shard as it was at some earlier moment, brought up to date at
/// random moments (a follower that applies in jumps).
struct Shards {
    stores: Vec<MemStore>,
    lagging: Vec<std::sync::Mutex<Option<MemStore>>>,
    /// Set: the lagging replicas never catch up (one cut off from its
    /// leader).
    frozen: std::sync::atomic::AtomicBool,
    started: tokio::time::Instant,
}

impl Shards {
    fn new(n: u32) -> Arc<Shards> {
        Arc::new(Shards {
            stores: (0..n).map(|_| MemStore::new()).collect(),
            lagging: (0..n).map(|_| std::sync::Mutex::new(None)).collect(),
            frozen: std::sync::atomic::AtomicBool::new(false),
            started: tokio::time::Instant::now(),
        })
    }
    /// A copy of the shard as it is now.
    fn copy(&self, shard: ShardId) -> MemStore {
        let copy = MemStore::new();
        copy.restore(&self.store(shard).snapshot(&[]).unwrap()).unwrap();
        copy
    }
    /// Reads keys from the shard's lagging replica.
    fn read_lagging(&self, shard: ShardId, keys: &[GraphKey]) -> Vec<KeyRead> {
        let mut lagging = self.lagging[shard.0 as usize].lock().unwrap();
        if lagging.is_none() || (!self.frozen.load(Ordering::SeqCst) && fastrand::bool()) {
            *lagging = Some(self.copy(shard));
        }
        let copy = lagging.as_ref().unwrap();
        keys.iter().map(|k| read_key(copy, k).unwrap()).collect()
    }
    fn store(&self, shard: ShardId) -> &MemStore {
        &self.stores[shard.0 as usize]
    }
    fn now(&self) -> i64 {
        T0 + self.started.elapsed().as_millis() as i64
    }
    fn apply(&self, shard: ShardId, op: &TxnOp) -> TxnReply {
        step(self.store(shard), op.clone())
    }
}

/// A coordinator's view of the shards: after `steps_left` steps it crashes,
/// that is, it never hears back again (its last step was applied or not, as
/// `last_step_lands` says).
#[derive(Clone)]
struct Coordinator {
    shards: Arc<Shards>,
    steps_left: Arc<AtomicI64>,
    last_step_lands: bool,
}

impl ShardAccess for Coordinator {
    fn shard_count(&self) -> u32 {
        self.shards.stores.len() as u32
    }
    fn now_ms(&self) -> i64 {
        self.shards.now()
    }
    async fn read(&self, shard: ShardId, keys: Vec<GraphKey>, mode: ReadMode) -> Result<Vec<KeyRead>, TxnError> {
        tokio::task::yield_now().await;
        if mode == ReadMode::Local {
            return Ok(self.shards.read_lagging(shard, &keys));
        }
        let s = self.shards.store(shard);
        Ok(keys.iter().map(|k| read_key(s, k).unwrap()).collect())
    }
    async fn step(&self, shard: ShardId, op: TxnOp) -> Result<TxnReply, TxnError> {
        tokio::task::yield_now().await;
        if self.steps_left.fetch_sub(1, Ordering::SeqCst) <= 0 {
            if self.last_step_lands {
                self.shards.apply(shard, &op);
            }
            std::future::pending::<()>().await;
        }
        Ok(self.shards.apply(shard, &op))
    }
}

/// Reads the in-memory shards as one graph.
struct Union<'a>(&'a Shards);

impl Union<'_> {
    fn get(&self, key: GraphKey) -> GraphValue {
        key.read(self.0.store(key.shard(self.0.stores.len() as u32))).unwrap()
    }
}

impl GraphRead for Union<'_> {
    fn owner(&self, id: &Identifier) -> Result<Option<ProfileId>, StoreError> {
        Ok(if let GraphValue::Owner(o) = self.get(GraphKey::Owner(id.clone())) { o } else { None })
    }
    fn profile(&self, id: &str) -> Result<Option<Profile>, StoreError> {
        Ok(if let GraphValue::Profile(p) = self.get(GraphKey::Profile(id.into())) { p } else { None })
    }
    fn alias(&self, id: &str) -> Result<Option<ProfileId>, StoreError> {
        Ok(if let GraphValue::Alias(a) = self.get(GraphKey::Alias(id.into())) { a } else { None })
    }
    fn event(&self, event_id: &str) -> Result<Option<EventRecord>, StoreError> {
        Ok(if let GraphValue::Event(e) = self.get(GraphKey::Event(event_id.into())) { e } else { None })
    }
    fn event_at(&self, event_id: &str, slot: u32) -> Result<Option<EventRecord>, StoreError> {
        Ok(if let GraphValue::Event(e) = self.get(GraphKey::EventAt(event_id.into(), slot)) { e } else { None })
    }
    fn shard_count(&self) -> u32 {
        self.0.stores.len() as u32
    }
    fn merge_record(&self, id: &str) -> Result<Option<MergeRecord>, StoreError> {
        Ok(if let GraphValue::Merge(m) = self.get(GraphKey::Merge(id.into())) { m } else { None })
    }
    fn hub(&self, id: &Identifier) -> Result<Option<HubRecord>, StoreError> {
        Ok(if let GraphValue::Hub(h) = self.get(GraphKey::Hub(id.clone())) { h } else { None })
    }
    fn listed_hubs(&self, _: usize) -> Result<Vec<(Identifier, HubRecord)>, StoreError> {
        unimplemented!()
    }
    fn counters(&self) -> Result<Counters, StoreError> {
        let mut c = Counters::default();
        for s in &self.0.stores {
            c.add(&s.counters()?);
        }
        Ok(c)
    }
    fn all_profiles(&self) -> Result<Vec<Profile>, StoreError> {
        let mut all = Vec::new();
        for s in &self.0.stores {
            all.extend(s.all_profiles()?);
        }
        Ok(all)
    }
    fn all_merges(&self) -> Result<Vec<MergeRecord>, StoreError> {
        let mut all = Vec::new();
        for s in &self.0.stores {
            all.extend(s.all_merges()?);
        }
        Ok(all)
    }
    fn meta(&self, _: &str) -> Result<Option<Vec<u8>>, StoreError> {
        unimplemented!()
    }
    fn meta_prefix(&self, _: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        unimplemented!()
    }
}

/// The graph invariants across shards, and no transaction left behind.
fn check_graph(shards: &Shards, rules: &RuleSet) {
    let n = shards.stores.len() as u32;
    for (i, s) in shards.stores.iter().enumerate() {
        assert!(s.meta_prefix("txn.lock/").unwrap().is_empty(), "shard {i} keeps locks");
        assert!(s.meta_prefix("txn.prepared/").unwrap().is_empty(), "shard {i} keeps prepared parts");
        for p in s.all_profiles().unwrap() {
            assert_eq!(GraphKey::Profile(p.id.clone()).shard(n).0 as usize, i, "profile {} on the wrong shard", p.id);
        }
        for (id, _) in s.owners() {
            assert_eq!(GraphKey::Owner(id.clone()).shard(n).0 as usize, i, "owner entry on the wrong shard");
        }
    }
    let owners: usize = shards.stores.iter().map(|s| s.owners().len()).sum();
    let found = idgraph_core::checks::graph(&Union(shards), owners, rules, idgraph_core::checks::TypeLimits::Held).unwrap();
    assert!(found.is_empty(), "invariants broken: {found:#?}");
}

fn identify(n: usize, ids: &[(String, String)], ts: i64) -> Command {
    Command {
        at_ms: T0,
        op_id: format!("op-{n}"),
        kind: CommandKind::Identify(IdentifyEvent {
            event_id: format!("ev-{n}"),
            timestamp_ms: ts,
            identifiers: ids.iter().map(|(k, v)| RawIdentifier::new(k.clone(), v.clone())).collect(),
            traits: [("n".to_string(), serde_json::json!(n))].into_iter().collect(),
            source: "test".into(),
        }),
    }
}

/// Runs every command concurrently, each first by a coordinator that
/// crashes after `crash_after[i]` steps (never, if `None`), then, like a
/// client that got no answer, again by a healthy one; sweeps stale locks at
/// the end. Returns how many runs answered "duplicate".
fn run_concurrently(shards: &Arc<Shards>, rules: &Arc<RuleSet>, cmds: Vec<(Command, Option<(i64, bool)>)>) -> usize {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (cmd, crash) in cmds {
            let (shards, rules) = (shards.clone(), rules.clone());
            tasks.push(tokio::spawn(async move {
                let (steps, lands) = crash.unwrap_or((i64::MAX, false));
                let first = Coordinator { shards: shards.clone(), steps_left: Arc::new(AtomicI64::new(steps)), last_step_lands: lands };
                let answer = match tokio::time::timeout(std::time::Duration::from_secs(60), execute(&first, &rules, &cmd)).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        let retry = Coordinator { shards, steps_left: Arc::new(AtomicI64::new(i64::MAX)), last_step_lands: false };
                        execute(&retry, &rules, &cmd).await
                    }
                };
                match answer.expect("a command with a healthy coordinator succeeds") {
                    Outcome::Identify(o) => o.duplicate,
                    _ => false,
                }
            }));
        }
        let mut duplicates = 0;
        for t in tasks {
            duplicates += usize::from(t.await.unwrap());
        }
        // Locks nobody met again are settled by the shards' sweeps.
        tokio::time::sleep(std::time::Duration::from_millis(LOCK_TIMEOUT_MS as u64 + 1)).await;
        let sweeper = Coordinator { shards: shards.clone(), steps_left: Arc::new(AtomicI64::new(i64::MAX)), last_step_lands: false };
        for (i, s) in shards.stores.iter().enumerate() {
            let stale = prepared_before(s, shards.now() - LOCK_TIMEOUT_MS).unwrap();
            sweep(&sweeper, ShardId(i as u32), stale).await.unwrap();
        }
        duplicates
    })
}

const KINDS: [&str; 3] = ["user_id", "email", "anonymous_id"];

fn ids_of(spec: &[(u8, u8)]) -> Vec<(String, String)> {
    spec.iter()
        .map(|(k, v)| {
            let kind = KINDS[*k as usize % 3];
            (kind.to_string(), if kind == "email" { format!("p{v}@shop.com") } else { format!("v{v}") })
        })
        .collect()
}

/// One profile as compared: its identifiers and its traits (name, value).
type Part = (Vec<Identifier>, Vec<(String, String)>);

/// The partition of identifiers, each part with its traits.
fn partition(profiles: Vec<Profile>) -> BTreeSet<Part> {
    profiles.into_iter().map(|p| (p.identifiers, p.traits.into_iter().map(|(k, v)| (k, v.value.to_string())).collect())).collect()
}

type EventSpec = (Vec<(u8, u8)>, i64, Option<(i64, bool)>);

fn events() -> impl Strategy<Value = Vec<EventSpec>> {
    let crash = prop::option::weighted(0.4, (0i64..12, any::<bool>()));
    prop::collection::vec((prop::collection::vec((0u8..3, 0u8..10), 1..4), 1i64..50, crash), 1..20)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Without limits the graph does not depend on order, so concurrent
    /// coordinators that crash anywhere (and clients that retry) must end
    /// with exactly the graph of applying each event once, in any order.
    #[test]
    fn crashing_coordinators_end_with_the_graph_of_applying_each_event_once(evs in events(), shard_count in 1u32..5) {
        let rules = Arc::new(RuleSet::without_limits());
        let shards = Shards::new(shard_count);
        let cmds: Vec<(Command, Option<(i64, bool)>)> =
            evs.iter().enumerate().map(|(n, (ids, ts, crash))| (identify(n, &ids_of(ids), *ts), *crash)).collect();
        run_concurrently(&shards, &rules, cmds.clone());
        check_graph(&shards, &rules);

        let single = MemStore::new();
        for (cmd, _) in &cmds {
            let (cs, _) = engine::execute(&single, &rules, cmd).unwrap();
            single.apply(&cs).unwrap();
        }
        prop_assert_eq!(partition(Union(&shards).all_profiles().unwrap()), partition(single.all_profiles().unwrap()));
        prop_assert_eq!(Union(&shards).counters().unwrap().events, cmds.len() as i64, "each event applied exactly once");
    }

    /// Events that race to attach different user ids (limit 1) to the same
    /// profile across shards never leave a profile with two.
    #[test]
    fn racing_events_never_break_a_limit(users in 2usize..8, crashes in prop::collection::vec(prop::option::of((0i64..10, any::<bool>())), 8), shard_count in 2u32..6) {
        let rules = Arc::new(RuleSet::builtin());
        let shards = Shards::new(shard_count);
        let cmds: Vec<(Command, Option<(i64, bool)>)> = (0..users)
            .map(|u| {
                let ids = vec![("email".to_string(), "shared@shop.com".to_string()), ("user_id".to_string(), format!("u{u}")), ("device_id".to_string(), format!("d{u}"))];
                (identify(u, &ids, 10 + u as i64), crashes[u])
            })
            .collect();
        run_concurrently(&shards, &rules, cmds);
        check_graph(&shards, &rules);
        let holder = Union(&shards).owner(&Identifier::new("email", "shared@shop.com")).unwrap().expect("the shared e-mail has a profile");
        let p = Union(&shards).profile(&holder).unwrap().unwrap();
        prop_assert_eq!(p.identifiers.iter().filter(|i| i.kind == "user_id").count(), 1);
    }
}

#[test]
fn a_redelivered_event_is_a_duplicate_across_shards() {
    let rules = Arc::new(RuleSet::builtin());
    let shards = Shards::new(4);
    let ids = ids_of(&[(0, 1), (1, 2), (2, 3)]);
    let first = identify(1, &ids, 5);
    let mut again = identify(1, &ids, 5);
    again.op_id = "op-retry".into();
    let dups = run_concurrently(&shards, &rules, vec![(first, None)]);
    assert_eq!(dups, 0);
    let dups = run_concurrently(&shards, &rules, vec![(again, None)]);
    assert_eq!(dups, 1, "the redelivery is answered as a duplicate");
    check_graph(&shards, &rules);
    assert_eq!(Union(&shards).counters().unwrap().events, 1);
}

/// Runs one command to its end with a healthy coordinator and returns how
/// many steps (log entries' worth of commands) it sent to shards, settling
/// included.
fn steps_of(shards: &Arc<Shards>, rules: &RuleSet, cmd: &Command) -> i64 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let left = Arc::new(AtomicI64::new(i64::MAX));
    rt.block_on(async {
        let c = Coordinator { shards: shards.clone(), steps_left: left.clone(), last_step_lands: false };
        execute(&c, rules, cmd).await.unwrap();
        // The settling of a committed transaction runs in the background.
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    });
    i64::MAX - left.load(Ordering::SeqCst)
}

#[test]
fn a_new_person_with_one_identifier_is_one_step_on_one_shard() {
    let rules = RuleSet::builtin();
    for shard_count in [2u32, 3, 8, 16] {
        let shards = Shards::new(shard_count);
        for n in 0..20 {
            let cmd = identify(n, &[("email".to_string(), format!("person{n}@shop.com"))], 5);
            assert_eq!(steps_of(&shards, &rules, &cmd), 1, "{shard_count} shards, event {n}: one Single step");
            let id = Identifier::new("email", format!("person{n}@shop.com"));
            let home = GraphKey::Owner(id.clone()).shard(shard_count);
            let profile = Union(&shards).owner(&id).unwrap().expect("the identifier has a profile");
            assert_eq!(GraphKey::Profile(profile.clone()).shard(shard_count), home, "the new profile is beside its identifier");
            let rec = shards.store(home).event(&format!("ev-{n}")).unwrap().expect("the event record is beside its identifier");
            assert_eq!(rec.profile_id, profile);
            assert_eq!(rec.slot, Some(GraphKey::Owner(id).slot()));
        }
        check_graph(&shards, &rules);
        // A re-delivery finds the record where the first delivery put it.
        let mut again = identify(3, &[("email".to_string(), "person3@shop.com".to_string())], 5);
        again.op_id = "op-retry".into();
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        let c = Coordinator { shards: shards.clone(), steps_left: Arc::new(AtomicI64::new(i64::MAX)), last_step_lands: false };
        match rt.block_on(execute(&c, &rules, &again)).unwrap() {
            Outcome::Identify(o) => assert!(o.duplicate, "{shard_count} shards: the re-delivery is a duplicate"),
            other => panic!("unexpected outcome {other:?}"),
        }
    }
}

#[test]
fn a_new_person_with_two_identifiers_touches_only_their_shards() {
    let rules = RuleSet::builtin();
    let shard_count = 16;
    let shards = Shards::new(shard_count);
    let (mut one, mut two) = (0, 0);
    for n in 0..40 {
        let ids = [("email".to_string(), format!("person{n}@shop.com")), ("user_id".to_string(), format!("u{n}"))];
        let homes: BTreeSet<ShardId> =
            ids.iter().map(|(k, v)| GraphKey::Owner(Identifier::new(k.clone(), v.clone())).shard(shard_count)).collect();
        let steps = steps_of(&shards, &rules, &identify(n, &ids, 5));
        if homes.len() == 1 {
            assert_eq!(steps, 1, "event {n}: both identifiers on one shard make one Single step");
            one += 1;
        } else {
            // Prepare on one shard, commit on the other, apply, forget.
            assert_eq!(steps, 4, "event {n}: two shards, four steps");
            two += 1;
        }
    }
    assert!(one > 0 && two > 0, "the sample covers both cases ({one}, {two})");
    check_graph(&shards, &rules);
}

#[test]
fn a_lock_seen_on_a_lagging_replica_is_read_again_on_the_leader() {
    let rules = RuleSet::builtin();
    let shards = Shards::new(2);
    let id = Identifier::new("email", "lagging@shop.com");
    let cmd = identify(1, &[("email".to_string(), "lagging@shop.com".to_string())], 5);
    steps_of(&shards, &rules, &cmd);
    let profile = Union(&shards).owner(&id).unwrap().expect("the identifier has a profile");
    // The lagging replica stopped while a transaction held the record
    // locked; on the leader that transaction was aborted since.
    let key = GraphKey::Owner(id.clone());
    let shard = key.shard(2);
    let digest = read_key(shards.store(shard), &key).unwrap().value.digest();
    let prepare =
        TxnOp::Prepare { txn: "t-old".into(), primary: shard, at_ms: shards.now(), reads: vec![(key, digest)], writes: Default::default() };
    assert_eq!(shards.apply(shard, &prepare), TxnReply::Prepared);
    shards.frozen.store(true, Ordering::SeqCst);
    *shards.lagging[shard.0 as usize].lock().unwrap() = Some(shards.copy(shard));
    shards.apply(shard, &TxnOp::Abort { txn: "t-old".into() });

    let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
    let c = Coordinator { shards: shards.clone(), steps_left: Arc::new(AtomicI64::new(i64::MAX)), last_step_lands: false };
    let (_, found) = rt
        .block_on(coordinator::gather(&c, ReadMode::Local, |view| view.owner(&id)))
        .expect("the locked record is read again on the leader instead of waiting for a lock long released");
    assert_eq!(found.unwrap(), Some(profile));
}
