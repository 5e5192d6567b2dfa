//! PostgreSQL's claim, heartbeat, completion, retry, dead-letter, reaping and replay: each one
//! statement fenced by `attempt`, many jobs at a time where callers batch them.

use crate::jobs::status_to_db;
use crate::lifecycle::{Claim, ClaimRow, Completion, Failure};
use crate::outbox::{MessageRow, OutboxMessage};
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use sluice_core::{JobRef, Lane, RequestId};
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use uuid::Uuid;

impl PgBackend {
    /// [`Store::claim`] for many messages in one statement; answers in input order, each claim
    /// with its job's tenant. Of two messages for the same job and attempt, only the first
    /// gets the claim.
    pub(crate) async fn claim_many(
        &self,
        jobs: &[JobRef],
        lease: Duration,
    ) -> Result<Vec<Option<(Claim, String)>>, StoreError> {
        let ids: Vec<Uuid> = jobs.iter().map(|j| j.request_id.0).collect();
        let attempts: Vec<i32> = jobs.iter().map(|j| j.attempt).collect();
        let rows: Vec<ClaimRow> = sqlx::query_as(
            "WITH input AS (
                 SELECT DISTINCT id, attempt FROM UNNEST($1::uuid[], $2::int[]) AS t(id, attempt)
                 ORDER BY id
             ), j AS (
                 UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, tries = jobs.tries + 1,
                                 lease_until = now() + $3 * interval '1 millisecond',
                                 started_at = COALESCE(started_at, now()), updated_at = now(),
                                 event_seq = event_seq + 1
                 FROM input
                 WHERE jobs.id = input.id AND jobs.attempt = input.attempt
                   AND jobs.state IN ('queued', 'retrying')
                 RETURNING jobs.id, jobs.event_seq, jobs.attempt, jobs.tries, jobs.throttled,
                           jobs.lane, jobs.request, jobs.created_at, jobs.tenant
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, 'running', jsonb_build_object('attempt', attempt) FROM j
             )
             SELECT id, attempt, tries, throttled, lane, request, created_at, tenant FROM j",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await?;
        let mut claimed: HashMap<(Uuid, i32), (Claim, String)> = HashMap::with_capacity(rows.len());
        for row in rows {
            let (claim, tenant) = row.into_claim()?;
            // Keyed by the attempt the message carried, one before the claim's.
            claimed.insert((claim.id.0, claim.attempt - 1), (claim, tenant));
        }
        Ok(jobs
            .iter()
            .map(|j| claimed.remove(&(j.request_id.0, j.attempt)))
            .collect())
    }

