//! Admission end to end: quotas across API nodes, the exact and semantic caches, identical jobs
//! sharing one provider call, load shedding by tier, budgets and cost, complexity routing and
//! the estimated wait against the real one.

use crate::helpers::{greedy_body, job_body, spawn_app, AppOptions, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::{JobState, Principal, RequestId, Tier};
use sluice_sim::{Latency, SimConfig};
use std::time::{Duration, Instant};

fn sim_with_latency(ms: u64) -> SimConfig {
    SimConfig {
        default_rpm: 0,
        latency: Latency::Fixed { ms },
        ..SimConfig::default()
    }
}

async fn key_for(app: &TestApp, tenant: &str, user: &str, tier: Tier) -> String {
    app.store
        .create_api_key(&Principal {
            tenant: tenant.into(),
            user: user.into(),
            tier,
            email: None,
            reuse_samples: false,
        })
        .await
        .unwrap()
}

/// POST a job to one API node; the status, the `Retry-After` header and the body.
async fn post_to(
    app: &TestApp,
    api: &str,
    key: &str,
    body: &Value,
) -> (StatusCode, Option<u64>, Value) {
    let response = app
        .http
        .post(format!("{api}/v1/jobs"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    (status, retry_after, response.json().await.unwrap())
}

fn id_of(body: &Value) -> RequestId {
    body["request_id"].as_str().unwrap().parse().unwrap()
}

async fn succeeded(app: &TestApp, key: &str, id: RequestId) -> Value {
    app.wait_terminal(&[id], Duration::from_secs(60)).await;
    let (status, job) = app.get_job(key, id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["state"], "succeeded", "{job}");
    job
}

/// Poll `/readyz` until the API reports this load level; its answer then.
async fn wait_for_load_level(app: &TestApp, level: &str, timeout: Duration) -> Value {
    let ready = format!("{}/readyz", app.api);
    let deadline = Instant::now() + timeout;
    loop {
        let answer: Value = app
            .http
            .get(&ready)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if answer["load"]["level"] == level {
            return answer;
        }
        assert!(Instant::now() < deadline, "load never {level}: {answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sleep until `offset` into the next window of `window` seconds (windows start at the epoch).
async fn align_to_window(window: u64, offset: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into = Duration::from_nanos((now.as_nanos() % u128::from(window * 1_000_000_000)) as u64);
    tokio::time::sleep(Duration::from_secs(window) - into + offset).await;
}

#[tokio::test]
async fn quotas_hold_across_two_api_nodes_and_reset_with_their_window() {
    let mut app = spawn_app(AppOptions {
        redis: true,
        extra_toml: "[quotas.pro]\nuser = [{ per = 4, limit = 3 }]\n\
                     tenant = [{ per = 4, limit = 5 }]\n"
            .into(),
        ..AppOptions::default()
    })
    .await;
    let (_node_b, api_b) = app.start_api_node().await;
    let nodes = [app.api.clone(), api_b];
    let ada = key_for(&app, "acme", "ada", Tier::Pro).await;
    let bob = key_for(&app, "acme", "bob", Tier::Pro).await;
    let mut n = 0;
    let mut body = || {
        n += 1;
        job_body(&format!("quota job {n}"))
    };

    align_to_window(4, Duration::from_millis(100)).await;
    // Ada's three go through, alternating nodes; her fourth is refused on whichever node.
    for i in 0..3 {
        let (status, _, b) = post_to(&app, &nodes[i % 2], &ada, &body()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    }
    let (status, retry_after, b) = post_to(&app, &nodes[1], &ada, &body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert_eq!(b["error"]["code"], "quota_exceeded");
    assert_eq!(b["error"]["limit"]["scope"], "user");
    assert_eq!(b["error"]["limit"]["limit"], 3);
    assert!(
        b["error"]["message"].as_str().unwrap().contains("ada"),
        "{b}"
    );
    let retry_after = retry_after.expect("Retry-After");
    assert!((1..=4).contains(&retry_after), "{retry_after}");
    // Bob has his own user quota, but the tenant's 5 are shared: his third is refused.
    for i in 0..2 {
        let (status, _, b) = post_to(&app, &nodes[i % 2], &bob, &body()).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    }
    let (status, _, b) = post_to(&app, &nodes[0], &bob, &body()).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{b}");
    assert_eq!(b["error"]["limit"]["scope"], "tenant");
    assert_eq!(app.total_jobs().await, 5, "refused requests store nothing");

    // The next window starts afresh.
    align_to_window(4, Duration::from_millis(100)).await;
    let (status, _, b) = post_to(&app, &nodes[1], &ada, &body()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    app.cleanup().await;
}

#[tokio::test]
async fn an_identical_job_is_answered_from_cache_within_its_tenant_only() {
    let app = spawn_app(AppOptions::default()).await;
    let acme = app.key("acme", Tier::Pro).await;
    let other = app.key("other", Tier::Pro).await;
    let body = greedy_body("What is the capital of France?");

    let first = id_of(&app.post_job(&acme, &body).await.1);
    let answer = succeeded(&app, &acme, first).await;
    assert_eq!(answer["cached"], false);
    let calls = app.sim.stats().total;
    assert_eq!(calls, 1);

    let (status, hit) = app.post_job(&acme, &body).await;
    assert_eq!(status, StatusCode::OK, "answered at once: {hit}");
    assert_eq!(hit["state"], "succeeded");
    assert_eq!(hit["cached"], true);
    assert_eq!(hit["cache"], "exact");
    assert_eq!(hit["result"]["content"], answer["result"]["content"]);
    assert_ne!(id_of(&hit), first, "a job of its own");
    assert_eq!(app.sim.stats().total, calls, "no provider call");
    let (_, polled) = app.get_job(&acme, id_of(&hit)).await;
    assert_eq!(polled["cached"], true);

    // Another tenant never sees acme's answers.
    let (status, theirs) = app.post_job(&other, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{theirs}");
    succeeded(&app, &other, id_of(&theirs)).await;
    assert_eq!(app.sim.stats().total, calls + 1);

    // Opting out asks the provider again.
    let mut fresh = body.clone();
    fresh["cache"] = json!(false);
    let (status, b) = app.post_job(&acme, &fresh).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    let job = succeeded(&app, &acme, id_of(&b)).await;
    assert_eq!(job["cached"], false);
    assert_eq!(app.sim.stats().total, calls + 2);

    // A sampled request (no temperature) asks for a fresh sample, twice over; `cache: true`
    // lets it take the answer of the sampled one before it.
    let sampled = job_body("Tell me a story.");
    for n in 0..2 {
        let (status, b) = app.post_job(&acme, &sampled).await;
        assert_eq!(status, StatusCode::ACCEPTED, "sample {n}: {b}");
        let job = succeeded(&app, &acme, id_of(&b)).await;
        assert_eq!(job["cached"], false, "{job}");
    }
    assert_eq!(app.sim.stats().total, calls + 4);
    let mut allowed = sampled.clone();
    allowed["cache"] = json!(true);
    let (status, b) = app.post_job(&acme, &allowed).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "the earlier samples left no hash: {b}"
    );
    succeeded(&app, &acme, id_of(&b)).await;
    let (status, b) = app.post_job(&acme, &allowed).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "answered from the opted-in sample: {b}"
    );
    assert_eq!(b["cache"], "exact");
    assert_eq!(app.sim.stats().total, calls + 5);
    app.cleanup().await;
}

#[tokio::test]
async fn fifty_identical_concurrent_jobs_make_one_provider_call_and_fifty_results() {
    let app = spawn_app(AppOptions {
        sim: sim_with_latency(1500),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let body = greedy_body("Summarise the plot of Hamlet in one line.");
    let posts = (0..50).map(|_| app.post_job(&key, &body));
    let answers = futures::future::join_all(posts).await;
    let mut ids = Vec::new();
    for (status, b) in &answers {
        assert_eq!(*status, StatusCode::ACCEPTED, "{b}");
        ids.push(id_of(b));
    }
    let attached = answers
        .iter()
        .filter(|(_, b)| b.get("attached_to").is_some())
        .count();
    assert_eq!(attached, 49, "all but one attach to the first");
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    let mut contents = std::collections::BTreeSet::new();
    let mut deduplicated = 0;
    for id in &ids {
        let (_, job) = app.get_job(&key, *id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        contents.insert(job["result"]["content"].as_str().unwrap().to_owned());
        deduplicated += usize::from(job["cache"] == "dedup");
    }
    assert_eq!(contents.len(), 1, "one answer for all");
    assert_eq!(deduplicated, 49);
    assert_eq!(app.sim.stats().total, 1, "exactly one provider call");
    app.cleanup().await;
}

#[tokio::test]
async fn under_heavy_load_free_jobs_are_refused_while_pro_jobs_enter_until_the_backlog_drains() {
    // One job at a time, 1.5 s each: the provider drains the batch lane slowly.
    let app = spawn_app(AppOptions {
        sim: sim_with_latency(1500),
        concurrency: 1,
        extra_toml: "[shedding]\nrefresh_ms = 200\n[shedding.targets]\nfree = 3\n".into(),
        ..AppOptions::default()
    })
    .await;
    let free = app.key("freebie", Tier::Free).await;
    let pro = app.key("payer", Tier::Pro).await;
    // Sent at once: once the first job starts, the lane reads as heavy within a refresh, and
    // later ones may already be refused (which is the point).
    let bodies: Vec<Value> = (0..10).map(|n| job_body(&format!("backlog {n}"))).collect();
    let posts = bodies.iter().map(|body| app.post_job(&free, body));
    let mut backlog = Vec::new();
    for (status, b) in futures::future::join_all(posts).await {
        match status {
            StatusCode::ACCEPTED => backlog.push(id_of(&b)),
            StatusCode::SERVICE_UNAVAILABLE => assert_eq!(b["error"]["code"], "overloaded"),
            other => panic!("{other}: {b}"),
        }
    }
    assert!(backlog.len() >= 3, "{} accepted", backlog.len());
    let load = wait_for_load_level(&app, "heavy", Duration::from_secs(20)).await;
    let reason = load["load"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("batch") && reason.contains("free"),
        "{reason}"
    );

    let (status, retry_after, b) =
        post_to(&app, &app.api, &free, &job_body("one more free job")).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{b}");
    assert_eq!(b["error"]["code"], "overloaded");
    assert!(
        retry_after.is_some_and(|s| s >= 1),
        "Retry-After: {retry_after:?}"
    );
    let (status, _, b) = post_to(&app, &app.api, &pro, &job_body("a pro job")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    let pro_job = id_of(&b);

    app.wait_terminal(&backlog, Duration::from_secs(60)).await;
    app.wait_terminal(&[pro_job], Duration::from_secs(30)).await;
    wait_for_load_level(&app, "normal", Duration::from_secs(10)).await;
    let (status, _, b) = post_to(&app, &app.api, &free, &job_body("free again")).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    app.cleanup().await;
}

#[tokio::test]
async fn a_tenant_past_80_percent_of_its_budget_goes_to_the_cheaper_pool_and_at_100_is_refused() {
    // $0.01 a token on the main pool, a tenth of that on the small one.
    let extra = "[budgets]\ncheaper_at = 0.8\n[budgets.tenants]\nthrifty = 1.0\n".to_owned();
    let app = spawn_app(AppOptions {
        default_route: "{ pools = [\"sim\"], cheaper = \"small\" }",
        extra_pools: vec![("small", 60_000)],
        extra_toml: extra,
        ..AppOptions::default()
    })
    .await;
    // The helper's pools have no price: add them to the config the processes read.
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    let config = config
        .replacen(
            "timeout_secs = 10\n",
            "timeout_secs = 10\nprice = { input_per_mtok = 10000, output_per_mtok = 10000 }\n",
            1,
        )
        .replacen(
            "burst = 1\n",
            "burst = 1\nprice = { input_per_mtok = 1000, output_per_mtok = 1000 }\n",
            1,
        );
    std::fs::write(&app.config_path, config).unwrap();
    let mut app = app;
    app.restart_api_and_workers().await;
    let key = app.key("thrifty", Tier::Pro).await;

    // A deterministic job answered before the budget runs out: its answer stays reusable.
    let remembered = greedy_body("asked before the budget ran out");
    let (status, _, b) = post_to(&app, &app.api, &key, &remembered).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{b}");
    let first = succeeded(&app, &key, id_of(&b)).await;
    let mut spent = first["cost_usd"].as_f64().unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut cheaper_seen = false;
    for n in 0..200 {
        let (status, _, b) =
            post_to(&app, &app.api, &key, &job_body(&format!("budget job {n}"))).await;
        if status == StatusCode::PAYMENT_REQUIRED {
            assert_eq!(b["error"]["code"], "budget_exhausted", "{b}");
            assert!(spent >= 1.0, "refused at ${spent}");
            assert!(cheaper_seen, "past 80% jobs went to the cheaper pool first");
            // An answer the cache already holds costs nothing: it is not refused.
            let (status, _, hit) = post_to(&app, &app.api, &key, &remembered).await;
            assert_eq!(status, StatusCode::OK, "answered, not refused: {hit}");
            assert_eq!(hit["cache"], "exact", "{hit}");
            assert_eq!(hit["result"], first["result"]);
            app.cleanup().await;
            return;
        }
        assert_eq!(status, StatusCode::ACCEPTED, "{b}");
        let job = succeeded(&app, &key, id_of(&b)).await;
        let usage = &job["result"]["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_f64().unwrap(),
            usage["completion_tokens"].as_f64().unwrap(),
        );
        let small = job["endpoint"] == "small-1";
        let per_token = if small { 0.001 } else { 0.01 };
        let cost = job["cost_usd"].as_f64().unwrap();
        assert!(
            (cost - (prompt + completion) * per_token).abs() < 1e-9,
            "cost {cost} = usage x price ({prompt} + {completion}) x {per_token}"
        );
        if spent >= 0.8 {
            assert!(
                small,
                "at ${spent:.3} of $1 the job must use the cheaper pool: {job}"
            );
            assert_eq!(job["route"], "small");
            assert!(
                job["route_reason"].as_str().unwrap().contains("budget"),
                "{job}"
            );
            cheaper_seen = true;
        } else {
            assert!(!small, "below 80% the route's own pool serves: {job}");
        }
        spent += cost;
        // The API trusts a tenant's spend for a second.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    panic!("never refused; spent ${spent}");
}

#[tokio::test]
async fn the_auto_route_sends_simple_prompts_to_the_small_pool_and_complex_ones_to_the_large() {
    let app = spawn_app(AppOptions {
        extra_pools: vec![("small", 60_000)],
        extra_toml: "[routes.auto]\nclassify = { simple = \"small\", complex = \"sim\" }\n".into(),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let simple = app.submit_model(&key, "auto", "Hi, how are you?").await;
    let complex = app
        .submit_model(
            &key,
            "auto",
            "Fix this:\n```rust\nfn main() { let x = ; }\n```",
        )
        .await;
    let simple = succeeded(&app, &key, simple).await;
    let complex = succeeded(&app, &key, complex).await;
    assert_eq!(
        (simple["route"].as_str(), simple["endpoint"].as_str()),
        (Some("small"), Some("small-1"))
    );
    assert!(
        simple["route_reason"]
            .as_str()
            .unwrap()
            .contains("short plain prompt"),
        "{simple}"
    );
    assert_eq!(
        (complex["route"].as_str(), complex["endpoint"].as_str()),
        (Some("sim"), Some("sim-1"))
    );
    assert!(
        complex["route_reason"]
            .as_str()
            .unwrap()
            .contains("code block"),
        "{complex}"
    );
    assert_eq!(simple["model"], "auto", "the caller's alias is kept");
    app.cleanup().await;
}

#[tokio::test]
async fn a_question_worded_alike_is_answered_from_the_semantic_cache() {
    let app = spawn_app(AppOptions::default()).await;
    let config = std::fs::read_to_string(&app.config_path).unwrap();
    let config = config.replacen(
        "[routes]\n",
        "[routes]\nsimilar = { pools = [\"sim\"], semantic_cache = true }\n",
        1,
    ) + &format!(
        "\n[semantic_cache]\nthreshold = 0.95\n[semantic_cache.embeddings]\nbase_url = \"{}\"\n\
         model = \"sim-embed\"\napi_key = \"sk-sim-test\"\n",
        app.sim.base_url()
    );
    std::fs::write(&app.config_path, config).unwrap();
    let mut app = app;
    app.restart_api_and_workers().await;
    let acme = app.key("acme", Tier::Pro).await;
    let other = app.key("other", Tier::Pro).await;

    let mut question = greedy_body("What is the capital of France?");
    question["model"] = json!("similar");
    let first = id_of(&app.post_job(&acme, &question).await.1);
    let answer = succeeded(&app, &acme, first).await;
    let mut alike = greedy_body("what is the capital of france");
    alike["model"] = json!("similar");
    let (status, hit) = app.post_job(&acme, &alike).await;
    assert_eq!(status, StatusCode::OK, "{hit}");
    assert_eq!(hit["cache"], "semantic");
    assert_eq!(hit["result"]["content"], answer["result"]["content"]);
    assert_eq!(app.sim.stats().total, 1, "one chat call in all");
    assert_eq!(app.sim.stats().embeddings, 2);

    let mut different = greedy_body("What is the capital of Spain?");
    different["model"] = json!("similar");
    let (status, b) = app.post_job(&acme, &different).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "a different question is asked: {b}"
    );
    let (status, b) = app.post_job(&other, &alike).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "another tenant's cache is its own: {b}"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_estimated_wait_of_a_queued_job_is_within_twice_the_real_one_in_steady_state() {
    // One worker slot at 0.5 s a call drains 2 jobs a second; 2 a second arrive.
    let app = spawn_app(AppOptions {
        sim: sim_with_latency(500),
        concurrency: 1,
        // The monitor estimates waits with shedding off too; on, the backlog would trip it.
        extra_toml: "[shedding]\nenabled = false\nrefresh_ms = 250\ndrain_window_secs = 6\n".into(),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Basic).await;
    let mut sampled = Vec::new();
    for n in 0..8 {
        app.submit(&key, &format!("backlog {n}")).await;
    }
    let start = Instant::now();
    let mut n = 0;
    while start.elapsed() < Duration::from_secs(27) {
        n += 1;
        let (status, b) = app.post_job(&key, &job_body(&format!("steady {n}"))).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{b}");
        // After the drain window has filled, every job's estimate is checked.
        if start.elapsed() > Duration::from_secs(9) {
            sampled.push((
                id_of(&b),
                b["estimated_wait_secs"].as_f64(),
                b["position"].clone(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let ids: Vec<RequestId> = sampled.iter().map(|(id, _, _)| *id).collect();
    app.wait_terminal(&ids, Duration::from_secs(120)).await;
    let mut ratios = Vec::new();
    for (id, estimate, position) in &sampled {
        let job = app.store.job(*id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        let actual = (job.started_at.unwrap() - job.created_at).num_milliseconds() as f64 / 1000.0;
        let estimate = estimate.unwrap_or_else(|| panic!("no estimate for {id} at {position}"));
        ratios.push((estimate, actual));
        assert!(
            actual > 0.5 * estimate && actual < 2.0 * estimate,
            "estimated {estimate:.2} s at position {position}, waited {actual:.2} s; all: {ratios:?}"
        );
    }
    assert!(ratios.len() >= 30, "{} sampled", ratios.len());
    let ratio = |(estimate, actual): &(f64, f64)| actual / estimate;
    let worst = ratios
        .iter()
        .map(ratio)
        .fold((f64::MAX, 0.0_f64), |(lo, hi), r| (lo.min(r), hi.max(r)));
    eprintln!(
        "{} jobs: actual / estimated wait between {:.2} and {:.2}",
        ratios.len(),
        worst.0,
        worst.1
    );
    app.cleanup().await;
}

#[tokio::test]
async fn jobs_attached_to_one_whose_worker_is_killed_all_finish_once_it_is_retried() {
    let mut app = spawn_app(AppOptions {
        processes: true,
        sim: sim_with_latency(3000),
        ..AppOptions::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let body = greedy_body("a slow question asked twenty times");
    let posts = (0..20).map(|_| app.post_job(&key, &body));
    let ids: Vec<RequestId> = futures::future::join_all(posts)
        .await
        .iter()
        .map(|(status, b)| {
            assert_eq!(*status, StatusCode::ACCEPTED, "{b}");
            id_of(b)
        })
        .collect();
    app.wait_for("the one call to start", Duration::from_secs(10), || async {
        app.count(JobState::Running).await == 1
    })
    .await;
    app.kill_worker(0).await;
    app.start_worker().await;
    // The lease (5 s here) runs out, the job is retried, and its answer reaches all 20.
    app.wait_terminal(&ids, Duration::from_secs(60)).await;
    let mut contents = std::collections::BTreeSet::new();
    for id in &ids {
        let (_, job) = app.get_job(&key, *id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        contents.insert(job["result"]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(contents.len(), 1);
    let calls = app.sim.stats().total;
    assert!(
        (1..=2).contains(&calls),
        "the killed call and its retry at most: {calls}"
    );
    app.cleanup().await;
}
