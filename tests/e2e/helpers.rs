//! `spawn_app`: boots a simulator and the API and workers in this test's process (the `sluice`
//! library's `App`), on random ports, with a fresh Postgres schema and RabbitMQ queue prefix.
//! Tests that kill or signal a process ask for real `sluice serve` / `sluice worker` children
//! instead (`AppOptions::processes`).

use reqwest::StatusCode;
use serde_json::{json, Value};
use sluice_broker::rabbitmq::{RabbitBroker, RabbitConfig};
use sluice_core::{JobState, Principal, RequestId, Tier};
use sluice_sim::{SimConfig, SimHandle};
use sluice_store::{Store, StoreConfig};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub const BIN: &str = env!("CARGO_BIN_EXE_sluice");

pub use sluice_testkit::redis_url;

/// A simulator of a test's own, without request limits, answering with `faults`.
pub async fn spawn_sim(faults: sluice_sim::Faults) -> SimHandle {
    sluice_sim::spawn(
        SimConfig {
            default_rpm: 0,
            faults,
            ..SimConfig::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .expect("simulator")
}

/// The app's simulator, unlimited, answering every call with `status` (e.g. 400: every job
/// dies at once, with no retry).
pub fn sim_always_failing(status: u16) -> SimConfig {
    SimConfig {
        default_rpm: 0,
        faults: sluice_sim::Faults {
            always_fail: Some(status),
            ..sluice_sim::Faults::default()
        },
        ..SimConfig::default()
    }
}

/// What to boot.
pub struct AppOptions {
    pub workers: usize,
    pub sim: SimConfig,
    /// The endpoint's RPM as Sluice's limiter sees it.
    pub rpm: u32,
    pub burst: Option<u32>,
    pub retry_base_secs: f64,
    pub max_attempts: u32,
    pub lease_secs: f64,
    pub concurrency: usize,
    pub timeout_secs: u64,
    /// More pools on the same simulator, each routed from a model alias of its own name: (name, rpm).
    pub extra_pools: Vec<(&'static str, u32)>,
    /// The TOML value of the `default` route: a pool name or a list with fallbacks.
    pub default_route: &'static str,
    /// More lines of `[routes]` (`alias = "pool"`), for pools in `extra_toml`.
    pub extra_routes: String,
    /// Appended after the routes: more `[[pools]]`, `[limits.*]` sections.
    pub extra_toml: String,
    /// Share endpoint limits between workers through Redis: the machine's, or this URL.
    pub redis: bool,
    pub redis_url: Option<String>,
    /// Send completion emails (a `[mail]` section) to an SMTP server on this local port.
    pub smtp_port: Option<u16>,
    /// Where the lanes are.
    pub queue: Queue,
    /// Run `sluice serve` and `sluice worker` as child processes (for tests that `kill -9` or
    /// SIGTERM them, or read each process's own metrics) instead of in this process.
    pub processes: bool,
    /// `[worker] reconcile_after_secs`: how long a job waits with no lane message in sight
    /// before it is published again.
    pub reconcile_after_secs: f64,
    /// PostgreSQL and RabbitMQ of the test's own (its private servers) instead of the machine's.
    pub database_url: Option<String>,
    pub rabbitmq_url: Option<String>,
}

/// The lane backend an app runs on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Queue {
    #[default]
    Rabbitmq,
    /// SQS lanes on a moto server of the test's own.
    Sqs,
    /// The SQL queue in the app's PostgreSQL schema.
    SqlPostgres,
    /// Store and SQL queue in one SQLite file shared by the app's processes.
    Sqlite,
}

impl Default for AppOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            sim: SimConfig {
                default_rpm: 0,
                ..SimConfig::default()
            },
            rpm: 60_000,
            burst: Some(1_000),
            retry_base_secs: 0.5,
            max_attempts: 5,
            lease_secs: 5.0,
            concurrency: 16,
            timeout_secs: 10,
            extra_pools: Vec::new(),
            default_route: "\"sim\"",
            extra_routes: String::new(),
            extra_toml: String::new(),
            redis: false,
            redis_url: None,
            smtp_port: None,
            queue: Queue::Rabbitmq,
            processes: false,
            reconcile_after_secs: 600.0,
            database_url: None,
            rabbitmq_url: None,
        }
    }
}

