//! `sluice-bench throughput`: the whole job path in one process against an instant simulator,
//! once per lane backend (RabbitMQ, SQS on a local moto server, the SQL queue in PostgreSQL
//! and in SQLite) and per admission setting (every admission feature on, or off), beside the
//! durable floor (`floor.rs`) measured in the same run; prints jobs/s, the `202`'s latency,
//! submit-to-complete latency and the ratio to the floor, and can fail below a ratio (CI's guard).

use anyhow::{bail, Context};
use clap::{Subcommand, ValueEnum};
use sluice::config::{Config, QueueBackend};
use sluice::stack;
use sluice_broker::Broker;

use sluice_outbox::Publisher;
use sluice_providers::{EndpointConfig, PoolConfig, Router, Secret};
use sluice_sqs::moto::MotoServer;
use sluice_store::{Store, StoreConfig};
use sluice_testkit::ScratchDb;
use sluice_worker::Worker;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
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
        /// Workers in this process. 0 measures ingest alone: the API takes the submissions
        /// and nothing drains the lanes; jobs/s is then the submit rate.
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
        /// Offer submissions at this steady rate (per second, all clients together) instead of
        /// as fast as the clients go; a `202`'s latency then counts from when it was due, so a
        /// stall is not hidden by the requests it delayed.
        #[arg(long, value_name = "PER_SEC")]
        rate: Option<f64>,
        /// Admission features per run, comma-separated: `on` (quotas, daily budgets, the exact
        /// cache and load shedding, with limits no bench job reaches, and deterministic requests
        /// so every one is looked up in the cache) and `off`; each backend runs once per setting.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "on,off")]
        admission: Vec<AdmissionMode>,
        /// Run every backend and admission setting this many times, round by round, and print
        /// each setting's median and the median of each round's on/off ratio. One run's jobs/s
        /// on a busy machine spreads by 15-20%; alternating the settings keeps a slow stretch
        /// of the machine from landing on one of them.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Skip the durable floor (PostgreSQL insert and update, RabbitMQ confirm and ack).
        #[arg(long)]
        no_floor: bool,
        /// Exit with failure when a run's jobs/s is below this fraction of the floor's
        /// (the CI guard: a ratio, never an absolute time).
        #[arg(long, value_name = "RATIO")]
        min_floor_ratio: Option<f64>,
        /// An SQS endpoint for the `sqs` backend, instead of a moto server the bench starts.
        #[arg(long, value_name = "URL")]
        sqs_endpoint: Option<String>,
        /// The `moto_server` executable to start for the `sqs` backend; by default the one
        /// on PATH, else the virtualenv `scripts/pyenv.sh` makes.
        #[arg(long, value_name = "PATH")]
        moto_server: Option<PathBuf>,
    },
    /// The cost of one job: real `sluice serve` and `sluice worker` processes run the jobs; prints
    /// CPU per job of each process, PostgreSQL and RabbitMQ, the `202`'s latency, and (with
    /// pg_stat_statements) SQL statements, rows and WAL per job.
    Cost {
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        #[arg(long, default_value_t = 64)]
        clients: usize,
        /// Offer submissions at this steady rate (per second, all clients together) instead of
        /// as fast as the clients go: the cost of a job at that load, and the `202` with
        /// `serve` and `worker` in processes of their own.
        #[arg(long, value_name = "PER_SEC")]
        rate: Option<f64>,
    },
    /// A backlog through a pool shaped like the seed notes x10 (3 keys at 200 RPM, 5 at 600,
    /// 2 at 2,000), or with `--burst` a burst of jobs into that pool while idle, first with one
    /// worker process, then with several; prints utilization, 429s and queue wait per lane.
    Ratelimit(crate::ratelimit::Args),
    /// Resident memory of `sluice serve` and `sluice worker` processes, and of `sluice dev`,
    /// with a backlog in paused lanes and while it drains; fails past 100 MB (150 MB for dev).
    Memory(crate::memory::MemoryArgs),
    /// `sluice dev`'s submission throughput and memory with stalled WebSocket and SSE
    /// subscribers following streamed jobs, against the same run without them.
    Subscribers(crate::subscribers::SubscribersArgs),
}

/// Whether a run has Sluice's admission features on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AdmissionMode {
    On,
    Off,
}

