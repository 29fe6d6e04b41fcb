//! The cluster map: which nodes there are, which nodes hold a replica of
//! each Raft group, and the moves of replicas under way. It is the state of
//! the metadata Raft group ([`GroupId::Meta`]), replicated like a shard's graph, and
//! every node routes by its copy of it.
//!
//! # Protocol and invariants
//!
//! The map changes only through [`MetaCommand`]s applied, in log order, by
//! [`ClusterMap::apply`]: a pure function, so every replica of the metadata
//! group holds the same map. A command that would break an invariant is
//! refused and changes nothing.
//!
//! - Every group (each shard, and the metadata group itself) lists the nodes
//!   that hold, or are being given, a replica of it. A node opens the
//!   replicas the map gives it and discards a replica only once the map no
//!   longer lists it *and* no move of that group is under way.
//! - A replica moves in three steps, each safe to repeat after a crash
//!   (whoever leads the metadata group next resumes a move it finds
//!   recorded):
//!   1. [`MetaCommand::BeginMove`] lists the new node for the group and
//!      records the move; the new node opens an empty replica;
//!   2. the group's leader adds the new node as a learner, waits until it
//!      has caught up (from a snapshot when the log was compacted), and
//!      replaces the old voter by the new one in one membership change;
//!   3. [`MetaCommand::FinishMove`] drops the old node from the list; only
//!      now may the old node discard its replica, since the Raft group no
//!      longer counts on it.
//!
//!   So a group never has fewer voters than before a move, and a replica
//!   is never discarded while a quorum may need it.
//! - [`ClusterMap::next_move`] plans one move at a time towards the
//!   placement goal: every group on `min(replication, active nodes)`
//!   distinct active nodes, none on a node being removed, and the replica
//!   counts of active nodes within one of each other. A node being removed
//!   (`Leaving`) is forgotten once it holds nothing.

use crate::canary::{CanaryCommand, CanaryRefusal, Rollout};
use crate::graph::{decode, encode, GraphRead, StoreError};
use crate::model::{Change, ChangeSet, GroupId, ShardId};
use crate::rules::RuleSet;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The meta key the metadata group's replicas keep the map under.
pub const MAP_KEY: &str = "cluster.map";

/// The map a replica of the metadata group holds (empty before bootstrap).
pub fn read_map<S: crate::graph::GraphRead + ?Sized>(store: &S) -> Result<ClusterMap, crate::graph::StoreError> {
    match store.meta(MAP_KEY)? {
        Some(bytes) => crate::graph::decode(MAP_KEY.as_bytes(), &bytes),
        None => Ok(ClusterMap::default()),
    }
}

/// Where a node stands in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Takes replicas.
    Active,
    /// Being removed: its replicas move elsewhere, then it is forgotten.
    Leaving,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEntry {
    /// Address the other nodes reach it at.
    pub addr: String,
    pub state: NodeState,
    /// The rule-set version the node runs (as it last reported it).
    pub rule_version: String,
}

/// One replica of a group changing hands. `add` without `remove` grows a
/// group, `remove` without `add` shrinks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMove {
    pub group: GroupId,
    pub add: Option<u64>,
    pub remove: Option<u64>,
}

/// The replicated cluster map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    /// Bumped by every change; 0 for a map not bootstrapped yet.
    pub version: u64,
    pub shard_count: u32,
    /// Replicas per group the placement aims for.
    pub replication: u32,
    pub nodes: BTreeMap<u64, NodeEntry>,
    /// Nodes holding (or receiving) a replica of each group.
    pub groups: BTreeMap<GroupId, BTreeSet<u64>>,
    /// Moves under way, at most one per group.
    pub moves: BTreeMap<GroupId, ReplicaMove>,
    /// The rule-set version every shard runs unless `shard_rules` says
    /// otherwise (empty until the first node seeds it).
    #[serde(default)]
    pub active_rules: String,
    /// Shards running another version: the canary shards of the rollout
    /// under way.
    #[serde(default)]
    pub shard_rules: BTreeMap<ShardId, String>,
    /// The rollout under way.
    #[serde(default)]
    pub canary: Option<String>,
    /// A version every shard evaluates beside its own without writing (the
    /// shadow step of the rollout under way).
    #[serde(default)]
    pub shadow_rules: Option<String>,
    /// A backup under way: while it holds, coordinators make no new
    /// cross-shard decision and apply no decided part (see
    /// `docs/operations.md`), so the shards' images form one cut.
    #[serde(default)]
    pub backup_fence: Option<BackupFence>,
}

/// A backup's hold on cross-shard commits, until `until_ms` at the latest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupFence {
    pub id: String,
    pub until_ms: i64,
}

/// What a backup keeps of the metadata group: not the cluster map (nodes
/// and placement belong to the cluster restored into), but what the
/// cluster decided: its rule sets, their active version, finished
/// rollouts and the audit log.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MetaBackup {
    pub rule_sets: Vec<(String, String)>,
    pub active_rules: String,
    pub finished_rollouts: Vec<Rollout>,
    pub audit: Vec<AuditEntry>,
}

