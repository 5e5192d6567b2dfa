//! SQLite's claim, heartbeat, completion, retry, dead-letter, reaping and replay, mirroring
//! `postgres::lifecycle`: each one short write transaction, every update fenced by `attempt`.

use super::jobs::{insert_event, queue_notification};
use super::SqliteBackend;
use crate::jobs::{corrupt, parse_lane};
use crate::lifecycle::{job_ref, Claim, ClaimRow, Completion, Failure};
use crate::outbox::OutboxMessage;
use crate::sql::Ts;
use crate::StoreError;
use sluice_core::{JobRef, JobRequest, Lane, RequestId};
use sqlx::{Sqlite, Transaction};
use std::time::Duration;
use uuid::Uuid;

/// What a statement that changed a job's state returns to queue its lane message and email.
#[derive(sqlx::FromRow)]
pub(super) struct ChangedJob {
    pub(super) event_seq: i32,
    pub(super) attempt: i32,
    pub(super) tenant: String,
    pub(super) model: String,
    pub(super) request: String,
    pub(super) notify_email: Option<String>,
}

impl ChangedJob {
    pub(super) fn request(&self) -> Result<JobRequest, StoreError> {
        serde_json::from_str(&self.request).map_err(corrupt)
    }

    /// Queue job `id`'s message to `lane` in `tx`, the transaction changing its state, and
    /// return it for publishing after the commit.
    pub(super) async fn queue_message(
        self,
        tx: &mut Transaction<'static, Sqlite>,
        id: Uuid,
        lane: Lane,
        deliver_at: Ts,
        reason: Option<&str>,
        now: Ts,
    ) -> Result<OutboxMessage, StoreError> {
        let outbox_id =
            insert_outbox(tx, id, lane.as_str(), self.attempt, deliver_at, reason, now).await?;
        let request = self.request()?;
        Ok(OutboxMessage {
            outbox_id,
            lane,
            job: job_ref(
                RequestId(id),
                self.tenant,
                self.model,
                self.attempt,
                &request,
                false,
            ),
            deliver_at: deliver_at.into(),
            reason: reason.map(str::to_owned),
        })
    }
}

/// A job the reaper moved: to `retrying`, or to `dead` when its retry budget is spent.
#[derive(sqlx::FromRow)]
struct Reaped {
    #[sqlx(flatten)]
    job: ChangedJob,
    state: String,
    error: String,
}

/// A dead job put back in its lane.
#[derive(sqlx::FromRow)]
struct Replayed {
    #[sqlx(flatten)]
    job: ChangedJob,
    lane: String,
}

/// A claim as SQLite's update returns it: the claim and the event number it takes.
#[derive(sqlx::FromRow)]
struct Claimed {
    #[sqlx(flatten)]
    claim: ClaimRow,
    event_seq: i32,
}

