//! PostgreSQL's aggregates for benchmarks, operators and the dashboard (types and the public
//! API in `crate::stats`): percentiles and buckets computed in SQL.

use crate::postgres::PgBackend;
use crate::stats::{EndpointMinute, FinishedBucket, LaneWait, LatencySummary};
use crate::StoreError;
use chrono::{DateTime, Utc};

impl PgBackend {
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

    /// p50 and p95 queue wait per lane over jobs that started (since `since`, when given).
    pub(crate) async fn queue_wait_by_lane(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<LaneWait>, StoreError> {
        let rows: Vec<(String, i64, Option<f64>, Option<f64>)> = sqlx::query_as(
            "SELECT lane, count(*),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM started_at - created_at)::float8)
             FROM jobs WHERE started_at IS NOT NULL AND ($1::timestamptz IS NULL OR started_at >= $1)
             GROUP BY lane ORDER BY lane",
        )
        .bind(since)
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

/// Which job events stand for one provider call, and the endpoint that took it. A succeeded
/// event without detail is a worker's completion (cached and attached answers carry detail);
/// a failure event with `throttled` is a worker's failed call (the reaper's carry only an
/// error). Failures name their endpoint since the dashboard came; older ones fall back to the
/// job's last endpoint.
const CALL_EVENTS: &str = "
    SELECT CASE WHEN e.detail ? 'endpoint' THEN e.detail->>'endpoint' ELSE j.endpoint END AS endpoint,
           e.at, COALESCE((e.detail->>'throttled')::boolean, false) AS throttled
    FROM job_events e JOIN jobs j ON j.id = e.job_id
    WHERE e.at >= $1
      AND ((e.state = 'succeeded' AND e.detail IS NULL)
           OR (e.state IN ('retrying', 'dead') AND e.detail ? 'throttled'))";

impl PgBackend {
    /// Jobs finished since `since`, counted per `bucket_secs` bucket (empty buckets left out).
    pub(crate) async fn finished_per_bucket(
        &self,
        since: DateTime<Utc>,
        bucket_secs: u32,
    ) -> Result<Vec<FinishedBucket>, StoreError> {
        let rows: Vec<(DateTime<Utc>, i64)> = sqlx::query_as(
            "SELECT to_timestamp(floor(extract(epoch FROM finished_at) / $2) * $2), count(*)
             FROM jobs WHERE finished_at >= $1 GROUP BY 1 ORDER BY 1",
        )
        .bind(since)
        .bind(f64::from(bucket_secs.max(1)))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(start, jobs)| FinishedBucket { start, jobs })
            .collect())
    }

    /// Provider calls per endpoint and minute since `since`, from the job events.
    pub(crate) async fn endpoint_calls_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<EndpointMinute>, StoreError> {
        let rows: Vec<(String, DateTime<Utc>, i64, i64)> = sqlx::query_as(&format!(
            "SELECT endpoint, date_trunc('minute', at), count(*), count(*) FILTER (WHERE throttled)
             FROM ({CALL_EVENTS}) c WHERE endpoint IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2"
        ))
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(endpoint, minute, calls, throttled)| EndpointMinute {
                endpoint,
                minute,
                calls,
                throttled,
            })
            .collect())
    }
}
