//! A generated world of persons and the events their identifiers arrive
//! in, with the ground truth: which person each identifier belongs to.
//!
//! Each person has a user id, one to three e-mails, zero to two phones, one
//! to three devices, and anonymous sessions. The events are the ones a shop
//! sees:
//! - **browsing**: an anonymous session on a device;
//! - **newsletter sign-ups**: an e-mail with a session;
//! - **logins**: the user id with a device and a session, which link the
//!   person's devices;
//! - **orders**: the user id with an e-mail and a phone.
//!
//! The data is as messy as real feeds:
//! - values arrive in case and format variants (`Ann.Lee@Shop.COM`,
//!   `(555) 013-2211`);
//! - placeholders such as `unknown` and `test@test.com` are shared by many
//!   persons (the rules block them);
//! - some households share a family device;
//! - some events are delivered twice with the same event id.
//!
//! Two knobs shape the world. `skew` gives a few persons very many sessions
//! and devices (very large profiles). `persons` scales it from thousands to
//! millions (about seven identifiers per person).
//!
//! The truth is kept per normalised identifier. A shared family device or
//! a placeholder belongs to no one, and is left out of the accuracy
//! counts.

use idgraph_core::rules::RuleSet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The knobs of a world.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorldSpec {
    pub persons: usize,
    pub seed: u64,
    /// Share of persons (0 to 1) who get twenty times the usual sessions
    /// and devices.
    pub skew: f64,
    /// Share of events delivered twice.
    pub redelivery: f64,
}

impl Default for WorldSpec {
    fn default() -> Self {
        WorldSpec { persons: 10_000, seed: 1, skew: 0.001, redelivery: 0.02 }
    }
}

/// An identifier as sent: type and raw value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RawId {
    pub kind: &'static str,
    pub value: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub event_id: String,
    pub ids: Vec<RawId>,
}

/// Identifiers of one person, as first generated (canonical spelling).
#[derive(Clone, Debug, Default)]
pub struct Person {
    pub user_id: String,
    pub emails: Vec<String>,
    pub phones: Vec<String>,
    pub devices: Vec<String>,
    pub sessions: Vec<String>,
}

pub struct World {
    pub spec: WorldSpec,
    pub persons: Vec<Person>,
    /// In delivery order, redeliveries included.
    pub events: Vec<Event>,
    /// Normalised `type:value` of every identifier sent to the person it
    /// belongs to; shared values (family devices, placeholders) are absent.
    pub truth: HashMap<String, usize>,
}

const FIRST: [&str; 12] = ["ann", "bo", "carla", "dev", "eli", "fatima", "gus", "hana", "ivo", "jun", "kai", "lena"];
const DOMAINS: [&str; 5] = ["shop.com", "mail.net", "post.org", "inbox.io", "web.de"];
const PLACEHOLDERS: [(&str, &str); 4] =
    [("email", "test@test.com"), ("device_id", "unknown"), ("phone", "0000000000"), ("anonymous_id", "undefined")];

