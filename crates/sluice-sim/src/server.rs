//! The axum server: chat-completions routes, control routes, and the handle to drive it.
//! Handlers stay thin; decisions live in `state` and response bytes in `wire`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use uuid::Uuid;

use crate::bucket::LimitState;
use crate::state::{Shared, Verdict};
use crate::wire::{self, ChatRequest};
use crate::{Faults, SimConfig, SimStats};

type AppState = State<Arc<Shared>>;

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/chat/completions", post(chat))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat_azure),
        )
        .route("/sim/stats", get(get_stats))
        .route("/sim/faults", get(get_faults).put(put_faults))
        .route("/sim/reset", post(post_reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared)
}

async fn chat(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    handle_chat(&shared, &headers, &body, None).await
}

/// Azure puts the deployment in the path and may omit `model` from the body.
async fn chat_azure(
    State(shared): AppState,
    Path(deployment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    handle_chat(&shared, &headers, &body, Some(deployment)).await
}

fn api_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    bearer.or_else(|| {
        headers
            .get("api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    })
}

async fn handle_chat(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    deployment: Option<String>,
) -> Response {
    let job = headers
        .get("x-sluice-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let parsed = wire::parse_request(body).and_then(|req| match req.model.clone().or(deployment) {
        Some(model) => Ok((req, model)),
        None => Err("you must provide a model parameter".to_owned()),
    });
    let verdict = shared.admit(api_key(headers), job, parsed.is_ok());

    let mut resp = match (verdict, parsed) {
        (Verdict::Unauthorized, _) => {
            (StatusCode::UNAUTHORIZED, Json(wire::invalid_key_body())).into_response()
        }
        (
            Verdict::Limited {
                key_name,
                state,
                retry_after,
            },
            _,
        ) => {
            let body = wire::rate_limit_body(&key_name, state.limit, retry_after);
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            retry_headers(resp.headers_mut(), retry_after);
            limit_headers(resp.headers_mut(), &state);
            resp
        }
        (Verdict::Fault { status, state }, _) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = (code, Json(wire::fault_body(status))).into_response();
            if status == 429 {
                retry_headers(resp.headers_mut(), Duration::from_secs(1));
            }
            limit_headers(resp.headers_mut(), &state);
            resp
        }
        (Verdict::Proceed { state }, Ok((req, model))) => {
            let mut resp = answer(shared, &req, &model).await;
            limit_headers(resp.headers_mut(), &state);
            resp
        }
        // Verdict::Invalid, or (defensively) any verdict for a body that did not parse.
        (_, parsed) => {
            let message = parsed
                .err()
                .unwrap_or_else(|| "Invalid request.".to_owned());
            let body = wire::error_body(&message, "invalid_request_error", None);
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    };
    if let Ok(v) = HeaderValue::try_from(format!("req-sim-{}", Uuid::now_v7().simple())) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

async fn answer(shared: &Shared, req: &ChatRequest, model: &str) -> Response {
    let latency = &shared.config.latency;
    if !latency.is_zero() {
        let delay = latency.sample(&mut rand::thread_rng());
        tokio::time::sleep(delay).await;
    }
    shared.record_ok();
    let reply = wire::reply_for(req, shared.config.completion_tokens);
    let id = format!("chatcmpl-sim-{}", Uuid::now_v7());
    let created = chrono::Utc::now().timestamp();
    if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let body = wire::stream_body(&id, created, model, &reply, include_usage);
        (
            [
                (CONTENT_TYPE, "text/event-stream"),
                (CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response()
    } else {
        Json(wire::completion_body(&id, created, model, &reply)).into_response()
    }
}

fn limit_headers(h: &mut HeaderMap, s: &LimitState) {
    h.insert("x-ratelimit-limit-requests", HeaderValue::from(s.limit));
    h.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from(s.remaining),
    );
    if let Ok(v) = HeaderValue::try_from(wire::openai_duration(s.reset)) {
        h.insert("x-ratelimit-reset-requests", v);
    }
}

fn retry_headers(h: &mut HeaderMap, retry_after: Duration) {
    let ms = u64::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    h.insert("retry-after", HeaderValue::from(ms.div_ceil(1000).max(1)));
    h.insert("retry-after-ms", HeaderValue::from(ms));
}

async fn get_stats(State(shared): AppState) -> Json<SimStats> {
    Json(shared.stats())
}

async fn get_faults(State(shared): AppState) -> Json<Faults> {
    Json(shared.faults())
}

/// Takes raw bytes so a bad body gets a 400 in OpenAI's error shape rather than axum's 422.
async fn put_faults(State(shared): AppState, body: Bytes) -> Response {
    let faults = serde_json::from_slice::<Faults>(&body)
        .map_err(|e| format!("invalid faults: {e}"))
        .and_then(|f| f.validate().map(|()| f));
    match faults {
        Ok(f) => {
            shared.set_faults(f.clone());
            Json(f).into_response()
        }
        Err(message) => {
            let body: Value = wire::error_body(&message, "invalid_request_error", None);
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

async fn post_reset(State(shared): AppState) -> StatusCode {
    shared.reset();
    StatusCode::NO_CONTENT
}

fn invalid_config(message: String) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("invalid simulator config: {message}"),
    )
}

/// Serves on `listener` until `shutdown` resolves.
async fn run(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // Without TCP_NODELAY, keep-alive clients can stall on Nagle + delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serves the simulator on `listener` until Ctrl-C; used by the `sluice sim` command.
pub async fn serve(listener: TcpListener, config: SimConfig) -> std::io::Result<()> {
    config.validate().map_err(invalid_config)?;
    let names: Vec<&str> = config.keys.iter().map(|k| k.name.as_str()).collect();
    tracing::info!(addr = %listener.local_addr()?, keys = ?names, "provider simulator listening");
    let shared = Arc::new(Shared::new(config));
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handling available: run until the task is dropped instead.
            std::future::pending::<()>().await;
        }
    };
    run(listener, shared, ctrl_c).await
}

/// Binds `addr` (port 0 picks a free port) and serves in a background tokio task.
pub async fn spawn(config: SimConfig, addr: SocketAddr) -> std::io::Result<SimHandle> {
    config.validate().map_err(invalid_config)?;
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared::new(config));
    let (stop, mut stopped) = watch::channel(false);
    let task_shared = shared.clone();
    tokio::spawn(async move {
        let shutdown = async move {
            // Dropping every handle without calling shutdown leaves the server running.
            if stopped.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        };
        if let Err(e) = run(listener, task_shared, shutdown).await {
            tracing::warn!(%addr, error = %e, "provider simulator stopped with an error");
        }
    });
    tracing::debug!(%addr, "provider simulator spawned");
    Ok(SimHandle {
        addr,
        shared,
        stop: Arc::new(stop),
    })
}

/// A cloneable handle to a simulator started with [`spawn`].
#[derive(Clone)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Arc<watch::Sender<bool>>,
}

impl std::fmt::Debug for SimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SimHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI-style base URL, e.g. `http://127.0.0.1:PORT/v1`, with a wildcard
    /// bind address replaced by loopback so it can be dialled.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}/v1", SocketAddr::new(ip, self.addr.port()))
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Calls seen with `x-sluice-request-id: request_id`, including limited and failed ones.
    pub fn calls_for_job(&self, request_id: &str) -> u64 {
        self.shared.calls_for_job(request_id)
    }

    /// Replaces the fault plan. `fail_first` keeps counting from the last reset.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// Clears counters and fault progress and refills every bucket; faults stay as set.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting connections and lets in-flight calls finish.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }
}
