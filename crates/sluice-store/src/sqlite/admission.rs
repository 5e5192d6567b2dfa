//! SQLite's admission statements, mirroring `postgres::admission`: reused answers, followers,
//! lane load, spend and embeddings. One writer at a time makes the follower checks race-free.

use super::jobs::{insert_event, queue_notification};
use super::lifecycle::insert_outbox;
use super::SqliteBackend;
use crate::admission::{LaneStats, SemanticEntry, SettledFollowers};
use crate::jobs::{bind_new_job, corrupt, parse_lane, NewJob, Reuse};
use crate::lifecycle::job_ref;
use crate::outbox::OutboxMessage;
use crate::sql::{opt, Ts};
use crate::StoreError;
use sluice_core::{JobRequest, RequestId};
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

impl SqliteBackend {
    pub(crate) async fn reusable_answer(
        &self,
        tenant: &str,
        request_hash: &[u8],
        within: Duration,
    ) -> Result<Option<RequestId>, StoreError> {
        reusable_answer(&self.read, tenant, request_hash, within).await
    }

    /// One look-up after another: reads on SQLite have no round trip to share.
    pub(crate) async fn reusable_answers(
        &self,
        wanted: &[(String, Vec<u8>)],
        within: Duration,
    ) -> Result<Vec<Option<RequestId>>, StoreError> {
        let mut answers = Vec::with_capacity(wanted.len());
        for (tenant, hash) in wanted {
            answers.push(self.reusable_answer(tenant, hash, within).await?);
        }
        Ok(answers)
    }

