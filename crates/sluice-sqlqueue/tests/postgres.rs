//! The broker conformance suite and PostgreSQL-only cases for the SQL queue, against a real
//! PostgreSQL (`SLUICE_TEST_DATABASE_URL`). Each test owns a fresh schema and namespace.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{must, receive_in_background, Scratch};
use futures::StreamExt;
use sluice_broker::conformance::{self, job, Fixture, RawAccess, RawMessage};
use sluice_broker::{broker_conformance_suite, Broker, BrokerError, Lane, PublishOptions};
use sluice_sqlqueue::{SqlQueue, SqlQueueConfig, TABLE};
use sluice_testkit::{database_url, unique, ScratchDb};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Row};

/// A small pool of its own, as a separate process would have.
async fn pool(application_name: &str) -> PgPool {
    let options = PgConnectOptions::from_str(&database_url())
        .unwrap()
        .application_name(application_name);
    PgPoolOptions::new()
        .max_connections(6)
        .connect_with(options)
        .await
        .unwrap_or_else(|e| panic!("these tests need PostgreSQL: {e}"))
}

fn config(schema: &str, namespace: &str) -> SqlQueueConfig {
    SqlQueueConfig {
        namespace: namespace.to_owned(),
        schema: Some(schema.to_owned()),
        // Short, so the suite's redelivery of a dropped message fits its bounds.
        visibility_timeout_secs: 2,
        ..SqlQueueConfig::default()
    }
}

/// Talks to the table with plain SQL, beneath the queue's encoding.
struct PgRaw {
    pool: PgPool,
    table: String,
    namespace: String,
}

