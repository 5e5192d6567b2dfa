//! Jobs: what ingest is given and answers, a job as clients see it, and the public API to
//! ingest, read, cancel and detach jobs, with the reads written once for both backends.

use crate::outbox::OutboxMessage;
use crate::sql::{dispatch, reading, writing, Ts, WritePool};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobRequest, JobState, Lane, Principal, RequestId, Tier};
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
    /// The exact cache, looked up by the batched insert itself: when an identical job (same
    /// request hash) succeeded within this long, the job is not stored and the insert answers
    /// [`Accepted::Answerable`]. `None` never looks.
    pub reuse_within: Option<Duration>,
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
            reuse_within: None,
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
    /// Stored and already in its lane, in the same commit ([`Store::enqueuing_into`]): there is
    /// nothing to publish.
    Enqueued,
    /// Stored as a follower of an identical job in flight, which answers for both.
    Attached { leader: RequestId },
    /// Not stored: an identical job succeeded within the job's `reuse_within`. Store it
    /// answered by `source` ([`Store::insert_answered`]), or insert it again without looking.
    Answerable { source: RequestId },
}

impl Accepted {
    /// The outbox message of a queued job; `None` for a follower.
    pub fn into_queued(self) -> Option<OutboxMessage> {
        match self {
            Accepted::Queued(message) => Some(message),
            Accepted::Enqueued | Accepted::Attached { .. } | Accepted::Answerable { .. } => None,
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
pub(crate) fn status_from_db(status: Option<i16>) -> Result<Option<u16>, StoreError> {
    status
        .map(|s| u16::try_from(s).map_err(|_| corrupt(format!("bad HTTP status {s}"))))
        .transpose()
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

pub(crate) const JOB_COLUMNS: &str =
    "id, tenant, user_id, tier, lane, model, state, attempt, tries, request, \
     result, error, endpoint, created_at, updated_at, started_at, finished_at, leader, cached, \
     route_reason, cost_usd, error_status";

/// Bind the columns every single-job insert starts with, as `$1..$8`: id, tenant, user_id,
/// tier, lane, model (the routing key), request, notify_email. `$request` is the request as
/// the backend stores it (`jsonb` on PostgreSQL, JSON text on SQLite).
macro_rules! bind_new_job {
    ($query:expr, $job:expr, $request:expr) => {
        $query
            .bind($job.id.0)
            .bind(&$job.principal.tenant)
            .bind(&$job.principal.user)
            .bind($job.principal.tier.as_str())
            .bind($job.lane.as_str())
            .bind($job.routing_key())
            .bind($request)
            .bind(&$job.notify_email)
    };
}
pub(crate) use bind_new_job;

/// A `jobs` row of [`JOB_COLUMNS`], as either backend returns it.
#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: Uuid,
    tenant: String,
    user_id: String,
    tier: String,
    lane: String,
    model: String,
    state: String,
    attempt: i32,
    tries: i32,
    request: serde_json::Value,
    result: Option<serde_json::Value>,
    error: Option<String>,
    endpoint: Option<String>,
    created_at: Ts,
    updated_at: Ts,
    started_at: Option<Ts>,
    finished_at: Option<Ts>,
    leader: Option<Uuid>,
    cached: Option<String>,
    route_reason: Option<String>,
    cost_usd: Option<f64>,
    error_status: Option<i16>,
}

impl JobRow {
    pub(crate) fn into_record(self) -> Result<JobRecord, StoreError> {
        Ok(JobRecord {
            id: RequestId(self.id),
            tenant: self.tenant,
            user: self.user_id,
            tier: self.tier.parse().map_err(corrupt)?,
            lane: parse_lane(&self.lane)?,
            model: self.model,
            state: self.state.parse().map_err(corrupt)?,
            attempt: self.attempt,
            tries: self.tries,
            request: serde_json::from_value(self.request).map_err(corrupt)?,
            result: self.result,
            error: self.error,
            endpoint: self.endpoint,
            created_at: self.created_at.into(),
            updated_at: self.updated_at.into(),
            started_at: crate::sql::opt(self.started_at),
            finished_at: crate::sql::opt(self.finished_at),
            leader: self.leader.map(RequestId),
            cached: self.cached.as_deref().map(Reuse::parse).transpose()?,
            route_reason: self.route_reason,
            cost_usd: self.cost_usd,
            error_status: status_from_db(self.error_status)?,
        })
    }
}

/// The job an idempotency key already stands for: [`JOB_COLUMNS`] and `body_hash`.
#[derive(sqlx::FromRow)]
pub(crate) struct KeyedJobRow {
    #[sqlx(flatten)]
    job: JobRow,
    body_hash: Option<Vec<u8>>,
}

impl KeyedJobRow {
    /// That job if it came with the same body (`hash`), else a conflict.
    pub(crate) fn ingested(self, hash: Option<&[u8]>) -> Result<Ingested, StoreError> {
        Ok(if self.body_hash.as_deref() == hash {
            Ingested::Existing(Box::new(self.job.into_record()?))
        } else {
            Ingested::Conflict
        })
    }
}

/// A `job_events` row.
#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    seq: i32,
    state: String,
    at: Ts,
    detail: Option<serde_json::Value>,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<JobEvent, StoreError> {
        Ok(JobEvent {
            seq: self.seq,
            state: self.state.parse().map_err(corrupt)?,
            at: self.at.into(),
            detail: self.detail,
        })
    }
}

/// Ingest, read and cancel.
impl Store {
    /// Accept one job, honouring its idempotency key. The job, its first event and its outbox
    /// row are written in one transaction, so a `202` always means the job is durable.
    pub async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let ingested = dispatch!(self.insert_job(job))?;
        if let Ingested::Created(_) = ingested {
            self.announcer.one(job.id, &job.principal.tenant);
        }
        Ok(ingested)
    }

    /// Accept many jobs without idempotency keys (the batched ingest path): one outcome per
    /// job, in order. A job with a request hash identical to a job in flight of its tenant is
    /// stored as that job's follower: it is not queued and takes the other's outcome.
    ///
    /// The error is a failure that stored none of the jobs. Otherwise each job has its own
    /// outcome: on PostgreSQL the jobs that can be queued commit in one statement, and the rare
    /// job that must attach to one in flight does so in a transaction of its own afterwards,
    /// which can fail alone.
    pub async fn insert_jobs(
        &self,
        jobs: &[NewJob],
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let outcomes: Vec<Result<Accepted, StoreError>> = dispatch!(self.insert_jobs(jobs))?;
        self.announcer.all(
            jobs.iter()
                .zip(&outcomes)
                .filter(|(_, outcome)| {
                    matches!(outcome, Ok(Accepted::Queued(_) | Accepted::Attached { .. }))
                })
                .map(|(j, _)| (j.id, j.principal.tenant.as_str())),
        );
        Ok(outcomes)
    }

    /// A tenant's job; another tenant's id answers `None`, exactly like an unknown one.
    pub async fn get_job(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1 AND tenant = $2");
        let row: Option<JobRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(id.0)
                .bind(tenant)
                .fetch_optional(pool)
                .await?
        });
        row.map(JobRow::into_record).transpose()
    }

    /// Any job, for operators and tests.
    pub async fn job(&self, id: RequestId) -> Result<Option<JobRecord>, StoreError> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let row: Option<JobRow> = reading!(self, |pool| {
            sqlx::query_as(&sql).bind(id.0).fetch_optional(pool).await?
        });
        row.map(JobRow::into_record).transpose()
    }

    /// A job's event log in order.
    pub async fn events(&self, id: RequestId) -> Result<Vec<JobEvent>, StoreError> {
        let sql = "SELECT seq, state, at, detail FROM job_events WHERE job_id = $1 ORDER BY seq";
        let rows: Vec<EventRow> = reading!(self, |pool| {
            sqlx::query_as(sql).bind(id.0).fetch_all(pool).await?
        });
        rows.into_iter().map(EventRow::into_event).collect()
    }

    /// Jobs per state, for tests, the CLI and readiness checks.
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, StoreError> {
        let sql = "SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state";
        let rows: Vec<(String, i64)> =
            reading!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(corrupt)?, n)))
            .collect()
    }

    /// Cancel a tenant's job unless it is already terminal. A running job's result will be
    /// discarded. The completion email, if any, is queued with the state change.
    pub async fn cancel(&self, tenant: &str, id: RequestId) -> Result<CancelOutcome, StoreError> {
        let cancelled = dispatch!(self.cancel(tenant, id, CANCELLABLE))?;
        self.cancel_outcome(cancelled, tenant, id).await
    }

    /// Like [`Store::cancel`], but only a job still waiting (queued or retrying) is cancelled;
    /// a running one answers [`CancelOutcome::Running`] and is left alone.
    pub async fn cancel_waiting(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<CancelOutcome, StoreError> {
        let cancelled = dispatch!(self.cancel(tenant, id, WAITING))?;
        self.cancel_outcome(cancelled, tenant, id).await
    }

    /// What a cancel did: announced if it cancelled, else why not, from the job as it is now.
    async fn cancel_outcome(
        &self,
        cancelled: bool,
        tenant: &str,
        id: RequestId,
    ) -> Result<CancelOutcome, StoreError> {
        if cancelled {
            self.announcer.one(id, tenant);
            return Ok(CancelOutcome::Cancelled);
        }
        Ok(not_cancelled(self.get_job(tenant, id).await?))
    }

    /// Delete a dead job for good (events, outbox rows, email and embedding with it); `false`
    /// unless it exists and is dead, and not a line of a batch still open (whose output will
    /// report it). Not announced: the job is gone, and there is no new state or event to read.
    pub async fn purge_dead(&self, id: RequestId) -> Result<bool, StoreError> {
        let open = crate::sql::quoted(crate::batches::OPEN);
        let delete = format!(
            "DELETE FROM jobs WHERE id = $1 AND state = 'dead'
               AND NOT EXISTS (
                   SELECT 1 FROM batch_lines l JOIN batches b ON b.id = l.batch_id
                   WHERE l.job_id = $1 AND b.status IN ({open}))"
        );
        writing!(self, |pool| {
            let mut tx = pool.begin_write().await?;
            let deleted = sqlx::query(&delete).bind(id.0).execute(&mut *tx).await?;
            if deleted.rows_affected() == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            // The notification goes with the job (ON DELETE CASCADE).
            for table in ["job_events", "outbox", "semantic_entries"] {
                sqlx::query(&format!("DELETE FROM {table} WHERE job_id = $1"))
                    .bind(id.0)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(true)
    }
}

/// Held chat completions whose client went away.
impl Store {
    /// Detach a tenant's job that is not terminal: the same request (`hold_hash`) may take it
    /// back with [`Store::reattach`] within `grace`; after that [`Store::cancel_detached`]
    /// cancels it if it still waits. `false` for an unknown, foreign or terminal job.
    pub async fn detach(
        &self,
        tenant: &str,
        id: RequestId,
        hold_hash: &[u8],
        grace: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self.detach(tenant, id, hold_hash, grace))
    }

    /// Take back one detached, not terminal job of the tenant held under `hold_hash` whose
    /// grace has not passed, clearing its hold; concurrent callers never get the same job.
    /// With `finished_too` (a client's own retry) a job that succeeded or went dead since its
    /// client left is taken too: its answer is there already.
    pub async fn reattach(
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
        dispatch!(self.reattach(tenant, hold_hash, states))
    }

    /// Cancel up to `limit` detached jobs whose grace passed while they still wait (queued or
    /// retrying), as [`Store::cancel`] does; the holds of expired running or terminal jobs are
    /// cleared and the jobs left alone. Answers the cancelled jobs with their tenants.
    pub async fn cancel_detached(
        &self,
        limit: i64,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let cancelled = dispatch!(self.cancel_detached(limit))?;
        self.announce_all(&cancelled);
        Ok(cancelled)
    }
}
