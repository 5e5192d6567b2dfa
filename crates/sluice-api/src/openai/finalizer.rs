//! The batch finalizer every API node runs: it keeps open batches' counts, cancels their lines
//! when they are cancelled or expire, and once no line waits writes the output and error files
//! in input order and ends the batch. The store hands each batch to one finalizer at a time.

use super::chat::ended_badly;
use super::wire;
use super::BatchConfig;
use chrono::Utc;
use serde_json::{json, Value};
use sluice_core::JobState;
use sluice_store::{
    new_file_id, BatchLineResult, BatchRecord, BatchStatus, FinishedFile, NewFile, Store,
};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A batch output or error file being written, a chunk at a time.
struct FileWriter<'a> {
    store: &'a Store,
    id: String,
    begun: bool,
    tenant: String,
    filename: String,
    buffer: Vec<u8>,
    seq: i32,
    bytes: i64,
    lines: i32,
}

impl<'a> FileWriter<'a> {
    fn new(store: &'a Store, tenant: &str, filename: String) -> Self {
        FileWriter {
            store,
            id: new_file_id(),
            begun: false,
            tenant: tenant.to_owned(),
            filename,
            buffer: Vec::new(),
            seq: 0,
            bytes: 0,
            lines: 0,
        }
    }

    async fn flush(&mut self) -> Result<(), sluice_store::StoreError> {
        if !self.begun {
            let file = NewFile {
                id: self.id.clone(),
                tenant: self.tenant.clone(),
                purpose: "batch_output".into(),
                filename: self.filename.clone(),
            };
            self.store.begin_file(&file).await?;
            self.begun = true;
        }
        if !self.buffer.is_empty() {
            self.store
                .append_file_chunk(&self.id, self.seq, &self.buffer)
                .await?;
            self.seq += 1;
            self.buffer.clear();
        }
        Ok(())
    }

    async fn push(&mut self, line: &Value) -> Result<(), sluice_store::StoreError> {
        let text = line.to_string();
        self.buffer.extend_from_slice(text.as_bytes());
        self.buffer.push(b'\n');
        self.bytes += i64::try_from(text.len() + 1).unwrap_or(i64::MAX);
        self.lines += 1;
        if self.buffer.len() >= 1 << 20 {
            self.flush().await?;
        }
        Ok(())
    }

    /// The written file, if any line went into it.
    async fn finish(mut self) -> Result<Option<FinishedFile>, sluice_store::StoreError> {
        if self.lines == 0 {
            return Ok(None);
        }
        self.flush().await?;
        Ok(Some(FinishedFile {
            id: self.id,
            bytes: self.bytes,
            lines: self.lines,
        }))
    }

    async fn abandon(self) {
        if self.begun {
            let _ = self.store.abort_file(&self.id).await;
        }
    }
}

/// One line of the output or error file, in OpenAI's `BatchRequestOutput` shape.
fn output_line(
    r: &BatchLineResult,
    job: Option<&sluice_store::JobRecord>,
    end: BatchStatus,
) -> (bool, Value) {
    let id = format!("batch_req_{}", r.job_id.0.simple());
    match (r.state, job) {
        (JobState::Succeeded, Some(job)) => (
            true,
            json!({"id": id, "custom_id": r.custom_id, "error": null, "response": {
                "status_code": 200, "request_id": r.job_id.to_string(), "body": wire::completion(job),
            }}),
        ),
        (JobState::Cancelled, _) => {
            let (code, message) = if end == BatchStatus::Expired {
                (
                    "batch_expired",
                    "This line could not be executed before the completion window expired.",
                )
            } else {
                (
                    "batch_cancelled",
                    "This line was not executed: the batch was cancelled.",
                )
            };
            (
                false,
                json!({"id": id, "custom_id": r.custom_id, "response": null,
                           "error": {"code": code, "message": message}}),
            )
        }
        (_, Some(job)) => {
            let error = ended_badly(job);
            let status = r.error_status.unwrap_or(error.status.as_u16());
            (
                false,
                json!({"id": id, "custom_id": r.custom_id, "error": null, "response": {
                    "status_code": status, "request_id": r.job_id.to_string(), "body": error.body(),
                }}),
            )
        }
        (_, None) => (
            false,
            json!({"id": id, "custom_id": r.custom_id, "response": null,
                                    "error": {"code": "internal", "message": "the line's job is gone"}}),
        ),
    }
}

