//! End-to-end tests of the simulator's OpenAI embeddings route over real HTTP.
//! They pin the wire format, the vector's properties and that embeddings leave chat numbers alone.
#![allow(clippy::unwrap_used)]

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use sluice_sim::{Faults, SimConfig, SimHandle, SimStats};

mod common;

use common::{keyed, start, KEY};

async fn embed_at(client: &Client, url: &str, key: Option<&str>, body: &Value) -> Response {
    let mut req = client.post(url).json(body);
    if let Some(key) = key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap()
}

async fn embed(client: &Client, sim: &SimHandle, key: Option<&str>, body: &Value) -> Response {
    let url = format!("{}/embeddings", sim.base_url());
    embed_at(client, &url, key, body).await
}

async fn vector(client: &Client, sim: &SimHandle, text: &str) -> Vec<f32> {
    let resp = embed(
        client,
        sim,
        Some(KEY),
        &json!({"model": "e", "input": text}),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

async fn chat(client: &Client, sim: &SimHandle) -> StatusCode {
    let body = json!({"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}]});
    client
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
}

/// The chat counters of `stats`, which embeddings must never move.
fn chat_counts(stats: &SimStats) -> (u64, u64, u64, u64, u64) {
    (
        stats.total,
        stats.ok,
        stats.failed,
        stats.rate_limited,
        stats.by_key.values().sum(),
    )
}

#[tokio::test]
async fn answers_in_openai_shape_on_both_paths() {
    let (sim, client) = start(keyed(None)).await;
    let body = json!({"model": "text-embedding-3-small", "input": "What is the capital of France?",
                      "encoding_format": "float", "user": "ignored"});
    let resp = embed(&client, &sim, Some(KEY), &body).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["x-ratelimit-limit-requests"]
            .to_str()
            .unwrap(),
        "600"
    );
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "text-embedding-3-small");
    // 30 chars, 4 to a token.
    assert_eq!(v["usage"], json!({"prompt_tokens": 8, "total_tokens": 8}));
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(
        (&data[0]["object"], &data[0]["index"]),
        (&json!("embedding"), &json!(0))
    );
    let first: Vec<f32> = serde_json::from_value(data[0]["embedding"].clone()).unwrap();
    assert_eq!(first.len(), 256);
    assert!((dot(&first, &first) - 1.0).abs() < 1e-5);

    // The same vector on the path without /v1, and for the same words in another case.
    let bare = format!("http://{}/embeddings", sim.addr());
    let body = json!({"model": "m", "input": "what is the capital of france"});
    let v: Value = embed_at(&client, &bare, Some(KEY), &body)
        .await
        .json()
        .await
        .unwrap();
    let again: Vec<f32> = serde_json::from_value(v["data"][0]["embedding"].clone()).unwrap();
    assert_eq!(again, first);
    assert_eq!(sim.stats().embeddings, 2);
}

#[tokio::test]
async fn arrays_dimensions_and_base64() {
    let (sim, client) = start(keyed(None)).await;
    let body = json!({"model": "m", "input": ["first text", "second text"], "dimensions": 32});
    let v: Value = embed(&client, &sim, Some(KEY), &body)
        .await
        .json()
        .await
        .unwrap();
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    for (i, item) in data.iter().enumerate() {
        assert_eq!(item["index"], i);
        assert_eq!(item["embedding"].as_array().unwrap().len(), 32);
    }
    // 10 + 11 chars: 3 + 3 tokens.
    assert_eq!(v["usage"]["prompt_tokens"], 6);

    let body =
        json!({"model": "m", "input": "first text", "dimensions": 32, "encoding_format": "base64"});
    let v: Value = embed(&client, &sim, Some(KEY), &body)
        .await
        .json()
        .await
        .unwrap();
    let text = v["data"][0]["embedding"].as_str().unwrap();
    // 32 floats = 128 bytes = 172 base64 characters with padding.
    assert_eq!(text.len(), 172);
    assert_eq!(sim.stats().embeddings, 2, "one call, however many inputs");
}

#[tokio::test]
async fn similar_prompts_are_close_and_unrelated_ones_far() {
    let (sim, client) = start(keyed(None)).await;
    let long = "please write a short and friendly email to the whole team explaining that the \
        quarterly planning meeting has moved from tuesday morning to thursday afternoon because \
        the main conference room is being renovated this week";
    let a = vector(&client, &sim, long).await;
    let b = vector(&client, &sim, &long.replace("friendly", "polite")).await;
    let c = vector(&client, &sim, "Summarise this contract for a ten year old.").await;
    let near = dot(&a, &b);
    assert!((0.95..0.96).contains(&near), "{near}");
    let far = dot(&a, &c);
    assert!(far < 0.3, "{far}");
}

#[tokio::test]
async fn errors_use_openai_shapes_and_count_only_as_embeddings() {
    let (sim, client) = start(keyed(None)).await;
    let ok = json!({"model": "m", "input": "hi"});
    let resp = embed(&client, &sim, Some("sk-wrong"), &ok).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_api_key"
    );
    let resp = embed(&client, &sim, None, &ok).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);

    for (body, needle) in [
        (json!({"model": "m", "input": ""}), "'$.input' is invalid"),
        (json!({"model": "m", "input": []}), "'$.input' is invalid"),
        (json!({"model": "m"}), "'input' is a required property"),
        (json!({"input": "hi"}), "model"),
        (
            json!({"model": "m", "input": "hi", "dimensions": 0}),
            "dimensions",
        ),
    ] {
        let resp = embed(&client, &sim, Some(KEY), &body).await;
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(needle), "{body}: {message}");
    }
    let resp = client
        .post(format!("{}/embeddings", sim.base_url()))
        .bearer_auth(KEY)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Authenticated calls count, whatever their outcome; chat counters stay at zero.
    let stats = sim.stats();
    assert_eq!(stats.embeddings, 6);
    assert_eq!(chat_counts(&stats), (0, 0, 0, 0, 0));
    let remote: Value = client
        .get(format!("http://{}/sim/stats", sim.addr()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(remote["embeddings"], 6);
    sim.reset();
    assert_eq!(sim.stats().embeddings, 0);
}

#[tokio::test]
async fn embeddings_have_their_own_bucket_per_key() {
    // 60 rpm with one second of burst: one call, then 429 for about a second.
    let (sim, client) = start(keyed(Some(60))).await;
    let body = json!({"model": "m", "input": "hi"});
    assert_eq!(
        embed(&client, &sim, Some(KEY), &body).await.status(),
        StatusCode::OK
    );
    let limited = embed(&client, &sim, Some(KEY), &body).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.headers()["retry-after"].to_str().unwrap(), "1");
    let v: Value = limited.json().await.unwrap();
    assert_eq!(v["error"]["code"], "rate_limit_exceeded");
    // The chat budget of the same key is untouched.
    assert_eq!(chat(&client, &sim).await, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!(stats.embeddings, 2);
    assert_eq!(chat_counts(&stats), (1, 1, 0, 0, 1));
}

#[tokio::test]
async fn provider_wide_faults_apply_and_per_call_counts_stay_with_chat() {
    let (sim, client) = start(SimConfig {
        faults: Faults {
            always_fail: Some(503),
            ..Faults::default()
        },
        ..keyed(None)
    })
    .await;
    let body = json!({"model": "m", "input": "hi"});
    let resp = embed(&client, &sim, Some(KEY), &body).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["type"],
        "server_error"
    );

    sim.set_faults(Faults {
        rate_limit_retry_after_secs: Some(7),
        ..Faults::default()
    });
    let resp = embed(&client, &sim, Some(KEY), &body).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"].to_str().unwrap(), "7");

    // fail_first counts chat calls: the embedding succeeds and the first chat call fails.
    sim.set_faults(Faults {
        fail_first: 1,
        ..Faults::default()
    });
    assert_eq!(
        embed(&client, &sim, Some(KEY), &body).await.status(),
        StatusCode::OK
    );
    assert_eq!(chat(&client, &sim).await, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(chat(&client, &sim).await, StatusCode::OK);
    let stats = sim.stats();
    assert_eq!(stats.embeddings, 3);
    assert_eq!(chat_counts(&stats), (2, 1, 1, 0, 2));
}
