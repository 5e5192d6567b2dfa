//! The HTTP API's contract: auth, tenant walls, tier -> lane, idempotency, cancel, and
//! bad input that gets a clear JSON error and creates nothing.

use crate::helpers::{job_body, spawn_app, AppOptions};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::{JobState, Tier};
use std::time::Duration;

fn assert_error(status: StatusCode, body: &Value, want: StatusCode, code: &str) {
    assert_eq!(status, want, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error without a message: {body}"
    );
}

#[tokio::test]
async fn missing_or_wrong_keys_get_401_and_other_tenants_jobs_are_404() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let url = format!("{}/v1/jobs", app.api);
    let response = app
        .http
        .post(&url)
        .json(&job_body("hi"))
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_error(
        status,
        &response.json().await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let (status, body) = app
        .post_job("sk_sluice_not-a-real-key-000000000000", &job_body("hi"))
        .await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");
    let (status, body) = app.post_job("Basic abc", &job_body("hi")).await;
    assert_error(status, &body, StatusCode::UNAUTHORIZED, "unauthorized");

    let acme = app.key("acme", Tier::Pro).await;
    let other = app.key("globex", Tier::Pro).await;
    let id = app.submit(&acme, "mine").await;
    let (status, mine) = app.get_job(&acme, id).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(mine["request_id"], id.to_string());

    // Another tenant's job answers exactly like an unknown one.
    let unknown = sluice_core::RequestId::new();
    let (s1, b1) = app.get_job(&other, id).await;
    let (s2, b2) = app.get_job(&other, unknown).await;
    assert_error(s1, &b1, StatusCode::NOT_FOUND, "not_found");
    assert_eq!((s1, &b1), (s2, &b2));
    let (s3, b3) = app.cancel_job(&other, id).await;
    assert_error(s3, &b3, StatusCode::NOT_FOUND, "not_found");
    assert_eq!(
        app.state(id).await,
        JobState::Queued,
        "a 404 cancel changes nothing"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn tier_decides_the_lane_and_the_body_cannot_change_it() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    for (tier, lane) in [
        (Tier::Enterprise, "priority"),
        (Tier::Pro, "priority"),
        (Tier::Basic, "standard"),
        (Tier::Free, "batch"),
    ] {
        let key = app.key(&format!("t-{tier}"), tier).await;
        let (status, body) = app.post_job(&key, &job_body("hello")).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        assert_eq!(body["lane"], lane, "{tier}");
        assert_eq!(body["state"], "queued");
        let id = body["request_id"].as_str().unwrap().parse().unwrap();
        assert_eq!(app.get_job(&key, id).await.1["lane"], lane);
    }
    // Lanes hold what the mapping says. The two priority jobs may share a message when their
    // background publishes meet in one batch (a pack).
    let broker = app.broker().await;
    use sluice_broker::Broker;
    app.wait_for("messages in lanes", Duration::from_secs(10), || async {
        (1..=2).contains(&broker.depth(sluice_core::Lane::Priority).await.unwrap())
            && broker.depth(sluice_core::Lane::Standard).await.unwrap() == 1
            && broker.depth(sluice_core::Lane::Batch).await.unwrap() == 1
    })
    .await;

    let free = app.key("cheapskate", Tier::Free).await;
    let before = app.total_jobs().await;
    let mut body = job_body("let me in");
    body["tier"] = json!("enterprise");
    let (status, answer) = app.post_job(&free, &body).await;
    assert_error(
        status,
        &answer,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
    );
    assert!(answer["error"]["message"]
        .as_str()
        .unwrap()
        .contains("tier"));
    assert_eq!(app.total_jobs().await, before, "nothing stored");
    let (_, ok) = app.post_job(&free, &job_body("fine")).await;
    assert_eq!(ok["lane"], "batch");
    app.cleanup().await;
}

#[tokio::test]
async fn bad_input_gets_a_json_error_and_creates_no_job() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Basic).await;
    let url = format!("{}/v1/jobs", app.api);
    let raw = |body: Vec<u8>, content_type: &'static str| {
        let request = app
            .http
            .post(&url)
            .header("content-type", content_type)
            .body(body);
        app.send(request, &key)
    };
    let json = "application/json";
    let (s, b) = raw(b"{\"model\": \"default\", \"messages\": [".to_vec(), json).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_json");
    let (s, b) = raw(b"not json at all".to_vec(), json).await;
    assert_error(s, &b, StatusCode::BAD_REQUEST, "invalid_json");
    let (s, b) = raw(
        br#"{"model": "default", "messages": [{"role":"user","content":"x"}]}"#.to_vec(),
        "text/plain",
    )
    .await;
    assert_error(
        s,
        &b,
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    );

    let cases: Vec<(Value, &str, &str)> = vec![
        (
            json!({"model": 7, "messages": [{"role": "user", "content": "x"}]}),
            "invalid_request",
            "wrong type",
        ),
        (
            json!({"model": "default", "messages": "hello"}),
            "invalid_request",
            "messages not a list",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": 5}]}),
            "invalid_request",
            "content not a string",
        ),
        (
            json!({"model": "default", "messages": []}),
            "invalid_request",
            "empty messages",
        ),
        (
            json!({"model": "default"}),
            "invalid_request",
            "missing messages",
        ),
        (
            json!({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}),
            "invalid_request",
            "unknown role",
        ),
        (
            json!({"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}),
            "unknown_model",
            "unknown model",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "colour": "blue"}),
            "invalid_request",
            "unknown field",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "x", "mood": "n"}]}),
            "invalid_request",
            "unknown message field",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "temperature": 9.5}),
            "invalid_request",
            "temperature out of range",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
            "invalid_request",
            "max_tokens 0",
        ),
        (
            json!({"model": "default", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}),
            "invalid_request",
            "negative max_tokens",
        ),
    ];
    for (body, code, why) in cases {
        let (status, answer) = app.post_job(&key, &body).await;
        assert!(status.is_client_error(), "{why}: {status} {answer}");
        assert_eq!(answer["error"]["code"], code, "{why}: {answer}");
    }
    let huge = "x".repeat(1_100_000);
    let (s, b) = raw(serde_json::to_vec(&job_body(&huge)).unwrap(), json).await;
    assert_error(s, &b, StatusCode::PAYLOAD_TOO_LARGE, "body_too_large");
    let response = app
        .http
        .get(format!("{}/v1/nowhere", app.api))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "not_found"
    );
    let response = app
        .http
        .put(format!("{}/v1/jobs", app.api))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        response.json::<Value>().await.unwrap()["error"]["code"],
        "method_not_allowed"
    );

    assert_eq!(app.total_jobs().await, 0, "no bad request may create a job");
    assert_eq!(app.store.outbox_len().await.unwrap(), 0);
    app.cleanup().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_and_409_for_another_body() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let url = format!("{}/v1/jobs", app.api);
    let send = |body: Value, idem: &'static str| {
        let request = app
            .http
            .post(&url)
            .header("idempotency-key", idem)
            .json(&body);
        app.send(request, &key)
    };
    let (s1, first) = send(job_body("once"), "order-42").await;
    assert_eq!(s1, StatusCode::ACCEPTED);
    let (s2, again) = send(job_body("once"), "order-42").await;
    assert_eq!(s2, StatusCode::ACCEPTED);
    assert_eq!(first["request_id"], again["request_id"]);
    let (s3, other) = send(job_body("twice"), "order-42").await;
    assert_error(s3, &other, StatusCode::CONFLICT, "idempotency_conflict");
    assert_eq!(app.total_jobs().await, 1);
    app.cleanup().await;
}

#[tokio::test]
async fn cancelled_queued_job_never_reaches_the_provider() {
    let mut app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Basic).await;
    let doomed = app.submit(&key, "cancel me").await;
    let (status, body) = app.cancel_job(&key, doomed).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled");
    let (status, body) = app.cancel_job(&key, doomed).await;
    assert_error(status, &body, StatusCode::CONFLICT, "not_cancellable");

    // The cancelled job's message is ahead of this one in the same lane.
    let after = app.submit(&key, "run me").await;
    app.start_worker().await;
    app.wait_terminal(&[after], Duration::from_secs(30)).await;
    assert_eq!(app.state(after).await, JobState::Succeeded);
    assert_eq!(app.state(doomed).await, JobState::Cancelled);
    assert_eq!(app.sim.calls_for_job(&doomed.to_string()), 0);
    assert_eq!(app.sim.calls_for_job(&after.to_string()), 1);
    app.cleanup().await;
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..Default::default()
    })
    .await;
    for path in ["healthz", "readyz"] {
        let response = app
            .http
            .get(format!("{}/{path}", app.api))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
    }
    app.cleanup().await;
}