/// Queue a lane message for a job in the transaction changing its state.
pub(super) async fn insert_outbox(
    tx: &mut Transaction<'static, Sqlite>,
    job_id: Uuid,
    lane: &str,
    attempt: i32,
    deliver_at: Ts,
    reason: Option<&str>,
    now: Ts,
) -> Result<i64, StoreError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO outbox (job_id, lane, attempt, deliver_at, reason, created_at)
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
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
        let at = Ts::now();
        let lease_until = at.after(lease);
        let mut claims = Vec::with_capacity(jobs.len());
        for job in jobs {
            let row: Option<Claimed> = sqlx::query_as(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, tries = tries + 1,
                                 lease_until = $3, started_at = COALESCE(started_at, $4),
                                 updated_at = $4, event_seq = event_seq + 1
                 WHERE id = $1 AND attempt = $2 AND state IN ('queued', 'retrying')
                 RETURNING id, event_seq, attempt, tries, throttled, lane, request, created_at,
                           tenant",
            )
            .bind(job.request_id.0)
            .bind(job.attempt)
            .bind(lease_until)
            .bind(at)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(Claimed { claim, event_seq }) = row else {
                claims.push(None);
                continue;
            };
            let (claim, tenant) = claim.into_claim()?;
            let detail = serde_json::json!({ "attempt": claim.attempt });
            insert_event(&mut tx, claim.id.0, event_seq, "running", Some(&detail), at).await?;
            claims.push(Some((claim, tenant)));
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
        let lease_until = Ts::now().after(lease);
        let mut extended = 0;
        for (id, attempt) in held {
            extended += sqlx::query(
                "UPDATE jobs SET lease_until = $3
                 WHERE id = $1 AND attempt = $2 AND state = 'running'",
            )
            .bind(id.0)
            .bind(attempt)
            .bind(lease_until)
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
        let now = Ts::now();
        let mut answers = Vec::with_capacity(done.len());
        let mut changed = Vec::new();
        // Each statement is a round trip to SQLite's connection thread: the spend is added once
        // per tenant for the batch, and followers are looked for only where the job has some.
        let mut spent: Vec<(String, f64)> = Vec::new();
        for c in done {
            let row: Option<(i32, Option<String>, String, bool)> = sqlx::query_as(
                "UPDATE jobs SET state = 'succeeded', result = $3, endpoint = $4, error = NULL,
                                 error_status = NULL, lease_until = NULL, finished_at = $5, updated_at = $5,
                                 cost_usd = $6, event_seq = event_seq + 1
                 WHERE id = $1 AND attempt = $2 AND state = 'running'
                 RETURNING event_seq, notify_email, tenant,
                           EXISTS (SELECT 1 FROM jobs AS f
                                   WHERE f.leader = jobs.id AND f.state = 'queued')",
            )
            .bind(c.id.0)
            .bind(c.attempt)
            .bind(&c.result)
            .bind(&c.endpoint)
            .bind(now)
            .bind(c.cost_usd)
            .fetch_optional(&mut *tx)
            .await?;
            let completed = row.is_some();
            if let Some((seq, email, tenant, has_followers)) = row {
                changed.push((c.id, tenant.clone()));
                insert_event(&mut tx, c.id.0, seq, "succeeded", None, now).await?;
                // The completion email, in the same transaction: queued exactly when the job ends.
                queue_notification(&mut tx, c.id.0, email.as_deref(), now).await?;
                if let Some(cost) = c.cost_usd {
                    match spent.iter_mut().find(|(t, _)| *t == tenant) {
                        Some((_, usd)) => *usd += cost,
                        None => spent.push((tenant, cost)),
                    }
                }
                if has_followers {
                    // Jobs attached to this one take the same answer, without a call of their own.
                    let followers: Vec<(uuid::Uuid, i32, Option<String>, String)> = sqlx::query_as(
                        "UPDATE jobs SET state = 'succeeded', result = $2, endpoint = $3,
                                         cached = 'dedup', cost_usd = 0, started_at = $4,
                                         finished_at = $4, updated_at = $4, event_seq = event_seq + 1
                         WHERE leader = $1 AND state = 'queued'
                         RETURNING id, event_seq, notify_email, tenant",
                    )
                    .bind(c.id.0)
                    .bind(&c.result)
                    .bind(&c.endpoint)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?;
                    let detail = serde_json::json!({ "cached": "dedup", "source": c.id });
                    for (id, seq, email, tenant) in followers {
                        changed.push((RequestId(id), tenant));
                        insert_event(&mut tx, id, seq, "succeeded", Some(&detail), now).await?;
                        queue_notification(&mut tx, id, email.as_deref(), now).await?;
                    }
                }
            }
            answers.push(completed);
        }
        for (tenant, usd) in &spent {
            sqlx::query(
                "INSERT INTO tenant_spend (tenant, day, usd) VALUES ($1, $2, $3)
                 ON CONFLICT (tenant, day) DO UPDATE SET usd = usd + excluded.usd",
            )
            .bind(tenant)
            .bind(now.day())
            .bind(usd)
            .execute(&mut *tx)
            .await?;
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
        let at = Ts::now();
        let row: Option<ChangedJob> = sqlx::query_as(
            "UPDATE jobs SET state = $3, error = $4, endpoint = COALESCE($5, endpoint),
                             error_status = $9,
                             lease_until = NULL, updated_at = $6, event_seq = event_seq + 1,
                             finished_at = $7,
                             tries = tries - CASE WHEN $8 THEN 1 ELSE 0 END,
                             throttled = throttled + CASE WHEN $8 THEN 1 ELSE 0 END
             WHERE id = $1 AND attempt = $2 AND state = 'running'
             RETURNING event_seq, attempt, tenant, model, request, notify_email",
        )
        .bind(id.0)
        .bind(attempt)
        .bind(state)
        .bind(&failure.error)
        .bind(&failure.endpoint)
        .bind(at)
        .bind(dead.then_some(at))
        .bind(failure.throttled)
        .bind(failure.status.map(i32::from))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = row else {
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
        insert_event(&mut tx, id.0, job.event_seq, state, Some(&detail), at).await?;
        let reason = dead.then_some(failure.error.as_str());
        if dead {
            // A dead job is finished: its email is queued with the state change.
            queue_notification(&mut tx, id.0, job.notify_email.as_deref(), at).await?;
        }
        let mut message = job
            .queue_message(&mut tx, id.0, lane, at.after(delay), reason, at)
            .await?;
        message.job.rate_limited = failure.throttled;
        tx.commit().await?;
        Ok(Some(message))
    }

    /// One transaction for the whole sweep: SQLite's single writer makes concurrent reapers
    /// take turns, and each finds only leases still expired and `running`.
    pub(crate) async fn reap_expired(
        &self,
        max_tries: i32,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let expired: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM jobs WHERE state = 'running' AND lease_until < $1
             ORDER BY lease_until LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(expired.len());
        for (id,) in expired {
            let Reaped { job, state, error } = sqlx::query_as(
                "UPDATE jobs SET state = CASE WHEN tries >= $2 THEN 'dead' ELSE 'retrying' END,
                                 error = 'lease expired: the worker running attempt '
                                         || attempt || ' stopped responding',
                                 error_status = NULL, lease_until = NULL, updated_at = $3,
                                 event_seq = event_seq + 1,
                                 finished_at = CASE WHEN tries >= $2 THEN $3 END
                 WHERE id = $1 AND state = 'running'
                 RETURNING event_seq, state, attempt, tenant, model, error, request, notify_email",
            )
            .bind(id)
            .bind(max_tries)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let dead = state == "dead";
            let detail = serde_json::json!({ "error": error });
            insert_event(&mut tx, id, job.event_seq, &state, Some(&detail), now).await?;
            let lane = if dead { Lane::Dead } else { Lane::Retry };
            let reason = dead.then_some(error.as_str());
            if dead {
                // Jobs reaped into `dead` are finished: their emails are queued with them.
                queue_notification(&mut tx, id, job.notify_email.as_deref(), now).await?;
            }
            messages.push(
                job.queue_message(&mut tx, id, lane, now, reason, now)
                    .await?,
            );
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn replay(&self, id: RequestId) -> Result<Option<OutboxMessage>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let row: Option<Replayed> = sqlx::query_as(
            "UPDATE jobs SET state = 'queued', tries = 0, lease_until = NULL, finished_at = NULL,
                             updated_at = $2, event_seq = event_seq + 1, request_hash = NULL
             WHERE id = $1 AND state = 'dead'
             RETURNING event_seq, attempt, lane, tenant, model, request, notify_email",
        )
        .bind(id.0)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(Replayed { job, lane }) = row else {
            tx.rollback().await?;
            return Ok(None);
        };
        let detail = serde_json::json!({ "replayed": true });
        insert_event(&mut tx, id.0, job.event_seq, "queued", Some(&detail), now).await?;
        let message = job
            .queue_message(&mut tx, id.0, parse_lane(&lane)?, now, None, now)
            .await?;
        tx.commit().await?;
        Ok(Some(message))
    }
}
