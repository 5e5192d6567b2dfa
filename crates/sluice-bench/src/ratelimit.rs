//! `sluice bench ratelimit`: how close to a pool's aggregate capacity the workers drain a
//! backlog without tripping the provider's limits, with one worker process and with several.

use anyhow::{bail, Context};
use sluice::config::Config;
use sluice::stack;
use sluice_broker::Broker;
use sluice_core::{JobRequest, Message, Principal, Tier};
use sluice_outbox::Publisher;
use sluice_store::{NewJob, StoreConfig};
use sluice_testkit::ScratchDb;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The seed notes' pool shape scaled x10: (keys, RPM each).
const SHAPE: [(usize, u32); 3] = [(3, 200), (5, 600), (2, 2_000)];
/// The window over which the steady-state utilization is measured, after ramp-up.
const STEADY_FROM: f64 = 10.0;
const STEADY_SECS: f64 = 60.0;

fn keys() -> Vec<(String, u32)> {
    SHAPE
        .iter()
        .flat_map(|&(n, rpm)| (0..n).map(move |i| (format!("k{rpm}-{i}"), rpm)))
        .collect()
}

fn worker_config(config: &Config, sim_url: &str, schema: &str, prefix: &str) -> String {
    let mut toml = format!(
        "[database]\nurl = \"{}\"\nschema = \"{schema}\"\nmax_connections = 8\n\n\
         [rabbitmq]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n\
         [worker]\nconcurrency = 64\nprefetch = 64\nreap_interval_secs = 1\n\n\
         [redis]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n\
         [routes]\ndefault = \"shape\"\n\n[[pools]]\nname = \"shape\"\n",
        config.database.url,
        config.rabbitmq.url,
        config
            .redis
            .as_ref()
            .map_or("redis://127.0.0.1:6379", |r| r.url.as_str()),
    );
    for (name, rpm) in keys() {
        toml.push_str(&format!(
            "[[pools.endpoints]]\nname = \"{name}\"\nbase_url = \"{sim_url}\"\nmodel = \"sim\"\n\
             api_key = \"sk-{name}\"\nrpm = {rpm}\n\n"
        ));
    }
    toml
}

