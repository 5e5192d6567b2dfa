//! `sluice bench memory`: the resident memory of `sluice serve` and `sluice worker` (and of
//! `sluice dev`) while a large backlog waits in paused lanes, then while it drains.

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use sluice::config::Config;
use sluice::stack;
use sluice_core::Lane;
use sluice_store::{Store, StoreConfig};
use sluice_testkit::{ScratchDb, ScratchRabbit, ScratchRedis};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// The targets: resident memory (the kernel's own high-water mark, VmHWM) of each process.
const API_TARGET_MB: f64 = 100.0;
const WORKER_TARGET_MB: f64 = 100.0;
const EMBEDDED_TARGET_MB: f64 = 150.0;

/// How often each process's /proc/<pid>/status is read.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
/// Quiet time sampled before the load (the baseline) and after submitting and draining, so
/// memory held by work that finishes just after the last reply is seen too.
const SETTLE: Duration = Duration::from_secs(3);

#[derive(Args)]
pub struct MemoryArgs {
    /// Jobs submitted while the lanes are paused, then drained.
    #[arg(long, default_value_t = 100_000)]
    jobs: usize,
    /// Concurrent HTTP clients submitting.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Jobs in flight in the worker (`[worker] concurrency` and `prefetch`; 64 is the default).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// What to run, one after the other, comma-separated.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "distributed,embedded"
    )]
    modes: Vec<Mode>,
    /// Give up waiting for the drain after this many seconds (per mode).
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

/// How Sluice runs for a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// `sluice serve` and `sluice worker` processes: PostgreSQL, RabbitMQ lanes, Redis.
    Distributed,
    /// One `sluice dev` process on a SQLite file holding the jobs and the lanes.
    Embedded,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Distributed => "distributed",
            Mode::Embedded => "embedded",
        })
    }
}

pub async fn run(config: &Config, args: MemoryArgs) -> anyhow::Result<()> {
    if args.jobs == 0 || args.clients == 0 || args.concurrency == 0 {
        bail!("--jobs, --clients and --concurrency must be at least 1");
    }
    if args.modes.is_empty() {
        bail!("--modes names no mode");
    }
    // The processes measured are the `sluice` binary built beside this one.
    let exe = crate::common::sluice_exe()?;
    let mut missed = Vec::new();
    for &mode in &args.modes {
        let report = match mode {
            Mode::Distributed => distributed(config, &args, &exe).await,
            Mode::Embedded => embedded(config, &args, &exe).await,
        }
        .with_context(|| format!("the {mode} run failed"))?;
        report.print(mode);
        missed.extend(report.missed());
    }
    if !missed.is_empty() {
        bail!("memory targets missed: {}", missed.join(", "));
    }
    Ok(())
}

