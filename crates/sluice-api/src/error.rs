//! The one error shape every failing request gets: `{"error": {"code", "message"}}`.
//! Internal failures are logged with detail and answered without it.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

#[derive(Debug, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Sent as `Retry-After` (whole seconds, at least 1): when trying again may succeed.
    pub retry_after: Option<std::time::Duration>,
    /// More about the error, beside `code` and `message` (e.g. the limit a request exceeded).
    pub detail: Option<(&'static str, serde_json::Value)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
            detail: None,
        }
    }

    pub fn with_retry_after(mut self, after: std::time::Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn with_detail(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.detail = Some((key, value));
        self
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    /// Log the cause; tell the client only that it was our fault.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(message = "request failed", error = %cause);
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; the request may be retried",
        )
    }
}

/// The job API's answer to a refused submission.
impl From<sluice_admission::AdmitError> for ApiError {
    fn from(error: sluice_admission::AdmitError) -> Self {
        use sluice_admission::AdmitError as E;
        let message = error.to_string();
        match error {
            E::Invalid(invalid) => ApiError::invalid(invalid.message),
            E::UnknownModel { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_model", message)
            }
            E::NoEmail => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "no_email", message),
            E::QuotaExceeded {
                scope,
                window_secs,
                limit,
                retry_after,
                ..
            } => ApiError::new(StatusCode::TOO_MANY_REQUESTS, "quota_exceeded", message)
                .with_retry_after(retry_after)
                .with_detail(
                    "limit",
                    serde_json::json!({
                        "scope": scope, "window_secs": window_secs, "limit": limit,
                    }),
                ),
            E::Overloaded { retry_after, .. } => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message)
                    .with_retry_after(retry_after)
            }
            E::BudgetExhausted {
                spent,
                daily,
                retry_after,
                ..
            } => ApiError::new(StatusCode::PAYMENT_REQUIRED, "budget_exhausted", message)
                .with_retry_after(retry_after)
                .with_detail(
                    "budget",
                    serde_json::json!({ "daily_usd": daily, "spent_usd": spent }),
                ),
            E::IdempotencyConflict => {
                ApiError::new(StatusCode::CONFLICT, "idempotency_conflict", message)
            }
            E::BatchQueueFull { .. } => {
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "batch_queue_full", message)
            }
            E::Store(cause) => ApiError::internal(cause),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Whatever built the message, it quotes no more than an excerpt of the input.
        let message = sluice_core::shorten_message(&self.message);
        let mut error = serde_json::json!({ "code": self.code, "message": message });
        if let Some((key, value)) = self.detail {
            error[key] = value;
        }
        let mut response = (
            self.status,
            axum::Json(serde_json::json!({ "error": error })),
        )
            .into_response();
        if let Some(after) = self.retry_after {
            // Round up: retrying before the time given must not be invited.
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs.max(1)),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
