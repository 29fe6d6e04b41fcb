//! The graph's invariants as checks that every test checking a graph uses:
//! the engine's tests over one store, the transaction tests over in-memory
//! shards, and the chaos harness over the profiles a cluster returns.
//!
//! The invariants (the engine's module essay states why they hold):
//! 1. a live profile lists at least one identifier;
//! 2. no identifier is listed by two live profiles;
//! 3. an identifier listed by a profile resolves to that profile, and
//!    every owner entry belongs to an identifier some profile lists;
//! 4. no profile holds more identifiers in all than the rules allow, nor,
//!    unless an operator forced a merge ([`TypeLimits`]), more of a type;
//! 5. a merged-away profile id resolves to the live profile that lists it
//!    in `merged_from`;
//! 6. the counters agree with the live profiles.
//!
//! A check returns the violations it found, each a sentence naming the
//! profile and, redacted, the identifier; an empty list means the graph
//! holds. Nothing here panics, so a harness can report instead of abort.

use crate::engine::resolve_profile_id;
use crate::graph::{GraphRead, StoreError};
use crate::model::{Identifier, ProfileId};
use crate::rules::RuleSet;
use std::collections::BTreeMap;

/// Whether per-type limits must hold: an operator's forced merge may
/// break them on purpose (the engine refuses every unforced change that
/// would).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TypeLimits {
    Held,
    MayBeForced,
}

/// One live profile as a check sees it: its id and the identifiers it lists.
pub type Listing = (ProfileId, Vec<Identifier>);

/// Invariants 1 to 4 over live profiles. `owner_of` tells which profile an
/// identifier resolves to: `Some(None)` for none, and `None` where the
/// caller does not know (that part of invariant 3 is then not checked for
/// it). `limit_of` gives a type's limit, if any.
pub fn listings(
    profiles: &[Listing],
    owner_of: impl Fn(&Identifier) -> Option<Option<ProfileId>>,
    limit_of: impl Fn(&str) -> Option<usize>,
    max_per_profile: Option<usize>,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut listed_by: BTreeMap<&Identifier, &ProfileId> = BTreeMap::new();
    for (pid, ids) in profiles {
        if ids.is_empty() {
            out.push(format!("live profile {pid} lists no identifier"));
        }
        if let Some(max) = max_per_profile.filter(|max| ids.len() > *max) {
            out.push(format!("profile {pid} holds {} identifiers (at most {max} allowed)", ids.len()));
        }
        let mut per_type: BTreeMap<&str, usize> = BTreeMap::new();
        for id in ids {
            *per_type.entry(id.kind.as_str()).or_default() += 1;
            if let Some(other) = listed_by.insert(id, pid) {
                out.push(format!("{} is listed by live profiles {other} and {pid}", id.redacted()));
            }
            match owner_of(id) {
                None => {}
                Some(Some(owner)) if owner == *pid => {}
                Some(Some(owner)) => out.push(format!("{} is listed by {pid} but resolves to {owner}", id.redacted())),
                Some(None) => out.push(format!("{} is listed by {pid} but resolves to no profile", id.redacted())),
            }
        }
        for (kind, n) in per_type {
            if let Some(limit) = limit_of(kind).filter(|limit| n > *limit) {
                out.push(format!("profile {pid} holds {n} identifiers of type {kind} (limit {limit})"));
            }
        }
    }
    out
}

/// Every invariant over a whole graph read through `g`, which holds
/// `owner_entries` owner entries in all (a store counts them; the read
/// trait has no scan of them).
pub fn graph<R: GraphRead + ?Sized>(
    g: &R,
    owner_entries: usize,
    rules: &RuleSet,
    type_limits: TypeLimits,
) -> Result<Vec<String>, StoreError> {
    let profiles = g.all_profiles()?;
    let mut owners: BTreeMap<Identifier, Option<ProfileId>> = BTreeMap::new();
    for id in profiles.iter().flat_map(|p| &p.identifiers) {
        owners.insert(id.clone(), g.owner(id)?);
    }
    let listed: Vec<Listing> = profiles.iter().map(|p| (p.id.clone(), p.identifiers.clone())).collect();
    let mut out = listings(
        &listed,
        |id| owners.get(id).cloned(),
        |kind| rules.limit(kind).filter(|_| type_limits == TypeLimits::Held).map(|l| l as usize),
        Some(rules.max_identifiers_per_profile() as usize),
    );
    let listed_count: usize = listed.iter().map(|(_, ids)| ids.len()).sum();
    if owner_entries != listed_count {
        out.push(format!(
            "{owner_entries} owner entries for {listed_count} listed identifiers: an identifier points at a profile that does not list it"
        ));
    }
    for p in &profiles {
        for m in &p.merged_from {
            match resolve_profile_id(g, m) {
                Ok(Some(f)) if f.profile.id == p.id => {}
                Ok(Some(f)) => out.push(format!("merged-away {m} of {} resolves to {}", p.id, f.profile.id)),
                Ok(None) => out.push(format!("merged-away {m} of {} resolves to nothing", p.id)),
                Err(e) => out.push(format!("merged-away {m} of {} does not resolve: {e}", p.id)),
            }
        }
    }
    let c = g.counters()?;
    if c.profiles != profiles.len() as i64 {
        out.push(format!("the profile counter says {}, {} profiles are live", c.profiles, profiles.len()));
    }
    if c.identifiers != listed_count as i64 {
        out.push(format!("the identifier counter says {}, {listed_count} identifiers are listed", c.identifiers));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(kind: &str, value: &str) -> Identifier {
        Identifier::new(kind, value)
    }

    #[test]
    fn each_broken_invariant_is_reported_and_a_sound_listing_is_not() {
        let sound = vec![("p1".to_string(), vec![id("email", "a"), id("user_id", "1")]), ("p2".to_string(), vec![id("email", "b")])];
        let owner = |i: &Identifier| Some(Some(if i.value == "b" { "p2".to_string() } else { "p1".to_string() }));
        assert!(listings(&sound, owner, |_| Some(1), Some(2)).is_empty());

        let shared = vec![("p1".to_string(), vec![id("email", "a")]), ("p2".to_string(), vec![id("email", "a")])];
        let found = listings(&shared, |_| None, |_| None, None);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("listed by live profiles p1 and p2"));

        let over = vec![("p1".to_string(), vec![id("user_id", "1"), id("user_id", "2"), id("email", "a")])];
        let found = listings(&over, |_| None, |kind| (kind == "user_id").then_some(1), Some(2));
        assert_eq!(found.len(), 2, "{found:?}");

        let stray = vec![("p1".to_string(), vec![id("email", "a")]), ("p2".to_string(), vec![])];
        let found = listings(&stray, |_| Some(Some("p9".to_string())), |_| None, None);
        assert!(found.iter().any(|f| f.contains("resolves to p9")), "{found:?}");
        assert!(found.iter().any(|f| f.contains("p2 lists no identifier")), "{found:?}");
        assert!(found.iter().all(|f| !f.contains(":a") && !f.contains("\"a\"")), "values stay redacted: {found:?}");
    }
}
