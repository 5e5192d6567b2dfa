//! The OpenAI front door driven by the official SDKs, as users run them: the `openai` Python
//! package (last 1.x, last 2.x and the current 3.x, from scripts/openai-sdks.sh) runs the
//! scenarios of tests/openai/*.py against a live stack; these tests check what the SDK saw
//! against the jobs in the database.

use crate::helpers::{spawn_app, spawn_sim, AppOptions, TestApp};
use serde_json::Value;
use sluice_core::{JobState, RequestId, Tier};
use sluice_sim::Faults;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// Python SDKs by name (`py1`, `py2`, `py3`) and the node_modules parent (`node`).
pub async fn sdks() -> &'static HashMap<String, PathBuf> {
    static SDKS: OnceCell<HashMap<String, PathBuf>> = OnceCell::const_new();
    SDKS.get_or_init(|| async {
        let script = repo().join("scripts/openai-sdks.sh");
        let output = tokio::process::Command::new("bash")
            .arg(script)
            .output()
            .await
            .expect("run scripts/openai-sdks.sh");
        assert!(
            output.status.success(),
            "scripts/openai-sdks.sh failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(name, path)| (name.to_owned(), PathBuf::from(path)))
            .collect()
    })
    .await
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The command that runs `tests/openai/<script>` with an SDK against `app`.
pub async fn python(
    sdk: &str,
    app: &TestApp,
    script: &str,
    args: &[&str],
) -> tokio::process::Command {
    let venv = &sdks().await[sdk];
    let mut command = tokio::process::Command::new(venv.join("bin/python"));
    command
        .arg(repo().join("tests/openai").join(script))
        .args(args)
        .env("SLUICE_BASE_URL", format!("{}/v1", app.api))
        .kill_on_drop(true);
    command
}

/// Run a scenario to its end; its printed JSON. Panics with the script's output if it failed.
pub async fn run(mut command: tokio::process::Command) -> Value {
    let output = tokio::time::timeout(Duration::from_secs(180), command.output())
        .await
        .expect("the SDK scenario took over 3 minutes")
        .expect("run python");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the SDK scenario failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

pub async fn chat(sdk: &str, app: &TestApp, key: &str, args: &[&str]) -> Value {
    let mut command = python(sdk, app, "chat.py", args).await;
    command.env("SLUICE_KEY", key);
    run(command).await
}

pub fn id(v: &Value) -> RequestId {
    v.as_str()
        .unwrap_or_else(|| panic!("not a request id: {v}"))
        .parse()
        .unwrap()
}

/// Every job of a tenant, oldest first: (id, state).
pub async fn jobs_of(app: &TestApp, tenant: &str) -> Vec<(RequestId, JobState)> {
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE tenant = $1 ORDER BY id")
            .bind(tenant)
            .fetch_all(app.store.pg_pool().unwrap())
            .await
            .unwrap();
    rows.into_iter()
        .map(|(id, state)| (RequestId(id), state.parse().unwrap()))
        .collect()
}

fn stored_content(job: &sluice_store::JobRecord) -> String {
    job.result.as_ref().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn chat_completions_validate_in_each_sdk_and_wait_in_the_keys_lane() {
    let app = spawn_app(AppOptions::default()).await;
    let pro = app.key("acme", Tier::Pro).await;
    let free = app.key("freebie", Tier::Free).await;
    for sdk in ["py1", "py2", "py3"] {
        for (key, lane) in [(&pro, "priority"), (&free, "batch")] {
            let seen = chat(sdk, &app, key, &["basic"]).await;
            let job = app
                .store
                .job(id(&seen["request_id"]))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(job.state, JobState::Succeeded, "{sdk}");
            // The free key asked for service_tier "priority" and still waited in batch.
            assert_eq!(job.lane.as_str(), lane, "{sdk}");
            assert_eq!(seen["lane"], lane, "{sdk}");
            assert_eq!(seen["content"], stored_content(&job), "{sdk}");
            assert_eq!(seen["model"], "default", "{sdk}");
            // The developer message went to the provider as system, max_completion_tokens as
            // max_tokens, the string stop as a list.
            assert_eq!(job.request.messages[0].role, sluice_core::Role::System);
            assert_eq!(job.request.max_tokens, Some(12));
            assert_eq!(job.request.stop, Some(vec!["NEVER-SEEN".to_owned()]));
        }
    }
    let models = chat("py3", &app, &pro, &["models"]).await;
    assert_eq!(models["models"], serde_json::json!(["default"]));
    app.cleanup().await;
}

#[tokio::test]
async fn a_stream_relays_the_jobs_text_and_waits_on_a_paused_lane_with_comments() {
    // With Redis the workers' deltas reach the API node as they arrive.
    let app = spawn_app(AppOptions {
        redis: true,
        extra_toml: "[openai]\nkeepalive_secs = 0.5\n".into(),
        // The provider takes a moment, so the held request follows the job before its text
        // arrives even on a busy machine (a job already done is relayed as one piece).
        sim: sluice_sim::SimConfig {
            default_rpm: 0,
            latency: sluice_sim::Latency::Fixed { ms: 300 },
            ..sluice_sim::SimConfig::default()
        },
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    for sdk in ["py1", "py3"] {
        let seen = chat(sdk, &app, &pro, &["stream"]).await;
        let job = app
            .store
            .job(id(&seen["request_id"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(seen["text"], stored_content(&job), "{sdk}");
        assert!(seen["pieces"].as_u64().unwrap() >= 2, "{sdk}: {seen}");
        assert_eq!(
            seen["usage"],
            job.result.as_ref().unwrap()["usage"],
            "{sdk}"
        );
    }

    // The lane is paused: the stream stays open on comments, and ends once it is resumed.
    app.store.pause("lane:priority", "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let waiting = tokio::spawn({
        let command = {
            let mut c = python("py3", &app, "chat.py", &["stream"]).await;
            c.env("SLUICE_KEY", &pro);
            c
        };
        run(command)
    });
    let raw = app
        .http
        .post(format!("{}/v1/chat/completions", app.api))
        .bearer_auth(&pro)
        .json(&serde_json::json!({"model": "default", "stream": true,
            "messages": [{"role": "user", "content": "raw reader"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert_eq!(raw.headers()["content-type"], "text/event-stream");
    let raw_id: RequestId = raw.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut raw = raw;
    let mut seen = String::new();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        if let Ok(Ok(Some(bytes))) = tokio::time::timeout(Duration::from_secs(1), raw.chunk()).await
        {
            seen.push_str(&String::from_utf8_lossy(&bytes));
        }
    }
    assert!(seen.contains(": queued"), "comments while paused: {seen:?}");
    assert!(
        !seen.contains("data:"),
        "nothing else while paused: {seen:?}"
    );
    assert_eq!(app.state(raw_id).await, JobState::Queued);
    // The SDK's request (its Python starts slowly under load) waits in the lane too before the
    // lane is resumed.
    app.wait_for(
        "the SDK's job to wait too",
        Duration::from_secs(60),
        || async { app.count(JobState::Queued).await == 2 },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    app.store.resume("lane:priority").await.unwrap();
    let seen_sdk = waiting.await.unwrap();
    assert!(seen_sdk["elapsed"].as_f64().unwrap() >= 1.0, "{seen_sdk}");
    let job = app
        .store
        .job(id(&seen_sdk["request_id"]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen_sdk["text"], stored_content(&job));
    while let Ok(Some(bytes)) = raw.chunk().await {
        seen.push_str(&String::from_utf8_lossy(&bytes));
    }
    assert!(seen.trim_end().ends_with("data: [DONE]"), "{seen}");
    app.cleanup().await;
}

/// Pools on the one simulator in each wire format: `default` (OpenAI), `claude` (Anthropic)
/// and `gemini` (Gemini).
fn three_formats(sim_url: &str, gemini_url: &str) -> String {
    format!(
        "\n[[pools]]\nname = \"claude\"\n[[pools.endpoints]]\nname = \"claude-1\"\nkind = \"anthropic\"\n\
         base_url = \"{sim_url}\"\nmodel = \"claude-sim\"\napi_key = \"sk-sim-test\"\nrpm = 60000\n\
         \n[[pools]]\nname = \"gemini\"\n[[pools.endpoints]]\nname = \"gemini-1\"\nkind = \"gemini\"\n\
         base_url = \"{gemini_url}\"\nmodel = \"gemini-sim\"\napi_key = \"sk-sim-test\"\nrpm = 60000\n"
    )
}

#[tokio::test]
async fn tools_and_json_schema_round_trip_through_openai_anthropic_and_gemini() {
    // The pools need the simulator's address, known once it runs: a simulator of this test's own.
    let sim = spawn_sim(Faults::default()).await;
    let app = spawn_app(AppOptions {
        extra_routes: "claude = \"claude\"\ngemini = \"gemini\"\n".into(),
        extra_toml: three_formats(&sim.base_url(), &sim.gemini_base_url()),
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    for model in ["default", "claude", "gemini"] {
        for streamed in ["no", "yes"] {
            let seen = chat("py3", &app, &pro, &["tools", model, streamed]).await;
            let first = app.store.job(id(&seen["first"])).await.unwrap().unwrap();
            assert_eq!(first.state, JobState::Succeeded, "{model}");
            let calls = &first.result.as_ref().unwrap()["tool_calls"];
            assert_eq!(
                calls[0]["function"]["name"], "get_weather",
                "{model}: {calls}"
            );
            let follow = app
                .store
                .job(id(&seen["follow_up"]))
                .await
                .unwrap()
                .unwrap();
            let tool_message = follow.request.messages.last().unwrap();
            assert_eq!(tool_message.role, sluice_core::Role::Tool, "{model}");
            assert_eq!(
                tool_message.tool_call_id.as_deref(),
                calls[0]["id"].as_str(),
                "{model}"
            );
            let structured = app
                .store
                .job(id(&seen["structured"]))
                .await
                .unwrap()
                .unwrap();
            assert!(
                structured.request.response_format.is_some(),
                "{model}: the format reached the job"
            );
        }
    }
    // Four calls per run (tool call, follow-up, json_schema, json_object), plain and streamed:
    // the Anthropic and Gemini ones on this test's simulator, the OpenAI ones on the app's.
    assert_eq!(sim.stats().total, 2 * 2 * 4, "{:?}", sim.stats());
    assert_eq!(app.sim.stats().total, 2 * 4, "{:?}", app.sim.stats());
    app.cleanup().await;
    sim.shutdown();
}

#[tokio::test]
async fn errors_reach_the_sdk_as_its_exceptions_and_are_not_retried_twice() {
    let rejecting = spawn_sim(Faults {
        always_fail: Some(400),
        ..Faults::default()
    })
    .await;
    let broken = spawn_sim(Faults {
        always_fail: Some(500),
        ..Faults::default()
    })
    .await;
    let pool = |name: &str, url: &str| {
        format!(
            "\n[[pools]]\nname = \"{name}\"\n[[pools.endpoints]]\nname = \"{name}-1\"\n\
             base_url = \"{url}\"\nmodel = \"m\"\napi_key = \"sk-sim-test\"\nrpm = 60000\n"
        )
    };
    let app = spawn_app(AppOptions {
        max_attempts: 2,
        retry_base_secs: 0.2,
        extra_routes: "rejecting = \"rejecting\"\nbroken = \"broken\"\n".into(),
        extra_toml: pool("rejecting", &rejecting.base_url()) + &pool("broken", &broken.base_url()),
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    let seen = chat("py3", &app, &pro, &["errors"]).await;
    // The unknown model, n=2 and the audio part: one attempt each, none retried.
    assert_eq!(seen["attempts"], 3, "{seen}");
    assert!(
        jobs_of(&app, "acme").await.is_empty(),
        "refused requests store nothing"
    );

    for sdk in ["py1", "py3"] {
        let seen = chat(sdk, &app, &pro, &["failing", "rejecting", "rejected"]).await;
        assert_eq!(seen["attempts"], 1, "{sdk}: {seen}");
        assert_eq!(seen["status"], 400);
        assert!(
            seen["message"]
                .as_str()
                .unwrap()
                .contains("Simulated client error"),
            "the provider's own words: {seen}"
        );
        let job = app
            .store
            .job(id(&seen["request_id"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Dead);
        assert_eq!(job.error_status, Some(400));

        let seen = chat(sdk, &app, &pro, &["failing", "broken", "broken"]).await;
        assert_eq!(
            seen["attempts"], 1,
            "Sluice retried; the SDK must not: {seen}"
        );
        assert_eq!(seen["status"], 502);
        let job = app
            .store
            .job(id(&seen["request_id"]))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Dead);
        assert_eq!(job.attempt, 2, "both of Sluice's attempts were made");
    }
    app.cleanup().await;
    rejecting.shutdown();
    broken.shutdown();
}

/// Sleep until just after the start of a quota window of `secs` (windows align to the epoch).
async fn align_to_window(secs: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into =
        Duration::from_millis(u64::try_from(now.as_millis() % (u128::from(secs) * 1000)).unwrap());
    tokio::time::sleep(Duration::from_secs(secs) - into + Duration::from_millis(100)).await;
}

/// Sleep past the next boundary of `secs`-long windows if it is less than `margin` away.
async fn avoid_window_edge(secs: u64, margin: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let left = secs - now.as_secs() % secs;
    if left <= margin {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
    }
}

#[tokio::test]
async fn a_quota_refusal_is_retried_after_its_wait_or_raised_when_the_wait_is_long() {
    let app = spawn_app(AppOptions {
        extra_toml: "[quotas.pro]\nuser = [{per = 10, limit = 1}]\n\
                     [quotas.basic]\nuser = [{per = 3600, limit = 1}]\n"
            .into(),
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    let basic = app.key("bobco", Tier::Basic).await;
    // 10 s: the SDK starts and its first request ends inside the window even on a busy machine.
    align_to_window(10).await;
    let seen = chat("py3", &app, &pro, &["quota", "short"]).await;
    assert_eq!(seen["attempts"], 3, "first, refused, retried: {seen}");
    // The SDK waited what Sluice said (the rest of the 10 s window) before it tried again.
    let (waited, told) = (
        seen["waited"].as_f64().unwrap(),
        seen["retry_after"].as_f64().unwrap(),
    );
    assert!(told > 0.0 && told <= 10.0, "{seen}");
    assert!(
        waited >= told - 0.01,
        "the SDK honoured retry-after-ms: {seen}"
    );
    let second = app.store.job(id(&seen["second"])).await.unwrap().unwrap();
    assert_eq!(second.state, JobState::Succeeded);
    assert_eq!(
        jobs_of(&app, "acme").await.len(),
        2,
        "the refusal stored nothing"
    );

    // Both of its requests in one hour-long window (windows align to the epoch), with a minute
    // to spare: on a busy machine the SDK's start and first answer can take many seconds.
    avoid_window_edge(3600, 60).await;
    let seen = chat("py1", &app, &basic, &["quota", "long"]).await;
    assert_eq!(
        seen["attempts"], 2,
        "the first, then one refused attempt: {seen}"
    );
    assert_eq!(seen["should_retry"], "false");
    assert_eq!(seen["code"], "rate_limit_exceeded");
    app.cleanup().await;
}

#[tokio::test]
async fn sampled_requests_are_fresh_and_deterministic_ones_come_from_the_cache() {
    let app = spawn_app(AppOptions {
        extra_routes: "same = { pools = [\"sim\"], reuse_samples = true }\n".into(),
        ..AppOptions::default()
    })
    .await;
    let pro = app.key("acme", Tier::Pro).await;
    let seen = chat("py2", &app, &pro, &["reuse"]).await;
    let ids: Vec<RequestId> = seen["ids"].as_array().unwrap().iter().map(id).collect();
    assert_eq!(
        ids.iter().collect::<std::collections::BTreeSet<_>>().len(),
        4,
        "each request is a job of its own"
    );
    assert_eq!(
        seen["caches"],
        serde_json::json!([null, null, null, "exact"]),
        "only the second greedy request is reused"
    );
    assert_eq!(
        app.sim.stats().total,
        3,
        "both samples and the first greedy call reached the provider"
    );
    let reused = app.store.job(ids[3]).await.unwrap().unwrap();
    assert_eq!(reused.cached.map(|c| c.as_str()), Some("exact"));

    // A key that opted in reuses samples too.
    let reusing = app
        .store
        .create_api_key(&sluice_core::Principal {
            tenant: "reusing".into(),
            user: "u".into(),
            tier: Tier::Pro,
            email: None,
            reuse_samples: true,
        })
        .await
        .unwrap();
    let seen = chat("py3", &app, &reusing, &["reuse"]).await;
    assert_eq!(
        seen["caches"],
        serde_json::json!([null, "exact", null, "exact"]),
        "the second of each pair is reused"
    );
    // So does a route that opted in, for any key.
    let seen = chat("py3", &app, &pro, &["reuse", "same"]).await;
    assert_eq!(
        seen["caches"],
        serde_json::json!([null, "exact", null, "exact"])
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_held_request_is_cancelled_past_its_wait_or_after_its_client_leaves() {
    let app = spawn_app(AppOptions {
        extra_toml: "[openai]\nmax_wait_secs = 60\ndisconnect_grace_secs = 3\n".into(),
        ..AppOptions::default()
    })
    .await;
    app.store.pause("lane:priority", "test").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The client gives up after 1 s and does not retry: its job is cancelled after the grace.
    let gone = app.key("gone", Tier::Pro).await;
    let seen = chat("py3", &app, &gone, &["timeout", "1", "0"]).await;
    assert_eq!(seen["outcome"], "timeout", "{seen}");
    app.wait_for(
        "the abandoned job to be cancelled",
        Duration::from_secs(15),
        || async {
            matches!(
                jobs_of(&app, "gone").await.as_slice(),
                [(_, JobState::Cancelled)]
            )
        },
    )
    .await;

    // Held past the wait the client allows (its 11 s timeout less 5 s, shorter than the 60 s
    // maximum): 503 queue_timeout, and the job is cancelled.
    let patient = app.key("patient", Tier::Pro).await;
    let seen = chat("py1", &app, &patient, &["timeout", "11", "0"]).await;
    assert_eq!(seen["outcome"], "status", "{seen}");
    assert_eq!(seen["status"], 503);
    assert_eq!(seen["code"], "queue_timeout");
    assert!(seen["retry_after"].is_string(), "{seen}");
    let elapsed = seen["elapsed"].as_f64().unwrap();
    assert!((5.5..10.0).contains(&elapsed), "held about 6 s: {elapsed}");
    assert_eq!(
        app.state(id(&seen["request_id"])).await,
        JobState::Cancelled
    );

    // The SDK's own retry of a request that timed out takes up the job it left, which
    // succeeds once the lane runs again: one job for both attempts.
    let retrying = app.key("retrying", Tier::Pro).await;
    let command = {
        let mut c = python("py3", &app, "chat.py", &["timeout", "5", "2"]).await;
        c.env("SLUICE_KEY", &retrying);
        c
    };
    let running = tokio::spawn(run(command));
    // The first attempt times out 5 s after it is sent and its retry comes within a second,
    // while the lane is still paused: the retry finds the job detached. The clock starts when
    // the job exists, not when Python starts (importing the SDK takes seconds on a busy box).
    app.wait_for(
        "the first attempt's job",
        Duration::from_secs(30),
        || async { !jobs_of(&app, "retrying").await.is_empty() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(7)).await;
    app.store.resume("lane:priority").await.unwrap();
    let seen = running.await.unwrap();
    assert_eq!(seen["outcome"], "ok", "{seen}");
    assert!(seen["attempts"].as_u64().unwrap() >= 2, "{seen}");
    let jobs = jobs_of(&app, "retrying").await;
    assert_eq!(jobs.len(), 1, "the retry took up the first job: {jobs:?}");
    assert_eq!(jobs[0], (id(&seen["request_id"]), JobState::Succeeded));
    app.cleanup().await;
}
