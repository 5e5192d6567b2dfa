//! A small, deterministic JSON Schema instance generator: the arguments of simulated tool calls
//! and the bodies of simulated JSON answers, so tests can check them against the schema they sent.

use serde_json::{json, Map, Value};

/// Deepest nesting followed; past it (or in a `$ref` cycle) the value is `null`.
const MAX_DEPTH: usize = 16;

/// Most items generated for an array with a large `minItems`.
const MAX_ITEMS: u64 = 8;

/// A value that satisfies the common constraints of `schema`:
///
/// - `const` is returned as is; `enum` gives its first value;
/// - object: its `required` properties, or every property when none is required, recursively;
/// - string: `"sim"`; integer and number: 1, or the `minimum` (`exclusiveMinimum` + 1) if set,
///   capped by `maximum`; boolean: `true`; array: `max(1, minItems)` items; null: `null`;
/// - `anyOf` / `oneOf` / `allOf`: the first branch; `$ref` to `#/$defs/...` or `#/definitions/...`
///   is followed; a list of types takes the first that is not `"null"`;
/// - anything else (no type, unknown type, a dangling reference) is `null`.
///
/// Type names are matched case-insensitively, so Gemini's OpenAPI-style `"STRING"` works too.
pub fn sample(schema: &Value) -> Value {
    sample_at(schema, schema, 0)
}

fn sample_at(schema: &Value, root: &Value, depth: usize) -> Value {
    if depth > MAX_DEPTH {
        return Value::Null;
    }
    let Some(s) = schema.as_object() else {
        // `true` (anything goes) or a malformed schema.
        return Value::Null;
    };
    if let Some(c) = s.get("const") {
        return c.clone();
    }
    if let Some(first) = s
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(target) = s.get("$ref").and_then(Value::as_str) {
        return resolve(root, target).map_or(Value::Null, |t| sample_at(t, root, depth + 1));
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(first) = s.get(key).and_then(Value::as_array).and_then(|b| b.first()) {
            return sample_at(first, root, depth + 1);
        }
    }
    match type_of(s).as_deref() {
        Some("object") => object(s, root, depth),
        Some("array") => {
            let item = s
                .get("items")
                .map_or(Value::Null, |i| sample_at(i, root, depth + 1));
            let count = s
                .get("minItems")
                .and_then(Value::as_u64)
                .unwrap_or(1)
                .clamp(1, MAX_ITEMS);
            Value::Array((0..count).map(|_| item.clone()).collect())
        }
        Some("string") => json!("sim"),
        Some("integer") => json!(integer(s)),
        Some("number") => number(s),
        Some("boolean") => json!(true),
        _ => Value::Null,
    }
}

/// The schema's type, lowercased: the first non-null one of a list, else inferred from its keys.
fn type_of(s: &Map<String, Value>) -> Option<String> {
    match s.get("type") {
        Some(Value::String(t)) => Some(t.to_ascii_lowercase()),
        Some(Value::Array(types)) => {
            let names = types.iter().filter_map(Value::as_str);
            let mut names = names.map(str::to_ascii_lowercase).peekable();
            let first = names.peek().cloned();
            names.find(|t| t != "null").or(first)
        }
        _ if s.contains_key("properties") => Some("object".into()),
        _ if s.contains_key("items") => Some("array".into()),
        _ => None,
    }
}

fn object(s: &Map<String, Value>, root: &Value, depth: usize) -> Value {
    let empty = Map::new();
    let properties = s
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let required: Vec<&str> = s
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let names: Vec<&str> = if required.is_empty() {
        properties.keys().map(String::as_str).collect()
    } else {
        required
    };
    let out = names
        .into_iter()
        .map(|name| {
            let value = properties
                .get(name)
                .map_or(Value::Null, |p| sample_at(p, root, depth + 1));
            (name.to_owned(), value)
        })
        .collect();
    Value::Object(out)
}

