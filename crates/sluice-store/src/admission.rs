//! What admission reads and writes: reused answers and followers, lane load, queue positions,
//! daily spend, prompt embeddings and pauses; the types, the public API and shared statements.

use crate::jobs::{NewJob, Reuse};
use crate::outbox::OutboxMessage;
use crate::sql::{dispatch, reading, writing};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{Lane, RequestId};
use std::time::Duration;

/// One lane's load as the jobs table sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneStats {
    pub lane: Lane,
    /// Jobs queued in the lane (followers of other jobs excluded: they wait in no lane).
    pub depth: u64,
    /// When the oldest of them was accepted.
    pub oldest: Option<DateTime<Utc>>,
    /// Jobs of the lane that started their first attempt within the window asked for.
    pub started: u64,
    /// When the first of those started: a rate over less than the whole window when the lane
    /// has not been draining that long.
    pub first_started: Option<DateTime<Utc>>,
}

/// Followers whose leader has finished, settled by [`crate::Store::settle_followers`].
#[derive(Debug, Default)]
pub struct SettledFollowers {
    /// Followers that took their leader's outcome: (job, tenant).
    pub finished: Vec<(RequestId, String)>,
    /// Followers whose leader was cancelled or vanished: queued on their own; publish these.
    pub released: Vec<OutboxMessage>,
}

/// A prompt embedding with the job whose answer it stands for.
#[derive(Debug, Clone)]
pub struct SemanticEntry {
    pub job: RequestId,
    pub embedding: Vec<u8>,
}

/// Admission: reused answers, lane load, spend and embeddings.
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

    /// [`Store::reusable_answer`] for many (tenant, request hash) pairs at once: one statement
    /// on PostgreSQL, so concurrent submissions share a round trip. One answer per pair, in order.
    pub async fn reusable_answers(
        &self,
        wanted: &[(String, Vec<u8>)],
        within: Duration,
    ) -> Result<Vec<Option<RequestId>>, StoreError> {
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        dispatch!(self.reusable_answers(wanted, within))
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
        let sql = "SELECT count(*) FROM jobs
                   WHERE lane = $1 AND state = 'queued' AND leader IS NULL AND id < $2";
        let (ahead,): (i64,) = reading!(self, |pool| {
            sqlx::query_as(sql)
                .bind(lane.as_str())
                .bind(id.0)
                .fetch_one(pool)
                .await?
        });
        Ok(u64::try_from(ahead).unwrap_or(0) + 1)
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
        writing!(self, |pool, now| {
            sqlx::query(&format!(
                "INSERT INTO semantic_entries (job_id, tenant, model, embedding, created_at)
                 VALUES ($1, $2, $3, $4, {now}) ON CONFLICT (job_id) DO NOTHING"
            ))
            .bind(job.0)
            .bind(tenant)
            .bind(model)
            .bind(embedding)
            .execute(pool)
            .await?;
        });
        Ok(())
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
        let done = writing!(self, |pool, now| {
            sqlx::query(&format!(
                "INSERT INTO pauses (target, paused_by, paused_at) VALUES ($1, $2, {now})
                 ON CONFLICT (target) DO NOTHING"
            ))
            .bind(target)
            .bind(by)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// Resume a paused lane or endpoint; `false` if it was not paused.
    pub async fn resume(&self, target: &str) -> Result<bool, StoreError> {
        let done = writing!(self, |pool| {
            sqlx::query("DELETE FROM pauses WHERE target = $1")
                .bind(target)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done == 1)
    }

    /// Everything paused, as `lane:NAME` and `endpoint:NAME`.
    pub async fn pauses(&self) -> Result<Vec<String>, StoreError> {
        let rows: Vec<(String,)> = reading!(self, |pool| {
            sqlx::query_as("SELECT target FROM pauses ORDER BY target")
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(t,)| t).collect())
    }
}
