//! Batches of the OpenAI-compatible Batch API (one ordinary job per input line): the types, the
//! rows both backends read, and the public API with the statements both backends share.

use crate::jobs::{corrupt, status_from_db, NewJob};
use crate::outbox::OutboxMessage;
use crate::sql::{dispatch, opt, quoted, reading, writing, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobState, RequestId, Tier};
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
    /// How long after creation the batch expires. The store adds it to the same clock reading
    /// it stamps `created_at` with, so the two are exactly the window apart.
    pub expires_in: std::time::Duration,
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

/// A `batches` row of [`BATCH_COLUMNS`].
#[derive(sqlx::FromRow)]
pub(crate) struct BatchRow {
    id: String,
    tenant: String,
    user_id: String,
    tier: String,
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    status: String,
    metadata: Option<serde_json::Value>,
    errors: Option<serde_json::Value>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    total: i32,
    completed: i32,
    failed: i32,
    notify_email: Option<String>,
    created_at: Ts,
    expires_at: Ts,
    in_progress_at: Option<Ts>,
    finalizing_at: Option<Ts>,
    completed_at: Option<Ts>,
    failed_at: Option<Ts>,
    expired_at: Option<Ts>,
    cancelling_at: Option<Ts>,
    cancelled_at: Option<Ts>,
    locked_until: Option<Ts>,
}

impl BatchRow {
    pub(crate) fn into_record(self) -> Result<BatchRecord, StoreError> {
        Ok(BatchRecord {
            id: self.id,
            tenant: self.tenant,
            user: self.user_id,
            tier: self.tier.parse().map_err(corrupt)?,
            input_file_id: self.input_file_id,
            endpoint: self.endpoint,
            completion_window: self.completion_window,
            status: parse_status(&self.status)?,
            metadata: self.metadata,
            errors: self.errors,
            output_file_id: self.output_file_id,
            error_file_id: self.error_file_id,
            total: self.total,
            completed: self.completed,
            failed: self.failed,
            notify_email: self.notify_email,
            created_at: self.created_at.into(),
            expires_at: self.expires_at.into(),
            in_progress_at: opt(self.in_progress_at),
            finalizing_at: opt(self.finalizing_at),
            completed_at: opt(self.completed_at),
            failed_at: opt(self.failed_at),
            expired_at: opt(self.expired_at),
            cancelling_at: opt(self.cancelling_at),
            cancelled_at: opt(self.cancelled_at),
            locked_until: opt(self.locked_until),
        })
    }
}

/// A batch line with its job's outcome.
#[derive(sqlx::FromRow)]
struct LineRow {
    line: i32,
    custom_id: String,
    job_id: Uuid,
    state: String,
    result: Option<serde_json::Value>,
    error: Option<String>,
    error_status: Option<i16>,
}

/// Bind a new batch's columns as `$1..$8`: id, tenant, user_id, tier, input_file_id, endpoint,
/// completion_window, metadata (`jsonb` on PostgreSQL, JSON text on SQLite).
macro_rules! bind_new_batch {
    ($query:expr, $batch:expr) => {
        $query
            .bind(&$batch.id)
            .bind(&$batch.tenant)
            .bind(&$batch.user)
            .bind($batch.tier.as_str())
            .bind(&$batch.input_file_id)
            .bind(&$batch.endpoint)
            .bind(&$batch.completion_window)
            .bind(&$batch.metadata)
    };
}
pub(crate) use bind_new_batch;

/// Batches of the Batch API. A finalizer loop (in the API) watches open batches and writes their
/// results. Every read and write a client causes takes the tenant; the finalizer's calls take a
/// batch by id: it found the batch with [`Store::take_due_batch`], which hands each open batch
/// to one finalizer at a time. Status changes are fenced on the status they leave.
impl Store {
    /// Create a batch `in_progress` with one queued job per line, in one transaction: the
    /// batch, every job with its event and outbox row, and the lines; all of it or nothing.
    /// Answers the jobs' lane messages, to publish after this returns.
    pub async fn create_batch(
        &self,
        batch: &NewBatch,
        lines: &[BatchLine],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let messages = dispatch!(self.create_batch(batch, lines))?;
        // Every line's job is stored (queued, or attached to an identical job), or none is.
        self.announcer.all(
            lines
                .iter()
                .map(|l| (l.job.id, l.job.principal.tenant.as_str())),
        );
        Ok(messages)
    }

