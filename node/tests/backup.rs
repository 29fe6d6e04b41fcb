//! Backup and restore on real node processes: a backup taken while events
//! stream in restores to a new cluster holding every event acknowledged
//! before it began, with replicas that agree; a backup of a quiet cluster
//! restores to the same profiles, identifier by identifier; bad restores are
//! refused and change nothing.

mod common;

use common::*;
use futures::StreamExt;
use idgraph_proto::v1 as pb;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Cluster {
    _dirs: Vec<tempfile::TempDir>,
    nodes: Vec<NodeProcess>,
}

async fn cluster(shards: u32) -> Cluster {
    cluster_with(shards, &[]).await
}

async fn cluster_with(shards: u32, extra: &[&str]) -> Cluster {
    let ports = free_ports(3);
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let members = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (listen, id, shards) = (format!("127.0.0.1:{port}"), (i + 1).to_string(), shards.to_string());
        let mut args = vec!["--listen", &listen, "--id", &id, "--initial-cluster", &members, "--shards", &shards];
        args.extend_from_slice(extra);
        nodes.push(start_process(dirs[i].path(), &args).await);
    }
    Cluster { _dirs: dirs, nodes }
}

/// Person `p`'s `n`-th event: two of the person's identifiers, so that
/// persons grow across shards and events merge.
fn person_event(p: usize, n: usize) -> pb::IdentifyRequest {
    let ids =
        [("email", format!("p{p}@shop.example")), ("device_id", format!("dev-{p}-{}", n % 3)), ("anonymous_id", format!("anon-{p}-{n}"))];
    let (a, b) = (&ids[n % 3], &ids[(n + 1) % 3]);
    event(&format!("e-{p}-{n}"), &[(a.0, &a.1), (b.0, &b.1)])
}

async fn send(node: &NodeProcess, req: pb::IdentifyRequest) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut client = node.client().await;
    loop {
        match client.identify(req.clone()).await {
            Ok(_) => return,
            Err(s) if matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Aborted) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("identify {}: {s:?}", req.event_id),
        }
    }
}

async fn take_backup(node: &NodeProcess) -> Vec<pb::BackupChunk> {
    let mut stream = node.admin().await.backup(pb::BackupRequest {}).await.expect("backup starts").into_inner();
    let mut chunks = Vec::new();
    while let Some(c) = stream.next().await {
        chunks.push(c.expect("backup chunk"));
    }
    chunks
}

async fn restore(node: &NodeProcess, chunks: Vec<pb::BackupChunk>) -> Result<pb::RestoreResponse, tonic::Status> {
    node.admin().await.restore(futures::stream::iter(chunks)).await.map(|r| r.into_inner())
}

