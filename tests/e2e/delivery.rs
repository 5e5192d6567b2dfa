//! The job path from submit to result: many jobs over two worker processes, retries through
//! the `retry` lane with backoff, dead-lettering and replay, and the CLI around them.

use crate::helpers::{sim_always_failing, spawn_app, AppOptions, Queue};
use sluice_core::{JobState, RequestId, Tier};
use sluice_sim::{Faults, SimConfig};
use std::time::Duration;

#[tokio::test]
async fn two_hundred_jobs_across_four_tiers_all_succeed_with_the_providers_answer() {
    two_hundred_jobs_succeed_on(Queue::Rabbitmq).await;
}

#[tokio::test]
async fn two_hundred_jobs_across_four_tiers_all_succeed_on_sqs_lanes() {
    two_hundred_jobs_succeed_on(Queue::Sqs).await;
}

#[tokio::test]
async fn two_hundred_jobs_across_four_tiers_all_succeed_on_the_sql_queue_in_postgres() {
    two_hundred_jobs_succeed_on(Queue::SqlPostgres).await;
}

#[tokio::test]
async fn two_hundred_jobs_across_four_tiers_all_succeed_on_sqlite_with_the_sql_queue() {
    two_hundred_jobs_succeed_on(Queue::Sqlite).await;
}

/// The foundation's end-to-end job test, unchanged on each lane backend.
async fn two_hundred_jobs_succeed_on(queue: Queue) {
    let app = spawn_app(AppOptions {
        queue,
        workers: 2,
        sim: SimConfig {
            default_rpm: 0,
            latency: sluice_sim::Latency::Uniform {
                min_ms: 1,
                max_ms: 20,
            },
            ..SimConfig::default()
        },
        ..Default::default()
    })
    .await;
    let mut keys = Vec::new();
    for tier in Tier::ALL {
        keys.push(app.key(&format!("tenant-{tier}"), tier).await);
    }
    let mut jobs = Vec::new();
    for n in 0..200 {
        let key = &keys[n % 4];
        let text = format!("question number {n}");
        jobs.push((app.submit(key, &text).await, key.clone(), text));
    }
    let ids: Vec<RequestId> = jobs.iter().map(|j| j.0).collect();
    app.wait_terminal(&ids, Duration::from_secs(90)).await;
    for (id, key, text) in &jobs {
        let (_, job) = app.get_job(key, *id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let result = &job["result"];
        let content = result["content"].as_str().unwrap();
        assert!(
            content.starts_with(&format!("Simulated reply to: {text}")),
            "{content}"
        );
        // The simulator counts a prompt token per 4 characters and 16 completion tokens.
        let prompt = (text.len() as u64).div_ceil(4);
        assert_eq!(result["usage"]["prompt_tokens"], prompt, "{job}");
        assert_eq!(result["usage"]["completion_tokens"], 16);
        assert_eq!(result["usage"]["total_tokens"], prompt + 16);
        assert_eq!(job["endpoint"], "sim-1");
        assert_eq!(
            app.sim.calls_for_job(&id.to_string()),
            1,
            "one provider call per job"
        );
    }
    assert_eq!(app.sim.stats().ok, 200);
    // With the lanes in the store's own database, each job went into its lane in the commit
    // that stored it: the outbox's id counter never moved.
    match queue {
        Queue::SqlPostgres => {
            let (outbox_rows,): (Option<i64>,) = sqlx::query_as(
                "SELECT last_value FROM pg_sequences
                 WHERE schemaname = current_schema() AND sequencename = 'outbox_id_seq'",
            )
            .fetch_one(app.store.pg_pool().unwrap())
            .await
            .unwrap();
            assert_eq!(outbox_rows, None, "jobs went through the outbox");
        }
        Queue::Sqlite => {
            let outbox_rows: Option<(i64,)> =
                sqlx::query_as("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'")
                    .fetch_optional(app.store.sqlite_pool().unwrap())
                    .await
                    .unwrap();
            assert_eq!(outbox_rows, None, "jobs went through the outbox");
        }
        Queue::Rabbitmq | Queue::Sqs => {}
    }
    app.cleanup().await;
}

#[tokio::test]
async fn two_500s_then_success_on_attempt_three_no_sooner_than_the_backoff() {
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            default_rpm: 0,
            faults: Faults {
                fail_first_per_job: 2,
                fail_status: 500,
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        retry_base_secs: 1.0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "flaky").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.attempt, 3);
    assert_eq!(app.sim.calls_for_job(&id.to_string()), 3);

    let events = app.store.events(id).await.unwrap();
    let states: Vec<JobState> = events.iter().map(|e| e.state).collect();
    use JobState::*;
    assert_eq!(
        states,
        vec![Queued, Running, Retrying, Running, Retrying, Running, Succeeded]
    );
    // Backoff: base 1 s after the first failure, 2 s after the second.
    let waited = |from: usize, to: usize| (events[to].at - events[from].at).to_std().unwrap();
    assert!(waited(2, 3) >= Duration::from_secs(1), "{:?}", waited(2, 3));
    assert!(waited(4, 5) >= Duration::from_secs(2), "{:?}", waited(4, 5));
    assert!(events[2].detail.as_ref().unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("500"));
    app.cleanup().await;
}

