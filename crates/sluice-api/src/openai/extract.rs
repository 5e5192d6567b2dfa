//! Extractors for the OpenAI routes: the caller's key and a JSON object body, each refusing in
//! OpenAI's error shape rather than the job API's.

use super::OpenAiError;
use crate::auth::{authenticate, bearer};
use crate::json::{parse_object, BadJson};
use crate::ApiState;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use sluice_core::Principal;
use std::sync::Arc;

/// The authenticated caller of an OpenAI route.
pub(crate) struct OpenAiCaller(pub Principal);

impl FromRequestParts<Arc<ApiState>> for OpenAiCaller {
    type Rejection = OpenAiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or_else(|| {
            OpenAiError::new(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "You didn't provide an API key: send it as Authorization: Bearer sk_sluice_...",
            )
            .code("invalid_api_key")
        })?;
        authenticate(state, key)
            .await
            .map(OpenAiCaller)
            .map_err(|e| {
                let mut error = OpenAiError::from(e);
                if error.status == StatusCode::UNAUTHORIZED {
                    error.message = "Incorrect API key provided: unknown or revoked".into();
                }
                error
            })
    }
}

/// A JSON object body. Like OpenAI, any content type is read as JSON (clients differ in what
/// they send), except forms, which are certainly not.
pub(crate) struct OpenAiJson(pub serde_json::Map<String, serde_json::Value>);

impl<S: Send + Sync> FromRequest<S> for OpenAiJson {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let form = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.starts_with("multipart/") || v.starts_with("application/x-www-form")
            });
        if form {
            return Err(OpenAiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "send the body as JSON with Content-Type: application/json",
            )
            .code("unsupported_media_type"));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                OpenAiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    "the request body is too large",
                )
                .code("body_too_large")
            } else {
                OpenAiError::new(
                    rejection.status(),
                    "invalid_request_error",
                    rejection.body_text(),
                )
                .code("bad_body")
            }
        })?;
        parse_object(&bytes).map(OpenAiJson).map_err(|e| match e {
            BadJson::Syntax(_) => OpenAiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("We could not parse the JSON body of your request: {e}"),
            )
            .code("invalid_json"),
            BadJson::NotObject(_) => OpenAiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            )
            .code("invalid_json"),
            BadJson::DuplicateKey(_) => OpenAiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                e.to_string(),
            )
            .code("invalid_request"),
            BadJson::Nul => OpenAiError::invalid("messages", e.to_string()),
        })
    }
}
