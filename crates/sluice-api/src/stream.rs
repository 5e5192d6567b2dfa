//! `GET /v1/stream`: a WebSocket on which a key follows its tenant's jobs (some, or all of
//! its user's) and receives their events and streamed text as JSON messages.
//!
//! Protocol (text frames, JSON; the schema is in docs/ARCHITECTURE.md "Events"):
//! client: `{"type":"auth","api_key":..}` (first, unless the upgrade had `Authorization`),
//! `{"type":"subscribe","request_ids":[..],"after":{"<id>":<seq>}}` (`after` optional: resume
//! after that event) or `{"type":"subscribe","all":true}`,
//! `{"type":"unsubscribe","request_ids":[..]}`; server: `ready`, `subscribed`, `event`,
//! `delta`, `error`. Close codes: 4401 not authenticated, 4408 too slow (buffer past its
//! bound in bytes).

use crate::auth::{authenticate, bearer};
use crate::openapi::ErrorBody;
use crate::{ApiError, ApiState};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::json;
use sluice_core::{Principal, RequestId};
use sluice_notify::{Frame, Subscription};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Close code for a connection that never authenticated, or with a bad key.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code for a subscriber too slow to keep up with its events.
pub const CLOSE_OVERLOADED: u16 = 4408;
/// How long a connection without `Authorization` has to send its `auth` message.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings keep idle connections open through proxies and find dead peers.
const PING_EVERY: Duration = Duration::from_secs(20);
/// Ids one subscribe or unsubscribe message may name: each is a look-up and a line of reply.
pub const MAX_IDS_PER_MESSAGE: usize = 1_000;
/// Jobs one connection may follow by id (`all` follows a user's jobs without a list).
pub const MAX_IDS_PER_CONNECTION: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Auth {
        api_key: String,
    },
    Subscribe {
        #[serde(default)]
        request_ids: Vec<String>,
        #[serde(default)]
        all: bool,
        /// Per id of `request_ids`: resume after this `seq` (like SSE's `Last-Event-ID`).
        #[serde(default)]
        after: HashMap<String, i64>,
    },
    Unsubscribe {
        #[serde(default)]
        request_ids: Vec<String>,
    },
}

/// Upgrade to the WebSocket; the key comes as `Authorization` or as the first message.
#[utoipa::path(get, path = "/v1/stream", tag = "jobs",
    security(("tenant_key" = []), ()),
    responses(
        (status = 101, description = "Switched to the WebSocket protocol (messages: docs/ARCHITECTURE.md); a bad key closes it with code 4401"),
        (status = 400, description = "`not_a_websocket`: the request is not a WebSocket upgrade", body = ErrorBody),
        (status = 426, description = "`not_a_websocket`: the connection cannot be upgraded", body = ErrorBody),
    ))]
pub async fn websocket(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // axum's own rejection is plain text: answer in the API's one error shape instead.
    let ws = ws.map_err(|rejection| {
        ApiError::new(rejection.status(), "not_a_websocket", rejection.body_text())
    })?;
    let key = bearer(&headers).map(str::to_owned);
    Ok(ws.on_upgrade(move |socket| run(socket, state, key)))
}

async fn close(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    if socket.send(Message::Close(Some(frame))).await.is_ok() {
        linger(socket, Instant::now() + CLOSE_REPLY_TIMEOUT).await;
    }
}

