//! Submit, poll and cancel jobs. Bodies are parsed into [`JobRequest`] at the edge, so
//! everything after this module trusts its input.

use crate::admission::Admission;
use crate::auth::Caller;
use crate::json::JsonBody;
use crate::openapi::{schemas, ErrorBody};
use crate::telemetry;
use crate::{ApiError, ApiState};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_core::{JobRequest, JobState, Lane, Message, Principal, RequestId, Tier};
use sluice_providers::POOL_ROUTE_PREFIX;
use sluice_store::{Accepted as StoreAccepted, CancelOutcome, Ingested, JobRecord, NewJob, Reuse};
use std::sync::Arc;

const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_MESSAGES: usize = 1_000;

/// The body of `POST /v1/jobs`. Unknown fields are refused, so a `tier` in the body is an error, not a hint.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "default", "messages": [{"role": "user", "content": "What is a sluice?"}]}))]
pub struct SubmitJob {
    /// A model alias the configuration routes (the 422 `unknown_model` lists them).
    pub model: String,
    #[schema(value_type = Vec<schemas::Message>, min_items = 1, max_items = 1000)]
    pub messages: Vec<Message>,
    #[serde(default)]
    #[schema(minimum = 1)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 2)]
    pub temperature: Option<f32>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 1)]
    pub top_p: Option<f32>,
    #[serde(default)]
    #[schema(max_items = 4)]
    pub stop: Option<Vec<String>>,
    /// Stream the answer's text as deltas to WebSocket and SSE subscribers while it runs.
    #[serde(default)]
    pub stream: bool,
    /// How to tell the caller the job finished, beyond polling.
    #[serde(default)]
    pub notify: Option<Notify>,
    /// `false` opts out of every reuse: no cached answer, no attaching to an identical job.
    #[serde(default)]
    pub cache: Option<bool>,
}

/// `"notify": {"email": true}` asks for a completion email to the key's address; `false`
/// turns off the one the free tier gets by default.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    #[serde(default)]
    pub email: Option<bool>,
}

/// Where the job's completion email goes: the key's address if the request asks for email,
/// or, when it does not say, if the key is free tier (free jobs wait longest, in `batch`).
fn notify_email(principal: &Principal, asked: Option<bool>) -> Result<Option<String>, ApiError> {
    if !asked.unwrap_or(principal.tier == Tier::Free) {
        return Ok(None);
    }
    let address = principal
        .email
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty());
    match (address, asked) {
        (Some(address), _) => Ok(Some(address.to_owned())),
        (None, Some(true)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "no_email",
            "notify.email asks for a completion email, but this API key has no email address; \
             use a key created with --email, or leave notify.email out",
        )),
        // The free tier's default email needs an address; without one the caller polls.
        (None, _) => Ok(None),
    }
}

impl SubmitJob {
    fn parse(self, state: &ApiState) -> Result<JobRequest, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages must hold at least one message"));
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(ApiError::invalid(format!(
                "messages may hold at most {MAX_MESSAGES} messages"
            )));
        }
        if !state.admission.routes.contains_key(&self.model) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_model",
                format!(
                    "no route for model {:?}; known models: {}",
                    self.model,
                    state
                        .admission
                        .routes
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if self.max_tokens == Some(0) {
            return Err(ApiError::invalid("max_tokens must be at least 1"));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(ApiError::invalid("temperature must be between 0 and 2"));
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(ApiError::invalid("top_p must be between 0 and 1"));
            }
        }
        if self.stop.as_ref().is_some_and(|s| s.len() > 4) {
            return Err(ApiError::invalid("stop may hold at most 4 sequences"));
        }
        Ok(JobRequest {
            model: self.model,
            messages: self.messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop,
            stream: self.stream,
            ..JobRequest::new(String::new(), Vec::new())
        })
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Accepted {
    #[schema(value_type = uuid::Uuid)]
    pub request_id: RequestId,
    #[schema(value_type = schemas::JobState)]
    pub state: JobState,
    #[schema(value_type = schemas::Lane)]
    pub lane: Lane,
    /// Place in the lane (1 = next), from the lane's depth as last read.
    pub position: u64,
    /// Seconds until the job starts: its position over the lane's measured drain rate;
    /// absent while nothing has drained from the lane lately.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_wait_secs: Option<f64>,
    /// The identical job in flight this one is attached to: its answer will be this one's.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub attached_to: Option<RequestId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_reason: Option<String>,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    #[schema(value_type = uuid::Uuid)]
    pub request_id: RequestId,
    #[schema(value_type = schemas::JobState)]
    pub state: JobState,
    #[schema(value_type = schemas::Lane)]
    pub lane: Lane,
    pub model: String,
    pub attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The answer was reused, not asked of a provider; `cache` says how.
    pub cached: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<uuid::Uuid>)]
    pub attached_to: Option<RequestId>,
    /// The pool admission chose, and why, when it was not the model's route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_wait_secs: Option<f64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<JobRecord> for JobView {
    fn from(job: JobRecord) -> Self {
        let route = job.model.strip_prefix(POOL_ROUTE_PREFIX).map(str::to_owned);
        JobView {
            request_id: job.id,
            state: job.state,
            lane: job.lane,
            model: job.request.model,
            attempts: job.attempt,
            result: job.result,
            error: job.error,
            endpoint: job.endpoint,
            cached: job.cached.is_some(),
            cache: job.cached.map(Reuse::as_str),
            attached_to: job.leader,
            route,
            route_reason: job.route_reason,
            cost_usd: job.cost_usd,
            position: None,
            estimated_wait_secs: None,
            created_at: job.created_at,
            updated_at: job.updated_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| ApiError::invalid("Idempotency-Key must be printable ASCII"))?
        .trim();
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    Ok(Some(key.to_owned()))
}

