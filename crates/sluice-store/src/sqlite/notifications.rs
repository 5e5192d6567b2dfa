//! SQLite's notification statements, mirroring `postgres::notifications`: due rows claimed under
//! the one write lock, one short statement per row.

use super::SqliteBackend;
use crate::notifications::{ClaimedRow, Notification};
use crate::sql::Ts;
use crate::StoreError;
use sluice_core::RequestId;
use std::time::Duration;

impl SqliteBackend {
    pub(crate) async fn queue_notifications_for(
        &self,
        job_ids: &[RequestId],
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let mut queued = 0;
        for id in job_ids {
            queued += sqlx::query(
                "INSERT INTO notifications (job_id, email, next_attempt_at, created_at)
                 SELECT id, notify_email, $2, $2 FROM jobs
                 WHERE id = $1 AND notify_email IS NOT NULL
                   AND state IN ('succeeded', 'failed', 'cancelled', 'dead')
                 ON CONFLICT (job_id) DO NOTHING",
            )
            .bind(id.0)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(queued)
    }

    pub(crate) async fn claim_notifications(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Notification>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        // The write lock is held from BEGIN IMMEDIATE, so no other mailer can take these rows
        // between this read and the updates below: SQLite's answer to FOR UPDATE SKIP LOCKED.
        let due: Vec<(i64,)> = sqlx::query_as(
            "SELECT n.id FROM notifications n
             LEFT JOIN jobs j ON j.id = n.job_id
             LEFT JOIN batches b ON b.id = n.batch_id
             WHERE n.state = 'pending' AND n.next_attempt_at <= $1
               AND (n.locked_until IS NULL OR n.locked_until < $1)
               -- An operator replayed the dead job: tell its final outcome instead.
               AND (j.state IN ('succeeded', 'failed', 'cancelled', 'dead')
                    OR b.status IN ('completed', 'failed', 'expired', 'cancelled'))
             ORDER BY n.next_attempt_at, n.id LIMIT $2",
        )
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut ids: Vec<i64> = due.into_iter().map(|(id,)| id).collect();
        ids.sort_unstable();
        let locked_until = now.after(lease);
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            sqlx::query(
                "UPDATE notifications SET locked_until = $2, attempts = attempts + 1 WHERE id = $1",
            )
            .bind(id)
            .bind(locked_until)
            .execute(&mut *tx)
            .await?;
            let row: ClaimedRow = sqlx::query_as(
                "SELECT n.id, n.job_id, n.batch_id, n.email, n.attempts,
                        j.state AS job_state, j.model,
                        CASE WHEN json_type(j.result, '$.content') = 'text'
                             THEN json_extract(j.result, '$.content') END AS content,
                        j.error, j.finished_at,
                        COALESCE(j.created_at, b.created_at) AS created_at,
                        b.status AS batch_status, b.total, b.completed, b.failed,
                        b.output_file_id, b.error_file_id, b.errors,
                        COALESCE(b.completed_at, b.failed_at, b.expired_at, b.cancelled_at)
                            AS batch_finished_at
                 FROM notifications n
                 LEFT JOIN jobs j ON j.id = n.job_id
                 LEFT JOIN batches b ON b.id = n.batch_id
                 WHERE n.id = $1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(row.into_notification()?);
        }
        tx.commit().await?;
        Ok(claimed)
    }

    pub(crate) async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<(), StoreError> {
        let state = if retry_in.is_some() {
            "pending"
        } else {
            "failed"
        };
        sqlx::query(
            "UPDATE notifications
             SET state = $3, next_attempt_at = $4, locked_until = NULL, last_error = $2
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .bind(error)
        .bind(state)
        .bind(Ts::now().after(retry_in.unwrap_or_default()))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub(crate) async fn release_notifications(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query(
                "UPDATE notifications SET locked_until = NULL, attempts = MAX(attempts - 1, 0)
                 WHERE id = $1 AND state = 'pending' AND locked_until IS NOT NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
