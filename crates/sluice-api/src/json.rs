//! A JSON body extractor whose every rejection is our JSON error: wrong content type,
//! body over the limit, malformed JSON, and JSON of the wrong shape each get their own code.

use crate::ApiError;
use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

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
        let value: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body is not valid JSON: {e}"),
            )
        })?;
        // PostgreSQL stores neither text nor jsonb with NUL in it: refuse it here, as bad input,
        // rather than fail the insert with a 500 (and, batched, other clients' jobs with it).
        if has_nul(&value) {
            return Err(ApiError::invalid(
                "strings may not contain the NUL character (\\u0000)",
            ));
        }
        let value = serde_json::from_value(value).map_err(|e| ApiError::invalid(e.to_string()))?;
        Ok(JsonBody { value })
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
    fn nul_is_found_in_strings_and_keys_at_any_depth() {
        let nul = |v: serde_json::Value| has_nul(&v);
        assert!(nul(
            serde_json::json!({"messages": [{"content": "a\u{0}b"}]})
        ));
        assert!(nul(serde_json::json!({"a\u{0}": 1})));
        assert!(!nul(serde_json::json!({"a": ["\\u0000", 1, null, true]})));
    }
}
