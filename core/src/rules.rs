//! Identity rules: which identifier types exist, how their values are
//! normalised, which values are junk, how many of a type one profile may
//! hold, which identifiers win when limits bite, and how traits combine.
//!
//! A [`RuleSet`] is parsed from TOML (see `rules/default.toml`, which is also
//! the built-in set), validated once, and then only read. It is versioned:
//! profiles and merge records name the version that produced them.

use crate::model::Identifier;
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// The built-in rule set's TOML source.
pub const BUILTIN_RULES_TOML: &str = include_str!("../rules/default.toml");

#[derive(Debug, thiserror::Error)]
pub enum RuleSetError {
    #[error("rule set is not valid TOML: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("rule set field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> RuleSetError {
    RuleSetError::Invalid { field: field.into(), reason: reason.into() }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnknownTypePolicy {
    Reject,
    Ignore,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalizer {
    Trim,
    Lowercase,
    Email,
    Phone,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraitPolicy {
    Last,
    First,
    Max,
    Min,
    Union,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedSpec {
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub patterns: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneSpec {
    #[serde(default = "default_country_code")]
    pub default_country_code: String,
    #[serde(default = "default_national_length")]
    pub national_number_length: usize,
}

fn default_country_code() -> String {
    "1".into()
}
fn default_national_length() -> usize {
    10
}

impl Default for PhoneSpec {
    fn default() -> Self {
        PhoneSpec { default_country_code: default_country_code(), national_number_length: default_national_length() }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypeSpec {
    #[serde(default = "default_normalizer")]
    pub normalize: Normalizer,
    /// Maximum identifiers of this type in one profile; none = no limit.
    #[serde(default)]
    pub limit: Option<u32>,
    /// 1 is the highest priority.
    pub priority: u32,
    #[serde(default)]
    pub blocked: Vec<String>,
    #[serde(default)]
    pub blocked_patterns: Vec<String>,
}

fn default_normalizer() -> Normalizer {
    Normalizer::Trim
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraitSpec {
    #[serde(default = "default_policy")]
    pub default_policy: TraitPolicy,
    #[serde(default)]
    pub policies: BTreeMap<String, TraitPolicy>,
}

fn default_policy() -> TraitPolicy {
    TraitPolicy::Last
}

impl Default for TraitSpec {
    fn default() -> Self {
        TraitSpec { default_policy: TraitPolicy::Last, policies: BTreeMap::new() }
    }
}

/// The rule set as written in TOML.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetSpec {
    pub version: String,
    #[serde(default = "default_unknown")]
    pub unknown_types: UnknownTypePolicy,
    #[serde(default = "default_cap")]
    pub max_identifiers_per_profile: u32,
    #[serde(default = "default_hub_threshold")]
    pub hub_threshold: u32,
    #[serde(default)]
    pub blocked: BlockedSpec,
    #[serde(default)]
    pub phone: PhoneSpec,
    pub types: BTreeMap<String, TypeSpec>,
    #[serde(default)]
    pub traits: TraitSpec,
}

fn default_unknown() -> UnknownTypePolicy {
    UnknownTypePolicy::Reject
}
fn default_cap() -> u32 {
    1000
}
fn default_hub_threshold() -> u32 {
    5
}

/// One identifier type, compiled.
#[derive(Clone, Debug)]
pub struct TypeRule {
    pub name: String,
    pub normalize: Normalizer,
    pub limit: Option<u32>,
    pub priority: u32,
    blocked: HashSet<String>,
    blocked_patterns: Vec<Regex>,
}

/// Why an identifier value is not used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A blocked value or pattern matched.
    Blocked(String),
    /// Not a valid value of its type after normalisation.
    Invalid(String),
}

/// A validated, compiled rule set.
#[derive(Clone, Debug)]
pub struct RuleSet {
    spec: RuleSetSpec,
    source: String,
    types: BTreeMap<String, TypeRule>,
    blocked: HashSet<String>,
    blocked_patterns: Vec<Regex>,
}

impl RuleSet {
    /// The rule set compiled into the binary.
    pub fn builtin() -> RuleSet {
        RuleSet::from_toml(BUILTIN_RULES_TOML).expect("the built-in rule set is valid")
    }

    pub fn from_toml(text: &str) -> Result<RuleSet, RuleSetError> {
        let spec: RuleSetSpec = toml::from_str(text)?;
        RuleSet::compile(spec, text.to_string())
    }

    pub fn from_spec(spec: RuleSetSpec) -> Result<RuleSet, RuleSetError> {
        let source = toml::to_string_pretty(&spec).map_err(|e| invalid("<root>", format!("cannot render as TOML: {e}")))?;
        RuleSet::compile(spec, source)
    }

    fn compile(spec: RuleSetSpec, source: String) -> Result<RuleSet, RuleSetError> {
        if spec.version.trim().is_empty() || spec.version.len() > 64 {
            return Err(invalid("version", "must be 1 to 64 characters"));
        }
        if spec.max_identifiers_per_profile == 0 {
            return Err(invalid("max_identifiers_per_profile", "must be at least 1"));
        }
        if spec.hub_threshold < 2 {
            return Err(invalid("hub_threshold", "must be at least 2"));
        }
        if spec.types.is_empty() {
            return Err(invalid("types", "at least one identifier type is required"));
        }
        let cc = &spec.phone.default_country_code;
        if cc.is_empty() || cc.len() > 3 || !cc.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("phone.default_country_code", "must be 1 to 3 digits"));
        }
        if !(4..=14).contains(&spec.phone.national_number_length) {
            return Err(invalid("phone.national_number_length", "must be 4 to 14"));
        }
        let mut types = BTreeMap::new();
        for (name, t) in &spec.types {
            let field = format!("types.{name}");
            if !valid_type_name(name) {
                return Err(invalid(field, "type names are 1 to 64 of [a-z0-9_]"));
            }
            if t.limit == Some(0) {
                return Err(invalid(format!("{field}.limit"), "must be at least 1 (omit it for no limit)"));
            }
            if !(1..=1000).contains(&t.priority) {
                return Err(invalid(format!("{field}.priority"), "must be 1 (highest) to 1000"));
            }
            types.insert(
                name.clone(),
                TypeRule {
                    name: name.clone(),
                    normalize: t.normalize,
                    limit: t.limit,
                    priority: t.priority,
                    blocked: t.blocked.iter().map(|v| v.to_lowercase()).collect(),
                    blocked_patterns: compile_patterns(&t.blocked_patterns, &format!("{field}.blocked_patterns"))?,
                },
            );
        }
        Ok(RuleSet {
            blocked: spec.blocked.values.iter().map(|v| v.to_lowercase()).collect(),
            blocked_patterns: compile_patterns(&spec.blocked.patterns, "blocked.patterns")?,
            types,
            spec,
            source,
        })
    }

    /// The built-in rule set with every limit lifted. Without limits the
    /// graph a set of events builds does not depend on their order, which
    /// the property tests of the engine and of transactions rely on.
    pub fn without_limits() -> RuleSet {
        let mut spec = RuleSet::builtin().spec().clone();
        for t in spec.types.values_mut() {
            t.limit = None;
        }
        spec.max_identifiers_per_profile = 100_000;
        RuleSet::from_spec(spec).expect("the built-in rules without limits stay valid")
    }

    pub fn version(&self) -> &str {
        &self.spec.version
    }

    pub fn spec(&self) -> &RuleSetSpec {
        &self.spec
    }

    /// The TOML this rule set was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn unknown_types(&self) -> UnknownTypePolicy {
        self.spec.unknown_types
    }

    pub fn max_identifiers_per_profile(&self) -> u32 {
        self.spec.max_identifiers_per_profile
    }

    pub fn hub_threshold(&self) -> u32 {
        self.spec.hub_threshold
    }

    pub fn type_rule(&self, kind: &str) -> Option<&TypeRule> {
        self.types.get(kind)
    }

    pub fn type_names(&self) -> impl Iterator<Item = &str> {
        self.types.keys().map(String::as_str)
    }

    /// Priority of an identifier's type (1 = highest); unknown types rank last.
    pub fn priority(&self, kind: &str) -> u32 {
        self.types.get(kind).map_or(u32::MAX, |t| t.priority)
    }

    pub fn limit(&self, kind: &str) -> Option<u32> {
        self.types.get(kind).and_then(|t| t.limit)
    }

    pub fn trait_policy(&self, name: &str) -> TraitPolicy {
        self.spec.traits.policies.get(name).copied().unwrap_or(self.spec.traits.default_policy)
    }

    /// Normalises a raw value of a known type and checks it against the
    /// blocklists.
    pub fn normalize(&self, rule: &TypeRule, raw: &str) -> Result<String, Rejection> {
        let value = match rule.normalize {
            Normalizer::Trim => raw.trim().to_string(),
            Normalizer::Lowercase => raw.trim().to_lowercase(),
            Normalizer::Email => normalize_email(raw)?,
            Normalizer::Phone => normalize_phone(raw, &self.spec.phone)?,
        };
        if value.is_empty() {
            return Err(Rejection::Blocked("empty value".into()));
        }
        let lower = value.to_lowercase();
        if self.blocked.contains(&lower) || rule.blocked.contains(&lower) {
            return Err(Rejection::Blocked("blocked value".into()));
        }
        if let Some(p) = self.blocked_patterns.iter().chain(&rule.blocked_patterns).find(|p| p.is_match(&value)) {
            return Err(Rejection::Blocked(format!("blocked pattern {}", p.as_str())));
        }
        Ok(value)
    }

    /// Sort key of an identifier: highest priority first, then type, then
    /// value, so that every decision the engine takes is deterministic.
    pub fn rank(&self, id: &Identifier) -> (u32, String, String) {
        (self.priority(&id.kind), id.kind.clone(), id.value.clone())
    }
}

pub fn valid_type_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn compile_patterns(patterns: &[String], field: &str) -> Result<Vec<Regex>, RuleSetError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            RegexBuilder::new(p)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| invalid(format!("{field}[{i}]"), e.to_string()))
        })
        .collect()
}