pub struct TestApp {
    /// Start a process again when it exits before it is ready, for up to a minute, as a
    /// supervisor would: in the chaos run a node restarted while the broker is still coming
    /// back exits with "cannot connect", which is what it should do, and is started again.
    pub supervised: bool,
    pub api: String,
    pub sim: SimHandle,
    pub store: Store,
    pub http: reqwest::Client,
    pub config_path: PathBuf,
    /// The RabbitMQ queue prefix, Redis key prefix and SQL queue namespace of this app.
    pub prefix: String,
    schema: String,
    runner: Runner,
    /// The schema or SQLite file, the lanes and the Redis keys: held, removed when the app
    /// goes, whether or not the test got to `cleanup`.
    _scratch: (
        sluice_testkit::ScratchDb,
        sluice_testkit::ScratchRabbit,
        sluice_testkit::ScratchRedis,
    ),
    /// Each worker's metrics URL (`http://ADDR/metrics`), in the order they started.
    pub worker_metrics: Vec<String>,
    /// The SQS server of a `Queue::Sqs` app; held, stopped when the app goes.
    _moto: Option<sluice_sqs::testing::MotoServer>,
}

/// How the app's API and workers run.
enum Runner {
    /// In this process: the library's `App` (API and workers), and more API nodes.
    InProcess {
        app: Option<Box<sluice::App>>,
        more_apis: Vec<sluice::ApiNode>,
    },
    /// As `sluice serve` and `sluice worker` child processes.
    Processes {
        api: Option<Child>,
        workers: Vec<Child>,
    },
}

