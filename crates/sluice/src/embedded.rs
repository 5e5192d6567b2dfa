//! `sluice dev` and `sluice serve --embedded`: the whole system in one process on one SQLite
//! file (store and SQL queue), with the in-process event bus and limiter; no service to run.
//!
//! `dev` also starts the provider simulator when no real provider is configured, and keeps a
//! ready-made API key next to the data file so the same key works after a restart.

use crate::config::{Config, QueueBackend};
use crate::stack;
use anyhow::{bail, Context};
use sluice_core::{Principal, Tier};
use sluice_notify::EventBus;
use sluice_outbox::{Publisher, RelayConfig};
use sluice_providers::{EndpointConfig, PoolConfig, Secret};
use sluice_store::{Store, StoreConfig};
use sluice_worker::Worker;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Where the embedded mode keeps its data unless told otherwise.
pub const DEFAULT_DATA: &str = "sluice-data/sluice.db";

/// What to run besides the API and a worker.
pub struct Embedded {
    /// The SQLite file holding every job and the lanes.
    pub data: PathBuf,
    /// Start the simulator for pools that point at it (or a default pool when none is set).
    pub simulator: bool,
    /// Listen here instead of the config's `listen`.
    pub listen: Option<SocketAddr>,
}

/// The dev key lives beside the data file: keys are stored hashed, so the store alone could
/// not show it again after a restart.
fn key_path(data: &Path) -> PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(".key");
    PathBuf::from(name)
}

/// The config the embedded mode runs on: the user's pools, routes, tiers and limits, with the
/// database, lanes and bus replaced by the SQLite file and in-process parts.
fn embedded_config(mut config: Config, options: &Embedded) -> Config {
    config.database = StoreConfig {
        url: format!("sqlite://{}", options.data.display()),
        schema: None,
        ..config.database
    };
    config.queue.backend = QueueBackend::Sql;
    config.redis = None;
    if let Some(listen) = options.listen {
        config.listen = listen;
    }
    config
}

/// Whether `endpoint` is served by the simulator listening on `sim`.
fn points_at(endpoint: &EndpointConfig, sim: SocketAddr) -> bool {
    let base = endpoint.base_url.trim_end_matches('/');
    [
        format!("http://{sim}"),
        format!("http://localhost:{}", sim.port()),
    ]
    .iter()
    .any(|prefix| base == prefix || base.starts_with(&format!("{prefix}/")))
}

/// Start the simulator if the config needs it: where the pools expect it, or on a free port
/// with a `default` route to it when no pool is configured at all.
async fn start_simulator(config: &mut Config) -> anyhow::Result<Option<sluice_sim::SimHandle>> {
    let sim_config = config.sim.config.clone();
    if config.pools.is_empty() {
        let endpoint = |url| dev_endpoint(&sim_config, url);
        let sim = sluice_sim::spawn(sim_config.clone(), ([127, 0, 0, 1], 0).into())
            .await
            .context("cannot start the provider simulator")?;
        config.pools = vec![PoolConfig {
            name: "sim".into(),
            endpoints: vec![endpoint(sim.base_url())],
        }];
        config.routes = BTreeMap::from([("default".to_owned(), "sim".into())]);
        return Ok(Some(sim));
    }
    let addr = config
        .sim
        .listen
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9000)));
    let wanted = config
        .pools
        .iter()
        .flat_map(|p| &p.endpoints)
        .any(|e| points_at(e, addr));
    if !wanted {
        return Ok(None);
    }
    let sim = sluice_sim::spawn(sim_config, addr)
        .await
        .with_context(|| format!("cannot start the provider simulator on {addr}"))?;
    Ok(Some(sim))
}

/// The dev pool's one endpoint on the simulator: the simulator's own key and rate, so the pool
/// never sends more than the simulator allows (no 429s in a plain `sluice dev` run).
fn dev_endpoint(sim: &sluice_sim::SimConfig, base_url: String) -> EndpointConfig {
    // Without configured keys the simulator takes any key, each with `default_rpm`.
    let (key, rpm) = match sim.keys.first() {
        Some(k) => (k.key.clone(), k.rpm.unwrap_or(sim.default_rpm)),
        None => ("sk-sim-dev".to_owned(), sim.default_rpm),
    };
    // 0 means the simulator does not limit: the pool still needs a rate.
    let rpm = if rpm == 0 { UNLIMITED_SIM_RPM } else { rpm };
    let mut endpoint = EndpointConfig::new("sim-1", base_url, "sim-model", rpm);
    endpoint.api_key = Some(Secret::new(key));
    // The simulator's bucket holds max(1, rpm / 60 x burst_seconds) requests; `burst` counts
    // those beyond the first.
    let capacity = (f64::from(rpm) / 60.0 * sim.burst_seconds).floor().max(1.0);
    // In 1..=rpm x burst_seconds, a finite positive float: the cast cannot wrap.
    endpoint.burst = Some(capacity.min(f64::from(u32::MAX)) as u32 - 1);
    endpoint
}

