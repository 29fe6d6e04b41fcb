//! gRPC adapters for `idgraph.v1`: decode, route, encode. No identity logic
//! lives here; conversions are in [`convert`], error mapping in [`status`].

pub mod convert;
pub mod status;

use crate::error::RequestError;
use crate::router::ShardRouter;
use futures::{Stream, StreamExt};
use idgraph_core::canary::CanaryCommand;
use idgraph_core::engine::{CommandKind, Outcome};
use idgraph_core::meta::MetaCommand;
use idgraph_proto::v1 as pb;
use pb::admin_server::Admin;
use pb::identity_graph_server::IdentityGraph;
use std::pin::Pin;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

/// The `IdentityGraph` service.
#[derive(Clone)]
pub struct IdentityGraphService {
    router: ShardRouter,
    stream_window: usize,
}

impl IdentityGraphService {
    pub fn new(router: ShardRouter, stream_window: usize) -> Self {
        IdentityGraphService { router, stream_window }
    }
}

/// The shard answered a command with another command's outcome (a bug).
fn unexpected(_: Outcome) -> Status {
    Status::internal("the engine answered with an outcome of another kind")
}

async fn identify(router: &ShardRouter, req: pb::IdentifyRequest) -> Result<pb::IdentifyResponse, RequestError> {
    let event = convert::identify_event(req)?;
    match router.execute(CommandKind::Identify(event)).await? {
        Outcome::Identify(o) => Ok(convert::identify_response(o)),
        other => Err(RequestError::Internal(unexpected(other).message().to_string())),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::IdentifyResponse, Status>> + Send>>;

#[tonic::async_trait]
impl IdentityGraph for IdentityGraphService {
    async fn identify(&self, request: Request<pb::IdentifyRequest>) -> Result<Response<pb::IdentifyResponse>, Status> {
        let r = identify(&self.router, request.into_inner()).await.map_err(|e| {
            debug!(error = %e, "identify refused");
            Status::from(e)
        })?;
        Ok(Response::new(r))
    }

    type IdentifyStreamStream = ResponseStream;

    async fn identify_stream(&self, request: Request<Streaming<pb::IdentifyRequest>>) -> Result<Response<ResponseStream>, Status> {
        let router = self.router.clone();
        let inbound = request.into_inner();
        // Events are sent to the shard `stream_window` at a time (one fsync
        // covers many of them); responses keep request order.
        let out = inbound
            .map(move |item| {
                let router = router.clone();
                async move {
                    match item {
                        Ok(req) => Ok(match identify(&router, req).await {
                            Ok(r) => r,
                            Err(e) => convert::event_error(Status::from(e)),
                        }),
                        Err(s) => Err(status::oversized_to_resource_exhausted(s)),
                    }
                }
            })
            .buffered(self.stream_window);
        // A broken inbound stream ends the response stream after its error.
        let out = out.scan(false, |failed, r| {
            if *failed {
                return futures::future::ready(None);
            }
            *failed = r.is_err();
            futures::future::ready(Some(r))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_profile(&self, request: Request<pb::GetProfileRequest>) -> Result<Response<pb::Profile>, Status> {
        let req = request.into_inner();
        let stale = req.consistency == pb::ReadConsistency::Stale as i32;
        let key = convert::get_profile_key(req).map_err(|e| Status::from(RequestError::from(e)))?;
        let found = if stale { self.router.get_profile_stale(key).await? } else { self.router.get_profile(key).await? };
        let mut profile = convert::found_profile(found);
        profile.stale = stale;
        Ok(Response::new(profile))
    }

    async fn merge(&self, request: Request<pb::MergeRequest>) -> Result<Response<pb::MergeResponse>, Status> {
        let req = request.into_inner();
        let profiles = req
            .profiles
            .into_iter()
            .enumerate()
            .map(|(i, r)| convert::profile_ref(r, &format!("profiles[{i}]")))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::from(RequestError::from(e)))?;
        match self.router.execute(CommandKind::Merge { profiles, force: req.force, reason: req.reason }).await? {
            Outcome::Merge(o) => Ok(Response::new(convert::merge_response(o))),
            other => Err(unexpected(other)),
        }
    }

    async fn unmerge(&self, request: Request<pb::UnmergeRequest>) -> Result<Response<pb::UnmergeResponse>, Status> {
        let req = request.into_inner();
        let reason = req.reason.clone();
        let target = convert::unmerge_target(req).map_err(|e| Status::from(RequestError::from(e)))?;
        match self.router.execute(CommandKind::Unmerge { target, reason }).await? {
            Outcome::Unmerge(o) => Ok(Response::new(convert::unmerge_response(o))),
            other => Err(unexpected(other)),
        }
    }

    async fn delete_profile(&self, request: Request<pb::DeleteProfileRequest>) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let key = convert::delete_key(request.into_inner()).map_err(|e| Status::from(RequestError::from(e)))?;
        match self.router.execute(CommandKind::Delete(key)).await? {
            Outcome::Delete(o) => Ok(Response::new(convert::delete_response(o))),
            other => Err(unexpected(other)),
        }
    }

    async fn get_merge_record(&self, request: Request<pb::GetMergeRecordRequest>) -> Result<Response<pb::MergeRecord>, Status> {
        let rec = self.router.get_merge(request.into_inner().merge_id).await?;
        Ok(Response::new(convert::merge_record(rec)))
    }
}

/// How long `RemoveNode` waits for the node's replicas to move away.
const REMOVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// The `Admin` service.
#[derive(Clone)]
pub struct AdminService {
    router: ShardRouter,
}

impl AdminService {
    pub fn new(router: ShardRouter) -> Self {
        AdminService { router }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_hubs(&self, request: Request<pb::ListHubsRequest>) -> Result<Response<pb::ListHubsResponse>, Status> {
        let limit = match request.into_inner().limit {
            0 => 100,
            n => n.min(10_000) as usize,
        };
        let hubs = self.router.list_hubs(limit).await?;
        let mut out = Vec::with_capacity(hubs.len());
        for (id, h) in hubs {
            let owner = self
                .router
                .get_profile(idgraph_core::engine::ProfileRef::Identifier(idgraph_core::engine::RawIdentifier::new(
                    id.kind.clone(),
                    id.value.clone(),
                )))
                .await
                .map(|f| f.profile.id)
                .unwrap_or_default();
            out.push(convert::hub(&id, h, owner));
        }
        Ok(Response::new(pb::ListHubsResponse { hubs: out }))
    }

    async fn get_stats(&self, _request: Request<pb::GetStatsRequest>) -> Result<Response<pb::Stats>, Status> {
        let c = self.router.counters().await?;
        Ok(Response::new(convert::stats(&c, &self.router.active_version(), self.router.map().count())))
    }

    async fn add_node(&self, request: Request<pb::AddNodeRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let req = request.into_inner();
        check_node_id(req.node_id)?;
        if req.addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid_field("addr", "not HOST:PORT"));
        }
        let rule_version = self.router.rules().version().to_string();
        let up = MetaCommand::NodeUp { node_id: req.node_id, addr: req.addr, rule_version, create: true };
        self.router.change_cluster(up).await?;
        self.get_cluster(Request::new(pb::GetClusterRequest {})).await
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let node_id = request.into_inner().node_id;
        check_node_id(node_id)?;
        if !self.router.read_cluster().await?.nodes.contains_key(&node_id) {
            return Err(RequestError::Engine(idgraph_core::engine::EngineError::NotFound {
                field: "node_id".into(),
                what: format!("node {node_id} in the cluster map"),
            })
            .into());
        }
        self.router.change_cluster(MetaCommand::Drain { node_id }).await?;
        // The metadata leader moves the node's replicas away, then forgets it.
        let deadline = tokio::time::Instant::now() + REMOVAL_WAIT;
        loop {
            let map = self.router.read_cluster().await?;
            let Some(_) = map.nodes.get(&node_id) else { break };
            if tokio::time::Instant::now() > deadline {
                let left = map.groups_of(node_id).len();
                return Err(RequestError::Unavailable {
                    shard: "meta".into(),
                    reason: format!("node {node_id} still holds {left} replicas after {REMOVAL_WAIT:?}; they keep moving"),
                }
                .into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        self.get_cluster(Request::new(pb::GetClusterRequest {})).await
    }

    async fn transfer_leader(&self, request: Request<pb::TransferLeaderRequest>) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let req = request.into_inner();
        check_node_id(req.node_id)?;
        let leader_id = self.router.transfer_leader(idgraph_core::model::GroupId::from(req.shard), req.node_id).await?;
        Ok(Response::new(pb::TransferLeaderResponse { leader_id }))
    }

    async fn get_digests(&self, _request: Request<pb::GetDigestsRequest>) -> Result<Response<pb::ReplicaDigests>, Status> {
        Ok(Response::new(convert::replica_digests(self.router.node_id(), self.router.replica_digests()?)))
    }

    async fn get_cluster(&self, _request: Request<pb::GetClusterRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let replicas = self.router.replica_statuses();
        Ok(Response::new(convert::cluster_status(self.router.node_id(), &self.router.cluster(), &replicas)))
    }

    async fn get_rule_set(&self, request: Request<pb::GetRuleSetRequest>) -> Result<Response<pb::RuleSetInfo>, Status> {
        let version = request.into_inner().version;
        let active = self.router.active_version();
        let rules = if version.is_empty() { self.router.active_rules().await? } else { self.router.rule_set(&version).await? };
        let info = convert::rule_set_info(rules.version().into(), rules.source().into(), &self.router.cluster(), &active);
        Ok(Response::new(info))
    }

    async fn put_rule_set(&self, request: Request<pb::PutRuleSetRequest>) -> Result<Response<pb::RuleSetInfo>, Status> {
        let toml = request.into_inner().toml;
        let map = self.router.put_rule_set(toml.clone()).await?;
        let version = idgraph_core::rules::RuleSet::from_toml(&toml).map(|r| r.version().to_string()).unwrap_or_default();
        info!(rule_version = %version, "rule set stored");
        Ok(Response::new(convert::rule_set_info(version, toml, &map, &self.router.active_version())))
    }

    async fn list_rule_sets(&self, _request: Request<pb::ListRuleSetsRequest>) -> Result<Response<pb::ListRuleSetsResponse>, Status> {
        let sets = self.router.stored_rule_sets().await?;
        let map = self.router.read_cluster().await?;
        let active = self.router.active_version();
        let rule_sets = sets.into_iter().map(|(v, t)| convert::rule_set_info(v, t, &map, &active)).collect();
        Ok(Response::new(pb::ListRuleSetsResponse { rule_sets, active_version: active }))
    }

    async fn start_canary(&self, request: Request<pb::StartCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let plan_toml = request.into_inner().plan_toml;
        // Precise errors before anything is proposed; the metadata group
        // checks again against its state (stored versions, a rollout under way).
        if let Err(e) = idgraph_core::canary::CanaryPlan::from_toml(&plan_toml) {
            let (field, reason) = match e {
                idgraph_core::canary::PlanError::Invalid { field, reason } => (format!("plan_toml.{field}"), reason),
                e @ idgraph_core::canary::PlanError::Parse(_) => ("plan_toml".to_string(), e.to_string()),
            };
            return Err(invalid_field(&field, &reason));
        }
        let id = ulid::Ulid::new().to_string();
        let start = CanaryCommand::Start { id: id.clone(), plan_toml, control: String::new(), shard_count: 0, at_ms: self.router.now_ms() };
        self.router.change_cluster(MetaCommand::Canary(start)).await?;
        info!(rollout = %id, "canary rollout started");
        self.get_canary(Request::new(pb::GetCanaryRequest { id })).await
    }

    async fn get_canary(&self, request: Request<pb::GetCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let id = request.into_inner().id;
        let (current, finished) = self.router.rollouts(!id.is_empty()).await?;
        let found = current.into_iter().chain(finished.into_iter().rev()).find(|r| id.is_empty() || r.id == id);
        match found {
            Some(r) if id.is_empty() && r.phase.is_finished() => Err(no_rollout("")),
            Some(r) => Ok(Response::new(convert::canary_rollout(&r))),
            None => Err(no_rollout(&id)),
        }
    }

    async fn list_canaries(&self, _request: Request<pb::ListCanariesRequest>) -> Result<Response<pb::ListCanariesResponse>, Status> {
        let (current, finished) = self.router.rollouts(true).await?;
        let rollouts = finished.iter().chain(current.as_ref()).map(convert::canary_rollout).collect();
        Ok(Response::new(pb::ListCanariesResponse { rollouts }))
    }

    async fn promote_canary(&self, request: Request<pb::PromoteCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let step = match request.into_inner().step {
            0 => None,
            n => Some(n as usize - 1),
        };
        let id = self.current_rollout().await?;
        let promote = CanaryCommand::Promote { id: id.clone(), step, at_ms: self.router.now_ms() };
        self.router.change_cluster(MetaCommand::Canary(promote)).await?;
        info!(rollout = %id, "canary step promoted by an operator");
        self.get_canary(Request::new(pb::GetCanaryRequest { id })).await
    }

    async fn abort_canary(&self, request: Request<pb::AbortCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let reason = match request.into_inner().reason.trim() {
            "" => "an operator aborted it".to_string(),
            r => r.chars().take(200).collect(),
        };
        let id = self.current_rollout().await?;
        let abort = CanaryCommand::Abort { id: id.clone(), reason, at_ms: self.router.now_ms() };
        self.router.change_cluster(MetaCommand::Canary(abort)).await?;
        info!(rollout = %id, "canary rollout aborted by an operator");
        self.get_canary(Request::new(pb::GetCanaryRequest { id })).await
    }
}

impl AdminService {
    /// The id of the rollout under way (FAILED_PRECONDITION when none).
    async fn current_rollout(&self) -> Result<String, Status> {
        match self.router.rollouts(false).await? {
            (Some(r), _) => Ok(r.id),
            (None, _) => Err(RequestError::Engine(idgraph_core::engine::EngineError::FailedPrecondition {
                reason: "no canary rollout is under way".into(),
                limit: None,
            })
            .into()),
        }
    }
}

/// NOT_FOUND for a rollout.
fn no_rollout(id: &str) -> Status {
    let what = if id.is_empty() { "a canary rollout under way".to_string() } else { format!("canary rollout {id}") };
    RequestError::Engine(idgraph_core::engine::EngineError::NotFound { field: "id".into(), what }).into()
}

/// INVALID_ARGUMENT naming a field of an admin request.
fn invalid_field(field: &str, reason: &str) -> Status {
    RequestError::from(idgraph_core::engine::EngineError::InvalidArgument { field: field.into(), reason: reason.into() }).into()
}

/// Node ids start at 1.
fn check_node_id(node_id: u64) -> Result<(), Status> {
    if node_id == 0 {
        return Err(invalid_field("node_id", "must be at least 1"));
    }
    Ok(())
}