impl AdmissionMode {
    fn name(self) -> &'static str {
        match self {
            AdmissionMode::On => "on",
            AdmissionMode::Off => "off",
        }
    }
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
            rate,
            admission,
            rounds,
            no_floor,
            min_floor_ratio,
            sqs_endpoint,
            moto_server,
        } => {
            let load = Load {
                jobs,
                clients,
                workers,
                concurrency,
                timeout_secs,
                rate,
                admission: AdmissionMode::Off,
            };
            let plan = Plan {
                backends,
                admission,
                rounds,
                floor: !no_floor,
                min_floor_ratio,
            };
            let sqs = SqsSource {
                endpoint: sqs_endpoint,
                moto_server,
                moto: None,
            };
            throughput(config, load, &plan, sqs).await
        }
        BenchCommand::Cost {
            jobs,
            clients,
            rate,
        } => crate::cost::run(&config, jobs, clients, rate).await,
        BenchCommand::Ratelimit(args) => crate::ratelimit::run_all(&config, args).await,
        BenchCommand::Memory(args) => crate::memory::run(&config, args).await,
        BenchCommand::Subscribers(args) => crate::subscribers::run(&config, args).await,
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
    rate: Option<f64>,
    admission: AdmissionMode,
}

/// What runs, and what counts as failing.
struct Plan {
    backends: Vec<BenchBackend>,
    admission: Vec<AdmissionMode>,
    rounds: usize,
    floor: bool,
    min_floor_ratio: Option<f64>,
}

/// One run: its round (from 0), backend, admission setting and result.
type Run = (usize, BenchBackend, AdmissionMode, anyhow::Result<Measured>);

/// One backend's result.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// Jobs that succeeded.
    jobs: i64,
    /// From the first submit to the last job finished, as seen by the bench.
    seconds: f64,
    /// Submit-to-complete, in seconds; `None` when nothing drained the lanes (`--workers 0`).
    p50: Option<f64>,
    p95: Option<f64>,
    /// The `202`'s latency as the clients saw it, in seconds.
    submit_p50: f64,
    submit_p99: f64,
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
    plan: &Plan,
    mut sqs: SqsSource,
) -> anyhow::Result<()> {
    if load.jobs == 0 || load.clients == 0 || load.concurrency == 0 {
        bail!("--jobs, --clients and --concurrency must be at least 1");
    }
    if load.workers == 0 && plan.min_floor_ratio.is_some() {
        bail!("--min-floor-ratio compares whole runs: it needs at least one worker");
    }
    crate::common::check_rate(load.rate)?;
    if plan.backends.is_empty() || plan.admission.is_empty() {
        bail!("--backends and --admission must each name at least one");
    }
    if plan.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    for (i, backend) in plan.backends.iter().enumerate() {
        if plan.backends[..i].contains(backend) {
            bail!("--backends names {backend} twice");
        }
    }
    if let Some(ratio) = plan.min_floor_ratio {
        if !(ratio > 0.0 && ratio.is_finite() && plan.floor) {
            bail!("--min-floor-ratio needs a positive ratio and the floor (no --no-floor)");
        }
    }

    let floor = if plan.floor {
        eprintln!(
            "bench: floor (PostgreSQL insert + update, RabbitMQ publish confirmed + ack, {} jobs, {} clients)",
            load.jobs, load.clients
        );
        let (scratch, schema) = crate::common::scratch_schema(&config.database.url)?;
        let floor = crate::floor::measure(
            &config.database.url,
            &schema,
            &config.rabbitmq.url,
            load.jobs,
            load.clients,
        )
        .await
        .context("the durable floor failed")?;
        drop(scratch);
        println!(
            "sluice bench throughput: durable floor\n  end to end                {:.2} s ({:.0} jobs/s)\n",
            floor.seconds,
            floor.jobs_per_sec()
        );
        Some(floor)
    } else {
        None
    };

    let mut results: Vec<Run> = Vec::new();
    for round in 0..plan.rounds {
        for &backend in &plan.backends {
            for &admission in &plan.admission {
                let of_rounds = if plan.rounds > 1 {
                    format!(", round {} of {}", round + 1, plan.rounds)
                } else {
                    String::new()
                };
                eprintln!(
                    "bench: {backend} ({}), admission {}{of_rounds}",
                    backend.describe(),
                    admission.name()
                );
                let load = Load { admission, ..load };
                let result = run_backend(&config, backend, load, &mut sqs).await;
                if let Err(error) = &result {
                    eprintln!("bench: {backend} failed: {error:#}");
                }
                results.push((round, backend, admission, result));
            }
        }
    }
    // Stop the moto server, if one was started, before printing.
    drop(sqs);

    print_table(&results, floor.map(|f| f.jobs_per_sec()));
    if plan.rounds > 1 {
        print_medians(&results, plan);
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|(_, _, _, result)| result.is_err())
        .map(|(_, backend, admission, _)| format!("{backend} (admission {})", admission.name()))
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed: {}",
            failed.len(),
            results.len(),
            failed.join(", ")
        );
    }
    if let (Some(min), Some(floor)) = (plan.min_floor_ratio, floor) {
        let below: Vec<String> = results
            .iter()
            .filter_map(|(_, backend, admission, result)| {
                let ratio = result.as_ref().ok()?.jobs_per_sec() / floor.jobs_per_sec();
                (ratio < min).then(|| {
                    format!(
                        "{backend} (admission {}) at {ratio:.3}x the floor",
                        admission.name()
                    )
                })
            })
            .collect();
        if !below.is_empty() {
            bail!(
                "below the guard's {min:.3}x of the durable floor: {}",
                below.join(", ")
            );
        }
        println!("guard: every run at least {min:.3}x the durable floor");
    }
    Ok(())
}

