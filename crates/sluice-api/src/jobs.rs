//! Submit, poll and cancel jobs. Bodies are parsed into [`JobRequest`] at the edge, so
//! everything after this module trusts its input.

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
use sluice_admission::{Admitted, ReusePolicy, Submission, Ticket};
use sluice_core::route::RouteKey;
use sluice_core::{
    JobRequest, JobState, Lane, Message, RequestId, ResponseFormat, Tool, ToolChoice,
};
use sluice_store::{CancelOutcome, JobRecord, Reuse};
use std::sync::Arc;

const MAX_IDEMPOTENCY_KEY: usize = 255;

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
    /// A fixed seed makes the request deterministic (see `cache`).
    #[serde(default)]
    pub seed: Option<i64>,
    /// Functions the model may call, in OpenAI's form; calls come back in `result.tool_calls`.
    #[serde(default)]
    #[schema(value_type = Vec<Object>, max_items = 128)]
    pub tools: Vec<Tool>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// `{"type": "json_object"}` or `{"type": "json_schema", "json_schema": {"name", "schema"}}`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub response_format: Option<ResponseFormat>,
    /// A slower lane than the key's tier gives (`standard` or `batch`); a faster one is ignored.
    #[serde(default)]
    #[schema(value_type = Option<schemas::Lane>)]
    pub lane: Option<Lane>,
    /// How to tell the caller the job finished, beyond polling.
    #[serde(default)]
    pub notify: Option<Notify>,
    /// `false` opts out of every reuse; `true` allows it for sampled requests too. Left out,
    /// only deterministic requests (temperature 0 or a seed) take an earlier or identical
    /// job's answer, unless the route sets `reuse_samples`.
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

/// The reuse a `cache` field asks for.
pub(crate) fn reuse_policy(cache: Option<bool>) -> ReusePolicy {
    match cache {
        None => ReusePolicy::Auto,
        Some(true) => ReusePolicy::Allow,
        Some(false) => ReusePolicy::Never,
    }
}

impl SubmitJob {
    fn into_submission(self) -> Submission {
        let request = JobRequest {
            model: self.model,
            messages: self.messages,
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop,
            stream: self.stream,
            seed: self.seed,
            tools: self.tools,
            tool_choice: self.tool_choice,
            parallel_tool_calls: self.parallel_tool_calls,
            response_format: self.response_format,
        };
        Submission {
            lane: self.lane,
            email: self.notify.and_then(|n| n.email),
            reuse: reuse_policy(self.cache),
            ..Submission::new(request)
        }
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

impl From<Ticket> for Accepted {
    fn from(ticket: Ticket) -> Self {
        Accepted {
            request_id: ticket.id,
            state: ticket.state,
            lane: ticket.lane,
            position: ticket.position,
            estimated_wait_secs: ticket.estimated_wait_secs,
            attached_to: ticket.attached_to,
            route: ticket.route,
            route_reason: ticket.route_reason,
        }
    }
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
        let route = RouteKey::pool_name(&job.model).map(str::to_owned);
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

pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    // HTTP allows tabs and spaces inside a value; the key is printable ASCII, `!` to `~`.
    let bytes = value.as_bytes();
    if !bytes.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(ApiError::invalid(
            "Idempotency-Key must be printable ASCII (! to ~): no spaces, tabs or control characters",
        ));
    }
    if bytes.is_empty() || bytes.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ApiError::invalid(format!(
            "Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters"
        )));
    }
    let key = String::from_utf8_lossy(bytes).into_owned();
    Ok(Some(key))
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
    params(("Idempotency-Key" = Option<String>, Header, description = "1 to 255 printable ASCII characters (! to ~; a space or tab is 422): a retry with the same key and body answers the first job")),
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
    let submission = Submission {
        idempotency_key: idempotency_key(&headers)?,
        ..body.into_submission()
    };
    let admitted = state.intake.submit(principal, submission).await?;
    tracing::Span::current().record("request_id", tracing::field::display(admitted.id()));
    Ok(match admitted {
        Admitted::Queued(ticket) => Submitted::Queued(ticket.into()),
        Admitted::Answered { job, .. } => Submitted::Answered(Box::new((*job).into())),
    })
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
        view.estimated_wait_secs = state.intake.policy.estimate(lane, position);
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
        // Only `cancel_waiting` leaves a running job alone; `cancel` never answers this.
        CancelOutcome::Running => Err(ApiError::internal("a cancel left a running job alone")),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

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

    #[test]
    fn every_field_reaches_the_submission() {
        let body: SubmitJob = serde_json::from_value(serde_json::json!({
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "seed": 3,
            "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
            "response_format": {"type": "json_object"}, "lane": "batch", "cache": true,
            "notify": {"email": true}
        }))
        .unwrap();
        let s = body.into_submission();
        assert_eq!(s.request.seed, Some(3));
        assert_eq!(s.request.tools.len(), 1);
        assert_eq!(s.request.response_format, Some(ResponseFormat::JsonObject));
        assert_eq!(s.lane, Some(Lane::Batch));
        assert_eq!(s.email, Some(true));
        assert_eq!(s.reuse, ReusePolicy::Allow);
        assert_eq!(reuse_policy(None), ReusePolicy::Auto);
        assert_eq!(reuse_policy(Some(false)), ReusePolicy::Never);
    }
}
