//! SQLite storage of batches, mirroring `crate::batches`: a batch's creation is one write
//! transaction (batch, jobs, events, outbox rows, lines), and taking a batch for the finalizer
//! is a look-up and an update under the single write lock.

use super::jobs::{cancel_one, opt_json, opt_ts, req_ts};
use super::{parse_ts, ts, ts_after, SqliteBackend};
use crate::batches::{
    at_column, check_lines, ended_column, not_cancelling, parse_status, BatchLine, BatchLineResult,
    BatchProgress, BatchRecord, BatchStatus, CancelBatch, FinishedFile, NewBatch, BATCH_COLUMNS,
    CANCELS_PER_STATEMENT, ENDED, FINALIZED, OPEN,
};
use crate::jobs::{corrupt, status_from_db, Accepted};
use crate::outbox::OutboxMessage;
use crate::StoreError;
use chrono::Utc;
use sluice_core::RequestId;
use sqlx::sqlite::SqliteRow;
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

fn batch_from_row(r: &SqliteRow) -> Result<BatchRecord, StoreError> {
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
        metadata: opt_json(r, "metadata")?,
        errors: opt_json(r, "errors")?,
        output_file_id: r.try_get("output_file_id")?,
        error_file_id: r.try_get("error_file_id")?,
        total: r.try_get("total")?,
        completed: r.try_get("completed")?,
        failed: r.try_get("failed")?,
        notify_email: r.try_get("notify_email")?,
        created_at: req_ts(r, "created_at")?,
        expires_at: req_ts(r, "expires_at")?,
        in_progress_at: opt_ts(r, "in_progress_at")?,
        finalizing_at: opt_ts(r, "finalizing_at")?,
        completed_at: opt_ts(r, "completed_at")?,
        failed_at: opt_ts(r, "failed_at")?,
        expired_at: opt_ts(r, "expired_at")?,
        cancelling_at: opt_ts(r, "cancelling_at")?,
        cancelled_at: opt_ts(r, "cancelled_at")?,
        locked_until: opt_ts(r, "locked_until")?,
    })
}

/// Rows per multi-row insert: ~12 values a row stays far below SQLite's 32,766 bound values.
const ROWS_PER_INSERT: usize = 500;

/// Insert jobs that opt out of reuse (no request hash, no idempotency key) as the batched
/// ingest does, in three statements: the jobs (queued), their first events, their outbox rows.
/// A job id already taken fails the insert (and so the caller's transaction).
async fn insert_plain_jobs(
    tx: &mut Transaction<'static, Sqlite>,
    lines: &[&BatchLine],
    now: &str,
) -> Result<Vec<OutboxMessage>, StoreError> {
    if lines.is_empty() {
        return Ok(Vec::new());
    }
    let requests = lines
        .iter()
        .map(|l| serde_json::to_string(&l.job.request).map_err(corrupt))
        .collect::<Result<Vec<String>, _>>()?;
    let mut jobs = QueryBuilder::<Sqlite>::new(
        "INSERT INTO jobs (id, tenant, user_id, tier, lane, model, request, notify_email, state,
                           created_at, updated_at, route_reason) ",
    );
    jobs.push_values(lines.iter().zip(&requests), |mut row, (line, request)| {
        let job = &line.job;
        row.push_bind(job.id.0)
            .push_bind(&job.principal.tenant)
            .push_bind(&job.principal.user)
            .push_bind(job.principal.tier.as_str())
            .push_bind(job.lane.as_str())
            .push_bind(job.routing_key())
            .push_bind(request)
            .push_bind(&job.notify_email)
            .push_bind("queued")
            .push_bind(now)
            .push_bind(now)
            .push_bind(job.route_reason());
    });
    jobs.build().execute(&mut **tx).await?;
    let mut events =
        QueryBuilder::<Sqlite>::new("INSERT INTO job_events (job_id, seq, state, at) ");
    events.push_values(lines, |mut row, line| {
        row.push_bind(line.job.id.0)
            .push_bind(1)
            .push_bind("queued")
            .push_bind(now);
    });
    events.build().execute(&mut **tx).await?;
    let mut outbox = QueryBuilder::<Sqlite>::new(
        "INSERT INTO outbox (job_id, lane, attempt, deliver_at, created_at) ",
    );
    outbox.push_values(lines, |mut row, line| {
        row.push_bind(line.job.id.0)
            .push_bind(line.job.lane.as_str())
            .push_bind(0)
            .push_bind(now)
            .push_bind(now);
    });
    outbox.push(" RETURNING id, job_id");
    let ids: Vec<(i64, Uuid)> = outbox.build_query_as().fetch_all(&mut **tx).await?;
    // RETURNING promises no order: match the rows back by job.
    let ids: HashMap<Uuid, i64> = ids.into_iter().map(|(o, j)| (j, o)).collect();
    let deliver_at = parse_ts(now)?;
    lines
        .iter()
        .map(|line| {
            let outbox_id = *ids
                .get(&line.job.id.0)
                .ok_or_else(|| corrupt(format!("job {} has no outbox row", line.job.id)))?;
            Ok(OutboxMessage {
                outbox_id,
                lane: line.job.lane,
                job: line.job.job_ref(),
                deliver_at,
                reason: None,
            })
        })
        .collect()
}

