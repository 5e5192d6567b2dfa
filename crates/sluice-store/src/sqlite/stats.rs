//! SQLite's aggregates for benchmarks, operators and the dashboard, mirroring `postgres::stats`.
//! SQLite has no `percentile_cont`, so the timestamps are read and the percentiles computed here.

use super::SqliteBackend;
use crate::sql::{opt, Ts};
use crate::stats::{EndpointMinute, FinishedBucket, LaneWait, LatencySummary};
use crate::StoreError;
use chrono::{DateTime, Utc};
use std::collections::BTreeMap;

/// PostgreSQL's `percentile_cont`: linear interpolation between the two nearest ranks.
fn percentile_cont(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = p.clamp(0.0, 1.0) * last as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let (a, b) = (sorted.get(lo)?, sorted.get(hi)?);
    Some(a + (b - a) * (rank - lo as f64))
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6
}

impl SqliteBackend {
    pub(crate) async fn latency_summary(&self) -> Result<LatencySummary, StoreError> {
        let rows: Vec<(Ts, Option<Ts>, String)> =
            sqlx::query_as("SELECT created_at, finished_at, state FROM jobs")
                .fetch_all(&self.read)
                .await?;
        let mut first_created: Option<DateTime<Utc>> = None;
        let mut last_finished: Option<DateTime<Utc>> = None;
        let mut latencies = Vec::with_capacity(rows.len());
        let mut not_succeeded = 0;
        for (created, finished, state) in rows {
            let created = created.0;
            first_created = Some(first_created.map_or(created, |t| t.min(created)));
            if let Some(finished) = opt(finished) {
                last_finished = Some(last_finished.map_or(finished, |t| t.max(finished)));
                latencies.push(seconds(created, finished));
            }
            if state != "succeeded" {
                not_succeeded += 1;
            }
        }
        latencies.sort_by(f64::total_cmp);
        let span = match (first_created, last_finished) {
            (Some(a), Some(b)) => seconds(a, b),
            _ => 0.0,
        };
        Ok(LatencySummary {
            span,
            p50: percentile_cont(&latencies, 0.5).unwrap_or_default(),
            p95: percentile_cont(&latencies, 0.95).unwrap_or_default(),
            p99: percentile_cont(&latencies, 0.99).unwrap_or_default(),
            not_succeeded,
        })
    }

    pub(crate) async fn queue_wait_by_lane(
        &self,
        since: Option<DateTime<Utc>>,
    ) -> Result<Vec<LaneWait>, StoreError> {
        let rows: Vec<(String, Ts, Ts)> = sqlx::query_as(
            "SELECT lane, created_at, started_at FROM jobs
             WHERE started_at IS NOT NULL AND ($1 IS NULL OR started_at >= $1)",
        )
        .bind(since.map(Ts))
        .fetch_all(&self.read)
        .await?;
        let mut by_lane: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (lane, created, started) in rows {
            let wait = seconds(created.0, started.0);
            by_lane.entry(lane).or_default().push(wait);
        }
        Ok(by_lane
            .into_iter()
            .map(|(lane, mut waits)| {
                waits.sort_by(f64::total_cmp);
                LaneWait {
                    lane,
                    jobs: i64::try_from(waits.len()).unwrap_or(i64::MAX),
                    p50: percentile_cont(&waits, 0.5).unwrap_or_default(),
                    p95: percentile_cont(&waits, 0.95).unwrap_or_default(),
                }
            })
            .collect())
    }