/// A directory of the run's own (config files, the SQLite data), removed on `Drop`.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> anyhow::Result<TempDir> {
        let dir = std::env::temp_dir().join(format!(
            "sluice-bench-memory-{}",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // A failure only leaves a temporary directory behind.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The sections every run's config shares: an instant, unlimited simulator pool, the worker's
/// concurrency, and no load shedding (the backlog is the point, not something to refuse).
pub(crate) fn common_toml(sim_url: &str, concurrency: usize) -> String {
    format!(
        "[worker]\nconcurrency = {concurrency}\nprefetch = {concurrency}\n\n\
         [shedding]\nenabled = false\n\n\
         [[pools]]\nname = \"sim\"\n[[pools.endpoints]]\nname = \"sim-1\"\n\
         base_url = \"{sim_url}\"\nmodel = \"sim-model\"\napi_key = \"sk-sim-bench\"\n\
         rpm = 100000000\nburst = 100000\n\n\
         [routes]\ndefault = \"sim\"\n"
    )
}

/// `sluice serve` and `sluice worker` on a fresh schema, RabbitMQ prefix and Redis prefix.
async fn distributed(config: &Config, args: &MemoryArgs, exe: &Path) -> anyhow::Result<Report> {
    let id = uuid::Uuid::now_v7().simple().to_string();
    // Removed when they drop, whatever happens; declared first so they drop last, after the
    // processes using them are gone.
    let scratch = ScratchDb::postgres_at(&config.database.url, "bench");
    let _lanes = ScratchRabbit {
        url: config.rabbitmq.url.clone(),
        prefix: format!("bench-{id}"),
    };
    let redis_url = config
        .redis
        .as_ref()
        .map_or_else(sluice_testkit::redis_url, |r| r.url.clone());
    let _keys = ScratchRedis {
        url: redis_url.clone(),
        prefix: format!("bench-{id}"),
    };
    let dir = TempDir::new()?;
    let sim = crate::common::instant_simulator().await?;

    let database = scratch.config();
    let schema = scratch
        .schema()
        .context("a PostgreSQL scratch database has a schema")?;
    // `application_name` is the schema's, so dropping the schema ends the processes'
    // connections too.
    let toml = format!(
        "listen = \"127.0.0.1:0\"\n\n\
         [database]\nurl = \"{}\"\nschema = \"{schema}\"\napplication_name = \"{schema}\"\n\n\
         [rabbitmq]\nurl = \"{}\"\nprefix = \"bench-{id}\"\n\n\
         [redis]\nurl = \"{redis_url}\"\nprefix = \"bench-{id}\"\n\n{}",
        database.url,
        config.rabbitmq.url,
        common_toml(&sim.base_url(), args.concurrency),
    );
    let config_path = dir.0.join("sluice.toml");
    std::fs::write(&config_path, toml).context("cannot write the run's config")?;

    let result = async {
        let mut store_config = config.clone();
        store_config.database = database.clone();
        let store = stack::store(&store_config, true).await?;
        let result = async {
            let setup = prepare(&store).await?;
            let config_arg = config_path.to_string_lossy().into_owned();
            let (api, url) = start(
                exe,
                &["--config", &config_arg, "serve", "--no-migrate"],
                None,
                "sluice api listening on ",
            )
            .await
            .context("cannot start sluice serve")?;
            let (worker, _) = start(
                exe,
                &["--config", &config_arg, "worker", "--no-migrate"],
                None,
                "sluice worker started",
            )
            .await
            .context("cannot start sluice worker")?;
            let processes = vec![
                Measured::new("api", API_TARGET_MB, api)?,
                Measured::new("worker", WORKER_TARGET_MB, worker)?,
            ];
            measure(&store, &url, &setup, processes, args).await
        }
        .await;
        store.close().await;
        result
    }
    .await;
    sim.shutdown();
    result
}

/// `sluice dev` on a SQLite file in a directory of its own.
async fn embedded(config: &Config, args: &MemoryArgs, exe: &Path) -> anyhow::Result<Report> {
    let dir = TempDir::new()?;
    let sim = crate::common::instant_simulator().await?;
    let data = dir.0.join("data").join("sluice.db");
    std::fs::create_dir_all(dir.0.join("data")).context("cannot create the data directory")?;
    // The pool points at this process's simulator, not at `[sim]`'s address, so `dev` starts no
    // simulator of its own: what is measured is Sluice, not a provider.
    std::fs::write(
        dir.0.join("sluice.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\n\n{}",
            common_toml(&sim.base_url(), args.concurrency)
        ),
    )
    .context("cannot write the run's config")?;

    let result = async {
        let store = dev_store(config, &data).await?;
        let result = async {
            let setup = prepare(&store).await?;
            let (dev, url) = start_dev(exe, &dir.0, &data).await?;
            let processes = vec![Measured::new("dev", EMBEDDED_TARGET_MB, dev)?];
            measure(&store, &url, &setup, processes, args).await
        }
        .await;
        store.close().await;
        result
    }
    .await;
    sim.shutdown();
    result
}

/// What the bench puts in the store before Sluice starts.
struct Setup {
    /// One tenant key per tier, so the backlog spreads over the priority, standard and batch
    /// lanes as real traffic does.
    keys: Vec<String>,
    /// For resuming the lanes through the admin API, as an operator would.
    admin: String,
}

/// Keys, and every consumed lane paused, so the workers take nothing until the backlog is in.
async fn prepare(store: &Store) -> anyhow::Result<Setup> {
    let keys = crate::common::tier_keys(store).await?;
    let admin = store
        .create_admin_key("bench")
        .await
        .context("cannot create the bench admin key")?;
    for lane in Lane::CONSUMED {
        store
            .pause(&format!("lane:{lane}"), "bench")
            .await
            .with_context(|| format!("cannot pause lane {lane}"))?;
    }
    Ok(Setup { keys, admin })
}

/// `sluice dev` on the SQLite file `data`, run in `dir` (whose `sluice.toml` it reads); the
/// process and its API's base URL.
/// The bench's own store on `dev`'s data file, migrated: the bench writes its keys and pauses
/// into the file before `dev` opens it, and SQLite's WAL lets it keep reading (counting finished
/// jobs) while `dev` writes.
pub(crate) async fn dev_store(config: &Config, data: &Path) -> anyhow::Result<Store> {
    let mut store_config = config.clone();
    store_config.database = StoreConfig {
        url: format!("sqlite://{}", data.display()),
        schema: None,
        max_connections: 2,
        ..StoreConfig::default()
    };
    stack::store(&store_config, true).await
}

pub(crate) async fn start_dev(
    exe: &Path,
    dir: &Path,
    data: &Path,
) -> anyhow::Result<(Child, String)> {
    let data = data.to_string_lossy();
    let args = [
        "--config",
        "sluice.toml",
        "dev",
        "--listen",
        "127.0.0.1:0",
        "--data",
        &data,
    ];
    start(exe, &args, Some(dir), "sluice api listening on ")
        .await
        .context("cannot start sluice dev")
}

/// Start `sluice ARGS` and wait for its `ready` line; returns the child and the rest of that
/// line (the API's URL for `serve` and `dev`).
pub(crate) async fn start(
    exe: &Path,
    args: &[&str],
    dir: Option<&Path>,
    ready: &str,
) -> anyhow::Result<(Child, String)> {
    let mut command = Command::new(exe);
    command
        .args(args)
        .env("SLUICE_LOG", "warn")
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {}", exe.display()))?;
    let stdout = child.stdout.take().context("the child has no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let rest = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await? {
            if let Some((_, rest)) = line.split_once(ready) {
                return Ok(rest.trim().to_owned());
            }
        }
        bail!("it exited before it was ready")
    })
    .await
    .context("it was not ready within 60 s")??;
    // Keep reading stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, rest))
}

