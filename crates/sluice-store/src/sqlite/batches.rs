//! SQLite's batch statements, mirroring `postgres::batches`: creation in one write transaction
//! of multi-row inserts, batches taken by finalizers under the single write lock.

use super::jobs::cancel_one;
use super::SqliteBackend;
use crate::batches::{
    at_column, bind_new_batch, check_lines, BatchLine, BatchRow, BatchStatus, FinishedFile,
    NewBatch, BATCH_COLUMNS, CANCELS_PER_STATEMENT, ENDED, FINALIZED,
};
use crate::jobs::{corrupt, Accepted};
use crate::outbox::OutboxMessage;
use crate::sql::{quoted, Ts};
use crate::StoreError;
use sluice_core::RequestId;
use sqlx::{QueryBuilder, Sqlite, Transaction};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

/// Rows per multi-row insert: ~12 values a row stays far below SQLite's 32,766 bound values.
const ROWS_PER_INSERT: usize = 500;

/// Insert jobs that opt out of reuse (no request hash, no idempotency key) as the batched
/// ingest does, in three statements: the jobs (queued), their first events, their outbox rows.
/// A job id already taken fails the insert (and so the caller's transaction).
async fn insert_plain_jobs(
    tx: &mut Transaction<'static, Sqlite>,
    lines: &[&BatchLine],
    now: Ts,
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
    let deliver_at = now.into();
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

/// Queue a batch's email, if it asked for one; one per batch.
async fn queue_batch_notification(
    tx: &mut Transaction<'static, Sqlite>,
    batch_id: &str,
    email: Option<&str>,
    now: Ts,
) -> Result<(), StoreError> {
    if let Some(email) = email {
        sqlx::query(
            "INSERT INTO notifications (batch_id, email, next_attempt_at, created_at)
             VALUES ($1, $2, $3, $3)
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
        let now = Ts::now();
        bind_new_batch!(
            sqlx::query(
                "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                      completion_window, status, metadata, total, notify_email,
                                      expires_at, created_at, in_progress_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'in_progress', $8, $9, $10, $11, $12, $12)",
            ),
            batch
        )
        .bind(total)
        .bind(&batch.notify_email)
        .bind(now.after(batch.expires_in))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(lines.len());
        for chunk in lines.chunks(ROWS_PER_INSERT) {
            let (plain, hashed): (Vec<&BatchLine>, Vec<&BatchLine>) =
                chunk.iter().partition(|l| l.job.request_hash.is_none());
            messages.extend(insert_plain_jobs(&mut tx, &plain, now).await?);
            // A job that may share an identical job's answer goes the ingest's own way, which
            // looks for that job first.
            for line in hashed {
                let accepted = Self::insert_new(&mut tx, &line.job, None, None)
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
    ) -> Result<BatchRow, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let row = bind_new_batch!(
            sqlx::query_as(&format!(
                "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                      completion_window, status, metadata, errors, total,
                                      notify_email, expires_at, created_at, failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'failed', $8, $9, 0, $10, $11, $12, $12)
                 RETURNING {BATCH_COLUMNS}"
            )),
            batch
        )
        .bind(errors)
        .bind(&batch.notify_email)
        .bind(now.after(batch.expires_in))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        // Ended at birth: its email, if any, is queued with it.
        queue_batch_notification(&mut tx, &batch.id, batch.notify_email.as_deref(), now).await?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn pending_batch_lines(&self, tenant: &str) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT COALESCE(sum(MAX(total - completed - failed, 0)), 0) FROM batches
             WHERE tenant = $1 AND status IN ('in_progress', 'cancelling', 'finalizing')",
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
    ) -> Result<Option<BatchRow>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let row = sqlx::query_as(&format!(
            "UPDATE batches SET locked_until = $2
             WHERE id = (
                 SELECT id FROM batches
                 WHERE status IN ('in_progress', 'cancelling', 'finalizing')
                   AND (locked_until IS NULL OR locked_until <= $1)
                 ORDER BY locked_until IS NOT NULL, locked_until, id
                 LIMIT 1
             )
             RETURNING {BATCH_COLUMNS}"
        ))
        .bind(now)
        .bind(now.after(hold))
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row)
    }

    pub(crate) async fn release_batch(
        &self,
        id: &str,
        next_check: Duration,
    ) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "UPDATE batches SET locked_until = $2 WHERE id = $1 AND status IN ({})",
            quoted(FINALIZED)
        ))
        .bind(id)
        .bind(Ts::now().after(next_check))
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
            let now = Ts::now();
            let waiting: Vec<(Uuid,)> = sqlx::query_as(
                "SELECT j.id FROM batch_lines l JOIN jobs j ON j.id = l.job_id
                 WHERE l.batch_id = $1 AND j.state IN ('queued', 'retrying', 'running')
                 ORDER BY j.id LIMIT $2",
            )
            .bind(id)
            .bind(CANCELS_PER_STATEMENT)
            .fetch_all(&mut *tx)
            .await?;
            let full = waiting.len() as i64 >= CANCELS_PER_STATEMENT;
            for (job,) in waiting {
                let states = ["queued", "retrying", "running"];
                if let Some(tenant) =
                    cancel_one(&mut tx, job, None, &states, Some(&detail), now).await?
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
        let now = Ts::now();
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input, and
        // the statuses are the store's own.
        let row: Option<(Option<String>,)> = sqlx::query_as(&format!(
            "UPDATE batches SET status = $2, {at} = $3,
                                locked_until = CASE WHEN $4 THEN locked_until END
             WHERE id = $1 AND status IN ({})
             RETURNING notify_email",
            quoted(&to.moves_from_str())
        ))
        .bind(id)
        .bind(to.as_str())
        .bind(now)
        // The finalizer keeps its hold while it writes the output; any other move makes the
        // batch due at once (an ended one is never taken again anyway).
        .bind(to == BatchStatus::Finalizing)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((email,)) = row else {
            tx.rollback().await?;
            return Ok(false);
        };
        if ENDED.contains(&to.as_str()) {
            queue_batch_notification(&mut tx, id, email.as_deref(), now).await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn finish_batch(
        &self,
        id: &str,
        end: BatchStatus,
        at: &str,
        counts: (i32, i32),
        output_file: Option<&FinishedFile>,
        error_file: Option<&FinishedFile>,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        // `at` is one of the fixed column names of `BatchStatus::at_column`, never input, and
        // the statuses are the store's own.
        let row: Option<(String, Option<String>)> = sqlx::query_as(&format!(
            "UPDATE batches SET status = $2, {at} = $3, completed = $4, failed = $5,
                                output_file_id = $6, error_file_id = $7, locked_until = NULL
             WHERE id = $1 AND status IN ({})
             RETURNING tenant, notify_email",
            quoted(&end.moves_from_str())
        ))
        .bind(id)
        .bind(end.as_str())
        .bind(now)
        .bind(counts.0)
        .bind(counts.1)
        .bind(output_file.map(|f| f.id.as_str()))
        .bind(error_file.map(|f| f.id.as_str()))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((tenant, email)) = row else {
            // Ended (or cancelled) by someone else: its files stay uploads, purged as stale.
            tx.rollback().await?;
            return Ok(false);
        };
        for file in output_file.into_iter().chain(error_file) {
            let done = sqlx::query(
                "UPDATE files SET status = 'processed', bytes = $3, lines = $4, updated_at = $5
                 WHERE id = $1 AND tenant = $2 AND status = 'uploading'",
            )
            .bind(&file.id)
            .bind(&tenant)
            .bind(file.bytes)
            .bind(file.lines)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() != 1 {
                tx.rollback().await?;
                return Err(crate::files::no_upload(&file.id));
            }
        }
        queue_batch_notification(&mut tx, id, email.as_deref(), now).await?;
        tx.commit().await?;
        Ok(true)
    }
}
