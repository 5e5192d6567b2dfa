//! The Files and Batch API driven by the official SDKs (tests/openai/batch.py with the Python
//! `openai` package; tests/openai/node.cjs with the npm one), checked against the jobs, lines
//! and emails in the database.

use crate::helpers::{spawn_app, spawn_sim, AppOptions, TestApp};
use crate::openai::{chat, id, jobs_of, python, run, sdks};
use serde_json::{json, Value};
use sluice_core::{JobState, Lane, Tier};
use sluice_notify::testing::{free_port, Maildir, Sink};
use sluice_sim::{Faults, Latency, SimConfig};
use std::time::Duration;

async fn batch(sdk: &str, app: &TestApp, key: &str, args: &[&str]) -> Value {
    let mut command = python(sdk, app, "batch.py", args).await;
    command.env("SLUICE_KEY", key);
    run(command).await
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

fn in_order(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("req-{i}")).collect()
}

/// A pool on its own simulator, routed from the alias of its name.
fn pool(name: &str, url: &str, rpm: u32) -> String {
    format!(
        "\n[[pools]]\nname = \"{name}\"\n[[pools.endpoints]]\nname = \"{name}-1\"\n\
         base_url = \"{url}\"\nmodel = \"m\"\napi_key = \"sk-sim-test\"\nrpm = {rpm}\nburst = 1\n"
    )
}

