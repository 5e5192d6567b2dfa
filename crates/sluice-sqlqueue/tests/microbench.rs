//! Throwaway: publish N in batches, then drain with 2 consumers acking each. Not committed.
#![allow(clippy::unwrap_used)]
use futures::StreamExt;
use sluice_broker::conformance::job;
use sluice_broker::{Broker, Lane, PublishOptions};
use sluice_sqlqueue::{SqlQueue, SqlQueueConfig};
use sluice_store::{Store, StoreConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};

const N: usize = 20_000;

async fn run(queue: Arc<SqlQueue>, label: &str) {
    queue.declare().await.unwrap();
    let jobs: Vec<_> = (0..N).map(|i| job(&format!("t{}", i % 7))).collect();
    let t0 = Instant::now();
    for chunk in jobs.chunks(256) {
        let items = chunk
            .iter()
            .map(|j| (Lane::Standard, j.clone(), PublishOptions::default()))
            .collect();
        queue.publish_batch(items).await.unwrap();
    }
    let publish = t0.elapsed();
    // single publishes too
    let t1 = Instant::now();
    for j in jobs.iter().take(2000) {
        queue
            .publish(Lane::Batch, j, PublishOptions::default())
            .await
            .unwrap();
    }
    let single = t1.elapsed();
    let t2 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for lane in [Lane::Standard, Lane::Standard, Lane::Batch] {
        let mut c = queue.consume(lane, 128).await.unwrap();
        let done = done.clone();
        tasks.spawn(async move {
            while let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(500), c.next()).await
            {
                d.ack().await.unwrap();
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let drain = t2.elapsed() - Duration::from_millis(500);
    assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), N + 2000);
    println!("BENCH {label}: publish_batch {N} in {publish:?} ({:.0}/s); publish x2000 in {single:?} ({:.0}/s); drain {} in {drain:?} ({:.0}/s)",
        N as f64 / publish.as_secs_f64(), 2000.0 / single.as_secs_f64(), N + 2000, (N + 2000) as f64 / drain.as_secs_f64());
    queue.delete_all().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn microbench_sqlite() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let store = Store::connect(&StoreConfig {
        url: format!("sqlite://{}", dir.path().join("b.db").display()),
        max_connections: 4,
        migrate: true,
        ..StoreConfig::default()
    })
    .await
    .unwrap();
    let q = SqlQueue::sqlite(
        store.sqlite_pool().unwrap().clone(),
        SqlQueueConfig::default(),
    )
    .unwrap();
    run(Arc::new(q), "sqlite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn microbench_postgres() {
    let db = sluice_testkit::ScratchDb::postgres("mb");
    let store = Store::connect(&StoreConfig {
        max_connections: 8,
        ..db.config()
    })
    .await
    .unwrap();
    let q =
        SqlQueue::postgres(store.pg_pool().unwrap().clone(), SqlQueueConfig::default()).unwrap();
    run(Arc::new(q), "postgres").await;
    store.close().await;
}
