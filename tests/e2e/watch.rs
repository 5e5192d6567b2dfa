//! `sluice watch ID`: the CLI follows a job's events to its end, picks up where it was when
//! the connection drops, and exits non-zero for a job that did not succeed.

use crate::helpers::{spawn_app, AppOptions, BIN};
use serde_json::Value;
use sluice_core::{RequestId, Tier};
use sluice_sim::{Faults, Latency, SimConfig};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A TCP proxy in front of `api` that cuts its first connection as soon as the server has
/// sent `cut_after`; its base URL and how many connections it took.
async fn cutting_proxy(api: &str, cut_after: &'static str) -> (String, Arc<AtomicUsize>) {
    let target = api.trim_start_matches("http://").to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&connections);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let first = count.fetch_add(1, Ordering::SeqCst) == 0;
            let upstream = TcpStream::connect(&target).await.unwrap();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.into_split();
                let (mut upstream_read, mut upstream_write) = upstream.into_split();
                let requests = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut upstream_write).await;
                });
                let mut seen = String::new();
                let mut buf = vec![0; 16_384];
                loop {
                    let n = upstream_read.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || client_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if first && seen.contains(cut_after) {
                        break;
                    }
                }
                // Dropping both halves closes the client's connection mid-stream.
                requests.abort();
            });
        }
    });
    (url, connections)
}

async fn watch(api: &str, key: &str, args: &[&str]) -> std::process::Output {
    let run = tokio::process::Command::new(BIN)
        .args(["watch", "--api", api, "--key", key])
        .args(args)
        .env("SLUICE_LOG", "warn")
        .output();
    tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("sluice watch did not end within 60 s")
        .unwrap()
}

#[tokio::test]
async fn watch_follows_a_job_to_its_end_across_a_dropped_connection() {
    let app = spawn_app(AppOptions {
        sim: SimConfig {
            default_rpm: 0,
            latency: Latency::Fixed { ms: 1_500 },
            ..SimConfig::default()
        },
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "watch me").await;
    let (proxy, connections) = cutting_proxy(&app.api, r#""state":"running""#).await;
    let out = watch(&proxy, &key, &["--json", &id.to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let seen: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let stored = app.store.events(id).await.unwrap();
    let seqs: Vec<i64> = seen.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    // Every state change once, in order, although the first connection was cut after `running`.
    assert_eq!(
        seqs,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "{seen:?}"
    );
    assert_eq!(seen.last().unwrap()["state"], "succeeded");
    assert!(
        connections.load(Ordering::SeqCst) >= 2,
        "the proxy never cut"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn watch_prints_the_answer_and_fails_for_failed_or_unknown_jobs() {
    let app = spawn_app(AppOptions::default()).await;
    let key = app.key("acme", Tier::Pro).await;
    let ok = app.submit(&key, "a fine question").await;
    let out = watch(&app.api, &key, &[&ok.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = app.store.job(ok).await.unwrap().unwrap().result.unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let lines: Vec<&str> = stdout.lines().collect();
    for (line, state) in lines.iter().zip(["queued", "running", "succeeded"]) {
        assert!(line.contains(state), "{stdout}");
    }
    assert_eq!(lines.last().copied(), Some(content.as_str()), "{stdout}");

    // A 400 is final: the job is dead-lettered, and `watch` fails, saying why.
    app.sim.set_faults(Faults {
        always_fail: Some(400),
        ..Faults::default()
    });
    let bad = app.submit(&key, "a bad question").await;
    let out = watch(&app.api, &key, &[&bad.to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("ended dead") && stderr.contains("400"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("dead"));

    // Unknown (or another tenant's) jobs are refused at once, not retried.
    let out = watch(&app.api, &key, &[&RequestId::new().to_string()]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("404") && stderr.contains("no such job"),
        "{stderr}"
    );
    app.cleanup().await;
}
