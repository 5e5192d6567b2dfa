//! The three adapters (OpenAI, Anthropic, Gemini) against the simulator, plain and streamed.
//! The simulator answers the same conversation identically in every format, so results must match.
#![allow(clippy::unwrap_used)]

use sluice_core::{JobRequest, Message, Role};
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
