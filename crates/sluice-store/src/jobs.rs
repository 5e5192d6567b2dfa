//! Ingest, read, cancel and detach jobs: the shared types and the PostgreSQL statements
//! (SQLite's in `sqlite::jobs`). Ingest writes the job, its first event and its outbox row in one
//! transaction, so a `202` always means the job is durable and will be queued.

use crate::outbox::OutboxMessage;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobRequest, JobState, Lane, Principal, RequestId, Tier};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

/// A job about to be accepted.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: RequestId,
    pub principal: Principal,
    pub lane: Lane,
    pub request: JobRequest,
    /// `Idempotency-Key` header and a hash of the body it came with.
    pub idempotency: Option<(String, Vec<u8>)>,
    /// Where the completion email goes; `None` sends none. Chosen at ingest (by tier or by
    /// the request), not taken from the key, so keys with an address need not mean email.
    pub notify_email: Option<String>,
    /// Hash of tenant, model alias, messages and parameters: an identical job in flight takes
    /// this one as a follower. `None` opts out of every reuse.
    pub request_hash: Option<Vec<u8>>,
    /// The route workers use instead of the request's model alias (e.g. `pool:small`), with
    /// the reason admission chose it.
    pub route: Option<(String, String)>,
}

impl NewJob {
    /// A job with a fresh request_id, no idempotency key and no completion email.
    pub fn new(principal: Principal, lane: Lane, request: JobRequest) -> NewJob {
        NewJob {
            id: RequestId::new(),
            principal,
            lane,
            request,
            idempotency: None,
            notify_email: None,
            request_hash: None,
            route: None,
        }
    }

    /// What workers route by: the chosen route, else the request's model alias.
    pub fn routing_key(&self) -> &str {
        self.route
            .as_ref()
            .map_or(self.request.model.as_str(), |(route, _)| route.as_str())
    }

    pub(crate) fn route_reason(&self) -> Option<&str> {
        self.route.as_ref().map(|(_, reason)| reason.as_str())
    }

    pub(crate) fn job_ref(&self) -> JobRef {
        JobRef {
            waiting_since_ms: None,
            request_id: self.id,
            tenant: self.principal.tenant.clone(),
            model: self.routing_key().to_owned(),
            attempt: 0,
            tokens: self.request.estimated_tokens(),
            rate_limited: false,
        }
    }
}

/// What ingest did.
#[derive(Debug)]
pub enum Ingested {
    /// Stored; publish this message, then mark it published.
    Created(OutboxMessage),
    /// The same idempotency key and body were seen before: this is that job.
    Existing(Box<JobRecord>),
    /// The idempotency key was used before with a different body.
    Conflict,
}

/// What the batched ingest did with one job.
#[derive(Debug)]
pub enum Accepted {
    /// Stored and queued; publish this message, then mark it published.
    Queued(OutboxMessage),
    /// Stored as a follower of an identical job in flight, which answers for both.
    Attached { leader: RequestId },
}

impl Accepted {
    /// The outbox message of a queued job; `None` for a follower.
    pub fn into_queued(self) -> Option<OutboxMessage> {
        match self {
            Accepted::Queued(message) => Some(message),
            Accepted::Attached { .. } => None,
        }
    }
}

/// How a job was answered without a provider call of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// An earlier identical job's answer (exact cache).
    Exact,
    /// An earlier job whose prompt meant the same (semantic cache).
    Semantic,
    /// The identical job this one was attached to while both were in flight.
    Dedup,
}

impl Reuse {
    pub fn as_str(self) -> &'static str {
        match self {
            Reuse::Exact => "exact",
            Reuse::Semantic => "semantic",
            Reuse::Dedup => "dedup",
        }
    }

    pub(crate) fn parse(s: &str) -> Result<Reuse, StoreError> {
        match s {
            "exact" => Ok(Reuse::Exact),
            "semantic" => Ok(Reuse::Semantic),
            "dedup" => Ok(Reuse::Dedup),
            other => Err(corrupt(format!("unknown cache kind {other:?}"))),
        }
    }
}

