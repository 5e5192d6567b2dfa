//! `sluice dev`: the whole system in one process on one SQLite file. Jobs complete, the printed
//! key survives a restart, a `kill -9` mid-run loses no accepted job, and it needs none of the
//! machine's services (shown inside a network namespace where they cannot be reached).

use crate::helpers::BIN;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A directory of the test's own with a config for `sluice dev`, removed at the end.
struct DevDir {
    dir: PathBuf,
}

impl DevDir {
    fn new(config: &str) -> DevDir {
        let dir = std::env::temp_dir().join(format!("sluice-dev-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("sluice.toml"), config).unwrap();
        DevDir { dir }
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data").join("sluice.db")
    }
}

impl Drop for DevDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `sluice dev`: its process, base URL and the key it printed.
struct Dev {
    child: Child,
    api: String,
    key: String,
    /// The dashboard URL it printed, admin key in the fragment.
    dashboard: String,
}

/// `sluice dev` on `dir`'s config and data file, on a free port.
fn dev_command(dir: &DevDir) -> Command {
    let mut command = Command::new(BIN);
    command
        .current_dir(&dir.dir)
        .args(["--config", "sluice.toml", "dev", "--listen", "127.0.0.1:0"])
        .arg("--data")
        .arg(dir.data())
        .env("SLUICE_LOG", "warn");
    command
}

async fn start_dev(dir: &DevDir) -> Dev {
    let mut child = dev_command(dir)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut api, mut key, mut dashboard) = (None, None, None);
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.strip_prefix("sluice api listening on ") {
                api = Some(url.trim().to_owned());
            }
            if let Some(url) = line.strip_prefix("dashboard: ") {
                dashboard = Some(url.trim().to_owned());
            }
            if let Some(k) = line.strip_prefix("api key: ") {
                key = Some(k.trim().to_owned());
                return;
            }
        }
        panic!("sluice dev exited before it was ready");
    })
    .await
    .expect("sluice dev was not ready within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Dev {
        child,
        api: api.expect("no URL printed"),
        key: key.unwrap(),
        dashboard: dashboard.expect("no dashboard URL printed"),
    }
}

impl Dev {
    async fn submit(&self, http: &reqwest::Client, text: &str) -> String {
        let body = json!({ "model": "default", "messages": [{ "role": "user", "content": text }] });
        let response = http
            .post(format!("{}/v1/jobs", self.api))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
        let accepted: Value = response.json().await.unwrap();
        accepted["request_id"].as_str().unwrap().to_owned()
    }

    async fn job(&self, http: &reqwest::Client, id: &str) -> Value {
        let response = http
            .get(format!("{}/v1/jobs/{id}", self.api))
            .bearer_auth(&self.key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::OK);
        response.json().await.unwrap()
    }

