//! The live dashboard: the page at `/dashboard` with its vendored charting library, and the
//! admin JSON at `/admin/v1/dashboard` it polls (lane depths, throughput, calls, waits, dead).

use crate::admin::{Admin, DeadView};
use crate::openapi::schemas::{self, ErrorBody};
use crate::{ApiError, ApiState};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sluice_core::Lane;
use std::collections::BTreeMap;
use std::sync::Arc;

/// The page holds no data, so it is served without a key: it reads the admin key from the
/// URL fragment (never sent to the server) and sends it with each poll.
const PAGE: &str = include_str!("../assets/dashboard.html");
/// uPlot 1.6.32 (MIT, Leon Sorokin; see `assets/uplot.LICENSE`), from the npm package's
/// `dist/uPlot.iife.min.js` and `dist/uPlot.min.css`, unchanged.
const UPLOT_JS: &str = include_str!("../assets/uplot.min.js");
const UPLOT_CSS: &str = include_str!("../assets/uplot.min.css");

/// Width of a throughput bucket, in seconds.
const BUCKET_SECS: u32 = 10;
/// Dead-lettered jobs listed.
const DEAD_LISTED: i64 = 20;

pub(crate) fn routes() -> Router<Arc<ApiState>> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/uplot.min.js", get(uplot_js))
        .route("/dashboard/uplot.min.css", get(uplot_css))
        .route("/admin/v1/dashboard", get(data))
}

/// The dashboard page: it holds no data and asks for an admin key in its URL fragment.
#[utoipa::path(get, path = "/dashboard", tag = "ops", responses(
    (status = 200, description = "The dashboard page", body = String, content_type = "text/html"),
))]
pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

/// uPlot, the dashboard's charting library (MIT).
#[utoipa::path(get, path = "/dashboard/uplot.min.js", tag = "ops", responses(
    (status = 200, description = "uPlot 1.6.32", body = String, content_type = "text/javascript"),
))]
pub(crate) async fn uplot_js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        UPLOT_JS,
    )
}

/// uPlot's style sheet.
#[utoipa::path(get, path = "/dashboard/uplot.min.css", tag = "ops", responses(
    (status = 200, description = "uPlot 1.6.32's CSS", body = String, content_type = "text/css"),
))]
pub(crate) async fn uplot_css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        UPLOT_CSS,
    )
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct Window {
    /// The window the figures cover, in minutes.
    #[param(minimum = 1, maximum = 1440, default = 15)]
    #[serde(default = "default_minutes")]
    minutes: u32,
}