/// States a detached job may be taken up in: still to finish.
pub(crate) const REATTACHABLE: [&str; 3] = ["queued", "retrying", "running"];
/// ... or, for a client's own retry, finished since its client left (the answer is there).
pub(crate) const REATTACHABLE_FINISHED: [&str; 5] =
    ["queued", "retrying", "running", "succeeded", "dead"];

/// A job as clients see it.
#[derive(Debug, Clone)]
pub struct JobRecord {
    pub id: RequestId,
    pub tenant: String,
    pub user: String,
    pub tier: Tier,
    pub lane: Lane,
    pub model: String,
    pub state: JobState,
    pub attempt: i32,
    pub tries: i32,
    pub request: JobRequest,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    pub endpoint: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The identical job this one is attached to, if any.
    pub leader: Option<RequestId>,
    /// Set when the answer was reused instead of calling a provider.
    pub cached: Option<Reuse>,
    /// Why admission routed the job to the pool `model` names.
    pub route_reason: Option<String>,
    /// What the job's provider call cost in US dollars.
    pub cost_usd: Option<f64>,
    /// The provider's HTTP status of the failure `error` describes, when it answered one.
    pub error_status: Option<u16>,
}

/// One entry of a job's event log.
#[derive(Debug, Clone)]
pub struct JobEvent {
    pub seq: i32,
    pub state: JobState,
    pub at: DateTime<Utc>,
    pub detail: Option<serde_json::Value>,
}

/// Result of a cancel request.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    Cancelled,
    /// Already terminal; nothing changed.
    Terminal(JobState),
    /// Running, and the request only cancels jobs still waiting ([`crate::Store::cancel_waiting`]);
    /// nothing changed.
    Running,
    NotFound,
}

/// The states [`crate::Store::cancel`] takes a job out of: every one that is not terminal.
pub(crate) const CANCELLABLE: &[&str] = &["queued", "retrying", "running"];
/// The states [`crate::Store::cancel_waiting`] takes a job out of: waiting for a worker.
pub(crate) const WAITING: &[&str] = &["queued", "retrying"];

/// A status as a `smallint` column holds it. HTTP statuses are three digits; anything beyond
/// the column's range is no status at all.
pub(crate) fn status_to_db(status: Option<u16>) -> Option<i16> {
    status.and_then(|s| i16::try_from(s).ok())
}

/// A stored status back as the `u16` callers use.
pub(crate) fn status_from_db(status: Option<i64>) -> Result<Option<u16>, StoreError> {
    status
        .map(|s| u16::try_from(s).map_err(|_| corrupt(format!("bad HTTP status {s}"))))
        .transpose()
}

pub(crate) const JOB_COLUMNS: &str =
    "id, tenant, user_id, tier, lane, model, state, attempt, tries, request, \
     result, error, endpoint, created_at, updated_at, started_at, finished_at, leader, cached, \
     route_reason, cost_usd, error_status";

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Bind the columns every single-job insert starts with, as `$1..$8`: id, tenant, user_id,
/// tier, lane, model (the routing key), request, notify_email.
pub(crate) fn bind_new_job<'q>(
    query: PgQuery<'q>,
    job: &'q NewJob,
    request: &'q serde_json::Value,
) -> PgQuery<'q> {
    query
        .bind(job.id.0)
        .bind(&job.principal.tenant)
        .bind(&job.principal.user)
        .bind(job.principal.tier.as_str())
        .bind(job.lane.as_str())
        .bind(job.routing_key())
        .bind(request)
        .bind(&job.notify_email)
}

