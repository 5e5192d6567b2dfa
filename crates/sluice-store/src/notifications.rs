//! Completion emails waiting to be sent: queued in the transaction that finishes a job, then
//! claimed by mailers under a lease, so a mailer that dies mid-send only delays an email.
//! Shared types and the PostgreSQL statements; SQLite's are in `sqlite::notifications`.

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

/// An email a mailer now holds, with what it needs to say about the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Notification {
    pub id: i64,
    pub request_id: RequestId,
    pub email: String,
    /// Sends tried, this one included.
    pub attempts: i32,
    pub job_state: JobState,
    pub model: String,
    /// The answer's text, for a job that succeeded.
    pub content: Option<String>,
    /// Why the job failed, for one that did not succeed.
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
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
    pub request_id: RequestId,
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
    let state: String = r.try_get("job_state")?;
    Ok(Notification {
        id: r.try_get("id")?,
        request_id: RequestId(r.try_get("job_id")?),
        email: r.try_get("email")?,
        attempts: r.try_get("attempts")?,
        job_state: state.parse().map_err(corrupt)?,
        model: r.try_get("model")?,
        content: r.try_get("content")?,
        error: r.try_get("error")?,
        created_at: r.try_get("created_at")?,
        finished_at: r.try_get("finished_at")?,
    })
}

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
                 SELECT n.id FROM notifications n JOIN jobs j ON j.id = n.job_id
                 WHERE n.state = 'pending' AND n.next_attempt_at <= now()
                   AND (n.locked_until IS NULL OR n.locked_until < now())
                   -- An operator replayed the dead job: tell its final outcome instead.
                   AND j.state IN ('succeeded', 'failed', 'cancelled', 'dead')
                 ORDER BY n.next_attempt_at, n.id LIMIT $1 FOR UPDATE OF n SKIP LOCKED
             ), n AS (
                 UPDATE notifications SET locked_until = now() + $2 * interval '1 millisecond',
                                          attempts = notifications.attempts + 1
                 FROM due WHERE notifications.id = due.id
                 RETURNING notifications.id, notifications.job_id, notifications.email,
                           notifications.attempts
             )
             SELECT n.id, n.job_id, n.email, n.attempts, j.state AS job_state, j.model,
                    CASE WHEN jsonb_typeof(j.result -> 'content') = 'string'
                         THEN j.result ->> 'content' END AS content,
                    j.error, j.created_at, j.finished_at
             FROM n JOIN jobs j ON j.id = n.job_id
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
        let row = sqlx::query(
            "SELECT id, job_id, email, state, attempts, next_attempt_at, locked_until, last_error,
                    created_at, sent_at
             FROM notifications WHERE job_id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            let state: String = r.try_get("state")?;
            Ok(NotificationRow {
                id: r.try_get("id")?,
                request_id: RequestId(r.try_get("job_id")?),
                email: r.try_get("email")?,
                state: state.parse().map_err(corrupt)?,
                attempts: r.try_get("attempts")?,
                next_attempt_at: r.try_get("next_attempt_at")?,
                locked_until: r.try_get("locked_until")?,
                last_error: r.try_get("last_error")?,
                created_at: r.try_get("created_at")?,
                sent_at: r.try_get("sent_at")?,
            })
        })
        .transpose()
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
