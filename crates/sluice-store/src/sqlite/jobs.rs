//! SQLite ingest, reads and cancel, mirroring `crate::jobs`: the job, its first event and its
//! outbox row are written in one transaction; a batch is one transaction of short inserts.

use super::{parse_json, parse_ts, ts, SqliteBackend};
use crate::jobs::{
    corrupt, parse_lane, Accepted, CancelOutcome, Ingested, JobEvent, JobRecord, NewJob, Reuse,
    JOB_COLUMNS,
};
use crate::outbox::OutboxMessage;
use crate::StoreError;
use chrono::Utc;
use sluice_core::{JobState, RequestId};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};

pub(super) fn opt_ts(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<chrono::DateTime<Utc>>, StoreError> {
    row.try_get::<Option<String>, _>(column)?
        .as_deref()
        .map(parse_ts)
        .transpose()
}

pub(super) fn req_ts(row: &SqliteRow, column: &str) -> Result<chrono::DateTime<Utc>, StoreError> {
    parse_ts(&row.try_get::<String, _>(column)?)
}

pub(super) fn opt_json(
    row: &SqliteRow,
    column: &str,
) -> Result<Option<serde_json::Value>, StoreError> {
    row.try_get::<Option<String>, _>(column)?
        .as_deref()
        .map(parse_json)
        .transpose()
}

fn job_from_row(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    let tier: String = row.try_get("tier")?;
    let lane: String = row.try_get("lane")?;
    let state: String = row.try_get("state")?;
    let request: String = row.try_get("request")?;
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
        request: serde_json::from_str(&request).map_err(corrupt)?,
        result: opt_json(row, "result")?,
        error: row.try_get("error")?,
        endpoint: row.try_get("endpoint")?,
        created_at: req_ts(row, "created_at")?,
        updated_at: req_ts(row, "updated_at")?,
        started_at: opt_ts(row, "started_at")?,
        finished_at: opt_ts(row, "finished_at")?,
        leader: row
            .try_get::<Option<uuid::Uuid>, _>("leader")?
            .map(RequestId),
        cached: row
            .try_get::<Option<String>, _>("cached")?
            .as_deref()
            .map(Reuse::parse)
            .transpose()?,
        route_reason: row.try_get("route_reason")?,
        cost_usd: row.try_get("cost_usd")?,
    })
}

type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments<'q>>;

/// Bind the columns every single-job insert starts with, as `?1..?8`: id, tenant, user_id,
/// tier, lane, model (the routing key), request, notify_email.
pub(super) fn bind_new_job<'q>(
    query: SqliteQuery<'q>,
    job: &'q NewJob,
    request: &'q str,
) -> SqliteQuery<'q> {
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

