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
    let mut api = start_json(&app.config_path, "serve", "warn,sluice_api=debug");
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
