//! Routes requests from the gRPC adapters to shard actors.
//!
//! The [`ShardMap`] says which shard holds an identifier. A single node
//! serves the one-shard map; the same router, with more shards and remote
//! leaders, is what the cluster grows from.

use crate::engine::{Command, CommandKind, FoundProfile, Outcome, ProfileRef};
use crate::model::{Counters, HubRecord, Identifier, MergeRecord, ShardId};
use crate::rules::RuleSet;
use crate::service::status::ServiceError;
use crate::shard::{shard_actor_name, Reply, ShardMsg};
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

    /// The shard that owns an identifier's index entry.
    pub fn shard_of(&self, id: &Identifier) -> ShardId {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(id.kind.as_bytes());
        h.update(&[0]);
        h.update(id.value.as_bytes());
        ShardId((h.digest() % self.count as u64) as u32)
    }
}

/// The node's entry point for requests: picks the shard, stamps commands
/// with time and an operation id, and calls the shard's actor.
#[derive(Clone)]
pub struct ShardRouter {
    node: Arc<str>,
    map: ShardMap,
    rules: Arc<RuleSet>,
    timeout: Duration,
}

impl ShardRouter {
    pub fn new(node: &str, map: ShardMap, rules: Arc<RuleSet>, timeout: Duration) -> ShardRouter {
        ShardRouter { node: node.into(), map, rules, timeout }
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

    fn actor(&self, shard: ShardId) -> Result<ActorRef<ShardMsg>, ServiceError> {
        ActorRef::where_is(shard_actor_name(&self.node, shard))
            .ok_or_else(|| ServiceError::Unavailable { shard: shard.to_string(), reason: "its actor is restarting".into() })
    }

    async fn call<T: Send + 'static>(&self, shard: ShardId, msg: impl FnOnce(Reply<T>) -> ShardMsg) -> Result<T, ServiceError> {
        let actor = self.actor(shard)?;
        match actor.call(msg, Some(self.timeout)).await {
            Ok(CallResult::Success(r)) => r.map_err(ServiceError::from),
            Ok(CallResult::Timeout) => Err(ServiceError::Timeout { ms: self.timeout.as_millis() as u64 }),
            Ok(CallResult::SenderError) => Err(ServiceError::Unavailable {
                shard: shard.to_string(),
                reason: "the shard stopped while serving the request; its outcome is unknown".into(),
            }),
            Err(e) => Err(ServiceError::Unavailable { shard: shard.to_string(), reason: e.to_string() }),
        }
    }

    pub async fn execute(&self, kind: CommandKind) -> Result<Outcome, ServiceError> {
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        let cmd = Command { at_ms, op_id: ulid::Ulid::new().to_string(), kind };
        self.call(self.home(), |port| ShardMsg::Execute(Box::new(cmd), port)).await
    }

    pub async fn get_profile(&self, r: ProfileRef) -> Result<FoundProfile, ServiceError> {
        self.call(self.home(), |port| ShardMsg::GetProfile(r, port)).await
    }

    pub async fn get_merge(&self, id: String) -> Result<MergeRecord, ServiceError> {
        self.call(self.home(), |port| ShardMsg::GetMerge(id, port)).await
    }

    pub async fn list_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, ServiceError> {
        let mut all = Vec::new();
        for shard in self.map.shards() {
            all.extend(self.call(shard, |port| ShardMsg::ListHubs(limit, port)).await?);
        }
        all.truncate(limit);
        Ok(all)
    }

    pub async fn counters(&self) -> Result<Counters, ServiceError> {
        let mut total = Counters::default();
        for shard in self.map.shards() {
            total.add(&self.call(shard, ShardMsg::Counters).await?);
        }
        Ok(total)
    }

    /// Test hook: makes a shard actor panic.
    #[doc(hidden)]
    pub fn crash_shard(&self, shard: ShardId) -> Result<(), ServiceError> {
        self.actor(shard)?.cast(ShardMsg::Crash).map_err(|e| ServiceError::Unavailable { shard: shard.to_string(), reason: e.to_string() })
    }
}
