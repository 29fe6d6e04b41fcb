//! Operator commands (merge, unmerge, delete) and the join of profiles that
//! events and operators share.

use super::{
    find_profile, invalid, make_id_near, normalize_ref, resolve_profile_id, traits, Command, ConflictKind, DeleteOutcome, EngineError,
    MergeOutcome, ProfileRef, UnmergeOutcome, UnmergeTarget,
};
use crate::graph::{GraphKey, GraphRead};
use crate::model::{AbsorbedProfile, Change, ChangeSet, Identifier, MergeCause, MergeRecord, Profile};
use crate::rules::RuleSet;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};

/// A limit a join would break.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Violation {
    pub kind: ConflictKind,
    /// The identifier type, or "" for the per-profile cap.
    pub limit_type: String,
    pub limit: u32,
    pub count: u32,
}

impl Violation {
    pub fn message(&self, dropped_kind: &str) -> String {
        match self.kind {
            ConflictKind::ProfileCap => {
                format!("linking would put {} identifiers into one profile (cap {}); dropped the {dropped_kind}", self.count, self.limit)
            }
            _ => format!(
                "linking would put {} identifiers of type {} into one profile (limit {}); dropped the {dropped_kind}",
                self.count, self.limit_type, self.limit
            ),
        }
    }

    fn describe(&self) -> String {
        match self.kind {
            ConflictKind::ProfileCap => format!("max_identifiers_per_profile ({} identifiers, cap {})", self.count, self.limit),
            _ => format!("{} limit ({} identifiers, limit {})", self.limit_type, self.count, self.limit),
        }
    }
}

/// Limits that joining `profiles` and `fresh` identifiers would break, in
/// priority order. A limit a single profile already breaks (the rules were
/// tightened after it formed) does not count against the join unless the
/// join makes it worse.
pub(crate) fn check_limits(rules: &RuleSet, profiles: &[&Profile], fresh: &[&Identifier]) -> Vec<Violation> {
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    let mut worst: BTreeMap<&str, u32> = BTreeMap::new();
    let mut total = 0u32;
    let mut worst_total = 0u32;
    for p in profiles {
        let mut mine: BTreeMap<&str, u32> = BTreeMap::new();
        for id in &p.identifiers {
            *mine.entry(id.kind.as_str()).or_default() += 1;
        }
        for (k, n) in mine {
            *counts.entry(k).or_default() += n;
            let w = worst.entry(k).or_default();
            *w = (*w).max(n);
        }
        total += p.identifiers.len() as u32;
        worst_total = worst_total.max(p.identifiers.len() as u32);
    }
    for id in fresh {
        *counts.entry(id.kind.as_str()).or_default() += 1;
        total += 1;
    }
    let mut out: Vec<Violation> = counts
        .iter()
        .filter_map(|(k, n)| {
            let limit = rules.limit(k)?;
            let already = worst.get(k).copied().unwrap_or(0);
            (*n > limit && *n > already).then(|| Violation { kind: ConflictKind::TypeLimit, limit_type: k.to_string(), limit, count: *n })
        })
        .collect();
    out.sort_by_key(|v| (rules.priority(&v.limit_type), v.limit_type.clone()));
    let cap = rules.max_identifiers_per_profile();
    if total > cap && total > worst_total {
        out.push(Violation { kind: ConflictKind::ProfileCap, limit_type: String::new(), limit: cap, count: total });
    }
    out
}

/// The older profile survives a merge and keeps its id.
pub(crate) fn oldest_first(a: &Profile, b: &Profile) -> Ordering {
    (a.created_ms, &a.id).cmp(&(b.created_ms, &b.id))
}

fn sorted_union<T: Ord + Clone>(a: &[T], b: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut s: BTreeSet<T> = a.iter().cloned().collect();
    s.extend(b);
    s.into_iter().collect()
}

