//! `sluice-bench cost`: the cost of one job, as `docs/PERFORMANCE.md` reports it. Real `sluice
//! serve` and `sluice worker` processes run N jobs against an instant simulator in this process;
//! the CPU each process (and PostgreSQL and RabbitMQ) spent, and, where `pg_stat_statements` is
//! installed, the SQL statements, rows and WAL per job, are read before and after.

use anyhow::{bail, Context};
use sluice::config::Config;
use sluice::stack;
use sluice_store::{BATCH_ITEMS, BATCH_SECONDS, BATCH_WAIT_SECONDS};

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux everywhere).
const TICKS_PER_SEC: f64 = 100.0;

pub async fn run(
    config: &Config,
    jobs: usize,
    clients: usize,
    rate: Option<f64>,
) -> anyhow::Result<()> {
    if jobs == 0 || clients == 0 {
        bail!("--jobs and --clients must be at least 1");
    }
    crate::common::check_rate(rate)?;
    let run_id = uuid::Uuid::now_v7().simple().to_string();
    let (scratch, schema) = crate::common::scratch_schema(&config.database.url)?;
    let prefix = format!("bench-{run_id}");
    let sim = crate::common::instant_simulator().await?;
    let free_port = || -> std::io::Result<u16> {
        Ok(std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port())
    };
    let port = free_port()?;
    let worker_metrics = free_port()?;
    let toml = format!(
        "listen = \"127.0.0.1:{port}\"\n\n\
         [database]\nurl = \"{}\"\nschema = \"{schema}\"\nmax_connections = 16\n\n\
         [rabbitmq]\nurl = \"{}\"\nprefix = \"{prefix}\"\n\n\
         [worker]\nconcurrency = 128\nprefetch = 128\n\
         metrics_listen = \"127.0.0.1:{worker_metrics}\"\n\n\
         [shedding]\nenabled = false\n\n\
         [routes]\ndefault = \"sim\"\n\n[[pools]]\nname = \"sim\"\n\
         [[pools.endpoints]]\nname = \"sim\"\nbase_url = \"{}\"\nmodel = \"sim-model\"\n\
         api_key = \"sk-sim-bench\"\nrpm = 100000000\nburst = 100000\n",
        config.database.url,
        config.rabbitmq.url,
        sim.base_url(),
    );
    let path: PathBuf = std::env::temp_dir().join(format!("sluice-bench-{run_id}.toml"));
    std::fs::write(&path, &toml)?;
    let mut run_config = config.clone();
    run_config.database = scratch.config();
    run_config.rabbitmq.prefix = prefix.clone();
    let load = Load {
        jobs,
        clients,
        rate,
    };
    let metrics = [
        format!("http://127.0.0.1:{port}/metrics"),
        format!("http://127.0.0.1:{worker_metrics}/metrics"),
    ];
    let result = measure(config, &run_config, &sim, &path, port, &metrics, load).await;
    match stack::store(&run_config, false).await {
        Ok(store) => {
            if let Ok(broker) = stack::broker(&run_config, &store).await {
                if let Err(error) = broker.delete_all().await {
                    eprintln!("warning: could not delete the bench queues: {error}");
                }
            }
            store.close().await;
        }
        Err(error) => eprintln!("warning: could not delete the bench queues: {error:#}"),
    }
    sim.shutdown();
    let _ = std::fs::remove_file(&path);
    drop(scratch);
    result
}

