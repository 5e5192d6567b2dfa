//! Structured logs: with `SLUICE_LOG_FORMAT=json` the API and the worker write one JSON object a
//! line, and what they log while handling a job carries its request_id from the job's span.

use crate::helpers::{spawn_app, AppOptions, BIN};
use serde_json::Value;
use sluice_core::Tier;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Start `sluice <command>` on the app's config logging JSON at `filter`.
fn start_json(config: &std::path::Path, command: &str, filter: &str) -> Child {
    start_logging(config, command, filter, "json")
}

/// Start `sluice <command>` on the app's config logging at `filter` in `format`.
fn start_logging(config: &std::path::Path, command: &str, filter: &str, format: &str) -> Child {
    Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), command])
        .env("SLUICE_LOG", filter)
        .env("SLUICE_LOG_FORMAT", format)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// The `listening on` URL a starting process prints on stdout.
async fn listening_url(child: &mut Child) -> String {
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = stdout
            .next_line()
            .await
            .unwrap()
            .expect("the process exited");
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_owned();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    url
}

/// Read JSON log lines from `child` until one satisfies `found`; every line must be JSON.
async fn find_line(child: &mut Child, found: impl Fn(&Value) -> bool) -> Value {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
            if found(&value) {
                return value;
            }
        }
        panic!("the process ended before logging the line");
    })
    .await
    .expect("no such log line within 30 s")
}

#[tokio::test]
async fn json_logs_of_api_and_worker_carry_the_jobs_request_id() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..AppOptions::default()
    })
    .await;
    let mut api = start_json(
        &app.config_path,
        "serve",
        "warn,sluice_api=debug,sluice_admission=debug",
    );
    let url = listening_url(&mut api).await;
    let mut worker = start_json(&app.config_path, "worker", "warn,sluice_worker=debug");
    let key = app.key("acme", Tier::Pro).await;
    let response = app
        .http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(&key)
        .json(&crate::helpers::job_body("log me"))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let id = body["request_id"].as_str().unwrap().to_owned();

    let accepted = find_line(&mut api, |v| v["fields"]["message"] == "job accepted").await;
    assert_eq!(accepted["span"]["request_id"], id, "{accepted}");
    assert_eq!(accepted["span"]["name"], "submit");
    assert_eq!(accepted["span"]["tenant"], "acme");
    let done = find_line(&mut worker, |v| v["fields"]["message"] == "job succeeded").await;
    assert_eq!(done["span"]["request_id"], id, "{done}");
    assert_eq!(done["span"]["name"], "job");
    assert_eq!(done["level"], "DEBUG");
    app.cleanup().await;
}

/// A stand-in OTLP/HTTP collector: answers every request 200 and hands on each body.
async fn collector() -> (
    String,
    tokio::sync::mpsc::UnboundedReceiver<(String, Vec<u8>)>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                loop {
                    // One request: headers up to the blank line, then content-length bytes.
                    let head_end = loop {
                        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        let mut chunk = [0u8; 8192];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buffer[..head_end]).to_string();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (name, value) = l.split_once(':')?;
                            name.eq_ignore_ascii_case("content-length")
                                .then(|| value.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buffer.len() < head_end + length {
                        let mut chunk = [0u8; 8192];
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buffer[head_end..head_end + length].to_vec();
                    buffer.drain(..head_end + length);
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let _ = tx.send((path, body));
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                    if socket.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (url, rx)
}

#[tokio::test]
async fn with_an_otlp_endpoint_set_the_workers_job_spans_are_exported() {
    let app = spawn_app(AppOptions {
        workers: 0,
        ..AppOptions::default()
    })
    .await;
    let (endpoint, mut received) = collector().await;
    let mut worker = Command::new(BIN)
        .args(["--config", app.config_path.to_str().unwrap(), "worker"])
        // The export follows the log filter: the job span is at info.
        .env("SLUICE_LOG", "warn,sluice_worker=info")
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "trace me").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    // The span's request_id attribute is a protobuf string: its UTF-8 bytes are in the body.
    let wanted = id.to_string().into_bytes();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((path, body)) = received.recv().await {
            assert_eq!(path, "/v1/traces");
            if body.windows(wanted.len()).any(|w| w == wanted.as_slice()) {
                assert!(
                    body.windows(3).any(|w| w == b"job"),
                    "the span is named job"
                );
                return;
            }
        }
    })
    .await
    .expect("no exported span carried the job's request_id within 20 s");
    let _ = worker.start_kill();
    app.cleanup().await;
}

/// At `SLUICE_LOG=trace` every crate logs all it may: keys sent as `Authorization` or in a
/// WebSocket `auth` message must still appear nowhere (tungstenite logs each message it
/// receives at trace, h2 and hyper their headers).
#[tokio::test]
async fn at_trace_level_no_api_key_reaches_the_log() {
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::Message;
    let app = spawn_app(AppOptions {
        workers: 0,
        ..AppOptions::default()
    })
    .await;
    let mut api = start_logging(&app.config_path, "serve", "trace", "human");
    let mut stderr = api.stderr.take().unwrap();
    let log = tokio::spawn(async move {
        let mut all = Vec::new();
        let _ = stderr.read_to_end(&mut all).await;
        String::from_utf8_lossy(&all).into_owned()
    });
    let url = listening_url(&mut api).await;
    let key = app.key("acme", Tier::Pro).await;
    let response = app
        .http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(&key)
        .json(&crate::helpers::job_body("log me at trace"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let ws = format!("{}/v1/stream", url.replacen("http", "ws", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await.unwrap();
    let auth = serde_json::json!({ "type": "auth", "api_key": key }).to_string();
    socket.send(Message::Text(auth.into())).await.unwrap();
    let ready = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message {
                return text.to_string();
            }
        }
        panic!("the socket closed");
    })
    .await
    .unwrap();
    assert!(ready.contains("\"ready\""), "{ready}");
    drop(socket);
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.kill().await.unwrap();
    let log = log.await.unwrap();
    assert!(log.contains("TRACE"), "the log is at trace level");
    let secret = key.strip_prefix("sk_sluice_").unwrap();
    assert_eq!(secret.len(), 32, "{key}");
    assert!(
        !log.contains(secret),
        "the key is in the trace log: {}",
        log.lines()
            .filter(|l| l.contains(secret))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    app.cleanup().await;
}