/// Joins `absorbed` into `survivor`: identifiers re-pointed, absorbed ids
/// become aliases, traits combined, lineage recorded. Returns the survivor
/// (not yet written: the caller finishes it and puts it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn merge_into(
    cs: &mut ChangeSet,
    rules: &RuleSet,
    mut survivor: Profile,
    absorbed: Vec<Profile>,
    added: &[Identifier],
    cause: MergeCause,
    merge_id: String,
    at_ms: i64,
    forced: bool,
) -> Profile {
    let mut ids = survivor.identifiers.clone();
    for loser in &absorbed {
        for id in &loser.identifiers {
            cs.push(Change::PutOwner(id.clone(), survivor.id.clone()));
        }
        ids.extend(loser.identifiers.iter().cloned());
        cs.push(Change::DeleteProfile(loser.id.clone()));
        cs.push(Change::PutAlias(loser.id.clone(), survivor.id.clone()));
        for m in &loser.merged_from {
            cs.push(Change::PutAlias(m.clone(), survivor.id.clone()));
        }
        traits::merge_profiles(rules, &mut survivor.traits, &loser.traits);
        survivor.merged_from = sorted_union(&survivor.merged_from, loser.merged_from.iter().cloned().chain([loser.id.clone()]));
        for m in &loser.lineage {
            if !survivor.lineage.contains(m) {
                survivor.lineage.push(m.clone());
            }
        }
        survivor.created_ms = survivor.created_ms.min(loser.created_ms);
    }
    ids.sort();
    survivor.identifiers = ids;
    survivor.lineage.push(merge_id.clone());
    survivor.updated_ms = at_ms;
    survivor.rule_version = rules.version().into();
    cs.counters.profiles -= absorbed.len() as i64;
    cs.counters.merges += 1;
    cs.push(Change::PutMerge(MergeRecord {
        id: merge_id,
        survivor: survivor.id.clone(),
        absorbed: absorbed.into_iter().map(|profile| AbsorbedProfile { profile }).collect(),
        added: added.to_vec(),
        cause,
        rule_version: rules.version().into(),
        at_ms,
        forced,
        undone_at_ms: None,
    }));
    survivor
}

pub(super) fn merge<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    cmd: &Command,
    refs: &[ProfileRef],
    force: bool,
    reason: &str,
) -> Result<(ChangeSet, MergeOutcome), EngineError> {
    if refs.len() < 2 {
        return Err(invalid("profiles", "name at least two profiles to merge"));
    }
    if refs.len() > 64 {
        return Err(invalid("profiles", "at most 64 profiles in one merge"));
    }
    if reason.len() > 1024 {
        return Err(invalid("reason", "longer than 1024 bytes"));
    }
    let mut found: BTreeMap<String, Profile> = BTreeMap::new();
    for (i, r) in refs.iter().enumerate() {
        let f = find_profile(state, rules, r, &format!("profiles[{i}]"))?;
        found.insert(f.profile.id.clone(), f.profile);
    }
    let mut profiles: Vec<Profile> = found.into_values().collect();
    profiles.sort_by(oldest_first);
    let mut cs = ChangeSet::default();
    if profiles.len() == 1 {
        return Ok((cs, MergeOutcome { profile_id: profiles.remove(0).id, ..Default::default() }));
    }
    let violations = check_limits(rules, &profiles.iter().collect::<Vec<_>>(), &[]);
    if let Some(v) = violations.iter().find(|v| v.kind == ConflictKind::ProfileCap) {
        // The per-profile cap bounds what one record holds: not forceable.
        return Err(EngineError::FailedPrecondition {
            reason: format!("merge refused: it would break the {} (not overridable by force)", v.describe()),
            limit: Some("max_identifiers_per_profile".into()),
        });
    }
    if let Some(v) = violations.first() {
        if !force {
            return Err(EngineError::FailedPrecondition {
                reason: format!("merge refused: it would break the {}; set force to merge anyway", v.describe()),
                limit: Some(if v.limit_type.is_empty() { "max_identifiers_per_profile".into() } else { v.limit_type.clone() }),
            });
        }
    }
    let survivor = profiles.remove(0);
    let near = GraphKey::Profile(survivor.id.clone());
    let merge_id = make_id_near("m", cmd.at_ms, &["merge", &cmd.op_id], state.shard_count(), &near, GraphKey::Merge);
    let outcome = MergeOutcome {
        profile_id: survivor.id.clone(),
        merged_profile_ids: profiles.iter().map(|p| p.id.clone()).collect(),
        merge_id: Some(merge_id.clone()),
        forced_limits: violations.iter().map(Violation::describe).collect(),
    };
    let cause = MergeCause::Operator { reason: reason.to_string(), request_id: cmd.op_id.clone() };
    let merged = merge_into(&mut cs, rules, survivor, profiles, &[], cause, merge_id, cmd.at_ms, force && !violations.is_empty());
    cs.push(Change::PutProfile(merged));
    Ok((cs, outcome))
}

