//! Bad input gets a short, clear answer: errors quote only an excerpt of what was sent, bodies
//! must be JSON objects without repeated keys, key emails are addresses, and the headers are
//! read as the docs say (`Bearer` in any case, `Idempotency-Key` printable ASCII).

use crate::helpers::{job_body, spawn_app, AppOptions, TestApp};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::Tier;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// Longest error body a bad request may get back, whatever its size.
const SHORT: usize = 2_048;

/// POST `body` as JSON text to `path` with `key`: the status, the body's size and the body.
async fn post_raw(
    app: &TestApp,
    path: &str,
    key: &str,
    body: String,
) -> (StatusCode, usize, Value) {
    let response = app
        .http
        .post(format!("{}{path}", app.api))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let bytes = response.bytes().await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, bytes.len(), value)
}

#[tokio::test]
async fn a_megabyte_of_bad_input_gets_an_error_under_two_kilobytes() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let huge = "m".repeat(1_000_000);
    let mut bad_model = job_body("hi");
    bad_model["model"] = json!(huge);
    let mut bad_role = job_body("hi");
    bad_role["messages"][0]["role"] = json!(huge);
    let mut bad_field = job_body("hi");
    bad_field[huge.as_str()] = json!(1);
    let mut bad_type = job_body("hi");
    bad_type["max_tokens"] = json!(huge);
    let cases = [
        ("model", bad_model, "unknown_model"),
        ("role", bad_role, "invalid_request"),
        ("field name", bad_field, "invalid_request"),
        ("mistyped value", bad_type, "invalid_request"),
    ];
    for (what, body, code) in &cases {
        let (status, size, answer) = post_raw(&app, "/v1/jobs", &key, body.to_string()).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{what}: {answer}");
        assert!(size < SHORT, "a bad {what} got {size} bytes back");
        assert_eq!(answer["error"]["code"], *code, "{what}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("mmmm") && message.contains("1000000 bytes"),
            "{what}: the message quotes a start and the length: {message}"
        );
    }
    // The OpenAI front door: its own shape, as short.
    for (what, body, _) in &cases {
        let (status, size, answer) =
            post_raw(&app, "/v1/chat/completions", &key, body.to_string()).await;
        assert!(status.is_client_error(), "{what}: {status} {answer}");
        assert!(size < SHORT, "chat: a bad {what} got {size} bytes back");
        assert!(answer["error"]["message"].is_string(), "{what}: {answer}");
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_sixteen_megabyte_bad_websocket_frame_gets_a_short_error() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let url = format!("{}/v1/stream", app.api.replacen("http", "ws", 1));
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {key}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let huge = "x".repeat(16_000_000);
    let frames = [
        json!({"type": huge}),
        json!({"type": "subscribe", "request_ids": [huge]}),
        json!({"type": "unsubscribe", "request_ids": [huge]}),
        json!({"type": "subscribe", huge.as_str(): true}),
    ];
    for frame in frames {
        socket
            .send(Message::Text(frame.to_string().into()))
            .await
            .unwrap();
        let reply = loop {
            let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
                .await
                .expect("no reply within 60 s")
                .expect("the socket closed")
                .unwrap();
            if let Message::Text(text) = message {
                let value: Value = serde_json::from_str(&text).unwrap();
                if value["type"] != "ready" {
                    break text;
                }
            }
        };
        assert!(
            reply.len() < SHORT,
            "a bad frame got {} bytes back: {}…",
            reply.len(),
            &reply[..200]
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn a_body_must_be_one_json_object_with_each_key_once() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let admin = app.store.create_admin_key("ops").await.unwrap();
    let array = r#"["default",[{"role":"user","content":"x"}]]"#.to_owned();
    let twice = r#"{"model":"default","messages":[{"role":"user","content":"x"}],"model":"other"}"#;
    let nested_twice =
        r#"{"model":"default","messages":[{"role":"user","content":"x","role":"system"}]}"#;
    let key_array = r#"["ops2", null, null, null, false, true]"#.to_owned();
    let key_twice = r#"{"user":"a","admin":true,"user":"b"}"#.to_owned();

    for (path, key, body, what) in [
        ("/v1/jobs", &key, array.clone(), "array"),
        ("/admin/v1/keys", &admin, key_array, "array"),
        ("/v1/jobs", &key, twice.to_owned(), "\"model\""),
        ("/v1/jobs", &key, nested_twice.to_owned(), "\"role\""),
        ("/admin/v1/keys", &admin, key_twice, "\"user\""),
    ] {
        let (status, _, answer) = post_raw(&app, path, key, body.clone()).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path} {body}: {answer}"
        );
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{path} {body}: {message}");
    }
    // The OpenAI front door refuses both too, with OpenAI's 400.
    for (body, what) in [(array, "JSON object"), (twice.to_owned(), "\"model\"")] {
        let (status, _, answer) = post_raw(&app, "/v1/chat/completions", &key, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{message}");
    }
    assert_eq!(app.total_jobs().await, 0, "nothing was queued");
    app.cleanup().await;
}

#[tokio::test]
async fn the_bearer_scheme_is_case_insensitive_on_every_door() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let admin = app.store.create_admin_key("ops").await.unwrap();
    let id = app.submit(&key, "hi").await;
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = |key: &str| format!("{scheme} {key}");
        let get = |path: String, key: &str| {
            app.http
                .get(format!("{}{path}", app.api))
                .header("authorization", auth(key))
                .send()
        };
        let job = get(format!("/v1/jobs/{id}"), &key).await.unwrap();
        assert_eq!(
            job.status(),
            StatusCode::OK,
            "{scheme}: GET /v1/jobs/{{id}}"
        );
        let sse = get(format!("/v1/jobs/{id}/events"), &key).await.unwrap();
        assert_eq!(sse.status(), StatusCode::OK, "{scheme}: SSE");
        drop(sse);
        let models = get("/v1/models".into(), &key).await.unwrap();
        assert_eq!(models.status(), StatusCode::OK, "{scheme}: /v1/models");
        let keys = get("/admin/v1/keys".into(), &admin).await.unwrap();
        assert_eq!(keys.status(), StatusCode::OK, "{scheme}: /admin/v1/keys");

        let url = format!("{}/v1/stream", app.api.replacen("http", "ws", 1));
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", auth(&key).parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let first = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(text) = first else {
            panic!("{scheme}: the socket answered {first:?}, not ready");
        };
        let ready: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(ready["type"], "ready", "{scheme}: WebSocket");
    }
    let (status, _) = app
        .send(app.http.get(format!("{}/v1/jobs/{id}", app.api)), "")
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.cleanup().await;
}