/// What `POST /v1/jobs` answers: 202 with the queued job, or 200 with a job answered at once.
pub enum Submitted {
    Queued(Accepted),
    Answered(Box<JobView>),
}

impl IntoResponse for Submitted {
    fn into_response(self) -> Response {
        match self {
            Submitted::Queued(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
            Submitted::Answered(view) => (StatusCode::OK, Json(*view)).into_response(),
        }
    }
}

/// Submit a job: 202 when it is queued (or attached to an identical job in flight), 200 when
/// it is answered at once from the cache.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    security(("tenant_key" = [])),
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII characters: a retry with the same key and body answers the first job")),
    request_body(content = SubmitJob, content_type = "application/json"),
    responses(
        (status = 200, description = "Answered at once from the cache", body = JobView),
        (status = 202, description = "Queued", body = Accepted),
        (status = 400, description = "`invalid_json`, or `bad_body` when the body cannot be read", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no key, or an unknown or revoked one", body = ErrorBody),
        (status = 402, description = "`budget_exhausted`: `error.budget` has `daily_usd` and `spent_usd`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until midnight UTC"))),
        (status = 409, description = "`idempotency_conflict`: the key was used with another body", body = ErrorBody),
        (status = 413, description = "`body_too_large`: over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 422, description = "`invalid_request`, `unknown_model` or `no_email`", body = ErrorBody),
        (status = 429, description = "`quota_exceeded`: `error.limit` has `scope`, `window_secs` and `limit`", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the window resets"))),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
        (status = 503, description = "`overloaded`: shed under load", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds until the lane is expected to drain"))),
    ))]
#[tracing::instrument(name = "submit", skip_all, fields(request_id = tracing::field::Empty, tenant = %principal.tenant))]
pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    JsonBody { value: body }: JsonBody<SubmitJob>,
) -> Result<Submitted, ApiError> {
    let asked = body.notify.as_ref().and_then(|n| n.email);
    let reuse = body.cache.unwrap_or(true);
    let request = body.parse(&state)?;
    let notify_email = notify_email(&principal, asked)?;
    let idempotency = idempotency_key(&headers)?
        .map(|key| -> Result<_, ApiError> {
            let mut canonical = serde_json::to_vec(&request).map_err(ApiError::internal)?;
            // An explicit notify choice is part of the body; leaving it out hashes as before.
            if let Some(email) = asked {
                canonical.extend_from_slice(format!("\nnotify.email={email}").as_bytes());
            }
            if !reuse {
                canonical.extend_from_slice(b"\ncache=false");
            }
            Ok((key, Sha256::digest(&canonical).to_vec()))
        })
        .transpose()?;
    let admission = &state.admission;
    let tier = principal.tier;
    admission
        .take_quota(&principal)
        .await
        .inspect_err(|_| telemetry::job("refused", tier))?;
    let lane = state.tier_lanes.lane_for(principal.tier);
    let request_hash = reuse.then(|| Admission::request_hash(&principal.tenant, &request));
    let id = RequestId::new();
    tracing::Span::current().record("request_id", tracing::field::display(id));
    let mut job = NewJob {
        id,
        principal,
        lane,
        request,
        idempotency,
        notify_email,
        request_hash,
        route: None,
    };
    // A job with an Idempotency-Key keeps its own identity: it is never answered from another.
    let may_reuse = job.idempotency.is_none();
    if let (Some(hash), true) = (&job.request_hash, may_reuse) {
        let tenant = &job.principal.tenant;
        let mut answered = None;
        if let Some(source) = admission.exact_answer(&state.store, tenant, hash).await? {
            answered = answer(&state, &job, source, Reuse::Exact).await?;
        }
        telemetry::cache_lookup("exact", answered.is_some());
        if let Some(view) = answered {
            return Ok(Submitted::Answered(view));
        }
    }
    admission
        .check_load(&job.principal, lane)
        .inspect_err(|_| telemetry::job("shed", tier))?;
    let routing = admission
        .route(&state.store, &job.principal, &job.request)
        .await
        .inspect_err(|e| {
            if e.code == "budget_exhausted" {
                telemetry::job("refused", tier);
            }
        })?;
    job.route = routing.route;
    let mut embedding = None;
    if let (Some(cache), true) = (admission.semantic_for(&job.request), may_reuse && reuse) {
        let lookup = admission
            .semantic_answer(cache, &state.store, &job.principal.tenant, &job.request)
            .await?;
        let mut answered = None;
        if let Some(source) = lookup.hit {
            answered = answer(&state, &job, source, Reuse::Semantic).await?;
        }
        telemetry::cache_lookup("semantic", answered.is_some());
        if let Some(view) = answered {
            return Ok(Submitted::Answered(view));
        }
        embedding = lookup.remember;
    }
    let tenant = job.principal.tenant.clone();
    let route = job.route.clone();
    let accepted = if job.idempotency.is_some() {
        match state
            .store
            .insert_job(&job)
            .await
            .map_err(ApiError::internal)?
        {
            Ingested::Created(message) => StoreAccepted::Queued(message),
            Ingested::Existing(existing) => {
                let position = admission.position_now(existing.lane);
                return Ok(Submitted::Queued(Accepted {
                    request_id: existing.id,
                    state: existing.state,
                    lane: existing.lane,
                    position,
                    estimated_wait_secs: admission.estimate(existing.lane, position),
                    attached_to: existing.leader,
                    route: None,
                    route_reason: existing.route_reason,
                }));
            }
            Ingested::Conflict => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_conflict",
                    "this Idempotency-Key was already used with a different body",
                ))
            }
        }
    } else {
        state.writer.insert(job).await.map_err(ApiError::internal)?
    };
    if let Some((scope, vector)) = embedding {
        // Best effort: a job whose embedding is lost is only never a semantic hit.
        if let Err(error) = state
            .store
            .put_semantic_entry(id, &tenant, &scope, &vector)
            .await
        {
            tracing::warn!(message = "could not store a prompt embedding", request_id = %id, %error);
        }
    }
    state.bus.changed(id, &tenant);
    let attached_to = match accepted {
        StoreAccepted::Queued(message) => {
            state.publisher.publish_in_background(message);
            None
        }
        StoreAccepted::Attached { leader } => Some(leader),
    };
    // A job attached to an identical one in flight is reused, not queued: it counts as cached.
    telemetry::job(
        if attached_to.is_some() {
            "cached"
        } else {
            "accepted"
        },
        tier,
    );
    tracing::debug!(message = "job accepted", request_id = %id, %lane, attached = attached_to.is_some());
    let position = admission.position_now(lane);
    let (route, route_reason) = match route {
        Some((key, reason)) => (
            key.strip_prefix(POOL_ROUTE_PREFIX).map(str::to_owned),
            Some(reason),
        ),
        None => (None, None),
    };
    Ok(Submitted::Queued(Accepted {
        request_id: id,
        state: JobState::Queued,
        lane,
        position,
        estimated_wait_secs: admission.estimate(lane, position),
        attached_to,
        route,
        route_reason,
    }))
}

