//! SQLite claim, heartbeat, completion, retry, dead-letter, reaping and replay, mirroring
//! `crate::lifecycle`: each is one short write transaction, every update fenced by `attempt`.

use super::jobs::{insert_event, queue_notification, req_ts};
use super::{parse_ts, ts, ts_after, SqliteBackend};
use crate::jobs::{corrupt, parse_lane};
use crate::lifecycle::{Claim, Completion, DeadJob, Failure};
use crate::outbox::OutboxMessage;
use crate::StoreError;
use chrono::Utc;
use sluice_core::{JobRef, JobRequest, Lane, RequestId};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, Transaction};
use std::time::Duration;
use uuid::Uuid;

pub(super) fn request_of(row: &SqliteRow) -> Result<JobRequest, StoreError> {
    let request: String = row.try_get("request")?;
    serde_json::from_str(&request).map_err(corrupt)
}

/// Queue a lane message for a job in the transaction changing its state.
pub(super) async fn insert_outbox(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: Uuid,
    lane: &str,
    attempt: i32,
    deliver_at: &str,
    reason: Option<&str>,
    now: &str,
) -> Result<i64, StoreError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO outbox (job_id, lane, attempt, deliver_at, reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) RETURNING id",
    )
    .bind(job_id)
    .bind(lane)
    .bind(attempt)
    .bind(deliver_at)
    .bind(reason)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    Ok(id)
}