    /// The states of `ids`, once every one is terminal; panics after `timeout`.
    async fn wait_terminal(&self, http: &reqwest::Client, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pending = 0;
            for id in ids {
                let state = self.job(http, id).await["state"].clone();
                if !matches!(
                    state.as_str(),
                    Some("succeeded" | "failed" | "cancelled" | "dead")
                ) {
                    pending += 1;
                }
            }
            if pending == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{pending} of {} jobs not terminal after {timeout:?}",
                ids.len()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn kill_9(mut self) {
        self.child.start_kill().unwrap();
        self.child.wait().await.unwrap();
    }

    async fn terminate(mut self) {
        let pid = self.child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("sluice dev did not stop after SIGTERM")
            .unwrap();
        assert!(exit.success(), "sluice dev exited with {exit}");
    }
}

/// Short leases and visibility, so work a killed process held comes back within seconds.
const QUICK_RECOVERY: &str = r#"
[worker]
concurrency = 8
prefetch = 8
lease_secs = 2
reap_interval_secs = 0.5

[queue.sql]
visibility_timeout_secs = 3
"#;

#[tokio::test]
async fn dev_runs_jobs_on_one_file_and_its_key_survives_a_restart() {
    let dir = DevDir::new(QUICK_RECOVERY);
    let http = reqwest::Client::new();
    let dev = start_dev(&dir).await;
    let ids = vec![
        dev.submit(&http, "first question").await,
        dev.submit(&http, "second question").await,
    ];
    dev.wait_terminal(&http, &ids, Duration::from_secs(30))
        .await;
    let job = dev.job(&http, &ids[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(job["result"]["content"]
        .as_str()
        .unwrap()
        .starts_with("Simulated reply to: first question"));
    assert!(dir.data().exists());
    let key = dev.key.clone();
    // The dashboard's URL opens the dashboard with an admin key of its own.
    let (page, admin) = dev.dashboard.split_once("#key=").unwrap();
    assert_eq!(page, format!("{}/dashboard", dev.api));
    assert_ne!(admin, key);
    let drawn = http
        .get(format!("{}/admin/v1/dashboard", dev.api))
        .bearer_auth(admin)
        .send()
        .await
        .unwrap();
    assert_eq!(drawn.status(), reqwest::StatusCode::OK);
    let html = http.get(page).send().await.unwrap();
    assert_eq!(html.status(), reqwest::StatusCode::OK);
    let dashboard = dev.dashboard.clone();
    dev.terminate().await;

    let again = start_dev(&dir).await;
    assert_eq!(again.key, key, "the same key after a restart");
    assert_eq!(
        again.dashboard.split_once("#key=").unwrap().1,
        dashboard.split_once("#key=").unwrap().1,
        "the same admin key after a restart"
    );
    // The jobs of the first run are still there, and the key still works for new ones.
    assert_eq!(again.job(&http, &ids[1]).await["state"], "succeeded");
    let more = vec![again.submit(&http, "after the restart").await];
    again
        .wait_terminal(&http, &more, Duration::from_secs(30))
        .await;
    assert_eq!(again.job(&http, &more[0]).await["state"], "succeeded");
    again.terminate().await;
}

#[tokio::test]
async fn a_dev_process_killed_mid_run_loses_none_of_its_100_jobs() {
    // A second per call at 8 in flight: the 100 jobs need over 12 s, so the first look finds
    // some done and others not, however slowly a busy machine submits them.
    let config = format!("{QUICK_RECOVERY}\n[sim]\nlatency = {{ kind = \"fixed\", ms = 1000 }}\n");
    let dir = DevDir::new(&config);
    let http = reqwest::Client::new();
    let dev = start_dev(&dir).await;
    let mut ids = Vec::new();
    for n in 0..100 {
        ids.push(dev.submit(&http, &format!("job {n}")).await);
    }
    // Kill it once some jobs are done and others are running or waiting.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for id in &ids {
            done += usize::from(dev.job(&http, id).await["state"] == "succeeded");
        }
        if done >= 10 {
            assert!(done < 100, "every job finished before the kill");
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    dev.kill_9().await;

    let again = start_dev(&dir).await;
    again
        .wait_terminal(&http, &ids, Duration::from_secs(90))
        .await;
    let store = sluice_store::Store::connect(&sluice_store::StoreConfig {
        url: format!("sqlite://{}", dir.data().display()),
        schema: None,
        migrate: false,
        ..Default::default()
    })
    .await
    .unwrap();
    for id in &ids {
        let job = again.job(&http, id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        // Exactly one terminal event per job: none lost, none finished twice.
        let events = store.events(id.parse().unwrap()).await.unwrap();
        let terminal = events.iter().filter(|e| e.state.is_terminal()).count();
        assert_eq!(terminal, 1, "{id}: {events:?}");
    }
    again.terminate().await;
}

/// The embedded mode owns its file: after a `kill -9`, what the killed process held (taken
/// lane messages, running jobs' leases) comes back when the next one starts, not after the
/// 60 s timeouts; and a second process on the same file is refused while the first runs.
#[tokio::test]
async fn a_restarted_dev_process_recovers_a_killed_ones_jobs_at_once() {
    let config = "[worker]\nconcurrency = 8\nprefetch = 8\nlease_secs = 60\n\
                  reap_interval_secs = 0.5\n\n[queue.sql]\nvisibility_timeout_secs = 60\n\n\
                  [sim]\ndefault_rpm = 6000\nlatency = { kind = \"fixed\", ms = 1000 }\n";
    let dir = DevDir::new(config);
    let http = reqwest::Client::new();
    let dev = start_dev(&dir).await;

    let second = dev_command(&dir).output().await.unwrap();
    assert!(!second.status.success(), "a second process on the file");
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(
        said.contains("another sluice process is running on"),
        "{said}"
    );

    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(dev.submit(&http, &format!("job {n}")).await);
    }
    // Kill it while jobs are running and lane messages are taken. The simulator's limit is
    // well above what 8 calls of 1 s each use, so about 8 jobs run at any moment for ~7 s:
    // at the dev default of 600 RPM only ~3 would, and a sweep could miss the 4 it looks for.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (mut running, mut ended) = (0, 0);
        for id in &ids {
            let state = dev.job(&http, id).await["state"].clone();
            running += usize::from(state == "running");
            ended += usize::from(state == "succeeded" || state == "failed" || state == "dead");
        }
        if running >= 4 {
            break;
        }
        assert!(ended < ids.len(), "every job ended before 4 ran at once");
        assert!(Instant::now() < deadline, "no job ran before the kill");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dev.kill_9().await;

    let again = start_dev(&dir).await;
    // Well inside the 60 s lease and visibility timeout.
    again
        .wait_terminal(&http, &ids, Duration::from_secs(25))
        .await;
    for id in &ids {
        let job = again.job(&http, id).await;
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    again.terminate().await;
}

fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .parent()
        .unwrap()
}

#[tokio::test]
async fn dev_needs_no_service_a_curl_job_completes_without_network() {
    // A network namespace of its own has only a loopback of its own: PostgreSQL, RabbitMQ and
    // Redis on this machine cannot be reached from it, as on a machine without them.
    let script = repo_root().join("scripts/embedded-smoke.sh");
    let dir = DevDir::new("");
    let out = Command::new("unshare")
        .args([
            "--net",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
        ])
        .arg(&script)
        .arg(BIN)
        .current_dir(&dir.dir)
        .env("SLUICE_LOG", "warn")
        .env(
            "SLUICE_DATABASE__URL",
            "postgres://postgres@127.0.0.1:5432/postgres",
        )
        .output()
        .await
        .expect("unshare (util-linux) runs the smoke script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("\"state\":\"succeeded\""), "{stdout}");
    // The namespace really had no way to the services.
    assert!(stdout.contains("postgres unreachable"), "{stdout}");
}

#[tokio::test]
async fn serve_embedded_runs_real_pools_without_starting_a_simulator() {
    // The pools point at a simulator of the test's own: `serve --embedded` must use them and
    // start none of its own.
    let sim = crate::helpers::spawn_sim(sluice_sim::Faults::default()).await;
    let config = format!(
        "{QUICK_RECOVERY}\n[[pools]]\nname = \"real\"\n[[pools.endpoints]]\nname = \"real-1\"\n\
         base_url = \"{}\"\nmodel = \"sim-model\"\napi_key = \"sk-test\"\nrpm = 6000\n\n\
         [routes]\ndefault = \"real\"\n",
        sim.base_url()
    );
    let dir = DevDir::new(&config);
    let mut child = Command::new(BIN)
        .current_dir(&dir.dir)
        .args(["--config", "sluice.toml", "serve", "--embedded", "--data"])
        .arg(dir.data())
        .env("SLUICE_LOG", "warn")
        .env("SLUICE_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut printed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.starts_with("api key: ");
            printed.push(line);
            if done {
                return;
            }
        }
        panic!("serve --embedded exited: {printed:?}");
    })
    .await
    .expect("serve --embedded was not ready within 30 s");
    assert!(
        !printed.iter().any(|l| l.contains("simulator")),
        "{printed:?}"
    );
    let api = printed[0]
        .trim_start_matches("sluice api listening on ")
        .to_owned();
    let key = printed
        .last()
        .unwrap()
        .trim_start_matches("api key: ")
        .to_owned();
    let dashboard = printed
        .iter()
        .find_map(|l| l.strip_prefix("dashboard: "))
        .expect("serve --embedded prints the dashboard too")
        .to_owned();
    let dev = Dev {
        child,
        api,
        key,
        dashboard,
    };
    let http = reqwest::Client::new();
    let id = vec![dev.submit(&http, "through the real pool").await];
    dev.wait_terminal(&http, &id, Duration::from_secs(30)).await;
    let job = dev.job(&http, &id[0]).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["endpoint"], "real-1");
    assert_eq!(sim.calls_for_job(&id[0]), 1);
    dev.terminate().await;
}