/// A process being measured.
struct Measured {
    label: &'static str,
    target_mb: f64,
    pid: u32,
    child: Child,
}

impl Measured {
    fn new(label: &'static str, target_mb: f64, child: Child) -> anyhow::Result<Measured> {
        let pid = child.id().context("the process has already exited")?;
        Ok(Measured {
            label,
            target_mb,
            pid,
            child,
        })
    }
}

/// When a sample was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Started, nothing submitted yet.
    Idle,
    /// Submitting into paused lanes, and the backlog waiting.
    Queued,
    /// Lanes resumed until every job finished.
    Draining,
}

const PHASES: [Phase; 3] = [Phase::Idle, Phase::Queued, Phase::Draining];

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Queued => "queued",
            Phase::Draining => "draining",
        }
    }
}

/// One reading of /proc/<pid>/status, in KiB.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Memory {
    /// Resident now.
    pub(crate) rss: u64,
    /// The most ever resident (the kernel tracks it between our samples too).
    hwm: u64,
}

impl Memory {
    fn max(self, other: Memory) -> Memory {
        Memory {
            rss: self.rss.max(other.rss),
            hwm: self.hwm.max(other.hwm),
        }
    }
}

pub(crate) fn read_memory(pid: u32) -> anyhow::Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .with_context(|| format!("{path} has no {name}"))?;
        line.trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{path}: cannot read {name}{line}"))
    };
    Ok(Memory {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
    })
}

pub(crate) fn mb(kib: u64) -> f64 {
    kib as f64 * 1024.0 / 1e6
}

/// Per process, the highest reading in each phase.
type Peaks = Vec<[Memory; PHASES.len()]>;