/// The dev pool's rate when the simulator limits nothing.
const UNLIMITED_SIM_RPM: u32 = 60_000;

/// The key printed at start: the one saved beside the data file if it still works, else a new
/// one (tenant and user `dev`, tier `pro`), saved for next time.
async fn dev_key(store: &Store, data: &Path) -> anyhow::Result<String> {
    let path = key_path(data);
    if let Some(saved) = saved_key(&path) {
        if store.principal_for_key(&saved).await?.is_some() {
            return Ok(saved);
        }
        tracing::warn!(message = "the saved dev key is not in this data file; making a new one", path = %path.display());
    }
    let key = store
        .create_api_key(&Principal {
            tenant: "dev".into(),
            user: "dev".into(),
            tier: Tier::Pro,
            email: None,
            reuse_samples: false,
        })
        .await
        .context("cannot create the dev API key")?;
    write_private(&path, &key)
        .with_context(|| format!("cannot save the key to {}", path.display()))?;
    Ok(key)
}

/// The admin key the dashboard's URL carries, saved beside the data file like the dev key.
async fn dev_admin_key(store: &Store, data: &Path) -> anyhow::Result<String> {
    let mut name = data.as_os_str().to_owned();
    name.push(".admin-key");
    let path = PathBuf::from(name);
    if let Some(saved) = saved_key(&path) {
        if store.admin_for_key(&saved).await?.is_some() {
            return Ok(saved);
        }
        tracing::warn!(message = "the saved admin key is not in this data file; making a new one", path = %path.display());
    }
    let key = store
        .create_admin_key("dev")
        .await
        .context("cannot create the dev admin key")?;
    write_private(&path, &key)
        .with_context(|| format!("cannot save the admin key to {}", path.display()))?;
    Ok(key)
}

/// With `[mail]` but no `link_secret`: the one saved beside the data file, or a new one saved
/// there, so links from earlier emails still open after a restart. One process owns the file,
/// so its mailer and API always agree.
fn dev_link_secret(config: &mut Config, data: &Path) -> anyhow::Result<()> {
    let Some(mail) = config.mail.as_mut().filter(|m| m.link_secret.is_none()) else {
        return Ok(());
    };
    let mut name = data.as_os_str().to_owned();
    name.push(".link-secret");
    let path = PathBuf::from(name);
    let secret = match saved_key(&path) {
        Some(saved) => saved,
        None => {
            let secret = sluice_notify::link::generate_secret();
            write_private(&path, &secret).with_context(|| {
                format!("cannot save the result-link secret to {}", path.display())
            })?;
            secret
        }
    };
    mail.link_secret = Some(secret);
    Ok(())
}

/// The key saved at `path`, if there is one.
fn saved_key(path: &Path) -> Option<String> {
    let saved = std::fs::read_to_string(path).ok()?;
    Some(saved.trim().to_owned()).filter(|k| !k.is_empty())
}

