//! Keeping the lanes honest with the database, which is the truth: republishing jobs whose
//! lane message may be gone, and ending jobs whose message the broker dead-lettered by itself.

use crate::outbox::OutboxMessage;
use crate::sql::dispatch;
use crate::{Store, StoreError};
use sluice_core::{JobRef, Lane};
use std::time::Duration;

/// The reconciler's side of the store.
impl Store {
    /// Queue a fresh message for up to `limit` jobs that have waited in `lane` for longer than
    /// `waited` with no outbox row: `queued` jobs of `priority`, `standard` or `batch` (not
    /// followers of an identical job, which have no message of their own), or for `retry`
    /// every `retrying` job. Each one's wait starts over (`updated_at` is now), so a job whose
    /// message was only slow gets at most one more copy per `waited`; the copies carry the
    /// job's current `attempt`, and a claim takes one attempt once, so only one of them runs.
    ///
    /// Publish the messages (and mark them published) like any other outbox messages; the
    /// relay republishes them if that fails. `dead` has no waiting jobs: an empty list.
    pub async fn republish_waiting(
        &self,
        lane: Lane,
        waited: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        if lane == Lane::Dead || limit <= 0 {
            return Ok(Vec::new());
        }
        dispatch!(self.republish_waiting(lane, waited, limit))
    }

    /// A message of `job` reached the dead lane without Sluice putting it there: the broker
    /// gave up on it (SQS's redrive policy, the SQL queue's `max_receive_count`). If the job
    /// still waits at that message's attempt, it goes to `dead` with `reason` (and its email,
    /// if it asked for one, is queued); `false` when the job has moved on (running under a
    /// newer attempt, finished, or already dead because Sluice dead-lettered it).
    pub async fn dead_lettered_by_broker(
        &self,
        job: &JobRef,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let tenant = dispatch!(self.dead_lettered_by_broker(job, reason))?;
        if let Some(tenant) = &tenant {
            self.announcer.one(job.request_id, tenant);
        }
        Ok(tenant.is_some())
    }
}

/// The statement's condition on which jobs wait in `lane` (`lane` bound as `$1`), and the
/// order its index reads them in, oldest first.
pub(crate) fn waiting_in(lane: Lane) -> (&'static str, &'static str) {
    if lane == Lane::Retry {
        // `jobs_retrying` (updated_at) WHERE state = 'retrying'.
        ("state = 'retrying'", "updated_at")
    } else {
        // Literal so the partial index `jobs_queued_in_lane` (lane, id) serves it; ids are
        // UUIDv7, so their order is the order jobs were accepted in.
        ("lane = $1 AND state = 'queued' AND leader IS NULL", "id")
    }
}
