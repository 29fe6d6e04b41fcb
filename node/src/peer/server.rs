//! The receiving side of the peer transport: Raft messages for the
//! node's replicas, requests forwarded to them, and the cluster map.

use crate::kpi::KpiLedger;
use crate::raft::{decode, encode, Replicas, ShardRaft, ShardReplica, ShardRequest};
use idgraph_core::meta::ClusterMap;
use idgraph_core::model::GroupId;
use idgraph_proto::v1::raft_transport_server::RaftTransport;
use idgraph_proto::v1::{RaftBatch, RaftMessage};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::{Request, Response, Status};

/// The receiving side of [`ShardNetwork`](crate::peer::ShardNetwork), plus forwarded requests.
#[derive(Clone)]
pub struct RaftTransportService {
    /// The node's tag, which names its shard actors.
    node: Arc<str>,
    /// How long a forwarded request may wait for its shard's answer.
    timeout: Duration,
    replicas: Replicas,
    cluster: Arc<RwLock<ClusterMap>>,
    kpis: KpiLedger,
}

impl RaftTransportService {
    pub fn new(node: Arc<str>, timeout: Duration, replicas: Replicas, cluster: Arc<RwLock<ClusterMap>>, kpis: KpiLedger) -> Self {
        RaftTransportService { node, timeout, replicas, cluster, kpis }
    }

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

    async fn append_batch(&self, request: Request<RaftBatch>) -> Result<Response<RaftBatch>, Status> {
        let appends = request.into_inner().messages.into_iter().map(|m| async move {
            let answer = match self.replica(m.shard) {
                Ok(r) => match decode::<AppendEntriesRequest<ShardRaft>>(&m.payload) {
                    Ok(req) => Ok(encode(&r.raft.append_entries(req).await)),
                    Err(e) => Err(bad_payload(e)),
                },
                Err(status) => Err(status),
            };
            // A shard this node does not serve answers as an unreachable
            // target would: an empty payload its sender cannot decode.
            RaftMessage { shard: m.shard, payload: answer.unwrap_or_default() }
        });
        Ok(Response::new(RaftBatch { messages: futures::future::join_all(appends).await }))
    }

    async fn forward(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let m = request.into_inner();
        // A node without a replica of the group, or whose replica's actor
        // is (re)starting, did nothing and says so (NOT_FOUND): the sender
        // tries another replica.
        self.replica(m.shard)?;
        let group = GroupId::from(m.shard);
        let Some(actor) = crate::shard::actor(&self.node, group) else {
            return Err(Status::not_found(format!("the replica of group {group} on this node is starting")));
        };
        let req: ShardRequest = decode(&m.payload).map_err(bad_payload)?;
        // Through the shard's actor, as the node's own requests go: a
        // forwarded write joins the leader's next batch.
        reply(m.shard, &crate::shard::call(&actor, group, req, self.timeout).await)
    }

    async fn kpis(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        reply(0, &self.kpis.drain())
    }

    async fn cluster_map(&self, _request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let map = self.cluster.read().map_err(|_| Status::internal("cluster map lock poisoned"))?.clone();
        reply(0, &map)
    }
}
