//! `sluice bench throughput`: the whole job path in one process against this machine's
//! PostgreSQL and RabbitMQ and an instant simulator; prints jobs/s and submit-to-complete latency.

use crate::config::Config;
use crate::stack;
use anyhow::{bail, Context};
use clap::Subcommand;
use sluice_broker::Broker;
use sluice_core::{Principal, Tier};
use sluice_outbox::Publisher;
use sluice_providers::{EndpointConfig, PoolConfig, Router, Secret};
use sluice_store::StoreConfig;
use sluice_worker::Worker;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
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
        /// Give up waiting for completion after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout_secs: u64,
    },
    /// A backlog through a pool shaped like the seed notes x10 (3 keys at 200 RPM, 5 at 600,
    /// 2 at 2,000), first with one worker process, then with several; prints utilization,
    /// 429s and queue wait per lane.
    Ratelimit {
        /// Worker processes per run, comma-separated.
        #[arg(long, default_value = "1,4", value_delimiter = ',')]
        workers: Vec<usize>,
        /// Seconds of backlog per run at full pool capacity.
        #[arg(long, default_value_t = 80)]
        seconds: u64,
        /// Simulated provider latency in milliseconds.
        #[arg(long, default_value_t = 50)]
        latency_ms: u64,
    },
}

pub async fn run(command: BenchCommand, config: Config) -> anyhow::Result<()> {
    match command {
        BenchCommand::Throughput {
            jobs,
            clients,
            workers,
            concurrency,
            timeout_secs,
        } => throughput(config, jobs, clients, workers, concurrency, timeout_secs).await,
        BenchCommand::Ratelimit {
            workers,
            seconds,
            latency_ms,
        } => {
            for n in workers {
                crate::ratelimit::run(&config, n, seconds, latency_ms).await?;
            }
            Ok(())
        }
    }
}

async fn throughput(
    mut config: Config,
    jobs: usize,
    clients: usize,
    workers: usize,
    concurrency: usize,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    if jobs == 0 || clients == 0 || workers == 0 {
        bail!("--jobs, --clients and --workers must be at least 1");
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let schema = format!("bench_{}", &run_id[..16]);
    config.database = StoreConfig {
        schema: Some(schema.clone()),
        max_connections: 32,
        migrate: true,
        ..config.database
    };
    config.rabbitmq.prefix = format!("bench-{run_id}");

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

    let store = stack::store(&config, true).await?;
    let broker = stack::broker(&config, &store).await?;
    let result = run_throughput(
        &config,
        &store,
        &broker,
        jobs,
        clients,
        workers,
        concurrency,
        timeout_secs,
    )
    .await;
    sim.shutdown();
    if let Err(error) = broker.delete_all().await {
        eprintln!("warning: could not delete the bench queues: {error}");
    }
    if let Err(error) = store.drop_schema(&schema).await {
        eprintln!("warning: could not drop schema {schema}: {error}");
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_throughput(
    config: &Config,
    store: &sluice_store::Store,
    broker: &Arc<dyn Broker>,
    jobs: usize,
    clients: usize,
    workers: usize,
    concurrency: usize,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let publisher = Publisher::new(store.clone(), Arc::clone(broker));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let bus = stack::event_bus(config)?;
    let poll = stack::hub_poll(config.redis.is_some());
    let state = stack::api_state(
        config,
        store.clone(),
        publisher.clone(),
        bus,
        poll,
        stop.clone(),
    )?;
    tokio::spawn(sluice_api::serve(listener, state, stop.clone()));

    let router: Arc<Router> = stack::router(config).await?;
    for _ in 0..workers {
        let worker_config = sluice_worker::WorkerConfig {
            concurrency,
            prefetch: u16::try_from(concurrency).unwrap_or(u16::MAX),
            ..config.worker.clone()
        };
        let worker = Worker::new(
            store.clone(),
            publisher.clone(),
            Arc::clone(&router),
            worker_config,
            sluice_notify::EventBus::local(),
        )?;
        tokio::spawn(worker.run(stop.clone()));
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
                })
                .await?,
        );
    }
    let keys = Arc::new(keys);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let url = format!("http://{addr}/v1/jobs");
    let next = Arc::new(AtomicUsize::new(0));
    eprintln!("bench: {jobs} jobs, {clients} clients, {workers} workers x {concurrency} in flight");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, keys, next) = (
            http.clone(),
            url.clone(),
            Arc::clone(&keys),
            Arc::clone(&next),
        );
        tasks.push(tokio::spawn(async move {
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
                    .await?;
                if response.status() != reqwest::StatusCode::ACCEPTED {
                    bail!("submit answered {}", response.status());
                }
            }
        }));
    }
    for task in tasks {
        task.await??;
    }
    let submitted = started.elapsed();

    let deadline = Instant::now() + Duration::from_secs(timeout_secs);
    loop {
        let done = store
            .finished_count()
            .await
            .context("cannot count finished jobs")?;
        if done >= jobs as i64 {
            break;
        }
        if Instant::now() > deadline {
            stop.cancel();
            bail!("only {done} of {jobs} jobs finished within {timeout_secs} s");
        }
        // Coarse polling: counting scans the jobs table and would compete with the run.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let wall = started.elapsed();
    stop.cancel();

    let (span, p50, p99, failed) = store.latency_summary().await?;
    println!("sluice bench throughput");
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
    println!("  first accept -> last done {span:.2} s");
    println!("  submit-to-complete p50    {:.1} ms", p50 * 1000.0);
    println!("  submit-to-complete p99    {:.1} ms", p99 * 1000.0);
    if failed > 0 {
        bail!("{failed} jobs did not succeed");
    }
    Ok(())
}
