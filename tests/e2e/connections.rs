//! Connection limits (`[http]`) against a real server on a random port: half-sent headers, a
//! body that never arrives, idle keep-alive connections and the connection cap cost a client
//! its own socket for a bounded time, and never the service of everyone else.

use crate::helpers::{job_body, spawn_app, AppOptions, TestApp};
use sluice_core::Tier;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn http_toml(lines: &str) -> String {
    format!("\n[http]\n{lines}\n")
}

fn addr(app: &TestApp) -> String {
    app.api.trim_start_matches("http://").to_owned()
}

/// Read until the server closes the connection or `deadline`; what was read, and whether it
/// closed (EOF or a reset) in time.
async fn read_until_closed(stream: &mut TcpStream, deadline: Instant) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Err(_) => return (got, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// `/healthz` on a fresh connection, and how long it took.
async fn healthz(app: &TestApp) -> Duration {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client.get(format!("{}/healthz", app.api)).send(),
    )
    .await
    .expect("/healthz answers")
    .unwrap();
    assert_eq!(response.status(), 200);
    started.elapsed()
}

/// A submission on a fresh connection, and how long it took.
async fn submission(app: &TestApp, key: &str) -> Duration {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        client
            .post(format!("{}/v1/jobs", app.api))
            .bearer_auth(key)
            .json(&job_body("under siege"))
            .send(),
    )
    .await
    .expect("the submission answers")
    .unwrap();
    assert_eq!(response.status(), 202);
    started.elapsed()
}

/// 2,000, or fewer if this process's open-file limit cannot hold both ends of each beside the
/// app's own files (the server's cap is lowered to the limit less 128, above this count).
fn half_sent_count() -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line["Max open files".len()..]
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .unwrap_or(usize::MAX);
    let count = 2_000.min(limit.saturating_sub(512) / 2);
    assert!(
        count >= 200,
        "the open-file limit ({limit}) is too low for this test: raise `ulimit -n`"
    );
    if count < 2_000 {
        eprintln!("open-file limit {limit}: {count} half-sent connections instead of 2,000");
    }
    count
}