/// Each identifier's profile: id and identifiers (linearizable reads).
async fn profiles(node: &NodeProcess, ids: &BTreeSet<(String, String)>) -> BTreeMap<(String, String), Option<(String, BTreeSet<String>)>> {
    let mut client = node.client().await;
    let mut out = BTreeMap::new();
    for (k, v) in ids {
        let found = match client.get_profile(by_id(k, v)).await {
            Ok(p) => {
                let p = p.into_inner();
                Some((p.profile_id, p.identifiers.iter().map(|i| format!("{}={}", i.r#type, i.value)).collect()))
            }
            Err(s) if s.code() == tonic::Code::NotFound => None,
            Err(s) => panic!("get_profile: {s:?}"),
        };
        out.insert((k.clone(), v.clone()), found);
    }
    out
}

/// Waits until every shard's replicas at one applied index agree.
async fn replicas_agree(c: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut by_shard: BTreeMap<u32, BTreeSet<(u64, String)>> = BTreeMap::new();
        for n in &c.nodes {
            for d in n.admin().await.get_digests(pb::GetDigestsRequest {}).await.unwrap().into_inner().shards {
                by_shard.entry(d.shard).or_default().insert((d.applied_index, d.digest));
            }
        }
        if by_shard.values().all(|s| s.len() == 1) {
            return;
        }
        assert!(Instant::now() < deadline, "replicas do not converge: {by_shard:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After a restore: no transaction part stays prepared (recovery settles
/// what the cut caught half-way), and every identifier's profile holds it
/// and is the profile of each identifier it holds (no torn merge).
async fn settled_and_whole(c: &Cluster, ids: &BTreeSet<(String, String)>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    'settle: loop {
        for n in &c.nodes {
            let status = n.admin().await.get_cluster(pb::GetClusterRequest {}).await.unwrap().into_inner();
            if status.shards.iter().any(|s| s.prepared_txns > 0) {
                assert!(Instant::now() < deadline, "prepared parts left after the restore");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue 'settle;
            }
        }
        break;
    }
    let found = profiles(&c.nodes[0], ids).await;
    let mut by_member: BTreeMap<String, String> = BTreeMap::new();
    for ((k, v), f) in &found {
        if let Some((profile, members)) = f {
            assert!(members.contains(&format!("{k}={v}")), "{k}={v}'s profile does not hold it");
            for m in members {
                if let Some(other) = by_member.insert(m.clone(), profile.clone()) {
                    assert_eq!(&other, profile, "{m} is in two profiles");
                }
            }
        }
    }
    for ((k, v), f) in &found {
        if let Some((profile, _)) = f {
            assert_eq!(by_member.get(&format!("{k}={v}")), Some(profile));
        }
    }
}

/// One counter's value from a node's `/metrics`.
async fn metric(addr: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    raw.lines().find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("{name} not in {raw}"))
}

fn identifiers_of(events: &[pb::IdentifyRequest]) -> BTreeSet<(String, String)> {
    events.iter().flat_map(|e| e.identifiers.iter().map(|i| (i.r#type.clone(), i.value.to_lowercase()))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_every_acknowledged_event_and_a_quiet_one_every_profile() {
    let source = cluster_with(4, &["--metrics-listen", "127.0.0.1:0"]).await;
    let mut acked: Vec<pb::IdentifyRequest> = Vec::new();
    for p in 0..40 {
        for n in 0..3 {
            let e = person_event(p, n);
            send(&source.nodes[p % 3], e.clone()).await;
            acked.push(e);
        }
    }

    // Events keep coming while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let during: Arc<Mutex<Vec<pb::IdentifyRequest>>> = Arc::default();
    // Four clients, so that several cross-shard commits meet the fence.
    let load: Vec<_> = (0..4)
        .map(|c| {
            let (stop, during) = (stop.clone(), during.clone());
            let endpoint = source.nodes[c % 3].endpoint();
            tokio::spawn(async move {
                let mut client = pb::identity_graph_client::IdentityGraphClient::connect(endpoint).await.unwrap();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let e = person_event(1000 + c * 100 + i % 25, 3 + i / 25);
                    if client.identify(e.clone()).await.is_ok() {
                        during.lock().unwrap().push(e);
                    }
                    i += 1;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_backup = { during.lock().unwrap().clone() };
    let under_load = take_backup(&source.nodes[0]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let streamed = during.lock().unwrap().len();
    assert!(streamed > before_backup.len(), "events were acknowledged while the backup ran");
    let mut held = 0.0;
    for n in &source.nodes {
        held += metric(n.metrics_addr.as_deref().expect("metrics address"), "idgraph_backup_held_steps_total").await;
    }
    assert!(held > 0.0, "cross-shard steps waited for the backup's fence");
    assert!(under_load[0].manifest_json.contains("\"shard_count\":4"), "{}", under_load[0].manifest_json);
    assert_eq!(under_load.iter().filter(|c| !c.digest.is_empty()).count(), 4, "one image per shard");

    // Into a new cluster: every event acknowledged before the backup began.
    let first = cluster(4).await;
    let r = restore(&first.nodes[2], under_load.clone()).await.expect("restore");
    assert_eq!(r.shards, 4);
    let mut wanted = acked.clone();
    wanted.extend(before_backup);
    let ids = identifiers_of(&wanted);
    for ((k, v), found) in profiles(&first.nodes[0], &ids).await {
        assert!(found.is_some(), "{k}={v} acknowledged before the backup is missing");
    }
    let every: Vec<pb::IdentifyRequest> = acked.iter().cloned().chain(during.lock().unwrap().iter().cloned()).collect();
    settled_and_whole(&first, &identifiers_of(&every)).await;
    replicas_agree(&first).await;
    // Bad restores change nothing: a cluster with records, a torn image,
    // another shard count.
    let e = restore(&first.nodes[0], under_load.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    drop(first);
    let other = cluster(2).await;
    let e = restore(&other.nodes[0], under_load.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("4 shards"), "{}", e.message());
    drop(other);

    // A backup of the quiet source restores to the same profiles.
    acked.extend(during.lock().unwrap().iter().cloned());
    let quiet = take_backup(&source.nodes[1]).await;
    let second = cluster(4).await;
    let mut torn = quiet.clone();
    if let Some(c) = torn.iter_mut().find(|c| !c.data.is_empty()) {
        c.data[0] ^= 0xff;
    }
    let e = restore(&second.nodes[0], torn).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("digest"), "{}", e.message());
    restore(&second.nodes[1], quiet).await.expect("restore of the quiet backup");
    replicas_agree(&second).await;
    let ids = identifiers_of(&acked);
    let (want, got) = (profiles(&source.nodes[0], &ids).await, profiles(&second.nodes[0], &ids).await);
    assert_eq!(want.len(), got.len());
    for (id, w) in &want {
        assert!(w.is_some(), "{id:?} on the source");
        assert_eq!(w, &got[id], "{id:?}: the restored profile differs");
    }
    // The metadata came along: the source's audit log (its first backup,
    // recorded when it ended; the second ended after its own metadata was
    // read), then this cluster's own restores (the torn one refused).
    let audit = second.nodes[0].admin().await.list_audit(pb::ListAuditRequest::default()).await.unwrap().into_inner().entries;
    let actions: Vec<(&str, &str)> = audit.iter().map(|e| (e.action.as_str(), e.outcome.as_str())).collect();
    assert_eq!(actions, [("Backup", "OK"), ("Restore", "INVALID_ARGUMENT"), ("Restore", "OK")], "{audit:#?}");
}
