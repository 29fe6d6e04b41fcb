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
    /// The whole world in memory: every event, every person and the truth
    /// (what workloads that look identifiers up and score profiles need).
    pub fn generate(spec: &WorldSpec) -> World {
        let mut stream = EventStream::new(spec).keeping_truth();
        let events: Vec<Event> = stream.by_ref().collect();
        let (persons, truth) = stream.kept.take().unwrap_or_default();
        World { spec: spec.clone(), persons, events, truth }
    }

    /// Identifiers in the world.
    pub fn identifier_count(&self) -> usize {
        self.truth.len()
    }
}

/// Events of a world jitter by up to this many places from the order they
/// were generated in: persons shop at the same time, each person's events
/// stay roughly in order.
pub const INTERLEAVE: u64 = 2_000;

/// A world's events in delivery order, generated person by person as they
/// are taken: memory holds the events of about [`INTERLEAVE`] places, not
/// the world, so an ingest-only run can go to any size. [`World::generate`]
/// collects the same stream.
pub struct EventStream {
    spec: WorldSpec,
    rng: fastrand::Rng,
    rules: RuleSet,
    /// The next person to generate.
    next_person: usize,
    /// The household being generated: the person after its last, and its
    /// family tablet.
    household_end: usize,
    tablet: Option<String>,
    /// Events generated so far (redeliveries included): each one's place
    /// before the jitter.
    generated: u64,
    /// Event ids given out.
    event_ids: u64,
    /// Generated events not yet delivered, by delivery place.
    pending: std::collections::BinaryHeap<std::cmp::Reverse<Placed>>,
    /// Identifiers with an owner among the persons generated.
    owned: usize,
    /// With [`EventStream::keeping_truth`]: the persons and the truth.
    kept: Option<(Vec<Person>, HashMap<String, usize>)>,
}

/// An event with its delivery place: its generated place plus a jitter, ties
/// in generated order.
struct Placed {
    at: u64,
    seq: u64,
    event: Event,
}

impl PartialEq for Placed {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Placed {}
impl PartialOrd for Placed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Placed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl EventStream {
    pub fn new(spec: &WorldSpec) -> EventStream {
        EventStream {
            spec: spec.clone(),
            rng: fastrand::Rng::with_seed(spec.seed),
            rules: RuleSet::builtin(),
            next_person: 0,
            household_end: 0,
            tablet: None,
            generated: 0,
            event_ids: 0,
            pending: std::collections::BinaryHeap::new(),
            owned: 0,
            kept: None,
        }
    }

    /// Also keeps every person and the truth (memory grows with the world).
    pub fn keeping_truth(mut self) -> EventStream {
        self.kept = Some((Vec::new(), HashMap::new()));
        self
    }

    /// Events generated and not yet delivered.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Identifiers with an owner among the persons generated so far (the
    /// world's [`World::identifier_count`] once the stream has ended).
    pub fn identifiers_with_owner(&self) -> usize {
        self.owned
    }

    /// The stream cut into `parts` consecutive parts of about as many
    /// persons each (the last holds what is left); empty parts are skipped.
    pub fn parts(&mut self, parts: usize) -> impl Iterator<Item = Vec<Event>> + '_ {
        let parts = parts.max(1);
        let persons = self.spec.persons;
        (1..=parts).filter_map(move |k| {
            let boundary = persons * k / parts;
            let mut part = Vec::new();
            loop {
                while let Some(e) = self.pop_delivered() {
                    part.push(e);
                }
                if self.next_person >= boundary || !self.generate_person() {
                    break;
                }
            }
            (!part.is_empty()).then_some(part)
        })
    }

    /// The next event whose delivery place no event still to be generated
    /// can come before.
    fn pop_delivered(&mut self) -> Option<Event> {
        let done = self.next_person >= self.spec.persons;
        match self.pending.peek() {
            Some(std::cmp::Reverse(p)) if done || p.at <= self.generated => self.pending.pop().map(|std::cmp::Reverse(p)| p.event),
            _ => None,
        }
    }

