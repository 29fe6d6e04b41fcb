//! Domain types of the identity graph: what the engine reasons about and
//! what storage keeps. Nothing here knows about protobuf, sled or tokio.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// Identifies one shard of the graph (one Raft group from the cluster issue
/// on). A single node serves shard 0 of a one-shard map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardId(pub u32);

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}", self.0)
    }
}

/// One Raft group of a cluster: a shard of the graph, or the metadata group
/// that holds the cluster map. On the wire and on disk a group is a `u32`,
/// the metadata group `u32::MAX` (what it was while the metadata group was
/// counted among the shards), so stored maps and logs read the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "u32", into = "u32")]
pub enum GroupId {
    Shard(ShardId),
    Meta,
}

impl GroupId {
    /// The metadata group's number on the wire and on disk.
    const META_WIRE: u32 = u32::MAX;

    /// The shard this group is, if it is one.
    pub fn shard(self) -> Option<ShardId> {
        match self {
            GroupId::Shard(s) => Some(s),
            GroupId::Meta => None,
        }
    }

    /// The group's number on the wire and on disk.
    pub fn wire(self) -> u32 {
        u32::from(self)
    }
}

impl From<u32> for GroupId {
    fn from(n: u32) -> GroupId {
        if n == GroupId::META_WIRE {
            GroupId::Meta
        } else {
            GroupId::Shard(ShardId(n))
        }
    }
}

impl From<GroupId> for u32 {
    fn from(g: GroupId) -> u32 {
        match g {
            GroupId::Shard(s) => s.0,
            GroupId::Meta => GroupId::META_WIRE,
        }
    }
}

impl From<ShardId> for GroupId {
    fn from(s: ShardId) -> GroupId {
        GroupId::Shard(s)
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GroupId::Shard(s) => s.fmt(f),
            GroupId::Meta => f.write_str("meta"),
        }
    }
}

/// A normalised identifier: a type from the rule set and a canonical value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Identifier {
    pub kind: String,
    pub value: String,
}

impl Identifier {
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Self {
        Identifier { kind: kind.into(), value: value.into() }
    }

    /// A short, stable, non-reversible tag for logs: identity values are
    /// personal data and never appear in logs.
    pub fn redacted(&self) -> String {
        let h = xxhash_rust::xxh3::xxh3_64(self.value.as_bytes());
        format!("{}:#{:012x}", self.kind, h & 0xffff_ffff_ffff)
    }
}

/// Profile ids and merge ids are ULID-formatted strings with a prefix
/// (`p_`, `m_`), derived deterministically from the command that made them.
pub type ProfileId = String;
pub type MergeId = String;

/// The stored state of one trait of a profile: its value and the event that
/// wrote it, so that merges can decide by event time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TraitState {
    pub value: serde_json::Value,
    pub ts: i64,
    pub event_id: String,
}

/// One customer profile: the identifiers stitched together and their traits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub id: ProfileId,
    /// Sorted, unique.
    pub identifiers: Vec<Identifier>,
    pub traits: BTreeMap<String, TraitState>,
    /// Every profile id absorbed into this one, transitively; sorted.
    pub merged_from: Vec<ProfileId>,
    /// Merge (and split) record ids that built this profile, oldest first.
    pub lineage: Vec<MergeId>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub rule_version: String,
}

impl Profile {
    pub fn holds(&self, id: &Identifier) -> bool {
        self.identifiers.binary_search(id).is_ok()
    }
}

/// What the node remembers of an applied event, to answer re-deliveries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub profile_id: ProfileId,
    pub applied_ms: i64,
    /// The hash slot the record is placed at: the slot of its event's
    /// smallest usable identifier, so that a new person's records share one
    /// shard. `None` for records placed by the hash of the event id (written
    /// before events were placed by identifier).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<u32>,
}

/// Why a merge happened.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MergeCause {
    Event { event_id: String, source: String },
    Operator { reason: String, request_id: String },
}

/// One absorbed side of a merge, as it was just before the merge: enough to
/// restore it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AbsorbedProfile {
    pub profile: Profile,
}

