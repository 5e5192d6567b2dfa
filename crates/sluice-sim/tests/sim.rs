//! End-to-end tests: a real simulator on 127.0.0.1:0 driven over HTTP with reqwest.
//! They pin the wire behaviour other crates' tests and the worker's limiter depend on.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use sluice_sim::{Faults, Latency, SimConfig, SimHandle, SimKey};

mod common;

use common::{keyed, start, KEY};

fn body(text: &str) -> Value {
    json!({"model": "gpt-sim", "messages": [{"role": "user", "content": text}], "temperature": 0.2, "extra": true})
}

async fn call(
    client: &Client,
    sim: &SimHandle,
    key: &str,
    body: &Value,
    job: Option<&str>,
) -> Response {
    let mut req = client
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth(key)
        .json(body);
    if let Some(job) = job {
        req = req.header("x-sluice-request-id", job);
    }
    req.send().await.unwrap()
}

async fn statuses(client: &Client, sim: &SimHandle, n: usize, job: Option<&str>) -> Vec<u16> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(
            call(client, sim, KEY, &body("hi"), job)
                .await
                .status()
                .as_u16(),
        );
    }
    out
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

#[tokio::test]
async fn answers_in_openai_shape_with_usage() {
    let (sim, client) = start(keyed(None)).await;
    assert!(sim.base_url().starts_with("http://127.0.0.1:") && sim.base_url().ends_with("/v1"));
    let req = json!({"model": "gpt-sim", "max_tokens": 10, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "Hello, simulator!"}
    ]});
    let resp = call(&client, &sim, KEY, &req, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "600");
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "9");
    assert!(header(&resp, "x-ratelimit-reset-requests").ends_with("ms"));
    assert!(!header(&resp, "x-request-id").is_empty());

    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-sim-"));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["created"].as_i64().unwrap() > 1_600_000_000);
    assert_eq!(v["model"], "gpt-sim");
    let choice = &v["choices"][0];
    assert_eq!(
        (choice["index"].as_u64(), &choice["finish_reason"]),
        (Some(0), &json!("stop"))
    );
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(
        content.starts_with("Simulated reply to: Hello, simulator!"),
        "{content}"
    );
    assert_eq!(content.split_whitespace().count(), 10);
    // 8 + 17 characters -> ceil(25 / 4) = 7 prompt tokens.
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 10, "total_tokens": 17})
    );

    let stats = sim.stats();
    assert_eq!(
        (stats.total, stats.ok, stats.failed, stats.rate_limited),
        (1, 1, 0, 0)
    );
    assert_eq!(stats.by_key.get("main"), Some(&1));
    let remote = client
        .get(format!("http://{}/sim/stats", sim.addr()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        remote.contains("\"main\":1") && !remote.contains(KEY),
        "{remote}"
    );
}

#[tokio::test]
async fn unknown_or_missing_keys_get_401_and_azure_header_works() {
    let (sim, client) = start(keyed(None)).await;
    let resp = call(&client, &sim, "sk-wrong", &body("hi"), None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                         "param": null, "code": "invalid_api_key"}})
    );
    let url = format!("{}/chat/completions", sim.base_url());
    let resp = client.post(&url).json(&body("hi")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = client
        .post(&url)
        .header("api-key", KEY)
        .json(&body("hi"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let azure = format!(
        "http://{}/openai/deployments/dep-1/chat/completions?api-version=2024-06-01",
        sim.addr()
    );
    let no_model = json!({"messages": [{"role": "user", "content": "hi"}]});
    let resp = client
        .post(&azure)
        .header("api-key", KEY)
        .json(&no_model)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["model"], "dep-1");
    // Rejected calls are not counted; the two accepted ones are.
    assert_eq!(sim.stats().total, 2);
}

#[tokio::test]
async fn empty_bucket_gives_429_with_headers_then_recovers() {
    let (sim, client) = start(SimConfig {
        burst_seconds: 1.0,
        ..keyed(Some(60))
    })
    .await;
    let first = call(&client, &sim, KEY, &body("hi"), None).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(header(&first, "x-ratelimit-remaining-requests"), "0");

    let limited = call(&client, &sim, KEY, &body("hi"), None).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&limited, "retry-after"), "1");
    let wait_ms: u64 = header(&limited, "retry-after-ms").parse().unwrap();
    assert!((1..=1000).contains(&wait_ms), "{wait_ms}");
    assert_eq!(header(&limited, "x-ratelimit-limit-requests"), "60");
    assert_eq!(header(&limited, "x-ratelimit-remaining-requests"), "0");
    assert!(!header(&limited, "x-ratelimit-reset-requests").is_empty());
    assert!(!header(&limited, "x-request-id").is_empty());
    let v: Value = limited.json().await.unwrap();
    assert_eq!(v["error"]["type"], "requests");
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Rate limit reached for requests") && message.contains("Limit 60"),
        "{message}"
    );
    assert!(!message.contains(KEY));

    tokio::time::sleep(Duration::from_millis(wait_ms + 50)).await;
    assert_eq!(
        call(&client, &sim, KEY, &body("hi"), None).await.status(),
        StatusCode::OK
    );
    let stats = sim.stats();
    assert_eq!((stats.total, stats.ok, stats.rate_limited), (3, 2, 1));
}

