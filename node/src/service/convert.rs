//! Conversions between the generated `idgraph.v1` types and the domain
//! types. Generated types go no further into the node than this module.

use crate::raft::{RaftRole, ReplicaDigest, ReplicaStatus};
use idgraph_core::engine::{
    self, invalid, Conflict, ConflictKind, DeleteOutcome, EngineError, FoundProfile, IdentifyEvent, IdentifyOutcome, Ignored, MergeOutcome,
    ProfileRef, RawIdentifier, UnmergeOutcome,
};
use idgraph_core::model::{Counters, GroupId, HubRecord, Identifier, MergeCause, MergeRecord, Profile};
use idgraph_proto::v1 as pb;
use prost_types::value::Kind;
use serde_json::Value;
use std::collections::BTreeMap;

const MAX_TRAIT_DEPTH: usize = 16;

pub fn raw_identifier(id: pb::Identifier) -> RawIdentifier {
    RawIdentifier { kind: id.r#type, value: id.value }
}

pub fn identifier(id: &Identifier) -> pb::Identifier {
    pb::Identifier { r#type: id.kind.clone(), value: id.value.clone() }
}

fn raw_to_pb(id: &RawIdentifier) -> pb::Identifier {
    pb::Identifier { r#type: id.kind.clone(), value: id.value.clone() }
}

/// A protobuf `Value` as JSON.
fn json_value(v: prost_types::Value, field: &str, depth: usize) -> Result<Value, EngineError> {
    if depth > MAX_TRAIT_DEPTH {
        return Err(invalid(field, format!("nested deeper than {MAX_TRAIT_DEPTH} levels")));
    }
    Ok(match v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(b),
        Some(Kind::StringValue(s)) => Value::String(s),
        Some(Kind::NumberValue(n)) => {
            if !n.is_finite() {
                return Err(invalid(field, "numbers must be finite"));
            }
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                Value::from(n as i64)
            } else {
                Value::from(n)
            }
        }
        Some(Kind::StructValue(s)) => Value::Object(json_object(s, field, depth + 1)?.into_iter().collect()),
        Some(Kind::ListValue(l)) => Value::Array(
            l.values.into_iter().enumerate().map(|(i, v)| json_value(v, &format!("{field}[{i}]"), depth + 1)).collect::<Result<_, _>>()?,
        ),
    })
}

fn json_object(s: prost_types::Struct, field: &str, depth: usize) -> Result<BTreeMap<String, Value>, EngineError> {
    s.fields.into_iter().map(|(k, v)| json_value(v, &format!("{field}.{k}"), depth).map(|j| (k, j))).collect()
}

pub fn identify_event(req: pb::IdentifyRequest) -> Result<IdentifyEvent, EngineError> {
    let traits = match req.traits {
        Some(s) => json_object(s, "traits", 0)?,
        None => BTreeMap::new(),
    };
    Ok(IdentifyEvent {
        event_id: req.event_id,
        timestamp_ms: req.timestamp_ms,
        identifiers: req.identifiers.into_iter().map(raw_identifier).collect(),
        traits,
        source: req.source,
    })
}

fn conflict(c: &Conflict) -> pb::RuleConflict {
    let kind = match c.kind {
        ConflictKind::TypeLimit => pb::rule_conflict::Kind::TypeLimit,
        ConflictKind::ProfileCap => pb::rule_conflict::Kind::ProfileCap,
        ConflictKind::Hub => pb::rule_conflict::Kind::Hub,
    };
    pb::RuleConflict {
        kind: kind as i32,
        identifier: Some(identifier(&c.identifier)),
        limit_type: c.limit_type.clone(),
        limit: c.limit,
        kept_in_profile_id: c.kept_in.clone().unwrap_or_default(),
        message: c.message.clone(),
    }
}

fn ignored(i: &Ignored) -> pb::IgnoredIdentifier {
    pb::IgnoredIdentifier { identifier: Some(raw_to_pb(&i.identifier)), reason: i.reason.as_str().into(), detail: i.detail.clone() }
}

pub fn identify_response(o: IdentifyOutcome) -> pb::IdentifyResponse {
    pb::IdentifyResponse {
        profile_id: o.profile_id,
        created: o.created,
        merged: o.merge_id.is_some(),
        merged_profile_ids: o.merged_profile_ids,
        merge_id: o.merge_id.unwrap_or_default(),
        duplicate: o.duplicate,
        conflicts: o.conflicts.iter().map(conflict).collect(),
        ignored: o.ignored.iter().map(ignored).collect(),
        identifiers_added: o.identifiers_added,
        rule_version: o.rule_version,
        error: None,
    }
}

/// Which profile a `oneof key { Identifier identifier; string profile_id }`
/// names.
pub fn profile_key(identifier: Option<pb::Identifier>, profile_id: Option<String>, field: &str) -> Result<ProfileRef, EngineError> {
    match (identifier, profile_id) {
        (Some(id), _) => Ok(ProfileRef::Identifier(raw_identifier(id))),
        (None, Some(pid)) => Ok(ProfileRef::ProfileId(pid)),
        (None, None) => Err(invalid(field, "set either identifier or profile_id")),
    }
}

pub fn get_profile_key(req: pb::GetProfileRequest) -> Result<ProfileRef, EngineError> {
    use pb::get_profile_request::Key;
    match req.key {
        Some(Key::Identifier(id)) => profile_key(Some(id), None, "key"),
        Some(Key::ProfileId(p)) => profile_key(None, Some(p), "key"),
        None => profile_key(None, None, "key"),
    }
}

pub fn delete_key(req: pb::DeleteProfileRequest) -> Result<ProfileRef, EngineError> {
    use pb::delete_profile_request::Key;
    match req.key {
        Some(Key::Identifier(id)) => profile_key(Some(id), None, "key"),
        Some(Key::ProfileId(p)) => profile_key(None, Some(p), "key"),
        None => profile_key(None, None, "key"),
    }
}

pub fn profile_ref(r: pb::ProfileRef, field: &str) -> Result<ProfileRef, EngineError> {
    use pb::profile_ref::Key;
    match r.key {
        Some(Key::Identifier(id)) => profile_key(Some(id), None, field),
        Some(Key::ProfileId(p)) => profile_key(None, Some(p), field),
        None => profile_key(None, None, field),
    }
}

pub fn profile(p: Profile, resolved_from: Option<String>) -> pb::Profile {
    pb::Profile {
        profile_id: p.id,
        identifiers: p.identifiers.iter().map(identifier).collect(),
        traits: Some(prost_types::Struct {
            fields: p.traits.iter().map(|(k, v)| (k.clone(), idgraph_proto::json::to_value(&v.value))).collect(),
        }),
        merged_from: p.merged_from,
        created_ms: p.created_ms,
        updated_ms: p.updated_ms,
        rule_version: p.rule_version,
        merge_ids: p.lineage,
        resolved_from: resolved_from.unwrap_or_default(),
        stale: false,
    }
}

pub fn found_profile(f: FoundProfile) -> pb::Profile {
    profile(f.profile, f.resolved_from)
}

pub fn unmerge_target(req: pb::UnmergeRequest) -> Result<engine::UnmergeTarget, EngineError> {
    use pb::unmerge_request::Target;
    match req.target {
        Some(Target::MergeId(m)) => Ok(engine::UnmergeTarget::MergeId(m)),
        Some(Target::Split(s)) => Ok(engine::UnmergeTarget::Split {
            profile_id: s.profile_id,
            identifiers: s.identifiers.into_iter().map(raw_identifier).collect(),
        }),
        None => Err(invalid("target", "set either merge_id or split")),
    }
}

pub fn merge_record(m: MergeRecord) -> pb::MergeRecord {
    let (cause, detail, source) = match m.cause {
        MergeCause::Event { event_id, source } => ("event", event_id, source),
        MergeCause::Operator { reason, request_id: _ } => ("operator", reason, String::new()),
    };
    pb::MergeRecord {
        merge_id: m.id,
        survivor_profile_id: m.survivor,
        absorbed: m
            .absorbed
            .into_iter()
            .map(|a| pb::AbsorbedProfile {
                profile_id: a.profile.id,
                identifiers: a.profile.identifiers.iter().map(identifier).collect(),
                merged_from: a.profile.merged_from,
                created_ms: a.profile.created_ms,
            })
            .collect(),
        added: m.added.iter().map(identifier).collect(),
        cause: cause.into(),
        cause_detail: detail,
        source,
        rule_version: m.rule_version,
        merged_at_ms: m.at_ms,
        forced: m.forced,
        undone: m.undone_at_ms.is_some(),
        undone_at_ms: m.undone_at_ms.unwrap_or_default(),
    }
}

/// One shard replica's Raft status as this node sees it.
pub fn shard_status(r: &ReplicaStatus) -> pb::ShardStatus {
    pb::ShardStatus {
        shard: r.group.wire(),
        state: r.role.as_str().to_string(),
        leader_id: r.leader_id,
        term: r.term,
        last_log_index: r.last_log_index,
        applied_index: r.applied_index,
        snapshot_index: r.snapshot_index,
        members: r
            .members
            .iter()
            .map(|m| pb::ShardMember { node_id: m.node_id, addr: m.addr.clone(), voter: m.voter, matched_index: m.matched_index })
            .collect(),
        prepared_txns: r.prepared_txns,
    }
}

/// Where to send requests, as `IdentityGraph.GetRoutes` answers: the
/// map's nodes, and who leads each shard this node holds a replica of.
pub fn routes(node_id: u64, map: &idgraph_core::meta::ClusterMap, replicas: &[ReplicaStatus]) -> pb::Routes {
    let mut shards: Vec<pb::ShardRoute> = replicas
        .iter()
        .filter(|r| r.group != GroupId::Meta)
        .map(|r| pb::ShardRoute { shard: r.group.wire(), leader_id: r.leader_id, term: r.term })
        .collect();
    shards.sort_by_key(|s| s.shard);
    pb::Routes {
        shard_count: map.shard_count,
        map_version: map.version,
        nodes: map.nodes.iter().map(|(id, e)| pb::RouteNode { node_id: *id, addr: e.addr.clone() }).collect(),
        shards,
        node_id,
    }
}

/// The cluster map and this node's replicas, as `Admin.GetCluster` answers.
pub fn cluster_status(node_id: u64, map: &idgraph_core::meta::ClusterMap, replicas: &[ReplicaStatus]) -> pb::ClusterStatus {
    let mut shards: Vec<pb::ShardStatus> = replicas.iter().filter(|r| r.group != GroupId::Meta).map(shard_status).collect();
    shards.sort_by_key(|s| s.shard);
    let metadata = replicas.iter().find(|r| r.group == GroupId::Meta).map(shard_status);
    let leads = |id: u64| replicas.iter().filter(|r| r.leader_id == id && r.role == RaftRole::Leader).count() as u32;
    let nodes = map
        .nodes
        .iter()
        .map(|(id, e)| pb::ClusterNode {
            node_id: *id,
            addr: e.addr.clone(),
            state: match e.state {
                idgraph_core::meta::NodeState::Active => "active".into(),
                idgraph_core::meta::NodeState::Leaving => "leaving".into(),
            },
            rule_version: e.rule_version.clone(),
            replicas: map.groups_of(*id).len() as u32,
            leads: leads(*id),
        })
        .collect();
    let placement = map
        .groups
        .iter()
        .map(|(g, members)| pb::GroupPlacement {
            group: g.to_string(),
            node_ids: members.iter().copied().collect(),
            moving: map.moves.get(g).map_or_else(String::new, |mv| {
                let mut parts = Vec::new();
                if let Some(a) = mv.add {
                    parts.push(format!("+{a}"));
                }
                if let Some(r) = mv.remove {
                    parts.push(format!("-{r}"));
                }
                parts.join(" ")
            }),
        })
        .collect();
    pb::ClusterStatus {
        node_id,
        shards,
        shard_count: map.shard_count,
        replication_factor: map.replication,
        map_version: map.version,
        nodes,
        placement,
        metadata,
    }
}

/// An event of a stream that failed: its answer in the stream carries the
/// status it would have got alone.
pub fn event_error(s: tonic::Status) -> pb::IdentifyResponse {
    pb::IdentifyResponse { error: Some(pb::EventError { code: s.code() as i32, message: s.message().to_string() }), ..Default::default() }
}

pub fn merge_response(o: MergeOutcome) -> pb::MergeResponse {
    pb::MergeResponse {
        profile_id: o.profile_id,
        merged_profile_ids: o.merged_profile_ids,
        merge_id: o.merge_id.unwrap_or_default(),
        forced_limits: o.forced_limits,
    }
}

pub fn unmerge_response(o: UnmergeOutcome) -> pb::UnmergeResponse {
    pb::UnmergeResponse { profile_id: o.profile_id, new_profile_ids: o.new_profile_ids, identifiers_moved: o.identifiers_moved }
}

pub fn delete_response(o: DeleteOutcome) -> pb::DeleteProfileResponse {
    pb::DeleteProfileResponse {
        profile_id: o.profile_id,
        identifiers_erased: o.identifiers_erased,
        merge_records_erased: o.merge_records_erased,
    }
}

/// A listed hub value, with the profile that holds it now (empty if none).
pub fn hub(id: &Identifier, h: HubRecord, profile_id: String) -> pb::Hub {
    pb::Hub {
        identifier: Some(identifier(id)),
        reason: h.reason,
        colliding_profiles: h.colliding_profiles.len() as u32,
        limit_type: h.limit_type,
        listed_at_ms: h.listed_at_ms.unwrap_or_default(),
        profile_id,
    }
}

/// The graph's counters (never negative on the wire).
pub fn stats(c: &Counters, rule_version: &str, shards: u32) -> pb::Stats {
    let u = |v: i64| v.max(0) as u64;
    pb::Stats {
        profiles: u(c.profiles),
        identifiers: u(c.identifiers),
        events: u(c.events),
        duplicates: u(c.duplicates),
        merges: u(c.merges),
        conflicts: u(c.conflicts),
        unmerges: u(c.unmerges),
        deletions: u(c.deletions),
        hubs: u(c.hubs),
        rule_version: rule_version.into(),
        shards,
    }
}

/// An audit log entry on the wire.
pub fn audit_entry(e: idgraph_core::meta::AuditEntry) -> pb::AuditEntry {
    pb::AuditEntry { id: e.id, at_ms: e.at_ms, who: e.who, node_id: e.node_id, action: e.action, target: e.target, outcome: e.outcome }
}

/// This node's replicas' state digests, as `Admin.GetDigests` answers.
pub fn replica_digests(node_id: u64, digests: Vec<(GroupId, ReplicaDigest)>) -> pb::ReplicaDigests {
    let shards = digests
        .into_iter()
        .map(|(shard, d)| pb::ShardDigest {
            shard: shard.wire(),
            applied_index: d.applied_index,
            digest: format!("{:016x}", d.digest),
            bytes: d.bytes,
            settled: d.settled,
        })
        .collect();
    pb::ReplicaDigests { node_id, shards }
}

/// A stored rule set as the admin API shows it.
pub fn rule_set_info(version: String, toml: String, map: &idgraph_core::meta::ClusterMap, active: &str) -> pb::RuleSetInfo {
    let canary_shards = map.shard_rules.iter().filter(|(_, v)| **v == version).map(|(s, _)| s.0).collect();
    pb::RuleSetInfo { active: version == active, version, toml, canary_shards }
}

/// A rollout as the admin API shows it (the whole record as JSON).
pub fn canary_rollout(r: &idgraph_core::canary::Rollout) -> pb::CanaryRollout {
    pb::CanaryRollout {
        id: r.id.clone(),
        phase: r.phase.name().into(),
        candidate: r.plan.candidate.clone(),
        control: r.control.clone(),
        step: r.step as u32 + 1,
        steps: r.plan.steps.len() as u32,
        canary_shards: if matches!(r.phase, idgraph_core::canary::Phase::Promoted) { r.shard_count } else { r.assignments().len() as u32 },
        shard_count: r.shard_count,
        objective: r.plan.objective.clone(),
        last_verdict: r.judgements.last().map(|j| j.verdict.to_string()).unwrap_or_default(),
        record_json: serde_json::to_string(r).unwrap_or_default(),
    }
}
