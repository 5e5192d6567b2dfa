//! OpenAI's error shape, `{"error": {"message", "type", "param", "code"}}`, with the statuses and
//! headers the official SDKs act on: the status picks the exception class, `retry-after-ms` /
//! `retry-after` the wait before a retry, and `x-should-retry` whether to retry at all.

use crate::ApiError;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use sluice_admission::AdmitError;
use sluice_core::RequestId;
use std::time::Duration;

/// Waits the SDKs honour; past this most versions retry within seconds anyway, so Sluice says
/// `x-should-retry: false` and lets the caller decide.
const LONGEST_HONOURED_WAIT: Duration = Duration::from_secs(60);

/// A failed OpenAI-compatible request (boxed: handlers return it on every path).
#[derive(Debug, thiserror::Error)]
#[error("{} {}: {}", .0.status, .0.kind, .0.message)]
pub struct OpenAiError(Box<ErrorDetail>);

/// What an [`OpenAiError`] says.
#[derive(Debug)]
pub struct ErrorDetail {
    pub status: StatusCode,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `rate_limit_error`, ...
    pub kind: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<String>,
    pub retry_after: Option<Duration>,
    /// `x-should-retry`: `false` where Sluice already retried or a retry cannot help soon.
    pub should_retry: Option<bool>,
    /// The job the error is about, sent as `x-request-id`; requests without a job get a fresh id.
    pub request_id: Option<RequestId>,
}

impl std::ops::Deref for OpenAiError {
    type Target = ErrorDetail;
    fn deref(&self) -> &ErrorDetail {
        &self.0
    }
}

impl std::ops::DerefMut for OpenAiError {
    fn deref_mut(&mut self) -> &mut ErrorDetail {
        &mut self.0
    }
}