/// Store `job` as answered by `source`'s result; `None` if `source` no longer qualifies.
async fn answer(
    state: &ApiState,
    job: &NewJob,
    source: RequestId,
    how: Reuse,
) -> Result<Option<Box<JobView>>, ApiError> {
    let stored = state
        .store
        .insert_answered(job, source, how)
        .await
        .map_err(ApiError::internal)?;
    if !stored {
        return Ok(None);
    }
    state.bus.changed(job.id, &job.principal.tenant);
    telemetry::job("cached", job.principal.tier);
    tracing::debug!(message = "job answered from cache", request_id = %job.id, cache = how.as_str(), %source);
    let record = state
        .store
        .get_job(&job.principal.tenant, job.id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::internal("an answered job vanished"))?;
    Ok(Some(Box::new(record.into())))
}

pub(crate) fn parse_id(id: &str) -> Result<RequestId, ApiError> {
    // A malformed id is as unknown as a well-formed one that does not exist.
    id.parse().map_err(|_| ApiError::not_found("no such job"))
}

/// The tenant's job as a view; another tenant's answers exactly like an unknown one. A queued
/// job shows its place in its lane (a follower its leader's) and its estimated wait.
async fn view(state: &ApiState, tenant: &str, id: RequestId) -> Result<Json<JobView>, ApiError> {
    let job = state
        .store
        .get_job(tenant, id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("no such job"))?;
    let queued =
        (job.state == JobState::Queued).then_some((job.lane, job.leader.unwrap_or(job.id)));
    let mut view: JobView = job.into();
    if let Some((lane, ahead_of)) = queued {
        let position = state
            .store
            .queue_position(lane, ahead_of)
            .await
            .map_err(ApiError::internal)?;
        view.position = Some(position);
        view.estimated_wait_secs = state.admission.estimate(lane, position);
    }
    Ok(Json(view))
}

