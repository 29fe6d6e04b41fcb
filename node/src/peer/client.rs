//! The sending side of the peer transport: one channel and one append
//! batcher per peer, openraft's `RaftNetwork` over them, and requests
//! forwarded to the node that leads a shard.

use crate::raft::{decode, encode, ShardFailure, ShardRaft, ShardReply, ShardRequest};
use idgraph_core::canary::KpiCounts;
use idgraph_core::model::GroupId;
use idgraph_proto::v1::raft_transport_client::RaftTransportClient;
use idgraph_proto::v1::{RaftBatch, RaftMessage};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Response, Status};

/// A channel to a peer that adds this node's peer token to every call.
pub type PeerChannel = InterceptedService<Channel, crate::auth::PeerCredentials>;

/// One lazily connected channel per peer address, shared by all shards,
/// and one append batcher per peer.
#[derive(Clone, Default)]
pub struct Peers {
    /// Advertised address to the address dialled instead (`peer_routes`).
    routes: Arc<HashMap<String, String>>,
    /// TLS and credentials for calls to peers.
    security: crate::tls::PeerSecurity,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    batchers: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<PendingAppend>>>>,
}

/// An append waiting for its peer's batcher, and where its answer goes.
type PendingAppend = (RaftMessage, oneshot::Sender<Result<RaftMessage, Status>>);

/// Appends of one batch at most.
const MAX_APPEND_BATCH: usize = 64;

impl Peers {
    pub fn new(routes: HashMap<String, String>, security: crate::tls::PeerSecurity) -> Peers {
        Peers { routes: Arc::new(routes), security, ..Peers::default() }
    }

    /// Sends one shard's AppendEntries to `addr` in the next batch to that
    /// node.
    pub async fn append(&self, addr: &str, msg: RaftMessage) -> Result<RaftMessage, Status> {
        let batcher = {
            let mut map = self.batchers.lock().map_err(|_| Status::internal("batcher table lock poisoned"))?;
            match map.get(addr) {
                Some(tx) if !tx.is_closed() => tx.clone(),
                _ => {
                    let client = self.client(addr).map_err(Status::unavailable)?;
                    let tx = spawn_batcher(client);
                    map.insert(addr.to_string(), tx.clone());
                    tx
                }
            }
        };
        let (tx, rx) = oneshot::channel();
        batcher.send((msg, tx)).map_err(|_| Status::unavailable("the append batcher stopped"))?;
        rx.await.map_err(|_| Status::unavailable("the append batcher dropped the message"))?
    }

    pub fn client(&self, addr: &str) -> Result<RaftTransportClient<PeerChannel>, String> {
        let ch = self.channel(addr)?;
        Ok(RaftTransportClient::with_interceptor(ch, self.security.token.clone())
            .max_decoding_message_size(256 << 20)
            .max_encoding_message_size(256 << 20))
    }

    /// The Admin service of the node at `addr`, with this node's peer
    /// credentials (joining a cluster).
    pub fn admin(&self, addr: &str) -> Result<idgraph_proto::v1::admin_client::AdminClient<PeerChannel>, String> {
        Ok(idgraph_proto::v1::admin_client::AdminClient::with_interceptor(self.channel(addr)?, self.security.token.clone()))
    }

    fn channel(&self, addr: &str) -> Result<Channel, String> {
        let mut map = self.channels.lock().map_err(|_| "peer table lock poisoned".to_string())?;
        if let Some(ch) = map.get(addr) {
            return Ok(ch.clone());
        }
        let dial = self.routes.get(addr).map_or(addr, String::as_str);
        let ch = self.security.endpoint(addr, dial)?.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy();
        map.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The cluster map as the node at `addr` knows it.
    pub async fn cluster_map(&self, addr: &str) -> Result<idgraph_core::meta::ClusterMap, String> {
        let mut client = self.client(addr)?;
        let asked = tokio::time::timeout(PEER_QUERY, client.cluster_map(RaftMessage { shard: 0, payload: Vec::new() })).await;
        peer_answer(addr, "the cluster map", asked)
    }

    /// The KPI counts the node at `addr` kept since it was last asked.
    pub async fn kpis(&self, addr: &str) -> Result<BTreeMap<String, KpiCounts>, String> {
        let mut client = self.client(addr)?;
        let asked = tokio::time::timeout(PEER_QUERY, client.kpis(RaftMessage { shard: 0, payload: Vec::new() })).await;
        peer_answer(addr, "its KPI counts", asked)
    }

    /// Sends a shard request to the node at `addr`, which serves it itself.
    pub async fn forward(&self, addr: &str, shard: GroupId, req: &ShardRequest, timeout: Duration) -> Result<ShardReply, ShardFailure> {
        let unavailable = |reason: String| ShardFailure::Unavailable { shard, reason };
        let mut client = self.client(addr).map_err(unavailable)?;
        let msg = RaftMessage { shard: shard.wire(), payload: encode(req) };
        let resp = tokio::time::timeout(timeout, client.forward(msg))
            .await
            .map_err(|_| unavailable(format!("forwarding to {addr} timed out")))?
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => ShardFailure::NoReplica { shard },
                _ => unavailable(format!("forwarding to {addr}: {}", s.message())),
            })?;
        decode::<Result<ShardReply, ShardFailure>>(&resp.into_inner().payload).map_err(|e| unavailable(e.to_string()))?
    }
}

/// Batch calls in flight to one peer at once: while they are, appends wait
/// and go out together in the next; a slow append holds up only its batch.
const BATCHES_IN_FLIGHT: usize = 4;