/// A change of the cluster map (an entry of the metadata group's log).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// The first map; ignored when there is one already.
    Bootstrap(ClusterMap),
    /// Registers a node (`create`) or refreshes what a registered node
    /// reports of itself.
    NodeUp {
        node_id: u64,
        addr: String,
        rule_version: String,
        create: bool,
    },
    /// Starts removing a node: its replicas move elsewhere.
    Drain {
        node_id: u64,
    },
    /// Drops a drained node that holds no replica.
    Forget {
        node_id: u64,
    },
    BeginMove(ReplicaMove),
    FinishMove {
        group: GroupId,
    },
    /// Stores a rule-set version (immutable once stored); `seed` also makes
    /// it the cluster's version when the cluster has none yet.
    PutRuleSet {
        toml: String,
        seed: bool,
    },
    /// A step of the canary rollout (see [`crate::canary`]).
    Canary(CanaryCommand),
    /// Records an operator action in the audit log.
    Audit(AuditEntry),
    /// Holds cross-shard commits for a backup (refused while another holds).
    Fence(BackupFence),
    /// Ends a backup's hold.
    Unfence {
        id: String,
    },
    /// Takes a backup's metadata into this cluster (see [`MetaBackup`]).
    Restore(Box<MetaBackup>),
}

/// One operator action, as the audit log keeps it. It names profiles,
/// versions, rollouts and nodes, never an identifier's value: the log
/// outlives a GDPR erasure and must not undo it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// A ULID: entries sort by the time they were made.
    pub id: String,
    pub at_ms: i64,
    /// The caller's token name (`anonymous` on a cluster without tokens).
    pub who: String,
    /// The node that took the call.
    pub node_id: u64,
    /// The gRPC method, e.g. `DeleteProfile`.
    pub action: String,
    /// What it acted on, e.g. `profile 01H...`.
    pub target: String,
    /// `OK` or the gRPC status code it was refused with, and why.
    pub outcome: String,
}

/// Why the map refused a command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MetaRefusal(pub String);

fn refuse<T>(reason: impl Into<String>) -> Result<T, MetaRefusal> {
    Err(MetaRefusal(reason.into()))
}

impl ClusterMap {
    /// The rule-set version a shard runs.
    pub fn rules_of(&self, shard: ShardId) -> &str {
        self.shard_rules.get(&shard).unwrap_or(&self.active_rules)
    }
}

impl ClusterMap {
    /// The map a static cluster starts with: shard `s` on `replication`
    /// consecutive members starting with the `s mod n`-th (which also
    /// initialises the shard's group and first leads it), the metadata
    /// group on the members holding fewest shards (its initialiser is the
    /// lowest id among them).
    pub fn initial(members: &BTreeMap<u64, String>, shard_count: u32, replication: u32, rule_version: &str) -> ClusterMap {
        let ids: Vec<u64> = members.keys().copied().collect();
        let n = ids.len().max(1);
        let rf = (replication.max(1) as usize).min(ids.len());
        let groups = (0..shard_count).map(|s| (GroupId::Shard(ShardId(s)), (0..rf).map(|i| ids[(s as usize + i) % n]).collect())).collect();
        let nodes = members
            .iter()
            .map(|(id, addr)| (*id, NodeEntry { addr: addr.clone(), state: NodeState::Active, rule_version: rule_version.into() }))
            .collect();
        let mut map = ClusterMap { version: 1, shard_count, replication: replication.max(1), nodes, groups, ..ClusterMap::default() };
        let mut by_load = ids;
        by_load.sort_by_key(|id| (map.load(*id), *id));
        map.groups.insert(GroupId::Meta, by_load.into_iter().take(rf).collect());
        map
    }

    pub fn is_bootstrapped(&self) -> bool {
        self.version > 0
    }

    /// The groups `node` holds or is receiving.
    pub fn groups_of(&self, node: u64) -> BTreeSet<GroupId> {
        self.groups.iter().filter(|(_, m)| m.contains(&node)).map(|(g, _)| *g).collect()
    }

    /// Addresses of a group's replicas.
    pub fn addrs_of(&self, group: GroupId) -> Vec<String> {
        self.groups.get(&group).into_iter().flatten().filter_map(|n| self.nodes.get(n).map(|e| e.addr.clone())).collect()
    }

