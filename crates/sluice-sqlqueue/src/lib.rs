//! The SQL queue for Sluice: the lanes as rows of one table in PostgreSQL or SQLite, so a
//! small deployment (or the embedded `sluice dev` mode) needs no separate broker.
//!
//! A message is a row of [`TABLE`]. Consuming *claims* rows: one statement hides them
//! for the visibility timeout (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so any number of
//! processes can compete), tags them with a random claim token and counts the receive.
//! While a [`Delivery`] is held a heartbeat keeps extending its claim; ack deletes the
//! row, fenced by the token so a holder whose claim expired cannot touch the next claim
//! (concurrent acks share one statement).
//! A consumer that dies or drops a delivery unsettled simply stops extending the claim,
//! and the message comes back once the visibility timeout passes. A message received
//! more than `max_receive_count` times without being handed back moves to the dead lane.
//!
//! Idle consumers wait for a wake-up instead of polling hard: PostgreSQL `LISTEN/NOTIFY`
//! (one channel per namespace) across processes, a [`tokio::sync::Notify`] within one,
//! and a fallback poll (every `poll_interval_ms`, sooner when a delayed message is due).
//!
//! Operating it: the table and its index are made by the store's migrations
//! (`migrations/*/0010_sql_queue.sql`), in the store's database and schema, so the queue
//! runs no DDL; `declare()` checks they are there and fails with an error that says to run
//! the migrations when they are not. On PostgreSQL the listener keeps one connection of the pool
//! while anything consumes, and every publish sends a `NOTIFY`, which serialises commits
//! briefly: fine for the small deployments this backend is for. Settled messages are
//! deleted, so the table stays as small as the backlog (autovacuum reclaims the churn).

mod consume;
mod db;
mod listen;
mod sql;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use sluice_broker::{Broker, BrokerError, Consumer, JobRef, Lane, PublishOptions};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{PgPool, SqlitePool};
use tokio::sync::Notify;

use db::{Db, Outgoing, Pool};

/// The table holding every lane's messages, for all namespaces; made by the store's
/// migrations (`migrations/*/0010_sql_queue.sql`).
pub const TABLE: &str = "sluice_lane_messages";

/// Longest delay [`Broker::publish`] accepts. Longer backoffs are a caller bug, not a plan.
pub const MAX_DELAY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Upper bound for any single database round trip, so a wedged connection surfaces as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);

/// How the SQL queue behaves. Where it lives is decided by the pool it is given.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SqlQueueConfig {
    /// Separates deployments (and tests) sharing one table, like RabbitMQ's queue prefix.
    pub namespace: String,
    /// PostgreSQL only: the schema the table is in, which must be one the store's
    /// migrations ran in. When unset, the table is unqualified and found through the pool's
    /// `search_path`, which is how the queue shares the store's schema when it is handed
    /// the store's pool.
    pub schema: Option<String>,
    /// How long a claimed message stays hidden without a heartbeat; after a consumer dies,
    /// its messages come back this long after its last heartbeat. At least 1.
    pub visibility_timeout_secs: u64,
    /// How often an idle consumer looks for work when no wake-up arrives (a missed
    /// notification, another process on SQLite, a claim that expired). At least 1.
    pub poll_interval_ms: u64,
    /// Receives a message may have without being handed back (ack, nack) before it is
    /// moved to the dead lane instead of being delivered again. At least 1.
    pub max_receive_count: u32,
}

impl Default for SqlQueueConfig {
    fn default() -> Self {
        Self {
            namespace: "sluice".into(),
            schema: None,
            visibility_timeout_secs: 60,
            poll_interval_ms: 1000,
            max_receive_count: 5,
        }
    }
}

