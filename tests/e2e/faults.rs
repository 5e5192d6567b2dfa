//! Faults: a worker killed with `kill -9` or stopped with SIGTERM mid-run, a job stranded in
//! the outbox by a dead API, and RabbitMQ dropping connections. No accepted job may be lost.

use crate::helpers::{spawn_app, AppOptions, TestApp};
use crate::metrics::Scrape;
use sluice_core::{JobState, Lane, RequestId, Tier};
use sluice_sim::{Latency, SimConfig};
use std::collections::HashMap;
use std::time::Duration;

async fn submit_many(app: &TestApp, n: usize) -> Vec<RequestId> {
    let mut keys = Vec::new();
    for tier in Tier::ALL {
        keys.push(app.key(&format!("t-{tier}"), tier).await);
    }
    let mut ids = Vec::with_capacity(n);
    let mut pending = Vec::new();
    // Distinct texts across calls: identical ones would share an answer.
    let salt = uuid::Uuid::now_v7();
    for i in 0..n {
        let (app_http, url, key) = (
            app.http.clone(),
            format!("{}/v1/jobs", app.api),
            keys[i % 4].clone(),
        );
        pending.push(tokio::spawn(async move {
            let response = app_http
                .post(url)
                .bearer_auth(key)
                .json(&crate::helpers::job_body(&format!("job {i} {salt}")))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
            let body: serde_json::Value = response.json().await.unwrap();
            body["request_id"]
                .as_str()
                .unwrap()
                .parse::<RequestId>()
                .unwrap()
        }));
        if pending.len() == 50 {
            for p in pending.drain(..) {
                ids.push(p.await.unwrap());
            }
        }
    }
    for p in pending {
        ids.push(p.await.unwrap());
    }
    ids
}

/// Two workers and a provider with a little latency, so jobs are in flight when a fault hits.
async fn busy_app() -> TestApp {
    spawn_app(AppOptions {
        workers: 2,
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Uniform {
                min_ms: 5,
                max_ms: 30,
            },
            ..SimConfig::default()
        },
        concurrency: 8,
        ..Default::default()
    })
    .await
}

/// Every job reached exactly one terminal state, and its log has exactly one terminal event.
async fn assert_one_outcome_each(app: &TestApp, ids: &[RequestId]) {
    for id in ids {
        let events = app.store.events(*id).await.unwrap();
        let terminal: Vec<JobState> = events
            .iter()
            .map(|e| e.state)
            .filter(|s| s.is_terminal())
            .collect();
        assert_eq!(terminal.len(), 1, "job {id}: {events:?}");
        assert_eq!(terminal[0], app.state(*id).await);
    }
}

#[tokio::test]
async fn kill_9_of_a_worker_mid_run_loses_no_job() {
    let mut app = spawn_app(AppOptions {
        processes: true,
        workers: 2,
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Uniform {
                min_ms: 5,
                max_ms: 40,
            },
            ..SimConfig::default()
        },
        lease_secs: 3.0,
        concurrency: 8,
        ..Default::default()
    })
    .await;
    let ids = submit_many(&app, 500).await;
    // The worker to kill must be working (on a busy machine one may start late and find the
    // other has taken every message), or the kill interrupts nothing.
    let calls_of_first = || async {
        Scrape::of(&app, &app.worker_metrics[0])
            .await
            .sum("sluice_provider_calls_total", &[])
    };
    app.wait_for("some progress", Duration::from_secs(60), || async {
        app.count(JobState::Succeeded).await >= 100 && calls_of_first().await > 0.0
    })
    .await;
    app.kill_worker(0).await;
    let running_at_kill = app.count(JobState::Running).await;
    app.start_worker().await;
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    assert_one_outcome_each(&app, &ids).await;
    assert_eq!(
        app.count(JobState::Succeeded).await,
        500,
        "running at kill: {running_at_kill}"
    );
    assert_eq!(
        app.count(JobState::Running).await,
        0,
        "no job stuck running"
    );
    // The killed worker held claims: their leases expired and the reaper handed them on.
    let (reaped,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM job_events WHERE detail->>'error' LIKE 'lease expired%'",
    )
    .fetch_one(
        app.store
            .pg_pool()
            .expect("the e2e stack runs on PostgreSQL"),
    )
    .await
    .unwrap();
    assert!(
        reaped > 0,
        "the kill interrupted no claimed job; the test proved nothing"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn sigterm_lets_a_worker_finish_and_exit_cleanly() {
    let mut app = spawn_app(AppOptions {
        processes: true,
        workers: 1,
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Fixed { ms: 300 },
            ..SimConfig::default()
        },
        concurrency: 8,
        ..Default::default()
    })
    .await;
    let ids = submit_many(&app, 40).await;
    app.wait_for("jobs in flight", Duration::from_secs(30), || async {
        app.count(JobState::Running).await > 0
    })
    .await;
    let status = app.terminate_worker(0).await;
    assert!(status.success(), "worker exit status {status:?}");
    // Everything it had claimed was finished before it exited: nothing waits for a lease.
    assert_eq!(app.count(JobState::Running).await, 0);
    app.start_worker().await;
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    assert_eq!(app.count(JobState::Succeeded).await, 40);
    assert_one_outcome_each(&app, &ids).await;
    app.cleanup().await;
}

