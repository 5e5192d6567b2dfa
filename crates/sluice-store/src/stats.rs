//! Aggregates over all jobs for benchmarks, operators and the dashboard (they scan the jobs
//! table; not for request paths): the types and the public API.

use crate::sql::{dispatch, reading};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};

/// Submit-to-finish latency over all jobs, in seconds (0 when none finished).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LatencySummary {
    /// From the first job's acceptance to the last one's finish.
    pub span: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    /// Jobs not (yet) `succeeded`: failed, cancelled, dead or still in flight.
    pub not_succeeded: i64,
}

/// Queue wait (accept to first claim) of one lane, in seconds.
#[derive(Debug, Clone)]
pub struct LaneWait {
    pub lane: String,
    pub jobs: i64,
    pub p50: f64,
    pub p95: f64,
}

/// Jobs that reached a terminal state within one bucket of time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinishedBucket {
    pub start: DateTime<Utc>,
    pub jobs: i64,
}

/// Provider calls recorded for one endpoint within one minute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMinute {
    pub endpoint: String,
    pub minute: DateTime<Utc>,
    /// Calls with a known outcome: successes, failures and 429s.
    pub calls: i64,
    /// Of those, the ones the provider answered 429.
    pub throttled: i64,
}

/// Aggregates for benchmarks and operators; they scan the jobs table.
impl Store {
    /// Jobs in a terminal state.
    pub async fn finished_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = reading!(self, |pool| {
            sqlx::query_as(
                "SELECT count(*) FROM jobs
                 WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(n)
    }

    /// Submit-to-finish latency percentiles, the run's span and the jobs not `succeeded`.
    pub async fn latency_summary(&self) -> Result<LatencySummary, StoreError> {
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
