//! The metrics a worker records, names and labels in one place (alert rules depend on them).
//! Recorded through the `metrics` facade; the binary installs the recorder that renders them.

use chrono::{DateTime, Utc};
use sluice_core::{BreakerState, Lane};
use sluice_providers::Router;
use std::time::Duration;

/// `sluice_jobs_total{event, lane}`: `completed` (result stored), `failed` (an attempt failed
/// and the job waits in `retry`; not terminal), `dead` (dead-lettered). The worker knows the
/// job's lane, not the tier that chose it, so the label is `lane`, unlike the API's `tier`.
pub(crate) fn job(event: &'static str, lane: Lane) {
    metrics::counter!("sluice_jobs_total", "event" => event, "lane" => lane.as_str()).increment(1);
}

/// `sluice_jobs_republished_total{lane}`: jobs the reconciler published again because they
/// waited with no message in their lane.
pub(crate) fn republished(lane: Lane, jobs: usize) {
    metrics::counter!("sluice_jobs_republished_total", "lane" => lane.as_str())
        .increment(u64::try_from(jobs).unwrap_or(u64::MAX));
}

/// `sluice_queue_wait_seconds{lane}`: acceptance to the first start.
pub(crate) fn queue_wait(lane: Lane, created_at: DateTime<Utc>) {
    metrics::histogram!("sluice_queue_wait_seconds", "lane" => lane.as_str())
        .record(since(created_at));
}

/// `sluice_job_duration_seconds{lane}`: acceptance to the stored result.
pub(crate) fn job_duration(lane: Lane, created_at: DateTime<Utc>) {
    metrics::histogram!("sluice_job_duration_seconds", "lane" => lane.as_str())
        .record(since(created_at));
}

fn since(at: DateTime<Utc>) -> f64 {
    // A clock behind the database's reads as no wait rather than a negative one.
    (Utc::now() - at).to_std().unwrap_or_default().as_secs_f64()
}

/// `sluice_provider_calls_total{endpoint, outcome=ok|rate_limited|error}` and
/// `sluice_provider_latency_seconds{endpoint}`.
pub(crate) fn provider_call(endpoint: &str, outcome: &'static str, latency: Duration) {
    let endpoint = endpoint.to_owned();
    metrics::counter!("sluice_provider_calls_total", "endpoint" => endpoint.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!("sluice_provider_latency_seconds", "endpoint" => endpoint)
        .record(latency.as_secs_f64());
}

/// `sluice_tokens_total{endpoint, kind=prompt|completion}` and, when the endpoint has a
/// price, `sluice_cost_usd_total{endpoint}`.
pub(crate) fn usage(endpoint: &str, prompt: u32, completion: u32, cost_usd: Option<f64>) {
    let endpoint = endpoint.to_owned();
    metrics::counter!("sluice_tokens_total", "endpoint" => endpoint.clone(), "kind" => "prompt")
        .increment(u64::from(prompt));
    metrics::counter!("sluice_tokens_total", "endpoint" => endpoint.clone(), "kind" => "completion")
        .increment(u64::from(completion));
    if let Some(cost) = cost_usd {
        // Prometheus counters are floats; the facade's are integers, so this is a gauge
        // that only grows (rendered as `gauge`, used with `rate()` all the same).
        metrics::gauge!("sluice_cost_usd_total", "endpoint" => endpoint).increment(cost);
    }
}

/// `sluice_endpoint_limit_utilization{endpoint}` (this worker's requests in the last minute
/// over the configured rpm; summed over workers, the endpoint's) and
/// `sluice_breaker_state{endpoint}` (0 closed, 1 half-open, 2 open), for every endpoint.
pub(crate) fn endpoints(router: &Router) {
    for pool in router.pools() {
        for e in pool.endpoint_stats() {
            let utilization = f64::from(e.used_last_minute) / f64::from(e.rpm.max(1));
            let breaker = match e.breaker {
                BreakerState::Closed => 0.0,
                BreakerState::HalfOpen => 1.0,
                BreakerState::Open => 2.0,
            };
            metrics::gauge!("sluice_endpoint_limit_utilization", "endpoint" => e.name.clone())
                .set(utilization);
            metrics::gauge!("sluice_breaker_state", "endpoint" => e.name).set(breaker);
        }
    }
}