async fn measure(
    config: &Config,
    run_config: &Config,
    sim: &sluice_sim::SimHandle,
    config_path: &Path,
    port: u16,
    metrics: &[String],
    load: Load,
) -> anyhow::Result<()> {
    let Load {
        jobs,
        clients,
        rate,
    } = load;
    let exe = crate::common::sluice_exe()?;
    // `serve` migrates the schema, so the figures of an older build are taken on its own schema.
    let spawn = |command: &str, migrate: bool| {
        let mut args = vec![
            "--config".to_owned(),
            config_path.to_string_lossy().into_owned(),
            command.to_owned(),
        ];
        if !migrate {
            args.push("--no-migrate".to_owned());
        }
        tokio::process::Command::new(&exe)
            .args(args)
            .env("SLUICE_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start `sluice {command}`"))
    };
    let mut serve = spawn("serve", true)?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let base = format!("http://127.0.0.1:{port}");
    let up = Instant::now();
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        if up.elapsed() > Duration::from_secs(30) {
            bail!("`sluice serve` did not answer within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut worker = spawn("worker", false)?;
    let (Some(serve_pid), Some(worker_pid)) = (serve.id(), worker.id()) else {
        bail!("a child process exited at once");
    };
    let store = &stack::store(run_config, false).await?;
    let keys = crate::common::tier_keys(store).await?;
    // Warm up connections, caches and statements so the figures are the steady cost.
    submit(&http, &base, &keys, 200, clients.min(16), "warm-up", None).await?;
    wait_finished(store, sim, 200).await?;

    let statements = Statements::reset(&config.database.url).await;
    let batches_before = Batches::scrape(&http, metrics).await?;
    let before = Cpu::read(serve_pid, worker_pid);
    let written = crate::common::disk_written_kib();
    let started = Instant::now();
    let mut latencies = submit(&http, &base, &keys, jobs, clients, "job", rate).await?;
    let disk_writes = crate::common::disk_writes_line(written);
    wait_finished(store, sim, 200 + jobs).await?;
    let seconds = started.elapsed().as_secs_f64();
    let after = Cpu::read(serve_pid, worker_pid);
    let batches = Batches::scrape(&http, metrics)
        .await?
        .since(&batches_before);
    let sql = match &statements {
        Some(s) => s.read().await,
        None => Vec::new(),
    };
    let _ = serve.start_kill();
    let _ = worker.start_kill();
    store.close().await;

    let offered = rate.map_or_else(String::new, |r| format!(" at {r} submits/s"));
    println!(
        "sluice bench cost: {jobs} jobs, {clients} clients{offered}, one serve and one worker process"
    );
    println!(
        "  end to end                {seconds:.2} s ({:.0} jobs/s)",
        jobs as f64 / seconds
    );
    println!(
        "  202 p50 / p99             {:.2} / {:.2} ms",
        crate::throughput::percentile(&mut latencies, 0.50) * 1e3,
        crate::throughput::percentile(&mut latencies, 0.99) * 1e3
    );
    println!("{disk_writes}");
    println!("  CPU per job (user + system, microseconds)");
    let per_job = |ticks: Option<u64>| {
        ticks.map_or_else(
            || "unknown".to_owned(),
            |t| format!("{:.0}", t as f64 / TICKS_PER_SEC * 1e6 / jobs as f64),
        )
    };
    for (name, b, a) in [
        ("sluice serve", before.serve, after.serve),
        ("sluice worker", before.worker, after.worker),
        (
            "PostgreSQL (all processes)",
            before.postgres,
            after.postgres,
        ),
        ("RabbitMQ (beam.smp)", before.rabbitmq, after.rabbitmq),
    ] {
        let delta = b.zip(a).map(|(b, a)| a.saturating_sub(b));
        println!("    {name:<28} {:>8}", per_job(delta));
    }
    batches.print(jobs);
    if statements.is_none() {
        println!(
            "  SQL: pg_stat_statements is not installed in this database \
             (shared_preload_libraries = 'pg_stat_statements', then CREATE EXTENSION pg_stat_statements)"
        );
        return Ok(());
    }
    let total_calls: i64 = sql.iter().map(|s| s.calls).sum();
    let total_rows: i64 = sql.iter().map(|s| s.rows).sum();
    let total_wal: f64 = sql.iter().map(|s| s.wal_bytes).sum();
    let total_ms: f64 = sql.iter().map(|s| s.exec_ms).sum();
    let n = jobs as f64;
    println!(
        "  SQL per job: {:.2} statements, {:.2} rows, {:.0} WAL bytes, {:.0} us executing",
        total_calls as f64 / n,
        total_rows as f64 / n,
        total_wal / n,
        total_ms * 1000.0 / n
    );
    println!("    statements/job  rows/job  WAL B/job  us/job  statement");
    for s in sql.iter().filter(|s| s.calls as f64 / n >= 0.001) {
        println!(
            "    {:>13.3} {:>9.2} {:>10.0} {:>7.0}  {}",
            s.calls as f64 / n,
            s.rows as f64 / n,
            s.wal_bytes / n,
            s.exec_ms * 1000.0 / n,
            s.query
        );
    }
    Ok(())
}

/// `jobs` submissions from `clients` clients (at `rate` per second when given), all answered
/// `202`; the seconds each took.
async fn submit(
    http: &reqwest::Client,
    api: &str,
    keys: &[String],
    jobs: usize,
    clients: usize,
    label: &str,
    rate: Option<f64>,
) -> anyhow::Result<Vec<f64>> {
    let accepted = Arc::new(AtomicUsize::new(0));
    let offer = crate::common::Offer {
        jobs,
        clients,
        label: &format!("cost {label}"),
        rate,
        temperature: None,
    };
    let mut set = crate::common::spawn_submitters(http, api, keys, offer, &accepted);
    let mut latencies = Vec::with_capacity(jobs);
    while let Some(outcome) = set.join_next().await {
        latencies.append(&mut outcome.context("a client panicked")??);
    }
    Ok(latencies)
}

/// What one run offers.
#[derive(Clone, Copy)]
struct Load {
    jobs: usize,
    clients: usize,
    rate: Option<f64>,
}

/// Wait until `jobs` jobs finished: first until the simulator has had as many calls (free to
/// read), then by counting in the store, which scans the jobs table and would add to the cost
/// being measured if it were polled throughout.
async fn wait_finished(
    store: &sluice_store::Store,
    sim: &sluice_sim::SimHandle,
    jobs: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        if sim.stats().total >= jobs as u64 && store.finished_count().await? >= jobs as i64 {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the jobs did not finish within 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU ticks spent so far by each party; `None` where it cannot be read.
struct Cpu {
    serve: Option<u64>,
    worker: Option<u64>,
    postgres: Option<u64>,
    rabbitmq: Option<u64>,
}

impl Cpu {
    fn read(serve: u32, worker: u32) -> Cpu {
        let mut postgres = None;
        let mut rabbitmq = None;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Some(stat) = Stat::read(pid) else {
                    continue;
                };
                match stat.comm.as_str() {
                    // Backends that exited during the run are in the postmaster's reaped time.
                    "postgres" => {
                        *postgres.get_or_insert(0) += stat.own + stat.children;
                    }
                    "beam.smp" => *rabbitmq.get_or_insert(0) += stat.own,
                    _ => {}
                }
            }
        }
        Cpu {
            serve: Stat::read(serve).map(|s| s.own),
            worker: Stat::read(worker).map(|s| s.own),
            postgres,
            rabbitmq,
        }
    }
}

/// What `/proc/<pid>/stat` says of a process's CPU.
struct Stat {
    comm: String,
    /// utime + stime.
    own: u64,
    /// cutime + cstime: children it has waited for.
    children: u64,
}

impl Stat {
    fn read(pid: u32) -> Option<Stat> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name is in parentheses and may hold spaces; the fields follow it.
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_owned();
        let fields: Vec<&str> = text.get(close + 2..)?.split(' ').collect();
        // Fields 14-17 of proc(5), counted from 1 with pid and comm as 1 and 2.
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
        Some(Stat {
            comm,
            own: field(14)? + field(15)?,
            children: field(16)? + field(17)?,
        })
    }
}

