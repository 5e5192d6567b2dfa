//! Batches of the OpenAI-compatible Batch API: the shared types and the PostgreSQL statements
//! (SQLite's are in `sqlite::batches`). A batch is an input file whose every line is one
//! ordinary job; a finalizer loop (in the API) watches open batches and writes their results.
//!
//! Every read and write a client causes takes the tenant. The finalizer's calls take a batch
//! by id: it found the batch with [`crate::Store::take_due_batch`], which hands each open batch
//! to one finalizer at a time. Status changes are fenced on the status they leave.

use crate::jobs::{corrupt, status_from_db, Accepted, NewJob};
use crate::outbox::OutboxMessage;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobState, RequestId, Tier};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::collections::HashSet;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;
use uuid::Uuid;

/// Where a batch is in its life (OpenAI's batch statuses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BatchStatus {
    Validating,
    /// Ended: the input was refused; no job was created.
    Failed,
    InProgress,
    /// Every line job ended; the finalizer is writing the output.
    Finalizing,
    /// Ended with its output written.
    Completed,
    /// Ended: the completion window passed first.
    Expired,
    /// Cancel requested: the finalizer cancels the line jobs, then ends it `cancelled`.
    Cancelling,
    /// Ended by a cancel request.
    Cancelled,
}

impl BatchStatus {
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }

    /// True once the batch can never change again.
    pub fn is_ended(self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }

    /// The statuses a batch may move to `self` from. A batch being cancelled ends
    /// `cancelled` (or `expired`), never `completed`, and a cancelled or finished batch is
    /// never touched again, whatever a stale finalizer asks.
    pub fn moves_from(self) -> &'static [BatchStatus] {
        use BatchStatus::*;
        match self {
            Validating => &[],
            InProgress => &[Validating],
            Finalizing => &[InProgress],
            Cancelling => &[Validating, InProgress],
            Completed => &[InProgress, Finalizing],
            Failed | Expired | Cancelled => &[Validating, InProgress, Cancelling, Finalizing],
        }
    }

    /// The column recording when a batch reached this status (`None` for `validating`,
    /// which is recorded by `created_at`).
    pub(crate) fn at_column(self) -> Option<&'static str> {
        match self {
            BatchStatus::Validating => None,
            BatchStatus::Failed => Some("failed_at"),
            BatchStatus::InProgress => Some("in_progress_at"),
            BatchStatus::Finalizing => Some("finalizing_at"),
            BatchStatus::Completed => Some("completed_at"),
            BatchStatus::Expired => Some("expired_at"),
            BatchStatus::Cancelling => Some("cancelling_at"),
            BatchStatus::Cancelled => Some("cancelled_at"),
        }
    }

    pub(crate) fn moves_from_str(self) -> Vec<&'static str> {
        self.moves_from().iter().map(|s| s.as_str()).collect()
    }
}

impl fmt::Display for BatchStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BatchStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BatchStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown batch status {s:?}"))
    }
}

/// A fresh batch id: `batch_` and the 32 hex digits of a UUIDv7, so ids sort by creation time.
pub fn new_batch_id() -> String {
    format!("batch_{}", Uuid::now_v7().simple())
}

/// A batch about to be created.
#[derive(Debug, Clone)]
pub struct NewBatch {
    /// `batch_<32 hex of a uuidv7>`: see [`new_batch_id`].
    pub id: String,
    pub tenant: String,
    pub user: String,
    pub tier: Tier,
    pub input_file_id: String,
    /// The API path every line calls, e.g. `/v1/chat/completions`.
    pub endpoint: String,
    /// e.g. `24h`.
    pub completion_window: String,
    pub metadata: Option<serde_json::Value>,
    pub expires_at: DateTime<Utc>,
    /// Where the one email telling how the batch ended goes; `None` sends none.
    pub notify_email: Option<String>,
}