#[tokio::test]
async fn two_thousand_half_sent_requests_neither_starve_others_nor_stay_open() {
    // Each connection costs this process two descriptors (client and server end).
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("header_read_timeout_secs = 2.0\nmax_connections = 3000"),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let addr = addr(&app);
    let opened = Instant::now();
    let mut held = Vec::new();
    let count = half_sent_count();
    for _ in 0..count {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(stream);
    }
    let health = healthz(&app).await;
    let submit = submission(&app, &key).await;
    assert!(health < Duration::from_secs(1), "/healthz took {health:?}");
    assert!(
        submit < Duration::from_secs(1),
        "the submission took {submit:?}"
    );
    // Opening them took a while on a busy machine: the last one opened gets its 2 s too.
    let deadline = Instant::now() + Duration::from_secs(2) + Duration::from_secs(2);
    let mut open = 0;
    for stream in &mut held {
        let (got, closed) = read_until_closed(stream, deadline).await;
        assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 408"));
        open += usize::from(!closed);
    }
    assert_eq!(
        open,
        0,
        "{open} of {count} half-sent connections still open {:?} after the first",
        opened.elapsed()
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_body_that_never_arrives_is_answered_408_within_the_body_timeout() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("body_read_timeout_secs = 1.0"),
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    // The job API's error shape, and the OpenAI routes' own.
    for (path, shape) in [
        ("/v1/jobs", "\"code\":\"body_timeout\""),
        ("/v1/chat/completions", "\"type\":\"invalid_request_error\""),
    ] {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"model\""
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let sent = Instant::now();
        let (got, closed) = read_until_closed(&mut stream, sent + Duration::from_secs(4)).await;
        let elapsed = sent.elapsed();
        let text = String::from_utf8_lossy(&got);
        assert!(closed, "{path}: still open after {elapsed:?}: {text}");
        assert!(text.starts_with("HTTP/1.1 408"), "{path}: {text}");
        assert!(text.contains("body_timeout"), "{path}: {text}");
        assert!(text.contains(shape), "{path}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("connection: close"),
            "{path}: {text}"
        );
        assert!(
            elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(3),
            "{path}: answered after {elapsed:?}"
        );
    }
    app.cleanup().await;
}

#[tokio::test]
async fn past_the_connection_cap_a_connection_is_refused_503_and_under_it_requests_work() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("max_connections = 3\nheader_read_timeout_secs = 30.0"),
        ..Default::default()
    })
    .await;
    let addr = addr(&app);
    // Under the cap, requests work.
    healthz(&app).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(&addr).await.unwrap());
    }
    // The fresh client's connection above may still be closing: give the slots a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut extra = TcpStream::connect(&addr).await.unwrap();
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (got, closed) =
        read_until_closed(&mut extra, Instant::now() + Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(closed, "the refused connection is closed: {text}");
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("\"code\":\"too_many_connections\""), "{text}");
    assert!(
        text.to_ascii_lowercase().contains("connection: close"),
        "{text}"
    );
    assert!(
        text.to_ascii_lowercase().contains("retry-after: 1"),
        "{text}"
    );

    // One of the three goes: its slot serves the next client.
    held.pop();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let client = reqwest::Client::new();
        let response = client.get(format!("{}/healthz", app.api)).send().await;
        match response {
            Ok(response) if response.status() == 200 => break,
            other => assert!(
                Instant::now() < deadline,
                "a freed slot serves no request: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    app.cleanup().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("header_read_timeout_secs = 1.0"),
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("\"ok\"}") {
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buf))
            .await
            .expect("the answer")
            .unwrap();
        assert!(n > 0, "closed before answering");
        got.extend_from_slice(&buf[..n]);
    }
    let answered = Instant::now();
    let (more, closed) = read_until_closed(&mut stream, answered + Duration::from_secs(4)).await;
    let idle = answered.elapsed();
    assert!(more.is_empty());
    assert!(closed, "still open after {idle:?}");
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_stream_longer_than_the_header_timeout_is_not_idle() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("header_read_timeout_secs = 1.0"),
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    // No worker: the job stays queued and its event stream open.
    let id = app.submit(&key, "waits").await;
    let mut response = app.open_events(&key, id).await;
    assert_eq!(response.status(), 200);
    let opened = Instant::now();
    let cut = tokio::time::timeout(Duration::from_secs(3), async {
        while let Ok(Some(_)) = response.chunk().await {}
    })
    .await;
    assert!(
        cut.is_err(),
        "the event stream ended after {:?}",
        opened.elapsed()
    );
    drop(response);
    app.cleanup().await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_on_the_same_port() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let body = job_body("over h2c").to_string();
    let auth = format!("Authorization: Bearer {key}");
    let url = format!("{}/v1/jobs", app.api);
    // One curl a request: curl 7.88 fails to reuse a prior-knowledge connection.
    let curl = |args: Vec<String>| async move {
        let output = tokio::process::Command::new("curl")
            .args(["-sS", "--http2-prior-knowledge", "-o", "/dev/null"])
            .args(["-w", "%{http_version} %{http_code}"])
            .args(args)
            .output()
            .await
            .expect("curl runs");
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    assert_eq!(curl(vec![format!("{}/healthz", app.api)]).await, "2 200");
    let submit = vec![
        "-H".into(),
        auth,
        "-H".into(),
        "Content-Type: application/json".into(),
        "--data".into(),
        body,
        url,
    ];
    assert_eq!(curl(submit).await, "2 202");
    app.cleanup().await;
}

