//! Where an event's time goes: the pure engine over the in-memory store,
//! the engine plus sled writes, and sled writes plus one fsync per batch of
//! 256 (the shard actor's group commit). Run: `cargo bench -p idgraph-node`.
//! Compare the medians: the ratios say what the storage layer costs over the
//! engine.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use idgraph_core::engine::{execute, Command, CommandKind, IdentifyEvent, RawIdentifier};
use idgraph_core::model::ShardId;
use idgraph_core::rules::RuleSet;
use idgraph_node::storage::{GraphStore, MemStore, SledDb};
use std::collections::BTreeMap;

const EVENTS: usize = 2048;

/// A mix like real traffic: anonymous browsing, logins linking devices, a
/// few traits; about a third of the events merge two profiles.
fn events() -> Vec<Command> {
    (0..EVENTS)
        .map(|i| {
            let p = i / 4;
            let mut ids = vec![RawIdentifier::new("anonymous_id", format!("anon-{p}-{}", i % 2))];
            if i % 4 == 3 {
                ids.push(RawIdentifier::new("user_id", format!("user-{p}")));
                ids.push(RawIdentifier::new("anonymous_id", format!("anon-{p}-0")));
                ids.push(RawIdentifier::new("email", format!("Person{p}@Shop.com")));
            }
            let mut traits = BTreeMap::new();
            traits.insert("plan".to_string(), serde_json::json!(if i % 3 == 0 { "pro" } else { "free" }));
            traits.insert("orders".to_string(), serde_json::json!(i % 7));
            let ev = IdentifyEvent {
                event_id: format!("e{i}"),
                timestamp_ms: 1_700_000_000_000 + i as i64,
                identifiers: ids,
                traits,
                source: "bench".into(),
            };
            Command { at_ms: 1_700_000_000_000 + i as i64, op_id: format!("op{i}"), kind: CommandKind::Identify(ev) }
        })
        .collect()
}

fn run<S: GraphStore>(store: &S, rules: &RuleSet, cmds: &[Command], flush_every: Option<usize>) {
    for (i, cmd) in cmds.iter().enumerate() {
        let (cs, _) = execute(store, rules, cmd).expect("valid event");
        store.apply(&cs).expect("apply");
        if flush_every.is_some_and(|n| (i + 1) % n == 0) {
            store.flush().expect("flush");
        }
    }
    store.flush().expect("flush");
}

fn resolution(c: &mut Criterion) {
    let rules = RuleSet::builtin();
    let cmds = events();
    let mut g = c.benchmark_group("identify");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.sample_size(10);
    g.bench_function("engine+memory", |b| {
        b.iter_batched(
            MemStore::new,
            |s| {
                run(&s, &rules, &cmds, None);
                s
            },
            BatchSize::PerIteration,
        )
    });
    let fresh_sled = || {
        let dir = tempfile::tempdir().unwrap();
        let store = SledDb::open(dir.path(), 1).unwrap().shard(ShardId(0).into()).unwrap();
        (dir, store)
    };
    g.bench_function("engine+sled", |b| {
        b.iter_batched(
            fresh_sled,
            |(d, s)| {
                run(&s, &rules, &cmds, None);
                (d, s) // dropped (and deleted) outside the timing
            },
            BatchSize::PerIteration,
        )
    });
    g.bench_function("engine+sled+fsync/256", |b| {
        b.iter_batched(
            fresh_sled,
            |(d, s)| {
                run(&s, &rules, &cmds, Some(256));
                (d, s)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, resolution);
criterion_main!(benches);