#[tokio::test]
async fn without_configured_keys_each_key_gets_its_own_bucket() {
    let (sim, client) = start(SimConfig {
        default_rpm: 60,
        ..SimConfig::default()
    })
    .await;
    assert_eq!(
        call(&client, &sim, "sk-alpha-1", &body("hi"), None)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&client, &sim, "sk-alpha-1", &body("hi"), None)
            .await
            .status(),
        429
    );
    assert_eq!(
        call(&client, &sim, "sk-alpha-2", &body("hi"), None)
            .await
            .status(),
        StatusCode::OK
    );
    let stats = sim.stats();
    assert_eq!(stats.by_key.len(), 2);
    assert_eq!(stats.by_key.values().sum::<u64>(), 3);
    assert!(stats
        .by_key
        .keys()
        .all(|k| k.starts_with("anonymous-") && !k.contains("sk-alpha-1")));
}

#[tokio::test]
async fn fail_first_then_succeed() {
    let faults = Faults {
        fail_first: 2,
        fail_status: 503,
        ..Faults::default()
    };
    let (sim, client) = start(SimConfig {
        faults,
        ..keyed(None)
    })
    .await;
    let resp = call(&client, &sim, KEY, &body("hi"), None).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp
        .headers()
        .contains_key("x-ratelimit-remaining-requests"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"error": {"message": "The server had an error while processing your request.",
                         "type": "server_error", "param": null, "code": null}})
    );
    assert_eq!(statuses(&client, &sim, 3, None).await, [503, 200, 200]);
    assert_eq!((sim.stats().failed, sim.stats().ok), (2, 2));

    sim.reset();
    assert_eq!(sim.stats().total, 0);
    assert_eq!(statuses(&client, &sim, 3, None).await, [503, 503, 200]);
}

#[tokio::test]
async fn fail_first_per_job_counts_each_job() {
    let faults = Faults {
        fail_first_per_job: 2,
        ..Faults::default()
    };
    let (sim, client) = start(SimConfig {
        faults,
        ..keyed(None)
    })
    .await;
    assert_eq!(
        statuses(&client, &sim, 3, Some("job-a")).await,
        [500, 500, 200]
    );
    assert_eq!(statuses(&client, &sim, 1, Some("job-b")).await, [500]);
    assert_eq!(statuses(&client, &sim, 1, None).await, [200]);
    assert_eq!(statuses(&client, &sim, 2, Some("job-b")).await, [500, 200]);
    assert_eq!(sim.calls_for_job("job-a"), 3);
    assert_eq!(sim.calls_for_job("job-b"), 3);
    assert_eq!(sim.calls_for_job("job-c"), 0);
    let stats = sim.stats();
    assert_eq!(stats.by_job.get("job-a"), Some(&3));
    assert_eq!(stats.by_job.len(), 2);
    assert_eq!(stats.total, 7);
}

#[tokio::test]
async fn error_rate_one_and_zero() {
    let (sim, client) = start(SimConfig {
        faults: Faults {
            error_rate: 1.0,
            ..Faults::default()
        },
        ..keyed(None)
    })
    .await;
    assert_eq!(statuses(&client, &sim, 5, None).await, [500; 5]);
    sim.set_faults(Faults {
        error_rate: 0.0,
        ..Faults::default()
    });
    assert_eq!(statuses(&client, &sim, 5, None).await, [200; 5]);
    let stats = sim.stats();
    assert_eq!((stats.failed, stats.ok, stats.total), (5, 5, 10));
}

#[tokio::test]
async fn always_fail_uses_the_given_status() {
    let faults = Faults {
        always_fail: Some(400),
        ..Faults::default()
    };
    let (sim, client) = start(SimConfig {
        faults,
        ..keyed(None)
    })
    .await;
    let resp = call(&client, &sim, KEY, &body("hi"), None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    sim.set_faults(Faults {
        always_fail: Some(503),
        ..Faults::default()
    });
    let resp = call(&client, &sim, KEY, &body("hi"), None).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "server_error"
    );
}

