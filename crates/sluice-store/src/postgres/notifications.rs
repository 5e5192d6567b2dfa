//! PostgreSQL's notification statements (types and the public API in `crate::notifications`):
//! due rows claimed with `FOR UPDATE SKIP LOCKED`, many rows per statement.

use crate::notifications::{ClaimedRow, Notification};
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use sluice_core::RequestId;
use std::time::Duration;
use uuid::Uuid;

impl PgBackend {
    /// Queue the completion emails of those jobs that are terminal and asked for one; answers
    /// how many were new. The statements that finish a job queue its email themselves; this
    /// is for tests and repairs. Queueing a job again is a no-op: one email per job.
    pub(crate) async fn queue_notifications_for(
        &self,
        job_ids: &[RequestId],
    ) -> Result<u64, StoreError> {
        let ids: Vec<Uuid> = job_ids.iter().map(|id| id.0).collect();
        let done = sqlx::query(
            "INSERT INTO notifications (job_id, email)
             SELECT id, notify_email FROM jobs
             WHERE id = ANY($1) AND notify_email IS NOT NULL
               AND state IN ('succeeded', 'failed', 'cancelled', 'dead')
             -- One lock order for concurrent callers.
             ORDER BY id
             ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(&ids)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Take up to `limit` due notifications, holding each for `lease`: another mailer takes
    /// a row only once its lease has passed, i.e. its mailer has presumably died.
    pub(crate) async fn claim_notifications(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Notification>, StoreError> {
        let rows: Vec<ClaimedRow> = sqlx::query_as(
            "WITH due AS (
                 SELECT n.id FROM notifications n
                 LEFT JOIN jobs j ON j.id = n.job_id
                 LEFT JOIN batches b ON b.id = n.batch_id
                 WHERE n.state = 'pending' AND n.next_attempt_at <= now()
                   AND (n.locked_until IS NULL OR n.locked_until < now())
                   -- An operator replayed the dead job: tell its final outcome instead.
                   AND (j.state IN ('succeeded', 'failed', 'cancelled', 'dead')
                        OR b.status IN ('completed', 'failed', 'expired', 'cancelled'))
                 ORDER BY n.next_attempt_at, n.id LIMIT $1 FOR UPDATE OF n SKIP LOCKED
             ), n AS (
                 UPDATE notifications SET locked_until = now() + $2 * interval '1 millisecond',
                                          attempts = notifications.attempts + 1
                 FROM due WHERE notifications.id = due.id
                 RETURNING notifications.id, notifications.job_id, notifications.batch_id,
                           notifications.email, notifications.attempts
             )
             SELECT n.id, n.job_id, n.batch_id, n.email, n.attempts,
                    j.state AS job_state, j.model,
                    CASE WHEN jsonb_typeof(j.result -> 'content') = 'string'
                         THEN j.result ->> 'content' END AS content,
                    j.error, j.finished_at,
                    COALESCE(j.created_at, b.created_at) AS created_at,
                    b.status AS batch_status, b.total, b.completed, b.failed, b.output_file_id,
                    b.error_file_id, b.errors,
                    COALESCE(b.completed_at, b.failed_at, b.expired_at, b.cancelled_at)
                        AS batch_finished_at
             FROM n LEFT JOIN jobs j ON j.id = n.job_id LEFT JOIN batches b ON b.id = n.batch_id
             ORDER BY n.id",
        )
        .bind(limit)
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(ClaimedRow::into_notification)
            .collect()
    }

    /// Record a failed send: try again after `retry_in`, or give up for good when `None`.
    /// A row another mailer already marked sent stays sent.
    pub(crate) async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications
             SET state = CASE WHEN $3::bigint IS NULL THEN 'failed' ELSE 'pending' END,
                 next_attempt_at = now() + COALESCE($3::bigint, 0) * interval '1 millisecond',
                 locked_until = NULL, last_error = $2
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(error)
        .bind(retry_in.map(millis))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Give back claimed notifications that were not tried (a mailer shutting down), so the
    /// next mailer need not wait for their leases; the claim does not count as an attempt.
    pub(crate) async fn release_notifications(&self, ids: &[i64]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications SET locked_until = NULL, attempts = GREATEST(attempts - 1, 0)
             WHERE id = ANY($1) AND state = 'pending' AND locked_until IS NOT NULL",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