/// Another API node a test started: a process or one in this process, stopped with the app.
pub enum Node {
    /// Held, never read: dropping it kills the process.
    Process(#[allow(dead_code)] Child),
    InProcess,
}

/// `[mail] link_secret` of the harness: tests sign and check result-page links with it.
pub const LINK_SECRET: &str = "e2e result-link secret, 32+ bytes long";

pub async fn spawn_app(options: AppOptions) -> TestApp {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let db = match options.queue {
        Queue::Sqlite => sluice_testkit::ScratchDb::sqlite("e2e"),
        _ => match &options.database_url {
            // Commits wait for the WAL flush: a test's own server may be crashed on purpose.
            Some(url) => sluice_testkit::ScratchDb::postgres_at(url, "e2e"),
            None => sluice_testkit::ScratchDb::postgres("e2e"),
        },
    };
    let lanes = match &options.rabbitmq_url {
        Some(url) => sluice_testkit::ScratchRabbit::at(url, "e2e"),
        None => sluice_testkit::ScratchRabbit::new("e2e"),
    };
    let keys = sluice_testkit::ScratchRedis {
        prefix: lanes.prefix.clone(),
        url: options.redis_url.clone().unwrap_or_else(redis_url),
    };
    let prefix = lanes.prefix.clone();
    let schema = db.schema().unwrap_or_default().to_owned();
    let sim = sluice_sim::spawn(options.sim.clone(), ([127, 0, 0, 1], 0).into())
        .await
        .expect("simulator");
    let database = db.config();
    let database_url = database.url.clone();
    let database_section = match options.queue {
        Queue::Sqlite => format!("[database]\nurl = \"{database_url}\"\n"),
        _ => format!(
            "[database]\nurl = \"{database_url}\"\nschema = \"{schema}\"\n\
             max_connections = 4\napplication_name = \"{schema}\"\n"
        ),
    };
    let burst = options
        .burst
        .map(|b| format!("burst = {b}"))
        .unwrap_or_default();
    let config = format!(
        r#"
listen = "127.0.0.1:0"

{database}

[rabbitmq]
url = "{amqp}"
prefix = "{prefix}"

[worker]
concurrency = {concurrency}
prefetch = {concurrency}
lease_secs = {lease}
reap_interval_secs = 0.5
shutdown_grace_secs = 10
metrics_listen = "127.0.0.1:0"
reconcile_after_secs = {reconcile}

[worker.retry]
base_delay_secs = {base}
max_delay_secs = 30
max_attempts = {attempts}
jitter = 0.25

[[pools]]
name = "sim"
[[pools.endpoints]]
name = "sim-1"
base_url = "{sim_url}"
model = "sim-model"
api_key = "sk-sim-test"
rpm = {rpm}
{burst}
timeout_secs = {timeout}

[routes]
default = {route}
"#,
        route = options.default_route,
        database = database_section,
        amqp = lanes.url,
        concurrency = options.concurrency,
        lease = options.lease_secs,
        reconcile = options.reconcile_after_secs,
        base = options.retry_base_secs,
        attempts = options.max_attempts,
        sim_url = sim.base_url(),
        rpm = options.rpm,
        timeout = options.timeout_secs,
    );
    // The config ends inside [routes]: route lines first, then the pools they name.
    let mut config = config;
    config.push_str(&options.extra_routes);
    if !options.extra_routes.ends_with('\n') {
        config.push('\n');
    }
    for (name, _) in &options.extra_pools {
        config.push_str(&format!("{name} = \"{name}\"\n"));
    }
    for (name, rpm) in &options.extra_pools {
        config.push_str(&format!(
            "\n[[pools]]\nname = \"{name}\"\n[[pools.endpoints]]\nname = \"{name}-1\"\n\
             base_url = \"{}\"\nmodel = \"sim-model\"\napi_key = \"sk-sim-test\"\n\
             rpm = {rpm}\nburst = 1\n",
            sim.base_url()
        ));
    }
    config.push('\n');
    config.push_str(&options.extra_toml);
    // Bursts of test jobs would trip the default wait targets: only tests about load
    // shedding (which bring their own section) have it on.
    if !options.extra_toml.contains("[shedding") {
        config.push_str("\n[shedding]\nenabled = false\n");
    }
    if options.redis {
        config.push_str(&format!(
            "\n[redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n",
            options.redis_url.clone().unwrap_or_else(redis_url)
        ));
    }
    if let Some(port) = options.smtp_port {
        // The API's port is not known yet; emails link to this base URL instead. The lease is
        // the shortest the mailer takes, so a killed worker's email is sent again soon.
        config.push_str(&format!(
            "\n[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = {port}\ntls = \"none\"\n\
             from = \"Sluice <sluice@sluice.test>\"\npublic_base_url = \"http://sluice.test:8080\"\n\
             link_secret = \"{LINK_SECRET}\"\n\
             backoff_base_secs = 0.2\npoll_interval_secs = 0.2\nlease_secs = 10\n\
             timeout_secs = 5\n"
        ));
    }
    let moto = match options.queue {
        Queue::Rabbitmq => None,
        Queue::Sqs => {
            let moto = sluice_sqs::testing::MotoServer::start().await;
            config.push_str(&format!(
                "\n[queue]\nbackend = \"sqs\"\n[queue.sqs]\nprefix = \"{prefix}\"\n\
                 endpoint_url = \"{}\"\nvisibility_timeout_secs = 5\nwait_time_secs = 1\n",
                moto.endpoint()
            ));
            Some(moto)
        }
        Queue::SqlPostgres | Queue::Sqlite => {
            // A quick fallback poll: with SQLite, other processes' messages are only seen by it.
            config.push_str(&format!(
                "\n[queue]\nbackend = \"sql\"\n[queue.sql]\nnamespace = \"{prefix}\"\n\
                 visibility_timeout_secs = 5\npoll_interval_ms = 100\n"
            ));
            None
        }
    };
    let config_path = std::env::temp_dir().join(format!("sluice-e2e-{id}.toml"));
    std::fs::write(&config_path, config).unwrap();

    // Migrate once here so the processes start on a ready schema. Under its own name in
    // `pg_stat_activity`: the app's connections are the ones a test may cut.
    let store = Store::connect(&StoreConfig {
        application_name: "sluice-e2e-test".into(),
        ..database
    })
    .await
    .expect("database");

    let mut app = TestApp {
        api: String::new(),
        sim,
        store,
        http: reqwest::Client::new(),
        config_path,
        prefix,
        schema,
        runner: if options.processes {
            Runner::Processes {
                api: None,
                workers: Vec::new(),
            }
        } else {
            Runner::InProcess {
                app: None,
                more_apis: Vec::new(),
            }
        },
        worker_metrics: Vec::new(),
        supervised: false,
        _moto: moto,
        _scratch: (db, lanes, keys),
    };
    app.boot(options.workers).await;
    if options.redis && options.redis_url.is_none() {
        // The API's bus subscribes to Redis in the background: a streamed job's deltas sent
        // before it listens are lost (the poll makes good only state changes).
        let (url, channel) = (
            sluice_testkit::redis_url(),
            format!("{}:events", app.prefix),
        );
        app.wait_for(
            "the API's event bus to listen",
            Duration::from_secs(30),
            || {
                let (url, channel) = (url.clone(), channel.clone());
                async move {
                    sluice_testkit::redis_subscribers(&url, &channel)
                        .await
                        .is_ok_and(|n| n >= 1)
                }
            },
        )
        .await;
    }
    app
}

impl TestApp {
    /// Start `sluice <command>` with this app's config and wait for its ready line; when
    /// `supervised`, start it again while it exits before it is ready, for up to a minute.
    async fn start(&self, command: &str, ready: &str) -> (Child, String) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_start(command, ready).await {
                Ok(started) => return started,
                Err(why) if self.supervised && Instant::now() < deadline => {
                    eprintln!("{why}; starting it again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(why) => panic!("{why}"),
            }
        }
    }