pub(super) fn unmerge<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    cmd: &Command,
    target: &UnmergeTarget,
) -> Result<(ChangeSet, UnmergeOutcome), EngineError> {
    match target {
        UnmergeTarget::MergeId(merge_id) => undo_merge(state, rules, cmd, merge_id),
        UnmergeTarget::Split { profile_id, identifiers } => split(state, rules, cmd, profile_id, identifiers),
    }
}

/// Reverses a recorded merge: each absorbed profile comes back with its id,
/// its traits and lineage as of the merge, and those of its identifiers the
/// survivor still holds. Identifiers that later events attached stay with
/// the survivor, and so do the survivor's traits.
fn undo_merge<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    cmd: &Command,
    merge_id: &str,
) -> Result<(ChangeSet, UnmergeOutcome), EngineError> {
    let mut rec = super::find_merge(state, merge_id)?;
    if rec.undone_at_ms.is_some() {
        return Err(EngineError::FailedPrecondition { reason: format!("merge {} was already undone", rec.id), limit: None });
    }
    let mut holder = resolve_profile_id(state, &rec.survivor)?
        .ok_or_else(|| EngineError::FailedPrecondition {
            reason: format!("the profile merge {} built no longer exists (erased)", rec.id),
            limit: None,
        })?
        .profile;
    let mut cs = ChangeSet::default();
    let mut outcome = UnmergeOutcome { profile_id: holder.id.clone(), ..Default::default() };
    for a in &rec.absorbed {
        let side = &a.profile;
        let still_merged = resolve_profile_id(state, &side.id)?.is_some_and(|f| f.profile.id == holder.id);
        let moved: Vec<Identifier> = side.identifiers.iter().filter(|id| holder.holds(id)).cloned().collect();
        if !still_merged || moved.is_empty() {
            continue;
        }
        // Ids the side had absorbed come back with it, unless an earlier undo
        // already brought them back to life.
        let mut regained = Vec::new();
        for m in &side.merged_from {
            if state.profile(m)?.is_none() && resolve_profile_id(state, m)?.is_some_and(|f| f.profile.id == holder.id) {
                regained.push(m.clone());
            }
        }
        holder.identifiers.retain(|id| !moved.contains(id));
        let gone: BTreeSet<&String> = regained.iter().chain([&side.id]).collect();
        holder.merged_from.retain(|m| !gone.contains(m));
        // The holder keeps every lineage entry: records that mention
        // identifiers it held must go when it is erased.
        for id in &moved {
            cs.push(Change::PutOwner(id.clone(), side.id.clone()));
        }
        cs.push(Change::DeleteAlias(side.id.clone()));
        for m in &regained {
            cs.push(Change::PutAlias(m.clone(), side.id.clone()));
        }
        let mut restored = side.clone();
        restored.identifiers = moved;
        restored.merged_from = regained;
        restored.updated_ms = cmd.at_ms;
        restored.lineage.push(rec.id.clone());
        outcome.identifiers_moved += restored.identifiers.len() as u32;
        outcome.new_profile_ids.push(restored.id.clone());
        cs.push(Change::PutProfile(restored));
        cs.counters.profiles += 1;
    }
    if outcome.new_profile_ids.is_empty() {
        return Err(EngineError::FailedPrecondition {
            reason: format!("nothing of merge {} is left to undo: its absorbed identifiers have all moved on", rec.id),
            limit: None,
        });
    }
    if holder.identifiers.is_empty() {
        return Err(EngineError::FailedPrecondition {
            reason: format!("undoing merge {} would leave profile {} without identifiers", rec.id, holder.id),
            limit: None,
        });
    }
    holder.updated_ms = cmd.at_ms;
    holder.rule_version = rules.version().into();
    rec.undone_at_ms = Some(cmd.at_ms);
    cs.push(Change::PutProfile(holder));
    cs.push(Change::PutMerge(rec));
    cs.counters.unmerges += 1;
    Ok((cs, outcome))
}

