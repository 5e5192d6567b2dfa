//! What the benchmarks share: the `sluice` binary built beside this one, an instant simulator,
//! one API key per tier, and HTTP clients that submit N jobs.

use anyhow::{bail, Context};
use sluice_core::{Principal, Tier};
use sluice_store::Store;
use sluice_testkit::ScratchDb;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// The `sluice` executable beside this one, which the benchmarks run as child processes.
pub fn sluice_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name(format!("sluice{}", std::env::consts::EXE_SUFFIX));
    if !exe.exists() {
        bail!(
            "{} is missing: build it first (cargo build --release --bin sluice)",
            exe.display()
        );
    }
    Ok(exe)
}

/// A fresh PostgreSQL schema on `url` for one run, and its name; the schema is dropped when the
/// returned `ScratchDb` drops, whatever happens.
pub fn scratch_schema(url: &str) -> anyhow::Result<(ScratchDb, String)> {
    let scratch = ScratchDb::postgres_at(url, "bench");
    let schema = scratch
        .schema()
        .context("a PostgreSQL scratch database has a schema")?
        .to_owned();
    Ok((scratch, schema))
}

/// A simulator in this process with no latency and no limit: what is measured is Sluice.
pub async fn instant_simulator() -> anyhow::Result<sluice_sim::SimHandle> {
    sluice_sim::spawn(
        sluice_sim::SimConfig {
            default_rpm: 0,
            ..Default::default()
        },
        ([127, 0, 0, 1], 0).into(),
    )
    .await
    .context("cannot start the simulator")
}

/// One API key per tier, tenants `bench-{tier}`, so the jobs spread over the tier lanes.
pub async fn tier_keys(store: &Store) -> anyhow::Result<Vec<String>> {
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
    Ok(keys)
}

/// What submitters offer: `jobs` jobs from `clients` clients, prompts `"{label} {n}"`, at
/// `rate` per second when given ([`on_schedule`]), with this `temperature` when given (a
/// deterministic request is looked up in the exact cache and stored with its hash).
#[derive(Debug, Clone, Copy)]
pub struct Offer<'a> {
    pub jobs: usize,
    pub clients: usize,
    pub label: &'a str,
    pub rate: Option<f64>,
    pub temperature: Option<f64>,
}

/// Clients submitting `offer` to `{api}/v1/jobs` between them, keys in turn, each job counted in
/// `accepted` once answered `202`. Each client answers the seconds its submissions took to be
/// answered.
pub fn spawn_submitters(
    http: &reqwest::Client,
    api: &str,
    keys: &[String],
    offer: Offer<'_>,
    accepted: &Arc<AtomicUsize>,
) -> JoinSet<anyhow::Result<Vec<f64>>> {
    let Offer {
        jobs,
        clients,
        label,
        rate,
        temperature,
    } = offer;
    let url = format!("{api}/v1/jobs");
    let keys = Arc::new(keys.to_vec());
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let (http, url, keys, next, accepted, label) = (
            http.clone(),
            url.clone(),
            Arc::clone(&keys),
            Arc::clone(&next),
            Arc::clone(accepted),
            label.to_owned(),
        );
        set.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return Ok(latencies);
                }
                let mut body = serde_json::json!({
                    "model": "default",
                    "messages": [{"role": "user", "content": format!("{label} {n}")}],
                });
                if let Some(t) = temperature {
                    body["temperature"] = serde_json::json!(t);
                }
                let sent = on_schedule(started, n, rate).await;
                submit_one(&http, &url, &keys[n % keys.len()], &body).await?;
                latencies.push(sent.elapsed().as_secs_f64());
                accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    set
}

/// KiB the whole machine has written to block devices since boot (`pgpgout` in
/// `/proc/vmstat`), or `None` where that cannot be read. Every commit's WAL flush waits behind
/// the writeback of whatever else is dirty, so a run's share of it explains a slow `202` tail.
pub fn disk_written_kib() -> Option<u64> {
    let vmstat = std::fs::read_to_string("/proc/vmstat").ok()?;
    vmstat
        .lines()
        .find_map(|line| line.strip_prefix("pgpgout "))
        .and_then(|kib| kib.trim().parse().ok())
}

/// The line the benches print under the `202`: what the machine wrote to disk since `before`.
pub fn disk_writes_line(before: Option<u64>) -> String {
    match (before, disk_written_kib()) {
        (Some(before), Some(after)) => format!(
            "  disk writes, whole machine {:.1} MB (others' writeback delays each commit, so the 202)",
            after.saturating_sub(before) as f64 / 1024.0
        ),
        _ => "  disk writes, whole machine unknown (no /proc/vmstat)".to_owned(),
    }
}

/// Refuse a `--rate` that is not a positive, finite number of submissions per second.
pub fn check_rate(rate: Option<f64>) -> anyhow::Result<()> {
    if rate.is_some_and(|r| !(r.is_finite() && r > 0.0)) {
        bail!("--rate must be a positive number of submissions per second");
    }
    Ok(())
}

/// Wait until submission `n` is due at `rate` per second from `started` (at once without a
/// rate), and answer the instant its latency counts from.
pub async fn on_schedule(started: Instant, n: usize, rate: Option<f64>) -> Instant {
    let Some(rate) = rate else {
        return Instant::now();
    };
    let due = started + Duration::from_secs_f64(n as f64 / rate);
    if Instant::now() < due {
        // On time: counted from when it is sent (the timer wakes up to a millisecond late,
        // which is the bench's, not the server's).
        tokio::time::sleep_until(due.into()).await;
        Instant::now()
    } else {
        // Late because the previous request was slow: counted from when it was due, so the
        // wait it caused is not hidden.
        due
    }
}

/// POST one job to `url` with `key`; an error unless it is answered `202`.
pub async fn submit_one(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let response = http
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .context("cannot submit a job")?;
    if response.status() != reqwest::StatusCode::ACCEPTED {
        bail!("submit answered {}", response.status());
    }
    Ok(())
}
