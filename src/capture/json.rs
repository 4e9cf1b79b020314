//! Small helpers for reading untyped JSON where any field may be missing or of the wrong type.
//!
//! Request and response parsing read upstream bodies as [`serde_json::Value`] and skip whatever
//! does not have the expected shape instead of failing.

use serde_json::Value;

/// The string at `key`, if `v` is an object holding a string there.
pub(super) fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// The unsigned integer at `key`, if there is one.
pub(super) fn u64_at(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

/// The array at `key`, or an empty slice.
pub(super) fn array_at<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice)
}

/// The object at `key`, if `v` holds a non-null object there.
pub(super) fn object_at<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|o| o.is_object())
}

/// The name of a JSON value's type, for error messages.
pub(super) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}
