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
    pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::Identifier(id(kind, value))) }
}

pub fn by_profile(profile_id: &str) -> pb::GetProfileRequest {
    pb::GetProfileRequest { key: Some(pb::get_profile_request::Key::ProfileId(profile_id.into())) }
}
