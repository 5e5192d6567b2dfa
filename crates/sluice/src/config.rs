//! Configuration: a TOML file (`sluice.toml` by default) overridden by `SLUICE_*` environment
//! variables, e.g. `SLUICE_LISTEN` or `SLUICE_DATABASE__URL` (double underscore for nesting).

use anyhow::{bail, Context};
use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use sluice_broker::rabbitmq::RabbitConfig;
use sluice_core::TierLanes;
use sluice_providers::{PoolConfig, PoolOptions, RouteTarget};
use sluice_store::StoreConfig;
use sluice_worker::WorkerConfig;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// The whole configuration of a Sluice deployment.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The API's connection limits and timeouts (`[http]`).
    #[serde(default)]
    pub http: sluice_api::HttpConfig,
    #[serde(default)]
    pub database: StoreConfig,
    /// Which backend holds the lanes, and its settings (`[queue]`).
    #[serde(default)]
    pub queue: QueueSection,
    /// RabbitMQ, when `[queue] backend = "rabbitmq"` (the default).
    #[serde(default = "default_rabbitmq")]
    pub rabbitmq: RabbitConfig,
    #[serde(default)]
    pub worker: WorkerConfig,
    /// Tier -> lane.
    #[serde(default)]
    pub tiers: TierLanes,
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Model alias -> pool name, or a list: the pool, then fallback pools in order.
    #[serde(default)]
    pub routes: BTreeMap<String, RouteTarget>,
    /// How endpoints adapt to 429s and trip their breakers.
    #[serde(default)]
    pub limits: PoolOptions,
    /// Redis, for limits shared by all workers; without it each worker limits alone.
    #[serde(default)]
    pub redis: Option<RedisSection>,
    #[serde(default)]
    pub sim: SimSection,
    /// SMTP for completion emails, sent by every worker's mailer; without it none are sent
    /// (notifications wait in the database until a worker with `[mail]` runs).
    #[serde(default)]
    pub mail: Option<sluice_notify::MailerConfig>,
    /// WebSocket and SSE subscribers: how much may wait for a slow one, and for how long.
    #[serde(default)]
    pub streams: sluice_notify::StreamsConfig,
    /// Answers reused from earlier identical jobs (`[cache]`).
    #[serde(default)]
    pub cache: sluice_admission::CacheConfig,
    /// Per-user and per-tenant request quotas by tier (`[quotas.<tier>]`).
    #[serde(default)]
    pub quotas: sluice_core::QuotaConfig,
    /// Load levels and what each refuses (`[shedding]`).
    #[serde(default)]
    pub shedding: sluice_admission::SheddingConfig,
    /// Tenants' daily budgets in US dollars (`[budgets]`).
    #[serde(default)]
    pub budgets: sluice_admission::BudgetConfig,
    /// Embeddings for routes with `semantic_cache = true` (`[semantic_cache]`).
    #[serde(default)]
    pub semantic_cache: Option<sluice_admission::SemanticCacheConfig>,
    /// How held OpenAI chat completions wait, and what a client's disconnect does (`[openai]`).
    #[serde(default)]
    pub openai: sluice_api::OpenAiConfig,
    /// The Batch API's completion window, per-tenant cap and finalizer pace (`[batches]`).
    #[serde(default)]
    pub batches: sluice_api::BatchConfig,
}

/// The backend the lanes live in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// RabbitMQ, configured by `[rabbitmq]`.
    #[default]
    Rabbitmq,
    /// Amazon SQS (or a compatible server), configured by `[queue.sqs]`.
    Sqs,
    /// A table in the store's own database (PostgreSQL or SQLite), configured by
    /// `[queue.sql]`: no broker to run.
    Sql,
}

/// `[queue]`: where the lanes are.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueSection {
    pub backend: QueueBackend,
    pub sqs: sluice_sqs::SqsConfig,
    pub sql: sluice_sqlqueue::SqlQueueConfig,
}

/// Where Redis is; keys go under `prefix`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSection {
    pub url: String,
    #[serde(default = "default_redis_prefix")]
    pub prefix: String,
}

fn default_redis_prefix() -> String {
    "sluice".into()
}

