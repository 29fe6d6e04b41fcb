//! The receiving side of the peer transport: Raft messages for the
//! node's replicas, requests forwarded to them, and the cluster map.

use super::{take_ready, MAX_FRAME_CALLS};
use crate::kpi::KpiLedger;
use crate::raft::{decode, encode, Replicas, ShardFailure, ShardRaft, ShardReplica, ShardReply, ShardRequest};
use futures::Stream;
use idgraph_core::meta::ClusterMap;
use idgraph_core::model::GroupId;
use idgraph_proto::v1::raft_transport_server::RaftTransport;
use idgraph_proto::v1::{PeerCall, PeerCallKind, PeerFrame, RaftBatch, RaftMessage};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

/// The receiving side of [`ShardNetwork`](crate::peer::ShardNetwork), plus forwarded requests.
#[derive(Clone)]
pub struct RaftTransportService {
    /// The node's tag, which names its shard actors.
    pub node: Arc<str>,
    /// How long a forwarded request may wait for its shard's answer.
    pub timeout: Duration,
    pub replicas: Replicas,
    pub cluster: Arc<RwLock<ClusterMap>>,
    pub kpis: KpiLedger,
    pub metrics: Arc<crate::metrics::NodeMetrics>,
    /// Becomes true when the node shuts down: exchanges stop taking calls.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

impl RaftTransportService {
    /// The replica of the group a message names (its number on the wire).
    fn replica(&self, group: u32) -> Result<ShardReplica, Status> {
        let group = GroupId::from(group);
        self.replicas
            .read()
            .map_err(|_| Status::internal("replica table lock poisoned"))?
            .get(&group)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("this node holds no replica of group {group}")))
    }

    /// Hands one AppendEntries to the replica it names; the MessagePack of
    /// its result, or empty when this node holds no such replica (an
    /// unreachable target, to the sender) or the payload is not one.
    async fn serve_append(&self, shard: u32, payload: &[u8]) -> Vec<u8> {
        match self.replica(shard) {
            Ok(r) => match decode::<AppendEntriesRequest<ShardRaft>>(payload) {
                Ok(req) => encode(&r.raft.append_entries(req).await),
                Err(_) => Vec::new(),
            },
            Err(_) => Vec::new(),
        }
    }

    /// Serves a forwarded request as the node's own requests go
    /// ([`crate::shard::serve`]: a forwarded write joins the leader's next
    /// batch in the shard's actor, a read is served on the replica).
    /// A node without a replica of the group, or whose replica's actor is
    /// (re)starting, did nothing and says so (NOT_FOUND): the sender tries
    /// another replica.
    async fn serve_forward(&self, shard: u32, payload: &[u8]) -> Result<Vec<u8>, Status> {
        let replica = self.replica(shard)?;
        let group = GroupId::from(shard);
        let Some(actor) = crate::shard::actor(&self.node, group) else {
            return Err(Status::not_found(format!("the replica of group {group} on this node is starting")));
        };
        let req: ShardRequest = decode(payload).map_err(bad_payload)?;
        Ok(encode(&crate::shard::serve(&actor, &replica, req, self.timeout).await))
    }

    /// One call of an exchange: its answer's payload.
    async fn serve_call(&self, call: &PeerCall) -> Vec<u8> {
        match PeerCallKind::try_from(call.kind) {
            Ok(PeerCallKind::Append) => {
                self.metrics.peer_calls.with_label_values(&["append"]).inc();
                self.serve_append(call.shard, &call.payload).await
            }
            Ok(PeerCallKind::Forward) => {
                self.metrics.peer_calls.with_label_values(&["forward"]).inc();
                let group = GroupId::from(call.shard);
                self.serve_forward(call.shard, &call.payload).await.unwrap_or_else(|status| {
                    failed_forward(match status.code() {
                        tonic::Code::NotFound => ShardFailure::NoReplica { shard: group },
                        _ => ShardFailure::Unavailable { shard: group, reason: status.message().to_string() },
                    })
                })
            }
            // A kind this node does not know: no replica served it.
            _ => Vec::new(),
        }
    }
}

/// The answer of a call a stopping node does not serve: "no replica here",
/// which tells the sender that nothing was done.
fn refusal(call: &PeerCall) -> Vec<u8> {
    match PeerCallKind::try_from(call.kind) {
        Ok(PeerCallKind::Forward) => failed_forward(ShardFailure::NoReplica { shard: GroupId::from(call.shard) }),
        _ => Vec::new(),
    }
}

