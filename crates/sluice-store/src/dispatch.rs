//! The public API of [`Store`]: every method here hands its call to the backend in use, so
//! callers never know whether PostgreSQL or SQLite holds the state.

use crate::admission::{LaneStats, SemanticEntry, SettledFollowers};
use crate::batches::{
    BatchLine, BatchLineResult, BatchProgress, BatchRecord, BatchStatus, CancelBatch, FinishedFile,
    NewBatch,
};
use crate::files::{FileRecord, NewFile, SortOrder};
use crate::jobs::{
    Accepted, CancelOutcome, Ingested, JobEvent, JobRecord, NewJob, Reuse, CANCELLABLE, WAITING,
};
use crate::lifecycle::{Claim, Completion, DeadJob, Failure};
use crate::notifications::{Notification, NotificationRow, NotificationState};
use crate::outbox::OutboxMessage;
use crate::stats::{EndpointMinute, FinishedBucket, LaneWait};
use crate::{Db, OwnedEvent, Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobState, Lane, Principal, RequestId};
use std::time::Duration;

/// Call the same method, with the same arguments, on whichever backend the store holds.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match &$self.db {
            Db::Postgres(pg) => pg.$method($($arg),*).await,
            Db::Sqlite(lite) => lite.$method($($arg),*).await,
        }
    };
}

/// Ingest, read and cancel (see `jobs`).
impl Store {
    /// Accept one job, honouring its idempotency key. The job, its first event and its outbox
    /// row are written in one transaction, so a `202` always means the job is durable.
    pub async fn insert_job(&self, job: &NewJob) -> Result<Ingested, StoreError> {
        let ingested = dispatch!(self.insert_job(job))?;
        if let Ingested::Created(_) = ingested {
            self.announcer.one(job.id, &job.principal.tenant);
        }
        Ok(ingested)
    }

    /// Accept many jobs without idempotency keys in one transaction (the batched ingest path).
    /// A job with a request hash identical to a job in flight of its tenant is stored as that
    /// job's follower: it is not queued and takes the other's outcome.
    pub async fn insert_jobs(&self, jobs: &[NewJob]) -> Result<Vec<Accepted>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // Every job is stored, queued or attached, or the call fails as a whole.
        let accepted = dispatch!(self.insert_jobs(jobs))?;
        self.announcer
            .all(jobs.iter().map(|j| (j.id, j.principal.tenant.as_str())));
        Ok(accepted)
    }

    /// A tenant's job; another tenant's id answers `None`, exactly like an unknown one.
    pub async fn get_job(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<Option<JobRecord>, StoreError> {
        dispatch!(self.get_job(tenant, id))
    }

    /// Any job, for operators and tests.
    pub async fn job(&self, id: RequestId) -> Result<Option<JobRecord>, StoreError> {
        dispatch!(self.job(id))
    }

    /// A job's event log in order.
    pub async fn events(&self, id: RequestId) -> Result<Vec<JobEvent>, StoreError> {
        dispatch!(self.events(id))
    }

    /// Jobs per state, for tests, the CLI and readiness checks.
    pub async fn count_by_state(&self) -> Result<Vec<(JobState, i64)>, StoreError> {
        dispatch!(self.count_by_state())
    }

    /// Cancel a tenant's job unless it is already terminal. A running job's result will be
    /// discarded. The completion email, if any, is queued with the state change.
    pub async fn cancel(&self, tenant: &str, id: RequestId) -> Result<CancelOutcome, StoreError> {
        let outcome = dispatch!(self.cancel(tenant, id, CANCELLABLE))?;
        self.announce_cancel(&outcome, tenant, id);
        Ok(outcome)
    }

    /// Like [`Store::cancel`], but only a job still waiting (queued or retrying) is cancelled;
    /// a running one answers [`CancelOutcome::Running`] and is left alone.
    pub async fn cancel_waiting(
        &self,
        tenant: &str,
        id: RequestId,
    ) -> Result<CancelOutcome, StoreError> {
        let outcome = dispatch!(self.cancel(tenant, id, WAITING))?;
        self.announce_cancel(&outcome, tenant, id);
        Ok(outcome)
    }

    fn announce_cancel(&self, outcome: &CancelOutcome, tenant: &str, id: RequestId) {
        if *outcome == CancelOutcome::Cancelled {
            self.announcer.one(id, tenant);
        }
    }
}