    fn active(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(_, e)| e.state == NodeState::Active).map(|(id, _)| *id).collect()
    }

    fn load(&self, node: u64) -> usize {
        self.groups.values().filter(|m| m.contains(&node)).count()
    }

    /// Applies a command: the new map, or why it was refused.
    pub fn apply(&self, cmd: &MetaCommand) -> Result<ClusterMap, MetaRefusal> {
        let mut next = self.clone();
        match cmd {
            MetaCommand::Bootstrap(map) => {
                if self.is_bootstrapped() {
                    return Ok(next);
                }
                next = map.clone();
                next.version = 0;
            }
            MetaCommand::NodeUp { node_id, addr, rule_version, create } => match next.nodes.get_mut(node_id) {
                Some(e) if e.addr == *addr && e.rule_version == *rule_version => return Ok(next),
                Some(e) => {
                    e.addr = addr.clone();
                    e.rule_version = rule_version.clone();
                }
                None if *create => {
                    if let Some((other, _)) = next.nodes.iter().find(|(_, e)| e.addr == *addr) {
                        return refuse(format!("node {other} already has address {addr}"));
                    }
                    next.nodes
                        .insert(*node_id, NodeEntry { addr: addr.clone(), state: NodeState::Active, rule_version: rule_version.clone() });
                }
                None => return refuse(format!("node {node_id} is not a member of the cluster")),
            },
            MetaCommand::Drain { node_id } => {
                let Some(e) = next.nodes.get_mut(node_id) else { return refuse(format!("node {node_id} is not a member of the cluster")) };
                if e.state == NodeState::Leaving {
                    return Ok(next);
                }
                if self.active().len() <= 1 {
                    return refuse(format!("node {node_id} is the last active node"));
                }
                e.state = NodeState::Leaving;
            }
            MetaCommand::Forget { node_id } => {
                match next.nodes.get(node_id) {
                    None => return Ok(next),
                    Some(e) if e.state != NodeState::Leaving => return refuse(format!("node {node_id} was not drained first")),
                    Some(_) => {}
                }
                if self.load(*node_id) > 0 {
                    return refuse(format!("node {node_id} still holds {} replicas", self.load(*node_id)));
                }
                next.nodes.remove(node_id);
            }
            MetaCommand::BeginMove(mv) => {
                if self.moves.get(&mv.group) == Some(mv) {
                    return Ok(next);
                }
                if self.moves.contains_key(&mv.group) {
                    return refuse(format!("group {} has a move under way", mv.group));
                }
                let Some(members) = next.groups.get_mut(&mv.group) else { return refuse(format!("no group {}", mv.group)) };
                if let Some(add) = mv.add {
                    if !self.nodes.get(&add).is_some_and(|e| e.state == NodeState::Active) {
                        return refuse(format!("node {add} is not an active node"));
                    }
                    if members.contains(&add) {
                        return refuse(format!("node {add} already holds group {}", mv.group));
                    }
                    members.insert(add);
                }
                if let Some(remove) = mv.remove {
                    if !members.contains(&remove) {
                        return refuse(format!("node {remove} holds no replica of group {}", mv.group));
                    }
                    if mv.add.is_none() && members.len() <= 1 {
                        return refuse(format!("node {remove} holds the last replica of group {}", mv.group));
                    }
                }
                if mv.add.is_none() && mv.remove.is_none() {
                    return refuse("a move adds or removes a replica");
                }
                next.moves.insert(mv.group, *mv);
            }
            MetaCommand::FinishMove { group } => {
                let Some(mv) = next.moves.remove(group) else { return Ok(next) };
                if let (Some(remove), Some(members)) = (mv.remove, next.groups.get_mut(group)) {
                    members.remove(&remove);
                }
            }
            MetaCommand::Fence(fence) => match &next.backup_fence {
                Some(f) if f.id != fence.id && f.until_ms > fence.until_ms - BACKUP_FENCE_MAX_MS => {
                    return refuse(format!("backup {} is under way", f.id));
                }
                _ => next.backup_fence = Some(fence.clone()),
            },
            MetaCommand::Unfence { id } => {
                if next.backup_fence.as_ref().is_some_and(|f| &f.id == id) {
                    next.backup_fence = None;
                } else {
                    return Ok(next);
                }
            }
            MetaCommand::PutRuleSet { .. } | MetaCommand::Canary(_) | MetaCommand::Audit(_) | MetaCommand::Restore(_) => {
                return refuse("rule sets, rollouts and the audit log change through meta::execute, which reads the store");
            }
        }
        next.version = self.version + 1;
        Ok(next)
    }

    /// Replicas a group should have.
    fn target(&self) -> usize {
        (self.replication.max(1) as usize).min(self.active().len()).max(1)
    }

    /// The next move towards the placement goal (see the module notes), or
    /// none when the goal is met or a move is under way.
    pub fn next_move(&self) -> Option<ReplicaMove> {
        if !self.is_bootstrapped() || !self.moves.is_empty() {
            return None;
        }
        let active = self.active();
        if active.is_empty() {
            return None;
        }
        let target = self.target();
        // The least loaded active node not holding `members` (lowest id on a tie).
        let receiver =
            |members: &BTreeSet<u64>| active.iter().copied().filter(|n| !members.contains(n)).min_by_key(|n| (self.load(*n), *n));
        for (group, members) in &self.groups {
            let group = *group;
            if let Some(leaving) = members.iter().copied().find(|m| !active.contains(m)) {
                let add = if members.len() <= target { receiver(members) } else { None };
                if add.is_none() && members.len() <= 1 {
                    continue;
                }
                return Some(ReplicaMove { group, add, remove: Some(leaving) });
            }
            if members.len() < target {
                return receiver(members).map(|add| ReplicaMove { group, add: Some(add), remove: None });
            }
            if members.len() > target {
                let remove = members.iter().copied().max_by_key(|n| (self.load(*n), *n));
                return Some(ReplicaMove { group, add: None, remove });
            }
        }
        // Even out the replica counts of active nodes.
        let most = active.iter().copied().max_by_key(|n| (self.load(*n), std::cmp::Reverse(*n)))?;
        let least = active.iter().copied().min_by_key(|n| (self.load(*n), *n))?;
        if self.load(most) <= self.load(least) + 1 {
            return None;
        }
        let group = self.groups.iter().find(|(_, m)| m.contains(&most) && !m.contains(&least)).map(|(g, _)| *g)?;
        Some(ReplicaMove { group, add: Some(least), remove: Some(most) })
    }

    /// A leadership transfer that evens out how many shards each active
    /// node leads (`leaders`: the current leader of each group that has
    /// one; the metadata group's light load is left out): from the node
    /// leading most to the one leading fewest among the shard's replicas,
    /// when they differ by more than one. None while a move is under way.
    pub fn next_leader_transfer(&self, leaders: &BTreeMap<GroupId, u64>) -> Option<(GroupId, u64)> {
        if !self.moves.is_empty() {
            return None;
        }
        let leaders: BTreeMap<GroupId, u64> = leaders.iter().filter(|(g, _)| **g != GroupId::Meta).map(|(g, l)| (*g, *l)).collect();
        let active = self.active();
        let leads = |n: u64| leaders.values().filter(|l| **l == n).count();
        let mut candidates: Vec<(usize, GroupId, u64)> = Vec::new();
        for (group, leader) in &leaders {
            let Some(members) = self.groups.get(group) else { continue };
            let target = members.iter().copied().filter(|m| active.contains(m) && m != leader).min_by_key(|m| (leads(*m), *m));
            if let Some(to) = target {
                if leads(*leader) > leads(to) + 1 {
                    candidates.push((leads(*leader) - leads(to), *group, to));
                }
            }
        }
        // The widest gap first; the lowest group on a tie.
        candidates.into_iter().max_by_key(|(gap, group, _)| (*gap, std::cmp::Reverse(*group))).map(|(_, g, to)| (g, to))
    }

    /// Leaving nodes that hold nothing any more (to be forgotten).
    pub fn drained(&self) -> Vec<u64> {
        self.nodes.iter().filter(|(id, e)| e.state == NodeState::Leaving && self.load(**id) == 0).map(|(id, _)| *id).collect()
    }
}

