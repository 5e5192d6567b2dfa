//! `sluice-bench throughput`: the whole job path in one process against an instant simulator,
//! once per lane backend (RabbitMQ, SQS on a local moto server, the SQL queue in PostgreSQL
//! and in SQLite); prints jobs/s and submit-to-complete latency of each run, then one table
//! comparing them.

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use sluice::config::{Config, QueueBackend};
use sluice::stack;
use sluice_broker::Broker;
use sluice_core::{Principal, Tier};
use sluice_outbox::Publisher;
use sluice_providers::{EndpointConfig, PoolConfig, Router, Secret};
use sluice_sqs::moto::MotoServer;
use sluice_store::{Store, StoreConfig};
use sluice_testkit::ScratchDb;
use sluice_worker::Worker;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// N jobs, one HTTP call each, from concurrent clients through api, broker, workers and an instant simulator.
    Throughput {
        #[arg(long, default_value_t = 10_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Workers in this process.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Jobs in flight per worker.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Give up waiting for completion after this many seconds (per backend).
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
        /// Lane backends to run, one after the other, comma-separated. Each gets a fresh
        /// schema, queue prefix or file, removed afterwards.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "rabbitmq,sqs,sql-postgres,sql-sqlite"
        )]
        backends: Vec<BenchBackend>,
        /// An SQS endpoint for the `sqs` backend, instead of a moto server the bench starts.
        #[arg(long, value_name = "URL")]
        sqs_endpoint: Option<String>,
        /// The `moto_server` executable to start for the `sqs` backend; by default the one
        /// on PATH, else the virtualenv `scripts/pyenv.sh` makes.
        #[arg(long, value_name = "PATH")]
        moto_server: Option<PathBuf>,
    },
    /// A backlog through a pool shaped like the seed notes x10 (3 keys at 200 RPM, 5 at 600,
    /// 2 at 2,000), or with `--burst` a burst of jobs into that pool while idle, first with one
    /// worker process, then with several; prints utilization, 429s and queue wait per lane.
    Ratelimit(crate::ratelimit::Args),
}

/// A lane backend the throughput bench can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackend {
    /// PostgreSQL store, RabbitMQ lanes (`[rabbitmq]`'s server).
    Rabbitmq,
    /// PostgreSQL store, SQS lanes on a local moto server (or `--sqs-endpoint`).
    Sqs,
    /// PostgreSQL store, the SQL queue in the store's schema.
    SqlPostgres,
    /// SQLite store and SQL queue in one temporary file, as in the embedded mode.
    SqlSqlite,
}

impl BenchBackend {
    fn name(self) -> &'static str {
        match self {
            BenchBackend::Rabbitmq => "rabbitmq",
            BenchBackend::Sqs => "sqs",
            BenchBackend::SqlPostgres => "sql-postgres",
            BenchBackend::SqlSqlite => "sql-sqlite",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            BenchBackend::Rabbitmq => "PostgreSQL store, RabbitMQ lanes",
            BenchBackend::Sqs => "PostgreSQL store, SQS lanes",
            BenchBackend::SqlPostgres => "PostgreSQL store, SQL queue in its schema",
            BenchBackend::SqlSqlite => "SQLite store and SQL queue in a temporary file",
        }
    }
}

impl fmt::Display for BenchBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub async fn run(command: BenchCommand, config: Config) -> anyhow::Result<()> {
    match command {
        BenchCommand::Throughput {
            jobs,
            clients,
            workers,
            concurrency,
            timeout_secs,
            backends,
            sqs_endpoint,
            moto_server,
        } => {
            let load = Load {
                jobs,
                clients,
                workers,
                concurrency,
                timeout_secs,
            };
            let sqs = SqsSource {
                endpoint: sqs_endpoint,
                moto_server,
                moto: None,
            };
            throughput(config, load, &backends, sqs).await
        }
        BenchCommand::Ratelimit(args) => crate::ratelimit::run_all(&config, args).await,
    }
}

