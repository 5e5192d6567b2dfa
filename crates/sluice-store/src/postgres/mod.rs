//! The PostgreSQL backend: its pool, connection set-up, schema handling and migrations, and (one
//! module per topic, beside SQLite's in `sqlite/`) the statements written for it alone.

mod admission;
mod batches;
mod events;
mod files;
mod jobs;
mod lifecycle;
mod notifications;
mod outbox;
mod reconcile;
mod stats;

use crate::{valid_schema, StoreConfig, StoreError};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A PostgreSQL connection pool; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct PgBackend {
    pub(crate) pool: PgPool,
    /// Where the batched ingest puts new jobs when the lanes are in this database.
    pub(crate) lanes: Option<Arc<crate::LanesInDatabase>>,
}

impl PgBackend {
    /// Connect, creating the configured schema first if one is named.
    pub(crate) async fn connect(config: &StoreConfig) -> Result<PgBackend, StoreError> {
        // The planner's default page costs assume a spinning disk. With them it chose a scan of
        // the whole jobs table over a few dozen primary-key look-ups for the batched claims once
        // a table had grown past what its statistics said; a job store's rows are hot in memory.
        let mut options = PgConnectOptions::from_str(&config.url)?
            .application_name(&config.application_name)
            .options([("random_page_cost", "1.1")]);
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
        let pool = crate::sql::pool_options::<sqlx::Postgres>()
            .max_connections(config.max_connections.max(2))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await?;
        Ok(PgBackend { pool, lanes: None })
    }

    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations/postgres")
            .run(&self.pool)
            .await?;
        Ok(())
    }

    pub(crate) async fn drop_schema(&self, schema: &str) -> Result<(), StoreError> {
        if !valid_schema(schema) {
            return Err(StoreError::InvalidSchema(schema.to_owned()));
        }
        self.pool
            .execute(format!("DROP SCHEMA IF EXISTS {schema} CASCADE").as_str())
            .await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}
