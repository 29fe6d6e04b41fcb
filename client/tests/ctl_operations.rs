//! `idgraphctl` against a protected node (TLS, bearer tokens): health
//! without a token, refusals by credential and role, the audit log, and a
//! backup restored into a second node.

mod common;

use common::{ok, refused};
use idgraph_node::config::NodeConfig;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const CLIENT: &str = "ctl-client-secret-0123";
const ADMIN: &str = "ctl-admin-secret-45678";

fn ctl(endpoint: &str, extra: &[&str], args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_idgraphctl"))
        .env_remove("IDGRAPH_TOKEN")
        .arg("--endpoint")
        .arg(endpoint)
        .args(extra)
        .args(args)
        .output()
        .expect("idgraphctl runs")
}

/// A certificate authority and a certificate for 127.0.0.1, as PEM files.
fn pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (dir.join("ca.crt"), dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_against_a_protected_node_and_a_backup_restored_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let config = NodeConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("a"),
        auth_tokens: format!("app:client:{CLIENT},ops:admin:{ADMIN}"),
        tls_cert_file: Some(cert),
        tls_key_file: Some(key),
        tls_ca_file: Some(ca.clone()),
        ..NodeConfig::default()
    };
    let node = idgraph_node::server::start(&config).await.unwrap();
    // An http:// endpoint with a CA certificate is dialled over TLS.
    let ep = format!("http://{}", node.addr());
    let tls = ["--ca-cert", ca.to_str().unwrap()];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl(&ep, &tls, &["health"]).status.success() {
        assert!(Instant::now() < deadline, "the node is not SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ok(ctl(&ep, &tls, &["health"])).trim(), "SERVING");

    let event = ["identify", "--id", "email=dana@shop.example", "--id", "device_id=dana-phone"];
    assert!(refused(ctl(&ep, &tls, &event)).contains("Unauthenticated"));
    let client = ["--ca-cert", ca.to_str().unwrap(), "--token", CLIENT];
    ok(ctl(&ep, &client, &event));
    let shown = ok(ctl(&ep, &client, &["get", "--id", "email=dana@shop.example", "-o", "json"]));
    let profile: serde_json::Value = serde_json::from_str(&shown).unwrap();
    let profile_id = profile["profile_id"].as_str().unwrap().to_string();
    let e = refused(ctl(&ep, &client, &["delete", "--profile", &profile_id]));
    assert!(e.contains("PermissionDenied") && e.contains("admin"), "{e}");
    // The token from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_idgraphctl"))
        .env("IDGRAPH_TOKEN", ADMIN)
        .args(["--endpoint", &ep, "--ca-cert", ca.to_str().unwrap(), "stats", "-o", "json"])
        .output()
        .unwrap();
    assert!(ok(out).contains("\"profiles\": 1"));

    let admin = ["--ca-cert", ca.to_str().unwrap(), "--token", ADMIN];
    let backup = dir.path().join("backup");
    assert!(ok(ctl(&ep, &admin, &["backup", backup.to_str().unwrap()])).contains("backed up 1 shards"));
    for f in ["manifest.json", "digests.json", "shard-0000.img"] {
        assert!(backup.join(f).exists(), "{f}");
    }
    assert!(refused(ctl(&ep, &admin, &["backup", backup.to_str().unwrap()])).contains("not empty"));
    let audit: serde_json::Value = serde_json::from_str(&ok(ctl(&ep, &admin, &["audit", "list", "-o", "json"]))).unwrap();
    let actions: Vec<&str> = audit["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["Backup"]);
    assert!(ok(ctl(&ep, &admin, &["audit", "list"])).contains("ops"));

    // Into another node: the same profile.
    let other = NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.path().join("b"), ..NodeConfig::default() };
    let b = idgraph_node::server::start(&other).await.unwrap();
    let ep_b = format!("http://{}", b.addr());
    while !ctl(&ep_b, &[], &["health"]).status.success() {
        assert!(Instant::now() < deadline, "the second node is not SERVING");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok(ctl(&ep_b, &[], &["restore", backup.to_str().unwrap()])).contains("restored 1 shards"));
    let restored: serde_json::Value =
        serde_json::from_str(&ok(ctl(&ep_b, &[], &["get", "--id", "device_id=dana-phone", "-o", "json"]))).unwrap();
    assert_eq!(restored["profile_id"], profile_id.as_str());
    node.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
