//! gRPC adapters for `idgraph.v1`: decode, route, encode. No identity logic
//! lives here; conversions are in [`convert`], error mapping in [`status`].

pub mod convert;
pub mod status;

use crate::auth::{Caller, Grant};
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

/// Runs an operator action, then records it in the audit log with its
/// outcome (its status code only: a message may quote an identifier). The
/// entry is written by a task of its own, so a caller that goes away does
/// not lose it; the answer waits for it up to five seconds. An entry the
/// metadata group cannot take is retried (the same entry: written once
/// however many tries land) for a minute, then logged as lost.
async fn audited<T>(
    router: &ShardRouter,
    who: String,
    action: &'static str,
    target: impl FnOnce(&Result<T, Status>) -> String,
    run: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    let result = run.await;
    let outcome = match &result {
        Ok(_) => "OK".to_string(),
        Err(s) => crate::metrics::code_name(s.code()),
    };
    let entry = router.audit_entry(who, action, target(&result), outcome);
    let router = router.clone();
    let record = tokio::spawn(async move {
        let mut backoff = std::time::Duration::from_millis(100);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match router.audit(entry.clone()).await {
                Ok(()) => return,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    debug!(action, error = %e, "recording an audit entry failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(action, who = %entry.who, outcome = %entry.outcome, error = %e, "an operator action could not be recorded in the audit log");
                    return;
                }
            }
        }
    });
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), record).await;
    result
}

