//! Operating a protected cluster: three real `idgraph-node` processes with
//! TLS (mutual between nodes), bearer tokens with roles, the audit log, the
//! Prometheus endpoint (parsed by a Prometheus text-format parser) and
//! plain-text health on the metrics port, and no identity value in any log
//! line of the run.

mod common;

use common::*;
use idgraph_proto::auth::BearerToken;
use idgraph_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::identity_graph_client::IdentityGraphClient;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

const CLIENT: &str = "client-secret-7f3a9c1e5b";
const ADMIN: &str = "admin-secret-2d8e4b6a0c";
const PEER: &str = "peer-secret-9b1f3d5e7a";
const PEER_ROTATED: &str = "peer-secret-rotated-4c6e8a0b2d";
/// Identity values of the run; none may appear in a log line.
const SECRET_VALUES: &[&str] = &["ann.ops@shop.example", "bob.ops@shop.example", "carol.ops@shop.example", "dev-ann-77", "dev-bob-88"];

/// A certificate authority and one certificate for every node (server and
/// client use, for 127.0.0.1 and localhost), in PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "idgraph test authority");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "idgraph node");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let out = Pki { ca: dir.join("ca.crt"), cert: dir.join("tls.crt"), key: dir.join("tls.key") };
    std::fs::write(&out.ca, ca.pem()).unwrap();
    std::fs::write(&out.cert, cert.pem()).unwrap();
    std::fs::write(&out.key, key.serialize_pem()).unwrap();
    out
}

struct Protected {
    _dirs: Vec<tempfile::TempDir>,
    pki: Pki,
    /// The token file every node reads (and reads again when it changes).
    tokens: PathBuf,
    nodes: Vec<NodeProcess>,
    logs: Vec<PathBuf>,
}

impl Protected {
    async fn start() -> Protected {
        let ports = free_ports(3);
        let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let pki = pki(dirs[3].path());
        let tokens = dirs[3].path().join("tokens");
        std::fs::write(&tokens, format!("# name:role:secret\napp:client:{CLIENT}\nops:admin:{ADMIN}\nnodes:peer:{PEER}\n")).unwrap();
        let members = ports.iter().enumerate().map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1)).collect::<Vec<_>>().join(",");
        let mut nodes = Vec::new();
        let mut logs = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let log = dirs[3].path().join(format!("node-{i}.log"));
            let listen = format!("127.0.0.1:{port}");
            let id = (i + 1).to_string();
            let launch = launch(dirs[i].path(), &["--listen", &listen, "--id", &id, "--initial-cluster", &members, "--shards", "2"])
                .arg("--metrics-listen")
                .arg("127.0.0.1:0")
                .env("IDGRAPH_TLS_CERT_FILE", pki.cert.display().to_string())
                .env("IDGRAPH_TLS_KEY_FILE", pki.key.display().to_string())
                .env("IDGRAPH_TLS_CA_FILE", pki.ca.display().to_string())
                .env("IDGRAPH_TLS_PEER_MTLS", "true")
                .env("IDGRAPH_AUTH_TOKENS_FILE", tokens.display().to_string())
                // Every log line a node writes is checked for identity values.
                .env("IDGRAPH_LOG_LEVEL", "debug,h2=info,tower=info,hyper=info,rustls=info,tonic=info,openraft=info,sled=info")
                .log_to(&log);
            nodes.push(launch.start().await.expect("a protected node starts"));
            logs.push(log);
        }
        Protected { _dirs: dirs, pki, tokens, nodes, logs }
    }

    fn tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(&self.pki.ca).unwrap())).domain_name("localhost")
    }

    async fn channel(&self, i: usize, tls: ClientTlsConfig) -> Channel {
        Endpoint::from_shared(format!("https://{}", self.nodes[i].addr)).unwrap().tls_config(tls).unwrap().connect().await.unwrap()
    }

    async fn graph(&self, i: usize, token: Option<&str>) -> IdentityGraphClient<InterceptedService<Channel, BearerToken>> {
        IdentityGraphClient::with_interceptor(self.channel(i, self.tls()).await, bearer(token))
    }

    async fn admin(&self, i: usize, token: Option<&str>) -> AdminClient<InterceptedService<Channel, BearerToken>> {
        AdminClient::with_interceptor(self.channel(i, self.tls()).await, bearer(token))
    }

    fn metrics_addr(&self, i: usize) -> &str {
        self.nodes[i].metrics_addr.as_deref().expect("the node printed its metrics address")
    }
}

fn bearer(token: Option<&str>) -> BearerToken {
    token.map_or_else(BearerToken::none, |t| BearerToken::new(t).unwrap())
}

