//! The identity-resolution engine: identifiers and rules in, state changes
//! out.
//!
//! # Model
//!
//! The graph is a partition of identifiers into live profiles. An identity
//! event names identifiers seen together; the engine normalises them with the
//! [`RuleSet`], finds the profiles they already belong to, and joins those
//! profiles and the new identifiers into one, unless the joined profile would
//! break a limit. The engine is pure: [`execute`] reads the current state
//! through [`GraphRead`] and returns a [`ChangeSet`] plus an outcome. It does
//! no I/O of its own, spawns nothing and reads no clock: the time (`at_ms`)
//! and an operation id come inside the [`Command`], chosen once by the shell
//! that proposed it, so that replaying the same commands on the same state
//! yields the same changes (the property a Raft state machine needs).
//!
//! # Invariants (checked by the property tests in `engine::tests`)
//!
//! 1. Every identifier belongs to exactly one live profile, and a live
//!    profile lists exactly the identifiers that point at it.
//! 2. A merged-away profile id is an alias that resolves, in one or more
//!    hops, to a live profile; a live profile's `merged_from` lists every id
//!    that resolves to it.
//! 3. No event and no unforced merge makes a profile break a limit (per-type
//!    `limit`, `max_identifiers_per_profile`) that it did not already break.
//! 4. Without limits, the partition and the traits do not depend on the order
//!    in which events are applied: joining is union, and every trait policy
//!    is a commutative, associative choice over (value, event time, event id).
//! 5. An event id applied once is never applied again with the same
//!    smallest usable identifier while its dedup record is kept (beside
//!    that identifier; a re-delivery carries the same identifiers). The
//!    record is forgotten once its retention has passed
//!    ([`crate::retention`]).
//!
//! # Merge protection
//!
//! When joining would break a limit, the event's lowest-priority identifier
//! is dropped and the join is tried again, until what is left can be applied
//! (a single identifier always can). Dropped identifiers stay where they
//! were, and each drop is reported as a [`Conflict`]. A value that, by being
//! dropped, keeps separating different profiles (`hub_threshold` distinct
//! ones) is listed as a hub and stops causing merges.
//!
//! # Lineage
//!
//! Every merge writes a [`MergeRecord`] holding the absorbed profiles exactly
//! as they were, so that [`CommandKind::Unmerge`] by merge id restores them with
//! their ids, identifiers, traits and own lineage.

mod identify;
mod operator;
mod traits;

#[cfg(test)]
pub(crate) mod tests;

use crate::graph::{GraphKey, GraphRead, StoreError};
use crate::model::{ChangeSet, Identifier, MergeRecord, Profile, ProfileId};
use crate::rules::RuleSet;
use std::collections::BTreeMap;

pub use identify::MAX_IDENTIFIERS_PER_EVENT;
pub use identify::MAX_VALUE_BYTES;
pub use identify::{home_shard, normalize_raw};

/// Profile and merge ids are 28 characters; anything much longer is not one.
pub const MAX_ID_BYTES: usize = 128;

/// An identifier as a caller sent it, before normalisation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawIdentifier {
    pub kind: String,
    pub value: String,
}

impl RawIdentifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        RawIdentifier { kind: kind.into(), value: value.into() }
    }
}

/// One identity event.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IdentifyEvent {
    pub event_id: String,
    /// Event time; 0 means the command's `at_ms`.
    pub timestamp_ms: i64,
    pub identifiers: Vec<RawIdentifier>,
    pub traits: BTreeMap<String, serde_json::Value>,
    pub source: String,
}

/// A profile named by one of its identifiers or by its id.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ProfileRef {
    Identifier(RawIdentifier),
    ProfileId(String),
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum UnmergeTarget {
    MergeId(String),
    Split { profile_id: String, identifiers: Vec<RawIdentifier> },
}

/// A state-changing request, with the time and operation id its proposer
/// chose.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Command {
    pub at_ms: i64,
    pub op_id: String,
    pub kind: CommandKind,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum CommandKind {
    Identify(IdentifyEvent),
    Merge { profiles: Vec<ProfileRef>, force: bool, reason: String },
    Unmerge { target: UnmergeTarget, reason: String },
    Delete(ProfileRef),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConflictKind {
    TypeLimit,
    ProfileCap,
    Hub,
}

/// A rule an event ran into; the event was applied without `identifier`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Conflict {
    pub kind: ConflictKind,
    pub identifier: Identifier,
    pub limit_type: String,
    pub limit: u32,
    pub kept_in: Option<ProfileId>,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IgnoredReason {
    Blocked,
    Invalid,
    UnknownType,
    Duplicate,
}

impl IgnoredReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            IgnoredReason::Blocked => "blocked",
            IgnoredReason::Invalid => "invalid",
            IgnoredReason::UnknownType => "unknown_type",
            IgnoredReason::Duplicate => "duplicate",
        }
    }
}