/// What every backend's run is given: the same for all of them.
#[derive(Debug, Clone, Copy)]
struct Load {
    jobs: usize,
    clients: usize,
    workers: usize,
    concurrency: usize,
    timeout_secs: u64,
}

/// One backend's result.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Jobs that succeeded.
    jobs: i64,
    /// From the first submit to the last job finished, as seen by the bench.
    seconds: f64,
    /// Submit-to-complete, in seconds.
    p50: f64,
    p95: f64,
}

impl Measured {
    fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.seconds
    }
}

/// Where the `sqs` backend's lanes live: `--sqs-endpoint`, or a moto server started on first
/// use and stopped when this is dropped.
struct SqsSource {
    endpoint: Option<String>,
    moto_server: Option<PathBuf>,
    moto: Option<MotoServer>,
}

impl SqsSource {
    async fn endpoint(&mut self) -> anyhow::Result<String> {
        if let Some(endpoint) = &self.endpoint {
            return Ok(endpoint.clone());
        }
        if let Some(moto) = &self.moto {
            return Ok(moto.endpoint().to_owned());
        }
        let bin = find_moto_server(self.moto_server.as_deref())?;
        eprintln!("bench: starting {}", bin.display());
        let moto = MotoServer::start(&bin, &[])
            .await
            .with_context(|| format!("cannot start the SQS server {}", bin.display()))?;
        let endpoint = moto.endpoint().to_owned();
        self.moto = Some(moto);
        Ok(endpoint)
    }
}

/// The `moto_server` to run: the one given, else on PATH, else in the virtualenv
/// `scripts/pyenv.sh` makes (running the script when the bench runs from the repository).
fn find_moto_server(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(bin) = explicit {
        return Ok(bin.to_owned());
    }
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("moto_server"))
        .find(|bin| bin.is_file());
    if let Some(bin) = on_path {
        return Ok(bin);
    }
    // scripts/pyenv.sh's default place.
    if let Some(home) = std::env::var_os("HOME") {
        let bin = Path::new(&home).join(".cache/sluice/venv/bin/moto_server");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    let script = Path::new("scripts/pyenv.sh");
    if script.is_file() {
        let bin = sluice_sqs::moto::venv(script)?
            .join("bin")
            .join("moto_server");
        if bin.is_file() {
            return Ok(bin);
        }
    }
    bail!(
        "no moto_server found: install moto[server] (scripts/pyenv.sh does), \
         pass --moto-server PATH, or point --sqs-endpoint at an SQS server"
    )
}

async fn throughput(
    config: Config,
    load: Load,
    backends: &[BenchBackend],
    mut sqs: SqsSource,
) -> anyhow::Result<()> {
    if load.jobs == 0 || load.clients == 0 || load.workers == 0 || load.concurrency == 0 {
        bail!("--jobs, --clients, --workers and --concurrency must be at least 1");
    }
    if backends.is_empty() {
        bail!("--backends names no backend");
    }
    for (i, backend) in backends.iter().enumerate() {
        if backends[..i].contains(backend) {
            bail!("--backends names {backend} twice");
        }
    }

    let mut results = Vec::new();
    for &backend in backends {
        eprintln!("bench: {backend} ({})", backend.describe());
        let result = run_backend(&config, backend, load, &mut sqs).await;
        if let Err(error) = &result {
            eprintln!("bench: {backend} failed: {error:#}");
        }
        results.push((backend, result));
    }
    // Stop the moto server, if one was started, before printing.
    drop(sqs);

    print_table(&results);
    let failed: Vec<&str> = results
        .iter()
        .filter(|(_, result)| result.is_err())
        .map(|(backend, _)| backend.name())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} backends failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