    /// Extend the leases of jobs still running under these attempts.
    pub(crate) async fn heartbeat(
        &self,
        held: &[(RequestId, i32)],
        lease: Duration,
    ) -> Result<u64, StoreError> {
        let ids: Vec<Uuid> = held.iter().map(|(id, _)| id.0).collect();
        let attempts: Vec<i32> = held.iter().map(|(_, a)| *a).collect();
        let done = sqlx::query(
            "UPDATE jobs SET lease_until = now() + $3 * interval '1 millisecond'
             FROM UNNEST($1::uuid[], $2::int[]) AS h(id, attempt)
             WHERE jobs.id = h.id AND jobs.attempt = h.attempt AND jobs.state = 'running'",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(millis(lease))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// [`Store::complete`] for many jobs in one statement; answers in input order, and the
    /// jobs it changed (those completed and their followers) with their tenants.
    pub(crate) async fn complete_many(
        &self,
        done: &[Completion],
    ) -> Result<(Vec<bool>, Vec<(RequestId, String)>), StoreError> {
        let ids: Vec<Uuid> = done.iter().map(|c| c.id.0).collect();
        let attempts: Vec<i32> = done.iter().map(|c| c.attempt).collect();
        let results: Vec<String> = done.iter().map(|c| c.result.to_string()).collect();
        let endpoints: Vec<&str> = done.iter().map(|c| c.endpoint.as_str()).collect();
        let costs: Vec<Option<f64>> = done.iter().map(|c| c.cost_usd).collect();
        let changed: Vec<(Uuid, i32, String, bool)> = sqlx::query_as(
            "WITH input AS (
                 SELECT DISTINCT ON (id, attempt) id, attempt, result, endpoint, cost
                 FROM UNNEST($1::uuid[], $2::int[], $3::text[], $4::text[], $5::float8[])
                     AS t(id, attempt, result, endpoint, cost)
                 ORDER BY id, attempt
             ), j AS (
                 UPDATE jobs SET state = 'succeeded', result = input.result::jsonb,
                                 endpoint = input.endpoint, error = NULL, error_status = NULL,
                                 lease_until = NULL,
                                 cost_usd = input.cost,
                                 finished_at = now(), updated_at = now(), event_seq = event_seq + 1
                 FROM input
                 WHERE jobs.id = input.id AND jobs.attempt = input.attempt AND jobs.state = 'running'
                 RETURNING jobs.id, jobs.event_seq, jobs.attempt, jobs.notify_email, jobs.tenant,
                           jobs.cost_usd, jobs.result, jobs.endpoint
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state) SELECT id, event_seq, 'succeeded' FROM j
             ), n AS (
                 -- The completion email, in the same statement: queued exactly when the job ends.
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             ), spend AS (
                 -- This session's own row (migration 0011): concurrent completions never wait
                 -- on each other's spend.
                 INSERT INTO tenant_spend AS s (tenant, day, shard, usd)
                 SELECT tenant, (now() AT TIME ZONE 'UTC')::date, pg_backend_pid(), sum(cost_usd)
                 FROM j WHERE cost_usd IS NOT NULL GROUP BY tenant
                 ON CONFLICT (tenant, day, shard) DO UPDATE SET usd = s.usd + EXCLUDED.usd
             ), f AS (
                 -- Jobs attached to these take the same answer, without a call of their own.
                 UPDATE jobs SET state = 'succeeded', result = j.result, endpoint = j.endpoint,
                                 cached = 'dedup', cost_usd = 0, started_at = now(),
                                 finished_at = now(), updated_at = now(),
                                 event_seq = jobs.event_seq + 1
                 FROM j WHERE jobs.leader = j.id AND jobs.state = 'queued'
                 RETURNING jobs.id, jobs.event_seq, jobs.notify_email, jobs.tenant, j.id AS leader
             ), fe AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, 'succeeded',
                        jsonb_build_object('cached', 'dedup', 'source', leader)
                 FROM f
             ), fn AS (
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM f WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT id, attempt, tenant, false AS follower FROM j
             UNION ALL SELECT id, 0, tenant, true FROM f",
        )
        .bind(&ids)
        .bind(&attempts)
        .bind(&results)
        .bind(&endpoints)
        .bind(&costs)
        .fetch_all(&self.pool)
        .await?;
        let mut completed: HashSet<(Uuid, i32)> = changed
            .iter()
            .filter(|(_, _, _, follower)| !follower)
            .map(|(id, attempt, _, _)| (*id, *attempt))
            .collect();
        let answers = done
            .iter()
            .map(|c| completed.remove(&(c.id.0, c.attempt)))
            .collect();
        let changed = changed
            .into_iter()
            .map(|(id, _, tenant, _)| (RequestId(id), tenant))
            .collect();
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
        let state = if lane == Lane::Dead {
            "dead"
        } else {
            "retrying"
        };
        let row: Option<MessageRow> = sqlx::query_as(
            "WITH j AS (
                 UPDATE jobs SET state = $3, error = $4, endpoint = COALESCE($5, endpoint),
                                 error_status = $9, lease_until = NULL, updated_at = now(), event_seq = event_seq + 1,
                                 finished_at = CASE WHEN $3 = 'dead' THEN now() END,
                                 tries = tries - CASE WHEN $8 THEN 1 ELSE 0 END,
                                 throttled = throttled + CASE WHEN $8 THEN 1 ELSE 0 END
                 WHERE id = $1 AND attempt = $2 AND state = 'running'
                 RETURNING id, event_seq, attempt, tenant, model, request, state, notify_email
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, $3,
                        jsonb_build_object('error', $4::text, 'delay_ms', $7::bigint,
                                           'throttled', $8::boolean, 'endpoint', $5::text,
                                           'status', $9::smallint) FROM j
             ), o AS (
                 INSERT INTO outbox (job_id, lane, attempt, deliver_at, reason)
                 SELECT id, $6, attempt, now() + $7 * interval '1 millisecond',
                        CASE WHEN $6 = 'dead' THEN $4 END
                 FROM j
                 RETURNING id, job_id, lane, deliver_at, reason
             ), n AS (
                 -- A dead job is finished: its email is queued with the state change.
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL AND state = 'dead'
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, j.id, j.attempt, j.tenant,
                    j.model, j.request
             FROM o JOIN j ON j.id = o.job_id",
        )
        .bind(id.0)
        .bind(attempt)
        .bind(state)
        .bind(&failure.error)
        .bind(&failure.endpoint)
        .bind(lane.as_str())
        .bind(millis(delay))
        .bind(failure.throttled)
        .bind(status_to_db(failure.status))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.into_message(failure.throttled)).transpose()
    }

    /// Requeue jobs whose lease expired (their worker died): to `retry` at once, or to `dead`
    /// when the retry budget is spent. Safe to run from every worker at the same time.
    pub(crate) async fn reap_expired(
        &self,
        max_tries: i32,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "WITH x AS (
                 SELECT id FROM jobs WHERE state = 'running' AND lease_until < now()
                 ORDER BY lease_until LIMIT $2 FOR UPDATE SKIP LOCKED
             ), j AS (
                 UPDATE jobs SET state = CASE WHEN jobs.tries >= $1 THEN 'dead' ELSE 'retrying' END,
                                 error = 'lease expired: the worker running attempt '
                                         || jobs.attempt || ' stopped responding',
                                 error_status = NULL, lease_until = NULL, updated_at = now(), event_seq = event_seq + 1,
                                 finished_at = CASE WHEN jobs.tries >= $1 THEN now() END
                 FROM x WHERE jobs.id = x.id
                 RETURNING jobs.id, jobs.event_seq, jobs.state, jobs.attempt, jobs.tenant,
                           jobs.model, jobs.error, jobs.request, jobs.notify_email
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, state, jsonb_build_object('error', error) FROM j
             ), o AS (
                 INSERT INTO outbox (job_id, lane, attempt, reason)
                 SELECT id, CASE WHEN state = 'dead' THEN 'dead' ELSE 'retry' END, attempt,
                        CASE WHEN state = 'dead' THEN error END
                 FROM j
                 RETURNING id, job_id, lane, deliver_at, reason
             ), n AS (
                 -- Jobs reaped into `dead` are finished: their emails are queued with them.
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL AND state = 'dead'
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, j.id, j.attempt, j.tenant,
                    j.model, j.request
             FROM o JOIN j ON j.id = o.job_id",
        )
        .bind(max_tries)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| r.into_message(false)).collect()
    }

    /// Put a dead job back in its lane with a fresh retry budget.
    pub(crate) async fn replay(&self, id: RequestId) -> Result<Option<OutboxMessage>, StoreError> {
        let row: Option<MessageRow> = sqlx::query_as(
            "WITH j AS (
                 UPDATE jobs SET state = 'queued', tries = 0, lease_until = NULL, finished_at = NULL,
                                 updated_at = now(), event_seq = event_seq + 1,
                                 -- A replayed job runs alone: it may not lead identical ones.
                                 request_hash = NULL
                 WHERE id = $1 AND state = 'dead'
                 RETURNING id, event_seq, attempt, lane, tenant, model, request
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, 'queued', '{\"replayed\": true}'::jsonb FROM j
             ), o AS (
                 INSERT INTO outbox (job_id, lane, attempt) SELECT id, lane, attempt FROM j
                 RETURNING id, job_id, lane, deliver_at, reason
             )
             SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, j.id, j.attempt, j.tenant,
                    j.model, j.request
             FROM o JOIN j ON j.id = o.job_id",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| r.into_message(false)).transpose()
    }
}