/// Held chat completions whose client went away (see `jobs`).
impl Store {
    /// Detach a tenant's job that is not terminal: the same request (`hold_hash`) may take it
    /// back with [`Store::reattach`] within `grace`; after that [`Store::cancel_detached`]
    /// cancels it if it still waits. `false` for an unknown, foreign or terminal job.
    pub async fn detach(
        &self,
        tenant: &str,
        id: RequestId,
        hold_hash: &[u8],
        grace: Duration,
    ) -> Result<bool, StoreError> {
        dispatch!(self.detach(tenant, id, hold_hash, grace))
    }

    /// Take back one detached, not terminal job of the tenant held under `hold_hash` whose
    /// grace has not passed, clearing its hold; concurrent callers never get the same job.
    /// With `finished_too` (a client's own retry) a job that succeeded or went dead since its
    /// client left is taken too: its answer is there already.
    pub async fn reattach(
        &self,
        tenant: &str,
        hold_hash: &[u8],
        finished_too: bool,
    ) -> Result<Option<RequestId>, StoreError> {
        dispatch!(self.reattach(tenant, hold_hash, finished_too))
    }

    /// Cancel up to `limit` detached jobs whose grace passed while they still wait (queued or
    /// retrying), as [`Store::cancel`] does; the holds of expired running or terminal jobs are
    /// cleared and the jobs left alone. Answers the cancelled jobs with their tenants.
    pub async fn cancel_detached(
        &self,
        limit: i64,
    ) -> Result<Vec<(RequestId, String)>, StoreError> {
        let cancelled = dispatch!(self.cancel_detached(limit))?;
        self.announce_all(&cancelled);
        Ok(cancelled)
    }
}

/// Files of the Files API, stored in chunks (see `files`).
impl Store {
    /// Start an upload (status `uploading`, invisible until [`Store::finish_file`]).
    pub async fn begin_file(&self, file: &NewFile) -> Result<(), StoreError> {
        dispatch!(self.begin_file(file))
    }

    /// Append chunk `seq` (0, 1, 2, ... in order) to an upload in progress, in a statement of
    /// its own; [`StoreError::NotFound`] if the file is not uploading (aborted, purged, done).
    pub async fn append_file_chunk(
        &self,
        file_id: &str,
        seq: i32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        dispatch!(self.append_file_chunk(file_id, seq, data))
    }

    /// Finish an upload: the file becomes `processed` and visible with its size and line
    /// count; [`StoreError::NotFound`] if it is not uploading.
    pub async fn finish_file(
        &self,
        file_id: &str,
        bytes: i64,
        lines: i32,
    ) -> Result<FileRecord, StoreError> {
        dispatch!(self.finish_file(file_id, bytes, lines))
    }

    /// Drop an upload in progress and its chunks; `false` if there is none by that id.
    pub async fn abort_file(&self, file_id: &str) -> Result<bool, StoreError> {
        dispatch!(self.abort_file(file_id))
    }

    /// A tenant's processed, undeleted file; another tenant's id answers `None`.
    pub async fn get_file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        dispatch!(self.get_file(tenant, id))
    }

    /// A page of the tenant's processed, undeleted files (of one purpose, if given) after the
    /// id `after` in `order`, at most `limit`, and whether more follow.
    pub async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        order: SortOrder,
    ) -> Result<(Vec<FileRecord>, bool), StoreError> {
        dispatch!(self.list_files(tenant, purpose, after, limit, order))
    }

    /// How many chunks a file has (they are numbered from 0). Takes no tenant: check the file
    /// with [`Store::get_file`] first.
    pub async fn file_chunk_count(&self, file_id: &str) -> Result<i32, StoreError> {
        dispatch!(self.file_chunk_count(file_id))
    }

    /// One chunk of a file's content. Takes no tenant: check the file with
    /// [`Store::get_file`] first.
    pub async fn file_chunk(&self, file_id: &str, seq: i32) -> Result<Option<Vec<u8>>, StoreError> {
        dispatch!(self.file_chunk(file_id, seq))
    }

    /// Delete a tenant's file: marked deleted (the id stays known to batches naming it), its
    /// bytes dropped. `false` for an unknown, foreign or already deleted file.
    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        dispatch!(self.delete_file(tenant, id))
    }

    /// Drop uploads no chunk reached for `older_than` (their node died mid-upload, or a
    /// finalizer lost its batch); answers how many.
    pub async fn purge_stale_uploads(&self, older_than: Duration) -> Result<u64, StoreError> {
        dispatch!(self.purge_stale_uploads(older_than))
    }
}

