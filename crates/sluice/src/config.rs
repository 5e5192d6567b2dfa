//! Configuration: a TOML file (`sluice.toml` by default) overridden by `SLUICE_*` environment
//! variables, e.g. `SLUICE_LISTEN` or `SLUICE_DATABASE__URL` (double underscore for nesting).

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use sluice_broker::rabbitmq::RabbitConfig;
use sluice_core::TierLanes;
use sluice_providers::PoolConfig;
use sluice_store::StoreConfig;
use sluice_worker::WorkerConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// The whole configuration of a Sluice deployment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub database: StoreConfig,
    #[serde(default = "default_rabbitmq")]
    pub rabbitmq: RabbitConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Tier -> lane.
    #[serde(default)]
    pub tiers: TierLanes,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Model alias -> pool name.
    #[serde(default)]
    pub routes: BTreeMap<String, String>,
    #[serde(default)]
    pub sim: SimSection,
}

/// `sluice sim` settings: where it listens and how it behaves.
#[derive(Debug, Deserialize, Serialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct SimSection {
    pub listen: Option<SocketAddr>,
    #[serde(flatten)]
    pub config: sluice_sim::SimConfig,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

fn default_rabbitmq() -> RabbitConfig {
    RabbitConfig {
        url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
        prefix: "sluice".into(),
    }
}

/// The file used when none is named: `sluice.toml` in the working directory, if present.
pub const DEFAULT_PATH: &str = "sluice.toml";

impl Config {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::new();
        match path {
            Some(p) => {
                if !p.exists() {
                    bail!("config file {} does not exist", p.display());
                }
                figment = figment.merge(Toml::file(p));
            }
            None => {
                if Path::new(DEFAULT_PATH).exists() {
                    figment = figment.merge(Toml::file(DEFAULT_PATH));
                }
            }
        }
        let figment = figment
            .merge(
                Env::prefixed("SLUICE_")
                    .split("__")
                    .ignore(&["config", "api_url", "api_key", "log"]),
            )
            .join(Serialized::default("listen", default_listen()));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for (alias, pool) in &self.routes {
            if !self.pools.iter().any(|p| &p.name == pool) {
                bail!("route {alias:?} names pool {pool:?}, which is not configured");
            }
        }
        Ok(())
    }
}
