//! Aggregates over all jobs, for benchmarks and operators.
//! These scan the jobs table; they are not for request paths.

use crate::{Store, StoreError};

impl Store {
    /// Jobs in a terminal state.
    pub async fn finished_count(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled', 'dead')",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    /// (seconds from first accept to last finish, p50 and p99 submit-to-finish in seconds,
    /// jobs that finished other than `succeeded`).
    pub async fn latency_summary(&self) -> Result<(f64, f64, f64, i64), StoreError> {
        let row: (Option<f64>, Option<f64>, Option<f64>, i64) = sqlx::query_as(
            "SELECT extract(epoch FROM max(finished_at) - min(created_at))::float8,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8),
                    percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - created_at)::float8),
                    count(*) FILTER (WHERE state <> 'succeeded')
             FROM jobs",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok((
            row.0.unwrap_or_default(),
            row.1.unwrap_or_default(),
            row.2.unwrap_or_default(),
            row.3,
        ))
    }
}