/// Each run's jobs/s, latencies, and jobs/s relative to RabbitMQ's (same round and admission)
/// and to the floor.
fn print_table(results: &[Run], floor: Option<f64>) {
    println!(
        "{:<14} {:>5} {:>7} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
        "backend",
        "adm",
        "jobs",
        "jobs/s",
        "202 p50",
        "202 p99",
        "e2e p50",
        "e2e p95",
        "vs rmq",
        "vs floor"
    );
    if let Some(floor) = floor {
        println!(
            "{:<14} {:>5} {:>7} {:>8.0} {:>8} {:>9} {:>9} {:>9} {:>8} {:>8}",
            "floor", "-", "-", floor, "-", "-", "-", "-", "-", "1.00x"
        );
    }
    for (round, backend, admission, result) in results {
        match result {
            Ok(m) => {
                let baseline = results.iter().find_map(|(n, b, a, r)| match r {
                    Ok(m) if n == round && *b == BenchBackend::Rabbitmq && a == admission => {
                        Some(m.jobs_per_sec())
                    }
                    _ => None,
                });
                let ratio = |to: Option<f64>| {
                    to.filter(|b| *b > 0.0).map_or_else(
                        || "-".to_owned(),
                        |b| format!("{:.2}x", m.jobs_per_sec() / b),
                    )
                };
                println!(
                    "{:<14} {:>5} {:>7} {:>8.0} {:>6.2}ms {:>7.2}ms {:>9} {:>9} {:>8} {:>8}",
                    backend.name(),
                    admission.name(),
                    m.jobs,
                    m.jobs_per_sec(),
                    m.submit_p50 * 1000.0,
                    m.submit_p99 * 1000.0,
                    ms(m.p50),
                    ms(m.p95),
                    ratio(baseline),
                    ratio(floor)
                );
            }
            Err(error) => {
                let error = format!("{error:#}").replace('\n', " ");
                println!(
                    "{:<14} {:>5} FAILED: {error}",
                    backend.name(),
                    admission.name()
                );
            }
        }
    }
}

