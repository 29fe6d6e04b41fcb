//! Routes requests from the gRPC adapters to shard actors.
//!
//! The [`ShardMap`] says which shard holds an identifier. A single node
//! serves the one-shard map; the same router, with more shards and remote
//! leaders, is what the cluster grows from.

use crate::engine::{Command, CommandKind, FoundProfile, Outcome, ProfileRef};
use crate::model::{Counters, HubRecord, Identifier, MergeRecord, ShardId};
use crate::raft::{Peers, ShardFailure, ShardRead, ShardReply, ShardRequest};
use crate::rules::RuleSet;
use crate::service::status::ServiceError;
use crate::shard::{shard_actor_name, ShardMsg};
use ractor::rpc::CallResult;
use ractor::ActorRef;
use std::sync::Arc;
use std::time::Duration;

/// Which shard holds what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    count: u32,
}

impl ShardMap {
    pub fn new(count: u32) -> ShardMap {
        ShardMap { count: count.max(1) }
    }

    pub fn shards(&self) -> Vec<ShardId> {
        (0..self.count).map(ShardId).collect()
    }

    pub fn count(&self) -> u32 {
        self.count
    }
}

/// The node's entry point for requests: picks the shard, stamps commands
/// with time and an operation id, calls the local shard actor, and forwards
/// to the shard's leader when this node is not it.
#[derive(Clone)]
pub struct ShardRouter {
    node: Arc<str>,
    map: ShardMap,
    rules: Arc<RuleSet>,
    timeout: Duration,
    peers: Peers,
}

/// What a shard's failure means to the caller.
fn service_error(shard: ShardId, f: ShardFailure) -> ServiceError {
    match f {
        ShardFailure::Refused(r) => ServiceError::Engine(r.into_engine()),
        ShardFailure::NotLeader { .. } => {
            ServiceError::Unavailable { shard: shard.to_string(), reason: "no leader was elected in time".into() }
        }
        ShardFailure::Unavailable { reason, .. } => ServiceError::Unavailable { shard: shard.to_string(), reason },
    }
}

/// How long a request waits in all for a shard to have a leader.
const LEADER_WAIT: Duration = Duration::from_secs(5);

impl ShardRouter {
    pub fn new(node: &str, map: ShardMap, rules: Arc<RuleSet>, timeout: Duration, peers: Peers) -> ShardRouter {
        ShardRouter { node: node.into(), map, rules, timeout, peers }
    }

    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    /// The shard a request is served by. With one shard every request is
    /// local to it; cross-shard commands need the cluster's commit protocol.
    fn home(&self) -> ShardId {
        ShardId(0)
    }

    fn actor(&self, shard: ShardId) -> Result<ActorRef<ShardMsg>, ShardFailure> {
        ActorRef::where_is(shard_actor_name(&self.node, shard))
            .ok_or_else(|| ShardFailure::Unavailable { shard: shard.0, reason: "its actor is restarting".into() })
    }

    async fn local(&self, shard: ShardId, req: &ShardRequest) -> Result<ShardReply, ShardFailure> {
        let actor = self.actor(shard)?;
        let unavailable = |reason: String| ShardFailure::Unavailable { shard: shard.0, reason };
        match actor.call(|port| ShardMsg::Request(Box::new(req.clone()), port), Some(self.timeout)).await {
            Ok(CallResult::Success(r)) => r,
            Ok(CallResult::Timeout) => Err(unavailable(format!("no answer within {} ms", self.timeout.as_millis()))),
            Ok(CallResult::SenderError) => Err(unavailable("the shard stopped while serving the request; its outcome is unknown".into())),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// Serves a request on the shard's leader, wherever it is. Only
    /// "not the leader" answers are retried: such a request was not applied.
    async fn request(&self, shard: ShardId, req: ShardRequest) -> Result<ShardReply, ServiceError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut backoff = Duration::from_millis(20);
        loop {
            let answer = match self.local(shard, &req).await {
                Err(ShardFailure::NotLeader { leader: Some((_, addr)), .. }) => self.peers.forward(&addr, shard, &req, self.timeout).await,
                other => other,
            };
            match answer {
                Err(ShardFailure::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return other.map_err(|f| service_error(shard, f)),
            }
        }
    }

    pub async fn execute(&self, kind: CommandKind) -> Result<Outcome, ServiceError> {
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let cmd = Command { at_ms, op_id: ulid::Ulid::new().to_string(), kind };
        match self.request(self.home(), ShardRequest::Write(Box::new(cmd))).await? {
            ShardReply::Outcome(o) => Ok(o),
            _ => Err(ServiceError::Internal("a write was answered with a read".into())),
        }
    }

    async fn read(&self, shard: ShardId, r: ShardRead) -> Result<ShardReply, ServiceError> {
        self.request(shard, ShardRequest::Read(r)).await
    }

    pub async fn get_profile(&self, r: ProfileRef) -> Result<FoundProfile, ServiceError> {
        match self.read(self.home(), ShardRead::Profile(r)).await? {
            ShardReply::Profile(p) => Ok(p),
            _ => Err(ServiceError::Internal("unexpected reply kind".into())),
        }
    }

    /// A possibly stale read of the local replica: no leader round trip, no
    /// forwarding.
    pub async fn get_profile_stale(&self, r: ProfileRef) -> Result<FoundProfile, ServiceError> {
        let shard = self.home();
        match self.local(shard, &ShardRequest::Read(ShardRead::StaleProfile(r))).await.map_err(|f| service_error(shard, f))? {
            ShardReply::Profile(p) => Ok(p),
            _ => Err(ServiceError::Internal("unexpected reply kind".into())),
        }
    }

    pub async fn get_merge(&self, id: String) -> Result<MergeRecord, ServiceError> {
        match self.read(self.home(), ShardRead::Merge(id)).await? {
            ShardReply::Merge(m) => Ok(m),
            _ => Err(ServiceError::Internal("unexpected reply kind".into())),
        }
    }

    pub async fn list_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, ServiceError> {
        let mut all = Vec::new();
        for shard in self.map.shards() {
            match self.read(shard, ShardRead::Hubs(limit)).await? {
                ShardReply::Hubs(h) => all.extend(h),
                _ => return Err(ServiceError::Internal("unexpected reply kind".into())),
            }
        }
        all.truncate(limit);
        Ok(all)
    }

    pub async fn counters(&self) -> Result<Counters, ServiceError> {
        let mut total = Counters::default();
        for shard in self.map.shards() {
            match self.read(shard, ShardRead::Counters).await? {
                ShardReply::Counters(c) => total.add(&c),
                _ => return Err(ServiceError::Internal("unexpected reply kind".into())),
            }
        }
        Ok(total)
    }

    /// Applies a membership change to every shard's group, on its leader.
    pub async fn change_membership(&self, change: crate::raft::MembershipChange) -> Result<(), ServiceError> {
        for shard in self.map.shards() {
            self.request(shard, ShardRequest::Membership(change.clone())).await?;
        }
        Ok(())
    }

    /// Test hook: makes a shard actor panic.
    #[doc(hidden)]
    pub fn crash_shard(&self, shard: ShardId) -> Result<(), ServiceError> {
        let actor = self.actor(shard).map_err(|e| ServiceError::Unavailable { shard: shard.to_string(), reason: e.to_string() })?;
        actor.cast(ShardMsg::Crash).map_err(|e| ServiceError::Unavailable { shard: shard.to_string(), reason: e.to_string() })
    }
}
