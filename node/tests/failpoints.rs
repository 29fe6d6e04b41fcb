//! Crash points inside a cross-shard commit, with real processes: a node
//! built with the `failpoints` feature exits at a named step of the
//! protocol while coordinating an event; the client, which got no answer,
//! sends the same event to another node. The event must then be applied
//! exactly once (anew if the crash came before the commit point, as a
//! duplicate after it), its identifiers must all resolve to its profile,
//! and every transaction part must be settled (by readers and the shard
//! leaders' sweeps, once the dead coordinator's locks time out).
//!
//! Run with `cargo test -p idgraph-node --features failpoints --test failpoints`
//! (`.ci/run` does).
#![cfg(feature = "failpoints")]

mod common;

use common::*;
use idgraph_core::model::Identifier;
use idgraph_node::txn::GraphKey;
use idgraph_proto::v1 as pb;
use std::time::{Duration, Instant};

const SHARDS: u32 = 8;

/// Three identifiers whose owner entries fall on three different shards,
/// so that the event's commit has at least three participants.
fn spread_identifiers(tag: &str) -> Vec<(String, String)> {
    let mut picked: Vec<(String, String)> = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for kind in ["user_id", "email", "device_id"] {
        for n in 0.. {
            let value = if kind == "email" { format!("{tag}{n}@shop.com") } else { format!("{tag}-{kind}-{n}") };
            let shard = GraphKey::Owner(Identifier::new(kind, value.clone())).shard(SHARDS);
            if used.insert(shard) {
                picked.push((kind.to_string(), value));
                break;
            }
        }
    }
    picked
}

async fn start(dir: &std::path::Path, port: u16, id: usize, members: &str, crash_at: Option<&str>) -> NodeProcess {
    let listen = format!("127.0.0.1:{port}");
    let id = id.to_string();
    let args = ["--listen", listen.as_str(), "--id", id.as_str(), "--initial-cluster", members, "--shards", "8"];
    let mut node = launch(dir, &args);
    if let Some(point) = crash_at {
        node = node.env("FAILPOINTS", format!("{point}=return"));
    }
    node.start().await.expect("the node process starts")
}

/// Sends an event until it is acknowledged: UNAVAILABLE and ABORTED leave
/// the outcome open, and resending the same event id is safe.
async fn resend_until_acknowledged(
    client: &mut pb::identity_graph_client::IdentityGraphClient<tonic::transport::Channel>,
    req: &pb::IdentifyRequest,
    what: &str,
) -> pb::IdentifyResponse {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        match client.identify(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("{what} failed: {s}"),
        }
    }
}

async fn prepared_parts(node: &NodeProcess) -> u64 {
    let s = node.admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
    s.shards.iter().map(|s| s.prepared_txns).sum()
}

