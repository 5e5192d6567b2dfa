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
    Command::new(BIN)
        .args(["--config", config.to_str().unwrap(), command])
        .env("SLUICE_LOG", filter)
        .env("SLUICE_LOG_FORMAT", "json")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
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
    let mut stdout = BufReader::new(api.stdout.take().unwrap()).lines();
    let url = loop {
        let line = stdout.next_line().await.unwrap().expect("api exited");
        if let Some(url) = line.split("listening on ").nth(1) {
            break url.trim().to_owned();
        }
    };
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