#[tokio::test]
async fn a_thousand_line_batch_completes_in_the_batch_lane_while_pro_chats_meet_their_target() {
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Fixed { ms: 20 },
            ..SimConfig::default()
        },
        concurrency: 8,
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    let making = tokio::spawn({
        let mut c = python("py3", &app, "batch.py", &["create", "1000"]).await;
        c.env("SLUICE_KEY", &pro);
        run(c)
    });
    // While the batch drains, a pro key's chat completions go first (priority lane, weight 10).
    app.wait_for(
        "the batch to start draining",
        Duration::from_secs(60),
        || async { app.count(JobState::Succeeded).await > 50 },
    )
    .await;
    let chats = chat("py3", &app, &pro, &["burst", "5", "0.3"]).await;
    let seen = making.await.unwrap();
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(seen["counts"], json!([1000, 1000, 0]));
    assert_eq!(
        ids(&seen["custom_ids"]),
        in_order(1000),
        "every custom_id once, in input order"
    );
    assert_eq!(seen["errors"], 0);
    assert_eq!(seen["metadata"], json!({"run": "e2e"}));
    let statuses = ids(&seen["statuses"]);
    assert_eq!(
        statuses.first().map(String::as_str),
        Some("in_progress"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}"
    );
    let mut lanes = std::collections::BTreeSet::new();
    for request_id in seen["request_ids"].as_array().unwrap() {
        let job = app.store.job(id(request_id)).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        lanes.insert(job.lane);
    }
    assert_eq!(
        lanes,
        [Lane::Batch].into(),
        "a pro key's lines wait in the batch lane"
    );
    // The pro tier's target is 2 s of queue wait; each chat started well within it.
    let target = sluice_core::WaitTargets::default().pro;
    for request_id in chats["ids"].as_array().unwrap() {
        let job = app.store.job(id(request_id)).await.unwrap().unwrap();
        assert_eq!(job.lane, Lane::Priority);
        let wait = (job.started_at.unwrap() - job.created_at).num_milliseconds() as f64 / 1000.0;
        assert!(
            wait <= target,
            "a pro chat waited {wait:.3} s behind the batch"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn an_invalid_line_fails_the_batch_with_its_number_and_makes_no_job() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    for (kind, code) in [
        ("duplicate", "duplicate_custom_id"),
        ("url", "invalid_url"),
        ("stream", "stream_not_supported"),
        ("model", "model_not_found"),
        ("method", "invalid_method"),
        ("n", "invalid_request"),
        ("json", "invalid_json_line"),
    ] {
        let seen = batch("py3", &app, &key, &["invalid", kind]).await;
        assert_eq!(seen["code"], code, "{kind}: {seen}");
        let stored = app
            .store
            .get_batch("acme", seen["batch_id"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.status, sluice_store::BatchStatus::Failed, "{kind}");
    }
    assert!(
        jobs_of(&app, "acme").await.is_empty(),
        "no invalid batch made a job"
    );
    let seen = batch("py1", &app, &key, &["invalid", "duplicate"]).await;
    assert_eq!(seen["line"], 3, "the 1.x SDK reads the same errors: {seen}");
    app.cleanup().await;
}

#[tokio::test]
async fn lines_the_provider_refuses_land_in_the_error_file_and_the_batch_sends_one_email() {
    let rejecting = spawn_sim(Faults {
        always_fail: Some(400),
        ..Faults::default()
    })
    .await;
    let dir = Maildir::new();
    let port = free_port();
    let _sink = Sink::start(port, &dir).await;
    let app = spawn_app(AppOptions {
        smtp_port: Some(port),
        extra_routes: "rejecting = \"rejecting\"\n".into(),
        extra_toml: pool("rejecting", &rejecting.base_url(), 60_000),
        ..AppOptions::default()
    })
    .await;
    // A free key with an address: its jobs would each send an email, its batch sends one.
    let key = app
        .key_with_email("acme", Tier::Free, "ada@example.com")
        .await;
    let seen = batch("py3", &app, &key, &["mixed", "5", "3"]).await;
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(seen["counts"], json!([8, 5, 3]));
    assert_eq!(ids(&seen["ok"]), in_order(5));
    assert_eq!(ids(&seen["bad"]), ["req-1000", "req-1001", "req-1002"]);
    let mail = dir.wait_for(1, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mail_now = dir.messages();
    assert_eq!(
        mail_now.len(),
        1,
        "one email for the batch, none per line: {mail_now:?}"
    );
    assert!(
        mail[0].subject.starts_with("Your Sluice batch batch_"),
        "{}",
        mail[0].subject
    );
    assert_eq!(mail[0].to, "ada@example.com");
    app.cleanup().await;
    rejecting.shutdown();
}

#[tokio::test]
async fn a_cancelled_batch_keeps_what_finished_and_is_not_cancelled_twice() {
    // One request a second, by Sluice's limiter.
    let slow = spawn_sim(Faults::default()).await;
    let app = spawn_app(AppOptions {
        extra_routes: "slow = \"slow\"\n".into(),
        extra_toml: pool("slow", &slow.base_url(), 60),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let seen = batch("py3", &app, &key, &["cancel", "20"]).await;
    assert_eq!(seen["status"], "cancelled", "{seen}");
    let ok = ids(&seen["ok"]);
    let cancelled = ids(&seen["cancelled"]);
    assert!(ok.len() >= 2 && ok.len() < 20, "{seen}");
    assert_eq!(ok.len() + cancelled.len(), 20, "every line once: {seen}");
    let mut all: Vec<String> = ok.iter().chain(&cancelled).cloned().collect();
    all.sort_by_key(|c| c[4..].parse::<u32>().unwrap());
    assert_eq!(all, in_order(20));
    assert_eq!(seen["counts"], json!([20, ok.len(), cancelled.len()]));
    assert_eq!(seen["refused"], "batch_not_cancellable");
    let states = jobs_of(&app, "acme").await;
    assert_eq!(
        states
            .iter()
            .filter(|(_, s)| *s == JobState::Cancelled)
            .count(),
        cancelled.len()
    );
    app.cleanup().await;
    slow.shutdown();
}

#[tokio::test]
async fn a_batch_whose_window_ends_first_expires() {
    let app = spawn_app(AppOptions {
        extra_toml: "[batches]\ncompletion_window_secs = 3\n".into(),
        ..AppOptions::default()
    })
    .await;
    app.store.pause("lane:batch", "test").await.unwrap();
    // Workers read pauses every second: until then a fast SDK could see its lines run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let key = app.key("acme", Tier::Pro).await;
    let seen = batch("py3", &app, &key, &["expire", "5"]).await;
    assert_eq!(seen["status"], "expired", "{seen}");
    assert_eq!(seen["expired"], 5);
    assert!(jobs_of(&app, "acme")
        .await
        .iter()
        .all(|(_, s)| *s == JobState::Cancelled));
    app.cleanup().await;
}

#[tokio::test]
async fn batches_list_newest_first_in_pages_and_files_keep_their_limits_and_tenants() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let other = app.key("other", Tier::Pro).await;
    let mut command = python("py3", &app, "batch.py", &["listing", "25"]).await;
    command
        .env("SLUICE_KEY", &key)
        .env("SLUICE_OTHER_KEY", &other);
    let seen = run(command).await;
    assert_eq!(seen["listed"].as_array().unwrap().len(), 25);
    let seen = batch("py3", &app, &key, &["limits"]).await;
    assert_eq!(seen["lines"], "too_many_lines", "{seen}");
    assert_eq!(seen["size"], "file_too_large", "{seen}");
    assert_eq!(seen["purpose"], "purpose", "{seen}");
    // The 25 inputs, one deleted; the refused uploads left nothing, not even unfinished rows.
    assert_eq!(
        (seen["before"].as_i64(), seen["after"].as_i64()),
        (Some(24), Some(24))
    );
    let (uploading,): (i64,) =
        sqlx::query_as("SELECT count(*) FROM files WHERE status = 'uploading'")
            .fetch_one(app.store.pg_pool().unwrap())
            .await
            .unwrap();
    assert_eq!(uploading, 0);
    // Ids and cursors the database could not even hold (a NUL) are unknown, not a 500.
    for (path, status) in [
        ("/v1/batches/batch_%00x", 404),
        ("/v1/batches/batch_%00x/cancel", 404),
        ("/v1/files/file-%00x", 404),
        ("/v1/files/file-%00x/content", 404),
        ("/v1/files?after=file-%00", 400),
        ("/v1/batches?after=%00", 400),
    ] {
        let method = if path.ends_with("/cancel") {
            reqwest::Method::POST
        } else {
            reqwest::Method::GET
        };
        let response = app
            .http
            .request(method, format!("{}{path}", app.api))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), status, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"]["message"].is_string(), "{path}: {body}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_past_the_tenants_cap_or_budget_is_refused_whole() {
    let app = spawn_app(AppOptions {
        extra_toml: "[batches]\nmax_pending_lines = 5\n\
                     [budgets]\n[budgets.tenants]\nbroke = 0.0\n"
            .into(),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let seen = batch("py3", &app, &key, &["refused", "6"]).await;
    assert_eq!(seen["status"], 429, "{seen}");
    assert_eq!(seen["code"], "batch_queue_full");
    assert_eq!(seen["should_retry"], "false");
    assert_eq!(seen["attempts"], 1, "the SDK does not retry it: {seen}");
    assert_eq!(seen["batches"], 0);
    // Five fit.
    let seen = batch("py3", &app, &key, &["create", "5"]).await;
    assert_eq!(seen["counts"], json!([5, 5, 0]), "{seen}");

    let broke = app.key("broke", Tier::Pro).await;
    let seen = batch("py3", &app, &broke, &["refused", "2"]).await;
    assert_eq!(seen["status"], 402, "{seen}");
    assert_eq!(seen["code"], "budget_exhausted");
    assert_eq!(seen["attempts"], 1, "{seen}");
    assert!(jobs_of(&app, "acme").await.len() == 5 && jobs_of(&app, "broke").await.is_empty());
    app.cleanup().await;
}

#[tokio::test]
async fn a_batch_completes_once_per_line_after_a_worker_and_the_api_node_are_killed() {
    let mut app = spawn_app(AppOptions {
        processes: true,
        workers: 2,
        concurrency: 4,
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Fixed { ms: 100 },
            ..SimConfig::default()
        },
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let made = batch("py3", &app, &key, &["create", "300", "default", "no"]).await;
    let batch_id = made["batch_id"].as_str().unwrap().to_owned();
    app.wait_for(
        "a third of the lines to finish",
        Duration::from_secs(60),
        || async { app.count(JobState::Succeeded).await >= 100 },
    )
    .await;
    app.kill_worker(0).await;
    app.kill_api().await;
    let (api, url) = app.start_api_node().await;
    app.api = url;
    app.start_worker().await;
    let seen = batch("py3", &app, &key, &["finish", &batch_id]).await;
    assert_eq!(seen["status"], "completed", "{seen}");
    assert_eq!(seen["counts"], json!([300, 300, 0]));
    assert_eq!(
        ids(&seen["custom_ids"]),
        in_order(300),
        "each custom_id exactly once"
    );
    assert!(seen["error_ids"].as_array().unwrap().is_empty());
    drop(api);
    app.cleanup().await;
}

#[tokio::test]
async fn the_node_sdk_runs_a_chat_a_stream_and_a_batch() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let node = &sdks().await["node"];
    let output = tokio::process::Command::new("node")
        .arg(crate::openai::repo().join("tests/openai/node.cjs"))
        .env("NODE_PATH", node.join("node_modules"))
        .env("SLUICE_BASE_URL", format!("{}/v1", app.api))
        .env("SLUICE_KEY", &key)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the Node SDK scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let job = app.store.job(id(&seen["chat"])).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(seen["chat_text"], job.result.as_ref().unwrap()["content"]);
    let streamed = app.store.job(id(&seen["stream"])).await.unwrap().unwrap();
    assert_eq!(
        seen["stream_text"],
        streamed.result.as_ref().unwrap()["content"]
    );
    assert_eq!(seen["batch_counts"], json!([10, 10, 0]));
    assert_eq!(ids(&seen["batch_ids"]), in_order(10));
    app.cleanup().await;
}