/// Batches of the Batch API (see `batches`).
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
        dispatch!(self.create_failed_batch(batch, errors))
    }

    /// A tenant's batch; another tenant's id answers `None`.
    pub async fn get_batch(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<BatchRecord>, StoreError> {
        dispatch!(self.get_batch(tenant, id))
    }

    /// A page of the tenant's batches, newest first, after the id `after` (the last of the
    /// previous page), at most `limit`, and whether more follow.
    pub async fn list_batches(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: i64,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError> {
        dispatch!(self.list_batches(tenant, after, limit))
    }

    /// Ask to cancel a tenant's batch: `validating` or `in_progress` become `cancelling` (and
    /// due for the finalizer at once); `cancelling` answers the same again.
    pub async fn cancel_batch(&self, tenant: &str, id: &str) -> Result<CancelBatch, StoreError> {
        dispatch!(self.cancel_batch(tenant, id))
    }

    /// Lines of the tenant's open batches not yet counted completed or failed (a cap's measure).
    pub async fn pending_batch_lines(&self, tenant: &str) -> Result<i64, StoreError> {
        dispatch!(self.pending_batch_lines(tenant))
    }

    /// Take one open batch (in_progress, cancelling, finalizing) no finalizer holds, holding
    /// it for `hold`; concurrent finalizers never take the same batch while a hold lasts.
    pub async fn take_due_batch(&self, hold: Duration) -> Result<Option<BatchRecord>, StoreError> {
        dispatch!(self.take_due_batch(hold))
    }

    /// Let go of a batch taken by [`Store::take_due_batch`]: look at it again after `next_check`.
    pub async fn release_batch(&self, id: &str, next_check: Duration) -> Result<(), StoreError> {
        dispatch!(self.release_batch(id, next_check))
    }

    /// Count a batch's line jobs by state.
    pub async fn batch_progress(&self, id: &str) -> Result<BatchProgress, StoreError> {
        dispatch!(self.batch_progress(id))
    }

    /// Record how many lines completed and failed so far (ignored once the batch ended).
    pub async fn set_batch_counts(
        &self,
        id: &str,
        completed: i32,
        failed: i32,
    ) -> Result<(), StoreError> {
        dispatch!(self.set_batch_counts(id, completed, failed))
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
        dispatch!(self.batch_line_results(id, after_line, limit))
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
        dispatch!(self.finish_batch(id, end, counts, output_file, error_file))
    }
}

/// Claim, heartbeat, complete, retry, dead-letter, reap and replay (see `lifecycle`).
impl Store {
    /// Move a queued or retrying job to `running` if the message's attempt is still current.
    /// `None` means the message is stale (job terminal, cancelled, or already claimed): ack and drop it.
    pub async fn claim(&self, job: &JobRef, lease: Duration) -> Result<Option<Claim>, StoreError> {
        let mut claims = self.claim_many(std::slice::from_ref(job), lease).await?;
        Ok(claims.pop().flatten())
    }

    /// [`Store::claim`] for many messages in one transaction; answers in input order.
    /// Of two messages for the same job and attempt, only the first gets the claim.
    pub async fn claim_many(
        &self,
        jobs: &[JobRef],
        lease: Duration,
    ) -> Result<Vec<Option<Claim>>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let claims = dispatch!(self.claim_many(jobs, lease))?;
        Ok(claims
            .into_iter()
            .map(|claim| {
                claim.map(|(claim, tenant)| {
                    self.announcer.one(claim.id, &tenant);
                    claim
                })
            })
            .collect())
    }

    /// Extend the leases of jobs still running under these attempts.
    pub async fn heartbeat(
        &self,
        held: &[(RequestId, i32)],
        lease: Duration,
    ) -> Result<u64, StoreError> {
        if held.is_empty() {
            return Ok(0);
        }
        dispatch!(self.heartbeat(held, lease))
    }

    /// Store a success. `false` if the attempt is no longer current (cancelled, reaped, replaced).
    pub async fn complete(
        &self,
        id: RequestId,
        attempt: i32,
        result: &serde_json::Value,
        endpoint: &str,
    ) -> Result<bool, StoreError> {
        let done = self
            .complete_many(&[Completion {
                id,
                attempt,
                result: result.clone(),
                endpoint: endpoint.to_owned(),
                cost_usd: None,
            }])
            .await?;
        Ok(done.first().copied().unwrap_or(false))
    }

    /// [`Store::complete`] for many jobs in one transaction; answers in input order. Each
    /// completion queues the job's email, if it asked for one, with the state change.
    pub async fn complete_many(&self, done: &[Completion]) -> Result<Vec<bool>, StoreError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let (completed, changed) = dispatch!(self.complete_many(done))?;
        // The completed jobs and the followers that took their answers.
        self.announce_all(&changed);
        Ok(completed)
    }

    /// Record a retryable failure and queue the retry message, deliverable after `delay`.
    pub async fn retry_later(
        &self,
        id: RequestId,
        attempt: i32,
        failure: &Failure,
        delay: Duration,
    ) -> Result<Option<OutboxMessage>, StoreError> {
        let message = dispatch!(self.fail(id, attempt, failure, Lane::Retry, delay))?;
        self.announce_messages(message.iter());
        Ok(message)
    }

    /// Record a permanent failure (or spent retries) and queue the job's `dead` message.
    pub async fn dead_letter(
        &self,
        id: RequestId,
        attempt: i32,
        failure: &Failure,
    ) -> Result<Option<OutboxMessage>, StoreError> {
        let message = dispatch!(self.fail(id, attempt, failure, Lane::Dead, Duration::ZERO))?;
        self.announce_messages(message.iter());
        Ok(message)
    }

    /// Requeue jobs whose lease expired (their worker died): to `retry` at once, or to `dead`
    /// when the retry budget is spent. Safe to run from every worker at the same time.
    pub async fn reap_expired(
        &self,
        max_tries: u32,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let messages = dispatch!(self.reap_expired(max_tries, limit))?;
        self.announce_messages(messages.iter());
        Ok(messages)
    }

    /// Put a dead job back in its lane with a fresh retry budget.
    pub async fn replay(&self, id: RequestId) -> Result<Option<OutboxMessage>, StoreError> {
        let message = dispatch!(self.replay(id))?;
        self.announce_messages(message.iter());
        Ok(message)
    }

    /// Delete a dead job for good (events, outbox rows, email and embedding with it); `false`
    /// unless it exists and is dead, and not a line of a batch still open. Not announced: the
    /// job is gone, and there is no new state or event for anyone to read.
    pub async fn purge_dead(&self, id: RequestId) -> Result<bool, StoreError> {
        dispatch!(self.purge_dead(id))
    }

    /// The most recently dead-lettered jobs.
    pub async fn dead_jobs(&self, limit: i64) -> Result<Vec<DeadJob>, StoreError> {
        dispatch!(self.dead_jobs(limit))
    }

    /// Announce the jobs of lane messages a state change queued.
    fn announce_messages<'a>(&self, messages: impl Iterator<Item = &'a OutboxMessage>) {
        self.announcer
            .all(messages.map(|m| (m.job.request_id, m.job.tenant.as_str())));
    }

    fn announce_all(&self, jobs: &[(RequestId, String)]) {
        self.announcer
            .all(jobs.iter().map(|(id, tenant)| (*id, tenant.as_str())));
    }
}