/// Per backend, over the rounds: each admission setting's median jobs/s and, with both
/// settings, the median of the on/off ratios (each `on` run over the `off` run of its turn:
/// the same round, or the same place in a list like `on,off,on,off`) with the lowest and highest.
fn print_medians(results: &[Run], plan: &Plan) {
    println!("\nmedian of {} rounds", plan.rounds);
    println!(
        "{:<14} {:>11} {:>11} {:>8} {:>14}",
        "backend", "on jobs/s", "off jobs/s", "on/off", "rounds' range"
    );
    let cell = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"));
    for &backend in &plan.backends {
        let runs = |admission: AdmissionMode| -> Vec<f64> {
            results
                .iter()
                .filter_map(|(_, b, a, r)| match r {
                    Ok(m) if *b == backend && *a == admission => Some(m.jobs_per_sec()),
                    _ => None,
                })
                .collect()
        };
        let (on, off) = (runs(AdmissionMode::On), runs(AdmissionMode::Off));
        let ratios: Vec<f64> = on
            .iter()
            .zip(&off)
            .filter(|(_, off)| **off > 0.0)
            .map(|(on, off)| on / off)
            .collect();
        let range = match (
            ratios.iter().copied().reduce(f64::min),
            ratios.iter().copied().reduce(f64::max),
        ) {
            (Some(low), Some(high)) => format!("{low:.2}-{high:.2}"),
            _ => "-".to_owned(),
        };
        println!(
            "{:<14} {:>11} {:>11} {:>8} {:>14}",
            backend.name(),
            cell(median(on)),
            cell(median(off)),
            median(ratios).map_or_else(|| "-".to_owned(), |r| format!("{r:.2}")),
            range
        );
    }
}

/// The middle value (the mean of the middle two for an even count); `None` when empty.
fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
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
    admission_features(&mut config, load.admission);

    let result = match stack::store(&config, true).await {
        Ok(store) => {
            let result = with_store(&config, backend, &store, &sim, load).await;
            store.close().await;
            result
        }
        Err(error) => Err(error),
    };
    sim.shutdown();
    drop(scratch);
    result
}

/// Turn admission's features on, each with limits the bench never reaches (so they are paid
/// for but refuse nothing), or all off.
fn admission_features(config: &mut Config, mode: AdmissionMode) {
    match mode {
        AdmissionMode::Off => {
            config.quotas = Default::default();
            config.budgets = Default::default();
            config.cache.enabled = false;
            config.shedding.enabled = false;
            config.semantic_cache = None;
        }
        AdmissionMode::On => {
            let rules = |limit| sluice_core::TierQuotas {
                user: vec![sluice_core::QuotaRule {
                    per: sluice_core::QuotaWindow::MINUTE,
                    limit,
                }],
                tenant: vec![
                    sluice_core::QuotaRule {
                        per: sluice_core::QuotaWindow::SECOND,
                        limit,
                    },
                    sluice_core::QuotaRule {
                        per: sluice_core::QuotaWindow::DAY,
                        limit,
                    },
                ],
            };
            config.quotas = sluice_core::QuotaConfig {
                enterprise: rules(1_000_000_000),
                pro: rules(1_000_000_000),
                basic: rules(1_000_000_000),
                free: rules(1_000_000_000),
            };
            config.budgets.default_daily_usd = Some(1_000_000_000.0);
            config.cache.enabled = true;
            // Shedding reads the lanes and judges every submission, against wait targets no
            // run reaches: the bench submits past every real target on purpose.
            config.shedding.enabled = true;
            config.shedding.targets = sluice_core::WaitTargets {
                enterprise: 1e9,
                pro: 1e9,
                basic: 1e9,
                free: 1e9,
            };
            for pool in &mut config.pools {
                for endpoint in &mut pool.endpoints {
                    endpoint.price = Some(sluice_core::Price {
                        input_per_mtok: 0.15,
                        output_per_mtok: 0.6,
                    });
                }
            }
        }
    }
}

