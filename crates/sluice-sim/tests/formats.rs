//! End-to-end tests of the Anthropic and Gemini routes, hammer blocking and the retry-after fault.
//! They pin each format's wire shape and check that limits and counters are shared across formats.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use sluice_sim::{Faults, SimConfig, SimHandle};

mod common;

use common::{keyed, start, KEY};

const SYSTEM: &str = "be brief";
const PROMPT: &str = "Hello, simulator!";

fn openai_body() -> Value {
    json!({"model": "sim-model", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": PROMPT}]})
}

fn anthropic_body() -> Value {
    json!({"model": "sim-model", "max_tokens": 1024, "system": SYSTEM, "temperature": 0.2,
           "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]})
}

fn gemini_body() -> Value {
    json!({"systemInstruction": {"parts": [{"text": SYSTEM}]},
           "contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
           "generationConfig": {"temperature": 0.2}})
}

async fn openai(client: &Client, sim: &SimHandle, body: &Value, job: Option<&str>) -> Response {
    let mut req = client
        .post(format!("{}/chat/completions", sim.base_url()))
        .bearer_auth(KEY)
        .json(body);
    if let Some(job) = job {
        req = req.header("x-sluice-request-id", job);
    }
    req.send().await.unwrap()
}

async fn anthropic(
    client: &Client,
    sim: &SimHandle,
    key: &str,
    body: &Value,
    job: Option<&str>,
) -> Response {
    let mut req = client
        .post(format!("{}/messages", sim.base_url()))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(body);
    if let Some(job) = job {
        req = req.header("x-sluice-request-id", job);
    }
    req.send().await.unwrap()
}

/// `action` is `generateContent` or `streamGenerateContent?alt=sse`.
async fn gemini(
    client: &Client,
    sim: &SimHandle,
    action: &str,
    body: &Value,
    job: Option<&str>,
) -> Response {
    let mut req = client
        .post(format!(
            "{}/models/sim-model:{action}",
            sim.gemini_base_url()
        ))
        .header("x-goog-api-key", KEY)
        .json(body);
    if let Some(job) = job {
        req = req.header("x-sluice-request-id", job);
    }
    req.send().await.unwrap()
}

fn header<'a>(resp: &'a Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
}

/// The OpenAI answer for the shared conversation: (content, prompt tokens, completion tokens).
async fn openai_reference(client: &Client, sim: &SimHandle) -> (String, u64, u64) {
    let v: Value = openai(client, sim, &openai_body(), None)
        .await
        .json()
        .await
        .unwrap();
    (
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned(),
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        v["usage"]["completion_tokens"].as_u64().unwrap(),
    )
}

/// (event name, data) pairs of an SSE body; events without a name get "".
fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut name = String::new();
            let mut data = String::new();
            for line in e.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, serde_json::from_str(&data).unwrap())
        })
        .collect()
}

#[tokio::test]
async fn anthropic_messages_shape_matches_openai_content() {
    let (sim, client) = start(keyed(None)).await;
    let (content, prompt, completion) = openai_reference(&client, &sim).await;

    let resp = anthropic(&client, &sim, KEY, &anthropic_body(), Some("job-a")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-limit"), "600");
    // 10 per second refill: 8 left, or 9 if the machine paused between the two calls.
    let remaining = header(&resp, "anthropic-ratelimit-requests-remaining");
    assert!(remaining == "8" || remaining == "9", "{remaining}");
    let reset = header(&resp, "anthropic-ratelimit-requests-reset");
    assert!(
        chrono::DateTime::parse_from_rfc3339(reset).is_ok(),
        "{reset}"
    );
    let v: Value = resp.json().await.unwrap();
    assert!(v["id"].as_str().unwrap().starts_with("msg_sim_"), "{v}");
    assert_eq!(
        (&v["type"], &v["role"], &v["model"]),
        (&json!("message"), &json!("assistant"), &json!("sim-model"))
    );
    assert_eq!(v["content"], json!([{"type": "text", "text": content}]));
    assert_eq!(
        (&v["stop_reason"], &v["stop_sequence"]),
        (&json!("end_turn"), &Value::Null)
    );
    assert_eq!(
        v["usage"],
        json!({"input_tokens": prompt, "output_tokens": completion})
    );

    let mut streamed = anthropic_body();
    streamed["stream"] = json!(true);
    let resp = anthropic(&client, &sim, KEY, &streamed, Some("job-a")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let events = sse_events(&resp.text().await.unwrap());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names[..2], ["message_start", "content_block_start"]);
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"]
    );
    assert!(events.iter().all(|(n, d)| d["type"] == n.as_str()));
    assert_eq!(events[0].1["message"]["usage"]["input_tokens"], prompt);
    let text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, content);
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(delta["usage"]["output_tokens"], completion);
    assert_eq!(sim.calls_for_job("job-a"), 2);
}

