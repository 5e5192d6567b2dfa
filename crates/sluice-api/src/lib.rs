//! Sluice's HTTP API: clients submit jobs, poll, follow (SSE, WebSocket) and cancel them;
//! operators probe health, administer and watch the dashboard.
//! Handlers are thin: authenticate, parse the body into domain types, call the store and publisher.

mod admin;
mod auth;
mod dashboard;
mod error;
mod events;
mod jobs;
mod json;
pub mod openai;
mod openapi;
mod result_page;
mod serve;
mod stream;
mod telemetry;

pub use error::ApiError;
pub use openai::{BatchConfig, OpenAiConfig};
pub use serve::HttpConfig;

use axum::routing::get;
use axum::Router;
use sluice_admission::Intake;
use sluice_core::Lane;
use sluice_notify::Hub;
use sluice_store::Store;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Renders the process's metrics as Prometheus text; the binary owns the recorder.
pub type RenderMetrics = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Everything a handler needs; shared by all requests.
pub struct ApiState {
    pub store: Store,
    /// Admission, insert, publish and announce: what every front door submits through.
    pub intake: Arc<Intake>,
    /// Fans events out to this node's WebSocket and SSE subscribers.
    pub hub: Hub,
    /// What `GET /metrics` serves; without it the route answers 404.
    pub metrics: Option<RenderMetrics>,
    /// How held chat completions behave (`[openai]`).
    pub openai: OpenAiConfig,
    /// The Batch API's windows and limits (`[batches]`).
    pub batches: BatchConfig,
    /// Checks the signed links of result pages (`[mail] link_secret`); without it `/r/{id}`
    /// answers 404.
    pub result_links: Option<sluice_notify::LinkSigner>,
    keys: auth::KeyCache,
}

impl ApiState {
    pub fn new(
        intake: Arc<Intake>,
        hub: Hub,
        metrics: Option<RenderMetrics>,
        openai: OpenAiConfig,
        batches: BatchConfig,
        result_links: Option<sluice_notify::LinkSigner>,
    ) -> Arc<ApiState> {
        Arc::new(ApiState {
            store: intake.store.clone(),
            intake,
            hub,
            metrics,
            openai,
            batches,
            result_links,
            keys: auth::KeyCache::default(),
        })
    }
}

/// The API's routes.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/jobs", axum::routing::post(jobs::submit))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::sse))
        .route("/v1/stream", get(stream::websocket))
        .route("/r/{id}", get(result_page::page))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .merge(openai::routes())
        .merge(admin::routes())
        .merge(dashboard::routes())
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Serve until `shutdown` fires, then finish in-flight requests; with the connection limits and
/// timeouts of `http` (`[http]`).
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    http: HttpConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve::serve_router(listener, router(state), &http, shutdown).await
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// Always `ok`: the process answers.
    status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health { status: "ok" })
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Ready {
    /// Always `ready` (a node that is not answers 503).
    status: &'static str,
    load: ReadyLoad,
}

/// The load level is information, not unreadiness: a node shedding load still serves.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct ReadyLoad {
    #[schema(value_type = openapi::schemas::LoadLevel)]
    level: sluice_core::LoadLevel,
    reason: String,
    shedding: bool,
    /// Per lane: its depth, oldest wait and drain rate as the load monitor last measured.
    #[schema(value_type = Vec<Object>)]
    lanes: Vec<sluice_core::LaneEstimate>,
}

/// Readiness: the database and the broker answer.
#[utoipa::path(get, path = "/readyz", tag = "ops", responses(
    (status = 200, body = Ready),
    (status = 503, description = "`unavailable`: the database or the broker does not answer", body = openapi::ErrorBody),
))]
async fn ready(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
) -> Result<axum::Json<Ready>, ApiError> {
    if !state.store.ping().await {
        return Err(ApiError::unavailable("the database does not answer"));
    }
    if let Err(error) = state.intake.publisher.broker().depth(Lane::Priority).await {
        return Err(ApiError::unavailable(format!(
            "the broker does not answer: {error}"
        )));
    }
    let load = state.intake.policy.load();
    Ok(axum::Json(Ready {
        status: "ready",
        load: ReadyLoad {
            level: load.assessment.level,
            reason: load.assessment.reason.clone(),
            shedding: state.intake.policy.shedding.enabled,
            lanes: load.assessment.lanes.clone(),
        },
    }))
}

/// Prometheus text, without a key like the health probes: scrapers hold no API key.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses(
    (status = 200, description = "Prometheus text format 0.0.4", body = String, content_type = "text/plain"),
    (status = 404, description = "`not_found`: metrics are not enabled on this node", body = openapi::ErrorBody),
))]
async fn metrics(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let render = state
        .metrics
        .as_ref()
        .ok_or_else(|| ApiError::not_found("metrics are not enabled"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
        render(),
    ))
}

/// This API's OpenAPI 3 document; without a key, like the probes: it tells no secret.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses(
    (status = 200, description = "The OpenAPI 3 document", body = Object),
))]
async fn openapi_json() -> axum::Json<&'static utoipa::openapi::OpenApi> {
    axum::Json(&openapi::DOCUMENT)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this route does not accept that method",
    )
}