/// `sluice sim` settings: where it listens and how it behaves.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
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
    RabbitConfig::default()
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
        // Variables read by the client commands and the test suite are not configuration.
        let figment = figment.merge(Env::prefixed("SLUICE_").split("__").filter(|key| {
            let key = key.as_str().to_ascii_lowercase();
            !matches!(
                key.as_str(),
                "config" | "api_url" | "api_key" | "log" | "log_format"
            ) && !key.starts_with("test_")
        }));
        let config: Config = figment.extract().context("invalid configuration")?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        if self.queue.backend == QueueBackend::Sqs {
            self.queue
                .sqs
                .validate()
                .context("invalid [queue.sqs] section")?;
        }
        self.streams
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid [streams] section: {e}"))?;
        if let Some(mail) = &self.mail {
            mail.validate().context("invalid [mail] section")?;
        }
        let sections: [(&str, Result<(), String>); 9] = [
            ("http", self.http.validate()),
            ("rabbitmq", self.rabbitmq.validate()),
            ("batches", self.batches.validate()),
            ("openai", self.openai.validate()),
            ("cache", self.cache.validate()),
            ("quotas", self.quotas.validate()),
            ("shedding", self.shedding.validate()),
            ("budgets", self.budgets.validate()),
            (
                "semantic_cache",
                self.semantic_cache
                    .as_ref()
                    .map_or(Ok(()), |s| s.validate()),
            ),
        ];
        for (section, checked) in sections {
            checked.map_err(|e| anyhow::anyhow!("invalid [{section}] section: {e}"))?;
        }
        let semantic_routes = self
            .routes
            .iter()
            .filter(|(_, t)| t.spec().is_some_and(|s| s.semantic_cache));
        if let (Some((alias, _)), None) = (semantic_routes.clone().next(), &self.semantic_cache) {
            bail!("route {alias:?} sets semantic_cache, but there is no [semantic_cache] section");
        }
        for (alias, target) in &self.routes {
            if target.pools().is_empty() {
                bail!("route {alias:?} names no pool");
            }
            for pool in target.all_pools() {
                if !self.pools.iter().any(|p| p.name == pool) {
                    bail!("route {alias:?} names pool {pool:?}, which is not configured");
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;
    use figment::Jail;

    const EXAMPLE: &str = include_str!("../../../sluice.toml");

    #[test]
    fn the_example_config_loads_with_its_defaults() {
        Jail::expect_with(|jail| {
            jail.create_file("sluice.toml", EXAMPLE)?;
            let config = Config::load(None).unwrap();
            assert_eq!(config.listen, default_listen());
            assert_eq!(
                config.routes.get("default"),
                Some(&RouteTarget::from("sim"))
            );
            assert_eq!(config.pools[0].endpoints.len(), 2);
            assert_eq!(config.sim.config.keys.len(), 2);
            assert_eq!(config.worker.retry.max_attempts, 5);
            assert_eq!(config.http.max_connections, 10_000);
            assert_eq!(config.http.header_read_timeout_secs, 10.0);
            Ok(())
        });
    }

    #[test]
    fn environment_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("sluice.toml", EXAMPLE)?;
            jail.set_env("SLUICE_LISTEN", "127.0.0.1:9999");
            jail.set_env("SLUICE_DATABASE__SCHEMA", "elsewhere");
            jail.set_env("SLUICE_WORKER__CONCURRENCY", "3");
            jail.set_env("SLUICE_TEST_DATABASE_URL", "postgres://ignored");
            jail.set_env("SLUICE_API_KEY", "sk_sluice_ignored");
            let config = Config::load(None).unwrap();
            assert_eq!(config.listen, "127.0.0.1:9999".parse().unwrap());
            assert_eq!(config.database.schema.as_deref(), Some("elsewhere"));
            assert_eq!(config.worker.concurrency, 3);
            Ok(())
        });
    }

    #[test]
    fn without_a_file_the_defaults_apply() {
        Jail::expect_with(|_| {
            let config = Config::load(None).unwrap();
            assert_eq!(config.listen, default_listen());
            assert!(config.routes.is_empty());
            Ok(())
        });
    }

    #[test]
    fn a_mail_section_is_read_and_checked() {
        Jail::expect_with(|jail| {
            jail.create_file(
                "mail.toml",
                "[mail]\nsmtp_host = \"127.0.0.1\"\nsmtp_port = 2525\ntls = \"none\"\n\
                 from = \"Sluice <sluice@example.com>\"\n",
            )?;
            jail.set_env("SLUICE_MAIL__LEASE_SECS", "30");
            let mail = Config::load(Some(Path::new("mail.toml")))
                .unwrap()
                .mail
                .unwrap();
            assert_eq!(mail.smtp_port, Some(2525));
            assert_eq!(mail.lease_secs, 30.0);

            jail.create_file("bad.toml", "[mail]\nfrom = \"nobody\"\n")?;
            let error = Config::load(Some(Path::new("bad.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("[mail]"), "{error:#}");
            Ok(())
        });
    }

    #[test]
    fn bad_configs_are_refused_with_the_reason() {
        Jail::expect_with(|jail| {
            jail.create_file("route.toml", "[routes]\ndefault = \"nowhere\"\n")?;
            let error = Config::load(Some(Path::new("route.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("nowhere"), "{error:#}");

            jail.create_file("typo.toml", "listn = \"127.0.0.1:1\"\n")?;
            let error = Config::load(Some(Path::new("typo.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("listn"), "{error:#}");

            jail.create_file("streams.toml", "[streams]\nbuffer_bytes = 0\n")?;
            let error = Config::load(Some(Path::new("streams.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("streams.buffer"), "{error:#}");

            jail.create_file("http.toml", "[http]\nbody_read_timeout_secs = 0\n")?;
            let error = Config::load(Some(Path::new("http.toml"))).unwrap_err();
            assert!(
                format!("{error:#}").contains("http.body_read_timeout_secs"),
                "{error:#}"
            );

            jail.create_file("pack.toml", "[rabbitmq]\npack = 0\n")?;
            let error = Config::load(Some(Path::new("pack.toml"))).unwrap_err();
            assert!(
                format!("{error:#}").contains("invalid [rabbitmq] section: pack = 0"),
                "{error:#}"
            );

            let error = Config::load(Some(Path::new("missing.toml"))).unwrap_err();
            assert!(format!("{error:#}").contains("does not exist"), "{error:#}");
            Ok(())
        });
    }
}