#[tokio::test]
async fn anthropic_errors_use_its_envelope() {
    let (sim, client) = start(keyed(None)).await;
    let resp = anthropic(&client, &sim, "sk-wrong", &anthropic_body(), None).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["type"], &v["error"]["type"]),
        (&json!("error"), &json!("authentication_error"))
    );

    // No anthropic-version header: 400 even with a good key and body.
    let resp = client
        .post(format!("{}/messages", sim.base_url()))
        .header("x-api-key", KEY)
        .json(&anthropic_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("anthropic-version"));

    let mut no_max = anthropic_body();
    no_max.as_object_mut().unwrap().remove("max_tokens");
    let resp = anthropic(&client, &sim, KEY, &no_max, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    for (status, kind) in [
        (529, "overloaded_error"),
        (500, "api_error"),
        (400, "invalid_request_error"),
    ] {
        sim.set_faults(Faults {
            always_fail: Some(status),
            ..Faults::default()
        });
        let resp = anthropic(&client, &sim, KEY, &anthropic_body(), None).await;
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.json::<Value>().await.unwrap()["error"]["type"], kind);
    }
    assert_eq!(sim.stats().failed, 5);
}

#[tokio::test]
async fn gemini_shape_matches_openai_content() {
    let (sim, client) = start(keyed(None)).await;
    let (content, prompt, completion) = openai_reference(&client, &sim).await;

    let resp = gemini(
        &client,
        &sim,
        "generateContent",
        &gemini_body(),
        Some("job-g"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["candidates"],
        json!([{"content": {"role": "model", "parts": [{"text": content}]}, "finishReason": "STOP", "index": 0}])
    );
    assert_eq!(
        v["usageMetadata"],
        json!({"promptTokenCount": prompt, "candidatesTokenCount": completion, "totalTokenCount": prompt + completion})
    );
    assert_eq!(v["modelVersion"], "sim-model");

    let resp = gemini(
        &client,
        &sim,
        "streamGenerateContent?alt=sse",
        &gemini_body(),
        Some("job-g"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(header(&resp, "content-type").starts_with("text/event-stream"));
    let chunks: Vec<Value> = sse_events(&resp.text().await.unwrap())
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert!(chunks.len() > 1);
    let text: String = chunks
        .iter()
        .map(|c| {
            c["candidates"][0]["content"]["parts"][0]["text"]
                .as_str()
                .unwrap()
        })
        .collect();
    assert_eq!(text, content);
    let last = chunks.last().unwrap();
    assert_eq!(last["candidates"][0]["finishReason"], "STOP");
    assert_eq!(last["usageMetadata"]["candidatesTokenCount"], completion);
    assert!(chunks[..chunks.len() - 1]
        .iter()
        .all(|c| c["candidates"][0].get("finishReason").is_none()));

    // Without alt=sse the same chunks come as one JSON array; the key may be in the query.
    let resp = client
        .post(format!(
            "{}/models/sim-model:streamGenerateContent?key={KEY}",
            sim.gemini_base_url()
        ))
        .json(&gemini_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let array: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(array, chunks);
    assert_eq!(sim.calls_for_job("job-g"), 2);
    assert_eq!(sim.stats().by_key.get("main"), Some(&4));
}

#[tokio::test]
async fn gemini_errors_use_google_status_names() {
    let (sim, client) = start(keyed(None)).await;
    let url = format!("{}/models/sim-model:generateContent", sim.gemini_base_url());
    let resp = client.post(&url).json(&gemini_body()).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["status"],
        "UNAUTHENTICATED"
    );
    let resp = client
        .post(&url)
        .header("x-goog-api-key", "wrong")
        .json(&gemini_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["error"]["code"], &v["error"]["status"]),
        (&json!(403), &json!("PERMISSION_DENIED"))
    );

    let resp = gemini(
        &client,
        &sim,
        "generateContent",
        &json!({"contents": []}),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        resp.json::<Value>().await.unwrap()["error"]["status"],
        "INVALID_ARGUMENT"
    );
    let resp = gemini(&client, &sim, "countTokens", &gemini_body(), None).await;
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);

    for (status, name) in [
        (503, "UNAVAILABLE"),
        (500, "INTERNAL"),
        (400, "INVALID_ARGUMENT"),
    ] {
        sim.set_faults(Faults {
            always_fail: Some(status),
            ..Faults::default()
        });
        let resp = gemini(&client, &sim, "generateContent", &gemini_body(), None).await;
        assert_eq!(resp.status().as_u16(), status);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(
            (v["error"]["code"].as_u64(), &v["error"]["status"]),
            (Some(u64::from(status)), &json!(name))
        );
    }
}

#[tokio::test]
async fn one_bucket_per_key_across_formats_with_each_429_shape() {
    let (sim, client) = start(SimConfig {
        burst_seconds: 1.0,
        ..keyed(Some(60))
    })
    .await;
    assert_eq!(
        openai(&client, &sim, &openai_body(), None).await.status(),
        StatusCode::OK
    );

    let resp = anthropic(&client, &sim, KEY, &anthropic_body(), Some("job-1")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "retry-after"), "1");
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-limit"), "60");
    assert_eq!(header(&resp, "anthropic-ratelimit-requests-remaining"), "0");
    let reset = header(&resp, "anthropic-ratelimit-requests-reset");
    assert!(
        chrono::DateTime::parse_from_rfc3339(reset).is_ok(),
        "{reset}"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["type"], &v["error"]["type"]),
        (&json!("error"), &json!("rate_limit_error"))
    );
    assert!(!v.to_string().contains(KEY));

    let resp = gemini(
        &client,
        &sim,
        "generateContent",
        &gemini_body(),
        Some("job-1"),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "retry-after"), "1");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["error"]["code"], &v["error"]["status"]),
        (&json!(429), &json!("RESOURCE_EXHAUSTED"))
    );

    let stats = sim.stats();
    assert_eq!((stats.total, stats.ok, stats.rate_limited), (3, 1, 2));
    assert_eq!(stats.by_job.get("job-1"), Some(&2));
}

