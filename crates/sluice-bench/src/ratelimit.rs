//! `sluice bench ratelimit`: how close to a pool's aggregate capacity the workers drain a backlog,
//! or a burst into the idle pool, without tripping the provider's limits, with 1 and N processes.

use anyhow::{bail, Context};
use sluice::config::Config;
use sluice::stack;
use sluice_broker::Broker;
use sluice_core::{JobRequest, Message, Principal, Tier};
use sluice_outbox::Publisher;
use sluice_store::{NewJob, StoreConfig};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The seed notes' pool shape scaled x10: (keys, RPM each).
const SHAPE: [(usize, u32); 3] = [(3, 200), (5, 600), (2, 2_000)];
/// The simulator's bucket per key, in seconds of its rate: what an idle key holds.
const BUCKET_SECS: f64 = 1.0;
/// How long the workers sit idle, once all are registered, before a burst: their consumers
/// attach meanwhile, and the burst meets a pool nobody has used.
const IDLE_BEFORE_BURST: Duration = Duration::from_secs(3);
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

/// `sluice-bench ratelimit`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Worker processes per run, comma-separated.
    #[arg(long, default_value = "1,4", value_delimiter = ',')]
    workers: Vec<usize>,
    /// Seconds of backlog per run at full pool capacity (backlog mode).
    #[arg(long, default_value_t = 80)]
    seconds: u64,
    /// Simulated provider latency in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Burst mode: start the workers, let the pool sit idle, then submit this many jobs at
    /// once. Prints the whole-run utilization: jobs that succeeded / (pool rate x run span +
    /// the provider's initial bucket), the most an idle provider could have allowed.
    #[arg(long, value_name = "JOBS")]
    burst: Option<usize>,
}

/// How the jobs arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// All queued before any worker starts; measured in a steady window after ramp-up.
    Backlog,
    /// All submitted at once into the idle pool of running workers; measured over the whole run.
    Burst,
}

/// Every run the options ask for: one per worker count.
pub async fn run_all(config: &Config, args: Args) -> anyhow::Result<()> {
    for &workers in &args.workers {
        run(config, workers, &args).await?;
    }
    Ok(())
}

/// The pool's steady capacity in calls per second.
fn capacity_per_sec() -> f64 {
    keys().iter().map(|(_, rpm)| f64::from(*rpm) / 60.0).sum()
}

/// What the simulator's keys hold when idle: `rpm / 60 x BUCKET_SECS` each, at least one call
/// (the simulator's `TokenBucket` model).
fn initial_bucket() -> f64 {
    keys()
        .iter()
        .map(|(_, rpm)| (f64::from(*rpm) / 60.0 * BUCKET_SECS).max(1.0))
        .sum()
}

async fn run(config: &Config, workers: usize, args: &Args) -> anyhow::Result<()> {
    let (mode, jobs) = match args.burst {
        Some(jobs) => (Mode::Burst, jobs),
        None => (
            Mode::Backlog,
            (capacity_per_sec() * args.seconds as f64).ceil() as usize,
        ),
    };
    if workers == 0 || jobs == 0 {
        bail!("--workers, --seconds and --burst must be at least 1");
    }
    let capacity_per_sec = capacity_per_sec();
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    // The run's schema, dropped when `scratch` drops, whatever happens.
    let (scratch, schema) = crate::common::scratch_schema(&config.database.url)?;
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
            burst_seconds: BUCKET_SECS,
            latency: sluice_sim::Latency::Fixed {
                ms: args.latency_ms,
            },
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

    let redis_url = config
        .redis
        .as_ref()
        .map_or("redis://127.0.0.1:6379", |r| r.url.as_str());
    let run = Run {
        store: &store,
        broker: &broker,
        config_path: &path,
        sim: &sim,
        redis: (redis_url, &prefix),
        workers,
        jobs,
        mode,
    };
    let result = run.drive(capacity_per_sec).await;
    sim.shutdown();
    let _ = std::fs::remove_file(&path);
    if let Err(error) = broker.delete_all().await {
        eprintln!("warning: could not delete the bench queues: {error}");
    }
    store.close().await;
    drop(scratch);
    result
}

/// One run's parts.
struct Run<'a> {
    store: &'a sluice_store::Store,
    broker: &'a Arc<dyn Broker>,
    config_path: &'a std::path::Path,
    sim: &'a sluice_sim::SimHandle,
    /// The workers' Redis URL and key prefix, where they register.
    redis: (&'a str, &'a str),
    workers: usize,
    jobs: usize,
    mode: Mode,
}