impl OpenAiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        OpenAiError(Box::new(ErrorDetail {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            should_retry: None,
            request_id: None,
        }))
    }

    /// 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
            .param(param)
            .code("invalid_request")
    }

    /// 404 for an id that is unknown, malformed or another tenant's.
    pub fn not_found(message: impl Into<String>) -> Self {
        OpenAiError::new(StatusCode::NOT_FOUND, "invalid_request_error", message).code("not_found")
    }

    /// 500: Sluice's own failure; the cause is logged, not sent.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(message = "request failed", error = %cause);
        OpenAiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error; the request may be retried",
        )
        .code("internal")
    }

    pub fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: impl Into<String>) -> Self {
        self.code = Some(code.into());
        self
    }

    pub fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        if after > LONGEST_HONOURED_WAIT {
            self.should_retry = Some(false);
        }
        self
    }

    pub fn no_retry(mut self) -> Self {
        self.should_retry = Some(false);
        self
    }

    pub fn for_job(mut self, id: RequestId) -> Self {
        self.request_id = Some(id);
        self
    }

    /// The `{"error": {...}}` object, also sent as a stream's error frame. Message and param
    /// quote no more than an excerpt of the input, whatever built them.
    pub fn body(&self) -> serde_json::Value {
        use sluice_core::shorten_message;
        serde_json::json!({"error": {
            "message": shorten_message(&self.message),
            "type": self.kind,
            "param": self.param.as_deref().map(shorten_message),
            "code": self.code,
        }})
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        if let Some(after) = self.retry_after {
            let ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX).max(1);
            headers.insert("retry-after-ms", HeaderValue::from(ms));
            // Whole seconds, rounded up: retrying before the time given must not be invited.
            headers.insert("retry-after", HeaderValue::from(ms.div_ceil(1000)));
        }
        if let Some(retry) = self.should_retry {
            headers.insert(
                "x-should-retry",
                HeaderValue::from_static(if retry { "true" } else { "false" }),
            );
        }
        let id = self.request_id.unwrap_or_default();
        if let Ok(value) = HeaderValue::try_from(id.to_string()) {
            headers.insert("x-request-id", value);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Errors of the shared extractors (auth, ids) in OpenAI's shape.
impl From<ApiError> for OpenAiError {
    fn from(error: ApiError) -> Self {
        let kind = match error.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let code = match error.code {
            "unauthorized" => "invalid_api_key",
            other => other,
        };
        let status = match error.status {
            // OpenAI answers malformed requests 400, where the job API says 422.
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        let mut out = OpenAiError::new(status, kind, error.message).code(code);
        if let Some(after) = error.retry_after {
            out = out.retry_after(after);
        }
        out
    }
}

impl From<sluice_core::InvalidRequest> for OpenAiError {
    fn from(invalid: sluice_core::InvalidRequest) -> Self {
        AdmitError::Invalid(invalid).into()
    }
}

/// A refused submission in OpenAI's terms.
impl From<AdmitError> for OpenAiError {
    fn from(error: AdmitError) -> Self {
        use AdmitError as E;
        let message = error.to_string();
        match error {
            E::Invalid(invalid) => {
                let mut out = OpenAiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    invalid.message,
                )
                .code("invalid_request");
                out.param = invalid.param;
                out
            }
            E::UnknownModel { model, known } => OpenAiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "The model `{model}` does not exist or you do not have access to it; \
                     known models: {}",
                    known.join(", ")
                ),
            )
            .param("model")
            .code("model_not_found"),
            E::NoEmail => {
                OpenAiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
                    .code("no_email")
            }
            E::QuotaExceeded { retry_after, .. } => {
                OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .code("rate_limit_exceeded")
                    .retry_after(retry_after)
            }
            E::Overloaded { retry_after, .. } => {
                OpenAiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", message)
                    .code("overloaded")
                    .retry_after(retry_after)
            }
            // 402 is not among the statuses the SDKs retry: a spent budget stays spent today.
            E::BudgetExhausted { retry_after, .. } => {
                OpenAiError::new(StatusCode::PAYMENT_REQUIRED, "insufficient_quota", message)
                    .code("budget_exhausted")
                    .retry_after(retry_after)
                    .no_retry()
            }
            // The SDKs retry 409; resending the same conflict cannot succeed.
            E::IdempotencyConflict => {
                OpenAiError::new(StatusCode::CONFLICT, "invalid_request_error", message)
                    .code("idempotency_conflict")
                    .no_retry()
            }
            E::BatchQueueFull { .. } => {
                OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", message)
                    .code("batch_queue_full")
                    .no_retry()
            }
            E::Store(cause) => OpenAiError::internal(cause),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn every_error_has_the_four_keys_and_a_request_id() {
        let response = OpenAiError::invalid("n", "only one choice").into_response();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.headers().contains_key("x-request-id"));
        let err = OpenAiError::invalid("n", "x").body();
        for key in ["message", "type", "param", "code"] {
            assert!(err["error"].get(key).is_some(), "{key}");
        }
        assert_eq!(err["error"]["param"], "n");
    }

    #[test]
    fn long_waits_say_do_not_retry_and_short_ones_give_milliseconds() {
        let short = OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "x")
            .retry_after(Duration::from_millis(1500))
            .into_response();
        assert_eq!(short.headers()["retry-after-ms"], "1500");
        assert_eq!(short.headers()["retry-after"], "2");
        assert!(!short.headers().contains_key("x-should-retry"));
        let long = OpenAiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "x")
            .retry_after(Duration::from_secs(90))
            .into_response();
        assert_eq!(long.headers()["x-should-retry"], "false");
    }

    #[test]
    fn admission_refusals_map_to_the_statuses_the_sdks_expect() {
        let unknown: OpenAiError = AdmitError::UnknownModel {
            model: "gpt-9".into(),
            known: vec!["default".into()],
        }
        .into();
        assert_eq!(unknown.status, StatusCode::NOT_FOUND);
        assert_eq!(unknown.param.as_deref(), Some("model"));
        let conflict: OpenAiError = AdmitError::IdempotencyConflict.into();
        assert_eq!(conflict.status, StatusCode::CONFLICT);
        assert_eq!(conflict.should_retry, Some(false));
        let bad_key: OpenAiError = ApiError::unauthorized("unknown or revoked API key").into();
        assert_eq!(bad_key.status, StatusCode::UNAUTHORIZED);
        assert_eq!(bad_key.kind, "authentication_error");
    }
}