impl SqliteBackend {
    /// Claims in input order, so of two messages for the same job and attempt the first wins:
    /// the second no longer matches the attempt the first moved on.
    pub(crate) async fn claim_many(
        &self,
        jobs: &[JobRef],
        lease: Duration,
    ) -> Result<Vec<Option<(Claim, String)>>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Utc::now();
        let (at, lease_until) = (ts(now), ts_after(now, lease));
        let mut claims = Vec::with_capacity(jobs.len());
        for job in jobs {
            let row = sqlx::query(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, tries = tries + 1,
                                 lease_until = ?3, started_at = COALESCE(started_at, ?4),
                                 updated_at = ?4, event_seq = event_seq + 1
                 WHERE id = ?1 AND attempt = ?2 AND state IN ('queued', 'retrying')
                 RETURNING event_seq, attempt, tries, throttled, lane, request, created_at, tenant",
            )
            .bind(job.request_id.0)
            .bind(job.attempt)
            .bind(&lease_until)
            .bind(&at)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(r) = row else {
                claims.push(None);
                continue;
            };
            let attempt: i32 = r.try_get("attempt")?;
            let detail = serde_json::json!({ "attempt": attempt });
            let seq: i32 = r.try_get("event_seq")?;
            insert_event(
                &mut tx,
                job.request_id.0,
                seq,
                "running",
                Some(&detail),
                &at,
            )
            .await?;
            let lane: String = r.try_get("lane")?;
            let claim = Claim {
                id: job.request_id,
                attempt,
                tries: r.try_get("tries")?,
                throttled: r.try_get("throttled")?,
                lane: parse_lane(&lane)?,
                request: request_of(&r)?,
                created_at: req_ts(&r, "created_at")?,
            };
            claims.push(Some((claim, r.try_get("tenant")?)));
        }
        tx.commit().await?;
        Ok(claims)
    }

    pub(crate) async fn heartbeat(
        &self,
        held: &[(RequestId, i32)],
        lease: Duration,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let lease_until = ts_after(Utc::now(), lease);
        let mut extended = 0;
        for (id, attempt) in held {
            extended += sqlx::query(
                "UPDATE jobs SET lease_until = ?3
                 WHERE id = ?1 AND attempt = ?2 AND state = 'running'",
            )
            .bind(id.0)
            .bind(attempt)
            .bind(&lease_until)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(extended)
    }

    /// Completions in input order: a duplicate finds the job no longer `running` and answers
    /// `false`. Also answers the jobs changed (those completed and their followers).
    pub(crate) async fn complete_many(
        &self,
        done: &[Completion],
    ) -> Result<(Vec<bool>, Vec<(RequestId, String)>), StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let mut answers = Vec::with_capacity(done.len());
        let mut changed = Vec::new();
        for c in done {
            let row: Option<(i32, Option<String>, String)> = sqlx::query_as(
                "UPDATE jobs SET state = 'succeeded', result = ?3, endpoint = ?4, error = NULL,
                                 error_status = NULL, lease_until = NULL, finished_at = ?5, updated_at = ?5,
                                 cost_usd = ?6, event_seq = event_seq + 1
                 WHERE id = ?1 AND attempt = ?2 AND state = 'running'
                 RETURNING event_seq, notify_email, tenant",
            )
            .bind(c.id.0)
            .bind(c.attempt)
            .bind(c.result.to_string())
            .bind(&c.endpoint)
            .bind(&now)
            .bind(c.cost_usd)
            .fetch_optional(&mut *tx)
            .await?;
            let completed = row.is_some();
            if let Some((seq, email, tenant)) = row {
                changed.push((c.id, tenant.clone()));
                insert_event(&mut tx, c.id.0, seq, "succeeded", None, &now).await?;
                // The completion email, in the same transaction: queued exactly when the job ends.
                queue_notification(&mut tx, c.id.0, email.as_deref(), &now).await?;
                if let Some(cost) = c.cost_usd {
                    sqlx::query(
                        "INSERT INTO tenant_spend (tenant, day, usd) VALUES (?1, ?2, ?3)
                         ON CONFLICT (tenant, day) DO UPDATE SET usd = usd + excluded.usd",
                    )
                    .bind(&tenant)
                    .bind(&now[..10])
                    .bind(cost)
                    .execute(&mut *tx)
                    .await?;
                }
                // Jobs attached to this one take the same answer, without a call of their own.
                let followers: Vec<(uuid::Uuid, i32, Option<String>, String)> = sqlx::query_as(
                    "UPDATE jobs SET state = 'succeeded', result = ?2, endpoint = ?3,
                                     cached = 'dedup', cost_usd = 0, started_at = ?4,
                                     finished_at = ?4, updated_at = ?4, event_seq = event_seq + 1
                     WHERE leader = ?1 AND state = 'queued'
                     RETURNING id, event_seq, notify_email, tenant",
                )
                .bind(c.id.0)
                .bind(c.result.to_string())
                .bind(&c.endpoint)
                .bind(&now)
                .fetch_all(&mut *tx)
                .await?;
                let detail = serde_json::json!({ "cached": "dedup", "source": c.id });
                for (id, seq, email, tenant) in followers {
                    changed.push((RequestId(id), tenant));
                    insert_event(&mut tx, id, seq, "succeeded", Some(&detail), &now).await?;
                    queue_notification(&mut tx, id, email.as_deref(), &now).await?;
                }
            }
            answers.push(completed);
        }
        tx.commit().await?;
        Ok((answers, changed))
    }

    pub(crate) async fn fail(
        &self,
        id: RequestId,
        attempt: i32,
        failure: &Failure,
        lane: Lane,
        delay: Duration,
    ) -> Result<Option<OutboxMessage>, StoreError> {
        let dead = lane == Lane::Dead;
        let state = if dead { "dead" } else { "retrying" };
        let mut tx = self.begin_write().await?;
        let now = Utc::now();
        let at = ts(now);
        let row = sqlx::query(
            "UPDATE jobs SET state = ?3, error = ?4, endpoint = COALESCE(?5, endpoint),
                             error_status = ?9,
                             lease_until = NULL, updated_at = ?6, event_seq = event_seq + 1,
                             finished_at = ?7,
                             tries = tries - CASE WHEN ?8 THEN 1 ELSE 0 END,
                             throttled = throttled + CASE WHEN ?8 THEN 1 ELSE 0 END
             WHERE id = ?1 AND attempt = ?2 AND state = 'running'
             RETURNING event_seq, attempt, tenant, model, request, notify_email",
        )
        .bind(id.0)
        .bind(attempt)
        .bind(state)
        .bind(&failure.error)
        .bind(&failure.endpoint)
        .bind(&at)
        .bind(dead.then_some(&at))
        .bind(failure.throttled)
        .bind(failure.status.map(i32::from))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let detail = serde_json::json!({
            "error": failure.error,
            "delay_ms": crate::millis(delay),
            "throttled": failure.throttled,
            "endpoint": failure.endpoint,
            "status": failure.status,
        });
        let seq: i32 = r.try_get("event_seq")?;
        insert_event(&mut tx, id.0, seq, state, Some(&detail), &at).await?;
        let deliver_at = ts_after(now, delay);
        let reason = dead.then_some(failure.error.as_str());
        let attempt: i32 = r.try_get("attempt")?;
        let outbox_id = insert_outbox(
            &mut tx,
            id.0,
            lane.as_str(),
            attempt,
            &deliver_at,
            reason,
            &at,
        )
        .await?;
        if dead {
            // A dead job is finished: its email is queued with the state change.
            let email: Option<String> = r.try_get("notify_email")?;
            queue_notification(&mut tx, id.0, email.as_deref(), &at).await?;
        }
        let message = OutboxMessage {
            outbox_id,
            lane,
            job: JobRef {
                waiting_since_ms: None,
                tokens: request_of(&r)?.estimated_tokens(),
                rate_limited: failure.throttled,
                request_id: id,
                tenant: r.try_get("tenant")?,
                model: r.try_get("model")?,
                attempt,
            },
            deliver_at: parse_ts(&deliver_at)?,
            reason: reason.map(str::to_owned),
        };
        tx.commit().await?;
        Ok(Some(message))
    }

    /// One transaction for the whole sweep: SQLite's single writer makes concurrent reapers
    /// take turns, and each finds only leases still expired and `running`.
    pub(crate) async fn reap_expired(
        &self,
        max_tries: u32,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let max_tries = i32::try_from(max_tries).unwrap_or(i32::MAX);
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let expired: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_until < ?1
             ORDER BY lease_until LIMIT ?2",
        )
        .bind(&now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(expired.len());
        for (id,) in expired {
            let r = sqlx::query(
                "UPDATE jobs SET state = CASE WHEN tries >= ?2 THEN 'dead' ELSE 'retrying' END,
                                 error = 'lease expired: the worker running attempt '
                                         || attempt || ' stopped responding',
                                 error_status = NULL, lease_until = NULL, updated_at = ?3, event_seq = event_seq + 1,
                                 finished_at = CASE WHEN tries >= ?2 THEN ?3 END
                 WHERE id = ?1 AND state = 'running'
                 RETURNING event_seq, state, attempt, tenant, model, error, request, notify_email",
            )
            .bind(id)
            .bind(max_tries)
            .bind(&now)
            .fetch_one(&mut *tx)
            .await?;
            let state: String = r.try_get("state")?;
            let error: String = r.try_get("error")?;
            let dead = state == "dead";
            let seq: i32 = r.try_get("event_seq")?;
            let detail = serde_json::json!({ "error": error });
            insert_event(&mut tx, id, seq, &state, Some(&detail), &now).await?;
            let lane = if dead { Lane::Dead } else { Lane::Retry };
            let attempt: i32 = r.try_get("attempt")?;
            let reason = dead.then_some(error.as_str());
            let outbox_id =
                insert_outbox(&mut tx, id, lane.as_str(), attempt, &now, reason, &now).await?;
            if dead {
                // Jobs reaped into `dead` are finished: their emails are queued with them.
                let email: Option<String> = r.try_get("notify_email")?;
                queue_notification(&mut tx, id, email.as_deref(), &now).await?;
            }
            messages.push(OutboxMessage {
                outbox_id,
                lane,
                job: JobRef {
                    waiting_since_ms: None,
                    tokens: request_of(&r)?.estimated_tokens(),
                    rate_limited: false,
                    request_id: RequestId(id),
                    tenant: r.try_get("tenant")?,
                    model: r.try_get("model")?,
                    attempt,
                },
                deliver_at: parse_ts(&now)?,
                reason: reason.map(str::to_owned),
            });
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn replay(&self, id: RequestId) -> Result<Option<OutboxMessage>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let row = sqlx::query(
            "UPDATE jobs SET state = 'queued', tries = 0, lease_until = NULL, finished_at = NULL,
                             updated_at = ?2, event_seq = event_seq + 1, request_hash = NULL
             WHERE id = ?1 AND state = 'dead'
             RETURNING event_seq, attempt, lane, tenant, model, request",
        )
        .bind(id.0)
        .bind(&now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(r) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let seq: i32 = r.try_get("event_seq")?;
        let detail = serde_json::json!({ "replayed": true });
        insert_event(&mut tx, id.0, seq, "queued", Some(&detail), &now).await?;
        let lane: String = r.try_get("lane")?;
        let attempt: i32 = r.try_get("attempt")?;
        let outbox_id = insert_outbox(&mut tx, id.0, &lane, attempt, &now, None, &now).await?;
        let message = OutboxMessage {
            outbox_id,
            lane: parse_lane(&lane)?,
            job: JobRef {
                waiting_since_ms: None,
                tokens: request_of(&r)?.estimated_tokens(),
                rate_limited: false,
                request_id: id,
                tenant: r.try_get("tenant")?,
                model: r.try_get("model")?,
                attempt,
            },
            deliver_at: parse_ts(&now)?,
            reason: None,
        };
        tx.commit().await?;
        Ok(Some(message))
    }

    pub(crate) async fn dead_jobs(&self, limit: i64) -> Result<Vec<DeadJob>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, tenant, model, error, updated_at FROM jobs WHERE state = 'dead'
             ORDER BY updated_at DESC LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(DeadJob {
                    id: RequestId(r.try_get("id")?),
                    tenant: r.try_get("tenant")?,
                    model: r.try_get("model")?,
                    error: r.try_get("error")?,
                    at: req_ts(r, "updated_at")?,
                })
            })
            .collect()
    }
}
