//! What the node keeps: across a clean restart, across a panicking shard
//! actor, and across `kill -9` of the real process.

mod common;

use common::*;
use idgraph_proto::v1 as pb;
use std::time::Duration;
use tonic::Code;

#[tokio::test]
async fn a_clean_restart_keeps_every_profile() {
    let dir = tempfile::tempdir().unwrap();
    let node1 = node(dir.path()).await;
    let mut g = graph(&node1).await;
    let mut ids = Vec::new();
    for i in 0..200 {
        let r = g
            .identify(event(&format!("e{i}"), &[("email", &format!("p{}@shop.com", i % 50)), ("device_id", &format!("d{i}"))]))
            .await
            .unwrap()
            .into_inner();
        ids.push(r.profile_id);
    }
    node1.shutdown().await.unwrap();
    let node2 = node(dir.path()).await;
    let mut g = graph(&node2).await;
    for i in 0..200 {
        let p = g.get_profile(by_id("device_id", &format!("d{i}"))).await.unwrap().into_inner();
        assert_eq!(p.profile_id, ids[i % 50]);
        assert_eq!(p.identifiers.len(), 5);
    }
    node2.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panicking_shard_actor_is_restarted_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let node = node(dir.path()).await;
    let mut g = graph(&node).await;
    let first = g.identify(event("e1", &[("email", "kept@shop.com")])).await.unwrap().into_inner();
    node.router().crash_shard(idgraph_core::model::ShardId(0).into()).unwrap();
    // Requests during the restart may be refused as UNAVAILABLE; then the
    // shard serves again with its data.
    let mut served = None;
    for _ in 0..500 {
        match g.get_profile(by_id("email", "kept@shop.com")).await {
            Ok(p) => {
                served = Some(p.into_inner());
                break;
            }
            Err(s) => {
                assert_eq!(s.code(), Code::Unavailable, "{}", s.message());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(served.expect("shard restarted").profile_id, first.profile_id);
    let r = g.identify(event("e2", &[("email", "kept@shop.com"), ("phone", "555 010 7777")])).await.unwrap().into_inner();
    assert_eq!(r.profile_id, first.profile_id);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_kill_9_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = start_process(dir.path(), &[]).await;
    let mut g = p.client().await;
    let a = g.identify(event("e1", &[("user_id", "u1"), ("email", "u1@shop.com")])).await.unwrap().into_inner();
    // An idle client connection must not hold the shutdown up.
    p.signal(Signal::SIGTERM).unwrap();
    let status = p.wait().await.unwrap();
    assert!(status.success(), "SIGTERM exits 0, got {status}");

    let mut p = start_process(dir.path(), &[]).await;
    let mut g = p.client().await;
    assert_eq!(g.get_profile(by_id("user_id", "u1")).await.unwrap().into_inner().profile_id, a.profile_id);
    // Acknowledged events, then kill -9 with no chance to flush.
    let mut acked = Vec::new();
    let reqs: Vec<pb::IdentifyRequest> = (0..300)
        .map(|i| event(&format!("k{i}"), &[("anonymous_id", &format!("anon-{i}")), ("email", &format!("k{}@shop.com", i % 30))]))
        .collect();
    let mut stream = g.identify_stream(futures::stream::iter(reqs)).await.unwrap().into_inner();
    while let Some(r) = stream.message().await.unwrap() {
        acked.push(r.profile_id);
    }
    p.kill().await;

    let p = start_process(dir.path(), &[]).await;
    let mut g = p.client().await;
    for (i, pid) in acked.iter().enumerate() {
        let got =
            g.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.expect("acknowledged event survives kill -9").into_inner();
        assert_eq!(&got.profile_id, pid);
    }
    let dup = g.identify(event("k5", &[("anonymous_id", "anon-5")])).await.unwrap().into_inner();
    assert!(dup.duplicate, "event ids applied before the crash are remembered");
}