#[tokio::test]
async fn control_endpoints() {
    let (sim, client) = start(keyed(None)).await;
    let base = format!("http://{}", sim.addr());
    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(
        (health.status(), health.text().await.unwrap()),
        (StatusCode::OK, "ok".to_owned())
    );

    let put = |v: Value| client.put(format!("{base}/sim/faults")).json(&v).send();
    assert_eq!(
        put(json!({"always_fail": 503})).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(
        call(&client, &sim, KEY, &body("hi"), None).await.status(),
        503
    );
    assert_eq!(
        put(json!({"bogus": 1})).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        put(json!({"error_rate": 2.0})).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    let current: Faults = client
        .get(format!("{base}/sim/faults"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        current,
        Faults {
            always_fail: Some(503),
            ..Faults::default()
        }
    );
    assert_eq!(put(json!({})).await.unwrap().status(), StatusCode::OK);
    assert_eq!(
        call(&client, &sim, KEY, &body("hi"), Some("j1"))
            .await
            .status(),
        200
    );

    let stats: Value = client
        .get(format!("{base}/sim/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (stats["total"].as_u64(), stats["failed"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(stats["by_job"], json!({"j1": 1}));
    let reset = client
        .post(format!("{base}/sim/reset"))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    assert_eq!(sim.stats().total, 0);
    assert_eq!(sim.calls_for_job("j1"), 0);
}

#[tokio::test]
async fn malformed_bodies_get_400() {
    let (sim, client) = start(keyed(None)).await;
    let url = format!("{}/chat/completions", sim.base_url());
    let bad_json = client
        .post(&url)
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_json.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        bad_json.json::<Value>().await.unwrap()["error"]["type"],
        "invalid_request_error"
    );
    let empty = call(
        &client,
        &sim,
        KEY,
        &json!({"model": "m", "messages": []}),
        None,
    )
    .await;
    assert_eq!(empty.status(), StatusCode::BAD_REQUEST);
    assert_eq!(sim.stats().failed, 2);
}

#[tokio::test]
async fn stream_deltas_concatenate_to_the_plain_content() {
    let (sim, client) = start(keyed(None)).await;
    let plain = body("Tell me a story about sluices, please");
    let v: Value = call(&client, &sim, KEY, &plain, None)
        .await
        .json()
        .await
        .unwrap();
    let expected = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let resp = call(&client, &sim, KEY, &streamed, None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let text = resp.text().await.unwrap();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "gpt-sim"));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    assert!(
        chunks.len() > 16,
        "one chunk per word expected, got {}",
        chunks.len()
    );
}

#[tokio::test]
async fn fixed_latency_delays_answers() {
    let (sim, client) = start(SimConfig {
        latency: Latency::Fixed { ms: 200 },
        ..keyed(None)
    })
    .await;
    let started = Instant::now();
    assert_eq!(
        call(&client, &sim, KEY, &body("hi"), None).await.status(),
        StatusCode::OK
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn many_concurrent_calls_and_shutdown() {
    let (sim, client) = start(SimConfig {
        default_rpm: 0,
        ..SimConfig::default()
    })
    .await;
    let calls = (0..200).map(|i| {
        let (sim, client) = (sim.clone(), client.clone());
        tokio::spawn(async move {
            call(
                &client,
                &sim,
                "sk-bench",
                &body("hi"),
                Some(&format!("j{i}")),
            )
            .await
            .status()
        })
    });
    for c in calls.collect::<Vec<_>>() {
        assert_eq!(c.await.unwrap(), StatusCode::OK);
    }
    let stats = sim.stats();
    assert_eq!((stats.ok, stats.total, stats.by_job.len()), (200, 200, 200));

    sim.shutdown();
    let fresh = Client::builder().no_proxy().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fresh
        .get(format!("http://{}/healthz", sim.addr()))
        .send()
        .await
        .is_ok()
    {
        assert!(
            Instant::now() < deadline,
            "simulator still answering after shutdown"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Rough throughput check for the zero-latency path: `cargo test -p sluice-sim -- --ignored`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "timing-dependent; run by hand"]
async fn throughput_smoke() {
    let (sim, client) = start(SimConfig {
        default_rpm: 0,
        ..SimConfig::default()
    })
    .await;
    let per_worker = 500;
    let started = Instant::now();
    let workers: Vec<_> = (0..32)
        .map(|w| {
            let (sim, client) = (sim.clone(), client.clone());
            tokio::spawn(async move {
                for i in 0..per_worker {
                    let job = format!("w{w}-{i}");
                    let resp = call(&client, &sim, "sk-bench", &body("hi"), Some(&job)).await;
                    assert_eq!(resp.status(), StatusCode::OK);
                    resp.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let rps = sim.stats().ok as f64 / started.elapsed().as_secs_f64();
    println!("{rps:.0} requests/s (client and server sharing the same cores)");
    assert!(rps > 1000.0, "{rps:.0} requests/s");
}

#[tokio::test]
async fn busiest_window_counts_each_keys_calls_in_any_window() {
    let sim = sluice_sim::spawn(
        SimConfig {
            keys: vec![SimKey {
                name: "one".into(),
                key: "sk-one".into(),
                rpm: Some(0),
            }],
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let call = || {
        http.post(format!("{}/chat/completions", sim.base_url()))
            .bearer_auth("sk-one")
            .json(
                &serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
            )
            .send()
    };
    for _ in 0..5 {
        call().await.unwrap();
    }
    tokio::time::sleep(std::time::Duration::from_millis(1_300)).await;
    for _ in 0..3 {
        call().await.unwrap();
    }
    let one_second = sim.busiest_window(std::time::Duration::from_secs(1));
    assert_eq!(one_second.get("one"), Some(&5));
    let long = sim.busiest_window(std::time::Duration::from_secs(60));
    assert_eq!(long.get("one"), Some(&8));
    sim.reset();
    assert_eq!(
        sim.busiest_window(std::time::Duration::from_secs(60))
            .get("one"),
        Some(&0)
    );
    sim.shutdown();
}
