//! Scratch resources for this workspace's tests and benchmarks: a PostgreSQL schema or a SQLite
//! file holding a migrated store, a RabbitMQ queue prefix and a Redis key prefix, each named for
//! its test and removed on `Drop`, so a test that panics leaves nothing behind.

use sluice_broker::rabbitmq::{RabbitBroker, RabbitConfig};
use sluice_broker::Broker;
use sluice_store::{Store, StoreConfig};
use std::future::Future;
use std::path::{Path, PathBuf};

pub mod private;

/// PostgreSQL for tests (`SLUICE_TEST_DATABASE_URL`, default the local server).
pub fn database_url() -> String {
    std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// RabbitMQ for tests (`SLUICE_TEST_RABBITMQ_URL`, default the local server).
pub fn rabbitmq_url() -> String {
    std::env::var("SLUICE_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Redis for tests (`SLUICE_TEST_REDIS_URL`, default the local server).
pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh name `{label}_{32 hex}` (a UUIDv7: two runs never clash); schema names are cut to
/// PostgreSQL's 63 bytes keeping the random end.
pub fn unique(label: &str) -> String {
    let id = uuid::Uuid::now_v7().simple().to_string();
    let room = 63usize.saturating_sub(label.len() + 1).min(id.len());
    format!("{label}_{}", &id[id.len() - room..])
}

/// Run `cleanup` to completion from a `Drop`: on a thread of its own with a small runtime, so
/// it works whether or not the dropping thread is inside a runtime (and even while unwinding).
fn finish<F>(cleanup: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    let done = std::thread::spawn(move || {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime.block_on(cleanup),
            Err(error) => eprintln!("testkit: no runtime for clean-up: {error}"),
        }
    });
    let _ = done.join();
}

/// `url` with commits that do not wait for the WAL flush (`synchronous_commit = off`, on these
/// connections only): a scratch schema need not survive a PostgreSQL crash, and tests spend
/// much of their time waiting on commits. Nothing is lost when PostgreSQL stops cleanly.
fn without_commit_flush(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}options=-c%20synchronous_commit%3Doff")
}

/// Where a scratch store lives.
#[derive(Debug, Clone)]
enum Place {
    /// A schema of the test database (the SQL queue's tables live in it too).
    Schema { url: String, schema: String },
    /// A SQLite file, with its `-wal` and `-shm` companions.
    File(PathBuf),
}

/// A database of a test's own: a PostgreSQL schema or a SQLite file, dropped on `Drop`.
#[derive(Debug)]
pub struct ScratchDb {
    place: Place,
}

impl ScratchDb {
    /// A schema named `{label}_{id}` in the test PostgreSQL; created (and migrated) by the
    /// first store that connects with [`ScratchDb::config`], whose commits do not wait for the
    /// WAL flush (see `without_commit_flush`).
    pub fn postgres(label: &str) -> ScratchDb {
        ScratchDb::postgres_at(&without_commit_flush(&database_url()), label)
    }

    /// A schema named `{label}_{id}` in the PostgreSQL at `url` (the benchmark's, from its
    /// configuration, whose commits wait for the flush as in production); otherwise as
    /// [`ScratchDb::postgres`].
    pub fn postgres_at(url: &str, label: &str) -> ScratchDb {
        ScratchDb {
            place: Place::Schema {
                url: url.to_owned(),
                schema: unique(label),
            },
        }
    }

    /// A SQLite file `{label}_{id}.db` in the temporary directory.
    pub fn sqlite(label: &str) -> ScratchDb {
        ScratchDb {
            place: Place::File(std::env::temp_dir().join(format!("{}.db", unique(label)))),
        }
    }

    /// The store configuration that opens this database, migrating it.
    pub fn config(&self) -> StoreConfig {
        match &self.place {
            Place::Schema { url, schema } => StoreConfig {
                url: url.clone(),
                schema: Some(schema.clone()),
                max_connections: 4,
                migrate: true,
                // What `pg_stat_activity` shows, so a test can find (and cut) its connections.
                application_name: schema.clone(),
            },
            Place::File(path) => StoreConfig {
                url: format!("sqlite://{}", path.display()),
                schema: None,
                max_connections: 4,
                migrate: true,
                ..StoreConfig::default()
            },
        }
    }

    /// A migrated store on this database; panics with the reason if it cannot be opened.
    pub async fn store(&self) -> Store {
        Store::connect(&self.config())
            .await
            .unwrap_or_else(|e| panic!("the scratch database does not open: {e}"))
    }

    /// The schema's name on PostgreSQL; `None` on SQLite.
    pub fn schema(&self) -> Option<&str> {
        match &self.place {
            Place::Schema { schema, .. } => Some(schema),
            Place::File(_) => None,
        }
    }

    /// The file on SQLite; `None` on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.place {
            Place::File(path) => Some(path),
            Place::Schema { .. } => None,
        }
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        match self.place.clone() {
            Place::File(path) => {
                // A failure only leaves a temporary file behind.
                let _ = sluice_store::remove_sqlite_files(&path);
            }
            Place::Schema { url, schema } => finish(async move {
                let dropped = async {
                    let pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(1)
                        .connect(&url)
                        .await?;
                    // Connections still open on the schema (a test's processes) would hold
                    // locks the drop waits for: end them first.
                    sqlx::query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    )
                    .bind(&schema)
                    .execute(&pool)
                    .await?;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
                        .execute(&pool)
                        .await?;
                    pool.close().await;
                    Ok::<_, sqlx::Error>(())
                };
                if let Err(error) = dropped.await {
                    eprintln!("testkit: could not drop schema {schema}: {error}");
                }
            }),
        }
    }
}

