//! Raft traffic between nodes over gRPC (`idgraph.v1.RaftTransport`).
//!
//! Every shard's messages to a node share one HTTP/2 connection ([`Peers`]
//! keeps one channel per address), so 16 or 64 shards do not multiply
//! connections. Payloads are MessagePack of openraft's own request and
//! result types.

use super::replica::{ShardFailure, ShardReplica, ShardRequest};
use super::{decode, encode, ShardRaft};
use crate::model::ShardId;
use idgraph_proto::v1::raft_transport_client::RaftTransportClient;
use idgraph_proto::v1::raft_transport_server::RaftTransport;
use idgraph_proto::v1::RaftMessage;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// One lazily connected channel per peer address, shared by all shards.
#[derive(Clone, Default)]
pub struct Peers {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl Peers {
    pub fn client(&self, addr: &str) -> Result<RaftTransportClient<Channel>, String> {
        let mut map = self.channels.lock().map_err(|_| "peer table lock poisoned".to_string())?;
        if let Some(ch) = map.get(addr) {
            return Ok(RaftTransportClient::new(ch.clone()).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20));
        }
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(RaftTransportClient::new(ch).max_decoding_message_size(256 << 20).max_encoding_message_size(256 << 20))
    }

    /// Sends a shard request to the node at `addr`, which serves it itself.
    pub async fn forward(
        &self,
        addr: &str,
        shard: ShardId,
        req: &ShardRequest,
        timeout: Duration,
    ) -> Result<super::replica::ShardReply, ShardFailure> {
        let unavailable = |reason: String| ShardFailure::Unavailable { shard: shard.0, reason };
        let mut client = self.client(addr).map_err(unavailable)?;
        let msg = RaftMessage { shard: shard.0, payload: encode(req) };
        let resp = tokio::time::timeout(timeout, client.forward(msg))
            .await
            .map_err(|_| unavailable(format!("forwarding to {addr} timed out")))?
            .map_err(|s| unavailable(format!("forwarding to {addr}: {}", s.message())))?;
        decode::<Result<super::replica::ShardReply, ShardFailure>>(&resp.into_inner().payload).map_err(|e| unavailable(e.to_string()))?
    }
}

pub struct ShardNetworkFactory {
    pub shard: ShardId,
    pub peers: Peers,
}

pub struct ShardNetwork {
    shard: ShardId,
    target: u64,
    client: Result<RaftTransportClient<Channel>, String>,
}

impl RaftNetworkFactory<ShardRaft> for ShardNetworkFactory {
    type Network = ShardNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> ShardNetwork {
        ShardNetwork { shard: self.shard, target, client: self.peers.client(&node.addr) }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TransportError(String);

impl ShardNetwork {
    async fn call<Resp, E>(
        &mut self,
        which: Rpc,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<u64, BasicNode, RaftError<u64, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(e.clone())))),
        };
        let msg = RaftMessage { shard: self.shard.0, payload };
        let fut = async {
            match which {
                Rpc::Append => client.append_entries(msg).await,
                Rpc::Vote => client.vote(msg).await,
                Rpc::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => return Err(RPCError::Network(NetworkError::new(&TransportError("raft rpc timed out".into())))),
            Ok(Err(status)) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(status.message().to_string())))),
            Ok(Ok(r)) => r.into_inner(),
        };
        match decode::<Result<Resp, RaftError<u64, E>>>(&resp.payload) {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

#[derive(Clone, Copy)]
enum Rpc {
    Append,
    Vote,
    Snapshot,
}

impl RaftNetwork<ShardRaft> for ShardNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Append, encode(&rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<ShardRaft>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        self.call(Rpc::Snapshot, encode(&rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        self.call(Rpc::Vote, encode(&rpc), &option).await
    }
}

/// The shard replicas a node holds, by shard.
pub type Replicas = Arc<RwLock<HashMap<ShardId, ShardReplica>>>;

/// The receiving side of [`ShardNetwork`], plus forwarded requests.
#[derive(Clone)]
pub struct RaftTransportService {
    replicas: Replicas,
}

impl RaftTransportService {
    pub fn new(replicas: Replicas) -> Self {
        RaftTransportService { replicas }
    }

    fn replica(&self, shard: u32) -> Result<ShardReplica, Status> {
        self.replicas
            .read()
            .map_err(|_| Status::internal("replica table lock poisoned"))?
            .get(&ShardId(shard))
            .cloned()
            .ok_or_else(|| Status::not_found(format!("this node holds no replica of shard {shard}")))
    }
}

fn bad_payload(e: crate::storage::StoreError) -> Status {
    Status::invalid_argument(format!("payload: {e}"))
}

fn reply<T: serde::Serialize>(shard: u32, v: &T) -> Result<Response<RaftMessage>, Status> {
    Ok(Response::new(RaftMessage { shard, payload: encode(v) }))
}

#[tonic::async_trait]
impl RaftTransport for RaftTransportService {
    async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let r = self.replica(m.shard)?;
        let req: AppendEntriesRequest<ShardRaft> = decode(&m.payload).map_err(bad_payload)?;
        reply(m.shard, &r.raft.append_entries(req).await)
    }

    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let r = self.replica(m.shard)?;
        let req: VoteRequest<u64> = decode(&m.payload).map_err(bad_payload)?;
        reply(m.shard, &r.raft.vote(req).await)
    }

    async fn install_snapshot(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let r = self.replica(m.shard)?;
        let req: InstallSnapshotRequest<ShardRaft> = decode(&m.payload).map_err(bad_payload)?;
        reply(m.shard, &r.raft.install_snapshot(req).await)
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let r = self.replica(m.shard)?;
        let req: ShardRequest = decode(&m.payload).map_err(bad_payload)?;
        reply(m.shard, &r.serve(req).await)
    }
}
