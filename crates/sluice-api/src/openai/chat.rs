//! `POST /v1/chat/completions` over the queue: the request becomes a job in the key's tier lane
//! and the connection is held until the job ends, answered whole or relayed as it streams.
//!
//! A held request waits at most `[openai] max_wait_secs` (or the client's own timeout, less a
//! margin): a job still waiting in its lane then is cancelled and the answer is 503 with
//! `Retry-After`; a running one finishes. A client that goes away leaves its job detached for
//! `disconnect_grace_secs`: a retry of the same body within it holds the same job, and after
//! it a job that never started is cancelled. Reused answers say so in `x-sluice-cache`.

use super::extract::{OpenAiCaller, OpenAiJson};
use super::wire::{self, Answer, ChatCall, Chunks};
use super::{OpenAiConfig, OpenAiError};
use crate::ApiState;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::StreamExt;
use sha2::{Digest, Sha256};
use sluice_admission::{Admitted, ReusePolicy, Submission};
use sluice_core::{JobState, Lane, RequestId};
use sluice_notify::{Outgoing, Subscription};
use sluice_store::{CancelOutcome, JobRecord, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Answer a client this long before its own timeout, so it gets a 503 rather than a timeout.
const CLIENT_TIMEOUT_MARGIN: Duration = Duration::from_secs(5);
/// How often a held request reads its job when the event stream cannot tell it.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// Create a chat completion: a job in the caller's lane, held until it ends.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "openai",
    security(("tenant_key" = [])),
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "A resend with the same key and body holds the first job"),
        ("x-sluice-reuse" = Option<String>, Header, description = "`allow`: reuse answers to sampled requests too; `never`: no reuse"),
    ),
    request_body(content = Object, content_type = "application/json",
        description = "OpenAI's chat completion request: model, messages (system, developer, user, assistant, tool; text and image_url parts), max_tokens or max_completion_tokens, temperature, top_p, stop, seed, tools, tool_choice, parallel_tool_calls, response_format, stream, stream_options, service_tier, user, metadata"),
    responses(
        (status = 200, description = "A `chat.completion` object, or with `stream: true` an event stream of `chat.completion.chunk` frames ending in `data: [DONE]`; `x-request-id` is the job's request_id", body = Object,
            headers(("x-request-id" = String, description = "The job's request_id"),
                    ("x-sluice-cache" = Option<String>, description = "`exact`, `semantic` or `dedup` when the answer was reused"))),
        (status = 400, description = "`invalid_request_error`: `param` names the field", body = Object),
        (status = 401, description = "`authentication_error`: no key, or an unknown or revoked one", body = Object),
        (status = 402, description = "`budget_exhausted`", body = Object),
        (status = 404, description = "`model_not_found`", body = Object),
        (status = 409, description = "`idempotency_conflict`", body = Object),
        (status = 429, description = "`rate_limit_exceeded` (a quota), with retry-after", body = Object),
        (status = 500, description = "`internal`", body = Object),
        (status = 502, description = "The job failed at the provider after Sluice's retries (`x-should-retry: false`)", body = Object),
        (status = 503, description = "`overloaded` (shed), or `queue_timeout`: the job waited longer than allowed and was cancelled", body = Object),
    ))]