/// A RabbitMQ queue prefix of a test's own; every queue under it is deleted on `Drop`.
#[derive(Debug)]
pub struct ScratchRabbit {
    pub url: String,
    pub prefix: String,
}

impl ScratchRabbit {
    pub fn new(label: &str) -> ScratchRabbit {
        ScratchRabbit::at(&rabbitmq_url(), label)
    }

    /// A prefix on the RabbitMQ at `url` (a test's own node).
    pub fn at(url: &str, label: &str) -> ScratchRabbit {
        ScratchRabbit {
            url: url.to_owned(),
            prefix: unique(label).replace('_', "-"),
        }
    }

    /// The broker configuration for these lanes.
    pub fn config(&self) -> RabbitConfig {
        RabbitConfig {
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            ..RabbitConfig::default()
        }
    }
}

impl Drop for ScratchRabbit {
    fn drop(&mut self) {
        let config = self.config();
        finish(async move {
            match RabbitBroker::connect(config).await {
                Ok(broker) => {
                    if let Err(error) = broker.delete_all().await {
                        eprintln!("testkit: could not delete scratch lanes: {error}");
                    }
                }
                Err(error) => eprintln!("testkit: could not reach RabbitMQ to clean up: {error}"),
            }
        });
    }
}

/// A Redis key prefix of a test's own; every key under it is deleted on `Drop`.
#[derive(Debug)]
pub struct ScratchRedis {
    pub url: String,
    pub prefix: String,
}

impl ScratchRedis {
    pub fn new(label: &str) -> ScratchRedis {
        ScratchRedis {
            url: redis_url(),
            prefix: unique(label),
        }
    }
}

/// How many connections are subscribed to Redis channel `channel` (`PUBSUB NUMSUB`): a test
/// waits for a node's event bus to listen before it relies on messages reaching it.
pub async fn redis_subscribers(url: &str, channel: &str) -> Result<u64, String> {
    let client = deadpool_redis::redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let answer: (String, u64) = deadpool_redis::redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.1)
}

impl Drop for ScratchRedis {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        finish(async move {
            use deadpool_redis::redis::AsyncCommands;
            let deleted = async {
                let client = deadpool_redis::redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                // KEYS walks the whole keyspace: fine for a test server, not for production.
                let keys: Vec<String> = conn.keys(format!("{prefix}*")).await?;
                if !keys.is_empty() {
                    let _: () = conn.del(keys).await?;
                }
                Ok::<_, deadpool_redis::redis::RedisError>(())
            };
            if let Err(error) = deleted.await {
                eprintln!("testkit: could not delete scratch Redis keys: {error}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_fit_a_schema() {
        let a = unique("store_test");
        let b = unique("store_test");
        assert_ne!(a, b);
        assert!(a.starts_with("store_test_") && a.len() <= 63, "{a}");
        let long = unique(&"x".repeat(60));
        assert!(long.len() <= 63, "{long}");
    }
}
