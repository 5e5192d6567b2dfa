//! `GET /v1/jobs/{id}/events`: one job's events as Server-Sent Events, ending after the
//! terminal one. `Last-Event-ID` resumes from the stored log, so a reconnect misses nothing.
//!
//! State changes carry `id: <seq>` and `event: state`; streamed text comes as `event: delta`
//! without an id (deltas are not stored, so they cannot be resumed).

use crate::auth::Caller;
use crate::jobs::parse_id;
use crate::openapi::ErrorBody;
use crate::{ApiError, ApiState};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use sluice_notify::{Frame, Outgoing, Subscription};
use std::convert::Infallible;
use std::sync::Arc;

fn last_event_id(headers: &HeaderMap) -> Result<i32, ApiError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(0);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| ApiError::invalid("Last-Event-ID must be the id of an earlier event"))
}

/// The frame as an SSE event, its JSON (encoded once by the hub) as the `data:` line.
fn sse_event(frame: &Frame) -> Event {
    let event = match frame.message() {
        Outgoing::Event { seq, .. } => Event::default().id(seq.to_string()).event("state"),
        Outgoing::Delta { .. } => Event::default().event("delta"),
    };
    match std::str::from_utf8(&frame.json()) {
        // JSON escapes line breaks: the text is one `data:` line.
        Ok(json) => event.data(json),
        Err(_) => Event::default().comment("unencodable event"),
    }
}

/// The job's events as Server-Sent Events (`event: state` with `id: <seq>`, `event: delta`);
/// the stream ends after the terminal event.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs",
    security(("tenant_key" = [])),
    params(
        ("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404"),
        ("Last-Event-ID" = Option<i32>, Header, description = "Resume after this event's id"),
    ),
    responses(
        (status = 200, description = "An event stream of JSON `data:` lines", body = String, content_type = "text/event-stream"),
        (status = 401, description = "`unauthorized`: no key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown, malformed or another tenant's id", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a bad Last-Event-ID", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub async fn sse(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let id = parse_id(&id)?;
    let after = last_event_id(&headers)?;
    // Another tenant's job answers exactly like an unknown one.
    let job = state
        .store
        .get_job(&principal.tenant, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("no such job"))?;
    let mut subscription = state.hub.subscribe(&principal.tenant);
    subscription.follow(id, after).await;
    // `follow` has queued the stored events after `after`: a finished job with none of them
    // has nothing more to say, so the stream ends at once.
    let first = subscription.try_recv_frame();
    let done = job.state.is_terminal() && first.is_none();
    // Counted until the response stream is dropped: ended, or the client went away.
    let subscriber = crate::telemetry::Subscriber::open("sse");
    let events = stream::unfold(
        (subscription, first, done),
        |(mut sub, first, done): (Subscription, Option<Arc<Frame>>, bool)| async move {
            if done {
                return None;
            }
            let next = match first {
                Some(frame) => Some(frame),
                None => sub.recv_frame().await,
            };
            // A cut-off subscription's buffer was emptied: the client resumes from the log.
            match next {
                Some(frame) => {
                    let end = frame.message().is_terminal();
                    Some((Ok(sse_event(&frame)), (sub, None, end)))
                }
                None if sub.overloaded() => {
                    crate::telemetry::cut_off("sse");
                    let note = Event::default()
                        .event("error")
                        .data(r#"{"code":"overloaded","message":"too slow to keep up; reconnect with Last-Event-ID"}"#);
                    Some((Ok(note), (sub, None, true)))
                }
                None => None,
            }
        },
    )
    .map(move |event| {
        let _counted = &subscriber;
        event
    })
    .boxed();
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