/// Where the metadata group keeps rule sets (`rules.<version>`, the TOML)
/// and rollouts (the one under way, and finished ones by id).
const RULES_PREFIX: &str = "rules.";
const ROLLOUT_KEY: &str = "canary.current";
const FINISHED_PREFIX: &str = "canary.done.";
const AUDIT_PREFIX: &str = "audit.";

/// The longest a backup may hold cross-shard commits; a fence older than
/// this is taken over by the next backup (its backup died).
pub const BACKUP_FENCE_MAX_MS: i64 = 5 * 60 * 1000;

/// What made a metadata command fail.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error(transparent)]
    Refused(#[from] MetaRefusal),
    #[error("rollout: {0}")]
    Canary(#[from] CanaryRefusal),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn meta_record<R: GraphRead + ?Sized, T: serde::de::DeserializeOwned>(store: &R, key: &str) -> Result<Option<T>, StoreError> {
    store.meta(key)?.map(|b| decode(key.as_bytes(), &b)).transpose()
}

/// A stored rule set's TOML.
pub fn read_rule_set<R: GraphRead + ?Sized>(store: &R, version: &str) -> Result<Option<String>, StoreError> {
    meta_record(store, &format!("{RULES_PREFIX}{version}"))
}

/// Every stored rule set: version and TOML, by version.
pub fn rule_sets<R: GraphRead + ?Sized>(store: &R) -> Result<Vec<(String, String)>, StoreError> {
    store
        .meta_prefix(RULES_PREFIX)?
        .into_iter()
        .map(|(k, v)| Ok((k[RULES_PREFIX.len()..].to_string(), decode(k.as_bytes(), &v)?)))
        .collect()
}

/// The rollout under way.
pub fn current_rollout<R: GraphRead + ?Sized>(store: &R) -> Result<Option<Rollout>, StoreError> {
    meta_record(store, ROLLOUT_KEY)
}

/// Finished rollouts, oldest first (ids are ULIDs).
pub fn finished_rollouts<R: GraphRead + ?Sized>(store: &R) -> Result<Vec<Rollout>, StoreError> {
    store.meta_prefix(FINISHED_PREFIX)?.into_iter().map(|(k, v)| decode(k.as_bytes(), &v)).collect()
}

/// The audit log's entries made after the entry `after` (all: empty), oldest
/// first, at most `limit`.
pub fn audit_entries<R: GraphRead + ?Sized>(store: &R, after: &str, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in store.meta_prefix(AUDIT_PREFIX)? {
        if after.is_empty() || k[AUDIT_PREFIX.len()..] > *after {
            out.push(decode(k.as_bytes(), &v)?);
            if out.len() == limit {
                break;
            }
        }
    }
    Ok(out)
}

/// What a backup keeps of the metadata group (see [`MetaBackup`]).
pub fn meta_backup<R: GraphRead + ?Sized>(store: &R) -> Result<MetaBackup, StoreError> {
    Ok(MetaBackup {
        rule_sets: rule_sets(store)?,
        active_rules: read_map(store)?.active_rules,
        finished_rollouts: finished_rollouts(store)?,
        audit: audit_entries(store, "", usize::MAX)?,
    })
}

/// Applies a metadata command to the metadata group's store: the changes
/// to write and the map after them. Refusals change nothing.
pub fn execute<R: GraphRead + ?Sized>(store: &R, cmd: &MetaCommand) -> Result<(ChangeSet, ClusterMap), MetaError> {
    let map = read_map(store)?;
    let mut cs = ChangeSet::default();
    let next = match cmd {
        MetaCommand::PutRuleSet { toml, seed } => {
            let rules = RuleSet::from_toml(toml).map_err(|e| MetaRefusal(e.to_string()))?;
            let version = rules.version().to_string();
            match read_rule_set(store, &version)? {
                Some(stored) if stored != *toml => {
                    return Err(MetaRefusal(format!(
                        "version {version:?} is stored with other rules; a stored version never changes, give the new rules a new version"
                    ))
                    .into())
                }
                Some(_) => {}
                None => cs.push(Change::PutMeta(format!("{RULES_PREFIX}{version}"), encode(toml))),
            }
            let mut next = map.clone();
            if *seed && next.active_rules.is_empty() {
                next.active_rules = version;
            }
            next
        }
        MetaCommand::Canary(c) => {
            let current = current_rollout(store)?;
            let mut rollout = match (c, current) {
                (CanaryCommand::Start { id, plan_toml, at_ms, .. }, None) => {
                    let start = CanaryCommand::Start {
                        id: id.clone(),
                        plan_toml: plan_toml.clone(),
                        control: map.active_rules.clone(),
                        shard_count: map.shard_count,
                        at_ms: *at_ms,
                    };
                    // Which versions the start names are stored, read up front so a
                    // storage error fails the entry instead of refusing it on one
                    // replica only.
                    let candidate = crate::canary::CanaryPlan::from_toml(plan_toml).map(|p| p.candidate).unwrap_or_default();
                    let mut stored = std::collections::BTreeSet::new();
                    for v in [&candidate, &map.active_rules] {
                        if !v.is_empty() && read_rule_set(store, v)?.is_some() {
                            stored.insert(v.clone());
                        }
                    }
                    Rollout::start(&start, |v| stored.contains(v))?
                }
                (CanaryCommand::Start { .. }, Some(r)) => return Err(CanaryRefusal::Running { running: r.id }.into()),
                (_, Some(mut r)) => {
                    r.apply(c)?;
                    r
                }
                (_, None) => return Err(CanaryRefusal::NoneRunning.into()),
            };
            let mut next = map.clone();
            next.shard_rules = rollout.assignments();
            next.shadow_rules = rollout.shadow().map(str::to_string);
            if rollout.phase.is_finished() {
                if rollout.phase == crate::canary::Phase::Promoted {
                    next.active_rules = rollout.plan.candidate.clone();
                }
                next.canary = None;
                cs.push(Change::DeleteMeta(ROLLOUT_KEY.into()));
                rollout.samples.shrink_to_fit();
                cs.push(Change::PutMeta(format!("{FINISHED_PREFIX}{}", rollout.id), encode(&rollout)));
            } else {
                next.canary = Some(rollout.id.clone());
                cs.push(Change::PutMeta(ROLLOUT_KEY.into(), encode(&rollout)));
            }
            next
        }
        MetaCommand::Restore(backup) => {
            if map.canary.is_some() {
                return Err(MetaRefusal("a canary rollout is under way; restore into a cluster without one".into()).into());
            }
            for (version, toml) in &backup.rule_sets {
                match read_rule_set(store, version)? {
                    Some(stored) if stored != *toml => {
                        return Err(MetaRefusal(format!("rule set {version:?} is stored here with other rules")).into())
                    }
                    Some(_) => {}
                    None => {
                        RuleSet::from_toml(toml).map_err(|e| MetaRefusal(format!("rule set {version:?} of the backup: {e}")))?;
                        cs.push(Change::PutMeta(format!("{RULES_PREFIX}{version}"), encode(toml)));
                    }
                }
            }
            for r in &backup.finished_rollouts {
                cs.push(Change::PutMeta(format!("{FINISHED_PREFIX}{}", r.id), encode(r)));
            }
            for e in &backup.audit {
                cs.push(Change::PutMeta(format!("{AUDIT_PREFIX}{}", e.id), encode(e)));
            }
            let mut next = map.clone();
            if !backup.active_rules.is_empty() {
                if !backup.rule_sets.iter().any(|(v, _)| *v == backup.active_rules) {
                    return Err(MetaRefusal(format!("the backup's active rule set {:?} is not in it", backup.active_rules)).into());
                }
                next.active_rules = backup.active_rules.clone();
            }
            next
        }
        MetaCommand::Audit(entry) => {
            if entry.id.is_empty() || entry.id.contains('.') {
                return Err(MetaRefusal("an audit entry needs an id without dots".into()).into());
            }
            cs.push(Change::PutMeta(format!("{AUDIT_PREFIX}{}", entry.id), encode(entry)));
            map.clone()
        }
        other => map.apply(other)?,
    };
    let changed = next != map;
    let mut next = next;
    if changed && matches!(cmd, MetaCommand::PutRuleSet { .. } | MetaCommand::Canary(_) | MetaCommand::Restore(_)) {
        next.version = map.version + 1;
    }
    if changed || next.version != map.version {
        cs.push(Change::PutMeta(MAP_KEY.into(), encode(&next)));
    }
    Ok((cs, next))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(store: &crate::graph::MemStore, cmd: MetaCommand) -> Result<ClusterMap, MetaError> {
        use crate::graph::GraphStore;
        let (cs, map) = execute(store, &cmd)?;
        store.apply(&cs).unwrap();
        Ok(map)
    }

    fn rules_toml(version: &str, extra_blocked: &str) -> String {
        let mut spec = RuleSet::builtin().spec().clone();
        spec.version = version.into();
        spec.blocked.values.push(extra_blocked.into());
        RuleSet::from_spec(spec).unwrap().source().to_string()
    }

    #[test]
    fn rule_sets_are_stored_once_and_seed_the_cluster_version() {
        let store = crate::graph::MemStore::default();
        run(&store, MetaCommand::Bootstrap(ClusterMap::initial(&members(3), 4, 3, "v1"))).unwrap();
        let v1 = rules_toml("v1", "none");
        let map = run(&store, MetaCommand::PutRuleSet { toml: v1.clone(), seed: true }).unwrap();
        assert_eq!(map.active_rules, "v1");
        // The same text again changes nothing; other text under the same version is refused.
        assert_eq!(run(&store, MetaCommand::PutRuleSet { toml: v1.clone(), seed: true }).unwrap(), map);
        assert!(matches!(
            run(&store, MetaCommand::PutRuleSet { toml: rules_toml("v1", "other"), seed: false }),
            Err(MetaError::Refused(r)) if r.0.contains("never changes")
        ));
        assert!(run(&store, MetaCommand::PutRuleSet { toml: "version = 3".into(), seed: false }).is_err());
        let map = run(&store, MetaCommand::PutRuleSet { toml: rules_toml("v2", "guest"), seed: true }).unwrap();
        assert_eq!(map.active_rules, "v1", "a seed only applies to a cluster without a version");
        assert_eq!(rule_sets(&store).unwrap().iter().map(|(v, _)| v.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);
        assert_eq!(read_rule_set(&store, "v1").unwrap(), Some(v1));
    }

    #[test]
    fn a_rollout_assigns_canary_shards_and_only_one_runs() {
        let store = crate::graph::MemStore::default();
        run(&store, MetaCommand::Bootstrap(ClusterMap::initial(&members(3), 4, 3, "v1"))).unwrap();
        run(&store, MetaCommand::PutRuleSet { toml: rules_toml("v1", "none"), seed: true }).unwrap();
        run(&store, MetaCommand::PutRuleSet { toml: rules_toml("v2", "guest"), seed: false }).unwrap();
        let plan = crate::canary::plan::tests::PLAN.to_string();
        let start = |id: &str| {
            MetaCommand::Canary(CanaryCommand::Start {
                id: id.into(),
                plan_toml: plan.clone(),
                control: String::new(),
                shard_count: 0,
                at_ms: 0,
            })
        };
        let map = run(&store, start("r1")).unwrap();
        assert_eq!(map.rules_of(ShardId(0)), "v2");
        assert_eq!(map.rules_of(ShardId(1)), "v1");
        assert_eq!(map.canary.as_deref(), Some("r1"));
        assert!(matches!(run(&store, start("r2")), Err(MetaError::Canary(CanaryRefusal::Running { .. }))));
        let map = run(&store, MetaCommand::Canary(CanaryCommand::Abort { id: "r1".into(), reason: "test".into(), at_ms: 1 })).unwrap();
        assert!(map.shard_rules.is_empty());
        let map = run(&store, MetaCommand::Canary(CanaryCommand::Finish { id: "r1".into(), at_ms: 2 })).unwrap();
        assert_eq!((map.canary.clone(), map.active_rules.as_str()), (None, "v1"));
        assert!(current_rollout(&store).unwrap().is_none());
        assert_eq!(finished_rollouts(&store).unwrap()[0].phase, crate::canary::Phase::RolledBack);
        assert!(matches!(
            run(&store, MetaCommand::Canary(CanaryCommand::Promote { id: "r1".into(), step: None, at_ms: 3 })),
            Err(MetaError::Canary(CanaryRefusal::NoneRunning))
        ));
    }

    fn members(n: u64) -> BTreeMap<u64, String> {
        (1..=n).map(|i| (i, format!("127.0.0.1:{}", 50060 + i))).collect()
    }

    /// Carries out planned moves (both steps) until none is left; the moves taken.
    fn settle(map: &mut ClusterMap) -> usize {
        let mut moves = 0;
        while let Some(mv) = map.next_move() {
            *map = map.apply(&MetaCommand::BeginMove(mv)).unwrap();
            assert!(map.next_move().is_none(), "one move at a time");
            *map = map.apply(&MetaCommand::FinishMove { group: mv.group }).unwrap();
            for id in map.drained() {
                *map = map.apply(&MetaCommand::Forget { node_id: id }).unwrap();
            }
            moves += 1;
            assert!(moves < 10_000, "the planner does not converge");
        }
        for id in map.drained() {
            *map = map.apply(&MetaCommand::Forget { node_id: id }).unwrap();
        }
        moves
    }

    /// The placement goal of the module notes.
    fn assert_goal(map: &ClusterMap) {
        let active = map.active();
        let want = (map.replication as usize).min(active.len());
        for (g, m) in &map.groups {
            assert_eq!(m.len(), want, "group {g} has {m:?}");
            assert!(m.iter().all(|n| active.contains(n)), "group {g} on an inactive node: {m:?}");
        }
        let loads: Vec<usize> = active.iter().map(|n| map.load(*n)).collect();
        assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 1, "unbalanced: {loads:?}");
    }

    #[test]
    fn a_static_cluster_starts_with_shards_spread_and_replicated() {
        let map = ClusterMap::initial(&members(5), 16, 3, "v1");
        assert_eq!(map.groups[&GroupId::Shard(ShardId(0))], BTreeSet::from([1, 2, 3]));
        assert_eq!(map.groups[&GroupId::Shard(ShardId(4))], BTreeSet::from([5, 1, 2]));
        // 48 shard replicas over 5 nodes: 10, 10, 10, 9, 9; the metadata group
        // goes to the least loaded.
        assert_eq!(map.groups[&GroupId::Meta], BTreeSet::from([1, 4, 5]));
        assert_goal(&map);
        assert_eq!(map.next_move(), None);
        // Fewer nodes than the replication factor: every node holds every group.
        let small = ClusterMap::initial(&members(2), 4, 3, "v1");
        assert!(small.groups.values().all(|m| m.len() == 2));
        let single = ClusterMap::initial(&members(1), 1, 3, "v1");
        assert_eq!(single.groups.len(), 2);
    }

    #[test]
    fn a_new_node_takes_its_share_and_a_drained_node_is_emptied_then_forgotten() {
        let mut map = ClusterMap::initial(&members(3), 8, 3, "v1");
        map = map.apply(&MetaCommand::NodeUp { node_id: 4, addr: "127.0.0.1:9".into(), rule_version: "v1".into(), create: true }).unwrap();
        let moves = settle(&mut map);
        assert_goal(&map);
        assert!(moves >= 6, "9 groups × 3 replicas over 4 nodes: node 4 takes 6 or 7, took {moves} moves");
        map = map.apply(&MetaCommand::Drain { node_id: 2 }).unwrap();
        settle(&mut map);
        assert_goal(&map);
        assert!(!map.nodes.contains_key(&2), "node 2 forgotten once empty");
        assert!(map.groups.values().all(|m| m == &BTreeSet::from([1, 3, 4])));
        // Down to two nodes: groups shrink to two replicas.
        map = map.apply(&MetaCommand::Drain { node_id: 4 }).unwrap();
        settle(&mut map);
        assert_goal(&map);
        assert!(map.groups.values().all(|m| m.len() == 2));
    }

    #[test]
    fn refusals_change_nothing() {
        let map = ClusterMap::initial(&members(3), 2, 3, "v1");
        let cases = [
            MetaCommand::Forget { node_id: 1 },
            MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(0)), add: Some(2), remove: Some(1) }),
            MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(0)), add: Some(9), remove: None }),
            MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(7)), add: None, remove: Some(1) }),
            MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(0)), add: None, remove: None }),
            MetaCommand::NodeUp { node_id: 9, addr: "x:1".into(), rule_version: "v1".into(), create: false },
            MetaCommand::NodeUp { node_id: 9, addr: "127.0.0.1:50061".into(), rule_version: "v1".into(), create: true },
        ];
        for cmd in cases {
            assert!(map.apply(&cmd).is_err(), "{cmd:?} accepted");
        }
        let one = ClusterMap::initial(&members(1), 1, 3, "v1");
        assert!(one.apply(&MetaCommand::Drain { node_id: 1 }).is_err(), "the last node cannot leave");
        let moving =
            map.apply(&MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(1)), add: None, remove: Some(1) })).unwrap();
        assert!(moving
            .apply(&MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(1)), add: None, remove: Some(2) }))
            .is_err());
        // The same move again is accepted (a resumed step) and changes nothing more.
        let again =
            moving.apply(&MetaCommand::BeginMove(ReplicaMove { group: GroupId::Shard(ShardId(1)), add: None, remove: Some(1) })).unwrap();
        assert_eq!(again.groups, moving.groups);
    }

    #[test]
    fn a_moving_replica_stays_listed_until_the_move_is_finished() {
        let mut map = ClusterMap::initial(&members(4), 1, 3, "v1");
        let mv = ReplicaMove { group: GroupId::Shard(ShardId(0)), add: Some(4), remove: Some(1) };
        map = map.apply(&MetaCommand::BeginMove(mv)).unwrap();
        assert_eq!(map.groups[&GroupId::Shard(ShardId(0))], BTreeSet::from([1, 2, 3, 4]), "both old and new node listed");
        map = map.apply(&MetaCommand::FinishMove { group: GroupId::Shard(ShardId(0)) }).unwrap();
        assert_eq!(map.groups[&GroupId::Shard(ShardId(0))], BTreeSet::from([2, 3, 4]));
        assert!(map.moves.is_empty());
    }

    #[test]
    fn leadership_moves_from_the_busiest_node_to_an_idle_replica() {
        let mut map = ClusterMap::initial(&members(3), 8, 3, "v1");
        map = map.apply(&MetaCommand::NodeUp { node_id: 4, addr: "h:4".into(), rule_version: "v1".into(), create: true }).unwrap();
        settle(&mut map);
        // Node 1 leads every group; node 4 leads none.
        let mut leaders: BTreeMap<GroupId, u64> = map.groups.iter().map(|(g, m)| (*g, *m.first().unwrap())).collect();
        let mut transfers = 0;
        while let Some((group, to)) = map.next_leader_transfer(&leaders) {
            assert!(map.groups[&group].contains(&to), "leadership goes to a replica");
            leaders.insert(group, to);
            transfers += 1;
            assert!(transfers < 100, "does not converge");
        }
        leaders.remove(&GroupId::Meta);
        let counts: Vec<usize> = (1..=4).map(|n| leaders.values().filter(|l| **l == n).count()).collect();
        assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "leaders uneven: {counts:?}");
        assert!(transfers > 0);
    }

    #[derive(Clone, Debug)]
    enum Change {
        Join,
        Drain(u64),
    }

    #[test]
    fn audit_entries_are_kept_in_order_and_leave_the_map_alone() {
        let store = crate::graph::MemStore::default();
        let entry = |id: &str| AuditEntry {
            id: id.into(),
            at_ms: 1,
            who: "ops".into(),
            node_id: 1,
            action: "DeleteProfile".into(),
            target: "profile p1".into(),
            outcome: "OK".into(),
        };
        let before = read_map(&store).unwrap();
        for id in ["01B", "01A", "01C"] {
            let map = run(&store, MetaCommand::Audit(entry(id))).unwrap();
            assert_eq!(map, before, "an audit entry does not change the map");
        }
        let ids = |after: &str, limit: usize| audit_entries(&store, after, limit).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids("", 10), ["01A", "01B", "01C"]);
        assert_eq!(ids("01A", 1), ["01B"]);
        assert!(run(&store, MetaCommand::Audit(entry(""))).is_err());
    }

    proptest! {
        /// Whatever nodes join and leave, the planner reaches the goal,
        /// and no step ever leaves a group with fewer replicas than the
        /// smaller of its goal and what it had.
        #[test]
        fn the_planner_reaches_the_placement_goal(n in 1u64..6, shards in 1u32..12, rf in 1u32..5,
            changes in proptest::collection::vec(prop_oneof![Just(Change::Join), (1u64..10).prop_map(Change::Drain)], 0..6)) {
            let mut map = ClusterMap::initial(&members(n), shards, rf, "v1");
            let mut next_id = n + 1;
            for c in changes {
                map = match c {
                    Change::Join => {
                        next_id += 1;
                        map.apply(&MetaCommand::NodeUp { node_id: next_id, addr: format!("h:{next_id}"), rule_version: "v1".into(), create: true }).unwrap()
                    }
                    Change::Drain(id) => map.apply(&MetaCommand::Drain { node_id: id }).unwrap_or(map),
                };
                while let Some(mv) = map.next_move() {
                    let before = map.groups[&mv.group].len();
                    map = map.apply(&MetaCommand::BeginMove(mv)).unwrap();
                    map = map.apply(&MetaCommand::FinishMove { group: mv.group }).unwrap();
                    let after = map.groups[&mv.group].len();
                    prop_assert!(after >= before.min(map.target()), "{mv:?} shrank a group below its goal");
                }
                settle(&mut map);
                assert_goal(&map);
            }
        }
    }
}
