//! PostgreSQL's reconciler statements: one statement each, rows taken with `SKIP LOCKED` so
//! reconcilers on several workers never queue the same job twice in one round.

use crate::outbox::{MessageRow, OutboxMessage};
use crate::postgres::PgBackend;
use crate::reconcile::waiting_in;
use crate::{millis, StoreError};
use sluice_core::{JobRef, Lane};
use std::time::Duration;

impl PgBackend {
    pub(crate) async fn republish_waiting(
        &self,
        lane: Lane,
        waited: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let (waiting, order) = waiting_in(lane);
        let rows: Vec<MessageRow> = sqlx::query_as(&format!(
            "WITH x AS (
                 SELECT id FROM jobs
                 WHERE {waiting} AND updated_at < now() - $2 * interval '1 millisecond'
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = jobs.id)
                 ORDER BY {order} LIMIT $3 FOR UPDATE SKIP LOCKED
             ), j AS (
                 UPDATE jobs SET updated_at = now() FROM x WHERE jobs.id = x.id
                 RETURNING jobs.id, jobs.attempt, jobs.tenant, jobs.model, jobs.request
             ), o AS (
                 INSERT INTO outbox (job_id, lane, attempt) SELECT id, $1, attempt FROM j
                 RETURNING id, job_id, lane, deliver_at, reason
             )
             SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, j.id, j.attempt, j.tenant,
                    j.model, j.request
             FROM o JOIN j ON j.id = o.job_id",
        ))
        .bind(lane.as_str())
        .bind(millis(waited))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(|r| r.into_message(false)).collect()
    }

    /// The dead job's tenant, or `None` when it had moved on.
    pub(crate) async fn dead_lettered_by_broker(
        &self,
        job: &JobRef,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "WITH j AS (
                 UPDATE jobs SET state = 'dead', error = $3, error_status = NULL, lease_until = NULL,
                                 updated_at = now(), finished_at = now(), event_seq = event_seq + 1
                 WHERE id = $1 AND attempt = $2 AND state IN ('queued', 'retrying')
                 RETURNING id, event_seq, tenant, notify_email
             ), e AS (
                 INSERT INTO job_events (job_id, seq, state, detail)
                 SELECT id, event_seq, 'dead', jsonb_build_object('error', $3::text) FROM j
             ), n AS (
                 INSERT INTO notifications (job_id, email)
                 SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                 ON CONFLICT (job_id) DO NOTHING
             )
             SELECT tenant FROM j",
        )
        .bind(job.request_id.0)
        .bind(job.attempt)
        .bind(reason)
        .fetch_optional(&self.pool)
        .await?)
    }
}
