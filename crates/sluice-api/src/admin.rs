//! The operator API under `/admin/v1`: dead-lettered jobs (list, inspect, replay, purge), lane
//! depths and API keys. Only admin keys reach it, and admin keys reach nothing else.

use crate::auth::bearer;
use crate::jobs::{parse_id, JobView};
use crate::json::JsonBody;
use crate::openapi::{schemas, ErrorBody};
use crate::{ApiError, ApiState};
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sluice_core::{EmailAddress, Lane, Principal, RequestId, Tier};
use std::sync::Arc;

/// An operator, by the name their admin key was created with.
pub(crate) struct Admin(#[allow(dead_code)] pub String);

impl FromRequestParts<Arc<ApiState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<ApiState>,
    ) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or_else(|| {
            ApiError::unauthorized("send an admin key as Authorization: Bearer sk_sluice_...")
        })?;
        match state.store.admin_for_key(key).await {
            Ok(Some(name)) => Ok(Admin(name)),
            Ok(None) => Err(ApiError::unauthorized(
                "this route needs an admin key (sluice keys create --admin)",
            )),
            Err(error) => Err(ApiError::internal(error)),
        }
    }
}

pub(crate) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/admin/v1/dead", get(dead))
        .route("/admin/v1/jobs/{id}", get(inspect).delete(purge))
        .route("/admin/v1/jobs/{id}/replay", post(replay))
        .route("/admin/v1/lanes", get(lanes))
        .route("/admin/v1/lanes/{lane}/{action}", post(pause_lane))
        .route("/admin/v1/endpoints/{name}/{action}", post(pause_endpoint))
        .route("/admin/v1/keys", get(keys).post(create_key))
        .route("/admin/v1/keys/{id}", axum::routing::delete(revoke_key))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct Limit {
    /// How many jobs, newest first.
    #[param(minimum = 1, maximum = 10000, default = 100)]
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DeadView {
    #[schema(value_type = uuid::Uuid)]
    request_id: RequestId,
    tenant: String,
    model: String,
    error: Option<String>,
    dead_at: chrono::DateTime<chrono::Utc>,
}

/// The most recently dead-lettered jobs of every tenant.
#[utoipa::path(get, path = "/admin/v1/dead", tag = "admin",
    security(("admin_key" = [])),
    params(Limit),
    responses(
        (status = 200, body = Vec<DeadView>),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a bad or unknown query parameter", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn dead(
    State(state): State<Arc<ApiState>>,
    _: Admin,
    query: Result<Query<Limit>, QueryRejection>,
) -> Result<Json<Vec<DeadView>>, ApiError> {
    // axum's rejection is plain text; a bad query is a bad request like any other here.
    let Query(Limit { limit }) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::invalid("limit must be between 1 and 10000"));
    }
    let dead = state
        .store
        .dead_jobs(limit)
        .await
        .map_err(ApiError::internal)?;
    Ok(Json(dead.into_iter().map(DeadView::from).collect()))
}

impl From<sluice_store::DeadJob> for DeadView {
    fn from(d: sluice_store::DeadJob) -> Self {
        DeadView {
            request_id: d.id,
            tenant: d.tenant,
            model: d.model,
            error: d.error,
            dead_at: d.at,
        }
    }
}

/// Any tenant's job, with its tenant and its whole event log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Inspected {
    tenant: String,
    user: String,
    #[schema(value_type = schemas::Tier)]
    tier: Tier,
    job: JobView,
    events: Vec<EventView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct EventView {
    seq: i32,
    #[schema(value_type = schemas::JobState)]
    state: sluice_core::JobState,
    at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    detail: Option<serde_json::Value>,
}

async fn inspected(state: &ApiState, id: RequestId) -> Result<Inspected, ApiError> {
    let job = state
        .store
        .job(id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| ApiError::not_found("no such job"))?;
    let events = state
        .store
        .events(id)
        .await
        .map_err(ApiError::internal)?
        .into_iter()
        .map(|e| EventView {
            seq: e.seq,
            state: e.state,
            at: e.at,
            detail: e.detail,
        })
        .collect();
    Ok(Inspected {
        tenant: job.tenant.clone(),
        user: job.user.clone(),
        tier: job.tier,
        job: job.into(),
        events,
    })
}

