//! The three adapters (OpenAI, Anthropic, Gemini) against the simulator, plain and streamed.
//! The simulator answers the same conversation identically in every format, so results must match.
#![allow(clippy::unwrap_used)]

use serde_json::{json, Value};
use sluice_core::{Content, JobRequest, Message, Role, Tool};
use sluice_providers::{
    ChatRequest, ChatResponse, EndpointConfig, PoolConfig, ProviderError, ProviderKind, Router,
    Secret,
};
use sluice_sim::{Faults, SimConfig, SimHandle, SimKey};
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::sync::mpsc;

/// For tests about formats rather than limits: a key the simulator never limits.
const UNLIMITED: Option<u32> = Some(0);

const KINDS: [ProviderKind; 3] = [
    ProviderKind::Openai,
    ProviderKind::Anthropic,
    ProviderKind::Gemini,
];

fn job(max_tokens: Option<u32>) -> JobRequest {
    let messages = vec![
        Message::new(Role::System, "be brief"),
        Message::user("hello"),
        Message::new(Role::Assistant, "hi, how can I help?"),
        Message::user("tell me about sluices"),
    ];
    JobRequest {
        max_tokens,
        temperature: Some(0.2),
        ..JobRequest::new("m", messages)
    }
}

async fn sim(rpm: Option<u32>) -> SimHandle {
    let config = SimConfig {
        keys: vec![SimKey {
            name: "k".into(),
            key: "sk-k-secret".into(),
            rpm,
        }],
        ..SimConfig::default()
    };
    sluice_sim::spawn(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

fn endpoint(sim: &SimHandle, kind: ProviderKind, key: &str) -> EndpointConfig {
    let base = match kind {
        ProviderKind::Gemini => sim.gemini_base_url(),
        _ => sim.base_url(),
    };
    let mut e = EndpointConfig::new(format!("{kind:?}"), base, "sim-model", 6000);
    e.kind = kind;
    e.api_key = Some(Secret::new(key));
    e
}

/// A one-endpoint router, so every call goes through `Pool` building the adapter from `kind`.
fn router(sim: &SimHandle, kind: ProviderKind, key: &str) -> Router {
    let pool = PoolConfig {
        name: "p".into(),
        endpoints: vec![endpoint(sim, kind, key)],
    };
    let routes = BTreeMap::from([("m".to_owned(), "p".into())]);
    Router::new(&[pool], &routes, reqwest::Client::new()).unwrap()
}

async fn call(router: &Router, job: &JobRequest, id: &str) -> Result<ChatResponse, ProviderError> {
    let permit = router.pool("m").unwrap().acquire().await;
    permit
        .call(ChatRequest {
            request_id: id,
            job,
        })
        .await
}

/// A streamed call; returns the result and the deltas received.
async fn stream(
    router: &Router,
    job: &JobRequest,
    id: &str,
) -> (Result<ChatResponse, ProviderError>, Vec<String>) {
    let (tx, mut rx) = mpsc::channel(4);
    let permit = router.pool("m").unwrap().acquire().await;
    let collect = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(d) = rx.recv().await {
            got.push(d);
        }
        got
    });
    let result = permit
        .call_stream(
            ChatRequest {
                request_id: id,
                job,
            },
            tx,
        )
        .await;
    (result, collect.await.unwrap())
}

#[tokio::test]
async fn every_kind_matches_openai_plain_and_streamed() {
    let sim = sim(UNLIMITED).await;
    for max_tokens in [None, Some(7)] {
        let job = job(max_tokens);
        let openai = call(
            &router(&sim, ProviderKind::Openai, "sk-k-secret"),
            &job,
            "ref",
        )
        .await
        .unwrap();
        assert!(openai
            .content
            .starts_with("Simulated reply to: tell me about sluices"));
        assert!(openai.usage.prompt_tokens > 0 && openai.usage.completion_tokens > 0);
        assert_eq!(openai.finish_reason.as_deref(), Some("stop"));

        for kind in KINDS {
            let r = router(&sim, kind, "sk-k-secret");
            let plain = call(&r, &job, &format!("{kind:?}-plain")).await.unwrap();
            assert_eq!(
                (&plain.content, &plain.usage),
                (&openai.content, &openai.usage),
                "{kind:?}"
            );
            assert_eq!(plain.model, "sim-model");
            assert_eq!(plain.finish_reason.as_deref(), Some("stop"), "{kind:?}");

            let (streamed, deltas) = stream(&r, &job, &format!("{kind:?}-stream")).await;
            let streamed = streamed.unwrap();
            assert_eq!(streamed, plain, "{kind:?}");
            assert!(deltas.len() > 1, "{kind:?}: {deltas:?}");
            assert_eq!(deltas.concat(), plain.content, "{kind:?}");
        }
    }
    // Every call was counted under its job id, whatever the format.
    let stats = sim.stats();
    for kind in KINDS {
        for suffix in ["plain", "stream"] {
            assert_eq!(
                stats.by_job.get(&format!("{kind:?}-{suffix}")),
                Some(&2),
                "{kind:?}-{suffix}: {:?}",
                stats.by_job
            );
        }
    }
    assert_eq!((stats.ok, stats.failed, stats.rate_limited), (14, 0, 0));
}

