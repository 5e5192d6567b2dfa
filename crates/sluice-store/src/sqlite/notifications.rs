//! SQLite storage of completion emails, mirroring `crate::notifications`: rows queued with the
//! state change that finished the job or the batch, claimed by mailers under a lease.

use super::jobs::{opt_json, opt_ts, req_ts};
use super::{ts, ts_after, SqliteBackend};
use crate::batches::parse_status;
use crate::jobs::corrupt;
use crate::notifications::{
    Notification, NotificationRow, NotificationState, NotificationSubject, ROW_COLUMNS,
};
use crate::StoreError;
use chrono::Utc;
use sluice_core::RequestId;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::time::Duration;

fn row_from_row(r: &SqliteRow) -> Result<NotificationRow, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(NotificationRow {
        id: r.try_get("id")?,
        request_id: r.try_get::<Option<uuid::Uuid>, _>("job_id")?.map(RequestId),
        batch_id: r.try_get("batch_id")?,
        email: r.try_get("email")?,
        state: state.parse().map_err(corrupt)?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: req_ts(r, "next_attempt_at")?,
        locked_until: opt_ts(r, "locked_until")?,
        last_error: r.try_get("last_error")?,
        created_at: req_ts(r, "created_at")?,
        sent_at: opt_ts(r, "sent_at")?,
    })
}

/// What a claimed notification tells about: its job's outcome, or its batch's.
fn subject_from_row(r: &SqliteRow) -> Result<NotificationSubject, StoreError> {
    let job: Option<uuid::Uuid> = r.try_get("job_id")?;
    if let Some(job) = job {
        let state: String = r.try_get("job_state")?;
        // The answer's text, when the stored result has a string `content`.
        let content = opt_json(r, "result")?.and_then(|result| match result.get("content") {
            Some(serde_json::Value::String(text)) => Some(text.clone()),
            _ => None,
        });
        return Ok(NotificationSubject::Job {
            request_id: RequestId(job),
            job_state: state.parse().map_err(corrupt)?,
            model: r.try_get("model")?,
            content,
            error: r.try_get("error")?,
            finished_at: opt_ts(r, "finished_at")?,
        });
    }
    let status: String = r.try_get("batch_status")?;
    Ok(NotificationSubject::Batch {
        batch_id: r.try_get("batch_id")?,
        status: parse_status(&status)?,
        total: r.try_get("total")?,
        completed: r.try_get("completed")?,
        failed: r.try_get("failed")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        errors: opt_json(r, "errors")?,
        finished_at: opt_ts(r, "batch_finished_at")?,
    })
}

impl SqliteBackend {
    pub(crate) async fn queue_notifications_for(
        &self,
        job_ids: &[RequestId],
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let mut queued = 0;
        for id in job_ids {
            queued += sqlx::query(
                "INSERT INTO notifications (job_id, email, next_attempt_at, created_at)
                 SELECT id, notify_email, ?2, ?2 FROM jobs
                 WHERE id = ?1 AND notify_email IS NOT NULL
                   AND state IN ('succeeded', 'failed', 'cancelled', 'dead')
                 ON CONFLICT (job_id) DO NOTHING",
            )
            .bind(id.0)
            .bind(&now)
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
        let now = Utc::now();
        let at = ts(now);
        // The write lock is held from BEGIN IMMEDIATE, so no other mailer can take these rows
        // between this read and the updates below: SQLite's answer to FOR UPDATE SKIP LOCKED.
        let due: Vec<(i64,)> = sqlx::query_as(
            "SELECT n.id FROM notifications n
             LEFT JOIN jobs j ON j.id = n.job_id
             LEFT JOIN batches b ON b.id = n.batch_id
             WHERE n.state = 'pending' AND n.next_attempt_at <= ?1
               AND (n.locked_until IS NULL OR n.locked_until < ?1)
               -- An operator replayed the dead job: tell its final outcome instead.
               AND (j.state IN ('succeeded', 'failed', 'cancelled', 'dead')
                    OR b.status IN ('completed', 'failed', 'expired', 'cancelled'))
             ORDER BY n.next_attempt_at, n.id LIMIT ?2",
        )
        .bind(&at)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut ids: Vec<i64> = due.into_iter().map(|(id,)| id).collect();
        ids.sort_unstable();
        let locked_until = ts_after(now, lease);
        let mut claimed = Vec::with_capacity(ids.len());
        for id in ids {
            sqlx::query(
                "UPDATE notifications SET locked_until = ?2, attempts = attempts + 1 WHERE id = ?1",
            )
            .bind(id)
            .bind(&locked_until)
            .execute(&mut *tx)
            .await?;
            let r = sqlx::query(
                "SELECT n.id, n.job_id, n.batch_id, n.email, n.attempts,
                        j.state AS job_state, j.model, j.result, j.error, j.finished_at,
                        COALESCE(j.created_at, b.created_at) AS created_at,
                        b.status AS batch_status, b.total, b.completed, b.failed,
                        b.output_file_id, b.error_file_id, b.errors,
                        COALESCE(b.completed_at, b.failed_at, b.expired_at, b.cancelled_at)
                            AS batch_finished_at
                 FROM notifications n
                 LEFT JOIN jobs j ON j.id = n.job_id
                 LEFT JOIN batches b ON b.id = n.batch_id
                 WHERE n.id = ?1",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
            claimed.push(Notification {
                id: r.try_get("id")?,
                email: r.try_get("email")?,
                attempts: r.try_get("attempts")?,
                created_at: req_ts(&r, "created_at")?,
                subject: subject_from_row(&r)?,
            });
        }
        tx.commit().await?;
        Ok(claimed)
    }

    pub(crate) async fn notification_sent(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications SET state = 'sent', sent_at = ?2, locked_until = NULL
             WHERE id = ?1 AND state = 'pending'",
        )
        .bind(id)
        .bind(ts(Utc::now()))
        .execute(&self.write)
        .await?;
        Ok(())
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
             SET state = ?3, next_attempt_at = ?4, locked_until = NULL, last_error = ?2
             WHERE id = ?1 AND state = 'pending'",
        )
        .bind(id)
        .bind(error)
        .bind(state)
        .bind(ts_after(Utc::now(), retry_in.unwrap_or_default()))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub(crate) async fn release_notifications(&self, ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for id in ids {
            sqlx::query(
                "UPDATE notifications SET locked_until = NULL, attempts = MAX(attempts - 1, 0)
                 WHERE id = ?1 AND state = 'pending' AND locked_until IS NOT NULL",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn notification_for(
        &self,
        id: RequestId,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM notifications WHERE job_id = ?1"
        ))
        .bind(id.0)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(row_from_row).transpose()
    }

    pub(crate) async fn batch_notification(
        &self,
        batch_id: &str,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM notifications WHERE batch_id = ?1"
        ))
        .bind(batch_id)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(row_from_row).transpose()
    }

    pub(crate) async fn notification_counts(
        &self,
    ) -> Result<Vec<(NotificationState, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM notifications GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|(state, n)| Ok((state.parse().map_err(corrupt)?, n)))
            .collect()
    }
}