/// One statement's totals from `pg_stat_statements`.
struct Statement {
    calls: i64,
    rows: i64,
    wal_bytes: f64,
    exec_ms: f64,
    query: String,
}

/// `pg_stat_statements`, reset at the start of the measured run.
struct Statements {
    pool: sqlx::PgPool,
}

impl Statements {
    async fn reset(url: &str) -> Option<Statements> {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await
            .ok()?;
        sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&pool)
            .await
            .ok()?;
        Some(Statements { pool })
    }

    async fn read(&self) -> Vec<Statement> {
        let rows: Vec<(i64, i64, f64, f64, String)> = sqlx::query_as(
            "SELECT calls, rows, wal_bytes::float8, total_exec_time,
                    left(regexp_replace(query, '\\s+', ' ', 'g'), 90)
             FROM pg_stat_statements
             WHERE query NOT LIKE '%pg_stat_statements%'
             ORDER BY calls DESC",
        )
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        rows.into_iter()
            .map(|(calls, rows, wal_bytes, exec_ms, query)| Statement {
                calls,
                rows,
                wal_bytes,
                exec_ms,
                query,
            })
            .collect()
    }
}

/// The batched statements' histograms (`sluice_store_batch_*`) summed over the processes'
/// `/metrics`: by statement, the batches, their seconds, their oldest items' waits and items.
#[derive(Default)]
struct Batches(std::collections::BTreeMap<String, [f64; 4]>);

impl Batches {
    async fn scrape(http: &reqwest::Client, urls: &[String]) -> anyhow::Result<Batches> {
        // In the order of the figures each statement keeps: batches, seconds, waits, items.
        let series = [
            format!("{BATCH_ITEMS}_count"),
            format!("{BATCH_SECONDS}_sum"),
            format!("{BATCH_WAIT_SECONDS}_sum"),
            format!("{BATCH_ITEMS}_sum"),
        ];
        let mut batches = Batches::default();
        for url in urls {
            let text = http
                .get(url)
                .send()
                .await
                .and_then(reqwest::Response::error_for_status)
                .with_context(|| format!("cannot read {url}"))?
                .text()
                .await?;
            for line in text.lines() {
                let Some((name, rest)) = line.split_once("{statement=\"") else {
                    continue;
                };
                let Some(i) = series.iter().position(|s| s == name) else {
                    continue;
                };
                let Some((statement, value)) = rest.split_once("\"} ") else {
                    continue;
                };
                let value: f64 = value.trim().parse().unwrap_or(0.0);
                batches.0.entry(statement.to_owned()).or_default()[i] += value;
            }
        }
        Ok(batches)
    }

    fn since(mut self, before: &Batches) -> Batches {
        for (statement, figures) in &mut self.0 {
            if let Some(earlier) = before.0.get(statement) {
                for (now, then) in figures.iter_mut().zip(earlier) {
                    *now -= then;
                }
            }
        }
        self
    }

    fn print(&self, jobs: usize) {
        println!("  batched statements (from the processes' /metrics)");
        println!("    statement       per job  jobs each   ms each  oldest waited ms");
        for (statement, [count, seconds, waited, items]) in &self.0 {
            if *count < 1.0 {
                continue;
            }
            println!(
                "    {statement:<14} {:>8.3} {:>10.1} {:>9.2} {:>17.2}",
                count / jobs as f64,
                items / count,
                seconds / count * 1e3,
                waited / count * 1e3,
            );
        }
    }
}