/// Queue a finished job's completion email, if it asked for one; one per job.
pub(super) async fn queue_notification(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: uuid::Uuid,
    email: Option<&str>,
    now: &str,
) -> Result<(), StoreError> {
    if let Some(email) = email {
        sqlx::query(
            "INSERT INTO notifications (job_id, email, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?3)
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

/// Append one event to a job's log.
pub(super) async fn insert_event(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: uuid::Uuid,
    seq: i32,
    state: &str,
    detail: Option<&serde_json::Value>,
    now: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO job_events (job_id, seq, state, at, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(job_id)
    .bind(seq)
    .bind(state)
    .bind(now)
    .bind(detail.map(|d| d.to_string()))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

impl SqliteBackend {
    /// Insert a new job's row, its `queued` event and its outbox row; `None` when the
    /// idempotency key was already used in the tenant (nothing is written then). A job with a
    /// request hash identical to a job in flight is stored as that job's follower instead.
    async fn insert_new(
        tx: &mut Transaction<'static, Sqlite>,
        job: &NewJob,
        idempotency: Option<&(String, Vec<u8>)>,
    ) -> Result<Option<Accepted>, StoreError> {
        let request = serde_json::to_string(&job.request).map_err(corrupt)?;
        let (key, hash) = match idempotency {
            Some((k, h)) => (Some(k.as_str()), Some(h.as_slice())),
            None => (None, None),
        };
        // One writer at a time: the leader found here cannot change before the insert.
        let leader: Option<(uuid::Uuid,)> = match (&job.request_hash, key) {
            (Some(request_hash), None) => {
                sqlx::query_as(
                    "SELECT id FROM jobs
                     WHERE tenant = ?1 AND request_hash = ?2 AND leader IS NULL
                       AND idempotency_key IS NULL AND state IN ('queued', 'running', 'retrying')",
                )
                .bind(&job.principal.tenant)
                .bind(request_hash)
                .fetch_optional(&mut **tx)
                .await?
            }
            _ => None,
        };
        let leader = leader.map(|(id,)| id);
        // Taken inside the transaction, after the write lock: times follow commit order.
        let now = Utc::now();
        let at = ts(now);
        let inserted = bind_new_job(
            sqlx::query(
                "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, idempotency_key, body_hash, created_at, updated_at,
                                   request_hash, route_reason, leader)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'queued', ?9, ?10, ?11, ?11, ?12, ?13, ?14)
                 ON CONFLICT (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
                 RETURNING id",
            ),
            job,
            &request,
        )
        .bind(key)
        .bind(hash)
        .bind(&at)
        .bind(&job.request_hash)
        .bind(job.route_reason())
        .bind(leader)
        .fetch_optional(&mut **tx)
        .await?;
        if inserted.is_none() {
            return Ok(None);
        }
        if let Some(leader) = leader {
            let detail = serde_json::json!({ "attached_to": leader });
            insert_event(tx, job.id.0, 1, "queued", Some(&detail), &at).await?;
            return Ok(Some(Accepted::Attached {
                leader: RequestId(leader),
            }));
        }
        insert_event(tx, job.id.0, 1, "queued", None, &at).await?;
        let (outbox_id,): (i64,) = sqlx::query_as(
            "INSERT INTO outbox (job_id, lane, attempt, deliver_at, created_at)
             VALUES (?1, ?2, 0, ?3, ?3) RETURNING id",
        )
        .bind(job.id.0)
        .bind(job.lane.as_str())
        .bind(&at)
        .fetch_one(&mut **tx)
        .await?;
        Ok(Some(Accepted::Queued(OutboxMessage {
            outbox_id,
            lane: job.lane,
            job: job.job_ref(),
            deliver_at: parse_ts(&at)?,
            reason: None,
        })))
    }

    pub(crate) async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let mut tx = self.begin_write().await?;
        if let Some(accepted) = Self::insert_new(&mut tx, job, job.idempotency.as_ref()).await? {
            tx.commit().await?;
            let message = accepted
                .into_queued()
                .ok_or_else(|| corrupt("a job with an idempotency key was attached"))?;
            return Ok(Ingested::Created(message));
        }
        // The key was used before; read that job while still holding the lock, then let go.
        let key = job.idempotency.as_ref().map(|(k, _)| k.as_str());
        let hash = job.idempotency.as_ref().map(|(_, h)| h.as_slice());
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS}, body_hash FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2"
        ))
        .bind(&job.principal.tenant)
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        tx.rollback().await?;
        let stored: Option<Vec<u8>> = row.try_get("body_hash")?;
        Ok(if stored.as_deref() == hash {
            Ingested::Existing(Box::new(job_from_row(&row)?))
        } else {
            Ingested::Conflict
        })
    }

    /// Jobs without idempotency keys: one transaction of three short inserts per job, which
    /// in-process SQLite runs in microseconds each; any failure stores none of the batch.
    pub(crate) async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<Vec<Accepted>, StoreError> {
        let mut tx = self.begin_write().await?;
        let mut messages = Vec::with_capacity(jobs.len());
        for job in jobs {
            // Like the PostgreSQL batch, this path stores no idempotency keys.
            let message = Self::insert_new(&mut tx, job, None)
                .await?
                .ok_or_else(|| corrupt(format!("job {} was not inserted", job.id)))?;
            messages.push(message);
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn get_job(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1 AND tenant = ?2"
        ))
        .bind(id.0)
        .bind(tenant)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(crate) async fn job(&self, id: RequestId) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1"))
            .bind(id.0)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(job_from_row).transpose()
    }

    pub(crate) async fn events(&self, id: RequestId) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, state, at, detail FROM job_events WHERE job_id = ?1 ORDER BY seq",
        )
        .bind(id.0)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(JobEvent {
                    seq: r.try_get("seq")?,
                    state: state.parse().map_err(corrupt)?,
                    at: req_ts(r, "at")?,
                    detail: opt_json(r, "detail")?,
                })
            })
            .collect()
    }

    pub(crate) async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, StoreError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, count(*) FROM jobs GROUP BY state ORDER BY state")
                .fetch_all(&self.read)
                .await?;
        rows.into_iter()
            .map(|(s, n)| Ok((s.parse().map_err(corrupt)?, n)))
            .collect()
    }

    pub(crate) async fn cancel(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let cancelled: Option<(i32, Option<String>)> = sqlx::query_as(
            "UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = ?3,
                             updated_at = ?3, event_seq = event_seq + 1
             WHERE id = ?1 AND tenant = ?2 AND state IN ('queued', 'retrying', 'running')
             RETURNING event_seq, notify_email",
        )
        .bind(id.0)
        .bind(tenant)
        .bind(&now)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((seq, email)) = cancelled {
            insert_event(&mut tx, id.0, seq, "cancelled", None, &now).await?;
            // Cancelling finishes the job: its email is queued with the state change.
            queue_notification(&mut tx, id.0, email.as_deref(), &now).await?;
            tx.commit().await?;
            return Ok(CancelOutcome::Cancelled);
        }
        tx.rollback().await?;
        Ok(match self.get_job(tenant, id).await? {
            Some(job) => CancelOutcome::Terminal(job.state),
            None => CancelOutcome::NotFound,
        })
    }

    pub(crate) async fn purge_dead(&self, id: RequestId) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let deleted = sqlx::query("DELETE FROM jobs WHERE id = ?1 AND state = 'dead'")
            .bind(id.0)
            .execute(&mut *tx)
            .await?;
        if deleted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        for table in ["job_events", "outbox", "semantic_entries"] {
            sqlx::query(&format!("DELETE FROM {table} WHERE job_id = ?1"))
                .bind(id.0)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}