async fn identify(router: &ShardRouter, req: pb::IdentifyRequest) -> Result<pb::IdentifyResponse, RequestError> {
    let event = convert::identify_event(req)?;
    match router.execute(CommandKind::Identify(event)).await? {
        Outcome::Identify(o) => Ok(convert::identify_response(o)),
        other => Err(RequestError::Internal(unexpected(other).message().to_string())),
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<pb::IdentifyResponse, Status>> + Send>>;

/// `stream` up to and including its first error.
fn until_error<T>(stream: impl Stream<Item = Result<T, Status>>) -> impl Stream<Item = Result<T, Status>> {
    stream.scan(false, |failed, r| {
        if *failed {
            return futures::future::ready(None);
        }
        *failed = r.is_err();
        futures::future::ready(Some(r))
    })
}

/// `stream` while the caller's token passes its check, made before each
/// item: once it is revoked (or loses the role the call needs), the stream
/// yields the refusal and ends. Unchanged on a node that checks no tokens.
fn while_granted<T>(stream: impl Stream<Item = Result<T, Status>>, grant: Option<Grant>) -> impl Stream<Item = Result<T, Status>> {
    until_error(stream.map(move |item| Grant::recheck(&grant).and(item)))
}

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
        let grant = Caller::grant_of(&request);
        // An event read after the stream's token was revoked is not applied:
        // the stream answers the refusal and ends.
        let inbound = while_granted(request.into_inner(), grant);
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
        Ok(Response::new(Box::pin(until_error(out))))
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
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let asked = req.profiles.len();
        let run = async {
            let profiles = req
                .profiles
                .into_iter()
                .enumerate()
                .map(|(i, r)| convert::profile_ref(r, &format!("profiles[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Status::from(RequestError::from(e)))?;
            match self.router.execute(CommandKind::Merge { profiles, force: req.force, reason: req.reason }).await? {
                Outcome::Merge(o) => Ok(convert::merge_response(o)),
                other => Err(unexpected(other)),
            }
        };
        let target = |r: &Result<pb::MergeResponse, Status>| match r {
            Ok(m) => format!("profile {} absorbed {}", m.profile_id, m.merged_profile_ids.join(" ")),
            Err(_) => format!("{asked} profiles"),
        };
        audited(&self.router, who, "Merge", target, run).await.map(Response::new)
    }

    async fn unmerge(&self, request: Request<pb::UnmergeRequest>) -> Result<Response<pb::UnmergeResponse>, Status> {
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let reason = req.reason.clone();
        let asked = match &req.target {
            Some(pb::unmerge_request::Target::MergeId(m)) => format!("merge {m}"),
            Some(pb::unmerge_request::Target::Split(s)) => {
                format!("profile {}, {} identifiers split off", s.profile_id, s.identifiers.len())
            }
            None => "nothing".into(),
        };
        let run = async {
            let target = convert::unmerge_target(req).map_err(|e| Status::from(RequestError::from(e)))?;
            match self.router.execute(CommandKind::Unmerge { target, reason }).await? {
                Outcome::Unmerge(o) => Ok(convert::unmerge_response(o)),
                other => Err(unexpected(other)),
            }
        };
        audited(&self.router, who, "Unmerge", |_| asked, run).await.map(Response::new)
    }

    async fn delete_profile(&self, request: Request<pb::DeleteProfileRequest>) -> Result<Response<pb::DeleteProfileResponse>, Status> {
        let who = Caller::name_of(&request);
        let run = async {
            let key = convert::delete_key(request.into_inner()).map_err(|e| Status::from(RequestError::from(e)))?;
            match self.router.execute(CommandKind::Delete(key)).await? {
                Outcome::Delete(o) => Ok(convert::delete_response(o)),
                other => Err(unexpected(other)),
            }
        };
        // A GDPR erasure's entry names the profile and counts, never the
        // identifier it was asked by.
        let target = |r: &Result<pb::DeleteProfileResponse, Status>| match r {
            Ok(d) => format!(
                "profile {}: {} identifiers and {} merge records erased",
                d.profile_id, d.identifiers_erased, d.merge_records_erased
            ),
            Err(_) => "a profile (nothing erased)".to_string(),
        };
        audited(&self.router, who, "DeleteProfile", target, run).await.map(Response::new)
    }

    async fn get_merge_record(&self, request: Request<pb::GetMergeRecordRequest>) -> Result<Response<pb::MergeRecord>, Status> {
        let rec = self.router.get_merge(request.into_inner().merge_id).await?;
        Ok(Response::new(convert::merge_record(rec)))
    }

    async fn get_routes(&self, _request: Request<pb::GetRoutesRequest>) -> Result<Response<pb::Routes>, Status> {
        Ok(Response::new(convert::routes(self.router.node_id(), &self.router.cluster(), &self.router.replica_statuses())))
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
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let target = format!("node {} at {}", req.node_id, req.addr);
        let run = async {
            check_node_id(req.node_id)?;
            if let Err(reason) = crate::config::check_host_port(&req.addr) {
                return Err(invalid_field("addr", &reason));
            }
            let rule_version = self.router.rules().version().to_string();
            let up = MetaCommand::NodeUp { node_id: req.node_id, addr: req.addr, rule_version, create: true };
            self.router.change_cluster(up).await?;
            self.get_cluster(Request::new(pb::GetClusterRequest {})).await
        };
        audited(&self.router, who, "AddNode", |_| target, run).await
    }

    async fn remove_node(&self, request: Request<pb::RemoveNodeRequest>) -> Result<Response<pb::ClusterStatus>, Status> {
        let who = Caller::name_of(&request);
        let node_id = request.into_inner().node_id;
        audited(&self.router, who, "RemoveNode", |_| format!("node {node_id}"), self.remove(node_id)).await
    }

    async fn transfer_leader(&self, request: Request<pb::TransferLeaderRequest>) -> Result<Response<pb::TransferLeaderResponse>, Status> {
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let run = async {
            check_node_id(req.node_id)?;
            let leader_id = self.router.transfer_leader(idgraph_core::model::GroupId::from(req.shard), req.node_id).await?;
            Ok(Response::new(pb::TransferLeaderResponse { leader_id }))
        };
        audited(&self.router, who, "TransferLeader", |_| format!("shard {} to node {}", req.shard, req.node_id), run).await
    }

    type BackupStream = Pin<Box<dyn Stream<Item = Result<pb::BackupChunk, Status>> + Send>>;

    async fn backup(&self, request: Request<pb::BackupRequest>) -> Result<Response<Self::BackupStream>, Status> {
        let who = Caller::name_of(&request);
        let grant = Caller::grant_of(&request);
        let id = ulid::Ulid::new().to_string();
        let router = self.router.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        // The whole backup runs as its own task: a caller that goes away
        // does not leave the fence behind, and the audit entry says how the
        // backup ended.
        tokio::spawn(async move {
            let run = async {
                router.fence(&id).await?;
                info!(backup = %id, "backup started: cross-shard commits held");
                let sent = send_backup(&router, &id, &tx).await;
                // The images are one cut only if the fence held throughout.
                let held = match &sent {
                    Ok(_) => router.fence_holds(&id, 0).await,
                    Err(_) => Ok(true),
                };
                if let Err(e) = router.unfence(&id).await {
                    tracing::warn!(backup = %id, error = %e, "ending the backup's hold failed; it lapses by itself");
                }
                match held? {
                    true => sent,
                    false => Err(Status::unavailable(format!(
                        "the backup took longer than its hold on cross-shard commits ({} s): take it again, from a quieter cluster",
                        idgraph_core::meta::BACKUP_FENCE_MAX_MS / 1000
                    ))),
                }
            };
            match audited(&router, who, "Backup", |_| format!("backup {id}"), run).await {
                Ok(bytes) => info!(backup = %id, bytes, "backup sent"),
                Err(status) => {
                    tracing::warn!(backup = %id, code = ?status.code(), "backup failed");
                    let _ = tx.send(Err(status)).await;
                }
            }
        });
        // No piece leaves after the token was revoked: the stream ends, and
        // the backup task stops at its next send.
        Ok(Response::new(Box::pin(while_granted(tokio_stream::wrappers::ReceiverStream::new(rx), grant))))
    }

    async fn restore(&self, request: Request<Streaming<pb::BackupChunk>>) -> Result<Response<pb::RestoreResponse>, Status> {
        let who = Caller::name_of(&request);
        let grant = Caller::grant_of(&request);
        let run = restore_backup(&self.router, request.into_inner(), grant);
        audited(
            &self.router,
            who,
            "Restore",
            |r| match r {
                Ok(r) => format!("{} shards, {} bytes", r.shards, r.bytes),
                Err(_) => "a backup (not restored)".to_string(),
            },
            run,
        )
        .await
        .map(Response::new)
    }

    async fn list_audit(&self, request: Request<pb::ListAuditRequest>) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => 1000,
            n => n.min(10_000) as usize,
        };
        let entries = self.router.audit_log(req.after, limit).await?;
        Ok(Response::new(pb::ListAuditResponse { entries: entries.into_iter().map(convert::audit_entry).collect() }))
    }

    async fn get_digests(&self, _request: Request<pb::GetDigestsRequest>) -> Result<Response<pb::ReplicaDigests>, Status> {
        Ok(Response::new(convert::replica_digests(self.router.node_id(), self.router.replica_digests().await?)))
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
        let who = Caller::name_of(&request);
        let toml = request.into_inner().toml;
        let version = idgraph_core::rules::RuleSet::from_toml(&toml).map(|r| r.version().to_string()).unwrap_or_default();
        let run = async {
            let map = self.router.put_rule_set(toml.clone()).await?;
            info!(rule_version = %version, "rule set stored");
            Ok(Response::new(convert::rule_set_info(version.clone(), toml.clone(), &map, &self.router.active_version())))
        };
        let target = format!("rule set {}", if version.is_empty() { "(invalid)" } else { &version });
        audited(&self.router, who, "PutRuleSet", |_| target, run).await
    }

    async fn list_rule_sets(&self, _request: Request<pb::ListRuleSetsRequest>) -> Result<Response<pb::ListRuleSetsResponse>, Status> {
        let sets = self.router.stored_rule_sets().await?;
        let map = self.router.read_cluster().await?;
        let active = self.router.active_version();
        let rule_sets = sets.into_iter().map(|(v, t)| convert::rule_set_info(v, t, &map, &active)).collect();
        Ok(Response::new(pb::ListRuleSetsResponse { rule_sets, active_version: active }))
    }

    async fn start_canary(&self, request: Request<pb::StartCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let who = Caller::name_of(&request);
        let plan_toml = request.into_inner().plan_toml;
        let candidate = idgraph_core::canary::CanaryPlan::from_toml(&plan_toml).map(|p| p.candidate).unwrap_or_default();
        let id = ulid::Ulid::new().to_string();
        let target = format!("rollout {id} of rule set {candidate}");
        audited(&self.router, who, "StartCanary", |_| target, self.start(id, plan_toml)).await
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
        let who = Caller::name_of(&request);
        let step = match request.into_inner().step {
            0 => None,
            n => Some(n as usize - 1),
        };
        let id = self.current_rollout().await;
        let target = format!("rollout {}", id.as_deref().unwrap_or("(none under way)"));
        audited(&self.router, who, "PromoteCanary", |_| target, self.steer(id, Some(step), String::new())).await
    }

    async fn abort_canary(&self, request: Request<pb::AbortCanaryRequest>) -> Result<Response<pb::CanaryRollout>, Status> {
        let who = Caller::name_of(&request);
        let reason = match request.into_inner().reason.trim() {
            "" => "an operator aborted it".to_string(),
            r => r.chars().take(200).collect(),
        };
        let id = self.current_rollout().await;
        let target = format!("rollout {}", id.as_deref().unwrap_or("(none under way)"));
        audited(&self.router, who, "AbortCanary", |_| target, self.steer(id, None, reason)).await
    }
}

impl AdminService {
    /// Starts a rollout under `id`.
    async fn start(&self, id: String, plan_toml: String) -> Result<Response<pb::CanaryRollout>, Status> {
        // Precise errors before anything is proposed; the metadata group
        // checks again against its state (stored versions, a rollout under way).
        if let Err(e) = idgraph_core::canary::CanaryPlan::from_toml(&plan_toml) {
            let (field, reason) = match e {
                idgraph_core::canary::PlanError::Invalid { field, reason } => (format!("plan_toml.{field}"), reason),
                e @ idgraph_core::canary::PlanError::Parse(_) => ("plan_toml".to_string(), e.to_string()),
            };
            return Err(invalid_field(&field, &reason));
        }
        let start = CanaryCommand::Start { id: id.clone(), plan_toml, control: String::new(), shard_count: 0, at_ms: self.router.now_ms() };
        self.router.change_cluster(MetaCommand::Canary(start)).await?;
        info!(rollout = %id, "canary rollout started");
        self.get_canary(Request::new(pb::GetCanaryRequest { id })).await
    }

    /// Promotes (`Some(step)`) or aborts (`None`) the rollout under way.
    async fn steer(
        &self,
        id: Result<String, Status>,
        promote: Option<Option<usize>>,
        reason: String,
    ) -> Result<Response<pb::CanaryRollout>, Status> {
        let id = id?;
        let at_ms = self.router.now_ms();
        let cmd = match promote {
            Some(step) => CanaryCommand::Promote { id: id.clone(), step, at_ms },
            None => CanaryCommand::Abort { id: id.clone(), reason, at_ms },
        };
        self.router.change_cluster(MetaCommand::Canary(cmd)).await?;
        match promote {
            Some(_) => info!(rollout = %id, "canary step promoted by an operator"),
            None => info!(rollout = %id, "canary rollout aborted by an operator"),
        }
        self.get_canary(Request::new(pb::GetCanaryRequest { id })).await
    }

    /// Drains a node and waits until the metadata leader forgot it.
    async fn remove(&self, node_id: u64) -> Result<Response<pb::ClusterStatus>, Status> {
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

/// The first chunk of a backup: what it holds and the metadata it keeps.
#[derive(serde::Serialize, serde::Deserialize)]
struct BackupManifest {
    /// 1: shard images as `GraphStore::snapshot` writes them.
    format: u32,
    backup_id: String,
    created_at_ms: i64,
    shard_count: u32,
    meta: idgraph_core::meta::MetaBackup,
}

const BACKUP_FORMAT: u32 = 1;
/// Bytes of an image per chunk.
const BACKUP_PIECE: usize = 1 << 20;

/// Streams a backup: its manifest, then every shard's image, read on its
/// leader while the fence holds. The bytes sent, or why it stopped.
async fn send_backup(
    router: &ShardRouter,
    id: &str,
    tx: &tokio::sync::mpsc::Sender<Result<pb::BackupChunk, Status>>,
) -> Result<u64, Status> {
    let gone = || Status::cancelled("the caller went away");
    let manifest = BackupManifest {
        format: BACKUP_FORMAT,
        backup_id: id.to_string(),
        created_at_ms: router.now_ms(),
        shard_count: router.map().count(),
        meta: router.meta_backup().await?,
    };
    let manifest_json = serde_json::to_string(&manifest).map_err(|e| Status::internal(e.to_string()))?;
    tx.send(Ok(pb::BackupChunk { manifest_json, ..Default::default() })).await.map_err(|_| gone())?;
    let mut bytes = 0;
    for shard in router.map().shards() {
        let image = router.backup_image(shard).await?;
        let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&image));
        let pieces: Vec<&[u8]> = if image.is_empty() { vec![&[]] } else { image.chunks(BACKUP_PIECE).collect() };
        let last = pieces.len() - 1;
        for (i, piece) in pieces.into_iter().enumerate() {
            let chunk = pb::BackupChunk {
                manifest_json: String::new(),
                shard: shard.0,
                data: piece.to_vec(),
                digest: if i == last { digest.clone() } else { String::new() },
            };
            tx.send(Ok(chunk)).await.map_err(|_| gone())?;
        }
        bytes += image.len() as u64;
    }
    Ok(bytes)
}

/// Takes a backup's chunks into this cluster: every shard's image, each
/// checked against its digest, then the metadata.
async fn restore_backup(
    router: &ShardRouter,
    mut inbound: Streaming<pb::BackupChunk>,
    grant: Option<Grant>,
) -> Result<pb::RestoreResponse, Status> {
    let first = inbound.message().await?.ok_or_else(|| invalid_field("manifest_json", "the stream is empty"))?;
    let manifest: BackupManifest =
        serde_json::from_str(&first.manifest_json).map_err(|e| invalid_field("manifest_json", &format!("not a backup manifest: {e}")))?;
    if manifest.format != BACKUP_FORMAT {
        return Err(invalid_field(
            "manifest_json.format",
            &format!("{} is not a format this node reads ({BACKUP_FORMAT})", manifest.format),
        ));
    }
    let count = router.map().count();
    if manifest.shard_count != count {
        return Err(RequestError::Engine(idgraph_core::engine::EngineError::FailedPrecondition {
            reason: format!(
                "the backup has {} shards and this cluster {count}: restore into a cluster created with --shards {}",
                manifest.shard_count, manifest.shard_count
            ),
            limit: None,
        })
        .into());
    }
    // What the metadata group would refuse is refused before any shard
    // changes.
    if let (Some(r), _) = router.rollouts(false).await? {
        return Err(RequestError::Engine(idgraph_core::engine::EngineError::FailedPrecondition {
            reason: format!("canary rollout {} is under way; restore into a new cluster", r.id),
            limit: None,
        })
        .into());
    }
    let stored: std::collections::BTreeMap<String, String> = router.stored_rule_sets().await?.into_iter().collect();
    if let Some((version, _)) = manifest.meta.rule_sets.iter().find(|(v, t)| stored.get(v).is_some_and(|s| s != t)) {
        return Err(RequestError::Engine(idgraph_core::engine::EngineError::FailedPrecondition {
            reason: format!("rule set {version:?} is stored here with other rules than the backup's"),
            limit: None,
        })
        .into());
    }
    let mut image: Vec<u8> = Vec::new();
    let mut current: Option<u32> = None;
    let mut done = std::collections::BTreeSet::new();
    let mut bytes = 0u64;
    while let Some(chunk) = inbound.message().await? {
        // No shard is restored from pieces read after the token was revoked.
        Grant::recheck(&grant)?;
        if chunk.shard >= count {
            return Err(invalid_field("shard", &format!("{} is not a shard of this cluster", chunk.shard)));
        }
        if done.contains(&chunk.shard) || current.is_some_and(|c| c != chunk.shard) {
            return Err(invalid_field("shard", &format!("shard {}'s pieces are not in one run", chunk.shard)));
        }
        current = Some(chunk.shard);
        image.extend_from_slice(&chunk.data);
        if chunk.digest.is_empty() {
            continue;
        }
        if format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&image)) != chunk.digest {
            return Err(invalid_field("digest", &format!("shard {}'s image does not match its digest", chunk.shard)));
        }
        let shard = idgraph_core::model::ShardId(chunk.shard);
        bytes += router.restore_image(shard, std::mem::take(&mut image)).await?;
        info!(%shard, "shard restored from a backup");
        done.insert(chunk.shard);
        current = None;
    }
    if let Some(missing) = (0..count).find(|s| !done.contains(s)) {
        return Err(invalid_field("shard", &format!("the backup ended before shard {missing}'s image")));
    }
    Grant::recheck(&grant)?;
    router.change_cluster(MetaCommand::Restore(Box::new(manifest.meta))).await?;
    info!(backup = %manifest.backup_id, shards = count, bytes, "backup restored");
    Ok(pb::RestoreResponse { shards: count, bytes })
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
