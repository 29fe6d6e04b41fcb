//! Shared by the integration tests: a node on a free loopback port with its
//! own data directory, and clients connected to it over a real socket.

#![allow(dead_code, unused_imports)]

use idgraph_node::config::NodeConfig;
use idgraph_node::server::{start, RunningNode};
use idgraph_proto::v1 as pb;
use pb::admin_client::AdminClient;
use pb::identity_graph_client::IdentityGraphClient;
use std::path::Path;
use tonic::transport::Channel;

pub fn config(dir: &Path) -> NodeConfig {
    NodeConfig { listen: "127.0.0.1:0".parse().unwrap(), data_dir: dir.to_path_buf(), ..NodeConfig::default() }
}

pub async fn node(dir: &Path) -> RunningNode {
    start(&config(dir)).await.expect("node starts")
}

pub async fn channel(node: &RunningNode) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr())).unwrap().connect().await.expect("connect")
}

pub async fn graph(node: &RunningNode) -> IdentityGraphClient<Channel> {
    IdentityGraphClient::new(channel(node).await)
}

pub async fn admin(node: &RunningNode) -> AdminClient<Channel> {
    AdminClient::new(channel(node).await)
}

pub fn id(kind: &str, value: &str) -> pb::Identifier {
    pb::Identifier { r#type: kind.into(), value: value.into() }
}

pub fn event(event_id: &str, ids: &[(&str, &str)]) -> pb::IdentifyRequest {
    pb::IdentifyRequest {
        event_id: event_id.into(),
        timestamp_ms: 0,
        identifiers: ids.iter().map(|(k, v)| id(k, v)).collect(),
        traits: None,
        source: "test".into(),
    }
}

pub fn by_id(kind: &str, value: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::Identifier(id(kind, value))), ..Default::default() }
}

pub fn by_profile(profile_id: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::ProfileId(profile_id.into())), ..Default::default() }
}

/// A real `idgraph-node` process (the shared harness, `idgraph-testkit`).
pub use idgraph_testkit::NodeProcess;
pub use nix::sys::signal::Signal;

/// How these tests start this package's node binary on `dir`: `extra` are
/// its arguments, and `--listen ADDR` among them picks its address (a free
/// port otherwise).
pub fn launch(dir: &Path, extra: &[&str]) -> idgraph_testkit::NodeLaunch {
    let mut launch =
        idgraph_testkit::NodeLaunch::new(env!("CARGO_BIN_EXE_idgraph-node"), dir, "TEST_NODE_LOG").env("IDGRAPH_RAFT_SNAPSHOT_LOGS", "100");
    let mut args = extra.iter();
    while let Some(arg) = args.next() {
        launch = match (*arg, args.clone().next()) {
            ("--listen", Some(addr)) => {
                args.next();
                launch.listen(*addr)
            }
            _ => launch.arg(arg),
        };
    }
    launch
}

/// Starts a node process (see [`launch`]) and waits until it listens.
pub async fn start_process(dir: &Path, extra: &[&str]) -> NodeProcess {
    launch(dir, extra).start().await.expect("the node process starts")
}

/// gRPC clients of a node process, over a real socket.
pub trait Clients {
    fn client(&self) -> impl std::future::Future<Output = IdentityGraphClient<Channel>>;
    fn admin(&self) -> impl std::future::Future<Output = AdminClient<Channel>>;
}

impl Clients for NodeProcess {
    async fn client(&self) -> IdentityGraphClient<Channel> {
        IdentityGraphClient::connect(self.endpoint()).await.unwrap()
    }

    async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(self.endpoint()).await.unwrap()
    }
}

/// Free loopback ports, found by binding port 0.
pub fn free_ports(n: usize) -> Vec<u16> {
    idgraph_testkit::free_ports(n).expect("free loopback ports")
}

/// `GET /metrics` over a plain socket, as Prometheus scrapes it.
pub async fn scrape(addr: &str) -> prometheus_parse::Scrape {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    // A chunked body: the chunk sizes are lines of their own.
    let text: String = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, after)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
        out
    } else {
        body.to_string()
    };
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("Prometheus text format")
}

pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => *v,
            prometheus_parse::Value::Histogram(b) => b.iter().map(|b| b.count).fold(0.0, f64::max),
            prometheus_parse::Value::Summary(_) => f64::NAN,
        })
        .reduce(|a, b| a + b)
}
