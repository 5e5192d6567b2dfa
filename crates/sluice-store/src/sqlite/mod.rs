//! The SQLite backend for the embedded one-binary mode (all state in one file, PostgreSQL's tables
//! and semantics): its pools, and per topic the statements written for it alone.

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

use crate::sql::WritePool;
use crate::{Backend, StoreConfig, StoreError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// Each read connection's page cache (`PRAGMA cache_size`, negative: KiB). SQLite's default,
/// 2 MiB, times up to `max_connections` readers kept up to 34 MB that a burst of reads (500
/// subscribers replaying their events) filled and never gave back; the file's pages stay in the
/// OS's cache either way, so a smaller one costs a copy, not a disk read. The writer keeps 2 MiB.
const READER_CACHE_SIZE: &str = "-512";

/// How long a statement waits for another process's write lock before SQLITE_BUSY. In-process
/// writers never wait on it (they queue for the one write connection); this covers operator
/// commands (`sluice dlq`, `sluice keys`) opening the same file while the server runs.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a writer may queue for the write connection. Write transactions take milliseconds,
/// so reaching this means the database is stuck, not busy.
const WRITE_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);

/// The write and read pools of one SQLite database; cheap to clone.
///
/// SQLite allows one writer at a time. Writes go through a pool of one connection, so writers
/// in this process queue for it instead of failing with SQLITE_BUSY, and every write
/// transaction starts with `BEGIN IMMEDIATE` (taking the write lock up front, waiting up to the
/// busy timeout for another process) and holds it only for a few short statements. Reads use
/// their own pool: in WAL mode they never wait for the writer.
#[derive(Clone, Debug)]
pub(crate) struct SqliteBackend {
    pub(crate) write: SqlitePool,
    pub(crate) read: SqlitePool,
    /// Where the batched ingest puts new jobs when the lanes are in this file.
    pub(crate) lanes: Option<std::sync::Arc<crate::LanesInDatabase>>,
}

impl SqliteBackend {
    pub(crate) async fn connect(config: &StoreConfig) -> Result<SqliteBackend, StoreError> {
        if config.schema.is_some() {
            // Refused rather than ignored: a caller naming a schema expects isolation from
            // other users of the database, which SQLite can only give with another file.
            return Err(StoreError::Unsupported {
                operation: "a database schema (use a separate file)",
                backend: Backend::Sqlite,
            });
        }
        let options = SqliteConnectOptions::from_str(&config.url)?
            .create_if_missing(true)
            // WAL: readers do not block the writer nor the writer readers, and a commit is
            // one append to the log.
            .journal_mode(SqliteJournalMode::Wal)
            // FULL syncs the WAL on every commit. NORMAL with WAL would already survive a
            // `kill -9` of the process (the OS holds the written pages), but could lose the
            // last commits on power loss or an OS crash, and a `202` promises the job is
            // stored. The fsync per commit is amortised by the batched writer.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        // An in-memory database (`sqlite::memory:`, `?mode=memory`) is for throwaway use; it
        // lives only while a connection to it is open.
        let memory = config.url.contains(":memory:") || config.url.contains("mode=memory");
        if !memory {
            create_private(options.get_filename())?;
        }
        let write = crate::sql::pool_options::<Sqlite>()
            .max_connections(1)
            .min_connections(1)
            .acquire_timeout(WRITE_QUEUE_TIMEOUT)
            // Keep the connection for the life of the store: an in-memory database lives
            // only as long as it, and a file's WAL is checkpointed on close anyway.
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(options.clone())
            .await?;
        let read = if memory {
            // Without a file there is no WAL to read beside the writer: read where we write.
            write.clone()
        } else {
            crate::sql::pool_options::<Sqlite>()
                .max_connections(config.max_connections.max(2))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options.pragma("cache_size", READER_CACHE_SIZE))
                .await?
        };
        Ok(SqliteBackend {
            write,
            read,
            lanes: None,
        })
    }

    pub(crate) async fn migrate(&self) -> Result<(), StoreError> {
        sqlx::migrate!("../../migrations/sqlite")
            .run(&self.write)
            .await?;
        Ok(())
    }

    pub(crate) async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.read).await.is_ok()
    }

    pub(crate) async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    /// A write transaction on the write connection (see [`WritePool::begin_write`]).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        self.write.begin_write().await
    }
}

/// Create the database file readable by its owner only (0600) if it does not exist: it holds
/// prompts, answers and key hashes. SQLite gives the WAL and shared-memory files it creates
/// beside it the same mode. An existing file keeps the mode its owner gave it.
fn create_private(path: &std::path::Path) -> Result<(), StoreError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::CreateFile {
            path: path.to_owned(),
            source,
        }),
    }
}