/// Write a finished batch's output and error files in input order and end it.
async fn finalize(
    store: &Store,
    batch: &BatchRecord,
    end: BatchStatus,
    counts: (i32, i32),
) -> Result<bool, sluice_store::StoreError> {
    if end == BatchStatus::Completed {
        // Seen as `finalizing` while the files are written; a batch being cancelled goes
        // straight to `cancelled`.
        store
            .set_batch_status(&batch.id, BatchStatus::Finalizing)
            .await?;
    }
    let mut output = FileWriter::new(store, &batch.tenant, format!("{}_output.jsonl", batch.id));
    let mut errors = FileWriter::new(store, &batch.tenant, format!("{}_error.jsonl", batch.id));
    let written: Result<(), sluice_store::StoreError> = async {
        let mut after = 0;
        loop {
            let page = store.batch_line_results(&batch.id, after, 500).await?;
            let Some(last) = page.last() else { break };
            after = last.line;
            for r in &page {
                // The completion body is built from the job as the chat route builds it.
                let job = match r.state {
                    JobState::Cancelled => None,
                    _ => store.job(r.job_id).await?,
                };
                let (ok, line) = output_line(r, job.as_ref(), end);
                if ok {
                    output.push(&line).await?;
                } else {
                    errors.push(&line).await?;
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(error) = written {
        output.abandon().await;
        errors.abandon().await;
        return Err(error);
    }
    let (out_id, err_id) = (output.id.clone(), errors.id.clone());
    let out = output.finish().await?;
    let err = errors.finish().await?;
    let ended = store
        .finish_batch(&batch.id, end, counts, out.as_ref(), err.as_ref())
        .await?;
    if !ended {
        // Another finalizer or a cancel got there first: these files are nobody's.
        for id in [out_id, err_id] {
            let _ = store.abort_file(&id).await;
        }
    }
    Ok(ended)
}

/// Look after one open batch: keep its counts, cancel its lines when it is cancelled or
/// expired, and end it once no line is left waiting. Answers when to look again (`None`: ended).
async fn advance(
    store: &Store,
    batch: &BatchRecord,
) -> Result<Option<Duration>, sluice_store::StoreError> {
    let expired = batch.status == BatchStatus::InProgress && Utc::now() >= batch.expires_at;
    if batch.status == BatchStatus::Cancelling || expired {
        let cancelled = store.cancel_batch_jobs(&batch.id).await?;
        tracing::debug!(message = "batch lines cancelled", batch = %batch.id, jobs = cancelled.len());
    }
    let progress = store.batch_progress(&batch.id).await?;
    store
        .set_batch_counts(
            &batch.id,
            progress.succeeded,
            progress.failed + progress.cancelled,
        )
        .await?;
    if progress.pending > 0 {
        return Ok(Some(Duration::from_secs(1)));
    }
    let end = match batch.status {
        BatchStatus::Cancelling => BatchStatus::Cancelled,
        _ if expired => BatchStatus::Expired,
        _ => BatchStatus::Completed,
    };
    let counts = (progress.succeeded, progress.failed + progress.cancelled);
    if finalize(store, batch, end, counts).await? {
        tracing::info!(message = "batch ended", batch = %batch.id, status = %end, completed = counts.0, failed = counts.1);
    }
    Ok(None)
}

/// Run the finalizer until `shutdown`: every API node runs one; the store hands each open
/// batch to one finalizer at a time, so a node killed mid-batch only delays it by the hold.
pub fn spawn_finalizer(store: Store, config: &BatchConfig, shutdown: CancellationToken) {
    let idle = Duration::from_millis(config.check_every_ms);
    tokio::spawn(async move {
        // Long enough for one pass over a 50,000-line batch; a dead holder delays it this long.
        let hold = Duration::from_secs(30);
        let mut last_purge = tokio::time::Instant::now();
        loop {
            let mut worked = false;
            match store.take_due_batch(hold).await {
                Ok(Some(batch)) => {
                    worked = true;
                    match advance(&store, &batch).await {
                        Ok(Some(next)) => {
                            if let Err(error) = store
                                .release_batch(
                                    &batch.id,
                                    next.min(idle.max(Duration::from_millis(100))),
                                )
                                .await
                            {
                                tracing::warn!(message = "could not release a batch", batch = %batch.id, %error);
                            }
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::warn!(message = "could not advance a batch; retrying", batch = %batch.id, %error);
                            let _ = store.release_batch(&batch.id, Duration::from_secs(5)).await;
                        }
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::warn!(message = "could not take a batch", %error),
            }
            if last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = tokio::time::Instant::now();
                match store.purge_stale_uploads(Duration::from_secs(600)).await {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(message = "dropped uploads left unfinished", uploads = n)
                    }
                    Err(error) => tracing::warn!(message = "could not purge stale uploads", %error),
                }
            }
            if !worked {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(idle) => {}
                }
            } else if shutdown.is_cancelled() {
                return;
            }
        }
    });
}