/// The event log for subscribers (see `events`).
impl Store {
    /// For each `(job, after)`, the job's events with a sequence number above `after`, ordered
    /// by job and sequence, up to (not including) the first recorded less than `settle` ago.
    /// Unknown jobs have none.
    ///
    /// A settle time lets a poll that backs up a faster channel (the event bus) leave the
    /// newest events to it, so they arrive in the order that channel keeps (deltas first).
    pub async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self.events_after(jobs, settle))
    }

    /// Events of one user's jobs recorded at or after `since`, ordered by job and sequence,
    /// settled as in [`Store::events_after`].
    pub async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        dispatch!(self.user_events_since(tenant, user_id, since, settle))
    }
}

/// API keys (see `keys`).
impl Store {
    /// Create a key for a principal; returns the plaintext key, which is never stored.
    pub async fn create_api_key(&self, principal: &Principal) -> Result<String, StoreError> {
        dispatch!(self.create_api_key(principal))
    }

    /// Create an operator key for `/admin/v1`, named for whoever holds it; the plaintext key
    /// is returned once and never stored. It authenticates nothing else.
    pub async fn create_admin_key(&self, name: &str) -> Result<String, StoreError> {
        dispatch!(self.create_admin_key(name))
    }

    /// The operator's name behind an admin key, if it exists and is not revoked.
    pub async fn admin_for_key(&self, key: &str) -> Result<Option<String>, StoreError> {
        if !key.starts_with(crate::KEY_PREFIX) {
            return Ok(None);
        }
        dispatch!(self.admin_for_key(key))
    }

