//! PostgreSQL's batch statements that differ from SQLite's: creation in a few large statements
//! of one transaction, batches taken by finalizers with `FOR UPDATE SKIP LOCKED`.

use crate::batches::{
    at_column, bind_new_batch, check_lines, BatchLine, BatchRow, BatchStatus, FinishedFile,
    NewBatch, BATCH_COLUMNS, CANCELS_PER_STATEMENT, ENDED, FINALIZED, LINES_PER_STATEMENT,
};
use crate::jobs::{Accepted, NewJob};
use crate::outbox::OutboxMessage;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use sluice_core::RequestId;
use std::time::Duration;
use uuid::Uuid;

impl PgBackend {
    pub(crate) async fn create_batch(
        &self,
        batch: &NewBatch,
        lines: &[BatchLine],
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let total = check_lines(batch, lines)?;
        let mut tx = self.pool.begin().await?;
        bind_new_batch!(
            sqlx::query(
                "INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                  completion_window, status, metadata, total, notify_email,
                                  expires_at, created_at, in_progress_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'in_progress', $8, $9, $10, now() + $11 * interval '1 millisecond', now(), now())",
            ),
            batch
        )
        .bind(total)
        .bind(&batch.notify_email)
        .bind(crate::millis(batch.expires_in))
        .execute(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(lines.len());
        let mut enqueued = Vec::new();
        for chunk in lines.chunks(LINES_PER_STATEMENT) {
            let jobs: Vec<&NewJob> = chunk.iter().map(|l| &l.job).collect();
            // The batched ingest's own statement: jobs, `queued` events and outbox rows.
            for (accepted, job) in self
                .insert_jobs_in(&mut tx, &jobs)
                .await?
                .into_iter()
                .zip(&jobs)
            {
                match accepted {
                    Accepted::Queued(message) => messages.push(message),
                    Accepted::Enqueued => enqueued.push(job.lane),
                    Accepted::Attached { .. } | Accepted::Answerable { .. } => {}
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
        if let Some(lanes) = &self.lanes {
            lanes.wake_all(enqueued);
        }
        Ok(messages)
    }

    pub(crate) async fn create_failed_batch(
        &self,
        batch: &NewBatch,
        errors: &serde_json::Value,
    ) -> Result<BatchRow, StoreError> {
        Ok(bind_new_batch!(
            sqlx::query_as(&format!(
                "WITH b AS (
                 INSERT INTO batches (id, tenant, user_id, tier, input_file_id, endpoint,
                                      completion_window, status, metadata, errors, total,
                                      notify_email, expires_at, created_at, failed_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'failed', $8, $9, 0, $10, now() + $11 * interval '1 millisecond', now(), now())
                 RETURNING {BATCH_COLUMNS}
             ), n AS (
                 -- Ended at birth: its email, if any, is queued with it.
                 INSERT INTO notifications (batch_id, email)
                 SELECT id, notify_email FROM b WHERE notify_email IS NOT NULL
             )
             SELECT * FROM b"
            )),
            batch
        )
        .bind(errors)
        .bind(&batch.notify_email)
        .bind(crate::millis(batch.expires_in))
        .fetch_one(&self.pool)
        .await?)
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
    ) -> Result<Option<BatchRow>, StoreError> {
        // SKIP LOCKED: concurrent finalizers each take a different batch, or none; the update
        // re-checks its row, so a batch taken and committed meanwhile is not taken again. The
        // statuses are literal so the partial index `batches_due` serves the look-up.
        Ok(sqlx::query_as(&format!(
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
        .await?)
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

    pub(crate) async fn finish_batch(
        &self,
        id: &str,
        end: BatchStatus,
        at: &str,
        counts: (i32, i32),
        output_file: Option<&FinishedFile>,
        error_file: Option<&FinishedFile>,
    ) -> Result<bool, StoreError> {
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
