//! The sending side of the peer transport: one channel and one exchange
//! per peer, openraft's `RaftNetwork` over them, and requests
//! forwarded to the node that leads a shard.

use super::{take_ready, MAX_FRAME_CALLS};
use crate::raft::{decode, encode, ShardFailure, ShardRaft, ShardReply, ShardRequest};
use idgraph_core::canary::KpiCounts;
use idgraph_core::model::GroupId;
use idgraph_proto::v1::raft_transport_client::RaftTransportClient;
use idgraph_proto::v1::{PeerCall, PeerCallKind, PeerFrame, RaftMessage};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Response, Status};

/// A channel to a peer that adds this node's peer token to every call.
pub type PeerChannel = InterceptedService<Channel, crate::auth::PeerCredentials>;

/// One lazily connected channel per peer address, shared by all shards,
/// and one exchange per peer for appends and forwarded requests.
#[derive(Clone, Default)]
pub struct Peers {
    /// Advertised address to the address dialled instead (`peer_routes`).
    routes: Arc<HashMap<String, String>>,
    /// TLS and credentials for calls to peers.
    security: crate::tls::PeerSecurity,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    exchanges: Arc<Mutex<HashMap<String, Exchange>>>,
}

/// The sending side of one peer's exchange (`RaftTransport.Exchange`).
#[derive(Clone)]
struct Exchange {
    calls: mpsc::UnboundedSender<Outgoing>,
    /// When the peer last answered that it does not know `Exchange` (an
    /// older version, during a rolling upgrade): for [`LEGACY_RETRY`]
    /// after that, its calls go one by one as `AppendEntries` and
    /// `Forward`.
    legacy: Legacy,
}

type Legacy = Arc<Mutex<Option<Instant>>>;

/// How long a peer that did not know `Exchange` is served the older way
/// before the exchange is tried again (it may have been upgraded).
const LEGACY_RETRY: Duration = Duration::from_secs(30);

/// A call waiting for its peer's exchange, and where its answer goes.
struct Outgoing {
    shard: u32,
    kind: PeerCallKind,
    payload: Vec<u8>,
    answer: oneshot::Sender<Answer>,
}

/// What became of a call sent through an exchange.
enum Answer {
    /// The peer's answer payload.
    Done(Vec<u8>),
    /// The exchange failed before the answer (the call may have been
    /// served).
    Failed(Status),
    /// The peer does not know `Exchange`: the call was not sent.
    Legacy(Vec<u8>),
}

impl Peers {
    pub fn new(routes: HashMap<String, String>, security: crate::tls::PeerSecurity) -> Peers {
        Peers { routes: Arc::new(routes), security, ..Peers::default() }
    }

    /// Sends one shard's AppendEntries to `addr` in the next frame of the
    /// exchange with that node.
    pub async fn append(&self, addr: &str, msg: RaftMessage) -> Result<RaftMessage, Status> {
        let shard = msg.shard;
        match self.call(addr, shard, PeerCallKind::Append, msg.payload).await? {
            Answer::Done(payload) => Ok(RaftMessage { shard, payload }),
            Answer::Failed(status) => Err(status),
            Answer::Legacy(payload) => {
                Ok(self.client(addr).map_err(Status::unavailable)?.append_entries(RaftMessage { shard, payload }).await?.into_inner())
            }
        }
    }