#[tokio::test]
async fn a_job_stranded_in_the_outbox_is_relayed_and_completes() {
    let app = spawn_app(AppOptions::default()).await;
    // What an API killed between commit and publish leaves behind: a job and its outbox row.
    let principal = sluice_core::Principal {
        tenant: "acme".into(),
        user: "u".into(),
        tier: Tier::Pro,
        email: None,
        reuse_samples: false,
    };
    let request =
        sluice_core::JobRequest::new("default", vec![sluice_core::Message::user("stranded")]);
    let job = sluice_store::NewJob::new(principal, Lane::Priority, request);
    app.store
        .insert_jobs(std::slice::from_ref(&job))
        .await
        .unwrap();
    app.wait_terminal(&[job.id], Duration::from_secs(30)).await;
    assert_eq!(app.state(job.id).await, JobState::Succeeded);
    app.wait_for("the outbox to drain", Duration::from_secs(10), || async {
        app.store.outbox_len().await.unwrap() == 0
    })
    .await;
    app.cleanup().await;
}

/// Close every RabbitMQ connection of this app (api and workers) from the server side.
async fn close_rabbit_connections(prefix: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--no-table-headers",
            "-q",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in listing
        .lines()
        .filter(|l| l.contains(&format!("sluice:{prefix}")))
    {
        let pid = line.split_whitespace().next().unwrap();
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "sluice e2e fault test"])
            .status()
            .await
            .unwrap();
        if status.success() {
            closed += 1;
        }
    }
    closed
}

#[tokio::test]
async fn rabbitmq_dropping_every_connection_mid_run_loses_no_job() {
    let app = busy_app().await;
    let first = submit_many(&app, 150).await;
    app.wait_for("some progress", Duration::from_secs(60), || async {
        app.count(JobState::Succeeded).await >= 30
    })
    .await;
    let closed = close_rabbit_connections(&app.prefix).await;
    assert!(
        closed >= 3,
        "closed {closed} connections (api + 2 workers expected)"
    );
    let second = submit_many(&app, 150).await;
    let ids: Vec<RequestId> = first.into_iter().chain(second).collect();
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    let mut by_state: HashMap<JobState, usize> = HashMap::new();
    for id in &ids {
        *by_state.entry(app.state(*id).await).or_default() += 1;
    }
    assert_eq!(
        by_state.get(&JobState::Succeeded),
        Some(&300),
        "{by_state:?}"
    );
    assert_one_outcome_each(&app, &ids).await;
    app.cleanup().await;
}

#[tokio::test]
async fn database_connections_cut_mid_run_lose_no_job() {
    let app = busy_app().await;
    let ids = submit_many(&app, 300).await;
    app.wait_for("some progress", Duration::from_secs(60), || async {
        app.count(JobState::Succeeded).await >= 30
    })
    .await;
    // Three outages, as a PostgreSQL restart looks from the processes' side.
    let mut cut = 0;
    for _ in 0..3 {
        cut += app.cut_database_connections().await;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(cut >= 3, "cut {cut} connections");
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    assert_eq!(app.count(JobState::Succeeded).await, 300);
    assert_one_outcome_each(&app, &ids).await;
    app.cleanup().await;
}

#[tokio::test]
async fn kill_9_of_the_api_mid_submission_loses_no_accepted_job() {
    let mut app = spawn_app(AppOptions {
        processes: true,
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let salt = uuid::Uuid::now_v7();
    for i in 0..400 {
        let (http, url, key, accepted) = (
            app.http.clone(),
            format!("{}/v1/jobs", app.api),
            key.clone(),
            accepted.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&crate::helpers::job_body(&format!("job {i} {salt}")))
                .send()
                .await
                .ok()?;
            if response.status() != reqwest::StatusCode::ACCEPTED {
                return None;
            }
            let body: serde_json::Value = response.json().await.ok()?;
            accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            body["request_id"].as_str()?.parse::<RequestId>().ok()
        }));
    }
    app.wait_for("some accepted jobs", Duration::from_secs(30), || async {
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 50
    })
    .await;
    app.kill_api().await;
    let mut ids = Vec::new();
    for task in tasks {
        if let Some(id) = task.await.unwrap() {
            ids.push(id);
        }
    }
    assert!(ids.len() >= 50, "{} accepted", ids.len());
    // Accepted jobs whose publish died with the API wait in the outbox until a worker's relay sends them.
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    for id in &ids {
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    app.wait_for("the outbox to drain", Duration::from_secs(30), || async {
        app.store.outbox_len().await.unwrap() == 0
    })
    .await;
    app.cleanup().await;
}