/// A list of statuses as a JSON array, for `status IN (SELECT value FROM json_each(?))`.
fn json_list(statuses: &[&str]) -> Result<String, StoreError> {
    serde_json::to_string(statuses).map_err(corrupt)
}

/// Queue a batch's email, if it asked for one; one per batch.
async fn queue_batch_notification(
    tx: &mut Transaction<'static, Sqlite>,
    batch_id: &str,
    email: Option<&str>,
    now: &str,
) -> Result<(), StoreError> {
    if let Some(email) = email {
        sqlx::query(
            "INSERT INTO notifications (batch_id, email, next_attempt_at, created_at)
             VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (batch_id) DO NOTHING",
        )
        .bind(batch_id)
        .bind(email)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

impl SqliteBackend {
    /// One write transaction for the whole batch: the single writer makes it all or nothing.
    /// The jobs are written as the batched ingest writes them (job, `queued` event, outbox
    /// row), but many rows per statement: one statement per row would hold SQLite's only
    /// write lock for seconds on a 50,000-line batch.
    pub(crate) async fn create_batch(
        &self,
        batch: &NewBatch,
        lines: &[BatchLine],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let total = check_lines(batch, lines)?;
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        sqlx::query(
            "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                  completion_window, status, metadata, total, notify_email,
                                  expires_at, created_at, in_progress_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'in_progress', ?8, ?9, ?10, ?11, ?12, ?12)",
        )
        .bind(&batch.id)
        .bind(&batch.tenant)
        .bind(&batch.user)
        .bind(batch.tier.as_str())
        .bind(&batch.input_file_id)
        .bind(&batch.endpoint)
        .bind(&batch.completion_window)
        .bind(batch.metadata.as_ref().map(|m| m.to_string()))
        .bind(total)
        .bind(&batch.notify_email)
        .bind(ts(batch.expires_at))
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(ROWS_PER_INSERT) {
            let (plain, hashed): (Vec<&BatchLine>, Vec<&BatchLine>) =
                chunk.iter().partition(|l| l.job.request_hash.is_none());
            messages.extend(insert_plain_jobs(&mut tx, &plain, &now).await?);
            // A job that may share an identical job's answer goes the ingest's own way, which
            // looks for that job first.
            for line in hashed {
                let accepted = Self::insert_new(&mut tx, &line.job, None)
                    .await?
                    .ok_or_else(|| corrupt(format!("job {} was not inserted", line.job.id)))?;
                if let Accepted::Queued(message) = accepted {
                    messages.push(message);
                }
            }
            let mut insert = QueryBuilder::<Sqlite>::new(
                "INSERT INTO batch_lines (batch_id, line, custom_id, job_id) ",
            );
            insert.push_values(chunk, |mut row, line| {
                row.push_bind(&batch.id)
                    .push_bind(line.line)
                    .push_bind(&line.custom_id)
                    .push_bind(line.job.id.0);
            });
            insert.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn create_failed_batch(
        &self,
        batch: &NewBatch,
        errors: &serde_json::Value,
    ) -> Result<BatchRecord, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        let row = sqlx::query(&format!(
            "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                  completion_window, status, metadata, errors, total,
                                  notify_email, expires_at, created_at, failed_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'failed', ?8, ?9, 0, ?10, ?11, ?12, ?12)
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(&batch.id)
        .bind(&batch.tenant)
        .bind(&batch.user)
        .bind(batch.tier.as_str())
        .bind(&batch.input_file_id)
        .bind(&batch.endpoint)
        .bind(&batch.completion_window)
        .bind(batch.metadata.as_ref().map(|m| m.to_string()))
        .bind(errors.to_string())
        .bind(&batch.notify_email)
        .bind(ts(batch.expires_at))
        .bind(&now)
        .fetch_one(&mut *tx)
        .await?;
        let record = batch_from_row(&row)?;
        // Ended at birth: its email, if any, is queued with it.
        queue_batch_notification(&mut tx, &batch.id, batch.notify_email.as_deref(), &now).await?;
        tx.commit().await?;
        Ok(record)
    }

    pub(crate) async fn get_batch(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {BATCH_COLUMNS} FROM batches WHERE id = ?1 AND tenant = ?2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.read)
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
             WHERE tenant = ?1 AND (?2 IS NULL OR id < ?2)
             ORDER BY id DESC LIMIT ?3"
        ))
        .bind(tenant)
        .bind(after)
        .bind(limit.max(0).saturating_add(1))
        .fetch_all(&self.read)
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
            "UPDATE batches SET status = 'cancelling', cancelling_at = ?3, locked_until = NULL
             WHERE id = ?1 AND tenant = ?2 AND status IN ('validating', 'in_progress')
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(id)
        .bind(tenant)
        .bind(ts(Utc::now()))
        .fetch_optional(&self.write)
        .await?;
        if let Some(row) = row {
            return Ok(CancelBatch::Cancelling(batch_from_row(&row)?));
        }
        Ok(not_cancelling(self.get_batch(tenant, id).await?))
    }

    pub(crate) async fn pending_batch_lines(&self, tenant: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(sum(MAX(total - completed - failed, 0)), 0) FROM batches
             WHERE tenant = ?1 AND status IN ('in_progress', 'cancelling', 'finalizing')",
        )
        .bind(tenant)
        .fetch_one(&self.read)
        .await?;
        Ok(n)
    }

    /// The look-up and the hold in one write transaction: the single write lock makes a
    /// second finalizer see the hold, SQLite's answer to `FOR UPDATE SKIP LOCKED`.
    pub(crate) async fn take_due_batch(
        &self,
        hold: Duration,
    ) -> Result<Option<BatchRecord>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Utc::now();
        let row = sqlx::query(&format!(
            "UPDATE batches SET locked_until = ?2
             WHERE id = (
                 SELECT id FROM batches
                 WHERE status IN ('in_progress', 'cancelling', 'finalizing')
                   AND (locked_until IS NULL OR locked_until <= ?1)
                 ORDER BY locked_until IS NOT NULL, locked_until, id
                 LIMIT 1
             )
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(ts(now))
        .bind(ts_after(now, hold))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        row.as_ref().map(batch_from_row).transpose()
    }

    pub(crate) async fn release_batch(
        &self,
        id: &str,
        next_check: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET locked_until = ?2
             WHERE id = ?1 AND status IN (SELECT value FROM json_each(?3))",
        )
        .bind(id)
        .bind(ts_after(Utc::now(), next_check))
        .bind(json_list(FINALIZED)?)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub(crate) async fn batch_progress(&self, id: &str) -> Result<BatchProgress, StoreError> {
        let row = sqlx::query(
            "SELECT count(*) AS total,
                    COALESCE(sum(j.state = 'succeeded'), 0) AS succeeded,
                    COALESCE(sum(j.state IN ('failed', 'dead')), 0) AS failed,
                    COALESCE(sum(j.state = 'cancelled'), 0) AS cancelled,
                    COALESCE(sum(j.state IN ('queued', 'running', 'retrying')), 0) AS pending
             FROM batch_lines l JOIN jobs j ON j.id = l.job_id
             WHERE l.batch_id = ?1",
        )
        .bind(id)
        .fetch_one(&self.read)
        .await?;
        let count = |column: &str| -> Result<i32, StoreError> {
            i32::try_from(r_i64(&row, column)?).map_err(corrupt)
        };
        Ok(BatchProgress {
            total: count("total")?,
            succeeded: count("succeeded")?,
            failed: count("failed")?,
            cancelled: count("cancelled")?,
            pending: count("pending")?,
        })
    }

    pub(crate) async fn set_batch_counts(
        &self,
        id: &str,
        completed: i32,
        failed: i32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE batches SET completed = ?2, failed = ?3
             WHERE id = ?1 AND status IN (SELECT value FROM json_each(?4))",
        )
        .bind(id)
        .bind(completed)
        .bind(failed)
        .bind(json_list(OPEN)?)
        .execute(&self.write)
        .await?;
        Ok(())
    }

    /// A short write transaction per [`CANCELS_PER_STATEMENT`] jobs, so other writers get
    /// the lock between them.
    pub(crate) async fn cancel_batch_jobs(
        &self,
        id: &str,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let detail = serde_json::json!({ "batch": id });
        let mut cancelled = Vec::new();
        loop {
            let mut tx = self.begin_write().await?;
            let now = ts(Utc::now());
            let waiting: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT j.id FROM batch_lines l JOIN jobs j ON j.id = l.job_id
                 WHERE l.batch_id = ?1 AND j.state IN ('queued', 'retrying', 'running')
                 ORDER BY j.id LIMIT ?2",
            )
            .bind(id)
            .bind(CANCELS_PER_STATEMENT)
            .fetch_all(&mut *tx)
            .await?;
            let full = waiting.len() as i64 >= CANCELS_PER_STATEMENT;
            for (job,) in waiting {
                let states = ["queued", "retrying", "running"];
                if let Some(tenant) =
                    cancel_one(&mut tx, job, None, &states, Some(&detail), &now).await?
                {
                    cancelled.push((RequestId(job), tenant));
                }
            }
            tx.commit().await?;
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
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input.
        let row: Option<(Option<String>,)> = sqlx::query_as(&format!(
            "UPDATE batches SET status = ?2, {at} = ?3,
                                locked_until = CASE WHEN ?4 THEN locked_until END
             WHERE id = ?1 AND status IN (SELECT value FROM json_each(?5))
             RETURNING notify_email"
        ))
        .bind(id)
        .bind(to.as_str())
        .bind(&now)
        // The finalizer keeps its hold while it writes the output; any other move makes the
        // batch due at once (an ended one is never taken again anyway).
        .bind(to == BatchStatus::Finalizing)
        .bind(json_list(&to.moves_from_str())?)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((email,)) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        if ENDED.contains(&to.as_str()) {
            queue_batch_notification(&mut tx, id, email.as_deref(), &now).await?;
        }
        tx.commit().await?;
        Ok(true)
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
             WHERE l.batch_id = ?1 AND l.line > ?2
             ORDER BY l.line LIMIT ?3",
        )
        .bind(id)
        .bind(after_line)
        .bind(limit.max(0))
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get("state")?;
                Ok(BatchLineResult {
                    line: r.try_get("line")?,
                    custom_id: r.try_get("custom_id")?,
                    job_id: RequestId(r.try_get("job_id")?),
                    state: state.parse().map_err(corrupt)?,
                    result: opt_json(r, "result")?,
                    error: r.try_get("error")?,
                    error_status: status_from_db(r.try_get("error_status")?)?,
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
        let mut tx = self.begin_write().await?;
        let now = ts(Utc::now());
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input.
        let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
            "UPDATE batches SET status = ?2, {at} = ?3, completed = ?4, failed = ?5,
                                output_file_id = ?6, error_file_id = ?7, locked_until = NULL
             WHERE id = ?1 AND status IN (SELECT value FROM json_each(?8))
             RETURNING tenant, notify_email"
        ))
        .bind(id)
        .bind(end.as_str())
        .bind(&now)
        .bind(counts.0)
        .bind(counts.1)
        .bind(output_file.map(|f| f.id.as_str()))
        .bind(error_file.map(|f| f.id.as_str()))
        .bind(json_list(&end.moves_from_str())?)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((tenant, email)) = row else {
            // Ended (or cancelled) by someone else: its files stay uploads, purged as stale.
            tx.rollback().await?;
            return Ok(false);
        };
        for file in output_file.into_iter().chain(error_file) {
            let done = sqlx::query(
                "UPDATE files SET status = 'processed', bytes = ?3, lines = ?4, updated_at = ?5
                 WHERE id = ?1 AND tenant = ?2 AND status = 'uploading'",
            )
            .bind(&file.id)
            .bind(&tenant)
            .bind(file.bytes)
            .bind(file.lines)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Err(crate::files::no_upload(&file.id));
            }
        }
        queue_batch_notification(&mut tx, id, email.as_deref(), &now).await?;
        tx.commit().await?;
        Ok(true)
    }
}

fn r_i64(row: &SqliteRow, column: &str) -> Result<i64, StoreError> {
    Ok(row.try_get(column)?)
}