/// Moves named identifiers out of a profile into a new profile.
fn split<R: GraphRead + ?Sized>(
    state: &R,
    rules: &RuleSet,
    cmd: &Command,
    profile_id: &str,
    raw: &[super::RawIdentifier],
) -> Result<(ChangeSet, UnmergeOutcome), EngineError> {
    if raw.is_empty() {
        return Err(invalid("split.identifiers", "name at least one identifier to split out"));
    }
    if raw.len() > super::MAX_IDENTIFIERS_PER_EVENT * 16 {
        return Err(invalid("split.identifiers", "too many identifiers"));
    }
    let mut holder = find_profile(state, rules, &ProfileRef::ProfileId(profile_id.to_string()), "split.profile_id")?.profile;
    let mut moved = BTreeSet::new();
    for (i, r) in raw.iter().enumerate() {
        let field = format!("split.identifiers[{i}]");
        let id = normalize_ref(rules, r, &field)?;
        if !holder.holds(&id) {
            return Err(EngineError::FailedPrecondition {
                reason: format!("{field}: profile {} does not hold this {}", holder.id, id.kind),
                limit: None,
            });
        }
        moved.insert(id);
    }
    if moved.len() == holder.identifiers.len() {
        return Err(EngineError::FailedPrecondition {
            reason: format!("split would leave profile {} without identifiers; delete it instead", holder.id),
            limit: None,
        });
    }
    // Merge records that mention a moved identifier follow it, so that
    // erasing the new profile erases them too.
    let mut lineage = Vec::new();
    for m in &holder.lineage {
        if let Some(rec) = state.merge_record(m)? {
            let mentions =
                rec.added.iter().chain(rec.absorbed.iter().flat_map(|a| a.profile.identifiers.iter())).any(|id| moved.contains(id));
            if mentions {
                lineage.push(m.clone());
            }
        }
    }
    let Some(first_moved) = moved.iter().next() else {
        return Err(invalid("split.identifiers", "name at least one identifier to split out"));
    };
    let near = GraphKey::Owner(first_moved.clone());
    let new_id = make_id_near("p", cmd.at_ms, &["split", &cmd.op_id], state.shard_count(), &near, GraphKey::Profile);
    holder.identifiers.retain(|id| !moved.contains(id));
    holder.updated_ms = cmd.at_ms;
    holder.rule_version = rules.version().into();
    let mut cs = ChangeSet::default();
    for id in &moved {
        cs.push(Change::PutOwner(id.clone(), new_id.clone()));
    }
    let outcome =
        UnmergeOutcome { profile_id: holder.id.clone(), new_profile_ids: vec![new_id.clone()], identifiers_moved: moved.len() as u32 };
    cs.push(Change::PutProfile(Profile {
        id: new_id,
        identifiers: moved.into_iter().collect(),
        traits: BTreeMap::new(),
        merged_from: Vec::new(),
        lineage,
        created_ms: cmd.at_ms,
        updated_ms: cmd.at_ms,
        rule_version: rules.version().into(),
    }));
    cs.push(Change::PutProfile(holder));
    cs.counters.profiles += 1;
    cs.counters.unmerges += 1;
    Ok((cs, outcome))
}

/// Erases a profile: identifiers, traits, aliases of its merged-away ids,
/// merge lineage and hub history of its values.
pub(super) fn delete<R: GraphRead + ?Sized>(state: &R, rules: &RuleSet, r: &ProfileRef) -> Result<(ChangeSet, DeleteOutcome), EngineError> {
    let field = match r {
        ProfileRef::Identifier(_) => "identifier",
        ProfileRef::ProfileId(_) => "profile_id",
    };
    let p = find_profile(state, rules, r, field)?.profile;
    let mut cs = ChangeSet::default();
    for id in &p.identifiers {
        cs.push(Change::DeleteOwner(id.clone()));
        cs.push(Change::DeleteHub(id.clone()));
        if state.hub(id)?.is_some_and(|h| h.listed_at_ms.is_some()) {
            cs.counters.hubs -= 1;
        }
    }
    for m in &p.merged_from {
        cs.push(Change::DeleteAlias(m.clone()));
    }
    let mut erased = 0;
    for m in &p.lineage {
        if state.merge_record(m)?.is_some() {
            cs.push(Change::DeleteMerge(m.clone()));
            erased += 1;
        }
    }
    cs.push(Change::DeleteProfile(p.id.clone()));
    cs.counters.profiles -= 1;
    cs.counters.identifiers -= p.identifiers.len() as i64;
    cs.counters.deletions += 1;
    Ok((cs, DeleteOutcome { profile_id: p.id, identifiers_erased: p.identifiers.len() as u32, merge_records_erased: erased }))
}