impl World {
    pub fn generate(spec: &WorldSpec) -> World {
        let mut rng = fastrand::Rng::with_seed(spec.seed);
        let persons: Vec<Person> = (0..spec.persons).map(|p| person(&mut rng, p, spec.skew)).collect();
        // Households of two to four consecutive persons; a third of them
        // share a family tablet.
        let mut family_device: HashMap<usize, String> = HashMap::new();
        let mut p = 0;
        while p < spec.persons {
            let size = rng.usize(1..=4);
            if size > 1 && rng.u8(0..3) == 0 {
                for member in p..(p + size).min(spec.persons) {
                    family_device.insert(member, format!("tablet-{p:x}"));
                }
            }
            p += size;
        }
        let mut events = Vec::new();
        let mut n = 0u64;
        let mut push = |events: &mut Vec<Event>, rng: &mut fastrand::Rng, ids: Vec<RawId>| {
            n += 1;
            let e = Event { event_id: format!("e{}-{n}", spec.seed), ids };
            if rng.f64() < spec.redelivery {
                events.push(e.clone());
            }
            events.push(e);
        };
        for (p, person) in persons.iter().enumerate() {
            for (s, session) in person.sessions.iter().enumerate() {
                let device = &person.devices[s % person.devices.len()];
                let device_seen = variant_case(&mut rng, device);
                push(&mut events, &mut rng, vec![raw("anonymous_id", session), raw("device_id", &device_seen)]);
                if s == 0 {
                    if let Some(email) = person.emails.first() {
                        let email_seen = variant_case(&mut rng, email);
                        push(&mut events, &mut rng, vec![raw("email", &email_seen), raw("anonymous_id", session)]);
                    }
                }
                if rng.u8(0..2) == 0 {
                    let mut ids = vec![raw("user_id", &person.user_id), raw("device_id", device), raw("anonymous_id", session)];
                    if let Some(tablet) = family_device.get(&p).filter(|_| rng.u8(0..4) == 0) {
                        ids.push(raw("device_id", tablet));
                    }
                    if rng.u8(0..50) == 0 {
                        let (kind, value) = PLACEHOLDERS[rng.usize(0..PLACEHOLDERS.len())];
                        ids.push(raw(kind, value));
                    }
                    push(&mut events, &mut rng, ids);
                }
            }
            for (i, email) in person.emails.iter().enumerate() {
                let mut ids = vec![raw("user_id", &person.user_id), raw("email", &variant_case(&mut rng, email))];
                if let Some(phone) = person.phones.get(i) {
                    ids.push(raw("phone", &variant_phone(&mut rng, phone)));
                }
                push(&mut events, &mut rng, ids);
            }
        }
        // Persons shop at the same time: interleave, keeping each person's
        // events roughly in order.
        let mut keyed: Vec<(u64, Event)> = events.into_iter().enumerate().map(|(i, e)| (i as u64 + rng.u64(0..2_000), e)).collect();
        keyed.sort_by_key(|(k, _)| *k);
        let events: Vec<Event> = keyed.into_iter().map(|(_, e)| e).collect();

        let rules = RuleSet::builtin();
        let mut truth = HashMap::new();
        for (p, person) in persons.iter().enumerate() {
            let mut own: Vec<(&str, &String)> = vec![("user_id", &person.user_id)];
            own.extend(person.emails.iter().map(|v| ("email", v)));
            own.extend(person.phones.iter().map(|v| ("phone", v)));
            own.extend(person.devices.iter().map(|v| ("device_id", v)));
            own.extend(person.sessions.iter().map(|v| ("anonymous_id", v)));
            for (kind, value) in own {
                if let Some(key) = normalized_key(&rules, kind, value) {
                    truth.insert(key, p);
                }
            }
        }
        // Only what was sent can be found.
        let sent: std::collections::HashSet<String> =
            events.iter().flat_map(|e| e.ids.iter()).filter_map(|id| normalized_key(&rules, id.kind, &id.value)).collect();
        truth.retain(|k, _| sent.contains(k));
        World { spec: spec.clone(), persons, events, truth }
    }

    /// Identifiers in the world.
    pub fn identifier_count(&self) -> usize {
        self.truth.len()
    }
}

fn raw(kind: &'static str, value: &str) -> RawId {
    RawId { kind, value: value.to_string() }
}

fn person(rng: &mut fastrand::Rng, p: usize, skew: f64) -> Person {
    let big = rng.f64() < skew;
    let name = format!("{}.{}{p}", FIRST[p % FIRST.len()], FIRST[(p / 7) % FIRST.len()]);
    let sessions = if big { rng.usize(40..120) } else { rng.usize(1..5) };
    let devices = if big { rng.usize(5..10) } else { rng.usize(1..=3) };
    Person {
        user_id: format!("u{p:07}"),
        emails: (0..rng.usize(1..=3))
            .map(|i| format!("{name}{}@{}", if i == 0 { String::new() } else { i.to_string() }, DOMAINS[(p + i) % DOMAINS.len()]))
            .collect(),
        // 10-digit US numbers (area 212 to 911), never a blocked pattern.
        phones: (0..rng.usize(0..=2)).map(|i| format!("{}{:07}", 212 + (p + i) % 700, (p * 7 + i * 13) % 9_000_000 + 1_000_000)).collect(),
        devices: (0..devices).map(|d| format!("dev-{p:x}-{d}")).collect(),
        sessions: (0..sessions).map(|s| format!("anon-{p:x}-{s}")).collect(),
    }
}

/// Upper-cases the first letter now and then, as some sources do.
fn variant_case(rng: &mut fastrand::Rng, v: &str) -> String {
    match rng.u8(0..6) {
        0 => v.to_uppercase(),
        1 => {
            let mut c = v.chars();
            c.next().map(|f| f.to_uppercase().chain(c).collect()).unwrap_or_default()
        }
        _ => v.to_string(),
    }
}

/// A phone written as people write it.
fn variant_phone(rng: &mut fastrand::Rng, digits: &str) -> String {
    let (a, rest) = digits.split_at(3.min(digits.len()));
    let (b, c) = rest.split_at(3.min(rest.len()));
    match rng.u8(0..4) {
        0 => format!("({a}) {b}-{c}"),
        1 => format!("+1 {a} {b} {c}"),
        2 => format!("{a}-{b}-{c}"),
        _ => digits.to_string(),
    }
}

/// Identifier types the world uses.
pub const KINDS: [&str; 5] = ["user_id", "email", "phone", "device_id", "anonymous_id"];

/// The identifier a truth key (`type:normalised value`) names, as sent.
pub fn raw_from_key(key: &str) -> Option<RawId> {
    let (kind, value) = key.split_once(':')?;
    let kind = KINDS.into_iter().find(|k| *k == kind)?;
    Some(RawId { kind, value: value.to_string() })
}