/// Why a cancel changed nothing, from the job as it is now.
pub(crate) fn not_cancelled(job: Option<JobRecord>) -> CancelOutcome {
    match job {
        None => CancelOutcome::NotFound,
        Some(job) if job.state == JobState::Running => CancelOutcome::Running,
        Some(job) => CancelOutcome::Terminal(job.state),
    }
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn parse_lane(s: &str) -> Result<Lane, StoreError> {
    s.parse().map_err(corrupt)
}

fn job_from_row(row: &PgRow) -> Result<JobRecord, StoreError> {
    let tier: String = row.try_get("tier")?;
    let lane: String = row.try_get("lane")?;
    let state: String = row.try_get("state")?;
    let request: serde_json::Value = row.try_get("request")?;
    Ok(JobRecord {
        id: RequestId(row.try_get("id")?),
        tenant: row.try_get("tenant")?,
        user: row.try_get("user_id")?,
        tier: tier.parse().map_err(corrupt)?,
        lane: parse_lane(&lane)?,
        model: row.try_get("model")?,
        state: state.parse().map_err(corrupt)?,
        attempt: row.try_get("attempt")?,
        tries: row.try_get("tries")?,
        request: serde_json::from_value(request).map_err(corrupt)?,
        result: row.try_get("result")?,
        error: row.try_get("error")?,
        endpoint: row.try_get("endpoint")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        leader: row.try_get::<Option<Uuid>, _>("leader")?.map(RequestId),
        cached: row
            .try_get::<Option<String>, _>("cached")?
            .as_deref()
            .map(Reuse::parse)
            .transpose()?,
        route_reason: row.try_get("route_reason")?,
        cost_usd: row.try_get("cost_usd")?,
        error_status: status_from_db(
            row.try_get::<Option<i16>, _>("error_status")?
                .map(i64::from),
        )?,
    })
}

impl PgBackend {
    /// Accept one job, honouring its idempotency key.
    pub(crate) async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let request = serde_json::to_value(&job.request).map_err(corrupt)?;
        let (key, hash) = match &job.idempotency {
            Some((k, h)) => (Some(k.as_str()), Some(h.as_slice())),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await?;
        let inserted = bind_new_job(
            sqlx::query(
                "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                               state, idempotency_key, body_hash, request_hash, route_reason)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $12)
             ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
             RETURNING id",
            ),
            job,
            &request,
        )
        .bind(key)
        .bind(hash)
        .bind(&job.request_hash)
        .bind(job.route_reason())
        .fetch_optional(&mut *tx)
        .await?;

        if inserted.is_none() {
            tx.rollback().await?;
            let row = sqlx::query(&format!(
                "SELECT {JOB_COLUMNS}, body_hash FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
            ))
            .bind(&job.principal.tenant)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
            let stored: Option<Vec<u8>> = row.try_get("body_hash")?;
            return Ok(if stored.as_deref() == hash {
                Ingested::Existing(Box::new(job_from_row(&row)?))
            } else {
                Ingested::Conflict
            });
        }

        sqlx::query("INSERT INTO job_events (job_id, seq, state) VALUES ($1, 1, 'queued')")
            .bind(job.id.0)
            .execute(&mut *tx)
            .await?;
        let outbox: (i64, DateTime<Utc>) = sqlx::query_as(
            "INSERT INTO outbox (job_id, lane, attempt) VALUES ($1, $2, 0) RETURNING id, deliver_at",
        )
        .bind(job.id.0)
        .bind(job.lane.as_str())
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Ingested::Created(OutboxMessage {
            outbox_id: outbox.0,
            lane: job.lane,
            job: job.job_ref(),
            deliver_at: outbox.1,
            reason: None,
        }))
    }

    /// Accept many jobs without idempotency keys in one transaction (the batched ingest path).
    /// A job identical to one in flight (same tenant and request hash) is stored as its
    /// follower instead of being queued; the unique index on requests in flight decides.
    pub(crate) async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<Vec<Accepted>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<&NewJob> = jobs.iter().collect();
        let mut tx = self.pool.begin().await?;
        let accepted = self.insert_jobs_in(&mut tx, &jobs).await?;
        tx.commit().await?;
        Ok(accepted)
    }

    /// [`PgBackend::insert_jobs`] inside the caller's transaction, so a batch's jobs commit
    /// (or not) with the batch: one statement for the jobs, their events and outbox rows.
    pub(crate) async fn insert_jobs_in(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        jobs: &[&NewJob],
    ) -> Result<Vec<Accepted>, StoreError> {
        let mut ids = Vec::with_capacity(jobs.len());
        let mut tenants = Vec::with_capacity(jobs.len());
        let mut users = Vec::with_capacity(jobs.len());
        let mut tiers = Vec::with_capacity(jobs.len());
        let mut lanes = Vec::with_capacity(jobs.len());
        let mut models = Vec::with_capacity(jobs.len());
        let mut requests = Vec::with_capacity(jobs.len());
        let mut emails = Vec::with_capacity(jobs.len());
        let mut hashes = Vec::with_capacity(jobs.len());
        let mut reasons = Vec::with_capacity(jobs.len());
        for job in jobs {
            ids.push(job.id.0);
            tenants.push(job.principal.tenant.as_str());
            users.push(job.principal.user.as_str());
            tiers.push(job.principal.tier.as_str());
            lanes.push(job.lane.as_str());
            models.push(job.routing_key());
            requests.push(serde_json::to_string(&job.request).map_err(corrupt)?);
            emails.push(job.notify_email.as_deref());
            hashes.push(job.request_hash.as_deref());
            reasons.push(job.route_reason());
        }
        // ON CONFLICT without a target: the only unique index these rows can meet is the one on
        // requests in flight (ids are fresh, idempotency keys absent).
        let rows: Vec<(i64, Uuid, DateTime<Utc>)> = sqlx::query_as(
            "WITH input AS (
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                                      $6::text[], $7::text[], $8::text[], $9::bytea[], $10::text[])
                     AS t(id, tenant, user_id, tier, lane, model, request, notify_email,
                          request_hash, route_reason)
             ), j AS (
                 INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, request_hash, route_reason)
                 SELECT id, tenant, user_id, tier, lane, model, request::jsonb, notify_email,
                        'queued', request_hash, route_reason
                 FROM input
                 ON CONFLICT DO NOTHING
                 RETURNING id, lane
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state) SELECT id, 1, 'queued' FROM j
             )
             INSERT INTO outbox (job_id, lane, attempt)
             SELECT id, lane, 0 FROM j
             RETURNING id, job_id, deliver_at",
        )
        .bind(&ids)
        .bind(&tenants)
        .bind(&users)
        .bind(&tiers)
        .bind(&lanes)
        .bind(&models)
        .bind(&requests)
        .bind(&emails)
        .bind(&hashes)
        .bind(&reasons)
        .fetch_all(&mut **tx)
        .await?;
        let by_id: std::collections::HashMap<Uuid, (i64, DateTime<Utc>)> =
            rows.into_iter().map(|(o, j, at)| (j, (o, at))).collect();
        let mut accepted = Vec::with_capacity(jobs.len());
        for job in jobs {
            if let Some(&(outbox_id, deliver_at)) = by_id.get(&job.id.0) {
                accepted.push(Accepted::Queued(OutboxMessage {
                    outbox_id,
                    lane: job.lane,
                    job: job.job_ref(),
                    deliver_at,
                    reason: None,
                }));
                continue;
            }
            if job.request_hash.is_none() {
                // Without a hash the only unique index the row can meet is the primary key.
                return Err(StoreError::Invalid(format!(
                    "job id {} is already taken",
                    job.id
                )));
            }
            accepted.push(self.attach(tx, job).await?);
        }
        Ok(accepted)
    }

    /// Store `job`, whose insert met an identical job in flight, as that job's follower. If
    /// the one in flight finished meanwhile, queue `job` as a leader of its own after all.
    async fn attach(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Postgres>,
        job: &NewJob,
    ) -> Result<Accepted, StoreError> {
        let request = serde_json::to_value(&job.request).map_err(corrupt)?;
        for _ in 0..3 {
            let leader: Option<(Uuid,)> = sqlx::query_as(
                "SELECT id FROM jobs
                 WHERE tenant = $1 AND request_hash = $2 AND leader IS NULL
                   AND idempotency_key IS NULL AND state IN ('queued', 'running', 'retrying')",
            )
            .bind(&job.principal.tenant)
            .bind(&job.request_hash)
            .fetch_optional(&mut **tx)
            .await?;
            let inserted = bind_new_job(
                sqlx::query(
                    "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                       state, request_hash, route_reason, leader)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11)
                     ON CONFLICT DO NOTHING
                     RETURNING leader",
                ),
                job,
                &request,
            )
            .bind(&job.request_hash)
            .bind(job.route_reason())
            .bind(leader.map(|(id,)| id))
            .fetch_optional(&mut **tx)
            .await?;
            let Some(inserted) = inserted else {
                // A new leader appeared between the look-up and the insert: look again.
                continue;
            };
            let leader: Option<Uuid> = inserted.try_get("leader")?;
            let detail = leader.map(|id| serde_json::json!({ "attached_to": id }));
            sqlx::query(
                "INSERT INTO job_events (job_id, seq, state, detail) VALUES ($1, 1, 'queued', $2)",
            )
            .bind(job.id.0)
            .bind(&detail)
            .execute(&mut **tx)
            .await?;
            if let Some(leader) = leader {
                return Ok(Accepted::Attached {
                    leader: RequestId(leader),
                });
            }
            let (outbox_id, deliver_at): (i64, DateTime<Utc>) = sqlx::query_as(
                "INSERT INTO outbox (job_id, lane, attempt) VALUES ($1, $2, 0)
                 RETURNING id, deliver_at",
            )
            .bind(job.id.0)
            .bind(job.lane.as_str())
            .fetch_one(&mut **tx)
            .await?;
            return Ok(Accepted::Queued(OutboxMessage {
                outbox_id,
                lane: job.lane,
                job: job.job_ref(),
                deliver_at,
                reason: None,
            }));
        }
        Err(corrupt(format!(
            "job {} could neither be queued nor attached to an identical job",
            job.id
        )))
    }

    /// A tenant's job; another tenant's id answers `None`, exactly like an unknown one.
    pub(crate) async fn get_job(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant = $2"
        ))
        .bind(id.0)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Any job, for operators and tests.
    pub(crate) async fn job(&self, id: RequestId) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1"))
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// A job's event log in order.
    pub(crate) async fn events(&self, id: RequestId) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, state, at, detail FROM job_events WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(JobEvent {
                    seq: r.try_get("seq")?,
                    state: state.parse().map_err(corrupt)?,
                    at: r.try_get("at")?,
                    detail: r.try_get("detail")?,
                })
            })
            .collect()
    }

    /// Jobs per state, for tests, the CLI and readiness checks.
    pub(crate) async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(corrupt)?, n)))
            .collect()
    }

    /// Cancel a tenant's job if it is in one of `states` (see [`CANCELLABLE`], [`WAITING`]).
    /// A running job's result will be discarded.
    pub(crate) async fn cancel(
        &self,
        tenant: &str,
        id: RequestId,
        states: &[&str],
    ) -> Result<CancelOutcome, StoreError> {
        let cancelled = sqlx::query(
            "WITH j AS (
                 UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = now(),
                                 updated_at = now(), event_seq = event_seq + 1,
                                 detached_until = NULL, hold_hash = NULL
                 WHERE id = $1 AND tenant = $2 AND state = ANY($3)
                 RETURNING id, event_seq, notify_email
             ), n AS (
                 -- Cancelling finishes the job: its email is queued with the state change.
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             )
             INSERT INTO job_events (job_id, seq, state) SELECT id, event_seq, 'cancelled' FROM j
             RETURNING job_id",
        )
        .bind(id.0)
        .bind(tenant)
        .bind(states)
        .fetch_optional(&self.pool)
        .await?;
        if cancelled.is_some() {
            return Ok(CancelOutcome::Cancelled);
        }
        Ok(not_cancelled(self.get_job(tenant, id).await?))
    }

    /// Mark a tenant's job that is not terminal as detached: its client went away, and the same
    /// request (`hold_hash`) may take it back within `grace`; after that it is cancelled.
    pub(crate) async fn detach(
        &self,
        tenant: &str,
        id: RequestId,
        hold_hash: &[u8],
        grace: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET hold_hash = $3, detached_until = now() + $4 * interval '1 millisecond'
             WHERE id = $1 AND tenant = $2 AND state IN ('queued', 'retrying', 'running')",
        )
        .bind(id.0)
        .bind(tenant)
        .bind(hold_hash)
        .bind(millis(grace))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Take one detached job of the tenant held under `hold_hash`, still within its grace and
    /// not terminal, clearing its hold. `SKIP LOCKED` and the re-checked `WHERE` of the update
    /// mean two concurrent callers never take the same job.
    pub(crate) async fn reattach(
        &self,
        tenant: &str,
        hold_hash: &[u8],
        finished_too: bool,
    ) -> Result<Option<RequestId>, StoreError> {
        let states: &[&str] = if finished_too {
            &REATTACHABLE_FINISHED
        } else {
            &REATTACHABLE
        };
        let row: Option<(Uuid,)> = sqlx::query_as(
            "WITH x AS (
                 SELECT id FROM jobs
                 WHERE tenant = $1 AND hold_hash = $2 AND detached_until IS NOT NULL
                   AND detached_until > now() AND state = ANY($3)
                 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
             )
             UPDATE jobs SET detached_until = NULL, hold_hash = NULL
             FROM x WHERE jobs.id = x.id
             RETURNING jobs.id",
        )
        .bind(tenant)
        .bind(hold_hash)
        .bind(states)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id,)| RequestId(id)))
    }

    /// Cancel detached jobs whose grace has passed and that still wait (queued, retrying), as
    /// `cancel` does (event and email with the change); expired holds of running or terminal
    /// jobs are only cleared. Safe to run from every node at once (`SKIP LOCKED`).
    pub(crate) async fn cancel_detached(
        &self,
        limit: i64,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "WITH x AS (
                 SELECT id FROM jobs
                 WHERE detached_until IS NOT NULL AND detached_until <= now()
                 ORDER BY detached_until LIMIT $1 FOR UPDATE SKIP LOCKED
             ), j AS (
                 UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = now(),
                                 updated_at = now(), event_seq = event_seq + 1,
                                 detached_until = NULL, hold_hash = NULL
                 FROM x WHERE jobs.id = x.id AND jobs.state IN ('queued', 'retrying')
                 RETURNING jobs.id, jobs.tenant, jobs.event_seq, jobs.notify_email
             ), kept AS (
                 -- Running (its answer is stored for whoever asks) or already terminal.
                 UPDATE jobs SET detached_until = NULL, hold_hash = NULL
                 FROM x WHERE jobs.id = x.id AND jobs.state NOT IN ('queued', 'retrying')
             ), n AS (
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, 'cancelled', '{\"reason\": \"detached\"}'::jsonb FROM j
             )
             SELECT id, tenant FROM j ORDER BY id",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, tenant)| (RequestId(id), tenant))
            .collect())
    }

    /// Delete a dead job with its events, outbox rows, notification and embedding; refused for a
    /// line of a batch still open, whose output will report it.
    pub(crate) async fn purge_dead(&self, id: RequestId) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let deleted = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND state = 'dead'
               AND NOT EXISTS (
                   SELECT 1 FROM batch_lines l JOIN batches b ON b.id = l.batch_id
                   WHERE l.job_id = $1
                     AND b.status IN ('validating', 'in_progress', 'cancelling', 'finalizing'))",
        )
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
        if deleted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for table in ["job_events", "outbox", "semantic_entries"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1"))
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
