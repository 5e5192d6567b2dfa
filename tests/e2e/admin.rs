//! The operator API and CLI: dead jobs listed, inspected, replayed to success and purged;
//! lane depths; keys created and revoked; admin and tenant keys each kept to their own routes.

use crate::helpers::{job_body, sim_always_failing, spawn_app, AppOptions, TestApp};
use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_core::{JobState, RequestId, Tier};
use sluice_sim::Faults;
use std::time::Duration;

async fn admin(
    app: &TestApp,
    method: reqwest::Method,
    path: &str,
    key: &str,
) -> (StatusCode, Value) {
    let response = app
        .http
        .request(method, format!("{}{path}", app.api))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn dead_job(app: &TestApp, key: &str, text: &str) -> RequestId {
    let id = app.submit(key, text).await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    assert_eq!(app.state(id).await, JobState::Dead);
    id
}

#[tokio::test]
async fn dead_jobs_round_trip_to_success_through_the_admin_api_and_the_cli() {
    let app = spawn_app(AppOptions {
        sim: sim_always_failing(400),
        ..AppOptions::default()
    })
    .await;
    let tenant = app.key("acme", Tier::Pro).await;
    let ops = app.store.create_admin_key("ops").await.unwrap();
    let by_api = dead_job(&app, &tenant, "replayed through the API").await;
    let by_cli = dead_job(&app, &tenant, "replayed by the CLI").await;
    let purged = dead_job(&app, &tenant, "purged").await;

    // Each key stays on its own side.
    let (status, _) = admin(&app, reqwest::Method::GET, "/admin/v1/dead", &tenant).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = app
        .post_job(&ops, &job_body("an admin cannot submit"))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let (status, dead) = admin(&app, reqwest::Method::GET, "/admin/v1/dead", &ops).await;
    assert_eq!(status, StatusCode::OK, "{dead}");
    let listed: Vec<&str> = dead
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["request_id"].as_str().unwrap())
        .collect();
    for id in [by_api, by_cli, purged] {
        assert!(listed.contains(&id.to_string().as_str()), "{dead}");
    }
    assert!(dead[0]["error"].as_str().unwrap().contains("400"), "{dead}");

    let path = format!("/admin/v1/jobs/{by_api}");
    let (status, inspected) = admin(&app, reqwest::Method::GET, &path, &ops).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(inspected["tenant"], "acme");
    let states: Vec<&str> = inspected["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["queued", "running", "dead"]);

    // Healed, the replays succeed: one through the API, one through `sluice dlq replay`.
    app.sim.set_faults(Faults::default());
    let (status, replayed) =
        admin(&app, reqwest::Method::POST, &format!("{path}/replay"), &ops).await;
    assert_eq!(status, StatusCode::OK, "{replayed}");
    let out = app.cli(&["dlq", "replay", &by_cli.to_string()]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    app.wait_terminal(&[by_api, by_cli], Duration::from_secs(30))
        .await;
    for id in [by_api, by_cli] {
        let (_, job) = app.get_job(&tenant, id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let (status, again) = admin(&app, reqwest::Method::POST, &format!("{path}/replay"), &ops).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "only dead jobs replay: {again}"
    );

    let out = app.cli(&["dlq", "inspect", &by_cli.to_string()]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("succeeded") && text.contains("dead"),
        "{text}"
    );

    // Purged for good; a job that is not dead is not purged.
    let gone = format!("/admin/v1/jobs/{purged}");
    let (status, _) = admin(&app, reqwest::Method::DELETE, &gone, &ops).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = admin(&app, reqwest::Method::GET, &gone, &ops).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin(&app, reqwest::Method::DELETE, &path, &ops).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let out = app.cli(&["dlq", "purge", &by_cli.to_string()]).await;
    assert!(!out.status.success(), "a succeeded job is not purged");

    let (status, lanes) = admin(&app, reqwest::Method::GET, "/admin/v1/lanes", &ops).await;
    assert_eq!(status, StatusCode::OK, "{lanes}");
    assert_eq!(lanes["lanes"].as_array().unwrap().len(), 5);
    assert!(lanes["load"]["level"].is_string());
    app.cleanup().await;
}

#[tokio::test]
async fn admins_create_and_revoke_keys_through_the_api_and_the_cli() {
    let app = spawn_app(AppOptions::default()).await;
    let out = app
        .cli(&["keys", "create", "--admin", "--user", "root"])
        .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ops = String::from_utf8(out.stdout).unwrap().trim().to_owned();

    let response = app
        .http
        .post(format!("{}/admin/v1/keys", app.api))
        .bearer_auth(&ops)
        .json(&json!({ "tenant": "newco", "user": "ann", "tier": "basic" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let key: Value = response.json().await.unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    let id = app.submit(&key, "from a key an admin made").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;

    let bad = app
        .http
        .post(format!("{}/admin/v1/keys", app.api))
        .bearer_auth(&ops)
        .json(&json!({ "tenant": "newco", "user": "ann" }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        bad.status(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "a tenant key needs a tier"
    );

    let (_, keys) = admin(&app, reqwest::Method::GET, "/admin/v1/keys", &ops).await;
    let ann = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["user"] == "ann")
        .unwrap()
        .clone();
    assert_eq!(
        (ann["tenant"].as_str(), ann["admin"].as_bool()),
        (Some("newco"), Some(false))
    );
    assert!(
        keys.to_string().find(&key).is_none(),
        "secrets are never listed"
    );
    let revoke = format!("/admin/v1/keys/{}", ann["id"].as_str().unwrap());
    let (status, _) = admin(&app, reqwest::Method::DELETE, &revoke, &ops).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(app.store.principal_for_key(&key).await.unwrap().is_none());

    let out = app.cli(&["keys", "list"]).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("admin\t\troot") && listing.contains("revoked"),
        "{listing}"
    );
    let root_id = listing
        .lines()
        .find(|l| l.contains("\troot\t"))
        .and_then(|l| l.split('\t').next())
        .unwrap()
        .to_owned();
    let out = app.cli(&["keys", "revoke", &root_id]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = admin(&app, reqwest::Method::GET, "/admin/v1/keys", &ops).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "a revoked admin key is refused at once"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn a_paused_lane_or_endpoint_holds_its_jobs_until_resumed() {
    let app = spawn_app(AppOptions::default()).await;
    let ops = app.store.create_admin_key("ops").await.unwrap();
    let free = app.key("freebie", Tier::Free).await;
    let pro = app.key("payer", Tier::Pro).await;
    let post = |path: &'static str| admin(&app, reqwest::Method::POST, path, &ops);

    let (status, paused) = post("/admin/v1/lanes/batch/pause").await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    assert_eq!(paused["paused"], json!(["lane:batch"]));
    // Workers read pauses every second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = app.submit(&free, "waits in the paused batch lane").await;
    let served = app.submit(&pro, "the priority lane still runs").await;
    app.wait_terminal(&[served], Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(app.state(held).await, JobState::Queued, "held while paused");
    let (status, _) = post("/admin/v1/lanes/batch/resume").await;
    assert_eq!(status, StatusCode::OK);
    app.wait_terminal(&[held], Duration::from_secs(30)).await;
    assert_eq!(app.state(held).await, JobState::Succeeded);

    let (status, paused) = post("/admin/v1/endpoints/sim-1/pause").await;
    assert_eq!(status, StatusCode::OK, "{paused}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let calls = app.sim.stats().total;
    let held = app.submit(&pro, "waits for its only endpoint").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(app.sim.stats().total, calls, "no call to a paused endpoint");
    assert_ne!(app.state(held).await, JobState::Succeeded);
    let (status, lanes) = admin(&app, reqwest::Method::GET, "/admin/v1/lanes", &ops).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lanes["paused"], json!(["endpoint:sim-1"]));
    post("/admin/v1/endpoints/sim-1/resume").await;
    app.wait_terminal(&[held], Duration::from_secs(30)).await;
    assert_eq!(app.state(held).await, JobState::Succeeded);

    let (status, _) = post("/admin/v1/endpoints/nope/pause").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = post("/admin/v1/lanes/dead/pause").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = admin(
        &app,
        reqwest::Method::POST,
        "/admin/v1/lanes/batch/pause",
        &pro,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    app.cleanup().await;
}

#[tokio::test]
async fn the_cli_shows_lane_depths_and_pauses_and_resumes_lanes_and_endpoints() {
    let app = spawn_app(AppOptions::default()).await;
    let ok = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    ok(&app.cli(&["pause", "lane", "batch"]).await);
    ok(&app.cli(&["pause", "endpoint", "sim-1"]).await);
    assert_eq!(
        app.store.pauses().await.unwrap(),
        ["endpoint:sim-1", "lane:batch"]
    );
    let out = app.cli(&["lanes"]).await;
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for lane in ["priority", "standard", "batch", "retry", "dead"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{lane}\t"))),
            "{text}"
        );
    }
    assert!(
        text.contains("paused\tlane:batch") && text.contains("paused\tendpoint:sim-1"),
        "{text}"
    );
    ok(&app.cli(&["resume", "lane", "batch"]).await);
    ok(&app.cli(&["resume", "endpoint", "sim-1"]).await);
    assert!(app.store.pauses().await.unwrap().is_empty());
    for bad in [
        ["pause", "lane", "dead"],
        ["pause", "endpoint", "nope"],
        ["pause", "lane", "fast"],
    ] {
        let out = app.cli(&bad).await;
        assert!(!out.status.success(), "{bad:?} must fail");
    }
    assert!(
        app.store.pauses().await.unwrap().is_empty(),
        "refusals change nothing"
    );
    app.cleanup().await;
}