/// One line of a batch's input: an ordinary job.
#[derive(Debug, Clone)]
pub struct BatchLine {
    /// 1-based line number in the input file.
    pub line: i32,
    pub custom_id: String,
    pub job: NewJob,
}

/// A batch as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRecord {
    pub id: String,
    pub tenant: String,
    pub user: String,
    pub tier: Tier,
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub metadata: Option<serde_json::Value>,
    /// Why the batch failed (OpenAI's `errors` object), for a batch refused at creation.
    pub errors: Option<serde_json::Value>,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    /// Lines (jobs) in the batch.
    pub total: i32,
    /// Lines that succeeded, as last counted by the finalizer.
    pub completed: i32,
    /// Lines that failed, as last counted by the finalizer.
    pub failed: i32,
    pub notify_email: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub in_progress_at: Option<DateTime<Utc>>,
    pub finalizing_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub failed_at: Option<DateTime<Utc>>,
    pub expired_at: Option<DateTime<Utc>>,
    pub cancelling_at: Option<DateTime<Utc>>,
    pub cancelled_at: Option<DateTime<Utc>>,
    /// Held by a finalizer until then.
    pub locked_until: Option<DateTime<Utc>>,
}

/// What a cancel request did.
// Answered once per request, never held in bulk: the record is not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum CancelBatch {
    /// Now (or already) `cancelling`: the finalizer cancels its jobs and ends it.
    Cancelling(BatchRecord),
    /// Past the point of cancelling: ended, or `finalizing` (every line already ended).
    AlreadyEnded(BatchStatus),
    NotFound,
}

/// Where a batch's line jobs are, counted from their states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchProgress {
    pub total: i32,
    pub succeeded: i32,
    /// `failed` and `dead` jobs.
    pub failed: i32,
    pub cancelled: i32,
    /// `queued`, `running` and `retrying` jobs.
    pub pending: i32,
}

/// One line's outcome, for the output and error files.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLineResult {
    pub line: i32,
    pub custom_id: String,
    pub job_id: RequestId,
    pub state: JobState,
    pub result: Option<serde_json::Value>,
    pub error: Option<String>,
    /// The provider's HTTP status of the failure, when it answered one.
    pub error_status: Option<u16>,
}

/// An output or error file the finalizer wrote (begun and appended as an upload) and
/// [`crate::Store::finish_batch`] makes visible with the batch's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedFile {
    pub id: String,
    pub bytes: i64,
    pub lines: i32,
}

/// Lines written per statement (PostgreSQL) or between checks (SQLite): a 50,000-line batch
/// is many statements of one transaction, none of them huge.
pub(crate) const LINES_PER_STATEMENT: usize = 1_000;

/// Jobs cancelled per statement by `cancel_batch_jobs`, so no statement locks a whole batch.
pub(crate) const CANCELS_PER_STATEMENT: i64 = 1_000;

pub(crate) const BATCH_COLUMNS: &str =
    "id, tenant, user_id, tier, input_file_id, endpoint, completion_window, status, metadata, \
     errors, output_file_id, error_file_id, total, completed, failed, notify_email, created_at, \
     expires_at, in_progress_at, finalizing_at, completed_at, failed_at, expired_at, \
     cancelling_at, cancelled_at, locked_until";

pub(crate) const OPEN: &[&str] = &["validating", "in_progress", "cancelling", "finalizing"];
/// Open batches a finalizer looks after (a `validating` one is still being created).
pub(crate) const FINALIZED: &[&str] = &["in_progress", "cancelling", "finalizing"];
pub(crate) const ENDED: &[&str] = &["failed", "completed", "expired", "cancelled"];

pub(crate) fn parse_status(s: &str) -> Result<BatchStatus, StoreError> {
    s.parse().map_err(corrupt)
}

