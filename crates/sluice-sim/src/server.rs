//! The axum server: OpenAI (chat and embeddings), Anthropic and Gemini routes, control routes, and the handle to drive it.
//! Handlers stay thin; decisions live in `state` and response bytes in `wire`.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
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
use crate::chat::{self, ChatRequest};
use crate::state::{LimitReason, Shared, Verdict};
use crate::wire;
use crate::{wire_anthropic, wire_embeddings, wire_gemini};
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
        .route("/v1/embeddings", post(embeddings))
        .route("/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        // Gemini serves the same methods under both API versions.
        .route("/v1beta/models/{call}", post(gemini))
        .route("/v1/models/{call}", post(gemini))
        .route("/sim/stats", get(get_stats))
        .route("/sim/faults", get(get_faults).put(put_faults))
        .route("/sim/reset", post(post_reset))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(shared)
}

/// The wire format a call arrived in: it decides the body of every answer and the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    OpenAi,
    Anthropic,
    /// `sse`: a streamed answer as `alt=sse` events rather than one JSON array.
    Gemini {
        sse: bool,
    },
}

/// A request body parsed into the common form, with the model to report; or the 400 message.
type Parsed = Result<(ChatRequest, String), String>;

async fn chat(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    openai_call(&shared, &headers, parse_openai(&body, None)).await
}

async fn openai_call(shared: &Shared, headers: &HeaderMap, parsed: Parsed) -> Response {
    handle_call(shared, Format::OpenAi, headers, openai_key(headers), parsed).await
}

/// Azure puts the deployment in the path and may omit `model` from the body.
async fn chat_azure(
    State(shared): AppState,
    Path(deployment): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    openai_call(&shared, &headers, parse_openai(&body, Some(deployment))).await
}

fn parse_openai(body: &[u8], deployment: Option<String>) -> Parsed {
    wire::parse_request(body).and_then(|req| match req.model.clone().or(deployment) {
        Some(model) => Ok((req, model)),
        None => Err("you must provide a model parameter".to_owned()),
    })
}

async fn messages(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    // Anthropic refuses calls without a version header; a missing one is a bad request.
    let parsed = if header_str(&headers, "anthropic-version").is_none() {
        Err("anthropic-version: header is required".to_owned())
    } else {
        wire_anthropic::parse_request(&body).map(|req| {
            let model = req.model.clone().unwrap_or_default();
            (req, model)
        })
    };
    let key = header_str(&headers, "x-api-key");
    handle_call(&shared, Format::Anthropic, &headers, key, parsed).await
}

async fn gemini(
    State(shared): AppState,
    Path(call): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (model, stream, sse) = match call.rsplit_once(':') {
        Some((model, "generateContent")) => (model, false, false),
        Some((model, "streamGenerateContent")) => {
            (model, true, query.get("alt").is_some_and(|a| a == "sse"))
        }
        _ => {
            let body = wire_gemini::error_body(404, &format!("Method not found: {call}"));
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
    };
    let parsed =
        wire_gemini::parse_request(&body, model, stream).map(|req| (req, model.to_owned()));
    let key = header_str(&headers, "x-goog-api-key")
        .or_else(|| query.get("key").map(|k| k.trim()).filter(|k| !k.is_empty()));
    handle_call(&shared, Format::Gemini { sse }, &headers, key, parsed).await
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

fn openai_key(headers: &HeaderMap) -> Option<&str> {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, key) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| key.trim())
        });
    bearer.or_else(|| header_str(headers, "api-key"))
}

/// Auth, limits and faults are the same for every format; only the bytes of the answer differ.
async fn handle_call(
    shared: &Shared,
    format: Format,
    headers: &HeaderMap,
    key: Option<&str>,
    parsed: Parsed,
) -> Response {
    let job = header_str(headers, "x-sluice-request-id");
    let verdict = shared.admit(key, job, parsed.is_ok());
    let resp = match (verdict, parsed) {
        (Verdict::Proceed { state }, Ok((req, model))) => {
            let mut resp = answer(shared, format, &req, &model).await;
            limit_headers(format, resp.headers_mut(), &state);
            resp
        }
        (verdict, parsed) => refuse(format, key.is_some(), verdict, parsed.err()),
    };
    with_request_id(resp)
}