/// Take `<data>.lock` for this process, or fail if another process holds it: the embedded
/// mode's recovery at start assumes no other worker runs on the file.
fn own_data_file(data: &Path) -> anyhow::Result<std::fs::File> {
    let path = PathBuf::from(format!("{}.lock", data.display()));
    let mut options = std::fs::OpenOptions::new();
    options.create(true).truncate(false).write(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another sluice process is running on {}: one process owns an embedded data file \
             (stop it, or pass --data for another file)",
            data.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// What a killed process held comes back now, not after its timeouts: this process owns the
/// file, so no other consumer or worker can still be working on it.
async fn recover(config: &Config, store: &Store) -> anyhow::Result<()> {
    let Some(pool) = store.sqlite_pool() else {
        return Ok(());
    };
    let queue = sluice_sqlqueue::SqlQueue::sqlite(pool.clone(), config.queue.sql.clone())
        .context("invalid [queue.sql] section")?;
    let messages = queue
        .release_claims()
        .await
        .context("cannot release the lane messages a previous process took")?;
    let jobs = store
        .expire_leases()
        .await
        .context("cannot end the leases of a previous process's running jobs")?;
    if messages > 0 || jobs > 0 {
        tracing::info!(
            message = "recovered what a previous process held",
            lane_messages = messages,
            running_jobs = jobs
        );
    }
    Ok(())
}

/// Write a secret readable by its owner only.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    writeln!(file, "{text}")?;
    file.sync_all()
}

/// Run api, worker, outbox relay, mailer (with `[mail]`) and, for `dev`, the simulator, until
/// `shutdown`.
pub async fn run(
    config: Config,
    options: Embedded,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(dir) = options.data.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the data directory {}", dir.display()))?;
    }
    // Held until the process ends (the OS lets go of it on kill -9 too).
    let _owner = own_data_file(&options.data)?;
    let mut config = embedded_config(config, &options);
    dev_link_secret(&mut config, &options.data)?;
    let sim = if options.simulator {
        start_simulator(&mut config).await?
    } else {
        None
    };
    if config.routes.is_empty() {
        bail!("no routes configured: add [[pools]] and [routes] (or use `sluice dev`, which starts a simulator)");
    }
    // One bus for the API's hub and the worker: events and deltas go straight across.
    let bus = EventBus::local();
    let store = stack::announcing_store(&config, true, &bus).await?;
    let (broker, store) = stack::broker_with_store(&config, store).await?;
    recover(&config, &store).await?;
    let publisher = Publisher::new(store.clone(), broker);
    let relay = sluice_outbox::spawn_relay(
        store.clone(),
        publisher.clone(),
        RelayConfig::default(),
        shutdown.clone(),
    );
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let addr = listener.local_addr()?;
    let state = stack::api_state(
        &config,
        store.clone(),
        publisher.clone(),
        bus.clone(),
        stack::hub_poll(true),
        shutdown.clone(),
        config.mail.as_ref().and_then(|m| m.link_secret.as_deref()),
    )?;
    let api = tokio::spawn(sluice_api::serve(
        listener,
        state,
        config.http.clone(),
        shutdown.clone(),
    ));

    let router = stack::router(&config).await?;
    let worker = Worker::new(
        store.clone(),
        publisher.clone(),
        router,
        config.worker.clone(),
        bus,
    )?;
    let mail_stop = shutdown.child_token();
    let mailer = match &config.mail {
        Some(mail) => {
            let mailer = sluice_notify::Mailer::new(store.clone(), mail.clone())
                .context("cannot set up the mailer from [mail]")?;
            Some(tokio::spawn(mailer.run(mail_stop.clone())))
        }
        None => None,
    };

    let key = dev_key(&store, &options.data).await?;
    let admin = dev_admin_key(&store, &options.data).await?;
    // Scripts and tests read these lines.
    println!("sluice api listening on http://{addr}");
    println!("data: {}", options.data.display());
    // The key is in the fragment, which the browser keeps to itself (no request carries it).
    println!("dashboard: http://{addr}/dashboard#key={admin}");
    println!("api key: {key}");
    if let Some(sim) = &sim {
        println!("provider simulator: {}", sim.base_url());
    }
    println!(
        "try: curl -H 'Authorization: Bearer {key}' -H 'content-type: application/json' \
         -d '{{\"model\":\"default\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello\"}}]}}' \
         http://{addr}/v1/jobs"
    );

    let result = worker
        .run(shutdown.clone())
        .await
        .context("the worker failed");
    shutdown.cancel();
    mail_stop.cancel();
    if let Some(mailer) = mailer {
        let _ = mailer.await;
    }
    match api.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(message = "the API server failed", %error),
        Err(error) => tracing::error!(message = "the API task failed", %error),
    }
    let _ = relay.await;
    publisher.settle().await;
    if let Some(sim) = sim {
        sim.shutdown();
    }
    result
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_on_the_simulators_address_are_recognised() {
        let sim: SocketAddr = "127.0.0.1:9000".parse().unwrap();
        let on = |url: &str| points_at(&EndpointConfig::new("e", url, "m", 60), sim);
        assert!(on("http://127.0.0.1:9000"));
        assert!(on("http://127.0.0.1:9000/v1"));
        assert!(on("http://localhost:9000/"));
        assert!(!on("http://127.0.0.1:90001"));
        assert!(!on("https://api.openai.com/v1"));
    }

    #[test]
    fn the_dev_pool_sends_no_more_than_the_simulator_allows() {
        let mut sim = sluice_sim::SimConfig::default();
        let endpoint = dev_endpoint(&sim, "http://127.0.0.1:1".into());
        assert_eq!(endpoint.rpm, sim.default_rpm);
        assert_eq!(
            endpoint.burst,
            Some(9),
            "600 rpm, 1 s bucket: 10 back to back"
        );
        sim.burst_seconds = 0.5;
        assert_eq!(dev_endpoint(&sim, "x".into()).burst, Some(4));
        sim.keys = vec![sluice_sim::SimKey {
            name: "mine".into(),
            key: "sk-mine".into(),
            rpm: Some(120),
        }];
        let endpoint = dev_endpoint(&sim, "http://127.0.0.1:1".into());
        assert_eq!(endpoint.rpm, 120);
        assert_eq!(
            endpoint.api_key.as_ref().map(|k| k.expose().to_owned()),
            Some("sk-mine".to_owned()),
            "a key the simulator accepts"
        );
        sim.keys.clear();
        sim.default_rpm = 0;
        assert_eq!(dev_endpoint(&sim, "x".into()).rpm, UNLIMITED_SIM_RPM);
    }

    #[test]
    fn the_key_file_sits_beside_the_data_file() {
        assert_eq!(
            key_path(Path::new("data/sluice.db")),
            PathBuf::from("data/sluice.db.key")
        );
    }
}