fn normalize_email(raw: &str) -> Result<String, Rejection> {
    let v = raw.trim().to_lowercase();
    if v.is_empty() {
        return Ok(v);
    }
    let mut parts = v.split('@');
    let (local, domain) = match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(d), None) => (l, d),
        _ => return Err(Rejection::Invalid("an e-mail address has exactly one @".into())),
    };
    if local.is_empty() || domain.len() < 3 || !domain.contains('.') || domain.starts_with('.') || domain.ends_with('.') {
        return Err(Rejection::Invalid("not an e-mail address".into()));
    }
    if v.chars().any(char::is_whitespace) {
        return Err(Rejection::Invalid("an e-mail address has no spaces".into()));
    }
    Ok(v)
}

/// Phone numbers become digits only, in one canonical form: the country code
/// followed by the national significant number (E.164 without the `+`).
/// `+1 (555) 010-9999`, `001 555 010 9999`, `555.010.9999` and
/// `1-555-010-9999` all become `15550109999`.
fn normalize_phone(raw: &str, spec: &PhoneSpec) -> Result<String, Rejection> {
    let trimmed = raw.trim();
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    if trimmed.chars().any(|c| c.is_alphabetic()) {
        return Err(Rejection::Invalid("a phone number has no letters".into()));
    }
    let international = trimmed.starts_with('+');
    let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
    let cc = &spec.default_country_code;
    let canonical = if international {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else {
        // A national trunk prefix ("0" in most of the world) is not part of
        // the national significant number.
        while digits.len() > spec.national_number_length && digits.starts_with('0') {
            digits.remove(0);
        }
        if digits.len() == spec.national_number_length {
            format!("{cc}{digits}")
        } else if digits.len() == spec.national_number_length + 1 && digits.starts_with('0') {
            format!("{cc}{}", &digits[1..])
        } else {
            digits
        }
    };
    if !(7..=15).contains(&canonical.len()) {
        return Err(Rejection::Invalid("a phone number has 7 to 15 digits".into()));
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(kind: &str, raw: &str) -> Result<String, Rejection> {
        let rules = RuleSet::builtin();
        let rule = rules.type_rule(kind).unwrap();
        rules.normalize(rule, raw)
    }

    #[test]
    fn builtin_rules_parse_and_name_a_version() {
        let r = RuleSet::builtin();
        assert_eq!(r.version(), "builtin-2026.11");
        assert_eq!(r.limit("user_id"), Some(1));
        assert_eq!(r.priority("user_id"), 1);
        assert!(r.type_rule("email").is_some());
    }

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, &str, &str)] = &[
            ("email", "  Jane.Doe@Shop.ORG ", "jane.doe@shop.org"),
            ("email", "JANE@shop.co.uk", "jane@shop.co.uk"),
            ("phone", "+1 (555) 010-9999", "15550109999"),
            ("phone", "555.010.9999", "15550109999"),
            ("phone", "1-555-010-9999", "15550109999"),
            ("phone", "001 555 010 9999", "15550109999"),
            ("phone", "+44 20 7946 0958", "442079460958"),
            ("device_id", " ABCDEF12-3456-7890-ABCD-EF1234567890 ", "abcdef12-3456-7890-abcd-ef1234567890"),
            ("user_id", "  U-42 ", "U-42"),
            ("anonymous_id", "anon-1", "anon-1"),
        ];
        for (kind, raw, want) in cases {
            assert_eq!(norm(kind, raw).as_deref(), Ok(*want), "{kind} {raw:?}");
        }
    }

    #[test]
    fn builtin_rules_block_junk() {
        let junk: &[(&str, &str)] = &[
            ("user_id", "null"),
            ("user_id", "undefined"),
            ("user_id", "  "),
            ("user_id", ""),
            ("user_id", "NULL"),
            ("anonymous_id", "[object Object]"),
            ("email", "test@test.com"),
            ("email", "Test123@gmail.com"),
            ("email", "anyone@example.com"),
            ("email", "noreply@shop.com"),
            ("device_id", "00000000-0000-0000-0000-000000000000"),
            ("device_id", "0000"),
            ("phone", "555-555-5555"),
            ("phone", "0000000000"),
            ("phone", "123-456-7890"),
            ("phone", "+1 111 111 1111"),
            ("user_id", "0"),
        ];
        for (kind, raw) in junk {
            assert!(matches!(norm(kind, raw), Err(Rejection::Blocked(_))), "{kind} {raw:?} -> {:?}", norm(kind, raw));
        }
    }

    #[test]
    fn invalid_values_are_named() {
        assert!(matches!(norm("email", "not-an-email"), Err(Rejection::Invalid(_))));
        assert!(matches!(norm("email", "a@b@c.com"), Err(Rejection::Invalid(_))));
        assert!(matches!(norm("phone", "12"), Err(Rejection::Invalid(_))));
        assert!(matches!(norm("phone", "call me"), Err(Rejection::Invalid(_))));
    }

    #[test]
    fn real_values_are_not_blocked() {
        assert!(norm("email", "maria.garcia@gmail.com").is_ok());
        assert!(norm("phone", "+1 212 555 0147").is_ok());
        assert!(norm("user_id", "10").is_ok());
        assert!(norm("device_id", "3f2504e0-4f89-11d3-9a0c-0305e82c3301").is_ok());
    }

    #[test]
    fn invalid_rule_sets_name_the_field() {
        let bad = BUILTIN_RULES_TOML.replace("limit = 1\n", "limit = 0\n");
        let err = RuleSet::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("types.user_id.limit"), "{err}");
        let bad = BUILTIN_RULES_TOML.replace("'^x+$'", "'^(x'");
        let err = RuleSet::from_toml(&bad).unwrap_err().to_string();
        assert!(err.contains("blocked.patterns[3]"), "{err}");
        let bad = format!("{BUILTIN_RULES_TOML}\nsurprise = 1\n");
        assert!(RuleSet::from_toml(&bad).is_err());
    }
}