/// Check what a batch's creation is given before any of it is written: every line a job of
/// the batch's tenant, no job or line twice. Answers the line count as stored.
pub(crate) fn check_lines(batch: &NewBatch, lines: &[BatchLine]) -> Result<i32, StoreError> {
    let total = i32::try_from(lines.len())
        .map_err(|_| StoreError::Invalid(format!("{} lines is too many", lines.len())))?;
    let mut jobs = HashSet::with_capacity(lines.len());
    let mut numbers = HashSet::with_capacity(lines.len());
    for line in lines {
        if line.job.principal.tenant != batch.tenant {
            return Err(StoreError::Invalid(format!(
                "line {} belongs to another tenant than batch {}",
                line.line, batch.id
            )));
        }
        if !jobs.insert(line.job.id) || !numbers.insert(line.line) {
            return Err(StoreError::Invalid(format!(
                "line {} (job {}) appears twice in batch {}",
                line.line, line.job.id, batch.id
            )));
        }
    }
    Ok(total)
}

/// The status column a move to `to` records, or why it cannot be asked for.
pub(crate) fn at_column(to: BatchStatus) -> Result<&'static str, StoreError> {
    to.at_column()
        .ok_or_else(|| StoreError::Invalid(format!("a batch cannot move back to {to}")))
}

fn batch_from_row(r: &PgRow) -> Result<BatchRecord, StoreError> {
    let tier: String = r.try_get("tier")?;
    let status: String = r.try_get("status")?;
    Ok(BatchRecord {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        user: r.try_get("user_id")?,
        tier: tier.parse().map_err(corrupt)?,
        input_file_id: r.try_get("input_file_id")?,
        endpoint: r.try_get("endpoint")?,
        completion_window: r.try_get("completion_window")?,
        status: parse_status(&status)?,
        metadata: r.try_get("metadata")?,
        errors: r.try_get("errors")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        total: r.try_get("total")?,
        completed: r.try_get("completed")?,
        failed: r.try_get("failed")?,
        notify_email: r.try_get("notify_email")?,
        created_at: r.try_get("created_at")?,
        expires_at: r.try_get("expires_at")?,
        in_progress_at: r.try_get("in_progress_at")?,
        finalizing_at: r.try_get("finalizing_at")?,
        completed_at: r.try_get("completed_at")?,
        failed_at: r.try_get("failed_at")?,
        expired_at: r.try_get("expired_at")?,
        cancelling_at: r.try_get("cancelling_at")?,
        cancelled_at: r.try_get("cancelled_at")?,
        locked_until: r.try_get("locked_until")?,
    })
}

fn progress_from_row(r: &PgRow) -> Result<BatchProgress, StoreError> {
    Ok(BatchProgress {
        total: r.try_get("total")?,
        succeeded: r.try_get("succeeded")?,
        failed: r.try_get("failed")?,
        cancelled: r.try_get("cancelled")?,
        pending: r.try_get("pending")?,
    })
}

