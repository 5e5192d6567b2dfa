//! Completion emails, queued with the change that ends a job or a batch and claimed by mailers
//! under a lease: the types, the rows both backends read, the public API and shared statements.

use crate::batches::{parse_status, BatchStatus};
use crate::jobs::corrupt;
use crate::sql::{dispatch, opt, reading, writing, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobState, RequestId};
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

pub(crate) const ROW_COLUMNS: &str = "id, job_id, batch_id, email, state, attempts, \
     next_attempt_at, locked_until, last_error, created_at, sent_at";

/// A `notifications` row of [`ROW_COLUMNS`].
#[derive(sqlx::FromRow)]
struct RowRow {
    id: i64,
    job_id: Option<Uuid>,
    batch_id: Option<String>,
    email: String,
    state: String,
    attempts: i32,
    next_attempt_at: Ts,
    locked_until: Option<Ts>,
    last_error: Option<String>,
    created_at: Ts,
    sent_at: Option<Ts>,
}

impl RowRow {
    fn into_row(self) -> Result<NotificationRow, StoreError> {
        Ok(NotificationRow {
            id: self.id,
            request_id: self.job_id.map(RequestId),
            batch_id: self.batch_id,
            email: self.email,
            state: self.state.parse().map_err(corrupt)?,
            attempts: self.attempts,
            next_attempt_at: self.next_attempt_at.into(),
            locked_until: opt(self.locked_until),
            last_error: self.last_error,
            created_at: self.created_at.into(),
            sent_at: opt(self.sent_at),
        })
    }
}

/// A claimed notification with its job's outcome or its batch's, as either backend's claim
/// returns it.
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimedRow {
    id: i64,
    email: String,
    attempts: i32,
    created_at: Ts,
    job_id: Option<Uuid>,
    job_state: Option<String>,
    model: Option<String>,
    /// The answer's text, when the job's result has a string `content`.
    content: Option<String>,
    error: Option<String>,
    finished_at: Option<Ts>,
    batch_id: Option<String>,
    batch_status: Option<String>,
    total: Option<i32>,
    completed: Option<i32>,
    failed: Option<i32>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    errors: Option<serde_json::Value>,
    batch_finished_at: Option<Ts>,
}

/// Columns of a job or batch that a claimed row must have: a row without them is corrupt.
fn given<T>(value: Option<T>, what: &str) -> Result<T, StoreError> {
    value.ok_or_else(|| corrupt(format!("a claimed notification has no {what}")))
}

impl ClaimedRow {
    pub(crate) fn into_notification(self) -> Result<Notification, StoreError> {
        let subject = match self.job_id {
            Some(job) => NotificationSubject::Job {
                request_id: RequestId(job),
                job_state: given(self.job_state, "job state")?
                    .parse()
                    .map_err(corrupt)?,
                model: given(self.model, "model")?,
                content: self.content,
                error: self.error,
                finished_at: opt(self.finished_at),
            },
            None => NotificationSubject::Batch {
                batch_id: given(self.batch_id, "job or batch")?,
                status: parse_status(&given(self.batch_status, "batch status")?)?,
                total: given(self.total, "batch total")?,
                completed: given(self.completed, "batch count")?,
                failed: given(self.failed, "batch count")?,
                output_file_id: self.output_file_id,
                error_file_id: self.error_file_id,
                errors: self.errors,
                finished_at: opt(self.batch_finished_at),
            },
        };
        Ok(Notification {
            id: self.id,
            email: self.email,
            attempts: self.attempts,
            created_at: self.created_at.into(),
            subject,
        })
    }
}

/// Completion emails: one row per finished job or ended batch at most, queued in the transaction
/// that finishes it, then claimed under a lease, so a mailer that dies mid-send only delays it.
impl Store {
    /// Queue the completion emails of those jobs that are terminal and asked for one; answers
    /// how many were new. The statements that finish a job queue its email themselves; this
    /// is for tests and repairs. Queueing a job again is a no-op: one email per job.
    pub async fn queue_notifications_for(&self, job_ids: &[RequestId]) -> Result<u64, StoreError> {
        if job_ids.is_empty() {
            return Ok(0);
        }
        dispatch!(self.queue_notifications_for(job_ids))
    }

    /// Take up to `limit` due notifications, holding each for `lease`: another mailer takes
    /// a row only once its lease has passed, i.e. its mailer has presumably died.
    pub async fn claim_notifications(
        &self,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<Notification>, StoreError> {
        dispatch!(self.claim_notifications(limit, lease))
    }

    /// Record that a notification's email was handed to the SMTP server.
    pub async fn notification_sent(&self, id: i64) -> Result<(), StoreError> {
        writing!(self, |pool, now| {
            sqlx::query(&format!(
                "UPDATE notifications SET state = 'sent', sent_at = {now}, locked_until = NULL
                 WHERE id = $1 AND state = 'pending'"
            ))
            .bind(id)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Record a failed send: try again after `retry_in`, or give up for good when `None`.
    /// A row another mailer already marked sent stays sent.
    pub async fn notification_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<(), StoreError> {
        dispatch!(self.notification_failed(id, error, retry_in))
    }

    /// Give back claimed notifications that were not tried (a mailer shutting down), so the
    /// next mailer need not wait for their leases; the claim does not count as an attempt.
    pub async fn release_notifications(&self, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        dispatch!(self.release_notifications(ids))
    }

    /// The notification of a job, if it has one.
    pub async fn notification_for(
        &self,
        id: RequestId,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM notifications WHERE job_id = $1");
        let row: Option<RowRow> = reading!(self, |pool| {
            sqlx::query_as(&sql).bind(id.0).fetch_optional(pool).await?
        });
        row.map(RowRow::into_row).transpose()
    }

    /// The notification of a batch, if it has one.
    pub async fn batch_notification(
        &self,
        batch_id: &str,
    ) -> Result<Option<NotificationRow>, StoreError> {
        let sql = format!("SELECT {ROW_COLUMNS} FROM notifications WHERE batch_id = $1");
        let row: Option<RowRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(batch_id)
                .fetch_optional(pool)
                .await?
        });
        row.map(RowRow::into_row).transpose()
    }

    /// Notifications per state (readiness and metrics).
    pub async fn notification_counts(&self) -> Result<Vec<(NotificationState, i64)>, StoreError> {
        let sql = "SELECT state, count(*) FROM notifications GROUP BY state ORDER BY state";
        let rows: Vec<(String, i64)> =
            reading!(self, |pool| sqlx::query_as(sql).fetch_all(pool).await?);
        rows.into_iter()
            .map(|(state, n)| Ok((state.parse().map_err(corrupt)?, n)))
            .collect()
    }
}