/// The README's Python quickstart, as printed there, against `sluice dev` with the key it
/// printed: a chat completion, a stream and a batch with the official SDK (1.x and current).
#[tokio::test]
async fn the_readmes_openai_sdk_quickstart_runs_against_sluice_dev() {
    let readme = std::fs::read_to_string(crate::openai::repo().join("README.md")).unwrap();
    let section = readme
        .split("### With the OpenAI SDK")
        .nth(1)
        .expect("the README has the SDK quickstart");
    let code = section
        .split("```python\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a python block");
    let dir = DevDir::new("");
    let dev = start_dev(&dir).await;
    assert!(code.contains("http://127.0.0.1:8080/v1") && code.contains("sk_sluice_..."));
    let script = code
        .replace("http://127.0.0.1:8080/v1", &format!("{}/v1", dev.api))
        .replace("sk_sluice_...", &dev.key);
    let path = dir.dir.join("quickstart.py");
    std::fs::write(&path, script).unwrap();
    for sdk in ["py1", "py3"] {
        let python = crate::openai::sdks().await[sdk].join("bin/python");
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(python).arg(&path).output(),
        )
        .await
        .expect("the quickstart ran over 2 minutes")
        .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{sdk}: the README quickstart failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("Simulated reply to: What is a sluice?"),
            "{stdout}"
        );
        assert!(stdout.contains("Simulated reply to: Stream it"), "{stdout}");
        // The batch's output file: one line per question, in input order.
        let lines: Vec<Value> = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ids: Vec<&str> = lines
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["q0", "q1", "q2"], "{stdout}");
    }
    dev.kill_9().await;
}

