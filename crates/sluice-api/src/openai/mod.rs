//! The OpenAI-compatible front door: `/v1/chat/completions`, `/v1/models`, `/v1/files` and
//! `/v1/batches`, so an application on the official OpenAI SDKs changes only its `base_url`.
//!
//! Every call is a job like any other: admitted by the same intake, queued in the key's lane,
//! fairly dequeued and rate-limited. Handlers translate OpenAI's wire format and nothing else.

pub(crate) mod batches;
pub(crate) mod chat;
mod error;
mod extract;
pub(crate) mod files;
mod finalizer;
pub(crate) mod models;
pub(crate) mod wire;

pub use error::OpenAiError;
pub use finalizer::spawn_finalizer;

use crate::ApiState;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use sluice_store::Store;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Largest chat completion body: images travel inline as base64.
pub const MAX_CHAT_BODY_BYTES: usize = 20 << 20;

/// `[openai]`: how held chat completions behave.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenAiConfig {
    /// Longest a request is held for its job; past it a job that has not started is cancelled
    /// and the answer is 503 `queue_timeout` with `Retry-After` (a running job finishes). A
    /// client's announced timeout (`x-stainless-read-timeout`) shortens it.
    pub max_wait_secs: f64,
    /// Cancel the job of a client that went away, if it has not started after the grace.
    pub cancel_on_disconnect: bool,
    /// How long a job whose client went away waits for a retry of the same body to take it up.
    pub disconnect_grace_secs: f64,
    /// Comment lines sent on a waiting stream this often, so it stays open.
    pub keepalive_secs: f64,
}

impl Default for OpenAiConfig {
    fn default() -> Self {
        OpenAiConfig {
            max_wait_secs: 600.0,
            cancel_on_disconnect: true,
            disconnect_grace_secs: 10.0,
            keepalive_secs: 15.0,
        }
    }
}

impl OpenAiConfig {
    pub fn validate(&self) -> Result<(), String> {
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.max_wait_secs) {
            return Err("openai.max_wait_secs must be a positive number of seconds".into());
        }
        if !(self.disconnect_grace_secs.is_finite() && self.disconnect_grace_secs >= 0.0) {
            return Err("openai.disconnect_grace_secs must be a number of seconds >= 0".into());
        }
        if !positive(self.keepalive_secs) {
            return Err("openai.keepalive_secs must be a positive number of seconds".into());
        }
        Ok(())
    }

    fn disconnect_grace(&self) -> Duration {
        Duration::from_secs_f64(self.disconnect_grace_secs)
    }

    fn keepalive(&self) -> Duration {
        Duration::from_secs_f64(self.keepalive_secs)
    }
}

/// `[batches]`: the Batch API's windows and limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// How long a `completion_window = "24h"` batch may run before it expires (86,400 s).
    pub completion_window_secs: f64,
    /// Unfinished batch lines a tenant may have at once; a batch past it is refused (429).
    pub max_pending_lines: i64,
    /// How often each API node's finalizer looks for batches to move on.
    pub check_every_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            completion_window_secs: 86_400.0,
            max_pending_lines: 1_000_000,
            check_every_ms: 500,
        }
    }
}

impl BatchConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.completion_window_secs.is_finite() && self.completion_window_secs > 0.0) {
            return Err(
                "batches.completion_window_secs must be a positive number of seconds".into(),
            );
        }
        if self.max_pending_lines < 1 {
            return Err("batches.max_pending_lines must be at least 1".into());
        }
        if self.check_every_ms == 0 {
            return Err("batches.check_every_ms must be at least 1".into());
        }
        Ok(())
    }

    pub(crate) fn completion_window(&self) -> Duration {
        Duration::from_secs_f64(self.completion_window_secs)
    }
}

/// The OpenAI routes.
pub(crate) fn routes() -> Router<Arc<ApiState>> {
    // The route's own body limit is the inner layer, so it wins over the API's 1 MiB default.
    let chat = Router::new()
        .route("/v1/chat/completions", post(chat::completions))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_CHAT_BODY_BYTES));
    let upload = Router::new()
        .route("/v1/files", post(files::upload).get(files::list))
        .layer(axum::extract::DefaultBodyLimit::max(files::MAX_UPLOAD_BODY));
    Router::new()
        .merge(chat)
        .merge(upload)
        .route("/v1/models", get(models::list))
        .route("/v1/models/{id}", get(models::retrieve))
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
}

/// Cancel, every second, the jobs whose clients went away and did not come back within the
/// grace; every API node runs one (the store takes each job once).
pub fn spawn_disconnect_sweeper(store: Store, config: &OpenAiConfig, shutdown: CancellationToken) {
    if !config.cancel_on_disconnect {
        return;
    }
    tokio::spawn(async move {
        loop {
            match store.cancel_detached(500).await {
                Ok(cancelled) => {
                    for (id, tenant) in cancelled {
                        tracing::info!(message = "job cancelled: its client left and did not come back", request_id = %id, %tenant);
                    }
                }
                Err(error) => tracing::warn!(message = "could not cancel detached jobs", %error),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    });
}
