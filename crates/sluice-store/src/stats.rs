//! Aggregates over all jobs, for benchmarks and operators.
//! These scan the jobs table; they are not for request paths. SQLite's are in `sqlite::stats`.

use crate::postgres::PgBackend;
use crate::StoreError;

impl PgBackend {
    /// Jobs in a terminal state.
    pub(crate) async fn finished_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Submit-to-finish latency over all jobs; see [`LatencySummary`].
    pub(crate) async fn latency_summary(&self) -> Result<LatencySummary, StoreError> {
        let row: (Option<f64>, Option<f64>, Option<f64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8),
                    count(*) FILTER (WHERE state <> 'succeeded')
             FROM jobs",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(LatencySummary {
            span: row.0.unwrap_or_default(),
            p50: row.1.unwrap_or_default(),
            p95: row.2.unwrap_or_default(),
            p99: row.3.unwrap_or_default(),
            not_succeeded: row.4,
        })
    }
}

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

impl PgBackend {
    /// p50 and p95 queue wait per lane over jobs that started.
    pub(crate) async fn queue_wait_by_lane(&self) -> Result<Vec<LaneWait>, StoreError> {
        let rows: Vec<(String, i64, Option<f64>, Option<f64>)> = sqlx::query_as(
            "SELECT lane, count(*),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8)
             FROM jobs WHERE started_at IS NOT NULL GROUP BY lane ORDER BY lane",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(lane, jobs, p50, p95)| LaneWait {
                lane,
                jobs,
                p50: p50.unwrap_or_default(),
                p95: p95.unwrap_or_default(),
            })
            .collect())
    }

    /// Jobs that finished in `[from, to)` seconds after the first claim: utilization over a window.
    pub(crate) async fn finished_in_window(&self, from: f64, to: f64) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "WITH first AS (SELECT min(started_at) AS t0 FROM jobs)
             SELECT count(*) FROM jobs, first
             WHERE finished_at >= t0 + $1 * interval '1 second'
               AND finished_at <  t0 + $2 * interval '1 second'",
        )
        .bind(from)
        .bind(to)
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// Seconds from the first claim to the last finish.
    pub(crate) async fn run_span(&self) -> Result<f64, StoreError> {
        let (span,): (Option<f64>,) = sqlx::query_as(
            "SELECT extract(epoch FROM max(finished_at) - min(started_at))::float8 FROM jobs",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(span.unwrap_or_default())
    }
}
