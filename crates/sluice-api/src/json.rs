//! A JSON body extractor whose every rejection is our JSON error: wrong content type,
//! body over the limit, malformed JSON, and JSON of the wrong shape each get their own code.
//! [`parse_object`] is the one reading of a body every JSON route shares: an object, no key
//! twice, no NUL.

use crate::ApiError;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::{DeserializeOwned, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::fmt;

/// A JSON request body parsed into `T`.
pub struct JsonBody<T> {
    pub value: T,
}

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v.eq_ignore_ascii_case("application/json")
                    || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body exceeds {} bytes", crate::MAX_BODY_BYTES),
                )
            } else {
                ApiError::new(rejection.status(), "bad_body", rejection.body_text())
            }
        })?;
        let object = parse_object(&bytes).map_err(|e| match e {
            BadJson::Syntax(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            ),
            _ => ApiError::invalid(e.to_string()),
        })?;
        let value = serde_json::from_value(Value::Object(object))
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(JsonBody { value })
    }
}

/// Why a body is not a JSON object a route can take.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BadJson {
    /// Not JSON at all (the job API's 400 `invalid_json`).
    #[error("{0}")]
    Syntax(serde_json::Error),
    /// JSON, but an array, a string, a number, ... where every route takes an object.
    #[error("the body must be a JSON object, not {0}")]
    NotObject(&'static str),
    /// An object with a key twice: which one counts would be a guess.
    #[error("{0}")]
    DuplicateKey(serde_json::Error),
    /// PostgreSQL stores neither text nor jsonb with NUL in it: refused here, as bad input,
    /// rather than failing the insert with a 500 (and, batched, other clients' jobs with it).
    #[error("strings may not contain the NUL character (\\u0000)")]
    Nul,
}

/// Parse a body (or a batch line) that must be one JSON object: no key twice in any object
/// (serde_json alone keeps the last), no NUL in any string or key.
pub(crate) fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, BadJson> {
    let Strict(value) = serde_json::from_slice(bytes).map_err(|e| {
        // The value visitor fails only on a repeated key; the rest is the syntax.
        if e.classify() == serde_json::error::Category::Data {
            BadJson::DuplicateKey(e)
        } else {
            BadJson::Syntax(e)
        }
    })?;
    let object = match value {
        Value::Object(object) => object,
        Value::Array(_) => return Err(BadJson::NotObject("an array")),
        Value::String(_) => return Err(BadJson::NotObject("a string")),
        Value::Number(_) => return Err(BadJson::NotObject("a number")),
        Value::Bool(_) => return Err(BadJson::NotObject("a boolean")),
        Value::Null => return Err(BadJson::NotObject("null")),
    };
    if object.iter().any(|(k, v)| k.contains('\0') || has_nul(v)) {
        return Err(BadJson::Nul);
    }
    Ok(object)
}

/// A JSON value read like serde_json's own, except that an object with a key twice is an error
/// naming the key.
struct Strict(Value);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON has no NaN or infinity, so the fallback is never taken.
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Strict::deserialize(deserializer).map(|Strict(v)| v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(Strict(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(A::Error::custom(format!(
                    "the key {:?} appears twice in one object",
                    sluice_core::excerpt(&key)
                )));
            }
            let Strict(value) = access.next_value()?;
            map.insert(key, value);
        }
        Ok(Value::Object(map))
    }
}

/// Whether any string or key in `value` holds a NUL character.
pub(crate) fn has_nul(value: &serde_json::Value) -> bool {
    use serde_json::Value;
    match value {
        Value::String(s) => s.contains('\0'),
        Value::Array(items) => items.iter().any(has_nul),
        Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        Value::Null | Value::Bool(_) | Value::Number(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_body_must_be_one_object_with_each_key_once() {
        let object = parse_object(br#"{"a": [1, -2, 2.5, null, true, "x", {"b": {}}]}"#).unwrap();
        assert_eq!(
            Value::Object(object),
            serde_json::json!({"a": [1, -2, 2.5, null, true, "x", {"b": {}}]})
        );
        let array = parse_object(br#"["default", [{"role": "user", "content": "x"}]]"#);
        assert!(matches!(array, Err(BadJson::NotObject("an array"))));
        let twice = parse_object(br#"{"m": {"role": "user", "role": "system"}}"#).unwrap_err();
        assert!(matches!(twice, BadJson::DuplicateKey(_)), "{twice:?}");
        assert!(
            twice
                .to_string()
                .contains(r#"the key "role" appears twice"#),
            "{twice}"
        );
        assert!(matches!(parse_object(b"{\"a\": "), Err(BadJson::Syntax(_))));
        assert!(matches!(
            parse_object(br#"{"a\u0000": 1}"#),
            Err(BadJson::Nul)
        ));
    }

    #[test]
    fn nul_is_found_in_strings_and_keys_at_any_depth() {
        let nul = |v: serde_json::Value| has_nul(&v);
        assert!(nul(
            serde_json::json!({"messages": [{"content": "a\u{0}b"}]})
        ));
        assert!(nul(serde_json::json!({"a\u{0}": 1})));
        assert!(!nul(serde_json::json!({"a": ["\\u0000", 1, null, true]})));
    }
}
