//! Three real `idgraph-node` processes on loopback forming one cluster:
//! replication, forwarding to the leader, `kill -9` of the leader, rejoin,
//! membership changes, and concurrent events racing to merge across shards.
//! Unless a test says otherwise, nodes run the default 16 shards, so nearly
//! every event commits with a cross-shard transaction.

mod common;

use common::*;
use idgraph_proto::v1 as pb;
use std::time::{Duration, Instant};

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    ports: Vec<u16>,
    nodes: Vec<Option<NodeProcess>>,
    shards: String,
    /// More arguments for every node.
    extra: Vec<String>,
}

impl Cluster {
    async fn start(n: usize) -> Cluster {
        Cluster::with_shards(n, 16).await
    }

    async fn with_shards(n: usize, shards: u32) -> Cluster {
        Cluster::with_args(n, shards, &[]).await
    }

    async fn with_args(n: usize, shards: u32, extra: &[&str]) -> Cluster {
        let ports = free_ports(n);
        let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut c = Cluster { dirs, ports, nodes: (0..n).map(|_| None).collect(), shards: shards.to_string(), extra };
        for i in 0..n {
            c.start_node(i).await;
        }
        c
    }

    fn initial_cluster(&self) -> String {
        self.ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",")
    }

    async fn start_node(&mut self, i: usize) {
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let id = (i + 1).to_string();
        let members = self.initial_cluster();
        let mut args = vec![
            "--listen",
            &listen,
            "--id",
            &id,
            "--initial-cluster",
            &members,
            "--shards",
            &self.shards,
            "--metrics-listen",
            "127.0.0.1:0",
        ];
        args.extend(self.extra.iter().map(String::as_str));
        let p = start_process(self.dirs[i].path(), &args).await;
        self.nodes[i] = Some(p);
    }

    fn node(&self, i: usize) -> &NodeProcess {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// The leader of shard 0 as the running nodes agree on it.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            for (i, n) in self.nodes.iter().enumerate() {
                let Some(n) = n else { continue };
                if let Ok(s) = n.admin().await.get_cluster(pb::GetClusterRequest {}).await {
                    let s = s.into_inner();
                    if s.shards.first().is_some_and(|sh| sh.state == "Leader") {
                        return i;
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader within 20 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn person_event(i: usize) -> pb::IdentifyRequest {
    event(&format!("c{i}"), &[("anonymous_id", &format!("anon-{i}")), ("email", &format!("p{}@shop.com", i % 100))])
}

/// Sends an event until it is acknowledged, as an at-least-once transport
/// would; UNAVAILABLE means "outcome unknown", so the same event id is sent
/// again.
async fn deliver(
    client: &mut pb::identity_graph_client::IdentityGraphClient<tonic::transport::Channel>,
    req: pb::IdentifyRequest,
) -> pb::IdentifyResponse {
    acknowledged(req, |req| {
        let mut client = client.clone();
        async move { client.identify(req).await.map(|r| r.into_inner()) }
    })
    .await
}

/// Sends an event through the cluster client until it is acknowledged (as
/// [`deliver`] does).
async fn deliver_routed(cluster: &idgraph_client::Cluster, req: pb::IdentifyRequest) -> pb::IdentifyResponse {
    acknowledged(req, |req| cluster.identify(req)).await
}

/// Calls `send` with `req` until it is acknowledged; only UNAVAILABLE is
/// retried.
async fn acknowledged<F, Fut>(req: pb::IdentifyRequest, send: F) -> pb::IdentifyResponse
where
    F: Fn(pb::IdentifyRequest) -> Fut,
    Fut: std::future::Future<Output = Result<pb::IdentifyResponse, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match send(req.clone()).await {
            Ok(r) => return r,
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::Unavailable, "{}", s.message());
                assert!(Instant::now() < deadline, "event {} never acknowledged: {}", req.event_id, s.message());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_and_every_node_answers_the_same_profiles() {
    let c = Cluster::start(3).await;
    c.leader().await;
    // Each shard is bootstrapped by a different member, which leads it:
    // the 16 leaders are spread over the three nodes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.node(0).admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
        let leaders: Vec<u64> = s.shards.iter().map(|sh| sh.leader_id).collect();
        if leaders.iter().all(|l| *l != 0) {
            for node in 1..=3u64 {
                let led = leaders.iter().filter(|l| **l == node).count();
                assert!(led >= 5, "node {node} leads {led} of 16 shards: {leaders:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "shards without a leader: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Write through every node: followers forward to the leader.
    let mut acked = Vec::new();
    for i in 0..600 {
        let mut client = c.node(i % 3).client().await;
        acked.push(deliver(&mut client, person_event(i)).await.profile_id);
    }
    for n in 0..3 {
        let mut client = c.node(n).client().await;
        for i in (0..600).step_by(7) {
            let p = client.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.unwrap().into_inner();
            assert_eq!(p.profile_id, acked[i], "node {} disagrees on event {i}", n + 1);
            assert_eq!(p.identifiers.len(), 7, "six anonymous ids and the e-mail");
        }
    }
    // A stale read on a follower answers from its own replica and says so.
    let follower = (c.leader().await + 1) % 3;
    let mut f = c.node(follower).client().await;
    let stale_read = pb::GetProfileRequest { consistency: pb::ReadConsistency::Stale as i32, ..by_id("anonymous_id", "anon-0") };
    let deadline = Instant::now() + Duration::from_secs(10);
    let p = loop {
        match f.get_profile(stale_read.clone()).await {
            Ok(p) => break p.into_inner(),
            // The follower may not have applied the first events yet.
            Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(s) => panic!("stale read failed: {s}"),
        }
    };
    assert!(p.stale);
    assert_eq!(p.profile_id, acked[0]);

    // An operator moves shard 0's leadership to the third node; writes and
    // reads go on through any node.
    let before = c.leader().await;
    let to = ((before + 2) % 3) as u64 + 1;
    let mut admin = c.node(before).admin().await;
    let moved = admin.transfer_leader(pb::TransferLeaderRequest { shard: 0, node_id: to }).await.unwrap().into_inner();
    assert_eq!(moved.leader_id, to);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let views: Vec<u64> = shard0_leaders(&c).await;
        if views.iter().all(|l| *l == to) {
            break;
        }
        assert!(Instant::now() < deadline, "nodes disagree on shard 0's new leader {to}: {views:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut client = c.node(before).client().await;
    let r = deliver(&mut client, person_event(600)).await;
    let p = client.get_profile(by_id("anonymous_id", "anon-600")).await.unwrap().into_inner();
    assert_eq!(p.profile_id, r.profile_id);
    let refused = admin.transfer_leader(pb::TransferLeaderRequest { shard: 99, node_id: to }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{}", refused.message());
    assert!(refused.message().contains("shard"), "{}", refused.message());
    // Every replica applies the same log to the same state.
    replicas_agree(&c, &[0, 1, 2]).await;
}

/// Waits until every replica of every group on `nodes` has applied the same
/// log index, then asserts that they report the same state digest. Groups
/// are matched by id: with more nodes than the replication factor, each
/// node holds only some of them.
async fn replicas_agree(c: &Cluster, nodes: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut by_group: std::collections::BTreeMap<u32, Vec<pb::ShardDigest>> = Default::default();
        for n in nodes {
            for d in c.node(*n).admin().await.get_digests(pb::GetDigestsRequest {}).await.unwrap().into_inner().shards {
                by_group.entry(d.shard).or_default().push(d);
            }
        }
        let caught_up = by_group.values().all(|v| v.iter().all(|d| d.settled && d.applied_index == v[0].applied_index));
        if caught_up {
            for (g, v) in &by_group {
                for d in &v[1..] {
                    assert_eq!(d.digest, v[0].digest, "group {g}: replicas at index {} differ", d.applied_index);
                }
                assert!(v[0].bytes > 0, "a digest covers the replica's records");
            }
            return;
        }
        assert!(Instant::now() < deadline, "replicas did not converge: {by_group:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nodes here snapshot every 100 entries and keep 10 (see `common`): a
/// follower that misses hundreds of entries can only catch up from a
/// snapshot. Two shards, so that shard 0 alone sees hundreds of entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_far_behind_catches_up_from_a_snapshot() {
    let mut c = Cluster::with_shards(3, 2).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    c.nodes[follower].as_mut().unwrap().signal(Signal::SIGKILL).unwrap();
    c.nodes[follower] = None;
    let mut client = c.node(leader).client().await;
    let mut acked = Vec::new();
    for i in 0..500 {
        acked.push(deliver(&mut client, person_event(i)).await.profile_id);
    }
    // Snapshots are built in the background: wait for the last one due
    // (one per 100 entries; how many entries 500 events take varies with
    // how settling steps batch), which lies hundreds of entries past the
    // follower's last one.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let s = c.node(leader).admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
        let sh = &s.shards[0];
        if sh.snapshot_index >= 300 && sh.snapshot_index + 100 > sh.last_log_index {
            break s;
        }
        assert!(Instant::now() < deadline, "leader never snapshotted: {:?}", s.shards[0]);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    c.start_node(follower).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = c.node(follower).admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
        let sh = &s.shards[0];
        if sh.applied_index >= status.shards[0].applied_index {
            assert!(sh.snapshot_index >= 100, "caught up by installing a snapshot: {sh:?}");
            break;
        }
        assert!(Instant::now() < deadline, "follower stuck: {sh:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p = c.node(follower).client().await.get_profile(by_id("anonymous_id", "anon-499")).await.unwrap().into_inner();
    assert_eq!(p.profile_id, acked[499]);
    // The replica built from a snapshot holds exactly what the others do.
    replicas_agree(&c, &[0, 1, 2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_loses_no_acknowledged_event_and_the_node_rejoins() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader().await;
    let via = (leader + 1) % 3;
    let mut client = c.node(via).client().await;
    let mut acked = Vec::new();
    for i in 0..300 {
        acked.push(deliver(&mut client, person_event(i)).await.profile_id);
    }
    // kill -9 the leader; keep writing through a surviving node.
    c.nodes[leader].as_mut().unwrap().signal(Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    c.nodes[leader] = None;
    let first = deliver(&mut client, person_event(300)).await;
    acked.push(first.profile_id);
    eprintln!("writes resumed {:?} after the leader was killed", killed_at.elapsed());
    for i in 301..400 {
        acked.push(deliver(&mut client, person_event(i)).await.profile_id);
    }
    let new_leader = c.leader().await;
    assert_ne!(new_leader, leader);
    for (i, want) in acked.iter().enumerate() {
        let p = client.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.expect("acknowledged event survives").into_inner();
        assert_eq!(&p.profile_id, want);
    }
    // The killed node comes back and catches up.
    c.start_node(leader).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let want = c.node(new_leader).admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner().shards[0].applied_index;
    loop {
        let got = c.node(leader).admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner().shards[0].applied_index;
        if got >= want {
            break;
        }
        assert!(Instant::now() < deadline, "rejoined node stuck at {got}, leader at {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut back = c.node(leader).client().await;
    let p = back.get_profile(by_id("anonymous_id", "anon-399")).await.unwrap().into_inner();
    assert_eq!(p.profile_id, acked[399]);
}

/// Shard 0's leader as each running node sees it.
async fn shard0_leaders(c: &Cluster) -> Vec<u64> {
    let mut out = Vec::new();
    for n in c.nodes.iter().flatten() {
        let s = n.admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
        out.push(s.shards[0].leader_id);
    }
    out
}

/// The cluster map as `node` knows it.
async fn cluster(node: &NodeProcess) -> pb::ClusterStatus {
    node.admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner()
}

/// Waits until `node`'s map has no move under way and `done` holds.
async fn settled(node: &NodeProcess, what: &str, done: impl Fn(&pb::ClusterStatus) -> bool) -> pb::ClusterStatus {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let s = cluster(node).await;
        if s.placement.iter().all(|p| p.moving.is_empty()) && done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {:?} {:?}", s.nodes, s.placement);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every group has `rf` replicas, none on `absent`.
fn assert_placement(s: &pb::ClusterStatus, rf: usize, absent: Option<u64>) {
    assert_eq!(s.placement.len(), s.shard_count as usize + 1, "every shard and the metadata group are placed");
    for p in &s.placement {
        assert_eq!(p.node_ids.len(), rf, "group {} on {:?}", p.group, p.node_ids);
        assert!(absent.is_none_or(|a| !p.node_ids.contains(&a)), "group {} still on node {absent:?}", p.group);
    }
}

/// A fourth node joins a three-node cluster (replication factor 3):
/// replicas move to it, one at a time, until each node holds about as many;
/// the shards it lacks are served through it anyway. Then the leader of
/// shard 0 is removed: its replicas move to the node that lacked them
/// before it is forgotten, and it discards its own. No acknowledged event
/// is lost, and the replicas of every group agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_takes_replicas_and_a_removed_node_hands_its_replicas_over() {
    let mut c = Cluster::with_shards(3, 8).await;
    let leader = c.leader().await;
    let mut client = c.node((leader + 1) % 3).client().await;
    let mut acked = Vec::new();
    for i in 0..300 {
        acked.push(deliver(&mut client, person_event(i)).await.profile_id);
    }
    let before = settled(c.node(0), "bootstrap", |s| s.map_version > 0).await;
    assert_placement(&before, 3, None);
    // A fourth node joins through a follower.
    let dir4 = tempfile::tempdir().unwrap();
    let listen4 = format!("127.0.0.1:{}", free_ports(1)[0]);
    let via = c.node((leader + 1) % 3).addr.clone();
    let n4 = start_process(dir4.path(), &["--listen", &listen4, "--id", "4", "--join", &via]).await;
    // 9 groups × 3 replicas over 4 nodes: node 4 takes 6 or 7.
    let joined = settled(&n4, "node 4 never took its share of replicas", |s| {
        s.nodes.iter().any(|n| n.node_id == 4 && n.replicas >= 6) && s.shards.len() + s.metadata.iter().count() >= 6
    })
    .await;
    assert_placement(&joined, 3, None);
    let counts: Vec<u32> = joined.nodes.iter().map(|n| n.replicas).collect();
    assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "replica counts uneven: {counts:?}");
    // Node 4 serves every shard, those it does not hold included.
    let mut via4 = n4.client().await;
    for i in 300..400 {
        acked.push(deliver(&mut via4, person_event(i)).await.profile_id);
    }
    c.nodes.push(Some(n4));
    replicas_agree(&c, &[0, 1, 2, 3]).await;
    // Leaderships even out too: node 4 comes to lead some shards.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster(c.node(3)).await.shards.iter().any(|s| s.state == "Leader") {
        assert!(Instant::now() < deadline, "node 4 leads no shard: {:?}", cluster(c.node(3)).await.nodes);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Remove the leader of shard 0; RemoveNode answers once it is forgotten.
    let removed = leader as u64 + 1;
    let status = c.node(3).admin().await.remove_node(pb::RemoveNodeRequest { node_id: removed }).await.unwrap().into_inner();
    assert!(status.nodes.iter().all(|n| n.node_id != removed), "node {removed} still listed: {:?}", status.nodes);
    let after = settled(c.node(3), "after the removal", |s| s.nodes.len() == 3).await;
    assert_placement(&after, 3, Some(removed));
    // The removed node lets go of its replicas.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster(c.node(leader)).await.shards.is_empty() {
        assert!(Instant::now() < deadline, "node {removed} kept its replicas");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 400..450 {
        acked.push(deliver(&mut via4, person_event(i)).await.profile_id);
    }
    let others: Vec<usize> = (0..4).filter(|i| *i != leader).collect();
    for n in &others {
        let mut client = c.node(*n).client().await;
        for (i, want) in acked.iter().enumerate() {
            let p = client.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.unwrap().into_inner();
            assert_eq!(&p.profile_id, want, "event {i} through node {}", n + 1);
        }
    }
    replicas_agree(&c, &others).await;
}

/// Concurrent clients, through all three nodes, send events that race to
/// join profiles across shards: every event links the shared e-mail of its
/// household with its own user id (limit 1) and device. Afterwards every
/// identifier of every acknowledged event is in exactly one live profile,
/// which lists it, and no profile holds two user ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_events_racing_to_merge_across_shards_keep_the_invariants() {
    let c = Cluster::with_shards(3, 8).await;
    c.leader().await;
    let mut tasks = Vec::new();
    for worker in 0..12usize {
        let addr = c.node(worker % 3).addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::identity_graph_client::IdentityGraphClient::connect(format!("http://{addr}")).await.unwrap();
            let mut sent = Vec::new();
            for i in 0..25usize {
                let household = (worker + i) % 5;
                let ids = [
                    ("email".to_string(), format!("home{household}@shop.com")),
                    ("user_id".to_string(), format!("u{worker}-{i}")),
                    ("device_id".to_string(), format!("d{worker}-{}", i % 3)),
                ];
                let refs: Vec<(&str, &str)> = ids.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let req = event(&format!("race-{worker}-{i}"), &refs);
                let resp = loop {
                    match client.identify(req.clone()).await {
                        Ok(r) => break r.into_inner(),
                        // Outcome unknown or too much contention: resend the same event.
                        Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted) => {
                            tokio::time::sleep(Duration::from_millis(20)).await
                        }
                        Err(s) => panic!("event refused: {s}"),
                    }
                };
                sent.push((ids, resp));
            }
            sent
        }));
    }
    let mut acked = Vec::new();
    for t in tasks {
        acked.extend(t.await.unwrap());
    }
    let mut client = c.node(0).client().await;
    let mut owner_of = std::collections::BTreeMap::new();
    let mut profiles = std::collections::BTreeMap::new();
    for (ids, _) in &acked {
        for (kind, value) in ids {
            let p = client
                .get_profile(by_id(kind, value))
                .await
                .unwrap_or_else(|s| panic!("{kind} of an acknowledged event: {s}"))
                .into_inner();
            assert!(
                p.identifiers.iter().any(|i| &i.r#type == kind && &i.value == value),
                "profile {} does not list its identifier",
                p.profile_id
            );
            owner_of.insert((kind.clone(), value.clone()), p.profile_id.clone());
            profiles.insert(p.profile_id.clone(), p);
        }
    }
    for p in profiles.values() {
        let users = p.identifiers.iter().filter(|i| i.r#type == "user_id").count();
        assert!(users <= 1, "profile {} holds {users} user ids", p.profile_id);
        for i in &p.identifiers {
            if let Some(owner) = owner_of.get(&(i.r#type.clone(), i.value.clone())) {
                assert_eq!(owner, &p.profile_id, "an identifier is listed by two live profiles");
            }
        }
    }
    // Each household's e-mail ended in one profile with exactly one user id.
    for h in 0..5 {
        let p = client.get_profile(by_id("email", &format!("home{h}@shop.com"))).await.unwrap().into_inner();
        assert_eq!(p.identifiers.iter().filter(|i| i.r#type == "user_id").count(), 1, "household {h}");
    }
    let stats = c.node(1).admin().await.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
    assert_eq!(stats.events, 300, "each acknowledged event applied exactly once: {stats:?}");
}

/// Shard 0's last log index as `node` sees it.
async fn last_log_index(node: &NodeProcess) -> u64 {
    let s = cluster(node).await;
    s.shards.iter().find(|sh| sh.shard == 0).expect("the node holds shard 0").last_log_index
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_to_a_follower_join_the_leaders_batches() {
    let c = Cluster::with_shards(3, 1).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    // One event first: the follower has learnt who leads.
    let mut client = c.node(follower).client().await;
    deliver(&mut client, person_event(0)).await;
    let before = last_log_index(c.node(leader)).await;
    // Concurrent writes at a follower are forwarded to the leader, where
    // they wait in the shard's actor with its own writes and go out
    // together: far fewer log entries than writes (one entry per forwarded
    // write before forwarded writes went through the actor).
    const WRITES: usize = 96;
    let calls: Vec<_> = (1..=WRITES)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move { client.identify(person_event(i)).await.map(|r| r.into_inner().profile_id) })
        })
        .collect();
    for call in calls {
        let answer = call.await.unwrap();
        assert!(answer.is_ok(), "a forwarded write failed: {answer:?}");
    }
    let entries = last_log_index(c.node(leader)).await - before;
    assert!(entries < (WRITES / 3) as u64, "{WRITES} concurrent forwarded writes took {entries} log entries");
    // And every one of them reaches every replica (stale reads answer from
    // the receiving node's own replica).
    for n in 0..3 {
        let mut reader = c.node(n).client().await;
        for i in (1..=WRITES).step_by(5) {
            let read =
                pb::GetProfileRequest { consistency: pb::ReadConsistency::Stale as i32, ..by_id("anonymous_id", &format!("anon-{i}")) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match reader.get_profile(read.clone()).await {
                    Ok(p) => {
                        assert!(p.into_inner().identifiers.iter().any(|id| id.value == format!("anon-{i}")));
                        break;
                    }
                    Err(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await
                    }
                    Err(s) => panic!("node {} lacks event {i}: {s}", n + 1),
                }
            }
        }
    }
}

/// Linearizable reads served by a node's leaders so far: (under a lease,
/// after a heartbeat round).
async fn reads_by_lease_and_round(node: &NodeProcess) -> (f64, f64) {
    let s = scrape(node.metrics_addr.as_deref().expect("the node serves metrics")).await;
    let via = |v| value(&s, "idgraph_linearizable_reads_total", &[("via", v)]).expect("the read counter is exported");
    (via("lease"), via("round"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_on_the_leader_ride_its_lease_and_see_every_acknowledged_write() {
    let c = Cluster::with_shards(3, 1).await;
    let leader = c.leader().await;
    let follower = (leader + 1) % 3;
    let mut writer = c.node(follower).client().await;
    let mut reader = c.node(leader).client().await;
    // Each event is acknowledged (through a follower, which forwards it)
    // before the leader is asked for it: a read that missed it would not
    // be linearizable.
    const READS: usize = 150;
    for i in 0..READS {
        let acked = deliver(&mut writer, person_event(i)).await;
        let p = reader.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.unwrap().into_inner();
        assert_eq!(p.profile_id, acked.profile_id, "read {i} on the leader missed an acknowledged write");
        assert!(!p.stale);
    }
    let (leased, after_round) = reads_by_lease_and_round(c.node(leader)).await;
    assert!(leased + after_round >= READS as f64, "{leased} + {after_round} reads counted for {READS}");
    // A round renews the lease for a while: most reads need none.
    assert!(leased > after_round, "{leased} reads under the lease, {after_round} after a round");

    // Handing leadership over revokes the lease: right after the transfer
    // the old leader forwards reads, and they see writes the new leader
    // acknowledged.
    let to = follower as u64 + 1;
    let moved = c.node(leader).admin().await.transfer_leader(pb::TransferLeaderRequest { shard: 0, node_id: to }).await.unwrap();
    assert_eq!(moved.into_inner().leader_id, to);
    let mut new_leader = c.node(follower).client().await;
    for i in READS..READS + 20 {
        let acked = deliver(&mut new_leader, person_event(i)).await;
        let p = reader.get_profile(by_id("anonymous_id", &format!("anon-{i}"))).await.unwrap().into_inner();
        assert_eq!(p.profile_id, acked.profile_id, "the old leader answered read {i} from its own state after the transfer");
    }
}

/// Dedup records past their retention (one second here) are forgotten
/// through each shard's log: every replica forgets the same ones, and an
/// event delivered again afterwards is applied again, to the same profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_replica_forgets_the_same_dedup_records_past_their_retention() {
    let conf = tempfile::tempdir().unwrap();
    let file = conf.path().join("node.toml");
    std::fs::write(&file, "event_retention_secs = 1\n").unwrap();
    let c = Cluster::with_args(3, 4, &["--config", file.to_str().unwrap()]).await;
    c.leader().await;
    let mut client = c.node(0).client().await;
    let mut first = Vec::new();
    for i in 0..60 {
        first.push(deliver(&mut client, person_event(i)).await);
    }
    // Each record is forgotten once, by its shard's leader.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut forgotten = 0.0;
        for n in 0..3 {
            let s = scrape(c.node(n).metrics_addr.as_deref().expect("the node serves metrics")).await;
            forgotten += value(&s, "idgraph_events_forgotten_total", &[]).unwrap_or(0.0);
        }
        if forgotten >= 60.0 {
            assert_eq!(forgotten, 60.0, "a record is forgotten once");
            break;
        }
        assert!(Instant::now() < deadline, "only {forgotten} of 60 dedup records were forgotten");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    replicas_agree(&c, &[0, 1, 2]).await;
    let mut client = c.node(1).client().await;
    for (i, before) in first.iter().enumerate().take(10) {
        let again = deliver(&mut client, person_event(i)).await;
        assert!(!again.duplicate, "event c{i} past its retention is applied again");
        assert_eq!(again.profile_id, before.profile_id, "and resolves as it did");
        assert!(!again.created && !again.merged, "joining nothing new");
        let kept = deliver(&mut client, person_event(i)).await;
        assert!(kept.duplicate, "the new delivery's record is kept for its own window");
    }
}

/// Calls that other nodes forwarded to `node` so far.
async fn forwards_received(node: &NodeProcess) -> f64 {
    let s = scrape(node.metrics_addr.as_deref().expect("the node serves metrics")).await;
    value(&s, "idgraph_peer_calls_total", &[("kind", "forward")]).unwrap_or(0.0)
}

async fn forwards_in_all(c: &Cluster) -> f64 {
    let mut n = 0.0;
    for i in 0..c.nodes.len() {
        n += forwards_received(c.node(i)).await;
    }
    n
}

/// An event whose one identifier puts all its records on one shard.
fn solo_event(i: usize) -> pb::IdentifyRequest {
    event(&format!("solo{i}"), &[("anonymous_id", &format!("solo-{i}"))])
}

/// `GetRoutes` names every node and each shard's leader, and the client
/// library's `Cluster` sends each request straight to its home shard's
/// leader: with the four shards led by different nodes, events of one
/// identifier and look-ups through it cause no forwarded call, where the
/// same traffic spread over the nodes does. After a leadership transfer its
/// background refresh finds the new leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_sends_requests_to_the_shard_leader_without_a_hop() {
    let c = Cluster::with_shards(3, 4).await;
    let expected = lead_shards_round_robin(&c, 4).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Every node names the same leaders (a follower learns of a new leader
    // from its first append), and every node with its address.
    let want: Vec<(u64, String)> = c.ports.iter().enumerate().map(|(i, p)| (i as u64 + 1, format!("127.0.0.1:{p}"))).collect();
    for n in 0..3 {
        loop {
            let routes = c.node(n).client().await.get_routes(pb::GetRoutesRequest {}).await.unwrap().into_inner();
            assert_eq!((routes.node_id, routes.shard_count), (n as u64 + 1, 4));
            let mut addrs: Vec<(u64, String)> = routes.nodes.iter().map(|x| (x.node_id, x.addr.clone())).collect();
            addrs.sort();
            assert_eq!(addrs, want, "every node with the address it serves at");
            let named: std::collections::BTreeMap<u32, u64> = routes.shards.iter().map(|s| (s.shard, s.leader_id)).collect();
            if named == expected {
                assert!(routes.shards.iter().all(|s| s.term > 0));
                break;
            }
            assert!(Instant::now() < deadline, "node {} names leaders {named:?}, not {expected:?}", n + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let endpoints: Vec<String> = c.ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let cluster = idgraph_client::Cluster::connect(&endpoints, &idgraph_client::Credentials::default()).await.unwrap();
    assert_eq!(cluster.leaders(), expected);

    // Events of one identifier (one shard each, over all four shards) and
    // look-ups through it: first spread over the three nodes, then through
    // the cluster client.
    let before = forwards_in_all(&c).await;
    for i in 0..60 {
        let mut node = c.node(i % 3).client().await;
        let acked = deliver(&mut node, solo_event(i)).await;
        let found = node.get_profile(by_id("anonymous_id", &format!("solo-{i}"))).await.unwrap().into_inner();
        assert_eq!(found.profile_id, acked.profile_id);
    }
    let spread = forwards_in_all(&c).await - before;
    assert!(spread >= 40.0, "two calls in three reach a node that does not lead their shard: {spread} forwards");
    let before = forwards_in_all(&c).await;
    for i in 60..120 {
        let acked = deliver_routed(&cluster, solo_event(i)).await;
        let found = cluster.get_profile(by_id("anonymous_id", &format!("solo-{i}"))).await.unwrap();
        assert_eq!(found.profile_id, acked.profile_id);
    }
    let routed = forwards_in_all(&c).await - before;
    assert!(routed < spread / 10.0, "{routed} forwards through the cluster client against {spread} spread");

    // A new leader is found by the background refresh.
    let to = expected[&0] % 3 + 1;
    let moved = c.node(0).admin().await.transfer_leader(pb::TransferLeaderRequest { shard: 0, node_id: to }).await.unwrap();
    assert_eq!(moved.into_inner().leader_id, to);
    let deadline = Instant::now() + Duration::from_secs(15);
    while cluster.leaders().get(&0) != Some(&to) {
        assert!(Instant::now() < deadline, "the cluster client still routes shard 0 by {:?}", cluster.leaders());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked = deliver_routed(&cluster, solo_event(500)).await;
    assert_eq!(cluster.get_profile(by_id("anonymous_id", "solo-500")).await.unwrap().profile_id, acked.profile_id);

    // kill -9 of a node that leads shards: calls routed to it fail, it is
    // left out of the routes, and events of every shard are acknowledged
    // again once its shards have new leaders.
    let dead = to;
    let mut c = c;
    c.nodes[dead as usize - 1].as_mut().unwrap().signal(Signal::SIGKILL).unwrap();
    c.nodes[dead as usize - 1] = None;
    for i in 600..640 {
        let acked = deliver_routed(&cluster, solo_event(i)).await;
        assert!(!acked.profile_id.is_empty());
    }
    assert!(cluster.leaders().values().all(|n| *n != dead), "the killed node is still routed to: {:?}", cluster.leaders());
}

/// Moves the leadership of shard s of `shards` to node s % 3 + 1, so that
/// every node of three leads one or two shards; returns who leads which.
async fn lead_shards_round_robin(c: &Cluster, shards: u32) -> std::collections::BTreeMap<u32, u64> {
    c.leader().await;
    let leaders: std::collections::BTreeMap<u32, u64> = (0..shards).map(|s| (s, u64::from(s % 3) + 1)).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    for (&shard, &to) in &leaders {
        loop {
            let moved = c.node(0).admin().await.transfer_leader(pb::TransferLeaderRequest { shard, node_id: to }).await;
            if moved.is_ok_and(|m| m.into_inner().leader_id == to) {
                break;
            }
            assert!(Instant::now() < deadline, "shard {shard}'s leadership did not move to node {to}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    leaders
}

/// A bulk load (`idgraph_client::load`, what `idgraphctl load` runs) goes
/// on through `kill -9` of a node it streams to: the events that node's
/// stream had not answered are sent again where the routes then point, and
/// the load ends with every event answered, none failed, and every event's
/// profile readable. Each event creates a profile of its own, so each is
/// answered either as created or, if its first send had been applied before
/// the node died, as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_load_goes_on_through_kill_9_of_a_node_it_streams_to() {
    let mut c = Cluster::with_shards(3, 4).await;
    let leaders = lead_shards_round_robin(&c, 4).await;
    let n = 4000u64;
    let line = |i: u64| {
        let e = idgraph_client::EventLine {
            event_id: format!("bulk{i}"),
            timestamp_ms: 1_700_000_000_000,
            identifiers: vec![
                idgraph_client::IdentifierLine { kind: "anonymous_id".into(), value: format!("bulk-{i}") },
                idgraph_client::IdentifierLine { kind: "email".into(), value: format!("bulk{i}@shop.com") },
            ],
            traits: Default::default(),
            source: "bulk".into(),
        };
        serde_json::to_string(&e).unwrap() + "\n"
    };
    let text: String = (0..n).map(line).collect();
    let endpoints: Vec<String> = c.ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect();
    let cluster = idgraph_client::Cluster::connect(&endpoints, &idgraph_client::Credentials::default()).await.unwrap();
    assert_eq!(cluster.leaders(), leaders);
    let (answered, mut progress) = tokio::sync::watch::channel(0u64);
    let loading = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let events = idgraph_client::EventLines::new(std::io::Cursor::new(text));
            idgraph_client::load(&cluster, events, &idgraph_client::LoadOptions::default(), move |k| {
                answered.send_replace(k);
            })
            .await
        })
    };
    progress.wait_for(|k| *k >= 500).await.expect("the load answers events");
    // Node 1 leads shard 0 (and shard 3).
    c.nodes[0].as_mut().unwrap().signal(Signal::SIGKILL).unwrap();
    c.nodes[0] = None;
    let at_kill = *progress.borrow();
    let summary = tokio::time::timeout(Duration::from_secs(180), loading).await.expect("the load ends").unwrap().unwrap();
    eprintln!("bulk load: {at_kill} answered when node 1 was killed; {summary:?}");
    assert!(at_kill < n, "the load was still running when the node was killed");
    assert_eq!(summary.events, n, "{summary:?}");
    assert_eq!(summary.failed, 0, "{:?}", summary.errors);
    assert!(summary.resent > 0, "the dead node's unanswered events were sent again: {summary:?}");
    assert_eq!(summary.profiles_created + summary.duplicates, n, "each event created its profile once: {summary:?}");
    assert!(summary.duplicates <= summary.resent, "only events sent again can be duplicates: {summary:?}");
    for i in (0..n).step_by(20) {
        let found = cluster.get_profile(by_id("anonymous_id", &format!("bulk-{i}"))).await.unwrap();
        let emails: Vec<&str> = found.identifiers.iter().filter(|x| x.r#type == "email").map(|x| x.value.as_str()).collect();
        assert_eq!(emails, [format!("bulk{i}@shop.com")], "event bulk{i}'s profile");
    }
}

/// A node that advertises an address the client cannot reach (another
/// network's, say) is still reached over the endpoint the client was given:
/// the cluster client routes over the connection a node answered on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_client_routes_over_the_endpoint_given_when_the_advertised_address_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    // A free port: nothing listens there.
    let unreachable = format!("127.0.0.1:{}", free_ports(1)[0]);
    let node = idgraph_node::server::start(&idgraph_node::config::NodeConfig { advertise: unreachable.clone(), ..config(dir.path()) })
        .await
        .expect("node starts");
    let endpoint = format!("http://{}", node.addr());
    let cluster = idgraph_client::Cluster::connect(std::slice::from_ref(&endpoint), &idgraph_client::Credentials::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.leaders().get(&0) != Some(&1) {
        assert!(Instant::now() < deadline, "no route to shard 0's leader: {:?}", cluster.leaders());
        cluster.refresh().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let routes = graph(&node).await.get_routes(pb::GetRoutesRequest {}).await.unwrap().into_inner();
    assert_eq!(
        routes.nodes.iter().map(|n| n.addr.as_str()).collect::<Vec<_>>(),
        [unreachable.as_str()],
        "the node advertises the dead address"
    );
    for i in 0..20 {
        let acked = deliver_routed(&cluster, solo_event(i)).await;
        let found = cluster.get_profile(by_id("anonymous_id", &format!("solo-{i}"))).await.unwrap();
        assert_eq!(found.profile_id, acked.profile_id);
    }
}