#[async_trait::async_trait]
impl RawAccess for PgRaw {
    async fn inject(&self, lane: Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        let body = String::from_utf8(body).map_err(|e| BrokerError::Malformed(e.to_string()))?;
        sqlx::query(&format!(
            "INSERT INTO {} (namespace, lane, body, available_at) VALUES ($1, $2, $3, now())",
            self.table
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
        let t = &self.table;
        let row = sqlx::query(&format!(
            "DELETE FROM {t} WHERE id = (
                SELECT id FROM {t}
                WHERE namespace = $1 AND lane = $2 AND available_at <= now()
                ORDER BY available_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
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
    let db = ScratchDb::postgres("sqlq");
    let schema = db.schema().unwrap().to_owned();
    let namespace = unique("ns");
    common::migrate(&db).await;
    let pool = pool("sluice-sqlqueue-test").await;
    let queue = SqlQueue::postgres(pool.clone(), config(&schema, &namespace)).unwrap();
    let raw = PgRaw {
        pool,
        table: format!("{schema}.{TABLE}"),
        namespace,
    };
    Fixture {
        broker: Arc::new(Scratch { queue, db }),
        raw: Box::new(raw),
    }
}

broker_conformance_suite!(sql_postgres, fixture());

/// A schema of its own for a backend-only test, dropped when the scope goes.
struct Scope {
    namespace: String,
    admin: PgPool,
    db: ScratchDb,
}

impl Scope {
    /// A schema the store's migrations ran in.
    async fn new() -> Self {
        let scope = Self::unmigrated().await;
        common::migrate(&scope.db).await;
        scope
    }

    /// A schema name nothing was created under yet.
    async fn unmigrated() -> Self {
        Self {
            namespace: unique("ns"),
            admin: pool("sluice-sqlqueue-admin").await,
            db: ScratchDb::postgres("sqlq"),
        }
    }

    fn schema(&self) -> &str {
        self.db.schema().unwrap()
    }

    async fn queue(
        &self,
        application_name: &str,
        tweak: impl FnOnce(&mut SqlQueueConfig),
    ) -> SqlQueue {
        let mut config = config(self.schema(), &self.namespace);
        tweak(&mut config);
        SqlQueue::postgres(pool(application_name).await, config).unwrap()
    }
}

/// Two queues on separate pools (two processes, in effect) with two consumers each
/// compete for one lane: between them every message is delivered, and none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_two_pools_never_share_a_message() {
    const MESSAGES: usize = 400;
    let scope = Scope::new().await;
    let queues = [
        scope.queue("sluice-sqlqueue-p1", |_| {}).await,
        scope.queue("sluice-sqlqueue-p2", |_| {}).await,
    ];
    must(queues[0].declare().await, "declare");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for (which, queue) in queues.iter().enumerate() {
        for _ in 0..2 {
            let mut consumer = must(queue.consume(Lane::Standard, 5).await, "consume");
            let seen = seen.clone();
            tasks.spawn(async move {
                while let Some(item) = consumer.next().await {
                    let delivery = must(item, "consumer item");
                    assert!(!delivery.redelivered, "a message came round twice");
                    let id = delivery.job.request_id;
                    // Hold each message briefly so claims overlap.
                    tokio::time::sleep(Duration::from_millis(rand_ms())).await;
                    must(delivery.ack().await, "ack");
                    seen.lock().unwrap().push((which, id));
                }
            });
        }
    }
    let jobs: Vec<_> = (0..MESSAGES).map(|i| job(&format!("t{}", i % 5))).collect();
    let items = jobs
        .iter()
        .map(|j| (Lane::Standard, j.clone(), PublishOptions::default()))
        .collect();
    must(queues[1].publish_batch(items).await, "publish_batch");

    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < MESSAGES {
        assert!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} consumed",
            seen.lock().unwrap().len()
        );
        if let Some(Err(e)) = tasks.try_join_next() {
            std::panic::resume_unwind(e.into_panic());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than the visibility timeout: a message claimed twice would show up now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    tasks.abort_all();
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), MESSAGES, "deliveries acked in total");
    let unique: HashSet<_> = seen.iter().map(|(_, id)| *id).collect();
    let expected: HashSet<_> = jobs.iter().map(|j| j.request_id).collect();
    assert_eq!(unique, expected);
    for which in 0..2 {
        let count = seen.iter().filter(|(w, _)| *w == which).count();
        assert!(
            count > 0,
            "pool {which} got no messages, so nothing competed"
        );
    }
    for queue in &queues {
        conformance::expect_depth(queue, Lane::Standard, 0).await;
    }
}

fn rand_ms() -> u64 {
    rand::random::<u64>() % 4
}

/// Publishes from another pool (so only PostgreSQL can carry the news) to a consumer that
/// is idle with a 10 s fallback poll, and checks it arrived within `within`.
async fn expect_woken(consumer_queue: &SqlQueue, publisher: &SqlQueue, within: Duration) {
    let consumer = must(consumer_queue.consume(Lane::Priority, 1).await, "consume");
    let receiving = receive_in_background(consumer);
    // Let the consumer find the lane empty and settle into its long wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = job("t1");
    let published = Instant::now();
    must(
        publisher
            .publish(Lane::Priority, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let (arrived, got, _consumer) = tokio::time::timeout(Duration::from_secs(9), receiving)
        .await
        .expect("the idle consumer was not woken before its fallback poll")
        .unwrap();
    let took = arrived - published;
    assert_eq!(got.job, sent);
    assert!(
        took < within,
        "the idle consumer took {took:?} to notice a message"
    );
    must(got.ack().await, "ack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_an_idle_consumer_before_the_fallback_poll() {
    let scope = Scope::new().await;
    let slow_poll = |c: &mut SqlQueueConfig| c.poll_interval_ms = 10_000;
    let consumer = scope.queue("sluice-sqlqueue-c", slow_poll).await;
    let publisher = scope.queue("sluice-sqlqueue-p", slow_poll).await;
    must(publisher.declare().await, "declare");
    expect_woken(&consumer, &publisher, Duration::from_secs(2)).await;
}

/// The listener's connection is killed from the server side; it reconnects, listens
/// again, and NOTIFY wakes idle consumers as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_listener_reconnects_after_connection_loss() {
    let scope = Scope::new().await;
    let app = unique("sqlq-listen");
    let slow_poll = |c: &mut SqlQueueConfig| c.poll_interval_ms = 10_000;
    let consumer = scope.queue(&app, slow_poll).await;
    let publisher = scope.queue("sluice-sqlqueue-p", slow_poll).await;
    must(publisher.declare().await, "declare");
    // sqlx re-listens with `LISTEN "channel";`, so match loosely.
    let listen_query = format!("LISTEN \"{}\"%", consumer.notify_channel());
    let listener_pids = || async {
        sqlx::query_scalar::<_, i32>(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND query LIKE $2",
        )
        .bind(&app)
        .bind(&listen_query)
        .fetch_all(&scope.admin)
        .await
        .unwrap()
    };

    // Consuming starts the listener and returns once it listens.
    let first = must(consumer.consume(Lane::Standard, 1).await, "consume");
    let pids = listener_pids().await;
    assert_eq!(
        pids.len(),
        1,
        "expected one LISTEN connection, saw {pids:?}"
    );
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pids[0])
        .fetch_one(&scope.admin)
        .await
        .unwrap();
    assert!(killed);

    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = listener_pids().await;
        if now.len() == 1 && now[0] != pids[0] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the listener never came back: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(first);
    expect_woken(&consumer, &publisher, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_dropped_too_often_goes_to_dead() {
    let scope = Scope::new().await;
    let queue = scope
        .queue("sluice-sqlqueue-dead", |c| {
            c.visibility_timeout_secs = 1;
            c.max_receive_count = 2;
        })
        .await;
    common::dropped_too_often_goes_to_dead(&queue, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_requeues_do_not_count_towards_the_limit() {
    let scope = Scope::new().await;
    let queue = scope
        .queue("sluice-sqlqueue-requeue", |c| c.max_receive_count = 2)
        .await;
    common::requeues_do_not_count_towards_the_limit(&queue, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_stale_ack_keeps_the_new_claim() {
    let scope = Scope::new().await;
    let fast_poll = |c: &mut SqlQueueConfig| c.poll_interval_ms = 100;
    let a = scope.queue("sluice-sqlqueue-a", fast_poll).await;
    let b = scope.queue("sluice-sqlqueue-b", fast_poll).await;
    let expire = || async {
        sqlx::query(&format!(
            "UPDATE {}.{TABLE} SET available_at = now() - interval '1 second' WHERE namespace = $1",
            scope.schema()
        ))
        .bind(&scope.namespace)
        .execute(&scope.admin)
        .await
        .unwrap();
    };
    common::stale_ack_keeps_the_new_claim(&a, &b, expire).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_namespaces_are_isolated() {
    let scope = Scope::new().await;
    let a = scope.queue("sluice-sqlqueue-a", |_| {}).await;
    let b = scope
        .queue("sluice-sqlqueue-b", |c| c.namespace = unique("other"))
        .await;
    common::namespaces_are_isolated(&a, &b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_publish_before_declare_is_unroutable() {
    let scope = Scope::unmigrated().await;
    let queue = scope.queue("sluice-sqlqueue-undeclared", |_| {}).await;
    common::publish_before_declare_is_unroutable(&queue).await;
}

/// The convenience constructor works from a URL and shares the table with a pool-based queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connect_from_url() {
    let scope = Scope::new().await;
    let from_url = SqlQueue::connect(&database_url(), config(scope.schema(), &scope.namespace))
        .await
        .unwrap();
    must(from_url.declare().await, "declare");
    let other = scope.queue("sluice-sqlqueue-url", |_| {}).await;
    let sent = job("t1");
    must(
        from_url
            .publish(Lane::Retry, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(other.consume(Lane::Retry, 1).await, "consume");
    let got = conformance::next_within(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(got.job, sent);
    must(got.ack().await, "ack");
}

/// The store's batched ingest pointed at these lanes (as `sluice serve` does when the queue is
/// in the store's schema) puts a job straight into its lane, and the statement's NOTIFY wakes
/// an idle consumer in another pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_jobs_the_store_puts_in_their_lane_are_delivered_and_wake_idle_consumers() {
    let scope = Scope::new().await;
    let slow_poll = |c: &mut SqlQueueConfig| c.poll_interval_ms = 10_000;
    let consumer_queue = scope.queue("sluice-sqlqueue-c", slow_poll).await;
    let store = scope.db.store().await;
    let mut config = config(scope.schema(), &scope.namespace);
    slow_poll(&mut config);
    let ingest_queue = SqlQueue::postgres(store.pg_pool().unwrap().clone(), config).unwrap();
    common::jobs_the_store_enqueues_are_delivered(store, &ingest_queue, &consumer_queue).await;
}
