//! A job's life after ingest (claim, heartbeat, complete, retry, dead-letter, reap, replay),
//! each fenced by `attempt`: the types, the rows both backends read and the public API.

use crate::jobs::{corrupt, parse_lane};
use crate::outbox::OutboxMessage;
use crate::sql::{dispatch, reading, writing, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobRequest, Lane, RequestId};
use std::time::Duration;
use uuid::Uuid;

/// A job a worker now holds.
#[derive(Debug, Clone)]
pub struct Claim {
    pub id: RequestId,
    /// The fencing token for this run: completion must present it.
    pub attempt: i32,
    /// Attempts in the current retry budget, this one included.
    pub tries: i32,
    /// 429s the job met before this attempt (they do not count as tries).
    pub throttled: i32,
    pub lane: Lane,
    pub request: JobRequest,
    /// When the job was accepted: the start of its queue wait and of its time to completion.
    pub created_at: DateTime<Utc>,
}

/// A dead-lettered job as operators list it.
#[derive(Debug, Clone)]
pub struct DeadJob {
    pub id: RequestId,
    pub tenant: String,
    pub model: String,
    pub error: Option<String>,
    pub at: DateTime<Utc>,
}

/// A successful attempt to record.
#[derive(Debug, Clone)]
pub struct Completion {
    pub id: RequestId,
    pub attempt: i32,
    pub result: serde_json::Value,
    pub endpoint: String,
    /// What the call cost in US dollars (usage times the endpoint's price), added to the
    /// tenant's spend of the day; `None` when the endpoint has no price.
    pub cost_usd: Option<f64>,
}

/// Why an attempt failed, stored on the job and in its event.
#[derive(Debug, Clone)]
pub struct Failure {
    pub error: String,
    pub endpoint: Option<String>,
    /// The provider answered 429: the attempt is given back to the retry budget and counted
    /// as a throttle instead, and the retry message goes before fresh work for the pool.
    pub throttled: bool,
    /// The provider's HTTP status, when it answered one (stored as `jobs.error_status`, so
    /// the API can relay it, e.g. in a batch's error file).
    pub status: Option<u16>,
}

/// A claimed job as either backend's claim returns it, with the job's tenant.
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimRow {
    id: Uuid,
    attempt: i32,
    tries: i32,
    throttled: i32,
    lane: String,
    request: serde_json::Value,
    created_at: Ts,
    tenant: String,
}

impl ClaimRow {
    pub(crate) fn into_claim(self) -> Result<(Claim, String), StoreError> {
        let claim = Claim {
            id: RequestId(self.id),
            attempt: self.attempt,
            tries: self.tries,
            throttled: self.throttled,
            lane: parse_lane(&self.lane)?,
            request: serde_json::from_value(self.request).map_err(corrupt)?,
            created_at: self.created_at.into(),
        };
        Ok((claim, self.tenant))
    }
}

/// A `dead` job as operators list it.
#[derive(sqlx::FromRow)]
struct DeadJobRow {
    id: Uuid,
    tenant: String,
    model: String,
    error: Option<String>,
    updated_at: Ts,
}

/// Claim, heartbeat, complete, retry, dead-letter, reap and replay.
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

    /// End every running job's lease now, so the next [`Store::reap_expired`] retries them at
    /// once; how many. Only for a process that knows no worker is alive (the embedded mode at
    /// start, which owns its file): a live worker's job would run twice.
    pub async fn expire_leases(&self) -> Result<u64, StoreError> {
        Ok(writing!(self, |pool, now| {
            sqlx::query(&format!(
                "UPDATE jobs SET lease_until = {now}
                 WHERE state = 'running' AND lease_until IS NOT NULL AND lease_until > {now}"
            ))
            .execute(pool)
            .await?
            .rows_affected()
        }))
    }

    /// Requeue jobs whose lease expired (their worker died): to `retry` at once, or to `dead`
    /// when the retry budget is spent. Safe to run from every worker at the same time.
    pub async fn reap_expired(
        &self,
        max_tries: u32,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let max_tries = i32::try_from(max_tries).unwrap_or(i32::MAX);
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

    /// The most recently dead-lettered jobs.
    pub async fn dead_jobs(&self, limit: i64) -> Result<Vec<DeadJob>, StoreError> {
        let sql = "SELECT id, tenant, model, error, updated_at FROM jobs WHERE state = 'dead'
                   ORDER BY updated_at DESC LIMIT $1";
        let rows: Vec<DeadJobRow> = reading!(self, |pool| {
            sqlx::query_as(sql).bind(limit).fetch_all(pool).await?
        });
        Ok(rows
            .into_iter()
            .map(|r| DeadJob {
                id: RequestId(r.id),
                tenant: r.tenant,
                model: r.model,
                error: r.error,
                at: r.updated_at.into(),
            })
            .collect())
    }
}

/// The lane message of a job whose state change queued it.
pub(crate) fn job_ref(
    id: RequestId,
    tenant: String,
    model: String,
    attempt: i32,
    request: &JobRequest,
    rate_limited: bool,
) -> JobRef {
    JobRef {
        waiting_since_ms: None,
        tokens: request.estimated_tokens(),
        rate_limited,
        request_id: id,
        tenant,
        model,
        attempt,
    }
}