#[tokio::test]
async fn a_held_chat_completion_longer_than_the_header_timeout_is_answered() {
    let mut app = spawn_app(AppOptions {
        extra_toml: http_toml("header_read_timeout_secs = 1.0"),
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    // No worker yet: the request is held, with nothing on the wire, past the timeout.
    let held = tokio::spawn({
        let request = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", app.api))
            .bearer_auth(&key)
            .json(&serde_json::json!({"model": "default",
                "messages": [{"role": "user", "content": "held"}]}));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            (status, response.text().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(!held.is_finished(), "the held request ended early");
    app.start_worker().await;
    let (status, body) = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("answered once a worker runs")
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("chat.completion"), "{body}");
    app.cleanup().await;
}

/// The h2c client preface and an empty SETTINGS frame: an HTTP/2 connection with no stream.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// Whether `bytes` (server frames after its preface) hold a frame of `kind`.
fn has_h2_frame(bytes: &[u8], kind: u8) -> bool {
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        if bytes[at + 3] == kind {
            return true;
        }
        at += 9 + len;
    }
    false
}

#[tokio::test]
async fn an_idle_h2c_connection_gets_goaway_after_the_header_timeout() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml("header_read_timeout_secs = 1.0\nh2_keepalive_interval_secs = 0"),
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    let opened = Instant::now();
    let (got, closed) = read_until_closed(&mut stream, opened + Duration::from_secs(4)).await;
    let idle = opened.elapsed();
    assert!(closed, "still open after {idle:?}");
    assert!(has_h2_frame(&got, 0x7), "a GOAWAY frame: {got:?}");
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn an_h2c_peer_that_does_not_answer_pings_is_dropped() {
    let app = spawn_app(AppOptions {
        extra_toml: http_toml(
            "header_read_timeout_secs = 30.0\nh2_keepalive_interval_secs = 0.5\n\
             h2_keepalive_timeout_secs = 0.5",
        ),
        ..Default::default()
    })
    .await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream.write_all(H2_PREFACE).await.unwrap();
    let opened = Instant::now();
    let (got, closed) = read_until_closed(&mut stream, opened + Duration::from_secs(5)).await;
    let gone = opened.elapsed();
    assert!(closed, "still open after {gone:?}");
    assert!(has_h2_frame(&got, 0x6), "a PING frame: {got:?}");
    assert!(gone < Duration::from_secs(3), "dropped after {gone:?}");
    app.cleanup().await;
}

/// Send `request` as raw bytes on a fresh connection; the answer's status, head and JSON body.
async fn raw_request(app: &TestApp, request: &[u8]) -> (u16, String, serde_json::Value) {
    let mut stream = TcpStream::connect(addr(app)).await.unwrap();
    stream.write_all(request).await.unwrap();
    let (got, closed) =
        read_until_closed(&mut stream, Instant::now() + Duration::from_secs(10)).await;
    assert!(closed, "the connection is closed after the error");
    let text = String::from_utf8(got).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no whole answer: {text:?}"));
    let status = head[9..12].parse().unwrap();
    let json = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {head}\n\n{body:?}"));
    (status, head.to_ascii_lowercase(), json)
}

/// Check an answer is `status` with `{"error": {"code": code, "message"}}` and says so in JSON.
fn assert_json_error(answer: &(u16, String, serde_json::Value), status: u16, code: &str) {
    let (got, head, json) = answer;
    assert_eq!(*got, status, "{head}\n{json}");
    assert!(head.contains("content-type: application/json"), "{head}");
    assert_eq!(json["error"]["code"], code, "{json}");
    assert!(
        json["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{json}"
    );
}

#[tokio::test]
async fn http_layer_errors_have_the_json_error_body() {
    let app = spawn_app(AppOptions::default()).await;
    // A 100 KB path: over hyper's own limit (64 KiB), which answers before any service.
    let path = "a".repeat(100_000);
    let answer = raw_request(
        &app,
        format!("GET /{path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_json_error(&answer, 414, "uri_too_long");
    // A 10 KB one is under hyper's limit and over ours.
    let path = "a".repeat(10_000);
    let answer = raw_request(
        &app,
        format!("GET /v1/jobs/{path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_json_error(&answer, 414, "uri_too_long");

    // A 100 KB header: under hyper's read buffer, over our limit.
    let big = "a".repeat(100_000);
    let answer = raw_request(
        &app,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_json_error(&answer, 431, "headers_too_large");
    // 101 headers: over hyper's count, answered by hyper.
    let many: String = (0..101).map(|i| format!("X-H{i}: v\r\n")).collect();
    let answer = raw_request(
        &app,
        format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_json_error(&answer, 431, "headers_too_large");
    // The OpenAI routes answer our own limits in OpenAI's shape.
    let (status, _, json) = raw_request(
        &app,
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status, 431);
    assert_eq!(json["error"]["type"], "invalid_request_error", "{json}");
    assert_eq!(json["error"]["code"], "headers_too_large", "{json}");

    // Bad framing: hyper refuses before routing; the answer is still JSON.
    for content_length in [
        "Content-Length: abc\r\n",
        "Content-Length: 2\r\nContent-Length: 3\r\n",
    ] {
        let request = format!(
            "POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{content_length}\r\n{{}}"
        );
        let answer = raw_request(&app, request.as_bytes()).await;
        assert_json_error(&answer, 400, "bad_request");
    }
    // After a first request the socket may carry bodies, which are never rewritten: a later
    // request's parse error gets hyper's bodiless 400, as documented.
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(
            b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        )
        .await
        .unwrap();
    let (got, closed) =
        read_until_closed(&mut stream, Instant::now() + Duration::from_secs(10)).await;
    let text = String::from_utf8(got).unwrap();
    assert!(closed, "{text}");
    let second = text.rfind("HTTP/1.1 ").unwrap();
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(text[second..].starts_with("HTTP/1.1 400 "), "{text}");
    assert!(text[second..].ends_with("\r\n\r\n"), "no body: {text}");
    // Nothing of that touched anyone else.
    healthz(&app).await;
    app.cleanup().await;
}
