//! Sluice's durable state on PostgreSQL or SQLite: jobs and their event log, API keys, the
//! outbox, completion emails, and the files and batches of the OpenAI-compatible API.
//!
//! Every state change is fenced by the job's `attempt`, so a redelivered or stale message can
//! never overwrite a newer outcome, and announced after commit to the hook set with
//! [`Store::announcing`]. [`Store`] has one public API; `StoreConfig.url` picks the backend
//! (`postgres://...` or `sqlite://path/to/file.db`).
//!
//! Each topic module (`jobs`, `lifecycle`, `batches`, ...) holds its types, its part of the
//! public API, its row types (one per result shape, read by both backends through
//! `sqlx::FromRow`) and the statements both backends share, written once with `$n`
//! placeholders (see `sql`). What must differ is side by side in `postgres/` and `sqlite/`,
//! one module per topic with the same name.

// First: its macros are used by the modules after it.
mod sql;

mod admission;
mod announce;
mod batch;
mod batches;
mod events;
mod files;
mod jobs;
mod keys;
mod lanes;
mod lifecycle;
mod notifications;
mod outbox;
mod postgres;
mod reconcile;
mod settings;
mod sqlite;
mod stats;
mod writer;

pub use admission::{LaneStats, SemanticEntry, SettledFollowers};
pub use announce::Announce;
pub use batch::{Batcher, BATCH_ITEMS, BATCH_SECONDS, BATCH_WAIT_SECONDS};
pub use batches::{
    new_batch_id, BatchLine, BatchLineResult, BatchProgress, BatchRecord, BatchStatus, CancelBatch,
    FinishedFile, NewBatch,
};
pub use events::OwnedEvent;
pub use files::{new_file_id, FileRecord, NewFile, SortOrder};
pub use jobs::{Accepted, CancelOutcome, Ingested, JobEvent, JobRecord, NewJob, Reuse};
pub use keys::{hash_key, new_api_key, KeyInfo, KEY_PREFIX};
pub use lanes::LanesInDatabase;
pub use lifecycle::{Claim, Completion, DeadJob, Failure};
pub use notifications::{Notification, NotificationRow, NotificationState, NotificationSubject};
pub use outbox::OutboxMessage;
pub use stats::{EndpointMinute, FinishedBucket, LaneWait, LatencySummary};
pub use writer::JobWriter;

use serde::Deserialize;
use sqlx::{PgPool, SqlitePool};
use std::fmt;
use std::time::Duration;

/// Where the database is and how to use it.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host/db` or `sqlite://path/to/file.db` (the file is created if missing).
    pub url: String,
    /// Postgres schema holding Sluice's tables; created if missing. Tests use one per run.
    /// PostgreSQL only: SQLite keeps everything in its one file, and refuses a schema.
    pub schema: Option<String>,
    /// Pool size. On SQLite this sizes the read pool: writes always share one connection.
    pub max_connections: u32,
    /// Apply pending migrations at start.
    pub migrate: bool,
    /// Shown in `pg_stat_activity`, so operators can tell Sluice's connections apart
    /// (PostgreSQL only).
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

/// Delete a SQLite database file with its `-wal`, `-shm` and `-journal` companions. Missing
/// files are fine; the first other error is returned after trying them all.
pub fn remove_sqlite_files(path: &std::path::Path) -> std::io::Result<()> {
    let mut first_error = None;
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::remove_file(&file) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                first_error.get_or_insert(error);
            }
            _ => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Kept at this path for callers that hide the database URL (the one rule for every URL is in
/// `sluice_core`).
pub use sluice_core::redact_url;

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
    /// The row an operation needs is not there, or not in the state it needs (e.g. a chunk
    /// appended to a file that is no longer uploading).
    #[error("not found: {0}")]
    NotFound(String),
    /// The caller asked for something the store refuses whatever the data (e.g. a batch
    /// finished with a status that is not an end).
    #[error("invalid request to the store: {0}")]
    Invalid(String),
    #[error("the job writer has stopped")]
    WriterStopped,
    /// The operation has no meaning on this backend (e.g. schemas on SQLite).
    #[error("{operation} is not supported on {backend}")]
    Unsupported {
        operation: &'static str,
        backend: Backend,
    },
    #[error("unsupported database URL {0:?}: use postgres://... or sqlite://path/to/file.db")]
    UnsupportedUrl(String),
    /// The SQLite file could not be created.
    #[error("cannot create the database file {path}: {source}")]
    CreateFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Which database a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Postgres => "PostgreSQL",
            Backend::Sqlite => "SQLite",
        })
    }
}

impl Backend {
    /// The backend a URL names, from its scheme.
    pub fn for_url(url: &str) -> Result<Backend, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(StoreError::UnsupportedUrl(redact_url(url)))
        }
    }
}

/// Handle to the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// Told of every job a method changes (see [`Store::announcing`]).
    announcer: announce::Announcer,
}

/// The connection pools of the backend in use.
#[derive(Clone, Debug)]
enum Db {
    Postgres(postgres::PgBackend),
    Sqlite(sqlite::SqliteBackend),
}

/// Schema names go into DDL text, so only plain lowercase identifiers are allowed.
pub(crate) use sluice_core::valid_identifier as valid_schema;

impl Store {
    /// Connect to the database `config.url` names, create the schema if one is named
    /// (PostgreSQL only), and migrate when configured to.
    pub async fn connect(config: &StoreConfig) -> Result<Store, StoreError> {
        let db = match Backend::for_url(&config.url)? {
            Backend::Postgres => Db::Postgres(postgres::PgBackend::connect(config).await?),
            Backend::Sqlite => Db::Sqlite(sqlite::SqliteBackend::connect(config).await?),
        };
        let store = Store {
            db,
            announcer: announce::Announcer::default(),
        };
        if config.migrate {
            store.migrate().await?;
        }
        Ok(store)
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        match &self.db {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Apply pending migrations from `migrations/postgres` or `migrations/sqlite`.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match &self.db {
            Db::Postgres(pg) => pg.migrate().await,
            Db::Sqlite(lite) => lite.migrate().await,
        }
    }

    /// Drop a schema and everything in it (test clean-up). PostgreSQL only: on SQLite this
    /// answers [`StoreError::Unsupported`]; delete the database file instead.
    pub async fn drop_schema(&self, schema: &str) -> Result<(), StoreError> {
        match &self.db {
            Db::Postgres(pg) => pg.drop_schema(schema).await,
            Db::Sqlite(_) => Err(StoreError::Unsupported {
                operation: "dropping a schema",
                backend: Backend::Sqlite,
            }),
        }
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        match &self.db {
            Db::Postgres(pg) => pg.ping().await,
            Db::Sqlite(lite) => lite.ping().await,
        }
    }

    /// Close every connection; waits for those in use to be returned.
    pub async fn close(&self) {
        match &self.db {
            Db::Postgres(pg) => pg.pool.close().await,
            Db::Sqlite(lite) => lite.close().await,
        }
    }

    /// The PostgreSQL pool, for raw SQL in tests and tools; `None` on SQLite.
    pub fn pg_pool(&self) -> Option<&PgPool> {
        match &self.db {
            Db::Postgres(pg) => Some(&pg.pool),
            Db::Sqlite(_) => None,
        }
    }

    /// The SQLite pool that writes, for raw SQL in tests and tools; `None` on PostgreSQL.
    /// SQLite has one writer: keep what runs on it short.
    pub fn sqlite_pool(&self) -> Option<&SqlitePool> {
        match &self.db {
            Db::Postgres(_) => None,
            Db::Sqlite(lite) => Some(&lite.write),
        }
    }
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