#[tokio::test]
async fn a_dropped_receiver_does_not_stop_the_call() {
    let sim = sim(UNLIMITED).await;
    let job = job(None);
    for kind in KINDS {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let permit = router(&sim, kind, "sk-k-secret")
            .pool("m")
            .unwrap()
            .acquire()
            .await;
        let resp = permit
            .call_stream(
                ChatRequest {
                    request_id: "j",
                    job: &job,
                },
                tx,
            )
            .await
            .unwrap();
        assert!(resp.content.starts_with("Simulated reply to:"), "{kind:?}");
    }
}

#[tokio::test]
async fn rate_limits_map_to_rate_limited_with_retry_after() {
    // One request per minute: the second call of each kind is refused by the shared key bucket.
    let sim = sim(Some(1)).await;
    let job = job(None);
    call(
        &router(&sim, ProviderKind::Openai, "sk-k-secret"),
        &job,
        "first",
    )
    .await
    .unwrap();
    for kind in KINDS {
        for streamed in [false, true] {
            // A fresh pool each time: a pool that saw a 429 honours its retry-after itself.
            let r = router(&sim, kind, "sk-k-secret");
            let err = if streamed {
                stream(&r, &job, "limited").await.0
            } else {
                call(&r, &job, "limited").await
            }
            .unwrap_err();
            assert!(
                matches!(err, ProviderError::RateLimited { retry_after: Some(d), .. } if d >= Duration::from_secs(1)),
                "{kind:?} streamed={streamed}: {err:?}"
            );
            assert!(err.is_retryable());
        }
    }

    // A provider that says how long to back off is taken at its word, in every format.
    sim.set_faults(Faults {
        rate_limit_retry_after_secs: Some(9),
        ..Faults::default()
    });
    for kind in KINDS {
        let err = call(&router(&sim, kind, "sk-k-secret"), &job, "told")
            .await
            .unwrap_err();
        assert_eq!(
            err.retry_after(),
            Some(Duration::from_secs(9)),
            "{kind:?}: {err:?}"
        );
    }
    assert_eq!(sim.calls_for_job("limited"), 6);
}