    /// Generates the next person's events into `pending`; false when every
    /// person has been generated.
    fn generate_person(&mut self) -> bool {
        let p = self.next_person;
        if p >= self.spec.persons {
            return false;
        }
        self.next_person += 1;
        let rng = &mut self.rng;
        // Households of one to four consecutive persons; a third of those
        // with two or more share a family tablet.
        if p >= self.household_end {
            let size = rng.usize(1..=4);
            self.tablet = (size > 1 && rng.u8(0..3) == 0).then(|| format!("tablet-{p:x}"));
            self.household_end = p + size;
        }
        let person = person(rng, p, self.spec.skew);
        let mut events = Vec::new();
        for (s, session) in person.sessions.iter().enumerate() {
            let device = &person.devices[s % person.devices.len()];
            let device_seen = variant_case(rng, device);
            events.push(vec![raw("anonymous_id", session), raw("device_id", &device_seen)]);
            if s == 0 {
                if let Some(email) = person.emails.first() {
                    let email_seen = variant_case(rng, email);
                    events.push(vec![raw("email", &email_seen), raw("anonymous_id", session)]);
                }
            }
            if rng.u8(0..2) == 0 {
                let mut ids = vec![raw("user_id", &person.user_id), raw("device_id", device), raw("anonymous_id", session)];
                if let Some(tablet) = self.tablet.as_ref().filter(|_| rng.u8(0..4) == 0) {
                    ids.push(raw("device_id", tablet));
                }
                if rng.u8(0..50) == 0 {
                    let (kind, value) = PLACEHOLDERS[rng.usize(0..PLACEHOLDERS.len())];
                    ids.push(raw(kind, value));
                }
                events.push(ids);
            }
        }
        for (i, email) in person.emails.iter().enumerate() {
            let mut ids = vec![raw("user_id", &person.user_id), raw("email", &variant_case(rng, email))];
            if let Some(phone) = person.phones.get(i) {
                ids.push(raw("phone", &variant_phone(rng, phone)));
            }
            events.push(ids);
        }
        // The person's own identifiers that its events send are its truth
        // (nobody else's events carry them).
        let rules = &self.rules;
        let sent: std::collections::HashSet<String> =
            events.iter().flatten().filter_map(|id| normalized_key(rules, id.kind, &id.value)).collect();
        let mut own: Vec<(&str, &String)> = vec![("user_id", &person.user_id)];
        own.extend(person.emails.iter().map(|v| ("email", v)));
        own.extend(person.phones.iter().map(|v| ("phone", v)));
        own.extend(person.devices.iter().map(|v| ("device_id", v)));
        own.extend(person.sessions.iter().map(|v| ("anonymous_id", v)));
        let truth: std::collections::HashSet<String> =
            own.into_iter().filter_map(|(kind, value)| normalized_key(rules, kind, value)).filter(|k| sent.contains(k)).collect();
        self.owned += truth.len();
        for ids in events {
            self.event_ids += 1;
            let event = Event { event_id: format!("e{}-{}", self.spec.seed, self.event_ids), ids };
            if self.rng.f64() < self.spec.redelivery {
                self.place(event.clone());
            }
            self.place(event);
        }
        if let Some((persons, all)) = &mut self.kept {
            all.extend(truth.into_iter().map(|k| (k, p)));
            persons.push(person);
        }
        true
    }

    fn place(&mut self, event: Event) {
        let seq = self.generated;
        self.generated += 1;
        let at = seq + self.rng.u64(0..INTERLEAVE);
        self.pending.push(std::cmp::Reverse(Placed { at, seq, event }));
    }
}

impl Iterator for EventStream {
    type Item = Event;

    fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pop_delivered() {
                return Some(e);
            }
            if !self.generate_person() {
                return None;
            }
        }
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
    fn a_world_streamed_in_parts_is_the_world_generated_whole_with_few_events_held_at_once() {
        let spec = WorldSpec { persons: 4_000, seed: 5, skew: 0.01, redelivery: 0.05 };
        let whole = World::generate(&spec);
        let mut stream = EventStream::new(&spec);
        let mut streamed = Vec::new();
        let mut sizes = Vec::new();
        for part in stream.parts(7) {
            sizes.push(part.len());
            streamed.extend(part);
        }
        assert_eq!(streamed.len(), whole.events.len());
        assert!(
            streamed.iter().zip(&whole.events).all(|(x, y)| x.event_id == y.event_id && x.ids == y.ids),
            "the same events in the same order"
        );
        assert_eq!(stream.identifiers_with_owner(), whole.identifier_count());
        assert_eq!(stream.pending(), 0, "every generated event was delivered");
        // Seven parts of about 570 persons (about 4,000 events) each.
        assert_eq!(sizes.len(), 7, "{sizes:?}");
        let mean = whole.events.len() / 7;
        assert!(sizes.iter().all(|s| s.abs_diff(mean) < mean / 3), "{sizes:?}");
        // Taken one by one, the stream holds about INTERLEAVE events, not the world.
        let mut one_by_one = EventStream::new(&spec);
        let mut held = 0;
        while one_by_one.next().is_some() {
            held = held.max(one_by_one.pending());
        }
        assert!(held > 0 && held < INTERLEAVE as usize + 1_000, "held {held} of {} events", whole.events.len());
        // Delivery interleaves persons: some event comes before one generated earlier.
        let seq = |e: &Event| e.event_id.rsplit('-').next().unwrap().parse::<u64>().unwrap();
        assert!(whole.events.windows(2).any(|w| seq(&w[0]) > seq(&w[1])));
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
