//! Fairness end to end: with the three tier lanes backlogged and the provider's RPM as the
//! bottleneck, completions per lane follow the 10:5:1 weights.

use crate::helpers::{spawn_app, AppOptions};
use sluice_core::{JobState, Tier};
use sluice_sim::SimConfig;
use std::time::Duration;

#[tokio::test]
async fn backlogged_lanes_complete_in_proportion_to_their_weights() {
    const RPM: u32 = 3_600; // 60 calls per second: the bottleneck
    let mut app = spawn_app(AppOptions {
        workers: 0,
        sim: SimConfig {
            default_rpm: RPM * 2,
            ..SimConfig::default()
        },
        rpm: RPM,
        burst: Some(1),
        concurrency: 16,
        ..Default::default()
    })
    .await;
    let lanes = [
        (Tier::Enterprise, "priority", 420),
        (Tier::Basic, "standard", 240),
        (Tier::Free, "batch", 120),
    ];
    for (tier, _, n) in lanes {
        let key = app.key(&format!("t-{tier}"), tier).await;
        for i in 0..n {
            app.submit(&key, &format!("{tier} {i}")).await;
        }
    }
    app.start_worker().await;
    const SKIP: i64 = 40; // start-up: lanes fill the worker's buffers at different moments
    const WINDOW: i64 = 480;
    app.wait_for("enough completions", Duration::from_secs(60), || async {
        app.count(JobState::Succeeded).await >= SKIP + WINDOW
    })
    .await;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT lane, count(*) FROM (
             SELECT lane FROM jobs WHERE state = 'succeeded'
             ORDER BY finished_at OFFSET $1 LIMIT $2
         ) w GROUP BY lane",
    )
    .bind(SKIP)
    .bind(WINDOW)
    .fetch_all(
        app.store
            .pg_pool()
            .expect("the e2e stack runs on PostgreSQL"),
    )
    .await
    .unwrap();
    let count = |lane: &str| rows.iter().find(|r| r.0 == lane).map_or(0, |r| r.1) as f64;
    for (lane, weight) in [("priority", 10.0), ("standard", 5.0), ("batch", 1.0)] {
        let expected = WINDOW as f64 * weight / 16.0;
        let got = count(lane);
        assert!(
            (got - expected).abs() <= expected * 0.10,
            "{lane}: {got} completions, expected {expected} within 10%; all: {rows:?}"
        );
    }
    assert_eq!(
        app.sim.stats().rate_limited,
        0,
        "Sluice stayed under the provider's limit"
    );
    app.cleanup().await;
}
