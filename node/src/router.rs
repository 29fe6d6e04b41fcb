//! Routes requests from the gRPC adapters to shard actors.
//!
//! The [`ShardMap`] says how many shards there are; [`GraphKey::shard`]
//! says which one holds a record. With one shard, a command is one log
//! entry that the engine runs on that shard. With more, the router is the
//! coordinator of a cross-shard transaction ([`crate::txn`]): it implements
//! [`ShardAccess`] by sending reads and transaction steps to each shard's
//! leader, here or on another node.

use crate::error::RequestError;
use crate::kpi::{EventMix, KpiLedger};
use crate::metrics::NodeMetrics;
use crate::peer::Peers;
use crate::raft::{
    LeadershipStep, ReplicaDigest, ReplicaStatus, Replicas, ShardCommand, ShardFailure, ShardRead, ShardReplica, ShardReply, ShardRequest,
};
use crate::shard::ShardMsg;
use crate::txn::{self, GraphKey, KeyRead, ReadMode, ShardAccess, TxnError, TxnOp, TxnReply};
use idgraph_core::canary::KpiCounts;
use idgraph_core::canary::{MergeStamp, Rollout};
use idgraph_core::engine::EngineError;
use idgraph_core::engine::{Command, CommandKind, FoundProfile, Outcome, ProfileRef};
use idgraph_core::meta::{AuditEntry, ClusterMap, MetaCommand};
use idgraph_core::model::{Counters, GroupId, HubRecord, Identifier, MergeRecord, ShardId};
use idgraph_core::rules::RuleSet;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};
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

/// A peer's answer to "which log features do you apply" (`None`: it did not
/// answer), and when it was asked.
type PeerFeatures = (std::time::Instant, Option<Vec<String>>);

/// Dedup records a retention sweep reads per page of a shard.
const RETENTION_PAGE: usize = 2_000;
/// Pages a retention sweep reads of one shard in one step at most (while
/// more than half of each is forgotten).
const RETENTION_PAGES: usize = 10;

/// The node's entry point for requests: picks the shard, stamps commands
/// with time and an operation id, calls the local shard actor, and forwards
/// to the shard's leader when this node is not it.
#[derive(Clone)]
pub struct ShardRouter {
    node: Arc<str>,
    node_id: u64,
    map: ShardMap,
    /// The rules this node was started with: the cluster's first version,
    /// and the rules of a one-shard map.
    rules: Arc<RuleSet>,
    /// Compiled rule sets by version, fetched from the metadata group.
    book: Arc<RwLock<HashMap<String, Arc<RuleSet>>>>,
    /// What events each version resolved, for the canary coordinator.
    kpis: KpiLedger,
    /// The node's Prometheus counters.
    metrics: Arc<NodeMetrics>,
    /// What each peer answered when asked for the log features it applies,
    /// and when (see [`ShardRouter::members_apply`]).
    features: Arc<std::sync::Mutex<HashMap<String, PeerFeatures>>>,
    timeout: Duration,
    peers: Peers,
    /// The replicas this node holds.
    replicas: Replicas,
    /// This node's copy of the cluster map (see [`crate::placement`]): where
    /// to send requests for groups held elsewhere.
    cluster: Arc<RwLock<ClusterMap>>,
    /// When the node first read the map from the metadata group (until
    /// then its copy may lack a backup's fence).
    map_read: Arc<std::sync::OnceLock<std::time::Instant>>,
    started: std::time::Instant,
}

/// What a shard's failure means to the caller.
fn service_error(shard: GroupId, f: ShardFailure) -> RequestError {
    match f {
        ShardFailure::Refused(r) => RequestError::Engine(r.into_engine()),
        ShardFailure::NotLeader { .. } => {
            RequestError::Unavailable { shard: shard.to_string(), reason: "no leader was elected in time".into() }
        }
        ShardFailure::Unavailable { reason, .. } => RequestError::Unavailable { shard: shard.to_string(), reason },
        ShardFailure::DiskFull { .. } => RequestError::DiskFull { shard: shard.to_string() },
        f @ ShardFailure::Overloaded { .. } => RequestError::Overloaded { shard: shard.to_string(), reason: overload_reason(&f) },
        ShardFailure::NoReplica { .. } => {
            RequestError::Unavailable { shard: shard.to_string(), reason: "no node holding a replica answered".into() }
        }
    }
}

/// What an overloaded shard says, without the shard (the caller names it).
fn overload_reason(f: &ShardFailure) -> String {
    match f {
        ShardFailure::Overloaded { waiting, .. } => format!("{waiting} writes are waiting for its log; retry after a backoff"),
        other => other.to_string(),
    }
}

/// What a cross-shard command's failure means to the caller.
fn txn_error(e: TxnError) -> RequestError {
    match e {
        TxnError::Refused(e) => RequestError::Engine(e),
        TxnError::Unavailable { shard, reason } => RequestError::Unavailable { shard: shard.to_string(), reason },
        e @ TxnError::Contention { .. } => RequestError::Aborted(e.to_string()),
        TxnError::Overloaded { shard, reason } => RequestError::Overloaded { shard: shard.to_string(), reason },
        TxnError::DiskFull { shard } => RequestError::DiskFull { shard: shard.to_string() },
        TxnError::Internal(reason) => RequestError::Internal(reason),
    }
}

/// How long a request waits in all for a shard to have a leader.
const LEADER_WAIT: Duration = Duration::from_secs(5);