pub async fn run(
    config: &Config,
    workers: usize,
    seconds: u64,
    latency_ms: u64,
) -> anyhow::Result<()> {
    if workers == 0 || seconds == 0 {
        bail!("--workers and --seconds must be at least 1");
    }
    let capacity_per_sec: f64 = keys().iter().map(|(_, rpm)| f64::from(*rpm) / 60.0).sum();
    let jobs = (capacity_per_sec * seconds as f64).ceil() as usize;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    // The run's schema, dropped when `scratch` drops, whatever happens.
    let scratch = ScratchDb::postgres_at(&config.database.url, "bench");
    let schema = scratch
        .schema()
        .context("a PostgreSQL scratch database has a schema")?
        .to_owned();
    let prefix = format!("bench-{run_id}");

    let sim = sluice_sim::spawn(
        sluice_sim::SimConfig {
            keys: keys()
                .into_iter()
                .map(|(name, rpm)| sluice_sim::SimKey {
                    key: format!("sk-{name}"),
                    name,
                    rpm: Some(rpm),
                })
                .collect(),
            burst_seconds: 1.0,
            latency: sluice_sim::Latency::Fixed { ms: latency_ms },
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .context("cannot start the simulator")?;

    let mut run_config = config.clone();
    run_config.database = StoreConfig {
        max_connections: config.database.max_connections,
        ..scratch.config()
    };
    run_config.rabbitmq.url = config.rabbitmq.url.clone();
    run_config.rabbitmq.prefix = prefix.clone();
    let store = stack::store(&run_config, true).await?;
    let broker = stack::broker(&run_config, &store).await?;
    let path: PathBuf = std::env::temp_dir().join(format!("sluice-bench-{run_id}.toml"));
    std::fs::write(
        &path,
        worker_config(config, &sim.base_url(), &schema, &prefix),
    )?;

    let result = drive(
        &store,
        &broker,
        &path,
        &sim,
        workers,
        jobs,
        capacity_per_sec,
    )
    .await;
    sim.shutdown();
    let _ = std::fs::remove_file(&path);
    if let Err(error) = broker.delete_all().await {
        eprintln!("warning: could not delete the bench queues: {error}");
    }
    store.close().await;
    drop(scratch);
    result
}

async fn drive(
    store: &sluice_store::Store,
    broker: &Arc<dyn Broker>,
    config_path: &std::path::Path,
    sim: &sluice_sim::SimHandle,
    workers: usize,
    jobs: usize,
    capacity_per_sec: f64,
) -> anyhow::Result<()> {
    // The backlog goes in before any worker starts, spread over the three tier lanes.
    let tiers = [Tier::Enterprise, Tier::Basic, Tier::Free];
    let publisher = Publisher::new(store.clone(), Arc::clone(broker));
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1_000) {
        let batch: Vec<NewJob> = chunk
            .iter()
            .map(|&n| {
                let tier = tiers[n % tiers.len()];
                let principal = Principal {
                    tenant: format!("tenant-{}", n % 7),
                    user: "bench".into(),
                    tier,
                    email: None,
                    reuse_samples: false,
                };
                let request = JobRequest::new(
                    "default",
                    vec![Message::user(format!("rate limit bench {n}"))],
                );
                NewJob::new(
                    principal,
                    sluice_core::TierLanes::default().lane_for(tier),
                    request,
                )
            })
            .collect();
        // Jobs without a request hash are never attached: every one is queued.
        let messages = store.insert_jobs(&batch).await?;
        let messages = messages
            .into_iter()
            .filter_map(|a| a.into_queued())
            .collect();
        publisher.publish_many(messages).await?;
    }
    eprintln!(
        "bench ratelimit: {jobs} jobs, {workers} worker process(es), pool capacity {capacity_per_sec:.1} req/s"
    );

    // The workers are real `sluice worker` processes: the binary built beside this one.
    let exe = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name(format!("sluice{}", std::env::consts::EXE_SUFFIX));
    if !exe.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --bin sluice)",
            exe.display()
        );
    }
    let mut children = Vec::new();
    for _ in 0..workers {
        children.push(
            tokio::process::Command::new(&exe)
                .args([
                    "--config",
                    &config_path.to_string_lossy(),
                    "worker",
                    "--no-migrate",
                ])
                .env("SLUICE_LOG", "warn")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("cannot start a worker process")?,
        );
    }
    let started = Instant::now();
    let deadline = Duration::from_secs_f64(jobs as f64 / capacity_per_sec * 3.0 + 60.0);
    loop {
        let done = store.finished_count().await?;
        if done >= jobs as i64 {
            break;
        }
        if started.elapsed() > deadline {
            bail!("only {done} of {jobs} jobs finished within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for child in &mut children {
        let _ = child.start_kill();
    }

    let span = store.run_span().await?;
    let steady = store
        .finished_in_window(STEADY_FROM, STEADY_FROM + STEADY_SECS)
        .await?;
    let stats = sim.stats();
    println!("sluice bench ratelimit: {workers} worker process(es)");
    println!("  jobs                       {jobs}");
    println!("  pool capacity              {capacity_per_sec:.1} req/s (7,600 RPM over 10 keys)");
    println!(
        "  whole run                  {span:.1} s, {:.1} jobs/s, utilization {:.3}",
        jobs as f64 / span,
        jobs as f64 / span / capacity_per_sec
    );
    if span >= STEADY_FROM + STEADY_SECS {
        println!(
            "  steady {STEADY_SECS:.0} s window        {:.1} jobs/s, utilization {:.3}",
            steady as f64 / STEADY_SECS,
            steady as f64 / STEADY_SECS / capacity_per_sec
        );
    } else {
        println!("  steady window              run too short for a {STEADY_SECS:.0} s window (use --seconds 80 or more)");
    }
    println!(
        "  provider calls             {} ({} answered 429: {:.3}%)",
        stats.total,
        stats.rate_limited,
        100.0 * stats.rate_limited as f64 / (stats.total.max(1)) as f64
    );
    println!(
        "  keys blocked for hammering {} times ({} calls refused while blocked)",
        stats.blocks, stats.blocked
    );
    // Every key within its RPM plus its one second of burst in every minute window; the
    // timeline's 100 ms steps let a window reach 60.1 s, so that tenth of a second is allowed too.
    let busiest = sim.busiest_window(Duration::from_secs(60));
    let mut worst = (String::new(), 0.0f64);
    let mut over = 0;
    for (name, rpm) in keys() {
        let calls = busiest.get(&name).copied().unwrap_or(0) as f64;
        let allowed = f64::from(rpm) * (1.0 + 1.0 / 60.0 + 0.1 / 60.0);
        if calls > allowed {
            over += 1;
        }
        if calls / f64::from(rpm) > worst.1 {
            worst = (name, calls / f64::from(rpm));
        }
    }
    println!(
        "  busiest minute per key      {:.3} x RPM at most ({}); {over} keys over RPM + burst",
        worst.1, worst.0
    );
    for wait in store.queue_wait_by_lane().await? {
        println!(
            "  queue wait {:<9}       p50 {:.1} s, p95 {:.1} s ({} jobs)",
            wait.lane, wait.p50, wait.p95, wait.jobs
        );
    }
    Ok(())
}
