//! The broker conformance suite and SQLite-only cases for the SQL queue, each test on a
//! scratch database file of its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{must, receive_in_background, Scratch};
use sluice_broker::conformance::{job, Fixture, RawAccess, RawMessage};
use sluice_broker::{broker_conformance_suite, Broker, BrokerError, Lane, PublishOptions};
use sluice_sqlqueue::{SqlQueue, SqlQueueConfig, TABLE};
use sluice_testkit::{unique, ScratchDb};
use sqlx::sqlite::SqlitePoolOptions;
use sqlx::{Row, SqlitePool};

/// The current time as the table stores it: the store's fixed-width UTC text.
const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";

/// A fresh database file the store's migrations ran on, as the embedded mode opens it; the
/// file goes when the `ScratchDb` does.
async fn database() -> (ScratchDb, String) {
    let (db, url) = unmigrated();
    common::migrate(&db).await;
    (db, url)
}

/// A fresh database file nothing ran on yet.
fn unmigrated() -> (ScratchDb, String) {
    let db = ScratchDb::sqlite("sqlq");
    let url = db.config().url;
    (db, url)
}

async fn pool(url: &str) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(SqlQueue::sqlite_connect_options(url).unwrap())
        .await
        .unwrap()
}

fn config() -> SqlQueueConfig {
    SqlQueueConfig {
        namespace: unique("ns"),
        // Short, so the suite's redelivery of a dropped message fits its bounds.
        visibility_timeout_secs: 2,
        ..SqlQueueConfig::default()
    }
}

/// Talks to the table with plain SQL, beneath the queue's encoding.
struct SqliteRaw {
    pool: SqlitePool,
    namespace: String,
}

#[async_trait::async_trait]
impl RawAccess for SqliteRaw {
    async fn inject(&self, lane: Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        let body = String::from_utf8(body).map_err(|e| BrokerError::Malformed(e.to_string()))?;
        sqlx::query(&format!(
            "INSERT INTO {TABLE} (namespace, lane, body, available_at, created_at)
             VALUES ($1, $2, $3, {NOW}, {NOW})"
        ))
        .bind(&self.namespace)
        .bind(lane.as_str())
        .bind(body)
        .execute(&self.pool)
        .await
        .map_err(|e| BrokerError::Publish {
            queue: lane.to_string(),
            source: Box::new(e),
        })?;
        Ok(())
    }

    async fn take(&self, lane: Lane) -> Result<Option<RawMessage>, BrokerError> {
        let row = sqlx::query(&format!(
            "DELETE FROM {TABLE} WHERE id = (
                SELECT id FROM {TABLE}
                WHERE namespace = $1 AND lane = $2 AND available_at <= {NOW}
                ORDER BY available_at, id LIMIT 1)
             RETURNING body, reason"
        ))
        .bind(&self.namespace)
        .bind(lane.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| BrokerError::Consume {
            queue: lane.to_string(),
            source: Box::new(e),
        })?;
        Ok(row.map(|row| RawMessage {
            body: row.get::<String, _>("body").into_bytes(),
            reason: row.get("reason"),
        }))
    }
}

async fn fixture() -> Fixture {
    let (db, url) = database().await;
    let pool = pool(&url).await;
    let config = config();
    let raw = SqliteRaw {
        pool: pool.clone(),
        namespace: config.namespace.clone(),
    };
    let queue = SqlQueue::sqlite(pool, config).unwrap();
    Fixture {
        broker: Arc::new(Scratch { queue, db }),
        raw: Box::new(raw),
    }
}

broker_conformance_suite!(sql_sqlite, fixture());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_dropped_too_often_goes_to_dead() {
    let (_db, url) = database().await;
    let queue = SqlQueue::sqlite(
        pool(&url).await,
        SqlQueueConfig {
            visibility_timeout_secs: 1,
            max_receive_count: 2,
            ..config()
        },
    )
    .unwrap();
    common::dropped_too_often_goes_to_dead(&queue, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_requeues_do_not_count_towards_the_limit() {
    let (_db, url) = database().await;
    let queue = SqlQueue::sqlite(
        pool(&url).await,
        SqlQueueConfig {
            max_receive_count: 2,
            ..config()
        },
    )
    .unwrap();
    common::requeues_do_not_count_towards_the_limit(&queue, 2).await;
}

/// Two queues on separate pools of one file: a stale holder cannot delete the new claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_stale_ack_keeps_the_new_claim() {
    let (_db, url) = database().await;
    let config = SqlQueueConfig {
        poll_interval_ms: 100,
        ..config()
    };
    let a = SqlQueue::sqlite(pool(&url).await, config.clone()).unwrap();
    let b = SqlQueue::sqlite(pool(&url).await, config.clone()).unwrap();
    let admin = pool(&url).await;
    let expire = || async {
        sqlx::query(&format!(
            "UPDATE {TABLE} SET available_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 seconds')
             WHERE namespace = $1"
        ))
        .bind(&config.namespace)
        .execute(&admin)
        .await
        .unwrap();
    };
    common::stale_ack_keeps_the_new_claim(&a, &b, expire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_namespaces_are_isolated() {
    let (_db, url) = database().await;
    let pool = pool(&url).await;
    let a = SqlQueue::sqlite(pool.clone(), config()).unwrap();
    let b = SqlQueue::sqlite(pool, config()).unwrap();
    common::namespaces_are_isolated(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_publish_before_declare_is_unroutable() {
    let (_db, url) = unmigrated();
    let queue = SqlQueue::sqlite(pool(&url).await, config()).unwrap();
    common::publish_before_declare_is_unroutable(&queue).await;
}

/// Within one process a publish wakes an idle consumer at once, not at the fallback poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_publish_wakes_an_idle_consumer() {
    let (_db, url) = database().await;
    let queue = SqlQueue::connect(
        &url,
        SqlQueueConfig {
            poll_interval_ms: 10_000,
            ..config()
        },
    )
    .await
    .unwrap();
    must(queue.declare().await, "declare");
    let consumer = must(queue.consume(Lane::Standard, 1).await, "consume");
    let receiving = receive_in_background(consumer);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let sent = job("t1");
    let published = Instant::now();
    must(
        queue
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let (arrived, got, _consumer) = tokio::time::timeout(Duration::from_secs(9), receiving)
        .await
        .expect("the idle consumer was not woken before its fallback poll")
        .unwrap();
    assert_eq!(got.job, sent);
    let took = arrived - published;
    assert!(took < Duration::from_secs(1), "woken after {took:?}");
    must(got.ack().await, "ack");
}

/// The schema setting is PostgreSQL's; on SQLite it is refused rather than ignored.
#[tokio::test]
async fn sqlite_refuses_a_schema() {
    let (_db, url) = database().await;
    let result = SqlQueue::sqlite(
        pool(&url).await,
        SqlQueueConfig {
            schema: Some("sluice".into()),
            ..config()
        },
    );
    assert!(
        matches!(result, Err(BrokerError::Connection(_))),
        "{result:?}"
    );
}

/// The embedded mode's store puts a job straight into its lane in the transaction that stores
/// it, and wakes this process's idle consumer (SQLite has no notifications).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_jobs_the_store_puts_in_their_lane_are_delivered_and_wake_idle_consumers() {
    let (db, _url) = database().await;
    let store = db.store().await;
    let queue = SqlQueue::sqlite(
        store.sqlite_pool().unwrap().clone(),
        SqlQueueConfig {
            poll_interval_ms: 10_000,
            ..config()
        },
    )
    .unwrap();
    common::jobs_the_store_enqueues_are_delivered(store, &queue, &queue).await;
}