impl SqlQueueConfig {
    fn validate(&self) -> Result<(), SqlQueueError> {
        let invalid = |what: &str| Err(SqlQueueError::InvalidConfig(what.to_owned()));
        if self.namespace.is_empty() {
            return invalid("namespace must not be empty");
        }
        if let Some(schema) = &self.schema {
            // DDL cannot take bind parameters: plain lowercase identifiers only.
            if !sluice_core::valid_identifier(schema) {
                return Err(SqlQueueError::InvalidConfig(format!(
                    "schema {schema:?}: use lowercase letters, digits and underscores"
                )));
            }
        }
        if self.visibility_timeout_secs == 0 {
            return invalid("visibility_timeout_secs must be at least 1");
        }
        if self.visibility_timeout_secs > 7 * 24 * 3600 {
            return invalid("visibility_timeout_secs must be at most a week");
        }
        if self.poll_interval_ms == 0 {
            return invalid("poll_interval_ms must be at least 1");
        }
        if self.max_receive_count == 0 {
            return invalid("max_receive_count must be at least 1");
        }
        Ok(())
    }

    fn visibility(&self) -> Duration {
        Duration::from_secs(self.visibility_timeout_secs)
    }
}

/// What goes wrong inside the SQL queue; carried as the source of a [`BrokerError`].
#[derive(Debug, thiserror::Error)]
pub enum SqlQueueError {
    #[error("invalid SQL queue configuration: {0}")]
    InvalidConfig(String),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("no answer from the database within {0:?}")]
    Timeout(Duration),
    #[error("the claim on message {id} is gone: it expired and was handed out again, or it was already settled")]
    ClaimLost { id: i64 },
    #[error("the queue was dropped before the message was settled")]
    Dropped,
    #[error(
        "the SQL queue's table {TABLE} {0}: run the store's migrations \
         (`sluice migrate`, or `[database] migrate = true`)"
    )]
    NotMigrated(String),
}

impl From<sqlx::Error> for SqlQueueError {
    /// Sorts sqlx errors: a missing table is a deployment mistake (migrations not run), not
    /// a database failure.
    fn from(e: sqlx::Error) -> Self {
        let missing_table = e.as_database_error().is_some_and(|d| {
            d.code().as_deref() == Some("42P01") || d.message().contains("no such table")
        });
        if missing_table {
            SqlQueueError::NotMigrated("does not exist".into())
        } else {
            SqlQueueError::Database(e)
        }
    }
}

/// Runs one database operation under [`OP_TIMEOUT`].
async fn timed<T, E: Into<SqlQueueError>>(
    fut: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, SqlQueueError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(result) => result.map_err(Into::into),
        Err(_) => Err(SqlQueueError::Timeout(OP_TIMEOUT)),
    }
}

/// FNV-1a: a hash that is the same in every process and every Rust version, unlike
/// `DefaultHasher`, because every process must derive the same notification channel.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `LISTEN/NOTIFY` channel of a namespace. Channel names are limited to 63 bytes and
/// namespaces are free text, so the channel carries a hash; a collision only wakes a
/// consumer for nothing.
fn channel_name(schema: Option<&str>, namespace: &str) -> String {
    let key = format!("{}\0{namespace}", schema.unwrap_or(""));
    format!("sluice_queue_{:016x}", fnv1a(key.as_bytes()))
}

/// Wakes this process's idle consumers of a lane.
#[derive(Default)]
struct Wakers {
    lanes: [Notify; 5],
}

impl Wakers {
    fn lane(&self, lane: Lane) -> &Notify {
        &self.lanes[lane.index()]
    }

    fn wake(&self, lane: Lane) {
        self.lane(lane).notify_waiters();
    }

    fn wake_all(&self) {
        for notify in &self.lanes {
            notify.notify_waiters();
        }
    }
}

/// The SQL queue [`Broker`], on PostgreSQL or SQLite. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct SqlQueue {
    shared: Arc<Shared>,
}