    pub(crate) async fn insert_answered(
        &self,
        job: &NewJob,
        source: RequestId,
        how: Reuse,
    ) -> Result<bool, StoreError> {
        let request = serde_json::to_string(&job.request).map_err(corrupt)?;
        let mut tx = self.begin_write().await?;
        let at = Ts::now();
        let inserted = bind_new_job!(
            sqlx::query(
                "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, request_hash, route_reason, result, endpoint, cached,
                                   cost_usd, event_seq, created_at, updated_at, started_at,
                                   finished_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'succeeded', $9, $11, result, endpoint,
                        $12, 0, 2, $13, $13, $13, $13
                 FROM jobs WHERE id = $10 AND tenant = $2 AND state = 'succeeded'
                 RETURNING notify_email",
            ),
            job,
            &request
        )
        .bind(&job.request_hash)
        .bind(source.0)
        .bind(job.route_reason())
        .bind(how.as_str())
        .bind(at)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(inserted) = inserted else {
            tx.rollback().await?;
            return Ok(false);
        };
        let email: Option<String> = inserted.try_get("notify_email")?;
        let detail = serde_json::json!({ "cached": how.as_str(), "source": source });
        insert_event(&mut tx, job.id.0, 1, "queued", None, at).await?;
        insert_event(&mut tx, job.id.0, 2, "succeeded", Some(&detail), at).await?;
        queue_notification(&mut tx, job.id.0, email.as_deref(), at).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn settle_followers(
        &self,
        limit: i64,
    ) -> Result<SettledFollowers, StoreError> {
        let mut tx = self.begin_write().await?;
        let at = Ts::now();
        let rows = sqlx::query(
            "SELECT f.id, f.tenant, f.notify_email, f.attempt, f.lane, f.model, f.request,
                    l.id AS leader, l.state AS leader_state, l.result, l.error, l.endpoint
             FROM jobs f LEFT JOIN jobs l ON l.id = f.leader
             WHERE f.leader IS NOT NULL AND f.state = 'queued'
               AND (l.id IS NULL OR l.state IN ('succeeded', 'failed', 'dead', 'cancelled'))
             ORDER BY f.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut settled = SettledFollowers::default();
        for r in &rows {
            let id: Uuid = r.try_get("id")?;
            let tenant: String = r.try_get("tenant")?;
            let leader: Option<Uuid> = r.try_get("leader")?;
            let leader_state: Option<String> = r.try_get("leader_state")?;
            match (leader, leader_state.as_deref()) {
                (Some(leader), Some(state @ ("succeeded" | "failed" | "dead"))) => {
                    let error: Option<String> = r.try_get("error")?;
                    let error = (state != "succeeded").then(|| {
                        format!(
                            "the identical job {leader} this one was attached to ended {state}: {}",
                            error.unwrap_or_default()
                        )
                    });
                    let (seq,): (i32,) = sqlx::query_as(
                        "UPDATE jobs SET state = $2, result = $3, endpoint = $4, error = $5,
                                         cached = CASE WHEN $2 = 'succeeded' THEN 'dedup' END,
                                         cost_usd = 0, started_at = $6, finished_at = $6,
                                         updated_at = $6, event_seq = event_seq + 1
                         WHERE id = $1 RETURNING event_seq",
                    )
                    .bind(id)
                    .bind(state)
                    .bind(r.try_get::<Option<String>, _>("result")?)
                    .bind(r.try_get::<Option<String>, _>("endpoint")?)
                    .bind(&error)
                    .bind(at)
                    .fetch_one(&mut *tx)
                    .await?;
                    let detail = match &error {
                        None => serde_json::json!({ "cached": "dedup", "source": leader }),
                        Some(error) => serde_json::json!({ "error": error }),
                    };
                    insert_event(&mut tx, id, seq, state, Some(&detail), at).await?;
                    let email: Option<String> = r.try_get("notify_email")?;
                    queue_notification(&mut tx, id, email.as_deref(), at).await?;
                    settled.finished.push((RequestId(id), tenant));
                }
                _ => {
                    // The leader was cancelled or is gone: this job runs alone.
                    sqlx::query(
                        "UPDATE jobs SET leader = NULL, request_hash = NULL, updated_at = $2
                         WHERE id = $1",
                    )
                    .bind(id)
                    .bind(at)
                    .execute(&mut *tx)
                    .await?;
                    let lane: String = r.try_get("lane")?;
                    let attempt: i32 = r.try_get("attempt")?;
                    let outbox_id =
                        insert_outbox(&mut tx, id, &lane, attempt, at, None, at).await?;
                    let request: String = r.try_get("request")?;
                    let request: JobRequest = serde_json::from_str(&request).map_err(corrupt)?;
                    let model = r.try_get("model")?;
                    settled.released.push(OutboxMessage {
                        outbox_id,
                        lane: parse_lane(&lane)?,
                        job: job_ref(RequestId(id), tenant, model, attempt, &request, false),
                        deliver_at: at.into(),
                        reason: None,
                    });
                }
            }
        }
        tx.commit().await?;
        Ok(settled)
    }

    pub(crate) async fn lane_stats(&self, window: Duration) -> Result<Vec<LaneStats>, StoreError> {
        let queued: Vec<(String, i64, Option<Ts>)> = sqlx::query_as(
            "SELECT lane, count(*), min(created_at) FROM jobs
             WHERE state = 'queued' AND leader IS NULL GROUP BY lane",
        )
        .fetch_all(&self.read)
        .await?;
        let started: Vec<(String, i64, Option<Ts>)> = sqlx::query_as(
            "SELECT lane, count(*), min(started_at) FROM jobs
             WHERE started_at > $1 AND leader IS NULL GROUP BY lane",
        )
        .bind(Ts::now().before(window))
        .fetch_all(&self.read)
        .await?;
        let mut stats: Vec<LaneStats> = Vec::new();
        for (lane, depth, oldest) in queued {
            stats.push(LaneStats {
                lane: parse_lane(&lane)?,
                depth: u64::try_from(depth).unwrap_or(0),
                oldest: opt(oldest),
                started: 0,
                first_started: None,
            });
        }
        for (lane, n, first) in started {
            let lane = parse_lane(&lane)?;
            let n = u64::try_from(n).unwrap_or(0);
            let first = opt(first);
            match stats.iter_mut().find(|s| s.lane == lane) {
                Some(s) => {
                    s.started = n;
                    s.first_started = first;
                }
                None => stats.push(LaneStats {
                    lane,
                    depth: 0,
                    oldest: None,
                    started: n,
                    first_started: first,
                }),
            }
        }
        Ok(stats)
    }

    pub(crate) async fn spent_today(&self, tenant: &str) -> Result<f64, StoreError> {
        let row: Option<(f64,)> =
            sqlx::query_as("SELECT usd FROM tenant_spend WHERE tenant = $1 AND day = $2")
                .bind(tenant)
                .bind(Ts::now().day())
                .fetch_optional(&self.read)
                .await?;
        Ok(row.map_or(0.0, |(usd,)| usd))
    }

    pub(crate) async fn semantic_candidates(
        &self,
        tenant: &str,
        model: &str,
        within: Duration,
        limit: i64,
    ) -> Result<Vec<SemanticEntry>, StoreError> {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT s.job_id, s.embedding FROM semantic_entries s
             JOIN jobs j ON j.id = s.job_id
             WHERE s.tenant = $1 AND s.model = $2 AND s.created_at > $3 AND j.state = 'succeeded'
             ORDER BY s.created_at DESC LIMIT $4",
        )
        .bind(tenant)
        .bind(model)
        .bind(Ts::now().before(within))
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, embedding)| SemanticEntry {
                job: RequestId(id),
                embedding,
            })
            .collect())
    }
}

/// The exact cache's look-up, on the read pool or inside a write transaction.
pub(super) async fn reusable_answer<'e, E>(
    executor: E,
    tenant: &str,
    request_hash: &[u8],
    within: Duration,
) -> Result<Option<RequestId>, StoreError>
where
    E: sqlx::SqliteExecutor<'e>,
{
    answered_since(executor, tenant, request_hash, Ts::now().before(within)).await
}

/// The tenant's newest job with this hash that succeeded after `after` and may answer others.
pub(super) async fn answered_since<'e, E>(
    executor: E,
    tenant: &str,
    request_hash: &[u8],
    after: Ts,
) -> Result<Option<RequestId>, StoreError>
where
    E: sqlx::SqliteExecutor<'e>,
{
    let row: Option<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM jobs
         WHERE tenant = $1 AND request_hash = $2 AND state = 'succeeded' AND leader IS NULL
           AND finished_at > $3
         ORDER BY finished_at DESC LIMIT 1",
    )
    .bind(tenant)
    .bind(request_hash)
    .bind(after)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(id,)| RequestId(id)))
}