#[tokio::test]
async fn hammering_blocks_the_key_in_every_format() {
    // One token per 100 ms and room for one; four 429s within 10 s block the key for 5 s.
    let (sim, client) = start(SimConfig {
        burst_seconds: 0.1,
        hammer_limit: 3,
        hammer_window_secs: 10.0,
        hammer_block_secs: 5.0,
        ..keyed(Some(600))
    })
    .await;
    // Alternate formats until the block starts; a slow machine may get a success in between,
    // which changes nothing: only 429s count.
    let mut calls = 0;
    while sim.stats().blocks == 0 {
        calls += 1;
        assert!(calls <= 200, "never blocked: {:?}", sim.stats());
        let resp = if calls % 2 == 0 {
            anthropic(&client, &sim, KEY, &anthropic_body(), None).await
        } else {
            gemini(&client, &sim, "generateContent", &gemini_body(), None).await
        };
        if sim.stats().blocks == 1 {
            // The call that starts the block is told to wait for the whole block.
            assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(header(&resp, "retry-after"), "5");
        }
    }
    let stats = sim.stats();
    assert_eq!(
        (stats.rate_limited, stats.blocks, stats.blocked),
        (4, 1, 0),
        "{stats:?}"
    );

    // The bucket refills during the block, but the key stays refused.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let resp = openai(&client, &sim, &openai_body(), None).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "1");
    let wait_ms: u64 = header(&resp, "retry-after-ms").parse().unwrap();
    assert!((1..=5000).contains(&wait_ms), "{wait_ms}");
    let stats = sim.stats();
    assert_eq!(
        (stats.rate_limited, stats.blocks, stats.blocked),
        (5, 1, 1),
        "{stats:?}"
    );

    tokio::time::sleep(Duration::from_millis(wait_ms + 50)).await;
    let resp = gemini(&client, &sim, "generateContent", &gemini_body(), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(sim.stats().blocked, 1);
}

#[tokio::test]
async fn hammer_limit_zero_never_blocks() {
    let (sim, client) = start(SimConfig {
        hammer_limit: 0,
        ..keyed(Some(1))
    })
    .await;
    for _ in 0..30 {
        openai(&client, &sim, &openai_body(), None).await;
    }
    let stats = sim.stats();
    assert_eq!(
        (stats.rate_limited, stats.blocks, stats.blocked),
        (29, 0, 0)
    );
}

#[tokio::test]
async fn retry_after_fault_answers_429_with_exactly_that_wait() {
    let (sim, client) = start(keyed(Some(60))).await;
    sim.set_faults(Faults {
        rate_limit_retry_after_secs: Some(7),
        ..Faults::default()
    });
    let resp = openai(&client, &sim, &openai_body(), Some("job-r")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        (
            header(&resp, "retry-after"),
            header(&resp, "retry-after-ms")
        ),
        ("7", "7000")
    );
    let resp = anthropic(&client, &sim, KEY, &anthropic_body(), Some("job-r")).await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "retry-after")),
        (429, "7")
    );
    let resp = gemini(
        &client,
        &sim,
        "generateContent",
        &gemini_body(),
        Some("job-r"),
    )
    .await;
    assert_eq!(
        (resp.status().as_u16(), header(&resp, "retry-after")),
        (429, "7")
    );
    // Far more than the hammer limit, yet no block: the override is exactly what clients see.
    for _ in 0..25 {
        openai(&client, &sim, &openai_body(), None).await;
    }
    let stats = sim.stats();
    assert_eq!(
        (stats.rate_limited, stats.failed, stats.ok, stats.blocks),
        (28, 0, 0, 0)
    );
    assert_eq!(stats.by_job.get("job-r"), Some(&3));

    // It spent no token: with the fault lifted the full bucket answers at once.
    sim.set_faults(Faults::default());
    assert_eq!(
        openai(&client, &sim, &openai_body(), None).await.status(),
        StatusCode::OK
    );
}

