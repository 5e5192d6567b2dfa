//! Sluice's durable state on PostgreSQL: jobs and their event log, API keys, and the outbox
//! that ties every lane message to the transaction that made it necessary.
//!
//! Every state change is one conditional statement fenced by the job's `attempt`,
//! so a redelivered or stale message can never overwrite a newer outcome.

mod batch;
mod events;
mod jobs;
mod keys;
mod lifecycle;
mod notifications;
mod outbox;
mod stats;
#[cfg(feature = "testing")]
pub mod testing;
mod writer;

pub use batch::Batcher;
pub use events::OwnedEvent;
pub use jobs::{CancelOutcome, Ingested, JobEvent, JobRecord, NewJob};
pub use keys::{hash_key, new_api_key, KEY_PREFIX};
pub use lifecycle::{Claim, Completion, DeadJob, Failure};
pub use notifications::{Notification, NotificationRow, NotificationState};
pub use outbox::OutboxMessage;
pub use stats::LaneWait;
pub use writer::JobWriter;

use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Where the database is and how to use it.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    /// Postgres schema holding Sluice's tables; created if missing. Tests use one per run.
    pub schema: Option<String>,
    pub max_connections: u32,
    /// Apply pending migrations at start.
    pub migrate: bool,
    /// Shown in `pg_stat_activity`, so operators can tell Sluice's connections apart.
    pub application_name: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            schema: None,
            max_connections: 16,
            migrate: true,
            application_name: "sluice".into(),
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &redact_url(&self.url))
            .field("schema", &self.schema)
            .field("max_connections", &self.max_connections)
            .field("migrate", &self.migrate)
            .field("application_name", &self.application_name)
            .finish()
    }
}

/// Hide the password of a `scheme://user:password@host` URL.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:[redacted]{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid schema name {0:?}: use lowercase letters, digits and underscores")]
    InvalidSchema(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("the job writer has stopped")]
    WriterStopped,
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

fn valid_schema(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

impl Store {
    /// Connect, create the schema if one is named, and migrate when configured to.
    pub async fn connect(config: &StoreConfig) -> Result<Store, StoreError> {
        let mut options =
            PgConnectOptions::from_str(&config.url)?.application_name(&config.application_name);
        if let Some(schema) = &config.schema {
            if !valid_schema(schema) {
                return Err(StoreError::InvalidSchema(schema.clone()));
            }
            // DDL cannot take bind parameters; the name was checked above.
            let admin = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await?;
            admin
                .execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
                .await?;
            admin.close().await;
            options = options.options([("search_path", schema.as_str())]);
        }
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        let store = Store { pool };
        if config.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Apply pending migrations from `migrations/postgres`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    /// Drop a schema and everything in it (test clean-up).
    pub async fn drop_schema(&self, schema: &str) -> Result<(), StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::InvalidSchema(schema.to_owned()));
        }
        self.pool
            .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
            .await?;
        Ok(())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:[redacted]@h:5432/db"
        );
        assert_eq!(redact_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(valid_schema("sluice_test_1"));
        assert!(!valid_schema("x; DROP TABLE jobs"));
        assert!(!valid_schema("1abc"));
        assert!(!valid_schema(""));
    }
}
