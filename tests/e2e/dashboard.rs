//! The live dashboard in a real browser: after 200 jobs (some dead-lettered, some throttled)
//! headless Chromium loads `/dashboard`, its screenshot is kept, and its data must show the run.

use crate::helpers::{spawn_app, spawn_sim, AppOptions};
use serde_json::Value;
use sluice_core::{RequestId, Tier};
use sluice_sim::Faults;
use std::path::{Path, PathBuf};
use std::time::Duration;

const JOBS: usize = 200;
const BROKEN: usize = 6;
const BURSTY: usize = 4;

#[tokio::test]
async fn the_dashboard_shows_a_run_of_two_hundred_jobs_in_headless_chromium() {
    install_chromium().await;
    // One pool answers 400 to everything (its jobs go dead at once); another answers 429 to
    // its first two calls.
    let broken = spawn_sim(Faults {
        always_fail: Some(400),
        ..Faults::default()
    })
    .await;
    let bursty = spawn_sim(Faults {
        fail_first: 2,
        fail_status: 429,
        ..Faults::default()
    })
    .await;
    let pool = |name: &str, url: String, rpm: u32| {
        format!(
            "\n[[pools]]\nname = \"{name}\"\n[[pools.endpoints]]\nname = \"{name}-1\"\n\
             base_url = \"{url}\"\nmodel = \"sim-model\"\napi_key = \"sk-sim-test\"\nrpm = {rpm}\n"
        )
    };
    let app = spawn_app(AppOptions {
        workers: 2,
        rpm: 1_200,
        burst: Some(200),
        extra_toml: format!(
            "broken = \"broken\"\nbursty = \"bursty\"\n{}{}",
            pool("broken", broken.base_url(), 600),
            pool("bursty", bursty.base_url(), 120)
        ),
        ..Default::default()
    })
    .await;
    let mut keys = Vec::new();
    for tier in Tier::ALL {
        keys.push(app.key(&format!("tenant-{tier}"), tier).await);
    }
    let mut ids: Vec<RequestId> = Vec::new();
    let mut dead = Vec::new();
    for n in 0..JOBS {
        let key = &keys[n % keys.len()];
        let model = if n < BROKEN {
            "broken"
        } else if n < BROKEN + BURSTY {
            "bursty"
        } else {
            "default"
        };
        let id = app.submit_model(key, model, &format!("question {n}")).await;
        if model == "broken" {
            dead.push(id);
        }
        ids.push(id);
    }
    app.wait_terminal(&ids, Duration::from_secs(90)).await;

    let admin = app.store.create_admin_key("ops").await.unwrap();
    // The JSON the page polls, once the API's lane-load read has seen the lanes empty.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let data: Value = app
            .http
            .get(format!("{}/admin/v1/dashboard", app.api))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let lanes_empty = data["lanes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["depth"] == 0);
        if data["throughput"]["total"] == JOBS && lanes_empty {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dashboard data does not show the run: {data}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let unauthorized = app
        .http
        .get(format!("{}/admin/v1/dashboard", app.api))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);

    let url = format!("{}/dashboard#key={admin}", app.api);
    let artifacts = artifacts_dir();
    let screenshot = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    chromium(&url, &format!("--screenshot={}", screenshot.display())).await;
    assert!(
        std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0) > 10_000,
        "no screenshot at {}",
        screenshot.display()
    );
    println!("dashboard screenshot: {}", screenshot.display());
    let dom = chromium(&url, "--dump-dom").await;
    std::fs::write(artifacts.join("dashboard.html"), &dom).unwrap();

    assert_eq!(attr(&dom, "<body", "data-state").as_deref(), Some("ok"));
    assert_eq!(
        attr(&dom, "<section id=\"throughput\"", "data-total").as_deref(),
        Some("200"),
        "throughput total"
    );
    let drawn = |marker: &str| -> u64 {
        attr(&dom, marker, "data-points")
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    };
    assert!(drawn("<section id=\"throughput\"") > 0);
    assert!(drawn("<div class=\"chart\" id=\"throughput-chart\"") > 0);
    assert!(drawn("<div class=\"chart\" id=\"depth-chart\"") > 0);
    assert!(drawn("<div class=\"endpoint-chart chart\" data-endpoint=\"sim-1\"") > 0);
    for id in &dead {
        assert!(
            dom.contains(&format!("data-dead-id=\"{id}\"")),
            "dead job {id} is not listed"
        );
    }
    let endpoint =
        |name: &str, field: &str| attr(&dom, &format!("<tr data-endpoint=\"{name}\""), field);
    assert_eq!(endpoint("sim-1", "data-limit").as_deref(), Some("1200"));
    assert_eq!(
        endpoint("sim-1", "data-calls").as_deref(),
        Some("190"),
        "one call per default job"
    );
    assert_eq!(endpoint("broken-1", "data-limit").as_deref(), Some("600"));
    assert_eq!(endpoint("broken-1", "data-calls").as_deref(), Some("6"));
    assert_eq!(endpoint("bursty-1", "data-limit").as_deref(), Some("120"));
    assert_eq!(
        endpoint("bursty-1", "data-throttled").as_deref(),
        Some("2"),
        "the two 429s are marked"
    );
    for lane in ["priority", "standard", "batch", "retry"] {
        assert_eq!(
            attr(
                &dom,
                &format!("<tr data-lane=\"{lane}\" data-depth"),
                "data-depth"
            )
            .as_deref(),
            Some("0"),
            "{lane} is empty at the end"
        );
    }
    let started: u64 = ["priority", "standard", "batch"]
        .iter()
        .filter_map(|lane| {
            attr(
                &dom,
                &format!("<tr data-lane=\"{lane}\" data-p95"),
                "data-started",
            )
        })
        .filter_map(|n| n.parse::<u64>().ok())
        .sum();
    assert_eq!(started, JOBS as u64, "each job's queue wait is counted");
    app.cleanup().await;
}

/// `target/artifacts` of the workspace (CI keeps it), created if missing.
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn install_chromium() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/chromium.sh");
    let status = tokio::process::Command::new("bash")
        .arg(script)
        .status()
        .await
        .unwrap();
    assert!(status.success(), "scripts/chromium.sh failed");
}

/// Run headless Chromium on `url` with `action` (a screenshot or a DOM dump) after 8 s of the
/// page's own time, which covers several of its 2 s polls; answers what it printed.
async fn chromium(url: &str, action: &str) -> String {
    let profile = tempfile_dir();
    let run = tokio::process::Command::new("/usr/bin/chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,1000",
            "--virtual-time-budget=8000",
            &format!("--user-data-dir={}", profile.display()),
            action,
            url,
        ])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("chromium took over 60 s")
        .unwrap();
    let _ = std::fs::remove_dir_all(&profile);
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sluice-chromium-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The value of `name` in the first tag that starts with `start`.
fn attr(dom: &str, start: &str, name: &str) -> Option<String> {
    let at = dom.find(start)?;
    let tag = &dom[at..at + dom[at..].find('>')?];
    let key = format!(" {name}=\"");
    let value = &tag[tag.find(&key)? + key.len()..];
    Some(value[..value.find('"')?].to_owned())
}