/// Read every process's memory every [`SAMPLE_EVERY`] into the phase `phase` names, until it
/// names none; every 5 s one line of progress goes to stderr.
fn spawn_sampler(
    processes: Vec<(&'static str, u32)>,
    mut phase: watch::Receiver<Option<Phase>>,
) -> tokio::task::JoinHandle<Peaks> {
    tokio::spawn(async move {
        let mut peaks: Peaks = vec![[Memory::default(); PHASES.len()]; processes.len()];
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut samples = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                changed = phase.changed() => if changed.is_err() { return peaks; },
            }
            let Some(now) = *phase.borrow() else {
                return peaks;
            };
            let index = PHASES.iter().position(|p| *p == now).unwrap_or(0);
            let mut line = format!("bench memory: {}:", now.name());
            for (i, (label, pid)) in processes.iter().enumerate() {
                // A process that exited is noticed by the run; its last readings stand.
                if let Ok(memory) = read_memory(*pid) {
                    peaks[i][index] = peaks[i][index].max(memory);
                    line.push_str(&format!(
                        " {label} {:.1} MB (peak {:.1})",
                        mb(memory.rss),
                        mb(memory.hwm)
                    ));
                }
            }
            samples += 1;
            if samples.is_multiple_of(20) {
                eprintln!("{line}");
            }
        }
    })
}

/// What one run measured.
struct Report {
    jobs: usize,
    clients: usize,
    submit: Duration,
    drain: Duration,
    processes: Vec<(&'static str, f64)>,
    peaks: Peaks,
}

impl Report {
    fn print(&self, mode: Mode) {
        let what = match mode {
            Mode::Distributed => "sluice serve + sluice worker (PostgreSQL, RabbitMQ, Redis)",
            Mode::Embedded => "sluice dev (SQLite store and SQL queue in one file)",
        };
        println!("sluice bench memory: {mode}: {what}");
        println!(
            "  submit into paused lanes  {} jobs, {} clients: {:.1} s ({:.0} jobs/s)",
            self.jobs,
            self.clients,
            self.submit.as_secs_f64(),
            self.jobs as f64 / self.submit.as_secs_f64()
        );
        println!(
            "  drain after resume        {:.1} s ({:.0} jobs/s)",
            self.drain.as_secs_f64(),
            self.jobs as f64 / self.drain.as_secs_f64()
        );
        println!(
            "  {:<8} {:>9} {:>12} {:>12} {:>12} {:>12} {:>8}  result",
            "process", "idle RSS", "queued RSS", "queued HWM", "drain RSS", "drain HWM", "target"
        );
        for (i, (label, target)) in self.processes.iter().enumerate() {
            let [idle, queued, draining] = self.peaks[i];
            let peak = mb(draining.hwm.max(queued.hwm));
            println!(
                "  {label:<8} {:>9.1} {:>12.1} {:>12.1} {:>12.1} {:>12.1} {target:>8.0}  {}",
                mb(idle.rss),
                mb(queued.rss),
                mb(queued.hwm),
                mb(draining.rss),
                mb(draining.hwm),
                if peak < *target { "PASS" } else { "FAIL" }
            );
        }
        println!("  (MB = 10^6 bytes; RSS is the highest sampled VmRSS, HWM the kernel's VmHWM)");
        println!();
    }

