//! Engine tests: scenarios named by the behaviour they show, and property
//! tests of the invariants in the module essay. They run on [`MemStore`]:
//! no tokio, no disk.

use super::*;
use crate::checks::TypeLimits;
use crate::graph::{GraphStore, MemStore};
use crate::model::Identifier;
use crate::rules::RuleSet;
use proptest::prelude::*;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};

struct Graph {
    store: MemStore,
    rules: RuleSet,
    now: i64,
    ops: u64,
    /// Whether an operator forced a merge, which may break a type's limit.
    forced: bool,
}

impl Graph {
    fn new() -> Self {
        Graph::with_rules(RuleSet::builtin())
    }

    fn with_rules(rules: RuleSet) -> Self {
        Graph { store: MemStore::new(), rules, now: 1_700_000_000_000, ops: 0, forced: false }
    }

    fn run(&mut self, kind: CommandKind) -> Result<Outcome, EngineError> {
        self.now += 1;
        self.ops += 1;
        self.forced |= matches!(kind, CommandKind::Merge { force: true, .. });
        let cmd = Command { at_ms: self.now, op_id: format!("op-{}", self.ops), kind };
        let (cs, out) = execute(&self.store, &self.rules, &cmd)?;
        self.store.apply(&cs)?;
        let limits = if self.forced { TypeLimits::MayBeForced } else { TypeLimits::Held };
        check_invariants(&self.store, &self.rules, limits);
        Ok(out)
    }

