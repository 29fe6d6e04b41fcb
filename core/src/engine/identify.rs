//! Applying one identity event (see the module essay in `engine`).

use super::operator::{check_limits, merge_into, oldest_first, Violation};
use super::{
    invalid, known_types, make_id_near, traits, Conflict, ConflictKind, EngineError, IdentifyEvent, IdentifyOutcome, Ignored,
    IgnoredReason, RawIdentifier,
};
use crate::graph::{GraphKey, GraphRead};
use crate::model::{Change, ChangeSet, EventRecord, HubRecord, Identifier, MergeCause, Profile, ProfileId, ShardId};
use crate::rules::{Rejection, RuleSet, TypeRule, UnknownTypePolicy};
use std::collections::{BTreeMap, BTreeSet};

pub const MAX_IDENTIFIERS_PER_EVENT: usize = 64;
pub const MAX_VALUE_BYTES: usize = 1024;
pub const MAX_EVENT_ID_BYTES: usize = 256;
pub const MAX_SOURCE_BYTES: usize = 256;
pub const MAX_TRAITS: usize = 256;
pub const MAX_TRAIT_KEY_BYTES: usize = 256;
pub const MAX_TRAITS_BYTES: usize = 64 * 1024;

/// The home shard of an event with identifiers `ids`: the shard of its
/// smallest usable identifier under `rules` (by type, then value), where
/// the engine puts the event's own records (its dedup record, a new
/// profile, a merge record); None when no identifier is usable. A client
/// that sends the event to this shard's leader saves a hop between nodes.
/// It does not check the rest of the event: one the engine refuses (say, for
/// an identifier of a type the rules reject) may still have a home shard.
pub fn home_shard(rules: &RuleSet, ids: &[RawIdentifier], shard_count: u32) -> Option<ShardId> {
    ids.iter().filter_map(|raw| normalize_raw(rules, raw)).map(|(_, id)| id).min().map(|id| GraphKey::Owner(id).shard(shard_count))
}

/// `raw` normalised under `rules`, with its type's rule; None when the
/// rules do not know its type or its value does not normalise (blocked or
/// invalid; an identity event says which in its ignored identifiers).
pub fn normalize_raw<'r>(rules: &'r RuleSet, raw: &RawIdentifier) -> Option<(&'r TypeRule, Identifier)> {
    let kind = raw.kind.trim().to_ascii_lowercase();
    let rule = rules.type_rule(&kind)?;
    rules.normalize(rule, &raw.value).ok().map(|value| (rule, Identifier::new(kind, value)))
}

/// Checks the shape of an event before anything is read.
fn validate(ev: &IdentifyEvent) -> Result<(), EngineError> {
    let id = ev.event_id.as_str();
    if id.trim().is_empty() {
        return Err(invalid("event_id", "is required"));
    }
    if id.len() > MAX_EVENT_ID_BYTES {
        return Err(invalid("event_id", format!("longer than {MAX_EVENT_ID_BYTES} bytes")));
    }
    if id.chars().any(char::is_control) {
        return Err(invalid("event_id", "contains control characters"));
    }
    if ev.timestamp_ms < 0 {
        return Err(invalid("timestamp_ms", "must not be negative (milliseconds since the Unix epoch, or 0 for now)"));
    }
    if ev.identifiers.is_empty() {
        return Err(invalid("identifiers", "at least one identifier is required"));
    }
    if ev.identifiers.len() > MAX_IDENTIFIERS_PER_EVENT {
        return Err(invalid("identifiers", format!("{} identifiers; at most {MAX_IDENTIFIERS_PER_EVENT} per event", ev.identifiers.len())));
    }
    for (i, raw) in ev.identifiers.iter().enumerate() {
        if raw.kind.trim().is_empty() {
            return Err(invalid(format!("identifiers[{i}].type"), "is required"));
        }
        if raw.kind.len() > 64 {
            return Err(invalid(format!("identifiers[{i}].type"), "longer than 64 bytes"));
        }
        if raw.value.len() > MAX_VALUE_BYTES {
            return Err(invalid(format!("identifiers[{i}].value"), format!("{} bytes; at most {MAX_VALUE_BYTES}", raw.value.len())));
        }
    }
    if ev.source.len() > MAX_SOURCE_BYTES {
        return Err(invalid("source", format!("longer than {MAX_SOURCE_BYTES} bytes")));
    }
    if ev.traits.len() > MAX_TRAITS {
        return Err(invalid("traits", format!("{} traits; at most {MAX_TRAITS} per event", ev.traits.len())));
    }
    for k in ev.traits.keys() {
        if k.is_empty() || k.len() > MAX_TRAIT_KEY_BYTES {
            return Err(invalid("traits", format!("trait names are 1 to {MAX_TRAIT_KEY_BYTES} bytes")));
        }
    }
    let size: usize = ev.traits.iter().map(|(k, v)| k.len() + v.to_string().len()).sum();
    if size > MAX_TRAITS_BYTES {
        return Err(invalid("traits", format!("{size} bytes of traits; at most {MAX_TRAITS_BYTES}")));
    }
    Ok(())
}