    /// One start of `sluice <command>`: the process and its ready line, or why it exited.
    async fn try_start(&self, command: &str, ready: &str) -> Result<(Child, String), String> {
        let mut child = Command::new(BIN)
            .args(["--config", self.config_path.to_str().unwrap(), command])
            .env("SLUICE_LOG", "warn,sluice_worker=info")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn sluice");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if line.contains(ready) {
                    return Some(line);
                }
            }
            None
        })
        .await
        .unwrap_or_else(|_| panic!("sluice {command} was not ready within 30 s"))
        .ok_or_else(|| format!("sluice {command} exited before it was ready"))?;
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((child, line))
    }

    /// Start the API and `workers` workers on the config file as it is now.
    async fn boot(&mut self, workers: usize) {
        match &mut self.runner {
            Runner::InProcess { app, .. } => {
                let config =
                    sluice::Config::load(Some(&self.config_path)).expect("the test config");
                let built = sluice::App::build(config, workers)
                    .await
                    .unwrap_or_else(|e| panic!("the app did not start: {e:#}"));
                self.api = built.url();
                self.worker_metrics = built
                    .workers
                    .iter()
                    .filter_map(|w| w.metrics.map(|a| format!("http://{a}/metrics")))
                    .collect();
                *app = Some(Box::new(built));
            }
            Runner::Processes { .. } => {
                let (child, url) = self.start_api_process().await;
                self.api = url;
                if let Runner::Processes { api, .. } = &mut self.runner {
                    *api = Some(child);
                }
                for _ in 0..workers {
                    self.start_worker().await;
                }
            }
        }
    }

    async fn start_api_process(&self) -> (Child, String) {
        let (child, line) = self.start("serve", "listening on ").await;
        let url = line
            .split("listening on ")
            .nth(1)
            .unwrap()
            .trim()
            .to_owned();
        (child, url)
    }

    /// Start another API node on this app's config (a random port); it and its base URL.
    pub async fn start_api_node(&mut self) -> (Node, String) {
        match &mut self.runner {
            Runner::InProcess { app, more_apis } => {
                let node = app
                    .as_ref()
                    .expect("the app runs")
                    .add_api_node()
                    .await
                    .unwrap_or_else(|e| panic!("another API node did not start: {e:#}"));
                let url = node.url();
                more_apis.push(node);
                (Node::InProcess, url)
            }
            Runner::Processes { .. } => {
                let (child, url) = self.start_api_process().await;
                (Node::Process(child), url)
            }
        }
    }

    /// Stop the API nodes [`TestApp::start_api_node`] started in this process, as `sluice
    /// serve` stops on SIGTERM: requests in flight are answered first.
    pub async fn stop_api_nodes(&mut self) {
        let Runner::InProcess { more_apis, .. } = &mut self.runner else {
            panic!("this test stops API nodes in this process: spawn it without `processes`")
        };
        for node in more_apis.drain(..) {
            node.stop()
                .await
                .unwrap_or_else(|e| panic!("an API node stopped with an error: {e:#}"));
        }
    }

    /// Restart the API and every worker on the config file as it is now, for tests that edit
    /// it after the simulator's address is known.
    pub async fn restart_api_and_workers(&mut self) {
        let workers = match &mut self.runner {
            Runner::InProcess { app, .. } => {
                let app = app.take().expect("the app runs");
                let workers = app.workers.len();
                app.shutdown().await;
                workers
            }
            Runner::Processes { api, workers } => {
                let n = workers.len();
                for mut child in workers.drain(..).chain(api.take()) {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
                n
            }
        };
        self.worker_metrics.clear();
        self.boot(workers).await;
    }

    pub async fn start_worker(&mut self) {
        match &mut self.runner {
            Runner::InProcess { app, .. } => {
                let app = app.as_mut().expect("the app runs");
                app.add_worker()
                    .await
                    .unwrap_or_else(|e| panic!("a worker did not start: {e:#}"));
                if let Some(addr) = app.workers.last().and_then(|w| w.metrics) {
                    self.worker_metrics.push(format!("http://{addr}/metrics"));
                }
            }
            Runner::Processes { .. } => {
                // Printed just before "worker started", once the metrics port is bound.
                let (child, line) = self.start("worker", "worker metrics on ").await;
                let url = line.split("metrics on ").nth(1).unwrap().trim();
                self.worker_metrics.push(format!("{url}/metrics"));
                if let Runner::Processes { workers, .. } = &mut self.runner {
                    workers.push(child);
                }
            }
        }
    }

    /// The worker processes of an app started with `processes: true`.
    fn worker_processes(&mut self) -> &mut Vec<Child> {
        match &mut self.runner {
            Runner::Processes { workers, .. } => workers,
            Runner::InProcess { .. } => {
                panic!("this test kills or signals processes: spawn it with `processes: true`")
            }
        }
    }

    /// `kill -9` a worker.
    pub async fn kill_worker(&mut self, index: usize) {
        let mut child = self.worker_processes().remove(index);
        self.worker_metrics.remove(index);
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    /// SIGTERM a worker and wait for it to exit; returns its exit status.
    pub async fn terminate_worker(&mut self, index: usize) -> std::process::ExitStatus {
        let mut child = self.worker_processes().remove(index);
        self.worker_metrics.remove(index);
        let pid = child.id().unwrap();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        tokio::time::timeout(Duration::from_secs(30), child.wait())
            .await
            .expect("worker did not exit after SIGTERM")
            .unwrap()
    }

    /// Run the CLI with this app's config.
    pub async fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(["--config", self.config_path.to_str().unwrap()])
            .args(args)
            .env("SLUICE_LOG", "warn")
            .output()
            .await
            .unwrap()
    }

    pub async fn key(&self, tenant: &str, tier: Tier) -> String {
        self.store
            .create_api_key(&Principal {
                tenant: tenant.into(),
                user: format!("{tenant}-user"),
                tier,
                email: None,
                reuse_samples: false,
            })
            .await
            .unwrap()
    }

    /// A key whose user has an email address, for completion emails.
    pub async fn key_with_email(&self, tenant: &str, tier: Tier, email: &str) -> String {
        self.store
            .create_api_key(&Principal {
                tenant: tenant.into(),
                user: format!("{tenant}-user"),
                tier,
                email: Some(email.into()),
                reuse_samples: false,
            })
            .await
            .unwrap()
    }

    /// Send a request with a key; the status and the JSON body.
    pub async fn send(&self, request: reqwest::RequestBuilder, key: &str) -> (StatusCode, Value) {
        let response = request.bearer_auth(key).send().await.unwrap();
        let status = response.status();
        (status, response.json().await.unwrap())
    }

    pub async fn post_job(&self, key: &str, body: &Value) -> (StatusCode, Value) {
        let url = format!("{}/v1/jobs", self.api);
        self.send(self.http.post(url).json(body), key).await
    }

    /// Submit a job and return its id; panics unless accepted.
    pub async fn submit(&self, key: &str, text: &str) -> RequestId {
        self.submit_model(key, "default", text).await
    }

    /// [`TestApp::submit`] for another model alias.
    pub async fn submit_model(&self, key: &str, model: &str, text: &str) -> RequestId {
        let mut job = job_body(text);
        job["model"] = model.into();
        let (status, body) = self.post_job(key, &job).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{body}");
        body["request_id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn get_job(&self, key: &str, id: RequestId) -> (StatusCode, Value) {
        let url = format!("{}/v1/jobs/{id}", self.api);
        self.send(self.http.get(url), key).await
    }

    /// `GET /v1/jobs/{id}/events` with `key`: the job's SSE stream, unread.
    pub async fn open_events(&self, key: &str, id: RequestId) -> reqwest::Response {
        self.http
            .get(format!("{}/v1/jobs/{id}/events", self.api))
            .bearer_auth(key)
            .send()
            .await
            .expect("the events request is sent")
    }

    pub async fn cancel_job(&self, key: &str, id: RequestId) -> (StatusCode, Value) {
        let url = format!("{}/v1/jobs/{id}", self.api);
        self.send(self.http.delete(url), key).await
    }

    pub async fn state(&self, id: RequestId) -> JobState {
        self.store.job(id).await.unwrap().unwrap().state
    }

    /// Wait until every job is terminal; panics with the stragglers after `timeout`.
    pub async fn wait_terminal(&self, ids: &[RequestId], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pending = Vec::new();
            for id in ids {
                if !self.state(*id).await.is_terminal() {
                    pending.push(*id);
                }
            }
            if pending.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                let counts = self.store.count_by_state().await.unwrap();
                panic!(
                    "{} of {} jobs not terminal after {timeout:?}; by state: {counts:?}",
                    pending.len(),
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait for a condition on the database, polling.
    pub async fn wait_for<F, Fut>(&self, what: &str, timeout: Duration, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = Instant::now() + timeout;
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn count(&self, state: JobState) -> i64 {
        self.store
            .count_by_state()
            .await
            .unwrap()
            .into_iter()
            .find(|(s, _)| *s == state)
            .map_or(0, |(_, n)| n)
    }

    pub async fn total_jobs(&self) -> i64 {
        self.store
            .count_by_state()
            .await
            .unwrap()
            .iter()
            .map(|(_, n)| n)
            .sum()
    }

    pub async fn broker(&self) -> RabbitBroker {
        RabbitBroker::connect(RabbitConfig {
            url: self._scratch.1.url.clone(),
            prefix: self.prefix.clone(),
            ..RabbitConfig::default()
        })
        .await
        .unwrap()
    }

    /// The app's lanes on whichever backend it runs, reached as Sluice reaches them.
    pub async fn lanes(&self) -> std::sync::Arc<dyn sluice_broker::Broker> {
        let config = sluice::config::Config::load(Some(&self.config_path)).unwrap();
        sluice::stack::broker(&config, &self.store).await.unwrap()
    }

    /// Cut every database connection of this app's processes, as a PostgreSQL restart would.
    pub async fn cut_database_connections(&self) -> i64 {
        let (n,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM (
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE application_name = $1 AND pid <> pg_backend_pid()
             ) t",
        )
        .bind(&self.schema)
        .fetch_one(
            self.store
                .pg_pool()
                .expect("the e2e stack runs on PostgreSQL"),
        )
        .await
        .unwrap();
        n
    }

    /// `kill -9` the API process.
    pub async fn kill_api(&mut self) {
        let Runner::Processes { api, .. } = &mut self.runner else {
            panic!("this test kills the API process: spawn it with `processes: true`")
        };
        let mut child = api.take().unwrap();
        child.start_kill().unwrap();
        child.wait().await.unwrap();
    }

    /// Stop the API and the workers and drop the schema and queues. In-process workers are not
    /// waited for: their grace period only matters to the jobs of a test that is over.
    pub async fn cleanup(mut self) {
        match &mut self.runner {
            Runner::InProcess { app, more_apis } => {
                for node in more_apis.drain(..) {
                    let _ = tokio::time::timeout(Duration::from_secs(5), node.stop()).await;
                }
                if let Some(app) = app.take() {
                    app.abort();
                }
            }
            Runner::Processes { api, workers } => {
                for mut child in workers.drain(..).chain(api.take()) {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                }
            }
        }
        self.sim.shutdown();
        self.store.close().await;
        let _ = std::fs::remove_file(&self.config_path);
        // The scratch schema or file, lanes and keys go with `self`.
    }
}

pub fn job_body(text: &str) -> Value {
    json!({ "model": "default", "messages": [{ "role": "user", "content": text }] })
}

/// [`job_body`] at temperature 0: deterministic, so identical ones may share an answer.
pub fn greedy_body(text: &str) -> Value {
    let mut body = job_body(text);
    body["temperature"] = json!(0);
    body
}
