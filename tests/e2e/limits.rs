//! The rate-limit engine end to end: breakers steer traffic away from a failing endpoint and
//! back, a dead primary pool falls back, a provider's retry-after is honoured, and workers
//! sharing Redis stay under a key's limit together.

use crate::helpers::{spawn_app, spawn_sim, AppOptions};
use sluice_core::{JobState, RequestId, Tier};
use sluice_providers::testing::PrivateRedis;
use sluice_sim::{Faults, SimConfig};
use std::time::{Duration, Instant};

/// A second simulator that answers 503 to everything until healed.
async fn broken_sim() -> sluice_sim::SimHandle {
    spawn_sim(Faults {
        always_fail: Some(503),
        ..Faults::default()
    })
    .await
}

fn endpoint_toml(name: &str, url: &str) -> String {
    format!(
        "[[pools.endpoints]]\nname = \"{name}\"\nbase_url = \"{url}\"\nmodel = \"sim-model\"\n\
         api_key = \"sk-sim-test\"\nrpm = 60000\nburst = 100\n"
    )
}

#[tokio::test]
async fn a_failing_endpoint_opens_its_breaker_and_closes_after_it_heals() {
    let broken = broken_sim().await;
    let healthy = spawn_sim(Faults::default()).await;
    let extra = format!(
        "[[pools]]\nname = \"duo\"\n{}{}\n[limits.breaker]\nfailure_threshold = 5\nopen_secs = 1.0\n",
        endpoint_toml("bad", &broken.base_url()),
        endpoint_toml("good", &healthy.base_url()),
    );
    let app = spawn_app(AppOptions {
        default_route: "\"duo\"",
        extra_toml: extra,
        retry_base_secs: 0.2,
        concurrency: 1,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut ids = Vec::new();
    for n in 0..30 {
        ids.push(app.submit(&key, &format!("job {n}")).await);
    }
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    let before_heal = broken.stats().total;
    // Five failures open the breaker; afterwards at most a probe a second gets through.
    assert!(
        (5..=10).contains(&before_heal),
        "the broken endpoint saw {before_heal} calls"
    );

    broken.set_faults(Faults::default());
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let mut more = Vec::new();
    for n in 0..30 {
        more.push(app.submit(&key, &format!("after heal {n}")).await);
    }
    app.wait_terminal(&more, Duration::from_secs(60)).await;
    assert!(
        broken.stats().ok > 0,
        "the healed endpoint serves again: {:?}",
        broken.stats()
    );
    app.cleanup().await;
    broken.shutdown();
    healthy.shutdown();
}

#[tokio::test]
async fn with_the_primary_pool_down_jobs_are_served_by_the_fallback_and_record_it() {
    let broken = broken_sim().await;
    let app = spawn_app(AppOptions {
        default_route: "[\"primary\", \"sim\"]",
        extra_toml: format!(
            "[[pools]]\nname = \"primary\"\n{}",
            endpoint_toml("primary-1", &broken.base_url())
        ),
        retry_base_secs: 0.2,
        max_attempts: 10,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(app.submit(&key, &format!("job {n}")).await);
    }
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        let job = app.store.job(*id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(
            job.endpoint.as_deref(),
            Some("sim-1"),
            "served by the fallback"
        );
    }
    // Five failures open the breaker; calls already under way when it opened still land,
    // but nothing is sent after (the breaker stays open for 60 s by default).
    let calls = broken.stats().total;
    assert!(
        (5..=5 + 16).contains(&calls),
        "the broken primary saw {calls} calls"
    );
    app.cleanup().await;
    broken.shutdown();
}

#[tokio::test]
async fn a_key_answering_429_with_retry_after_5_gets_no_call_for_5_seconds() {
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            default_rpm: 0,
            faults: Faults {
                rate_limit_retry_after_secs: Some(5),
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        retry_base_secs: 0.2,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let first = app.submit(&key, "told to wait").await;
    app.wait_for("the 429", Duration::from_secs(10), || async {
        app.sim.stats().rate_limited >= 1
    })
    .await;
    let told = Instant::now();
    app.sim.set_faults(Faults::default());
    let mut ids = vec![first];
    for n in 0..5 {
        ids.push(app.submit(&key, &format!("behind it {n}")).await);
    }
    // Well inside the 5 s, the key has seen nothing more.
    tokio::time::sleep(Duration::from_millis(4_000).saturating_sub(told.elapsed())).await;
    assert_eq!(app.sim.stats().total, 1, "{:?}", app.sim.stats());
    app.wait_terminal(&ids, Duration::from_secs(30)).await;
    for id in &ids {
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    app.cleanup().await;
}

#[tokio::test]
async fn two_workers_sharing_redis_stay_under_the_keys_limit_together() {
    // The simulator enforces 600 rpm with one second of burst and punishes hammering;
    // each worker alone would be allowed the full 600.
    let app = spawn_app(AppOptions {
        workers: 2,
        sim: SimConfig {
            default_rpm: 600,
            burst_seconds: 1.0,
            ..SimConfig::default()
        },
        rpm: 570,
        burst: Some(1),
        redis: true,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut ids: Vec<RequestId> = Vec::new();
    for n in 0..120 {
        ids.push(app.submit(&key, &format!("shared {n}")).await);
    }
    let started = Instant::now();
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    let stats = app.sim.stats();
    assert_eq!(stats.rate_limited, 0, "{stats:?}");
    assert_eq!(stats.ok, 120);
    // In any 5 s the key saw at most its rate plus its one second of burst (and one 100 ms
    // step of the simulator's timeline).
    let busiest = app.sim.busiest_window(Duration::from_secs(5));
    let calls = busiest.values().copied().max().unwrap_or(0);
    assert!(
        calls <= 10 * 5 + 10 + 1,
        "{calls} calls in one 5 s window: {busiest:?}"
    );
    // 120 calls at 9.5 a second together cannot take much less than 12 s.
    assert!(
        started.elapsed() >= Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    app.cleanup().await;
}

#[tokio::test]
async fn redis_killed_mid_run_loses_no_job_and_keeps_under_the_limit() {
    let mut redis = PrivateRedis::start().await;
    let app = spawn_app(AppOptions {
        workers: 2,
        sim: SimConfig {
            default_rpm: 1_200,
            burst_seconds: 1.0,
            ..SimConfig::default()
        },
        rpm: 1_140,
        burst: Some(1),
        redis: true,
        redis_url: Some(redis.url()),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut ids: Vec<RequestId> = Vec::new();
    for n in 0..360 {
        ids.push(app.submit(&key, &format!("outage {n}")).await);
    }
    app.wait_for("some progress", Duration::from_secs(30), || async {
        app.count(JobState::Succeeded).await >= 40
    })
    .await;
    redis.stop().await;
    let at_kill = app.count(JobState::Succeeded).await;
    // Workers now run on their local share of the limit (rpm / live workers), ~19 jobs/s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during = app.count(JobState::Succeeded).await;
    redis.restart().await;
    // Back in shared mode the workers write the endpoint's limiter state to Redis again
    // (the restarted Redis starts empty, so the key can only come from them)...
    let gcra_key = format!("{}:gcra:sim-1", app.prefix);
    app.wait_for(
        "the shared limiter state in Redis",
        Duration::from_secs(10),
        || async { redis.keys(&gcra_key).await.contains(&gcra_key) },
    )
    .await;
    // ...and serve at the full shared rate: 19 jobs/s together, measured over 4 s.
    let before = app.count(JobState::Succeeded).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let after = app.count(JobState::Succeeded).await;
    assert!(
        after - before >= 60,
        "after Redis returned: {before} -> {after} in 4 s"
    );
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    assert!(
        during >= at_kill + 20,
        "workers kept serving while Redis was down: {at_kill} -> {during}"
    );
    let stats = app.sim.stats();
    assert!(
        stats.rate_limited <= 5 && stats.blocks == 0,
        "no 429 storm while Redis was down or after: {stats:?}"
    );
    app.cleanup().await;
    redis.stop().await;
}

#[tokio::test]
async fn jobs_turned_away_with_429_go_before_fresh_work_once_the_pool_has_room() {
    // Three keys: each turns one job away (then its endpoint waits out the retry-after), so
    // three jobs come back through the retry lane.
    let provider = spawn_sim(Faults {
        rate_limit_retry_after_secs: Some(1),
        ..Faults::default()
    })
    .await;
    let mut trio = "[[pools]]\nname = \"trio\"\n".to_owned();
    for k in ["a", "b", "c"] {
        trio.push_str(&format!(
            "[[pools.endpoints]]\nname = \"trio-{k}\"\nbase_url = \"{}\"\nmodel = \"m\"\n\
             api_key = \"sk-{k}\"\nrpm = 60\nburst = 0\n",
            provider.base_url()
        ));
    }
    // The retry lane weighs 1 against priority's 10: by weight alone its jobs would go last.
    trio.push_str("\n[worker.weights]\npriority = 10\nstandard = 5\nbatch = 1\nretry = 1\n");
    let app = spawn_app(AppOptions {
        default_route: "\"trio\"",
        extra_toml: trio,
        retry_base_secs: 0.2,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut turned_away = Vec::new();
    for n in 0..3 {
        turned_away.push(app.submit(&key, &format!("turned away {n}")).await);
    }
    app.wait_for("three 429s", Duration::from_secs(10), || async {
        provider.stats().rate_limited >= 3
    })
    .await;
    provider.set_faults(Faults::default());
    let mut fresh = Vec::new();
    for n in 0..9 {
        fresh.push(app.submit(&key, &format!("fresh {n}")).await);
    }
    let all: Vec<RequestId> = fresh.iter().chain(&turned_away).copied().collect();
    app.wait_terminal(&all, Duration::from_secs(60)).await;
    let finished = |id: RequestId| {
        let store = app.store.clone();
        async move { store.job(id).await.unwrap().unwrap().finished_at.unwrap() }
    };
    let mut last_turned_away = None;
    for id in &turned_away {
        let at = finished(*id).await;
        last_turned_away =
            Some(last_turned_away.map_or(at, |l: chrono::DateTime<chrono::Utc>| l.max(at)));
    }
    let last_turned_away = last_turned_away.unwrap();
    let mut later = 0;
    for id in &fresh {
        if finished(*id).await > last_turned_away {
            later += 1;
        }
    }
    assert!(
        later >= 5,
        "only {later} of 9 fresh jobs finished after the 429'd ones"
    );
    app.cleanup().await;
    provider.shutdown();
}

#[tokio::test]
async fn rate_limited_calls_do_not_use_up_a_jobs_attempts() {
    // Two attempts only; the key throttles the job three times before it heals.
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            faults: Faults {
                rate_limit_retry_after_secs: Some(1),
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        retry_base_secs: 0.2,
        max_attempts: 2,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "throttled").await;
    app.wait_for("three 429s", Duration::from_secs(20), || async {
        app.sim.stats().rate_limited >= 3
    })
    .await;
    let state = app.state(id).await;
    assert!(
        !state.is_terminal(),
        "still retrying after three 429s: {state:?}"
    );
    app.sim.set_faults(Faults::default());
    app.wait_terminal(&[id], Duration::from_secs(20)).await;
    assert_eq!(app.state(id).await, JobState::Succeeded);
    let events = app.store.events(id).await.unwrap();
    let throttled = events
        .iter()
        .filter(|e| e.state == JobState::Retrying)
        .count();
    assert!(throttled >= 3, "{events:?}");
    app.cleanup().await;
}