impl fmt::Debug for SqlQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqlQueue")
            .field("backend", &self.shared.db.backend())
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    db: Db,
    config: SqlQueueConfig,
    /// The namespace's `LISTEN/NOTIFY` channel (PostgreSQL).
    channel: String,
    wakers: Arc<Wakers>,
    /// The PostgreSQL listener task, started by the first `consume`.
    listener: tokio::sync::Mutex<Option<tokio::task::AbortHandle>>,
    /// Where deliveries' deletes gather into one statement, started by the first settle.
    deletes: std::sync::OnceLock<consume::Deletes>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The listener holds no reference back to us, so it must be stopped explicitly.
        if let Ok(mut slot) = self.listener.try_lock() {
            if let Some(handle) = slot.take() {
                handle.abort();
            }
        }
    }
}

impl Shared {
    /// `{namespace}.{lane}`, the queue name errors and logs mention.
    fn queue_name(&self, lane: Lane) -> String {
        format!("{}.{}", self.config.namespace, lane.as_str())
    }
}

impl SqlQueue {
    /// A queue on an existing PostgreSQL pool, e.g. the store's (whose `search_path`
    /// then also locates the table unless `config.schema` is set). The listener for
    /// wake-ups keeps one of the pool's connections while anything consumes.
    pub fn postgres(pool: PgPool, config: SqlQueueConfig) -> Result<Self, BrokerError> {
        Self::new(Pool::Postgres(pool), config)
    }

    /// A queue on an existing SQLite pool. The pool should use WAL mode and a busy
    /// timeout, as [`SqlQueue::sqlite_connect_options`] sets. Wake-ups reach consumers
    /// of this `SqlQueue` (and its clones) at once; other pools or processes on the same
    /// file see new messages at the next fallback poll.
    pub fn sqlite(pool: SqlitePool, config: SqlQueueConfig) -> Result<Self, BrokerError> {
        if config.schema.is_some() {
            return Err(BrokerError::Connection(Box::new(
                SqlQueueError::InvalidConfig("schema is for PostgreSQL only".into()),
            )));
        }
        Self::new(Pool::Sqlite(pool), config)
    }