/// The lineage of one merge.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub id: MergeId,
    pub survivor: ProfileId,
    pub absorbed: Vec<AbsorbedProfile>,
    /// Identifiers the causing event attached that belonged to no profile.
    pub added: Vec<Identifier>,
    pub cause: MergeCause,
    pub rule_version: String,
    pub at_ms: i64,
    pub forced: bool,
    pub undone_at_ms: Option<i64>,
}

/// Collision history of one identifier value, and whether it is now a hub.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HubRecord {
    /// Distinct profiles this value collided with (bounded by the threshold).
    pub colliding_profiles: Vec<ProfileId>,
    pub limit_type: String,
    /// Set once the value is listed as a hub and stops causing merges.
    pub listed_at_ms: Option<i64>,
    pub reason: String,
}

/// Counters of one shard, kept in the same atomic batch as the changes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub profiles: i64,
    pub identifiers: i64,
    pub events: i64,
    pub duplicates: i64,
    pub merges: i64,
    pub conflicts: i64,
    pub unmerges: i64,
    pub deletions: i64,
    pub hubs: i64,
}

impl Counters {
    pub fn add(&mut self, d: &Counters) {
        self.profiles += d.profiles;
        self.identifiers += d.identifiers;
        self.events += d.events;
        self.duplicates += d.duplicates;
        self.merges += d.merges;
        self.conflicts += d.conflicts;
        self.unmerges += d.unmerges;
        self.deletions += d.deletions;
        self.hubs += d.hubs;
    }
}

/// One state change emitted by the engine; storage applies a whole
/// [`ChangeSet`] atomically.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Change {
    PutOwner(Identifier, ProfileId),
    DeleteOwner(Identifier),
    PutProfile(Profile),
    DeleteProfile(ProfileId),
    PutAlias(ProfileId, ProfileId),
    DeleteAlias(ProfileId),
    PutEvent(String, EventRecord),
    PutMerge(MergeRecord),
    DeleteMerge(MergeId),
    PutHub(Identifier, HubRecord),
    DeleteHub(Identifier),
    /// Bookkeeping of the layer above the engine (e.g. the last applied Raft
    /// log id), written in the same atomic batch as the graph changes.
    PutMeta(String, Vec<u8>),
    DeleteMeta(String),
    /// Forgets an event's dedup record once its retention has passed (see
    /// [`crate::retention`]); the engine never deletes one.
    DeleteEvent(String),
}

/// The changes of one command plus the counter deltas they imply.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeSet {
    pub changes: Vec<Change>,
    pub counters: Counters,
}

impl ChangeSet {
    pub fn push(&mut self, c: Change) {
        self.changes.push(c);
    }
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty() && self.counters == Counters::default()
    }
}

#[cfg(test)]
mod group_tests {
    use super::*;

    #[test]
    fn a_group_is_stored_and_sent_as_the_number_it_had_as_a_shard_id() {
        for (group, n) in [(GroupId::Shard(ShardId(7)), 7u32), (GroupId::Meta, u32::MAX)] {
            let old_named = rmp_serde::to_vec_named(&ShardId(n)).unwrap();
            assert_eq!(rmp_serde::to_vec_named(&group).unwrap(), old_named, "{group} encodes as before");
            assert_eq!(rmp_serde::from_slice::<GroupId>(&old_named).unwrap(), group, "{group} decodes from before");
            assert_eq!(GroupId::from(n).wire(), n);
        }
        let map: BTreeMap<GroupId, u8> = BTreeMap::from([(GroupId::Meta, 1), (GroupId::Shard(ShardId(u32::MAX - 1)), 2)]);
        let old: BTreeMap<ShardId, u8> = BTreeMap::from([(ShardId(u32::MAX), 1), (ShardId(u32::MAX - 1), 2)]);
        assert_eq!(rmp_serde::to_vec(&map).unwrap(), rmp_serde::to_vec(&old).unwrap(), "maps keyed by group keep their order and bytes");
        assert_eq!(GroupId::Meta.to_string(), "meta");
        assert_eq!(GroupId::Shard(ShardId(3)).to_string(), "0003");
    }
}