/// Backend, jobs, seconds, jobs/s, p50 and p95, and jobs/s relative to RabbitMQ's.
fn print_table(results: &[(BenchBackend, anyhow::Result<Measured>)]) {
    let baseline = results.iter().find_map(|(backend, result)| match result {
        Ok(m) if *backend == BenchBackend::Rabbitmq => Some(m.jobs_per_sec()),
        _ => None,
    });
    println!(
        "{:<14} {:>8} {:>9} {:>9} {:>9} {:>9} {:>12}",
        "backend", "jobs", "seconds", "jobs/s", "p50 ms", "p95 ms", "vs rabbitmq"
    );
    for (backend, result) in results {
        match result {
            Ok(m) => {
                let ratio = baseline.filter(|b| *b > 0.0).map_or_else(
                    || "-".to_owned(),
                    |b| format!("{:.2}x", m.jobs_per_sec() / b),
                );
                println!(
                    "{:<14} {:>8} {:>9.2} {:>9.0} {:>9.1} {:>9.1} {:>12}",
                    backend.name(),
                    m.jobs,
                    m.seconds,
                    m.jobs_per_sec(),
                    m.p50 * 1000.0,
                    m.p95 * 1000.0,
                    ratio
                );
            }
            Err(error) => {
                let error = format!("{error:#}").replace('\n', " ");
                println!("{:<14} FAILED: {error}", backend.name());
            }
        }
    }
}

