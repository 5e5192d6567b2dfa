//! Submit, poll and cancel jobs. Bodies are parsed into [`JobRequest`] at the edge, so
//! everything after this module trusts its input.

use crate::auth::Caller;
use crate::json::JsonBody;
use crate::{ApiError, ApiState};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sluice_core::{JobRequest, JobState, Lane, Message, RequestId};
use sluice_store::{CancelOutcome, Ingested, JobRecord, NewJob};
use std::sync::Arc;

const MAX_IDEMPOTENCY_KEY: usize = 255;
const MAX_MESSAGES: usize = 1_000;

/// The body of `POST /v1/jobs`. Unknown fields are refused, so a `tier` in the body is an error, not a hint.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub stop: Option<Vec<String>>,
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
        if !state.models.contains(&self.model) {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "unknown_model",
                format!(
                    "no route for model {:?}; known models: {}",
                    self.model,
                    state.models.iter().cloned().collect::<Vec<_>>().join(", ")
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
        })
    }
}

#[derive(Debug, Serialize)]
pub struct Accepted {
    pub request_id: RequestId,
    pub state: JobState,
    pub lane: Lane,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Debug, Serialize)]
pub struct JobView {
    pub request_id: RequestId,
    pub state: JobState,
    pub lane: Lane,
    pub model: String,
    pub attempts: i32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<JobRecord> for JobView {
    fn from(job: JobRecord) -> Self {
        JobView {
            request_id: job.id,
            state: job.state,
            lane: job.lane,
            model: job.model,
            attempts: job.attempt,
            result: job.result,
            error: job.error,
            endpoint: job.endpoint,
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

pub async fn submit(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    headers: HeaderMap,
    JsonBody { value: body }: JsonBody<SubmitJob>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let request = body.parse(&state)?;
    let idempotency = idempotency_key(&headers)?
        .map(|key| -> Result<_, ApiError> {
            let canonical = serde_json::to_vec(&request).map_err(ApiError::internal)?;
            Ok((key, Sha256::digest(&canonical).to_vec()))
        })
        .transpose()?;
    let lane = state.tier_lanes.lane_for(principal.tier);
    let job = NewJob {
        id: RequestId::new(),
        principal,
        lane,
        request,
        idempotency,
    };
    let message = if job.idempotency.is_some() {
        match state
            .store
            .insert_job(&job)
            .await
            .map_err(ApiError::internal)?
        {
            Ingested::Created(message) => message,
            Ingested::Existing(existing) => {
                return Ok((
                    StatusCode::ACCEPTED,
                    Json(Accepted {
                        request_id: existing.id,
                        state: existing.state,
                        lane: existing.lane,
                    }),
                ))
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
    let request_id = message.job.request_id;
    tracing::debug!(message = "job accepted", %request_id, %lane);
    state.publisher.publish_in_background(message);
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted {
            request_id,
            state: JobState::Queued,
            lane,
        }),
    ))
}

fn parse_id(id: &str) -> Result<RequestId, ApiError> {
    // A malformed id is as unknown as a well-formed one that does not exist.
    id.parse().map_err(|_| ApiError::not_found("no such job"))
}

/// The tenant's job as a view; another tenant's answers exactly like an unknown one.
async fn view(state: &ApiState, tenant: &str, id: RequestId) -> Result<Json<JobView>, ApiError> {
    state
        .store
        .get_job(tenant, id)
        .await
        .map_err(ApiError::internal)?
        .map(|job| Json(job.into()))
        .ok_or_else(|| ApiError::not_found("no such job"))
}

pub async fn get(
    State(state): State<Arc<ApiState>>,
    Caller(principal): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    view(&state, &principal.tenant, parse_id(&id)?).await
}

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
        CancelOutcome::Cancelled => view(&state, &principal.tenant, id).await,
        CancelOutcome::Terminal(job_state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_cancellable",
            format!("the job is already {job_state}"),
        )),
        CancelOutcome::NotFound => Err(ApiError::not_found("no such job")),
    }
}