fn default_minutes() -> u32 {
    15
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct DashboardView {
    now: DateTime<Utc>,
    since: DateTime<Utc>,
    minutes: u32,
    lanes: Vec<LaneRow>,
    throughput: Throughput,
    endpoints: Vec<EndpointRow>,
    dead: Vec<DeadView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct LaneRow {
    #[schema(value_type = schemas::Lane)]
    lane: Lane,
    /// Jobs queued now, from the API's last read of lane load.
    depth: u64,
    oldest_wait_secs: f64,
    /// Jobs of the lane that started within the window, and their queue wait.
    started: i64,
    p50_wait_secs: f64,
    p95_wait_secs: f64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Throughput {
    bucket_secs: u32,
    /// Jobs finished (in any terminal state) within the window.
    total: i64,
    /// Every bucket of the window, oldest first, empty ones included.
    buckets: Vec<Bucket>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Bucket {
    /// Unix seconds.
    start: i64,
    finished: i64,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct EndpointRow {
    name: String,
    /// The configured requests per minute; `None` for an endpoint no longer configured.
    rpm: Option<u32>,
    calls: i64,
    throttled: i64,
    /// Every minute of the window, oldest first, empty ones included.
    minutes: Vec<Minute>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Minute {
    /// Unix seconds.
    start: i64,
    calls: i64,
    throttled: i64,
}

/// The starts of every `step`-second bucket from the one holding `since` to the one holding
/// `now`, in Unix seconds.
fn bucket_starts(since: DateTime<Utc>, now: DateTime<Utc>, step: i64) -> Vec<i64> {
    let first = since.timestamp().div_euclid(step) * step;
    (first..=now.timestamp())
        .step_by(step.unsigned_abs() as usize)
        .collect()
}

/// What the dashboard shows, over the last `minutes`.
#[utoipa::path(get, path = "/admin/v1/dashboard", tag = "admin",
    security(("admin_key" = [])),
    params(Window),
    responses(
        (status = 200, body = DashboardView),
        (status = 401, description = "`unauthorized`: no key, or not an admin key", body = ErrorBody),
        (status = 422, description = "`invalid_request`: a bad or unknown query parameter", body = ErrorBody),
        (status = 500, description = "`internal`: Sluice's fault; may be retried", body = ErrorBody),
    ))]
pub(crate) async fn data(
    State(state): State<Arc<ApiState>>,
    _: Admin,
    query: Result<Query<Window>, QueryRejection>,
) -> Result<Json<DashboardView>, ApiError> {
    let Query(Window { minutes }) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    if !(1..=1440).contains(&minutes) {
        return Err(ApiError::invalid("minutes must be between 1 and 1440"));
    }
    let now = Utc::now();
    let since = now - Duration::minutes(i64::from(minutes));
    let store = &state.store;
    let (waits, finished, calls, dead) = tokio::try_join!(
        store.queue_wait_by_lane_since(since),
        store.finished_per_bucket(since, BUCKET_SECS),
        store.endpoint_calls_per_minute(since),
        store.dead_jobs(DEAD_LISTED),
    )
    .map_err(ApiError::internal)?;

    let load = state.intake.policy.load();
    let lanes = Lane::CONSUMED
        .iter()
        .map(|&lane| {
            let measured = load.lanes.get(&lane).cloned().unwrap_or_default();
            let wait = waits.iter().find(|w| w.lane == lane.as_str());
            LaneRow {
                lane,
                depth: measured.depth,
                oldest_wait_secs: measured.oldest_wait.as_secs_f64(),
                started: wait.map_or(0, |w| w.jobs),
                p50_wait_secs: wait.map_or(0.0, |w| w.p50),
                p95_wait_secs: wait.map_or(0.0, |w| w.p95),
            }
        })
        .collect();

    let finished_at: BTreeMap<i64, i64> = finished
        .iter()
        .map(|b| (b.start.timestamp(), b.jobs))
        .collect();
    let throughput = Throughput {
        bucket_secs: BUCKET_SECS,
        total: finished.iter().map(|b| b.jobs).sum(),
        buckets: bucket_starts(since, now, i64::from(BUCKET_SECS))
            .into_iter()
            .map(|start| Bucket {
                start,
                finished: finished_at.get(&start).copied().unwrap_or(0),
            })
            .collect(),
    };

    // Every configured endpoint has a row, called or not; one no longer configured keeps its
    // row while its calls are in the window.
    let mut per_endpoint: BTreeMap<String, BTreeMap<i64, (i64, i64)>> = state
        .intake
        .policy
        .endpoints
        .keys()
        .map(|name| (name.clone(), BTreeMap::new()))
        .collect();
    for c in calls {
        per_endpoint
            .entry(c.endpoint)
            .or_default()
            .insert(c.minute.timestamp(), (c.calls, c.throttled));
    }
    let minute_starts = bucket_starts(since, now, 60);
    let endpoints = per_endpoint
        .into_iter()
        .map(|(name, counted)| EndpointRow {
            rpm: state.intake.policy.endpoints.get(&name).copied(),
            calls: counted.values().map(|c| c.0).sum(),
            throttled: counted.values().map(|c| c.1).sum(),
            minutes: minute_starts
                .iter()
                .map(|&start| {
                    let (calls, throttled) = counted.get(&start).copied().unwrap_or((0, 0));
                    Minute {
                        start,
                        calls,
                        throttled,
                    }
                })
                .collect(),
            name,
        })
        .collect();

    Ok(Json(DashboardView {
        now,
        since,
        minutes,
        lanes,
        throughput,
        endpoints,
        dead: dead.into_iter().map(DeadView::from).collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::bucket_starts;
    use chrono::{TimeZone, Utc};

    #[test]
    fn buckets_cover_the_window_from_the_one_holding_its_start() {
        let since = Utc.timestamp_opt(1_000_005, 0).unwrap();
        let now = Utc.timestamp_opt(1_000_031, 0).unwrap();
        assert_eq!(
            bucket_starts(since, now, 10),
            vec![1_000_000, 1_000_010, 1_000_020, 1_000_030]
        );
        // 1_000_020 is a whole minute: the window ends in a second one.
        assert_eq!(bucket_starts(since, now, 60), vec![999_960, 1_000_020]);
    }
}
