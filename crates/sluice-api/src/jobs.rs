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
use sluice_core::{JobRequest, JobState, Lane, Message, Principal, RequestId, Tier};
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
    /// Stream the answer's text as deltas to WebSocket and SSE subscribers while it runs.
    #[serde(default)]
    pub stream: bool,
    /// How to tell the caller the job finished, beyond polling.
    #[serde(default)]
    pub notify: Option<Notify>,
}

/// `"notify": {"email": true}` asks for a completion email to the key's address; `false`
/// turns off the one the free tier gets by default.
#[derive(Debug, Deserialize)]
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
            stream: self.stream,
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
    let asked = body.notify.as_ref().and_then(|n| n.email);
    let request = body.parse(&state)?;
    let notify_email = notify_email(&principal, asked)?;
    let idempotency = idempotency_key(&headers)?
        .map(|key| -> Result<_, ApiError> {
            let mut canonical = serde_json::to_vec(&request).map_err(ApiError::internal)?;
            // An explicit notify choice is part of the body; leaving it out hashes as before.
            if let Some(email) = asked {
                canonical.extend_from_slice(format!("\nnotify.email={email}").as_bytes());
            }
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
        notify_email,
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
    state.bus.changed(request_id, &message.job.tenant);
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

pub(crate) fn parse_id(id: &str) -> Result<RequestId, ApiError> {
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
        CancelOutcome::Cancelled => {
            state.bus.changed(id, &principal.tenant);
            view(&state, &principal.tenant, id).await
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