/// How long a refused connection waits for the peer's answer to its close frame.
const CLOSE_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// After our close frame, read and drop what the peer still sends, until its own close frame,
/// the end, or `by`. Dropping a socket with unread bytes in it (a pong to an earlier ping, a
/// pipelined message) makes the kernel reset the connection, and the reset throws away what
/// the peer has not read yet: our close frame with it.
async fn linger<S, E>(rx: &mut S, by: Instant)
where
    S: futures::Stream<Item = Result<Message, E>> + Unpin,
{
    let _ = tokio::time::timeout_at(by, async {
        while let Some(Ok(message)) = rx.next().await {
            if matches!(message, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Authenticate from the upgrade's header, or the first message.
async fn principal(
    socket: &mut WebSocket,
    state: &ApiState,
    key: Option<String>,
) -> Option<Principal> {
    let key = match key {
        Some(key) => key,
        None => {
            let first = tokio::time::timeout(AUTH_TIMEOUT, socket.recv()).await;
            let Ok(Some(Ok(Message::Text(text)))) = first else {
                return None;
            };
            match serde_json::from_str::<ClientMessage>(&text) {
                Ok(ClientMessage::Auth { api_key }) => api_key,
                _ => return None,
            }
        }
    };
    authenticate(state, &key).await.ok()
}

async fn run(mut socket: WebSocket, state: Arc<ApiState>, key: Option<String>) {
    let Some(principal) = principal(&mut socket, &state, key).await else {
        close(
            &mut socket,
            CLOSE_UNAUTHORIZED,
            "unauthorized: send a valid API key",
        )
        .await;
        return;
    };
    // Counted from authentication until the socket closes, however it closes.
    let _subscriber = crate::telemetry::Subscriber::open("websocket");
    let mut subscription = state.hub.subscribe(&principal.tenant);
    let write_timeout = state.hub.config().write_timeout();
    let close_timeout = state.hub.config().close_timeout();
    let (mut tx, mut rx) = socket.split();
    let ready = json!({ "type": "ready", "tenant": principal.tenant, "user": principal.user });
    if !write(
        &mut tx,
        write_timeout,
        Message::Text(ready.to_string().into()),
    )
    .await
    {
        return;
    }
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            incoming = rx.next() => {
                let reply = match incoming {
                    Some(Ok(Message::Text(text))) => {
                        handle(&state, &principal, &subscription, &text).await
                    }
                    Some(Ok(Message::Binary(_))) => json!({
                        "type": "error", "code": "invalid_message",
                        "message": "messages are JSON in text frames, not binary",
                    }),
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => continue,
                };
                if !write(&mut tx, write_timeout, Message::Text(reply.to_string().into())).await {
                    return;
                }
            }
            outgoing = subscription.recv_frame() => {
                // A live subscription's buffer only ends when it was cut off (and emptied).
                let Some(first) = outgoing else {
                    crate::telemetry::cut_off("websocket");
                    let by = Instant::now() + close_timeout;
                    if close_overloaded(&mut tx, by).await {
                        linger(&mut rx, by).await;
                    }
                    return;
                };
                let limits = Limits { write_timeout, close_timeout };
                match forward(&mut tx, first, &mut subscription, limits).await {
                    Forwarded::Open => {}
                    Forwarded::Gone => return,
                    Forwarded::Closing(by) => {
                        linger(&mut rx, by).await;
                        return;
                    }
                }
            }
            _ = ping.tick() => {
                if !write(&mut tx, write_timeout, Message::Ping(Default::default())).await {
                    return;
                }
            }
        }
    }
}

/// Messages written before one flush: a burst of deltas costs one write, not one per message.
const FORWARD_BATCH: usize = 256;

/// How long the writes of one connection may take.
#[derive(Clone, Copy)]
struct Limits {
    /// One batch (the peer not reading): past it the connection is dropped.
    write_timeout: Duration,
    /// Once cut off: the batch under way and the close frame, together.
    close_timeout: Duration,
}

/// The frame's JSON as a text message, sharing its bytes (they were encoded once, by the hub).
fn text(frame: &Frame) -> Option<Message> {
    Utf8Bytes::try_from(frame.json()).ok().map(Message::Text)
}

/// Where `forward` leaves a connection.
enum Forwarded {
    /// Written; the connection goes on.
    Open,
    /// Dropped: the peer left, or stopped reading.
    Gone,
    /// Cut off and our close frame sent: the peer has until then to answer it.
    Closing(Instant),
}

/// Send `first` and whatever else is waiting (up to a batch), then flush once. A peer that stops reading blocks the flush while the hub keeps
/// queueing: when that passes the bound, the subscription is cut off (and its buffer freed)
/// mid-write, and the connection gets `close_timeout` to finish the batch and send 4408.
async fn forward(
    tx: &mut SplitSink<WebSocket, Message>,
    first: Arc<Frame>,
    subscription: &mut Subscription,
    limits: Limits,
) -> Forwarded {
    let mut batch = vec![first];
    while batch.len() < FORWARD_BATCH {
        match subscription.try_recv_frame() {
            Some(frame) => batch.push(frame),
            None => break,
        }
    }
    let deadline = Instant::now() + limits.write_timeout;
    let sink = &mut *tx;
    let mut write = Box::pin(async move {
        for message in batch.iter().filter_map(|f| text(f)) {
            sink.feed(message).await?;
        }
        sink.flush().await
    });
    tokio::select! {
        written = &mut write => {
            return if written.is_ok() { Forwarded::Open } else { Forwarded::Gone };
        }
        () = tokio::time::sleep_until(deadline) => return Forwarded::Gone,
        () = subscription.cut_off() => crate::telemetry::cut_off("websocket"),
    }
    let close_by = deadline.min(Instant::now() + limits.close_timeout);
    let finished = tokio::time::timeout_at(close_by, write).await;
    if matches!(finished, Ok(Ok(()))) && close_overloaded(tx, close_by).await {
        return Forwarded::Closing(close_by);
    }
    Forwarded::Gone
}

/// Tell a subscriber it was cut off for being too slow, giving up at `by`: a peer that does
/// not read never takes the frame, and the caller then drops the connection. True when sent.
async fn close_overloaded(tx: &mut SplitSink<WebSocket, Message>, by: Instant) -> bool {
    let frame = CloseFrame {
        code: CLOSE_OVERLOADED,
        reason: Utf8Bytes::from_static("overloaded: too slow to keep up; resubscribe with after"),
    };
    matches!(
        tokio::time::timeout_at(by, tx.send(Message::Close(Some(frame)))).await,
        Ok(Ok(()))
    )
}

/// Send one message; false if the connection is gone or the peer stopped reading. A peer that
/// does not read blocks our writes, so past `timeout` it is dropped: a stuck connection holds
/// no more than its bounded buffer.
async fn write(
    tx: &mut SplitSink<WebSocket, Message>,
    timeout: Duration,
    message: Message,
) -> bool {
    matches!(
        tokio::time::timeout(timeout, tx.send(message)).await,
        Ok(Ok(()))
    )
}

/// Answer one client message.
async fn handle(
    state: &ApiState,
    principal: &Principal,
    subscription: &Subscription,
    text: &str,
) -> serde_json::Value {
    // A bad frame may be megabytes: the reply quotes no more than an excerpt of it.
    let error = |code: &str, message: String| {
        json!({
            "type": "error", "code": code,
            "message": sluice_core::shorten_message(&message),
        })
    };
    let message = match serde_json::from_str::<ClientMessage>(text) {
        Ok(m) => m,
        Err(e) => {
            return error(
                "invalid_message",
                format!("not a message this socket understands: {e}"),
            )
        }
    };
    match message {
        ClientMessage::Auth { .. } => error(
            "already_authenticated",
            "this socket is authenticated".into(),
        ),
        ClientMessage::Subscribe {
            request_ids,
            all,
            after,
        } => {
            let request_ids = distinct(request_ids);
            if request_ids.len() > MAX_IDS_PER_MESSAGE {
                return too_many(request_ids.len(), "in one message", MAX_IDS_PER_MESSAGE);
            }
            // Checked whole before anything is followed: a bad `after` changes nothing.
            let after = match resume_points(&request_ids, after) {
                Ok(after) => after,
                Err(message) => return error("invalid_message", message),
            };
            let following = subscription.followed();
            if following + request_ids.len() > MAX_IDS_PER_CONNECTION {
                return too_many(
                    following + request_ids.len(),
                    "on one connection",
                    MAX_IDS_PER_CONNECTION,
                );
            }
            let mut followed = Vec::new();
            let mut unknown = Vec::new();
            for raw in request_ids {
                let owned = match raw.parse::<RequestId>() {
                    Ok(id) => match state.store.get_job(&principal.tenant, id).await {
                        Ok(Some(_)) => Some(id),
                        Ok(None) => None,
                        Err(e) => {
                            // The store's error is for the log, not for the client.
                            tracing::warn!(message = "subscribe: job look-up failed", request_id = %id, error = %e);
                            return error(
                                "internal",
                                "could not look the job up; try again".into(),
                            );
                        }
                    },
                    Err(_) => None,
                };
                // Another tenant's job is exactly as unknown as one that does not exist.
                match owned {
                    Some(id) => {
                        let after = after.get(&id).copied().unwrap_or(0);
                        subscription.follow(id, after).await;
                        followed.push(id.to_string());
                    }
                    None => unknown.push(sluice_core::excerpt(&raw).to_string()),
                }
            }
            if all {
                subscription.follow_user(&principal.user);
            }
            if !unknown.is_empty() {
                return json!({
                    "type": "error", "code": "not_found", "message": "no such job",
                    "request_ids": unknown, "subscribed": followed,
                });
            }
            json!({ "type": "subscribed", "request_ids": followed, "all": all })
        }
        ClientMessage::Unsubscribe { request_ids } => {
            let request_ids = distinct(request_ids);
            if request_ids.len() > MAX_IDS_PER_MESSAGE {
                return too_many(request_ids.len(), "in one message", MAX_IDS_PER_MESSAGE);
            }
            for id in request_ids
                .iter()
                .filter_map(|r| r.parse::<RequestId>().ok())
            {
                subscription.unfollow(id);
            }
            let echoed: Vec<String> = request_ids
                .iter()
                .map(|r| sluice_core::excerpt(r).to_string())
                .collect();
            json!({ "type": "unsubscribed", "request_ids": echoed })
        }
    }
}

/// A subscribe's `after`: each key one of its `request_ids`, each value a `seq` (0 or more).
fn resume_points(
    request_ids: &[String],
    after: HashMap<String, i64>,
) -> Result<HashMap<RequestId, i32>, String> {
    let named: std::collections::HashSet<RequestId> = request_ids
        .iter()
        .filter_map(|raw| raw.parse().ok())
        .collect();
    let mut points = HashMap::with_capacity(after.len());
    for (raw, seq) in after {
        let id = raw
            .parse::<RequestId>()
            .ok()
            .filter(|id| named.contains(id))
            .ok_or_else(|| {
                format!(
                    "after names {:?}, which is not one of this message's request_ids",
                    sluice_core::excerpt(&raw)
                )
            })?;
        let seq = i32::try_from(seq)
            .ok()
            .filter(|seq| *seq >= 0)
            .ok_or_else(|| {
                format!("after.{id} must be the seq of an earlier event (0 or more), not {seq}")
            })?;
        points.insert(id, seq);
    }
    Ok(points)
}

/// `ids` without repeats, in first-seen order: a repeated id is followed (and echoed) once.
fn distinct(ids: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::with_capacity(ids.len());
    ids.into_iter()
        .filter(|id| seen.insert(id.clone()))
        .collect()
}

/// The refusal of a message naming more ids than a cap; nothing in it is followed.
fn too_many(count: usize, scope: &str, cap: usize) -> serde_json::Value {
    json!({
        "type": "error", "code": "too_many_ids",
        "message": format!(
            "{count} distinct request ids {scope}; at most {cap} (subscribe with \"all\": true to follow every job of your user)"
        ),
        "max": cap,
    })
}
