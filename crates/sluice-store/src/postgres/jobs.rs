//! PostgreSQL's ingest, cancel and detach (`crate::jobs` has the types and the shared reads):
//! each a statement or a short transaction, the batched ingest one statement for all its jobs.

use crate::jobs::{bind_new_job, corrupt, Accepted, Ingested, KeyedJobRow, NewJob, JOB_COLUMNS};
use crate::outbox::OutboxMessage;
use crate::postgres::PgBackend;
use crate::{millis, LanesInDatabase, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

impl PgBackend {
    /// Accept one job, honouring its idempotency key.
    pub(crate) async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let request = serde_json::to_value(&job.request).map_err(corrupt)?;
        let (key, hash) = match &job.idempotency {
            Some((k, h)) => (Some(k.as_str()), Some(h.as_slice())),
            None => (None, None),
        };
        let mut tx = self.pool.begin().await?;
        let inserted = bind_new_job!(
            sqlx::query(
                "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, idempotency_key, body_hash, request_hash, route_reason)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $12)
                 ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                 RETURNING id",
            ),
            job,
            &request
        )
        .bind(key)
        .bind(hash)
        .bind(&job.request_hash)
        .bind(job.route_reason())
        .fetch_optional(&mut *tx)
        .await?;

        if inserted.is_none() {
            tx.rollback().await?;
            let row: KeyedJobRow = sqlx::query_as(&format!(
                "SELECT {JOB_COLUMNS}, body_hash FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
            ))
            .bind(&job.principal.tenant)
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
            return row.ingested(hash);
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

    /// Accept many jobs without idempotency keys (the batched ingest path): every job that can
    /// be queued, in one statement that commits on its own (no `BEGIN` and `COMMIT` round
    /// trips). A job whose `reuse_within` finds an answer is left out; so is a job identical to
    /// one in flight (the unique index on requests in flight), which then attaches to it in a
    /// transaction of its own.
    pub(crate) async fn insert_jobs(
        &self,
        jobs: &[NewJob],
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        let jobs: Vec<&NewJob> = jobs.iter().collect();
        let queued = insert_rows(&self.pool, &jobs, self.lanes.as_deref()).await?;
        if let Some(lanes) = &self.lanes {
            lanes.wake_all(
                jobs.iter()
                    .filter(|j| queued.contains_key(&j.id.0))
                    .map(|j| j.lane),
            );
        }
        let mut outcomes: Vec<Option<Result<Accepted, StoreError>>> =
            Vec::with_capacity(jobs.len());
        let mut looking = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            match queued_message(&queued, job) {
                Ok(Some(accepted)) => outcomes.push(Some(Ok(accepted))),
                Ok(None) => {
                    if job.reuse_within.is_some() {
                        looking.push(i);
                    }
                    outcomes.push(None);
                }
                Err(error) => outcomes.push(Some(Err(error))),
            }
        }
        // Left out for an answer, or for an identical job in flight: which one, in one look-up
        // per reuse window (a batch shares one window, the intake's).
        let mut windows: Vec<Duration> = looking
            .iter()
            .filter_map(|&i| jobs[i].reuse_within)
            .collect();
        windows.sort_unstable();
        windows.dedup();
        for within in windows {
            let (at, wanted): (Vec<usize>, Vec<(String, Vec<u8>)>) = looking
                .iter()
                .filter(|&&i| jobs[i].reuse_within == Some(within))
                .filter_map(|&i| {
                    let job = jobs[i];
                    let hash = job.request_hash.clone()?;
                    Some((i, (job.principal.tenant.clone(), hash)))
                })
                .unzip();
            match self.reusable_answers(&wanted, within).await {
                Ok(sources) => {
                    for (i, source) in at.into_iter().zip(sources) {
                        if let Some(source) = source {
                            outcomes[i] = Some(Ok(Accepted::Answerable { source }));
                        }
                    }
                }
                // The cache is best effort: these jobs are stored as if it had no answer.
                Err(error) => tracing::warn!(
                    message = "exact-cache look-up failed; storing the jobs without it",
                    %error,
                    jobs = at.len()
                ),
            }
        }
        let mut done = Vec::with_capacity(jobs.len());
        for (job, outcome) in jobs.iter().zip(outcomes) {
            let outcome = match outcome {
                Some(outcome) => outcome,
                None => self.attach_alone(job).await,
            };
            done.push(outcome);
        }
        Ok(done)
    }

    /// [`PgBackend::attach`] in a transaction of its own.
    async fn attach_alone(&self, job: &NewJob) -> Result<Accepted, StoreError> {
        let mut tx = self.pool.begin().await?;
        let accepted = self.attach(&mut tx, job).await?;
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
        let queued = insert_rows(&mut **tx, jobs, self.lanes.as_deref()).await?;
        let mut accepted = Vec::with_capacity(jobs.len());
        for job in jobs {
            match queued_message(&queued, job)? {
                Some(message) => accepted.push(message),
                None => accepted.push(self.attach(tx, job).await?),
            }
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
            let inserted = bind_new_job!(
                sqlx::query(
                    "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                       state, request_hash, route_reason, leader)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11)
                     ON CONFLICT DO NOTHING
                     RETURNING leader",
                ),
                job,
                &request
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

    /// Cancel a tenant's job if it is in one of `states` (see [`crate::jobs::CANCELLABLE`], [`crate::jobs::WAITING`]);
    /// `true` if it was. A running job's result will be discarded.
    pub(crate) async fn cancel(
        &self,
        tenant: &str,
        id: RequestId,
        states: &[&str],
    ) -> Result<bool, StoreError> {
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
        Ok(cancelled.is_some())
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
        states: &[&str],
    ) -> Result<Option<RequestId>, StoreError> {
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
}

/// Where the insert queued each job it stored, by job id.
type QueuedRows = std::collections::HashMap<Uuid, Queued>;

/// Where the insert queued a job.
#[derive(Clone, Copy)]
enum Queued {
    /// An outbox row (id, deliver_at), to publish.
    Outbox(i64, DateTime<Utc>),
    /// A message in its lane ([`crate::LanesInDatabase`]).
    InLane,
}

/// The jobs, their `queued` events, and what the exact cache may leave out (see `insert_rows`).
const INSERT_JOBS: &str = "WITH input AS (
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::text[], $7::text[], $8::text[], $9::bytea[], $10::text[],
                              $11::int8[], $12::text[]) WITH ORDINALITY
             AS t(id, tenant, user_id, tier, lane, model, request, notify_email,
                  request_hash, route_reason, reuse_ms, body, n)
     ), j AS (
         INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                           state, request_hash, route_reason)
         SELECT id, tenant, user_id, tier, lane, model, request::jsonb, notify_email,
                'queued', request_hash, route_reason
         FROM input i
         WHERE i.reuse_ms IS NULL OR NOT EXISTS (
             SELECT 1 FROM jobs a
             WHERE a.tenant = i.tenant AND a.request_hash = i.request_hash
               AND a.state = 'succeeded' AND a.leader IS NULL
               AND a.finished_at > now() - i.reuse_ms * interval '1 millisecond')
         ON CONFLICT DO NOTHING
         RETURNING id, lane
     ), e AS (
         INSERT INTO job_events (job_id, seq, state) SELECT id, 1, 'queued' FROM j
     )";

/// One statement for the jobs, their first events and their outbox rows, or their lane
/// messages when `lanes` is set; a job identical to one in flight (the unique index on requests
/// in flight) is left out, for the caller to attach.
async fn insert_rows<'e, E>(
    executor: E,
    jobs: &[&NewJob],
    lanes: Option<&LanesInDatabase>,
) -> Result<QueuedRows, StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
    let mut ids = Vec::with_capacity(jobs.len());
    let mut tenants = Vec::with_capacity(jobs.len());
    let mut users = Vec::with_capacity(jobs.len());
    let mut tiers = Vec::with_capacity(jobs.len());
    let mut lane_names = Vec::with_capacity(jobs.len());
    let mut models = Vec::with_capacity(jobs.len());
    let mut requests = Vec::with_capacity(jobs.len());
    let mut emails = Vec::with_capacity(jobs.len());
    let mut hashes = Vec::with_capacity(jobs.len());
    let mut reasons = Vec::with_capacity(jobs.len());
    let mut reuse_ms = Vec::with_capacity(jobs.len());
    let mut bodies = Vec::with_capacity(if lanes.is_some() { jobs.len() } else { 0 });
    for job in jobs {
        ids.push(job.id.0);
        tenants.push(job.principal.tenant.as_str());
        users.push(job.principal.user.as_str());
        tiers.push(job.principal.tier.as_str());
        lane_names.push(job.lane.as_str());
        models.push(job.routing_key());
        requests.push(serde_json::to_string(&job.request).map_err(corrupt)?);
        emails.push(job.notify_email.as_deref());
        hashes.push(job.request_hash.as_deref());
        reasons.push(job.route_reason());
        reuse_ms.push(job.reuse_within.map(millis));
        if lanes.is_some() {
            // The lane message the SQL queue's consumers read: the job's reference as JSON.
            bodies.push(serde_json::to_string(&job.job_ref()).map_err(corrupt)?);
        }
    }
    // ON CONFLICT without a target: the only unique index these rows can meet is the one on
    // requests in flight (ids are fresh, idempotency keys absent). A row with a reuse window
    // is left out when the exact cache has its answer: the same look-up as `reusable_answer`.
    macro_rules! bind_input {
        ($query:expr) => {
            $query
                .bind(&ids)
                .bind(&tenants)
                .bind(&users)
                .bind(&tiers)
                .bind(&lane_names)
                .bind(&models)
                .bind(&requests)
                .bind(&emails)
                .bind(&hashes)
                .bind(&reasons)
                .bind(&reuse_ms)
                .bind(&bodies)
        };
    }
    let Some(lanes) = lanes else {
        let rows: Vec<(i64, Uuid, DateTime<Utc>)> = bind_input!(sqlx::query_as(&format!(
            "{INSERT_JOBS}
             INSERT INTO outbox (job_id, lane, attempt)
             SELECT id, lane, 0 FROM j
             RETURNING id, job_id, deliver_at"
        )))
        .fetch_all(executor)
        .await?;
        return Ok(rows
            .into_iter()
            .map(|(o, j, at)| (j, Queued::Outbox(o, at)))
            .collect());
    };
    // The SQL queue's own insert, in this statement: the messages in the order of the input,
    // and one notification per lane, sent by PostgreSQL at commit.
    let rows: Vec<(Uuid,)> = bind_input!(sqlx::query_as(&format!(
        "{INSERT_JOBS}, m AS (
             INSERT INTO sluice_lane_messages (namespace, lane, body, available_at)
             SELECT $13, i.lane, i.body, now() FROM j JOIN input i ON i.id = j.id
             ORDER BY i.n
             RETURNING lane
         ), woken AS (
             SELECT count(pg_notify($14, l.lane)) AS lanes FROM (SELECT DISTINCT lane FROM m) l
         )
         SELECT j.id FROM j, woken"
    )))
    .bind(&lanes.namespace)
    .bind(&lanes.channel)
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|(id,)| (id, Queued::InLane)).collect())
}

/// `job` as queued if the insert queued it; `None` if it met an identical job in flight.
fn queued_message(queued: &QueuedRows, job: &NewJob) -> Result<Option<Accepted>, StoreError> {
    match queued.get(&job.id.0) {
        Some(&Queued::Outbox(outbox_id, deliver_at)) => {
            return Ok(Some(Accepted::Queued(OutboxMessage {
                outbox_id,
                lane: job.lane,
                job: job.job_ref(),
                deliver_at,
                reason: None,
            })))
        }
        Some(Queued::InLane) => return Ok(Some(Accepted::Enqueued)),
        None => {}
    }
    if job.request_hash.is_none() {
        // Without a hash the only unique index the row can meet is the primary key: ids are
        // fresh UUIDv7s, so this is a bug, not a request to refuse.
        return Err(StoreError::Invalid(format!(
            "job id {} is already taken",
            job.id
        )));
    }
    Ok(None)
}