    /// Puts a call into the exchange with `addr` (opened on first use, and
    /// again after it failed) and waits for its answer.
    async fn call(&self, addr: &str, shard: u32, kind: PeerCallKind, payload: Vec<u8>) -> Result<Answer, Status> {
        let exchange = {
            let mut map = self.exchanges.lock().map_err(|_| Status::internal("exchange table lock poisoned"))?;
            match map.get(addr) {
                Some(ex) if !ex.calls.is_closed() => ex.clone(),
                _ => {
                    let legacy = Legacy::default();
                    let client = self.client(addr).map_err(Status::unavailable)?;
                    let ex = Exchange { calls: spawn_exchange(client, legacy.clone()), legacy };
                    map.insert(addr.to_string(), ex.clone());
                    ex
                }
            }
        };
        if exchange.legacy.lock().ok().and_then(|at| *at).is_some_and(|at| at.elapsed() < LEGACY_RETRY) {
            return Ok(Answer::Legacy(payload));
        }
        let (answer, answered) = oneshot::channel();
        exchange
            .calls
            .send(Outgoing { shard, kind, payload, answer })
            .map_err(|_| Status::unavailable("the exchange with the peer stopped"))?;
        answered.await.map_err(|_| Status::unavailable("the exchange with the peer dropped the call"))
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
        let ch = self
            .security
            .endpoint(addr, dial)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(PEER_KEEPALIVE)
            .keep_alive_timeout(PEER_KEEPALIVE)
            .keep_alive_while_idle(true)
            .connect_lazy();
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

    /// The log features the node at `addr` applies (see
    /// [`crate::raft::LOG_FEATURES`]); none for an older build that does not
    /// know the question.
    pub async fn features(&self, addr: &str) -> Result<Vec<String>, String> {
        let mut client = self.client(addr)?;
        match tokio::time::timeout(PEER_QUERY, client.features(RaftMessage { shard: 0, payload: Vec::new() })).await {
            Ok(Err(s)) if s.code() == tonic::Code::Unimplemented => Ok(Vec::new()),
            asked => peer_answer(addr, "the log features it applies", asked),
        }
    }

    /// Sends a shard request to the node at `addr`, which serves it itself.
    pub async fn forward(&self, addr: &str, shard: GroupId, req: &ShardRequest, timeout: Duration) -> Result<ShardReply, ShardFailure> {
        let unavailable = |reason: String| ShardFailure::Unavailable { shard, reason };
        let sent = tokio::time::timeout(timeout, async {
            match self.call(addr, shard.wire(), PeerCallKind::Forward, encode(req)).await? {
                Answer::Done(payload) => Ok(payload),
                Answer::Failed(status) => Err(status),
                Answer::Legacy(payload) => {
                    let mut client = self.client(addr).map_err(Status::unavailable)?;
                    Ok(client.forward(RaftMessage { shard: shard.wire(), payload }).await?.into_inner().payload)
                }
            }
        });
        let payload = sent.await.map_err(|_| unavailable(format!("forwarding to {addr} timed out")))?.map_err(|s| match s.code() {
            tonic::Code::NotFound => ShardFailure::NoReplica { shard },
            _ => unavailable(format!("forwarding to {addr}: {}", s.message())),
        })?;
        decode::<Result<ShardReply, ShardFailure>>(&payload).map_err(|e| unavailable(e.to_string()))?
    }
}

/// Bytes of call payloads in one frame at most (a larger call goes alone).
const MAX_FRAME_BYTES: usize = 4 << 20;

/// How long opening an exchange may take (a stopped peer's kernel still
/// accepts the connection).
const EXCHANGE_OPEN: Duration = Duration::from_secs(5);

/// HTTP/2 pings on peer connections: a connection whose peer does not
/// answer one within [`PEER_KEEPALIVE`] is closed, failing its exchange's
/// calls, instead of waiting for TCP to give up (minutes after a host
/// vanished without a reset).
const PEER_KEEPALIVE: Duration = Duration::from_secs(10);

/// Frames handed to HTTP/2 and not yet sent: while they wait, calls gather
/// for the next frame.
const FRAMES_QUEUED: usize = 2;

/// The task of one peer's exchange: opens the stream when a call comes,
/// sends every call waiting as one frame, hands each answer to its caller
/// by id; when the stream fails, fails the calls in flight (their outcome
/// is unknown, as for a failed unary call) and opens a new one for the
/// next call.
fn spawn_exchange(client: RaftTransportClient<PeerChannel>, legacy: Legacy) -> mpsc::UnboundedSender<Outgoing> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Outgoing>();
    tokio::spawn(async move {
        let mut next_id = 0u64;
        while let Some(first) = rx.recv().await {
            let mut waiting = vec![first];
            let (frames, queued) = mpsc::channel::<PeerFrame>(FRAMES_QUEUED);
            let mut opener = client.clone();
            let opened = tokio::time::timeout(EXCHANGE_OPEN, opener.exchange(tokio_stream::wrappers::ReceiverStream::new(queued)));
            let opened = opened.await.unwrap_or_else(|_| Err(Status::unavailable("opening the exchange timed out")));
            let mut inbound = match opened {
                Ok(resp) => {
                    if let Ok(mut at) = legacy.lock() {
                        *at = None;
                    }
                    resp.into_inner()
                }
                Err(status) => {
                    let older = status.code() == tonic::Code::Unimplemented;
                    if let Ok(mut at) = legacy.lock() {
                        *at = older.then(Instant::now);
                    }
                    take_ready(&mut rx, &mut waiting, usize::MAX);
                    for call in waiting {
                        let answer = if older { Answer::Legacy(call.payload) } else { Answer::Failed(status.clone()) };
                        let _ = call.answer.send(answer);
                    }
                    continue;
                }
            };
            let mut in_flight: HashMap<u64, oneshot::Sender<Answer>> = HashMap::new();
            let failure = loop {
                tokio::select! {
                    biased;
                    answers = inbound.message() => match answers {
                        Ok(Some(frame)) => {
                            for call in frame.calls {
                                if let Some(answer) = in_flight.remove(&call.id) {
                                    let _ = answer.send(Answer::Done(call.payload));
                                }
                            }
                        }
                        Ok(None) => break Status::unavailable("the peer closed the exchange"),
                        Err(status) => break status,
                    },
                    permit = frames.reserve(), if !waiting.is_empty() => {
                        let Ok(permit) = permit else { break Status::unavailable("the exchange stopped sending") };
                        take_ready(&mut rx, &mut waiting, MAX_FRAME_CALLS);
                        // A call whose caller gave up (timed out) before it
                        // left is not sent: the caller was told its outcome
                        // is unknown, and it is simply not done.
                        waiting.retain(|c| !c.answer.is_closed());
                        // Callers that gave up after their call left keep
                        // their entries until the peer answers; a peer that
                        // never does must not grow the table.
                        if in_flight.len() >= 4 * MAX_FRAME_CALLS {
                            in_flight.retain(|_, answer| !answer.is_closed());
                        }
                        // A frame of at most MAX_FRAME_BYTES (or one call),
                        // so that a large catch-up append delays the calls
                        // behind it by one frame, not the whole queue.
                        let mut bytes = 0;
                        let fit = waiting.iter().take_while(|c| {
                            bytes += c.payload.len();
                            bytes <= MAX_FRAME_BYTES
                        });
                        let take = fit.count().max(1).min(waiting.len());
                        let calls: Vec<PeerCall> = waiting
                            .drain(..take)
                            .map(|c| {
                                next_id += 1;
                                in_flight.insert(next_id, c.answer);
                                PeerCall { id: next_id, shard: c.shard, kind: c.kind as i32, payload: c.payload }
                            })
                            .collect();
                        if !calls.is_empty() {
                            permit.send(PeerFrame { calls });
                        }
                    },
                    more = rx.recv(), if waiting.len() < MAX_FRAME_CALLS => match more {
                        Some(call) => waiting.push(call),
                        None => return,
                    },
                }
            };
            for (_, answer) in in_flight.drain() {
                let _ = answer.send(Answer::Failed(failure.clone()));
            }
            for call in waiting {
                let _ = call.answer.send(Answer::Failed(failure.clone()));
            }
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
    use futures::StreamExt;
    use idgraph_proto::v1::raft_transport_server::{RaftTransport, RaftTransportServer};
    use idgraph_proto::v1::RaftBatch;
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tonic::{Request, Streaming};

    /// A peer that answers each append with its own payload reversed, the
    /// calls of a frame in another order than they came, and counts the
    /// frames and one-by-one calls it gets. Without `exchange` it is an
    /// older version that does not know the method.
    #[derive(Clone, Default)]
    struct EchoPeer {
        frames: Arc<AtomicUsize>,
        unary: Arc<AtomicUsize>,
        older: bool,
    }

    fn echo(m: RaftMessage) -> RaftMessage {
        RaftMessage { shard: m.shard, payload: m.payload.into_iter().rev().collect() }
    }

    #[tonic::async_trait]
    impl RaftTransport for EchoPeer {
        async fn append_entries(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            Ok(Response::new(echo(request.into_inner())))
        }
        async fn vote(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn install_snapshot(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn forward(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            self.unary.fetch_add(1, Ordering::SeqCst);
            Err(Status::not_found("no replica of that group here"))
        }
        async fn kpis(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn features(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("an older version"))
        }
        async fn cluster_map(&self, _: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
            Err(Status::unimplemented("not used"))
        }
        async fn append_batch(&self, _: Request<RaftBatch>) -> Result<Response<RaftBatch>, Status> {
            Err(Status::unimplemented("not used"))
        }

        type ExchangeStream = Pin<Box<dyn futures::Stream<Item = Result<PeerFrame, Status>> + Send>>;

        async fn exchange(&self, request: Request<Streaming<PeerFrame>>) -> Result<Response<Self::ExchangeStream>, Status> {
            if self.older {
                return Err(Status::unimplemented("unknown method"));
            }
            let frames = self.frames.clone();
            let answers = request.into_inner().map(move |frame| {
                frames.fetch_add(1, Ordering::SeqCst);
                let mut calls: Vec<PeerCall> = frame?
                    .calls
                    .into_iter()
                    .map(|c| {
                        let m = echo(RaftMessage { shard: c.shard, payload: c.payload });
                        PeerCall { payload: m.payload, ..c }
                    })
                    .collect();
                calls.reverse();
                Ok(PeerFrame { calls })
            });
            Ok(Response::new(Box::pin(answers)))
        }
    }

    async fn serve(peer: EchoPeer) -> (String, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftTransportServer::new(peer))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (addr, server)
    }

    async fn send_appends(peers: &Peers, addr: &str, n: u32) -> Vec<Result<RaftMessage, Status>> {
        let sends = (0..n).map(|i| {
            let (peers, addr) = (peers.clone(), addr.to_string());
            async move { peers.append(&addr, RaftMessage { shard: i % 64, payload: vec![i as u8, 0, 1] }).await }
        });
        futures::future::join_all(sends).await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_of_many_shards_to_one_peer_share_frames_and_get_their_own_answers() {
        let peer = EchoPeer::default();
        let (addr, server) = serve(peer.clone()).await;
        let peers = Peers::default();
        for round in 0..2 {
            for (i, a) in send_appends(&peers, &addr, 200).await.into_iter().enumerate() {
                let a = a.expect("answered");
                assert_eq!((a.shard, a.payload), (i as u32 % 64, vec![1, 0, i as u8]), "append {i} of round {round} got another's answer");
            }
        }
        let frames = peer.frames.load(Ordering::SeqCst);
        assert!(frames < 400 / 4, "400 appends, 200 at a time, took {frames} frames");
        assert_eq!(peer.unary.load(Ordering::SeqCst), 0, "no call went one by one");
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_to_a_peer_without_the_exchange_go_one_by_one() {
        let peer = EchoPeer { older: true, ..EchoPeer::default() };
        let (addr, server) = serve(peer.clone()).await;
        let peers = Peers::default();
        for (i, a) in send_appends(&peers, &addr, 20).await.into_iter().enumerate() {
            assert_eq!(a.expect("answered").payload, vec![1, 0, i as u8], "append {i}");
        }
        let shard = GroupId::Shard(idgraph_core::model::ShardId(3));
        let read = ShardRequest::Read(crate::raft::ShardRead::Keys { keys: Vec::new(), mode: crate::txn::coordinator::ReadMode::Leader });
        let forwarded = peers.forward(&addr, shard, &read, Duration::from_secs(5)).await;
        assert!(matches!(forwarded, Err(ShardFailure::NoReplica { .. })), "the older peer's NOT_FOUND is kept: {forwarded:?}");
        assert_eq!(peer.unary.load(Ordering::SeqCst), 21, "each call went one by one");
        assert_eq!(peer.frames.load(Ordering::SeqCst), 0);
        // Nor does it know the question about log features: it applies none.
        assert_eq!(peers.features(&addr).await, Ok(Vec::new()));
        server.abort();
        // A peer that cannot be reached says nothing (not "none").
        assert!(peers.features("127.0.0.1:1").await.is_err());
    }
}
