//! `GET /v1/stream`: a WebSocket on which a key follows its tenant's jobs (some, or all of
//! its user's) and receives their events and streamed text as JSON messages.
//!
//! Protocol (text frames, JSON; the schema is in docs/ARCHITECTURE.md "Events"):
//! client: `{"type":"auth","api_key":..}` (first, unless the upgrade had `Authorization`),
//! `{"type":"subscribe","request_ids":[..]}` or `{"type":"subscribe","all":true}`,
//! `{"type":"unsubscribe","request_ids":[..]}`; server: `ready`, `subscribed`, `event`,
//! `delta`, `error`. Close codes: 4401 not authenticated, 4408 too slow (buffer full).

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
use sluice_notify::{Outgoing, Subscription};
use std::sync::Arc;
use std::time::Duration;

/// Close code for a connection that never authenticated, or with a bad key.
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code for a subscriber too slow to keep up with its events.
pub const CLOSE_OVERLOADED: u16 = 4408;
/// How long a connection without `Authorization` has to send its `auth` message.
const AUTH_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings keep idle connections open through proxies and find dead peers.
const PING_EVERY: Duration = Duration::from_secs(20);

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
    let _ = socket.send(Message::Close(Some(frame))).await;
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
            outgoing = subscription.recv() => {
                // Once cut off, what is still buffered is stale: say why and go.
                let Some(first) = outgoing.filter(|_| !subscription.overloaded()) else {
                    let frame = CloseFrame {
                        code: CLOSE_OVERLOADED,
                        reason: Utf8Bytes::from_static("overloaded: too slow to keep up"),
                    };
                    write(&mut tx, write_timeout, Message::Close(Some(frame))).await;
                    return;
                };
                let sent = tokio::time::timeout(
                    write_timeout,
                    forward(&mut tx, first, &mut subscription),
                );
                if !matches!(sent.await, Ok(Ok(()))) {
                    return;
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

/// Send `first` and whatever else is waiting (up to a batch), then flush once.
async fn forward(
    tx: &mut SplitSink<WebSocket, Message>,
    first: Outgoing,
    subscription: &mut Subscription,
) -> Result<(), axum::Error> {
    let mut next = Some(first);
    let mut count = 0;
    while let Some(message) = next.take() {
        if let Ok(text) = serde_json::to_string(&message) {
            tx.feed(Message::Text(text.into())).await?;
        }
        count += 1;
        if count < FORWARD_BATCH && !subscription.overloaded() {
            next = subscription.try_recv();
        }
    }
    tx.flush().await
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
    let error =
        |code: &str, message: String| json!({ "type": "error", "code": code, "message": message });
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
        ClientMessage::Subscribe { request_ids, all } => {
            let mut followed = Vec::new();
            let mut unknown = Vec::new();
            for raw in request_ids {
                let owned = match raw.parse::<RequestId>() {
                    Ok(id) => match state.store.get_job(&principal.tenant, id).await {
                        Ok(Some(_)) => Some(id),
                        Ok(None) => None,
                        Err(e) => {
                            return error("internal", format!("could not look the job up: {e}"))
                        }
                    },
                    Err(_) => None,
                };
                // Another tenant's job is exactly as unknown as one that does not exist.
                match owned {
                    Some(id) => {
                        subscription.follow(id, 0).await;
                        followed.push(id.to_string());
                    }
                    None => unknown.push(raw),
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
            for id in request_ids
                .iter()
                .filter_map(|r| r.parse::<RequestId>().ok())
            {
                subscription.unfollow(id);
            }
            json!({ "type": "unsubscribed", "request_ids": request_ids })
        }
    }
}