    fn event(&mut self, event_id: &str, ts: i64, ids: &[(&str, &str)], traits: serde_json::Value) -> Result<IdentifyOutcome, EngineError> {
        let traits: BTreeMap<String, serde_json::Value> = match traits {
            serde_json::Value::Object(m) => m.into_iter().collect(),
            _ => BTreeMap::new(),
        };
        let ev = IdentifyEvent {
            event_id: event_id.into(),
            timestamp_ms: ts,
            identifiers: ids.iter().map(|(k, v)| RawIdentifier::new(*k, *v)).collect(),
            traits,
            source: "test".into(),
        };
        match self.run(CommandKind::Identify(ev))? {
            Outcome::Identify(o) => Ok(o),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// An event at a later event time than every event before it.
    fn ok(&mut self, event_id: &str, ids: &[(&str, &str)]) -> IdentifyOutcome {
        let ts = 1000 * (self.ops as i64 + 1);
        self.event(event_id, ts, ids, json!({})).unwrap()
    }

    fn profile_of(&self, kind: &str, value: &str) -> Profile {
        find_profile(&self.store, &self.rules, &ProfileRef::Identifier(RawIdentifier::new(kind, value)), "identifier").unwrap().profile
    }

    fn merge(&mut self, a: ProfileRef, b: ProfileRef, force: bool) -> Result<MergeOutcome, EngineError> {
        match self.run(CommandKind::Merge { profiles: vec![a, b], force, reason: "ticket".into() })? {
            Outcome::Merge(o) => Ok(o),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn unmerge(&mut self, target: UnmergeTarget) -> Result<UnmergeOutcome, EngineError> {
        match self.run(CommandKind::Unmerge { target, reason: String::new() })? {
            Outcome::Unmerge(o) => Ok(o),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn idref(kind: &str, value: &str) -> ProfileRef {
    ProfileRef::Identifier(RawIdentifier::new(kind, value))
}

/// The graph's invariants ([`crate::checks`]) over the whole store, and
/// no alias left dangling.
fn check_invariants(store: &MemStore, rules: &RuleSet, limits: TypeLimits) {
    let found = crate::checks::graph(store, store.owners().len(), rules, limits).unwrap();
    assert!(found.is_empty(), "invariants broken: {found:#?}");
    for (alias, _) in store.aliases() {
        assert!(resolve_profile_id(store, &alias).unwrap().is_some(), "alias {alias} dangles");
    }
}

#[test]
fn first_event_creates_a_profile_with_normalised_identifiers() {
    let mut g = Graph::new();
    let o = g.ok("e1", &[("email", " Ann@Shop.COM "), ("phone", "(555) 010-2233")]);
    assert!(o.created && o.merge_id.is_none() && !o.duplicate);
    assert_eq!(o.identifiers_added, 2);
    let p = g.profile_of("email", "ann@shop.com");
    assert_eq!(p.id, o.profile_id);
    assert_eq!(p.identifiers, vec![Identifier::new("email", "ann@shop.com"), Identifier::new("phone", "15550102233")]);
    assert!(o.profile_id.starts_with("p_"));
}

#[test]
fn event_linking_two_profiles_merges_them_and_the_older_survives() {
    let mut g = Graph::new();
    let a = g.event("e1", 1000, &[("anonymous_id", "anon-1")], json!({})).unwrap();
    let b = g.event("e2", 2000, &[("email", "bo@shop.com")], json!({})).unwrap();
    let m = g.event("e3", 3000, &[("email", "bo@shop.com"), ("anonymous_id", "anon-1")], json!({})).unwrap();
    assert!(m.merge_id.is_some());
    assert_eq!(m.profile_id, a.profile_id, "the older profile keeps its id");
    assert_eq!(m.merged_profile_ids, vec![b.profile_id.clone()]);
    let p = g.profile_of("email", "bo@shop.com");
    assert_eq!(p.merged_from, vec![b.profile_id.clone()]);
    let via_old = resolve_profile_id(&g.store, &b.profile_id).unwrap().unwrap();
    assert_eq!(via_old.profile.id, a.profile_id);
    assert_eq!(via_old.resolved_from, Some(b.profile_id.clone()));
    let rec = find_merge(&g.store, m.merge_id.as_deref().unwrap()).unwrap();
    assert_eq!(rec.survivor, a.profile_id);
    assert_eq!(rec.absorbed[0].profile.identifiers, vec![Identifier::new("email", "bo@shop.com")]);
    assert!(matches!(rec.cause, crate::model::MergeCause::Event { ref event_id, .. } if event_id == "e3"));
}

#[test]
fn redelivery_changes_nothing_and_says_so() {
    let mut g = Graph::new();
    let first = g.ok("e1", &[("email", "c@shop.com")]);
    let before = g.store.all_profiles().unwrap();
    let again = g.event("e1", 1000, &[("email", "other@shop.com")], json!({"plan": "pro"})).unwrap();
    assert!(again.duplicate);
    assert_eq!(again.profile_id, first.profile_id);
    assert_eq!(g.store.all_profiles().unwrap(), before);
    assert_eq!(g.store.counters().unwrap().duplicates, 1);
}

#[test]
fn limit_conflict_drops_the_lowest_priority_identifier() {
    let mut g = Graph::new();
    let u1 = g.ok("e1", &[("user_id", "u1"), ("device_id", "tablet")]);
    // The shared tablet is seen with a second user: linking would put two
    // user_ids into one profile (limit 1).
    let o = g.ok("e2", &[("user_id", "u2"), ("device_id", "tablet")]);
    assert!(o.merge_id.is_none());
    assert!(o.created);
    assert_ne!(o.profile_id, u1.profile_id);
    assert_eq!(o.conflicts.len(), 1);
    let c = &o.conflicts[0];
    assert_eq!(c.kind, ConflictKind::TypeLimit);
    assert_eq!(c.identifier, Identifier::new("device_id", "tablet"));
    assert_eq!((c.limit_type.as_str(), c.limit), ("user_id", 1));
    assert_eq!(c.kept_in.as_ref(), Some(&u1.profile_id));
    assert_eq!(g.profile_of("device_id", "tablet").id, u1.profile_id, "the dropped identifier stays where it was");
    assert_eq!(g.profile_of("user_id", "u2").identifiers, vec![Identifier::new("user_id", "u2")]);
    assert_eq!(g.store.counters().unwrap().conflicts, 1);
}

#[test]
fn event_resolves_to_its_highest_priority_identifier_after_drops() {
    let mut g = Graph::new();
    let a = g.ok("e1", &[("user_id", "u1"), ("email", "x@shop.com")]);
    let b = g.ok("e2", &[("user_id", "u2"), ("anonymous_id", "anon-9")]);
    // email links to u1, anonymous_id to u2: the lower-priority anonymous id
    // is dropped first, then everything left fits into u1's profile.
    let o = g.ok("e3", &[("anonymous_id", "anon-9"), ("email", "x@shop.com"), ("user_id", "u1")]);
    assert_eq!(o.profile_id, a.profile_id);
    assert_eq!(o.conflicts.len(), 1);
    assert_eq!(o.conflicts[0].identifier.kind, "anonymous_id");
    assert_eq!(g.profile_of("anonymous_id", "anon-9").id, b.profile_id);
}

#[test]
fn an_identifier_whose_profile_is_joined_anyway_is_not_reported_as_dropped() {
    let mut g = Graph::new();
    // P holds three phones; R (newer) holds an e-mail, a device and two phones.
    let p = g.ok("e1", &[("user_id", "u"), ("phone", "2125550001"), ("phone", "2125550002"), ("phone", "2125550003")]);
    let r = g.ok("e2", &[("email", "r@shop.com"), ("device_id", "d"), ("phone", "2125550004"), ("phone", "2125550005")]);
    // Joining P and R plus a sixth phone breaks the phone limit (5). The
    // device is dropped first, but R is still joined through the e-mail, so
    // dropping it changes nothing: only the new phone is a conflict.
    let o = g.ok("e3", &[("user_id", "u"), ("email", "r@shop.com"), ("phone", "2125550006"), ("device_id", "d")]);
    assert_eq!(o.profile_id, p.profile_id);
    assert_eq!(o.merged_profile_ids, vec![r.profile_id]);
    assert_eq!(o.conflicts.len(), 1, "{:?}", o.conflicts);
    assert_eq!(o.conflicts[0].identifier, Identifier::new("phone", "12125550006"));
    assert_eq!(o.conflicts[0].kept_in, None);
    assert!(g.store.hub(&Identifier::new("device_id", "d")).unwrap().is_none(), "no hub strike against a value that was merged");
    assert_eq!(g.profile_of("device_id", "d").id, p.profile_id);
}

#[test]
fn blocked_and_invalid_identifiers_are_reported_and_skipped() {
    let mut g = Graph::new();
    let o =
        g.ok("e1", &[("email", "test@test.com"), ("user_id", "null"), ("phone", "12"), ("anonymous_id", "a-1"), ("anonymous_id", " a-1")]);
    let reasons: Vec<_> = o.ignored.iter().map(|i| i.reason).collect();
    assert_eq!(reasons, vec![IgnoredReason::Blocked, IgnoredReason::Blocked, IgnoredReason::Invalid, IgnoredReason::Duplicate]);
    assert_eq!(g.profile_of("anonymous_id", "a-1").identifiers.len(), 1);
}

#[test]
fn bad_events_are_refused_with_the_field_named_and_change_nothing() {
    let mut g = Graph::new();
    let long = "x".repeat(MAX_VALUE_BYTES + 1);
    let many: Vec<(String, String)> = (0..65).map(|i| ("anonymous_id".to_string(), format!("a{i}"))).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("", vec![("email", "a@b.co")], "event_id"),
        ("e", vec![], "identifiers"),
        ("e", vec![("shoe_size", "42")], "identifiers[0].type"),
        ("e", vec![("email", "a@b.co"), ("email", long.as_str())], "identifiers[1].value"),
        ("e", many, "identifiers"),
        ("e", vec![("user_id", "null"), ("email", "test@test.com")], "identifiers"),
    ];
    for (eid, ids, field) in cases {
        match g.event(eid, 0, &ids, json!({})) {
            Err(EngineError::InvalidArgument { field: f, .. }) => assert_eq!(f, field),
            other => panic!("{field}: expected InvalidArgument, got {other:?}"),
        }
    }
    assert!(g.store.all_profiles().unwrap().is_empty());
    assert_eq!(g.store.counters().unwrap(), Default::default());
    match g.event("e", -5, &[("email", "a@b.co")], json!({})) {
        Err(EngineError::InvalidArgument { field, .. }) => assert_eq!(field, "timestamp_ms"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unknown_types_can_be_ignored_by_policy() {
    let text = crate::rules::BUILTIN_RULES_TOML.replace("unknown_types = \"reject\"", "unknown_types = \"ignore\"");
    let mut g = Graph::with_rules(RuleSet::from_toml(&text).unwrap());
    let o = g.ok("e1", &[("shoe_size", "42"), ("email", "d@shop.com")]);
    assert_eq!(o.ignored[0].reason, IgnoredReason::UnknownType);
}

#[test]
fn traits_merge_by_event_time_with_per_trait_policies() {
    let mut g = Graph::new();
    g.event("e2", 2000, &[("email", "t@shop.com")], json!({"plan": "pro", "orders": 3, "tags": ["a"], "first_seen_at": "B"})).unwrap();
    g.event("e1", 1000, &[("email", "t@shop.com")], json!({"plan": "free", "orders": 7, "tags": "b", "first_seen_at": "A"})).unwrap();
    let p = g.profile_of("email", "t@shop.com");
    let v = |k: &str| p.traits[k].value.clone();
    assert_eq!(v("plan"), json!("pro"), "last write wins by event time, not arrival");
    assert_eq!(v("orders"), json!(7), "max");
    assert_eq!(v("tags"), json!(["a", "b"]), "union");
    assert_eq!(v("first_seen_at"), json!("A"), "first");
}

#[test]
fn hub_value_is_listed_after_colliding_with_many_profiles_and_stops_merging() {
    let mut g = Graph::new();
    g.ok("e0", &[("user_id", "owner"), ("device_id", "family-tablet")]);
    let threshold = g.rules.hub_threshold();
    for i in 0..threshold {
        let o = g.ok(&format!("e{}", i + 1), &[("user_id", &format!("kid{i}")), ("device_id", "family-tablet")]);
        assert_eq!(o.conflicts[0].kind, ConflictKind::TypeLimit);
    }
    let hubs = g.store.listed_hubs(10).unwrap();
    assert_eq!(hubs.len(), 1);
    assert_eq!(hubs[0].0, Identifier::new("device_id", "family-tablet"));
    assert!(hubs[0].1.reason.contains("user_id limit"), "{}", hubs[0].1.reason);
    // Now it no longer links, even where no limit would bite.
    let anon = g.ok("e-anon", &[("anonymous_id", "anon-z")]);
    let o = g.ok("e-last", &[("anonymous_id", "anon-z"), ("device_id", "family-tablet")]);
    assert_eq!(o.profile_id, anon.profile_id);
    assert!(o.merge_id.is_none());
    assert_eq!(o.conflicts[0].kind, ConflictKind::Hub);
    assert_eq!(g.store.counters().unwrap().hubs, 1);
}

#[test]
fn operator_merge_is_refused_when_it_breaks_a_limit_unless_forced() {
    let mut g = Graph::new();
    let a = g.ok("e1", &[("user_id", "u1")]);
    let b = g.ok("e2", &[("user_id", "u2")]);
    match g.merge(idref("user_id", "u1"), idref("user_id", "u2"), false) {
        Err(EngineError::FailedPrecondition { limit, reason }) => {
            assert_eq!(limit.as_deref(), Some("user_id"));
            assert!(reason.contains("user_id limit"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_ne!(g.profile_of("user_id", "u1").id, g.profile_of("user_id", "u2").id);
    let m = g.merge(ProfileRef::ProfileId(b.profile_id.clone()), ProfileRef::ProfileId(a.profile_id.clone()), true).unwrap();
    assert_eq!(m.profile_id, a.profile_id);
    assert_eq!(m.forced_limits.len(), 1);
    assert!(find_merge(&g.store, m.merge_id.as_deref().unwrap()).unwrap().forced);
}

#[test]
fn unmerge_by_merge_id_restores_the_absorbed_profile_exactly() {
    let mut g = Graph::new();
    let a = g.event("e1", 1000, &[("anonymous_id", "anon-1")], json!({"plan": "free"})).unwrap();
    let b = g.event("e2", 2000, &[("email", "bo@shop.com"), ("phone", "555 010 4444")], json!({"city": "Oslo"})).unwrap();
    let before_b = g.store.profile(&b.profile_id).unwrap().unwrap();
    let m = g.ok("e3", &[("email", "bo@shop.com"), ("anonymous_id", "anon-1")]);
    // A later event adds an identifier to the merged profile.
    g.ok("e4", &[("email", "bo@shop.com"), ("device_id", "phone-7")]);
    let u = g.unmerge(UnmergeTarget::MergeId(m.merge_id.clone().unwrap())).unwrap();
    assert_eq!(u.profile_id, a.profile_id);
    assert_eq!(u.new_profile_ids, vec![b.profile_id.clone()]);
    assert_eq!(u.identifiers_moved, 2);
    let restored = g.store.profile(&b.profile_id).unwrap().unwrap();
    assert_eq!(restored.identifiers, before_b.identifiers);
    assert_eq!(restored.traits, before_b.traits);
    assert_eq!(restored.created_ms, before_b.created_ms);
    let survivor = g.profile_of("anonymous_id", "anon-1");
    assert_eq!(survivor.id, a.profile_id);
    assert!(survivor.holds(&Identifier::new("device_id", "phone-7")), "identifiers added after the merge stay");
    assert!(survivor.merged_from.is_empty());
    assert!(g.store.alias(&b.profile_id).unwrap().is_none());
    assert!(matches!(g.unmerge(UnmergeTarget::MergeId(m.merge_id.unwrap())), Err(EngineError::FailedPrecondition { .. })));
}

#[test]
fn unmerge_by_identifiers_splits_them_into_a_new_profile() {
    let mut g = Graph::new();
    let o = g.ok("e1", &[("email", "s@shop.com"), ("device_id", "d1"), ("device_id", "d2")]);
    let u = g
        .unmerge(UnmergeTarget::Split { profile_id: o.profile_id.clone(), identifiers: vec![RawIdentifier::new("device_id", "D2")] })
        .unwrap();
    assert_eq!(u.identifiers_moved, 1);
    assert_eq!(g.profile_of("device_id", "d2").id, u.new_profile_ids[0]);
    assert_eq!(g.profile_of("device_id", "d1").id, o.profile_id);
    let all = UnmergeTarget::Split {
        profile_id: o.profile_id.clone(),
        identifiers: vec![RawIdentifier::new("device_id", "d1"), RawIdentifier::new("email", "s@shop.com")],
    };
    assert!(matches!(g.unmerge(all), Err(EngineError::FailedPrecondition { .. })));
    let missing = UnmergeTarget::Split { profile_id: o.profile_id.clone(), identifiers: vec![RawIdentifier::new("device_id", "d9")] };
    match g.unmerge(missing) {
        Err(EngineError::FailedPrecondition { reason, .. }) => assert!(reason.contains("split.identifiers[0]"), "{reason}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn delete_erases_the_profile_and_frees_its_identifiers() {
    let mut g = Graph::new();
    let a = g.ok("e1", &[("email", "gone@shop.com")]);
    let b = g.ok("e2", &[("phone", "555 010 9876")]);
    let m = g.ok("e3", &[("email", "gone@shop.com"), ("phone", "555 010 9876")]);
    let out = match g.run(CommandKind::Delete(idref("phone", "+1 555 010 9876"))).unwrap() {
        Outcome::Delete(d) => d,
        other => panic!("{other:?}"),
    };
    assert_eq!(out.profile_id, a.profile_id);
    assert_eq!(out.identifiers_erased, 2);
    assert_eq!(out.merge_records_erased, 1);
    for pid in [&a.profile_id, &b.profile_id] {
        assert!(resolve_profile_id(&g.store, pid).unwrap().is_none());
    }
    assert!(g.store.merge_record(m.merge_id.as_deref().unwrap()).unwrap().is_none());
    assert!(g.store.owner(&Identifier::new("email", "gone@shop.com")).unwrap().is_none());
    let again = g.ok("e4", &[("email", "gone@shop.com")]);
    assert!(again.created, "the identifier can be used again");
    // A redelivery of an erased person's event does not bring them back.
    assert!(g.ok("e1", &[("email", "gone@shop.com")]).duplicate);
}

#[test]
fn erasure_removes_every_merge_record_that_mentions_an_erased_identifier() {
    // Split case: the record of the merge that brought the e-mail in follows
    // it into the split-out profile.
    let mut g = Graph::new();
    g.ok("e1", &[("user_id", "s")]);
    g.ok("e2", &[("email", "erase-me@shop.com")]);
    let m = g.ok("e3", &[("user_id", "s"), ("email", "erase-me@shop.com")]);
    let holder = g.profile_of("user_id", "s");
    let split = UnmergeTarget::Split { profile_id: holder.id.clone(), identifiers: vec![RawIdentifier::new("email", "erase-me@shop.com")] };
    g.unmerge(split).unwrap();
    g.run(CommandKind::Delete(idref("email", "erase-me@shop.com"))).unwrap();
    assert!(g.store.merge_record(m.merge_id.as_deref().unwrap()).unwrap().is_none());

    // Undo, re-merge, undo: the first record stays in the holder's lineage.
    let mut g = Graph::new();
    g.ok("f1", &[("user_id", "t")]);
    g.ok("f2", &[("email", "a@shop.com")]);
    let m1 = g.ok("f3", &[("user_id", "t"), ("email", "a@shop.com"), ("device_id", "x1")]);
    g.unmerge(UnmergeTarget::MergeId(m1.merge_id.clone().unwrap())).unwrap();
    let m2 = g.ok("f4", &[("user_id", "t"), ("email", "a@shop.com")]);
    g.unmerge(UnmergeTarget::MergeId(m2.merge_id.clone().unwrap())).unwrap();
    g.run(CommandKind::Delete(idref("user_id", "t"))).unwrap();
    let rec = g.store.merge_record(m1.merge_id.as_deref().unwrap()).unwrap();
    assert!(rec.is_none(), "merge record naming device x1 outlived its erasure");
}

// ---- properties -------------------------------------------------------

type EventSpec = (Vec<(u8, u8)>, Vec<(u8, i32)>, i64);

fn events() -> impl Strategy<Value = Vec<EventSpec>> {
    let ids = prop::collection::vec((0u8..3, 0u8..12), 1..4);
    let traits = prop::collection::vec((0u8..4, -5i32..5), 0..3);
    prop::collection::vec((ids, traits, 1i64..50), 1..25)
}

const KINDS: [&str; 3] = ["user_id", "email", "anonymous_id"];
const TRAITS: [&str; 4] = ["plan", "orders", "tags", "first_seen_at"];

fn apply_all(g: &mut Graph, evs: &[(usize, EventSpec)]) {
    for (n, (ids, traits, ts)) in evs {
        let ids: Vec<(String, String)> = ids
            .iter()
            .map(|(k, v)| {
                let kind = KINDS[*k as usize];
                let value = if kind == "email" { format!("p{v}@shop.com") } else { format!("v{v}") };
                (kind.to_string(), value)
            })
            .collect();
        let ids: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let traits: serde_json::Map<String, serde_json::Value> =
            traits.iter().map(|(k, v)| (TRAITS[*k as usize].to_string(), json!(v))).collect();
        g.event(&format!("ev-{n}"), *ts, &ids, serde_json::Value::Object(traits)).unwrap();
    }
}

/// The partition of identifiers, each part with its traits' values.
/// One profile: its identifiers and its traits (name, value as JSON text).
type Part = (Vec<Identifier>, Vec<(String, String)>);

fn partition(g: &Graph) -> BTreeSet<Part> {
    g.store
        .all_profiles()
        .unwrap()
        .into_iter()
        .map(|p| (p.identifiers, p.traits.into_iter().map(|(k, v)| (k, v.value.to_string())).collect()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn without_limits_the_result_does_not_depend_on_event_order(evs in events(), seed in any::<u64>()) {
        let numbered: Vec<(usize, EventSpec)> = evs.into_iter().enumerate().collect();
        let mut shuffled = numbered.clone();
        let mut rng = seed;
        for i in (1..shuffled.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            shuffled.swap(i, (rng >> 33) as usize % (i + 1));
        }
        let mut a = Graph::with_rules(RuleSet::without_limits());
        let mut b = Graph::with_rules(RuleSet::without_limits());
        apply_all(&mut a, &numbered);
        apply_all(&mut b, &shuffled);
        prop_assert_eq!(partition(&a), partition(&b));
    }

    #[test]
    fn with_default_limits_invariants_hold_and_no_limit_is_broken(evs in events()) {
        let numbered: Vec<(usize, EventSpec)> = evs.into_iter().enumerate().collect();
        let mut g = Graph::new();
        apply_all(&mut g, &numbered);
        for p in g.store.all_profiles().unwrap() {
            let users = p.identifiers.iter().filter(|i| i.kind == "user_id").count();
            prop_assert!(users <= 1, "profile {} holds {} user ids", p.id, users);
        }
    }

    #[test]
    fn merged_away_ids_keep_resolving_through_merges_and_undos(evs in events(), undo_every in 1usize..4) {
        let numbered: Vec<(usize, EventSpec)> = evs.into_iter().enumerate().collect();
        let mut g = Graph::with_rules(RuleSet::without_limits());
        apply_all(&mut g, &numbered);
        let merges: Vec<String> = g.store.all_profiles().unwrap().iter().flat_map(|p| p.lineage.clone()).collect();
        for m in merges.iter().step_by(undo_every) {
            // Undoing may be refused (nothing left to undo); it must never
            // break an invariant (checked after every command).
            let _ = g.unmerge(UnmergeTarget::MergeId(m.clone()));
        }
    }
}

fn arbitrary_identifier() -> impl Strategy<Value = (String, String)> {
    let kind = prop_oneof![
        Just("email".to_string()),
        Just("phone".to_string()),
        Just("user_id".to_string()),
        Just("device_id".to_string()),
        Just(" EMAIL ".to_string()),
        "\\PC{0,70}",
    ];
    let value = prop_oneof![
        "\\PC{0,40}",
        "[0-9+() .-]{0,20}",
        "[a-zA-Z0-9._]{1,8}@[a-z]{1,6}\\.(com|io)",
        ".{1000,1100}",
        Just("null".to_string())
    ];
    (kind, value)
}

/// Event id, event time, identifiers (type, value), traits (name, number).
type ArbitraryEvent = (String, i64, Vec<(String, String)>, Vec<(String, i64)>);

fn arbitrary_event() -> impl Strategy<Value = ArbitraryEvent> {
    (
        prop_oneof!["[a-z0-9-]{1,12}", "\\PC{0,300}"],
        prop_oneof![Just(0i64), -5i64..5, 0i64..i64::MAX],
        prop::collection::vec(arbitrary_identifier(), 0..70),
        prop::collection::vec(("\\PC{0,300}", any::<i64>()), 0..4),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Any input gets an outcome or a precise error naming a field; nothing
    /// panics, and refused events change nothing.
    #[test]
    fn arbitrary_input_never_panics_and_refusals_change_nothing(evs in prop::collection::vec(arbitrary_event(), 1..12)) {
        let mut g = Graph::new();
        for (event_id, ts, ids, traits) in evs {
            let before = (g.store.all_profiles().unwrap(), g.store.counters().unwrap());
            let ids: Vec<(&str, &str)> = ids.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
            let traits: serde_json::Map<String, serde_json::Value> = traits.into_iter().map(|(k, v)| (k, json!(v))).collect();
            match g.event(&event_id, ts, &ids, serde_json::Value::Object(traits)) {
                Ok(_) => {}
                Err(EngineError::InvalidArgument { field, .. }) => {
                    prop_assert!(!field.is_empty());
                    prop_assert_eq!(before, (g.store.all_profiles().unwrap(), g.store.counters().unwrap()));
                }
                Err(other) => prop_assert!(false, "unexpected error {other:?}"),
            }
        }
    }
}

#[test]
fn new_ids_land_on_the_shard_of_what_they_are_placed_near() {
    use crate::engine::{make_id, make_id_near};
    use crate::graph::GraphKey;
    assert_eq!(
        make_id_near("p", 5, &["profile", "ev-1"], 1, &GraphKey::Owner(Identifier::new("email", "a@b.co")), GraphKey::Profile),
        make_id("p", 5, &["profile", "ev-1"]),
        "one shard: the plain id"
    );
    for shards in [2u32, 3, 16, 64, 256] {
        for n in 0..50 {
            let near = GraphKey::Owner(Identifier::new("email", format!("p{n}@b.co")));
            let seed = format!("ev-{n}");
            let p = make_id_near("p", 5, &["profile", &seed], shards, &near, GraphKey::Profile);
            assert_eq!(GraphKey::Profile(p.clone()).shard(shards), near.shard(shards), "{shards} shards: profile {p}");
            assert_eq!(p, make_id_near("p", 5, &["profile", &seed], shards, &near, GraphKey::Profile), "deterministic");
            let m = make_id_near("m", 5, &["merge", &seed], shards, &near, GraphKey::Merge);
            assert_eq!(GraphKey::Merge(m).shard(shards), near.shard(shards));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The home shard a client computes for an event is the shard the engine
    /// puts the event's dedup record on, for any identifiers of known types
    /// (invalid values, duplicates, mixed case, padding) and shard count; an
    /// event the engine refuses for want of a usable identifier has no home
    /// shard. (An event with a type the rules do not know is refused whole
    /// by the built-in rules, yet has a home shard by its other
    /// identifiers: harmless, routing sends the refusal to that leader.)
    #[test]
    fn an_events_home_shard_holds_its_dedup_record(ids in prop::collection::vec(known_type_identifier(), 1..8), shards in 1u32..64) {
        let rules = RuleSet::builtin();
        let raw: Vec<RawIdentifier> = ids.iter().map(|(k, v)| RawIdentifier::new(k.as_str(), v.as_str())).collect();
        let ev = IdentifyEvent { event_id: "ev-1".into(), timestamp_ms: 1, identifiers: raw.clone(), traits: BTreeMap::new(), source: String::new() };
        let cmd = Command { at_ms: 1, op_id: "op-1".into(), kind: CommandKind::Identify(ev) };
        let home = home_shard(&rules, &raw, shards);
        match execute(&crate::txn::ReadSet::new(shards), &rules, &cmd) {
            Ok((cs, _)) => {
                let placed: Vec<_> = cs
                    .changes
                    .iter()
                    .filter_map(|c| match c {
                        crate::model::Change::PutEvent(id, rec) => Some(GraphKey::of_event(id, rec).shard(shards)),
                        _ => None,
                    })
                    .collect();
                prop_assert_eq!(placed.len(), 1);
                prop_assert_eq!(Some(placed[0]), home);
            }
            Err(EngineError::InvalidArgument { .. }) => prop_assert!(home.is_none()),
            Err(other) => prop_assert!(false, "unexpected error {other:?}"),
        }
    }
}

/// An identifier of a type the built-in rules know (written in any case,
/// padded), with a value that may or may not normalise.
fn known_type_identifier() -> impl Strategy<Value = (String, String)> {
    let kind = prop_oneof![Just("email"), Just(" EMAIL "), Just("phone"), Just("user_id"), Just("Device_Id"), Just("anonymous_id")];
    let value = prop_oneof!["[a-zA-Z0-9._]{1,8}@[a-z]{1,6}\\.(com|io)", "[0-9+() .-]{0,20}", "[a-z0-9]{1,12}", Just("null".to_string())];
    (kind.prop_map(String::from), value)
}
