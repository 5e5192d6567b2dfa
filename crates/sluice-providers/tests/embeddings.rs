//! End-to-end tests of the embeddings client against the provider simulator and two stub servers.
//! They check the vectors' determinism, the classification of failures and that keys never leak.
#![allow(clippy::unwrap_used)]

use sluice_providers::{Embeddings, EmbeddingsConfig, ProviderError, Secret};
use sluice_sim::{Faults, SimConfig, SimHandle, SimKey};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &str = "sk-emb-secret";

async fn sim(rpm: Option<u32>) -> SimHandle {
    let config = SimConfig {
        keys: vec![SimKey {
            name: "emb".into(),
            key: KEY.into(),
            rpm,
        }],
        ..SimConfig::default()
    };
    sluice_sim::spawn(config, ([127, 0, 0, 1], 0).into())
        .await
        .unwrap()
}

fn client(base_url: &str, key: &str) -> Embeddings {
    let mut config = EmbeddingsConfig::new(base_url, "text-embedding-3-small");
    config.api_key = Some(Secret::new(key));
    Embeddings::new(&config, reqwest::Client::new()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    sluice_core::semantic::cosine(a, b).unwrap()
}

#[tokio::test]
async fn same_text_gives_the_same_vector_and_the_simulator_counts_the_calls() {
    let sim = sim(None).await;
    let e = client(&sim.base_url(), KEY);
    let a = e.embed("What is the capital of France?").await.unwrap();
    let b = e.embed("What is the capital of France?").await.unwrap();
    let c = e.embed("what is the capital of france").await.unwrap();
    let d = e
        .embed("Summarise this contract for a ten year old.")
        .await
        .unwrap();
    assert_eq!(a.len(), 256);
    assert_eq!(a, b);
    assert!((cosine(&a, &c) - 1.0).abs() < 1e-6);
    assert!(cosine(&a, &d) < 0.95);
    let stats = sim.stats();
    assert_eq!(stats.embeddings, 4);
    // Embedding calls are not chat calls.
    assert_eq!((stats.total, stats.ok), (0, 0));
}

#[tokio::test]
async fn a_wrong_key_is_rejected_without_leaking_it() {
    let sim = sim(None).await;
    let err = client(&sim.base_url(), "sk-wrong-key")
        .embed("hi")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::Rejected {
            status: 401,
            message: "Incorrect API key provided".into()
        }
    );
    assert!(!err.is_retryable());
    assert!(!format!("{err} {err:?}").contains("sk-wrong-key"));
    // Not authenticated, so not counted.
    assert_eq!(sim.stats().embeddings, 0);
}

#[tokio::test]
async fn an_empty_text_is_a_permanent_rejection() {
    let sim = sim(None).await;
    let err = client(&sim.base_url(), KEY).embed("").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Rejected { status: 400, ref message } if message.contains("input")),
        "{err:?}"
    );
}

#[tokio::test]
async fn limits_and_server_errors_are_retryable() {
    let slow = sim(Some(1)).await;
    let e = client(&slow.base_url(), KEY);
    e.embed("hi").await.unwrap();
    let err = e.embed("hi").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::RateLimited { retry_after: Some(d), .. } if d > Duration::ZERO),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert_eq!(slow.stats().embeddings, 2);

    // Faults come after the limiter, as for chat calls: a fresh simulator.
    let sim = sim(None).await;
    sim.set_faults(Faults {
        always_fail: Some(503),
        ..Faults::default()
    });
    let err = client(&sim.base_url(), KEY).embed("hi").await.unwrap_err();
    assert!(
        matches!(err, ProviderError::Server { status: 503, .. }),
        "{err:?}"
    );
    assert!(err.is_retryable());
}

/// A server on a free port that answers every request with `response` (raw HTTP), or never
/// answers when it is `None`; returns its `/v1` base URL.
async fn stub(response: Option<&'static str>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Some(response) = response else {
                    // Hold the connection open without a word.
                    tokio::time::sleep(Duration::from_secs(60)).await;
                    drop(socket);
                    return;
                };
                // The request is small: read until its body has arrived, then answer.
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = socket.read(&mut buf).await {
                    request.extend_from_slice(&buf[..n]);
                    if n == 0 || request.ends_with(b"}") {
                        break;
                    }
                }
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

#[tokio::test]
async fn a_malformed_answer_is_invalid_response() {
    let body = r#"{"object":"list","data":[]}"#;
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_boxed_str(),
    );
    let err = client(&stub(Some(response)).await, KEY)
        .embed("hi")
        .await
        .unwrap_err();
    assert_eq!(
        err,
        ProviderError::InvalidResponse("expected exactly one embedding in data".into())
    );

    let html = "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 6\r\nconnection: close\r\n\r\n<html>";
    let err = client(&stub(Some(html)).await, KEY)
        .embed("hi")
        .await
        .unwrap_err();
    assert!(matches!(err, ProviderError::InvalidResponse(_)), "{err:?}");
}

#[tokio::test]
async fn a_silent_server_times_out() {
    let mut config = EmbeddingsConfig::new(stub(None).await, "m");
    config.timeout_secs = 1;
    let e = Embeddings::new(&config, reqwest::Client::new()).unwrap();
    let err = e.embed("hi").await.unwrap_err();
    assert_eq!(err, ProviderError::Timeout);
    assert!(err.is_retryable());
}