/// Any tenant's job with its tenant and whole event log.
#[utoipa::path(get, path = "/admin/v1/jobs/{id}", tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404")),
    responses(
        (status = 200, body = Inspected),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn inspect(
    State(state): State<Arc<ApiState>>,
    _: Admin,
    Path(id): Path<String>,
) -> Result<Json<Inspected>, ApiError> {
    Ok(Json(inspected(&state, parse_id(&id)?).await?))
}

#[utoipa::path(post, path = "/admin/v1/jobs/{id}/replay", tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404")),
    responses(
        (status = 200, description = "Replayed", body = Inspected),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
        (status = 409, description = "`not_dead`: the job is not dead", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
/// Put a dead job back in its lane with a fresh retry budget.
pub(crate) async fn replay(
    State(state): State<Arc<ApiState>>,
    Admin(name): Admin,
    Path(id): Path<String>,
) -> Result<Json<Inspected>, ApiError> {
    let id = parse_id(&id)?;
    let Some(message) = state.store.replay(id).await.map_err(ApiError::internal)? else {
        return Err(not_dead(&state, id).await);
    };
    tracing::info!(message = "dead job replayed", request_id = %id, admin = %name);
    // The outbox row is committed: if this publish fails, the relay sends it.
    state.intake.publisher.publish_in_background(message);
    Ok(Json(inspected(&state, id).await?))
}

#[utoipa::path(delete, path = "/admin/v1/jobs/{id}", tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path, description = "The job's request_id (a UUID); anything else is 404")),
    responses(
        (status = 204, description = "Purged"),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such job", body = ErrorBody),
        (status = 409, description = "`not_dead`: the job is not dead", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
/// Delete a dead job for good.
pub(crate) async fn purge(
    State(state): State<Arc<ApiState>>,
    Admin(name): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if !state
        .store
        .purge_dead(id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(not_dead(&state, id).await);
    }
    tracing::info!(message = "dead job purged", request_id = %id, admin = %name);
    Ok(StatusCode::NO_CONTENT)
}

/// 404 for an unknown job, 409 for one that is not dead.
async fn not_dead(state: &ApiState, id: RequestId) -> ApiError {
    match state.store.job(id).await {
        Ok(Some(job)) => ApiError::new(
            StatusCode::CONFLICT,
            "not_dead",
            format!("the job is {}, not dead", job.state),
        ),
        Ok(None) => ApiError::not_found("no such job"),
        Err(error) => ApiError::internal(error),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct LaneView {
    #[schema(value_type = schemas::Lane)]
    lane: Lane,
    /// Jobs queued in the lane, from the database.
    queued: u64,
    /// Messages the broker holds for the lane (includes delayed retries where it can tell); a
    /// RabbitMQ message may pack several jobs, so this can be below `queued`.
    broker_depth: Option<u64>,
    oldest_wait_secs: f64,
    drained_per_sec: f64,
}

/// Per lane: depth, the oldest job's wait, the drain rate; what is paused; the load level.
#[utoipa::path(get, path = "/admin/v1/lanes", tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, body = LanesView),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn lanes(
    State(state): State<Arc<ApiState>>,
    _: Admin,
) -> Result<Json<LanesView>, ApiError> {
    let load = state.intake.policy.load();
    let mut lanes = Vec::new();
    for lane in Lane::ALL {
        let broker_depth = state.intake.publisher.broker().depth(lane).await.ok();
        let measured = load.lanes.get(&lane).cloned().unwrap_or_default();
        lanes.push(LaneView {
            lane,
            queued: measured.depth,
            broker_depth,
            oldest_wait_secs: measured.oldest_wait.as_secs_f64(),
            drained_per_sec: measured.drained_per_sec,
        });
    }
    let paused = state.store.pauses().await.map_err(ApiError::internal)?;
    Ok(Json(LanesView {
        lanes,
        paused,
        load: LoadView {
            level: load.assessment.level,
            reason: load.assessment.reason.clone(),
        },
    }))
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct LanesView {
    lanes: Vec<LaneView>,
    /// What operators paused: `lane:NAME` and `endpoint:NAME`.
    paused: Vec<String>,
    load: LoadView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct LoadView {
    #[schema(value_type = schemas::LoadLevel)]
    level: sluice_core::LoadLevel,
    reason: String,
}

/// What to do to a lane or endpoint (anything else is 404).
#[derive(utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Only described: handlers match on the path segment.
pub(crate) enum PauseAction {
    Pause,
    Resume,
}

/// What a pause or resume answers: whether it changed anything, and what is paused now.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct PauseView {
    changed: bool,
    paused: Vec<String>,
}

/// A new key's secret, shown this once.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct CreatedKey {
    /// `sk_sluice_` and 32 URL-safe base64 characters.
    key: String,
}

/// `pause` or `resume` a target; answers what is paused now.
async fn set_paused(
    state: &ApiState,
    admin: &str,
    target: String,
    action: &str,
) -> Result<Json<PauseView>, ApiError> {
    let changed = match action {
        "pause" => state.store.pause(&target, admin).await,
        "resume" => state.store.resume(&target).await,
        _ => return Err(ApiError::not_found("no such route: use pause or resume")),
    }
    .map_err(ApiError::internal)?;
    if changed {
        tracing::info!(message = "operator changed a pause", %target, action, %admin);
    }
    let paused = state.store.pauses().await.map_err(ApiError::internal)?;
    Ok(Json(PauseView { changed, paused }))
}

#[utoipa::path(post, path = "/admin/v1/lanes/{lane}/{action}", tag = "admin",
    security(("admin_key" = [])),
    params(("lane" = String, Path, description = "A consumed lane (others are 404)", example = "batch"), ("action" = PauseAction, Path)),
    responses(
        (status = 200, body = PauseView),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such lane or action", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
/// Workers stop taking jobs from a paused lane (within a second); its jobs wait in the broker.
pub(crate) async fn pause_lane(
    State(state): State<Arc<ApiState>>,
    Admin(name): Admin,
    Path((lane, action)): Path<(String, String)>,
) -> Result<Json<PauseView>, ApiError> {
    let lane: Lane = lane
        .parse()
        .ok()
        .filter(|l| Lane::CONSUMED.contains(l))
        .ok_or_else(|| ApiError::not_found("no such lane: priority, standard, batch or retry"))?;
    set_paused(&state, &name, format!("lane:{lane}"), &action).await
}

#[utoipa::path(post, path = "/admin/v1/endpoints/{name}/{action}", tag = "admin",
    security(("admin_key" = [])),
    params(("name" = String, Path, description = "A configured endpoint (others are 404)"), ("action" = PauseAction, Path)),
    responses(
        (status = 200, body = PauseView),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such endpoint or action", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
/// Workers send nothing to a paused endpoint (within a second); its pool's others serve, or
/// the route's fallbacks once every endpoint of the pool is paused.
pub(crate) async fn pause_endpoint(
    State(state): State<Arc<ApiState>>,
    Admin(admin): Admin,
    Path((name, action)): Path<(String, String)>,
) -> Result<Json<PauseView>, ApiError> {
    if !state.intake.policy.endpoints.contains_key(&name) {
        return Err(ApiError::not_found(format!("no endpoint named {name:?}")));
    }
    set_paused(&state, &admin, format!("endpoint:{name}"), &action).await
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct KeyView {
    id: uuid::Uuid,
    prefix: String,
    admin: bool,
    tenant: String,
    user: String,
    #[schema(value_type = schemas::Tier)]
    tier: Tier,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    /// The key reuses answers to sampled requests too.
    reuse_samples: bool,
    created_at: chrono::DateTime<chrono::Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every key (never its secret).
#[utoipa::path(get, path = "/admin/v1/keys", tag = "admin",
    security(("admin_key" = [])),
    responses(
        (status = 200, body = Vec<KeyView>),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn keys(
    State(state): State<Arc<ApiState>>,
    _: Admin,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let keys = state.store.api_keys().await.map_err(ApiError::internal)?;
    Ok(Json(
        keys.into_iter()
            .map(|k| KeyView {
                id: k.id,
                prefix: k.prefix,
                admin: k.admin,
                tenant: k.principal.tenant,
                user: k.principal.user,
                tier: k.principal.tier,
                email: k.principal.email,
                reuse_samples: k.principal.reuse_samples,
                created_at: k.created_at,
                revoked_at: k.revoked_at,
            })
            .collect(),
    ))
}

/// A key to create: a tenant key for `tenant`/`user`/`tier`, or with `admin: true` an
/// operator key named `user`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewKey {
    /// Required for a tenant key; not blank, at most 200 bytes.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    tenant: Option<String>,
    /// Not blank, at most 200 bytes.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    user: String,
    /// Required for a tenant key.
    #[serde(default)]
    #[schema(value_type = Option<schemas::Tier>)]
    tier: Option<Tier>,
    /// Where completion emails go: `local@domain`, no whitespace or control characters.
    #[serde(default)]
    #[schema(max_length = 254)]
    email: Option<String>,
    /// Reuse answers to this key's sampled requests too (temperature above 0, no seed): by
    /// default only deterministic requests are answered from another job.
    #[serde(default)]
    reuse_samples: bool,
    #[serde(default)]
    admin: bool,
}

/// Create a tenant key, or with `admin: true` an admin key; the secret is shown only here.
#[utoipa::path(post, path = "/admin/v1/keys", tag = "admin",
    security(("admin_key" = [])),
    request_body(content = NewKey, content_type = "application/json"),
    responses(
        (status = 201, body = CreatedKey),
        (status = 400, description = "`invalid_json`, or `bad_body` when the body cannot be read", body = ErrorBody),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 413, description = "`body_too_large`: over 1 MiB", body = ErrorBody),
        (status = 415, description = "`unsupported_media_type`: not JSON", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a wrong shape or a rule broken (e.g. an `email` that is not an address)", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn create_key(
    State(state): State<Arc<ApiState>>,
    Admin(name): Admin,
    JsonBody { value: new }: JsonBody<NewKey>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let nonempty = |s: &str| !s.trim().is_empty() && s.len() <= 200;
    if !nonempty(&new.user) {
        return Err(ApiError::invalid("user must be 1 to 200 characters"));
    }
    let key = if new.admin {
        if new.tenant.is_some() || new.tier.is_some() || new.email.is_some() || new.reuse_samples {
            return Err(ApiError::invalid(
                "an admin key has no tenant, tier, email or reuse_samples: give only user",
            ));
        }
        state.store.create_admin_key(&new.user).await
    } else {
        let (Some(tenant), Some(tier)) = (new.tenant, new.tier) else {
            return Err(ApiError::invalid("a tenant key needs tenant and tier"));
        };
        if !nonempty(&tenant) {
            return Err(ApiError::invalid("tenant must be 1 to 200 characters"));
        }
        let email = new
            .email
            .map(|email| EmailAddress::parse(&email))
            .transpose()
            .map_err(|e| ApiError::invalid(format!("email is {e}")))?;
        state
            .store
            .create_api_key(&Principal {
                tenant,
                user: new.user.clone(),
                tier,
                email: email.map(EmailAddress::into_string),
                reuse_samples: new.reuse_samples,
            })
            .await
    }
    .map_err(ApiError::internal)?;
    tracing::info!(message = "API key created", admin = %name, user = %new.user, operator_key = new.admin);
    Ok((StatusCode::CREATED, Json(CreatedKey { key })))
}

/// Revoke a key: it stops working within 10 seconds (tenant keys are cached that long).
#[utoipa::path(delete, path = "/admin/v1/keys/{id}", tag = "admin",
    security(("admin_key" = [])),
    params(("id" = String, Path, description = "The key's id (a UUID); anything else is 404")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 404, description = "`not_found`: no such key, or already revoked", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn revoke_key(
    State(state): State<Arc<ApiState>>,
    Admin(name): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: uuid::Uuid = id.parse().map_err(|_| ApiError::not_found("no such key"))?;
    if !state
        .store
        .revoke_api_key(id)
        .await
        .map_err(ApiError::internal)?
    {
        return Err(ApiError::not_found("no such key, or it is already revoked"));
    }
    tracing::info!(message = "API key revoked", admin = %name, key = %id);
    Ok(StatusCode::NO_CONTENT)
}