/// Connect the lanes, run the load, delete the lanes.
async fn with_store(
    config: &Config,
    backend: BenchBackend,
    store: &Store,
    sim: &sluice_sim::SimHandle,
    load: Load,
) -> anyhow::Result<Measured> {
    // The store as `sluice serve` uses it: with the SQL queue, ingest writes the lanes itself.
    let (broker, store) = stack::connect_broker_with_store(config, store.clone()).await?;
    let result = match broker.declare().await.context("cannot declare the lanes") {
        Ok(()) => run_throughput(config, backend, &store, sim, &broker, load).await,
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
    sim: &sluice_sim::SimHandle,
    broker: &Arc<dyn Broker>,
    load: Load,
) -> anyhow::Result<Measured> {
    let stop = CancellationToken::new();
    let mut tasks = Tasks::default();
    let result = drive(config, backend, store, sim, broker, load, &stop, &mut tasks).await;
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

#[allow(clippy::too_many_arguments)]
async fn drive(
    config: &Config,
    backend: BenchBackend,
    store: &Store,
    sim: &sluice_sim::SimHandle,
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
        rate,
        admission,
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
        None,
    )?;
    let api_stop = stop.clone();
    let http = config.http.clone();
    tasks.api = Some(tokio::spawn(async move {
        sluice_api::serve(listener, state, http, api_stop)
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

    let keys = crate::common::tier_keys(store).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    eprintln!(
        "bench: {backend}: {jobs} jobs, {clients} clients, {workers} workers x {concurrency} in flight"
    );
    let written = crate::common::disk_written_kib();
    let started = Instant::now();
    // With admission on, requests are deterministic, so each is looked up in the exact cache
    // (distinct prompts: none is a hit) and stored with its hash.
    let offer = crate::common::Offer {
        jobs,
        clients,
        label: "bench job",
        rate,
        temperature: (admission == AdmissionMode::On).then_some(0.0),
    };
    let accepted = Arc::new(AtomicUsize::new(0));
    let mut submitters =
        crate::common::spawn_submitters(&http, &format!("http://{addr}"), &keys, offer, &accepted);
    let mut latencies = Vec::with_capacity(jobs);
    while let Some(outcome) = submitters.join_next().await {
        latencies.append(&mut outcome.context("a submitting client panicked")??);
    }
    let submitted = started.elapsed();
    let disk_writes = crate::common::disk_writes_line(written);
    let (submit_p50, submit_p99) = (
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    );
    if workers == 0 {
        stop.cancel();
        // Forget the last confirmed outbox rows while the store is still open.
        publisher.settle().await;
        println!(
            "sluice bench throughput: {backend} ({}), admission {}, ingest only (no workers)",
            backend.describe(),
            admission.name()
        );
        println!("  jobs accepted             {jobs}");
        println!(
            "  submit phase              {:.2} s ({:.0} submits/s)",
            submitted.as_secs_f64(),
            jobs as f64 / submitted.as_secs_f64()
        );
        println!(
            "  202 p50 / p99             {:.2} / {:.2} ms",
            submit_p50 * 1000.0,
            submit_p99 * 1000.0
        );
        println!("{disk_writes}");
        println!();
        return Ok(Measured {
            jobs: i64::try_from(jobs)?,
            seconds: submitted.as_secs_f64(),
            p50: None,
            p95: None,
            submit_p50,
            submit_p99,
        });
    }

    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    let done = loop {
        // The simulator's call count costs nothing to read; counting finished jobs scans the
        // jobs table, which would compete with the run it measures, so only once every job
        // has had its call.
        let done = if sim.stats().total >= jobs as u64 {
            store
                .finished_count()
                .await
                .context("cannot count finished jobs")?
        } else {
            0
        };
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
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let wall = started.elapsed();
    stop.cancel();
    publisher.settle().await;

    let latency = store
        .latency_summary()
        .await
        .context("cannot summarise latency")?;
    println!(
        "sluice bench throughput: {backend} ({}), admission {}",
        backend.describe(),
        admission.name()
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
    println!(
        "  202 p50 / p99             {:.2} / {:.2} ms",
        submit_p50 * 1000.0,
        submit_p99 * 1000.0
    );
    println!("{disk_writes}");
    println!("  first accept -> last done {:.2} s", latency.span);
    let waits = store
        .queue_wait_by_lane()
        .await
        .context("cannot read queue waits")?;
    for wait in &waits {
        println!(
            "  accept-to-running p50     {:.2} ms ({} lane, {} jobs)",
            wait.p50 * 1000.0,
            wait.lane,
            wait.jobs
        );
    }
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
        p50: Some(latency.p50),
        p95: Some(latency.p95),
        submit_p50,
        submit_p99,
    })
}

/// Seconds as milliseconds for the table, `-` for none.
fn ms(seconds: Option<f64>) -> String {
    seconds.map_or_else(|| "-".to_owned(), |s| format!("{:.1}ms", s * 1000.0))
}

/// The `q` quantile of `samples` (nearest rank), 0 for none.
pub(crate) fn percentile(samples: &mut [f64], q: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(f64::total_cmp);
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    samples[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_is_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0]), Some(3.0));
        assert_eq!(median(vec![5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), Some(2.5));
        // An outlier moves the mean, not the median.
        assert_eq!(median(vec![0.9, 0.92, 0.2, 0.91, 0.93]), Some(0.91));
    }
}