fn integer(s: &Map<String, Value>) -> i64 {
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    let mut value = 1.0_f64;
    if let Some(min) = bound("minimum") {
        value = min.ceil();
    }
    if let Some(min) = bound("exclusiveMinimum") {
        value = value.max(min.floor() + 1.0);
    }
    if let Some(max) = bound("maximum") {
        value = value.min(max.floor());
    }
    // Saturating float-to-int conversion; schemas with bounds past i64 are not worth more.
    value as i64
}

fn number(s: &Map<String, Value>) -> Value {
    let bound = |key: &str| s.get(key).and_then(Value::as_f64);
    let mut value = 1.0_f64;
    if let Some(min) = bound("minimum") {
        value = min;
    }
    if let Some(min) = bound("exclusiveMinimum") {
        value = value.max(min + 1.0);
    }
    if let Some(max) = bound("maximum") {
        value = value.min(max);
    }
    // Whole numbers print without a fraction, as a model would write them.
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        json!(value as i64)
    } else {
        json!(value)
    }
}

/// A local JSON pointer (`#/$defs/Address`) into `root`.
fn resolve<'a>(root: &'a Value, target: &str) -> Option<&'a Value> {
    let pointer = target.strip_prefix('#')?;
    root.pointer(pointer)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn objects_take_required_properties_else_all() {
        let schema = json!({"type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "days"]});
        assert_eq!(sample(&schema), json!({"city": "sim", "days": 1}));
        let all = json!({"type": "object",
            "properties": {"ok": {"type": "boolean"}, "n": {"type": "number"},
                           "nothing": {"type": "null"}, "unit": {"enum": ["c", "f"]}}});
        assert_eq!(
            sample(&all),
            json!({"ok": true, "n": 1, "nothing": null, "unit": "c"})
        );
        assert_eq!(sample(&json!({"type": "object"})), json!({}));
    }

    #[test]
    fn nesting_arrays_refs_and_constants() {
        let schema = json!({"type": "object", "required": ["tags", "home", "kind", "alt"],
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}},
                "home": {"$ref": "#/$defs/address"},
                "kind": {"const": "weather"},
                "alt": {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string"}]}},
            "$defs": {"address": {"type": "object", "properties": {
                "street": {"type": "string"}, "zip": {"type": ["null", "integer"]}}}}});
        assert_eq!(
            sample(&schema),
            json!({"tags": ["sim"], "home": {"street": "sim", "zip": 1}, "kind": "weather", "alt": 3})
        );
        let pair = json!({"type": "array", "items": {"type": "boolean"}, "minItems": 2});
        assert_eq!(sample(&pair), json!([true, true]));
    }

    #[test]
    fn numbers_respect_bounds() {
        assert_eq!(
            sample(&json!({"type": "integer", "minimum": 10})),
            json!(10)
        );
        assert_eq!(sample(&json!({"type": "integer", "maximum": 0})), json!(0));
        assert_eq!(
            sample(&json!({"type": "integer", "exclusiveMinimum": 4})),
            json!(5)
        );
        assert_eq!(
            sample(&json!({"type": "number", "minimum": 0.5})),
            json!(0.5)
        );
        assert_eq!(sample(&json!({"type": "number"})), json!(1));
    }

    #[test]
    fn unknowns_are_null_and_gemini_types_work() {
        assert_eq!(sample(&json!({})), Value::Null);
        assert_eq!(sample(&json!(true)), Value::Null);
        assert_eq!(sample(&json!({"type": "file"})), Value::Null);
        assert_eq!(sample(&json!({"$ref": "#/$defs/missing"})), Value::Null);
        let gemini = json!({"type": "OBJECT", "properties": {"q": {"type": "STRING"}}});
        assert_eq!(sample(&gemini), json!({"q": "sim"}));
        // A self-referencing schema stops at the depth limit instead of recursing forever.
        let cyclic = json!({"type": "object", "required": ["next"],
                            "properties": {"next": {"$ref": "#"}}});
        let mut v = sample(&cyclic);
        let mut depth = 0;
        while let Some(next) = v.get("next").cloned() {
            v = next;
            depth += 1;
        }
        assert!(depth > 3 && depth <= MAX_DEPTH, "{depth}");
    }
}
