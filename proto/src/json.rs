//! `google.protobuf.Struct` / `Value` to and from `serde_json` values, for
//! clients that read traits from JSON and print them as JSON.

use prost_types::value::Kind;
use serde_json::Value;

/// A JSON value as a protobuf `Value`. Numbers become doubles, as protobuf
/// `Value` has no integers.
pub fn to_value(v: &Value) -> prost_types::Value {
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue { values: a.iter().map(to_value).collect() }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

/// A JSON object as a protobuf `Struct`.
pub fn to_struct(o: &serde_json::Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct { fields: o.iter().map(|(k, v)| (k.clone(), to_value(v))).collect() }
}

/// A protobuf `Value` as JSON; integral doubles print as integers.
pub fn from_value(v: &prost_types::Value) -> Value {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.0e15 => Value::from(*n as i64),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => from_struct(s),
    }
}

pub fn from_struct(s: &prost_types::Struct) -> Value {
    Value::Object(s.fields.iter().map(|(k, v)| (k.clone(), from_value(v))).collect())
}

pub fn serialize_struct<S: serde::Serializer>(s: &Option<prost_types::Struct>, ser: S) -> Result<S::Ok, S::Error> {
    use serde::Serialize;
    match s {
        Some(s) => from_struct(s).serialize(ser),
        None => ser.serialize_none(),
    }
}

pub fn serialize_conflict_kind<S: serde::Serializer>(kind: &i32, ser: S) -> Result<S::Ok, S::Error> {
    let name = crate::v1::rule_conflict::Kind::try_from(*kind).map_or("KIND_UNSPECIFIED", |k| k.as_str_name());
    ser.serialize_str(name)
}