    /// Every key, tenant and admin, revoked or not, oldest first.
    pub async fn api_keys(&self) -> Result<Vec<crate::KeyInfo>, StoreError> {
        dispatch!(self.api_keys())
    }

    /// Revoke a key by id; `false` if there is no such key or it was already revoked.
    pub async fn revoke_api_key(&self, id: uuid::Uuid) -> Result<bool, StoreError> {
        dispatch!(self.revoke_api_key(id))
    }

    /// The principal behind a tenant key, if the key exists and is not revoked (admin keys
    /// stand for no tenant).
    pub async fn principal_for_key(&self, key: &str) -> Result<Option<Principal>, StoreError> {
        if !key.starts_with(crate::KEY_PREFIX) {
            return Ok(None);
        }
        dispatch!(self.principal_for_key(key))
    }
}

/// Completion emails (see `notifications`).
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
        dispatch!(self.notification_sent(id))
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
        dispatch!(self.notification_for(id))
    }

    /// The notification of a batch, if it has one.
    pub async fn batch_notification(
        &self,
        batch_id: &str,
    ) -> Result<Option<NotificationRow>, StoreError> {
        dispatch!(self.batch_notification(batch_id))
    }

    /// Notifications per state (readiness and metrics).
    pub async fn notification_counts(&self) -> Result<Vec<(NotificationState, i64)>, StoreError> {
        dispatch!(self.notification_counts())
    }
}

/// The outbox (see `outbox`).
impl Store {
    /// Forget outbox rows whose messages the broker confirmed.
    pub async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        dispatch!(self.mark_published(outbox_ids))
    }

    /// Take outbox rows older than `grace` that nobody published, locking them for `lock`
    /// so concurrent relays do not publish the same row twice in a row.
    pub async fn unpublished(
        &self,
        grace: Duration,
        lock: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        dispatch!(self.unpublished(grace, lock, limit))
    }

    /// Outbox rows still waiting to be published (tests and readiness).
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        dispatch!(self.outbox_len())
    }
}

/// Aggregates for benchmarks and operators (see `stats`); they scan the jobs table.
impl Store {
    /// Jobs in a terminal state.
    pub async fn finished_count(&self) -> Result<i64, StoreError> {
        dispatch!(self.finished_count())
    }

    /// Submit-to-finish latency percentiles, the run's span and the jobs not `succeeded`.
    pub async fn latency_summary(&self) -> Result<crate::LatencySummary, StoreError> {
        dispatch!(self.latency_summary())
    }

    /// p50 and p95 queue wait per lane over jobs that started.
    pub async fn queue_wait_by_lane(&self) -> Result<Vec<LaneWait>, StoreError> {
        dispatch!(self.queue_wait_by_lane(None))
    }