#[tokio::test]
async fn server_errors_are_retryable_and_client_errors_permanent() {
    let sim = sim(UNLIMITED).await;
    let job = job(None);
    for status in [529, 503, 500, 400] {
        sim.set_faults(Faults {
            always_fail: Some(status),
            ..Faults::default()
        });
        for kind in KINDS {
            let r = router(&sim, kind, "sk-k-secret");
            for streamed in [false, true] {
                let err = if streamed {
                    stream(&r, &job, "f").await.0
                } else {
                    call(&r, &job, "f").await
                }
                .unwrap_err();
                let what = format!("{status} {kind:?} streamed={streamed}: {err:?}");
                assert_eq!(err.status(), Some(status), "{what}");
                if status >= 500 {
                    assert!(
                        matches!(err, ProviderError::Server { .. }) && err.is_retryable(),
                        "{what}"
                    );
                } else {
                    assert!(
                        matches!(err, ProviderError::Rejected { .. }) && !err.is_retryable(),
                        "{what}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn a_wrong_key_is_rejected_without_leaking_it() {
    let sim = sim(UNLIMITED).await;
    let job = job(None);
    for kind in KINDS {
        let r = router(&sim, kind, "sk-wrong-key");
        for streamed in [false, true] {
            let err = if streamed {
                stream(&r, &job, "bad-key").await.0
            } else {
                call(&r, &job, "bad-key").await
            }
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    ProviderError::Rejected {
                        status: 401 | 403,
                        ..
                    }
                ),
                "{kind:?}: {err:?}"
            );
            assert!(!err.is_retryable());
            assert!(!format!("{err} {err:?}").contains("sk-wrong-key"));
        }
        assert!(!format!("{r:?}").contains("sk-wrong-key"));
    }
    // Refused before the key was known: nothing counted.
    assert_eq!(sim.stats().total, 0);
}

// Tools, tool results, JSON formats and images, through each wire format and back.

/// A function whose arguments need two properties; the simulator fills them in from the schema.
fn weather_tool() -> Tool {
    serde_json::from_value(json!({"type": "function", "function": {
        "name": "get_weather", "description": "The weather for a city",
        "parameters": {"type": "object", "required": ["city", "days"], "additionalProperties": false,
            "properties": {"city": {"type": "string"},
                           "days": {"type": "integer", "minimum": 2},
                           "unit": {"type": "string", "enum": ["c", "f"]}}}}}))
    .unwrap()
}

fn other_tool() -> Tool {
    serde_json::from_value(json!({"type": "function", "function": {"name": "get_time"}})).unwrap()
}

/// The answer plain and streamed, with the streamed deltas, after checking that both calls
/// agree on everything but the tool call ids (fresh per answer in some formats).
async fn plain_and_streamed(
    r: &Router,
    job: &JobRequest,
    what: &str,
) -> (ChatResponse, ChatResponse, Vec<String>) {
    let plain = call(r, job, what)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (streamed, deltas) = stream(r, job, what).await;
    let streamed = streamed.unwrap_or_else(|e| panic!("{what} streamed: {e}"));
    let without_ids = |r: &ChatResponse| {
        let calls: Vec<_> = r.tool_calls.iter().map(|c| c.function.clone()).collect();
        (
            r.content.clone(),
            calls,
            r.finish_reason.clone(),
            r.usage.clone(),
        )
    };
    assert_eq!(without_ids(&plain), without_ids(&streamed), "{what}");
    assert_eq!(deltas.concat(), streamed.content, "{what}");
    (plain, streamed, deltas)
}

#[tokio::test]
async fn tool_calls_and_their_results_round_trip_in_every_format() {
    let sim = sim(UNLIMITED).await;
    let question = vec![
        Message::new(Role::System, "be brief"),
        Message::user("what is the weather in Paris?"),
    ];
    for kind in KINDS {
        let r = router(&sim, kind, "sk-k-secret");
        for (choice, expected) in [
            (None, "get_weather"),
            (Some(json!("required")), "get_weather"),
            (
                Some(json!({"type": "function", "function": {"name": "get_time"}})),
                "get_time",
            ),
        ] {
            let job = JobRequest {
                tools: vec![weather_tool(), other_tool()],
                tool_choice: choice.map(|c| serde_json::from_value(c).unwrap()),
                parallel_tool_calls: Some(false),
                ..JobRequest::new("m", question.clone())
            };
            let what = format!("{kind:?} {expected}");
            let (plain, streamed, _) = plain_and_streamed(&r, &job, &what).await;
            for answer in [&plain, &streamed] {
                assert_eq!(
                    answer.finish_reason.as_deref(),
                    Some("tool_calls"),
                    "{what}"
                );
                assert_eq!(answer.content, "", "{what}");
                let [call] = answer.tool_calls.as_slice() else {
                    panic!("{what}: {:?}", answer.tool_calls)
                };
                assert!(!call.id.is_empty(), "{what}");
                assert_eq!(call.function.name, expected, "{what}");
                let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
                if expected == "get_weather" {
                    // The required properties, with their types and bounds, and nothing else.
                    assert_eq!(args, json!({"city": "sim", "days": 2}), "{what}");
                } else {
                    // A function without parameters is called with an empty object.
                    assert_eq!(args, json!({}), "{what}");
                }
            }

            // The follow-up carries the call and its result; the model answers in text.
            for (answer, how) in [(&plain, "plain"), (&streamed, "streamed")] {
                let mut messages = question.clone();
                messages.push(Message {
                    tool_calls: answer.tool_calls.clone(),
                    ..Message::new(Role::Assistant, answer.content.as_str())
                });
                messages.push(Message::tool_result(
                    answer.tool_calls[0].id.clone(),
                    "sunny, 21 C",
                ));
                let follow = JobRequest {
                    messages,
                    ..job.clone()
                };
                let what = format!("{what} follow-up to {how}");
                let (done, _, _) = plain_and_streamed(&r, &follow, &what).await;
                assert!(
                    done.content
                        .starts_with("Simulated reply to tool result: sunny, 21 C"),
                    "{what}: {}",
                    done.content
                );
                assert_eq!(done.finish_reason.as_deref(), Some("stop"), "{what}");
                assert!(done.tool_calls.is_empty(), "{what}");
            }
        }

        // tool_choice none: the tools are offered, but the answer is text.
        let job = JobRequest {
            tools: vec![weather_tool()],
            tool_choice: Some(serde_json::from_value(json!("none")).unwrap()),
            ..JobRequest::new("m", question.clone())
        };
        let (plain, _, _) = plain_and_streamed(&r, &job, &format!("{kind:?} none")).await;
        assert!(plain.tool_calls.is_empty(), "{kind:?}");
        assert!(
            plain
                .content
                .starts_with("Simulated reply to: what is the weather"),
            "{kind:?}"
        );
    }
    assert_eq!(sim.stats().failed, 0);
}

#[tokio::test]
async fn response_formats_give_json_in_every_format() {
    let sim = sim(UNLIMITED).await;
    // OpenAI refuses JSON mode unless the conversation mentions JSON.
    let messages = vec![Message::user("Rate sluices, in JSON.")];
    let schema = json!({"type": "object", "required": ["answer", "confidence", "tags"],
        "additionalProperties": false,
        "properties": {"answer": {"type": "string"}, "confidence": {"type": "number"},
                       "tags": {"type": "array", "items": {"type": "string"}},
                       "note": {"type": "boolean"}}});
    let with_schema = JobRequest {
        response_format: Some(
            serde_json::from_value(json!({"type": "json_schema", "json_schema": {
                "name": "rating", "schema": schema, "strict": true}}))
            .unwrap(),
        ),
        ..JobRequest::new("m", messages.clone())
    };
    let object = JobRequest {
        response_format: Some(serde_json::from_value(json!({"type": "json_object"})).unwrap()),
        ..JobRequest::new("m", messages)
    };
    for kind in KINDS {
        let r = router(&sim, kind, "sk-k-secret");
        let (plain, _, deltas) =
            plain_and_streamed(&r, &with_schema, &format!("{kind:?} schema")).await;
        assert_eq!(plain.finish_reason.as_deref(), Some("stop"), "{kind:?}");
        assert!(plain.tool_calls.is_empty(), "{kind:?}");
        assert!(!deltas.is_empty(), "{kind:?}: the JSON streams as text");
        let v: Value = serde_json::from_str(&plain.content)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}: {}", plain.content));
        assert!(v["answer"].is_string(), "{kind:?}: {v}");
        assert!(v["confidence"].is_number(), "{kind:?}: {v}");
        assert!(
            v["tags"]
                .as_array()
                .is_some_and(|t| t.iter().all(Value::is_string)),
            "{kind:?}: {v}"
        );
        assert_eq!(
            v,
            json!({"answer": "sim", "confidence": 1, "tags": ["sim"]})
        );

        let (plain, _, _) = plain_and_streamed(&r, &object, &format!("{kind:?} object")).await;
        let v: Value = serde_json::from_str(&plain.content)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}: {}", plain.content));
        assert!(v.is_object(), "{kind:?}: {v}");
        assert_eq!(plain.finish_reason.as_deref(), Some("stop"), "{kind:?}");
    }
    assert_eq!(sim.stats().failed, 0);
}

#[tokio::test]
async fn images_reach_the_provider_in_every_format() {
    let sim = sim(UNLIMITED).await;
    let parts = |urls: &[&str]| {
        let mut parts = vec![json!({"type": "text", "text": "what is this?"})];
        parts.extend(
            urls.iter()
                .map(|u| json!({"type": "image_url", "image_url": {"url": u}})),
        );
        Message::new(
            Role::User,
            serde_json::from_value::<Content>(json!(parts)).unwrap(),
        )
    };
    let inline = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==";
    for kind in KINDS {
        let r = router(&sim, kind, "sk-k-secret");
        for (urls, marker) in [
            (vec![inline], "[1 image]"),
            (
                vec![inline, "https://example.test/sluice.jpg"],
                "[2 images]",
            ),
        ] {
            let job = JobRequest::new("m", vec![parts(&urls)]);
            let what = format!("{kind:?} {marker}");
            let (plain, _, _) = plain_and_streamed(&r, &job, &what).await;
            assert!(
                plain
                    .content
                    .starts_with(&format!("Simulated reply to: {marker} what is this?")),
                "{what}: {}",
                plain.content
            );
        }
    }
}