#[tracing::instrument(name = "submit", skip_all, fields(request_id = tracing::field::Empty, tenant = %principal.tenant))]
pub(crate) async fn completions(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    headers: HeaderMap,
    OpenAiJson(body): OpenAiJson,
) -> Result<Response, OpenAiError> {
    let call = wire::parse_chat(body)?;
    let reuse = match header(&headers, "x-sluice-reuse") {
        None => ReusePolicy::Auto,
        Some("allow") => ReusePolicy::Allow,
        Some("never") => ReusePolicy::Never,
        Some(_) => {
            return Err(OpenAiError::invalid(
                "x-sluice-reuse",
                "x-sluice-reuse must be allow or never",
            ))
        }
    };
    let idempotency_key = crate::jobs::idempotency_key(&headers)?;
    let config = &state.openai;
    let tenant = principal.tenant.clone();
    let lane = state.intake.lane_for(principal.tier, call.lane);
    let hold_hash = hold_hash(&tenant, lane, &call);
    let wait = config.hold_for(client_timeout(&headers));

    // A retry of a request whose client went away takes up the job it left behind; the SDKs'
    // own retries (which say so) take it even if it finished meanwhile.
    let sdk_retry = header(&headers, "x-stainless-retry-count")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n > 0);
    let held = state
        .store
        .reattach(&tenant, &hold_hash, sdk_retry)
        .await
        .map_err(OpenAiError::internal)?;
    let (id, lane) = match held {
        Some(id) => {
            tracing::debug!(message = "a retry holds the job its client left", request_id = %id);
            (id, lane)
        }
        None => {
            let submission = Submission {
                lane: call.lane,
                // The caller is holding the connection for the answer: no email.
                email: Some(false),
                reuse,
                idempotency_key,
                ..Submission::new(call.request.clone())
            };
            match state.intake.submit(principal, submission).await? {
                Admitted::Answered { job, .. } => return Ok(answer_now(*job, &call)),
                Admitted::Queued(ticket) => (ticket.id, ticket.lane),
            }
        }
    };
    let mut subscription = state.hub.subscribe(&tenant);
    subscription.follow(id, 0).await;
    let guard = Detach {
        store: state.store.clone(),
        tenant: tenant.clone(),
        id,
        hold_hash,
        grace: config.disconnect_grace(),
        armed: true,
    };
    let hold = Hold {
        store: state.store.clone(),
        tenant,
        id,
        lane,
        deadline: Instant::now() + wait,
        estimate: state
            .intake
            .policy
            .estimate(lane, state.intake.policy.position_now(lane)),
    };
    if call.request.stream {
        let (tx, rx) = mpsc::channel::<Event>(64);
        let keepalive = config.keepalive();
        tokio::spawn(async move {
            relay(hold, subscription, guard, call, tx, keepalive).await;
        });
        let stream = tokio_stream_of(rx);
        let mut response = Sse::new(stream).into_response();
        job_headers(response.headers_mut(), id, lane, None);
        return Ok(response);
    }
    let mut guard = guard;
    let ended = hold.wait(&mut subscription, None).await;
    // Finished, or cancelled by the deadline: nothing is left for a retry to take up. (A client
    // that leaves drops this future with the guard still armed.)
    guard.armed = false;
    match ended? {
        Ended::Job(job) => finished(&job, lane),
        Ended::ClientGone => Err(OpenAiError::internal(
            "a request without a stream lost its client",
        )),
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// The client's own read timeout, as the official SDKs announce it.
fn client_timeout(headers: &HeaderMap) -> Option<Duration> {
    ["x-stainless-read-timeout", "x-stainless-timeout"]
        .iter()
        .find_map(|name| header(headers, name)?.parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.0)
        .map(Duration::from_secs_f64)
}

impl OpenAiConfig {
    /// How long to hold a request: the configured maximum, but answered a margin before the
    /// client's own timeout when it has room for one. A client with a shorter timeout leaves
    /// first, and the disconnect rule applies (racing it to the same instant would cancel a
    /// job its retry could have taken up).
    pub(crate) fn hold_for(&self, client: Option<Duration>) -> Duration {
        let max = Duration::from_secs_f64(self.max_wait_secs);
        match client {
            Some(t) if t > CLIENT_TIMEOUT_MARGIN * 2 => max.min(t - CLIENT_TIMEOUT_MARGIN),
            _ => max,
        }
    }
}

/// What identifies "the same request again" for a retry after a disconnect: tenant, lane and
/// the whole request.
fn hold_hash(tenant: &str, lane: Lane, call: &ChatCall) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(tenant.as_bytes());
    hash.update([0]);
    hash.update(lane.as_str().as_bytes());
    hash.update([0]);
    hash.update(serde_json::to_vec(&call.request).unwrap_or_default());
    hash.update([u8::from(call.include_usage)]);
    hash.finalize().to_vec()
}

/// Leaves the job for a retry to take up when the request ends before the job does (the
/// client went away): dropped armed, it marks the job detached for the grace period.
struct Detach {
    store: Store,
    tenant: String,
    id: RequestId,
    hold_hash: Vec<u8>,
    grace: Duration,
    armed: bool,
}

impl Drop for Detach {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let store = self.store.clone();
        let tenant = std::mem::take(&mut self.tenant);
        let hash = std::mem::take(&mut self.hold_hash);
        let (id, grace) = (self.id, self.grace);
        tokio::spawn(async move {
            match store.detach(&tenant, id, &hash, grace).await {
                Ok(true) => {
                    tracing::debug!(message = "client left; job detached", request_id = %id)
                }
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(message = "could not detach a job whose client left", request_id = %id, %error)
                }
            }
        });
    }
}

/// One held job and the deadline it must start by.
struct Hold {
    store: Store,
    tenant: String,
    id: RequestId,
    lane: Lane,
    deadline: Instant,
    estimate: Option<f64>,
}

