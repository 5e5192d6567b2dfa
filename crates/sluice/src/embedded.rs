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
        let sim = sluice_sim::spawn(sim_config, ([127, 0, 0, 1], 0).into())
            .await
            .context("cannot start the provider simulator")?;
        let mut endpoint = EndpointConfig::new("sim-1", sim.base_url(), "sim-model", 6_000);
        endpoint.api_key = Some(Secret::new("sk-sim-dev"));
        config.pools = vec![PoolConfig {
            name: "sim".into(),
            endpoints: vec![endpoint],
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

/// The key printed at start: the one saved beside the data file if it still works, else a new
/// one (tenant and user `dev`, tier `pro`), saved for next time.
async fn dev_key(store: &Store, data: &Path) -> anyhow::Result<String> {
    let path = key_path(data);
    if let Ok(saved) = std::fs::read_to_string(&path) {
        let saved = saved.trim().to_owned();
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
    let mut config = embedded_config(config, &options);
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
    let broker = stack::broker(&config, &store).await?;
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
    )?;
    let api = tokio::spawn(sluice_api::serve(listener, state, shutdown.clone()));

    let router = stack::router(&config).await?;
    let worker = Worker::new(store.clone(), publisher, router, config.worker.clone(), bus)?;
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
    // Scripts and tests read these lines.
    println!("sluice api listening on http://{addr}");
    println!("data: {}", options.data.display());
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
    fn the_key_file_sits_beside_the_data_file() {
        assert_eq!(
            key_path(Path::new("data/sluice.db")),
            PathBuf::from("data/sluice.db.key")
        );
    }
}