/// The sender task of one peer: every append waiting when a batch slot is
/// free goes out in one `AppendBatch` call.
fn spawn_batcher(client: RaftTransportClient<PeerChannel>) -> mpsc::UnboundedSender<PendingAppend> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PendingAppend>();
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let mut waiting = vec![first];
            while waiting.len() < MAX_APPEND_BATCH {
                match rx.try_recv() {
                    Ok(more) => waiting.push(more),
                    Err(_) => break,
                }
            }
            let mut client = client.clone();
            tokio::spawn(async move {
                let (messages, answers): (Vec<RaftMessage>, Vec<_>) = waiting.into_iter().unzip();
                let n = messages.len();
                let result = client.append_batch(RaftBatch { messages }).await;
                drop(slot);
                let replies = match result {
                    Ok(resp) if resp.get_ref().messages.len() == n => Ok(resp.into_inner().messages),
                    Ok(_) => Err(Status::internal("a batch was answered with the wrong number of messages")),
                    Err(status) => Err(status),
                };
                match replies {
                    Ok(replies) => answers.into_iter().zip(replies).for_each(|(answer, m)| drop(answer.send(Ok(m)))),
                    Err(status) => answers.into_iter().for_each(|answer| drop(answer.send(Err(status.clone())))),
                }
            });
        }
    });
    tx
}

pub struct ShardNetworkFactory {
    pub shard: GroupId,
    pub peers: Peers,
}

pub struct ShardNetwork {
    shard: GroupId,
    target: u64,
    addr: String,
    peers: Peers,
    client: Result<RaftTransportClient<PeerChannel>, String>,
}

impl RaftNetworkFactory<ShardRaft> for ShardNetworkFactory {
    type Network = ShardNetwork;

    async fn new_client(&mut self, target: u64, node: &BasicNode) -> ShardNetwork {
        ShardNetwork {
            shard: self.shard,
            target,
            addr: node.addr.clone(),
            peers: self.peers.clone(),
            client: self.peers.client(&node.addr),
        }
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
        let msg = RaftMessage { shard: self.shard.wire(), payload };
        let (peers, addr) = (&self.peers, &self.addr);
        let fut = async {
            match which {
                Rpc::Append => peers.append(addr, msg).await.map(Response::new),
                Rpc::Vote => client.vote(msg).await,
                Rpc::Snapshot => client.install_snapshot(msg).await,
            }
        };
        let resp = match tokio::time::timeout(option.hard_ttl(), fut).await {
            Err(_) => return Err(RPCError::Network(NetworkError::new(&TransportError("raft rpc timed out".into())))),
            Ok(Err(status)) => return Err(RPCError::Unreachable(Unreachable::new(&TransportError(status.message().to_string())))),
            Ok(Ok(r)) => r.into_inner(),
        };
        // An empty answer in a batch: the target holds no replica of this
        // shard (yet: a new replica opens shortly after its move begins).
        if resp.payload.is_empty() {
            return Err(RPCError::Unreachable(Unreachable::new(&TransportError(format!(
                "node {} holds no replica of shard {} yet",
                self.target, self.shard
            )))));
        }
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

/// How long a node waits for another node's answer to a query of its own
/// state (the cluster map, KPI counts).
const PEER_QUERY: Duration = Duration::from_secs(5);

/// The decoded answer of a peer query, or what went wrong, naming the peer.
fn peer_answer<T: DeserializeOwned>(
    addr: &str,
    what: &str,
    asked: Result<Result<tonic::Response<RaftMessage>, Status>, tokio::time::error::Elapsed>,
) -> Result<T, String> {
    let resp = asked
        .map_err(|_| format!("asking {addr} for {what} timed out"))?
        .map_err(|s| format!("asking {addr} for {what}: {}", s.message()))?;
    decode(&resp.into_inner().payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use idgraph_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::Request;

    /// A peer that answers each append with its own payload reversed and
    /// counts the batch calls it gets.
    #[derive(Clone, Default)]
    struct EchoPeer {
        batches: Arc<AtomicUsize>,
    }

    #[tonic::async_trait]
    impl RaftTransport for EchoPeer {
        async fn append_entries(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("appends come batched"))
        }
        async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn install_snapshot(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn forward(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn kpis(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn cluster_map(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn append_batch(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatch>, Status> {
            self.batches.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            let messages = request
                .into_inner()
                .messages
                .into_iter()
                .map(|m| RaftMessage { shard: m.shard, payload: m.payload.into_iter().rev().collect() })
                .collect();
            Ok(Response::new(RaftBatch { messages }))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_of_many_shards_to_one_peer_share_calls_and_get_their_own_answers() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = EchoPeer::default();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let peers = Peers::default();
        let sends = (0..200u32).map(|i| {
            let peers = peers.clone();
            let addr = addr.clone();
            async move { peers.append(&addr, RaftMessage { shard: i % 64, payload: vec![i as u8, 0, 1] }).await }
        });
        let answers = futures::future::join_all(sends).await;
        for (i, a) in answers.into_iter().enumerate() {
            let a = a.expect("answered");
            assert_eq!((a.shard, a.payload), (i as u32 % 64, vec![1, 0, i as u8]), "append {i} got another append's answer");
        }
        let calls = peer.batches.load(Ordering::SeqCst);
        assert!(calls < 200 / 4, "200 concurrent appends took {calls} calls");
        server.abort();
    }
}