#[tokio::test]
async fn always_failing_endpoint_dead_letters_and_replay_succeeds_once_healed() {
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            default_rpm: 0,
            faults: Faults {
                always_fail: Some(503),
                ..Faults::default()
            },
            ..SimConfig::default()
        },
        retry_base_secs: 0.2,
        max_attempts: 3,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Basic).await;
    let id = app.submit(&key, "doomed for now").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert!(
        job.error.as_deref().unwrap().contains("503"),
        "{:?}",
        job.error
    );
    assert_eq!(app.sim.calls_for_job(&id.to_string()), 3, "max attempts");

    let listed = app.cli(&["dlq", "list"]).await;
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&id.to_string()));

    app.sim.set_faults(Faults::default());
    let replay = app.cli(&["dlq", "replay", &id.to_string()]).await;
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    // The CLI forgot its outbox row before it exited, so no relay publishes the job again.
    let left = app
        .store
        .unpublished(Duration::ZERO, Duration::from_secs(30), 100)
        .await
        .unwrap();
    assert!(left.is_empty(), "outbox rows left behind: {left:?}");
    app.wait_for(
        "replayed job to succeed",
        Duration::from_secs(30),
        || async { app.state(id).await == JobState::Succeeded },
    )
    .await;
    assert_eq!(app.sim.calls_for_job(&id.to_string()), 4);
    // A job that is not dead cannot be replayed.
    let again = app.cli(&["dlq", "replay", &id.to_string()]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("not dead"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_provider_400_goes_dead_at_once_without_retries() {
    let app = spawn_app(AppOptions {
        sim: sim_always_failing(400),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "bad request upstream").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(job.attempt, 1);
    assert!(job.error.as_deref().unwrap().contains("400"));
    assert_eq!(app.sim.calls_for_job(&id.to_string()), 1);
    let states: Vec<JobState> = app
        .store
        .events(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert!(!states.contains(&JobState::Retrying));
    // Sluice's own dead-letter went to the dead lane, where workers drop it: the job was dead
    // already, and it stays dead with its reason.
    use sluice_broker::Broker;
    let broker = app.broker().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while app.store.outbox_len().await.unwrap() > 0
        || broker.depth(sluice_core::Lane::Dead).await.unwrap() > 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the dead lane was not drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert!(job.error.as_deref().unwrap().contains("400"));
    app.cleanup().await;
}

#[tokio::test]
async fn cli_keys_submit_wait_and_status() {
    let app = spawn_app(AppOptions::default()).await;
    let created = app
        .cli(&[
            "keys", "create", "--tenant", "cli", "--user", "me", "--tier", "pro",
        ])
        .await;
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let key = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(key.starts_with("sk_sluice_") && !key.contains(char::is_whitespace));

    let submitted = app
        .cli(&[
            "submit", "--api", &app.api, "--key", &key, "--wait", "hello", "there",
        ])
        .await;
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let stdout = String::from_utf8(submitted.stdout).unwrap();
    let id: RequestId = stdout.lines().next().unwrap().trim().parse().unwrap();
    assert!(stdout.contains("Simulated reply to: hello there"));

    let status = app
        .cli(&["status", "--api", &app.api, "--key", &key, &id.to_string()])
        .await;
    assert!(status.status.success());
    assert!(String::from_utf8_lossy(&status.stdout).contains("\"succeeded\""));

    let bad = app
        .cli(&[
            "keys", "create", "--tenant", "x", "--user", "y", "--tier", "gold",
        ])
        .await;
    assert!(!bad.status.success());
    assert!(bad.stdout.is_empty());
    let refused = app
        .cli(&[
            "submit",
            "--api",
            &app.api,
            "--key",
            "sk_sluice_wrong",
            "hi",
        ])
        .await;
    assert!(!refused.status.success());
    assert!(refused.stdout.is_empty());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    app.cleanup().await;
}

#[tokio::test]
async fn a_saturated_pool_does_not_hold_up_jobs_for_another_pool() {
    let app = spawn_app(AppOptions {
        // 6 requests a minute: after the first, one every 10 s.
        extra_pools: vec![("slow", 6)],
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut slow = Vec::new();
    for n in 0..4 {
        slow.push(app.submit_model(&key, "slow", &format!("slow {n}")).await);
    }
    // Same lane, same tenant, queued behind the slow pool's jobs.
    let mut fast = Vec::new();
    for n in 0..20 {
        fast.push(app.submit(&key, &format!("fast {n}")).await);
    }
    app.wait_terminal(&fast, Duration::from_secs(8)).await;
    let mut slow_done = 0;
    for id in &slow {
        if app.state(*id).await == JobState::Succeeded {
            slow_done += 1;
        }
    }
    assert!(
        slow_done <= 2,
        "the slow pool went over its rate: {slow_done} done"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn more_jobs_for_a_saturated_pool_than_the_buffer_holds_do_not_hold_up_another_pool() {
    let app = spawn_app(AppOptions {
        // 6 requests a minute, and a buffer of 8 messages per lane: 40 slow jobs are five
        // buffers' worth, so the fast jobs behind them reach this worker only if the slow ones
        // go back to wait in the broker.
        extra_pools: vec![("slow", 6)],
        concurrency: 8,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut slow = Vec::new();
    for n in 0..40 {
        slow.push(app.submit_model(&key, "slow", &format!("slow {n}")).await);
    }
    let mut fast = Vec::new();
    for n in 0..20 {
        fast.push(app.submit(&key, &format!("fast {n}")).await);
    }
    app.wait_terminal(&fast, Duration::from_secs(20)).await;
    for id in &fast {
        assert_eq!(app.state(*id).await, JobState::Succeeded);
    }
    // Parked jobs are neither lost nor run ahead of their pool's rate.
    let mut done = 0;
    for id in &slow {
        match app.state(*id).await {
            JobState::Succeeded => done += 1,
            JobState::Queued | JobState::Running => {}
            other => panic!("slow job {id} is {other:?}"),
        }
    }
    assert!(done <= 4, "the slow pool went over its rate: {done} done");
    app.cleanup().await;
}

/// The same job path through an Anthropic or Gemini endpoint, in that provider's wire format.
async fn jobs_succeed_through(kind: &str) {
    // A simulator of its own, so the app's OpenAI one can show that it was never called.
    let sim = crate::helpers::spawn_sim(Faults::default()).await;
    let base_url = if kind == "gemini" {
        sim.gemini_base_url()
    } else {
        sim.base_url()
    };
    let app = spawn_app(AppOptions {
        default_route: "\"native\"",
        extra_toml: format!(
            "[[pools]]\nname = \"native\"\n[[pools.endpoints]]\nname = \"{kind}-1\"\n\
             kind = \"{kind}\"\nbase_url = \"{base_url}\"\nmodel = \"sim-model\"\n\
             api_key = \"sk-{kind}\"\nrpm = 60000\n"
        ),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let mut jobs = Vec::new();
    for n in 0..20 {
        let text = format!("{kind} question {n}");
        jobs.push((app.submit(&key, &text).await, text));
    }
    let ids: Vec<RequestId> = jobs.iter().map(|j| j.0).collect();
    app.wait_terminal(&ids, Duration::from_secs(30)).await;
    for (id, text) in &jobs {
        let (_, job) = app.get_job(&key, *id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let content = job["result"]["content"].as_str().unwrap();
        assert!(
            content.starts_with(&format!("Simulated reply to: {text}")),
            "{content}"
        );
        let prompt = (text.len() as u64).div_ceil(4);
        assert_eq!(job["result"]["usage"]["prompt_tokens"], prompt, "{job}");
        assert_eq!(job["result"]["usage"]["completion_tokens"], 16);
        assert_eq!(job["endpoint"], format!("{kind}-1"));
        assert_eq!(sim.calls_for_job(&id.to_string()), 1);
    }
    assert_eq!(app.sim.stats().total, 0, "nothing went to the OpenAI pool");
    app.cleanup().await;
    sim.shutdown();
}

#[tokio::test]
async fn jobs_succeed_through_an_anthropic_endpoint() {
    jobs_succeed_through("anthropic").await;
}

#[tokio::test]
async fn jobs_succeed_through_a_gemini_endpoint() {
    jobs_succeed_through("gemini").await;
}

/// An API node stopped while submissions pour in publishes every job it accepted before it
/// exits: no outbox row is left for a relay to find later, and every job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_node_stopped_under_load_publishes_every_job_it_accepted() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let mut app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let (_node, url) = app.start_api_node().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut clients = tokio::task::JoinSet::new();
    for client in 0..32 {
        let (http, url, key, accepted) = (
            app.http.clone(),
            url.clone(),
            key.clone(),
            Arc::clone(&accepted),
        );
        clients.spawn(async move {
            for n in 0.. {
                let body = crate::helpers::job_body(&format!("client {client} job {n}"));
                // Once the node stops, its port refuses: the client is done.
                let Ok(response) = http
                    .post(format!("{url}/v1/jobs"))
                    .bearer_auth(&key)
                    .json(&body)
                    .send()
                    .await
                else {
                    return;
                };
                if response.status() == reqwest::StatusCode::ACCEPTED {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    app.stop_api_nodes().await;
    while clients.join_next().await.is_some() {}
    let accepted = accepted.load(Ordering::Relaxed);
    assert!(accepted >= 32, "only {accepted} jobs were accepted");
    let left = app.store.outbox_len().await.unwrap();
    assert_eq!(
        left, 0,
        "{left} of {accepted} accepted jobs were left unpublished in the outbox"
    );
    let stored = app.total_jobs().await;
    assert!(
        stored >= accepted as i64,
        "{stored} jobs stored, {accepted} accepted"
    );
    // Every job is in a lane: one worker runs them all, with no relay's help.
    app.start_worker().await;
    app.wait_for(
        "every accepted job to succeed",
        Duration::from_secs(60),
        || async { app.count(JobState::Succeeded).await == stored },
    )
    .await;
    app.cleanup().await;
}