impl ShardRouter {
    pub fn new(
        node: &str,
        node_id: u64,
        map: ShardMap,
        rules: Arc<RuleSet>,
        timeout: Duration,
        peers: Peers,
        replicas: Replicas,
    ) -> ShardRouter {
        let book = Arc::new(RwLock::new(HashMap::from([(rules.version().to_string(), rules.clone())])));
        ShardRouter {
            node: node.into(),
            node_id,
            map,
            rules,
            book,
            kpis: KpiLedger::default(),
            metrics: NodeMetrics::new(),
            features: Arc::default(),
            timeout,
            peers,
            replicas,
            cluster: Default::default(),
            map_read: Default::default(),
            started: std::time::Instant::now(),
        }
    }

    pub fn node_id(&self) -> u64 {
        self.node_id
    }

    /// This node's copy of the cluster map.
    pub fn cluster(&self) -> ClusterMap {
        self.cluster.read().map(|m| m.clone()).unwrap_or_default()
    }

    /// Replaces this node's copy of the cluster map with a newer one.
    pub fn set_cluster(&self, map: ClusterMap) {
        if map.shadow_rules.is_none() {
            self.kpis.end_shadow();
        }
        if let Ok(mut m) = self.cluster.write() {
            if map.version >= m.version {
                *m = map;
            }
        }
    }

    /// The groups this node holds a replica of.
    pub fn hosted(&self) -> Vec<GroupId> {
        let mut out: Vec<GroupId> = self.replicas.read().map(|r| r.keys().copied().collect()).unwrap_or_default();
        out.sort();
        out
    }

    /// Who this node's replica of `group` believes leads it.
    pub fn local_leader(&self, group: GroupId) -> Option<u64> {
        self.replicas.read().ok()?.get(&group).and_then(|r| r.raft.metrics().borrow().current_leader)
    }

    /// The Raft status of every replica this node holds, in group order.
    pub fn replica_statuses(&self) -> Vec<ReplicaStatus> {
        let mut out: Vec<ReplicaStatus> = self.local_replicas().iter().map(ShardReplica::status).collect();
        out.sort_by_key(|s| s.group);
        out
    }

    /// The state digest of every replica this node holds, in group order.
    /// Each reads its whole shard (and may wait for a snapshot build's view
    /// of the tree), so it is read on the blocking pool.
    pub async fn replica_digests(&self) -> Result<Vec<(GroupId, ReplicaDigest)>, RequestError> {
        let mut out = Vec::new();
        for r in self.local_replicas() {
            let unavailable = |reason: String| RequestError::Unavailable { shard: r.group.to_string(), reason };
            let store = r.store.clone();
            let d = tokio::task::spawn_blocking(move || crate::raft::replica_digest(&*store))
                .await
                .map_err(|e| unavailable(format!("the digest stopped: {e}")))?
                .map_err(|e| unavailable(e.to_string()))?;
            out.push((r.group, d));
        }
        out.sort_by_key(|(shard, _)| *shard);
        Ok(out)
    }

    /// Whether the node can serve: it has a cluster map, and every group
    /// the map gives it has a replica here that knows its leader.
    pub fn serves_its_groups(&self) -> bool {
        let map = self.cluster();
        if !map.is_bootstrapped() {
            return false;
        }
        let held: HashMap<GroupId, ShardReplica> = self.local_replicas().into_iter().map(|r| (r.group, r)).collect();
        map.groups_of(self.node_id).into_iter().all(|g| held.get(&g).is_some_and(|r| r.status().leader_id != 0))
    }