    fn new(pool: Pool, config: SqlQueueConfig) -> Result<Self, BrokerError> {
        config
            .validate()
            .map_err(|e| BrokerError::Connection(Box::new(e)))?;
        let channel = channel_name(config.schema.as_deref(), &config.namespace);
        Ok(Self {
            shared: Arc::new(Shared {
                db: Db::new(pool, &config, &channel),
                channel,
                config,
                wakers: Arc::new(Wakers::default()),
                listener: tokio::sync::Mutex::new(None),
                deletes: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Connects to `postgres://...` or `sqlite:...` with a pool of its own, so a wrong URL
    /// fails at startup. SQLite files are created if missing.
    pub async fn connect(url: &str, config: SqlQueueConfig) -> Result<Self, BrokerError> {
        let connection_error =
            |e: sqlx::Error| BrokerError::Connection(Box::new(SqlQueueError::Database(e)));
        if url.starts_with("sqlite:") {
            let options = Self::sqlite_connect_options(url).map_err(connection_error)?;
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connection_error)?;
            Self::sqlite(pool, config)
        } else {
            let options = PgConnectOptions::from_str(url)
                .map_err(connection_error)?
                .application_name("sluice-sqlqueue");
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connection_error)?;
            Self::postgres(pool, config)
        }
    }

    /// Options for a SQLite pool fit for the queue: WAL (readers do not block the one
    /// writer), a busy timeout (writers wait their turn instead of failing), the file
    /// created if missing, and full fsync so a returned publish survives a power cut.
    pub fn sqlite_connect_options(url: &str) -> Result<SqliteConnectOptions, sqlx::Error> {
        Ok(SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10)))
    }

    /// Make every message a consumer has claimed but not settled claimable again now, as if
    /// its visibility timeout had passed; how many there were. Only for a process that knows
    /// no other consumer is alive (the embedded mode, which owns its file): a live consumer's
    /// messages would run twice.
    pub async fn release_claims(&self) -> Result<u64, BrokerError> {
        let shared = &self.shared;
        timed(shared.db.release_claims())
            .await
            .map_err(|e| BrokerError::Admin {
                queue: format!("{}.*", shared.config.namespace),
                source: Box::new(e),
            })
    }

    pub fn config(&self) -> &SqlQueueConfig {
        &self.shared.config
    }

    /// The `LISTEN/NOTIFY` channel this queue's namespace uses on PostgreSQL.
    pub fn notify_channel(&self) -> &str {
        &self.shared.channel
    }

    /// Wakes this process's idle consumers of a lane, for a writer that adds messages to the
    /// table itself (the store's ingest, in the statement that stores the jobs).
    pub fn waker(&self) -> Arc<dyn Fn(Lane) + Send + Sync> {
        let shared = Arc::clone(&self.shared);
        Arc::new(move |lane| shared.wakers.wake(lane))
    }

    async fn publish_items(&self, items: &[Outgoing]) -> Result<(), BrokerError> {
        let Some(first) = items.first() else {
            return Ok(());
        };
        let shared = &self.shared;
        timed(shared.db.insert(items)).await.map_err(|e| match e {
            SqlQueueError::NotMigrated(_) => BrokerError::Unroutable {
                queue: shared.queue_name(first.lane),
            },
            e => BrokerError::Publish {
                queue: shared.queue_name(first.lane),
                source: Box::new(e),
            },
        })?;
        // Consumers in this process need not wait for the NOTIFY round trip (or, on
        // SQLite, for the fallback poll).
        let mut woken = [false; 5];
        for item in items {
            if !std::mem::replace(&mut woken[item.lane.index()], true) {
                shared.wakers.wake(item.lane);
            }
        }
        Ok(())
    }
}

fn outgoing(lane: Lane, job: &JobRef, opts: PublishOptions) -> Result<Outgoing, BrokerError> {
    let body = serde_json::to_string(job)
        .map_err(|e| BrokerError::Malformed(format!("cannot encode job: {e}")))?;
    let delay_us = match opts.delay {
        None => 0,
        Some(delay) if delay > MAX_DELAY => return Err(BrokerError::DelayTooLong(delay)),
        // Rounded up: a message is never available sooner than asked.
        Some(delay) => i64::try_from(delay.as_nanos().div_ceil(1000))
            .map_err(|_| BrokerError::DelayTooLong(delay))?,
    };
    Ok(Outgoing {
        lane,
        body,
        reason: opts.reason,
        delay_us,
    })
}

/// Microseconds in a duration, saturating (the durations here are bounded well below).
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[async_trait::async_trait]
impl Broker for SqlQueue {
    async fn publish(
        &self,
        lane: Lane,
        job: &JobRef,
        opts: PublishOptions,
    ) -> Result<(), BrokerError> {
        self.publish_items(&[outgoing(lane, job, opts)?]).await
    }