impl Run<'_> {
    /// Queue `jobs` jobs, spread over the three tier lanes and seven tenants, a thousand per
    /// statement, each thousand published as soon as it is in.
    async fn submit(&self) -> anyhow::Result<()> {
        let tiers = [Tier::Enterprise, Tier::Basic, Tier::Free];
        let publisher = Publisher::new(self.store.clone(), Arc::clone(self.broker));
        for chunk in (0..self.jobs).collect::<Vec<_>>().chunks(1_000) {
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
            let mut messages = Vec::with_capacity(batch.len());
            for outcome in self.store.insert_jobs(&batch).await? {
                messages.extend(outcome?.into_queued());
            }
            publisher.publish_many(messages).await?;
        }
        publisher.settle().await;
        Ok(())
    }

    /// Wait until every worker process has registered with the shared limiter (so it is up),
    /// then let the pool sit idle for [`IDLE_BEFORE_BURST`].
    async fn wait_until_idle(&self, children: &mut [tokio::process::Child]) -> anyhow::Result<()> {
        let (url, prefix) = self.redis;
        let redis = sluice_redis::Redis::open(url, prefix)?;
        let mut conn = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .context("cannot reach Redis")?;
        let key = redis.key("workers");
        let started = Instant::now();
        loop {
            let live: u64 = sluice_redis::redis::cmd("ZCARD")
                .arg(&key)
                .query_async(&mut conn)
                .await?;
            if live >= self.workers as u64 {
                break;
            }
            for child in children.iter_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!("a worker process exited before the burst: {status}");
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!(
                    "only {live} of {} workers registered within 60 s",
                    self.workers
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(IDLE_BEFORE_BURST).await;
        Ok(())
    }

    async fn drive(&self, capacity_per_sec: f64) -> anyhow::Result<()> {
        let (store, sim, workers, jobs) = (self.store, self.sim, self.workers, self.jobs);
        if self.mode == Mode::Backlog {
            // The backlog goes in before any worker starts.
            self.submit().await?;
        }
        eprintln!(
            "bench ratelimit: {jobs} jobs ({}), {workers} worker process(es), pool capacity {capacity_per_sec:.1} req/s",
            match self.mode {
                Mode::Backlog => "a backlog",
                Mode::Burst => "a burst into the idle pool",
            }
        );

        // The workers are real `sluice worker` processes: the binary built beside this one.
        let exe = crate::common::sluice_exe()?;
        let mut children = Vec::new();
        for _ in 0..workers {
            children.push(
                tokio::process::Command::new(&exe)
                    .args([
                        "--config",
                        &self.config_path.to_string_lossy(),
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
        if self.mode == Mode::Burst {
            self.wait_until_idle(&mut children).await?;
            self.submit().await?;
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
        let stats = sim.stats();
        println!("sluice bench ratelimit: {workers} worker process(es)");
        println!("  jobs                       {jobs}");
        println!(
            "  pool capacity              {capacity_per_sec:.1} req/s (7,600 RPM over 10 keys)"
        );
        match self.mode {
            Mode::Backlog => {
                let steady = store
                    .finished_in_window(STEADY_FROM, STEADY_FROM + STEADY_SECS)
                    .await?;
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
            }
            Mode::Burst => {
                // An idle provider allows its full bucket at once, then its rate: over `secs`
                // it could have served `rate x secs + bucket` calls, and no schedule more.
                let summary = store.latency_summary().await?;
                let succeeded = jobs as i64 - summary.not_succeeded;
                let bucket = initial_bucket();
                let allowed = |secs: f64| capacity_per_sec * secs + bucket;
                println!(
                    "  utilization                jobs succeeded / (pool rate x span + the keys' \
                     initial bucket of {bucket:.1} calls)"
                );
                println!(
                    "  whole run                  {:.2} s from the first job accepted to the last \
                     finished; {succeeded} succeeded; utilization {:.3}",
                    summary.span,
                    succeeded as f64 / allowed(summary.span)
                );
                println!(
                    "  from the first claim       {span:.2} s; utilization {:.3}",
                    succeeded as f64 / allowed(span)
                );
                println!(
                    "  shortest possible          {:.2} s",
                    (jobs as f64 - bucket).max(0.0) / capacity_per_sec
                );
            }
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
}