/// An identifier of the event that was not used, as the caller sent it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Ignored {
    pub identifier: RawIdentifier,
    pub reason: IgnoredReason,
    pub detail: String,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IdentifyOutcome {
    pub profile_id: ProfileId,
    pub created: bool,
    pub merged_profile_ids: Vec<ProfileId>,
    pub merge_id: Option<String>,
    pub duplicate: bool,
    pub conflicts: Vec<Conflict>,
    pub ignored: Vec<Ignored>,
    pub identifiers_added: u32,
    pub rule_version: String,
    /// Identifiers the profile holds after the event (0 for a duplicate).
    #[serde(default)]
    pub profile_identifiers: u32,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeOutcome {
    pub profile_id: ProfileId,
    pub merged_profile_ids: Vec<ProfileId>,
    pub merge_id: Option<String>,
    pub forced_limits: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UnmergeOutcome {
    pub profile_id: ProfileId,
    pub new_profile_ids: Vec<ProfileId>,
    pub identifiers_moved: u32,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DeleteOutcome {
    pub profile_id: ProfileId,
    pub identifiers_erased: u32,
    pub merge_records_erased: u32,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    Identify(IdentifyOutcome),
    Merge(MergeOutcome),
    Unmerge(UnmergeOutcome),
    Delete(DeleteOutcome),
}

/// Engine errors, classified by what the caller must do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is malformed: fix `field`.
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    /// What the request names does not exist.
    #[error("{field}: {what} not found")]
    NotFound { field: String, what: String },
    /// The request is well-formed but the graph's state or rules forbid it.
    #[error("{reason}")]
    FailedPrecondition { reason: String, limit: Option<String> },
    /// Storage failed: retry later.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The request is malformed at `field` (the refusal every adapter uses).
pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> EngineError {
    EngineError::InvalidArgument { field: field.into(), reason: reason.into() }
}

/// Applies one command to the state it reads, returning the changes to
/// store atomically and what to tell the caller.
pub fn execute<R: GraphRead + ?Sized>(state: &R, rules: &RuleSet, cmd: &Command) -> Result<(ChangeSet, Outcome), EngineError> {
    match &cmd.kind {
        CommandKind::Identify(ev) => identify::identify(state, rules, cmd.at_ms, ev).map(|(cs, o)| (cs, Outcome::Identify(o))),
        CommandKind::Merge { profiles, force, reason } => {
            operator::merge(state, rules, cmd, profiles, *force, reason).map(|(cs, o)| (cs, Outcome::Merge(o)))
        }
        CommandKind::Unmerge { target, reason: _ } => operator::unmerge(state, rules, cmd, target).map(|(cs, o)| (cs, Outcome::Unmerge(o))),
        CommandKind::Delete(r) => operator::delete(state, rules, r).map(|(cs, o)| (cs, Outcome::Delete(o))),
    }
}

/// A profile found by a look-up, and the merged-away id the caller named
/// when that is how it was found.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FoundProfile {
    pub profile: Profile,
    pub resolved_from: Option<ProfileId>,
}

/// Looks a profile up by identifier or id (`field` names the request field
/// in errors).
pub fn find_profile<R: GraphRead + ?Sized>(state: &R, rules: &RuleSet, r: &ProfileRef, field: &str) -> Result<FoundProfile, EngineError> {
    match r {
        ProfileRef::Identifier(raw) => {
            let id = normalize_ref(rules, raw, field)?;
            let owner = state
                .owner(&id)?
                .ok_or_else(|| EngineError::NotFound { field: field.into(), what: format!("a profile holding this {}", id.kind) })?;
            let profile = state.profile(&owner)?.ok_or_else(|| StoreError::Corrupt {
                key: format!("p{owner}"),
                reason: "an identifier points at a missing profile".into(),
            })?;
            Ok(FoundProfile { profile, resolved_from: None })
        }
        ProfileRef::ProfileId(pid) => {
            let pid = pid.trim();
            if pid.is_empty() {
                return Err(invalid(field, "profile id is empty"));
            }
            if pid.len() > MAX_ID_BYTES {
                return Err(invalid(field, format!("longer than {MAX_ID_BYTES} bytes; not a profile id")));
            }
            resolve_profile_id(state, pid)?.ok_or_else(|| EngineError::NotFound { field: field.into(), what: format!("profile {pid}") })
        }
    }
}

/// Follows aliases from a (possibly merged-away) profile id to the live
/// profile.
pub fn resolve_profile_id<R: GraphRead + ?Sized>(state: &R, pid: &str) -> Result<Option<FoundProfile>, EngineError> {
    let mut current = pid.to_string();
    for _ in 0..64 {
        if let Some(profile) = state.profile(&current)? {
            let resolved_from = (current != pid).then(|| pid.to_string());
            return Ok(Some(FoundProfile { profile, resolved_from }));
        }
        match state.alias(&current)? {
            Some(next) => current = next,
            None => return Ok(None),
        }
    }
    Ok(None)
}

/// Normalises an identifier named in a look-up or operator request.
pub(crate) fn normalize_ref(rules: &RuleSet, raw: &RawIdentifier, field: &str) -> Result<Identifier, EngineError> {
    if raw.kind.len() > 64 {
        return Err(invalid(format!("{field}.type"), "longer than 64 bytes"));
    }
    let kind = raw.kind.trim().to_ascii_lowercase();
    let rule = rules.type_rule(&kind).ok_or_else(|| {
        invalid(format!("{field}.type"), format!("unknown identifier type {kind:?}; the rule set knows {}", known_types(rules)))
    })?;
    if raw.value.len() > MAX_VALUE_BYTES {
        return Err(invalid(format!("{field}.value"), format!("longer than {MAX_VALUE_BYTES} bytes")));
    }
    let value = rules.normalize(rule, &raw.value).map_err(|r| match r {
        crate::rules::Rejection::Blocked(d) | crate::rules::Rejection::Invalid(d) => invalid(format!("{field}.value"), d),
    })?;
    Ok(Identifier::new(kind, value))
}

pub(crate) fn known_types(rules: &RuleSet) -> String {
    rules.type_names().collect::<Vec<_>>().join(", ")
}

/// Deterministic ULID-formatted ids: the time part is `ts_ms`, the rest a
/// hash of `seed`.
pub(crate) fn make_id(prefix: &str, ts_ms: i64, seed: &[&str]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for s in seed {
        h.update(s.as_bytes());
        h.update(&[0xff]);
    }
    let random = h.digest128() & ((1u128 << 80) - 1);
    let ms = ts_ms.clamp(0, (1i64 << 48) - 1) as u64;
    format!("{prefix}_{}", ulid::Ulid::from_parts(ms, random))
}

/// How many ids per shard [`make_id_near`] tries before it settles for the
/// first (each lands on a given shard with odds 1 in the shard count).
const PLACEMENT_TRIES_PER_SHARD: u32 = 8;

/// A new record's id, chosen so that the record (named by `key_of(id)`)
/// lands on the shard that holds `near`: the first of `make_id`'s ids for
/// the seed, then for the seed and a counter, whose record hashes there. So
/// a new person's profile, event record and owner entries share a shard,
/// and an event with one new identifier is one log entry on one shard
/// instead of a transaction across three. Records stay placed by the hash
/// of their ids (nothing to migrate, and a doubled shard count keeps half of
/// them together); the ids stay deterministic for a given command and shard
/// count. With one shard it is [`make_id`].
pub(crate) fn make_id_near(
    prefix: &str,
    ts_ms: i64,
    seed: &[&str],
    shards: u32,
    near: &GraphKey,
    key_of: fn(String) -> GraphKey,
) -> String {
    let first = make_id(prefix, ts_ms, seed);
    if shards <= 1 {
        return first;
    }
    let target = near.shard(shards);
    // Try 0 is the seed alone, try n the seed and n.
    let candidate = |n: u32| {
        let counter = n.to_string();
        let mut seeded: Vec<&str> = seed.to_vec();
        seeded.push(&counter);
        make_id(prefix, ts_ms, &seeded)
    };
    std::iter::once(first.clone())
        .chain((1..shards.saturating_mul(PLACEMENT_TRIES_PER_SHARD)).map(candidate))
        .find(|id| key_of(id.clone()).shard(shards) == target)
        .unwrap_or(first)
}

/// Looks merge lineage up.
pub fn find_merge<R: GraphRead + ?Sized>(state: &R, merge_id: &str) -> Result<MergeRecord, EngineError> {
    if merge_id.trim().is_empty() {
        return Err(invalid("merge_id", "is empty"));
    }
    if merge_id.len() > MAX_ID_BYTES {
        return Err(invalid("merge_id", format!("longer than {MAX_ID_BYTES} bytes; not a merge id")));
    }
    state
        .merge_record(merge_id.trim())?
        .ok_or_else(|| EngineError::NotFound { field: "merge_id".into(), what: format!("merge {merge_id}") })
}
