//! Shared by the integration tests: a node on a free loopback port with its
//! own data directory, and clients connected to it over a real socket.

#![allow(dead_code)]

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

/// A real `idgraph-node` process, reading the address it bound from its
/// first line of output. Killed when dropped.
pub struct NodeProcess {
    pub child: std::process::Child,
    pub addr: String,
}

impl NodeProcess {
    pub fn start(dir: &std::path::Path, extra: &[&str]) -> NodeProcess {
        NodeProcess::start_with_env(dir, extra, &[])
    }

    pub fn start_with_env(dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> NodeProcess {
        use std::io::{BufRead, BufReader};
        let listen = extra.windows(2).find(|w| w[0] == "--listen").map(|w| w[1]).unwrap_or("127.0.0.1:0");
        let extra: Vec<&str> = extra.iter().copied().filter(|a| *a != "--listen" && *a != listen).collect();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_idgraph-node"))
            .args(["--listen", listen, "--data-dir"])
            .arg(dir)
            .args(&extra)
            .env("IDGRAPH_LOG_LEVEL", std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "warn".into()))
            .env("IDGRAPH_SHUTDOWN_GRACE_MS", "500")
            .env("IDGRAPH_RAFT_SNAPSHOT_LOGS", "100")
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("spawn idgraph-node");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr =
            line.trim().strip_prefix("idgraph-node listening on ").unwrap_or_else(|| panic!("unexpected first line {line:?}")).to_string();
        NodeProcess { child, addr }
    }

    pub async fn client(&self) -> IdentityGraphClient<Channel> {
        IdentityGraphClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::connect(format!("http://{}", self.addr)).await.unwrap()
    }

    pub fn signal(&mut self, sig: &str) {
        let ok = std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap().success();
        assert!(ok, "kill {sig}");
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Free loopback ports, found by binding port 0.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}
