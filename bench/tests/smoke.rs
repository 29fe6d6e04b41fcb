//! A short run of the benchmark's workloads against a real node over a
//! real socket, and against the sled ceiling: every operation succeeds and
//! the profiles idgraph builds score as the truth says they should.

use idgraph_bench::peers::Peer;
use idgraph_bench::peers::{Idgraph, Routing, SledCeiling};
use idgraph_bench::run::{self, Workload};
use idgraph_bench::world::{normalized_key, pairwise, raw_from_key, World, WorldSpec};
use idgraph_node::config::NodeConfig;
use std::collections::HashMap;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_run_against_a_node_and_the_profiles_match_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().to_path_buf(), ..NodeConfig::default() };
    let node = idgraph_node::server::start(&config).await.unwrap();
    let endpoint = format!("http://{}", node.addr());
    let world = World::generate(&WorldSpec { persons: 300, seed: 3, ..WorldSpec::default() });
    let peer = Arc::new(Idgraph::connect(std::slice::from_ref(&endpoint), Routing::Leader, false).await.unwrap());

    let (preload, timed) = run::split(&world, Workload::MergeHeavy);
    assert!(!preload.is_empty() && !timed.is_empty());
    let loaded = run::ingest_unary(peer.clone(), Arc::new(preload), 4).await;
    assert_eq!((loaded.errors, loaded.first_error.clone()), (0, None));
    let streamed = run::ingest_stream(&peer, Arc::new(timed.clone()), 2, 16).await;
    assert_eq!(streamed.errors, 0, "{:?}", streamed.first_error);
    assert_eq!(streamed.ops, timed.len() as u64, "every streamed event answered once");
    assert!(streamed.p50_us > 0 && streamed.p50_us <= streamed.p999_us);

    // Every identifier with an owner: one profile per person at best, never
    // two persons in one (the world's persons share nothing but blocked
    // placeholders and family tablets, which the truth leaves out).
    let mut placed = HashMap::new();
    for key in world.truth.keys() {
        if let Some(p) = peer.lookup(0, &raw_from_key(key).unwrap()).await.unwrap() {
            placed.insert(key.clone(), p);
        }
    }
    let acc = pairwise(&world.truth, &placed);
    assert_eq!(placed.len(), world.truth.len(), "every identifier of the world was ingested");
    assert!(acc.precision > 0.99, "{acc:?}");
    assert!(acc.recall > 0.5 && acc.recall < 1.0, "{acc:?}");

    // Look-ups ask for identifiers the rules accept, as the bench does (a
    // blocked placeholder is refused as INVALID_ARGUMENT).
    let rules = idgraph_core::rules::RuleSet::builtin();
    let known = Arc::new(
        world.events.iter().flat_map(|e| e.ids.clone()).filter(|i| normalized_key(&rules, i.kind, &i.value).is_some()).collect::<Vec<_>>(),
    );
    let looked = run::lookups(peer.clone(), known.clone(), 4, 500, None, 1).await;
    assert_eq!((looked.ops, looked.errors), (500, 0), "{:?}", looked.first_error);
    // Paced: 400 look-ups at 2,000 a second take about 0.2 s, not less.
    let started = std::time::Instant::now();
    let paced = run::lookups(peer.clone(), known, 4, 400, Some(2_000.0), 1).await;
    assert_eq!((paced.ops, paced.errors), (400, 0), "{:?}", paced.first_error);
    assert!(started.elapsed() >= std::time::Duration::from_millis(190), "the rate paced the clients: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sled_ceiling_stores_every_identifier() {
    let dir = tempfile::tempdir().unwrap();
    let world = World::generate(&WorldSpec { persons: 200, seed: 4, ..WorldSpec::default() });
    let peer = Arc::new(SledCeiling::open(&dir.path().join("db")).unwrap());
    let m = run::ingest_unary(peer.clone(), Arc::new(world.events.clone()), 4).await;
    assert_eq!((m.ops, m.errors), (world.events.len() as u64, 0));
    for key in world.truth.keys().take(200) {
        assert!(peer.lookup(0, &raw_from_key(key).unwrap()).await.unwrap().is_some(), "{key}");
    }
}