/// What a held job did next.
enum Step {
    Message(Outgoing),
    /// The event stream can no longer tell; read the job instead.
    Poll,
    Deadline,
    /// Nothing was written to the stream for a while.
    KeepAlive,
    /// The client of a stream went away.
    Closed,
}

/// How a hold ended, short of an error to answer with.
enum Ended {
    Job(Box<JobRecord>),
    /// The client of a stream went away first.
    ClientGone,
}

impl Hold {
    async fn job(&self) -> Result<JobRecord, OpenAiError> {
        self.store
            .get_job(&self.tenant, self.id)
            .await
            .map_err(OpenAiError::internal)?
            .ok_or_else(|| OpenAiError::not_found("the job no longer exists").for_job(self.id))
    }

    /// The next thing to act on: a message, the deadline, or for a stream its keep-alive time
    /// and its client gone.
    async fn next(
        &self,
        sub: &mut Subscription,
        polling: bool,
        past_deadline: bool,
        stream: Option<&Relay>,
    ) -> Step {
        let deadline = async {
            if past_deadline {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep_until(self.deadline).await;
        };
        let gone = async {
            match stream {
                Some(relay) => relay.tx.closed().await,
                None => std::future::pending::<()>().await,
            }
        };
        let quiet = async {
            match stream {
                Some(relay) => tokio::time::sleep_until(relay.last_write + relay.keepalive).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = gone => Step::Closed,
            _ = deadline => Step::Deadline,
            _ = quiet => Step::KeepAlive,
            message = sub.recv(), if !polling => match message {
                Some(message) if !sub.overloaded() => Step::Message(message),
                _ => Step::Poll,
            },
            _ = tokio::time::sleep(POLL_EVERY), if polling => Step::Poll,
        }
    }

    /// Past the deadline: cancel the job if it has not started. `None` when it is running (it
    /// finishes) or already ended.
    async fn time_out(&self) -> Result<Option<OpenAiError>, OpenAiError> {
        match self
            .store
            .cancel_waiting(&self.tenant, self.id)
            .await
            .map_err(OpenAiError::internal)?
        {
            CancelOutcome::Cancelled => {
                let retry = self.estimate.unwrap_or(10.0).clamp(1.0, 3600.0);
                Ok(Some(
                    OpenAiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        format!(
                            "the job waited in the {} lane longer than this request may be held \
                             and was cancelled; try again later",
                            self.lane
                        ),
                    )
                    .code("queue_timeout")
                    .retry_after(Duration::from_secs_f64(retry))
                    .for_job(self.id),
                ))
            }
            CancelOutcome::Running | CancelOutcome::Terminal(_) => Ok(None),
            CancelOutcome::NotFound => {
                Err(OpenAiError::not_found("the job no longer exists").for_job(self.id))
            }
        }
    }

    /// Wait for the job to end (or be cancelled by the deadline); with `stream`, relay its
    /// deltas on the way and keep the connection alive while it waits.
    async fn wait(
        &self,
        sub: &mut Subscription,
        mut stream: Option<&mut Relay>,
    ) -> Result<Ended, OpenAiError> {
        let mut polling = false;
        let mut past_deadline = false;
        let mut state = JobState::Queued;
        loop {
            match self
                .next(sub, polling, past_deadline, stream.as_deref())
                .await
            {
                Step::Closed => return Ok(Ended::ClientGone),
                Step::KeepAlive => {
                    if let Some(relay) = stream.as_deref_mut() {
                        relay.keepalive(state).await;
                    }
                }
                Step::Deadline => {
                    past_deadline = true;
                    if let Some(timeout) = self.time_out().await? {
                        return Err(timeout);
                    }
                }
                Step::Poll => {
                    polling = true;
                    let job = self.job().await?;
                    if job.state.is_terminal() {
                        return Ok(Ended::Job(Box::new(job)));
                    }
                    state = job.state;
                    if past_deadline && state.is_claimable() {
                        if let Some(timeout) = self.time_out().await? {
                            return Err(timeout);
                        }
                    }
                }
                Step::Message(message) => {
                    if message.is_terminal() {
                        return self.job().await.map(|job| Ended::Job(Box::new(job)));
                    }
                    match (&message, stream.as_deref_mut()) {
                        (Outgoing::Delta { .. }, Some(relay)) => relay.delta(message).await?,
                        (Outgoing::Event { state: now, .. }, relay) => {
                            state = *now;
                            if let Some(relay) = relay {
                                relay.state(state)?;
                            }
                            // A job sent back to wait after the deadline does not wait again.
                            if past_deadline && state.is_claimable() {
                                if let Some(timeout) = self.time_out().await? {
                                    return Err(timeout);
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// The answer to a held request whose job ended.
fn finished(job: &JobRecord, lane: Lane) -> Result<Response, OpenAiError> {
    match job.state {
        JobState::Succeeded => {
            let mut response = axum::Json(wire::completion(job)).into_response();
            job_headers(
                response.headers_mut(),
                job.id,
                lane,
                job.cached.map(|c| c.as_str()),
            );
            Ok(response)
        }
        _ => Err(ended_badly(job)),
    }
}

/// A job that ended without an answer, as OpenAI's error: the provider's own 4xx status when it
/// refused the request, 502 when it failed, 409 when someone cancelled the job. Sluice already
/// retried, so the SDK must not.
pub(crate) fn ended_badly(job: &JobRecord) -> OpenAiError {
    let message = job
        .error
        .clone()
        .unwrap_or_else(|| format!("the job ended {}", job.state));
    let error = match job.state {
        JobState::Cancelled => {
            OpenAiError::new(StatusCode::CONFLICT, "invalid_request_error", message)
                .code("job_cancelled")
        }
        _ => {
            // The caller's request was at fault only for these; others (a provider's 401, 429)
            // are about Sluice's own keys and limits.
            let status = job
                .error_status
                .filter(|s| matches!(s, 400 | 404 | 413 | 422))
                .and_then(|s| StatusCode::from_u16(s).ok());
            match status {
                Some(status) => OpenAiError::new(status, "invalid_request_error", message),
                None => OpenAiError::new(StatusCode::BAD_GATEWAY, "server_error", message),
            }
            .code("provider_error")
        }
    };
    error.no_retry().for_job(job.id)
}

fn job_headers(headers: &mut HeaderMap, id: RequestId, lane: Lane, cache: Option<&str>) {
    if let Ok(value) = HeaderValue::try_from(id.to_string()) {
        headers.insert("x-request-id", value);
    }
    headers.insert("x-sluice-lane", HeaderValue::from_static(lane.as_str()));
    if let Some(cache) = cache.and_then(|c| HeaderValue::try_from(c).ok()) {
        headers.insert("x-sluice-cache", cache);
    }
}

/// A request answered at admission from another job's result.
fn answer_now(job: JobRecord, call: &ChatCall) -> Response {
    let cache = job.cached.map(|c| c.as_str());
    let mut response = if call.request.stream {
        let chunks = chunks_for(&job, call.include_usage);
        let answer = Answer::of(&job);
        let mut events = vec![data(&chunks.role())];
        if !answer.content.is_empty() {
            events.push(data(&chunks.text(&answer.content)));
        }
        events.extend(finish_frames(&chunks, &answer, call.include_usage));
        let stream =
            futures::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>));
        Sse::new(stream).into_response()
    } else {
        axum::Json(wire::completion(&job)).into_response()
    };
    job_headers(response.headers_mut(), job.id, job.lane, cache);
    response
}

fn chunks_for(job: &JobRecord, include_usage: bool) -> Chunks {
    Chunks::new(
        wire::completion_id(job),
        job.created_at.timestamp(),
        job.request.model.clone(),
        include_usage,
    )
}

fn data(chunk: &serde_json::Value) -> Event {
    Event::default().data(chunk.to_string())
}

/// Tool calls, the finish frame, the usage frame if asked for, then `[DONE]`.
fn finish_frames(chunks: &Chunks, answer: &Answer, include_usage: bool) -> Vec<Event> {
    let mut events = Vec::new();
    if !answer.tool_calls.is_empty() {
        events.push(data(&chunks.tool_calls(&answer.tool_calls)));
    }
    events.push(data(&chunks.finish(answer.finish_reason)));
    if include_usage {
        events.push(data(&chunks.usage(&answer.usage)));
    }
    events.push(Event::default().data("[DONE]"));
    events
}

fn tokio_stream_of(
    mut rx: mpsc::Receiver<Event>,
) -> impl futures::Stream<Item = Result<Event, std::convert::Infallible>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).map(Ok)
}

/// A streamed answer being relayed: the text sent so far, from which attempt, in order.
struct Relay {
    tx: mpsc::Sender<Event>,
    chunks: Chunks,
    /// The attempt whose deltas are being relayed; a later attempt's text replaces it only if
    /// none was sent.
    attempt: Option<i32>,
    next_index: u32,
    /// False once a delta went missing: the rest comes from the stored answer at the end.
    in_order: bool,
    sent: String,
    role_sent: bool,
    keepalive: Duration,
    last_write: Instant,
    id: RequestId,
}

impl Relay {
    async fn send(&mut self, event: Event) -> Result<(), OpenAiError> {
        self.last_write = Instant::now();
        self.tx
            .send(event)
            .await
            .map_err(|_| OpenAiError::internal("client gone"))
    }

    async fn role(&mut self) -> Result<(), OpenAiError> {
        if !self.role_sent {
            self.role_sent = true;
            let role = data(&self.chunks.role());
            self.send(role).await?;
        }
        Ok(())
    }

    async fn delta(&mut self, message: Outgoing) -> Result<(), OpenAiError> {
        let Outgoing::Delta {
            attempt,
            index,
            text,
            ..
        } = message
        else {
            return Ok(());
        };
        if self.attempt != Some(attempt) {
            if !self.sent.is_empty() {
                return Err(self.retried());
            }
            self.attempt = Some(attempt);
            self.next_index = 0;
            self.in_order = true;
        }
        if !self.in_order || index != self.next_index {
            // Deltas are best effort (the bus may drop some): the stored answer fills the gap.
            self.in_order = false;
            return Ok(());
        }
        self.next_index += 1;
        self.role().await?;
        let chunk = data(&self.chunks.text(&text));
        self.send(chunk).await?;
        self.sent.push_str(&text);
        Ok(())
    }

    fn state(&mut self, state: JobState) -> Result<(), OpenAiError> {
        if state == JobState::Retrying && !self.sent.is_empty() {
            return Err(self.retried());
        }
        Ok(())
    }

    fn retried(&self) -> OpenAiError {
        OpenAiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            format!(
                "the provider failed after part of the answer was streamed; Sluice is retrying \
                 the job: read its answer with GET /v1/jobs/{}",
                self.id
            ),
        )
        .code("stream_interrupted")
        .for_job(self.id)
    }

    /// A comment now and then while nothing else is sent, so proxies and clients keep the
    /// connection open while the job waits in its lane.
    async fn keepalive(&mut self, state: JobState) {
        if self.last_write.elapsed() >= self.keepalive {
            let word = if state == JobState::Running {
                "running"
            } else {
                "queued"
            };
            let _ = self.send(Event::default().comment(word)).await;
        }
    }

    /// The end of a succeeded job: whatever text the deltas did not carry, tool calls, the
    /// finish frame, usage, `[DONE]`.
    async fn finish(&mut self, job: &JobRecord, include_usage: bool) -> Result<(), OpenAiError> {
        let answer = Answer::of(job);
        let Some(rest) = answer.content.strip_prefix(self.sent.as_str()) else {
            return Err(OpenAiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                format!(
                    "the streamed text differs from the stored answer; read it with GET /v1/jobs/{}",
                    job.id
                ),
            )
            .code("stream_interrupted")
            .for_job(job.id));
        };
        let rest = rest.to_owned();
        self.role().await?;
        if !rest.is_empty() {
            let chunk = data(&self.chunks.text(&rest));
            self.send(chunk).await?;
        }
        for event in finish_frames(&self.chunks, &answer, include_usage) {
            self.send(event).await?;
        }
        Ok(())
    }
}

/// Relay a streamed job to its client until it ends, with keep-alive comments while it waits.
async fn relay(
    hold: Hold,
    mut sub: Subscription,
    mut guard: Detach,
    call: ChatCall,
    tx: mpsc::Sender<Event>,
    keepalive: Duration,
) {
    let job = match hold.job().await {
        Ok(job) => job,
        Err(error) => {
            let _ = tx.send(data(&error.body())).await;
            return;
        }
    };
    let mut relay = Relay {
        tx,
        chunks: chunks_for(&job, call.include_usage),
        attempt: None,
        next_index: 0,
        in_order: true,
        sent: String::new(),
        role_sent: false,
        keepalive,
        last_write: Instant::now(),
        id: hold.id,
    };
    let result = match hold.wait(&mut sub, Some(&mut relay)).await {
        // The client left: the guard stays armed and leaves the job for a retry.
        Ok(Ended::ClientGone) => return,
        Ok(Ended::Job(job)) if job.state == JobState::Succeeded => {
            relay.finish(&job, call.include_usage).await
        }
        Ok(Ended::Job(job)) => Err(ended_badly(&job)),
        Err(error) => Err(error),
    };
    guard.armed = false;
    if let Err(error) = result {
        // A failure after the 200 is an error frame, never a silent end; no [DONE] follows.
        let _ = relay.tx.send(data(&error.body())).await;
    }
}