/// One backend: its own simulator, store and lanes, the load, then cleanup.
async fn run_backend(
    base: &Config,
    backend: BenchBackend,
    load: Load,
    sqs: &mut SqsSource,
) -> anyhow::Result<Measured> {
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let name = format!("bench-{run_id}");
    let mut config = base.clone();
    // What the run leaves behind (a PostgreSQL schema, which holds the SQL queue's table too, or
    // a SQLite file), removed when `scratch` drops, whatever happens.
    let scratch = if backend == BenchBackend::SqlSqlite {
        ScratchDb::sqlite("sluice-bench")
    } else {
        ScratchDb::postgres_at(&config.database.url, "bench")
    };
    config.database = StoreConfig {
        max_connections: 32,
        ..scratch.config()
    };
    match backend {
        BenchBackend::Rabbitmq => {
            config.queue.backend = QueueBackend::Rabbitmq;
            config.rabbitmq.prefix = name.clone();
        }
        BenchBackend::Sqs => {
            config.queue.backend = QueueBackend::Sqs;
            config.queue.sqs = sluice_sqs::SqsConfig {
                prefix: name.clone(),
                endpoint_url: Some(sqs.endpoint().await?),
                wait_time_secs: 1,
                ..config.queue.sqs
            };
            config
                .queue
                .sqs
                .validate()
                .context("invalid SQS settings for the bench")?;
        }
        BenchBackend::SqlPostgres | BenchBackend::SqlSqlite => {
            config.queue.backend = QueueBackend::Sql;
            config.queue.sql = sluice_sqlqueue::SqlQueueConfig {
                namespace: name.clone(),
                // In the store's own schema, dropped afterwards.
                schema: None,
                ..config.queue.sql
            };
        }
    }

    let sim = sluice_sim::spawn(
        sluice_sim::SimConfig {
            default_rpm: 0,
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .context("cannot start the simulator")?;
    let mut endpoint = EndpointConfig::new("sim", sim.base_url(), "sim-model", 100_000_000);
    endpoint.burst = Some(100_000);
    endpoint.api_key = Some(Secret::new("sk-sim-bench"));
    config.pools = vec![PoolConfig {
        name: "sim".into(),
        endpoints: vec![endpoint],
    }];
    config.routes = BTreeMap::from([("default".to_owned(), "sim".into())]);
    // The bench measures how fast jobs flow, so it submits past every wait target on purpose:
    // shedding would refuse the very load being measured.
    config.shedding.enabled = false;

    let result = match stack::store(&config, true).await {
        Ok(store) => {
            let result = with_store(&config, backend, &store, load).await;
            store.close().await;
            result
        }
        Err(error) => Err(error),
    };
    sim.shutdown();
    drop(scratch);
    result
}

/// Connect the lanes, run the load, delete the lanes.
async fn with_store(
    config: &Config,
    backend: BenchBackend,
    store: &Store,
    load: Load,
) -> anyhow::Result<Measured> {
    let broker = stack::connect_broker(config, store).await?;
    let result = match broker.declare().await.context("cannot declare the lanes") {
        Ok(()) => run_throughput(config, backend, store, &broker, load).await,
        Err(error) => Err(error),
    };
    if let Err(error) = broker.delete_all().await {
        eprintln!("warning: could not delete the bench lanes: {error}");
    }
    result
}

/// Start the api and workers, submit the load, wait for it to finish; the api and workers are
/// stopped before this returns, whatever the outcome.
async fn run_throughput(
    config: &Config,
    backend: BenchBackend,
    store: &Store,
    broker: &Arc<dyn Broker>,
    load: Load,
) -> anyhow::Result<Measured> {
    let stop = CancellationToken::new();
    let mut tasks = Tasks::default();
    let result = drive(config, backend, store, broker, load, &stop, &mut tasks).await;
    stop.cancel();
    let grace = Duration::from_secs_f64(config.worker.shutdown_grace_secs.max(0.0))
        + Duration::from_secs(10);
    for task in tasks.api.into_iter().chain(tasks.workers) {
        let abort = task.abort_handle();
        if tokio::time::timeout(grace, task).await.is_err() {
            eprintln!("warning: a bench task did not stop within {grace:?}; aborting it");
            abort.abort();
        }
    }
    result
}

/// The api and worker tasks of one run.
#[derive(Default)]
struct Tasks {
    api: Option<JoinHandle<anyhow::Result<()>>>,
    workers: Vec<JoinHandle<anyhow::Result<()>>>,
}

async fn drive(
    config: &Config,
    backend: BenchBackend,
    store: &Store,
    broker: &Arc<dyn Broker>,
    load: Load,
    stop: &CancellationToken,
    tasks: &mut Tasks,
) -> anyhow::Result<Measured> {
    let Load {
        jobs,
        clients,
        workers,
        concurrency,
        timeout_secs,
    } = load;
    // The API node's store announces on its bus, as `sluice serve` does.
    let bus = stack::event_bus(config)?;
    let store = &store.clone().announcing(Arc::new(bus.clone()));
    let publisher = Publisher::new(store.clone(), Arc::clone(broker));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let poll = stack::hub_poll(config.redis.is_some());
    let state = stack::api_state(
        config,
        store.clone(),
        publisher.clone(),
        bus,
        poll,
        stop.clone(),
    )?;
    let api_stop = stop.clone();
    tasks.api = Some(tokio::spawn(async move {
        sluice_api::serve(listener, state, api_stop)
            .await
            .context("the API server failed")
    }));

    let router: Arc<Router> = stack::router(config).await?;
    for _ in 0..workers {
        let worker_config = sluice_worker::WorkerConfig {
            concurrency,
            prefetch: u16::try_from(concurrency).unwrap_or(u16::MAX),
            ..config.worker.clone()
        };
        // Each worker's own bus and store announcing on it, as `sluice worker` has.
        let bus = sluice_notify::EventBus::local();
        let store = store.clone().announcing(Arc::new(bus.clone()));
        let worker = Worker::new(
            store.clone(),
            publisher.clone(),
            Arc::clone(&router),
            worker_config,
            bus,
        )?;
        let worker_stop = stop.clone();
        tasks.workers.push(tokio::spawn(async move {
            worker.run(worker_stop).await.context("a worker failed")
        }));
    }

    let mut keys = Vec::new();
    for tier in Tier::ALL {
        keys.push(
            store
                .create_api_key(&Principal {
                    tenant: format!("bench-{tier}"),
                    user: "bench".into(),
                    tier,
                    email: None,
                    reuse_samples: false,
                })
                .await
                .context("cannot create the bench API keys")?,
        );
    }
    let keys = Arc::new(keys);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let url = format!("http://{addr}/v1/jobs");
    let next = Arc::new(AtomicUsize::new(0));
    eprintln!(
        "bench: {backend}: {jobs} jobs, {clients} clients, {workers} workers x {concurrency} in flight"
    );
    let started = Instant::now();
    let mut submitters = Vec::new();
    for _ in 0..clients {
        let (http, url, keys, next) = (
            http.clone(),
            url.clone(),
            Arc::clone(&keys),
            Arc::clone(&next),
        );
        submitters.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return Ok::<(), anyhow::Error>(());
                }
                let body = serde_json::json!({
                    "model": "default",
                    "messages": [{"role": "user", "content": format!("bench job {n}")}],
                });
                let response = http
                    .post(&url)
                    .bearer_auth(&keys[n % keys.len()])
                    .json(&body)
                    .send()
                    .await
                    .context("cannot submit a job")?;
                if response.status() != reqwest::StatusCode::ACCEPTED {
                    bail!("submit answered {}", response.status());
                }
            }
        }));
    }
    let mut submit_error = None;
    for task in submitters {
        // Wait for every client even after one failed, so none outlives the run.
        let outcome = task
            .await
            .context("a submitting client panicked")
            .and_then(|r| r);
        if let Err(error) = outcome {
            submit_error.get_or_insert(error);
        }
    }
    if let Some(error) = submit_error {
        return Err(error);
    }
    let submitted = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let done = loop {
        let done = store
            .finished_count()
            .await
            .context("cannot count finished jobs")?;
        if done >= jobs as i64 {
            break done;
        }
        // A worker that stopped on its own would leave the rest waiting until the deadline.
        if let Some(i) = tasks.workers.iter().position(|t| t.is_finished()) {
            let error = match tasks.workers.remove(i).await {
                Ok(Ok(())) => anyhow::anyhow!("a worker stopped early"),
                Ok(Err(error)) => error,
                Err(error) => anyhow::Error::new(error).context("a worker panicked"),
            };
            return Err(error.context(format!("only {done} of {jobs} jobs finished")));
        }
        if Instant::now() > deadline {
            bail!("only {done} of {jobs} jobs finished within {timeout_secs} s");
        }
        // Coarse polling: counting scans the jobs table and would compete with the run.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let wall = started.elapsed();
    stop.cancel();

    let latency = store
        .latency_summary()
        .await
        .context("cannot summarise latency")?;
    println!(
        "sluice bench throughput: {backend} ({})",
        backend.describe()
    );
    println!("  jobs                      {jobs}");
    println!("  clients / workers         {clients} / {workers} x {concurrency}");
    println!(
        "  submit phase              {:.2} s ({:.0} submits/s)",
        submitted.as_secs_f64(),
        jobs as f64 / submitted.as_secs_f64()
    );
    println!(
        "  end to end                {:.2} s ({:.0} jobs/s)",
        wall.as_secs_f64(),
        jobs as f64 / wall.as_secs_f64()
    );
    println!("  first accept -> last done {:.2} s", latency.span);
    println!("  submit-to-complete p50    {:.1} ms", latency.p50 * 1000.0);
    println!("  submit-to-complete p95    {:.1} ms", latency.p95 * 1000.0);
    println!("  submit-to-complete p99    {:.1} ms", latency.p99 * 1000.0);
    println!();
    if latency.not_succeeded > 0 {
        bail!("{} jobs did not succeed", latency.not_succeeded);
    }
    Ok(Measured {
        jobs: done - latency.not_succeeded,
        seconds: wall.as_secs_f64(),
        p50: latency.p50,
        p95: latency.p95,
    })
}