const WEATHER_SCHEMA: &str = r#"{"type": "object", "required": ["city"],
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}"#;

fn weather_schema() -> Value {
    serde_json::from_str(WEATHER_SCHEMA).unwrap()
}

#[tokio::test]
async fn tool_calls_and_results_over_http_in_every_format() {
    let (sim, client) = start(keyed(None)).await;
    let question = json!({"role": "user", "content": "weather in Paris?"});

    // OpenAI: a call, then the follow-up that carries its result.
    let tools = json!([{"type": "function",
        "function": {"name": "get_weather", "parameters": weather_schema()}}]);
    let body = json!({"model": "m", "tools": tools, "messages": [question]});
    let v: Value = openai(&client, &sim, &body, None)
        .await
        .json()
        .await
        .unwrap();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["arguments"], r#"{"city":"sim"}"#);
    let follow = json!({"model": "m", "tools": tools, "messages": [question,
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21 C"}]});
    let v: Value = openai(&client, &sim, &follow, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Simulated reply to tool result: sunny, 21 C"));

    // Anthropic.
    let tools = json!([{"name": "get_weather", "input_schema": weather_schema()}]);
    let body = json!({"model": "m", "max_tokens": 64, "tools": tools, "messages": [question]});
    let v: Value = anthropic(&client, &sim, KEY, &body, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "tool_use");
    let block = &v["content"][0];
    assert!(
        block["id"].as_str().unwrap().starts_with("toolu_sim_"),
        "{v}"
    );
    assert_eq!(block["input"], json!({"city": "sim"}));
    let follow = json!({"model": "m", "max_tokens": 64, "tools": tools, "messages": [question,
        {"role": "assistant", "content": [block]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"],
                                      "content": "sunny, 21 C"}]}]});
    let v: Value = anthropic(&client, &sim, KEY, &follow, None)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(v["stop_reason"], "end_turn");
    assert!(v["content"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Simulated reply to tool result: sunny, 21 C"));

    // Gemini.
    let tools = json!([{"functionDeclarations": [{"name": "get_weather",
        "parametersJsonSchema": weather_schema()}]}]);
    let ask = json!({"role": "user", "parts": [{"text": "weather in Paris?"}]});
    let body = json!({"tools": tools, "contents": [ask]});
    let v: Value = gemini(&client, &sim, "generateContent", &body, None)
        .await
        .json()
        .await
        .unwrap();
    let part = &v["candidates"][0]["content"]["parts"][0];
    assert_eq!(
        part["functionCall"],
        json!({"name": "get_weather", "args": {"city": "sim"}})
    );
    let follow = json!({"tools": tools, "contents": [ask, {"role": "model", "parts": [part]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                    "response": {"content": "sunny, 21 C"}}}]}]});
    let v: Value = gemini(&client, &sim, "generateContent", &follow, None)
        .await
        .json()
        .await
        .unwrap();
    assert!(v["candidates"][0]["content"]["parts"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with("Simulated reply to tool result: sunny, 21 C"));
    assert_eq!(sim.stats().ok, 6);
}

#[tokio::test]
async fn malformed_tools_are_refused_in_each_formats_error_shape() {
    let (sim, client) = start(keyed(None)).await;
    let question = json!({"role": "user", "content": "hi"});
    let resp = openai(
        &client,
        &sim,
        &json!({"model": "m", "messages": [question], "tools": [{"type": "function"}]}),
        None,
    )
    .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tools[0].function"));

    let body = json!({"model": "m", "max_tokens": 5, "messages": [question],
                      "tools": [{"name": "f", "parameters": weather_schema()}]});
    let resp = anthropic(&client, &sim, KEY, &body, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (&v["type"], &v["error"]["type"]),
        (&json!("error"), &json!("invalid_request_error"))
    );
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("input_schema"));

    // OpenAI's JSON Schema where Gemini's OpenAPI subset belongs.
    let body = json!({"contents": [{"parts": [{"text": "hi"}]}],
        "tools": [{"functionDeclarations": [{"name": "f", "parameters":
            {"type": "object", "properties": {}, "additionalProperties": false}}]}]});
    let resp = gemini(&client, &sim, "generateContent", &body, None).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["status"], "INVALID_ARGUMENT");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("additionalProperties"));
    assert_eq!(sim.stats().failed, 3);
}