    /// Sets the metrics' gauges from this node's replicas and data
    /// directory, as of now (each scrape).
    pub fn refresh_gauges(&self, data_dir: &std::path::Path) {
        use crate::raft::RaftRole;
        use idgraph_core::graph::GraphRead;
        let m = &self.metrics;
        let groups = [
            &m.raft_role,
            &m.raft_term,
            &m.raft_last_log_index,
            &m.raft_applied_index,
            &m.raft_snapshot_index,
            &m.snapshot_bytes,
            &m.pending_write_bytes,
        ];
        // Groups this node no longer holds drop out.
        for g in groups {
            g.reset();
        }
        let mut hubs = 0;
        let images = crate::storage::ImageFile::dir(data_dir);
        for r in self.local_replicas() {
            let s = r.status();
            let label = match r.group {
                GroupId::Meta => "meta".to_string(),
                GroupId::Shard(n) => format!("shard-{}", n.0),
            };
            let role = match s.role {
                RaftRole::Follower => 0,
                RaftRole::Candidate => 1,
                RaftRole::Leader => 2,
                RaftRole::Learner => 3,
                RaftRole::Shutdown => -1,
            };
            let label = [label.as_str()];
            m.raft_role.with_label_values(&label).set(role);
            m.raft_term.with_label_values(&label).set(s.term as i64);
            m.raft_last_log_index.with_label_values(&label).set(s.last_log_index as i64);
            m.raft_applied_index.with_label_values(&label).set(s.applied_index as i64);
            m.raft_snapshot_index.with_label_values(&label).set(s.snapshot_index as i64);
            m.snapshot_bytes.with_label_values(&label).set(crate::storage::ImageFile::of(&images, r.group).bytes() as i64);
            m.pending_write_bytes.with_label_values(&label).set(r.store.pending_bytes() as i64);
            let (leased, after_round) = r.lease.take_read_counts();
            m.linearizable_reads.with_label_values(&["lease"]).inc_by(leased);
            m.linearizable_reads.with_label_values(&["round"]).inc_by(after_round);
            if s.role == RaftRole::Leader && r.group != GroupId::Meta {
                hubs += r.store.counters().map_or(0, |c| c.hubs);
            }
        }
        m.hubs.set(hubs);
        let (mut log, mut store) = (0u64, 0u64);
        let mut dirs = vec![(data_dir.to_path_buf(), false)];
        while let Some((dir, in_log)) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                let in_log = in_log || (dir == data_dir && entry.file_name() == "log");
                if meta.is_dir() {
                    dirs.push((entry.path(), in_log));
                } else if in_log {
                    log += meta.len();
                } else {
                    store += meta.len();
                }
            }
        }
        m.log_bytes.set(log as i64);
        m.storage_bytes.set(store as i64);
    }

    fn local_replicas(&self) -> Vec<ShardReplica> {
        self.replicas.read().map(|r| r.values().cloned().collect()).unwrap_or_default()
    }

    /// The shared copy of the cluster map (the transport serves it to
    /// joining nodes).
    pub fn cluster_handle(&self) -> Arc<RwLock<ClusterMap>> {
        self.cluster.clone()
    }

    /// Whether this node holds a replica of `group`.
    pub fn hosts(&self, group: GroupId) -> bool {
        self.replicas.read().is_ok_and(|r| r.contains_key(&group))
    }

    /// Where to send a request for a group held elsewhere: its replicas'
    /// addresses, the `attempt`-th first.
    fn remote_members(&self, group: GroupId, attempt: usize) -> Vec<String> {
        let mut addrs = self.cluster().addrs_of(group);
        if !addrs.is_empty() {
            let n = addrs.len();
            addrs.rotate_left(attempt % n);
        }
        addrs
    }

    /// One try of a request: on the local replica, or on a node holding
    /// one; a follower's "not the leader" answer is followed to the leader.
    async fn attempt(&self, shard: GroupId, req: &ShardRequest, attempt: usize) -> Result<ShardReply, ShardFailure> {
        let local = self.replicas.read().ok().and_then(|r| r.get(&shard).cloned());
        let mut answer = match local {
            // A follower that knows its leader would only answer "not the
            // leader": the request goes straight there.
            Some(replica) => match req.needs_leader().then(|| replica.leader_elsewhere()).flatten() {
                Some(addr) => self.peers.forward(&addr, shard, req, self.timeout).await,
                None => self.local(shard, req).await,
            },
            None => Err(ShardFailure::NoReplica { shard }),
        };
        // No replica here, or one that knows no leader (it may have been
        // removed from its group and not know it yet): ask the replicas
        // the map lists.
        if matches!(answer, Err(ShardFailure::NoReplica { .. } | ShardFailure::NotLeader { leader: None, .. })) {
            let me = self.cluster().nodes.get(&self.node_id).map(|e| e.addr.clone());
            for addr in self.remote_members(shard, attempt).into_iter().filter(|a| Some(a) != me.as_ref()) {
                answer = self.peers.forward(&addr, shard, req, self.timeout).await;
                // A node that holds no replica did nothing: try the next.
                if !matches!(answer, Err(ShardFailure::NoReplica { .. })) {
                    break;
                }
            }
        }
        match answer {
            Err(ShardFailure::NotLeader { leader: Some((_, addr)), .. }) => self.peers.forward(&addr, shard, req, self.timeout).await,
            other => other,
        }
    }

    pub fn now_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }

    /// The rules this node was started with (see [`ShardRouter::active_rules`]).
    pub fn rules(&self) -> &Arc<RuleSet> {
        &self.rules
    }

    pub fn kpis(&self) -> &KpiLedger {
        &self.kpis
    }

    /// The version the cluster runs: the map's, or this node's own rules
    /// on a one-shard map and before the map names one.
    pub fn active_version(&self) -> String {
        let map = self.cluster.read().map(|m| m.active_rules.clone()).unwrap_or_default();
        if map.is_empty() || self.single_shard() {
            self.rules.version().to_string()
        } else {
            map
        }
    }

    /// The cluster's rule set.
    pub async fn active_rules(&self) -> Result<Arc<RuleSet>, RequestError> {
        self.rule_set(&self.active_version()).await
    }

    /// A stored rule set, compiled; fetched from the metadata group the
    /// first time this node needs it.
    pub async fn rule_set(&self, version: &str) -> Result<Arc<RuleSet>, RequestError> {
        if let Some(r) = self.book.read().ok().and_then(|b| b.get(version).cloned()) {
            return Ok(r);
        }
        for (v, toml) in self.stored_rule_sets().await? {
            if self.book.read().is_ok_and(|b| b.contains_key(&v)) {
                continue;
            }
            let compiled =
                RuleSet::from_toml(&toml).map_err(|e| RequestError::Internal(format!("stored rule set {v:?} does not compile: {e}")))?;
            if let Ok(mut b) = self.book.write() {
                b.insert(v, Arc::new(compiled));
            }
        }
        self.book.read().ok().and_then(|b| b.get(version).cloned()).ok_or_else(|| {
            RequestError::Engine(EngineError::NotFound { field: "version".into(), what: format!("rule set version {version:?}") })
        })
    }

    /// Every stored rule set: version and TOML.
    pub async fn stored_rule_sets(&self) -> Result<Vec<(String, String)>, RequestError> {
        match self.read(GroupId::Meta, ShardRead::RuleSets).await? {
            ShardReply::RuleSets(sets) => Ok(sets),
            _ => Err(RequestError::Internal("a rule-set listing was answered with something else".into())),
        }
    }

    /// Whether a canary rollout runs (as this node's copy of the map says).
    fn rollout_running(&self) -> bool {
        !self.single_shard() && self.cluster.read().is_ok_and(|m| m.canary.is_some())
    }

    /// The rollout and version evaluated beside the cluster's on every
    /// event (the shadow step of a rollout), if any.
    fn shadow_version(&self) -> Option<(String, String)> {
        let map = self.cluster.read().ok()?;
        Some((map.canary.clone()?, map.shadow_rules.clone()?))
    }

    /// The rules an event is resolved under: those of the shard owning its
    /// anchor identifier (see [`idgraph_core::canary`]); operator commands
    /// run under the cluster's version.
    /// With the shard of the event's anchor while a rollout runs (its KPIs
    /// are counted per shard too).
    async fn rules_for(&self, kind: &CommandKind) -> Result<(Arc<RuleSet>, Option<ShardId>), RequestError> {
        let active = self.active_rules().await?;
        let CommandKind::Identify(ev) = kind else { return Ok((active, None)) };
        let (version, shard) = {
            let Ok(map) = self.cluster.read() else { return Ok((active, None)) };
            if map.canary.is_none() {
                return Ok((active, None));
            }
            match idgraph_core::canary::anchor_shard(&active, &ev.identifiers, self.map.count()) {
                Some(shard) => (map.rules_of(shard).to_string(), Some(shard)),
                None => return Ok((active, None)),
            }
        };
        if version == active.version() {
            return Ok((active, shard));
        }
        Ok((self.rule_set(&version).await?, shard))
    }

    pub fn map(&self) -> &ShardMap {
        &self.map
    }

    async fn local(&self, shard: GroupId, req: &ShardRequest) -> Result<ShardReply, ShardFailure> {
        let restarting = || ShardFailure::Unavailable { shard, reason: "its actor is restarting".into() };
        let actor = crate::shard::actor(&self.node, shard).ok_or_else(restarting)?;
        let replica = self.replicas.read().ok().and_then(|r| r.get(&shard).cloned()).ok_or_else(restarting)?;
        crate::shard::serve(&actor, &replica, req.clone(), self.timeout).await
    }

    /// Serves a request on the shard's leader, wherever it is. Only
    /// "not the leader" answers are retried: such a request was not applied.
    async fn request(&self, shard: GroupId, req: ShardRequest) -> Result<ShardReply, RequestError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let mut backoff = Duration::from_millis(20);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(shard, &req, attempt).await {
                // Nothing was done: a leader is being elected, or the
                // replicas moved since this node's map was read.
                Err(ShardFailure::NotLeader { .. } | ShardFailure::NoReplica { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
                other => return other.map_err(|f| service_error(shard, f)),
            }
        }
    }

    fn single_shard(&self) -> bool {
        self.map.count() == 1
    }

    /// The group of a one-shard map's only shard.
    const ONLY_SHARD: GroupId = GroupId::Shard(ShardId(0));

    /// Runs a state-changing command: one log entry on a one-shard map, a
    /// cross-shard transaction otherwise. The transaction runs as its own
    /// task, so that a caller that goes away does not stop it half-way.
    pub async fn execute(&self, kind: CommandKind) -> Result<Outcome, RequestError> {
        let started = std::time::Instant::now();
        // KPIs are counted only while a rollout runs (nothing reads them
        // otherwise); a one-shard map never runs one.
        let mix = match &kind {
            CommandKind::Identify(ev) if self.rollout_running() => Some(EventMix::of(ev)),
            _ => None,
        };
        let cmd = Command { at_ms: self.now_ms(), op_id: ulid::Ulid::new().to_string(), kind };
        let (version, anchor, result) = if self.single_shard() {
            let result = match self.request(Self::ONLY_SHARD, ShardRequest::Write(Box::new(ShardCommand::Engine(cmd)))).await {
                Ok(ShardReply::Outcome(o)) => Ok(o),
                Ok(_) => Err(RequestError::Internal("a write was answered with a read".into())),
                Err(e) => Err(e),
            };
            (self.rules.version().to_string(), None, result)
        } else {
            let (rules, anchor) = self.rules_for(&cmd.kind).await?;
            // A shadow evaluation when the map asks for one and a slot is free.
            let shadow = match (&mix, self.shadow_version()) {
                (Some(_), Some((rollout, v))) => match (self.rule_set(&v).await.ok(), self.kpis.shadow_slot()) {
                    (Some(rules), Some(slot)) => Some((rollout, rules, slot)),
                    _ => None,
                },
                _ => None,
            };
            let router = self.clone();
            let version = rules.version().to_string();
            let mix_of_shadow = shadow.as_ref().and(mix.clone());
            let kpis = self.kpis.clone();
            let run = tokio::spawn(async move {
                let (Some((rollout, shadow, slot)), Some(mix)) = (shadow, mix_of_shadow) else {
                    return txn::coordinator::execute(&router, &rules, &cmd).await;
                };
                let (result, before) = txn::coordinator::execute_keeping_reads(&router, &rules, &cmd).await;
                // What the shadow would have done is worked out after the
                // answer, off the caller's path.
                if let Some(before) = before {
                    tokio::spawn(async move {
                        let _slot = slot;
                        if let Some(would) = txn::coordinator::shadow(&router, &shadow, &cmd, before).await {
                            kpis.record_shadow(&rollout, &shadow, &mix, would);
                        }
                    });
                }
                result
            })
            .await;
            let result = match run {
                Ok(r) => r.map_err(txn_error),
                Err(e) => Err(RequestError::Internal(format!("a transaction task failed: {e}"))),
            };
            (version, anchor.map(|s| s.0), result)
        };
        if let Some(mix) = mix {
            self.kpis.record(&version, anchor, &mix, &result, Some(started.elapsed()));
        }
        self.count(&result);
        result
    }

    /// Counts a command's result in the node's metrics.
    fn count(&self, result: &Result<Outcome, RequestError>) {
        let m = &self.metrics;
        match result {
            Ok(Outcome::Identify(o)) => {
                m.events.inc();
                m.merges.inc_by(o.merged_profile_ids.len() as u64);
                m.conflicts.inc_by(o.conflicts.len() as u64);
                if o.created {
                    m.new_profiles.inc();
                }
            }
            Err(RequestError::Aborted(_)) => m.txn_aborts.inc(),
            _ => {}
        }
    }

    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    async fn read(&self, shard: GroupId, r: ShardRead) -> Result<ShardReply, RequestError> {
        self.request(shard, ShardRequest::Read(r)).await
    }

    async fn find(&self, r: ProfileRef, mode: ReadMode) -> Result<FoundProfile, RequestError> {
        let rules = self.active_rules().await?;
        txn::coordinator::query(self, mode, |view| idgraph_core::engine::find_profile(view, &rules, &r, "key")).await.map_err(txn_error)
    }

    pub async fn get_profile(&self, r: ProfileRef) -> Result<FoundProfile, RequestError> {
        if !self.single_shard() {
            return self.find(r, ReadMode::Linearizable).await;
        }
        match self.read(Self::ONLY_SHARD, ShardRead::Profile(r)).await? {
            ShardReply::Profile(p) => Ok(p),
            _ => Err(RequestError::Internal("unexpected reply kind".into())),
        }
    }

    /// A possibly stale read of the local replicas: no leader round trip, no
    /// forwarding.
    pub async fn get_profile_stale(&self, r: ProfileRef) -> Result<FoundProfile, RequestError> {
        if !self.single_shard() {
            return self.find(r, ReadMode::Local).await;
        }
        let shard = Self::ONLY_SHARD;
        match self.attempt(shard, &ShardRequest::Read(ShardRead::StaleProfile(r)), 0).await.map_err(|f| service_error(shard, f))? {
            ShardReply::Profile(p) => Ok(p),
            _ => Err(RequestError::Internal("unexpected reply kind".into())),
        }
    }

    pub async fn get_merge(&self, id: String) -> Result<MergeRecord, RequestError> {
        if !self.single_shard() {
            return txn::coordinator::query(self, ReadMode::Linearizable, |view| idgraph_core::engine::find_merge(view, &id))
                .await
                .map_err(txn_error);
        }
        match self.read(Self::ONLY_SHARD, ShardRead::Merge(id)).await? {
            ShardReply::Merge(m) => Ok(m),
            _ => Err(RequestError::Internal("unexpected reply kind".into())),
        }
    }

    /// Settles the abandoned transaction parts (older than the lock timeout)
    /// of the shards this node leads. Run periodically.
    pub async fn sweep_abandoned(&self) {
        if self.single_shard() {
            return;
        }
        for shard in self.map.shards().into_iter().filter(|s| self.hosts(GroupId::Shard(*s))) {
            let req = ShardRequest::Read(ShardRead::PreparedBefore { before_ms: self.now_ms() - txn::LOCK_TIMEOUT_MS });
            // Only the leader answers; followers leave it to their leader.
            let Ok(ShardReply::Locks(stale)) = self.local(shard.into(), &req).await else { continue };
            if stale.is_empty() {
                continue;
            }
            tracing::info!(%shard, parts = stale.len(), "settling transaction parts abandoned by their coordinators");
            if let Err(e) = txn::coordinator::sweep(self, shard, stale).await {
                tracing::warn!(%shard, error = %e, "settling abandoned transaction parts failed; will retry");
            }
        }
    }

    /// One step of the retention sweep on the shards this node leads (see
    /// [`idgraph_core::retention`]): each shard's scan of its dedup records
    /// goes on from `cursors` by a page, and by more pages while they hold
    /// records to forget; those past `retention` are forgotten through the
    /// shard's log. A new leader starts from the first record. Run every
    /// second.
    pub async fn forget_expired_events(&self, retention: Duration, cursors: &mut HashMap<ShardId, String>) {
        for shard in self.map.shards().into_iter().filter(|s| self.hosts(GroupId::Shard(*s))) {
            for _ in 0..RETENTION_PAGES {
                let before_ms = self.now_ms().saturating_sub(i64::try_from(retention.as_millis()).unwrap_or(i64::MAX));
                let after = cursors.get(&shard).cloned();
                let req = ShardRequest::Read(ShardRead::ExpiredEvents { before_ms, after, scan: RETENTION_PAGE });
                let (event_ids, next) = match self.local(shard.into(), &req).await {
                    Ok(ShardReply::ExpiredEvents { event_ids, next }) => (event_ids, next),
                    // Only the leader sweeps; a later leadership starts over.
                    Err(ShardFailure::NotLeader { .. } | ShardFailure::NoReplica { .. }) => {
                        cursors.remove(&shard);
                        break;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(%shard, error = %e, "reading event dedup records for the retention sweep failed; will retry");
                        break;
                    }
                };
                let found = event_ids.len();
                if found > 0 {
                    if !self.members_apply(shard.into(), crate::raft::FORGET_EVENTS).await {
                        // A member runs an older build (a rolling upgrade) or
                        // did not answer: it could not read the command.
                        tracing::debug!(%shard, "a member of the shard cannot apply forget-events yet; sweep waits");
                        break;
                    }
                    let forget = ShardCommand::ForgetEvents { before_ms, event_ids };
                    match self.request(shard.into(), ShardRequest::Write(Box::new(forget))).await {
                        Ok(ShardReply::Forgotten(n)) => {
                            self.metrics.events_forgotten.inc_by(n);
                            tracing::debug!(%shard, forgotten = n, "forgot event dedup records past their retention");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            // The cursor stays: the next sweep scans the page again.
                            tracing::warn!(%shard, error = %e, "forgetting event dedup records failed; will retry");
                            break;
                        }
                    }
                }
                match next {
                    Some(n) => drop(cursors.insert(shard, n)),
                    None => drop(cursors.remove(&shard)),
                }
                if found < RETENTION_PAGE / 2 || !cursors.contains_key(&shard) {
                    break;
                }
            }
        }
    }

    /// Whether every other member of `group`'s Raft membership (voters and
    /// learners: whoever receives its log) runs a build that applies the
    /// log feature `feature` ([`crate::raft::LOG_FEATURES`]). Each peer's
    /// answer is remembered for a minute, a failure to answer for ten
    /// seconds (and counts as no).
    async fn members_apply(&self, group: GroupId, feature: &str) -> bool {
        let Some(replica) = self.replicas.read().ok().and_then(|r| r.get(&group).cloned()) else { return false };
        let members: Vec<(u64, String)> = {
            let metrics = replica.raft.metrics();
            let m = metrics.borrow();
            m.membership_config.membership().nodes().map(|(id, n)| (*id, n.addr.clone())).collect()
        };
        for (id, addr) in members {
            if id == self.node_id {
                continue;
            }
            let known = self.features.lock().ok().and_then(|f| f.get(&addr).cloned());
            let fresh = |(at, answer): &PeerFeatures| {
                at.elapsed() < if answer.is_some() { Duration::from_secs(60) } else { Duration::from_secs(10) }
            };
            let answer = match known.filter(fresh) {
                Some((_, answer)) => answer,
                None => {
                    let answer = match self.peers.features(&addr).await {
                        Ok(f) => Some(f),
                        Err(e) => {
                            tracing::debug!(%addr, error = %e, "a peer did not say which log features it applies");
                            None
                        }
                    };
                    if let Ok(mut f) = self.features.lock() {
                        f.insert(addr.clone(), (std::time::Instant::now(), answer.clone()));
                    }
                    answer
                }
            };
            if !answer.is_some_and(|f| f.iter().any(|f| f == feature)) {
                return false;
            }
        }
        true
    }

    pub async fn list_hubs(&self, limit: usize) -> Result<Vec<(Identifier, HubRecord)>, RequestError> {
        let mut all = Vec::new();
        for shard in self.map.shards() {
            match self.read(shard.into(), ShardRead::Hubs(limit)).await? {
                ShardReply::Hubs(h) => all.extend(h),
                _ => return Err(RequestError::Internal("unexpected reply kind".into())),
            }
        }
        all.truncate(limit);
        Ok(all)
    }

    pub async fn counters(&self) -> Result<Counters, RequestError> {
        let mut total = Counters::default();
        for shard in self.map.shards() {
            match self.read(shard.into(), ShardRead::Counters).await? {
                ShardReply::Counters(c) => total.add(&c),
                _ => return Err(RequestError::Internal("unexpected reply kind".into())),
            }
        }
        Ok(total)
    }

    /// Applies a change to the cluster map, on the metadata group's leader.
    pub async fn change_cluster(&self, cmd: MetaCommand) -> Result<ClusterMap, RequestError> {
        let reply = self.request(GroupId::Meta, ShardRequest::Write(Box::new(ShardCommand::Meta(cmd)))).await?;
        self.adopt_cluster(reply)
    }

    /// Every node's KPI counts since they were last collected, summed by
    /// rule-set version (a node that does not answer is left out).
    pub async fn collect_kpis(&self) -> BTreeMap<String, KpiCounts> {
        let mut all = self.kpis.drain();
        let me = self.node_id;
        let others: Vec<String> = self.cluster().nodes.iter().filter(|(id, _)| **id != me).map(|(_, e)| e.addr.clone()).collect();
        for addr in others {
            match self.peers.kpis(&addr).await {
                Ok(counts) => {
                    for (version, c) in counts {
                        all.entry(version).or_default().add(&c);
                    }
                }
                Err(e) => tracing::debug!(%addr, error = %e, "a node's KPI counts were not collected"),
            }
        }
        all
    }

    /// Stores a rule-set version after checking it compiles.
    pub async fn put_rule_set(&self, toml: String) -> Result<ClusterMap, RequestError> {
        if let Err(e) = RuleSet::from_toml(&toml) {
            let (field, reason) = match e {
                idgraph_core::rules::RuleSetError::Invalid { field, reason } => (format!("toml.{field}"), reason),
                e @ idgraph_core::rules::RuleSetError::Parse(_) => ("toml".to_string(), e.to_string()),
            };
            return Err(RequestError::Engine(EngineError::InvalidArgument { field, reason }));
        }
        self.change_cluster(MetaCommand::PutRuleSet { toml, seed: false }).await
    }

    /// The rollout under way, and the finished ones (oldest first) when
    /// `finished`.
    pub async fn rollouts(&self, finished: bool) -> Result<(Option<Rollout>, Vec<Rollout>), RequestError> {
        match self.read(GroupId::Meta, ShardRead::Rollouts { finished }).await? {
            ShardReply::Rollouts { current, finished } => Ok((current.map(|r| *r), finished)),
            _ => Err(RequestError::Internal("a rollout listing was answered with something else".into())),
        }
    }

    /// An audit log entry for an operator action taken by this node, now.
    pub fn audit_entry(&self, who: String, action: &str, target: String, outcome: String) -> AuditEntry {
        AuditEntry {
            id: ulid::Ulid::new().to_string(),
            at_ms: self.now_ms(),
            who,
            node_id: self.node_id,
            action: action.to_string(),
            target,
            outcome,
        }
    }

    /// Records an entry in the audit log (the metadata group). The same
    /// entry written twice (a retry after an unknown outcome) is one entry.
    pub async fn audit(&self, entry: AuditEntry) -> Result<(), RequestError> {
        self.change_cluster(MetaCommand::Audit(entry)).await.map(|_| ())
    }

    /// Waits while a backup holds cross-shard commits (as this node's map
    /// says; at most until the fence's deadline). A node that has not read
    /// the map from the metadata group since it started waits for that
    /// first (up to 30 s): its first copy may lack a fence set meanwhile.
    async fn wait_for_fence(&self) {
        while self.map_read.get().is_none() && self.started.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut held = false;
        loop {
            let until = self.cluster.read().ok().and_then(|m| m.backup_fence.as_ref().map(|f| f.until_ms));
            match until {
                Some(until) if self.now_ms() < until => {
                    if !held {
                        held = true;
                        self.metrics.backup_held_steps.inc();
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => return,
            }
        }
    }

    /// Whether backup `id`'s fence still holds with `margin_ms` to spare,
    /// as the metadata group says.
    pub async fn fence_holds(&self, id: &str, margin_ms: i64) -> Result<bool, RequestError> {
        let map = self.read_cluster().await?;
        Ok(map.backup_fence.is_some_and(|f| f.id == id && self.now_ms() + margin_ms < f.until_ms))
    }

    /// Holds cross-shard commits for backup `id` and waits until every node
    /// of the map holds them (its copy of the map has the fence) and the
    /// decisions they had under way have landed.
    pub async fn fence(&self, id: &str) -> Result<(), RequestError> {
        let fence =
            idgraph_core::meta::BackupFence { id: id.to_string(), until_ms: self.now_ms() + idgraph_core::meta::BACKUP_FENCE_MAX_MS };
        let map = self.change_cluster(MetaCommand::Fence(fence)).await?;
        self.set_cluster(map.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for (node_id, node) in &map.nodes {
            loop {
                let seen = if *node_id == self.node_id {
                    self.cluster().backup_fence.is_some_and(|f| f.id == id)
                } else {
                    self.peers.cluster_map(&node.addr).await.is_ok_and(|m| m.backup_fence.is_some_and(|f| f.id == id))
                };
                if seen {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    let _ = self.unfence(id).await;
                    return Err(RequestError::Unavailable {
                        shard: "meta".into(),
                        reason: format!("node {node_id} did not take the backup's fence within 30 s"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // Steps that passed the fence before their node saw it may still
        // land while the images are read: harmless (docs/operations.md).
        Ok(())
    }

    /// Ends backup `id`'s hold on cross-shard commits.
    pub async fn unfence(&self, id: &str) -> Result<(), RequestError> {
        let map = self.change_cluster(MetaCommand::Unfence { id: id.to_string() }).await?;
        self.set_cluster(map);
        Ok(())
    }

    /// A shard's records as one image, read on its leader.
    pub async fn backup_image(&self, shard: ShardId) -> Result<Vec<u8>, RequestError> {
        match self.read(shard.into(), ShardRead::Image).await? {
            ShardReply::Image(image) => Ok(image),
            _ => Err(RequestError::Internal("an image read was answered with something else".into())),
        }
    }

    /// What a backup keeps of the metadata group.
    pub async fn meta_backup(&self) -> Result<idgraph_core::meta::MetaBackup, RequestError> {
        match self.read(GroupId::Meta, ShardRead::MetaBackup).await? {
            ShardReply::MetaBackup(b) => Ok(*b),
            _ => Err(RequestError::Internal("a metadata backup read was answered with something else".into())),
        }
    }

    /// Replaces an empty shard's records with a backup's image of them.
    pub async fn restore_image(&self, shard: ShardId, image: Vec<u8>) -> Result<u64, RequestError> {
        match self.request(shard.into(), ShardRequest::Write(Box::new(ShardCommand::Restore(image)))).await? {
            ShardReply::Restored(bytes) => Ok(bytes),
            _ => Err(RequestError::Internal("a restore was answered with something else".into())),
        }
    }

    /// Audit log entries after the entry `after` (all: empty), oldest first.
    pub async fn audit_log(&self, after: String, limit: usize) -> Result<Vec<AuditEntry>, RequestError> {
        match self.read(GroupId::Meta, ShardRead::Audit { after, limit }).await? {
            ShardReply::Audit(entries) => Ok(entries),
            _ => Err(RequestError::Internal("an audit listing was answered with something else".into())),
        }
    }

    /// Merges made on a shard under a rule-set version.
    pub async fn merges_under(&self, shard: ShardId, rule_version: &str) -> Result<Vec<MergeStamp>, RequestError> {
        match self.read(shard.into(), ShardRead::MergesUnder { rule_version: rule_version.to_string() }).await? {
            ShardReply::Merges(m) => Ok(m),
            _ => Err(RequestError::Internal("a merge listing was answered with something else".into())),
        }
    }

    /// The map a metadata-group reply carries, kept as this node's copy.
    fn adopt_cluster(&self, reply: ShardReply) -> Result<ClusterMap, RequestError> {
        match reply {
            ShardReply::Map(m) => {
                self.set_cluster(m.clone());
                let _ = self.map_read.set(std::time::Instant::now());
                Ok(m)
            }
            _ => Err(RequestError::Internal("a cluster map request was answered with something else".into())),
        }
    }

    /// The cluster map as the metadata group holds it (linearizable).
    pub async fn read_cluster(&self) -> Result<ClusterMap, RequestError> {
        let reply = self.read(GroupId::Meta, ShardRead::ClusterMap { mode: ReadMode::Linearizable }).await?;
        self.adopt_cluster(reply)
    }

    /// Changes one group's voters on its leader (a step of a replica move).
    pub async fn change_membership(&self, group: GroupId, change: crate::raft::MembershipChange) -> Result<(), RequestError> {
        self.request(group, ShardRequest::Membership(change)).await.map(|_| ())
    }

    /// Who leads a group, as a replica of it believes (no leadership check).
    pub async fn leader_of(&self, group: GroupId) -> Option<u64> {
        match self.attempt(group, &ShardRequest::Read(ShardRead::Leader), 0).await {
            Ok(ShardReply::LeaderId(leader)) => leader,
            _ => None,
        }
    }

    /// Moves a shard's leadership to node `to` (see
    /// [`crate::raft::ShardReplica`]'s leadership steps); returns the leader
    /// once `to` leads, or the failure, with the old leader campaigning
    /// again either way.
    pub async fn transfer_leader(&self, shard: GroupId, to: u64) -> Result<u64, RequestError> {
        if matches!(shard, GroupId::Shard(s) if !self.map.shards().contains(&s)) {
            return Err(RequestError::Engine(idgraph_core::engine::EngineError::InvalidArgument {
                field: "shard".into(),
                reason: format!("the cluster has shards 0 to {}", self.map.count() - 1),
            }));
        }
        let target = match self.request(shard, ShardRequest::Leadership(LeadershipStep::Hand { to })).await? {
            ShardReply::Leadership(Some(addr)) => addr,
            ShardReply::Leadership(None) => return Ok(to),
            _ => return Err(RequestError::Internal("a leader hand-over was answered with something else".into())),
        };
        // The old leader is wherever `Hand` was served: it answers `Resume`
        // through the same routing until the target has taken over.
        let campaign = self.peers.forward(&target, shard, &ShardRequest::Leadership(LeadershipStep::Campaign), self.timeout).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut outcome = campaign.map_err(|f| service_error(shard, f)).map(|_| 0);
        if outcome.is_ok() {
            outcome = loop {
                let status = self.peers.forward(&target, shard, &ShardRequest::Read(ShardRead::Leader), self.timeout).await;
                if let Ok(ShardReply::LeaderId(Some(id))) = status {
                    if id == to {
                        break Ok(id);
                    }
                }
                if tokio::time::Instant::now() > deadline {
                    break Err(RequestError::Unavailable {
                        shard: shard.to_string(),
                        reason: format!("node {to} did not win the election"),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
        }
        // Every member campaigns again on timeouts (the old leader included).
        for addr in self.member_addrs(shard).await {
            let _ = self.peers.forward(&addr, shard, &ShardRequest::Leadership(LeadershipStep::Resume), self.timeout).await;
        }
        outcome
    }

    /// Addresses of a shard's members as this node's replica knows them,
    /// or as the cluster map lists them when this node holds none.
    async fn member_addrs(&self, shard: GroupId) -> Vec<String> {
        if !self.hosts(shard) {
            return self.cluster().addrs_of(shard);
        }
        match self.local(shard, &ShardRequest::Read(ShardRead::Members)).await {
            Ok(ShardReply::Members(addrs)) => addrs,
            _ => Vec::new(),
        }
    }

    /// Test hook: makes a shard actor panic.
    #[doc(hidden)]
    pub fn crash_shard(&self, shard: GroupId) -> Result<(), RequestError> {
        let unavailable = |reason: String| RequestError::Unavailable { shard: shard.to_string(), reason };
        let actor = crate::shard::actor(&self.node, shard).ok_or_else(|| unavailable("its actor is restarting".into()))?;
        actor.cast(ShardMsg::Crash).map_err(|e| unavailable(e.to_string()))
    }
}

/// The router as a transaction coordinator's way to the shards.
impl ShardAccess for ShardRouter {
    fn shard_count(&self) -> u32 {
        self.map.count()
    }

    fn retried(&self) {
        self.metrics.txn_retries.inc();
    }

    fn now_ms(&self) -> i64 {
        ShardRouter::now_ms(self)
    }

    async fn read(&self, shard: ShardId, keys: Vec<GraphKey>, mode: ReadMode) -> Result<Vec<KeyRead>, TxnError> {
        let req = ShardRequest::Read(ShardRead::Keys { keys, mode });
        let reply = if mode == ReadMode::Local {
            self.attempt(shard.into(), &req, 0).await.map_err(|f| shard_txn_error(shard, f))?
        } else {
            self.request(shard.into(), req).await.map_err(|e| TxnError::Unavailable { shard, reason: e.to_string() })?
        };
        match reply {
            ShardReply::Keys(k) => Ok(k),
            _ => Err(TxnError::Internal("a key read was answered with something else".into())),
        }
    }

    async fn step(&self, shard: ShardId, op: TxnOp) -> Result<TxnReply, TxnError> {
        // A backup's fence holds decisions, the parts that follow them and
        // the forgetting of decisions (docs/operations.md); prepares and
        // aborts go on.
        if matches!(op, TxnOp::Commit { .. } | TxnOp::Apply { .. } | TxnOp::Forget { .. }) {
            self.wait_for_fence().await;
        }
        match self.request(shard.into(), ShardRequest::Write(Box::new(ShardCommand::Txn(op)))).await {
            Ok(ShardReply::Txn(t)) => Ok(t),
            Ok(_) => Err(TxnError::Internal("a transaction step was answered with something else".into())),
            Err(RequestError::Overloaded { reason, .. }) => Err(TxnError::Overloaded { shard, reason }),
            Err(RequestError::DiskFull { .. }) => Err(TxnError::DiskFull { shard }),
            Err(e) => Err(TxnError::Unavailable { shard, reason: e.to_string() }),
        }
    }
}

fn shard_txn_error(shard: ShardId, f: ShardFailure) -> TxnError {
    TxnError::Unavailable { shard, reason: f.to_string() }
}