impl PgBackend {
    pub(crate) async fn create_batch(
        &self,
        batch: &NewBatch,
        lines: &[BatchLine],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let total = check_lines(batch, lines)?;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                  completion_window, status, metadata, total, notify_email,
                                  expires_at, created_at, in_progress_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'in_progress', $8, $9, $10, $11, now(), now())",
        )
        .bind(&batch.id)
        .bind(&batch.tenant)
        .bind(&batch.user)
        .bind(batch.tier.as_str())
        .bind(&batch.input_file_id)
        .bind(&batch.endpoint)
        .bind(&batch.completion_window)
        .bind(&batch.metadata)
        .bind(total)
        .bind(&batch.notify_email)
        .bind(batch.expires_at)
        .execute(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(LINES_PER_STATEMENT) {
            let jobs: Vec<&NewJob> = chunk.iter().map(|l| &l.job).collect();
            // The batched ingest's own statement: jobs, `queued` events and outbox rows.
            for accepted in self.insert_jobs_in(&mut tx, &jobs).await? {
                if let Accepted::Queued(message) = accepted {
                    messages.push(message);
                }
            }
            let numbers: Vec<i32> = chunk.iter().map(|l| l.line).collect();
            let custom_ids: Vec<&str> = chunk.iter().map(|l| l.custom_id.as_str()).collect();
            let job_ids: Vec<Uuid> = chunk.iter().map(|l| l.job.id.0).collect();
            sqlx::query(
                "INSERT INTO batch_lines (batch_id, line, custom_id, job_id)
                 SELECT $1, line, custom_id, job_id
                 FROM UNNEST($2::int[], $3::text[], $4::uuid[]) AS t(line, custom_id, job_id)",
            )
            .bind(&batch.id)
            .bind(&numbers)
            .bind(&custom_ids)
            .bind(&job_ids)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn create_failed_batch(
        &self,
        batch: &NewBatch,
        errors: &serde_json::Value,
    ) -> Result<BatchRecord, StoreError> {
        let row = sqlx::query(&format!(
            "WITH b AS (
                 INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                      completion_window, status, metadata, errors, total,
                                      notify_email, expires_at, created_at, failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'failed', $8, $9, 0, $10, $11, now(), now())
                 RETURNING {BATCH_COLUMNS}
             ), n AS (
                 -- Ended at birth: its email, if any, is queued with it.
                 INSERT INTO notifications (batch_id, email)
                 SELECT id, notify_email FROM b WHERE notify_email IS NOT NULL
             )
             SELECT * FROM b"
        ))
        .bind(&batch.id)
        .bind(&batch.tenant)
        .bind(&batch.user)
        .bind(batch.tier.as_str())
        .bind(&batch.input_file_id)
        .bind(&batch.endpoint)
        .bind(&batch.completion_window)
        .bind(&batch.metadata)
        .bind(errors)
        .bind(&batch.notify_email)
        .bind(batch.expires_at)
        .fetch_one(&self.pool)
        .await?;
        batch_from_row(&row)
    }

    pub(crate) async fn get_batch(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    pub(crate) async fn list_batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches
             WHERE tenant = $1 AND ($2::text IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        ))
        .bind(tenant)
        .bind(after)
        .bind(limit.max(0).saturating_add(1))
        .fetch_all(&self.pool)
        .await?;
        let batches = rows.iter().map(batch_from_row).collect::<Result<_, _>>()?;
        Ok(crate::files::page(batches, limit))
    }

    pub(crate) async fn cancel_batch(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<CancelBatch, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE batches SET status = 'cancelling', cancelling_at = now(), locked_until = NULL
             WHERE id = $1 AND tenant = $2 AND status IN ('validating', 'in_progress')
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = row {
            return Ok(CancelBatch::Cancelling(batch_from_row(&row)?));
        }
        Ok(not_cancelling(self.get_batch(tenant, id).await?))
    }

    pub(crate) async fn pending_batch_lines(&self, tenant: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(sum(GREATEST(total - completed - failed, 0)), 0)::bigint
             FROM batches
             WHERE tenant = $1 AND status IN ('in_progress', 'cancelling', 'finalizing')",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    pub(crate) async fn take_due_batch(
        &self,
        hold: Duration,
    ) -> Result<Option<BatchRecord>, StoreError> {
        // SKIP LOCKED: concurrent finalizers each take a different batch, or none; the update
        // re-checks its row, so a batch taken and committed meanwhile is not taken again. The
        // statuses are literal so the partial index `batches_due` serves the look-up.
        let row = sqlx::query(&format!(
            "UPDATE batches SET locked_until = now() + $1 * interval '1 millisecond'
             WHERE id = (
                 SELECT id FROM batches
                 WHERE status IN ('in_progress', 'cancelling', 'finalizing')
                   AND (locked_until IS NULL OR locked_until <= now())
                 ORDER BY locked_until NULLS FIRST, id
                 LIMIT 1 FOR UPDATE SKIP LOCKED
             )
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(millis(hold))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    pub(crate) async fn release_batch(
        &self,
        id: &str,
        next_check: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET locked_until = now() + $2 * interval '1 millisecond'
             WHERE id = $1 AND status = ANY($3)",
        )
        .bind(id)
        .bind(millis(next_check))
        .bind(FINALIZED)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn batch_progress(&self, id: &str) -> Result<BatchProgress, StoreError> {
        let row = sqlx::query(
            "SELECT count(*)::int AS total,
                    (count(*) FILTER (WHERE j.state = 'succeeded'))::int AS succeeded,
                    (count(*) FILTER (WHERE j.state IN ('failed', 'dead')))::int AS failed,
                    (count(*) FILTER (WHERE j.state = 'cancelled'))::int AS cancelled,
                    (count(*) FILTER (WHERE j.state IN ('queued', 'running', 'retrying')))::int
                        AS pending
             FROM batch_lines l JOIN jobs j ON j.id = l.job_id
             WHERE l.batch_id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await?;
        progress_from_row(&row)
    }

    pub(crate) async fn set_batch_counts(
        &self,
        id: &str,
        completed: i32,
        failed: i32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET completed = $2, failed = $3 WHERE id = $1 AND status = ANY($4)",
        )
        .bind(id)
        .bind(completed)
        .bind(failed)
        .bind(OPEN)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(crate) async fn cancel_batch_jobs(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let mut cancelled = Vec::new();
        loop {
            // Locks in id order and skips rows a worker's statement holds this instant, so
            // this never deadlocks with claims and completions; a skipped job is left for the
            // next call (or ends on its own).
            let rows: Vec<(Uuid, String)> = sqlx::query_as(
                "WITH x AS (
                     SELECT j.id FROM batch_lines l JOIN jobs j ON j.id = l.job_id
                     WHERE l.batch_id = $1 AND j.state IN ('queued', 'retrying', 'running')
                     ORDER BY j.id LIMIT $2 FOR UPDATE OF j SKIP LOCKED
                 ), j AS (
                     UPDATE jobs SET state = 'cancelled', lease_until = NULL, finished_at = now(),
                                     updated_at = now(), event_seq = event_seq + 1,
                                     detached_until = NULL, hold_hash = NULL
                     FROM x WHERE jobs.id = x.id AND jobs.state IN ('queued', 'retrying', 'running')
                     RETURNING jobs.id, jobs.tenant, jobs.event_seq, jobs.notify_email
                 ), n AS (
                     INSERT INTO notifications (job_id, email)
                     SELECT id, notify_email FROM j WHERE notify_email IS NOT NULL
                     ON CONFLICT (job_id) DO NOTHING
                 ), e AS (
                     INSERT INTO job_events (job_id, seq, state, detail)
                     SELECT id, event_seq, 'cancelled', jsonb_build_object('batch', $1::text)
                     FROM j
                 )
                 SELECT id, tenant FROM j ORDER BY id",
            )
            .bind(id)
            .bind(CANCELS_PER_STATEMENT)
            .fetch_all(&self.pool)
            .await?;
            let full = rows.len() as i64 >= CANCELS_PER_STATEMENT;
            cancelled.extend(rows.into_iter().map(|(id, t)| (RequestId(id), t)));
            if !full {
                return Ok(cancelled);
            }
        }
    }

    pub(crate) async fn set_batch_status(
        &self,
        id: &str,
        to: BatchStatus,
    ) -> Result<bool, StoreError> {
        let at = at_column(to)?;
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input.
        let row: Option<(String,)> = sqlx::query_as(&format!(
            "WITH b AS (
                 UPDATE batches SET status = $2, {at} = now(),
                                    locked_until = CASE WHEN $4 THEN locked_until END
                 WHERE id = $1 AND status = ANY($3)
                 RETURNING id, status, notify_email
             ), n AS (
                 INSERT INTO notifications (batch_id, email)
                 SELECT id, notify_email FROM b
                 WHERE notify_email IS NOT NULL AND status = ANY($5)
                 ON CONFLICT (batch_id) DO NOTHING
             )
             SELECT id FROM b"
        ))
        .bind(id)
        .bind(to.as_str())
        .bind(to.moves_from_str())
        // The finalizer keeps its hold while it writes the output; any other move makes the
        // batch due at once (an ended one is never taken again anyway).
        .bind(to == BatchStatus::Finalizing)
        .bind(ENDED)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    pub(crate) async fn batch_line_results(
        &self,
        id: &str,
        after_line: i32,
        limit: i64,
    ) -> Result<Vec<BatchLineResult>, StoreError> {
        let rows = sqlx::query(
            "SELECT l.line, l.custom_id, l.job_id, j.state, j.result, j.error, j.error_status
             FROM batch_lines l JOIN jobs j ON j.id = l.job_id
             WHERE l.batch_id = $1 AND l.line > $2
             ORDER BY l.line LIMIT $3",
        )
        .bind(id)
        .bind(after_line)
        .bind(limit.max(0))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(BatchLineResult {
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    job_id: RequestId(r.try_get("job_id")?),
                    state: state.parse().map_err(corrupt)?,
                    result: r.try_get("result")?,
                    error: r.try_get("error")?,
                    error_status: status_from_db(
                        r.try_get::<Option<i16>, _>("error_status")?.map(i64::from),
                    )?,
                })
            })
            .collect()
    }

    pub(crate) async fn finish_batch(
        &self,
        id: &str,
        end: BatchStatus,
        counts: (i32, i32),
        output_file: Option<&FinishedFile>,
        error_file: Option<&FinishedFile>,
    ) -> Result<bool, StoreError> {
        let at = ended_column(end)?;
        let mut tx = self.pool.begin().await?;
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input.
        let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
            "UPDATE batches SET status = $2, {at} = now(), completed = $3, failed = $4,
                                output_file_id = $5, error_file_id = $6, locked_until = NULL
             WHERE id = $1 AND status = ANY($7)
             RETURNING tenant, notify_email"
        ))
        .bind(id)
        .bind(end.as_str())
        .bind(counts.0)
        .bind(counts.1)
        .bind(output_file.map(|f| f.id.as_str()))
        .bind(error_file.map(|f| f.id.as_str()))
        .bind(end.moves_from_str())
        .fetch_optional(&mut *tx)
        .await?;
        let Some((tenant, email)) = row else {
            // Ended (or cancelled) by someone else: its files stay uploads, purged as stale.
            tx.rollback().await?;
            return Ok(false);
        };
        for file in output_file.into_iter().chain(error_file) {
            let done = sqlx::query(
                "UPDATE files SET status = 'processed', bytes = $3, lines = $4, updated_at = now()
                 WHERE id = $1 AND tenant = $2 AND status = 'uploading'",
            )
            .bind(&file.id)
            .bind(&tenant)
            .bind(file.bytes)
            .bind(file.lines)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Err(crate::files::no_upload(&file.id));
            }
        }
        if let Some(email) = email {
            sqlx::query(
                "INSERT INTO notifications (batch_id, email) VALUES ($1, $2)
                 ON CONFLICT (batch_id) DO NOTHING",
            )
            .bind(id)
            .bind(&email)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Why a cancel request changed nothing, from the batch as it is now.
pub(crate) fn not_cancelling(batch: Option<BatchRecord>) -> CancelBatch {
    match batch {
        None => CancelBatch::NotFound,
        Some(batch) if batch.status == BatchStatus::Cancelling => CancelBatch::Cancelling(batch),
        Some(batch) => CancelBatch::AlreadyEnded(batch.status),
    }
}

/// The `*_at` column of an end status, or why `end` is not one.
pub(crate) fn ended_column(end: BatchStatus) -> Result<&'static str, StoreError> {
    if !end.is_ended() {
        return Err(StoreError::Invalid(format!(
            "a batch cannot finish as {end}: completed, failed, expired or cancelled"
        )));
    }
    at_column(end)
}