/// Normalises the event's identifiers; returns the usable ones (unique) and
/// what was ignored.
fn normalize_all(rules: &RuleSet, ev: &IdentifyEvent) -> Result<(Vec<Identifier>, Vec<Ignored>), EngineError> {
    let mut usable: Vec<Identifier> = Vec::new();
    let mut ignored = Vec::new();
    for (i, raw) in ev.identifiers.iter().enumerate() {
        let kind = raw.kind.trim().to_ascii_lowercase();
        let Some(rule) = rules.type_rule(&kind) else {
            match rules.unknown_types() {
                UnknownTypePolicy::Reject => {
                    return Err(invalid(
                        format!("identifiers[{i}].type"),
                        format!("unknown identifier type {kind:?}; the rule set knows {}", known_types(rules)),
                    ))
                }
                UnknownTypePolicy::Ignore => {
                    ignored.push(Ignored {
                        identifier: raw.clone(),
                        reason: IgnoredReason::UnknownType,
                        detail: format!("type {kind:?} is not in the rule set"),
                    });
                    continue;
                }
            }
        };
        match rules.normalize(rule, &raw.value) {
            Ok(value) => {
                let id = Identifier::new(kind, value);
                if usable.contains(&id) {
                    ignored.push(Ignored {
                        identifier: raw.clone(),
                        reason: IgnoredReason::Duplicate,
                        detail: "same identifier twice in the event".into(),
                    });
                } else {
                    usable.push(id);
                }
            }
            Err(Rejection::Blocked(detail)) => ignored.push(Ignored { identifier: raw.clone(), reason: IgnoredReason::Blocked, detail }),
            Err(Rejection::Invalid(detail)) => ignored.push(Ignored { identifier: raw.clone(), reason: IgnoredReason::Invalid, detail }),
        }
    }
    if usable.is_empty() {
        let why: Vec<String> = ignored.iter().enumerate().map(|(i, g)| format!("#{i} {}", g.reason.as_str())).collect();
        return Err(invalid(
            "identifiers",
            format!("no usable identifier: every identifier was blocked, invalid or ignored ({})", why.join(", ")),
        ));
    }
    Ok((usable, ignored))
}