#[tokio::test]
async fn dev_with_mail_makes_a_link_secret_once_and_its_links_open_across_restarts() {
    // No SMTP server needs to listen: the dev key has no address, so nothing is sent.
    let config = format!(
        "{QUICK_RECOVERY}\n[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 9\ntls = \"none\"\n\
         from = \"Sluice <sluice@sluice.test>\"\n"
    );
    let dir = DevDir::new(&config);
    let http = reqwest::Client::new();
    let dev = start_dev(&dir).await;
    let id = dev.submit(&http, "a question with a page").await;
    dev.wait_terminal(&http, std::slice::from_ref(&id), Duration::from_secs(30))
        .await;
    let path = PathBuf::from(format!("{}.link-secret", dir.data().display()));
    let secret = std::fs::read_to_string(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "only its owner reads the secret");
    }
    let signer = sluice_notify::LinkSigner::new(&secret).unwrap();
    let link = signer.path(id.parse().unwrap(), chrono::Utc::now().timestamp() + 3600);
    let open = |api: String| {
        let (http, link) = (http.clone(), link.clone());
        async move {
            let page = http.get(format!("{api}{link}")).send().await.unwrap();
            (page.status(), page.text().await.unwrap())
        }
    };
    let (status, page) = open(dev.api.clone()).await;
    assert_eq!(status, reqwest::StatusCode::OK, "{page}");
    assert!(
        page.contains("Simulated reply to: a question with a page"),
        "{page}"
    );
    dev.terminate().await;

    let again = start_dev(&dir).await;
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        secret,
        "kept, not remade"
    );
    let (status, page) = open(again.api.clone()).await;
    assert_eq!(
        status,
        reqwest::StatusCode::OK,
        "a link from before the restart opens: {page}"
    );
    again.terminate().await;
}
