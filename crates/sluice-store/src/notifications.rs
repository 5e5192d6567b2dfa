//! Completion emails waiting to be sent: queued in the transaction that finishes a job or a
//! batch (one row each, at most), then claimed by mailers under a lease, so a mailer that dies
//! mid-send only delays an email.
//! Shared types and the PostgreSQL statements; SQLite's are in `sqlite::notifications`.

use crate::batches::{parse_status, BatchStatus};
use crate::jobs::corrupt;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobState, RequestId};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// An email a mailer now holds, with what it needs to say about the job or batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: i64,
    pub email: String,
    /// Sends tried, this one included.
    pub attempts: i32,
    /// When the job or batch was submitted.
    pub created_at: DateTime<Utc>,
    pub subject: NotificationSubject,
}

/// What a notification tells about.
#[derive(Debug, Clone, PartialEq)]
pub enum NotificationSubject {
    /// A job that finished.
    Job {
        request_id: RequestId,
        job_state: JobState,
        model: String,
        /// The answer's text, for a job that succeeded.
        content: Option<String>,
        /// Why the job failed, for one that did not succeed.
        error: Option<String>,
        finished_at: Option<DateTime<Utc>>,
    },
    /// A batch that ended.
    Batch {
        batch_id: String,
        status: BatchStatus,
        total: i32,
        completed: i32,
        failed: i32,
        output_file_id: Option<String>,
        error_file_id: Option<String>,
        /// Why a batch failed (OpenAI's `errors` object), for one refused at creation.
        errors: Option<serde_json::Value>,
        finished_at: Option<DateTime<Utc>>,
    },
}

/// Where a notification is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum NotificationState {
    Pending,
    Sent,
    /// Given up on: attempts spent, or the server refused the message for good.
    Failed,
}

impl NotificationState {
    pub fn as_str(self) -> &'static str {
        match self {
            NotificationState::Pending => "pending",
            NotificationState::Sent => "sent",
            NotificationState::Failed => "failed",
        }
    }
}

impl fmt::Display for NotificationState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for NotificationState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pending" => Ok(NotificationState::Pending),
            "sent" => Ok(NotificationState::Sent),
            "failed" => Ok(NotificationState::Failed),
            _ => Err(format!("unknown notification state {s:?}")),
        }
    }
}

/// A notification row as operators and tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    pub id: i64,
    /// The job the email is about; `None` for a batch's email.
    pub request_id: Option<RequestId>,
    /// The batch the email is about; `None` for a job's email.
    pub batch_id: Option<String>,
    pub email: String,
    pub state: NotificationState,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub locked_until: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

fn notification_from_row(r: &PgRow) -> Result<Notification, StoreError> {
    let job: Option<Uuid> = r.try_get("job_id")?;
    let subject = match job {
        Some(job) => {
            let state: String = r.try_get("job_state")?;
            NotificationSubject::Job {
                request_id: RequestId(job),
                job_state: state.parse().map_err(corrupt)?,
                model: r.try_get("model")?,
                content: r.try_get("content")?,
                error: r.try_get("error")?,
                finished_at: r.try_get("finished_at")?,
            }
        }
        None => {
            let status: String = r.try_get("batch_status")?;
            NotificationSubject::Batch {
                batch_id: r.try_get("batch_id")?,
                status: parse_status(&status)?,
                total: r.try_get("total")?,
                completed: r.try_get("completed")?,
                failed: r.try_get("failed")?,
                output_file_id: r.try_get("output_file_id")?,
                error_file_id: r.try_get("error_file_id")?,
                errors: r.try_get("errors")?,
                finished_at: r.try_get("batch_finished_at")?,
            }
        }
    };
    Ok(Notification {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        attempts: r.try_get("attempts")?,
        created_at: r.try_get("created_at")?,
        subject,
    })
}

fn row_from_row(r: &PgRow) -> Result<NotificationRow, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(NotificationRow {
        id: r.try_get("id")?,
        request_id: r.try_get::<Option<Uuid>, _>("job_id")?.map(RequestId),
        batch_id: r.try_get("batch_id")?,
        email: r.try_get("email")?,
        state: state.parse().map_err(corrupt)?,
        attempts: r.try_get("attempts")?,
        next_attempt_at: r.try_get("next_attempt_at")?,
        locked_until: r.try_get("locked_until")?,
        last_error: r.try_get("last_error")?,
        created_at: r.try_get("created_at")?,
        sent_at: r.try_get("sent_at")?,
    })
}

pub(crate) const ROW_COLUMNS: &str = "id, job_id, batch_id, email, state, attempts, \
     next_attempt_at, locked_until, last_error, created_at, sent_at";

impl PgBackend {
    /// Queue the completion emails of those jobs that are terminal and asked for one; answers
    /// how many were new. The statements that finish a job queue its email themselves; this
    /// is for tests and repairs. Queueing a job again is a no-op: one email per job.
    pub(crate) async fn queue_notifications_for(
        &self,
        job_ids: &[RequestId],
    ) -> Result<u64, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
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
        let rows = sqlx::query(
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
        rows.iter().map(notification_from_row).collect()
    }

    /// Record that a notification's email was handed to the SMTP server.
    pub(crate) async fn notification_sent(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE notifications SET state = 'sent', sent_at = now(), locked_until = NULL
             WHERE id = $1 AND state = 'pending'",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
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
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "UPDATE notifications SET locked_until = NULL, attempts = GREATEST(attempts - 1, 0)
             WHERE id = ANY($1) AND state = 'pending' AND locked_until IS NOT NULL",
        )
        .bind(ids)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The notification of a job, if it has one.
    pub(crate) async fn notification_for(
        &self,
        id: RequestId,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM notifications WHERE job_id = $1"
        ))
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_from_row).transpose()
    }

    /// The notification of a batch, if it has one.
    pub(crate) async fn batch_notification(
        &self,
        batch_id: &str,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {ROW_COLUMNS} FROM notifications WHERE batch_id = $1"
        ))
        .bind(batch_id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_from_row).transpose()
    }

    /// Notifications per state (readiness and metrics).
    pub(crate) async fn notification_counts(
        &self,
    ) -> Result<Vec<(NotificationState, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT state, count(*) FROM notifications GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(state, n)| Ok((state.parse().map_err(corrupt)?, n)))
            .collect()
    }
}