    pub(crate) async fn finished_in_window(&self, from: f64, to: f64) -> Result<i64, StoreError> {
        let (t0,): (Option<Ts>,) = sqlx::query_as("SELECT min(started_at) FROM jobs")
            .fetch_one(&self.read)
            .await?;
        let Some(Ts(t0)) = t0 else {
            return Ok(0);
        };
        let offset = |s: f64| Ts(t0 + chrono::Duration::microseconds((s * 1e6) as i64));
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM jobs WHERE finished_at >= $1 AND finished_at < $2",
        )
        .bind(offset(from))
        .bind(offset(to))
        .fetch_one(&self.read)
        .await?;
        Ok(n)
    }

    pub(crate) async fn run_span(&self) -> Result<f64, StoreError> {
        // Fixed-width timestamps: the text minimum and maximum are the earliest and latest.
        let (first, last): (Option<Ts>, Option<Ts>) =
            sqlx::query_as("SELECT min(started_at), max(finished_at) FROM jobs")
                .fetch_one(&self.read)
                .await?;
        Ok(match (opt(first), opt(last)) {
            (Some(a), Some(b)) => seconds(a, b),
            _ => 0.0,
        })
    }
}

/// The start of the `secs`-long bucket holding `t`, counted from the Unix epoch.
fn bucket_start(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    let secs = secs.max(1);
    DateTime::from_timestamp(t.timestamp().div_euclid(secs) * secs, 0).unwrap_or(t)
}

impl SqliteBackend {
    pub(crate) async fn finished_per_bucket(
        &self,
        since: DateTime<Utc>,
        bucket_secs: u32,
    ) -> Result<Vec<FinishedBucket>, StoreError> {
        let rows: Vec<(Ts,)> =
            sqlx::query_as("SELECT finished_at FROM jobs WHERE finished_at >= $1")
                .bind(Ts(since))
                .fetch_all(&self.read)
                .await?;
        let mut buckets: BTreeMap<DateTime<Utc>, i64> = BTreeMap::new();
        for (finished,) in rows {
            let start = bucket_start(finished.0, i64::from(bucket_secs));
            *buckets.entry(start).or_default() += 1;
        }
        Ok(buckets
            .into_iter()
            .map(|(start, jobs)| FinishedBucket { start, jobs })
            .collect())
    }

    /// The same call events as PostgreSQL's `CALL_EVENTS`, picked out here from the JSON.
    pub(crate) async fn endpoint_calls_per_minute(
        &self,
        since: DateTime<Utc>,
    ) -> Result<Vec<EndpointMinute>, StoreError> {
        type CallRow = (String, Ts, Option<serde_json::Value>, Option<String>);
        let rows: Vec<CallRow> = sqlx::query_as(
            "SELECT e.state, e.at, e.detail, j.endpoint FROM job_events e JOIN jobs j ON j.id = e.job_id
             WHERE e.at >= $1 AND e.state IN ('succeeded', 'retrying', 'dead')",
        )
        .bind(Ts(since))
        .fetch_all(&self.read)
        .await?;
        let mut minutes: BTreeMap<(String, DateTime<Utc>), (i64, i64)> = BTreeMap::new();
        for (state, at, detail, job_endpoint) in rows {
            let (endpoint, throttled) = match (state.as_str(), &detail) {
                ("succeeded", None) => (job_endpoint, false),
                (_, Some(d)) if state != "succeeded" && d.get("throttled").is_some() => {
                    let endpoint = match d.get("endpoint") {
                        Some(e) => e.as_str().map(str::to_owned),
                        None => job_endpoint,
                    };
                    (endpoint, d["throttled"].as_bool().unwrap_or(false))
                }
                _ => continue,
            };
            let Some(endpoint) = endpoint else { continue };
            let minute = bucket_start(at.0, 60);
            let counts = minutes.entry((endpoint, minute)).or_default();
            counts.0 += 1;
            counts.1 += i64::from(throttled);
        }
        Ok(minutes
            .into_iter()
            .map(|((endpoint, minute), (calls, throttled))| EndpointMinute {
                endpoint,
                minute,
                calls,
                throttled,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::percentile_cont;

    #[test]
    fn percentiles_interpolate_like_postgres() {
        assert_eq!(percentile_cont(&[], 0.5), None);
        assert_eq!(percentile_cont(&[3.0], 0.99), Some(3.0));
        assert_eq!(percentile_cont(&[1.0, 2.0, 3.0, 4.0], 0.5), Some(2.5));
        assert_eq!(percentile_cont(&[0.0, 10.0], 0.95), Some(9.5));
    }
}
