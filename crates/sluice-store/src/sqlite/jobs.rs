//! SQLite's ingest, cancel and detach, mirroring `postgres::jobs`: the job, its first event and
//! its outbox row in one write transaction, a batch of jobs in one transaction of short inserts.

use super::admission::answered_since;
use super::SqliteBackend;
use crate::jobs::{bind_new_job, corrupt, Accepted, Ingested, KeyedJobRow, NewJob, JOB_COLUMNS};
use crate::outbox::OutboxMessage;
use crate::sql::{quoted, Ts};
use crate::{LanesInDatabase, StoreError};
use sluice_core::RequestId;
use sqlx::{Sqlite, Transaction};
use std::time::Duration;

/// Queue a finished job's completion email, if it asked for one; one per job.
pub(super) async fn queue_notification(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: uuid::Uuid,
    email: Option<&str>,
    now: Ts,
) -> Result<(), StoreError> {
    if let Some(email) = email {
        sqlx::query(
            "INSERT INTO notifications (job_id, email, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $3)
             ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(job_id)
        .bind(email)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Cancel one job if it is in one of `states` (and of `tenant`, when given): the state change,
/// its event and its email in the caller's write transaction. Answers the job's tenant when
/// it was cancelled.
pub(super) async fn cancel_one(
    tx: &mut Transaction<'static, Sqlite>,
    id: uuid::Uuid,
    tenant: Option<&str>,
    states: &[&str],
    detail: Option<&serde_json::Value>,
    now: Ts,
) -> Result<Option<String>, StoreError> {
    // `states` are the store's own constants.
    let cancelled: Option<(i32, Option<String>, String)> = sqlx::query_as(&format!(
        "UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = $3,
                         updated_at = $3, event_seq = event_seq + 1,
                         detached_until = NULL, hold_hash = NULL
         WHERE id = $1 AND ($2 IS NULL OR tenant = $2) AND state IN ({})
         RETURNING event_seq, notify_email, tenant",
        quoted(states)
    ))
    .bind(id)
    .bind(tenant)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((seq, email, tenant)) = cancelled else {
        return Ok(None);
    };
    insert_event(tx, id, seq, "cancelled", detail, now).await?;
    // Cancelling finishes the job: its email is queued with the state change.
    queue_notification(tx, id, email.as_deref(), now).await?;
    Ok(Some(tenant))
}

/// Append one event to a job's log.
pub(super) async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: uuid::Uuid,
    seq: i32,
    state: &str,
    detail: Option<&serde_json::Value>,
    now: Ts,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, state, at, detail) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(job_id)
    .bind(seq)
    .bind(state)
    .bind(now)
    .bind(detail)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl SqliteBackend {
    /// Insert a new job's row, its `queued` event and its outbox row (its lane message when
    /// `lanes` is given); `None` when the idempotency key was already used in the tenant
    /// (nothing is written then). A job with a request hash identical to a job in flight is
    /// stored as that job's follower instead, and one whose `reuse_within` finds an answer is
    /// not stored ([`Accepted::Answerable`]).
    pub(super) async fn insert_new(
        tx: &mut Transaction<'static, Sqlite>,
        job: &NewJob,
        idempotency: Option<&(String, Vec<u8>)>,
        lanes: Option<&LanesInDatabase>,
    ) -> Result<Option<Accepted>, StoreError> {
        let request = serde_json::to_string(&job.request).map_err(corrupt)?;
        // Taken inside the transaction, after the write lock: times follow commit order.
        let at = Ts::now();
        let leader = match (&job.request_hash, idempotency) {
            (Some(request_hash), None) => {
                let answered_after = job.reuse_within.map(|within| at.before(within));
                match Self::insert_hashed(tx, job, &request, request_hash, answered_after, at)
                    .await?
                {
                    Some(leader) => leader,
                    None => {
                        // Only an answer the exact cache may reuse stops that insert; one writer
                        // at a time, so it is still there.
                        let unanswered =
                            || corrupt(format!("job {} was neither inserted nor answered", job.id));
                        let after = answered_after.ok_or_else(unanswered)?;
                        let source =
                            answered_since(&mut **tx, &job.principal.tenant, request_hash, after)
                                .await?
                                .ok_or_else(unanswered)?;
                        return Ok(Some(Accepted::Answerable { source }));
                    }
                }
            }
            (_, idempotency) => {
                let (key, hash) = match idempotency {
                    Some((k, h)) => (Some(k.as_str()), Some(h.as_slice())),
                    None => (None, None),
                };
                let inserted = bind_new_job!(
                    sqlx::query(
                        "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request,
                                           notify_email, state, idempotency_key, body_hash,
                                           created_at, updated_at, request_hash, route_reason)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $10, $11, $11,
                                 $12, $13)
                         ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL
                         DO NOTHING
                         RETURNING id",
                    ),
                    job,
                    &request
                )
                .bind(key)
                .bind(hash)
                .bind(at)
                .bind(&job.request_hash)
                .bind(job.route_reason())
                .fetch_optional(&mut **tx)
                .await?;
                if inserted.is_none() {
                    return Ok(None);
                }
                None
            }
        };
        if let Some(leader) = leader {
            let detail = serde_json::json!({ "attached_to": leader });
            insert_event(tx, job.id.0, 1, "queued", Some(&detail), at).await?;
            return Ok(Some(Accepted::Attached {
                leader: RequestId(leader),
            }));
        }
        insert_event(tx, job.id.0, 1, "queued", None, at).await?;
        if let Some(lanes) = lanes {
            // The SQL queue's own insert, in this transaction: ready now.
            let body = serde_json::to_string(&job.job_ref()).map_err(corrupt)?;
            sqlx::query(
                "INSERT INTO sluice_lane_messages (namespace, lane, body, available_at, created_at)
                 VALUES ($1, $2, $3, $4, $4)",
            )
            .bind(&lanes.namespace)
            .bind(job.lane.as_str())
            .bind(body)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            return Ok(Some(Accepted::Enqueued));
        }
        let (outbox_id,): (i64,) = sqlx::query_as(
            "INSERT INTO outbox (job_id, lane, attempt, deliver_at, created_at)
             VALUES ($1, $2, 0, $3, $3) RETURNING id",
        )
        .bind(job.id.0)
        .bind(job.lane.as_str())
        .bind(at)
        .fetch_one(&mut **tx)
        .await?;
        Ok(Some(Accepted::Queued(OutboxMessage {
            outbox_id,
            lane: job.lane,
            job: job.job_ref(),
            deliver_at: at.into(),
            reason: None,
        })))
    }

    /// A job with a request hash and no idempotency key, in one statement (each statement is a
    /// round trip to SQLite's connection thread): stored as the follower of an identical job in
    /// flight (`Some(Some(leader))`), as a job of its own (`Some(None)`), or not at all when a job
    /// with its hash succeeded after `answered_after` (`None`).
    async fn insert_hashed(
        tx: &mut Transaction<'static, Sqlite>,
        job: &NewJob,
        request: &str,
        request_hash: &[u8],
        answered_after: Option<Ts>,
        at: Ts,
    ) -> Result<Option<Option<uuid::Uuid>>, StoreError> {
        // The same conditions as `jobs_in_flight_request` and `jobs_answers`, so both
        // look-ups are searches of those indexes.
        let inserted: Option<(Option<uuid::Uuid>,)> = bind_new_job!(
            sqlx::query_as(
                "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, created_at, updated_at, request_hash, route_reason,
                                   leader)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'queued', $9, $9, $10, $11,
                        (SELECT id FROM jobs
                         WHERE tenant = $2 AND request_hash = $10 AND leader IS NULL
                           AND idempotency_key IS NULL
                           AND state IN ('queued', 'running', 'retrying'))
                 WHERE $12 IS NULL OR NOT EXISTS (
                     SELECT 1 FROM jobs
                     WHERE tenant = $2 AND request_hash = $10 AND state = 'succeeded'
                       AND leader IS NULL AND finished_at > $12)
                 RETURNING leader",
            ),
            job,
            request
        )
        .bind(at)
        .bind(request_hash)
        .bind(job.route_reason())
        .bind(answered_after)
        .fetch_optional(&mut **tx)
        .await?;
        Ok(inserted.map(|(leader,)| leader))
    }

    pub(crate) async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(accepted) =
            Self::insert_new(&mut tx, job, job.idempotency.as_ref(), None).await?
        {
            tx.commit().await?;
            let message = accepted
                .into_queued()
                .ok_or_else(|| corrupt("a job with an idempotency key was attached"))?;
            return Ok(Ingested::Created(message));
        }
        // The key was used before; read that job while still holding the lock, then let go.
        let key = job.idempotency.as_ref().map(|(k, _)| k.as_str());
        let hash = job.idempotency.as_ref().map(|(_, h)| h.as_slice());
        let row: KeyedJobRow = sqlx::query_as(&format!(
            "SELECT {JOB_COLUMNS}, body_hash FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
        ))
        .bind(&job.principal.tenant)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        row.ingested(hash)
    }

    /// Jobs without idempotency keys: one transaction of three short inserts per job, which
    /// in-process SQLite runs in microseconds each; any failure stores none of the batch. A job
    /// whose `reuse_within` finds an answer is not stored.
    pub(crate) async fn insert_jobs(
        &self,
        jobs: &[NewJob],
    ) -> Result<Vec<Result<Accepted, StoreError>>, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut outcomes = Vec::with_capacity(jobs.len());
        for job in jobs {
            // Like the PostgreSQL batch, this path stores no idempotency keys.
            let message = Self::insert_new(&mut tx, job, None, self.lanes.as_deref())
                .await?
                .ok_or_else(|| corrupt(format!("job {} was not inserted", job.id)))?;
            outcomes.push(Ok(message));
        }
        tx.commit().await?;
        if let Some(lanes) = &self.lanes {
            let enqueued = jobs.iter().zip(&outcomes);
            lanes.wake_all(enqueued.filter_map(|(job, outcome)| {
                matches!(outcome, Ok(Accepted::Enqueued)).then_some(job.lane)
            }));
        }
        Ok(outcomes)
    }

    pub(crate) async fn cancel(
        &self,
        tenant: &str,
        id: RequestId,
        states: &[&str],
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let cancelled = cancel_one(&mut tx, id.0, Some(tenant), states, None, Ts::now()).await?;
        if cancelled.is_some() {
            tx.commit().await?;
            return Ok(true);
        }
        tx.rollback().await?;
        Ok(false)
    }

    pub(crate) async fn detach(
        &self,
        tenant: &str,
        id: RequestId,
        hold_hash: &[u8],
        grace: Duration,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE jobs SET hold_hash = $3, detached_until = $4
             WHERE id = $1 AND tenant = $2 AND state IN ('queued', 'retrying', 'running')",
        )
        .bind(id.0)
        .bind(tenant)
        .bind(hold_hash)
        .bind(Ts::now().after(grace))
        .execute(&self.write)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// One write transaction: the look-up and the take happen under the single write lock, so
    /// two callers never take the same job.
    pub(crate) async fn reattach(
        &self,
        tenant: &str,
        hold_hash: &[u8],
        states: &[&str],
    ) -> Result<Option<RequestId>, StoreError> {
        let mut tx = self.begin_write().await?;
        // `states` are the store's own constants.
        let sql = format!(
            "UPDATE jobs SET detached_until = NULL, hold_hash = NULL
             WHERE id = (
                 SELECT id FROM jobs
                 WHERE tenant = $1 AND hold_hash = $2 AND detached_until IS NOT NULL
                   AND detached_until > $3 AND state IN ({})
                 ORDER BY id LIMIT 1
             )
             RETURNING id",
            quoted(states)
        );
        let taken: Option<(uuid::Uuid,)> = sqlx::query_as(&sql)
            .bind(tenant)
            .bind(hold_hash)
            .bind(Ts::now())
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(taken.map(|(id,)| RequestId(id)))
    }

    pub(crate) async fn cancel_detached(
        &self,
        limit: i64,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let expired: Vec<(uuid::Uuid, String, String)> = sqlx::query_as(
            "SELECT id, tenant, state FROM jobs
             WHERE detached_until IS NOT NULL AND detached_until <= $1
             ORDER BY detached_until LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let detail = serde_json::json!({ "reason": "detached" });
        let mut cancelled = Vec::new();
        for (id, tenant, state) in expired {
            if state == "queued" || state == "retrying" {
                // Under the write lock the state read above still holds: this cancels.
                let waiting = ["queued", "retrying"];
                if cancel_one(&mut tx, id, None, &waiting, Some(&detail), now)
                    .await?
                    .is_some()
                {
                    cancelled.push((RequestId(id), tenant));
                }
            } else {
                // Running (its answer is stored for whoever asks) or already terminal.
                sqlx::query(
                    "UPDATE jobs SET detached_until = NULL, hold_hash = NULL WHERE id = $1",
                )
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(cancelled)
    }
}