    /// p50 and p95 queue wait per lane over jobs that started since `since`.
    pub async fn queue_wait_by_lane_since(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<LaneWait>, StoreError> {
        dispatch!(self.queue_wait_by_lane(Some(since)))
    }

    /// Jobs finished since `since`, per `bucket_secs` bucket; empty buckets are left out.
    pub async fn finished_per_bucket(
        &self,
        since: DateTime<Utc>,
        bucket_secs: u32,
    ) -> Result<Vec<FinishedBucket>, StoreError> {
        dispatch!(self.finished_per_bucket(since, bucket_secs))
    }

    /// Provider calls (and the 429s among them) per endpoint and minute since `since`, read
    /// from the job events: one per completion and per failed attempt.
    pub async fn endpoint_calls_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<EndpointMinute>, StoreError> {
        dispatch!(self.endpoint_calls_per_minute(since))
    }

    /// Jobs that finished in `[from, to)` seconds after the first claim: utilization over a window.
    pub async fn finished_in_window(&self, from: f64, to: f64) -> Result<i64, StoreError> {
        dispatch!(self.finished_in_window(from, to))
    }

    /// Seconds from the first claim to the last finish.
    pub async fn run_span(&self) -> Result<f64, StoreError> {
        dispatch!(self.run_span())
    }
}

/// Admission: reused answers, lane load, spend and embeddings (see `admission`).
impl Store {
    /// The tenant's newest successful job with this request hash finished within `within`:
    /// the exact cache's hit.
    pub async fn reusable_answer(
        &self,
        tenant: &str,
        request_hash: &[u8],
        within: Duration,
    ) -> Result<Option<RequestId>, StoreError> {
        dispatch!(self.reusable_answer(tenant, request_hash, within))
    }

    /// Store `job` as succeeded at once with `source`'s answer (events, email and all);
    /// `false`, writing nothing, unless `source` is a successful job of the same tenant.
    pub async fn insert_answered(
        &self,
        job: &NewJob,
        source: RequestId,
        how: Reuse,
    ) -> Result<bool, StoreError> {
        let inserted = dispatch!(self.insert_answered(job, source, how))?;
        if inserted {
            self.announcer.one(job.id, &job.principal.tenant);
        }
        Ok(inserted)
    }

    /// Give followers whose leader finished the leader's outcome, and queue on their own those
    /// whose leader was cancelled. Completion settles followers of succeeded jobs itself; this
    /// catches the rest and the race of a follower attached as its leader finished.
    /// Only the followers that finished are announced: a released one changes neither its
    /// state nor its event log (it stays `queued`, now in a lane of its own).
    pub async fn settle_followers(&self, limit: i64) -> Result<SettledFollowers, StoreError> {
        let settled = dispatch!(self.settle_followers(limit))?;
        self.announce_all(&settled.finished);
        Ok(settled)
    }

    /// Per lane: queued jobs, the oldest one's arrival and first starts within `window`.
    pub async fn lane_stats(&self, window: Duration) -> Result<Vec<LaneStats>, StoreError> {
        dispatch!(self.lane_stats(window))
    }

    /// A queued job's place in its lane: 1 + the jobs accepted before it still queued there.
    pub async fn queue_position(&self, lane: Lane, id: RequestId) -> Result<u64, StoreError> {
        dispatch!(self.queue_position(lane, id))
    }

    /// The tenant's spend today (UTC) in US dollars.
    pub async fn spent_today(&self, tenant: &str) -> Result<f64, StoreError> {
        dispatch!(self.spent_today(tenant))
    }

    /// Remember a job's prompt embedding (little-endian f32s) for the semantic cache, under a
    /// scope (the model alias and what else must match exactly).
    pub async fn put_semantic_entry(
        &self,
        job: RequestId,
        tenant: &str,
        model: &str,
        embedding: &[u8],
    ) -> Result<(), StoreError> {
        dispatch!(self.put_semantic_entry(job, tenant, model, embedding))
    }

    /// Embeddings of the tenant's successful jobs in a scope from the last `within`,
    /// newest first, at most `limit`: the candidates of a semantic cache look-up.
    pub async fn semantic_candidates(
        &self,
        tenant: &str,
        model: &str,
        within: Duration,
        limit: i64,
    ) -> Result<Vec<SemanticEntry>, StoreError> {
        dispatch!(self.semantic_candidates(tenant, model, within, limit))
    }

    /// Pause a lane (`lane:NAME`) or an endpoint (`endpoint:NAME`); `false` if it already was.
    pub async fn pause(&self, target: &str, by: &str) -> Result<bool, StoreError> {
        dispatch!(self.pause(target, by))
    }

    /// Resume a paused lane or endpoint; `false` if it was not paused.
    pub async fn resume(&self, target: &str) -> Result<bool, StoreError> {
        dispatch!(self.resume(target))
    }

    /// Everything paused, as `lane:NAME` and `endpoint:NAME`.
    pub async fn pauses(&self) -> Result<Vec<String>, StoreError> {
        dispatch!(self.pauses())
    }
}