/// `type:normalised value`, or None when the rules drop the value.
pub fn normalized_key(rules: &RuleSet, kind: &str, raw: &str) -> Option<String> {
    normalized_value(rules, kind, raw).map(|v| format!("{kind}:{v}"))
}

/// The normalised value alone, or None when the rules drop it.
pub fn normalized_value(rules: &RuleSet, kind: &str, raw: &str) -> Option<String> {
    rules.normalize(rules.type_rule(kind)?, raw).ok()
}

/// Pairwise accuracy of a clustering of identifiers against the truth:
/// of all pairs of identifiers placed in one profile, the share that
/// belong to one person (precision), and of all pairs that belong to one
/// person, the share placed in one profile (recall).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Accuracy {
    pub precision: f64,
    pub recall: f64,
    pub identifiers: u64,
}

/// `placed` maps each identifier key with a known person to the profile it
/// was found in.
pub fn pairwise(truth: &HashMap<String, usize>, placed: &HashMap<String, String>) -> Accuracy {
    let pairs = |n: u64| n * n.saturating_sub(1) / 2;
    let mut cell: HashMap<(&str, usize), u64> = HashMap::new();
    let mut per_profile: HashMap<&str, u64> = HashMap::new();
    let mut per_person: HashMap<usize, u64> = HashMap::new();
    for (key, profile) in placed {
        let Some(person) = truth.get(key) else { continue };
        *cell.entry((profile.as_str(), *person)).or_default() += 1;
        *per_profile.entry(profile.as_str()).or_default() += 1;
        *per_person.entry(*person).or_default() += 1;
    }
    let together: u64 = cell.values().map(|n| pairs(*n)).sum();
    let predicted: u64 = per_profile.values().map(|n| pairs(*n)).sum();
    let actual: u64 = per_person.values().map(|n| pairs(*n)).sum();
    let ratio = |a: u64, b: u64| if b == 0 { 1.0 } else { a as f64 / b as f64 };
    Accuracy { precision: ratio(together, predicted), recall: ratio(together, actual), identifiers: per_person.values().sum() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_world_is_the_same_for_a_seed_and_its_truth_covers_what_it_sends() {
        let spec = WorldSpec { persons: 500, seed: 9, skew: 0.01, redelivery: 0.05 };
        let a = World::generate(&spec);
        let b = World::generate(&spec);
        assert_eq!(a.events.len(), b.events.len());
        assert!(a.events.iter().zip(&b.events).all(|(x, y)| x.event_id == y.event_id && x.ids == y.ids));
        let rules = RuleSet::builtin();
        let mut blocked = 0;
        let mut shared = 0;
        for e in &a.events {
            for id in &e.ids {
                match normalized_key(&rules, id.kind, &id.value) {
                    None => blocked += 1,
                    Some(k) if !a.truth.contains_key(&k) => {
                        assert!(k.starts_with("device_id:tablet-"), "{k} has no owner");
                        shared += 1;
                    }
                    Some(_) => {}
                }
            }
        }
        assert!(blocked > 0 && shared > 0, "placeholders ({blocked}) and family devices ({shared}) occur");
        let ids: std::collections::HashSet<&str> = a.events.iter().map(|e| e.event_id.as_str()).collect();
        assert!(ids.len() < a.events.len(), "some events are delivered twice");
        let big = a.persons.iter().map(|p| p.sessions.len()).max().unwrap();
        assert!(big >= 40, "the skew knob makes large profiles");
    }

    #[test]
    fn pairwise_accuracy_counts_pairs() {
        let truth: HashMap<String, usize> = [("a", 0), ("b", 0), ("c", 1), ("d", 1)].iter().map(|(k, p)| (k.to_string(), *p)).collect();
        let placed = |m: &[(&str, &str)]| m.iter().map(|(k, p)| (k.to_string(), p.to_string())).collect::<HashMap<_, _>>();
        let perfect = pairwise(&truth, &placed(&[("a", "x"), ("b", "x"), ("c", "y"), ("d", "y")]));
        assert_eq!((perfect.precision, perfect.recall), (1.0, 1.0));
        // Everything in one profile: 2 of 6 pairs right, both true pairs found.
        let merged = pairwise(&truth, &placed(&[("a", "x"), ("b", "x"), ("c", "x"), ("d", "x")]));
        assert!((merged.precision - 2.0 / 6.0).abs() < 1e-9 && merged.recall == 1.0, "{merged:?}");
        // Nothing joined: no pair claimed, none of the two true pairs found.
        let split = pairwise(&truth, &placed(&[("a", "1"), ("b", "2"), ("c", "3"), ("d", "4")]));
        assert_eq!((split.precision, split.recall), (1.0, 0.0));
    }
}
