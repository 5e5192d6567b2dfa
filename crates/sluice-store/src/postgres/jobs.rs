//! PostgreSQL's ingest, cancel and detach (`crate::jobs` has the types and the shared reads):
//! each a statement or a short transaction, the batched ingest one statement for all its jobs.

use crate::jobs::{bind_new_job, corrupt, Accepted, Ingested, KeyedJobRow, NewJob, JOB_COLUMNS};
use crate::outbox::OutboxMessage;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
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

    /// Accept many jobs without idempotency keys in one transaction (the batched ingest path).
    /// A job identical to one in flight (same tenant and request hash) is stored as its
    /// follower instead of being queued; the unique index on requests in flight decides.
    pub(crate) async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<Vec<Accepted>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let jobs: Vec<&NewJob> = jobs.iter().collect();
        if jobs.iter().all(|job| job.request_hash.is_none()) {
            // No job can attach to another, so every one is queued by the one statement, which
            // on its own is a transaction: one round trip, where an explicit transaction would
            // add a BEGIN and a COMMIT to every batch.
            let queued = insert_rows(&self.pool, &jobs).await?;
            return jobs
                .iter()
                .map(|job| {
                    queued_message(&queued, job)?.ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "job {} was neither queued nor refused",
                            job.id
                        ))
                    })
                })
                .collect();
        }
        // Followers attach in the same transaction, so a failure stores none of the batch.
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
        let queued = insert_rows(&mut **tx, jobs).await?;
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

/// The outbox row (id, deliver_at) of each job the insert queued, by job id.
type QueuedRows = std::collections::HashMap<Uuid, (i64, DateTime<Utc>)>;

/// One statement for the jobs, their first events and their outbox rows; a job identical to
/// one in flight (the unique index on requests in flight) is left out, for the caller to attach.
async fn insert_rows<'e, E>(executor: E, jobs: &[&NewJob]) -> Result<QueuedRows, StoreError>
where
    E: sqlx::PgExecutor<'e>,
{
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
    .fetch_all(executor)
    .await?;
    Ok(rows.into_iter().map(|(o, j, at)| (j, (o, at))).collect())
}

/// `job` as queued if the insert queued it; `None` if it met an identical job in flight.
fn queued_message(queued: &QueuedRows, job: &NewJob) -> Result<Option<Accepted>, StoreError> {
    if let Some(&(outbox_id, deliver_at)) = queued.get(&job.id.0) {
        return Ok(Some(Accepted::Queued(OutboxMessage {
            outbox_id,
            lane: job.lane,
            job: job.job_ref(),
            deliver_at,
            reason: None,
        })));
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