/// OpenAI embeddings: the same key check, limits and faults as chat (see
/// [`Shared::admit_embeddings`] for how they are kept apart), answered at once: the latency
/// setting models generating a reply, which an embedding does not do.
async fn embeddings(State(shared): AppState, headers: HeaderMap, body: Bytes) -> Response {
    let key = openai_key(&headers);
    let parsed = wire_embeddings::parse_request(&body);
    let verdict = shared.admit_embeddings(key, parsed.is_ok());
    let resp = match (verdict, parsed) {
        (Verdict::Proceed { state }, Ok(req)) => {
            let mut resp = Json(wire_embeddings::response_body(&req)).into_response();
            limit_headers(Format::OpenAi, resp.headers_mut(), &state);
            resp
        }
        (verdict, parsed) => refuse(Format::OpenAi, key.is_some(), verdict, parsed.err()),
    };
    with_request_id(resp)
}

fn with_request_id(mut resp: Response) -> Response {
    if let Ok(v) = HeaderValue::try_from(format!("req-sim-{}", Uuid::now_v7().simple())) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The answer to a call that is not served, in `format`'s error shape; `invalid` is the 400
/// message of a body that did not parse.
fn refuse(format: Format, key_given: bool, verdict: Verdict, invalid: Option<String>) -> Response {
    match verdict {
        Verdict::Unauthorized => unauthorized(format, key_given),
        Verdict::Limited {
            key_name,
            state,
            retry_after,
            reason,
        } => {
            let body = match format {
                Format::OpenAi => wire::rate_limit_body(&key_name, state.limit, retry_after),
                Format::Anthropic => {
                    wire_anthropic::rate_limit_body(&key_name, state.limit, retry_after)
                }
                Format::Gemini { .. } => {
                    wire_gemini::rate_limit_body(&key_name, state.limit, retry_after)
                }
            };
            let mut resp = (StatusCode::TOO_MANY_REQUESTS, Json(body)).into_response();
            // A provider telling us to back off means exactly what it says; our own limits are
            // rounded up so a client that obeys never comes back too early.
            let exact = reason == LimitReason::Told;
            retry_headers(format, resp.headers_mut(), retry_after, exact);
            limit_headers(format, resp.headers_mut(), &state);
            resp
        }
        Verdict::Fault { status, state } => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let body = match format {
                Format::OpenAi => wire::fault_body(status),
                Format::Anthropic => wire_anthropic::fault_body(status),
                Format::Gemini { .. } => wire_gemini::fault_body(status),
            };
            let mut resp = (code, Json(body)).into_response();
            if status == 429 {
                retry_headers(format, resp.headers_mut(), Duration::from_secs(1), true);
            }
            limit_headers(format, resp.headers_mut(), &state);
            resp
        }
        // Verdict::Invalid, or (defensively) a go-ahead for a body that did not parse.
        Verdict::Invalid | Verdict::Proceed { .. } => {
            let message = invalid.unwrap_or_else(|| "Invalid request.".to_owned());
            let body = match format {
                Format::OpenAi => wire::error_body(&message, "invalid_request_error", None),
                Format::Anthropic => wire_anthropic::error_body("invalid_request_error", &message),
                Format::Gemini { .. } => wire_gemini::error_body(400, &message),
            };
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

fn unauthorized(format: Format, key_given: bool) -> Response {
    match format {
        Format::OpenAi => {
            (StatusCode::UNAUTHORIZED, Json(wire::invalid_key_body())).into_response()
        }
        Format::Anthropic => (
            StatusCode::UNAUTHORIZED,
            Json(wire_anthropic::invalid_key_body()),
        )
            .into_response(),
        Format::Gemini { .. } => {
            let (status, body) = wire_gemini::invalid_key_body(key_given);
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED);
            (status, Json(body)).into_response()
        }
    }
}

async fn answer(shared: &Shared, format: Format, req: &ChatRequest, model: &str) -> Response {
    let latency = &shared.config.latency;
    if !latency.is_zero() {
        let delay = latency.sample(&mut rand::thread_rng());
        tokio::time::sleep(delay).await;
    }
    shared.record_ok();
    let reply = chat::reply_for(req, shared.config.completion_tokens);
    let sse = |body: String| {
        (
            [
                (CONTENT_TYPE, "text/event-stream"),
                (CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response()
    };
    match format {
        Format::OpenAi => {
            let id = format!("chatcmpl-sim-{}", Uuid::now_v7());
            let created = chrono::Utc::now().timestamp();
            if req.stream {
                sse(wire::stream_body(
                    &id,
                    created,
                    model,
                    &reply,
                    req.include_usage,
                ))
            } else {
                Json(wire::completion_body(&id, created, model, &reply)).into_response()
            }
        }
        Format::Anthropic => {
            let id = format!("msg_sim_{}", Uuid::now_v7().simple());
            if req.stream {
                sse(wire_anthropic::stream_body(&id, model, &reply))
            } else {
                Json(wire_anthropic::message_body(&id, model, &reply)).into_response()
            }
        }
        Format::Gemini { sse: as_sse } => {
            if !req.stream {
                return Json(wire_gemini::response_body(model, &reply)).into_response();
            }
            let chunks = wire_gemini::stream_chunks(model, &reply);
            if as_sse {
                sse(wire_gemini::sse_body(&chunks))
            } else {
                // Without alt=sse Gemini streams one JSON array of the same chunks.
                Json(chunks).into_response()
            }
        }
    }
}

fn limit_headers(format: Format, h: &mut HeaderMap, s: &LimitState) {
    match format {
        Format::OpenAi => {
            h.insert("x-ratelimit-limit-requests", HeaderValue::from(s.limit));
            h.insert(
                "x-ratelimit-remaining-requests",
                HeaderValue::from(s.remaining),
            );
            if let Ok(v) = HeaderValue::try_from(wire::openai_duration(s.reset)) {
                h.insert("x-ratelimit-reset-requests", v);
            }
        }
        Format::Anthropic => {
            h.insert(
                "anthropic-ratelimit-requests-limit",
                HeaderValue::from(s.limit),
            );
            h.insert(
                "anthropic-ratelimit-requests-remaining",
                HeaderValue::from(s.remaining),
            );
            // Anthropic reports when the bucket is full again as an RFC 3339 instant.
            let reset = chrono::Duration::from_std(s.reset)
                .ok()
                .and_then(|d| chrono::Utc::now().checked_add_signed(d));
            if let Some(at) = reset {
                let text = at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                if let Ok(v) = HeaderValue::try_from(text) {
                    h.insert("anthropic-ratelimit-requests-reset", v);
                }
            }
        }
        // Gemini sends no rate-limit headers besides retry-after.
        Format::Gemini { .. } => {}
    }
}

/// `exact` sends whole seconds as given; otherwise the wait is rounded up to at least 1 s.
fn retry_headers(format: Format, h: &mut HeaderMap, retry_after: Duration, exact: bool) {
    let ms = u64::try_from(retry_after.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    let secs = if exact {
        retry_after.as_secs()
    } else {
        ms.div_ceil(1000).max(1)
    };
    h.insert("retry-after", HeaderValue::from(secs));
    // Only OpenAI sends the millisecond variant.
    if format == Format::OpenAi {
        h.insert("retry-after-ms", HeaderValue::from(ms));
    }
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

    /// The OpenAI- and Anthropic-style base URL, e.g. `http://127.0.0.1:PORT/v1`, with a wildcard
    /// bind address replaced by loopback so it can be dialled.
    pub fn base_url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}/v1", SocketAddr::new(ip, self.addr.port()))
    }

    /// The Gemini-style base URL, e.g. `http://127.0.0.1:PORT/v1beta` (`/v1` is served too).
    pub fn gemini_base_url(&self) -> String {
        let v1 = self.base_url();
        format!("{v1}beta")
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// For each key (by name), the most calls received within any `window` since start or
    /// reset, refused ones included: what a provider counts against the key's limit.
    pub fn busiest_window(
        &self,
        window: std::time::Duration,
    ) -> std::collections::BTreeMap<String, u64> {
        self.shared.busiest_window(window)
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
