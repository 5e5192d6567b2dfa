//! The SQLite backend for the embedded one-binary mode: all state in one file, the same
//! tables and semantics as PostgreSQL, statements written for SQLite (one file per top-level module).
//!
//! SQLite allows one writer at a time. Writes go through a pool of one connection, so writers
//! in this process queue for it instead of failing with SQLITE_BUSY, and every write
//! transaction starts with `BEGIN IMMEDIATE` (taking the write lock up front, waiting up to the
//! busy timeout for another process) and holds it only for a few short statements. Reads use
//! their own pool: in WAL mode they never wait for the writer.

mod admission;
mod batches;
mod events;
mod files;
mod jobs;
mod keys;
mod lifecycle;
mod notifications;
mod outbox;
mod stats;

use crate::{Backend, StoreConfig, StoreError};
use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::str::FromStr;
use std::time::Duration;

/// How long a statement waits for another process's write lock before SQLITE_BUSY. In-process
/// writers never wait on it (they queue for the one write connection); this covers operator
/// commands (`sluice dlq`, `sluice keys`) opening the same file while the server runs.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a writer may queue for the write connection. Write transactions take milliseconds,
/// so reaching this means the database is stuck, not busy.
const WRITE_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);

/// The write and read pools of one SQLite database; cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct SqliteBackend {
    pub(crate) write: SqlitePool,
    read: SqlitePool,
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
        let write = SqlitePoolOptions::new()
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
            SqlitePoolOptions::new()
                .max_connections(config.max_connections.max(2))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?
        };
        Ok(SqliteBackend { write, read })
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

    /// A write transaction holding SQLite's write lock from its first statement, so it can
    /// never fail half-way to upgrade a read lock (which `busy_timeout` does not retry).
    async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.write.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// A timestamp as the store writes it: UTC, milliseconds, `Z`, always 24 characters, so that
/// comparing the text (in `WHERE`, `ORDER BY`, `min`, `max`) compares the instants. SQLite's
/// own `strftime('%Y-%m-%dT%H:%M:%fZ')` writes the same shape.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Longest span added to or taken from a timestamp: far beyond any lease or backoff, and keeps
/// the result a four-digit year, so the fixed-width text order holds.
const MAX_SPAN: chrono::Duration = chrono::Duration::days(365 * 100);

fn span(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).map_or(MAX_SPAN, |d| d.min(MAX_SPAN))
}

/// `now + d`, written as [`ts`] does.
pub(crate) fn ts_after(now: DateTime<Utc>, d: Duration) -> String {
    ts(now + span(d))
}

/// `now - d`, written as [`ts`] does.
pub(crate) fn ts_before(now: DateTime<Utc>, d: Duration) -> String {
    ts(now - span(d))
}

/// Read a stored timestamp.
pub(crate) fn parse_ts(s: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Corrupt(format!("bad timestamp {s:?}: {e}")))
}

/// Read a stored JSON text.
pub(crate) fn parse_json(s: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("bad JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_have_one_fixed_width_shape_and_round_trip() {
        let t = DateTime::parse_from_rfc3339("2026-01-02T03:04:05.678901+00:00")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        assert_eq!(ts(t), "2026-01-02T03:04:05.678Z");
        let whole = DateTime::parse_from_rfc3339("2026-01-02T03:04:05Z")
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default();
        assert_eq!(ts(whole), "2026-01-02T03:04:05.000Z");
        assert!(parse_ts(&ts(t)).is_ok_and(|back| ts(back) == ts(t)));
        assert!(ts(whole) < ts(t), "text order is time order");
    }
}