/// Waits until every node's plain-text health (on its metrics port) says
/// SERVING.
async fn wait_serving(c: &Protected) {
    use tonic_health::pb::health_check_response::ServingStatus;
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..3 {
        loop {
            let ch = Endpoint::from_shared(format!("http://{}", c.metrics_addr(i))).unwrap().connect().await.unwrap();
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
            let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
            if r.status == ServingStatus::Serving as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} not SERVING within 60 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Sends an event until it is acknowledged (UNAVAILABLE: outcome unknown,
/// the same event again).
async fn identify(g: &mut IdentityGraphClient<InterceptedService<Channel, BearerToken>>, req: pb::IdentifyRequest) -> pb::IdentifyResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match g.identify(req.clone()).await {
            Ok(r) => return r.into_inner(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(s) => panic!("identify: {s:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protected_cluster_refuses_wrong_credentials_audits_operators_and_exports_metrics() {
    let c = Protected::start().await;
    wait_serving(&c).await;

    // Plain text to a TLS port: no connection.
    let plain = Endpoint::from_shared(format!("http://{}", c.nodes[0].addr)).unwrap().connect().await;
    if let Ok(ch) = plain {
        let r = IdentityGraphClient::new(ch).get_profile(by_id("email", "x@y.z")).await;
        assert!(r.is_err(), "a plain-text call to a TLS port was answered");
    }

    // No token, a wrong token: UNAUTHENTICATED, and nothing is written.
    let ann = event("ops-1", &[("email", SECRET_VALUES[0]), ("device_id", SECRET_VALUES[3])]);
    for token in [None, Some("not-a-token-at-all-1234")] {
        let e = c.graph(0, token).await.identify(ann.clone()).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    }
    let mut app = c.graph(0, Some(CLIENT)).await;
    let e = app.get_profile(by_id("email", SECRET_VALUES[0])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "a refused Identify wrote nothing: {e:?}");

    // The client role: events and profiles.
    let a = identify(&mut app, ann).await;
    let b = identify(&mut c.graph(1, Some(CLIENT)).await, event("ops-2", &[("email", SECRET_VALUES[1]), ("device_id", SECRET_VALUES[4])]))
        .await;
    let carol = identify(&mut app, event("ops-3", &[("email", SECRET_VALUES[2])])).await;
    assert!(a.created && b.created && carol.created);
    let found = app.get_profile(by_id("email", SECRET_VALUES[0])).await.unwrap().into_inner();
    assert_eq!(found.profile_id, a.profile_id);

    // ... but not operators' calls: PERMISSION_DENIED, nothing changed.
    let delete = |profile: &str| pb::DeleteProfileRequest { key: Some(pb::delete_profile_request::Key::ProfileId(profile.into())) };
    let e = app.delete_profile(delete(&carol.profile_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("app") && e.message().contains("admin"), "{}", e.message());
    assert_eq!(app.get_profile(by_profile(&carol.profile_id)).await.unwrap().into_inner().profile_id, carol.profile_id);
    let e = c.admin(1, Some(CLIENT)).await.get_cluster(pb::GetClusterRequest {}).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c.admin(1, None).await.list_audit(pb::ListAuditRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // Peer calls need the peer role and, with mutual TLS, a client certificate.
    use pb::raft_transport_client::RaftTransportClient;
    let ask = pb::RaftMessage { shard: 0, payload: Vec::new() };
    let mut no_cert = RaftTransportClient::with_interceptor(c.channel(2, c.tls()).await, bearer(Some(PEER)));
    assert_eq!(no_cert.cluster_map(ask.clone()).await.unwrap_err().code(), Code::Unauthenticated);
    let identity = Identity::from_pem(std::fs::read(&c.pki.cert).unwrap(), std::fs::read(&c.pki.key).unwrap());
    let with_cert = c.channel(2, c.tls().identity(identity)).await;
    let e = RaftTransportClient::with_interceptor(with_cert.clone(), bearer(Some(ADMIN))).cluster_map(ask.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    RaftTransportClient::with_interceptor(with_cert, bearer(Some(PEER))).cluster_map(ask).await.expect("a peer with its certificate");

    // The admin role: operator actions, each recorded in the audit log.
    let mut ops = c.graph(2, Some(ADMIN)).await;
    let merged = ops
        .merge(pb::MergeRequest {
            profiles: [&a.profile_id, &b.profile_id]
                .iter()
                .map(|p| pb::ProfileRef { key: Some(pb::profile_ref::Key::ProfileId((*p).clone())) })
                .collect(),
            force: false,
            reason: "same person, confirmed by support".into(),
        })
        .await
        .unwrap()
        .into_inner();
    ops.unmerge(pb::UnmergeRequest {
        target: Some(pb::unmerge_request::Target::MergeId(merged.merge_id.clone())),
        reason: "support was wrong".into(),
    })
    .await
    .unwrap();
    // A GDPR erasure, asked by identifier.
    let erased = ops
        .delete_profile(pb::DeleteProfileRequest { key: Some(pb::delete_profile_request::Key::Identifier(id("email", SECRET_VALUES[2]))) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(erased.profile_id, carol.profile_id);
    let e = ops.delete_profile(delete(&carol.profile_id)).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let mut admin = c.admin(0, Some(ADMIN)).await;
    let rules = idgraph_core::rules::BUILTIN_RULES_TOML.replacen("version = \"", "version = \"ops-test-", 1);
    admin.put_rule_set(pb::PutRuleSetRequest { toml: rules }).await.expect("an admin stores a rule set");

    let audit = admin.list_audit(pb::ListAuditRequest::default()).await.unwrap().into_inner().entries;
    let seen: Vec<(&str, &str, &str)> = audit.iter().map(|e| (e.who.as_str(), e.action.as_str(), e.outcome.as_str())).collect();
    assert_eq!(
        seen,
        [
            ("ops", "Merge", "OK"),
            ("ops", "Unmerge", "OK"),
            ("ops", "DeleteProfile", "OK"),
            ("ops", "DeleteProfile", "NOT_FOUND"),
            ("ops", "PutRuleSet", "OK")
        ],
        "every operator action, in order; refused credentials are no action: {audit:#?}"
    );
    assert!(audit[0].target.contains(&merged.profile_id) && audit[1].target.contains(&merged.merge_id), "{audit:#?}");
    assert!(audit[2].target.contains(&carol.profile_id), "{:?}", audit[2]);
    assert!(audit.windows(2).all(|w| w[0].id < w[1].id));
    let every_entry = format!("{audit:?}");
    for v in SECRET_VALUES {
        assert!(!every_entry.contains(v), "the audit log names an identity value");
    }
    // The same log from another node, and paged.
    let page = c.admin(1, Some(ADMIN)).await.list_audit(pb::ListAuditRequest { after: audit[1].id.clone(), limit: 2 }).await.unwrap();
    assert_eq!(page.into_inner().entries, audit[2..4].to_vec());

    // Metrics, scraped and parsed as Prometheus does.
    let scrapes = [scrape(c.metrics_addr(0)).await, scrape(c.metrics_addr(1)).await, scrape(c.metrics_addr(2)).await];
    let events: f64 = scrapes.iter().map(|s| value(s, "idgraph_events_total", &[]).unwrap()).sum();
    assert_eq!(events, 3.0, "one count per acknowledged event, on the node that took it");
    let refused = value(&scrapes[0], "idgraph_requests_total", &[("method", "Identify"), ("code", "UNAUTHENTICATED")]).unwrap();
    assert_eq!(refused, 2.0);
    assert!(value(&scrapes[0], "idgraph_request_duration_seconds", &[("method", "Identify")]).unwrap() >= 3.0);
    assert_eq!(value(&scrapes[2], "idgraph_requests_total", &[("method", "DeleteProfile"), ("code", "OK")]), Some(1.0));
    for (i, s) in scrapes.iter().enumerate() {
        assert_eq!(value(s, "idgraph_ready", &[]), Some(1.0), "node {i}");
        assert!(value(s, "idgraph_log_bytes", &[]).unwrap() > 0.0 && value(s, "idgraph_storage_bytes", &[]).unwrap() > 0.0);
        for group in ["meta", "shard-0", "shard-1"] {
            assert!(value(s, "idgraph_raft_term", &[("group", group)]).unwrap() >= 1.0, "node {i} {group}");
        }
    }
    for group in ["meta", "shard-0", "shard-1"] {
        let leaders = scrapes.iter().filter(|s| value(s, "idgraph_raft_role", &[("group", group)]) == Some(2.0)).count();
        assert_eq!(leaders, 1, "one leader of {group}");
    }
    let listed = include_str!("../../deploy/metrics.txt");
    for name in listed.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        assert!(scrapes[0].samples.iter().any(|s| s.metric == name), "{name} is listed in deploy/metrics.txt but not exported");
    }

    // No identity value in any log line of the run.
    drop(c.nodes);
    for log in &c.logs {
        let text = std::fs::read_to_string(log).unwrap();
        assert!(text.lines().count() > 10, "{} holds the debug log", log.display());
        for v in SECRET_VALUES {
            assert!(!text.contains(v), "{} logs an identity value", log.display());
        }
    }
}

/// Exchanges opened by each node, summed over the nodes.
async fn exchanges_opened(c: &Protected) -> f64 {
    let mut total = 0.0;
    for i in 0..3 {
        let s = scrape(c.metrics_addr(i)).await;
        total += value(&s, "idgraph_requests_total", &[("method", "Exchange"), ("code", "OK")]).unwrap_or(0.0);
    }
    total
}

/// The peer token rotated in the token file: once the nodes read the file
/// again, the old token opens nothing, the exchanges opened with it end
/// (their token is checked again while they stay open), new ones open with
/// the new token, and writes through every node go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_peer_token_ends_the_exchanges_opened_with_the_old_one() {
    let c = Protected::start().await;
    wait_serving(&c).await;
    for i in 0..3 {
        let ev = event(&format!("rot-a-{i}"), &[("email", SECRET_VALUES[i]), ("device_id", SECRET_VALUES[3 + i % 2])]);
        identify(&mut c.graph(i, Some(CLIENT)).await, ev).await;
    }
    let before = exchanges_opened(&c).await;
    assert!(before >= 2.0, "the nodes exchange appends and forwarded writes: {before} exchanges");

    std::fs::write(&c.tokens, format!("# rotated\napp:client:{CLIENT}\nops:admin:{ADMIN}\nnodes:peer:{PEER_ROTATED}\n")).unwrap();
    use pb::raft_transport_client::RaftTransportClient;
    let identity = Identity::from_pem(std::fs::read(&c.pki.cert).unwrap(), std::fs::read(&c.pki.key).unwrap());
    let ask = pb::RaftMessage { shard: 0, payload: Vec::new() };
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..3 {
        let with_cert = c.channel(i, c.tls().identity(identity.clone())).await;
        loop {
            let old = RaftTransportClient::with_interceptor(with_cert.clone(), bearer(Some(PEER))).cluster_map(ask.clone()).await;
            if matches!(&old, Err(e) if e.code() == Code::Unauthenticated) {
                break;
            }
            assert!(Instant::now() < deadline, "node {i} still takes the old peer token 30 s after the file changed: {old:?}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    // An exchange opened with the old token ends within a recheck.
    let ended = loop {
        let logged = c.logs.iter().any(|l| std::fs::read_to_string(l).unwrap_or_default().contains("no longer passes the token check"));
        if logged || Instant::now() > deadline {
            break logged;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ended, "no node ended an exchange opened with the revoked token");
    for i in 0..3 {
        let ev = event(&format!("rot-b-{i}"), &[("email", SECRET_VALUES[i]), ("device_id", SECRET_VALUES[4 - i % 2])]);
        identify(&mut c.graph(i, Some(CLIENT)).await, ev).await;
    }
    let after = exchanges_opened(&c).await;
    assert!(after > before, "new exchanges opened with the rotated token: {before} before, {after} after");
}

/// A client token revoked in the token file ends the `IdentifyStream`
/// opened with it: the events sent after the node read the file again are
/// answered with UNAUTHENTICATED and not applied, and the stream ends.
/// Operators' calls with other tokens go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_client_token_ends_the_streams_opened_with_it() {
    use futures::StreamExt;
    let c = Protected::start().await;
    wait_serving(&c).await;
    let mut app = c.graph(0, Some(CLIENT)).await;
    // The cluster writes (a unary call retried past elections) before the
    // stream opens.
    identify(&mut app, event("rev-0", &[("email", "erin.ops@shop.example")])).await;
    let (events, inbound) = tokio::sync::mpsc::channel(4);
    let mut answers = app.identify_stream(tokio_stream::wrappers::ReceiverStream::new(inbound)).await.unwrap().into_inner();
    events.send(event("rev-1", &[("email", "dave.ops@shop.example")])).await.unwrap();
    let first = answers.next().await.expect("an answer").expect("taken before the revocation");
    assert!(first.created && first.error.is_none(), "{first:?}");

    std::fs::write(&c.tokens, format!("# app revoked\nops:admin:{ADMIN}\nnodes:peer:{PEER}\n")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = c.graph(0, Some(CLIENT)).await.get_profile(by_id("email", "dave.ops@shop.example")).await;
        if matches!(&r, Err(e) if e.code() == Code::Unauthenticated) {
            break;
        }
        assert!(Instant::now() < deadline, "node 0 still takes the revoked token 30 s after the file changed: {r:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    events.send(event("rev-2", &[("email", "frank.ops@shop.example")])).await.unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(10), answers.next()).await.expect("an answer within 10 s").expect("an answer");
    let e = refused.expect_err("an event read after the revocation is refused");
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("revoked") && e.message().contains("stream"), "{}", e.message());
    let end = tokio::time::timeout(Duration::from_secs(10), answers.next()).await.expect("the stream ends within 10 s");
    assert!(end.is_none(), "the stream goes on after the refusal: {end:?}");

    let mut ops = c.graph(0, Some(ADMIN)).await;
    let e = ops.get_profile(by_id("email", "frank.ops@shop.example")).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "the refused event was applied: {e:?}");
    let kept = ops.get_profile(by_id("email", "dave.ops@shop.example")).await.unwrap().into_inner();
    assert_eq!(kept.profile_id, first.profile_id, "the event taken before the revocation stays");
}
