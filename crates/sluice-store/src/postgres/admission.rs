//! PostgreSQL's admission statements (types and the public API in `crate::admission`): reused
//! answers and followers settled in one statement each, lane load, spend and embeddings.

use crate::admission::{LaneStats, SemanticEntry, SettledFollowers};
use crate::jobs::{bind_new_job, corrupt, parse_lane, NewJob, Reuse};
use crate::outbox::MessageRow;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use sluice_core::RequestId;
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

impl PgBackend {
    /// The tenant's newest successful job with this request hash that finished within `within`.
    pub(crate) async fn reusable_answer(
        &self,
        tenant: &str,
        request_hash: &[u8],
        within: Duration,
    ) -> Result<Option<RequestId>, StoreError> {
        let row: Option<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM jobs
             WHERE tenant = $1 AND request_hash = $2 AND state = 'succeeded' AND leader IS NULL
               AND finished_at > now() - $3 * interval '1 millisecond'
             ORDER BY finished_at DESC LIMIT 1",
        )
        .bind(tenant)
        .bind(request_hash)
        .bind(millis(within))
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|(id,)| RequestId(id)))
    }

    pub(crate) async fn reusable_answers(
        &self,
        wanted: &[(String, Vec<u8>)],
        within: Duration,
    ) -> Result<Vec<Option<RequestId>>, StoreError> {
        let tenants: Vec<&str> = wanted.iter().map(|(t, _)| t.as_str()).collect();
        let hashes: Vec<&[u8]> = wanted.iter().map(|(_, h)| h.as_slice()).collect();
        // The same look-up as `reusable_answer`, once per pair (an index scan of jobs_answers).
        let rows: Vec<(i64, Option<Uuid>)> = sqlx::query_as(
            "SELECT w.n, (SELECT id FROM jobs
                          WHERE tenant = w.tenant AND request_hash = w.hash
                            AND state = 'succeeded' AND leader IS NULL
                            AND finished_at > now() - $3 * interval '1 millisecond'
                          ORDER BY finished_at DESC LIMIT 1)
             FROM UNNEST($1::text[], $2::bytea[]) WITH ORDINALITY AS w(tenant, hash, n)
             ORDER BY w.n",
        )
        .bind(&tenants)
        .bind(&hashes)
        .bind(millis(within))
        .fetch_all(&self.pool)
        .await?;
        if rows.len() != wanted.len() {
            return Err(StoreError::Corrupt(format!(
                "{} answers to {} cache look-ups",
                rows.len(),
                wanted.len()
            )));
        }
        Ok(rows.into_iter().map(|(_, id)| id.map(RequestId)).collect())
    }

    /// Store `job` as already succeeded with `source`'s answer; `false` (nothing written) if
    /// `source` is not a successful job of the same tenant.
    pub(crate) async fn insert_answered(
        &self,
        job: &NewJob,
        source: RequestId,
        how: Reuse,
    ) -> Result<bool, StoreError> {
        let request = serde_json::to_value(&job.request).map_err(corrupt)?;
        let detail = serde_json::json!({ "cached": how.as_str(), "source": source });
        let row = bind_new_job!(
            sqlx::query(
                "WITH src AS (
                 SELECT result, endpoint FROM jobs
                 WHERE id = $10 AND tenant = $2 AND state = 'succeeded'
             ), j AS (
                 INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email,
                                   state, request_hash, route_reason, result, endpoint, cached,
                                   cost_usd, event_seq, started_at, finished_at)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8, 'succeeded', $9, $11, src.result,
                        src.endpoint, $12, 0, 2, now(), now()
                 FROM src
                 RETURNING id, notify_email
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, 1, 'queued', NULL FROM j
                 UNION ALL SELECT id, 2, 'succeeded', $13::jsonb FROM j
             ), n AS (
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT id FROM j",
            ),
            job,
            &request
        )
        .bind(&job.request_hash)
        .bind(source.0)
        .bind(job.route_reason())
        .bind(how.as_str())
        .bind(&detail)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    /// Followers of finished leaders take their outcome: a success its answer, a failure its
    /// state and error; followers of a cancelled (or missing) leader are queued on their own.
    pub(crate) async fn settle_followers(
        &self,
        limit: i64,
    ) -> Result<SettledFollowers, StoreError> {
        let finished: Vec<(Uuid, String)> = sqlx::query_as(
            "WITH f AS (
                 SELECT f.id, l.id AS leader, l.state, l.result, l.error, l.endpoint
                 FROM jobs f JOIN jobs l ON l.id = f.leader
                 WHERE f.leader IS NOT NULL AND f.state = 'queued'
                   AND l.state IN ('succeeded', 'failed', 'dead')
                 ORDER BY f.id LIMIT $1 FOR UPDATE OF f SKIP LOCKED
             ), j AS (
                 UPDATE jobs SET state = f.state, result = f.result, endpoint = f.endpoint,
                                 error = CASE WHEN f.state = 'succeeded' THEN NULL
                                              ELSE 'the identical job ' || f.leader
                                                   || ' this one was attached to ended '
                                                   || f.state || ': ' || COALESCE(f.error, '')
                                         END,
                                 cached = CASE WHEN f.state = 'succeeded' THEN 'dedup' END,
                                 cost_usd = 0, started_at = now(), finished_at = now(),
                                 updated_at = now(), event_seq = event_seq + 1
                 FROM f WHERE jobs.id = f.id
                 RETURNING jobs.id, jobs.tenant, jobs.event_seq, jobs.state, jobs.error,
                           jobs.notify_email, f.leader
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, state,
                        CASE WHEN state = 'succeeded'
                             THEN jsonb_build_object('cached', 'dedup', 'source', leader)
                             ELSE jsonb_build_object('error', error) END
                 FROM j
             ), n AS (
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT id, tenant FROM j",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        // Released followers drop their hash: they run alone and never lead other jobs.
        let released: Vec<MessageRow> = sqlx::query_as(
            "WITH f AS (
                 SELECT f.id FROM jobs f LEFT JOIN jobs l ON l.id = f.leader
                 WHERE f.leader IS NOT NULL AND f.state = 'queued'
                   AND (l.id IS NULL OR l.state = 'cancelled')
                 ORDER BY f.id LIMIT $1 FOR UPDATE OF f SKIP LOCKED
             ), j AS (
                 UPDATE jobs SET leader = NULL, request_hash = NULL, updated_at = now()
                 FROM f WHERE jobs.id = f.id
                 RETURNING jobs.id, jobs.attempt, jobs.lane, jobs.tenant, jobs.model, jobs.request
             ), o AS (
                 INSERT INTO outbox (job_id, lane, attempt) SELECT id, lane, attempt FROM j
                 RETURNING id, job_id, lane, deliver_at, reason
             )
             SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, j.id, j.attempt, j.tenant,
                    j.model, j.request
             FROM o JOIN j ON j.id = o.job_id",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(SettledFollowers {
            finished: finished
                .into_iter()
                .map(|(id, tenant)| (RequestId(id), tenant))
                .collect(),
            released: released
                .into_iter()
                .map(|r| r.into_message(false))
                .collect::<Result<_, _>>()?,
        })
    }

    /// Depth, oldest job and recent starts of every lane that has any.
    pub(crate) async fn lane_stats(&self, window: Duration) -> Result<Vec<LaneStats>, StoreError> {
        let rows = sqlx::query(
            "WITH q AS (
                 SELECT lane, count(*) AS depth, min(created_at) AS oldest FROM jobs
                 WHERE state = 'queued' AND leader IS NULL GROUP BY lane
             ), s AS (
                 SELECT lane, count(*) AS started, min(started_at) AS first_started FROM jobs
                 WHERE started_at > now() - $1 * interval '1 millisecond' AND leader IS NULL
                 GROUP BY lane
             )
             SELECT COALESCE(q.lane, s.lane) AS lane, COALESCE(q.depth, 0) AS depth, q.oldest,
                    COALESCE(s.started, 0) AS started, s.first_started
             FROM q FULL JOIN s ON s.lane = q.lane",
        )
        .bind(millis(window))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let lane: String = r.try_get("lane")?;
                Ok(LaneStats {
                    lane: parse_lane(&lane)?,
                    depth: u64::try_from(r.try_get::<i64, _>("depth")?).unwrap_or(0),
                    oldest: r.try_get("oldest")?,
                    started: u64::try_from(r.try_get::<i64, _>("started")?).unwrap_or(0),
                    first_started: r.try_get("first_started")?,
                })
            })
            .collect()
    }

    /// What the tenant's jobs cost today (UTC), in US dollars.
    pub(crate) async fn spent_today(&self, tenant: &str) -> Result<f64, StoreError> {
        // One row per session that completed the tenant's jobs today (migration 0011).
        let (usd,): (Option<f64>,) = sqlx::query_as(
            "SELECT sum(usd) FROM tenant_spend
             WHERE tenant = $1 AND day = (now() AT TIME ZONE 'UTC')::date",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(usd.unwrap_or(0.0))
    }

    /// Embeddings of the tenant's successful jobs for `model` from the last `within`, newest
    /// first, at most `limit`.
    pub(crate) async fn semantic_candidates(
        &self,
        tenant: &str,
        model: &str,
        within: Duration,
        limit: i64,
    ) -> Result<Vec<SemanticEntry>, StoreError> {
        let rows: Vec<(Uuid, Vec<u8>)> = sqlx::query_as(
            "SELECT s.job_id, s.embedding FROM semantic_entries s JOIN jobs j ON j.id = s.job_id
             WHERE s.tenant = $1 AND s.model = $2
               AND s.created_at > now() - $3 * interval '1 millisecond'
               AND j.state = 'succeeded'
             ORDER BY s.created_at DESC LIMIT $4",
        )
        .bind(tenant)
        .bind(model)
        .bind(millis(within))
        .bind(limit)
        .fetch_all(&self.pool)
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