/// The tenant's job; a queued one with its place in its lane and its estimated wait.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404")),
    responses(
        (status = 200, body = JobView),
        (status = 401, description = "`unauthorized`: no key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown, malformed or another tenant's id", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    view(&state, &principal.tenant, parse_id(&id)?).await
}

/// Cancel a job that has not finished.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404")),
    responses(
        (status = 200, description = "Cancelled", body = JobView),
        (status = 401, description = "`unauthorized`: no key, or an unknown or revoked one", body = ErrorBody),
        (status = 404, description = "`not_found`: unknown, malformed or another tenant's id", body = ErrorBody),
        (status = 409, description = "`not_cancellable`: the job already finished", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub async fn cancel(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let id = parse_id(&id)?;
    match state
        .store
        .cancel(&principal.tenant, id)
        .await
        .map_err(ApiError::internal)?
    {
        CancelOutcome::Cancelled => {
            state.bus.changed(id, &principal.tenant);
            // Read here rather than through `view`: the counter wants the submitter's tier,
            // and a cancelled job has no place in a lane to look up.
            let job = state
                .store
                .get_job(&principal.tenant, id)
                .await
                .map_err(ApiError::internal)?
                .ok_or_else(|| ApiError::not_found("no such job"))?;
            telemetry::job("cancelled", job.tier);
            Ok(Json(job.into()))
        }
        CancelOutcome::Terminal(job_state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            format!("the job is already {job_state}"),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found("no such job")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(tier: Tier, email: Option<&str>) -> Principal {
        Principal {
            tenant: "acme".into(),
            user: "u1".into(),
            tier,
            email: email.map(str::to_owned),
        }
    }

    #[test]
    fn the_free_tier_gets_email_by_default_and_may_turn_it_off() {
        let free = key(Tier::Free, Some("ada@example.com"));
        assert_eq!(
            notify_email(&free, None).unwrap().as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(
            notify_email(&free, Some(true)).unwrap().as_deref(),
            Some("ada@example.com")
        );
        assert_eq!(notify_email(&free, Some(false)).unwrap(), None);
        // A free key without an address polls, unless the request insists on email.
        assert_eq!(notify_email(&key(Tier::Free, None), None).unwrap(), None);
        assert_eq!(
            notify_email(&key(Tier::Free, Some("  ")), None).unwrap(),
            None
        );
    }

    #[test]
    fn other_tiers_get_email_only_when_they_ask() {
        for tier in [Tier::Enterprise, Tier::Pro, Tier::Basic] {
            let k = key(tier, Some("bo@example.com"));
            assert_eq!(notify_email(&k, None).unwrap(), None, "{tier}");
            assert_eq!(notify_email(&k, Some(false)).unwrap(), None, "{tier}");
            assert_eq!(
                notify_email(&k, Some(true)).unwrap().as_deref(),
                Some("bo@example.com"),
                "{tier}"
            );
        }
    }

    #[test]
    fn asking_for_email_with_a_key_without_an_address_is_refused() {
        for tier in Tier::ALL {
            let err = notify_email(&key(tier, None), Some(true)).unwrap_err();
            assert_eq!(err.status, StatusCode::UNPROCESSABLE_ENTITY);
            assert_eq!(err.code, "no_email");
            assert!(err.message.contains("no email address"), "{}", err.message);
        }
    }

    #[test]
    fn the_notify_field_parses_strictly() {
        let body: SubmitJob = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [], "notify": {"email": false}
        }))
        .unwrap();
        assert_eq!(body.notify.unwrap().email, Some(false));
        let bad = serde_json::from_value::<SubmitJob>(serde_json::json!({
            "model": "m", "messages": [], "notify": {"sms": true}
        }))
        .unwrap_err();
        assert!(bad.to_string().contains("unknown field"), "{bad}");
    }
}