pub(super) fn identify<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    at_ms: i64,
    ev: &IdentifyEvent,
) -> Result<(ChangeSet, IdentifyOutcome), EngineError> {
    validate(ev)?;
    let (usable, ignored) = normalize_all(rules, ev)?;
    // The event's own records (its dedup record, a new profile, a merge
    // record) go on the shard of its smallest usable identifier, whose
    // owner entry the event reads and writes anyway. A re-delivery carries
    // the same identifiers, so it finds the dedup record there.
    let near = GraphKey::Owner(usable.iter().min().expect("normalize_all returns at least one identifier").clone());
    let (slot, shards) = (near.slot(), state.shard_count());
    let mut cs = ChangeSet::default();
    if let Some(rec) = state.event_at(&ev.event_id, slot)? {
        let profile_id = super::resolve_profile_id(state, &rec.profile_id)?.map_or(rec.profile_id, |f| f.profile.id);
        cs.counters.duplicates += 1;
        return Ok((cs, IdentifyOutcome { profile_id, duplicate: true, rule_version: rules.version().into(), ..Default::default() }));
    }
    let ts = if ev.timestamp_ms == 0 { at_ms } else { ev.timestamp_ms };

    // Listed hubs no longer link profiles.
    let mut conflicts = Vec::new();
    let mut linking = Vec::new();
    let mut hubs = Vec::new();
    for id in usable {
        match state.hub(&id)? {
            Some(h) if h.listed_at_ms.is_some() => hubs.push(id),
            _ => linking.push(id),
        }
    }
    hubs.sort_by_key(|id| rules.rank(id));
    if linking.is_empty() {
        // A single identifier cannot merge anything.
        linking.push(hubs.remove(0));
    }
    for id in hubs {
        let kept_in = state.owner(&id)?;
        conflicts.push(Conflict {
            kind: ConflictKind::Hub,
            message: format!("{} is a listed hub value and causes no merges", id.kind),
            identifier: id,
            limit_type: String::new(),
            limit: 0,
            kept_in,
        });
    }
    linking.sort_by_key(|id| rules.rank(id));

    // Owners and their profiles, read once.
    let mut owner_of: BTreeMap<Identifier, Option<ProfileId>> = BTreeMap::new();
    let mut profiles: BTreeMap<ProfileId, Profile> = BTreeMap::new();
    for id in &linking {
        let owner = state.owner(id)?;
        if let Some(pid) = &owner {
            if !profiles.contains_key(pid) {
                let p = state.profile(pid)?.ok_or_else(|| crate::graph::StoreError::Corrupt {
                    key: format!("p{pid}"),
                    reason: "identifier points at a missing profile".into(),
                })?;
                profiles.insert(pid.clone(), p);
            }
        }
        owner_of.insert(id.clone(), owner);
    }

    // Merge protection: drop the lowest-priority identifier until the join
    // breaks no limit.
    let mut dropped: Vec<(Identifier, Violation)> = Vec::new();
    loop {
        let owners: BTreeSet<&ProfileId> = linking.iter().filter_map(|id| owner_of[id].as_ref()).collect();
        let joined: Vec<&Profile> = owners.iter().map(|p| &profiles[*p]).collect();
        let fresh: Vec<&Identifier> = linking.iter().filter(|id| owner_of[*id].is_none()).collect();
        match check_limits(rules, &joined, &fresh).into_iter().next() {
            Some(v) if linking.len() > 1 => {
                let id = linking.pop().expect("more than one identifier");
                dropped.push((id, v));
            }
            _ => break,
        }
    }
    // A dropped identifier whose profile is joined anyway (through a
    // higher-priority identifier) changed nothing by being dropped: it stays
    // in the event and is no conflict.
    let joined: BTreeSet<ProfileId> = linking.iter().filter_map(|id| owner_of[id].clone()).collect();
    dropped.retain(|(id, _)| {
        let rejoin = owner_of[id].as_ref().is_some_and(|o| joined.contains(o));
        if rejoin {
            linking.push(id.clone());
        }
        !rejoin
    });

    // The profiles the remaining identifiers belong to; the oldest survives.
    let mut owners: Vec<Profile> =
        linking.iter().filter_map(|id| owner_of[id].clone()).collect::<BTreeSet<_>>().into_iter().map(|p| profiles[&p].clone()).collect();
    owners.sort_by(oldest_first);
    let fresh: Vec<Identifier> = linking.iter().filter(|id| owner_of[*id].is_none()).cloned().collect();
    let mut outcome =
        IdentifyOutcome { rule_version: rules.version().into(), ignored, identifiers_added: fresh.len() as u32, ..Default::default() };

    let mut profile = if owners.is_empty() {
        outcome.created = true;
        cs.counters.profiles += 1;
        Profile {
            id: make_id_near("p", ts, &["profile", &ev.event_id], shards, &near, GraphKey::Profile),
            identifiers: Vec::new(),
            traits: BTreeMap::new(),
            merged_from: Vec::new(),
            lineage: Vec::new(),
            created_ms: ts,
            updated_ms: at_ms,
            rule_version: rules.version().into(),
        }
    } else {
        let survivor = owners.remove(0);
        if owners.is_empty() {
            survivor
        } else {
            let merge_id = make_id_near("m", at_ms, &["merge", &ev.event_id], shards, &near, GraphKey::Merge);
            outcome.merged_profile_ids = owners.iter().map(|p| p.id.clone()).collect();
            outcome.merge_id = Some(merge_id.clone());
            let cause = MergeCause::Event { event_id: ev.event_id.clone(), source: ev.source.clone() };
            merge_into(&mut cs, rules, survivor, owners, &fresh, cause, merge_id, at_ms, false)
        }
    };
    for id in &fresh {
        cs.push(Change::PutOwner(id.clone(), profile.id.clone()));
    }
    cs.counters.identifiers += fresh.len() as i64;
    profile.identifiers.extend(fresh);
    profile.identifiers.sort();
    profile.updated_ms = at_ms;
    profile.rule_version = rules.version().into();
    traits::apply_event(rules, &mut profile.traits, &ev.traits, ts, &ev.event_id);

    // Dropped identifiers stay where they were; those that separated two
    // profiles count towards becoming a hub.
    for (id, v) in dropped {
        let kept_in = owner_of[&id].clone();
        if kept_in.as_ref().is_some_and(|o| *o != profile.id) {
            record_collision(state, rules, &mut cs, &id, &profile.id, &v, at_ms)?;
        }
        conflicts.push(Conflict {
            kind: v.kind,
            message: v.message(&id.kind),
            identifier: id,
            limit_type: v.limit_type.clone(),
            limit: v.limit,
            kept_in,
        });
    }
    cs.counters.conflicts += conflicts.len() as i64;
    cs.counters.events += 1;
    outcome.conflicts = conflicts;
    outcome.profile_id = profile.id.clone();
    outcome.profile_identifiers = profile.identifiers.len() as u32;
    cs.push(Change::PutEvent(ev.event_id.clone(), EventRecord { profile_id: profile.id.clone(), applied_ms: at_ms, slot: Some(slot) }));
    cs.push(Change::PutProfile(profile));
    Ok((cs, outcome))
}

fn record_collision<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    cs: &mut ChangeSet,
    id: &Identifier,
    other: &ProfileId,
    v: &Violation,
    at_ms: i64,
) -> Result<(), EngineError> {
    let mut hub = state.hub(id)?.unwrap_or_else(HubRecord::default);
    if hub.listed_at_ms.is_some() || hub.colliding_profiles.contains(other) {
        return Ok(());
    }
    hub.colliding_profiles.push(other.clone());
    hub.limit_type = v.limit_type.clone();
    if hub.colliding_profiles.len() as u32 >= rules.hub_threshold() {
        hub.listed_at_ms = Some(at_ms);
        let limit = if v.limit_type.is_empty() { "per-profile identifier cap".to_string() } else { format!("{} limit", v.limit_type) };
        hub.reason = format!("collided with the {limit} of {} different profiles", hub.colliding_profiles.len());
        cs.counters.hubs += 1;
    }
    cs.push(Change::PutHub(id.clone(), hub));
    Ok(())
}