    /// One statement for the whole batch: all of it is published, or none.
    async fn publish_batch(
        &self,
        items: Vec<(Lane, JobRef, PublishOptions)>,
    ) -> Result<(), BrokerError> {
        let items = items
            .into_iter()
            .map(|(lane, job, opts)| outgoing(lane, &job, opts))
            .collect::<Result<Vec<_>, _>>()?;
        self.publish_items(&items).await
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError> {
        if let Some(pool) = self.shared.db.pg_pool() {
            let mut slot = self.shared.listener.lock().await;
            let running = slot.as_ref().is_some_and(|h| !h.is_finished());
            if !running {
                *slot = Some(
                    listen::start(
                        pool.clone(),
                        self.shared.channel.clone(),
                        self.shared.wakers.clone(),
                    )
                    .await,
                );
            }
        }
        consume::start(self.shared.clone(), lane, prefetch).await
    }

    async fn depth(&self, lane: Lane) -> Result<u64, BrokerError> {
        let shared = &self.shared;
        let depth = timed(shared.db.depth(lane))
            .await
            .map_err(|e| BrokerError::Admin {
                queue: shared.queue_name(lane),
                source: Box::new(e),
            })?;
        Ok(u64::try_from(depth).unwrap_or(0))
    }

    /// Checks that the store's migrations made the table; creates nothing.
    async fn declare(&self) -> Result<(), BrokerError> {
        let shared = &self.shared;
        timed(shared.db.check())
            .await
            .map_err(|e| BrokerError::Admin {
                queue: format!("{}.*", shared.config.namespace),
                source: Box::new(e),
            })
    }

    /// Deletes the namespace's messages; the table stays, as other namespaces may use it.
    async fn delete_all(&self) -> Result<(), BrokerError> {
        let shared = &self.shared;
        match timed(shared.db.delete_all()).await {
            Ok(()) | Err(SqlQueueError::NotMigrated(_)) => Ok(()),
            Err(e) => Err(BrokerError::Admin {
                queue: format!("{}.*", shared.config.namespace),
                source: Box::new(e),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let config: SqlQueueConfig = toml::from_str("").unwrap();
        assert_eq!(config, SqlQueueConfig::default());
        assert_eq!(config.namespace, "sluice");
        assert_eq!(config.visibility_timeout_secs, 60);
        assert_eq!(config.poll_interval_ms, 1000);
        assert_eq!(config.max_receive_count, 5);
        let parsed: Result<SqlQueueConfig, _> =
            toml::from_str("namespace = \"a\"\nvisibility_timout_secs = 3\n");
        assert!(parsed.is_err(), "a misspelt key was accepted");
        let parsed: Result<SqlQueueConfig, _> =
            toml::from_str("namespace = \"a\"\nschema = \"q\"\nmax_receive_count = 2\n");
        let parsed = parsed.ok();
        assert_eq!(parsed.as_ref().map(|c| c.max_receive_count), Some(2));
        assert_eq!(parsed.and_then(|c| c.schema), Some("q".to_owned()));
    }

    #[test]
    fn config_is_validated() {
        assert!(SqlQueueConfig::default().validate().is_ok());
        let bad = [
            SqlQueueConfig {
                namespace: String::new(),
                ..Default::default()
            },
            SqlQueueConfig {
                schema: Some("Robert'); DROP TABLE".into()),
                ..Default::default()
            },
            SqlQueueConfig {
                visibility_timeout_secs: 0,
                ..Default::default()
            },
            SqlQueueConfig {
                poll_interval_ms: 0,
                ..Default::default()
            },
            SqlQueueConfig {
                max_receive_count: 0,
                ..Default::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?} accepted");
        }
    }

    #[test]
    fn channel_names_are_stable_short_and_distinct() {
        let a = channel_name(None, "sluice");
        assert_eq!(a, channel_name(None, "sluice"));
        assert_eq!(a, format!("sluice_queue_{:016x}", fnv1a(b"\0sluice")));
        assert_ne!(a, channel_name(None, "other"));
        assert_ne!(a, channel_name(Some("s"), "sluice"));
        let long = channel_name(Some("schema"), &"x".repeat(500));
        assert!(long.len() < 64, "{long}");
        // Known FNV-1a 64 test vector, so the hash cannot silently change.
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn delays_round_up_and_are_bounded() {
        let job = sluice_broker::JobRef {
            request_id: sluice_core::RequestId::new(),
            tenant: "t".into(),
            model: "m".into(),
            attempt: 1,
            tokens: 0,
            rate_limited: false,
            waiting_since_ms: None,
        };
        let delay_of = |d: Duration| {
            outgoing(Lane::Retry, &job, PublishOptions::delayed(d))
                .map(|o| o.delay_us)
                .ok()
        };
        assert_eq!(delay_of(Duration::ZERO), Some(0));
        assert_eq!(delay_of(Duration::from_nanos(1)), Some(1));
        assert_eq!(delay_of(Duration::from_nanos(1001)), Some(2));
        assert_eq!(delay_of(Duration::from_millis(1200)), Some(1_200_000));
        assert!(matches!(
            outgoing(
                Lane::Retry,
                &job,
                PublishOptions::delayed(MAX_DELAY + Duration::from_secs(1))
            ),
            Err(BrokerError::DelayTooLong(_))
        ));
    }
}