/// The answer payload of a forwarded call that failed, as the sender
/// decodes every forwarded answer.
fn failed_forward(failure: ShardFailure) -> Vec<u8> {
    encode(&Err::<ShardReply, _>(failure))
}

/// How often an open exchange's token is checked again.
const TOKEN_RECHECK: Duration = Duration::from_secs(1);

/// Calls of one exchange served at once at most.
const MAX_CALLS_IN_FLIGHT: usize = 1024;

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

    async fn append_batch(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatch>, Status> {
        let appends = request.into_inner().messages.into_iter().map(|m| async move {
            let payload = self.serve_append(m.shard, &m.payload).await;
            RaftMessage { shard: m.shard, payload }
        });
        Ok(Response::new(RaftBatch { messages: futures::future::join_all(appends).await }))
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        let answer = self.serve_forward(m.shard, &m.payload).await?;
        Ok(Response::new(RaftMessage { shard: m.shard, payload: answer }))
    }

    type ExchangeStream = Pin<Box<dyn Stream<Item = Result<PeerFrame, Status>> + Send>>;

    async fn exchange(&self, request: Request<Streaming<PeerFrame>>) -> Result<Response<Self::ExchangeStream>, Status> {
        // The token it was opened with (checked then by the auth layer),
        // to check again while it stays open.
        let grant = crate::auth::Caller::grant_of(&request);
        let mut inbound = request.into_inner();
        let (answers, ready) = mpsc::unbounded_channel::<PeerCall>();
        let service = self.clone();
        // Each call is served as its own task, so that a write waiting for
        // its log entry holds up no append or read behind it; its answer
        // goes out as soon as it is done. At most MAX_CALLS_IN_FLIGHT calls
        // of one exchange are served at once (then the reading waits, and
        // HTTP/2 flow control holds the sender). When the node shuts down,
        // calls that arrive are refused at once as by a node without the
        // replica (the sender tries another), and the stream ends when the
        // calls taken are answered. The same happens when the token the
        // exchange was opened with is revoked: the peer's next exchange is
        // then refused when it opens (or accepted with its new token).
        tokio::spawn(async move {
            let mut stopping = service.stopping.clone();
            let mut recheck = tokio::time::interval(TOKEN_RECHECK);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let slots = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
            let mut refusing = false;
            loop {
                let frame = if refusing {
                    if slots.available_permits() == MAX_CALLS_IN_FLIGHT {
                        break;
                    }
                    tokio::select! {
                        frame = inbound.message() => frame,
                        _ = tokio::time::sleep(Duration::from_millis(10)) => continue,
                    }
                } else {
                    tokio::select! {
                        frame = inbound.message() => frame,
                        _ = stopping.wait_for(|stop| *stop) => {
                            refusing = true;
                            continue;
                        }
                        _ = recheck.tick() => {
                            // The certificate was checked when the
                            // connection was made; the token may change.
                            if let Err(status) = crate::auth::Grant::recheck(&grant) {
                                warn!(reason = status.message(), "a peer's exchange no longer passes the token check; ending it");
                                refusing = true;
                            }
                            continue;
                        }
                    }
                };
                let Ok(Some(frame)) = frame else { break };
                service.metrics.peer_frames.inc();
                for call in frame.calls {
                    if refusing {
                        let _ = answers.send(PeerCall { payload: refusal(&call), ..call });
                        continue;
                    }
                    let Ok(slot) = slots.clone().acquire_owned().await else { break };
                    let (service, answers) = (service.clone(), answers.clone());
                    tokio::spawn(async move {
                        let payload = service.serve_call(&call).await;
                        let _ = answers.send(PeerCall { payload, ..call });
                        drop(slot);
                    });
                }
            }
        });
        // Answers that are ready together leave in one frame.
        let frames = futures::stream::unfold(ready, |mut ready| async move {
            let mut calls = vec![ready.recv().await?];
            take_ready(&mut ready, &mut calls, MAX_FRAME_CALLS);
            Some((Ok(PeerFrame { calls }), ready))
        });
        Ok(Response::new(Box::pin(frames)))
    }

    async fn kpis(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        reply(0, &self.kpis.drain())
    }

    async fn features(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        reply(0, &crate::raft::LOG_FEATURES)
    }

    async fn cluster_map(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let map = self.cluster.read().map_err(|_| Status::internal("cluster map lock poisoned"))?.clone();
        reply(0, &map)
    }
}