    /// Store a batch refused at creation: `failed` with `errors`, no lines, no jobs (its email,
    /// if it asked for one, is queued with it).
    pub async fn create_failed_batch(
        &self,
        batch: &NewBatch,
        errors: &serde_json::Value,
    ) -> Result<BatchRecord, StoreError> {
        dispatch!(self.create_failed_batch(batch, errors))?.into_record()
    }

    /// A tenant's batch; another tenant's id answers `None`.
    pub async fn get_batch(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let sql = format!("SELECT {BATCH_COLUMNS} FROM batches WHERE id = $1 AND tenant = $2");
        let row: Option<BatchRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(id)
                .bind(tenant)
                .fetch_optional(pool)
                .await?
        });
        row.map(BatchRow::into_record).transpose()
    }

    /// A page of the tenant's batches, newest first, after the id `after` (the last of the
    /// previous page), at most `limit`, and whether more follow.
    pub async fn list_batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError> {
        let sql = format!(
            "SELECT {BATCH_COLUMNS} FROM batches
             WHERE tenant = $1 AND (CAST($2 AS TEXT) IS NULL OR id < $2)
             ORDER BY id DESC LIMIT $3"
        );
        let rows: Vec<BatchRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(after)
                .bind(limit.max(0).saturating_add(1))
                .fetch_all(pool)
                .await?
        });
        let batches = rows
            .into_iter()
            .map(BatchRow::into_record)
            .collect::<Result<_, _>>()?;
        Ok(crate::files::page(batches, limit))
    }

    /// Ask to cancel a tenant's batch: `validating` or `in_progress` become `cancelling` (and
    /// due for the finalizer at once); `cancelling` answers the same again. Its jobs are
    /// cancelled by the finalizer ([`Store::cancel_batch_jobs`]).
    pub async fn cancel_batch(&self, tenant: &str, id: &str) -> Result<CancelBatch, StoreError> {
        let row: Option<BatchRow> = writing!(self, |pool, now| {
            sqlx::query_as(&format!(
                "UPDATE batches SET status = 'cancelling', cancelling_at = {now},
                                    locked_until = NULL
                 WHERE id = $1 AND tenant = $2 AND status IN ('validating', 'in_progress')
                 RETURNING {BATCH_COLUMNS}"
            ))
            .bind(id)
            .bind(tenant)
            .fetch_optional(pool)
            .await?
        });
        if let Some(row) = row {
            return Ok(CancelBatch::Cancelling(row.into_record()?));
        }
        Ok(not_cancelling(self.get_batch(tenant, id).await?))
    }

    /// Lines of the tenant's open batches not yet counted completed or failed (a cap's measure).
    pub async fn pending_batch_lines(&self, tenant: &str) -> Result<i64, StoreError> {
        dispatch!(self.pending_batch_lines(tenant))
    }

    /// Take one open batch (in_progress, cancelling, finalizing) no finalizer holds, holding
    /// it for `hold`; concurrent finalizers never take the same batch while a hold lasts.
    pub async fn take_due_batch(&self, hold: Duration) -> Result<Option<BatchRecord>, StoreError> {
        let row = dispatch!(self.take_due_batch(hold))?;
        row.map(BatchRow::into_record).transpose()
    }

    /// Let go of a batch taken by [`Store::take_due_batch`]: look at it again after `next_check`.
    pub async fn release_batch(&self, id: &str, next_check: Duration) -> Result<(), StoreError> {
        dispatch!(self.release_batch(id, next_check))
    }

    /// Count a batch's line jobs by state.
    pub async fn batch_progress(&self, id: &str) -> Result<BatchProgress, StoreError> {
        let count = |states: &[&str]| {
            format!(
                "CAST(COALESCE(sum(CASE WHEN j.state IN ({}) THEN 1 ELSE 0 END), 0) AS INTEGER)",
                quoted(states)
            )
        };
        let sql = format!(
            "SELECT CAST(count(*) AS INTEGER), {}, {}, {}, {}
             FROM batch_lines l JOIN jobs j ON j.id = l.job_id
             WHERE l.batch_id = $1",
            count(&["succeeded"]),
            count(&["failed", "dead"]),
            count(&["cancelled"]),
            count(&["queued", "running", "retrying"]),
        );
        let (total, succeeded, failed, cancelled, pending): (i32, i32, i32, i32, i32) =
            reading!(self, |pool| {
                sqlx::query_as(&sql).bind(id).fetch_one(pool).await?
            });
        Ok(BatchProgress {
            total,
            succeeded,
            failed,
            cancelled,
            pending,
        })
    }

    /// Record how many lines completed and failed so far (ignored once the batch ended).
    pub async fn set_batch_counts(
        &self,
        id: &str,
        completed: i32,
        failed: i32,
    ) -> Result<(), StoreError> {
        let sql = format!(
            "UPDATE batches SET completed = $2, failed = $3 WHERE id = $1 AND status IN ({})",
            quoted(OPEN)
        );
        writing!(self, |pool| {
            sqlx::query(&sql)
                .bind(id)
                .bind(completed)
                .bind(failed)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Cancel every line job that is queued, retrying or running, as [`Store::cancel`] does
    /// (a few statements, each fenced); answers what was cancelled, with the tenants. A job a
    /// worker holds locked at that instant (PostgreSQL) is left for the next call.
    pub async fn cancel_batch_jobs(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let cancelled = dispatch!(self.cancel_batch_jobs(id))?;
        self.announce_all(&cancelled);
        Ok(cancelled)
    }

    /// Move a batch to `to` (recording `*_at`) if its status is one of [`BatchStatus::moves_from`];
    /// `false` otherwise, e.g. a stale finalizer's `finalizing` for a batch being cancelled.
    /// A move to an end queues the batch's email.
    pub async fn set_batch_status(&self, id: &str, to: BatchStatus) -> Result<bool, StoreError> {
        dispatch!(self.set_batch_status(id, to))
    }

    /// Up to `limit` of a batch's lines after line `after_line`, in line order, with their
    /// jobs' outcomes: what the output and error files are written from.
    pub async fn batch_line_results(
        &self,
        id: &str,
        after_line: i32,
        limit: i64,
    ) -> Result<Vec<BatchLineResult>, StoreError> {
        let sql = "SELECT l.line, l.custom_id, l.job_id, j.state, j.result, j.error, j.error_status
                   FROM batch_lines l JOIN jobs j ON j.id = l.job_id
                   WHERE l.batch_id = $1 AND l.line > $2
                   ORDER BY l.line LIMIT $3";
        let rows: Vec<LineRow> = reading!(self, |pool| {
            sqlx::query_as(sql)
                .bind(id)
                .bind(after_line)
                .bind(limit.max(0))
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|r| {
                Ok(BatchLineResult {
                    line: r.line,
                    custom_id: r.custom_id,
                    job_id: RequestId(r.job_id),
                    state: r.state.parse().map_err(corrupt)?,
                    result: r.result,
                    error: r.error,
                    error_status: status_from_db(r.error_status)?,
                })
            })
            .collect()
    }

    /// End a batch in one transaction: its files (uploads of the batch's tenant) become
    /// `processed`, the batch takes `end` (completed, failed, expired or cancelled; fenced by
    /// [`BatchStatus::moves_from`]), its counts and file ids, and its email is queued. `false`,
    /// changing nothing, if the batch had already moved on.
    pub async fn finish_batch(
        &self,
        id: &str,
        end: BatchStatus,
        counts: (i32, i32),
        output_file: Option<&FinishedFile>,
        error_file: Option<&FinishedFile>,
    ) -> Result<bool, StoreError> {
        let at = ended_column(end)?;
        dispatch!(self.finish_batch(id, end, at, counts, output_file, error_file))
    }
}