#[tokio::test]
async fn an_idempotency_key_is_printable_ascii_without_spaces_or_tabs() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let post = |idempotency: &'static str, path: &'static str| {
        let body = if path == "/v1/jobs" {
            job_body("hi")
        } else {
            json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]})
        };
        app.http
            .post(format!("{}{path}", app.api))
            .bearer_auth(&key)
            .header("idempotency-key", idempotency)
            .json(&body)
            .send()
    };
    for bad in ["order\t42", "order 42", "\t"] {
        let response = post(bad, "/v1/jobs").await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad:?}"
        );
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("Idempotency-Key"), "{message}");
        let response = post(bad, "/v1/chat/completions").await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "chat {bad:?}");
    }
    assert_eq!(app.total_jobs().await, 0);
    let response = post("order-42_~!", "/v1/jobs").await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    app.cleanup().await;
}

#[tokio::test]
async fn a_key_gets_only_a_real_email_address_from_the_api_and_the_cli() {
    let app = spawn_app(AppOptions::default()).await;
    let admin = app.store.create_admin_key("ops").await.unwrap();
    let create = |email: &str| {
        json!({"tenant": "acme", "user": "u", "tier": "free", "email": email}).to_string()
    };
    for bad in [
        "not-an-email",
        "x\r\nBcc: evil@example.org",
        "x@example.org\n",
        "a b@c.d",
    ] {
        let (status, _, answer) = post_raw(&app, "/admin/v1/keys", &admin, create(bad)).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{bad:?}: {answer}"
        );
        assert_eq!(answer["error"]["code"], "invalid_request", "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains("email"), "{bad:?}: {message}");

        let out = app
            .cli(&[
                "keys", "create", "--tenant", "acme", "--user", "u", "--tier", "free", "--email",
                bad,
            ])
            .await;
        assert!(!out.status.success(), "the CLI took {bad:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("--email is not an email address"),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "no key printed for {bad:?}");
    }
    let keys = app.store.api_keys().await.unwrap();
    assert_eq!(keys.len(), 1, "only the admin key exists: {keys:?}");

    let (status, _, answer) =
        post_raw(&app, "/admin/v1/keys", &admin, create("me@example.org")).await;
    assert_eq!(status, StatusCode::CREATED, "{answer}");
    let out = app
        .cli(&[
            "keys",
            "create",
            "--tenant",
            "acme",
            "--user",
            "u",
            "--tier",
            "free",
            "--email",
            "me+cli@mail.example.org",
        ])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.cleanup().await;
}