    /// The processes over their target, by their high-water mark.
    fn missed(&self) -> Vec<String> {
        self.processes
            .iter()
            .zip(&self.peaks)
            .filter_map(|((label, target), peaks)| {
                let peak = mb(peaks.iter().map(|m| m.hwm).max().unwrap_or(0));
                (peak >= *target).then(|| format!("{label} {peak:.1} MB >= {target:.0} MB"))
            })
            .collect()
    }
}

/// Sample idle, submit into the paused lanes, resume, drain; the processes are killed before
/// this returns, whatever the outcome.
async fn measure(
    store: &Store,
    api: &str,
    setup: &Setup,
    mut processes: Vec<Measured>,
    args: &MemoryArgs,
) -> anyhow::Result<Report> {
    let (phase, phase_rx) = watch::channel(Some(Phase::Idle));
    let sampler = spawn_sampler(
        processes.iter().map(|p| (p.label, p.pid)).collect(),
        phase_rx,
    );
    let result = load(store, api, setup, &mut processes, args, &phase).await;
    let _ = phase.send(None);
    let peaks = sampler.await.context("the sampler panicked")?;
    for process in &mut processes {
        let _ = process.child.start_kill();
        let _ = process.child.wait().await;
    }
    let (submit, drain) = result?;
    Ok(Report {
        jobs: args.jobs,
        clients: args.clients,
        submit,
        drain,
        processes: processes.iter().map(|p| (p.label, p.target_mb)).collect(),
        peaks,
    })
}

/// Fails if a measured process has exited.
fn check_alive(processes: &mut [Measured]) -> anyhow::Result<()> {
    for process in processes {
        if let Some(status) = process
            .child
            .try_wait()
            .with_context(|| format!("cannot check on the {} process", process.label))?
        {
            bail!("the {} process exited ({status})", process.label);
        }
    }
    Ok(())
}

/// The load; the submit phase's and the drain's durations.
async fn load(
    store: &Store,
    api: &str,
    setup: &Setup,
    processes: &mut [Measured],
    args: &MemoryArgs,
    phase: &watch::Sender<Option<Phase>>,
) -> anyhow::Result<(Duration, Duration)> {
    tokio::time::sleep(SETTLE).await;
    check_alive(processes)?;

    let _ = phase.send(Some(Phase::Queued));
    eprintln!(
        "bench memory: submitting {} jobs from {} clients into paused lanes",
        args.jobs, args.clients
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let started = Instant::now();
    submit(&http, api, &setup.keys, args).await?;
    let submitted = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    check_alive(processes)?;
    let early = store
        .finished_count()
        .await
        .context("cannot count finished jobs")?;
    if early > 0 {
        // The queued phase is meant to hold the whole backlog; say so if it did not.
        eprintln!("warning: {early} jobs finished while the lanes were paused");
    }

    let _ = phase.send(Some(Phase::Draining));
    eprintln!("bench memory: resuming the lanes");
    let started = Instant::now();
    for lane in Lane::CONSUMED {
        let response = http
            .post(format!("{api}/admin/v1/lanes/{lane}/resume"))
            .bearer_auth(&setup.admin)
            .send()
            .await
            .with_context(|| format!("cannot resume lane {lane}"))?;
        if !response.status().is_success() {
            bail!("resuming lane {lane} answered {}", response.status());
        }
    }
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut last_report = Instant::now();
    loop {
        let done = store
            .finished_count()
            .await
            .context("cannot count finished jobs")?;
        if done >= args.jobs as i64 {
            break;
        }
        check_alive(processes)?;
        if Instant::now() > deadline {
            bail!(
                "only {done} of {} jobs finished within {} s",
                args.jobs,
                args.timeout_secs
            );
        }
        if last_report.elapsed() >= Duration::from_secs(5) {
            eprintln!("bench memory: {done} of {} jobs finished", args.jobs);
            last_report = Instant::now();
        }
        // Coarse polling: counting scans the jobs table and would compete with the drain.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let drained = started.elapsed();
    tokio::time::sleep(SETTLE).await;
    check_alive(processes)?;
    let summary = store
        .latency_summary()
        .await
        .context("cannot summarise the jobs")?;
    if summary.not_succeeded > 0 {
        bail!("{} jobs did not succeed", summary.not_succeeded);
    }
    Ok((submitted, drained))
}

/// `args.jobs` submissions, one HTTP call each, from `args.clients` clients; progress every 5 s.
async fn submit(
    http: &reqwest::Client,
    api: &str,
    keys: &[String],
    args: &MemoryArgs,
) -> anyhow::Result<()> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let offer = crate::common::Offer {
        jobs: args.jobs,
        clients: args.clients,
        label: "memory bench job",
        rate: None,
        temperature: None,
    };
    let mut clients = crate::common::spawn_submitters(http, api, keys, offer, &accepted);
    let mut progress = tokio::time::interval(Duration::from_secs(5));
    progress.tick().await;
    loop {
        tokio::select! {
            joined = clients.join_next() => match joined {
                None => return Ok(()),
                // Dropping the set on an error aborts the other clients.
                Some(outcome) => {
                    outcome.context("a submitting client panicked")??;
                }
            },
            _ = progress.tick() => eprintln!(
                "bench memory: {} of {} jobs accepted",
                accepted.load(Ordering::Relaxed),
                args.jobs
            ),
        }
    }
}
