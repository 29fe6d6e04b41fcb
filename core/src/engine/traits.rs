//! Trait policies. Each combines two trait states into one, commutatively
//! and associatively, so that the result depends on the set of events that
//! wrote a trait, never on the order in which they arrived.

use crate::model::TraitState;
use crate::rules::{RuleSet, TraitPolicy};
use serde_json::Value;
use std::cmp::Ordering;
use std::collections::BTreeMap;

/// A profile keeps at most this many traits; later new names are ignored.
pub const MAX_TRAITS_PER_PROFILE: usize = 512;
/// A `union` trait keeps at most this many values (the smallest, in the
/// value order below, so that the choice stays order independent).
pub const MAX_UNION_VALUES: usize = 256;

/// A total order over JSON values: null < bool < number < string < array <
/// object; numbers numerically, the rest by their canonical text.
fn value_cmp(a: &Value, b: &Value) -> Ordering {
    fn rank(v: &Value) -> u8 {
        match v {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Number(_) => 2,
            Value::String(_) => 3,
            Value::Array(_) => 4,
            Value::Object(_) => 5,
        }
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
            x.total_cmp(&y)
        }
        (Value::String(x), Value::String(y)) => x.cmp(y),
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        _ => rank(a).cmp(&rank(b)).then_with(|| a.to_string().cmp(&b.to_string())),
    }
}

fn when(s: &TraitState) -> (i64, &str) {
    (s.ts, s.event_id.as_str())
}

fn union_values(v: &Value) -> Vec<Value> {
    match v {
        Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    }
}

/// Combines two states of one trait under a policy.
pub fn combine(policy: TraitPolicy, a: &TraitState, b: &TraitState) -> TraitState {
    let by_time = when(a).cmp(&when(b)).then_with(|| value_cmp(&a.value, &b.value));
    let by_value = value_cmp(&a.value, &b.value).then_with(|| when(a).cmp(&when(b)));
    match policy {
        TraitPolicy::Last => {
            if by_time == Ordering::Less {
                b.clone()
            } else {
                a.clone()
            }
        }
        TraitPolicy::First => {
            if by_time == Ordering::Greater {
                b.clone()
            } else {
                a.clone()
            }
        }
        TraitPolicy::Max => {
            if by_value == Ordering::Less {
                b.clone()
            } else {
                a.clone()
            }
        }
        TraitPolicy::Min => {
            if by_value == Ordering::Greater {
                b.clone()
            } else {
                a.clone()
            }
        }
        TraitPolicy::Union => {
            let mut all = union_values(&a.value);
            all.extend(union_values(&b.value));
            all.sort_by(value_cmp);
            all.dedup();
            all.truncate(MAX_UNION_VALUES);
            let latest = if by_time == Ordering::Less { b } else { a };
            TraitState { value: Value::Array(all), ts: latest.ts, event_id: latest.event_id.clone() }
        }
    }
}

/// Writes one event's traits into a profile's traits.
pub fn apply_event(rules: &RuleSet, into: &mut BTreeMap<String, TraitState>, traits: &BTreeMap<String, Value>, ts: i64, event_id: &str) {
    for (k, v) in traits {
        let policy = rules.trait_policy(k);
        let mut incoming = TraitState { value: v.clone(), ts, event_id: event_id.to_string() };
        if policy == TraitPolicy::Union {
            let mut vals = union_values(v);
            vals.sort_by(value_cmp);
            vals.dedup();
            vals.truncate(MAX_UNION_VALUES);
            incoming.value = Value::Array(vals);
        }
        let merged = match into.get(k) {
            Some(existing) => combine(policy, existing, &incoming),
            None if into.len() >= MAX_TRAITS_PER_PROFILE => continue,
            None => incoming,
        };
        into.insert(k.clone(), merged);
    }
}

/// Joins the traits of two profiles.
pub fn merge_profiles(rules: &RuleSet, into: &mut BTreeMap<String, TraitState>, from: &BTreeMap<String, TraitState>) {
    for (k, v) in from {
        let merged = match into.get(k) {
            Some(existing) => combine(rules.trait_policy(k), existing, v),
            None if into.len() >= MAX_TRAITS_PER_PROFILE => continue,
            None => v.clone(),
        };
        into.insert(k.clone(), merged);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn st(v: Value, ts: i64, e: &str) -> TraitState {
        TraitState { value: v, ts, event_id: e.into() }
    }

    #[test]
    fn policies_table() {
        let a = st(json!(10), 100, "e1");
        let b = st(json!(3), 200, "e2");
        let cases = [
            (TraitPolicy::Last, json!(3)),
            (TraitPolicy::First, json!(10)),
            (TraitPolicy::Max, json!(10)),
            (TraitPolicy::Min, json!(3)),
            (TraitPolicy::Union, json!([3, 10])),
        ];
        for (p, want) in cases {
            assert_eq!(combine(p, &a, &b).value, want, "{p:?}");
            assert_eq!(combine(p, &b, &a).value, want, "{p:?} reversed");
        }
    }

    #[test]
    fn union_and_trait_count_are_capped() {
        let rules = RuleSet::builtin();
        let mut traits = BTreeMap::new();
        for batch in 0..3 {
            let vals: Vec<Value> = (0..200).map(|i| json!(format!("t{:04}", batch * 200 + i))).collect();
            let ev: BTreeMap<String, Value> = [("tags".to_string(), Value::Array(vals))].into();
            apply_event(&rules, &mut traits, &ev, batch, "e");
        }
        let tags = traits["tags"].value.as_array().unwrap();
        assert_eq!(tags.len(), MAX_UNION_VALUES);
        assert_eq!(tags[0], json!("t0000"));
        for i in 0..MAX_TRAITS_PER_PROFILE + 10 {
            let ev: BTreeMap<String, Value> = [(format!("k{i}"), json!(i))].into();
            apply_event(&rules, &mut traits, &ev, 1, "e");
        }
        assert_eq!(traits.len(), MAX_TRAITS_PER_PROFILE);
    }

    #[test]
    fn last_write_ties_break_by_event_id() {
        let a = st(json!("red"), 100, "e-b");
        let b = st(json!("blue"), 100, "e-a");
        assert_eq!(combine(TraitPolicy::Last, &a, &b).value, json!("red"));
        assert_eq!(combine(TraitPolicy::Last, &b, &a).value, json!("red"));
    }
}
