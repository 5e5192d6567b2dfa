//! The process's Prometheus recorder: installed once, rendered at `GET /metrics` by the API
//! and, with `[worker] metrics_listen`, by a worker's own small HTTP server.

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Buckets for every `*_seconds` histogram: provider calls take tens of milliseconds to a
/// minute, queue waits up to the ten minutes past which a tier's target is long broken.
const SECONDS_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Buckets for the store's batched statements (`sluice_store_batch_*`): a statement takes a
/// fraction of a millisecond on an idle database and tens under load.
const STATEMENT_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Buckets for the items per batch: one at light load, up to a writer's 256.
const ITEMS_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// How often histogram samples are folded in, so they do not pile up between scrapes.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use (`dev` runs the API and a worker in one
/// process, and both ask).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    if let Some(handle) = HANDLE.get() {
        return Ok(handle.clone());
    }
    // A name's most specific matcher wins: `Full`, then `Prefix`, then `Suffix`.
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("invalid histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Prefix("sluice_store_batch_".into()),
            STATEMENT_BUCKETS,
        )
        .context("invalid histogram buckets")?
        .set_buckets_for_metric(
            Matcher::Full(sluice_store::BATCH_ITEMS.into()),
            ITEMS_BUCKETS,
        )
        .context("invalid histogram buckets")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    let handle = HANDLE.get_or_init(|| handle).clone();
    let upkeep = handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// The render function the API serves at `/metrics`.
pub fn render(handle: PrometheusHandle) -> sluice_api::RenderMetrics {
    Arc::new(move || handle.render())
}

/// Serve `GET /metrics` on `addr` until `shutdown`; prints and returns the bound address (the
/// port may be 0) so tests and operators can find it.
pub async fn serve_worker(
    addr: SocketAddr,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))?;
    let bound = listener.local_addr()?;
    println!("sluice worker metrics on http://{bound}");
    tracing::info!(message = "worker metrics listening", addr = %bound);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { prometheus_text(handle.render()) }
        }),
    );
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
        {
            tracing::error!(message = "the worker metrics server failed", %error);
        }
    });
    Ok(bound)
}

fn prometheus_text(body: String) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            sluice_api::PROMETHEUS_CONTENT_TYPE,
        )],
        body,
    )
}