async fn crash_at(point: &str, applied_before_crash: bool) {
    let ports = free_ports(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let members = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
    let mut crashing = start(dirs[0].path(), ports[0], 1, &members, Some(point)).await;
    let mut others = Vec::new();
    for i in 1..3 {
        others.push(start(dirs[i].path(), ports[i], i + 1, &members, None).await);
    }

    // Every group is formed before the crash: a group whose initialising
    // node dies before its first election reaches the others waits for
    // that node's return, and the checks below read every shard meanwhile.
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in std::iter::once(&crashing).chain(&others) {
        loop {
            let led = match n.admin().await.get_cluster(pb::GetClusterRequest {}).await {
                // Every replica is open (the admin service answers before
                // they are) and every group has a leader.
                Ok(c) => {
                    let c = c.into_inner();
                    c.shards.len() == c.shard_count as usize && c.shards.iter().all(|sh| sh.leader_id != 0)
                }
                Err(_) => false,
            };
            if led {
                break;
            }
            assert!(Instant::now() < deadline, "{point}: some shards have no leader after 30 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let ids = spread_identifiers(point.trim_start_matches("txn::"));
    let refs: Vec<(&str, &str)> = ids.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let req = event(&format!("crash-{point}"), &refs);

    // The coordinating node dies at the crash point; the caller sees no answer.
    let mut via_crashing = crashing.client().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match via_crashing.identify(req.clone()).await {
            // The commit point is passed before the secondaries apply, so the
            // answer may get out before the node dies applying them.
            Ok(_) if point == "txn::between-applies" => break,
            Ok(r) => panic!("{point}: acknowledged by a node that should have crashed: {r:?}"),
            Err(s) if s.code() == tonic::Code::Unavailable && crashing.try_wait().unwrap().is_none() => {
                // No leaders yet: the node is alive and the event not begun.
                assert!(Instant::now() < deadline, "{point}: never coordinated: {s}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => break,
        }
    }
    let status = crashing.wait().await.unwrap();
    assert_eq!(status.code(), Some(idgraph_node::crash::CRASH_EXIT_CODE), "{point}: the node exited at its crash point");

    // The client sends the same event again, to another node.
    let mut client = others[0].client().await;
    let resp = resend_until_acknowledged(&mut client, &req, &format!("{point}: the retried event")).await;
    assert_eq!(
        resp.duplicate, applied_before_crash,
        "{point}: the retry finds the event applied exactly when the crash came after the commit point"
    );
    for (kind, value) in &ids {
        let p = client.get_profile(by_id(kind, value)).await.unwrap().into_inner();
        assert_eq!(p.profile_id, resp.profile_id, "{point}: {kind} resolves to the event's profile");
        assert_eq!(p.identifiers.len(), ids.len(), "{point}: the profile holds every identifier once");
    }
    // Shards the crashed node led may still be electing a new leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    let stats = loop {
        match others[1].admin().await.get_stats(pb::GetStatsRequest {}).await {
            Ok(s) => break s.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(s) => panic!("{point}: stats: {s}"),
        }
    };
    assert_eq!((stats.events, stats.profiles, stats.identifiers), (1, 1, 3), "{point}: applied exactly once");

    // The crashed node comes back (without the crash point); every part the
    // dead coordinator left is settled.
    crashing = start(dirs[0].path(), ports[0], 1, &members, None).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = prepared_parts(&crashing).await + prepared_parts(&others[0]).await + prepared_parts(&others[1]).await;
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{point}: {left} transaction parts never settled");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let p = crashing.client().await.get_profile(by_id(&ids[0].0, &ids[0].1)).await.unwrap().into_inner();
    assert_eq!(p.profile_id, resp.profile_id, "{point}: the restarted node answers the same profile");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_before_the_commit_point_aborts_and_the_retry_applies_the_event() {
    crash_at("txn::before-commit", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_after_the_commit_point_rolls_forward_and_the_retry_is_a_duplicate() {
    crash_at("txn::after-commit", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_crash_between_two_applies_rolls_the_rest_forward() {
    crash_at("txn::between-applies", true).await;
}

/// The metadata leader dies in the middle of a replica move, at `point`:
/// the move stays recorded in the cluster map, and whoever leads the
/// metadata group next finishes it. In the end every group's voters, as
/// its leader has them, are the nodes the map lists, three per group, and
/// no event is lost.
async fn move_interrupted_at(point: &str) {
    let ports = free_ports(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let members = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
    let mut crashing = start(dirs[0].path(), ports[0], 1, &members, Some(point)).await;
    let mut others = Vec::new();
    for i in 1..3 {
        others.push(start(dirs[i].path(), ports[i], i + 1, &members, None).await);
    }
    // Node 1 must lead the metadata group when the move starts.
    let mut admin = others[0].admin().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(s) = admin.transfer_leader(pb::TransferLeaderRequest { shard: u32::MAX, node_id: 1 }).await {
        assert!(Instant::now() < deadline, "{point}: node 1 never led the metadata group: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut client = others[0].client().await;
    let mut acked = Vec::new();
    for i in 0..40 {
        let req = event(&format!("mv-{i}"), &[("anonymous_id", &format!("mv-anon-{i}")), ("email", &format!("mv{i}@shop.com"))]);
        let resp = resend_until_acknowledged(&mut client, &req, &format!("{point}: event {i}")).await;
        acked.push(resp.profile_id);
    }
    // A fourth node joins: the first move to it crashes node 1.
    let dir4 = tempfile::tempdir().unwrap();
    let listen4 = format!("127.0.0.1:{}", free_ports(1)[0]);
    let n4 = start_process(dir4.path(), &["--listen", &listen4, "--id", "4", "--join", &others[0].addr]).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = crashing.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{point}: node 1 never reached its crash point");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(idgraph_node::crash::CRASH_EXIT_CODE), "{point}: node 1 exited at its crash point");
    crashing = start(dirs[0].path(), ports[0], 1, &members, None).await;

    // The move is finished and the placement goal reached.
    let nodes = [&crashing, &others[0], &others[1], &n4];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let map = n4.admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
        let mut agree = map.map_version > 0 && map.placement.iter().all(|p| p.moving.is_empty() && p.node_ids.len() == 3);
        // 9 groups × 3 replicas over 4 nodes: node 4 takes 6 or 7.
        agree &= map.nodes.iter().any(|n| n.node_id == 4 && n.replicas >= 6);
        // Each group's leader counts on exactly the nodes the map lists.
        for n in nodes {
            let Ok(s) = n.admin().await.get_cluster(pb::GetClusterRequest {}).await else {
                agree = false;
                continue;
            };
            let s = s.into_inner();
            for r in s.shards.iter().chain(s.metadata.iter()).filter(|r| r.state == "Leader") {
                let voters: Vec<u64> = r.members.iter().filter(|m| m.voter).map(|m| m.node_id).collect();
                let group = if r.shard == u32::MAX { "meta".to_string() } else { format!("{:04}", r.shard) };
                let listed = map.placement.iter().find(|p| p.group == group).map(|p| p.node_ids.clone());
                agree &= listed.as_ref() == Some(&voters);
            }
        }
        if agree {
            break;
        }
        assert!(Instant::now() < deadline, "{point}: the placement never settled: {:?}", map.placement);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut via4 = n4.client().await;
    for (i, want) in acked.iter().enumerate() {
        let p = via4.get_profile(by_id("anonymous_id", &format!("mv-anon-{i}"))).await.unwrap().into_inner();
        assert_eq!(&p.profile_id, want, "{point}: event {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_interrupted_after_it_was_recorded_is_finished_by_the_next_metadata_leader() {
    move_interrupted_at("placement::after-begin-move").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_interrupted_after_the_membership_change_is_finished_by_the_next_metadata_leader() {
    move_interrupted_at("placement::after-membership-change").await;
}

/// The files in a data directory's snapshot directory.
fn image_files(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// A crash half-way through writing a snapshot image leaves a partial file
/// and the last kept image (none here). The node restarts, deletes the
/// partial file, holds every acknowledged event, and keeps the next image
/// it builds; started again, it opens from that image.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_snapshot_image_is_written_loses_nothing_and_leaves_no_partial_image() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--shards", "1"];
    let crashing = launch(dir.path(), &args).env("FAILPOINTS", "raft::mid-snapshot=return").start().await.expect("the node starts");
    let mut client = crashing.client().await;
    // One event per entry: the shard snapshots after 100 (the tests'
    // `IDGRAPH_RAFT_SNAPSHOT_LOGS`), and the node dies writing the image.
    let mut acknowledged = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0.. {
        let email = format!("snap{i}@shop.com");
        match client.identify(event(&format!("snap-{i}"), &[("email", &email)])).await {
            Ok(_) => acknowledged.push(email),
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "no snapshot was built after {i} events");
    }
    let mut crashing = crashing;
    let status = crashing.wait().await.unwrap();
    assert_eq!(status.code(), Some(idgraph_node::crash::CRASH_EXIT_CODE), "the node exited at raft::mid-snapshot");
    // The log's first entries are the group's own (blank, membership).
    assert!(acknowledged.len() >= 95, "{} events acknowledged before the snapshot", acknowledged.len());
    let left = image_files(dir.path());
    assert!(left.iter().any(|n| n.ends_with(".partial")), "the crash left a partial image: {left:?}");

    let node = start_process(dir.path(), &args).await;
    let partial_gone = image_files(dir.path());
    assert!(!partial_gone.iter().any(|n| n.ends_with(".partial")), "the partial image is deleted at start: {partial_gone:?}");
    let mut client = node.client().await;
    for email in &acknowledged {
        let p = client.get_profile(by_id("email", email)).await.unwrap_or_else(|s| panic!("an acknowledged event is lost: {s}"));
        assert_eq!(p.into_inner().identifiers.len(), 1);
    }
    // More events: the next snapshot is kept.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut more = 0;
    while !image_files(dir.path()).iter().any(|n| n == "shard-0000.image") {
        let email = format!("more{more}@shop.com");
        client.identify(event(&format!("more-{more}"), &[("email", &email)])).await.expect("an event after the restart");
        acknowledged.push(email);
        more += 1;
        assert!(Instant::now() < deadline, "no image kept after {more} more events");
    }
    drop(client);
    drop(node);
    let node = start_process(dir.path(), &args).await;
    let mut client = node.client().await;
    let stats = node.admin().await.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    // The event sent as the node died may have been applied unanswered.
    let events = stats.events as usize;
    assert!(events == acknowledged.len() || events == acknowledged.len() + 1, "{events} events for {} acknowledged", acknowledged.len());
    for email in acknowledged.iter().step_by(17) {
        client.get_profile(by_id("email", email)).await.unwrap_or_else(|s| panic!("lost after opening from the image: {s}"));
    }
}

/// A crash while the writer writes the change sets it held back during a
/// snapshot build (the shard's tree frozen, entries applied meanwhile)
/// loses nothing acknowledged: the tree holds a prefix of the applied
/// entries, and the node replays the rest from its log when it starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_writes_held_during_a_snapshot_are_stored_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--shards", "1"];
    let crashing = launch(dir.path(), &args).env("FAILPOINTS", "storage::mid-drain=return").start().await.expect("the node starts");
    // Several clients at once, so that entries are applied while a build
    // (every 100 entries in tests) reads the shard.
    let client = crashing.client().await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut senders = tokio::task::JoinSet::new();
    for c in 0..8 {
        let mut client = client.clone();
        senders.spawn(async move {
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let email = format!("held{c}-{i}@shop.com");
                match client.identify(event(&format!("held-{c}-{i}"), &[("email", &email)])).await {
                    Ok(_) => acknowledged.push(email),
                    Err(_) => break,
                }
                if Instant::now() > deadline {
                    break;
                }
            }
            acknowledged
        });
    }
    let mut acknowledged = Vec::new();
    while let Some(sent) = senders.join_next().await {
        acknowledged.extend(sent.unwrap());
    }
    let mut crashing = crashing;
    let status = tokio::time::timeout(Duration::from_secs(30), crashing.wait())
        .await
        .unwrap_or_else(|_| panic!("no held writes were stored in 90 s of writes ({} acknowledged)", acknowledged.len()))
        .unwrap();
    assert_eq!(status.code(), Some(idgraph_node::crash::CRASH_EXIT_CODE), "the node exited at storage::mid-drain");
    assert!(!acknowledged.is_empty());

    let node = start_process(dir.path(), &args).await;
    let mut client = node.client().await;
    for email in &acknowledged {
        let p = client.get_profile(by_id("email", email)).await.unwrap_or_else(|s| panic!("an acknowledged event is lost: {s}"));
        assert_eq!(p.into_inner().identifiers.len(), 1);
    }
    // Events sent as the node died may have been applied unanswered, one
    // per client at most.
    let stats = node.admin().await.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    let events = stats.events as usize;
    assert!((acknowledged.len()..=acknowledged.len() + 8).contains(&events), "{events} events for {} acknowledged", acknowledged.len());
}

/// The replicas' digests and a backup's images read whole shards, and wait
/// while a snapshot build holds its view of one. They wait on the blocking
/// pool, not on a runtime worker: a node with one worker goes on answering
/// meanwhile. (The build holds its view for 10 s here, at the wait point
/// `raft::snapshot-view`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_shard_reads_waiting_for_a_snapshot_build_leave_the_node_serving() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("node.log");
    let node = launch(&dir.path().join("data"), &["--shards", "1"])
        .env("IDGRAPH_WORKER_THREADS", "1")
        .env("FAILPOINTS", "raft::snapshot-view=sleep(10000)")
        .log_to(&log)
        .start()
        .await
        .expect("the node starts");
    let mut client = node.client().await;
    // A build comes every 100 entries in tests: write until one holds its
    // view.
    let holding = || std::fs::read_to_string(&log).unwrap_or_default().contains("wait point raft::snapshot-view reached");
    let mut written = 0;
    while !holding() {
        let email = format!("view{written}@shop.com");
        client.identify(event(&format!("view-{written}"), &[("email", &email)])).await.unwrap();
        written += 1;
        assert!(written < 3000, "no snapshot build began in {written} events");
    }
    let mut admin = node.admin().await;
    let digests = tokio::spawn(async move { admin.get_digests(pb::GetDigestsRequest {}).await });
    let mut admin = node.admin().await;
    let backup = tokio::spawn(async move {
        let mut chunks = admin.backup(pb::BackupRequest {}).await?.into_inner();
        let mut bytes = 0;
        while let Some(chunk) = chunks.message().await? {
            bytes += chunk.data.len();
        }
        Ok::<usize, tonic::Status>(bytes)
    });
    // Both reach the node and wait for the view.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let p = client.get_profile(by_id("email", "view0@shop.com")).await.expect("a look-up is served while they wait").into_inner();
    assert_eq!(p.identifiers.len(), 1);
    client.identify(event("view-after", &[("email", "after@shop.com")])).await.expect("a write is served while they wait");
    assert!(!digests.is_finished(), "the digests wait for the build's view");
    assert!(!backup.is_finished(), "the backup waits for the build's view");
    let digests = digests.await.unwrap().expect("the digests answer once the build lets go").into_inner();
    assert!(!digests.shards.is_empty());
    assert!(backup.await.unwrap().expect("the backup ends once the build lets go") > 0);
}
