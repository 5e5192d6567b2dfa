//! Cases both SQL backends share beyond the conformance suite, a broker wrapper that keeps a
//! test's scratch database (Postgres schema, SQLite file) as long as its queue, and the store's
//! migrations, which make the queue's table.
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use sluice_broker::conformance::{self, expect_depth, job, next_within};
use sluice_broker::{Broker, BrokerError, Consumer, JobRef, Lane, PublishOptions};
use sluice_sqlqueue::SqlQueue;
use sluice_testkit::ScratchDb;

/// Runs the store's migrations on a scratch database (creating its PostgreSQL schema), as
/// `sluice` does at start: they make the queue's table.
pub async fn migrate(db: &ScratchDb) {
    db.store().await.close().await;
}

/// A queue and its scratch database, which goes (schema dropped, file deleted) when the last
/// handle on the queue does: after the suite's `delete_all`, and after a panic too.
pub struct Scratch {
    pub queue: SqlQueue,
    pub db: ScratchDb,
}

#[async_trait::async_trait]
impl Broker for Scratch {
    async fn publish(
        &self,
        lane: Lane,
        job: &JobRef,
        opts: PublishOptions,
    ) -> Result<(), BrokerError> {
        self.queue.publish(lane, job, opts).await
    }

    async fn publish_batch(
        &self,
        items: Vec<(Lane, JobRef, PublishOptions)>,
    ) -> Result<(), BrokerError> {
        self.queue.publish_batch(items).await
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError> {
        self.queue.consume(lane, prefetch).await
    }

    async fn depth(&self, lane: Lane) -> Result<u64, BrokerError> {
        self.queue.depth(lane).await
    }

    async fn declare(&self) -> Result<(), BrokerError> {
        self.queue.declare().await
    }

    async fn delete_all(&self) -> Result<(), BrokerError> {
        self.queue.delete_all().await
    }
}

pub fn must<T>(result: Result<T, BrokerError>, what: &str) -> T {
    conformance::must(result, what)
}

/// Receives and drops a message unsettled `max` times (each drop lets its claim expire),
/// then checks that the next receive moved it to the dead lane with a reason instead of
/// delivering it. `queue` needs a short visibility timeout and `max_receive_count = max`.
pub async fn dropped_too_often_goes_to_dead(queue: &SqlQueue, max: u32) {
    must(queue.declare().await, "declare");
    let sent = job("t1");
    must(
        queue
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let visibility = Duration::from_secs(queue.config().visibility_timeout_secs);
    let mut consumer = must(queue.consume(Lane::Standard, 1).await, "consume");
    for receive in 1..=max {
        let got = next_within(&mut consumer, visibility * 5).await;
        assert_eq!(got.job, sent);
        assert_eq!(got.redelivered, receive > 1, "receive {receive}");
        drop(got);
    }
    // The next receive is one too many: the message must not come back to the lane.
    if let Ok(item) = tokio::time::timeout(visibility * 3, consumer.next()).await {
        panic!("received more than max_receive_count = {max} times: {item:?}");
    }
    expect_depth(queue, Lane::Standard, 0).await;

    let mut dead = must(queue.consume(Lane::Dead, 1).await, "consume dead");
    let got = next_within(&mut dead, Duration::from_secs(5)).await;
    assert_eq!(got.job, sent);
    assert!(!got.redelivered, "a dead-lettered message starts afresh");
    let reason = got.reason.clone().unwrap_or_default();
    assert!(
        reason.contains(&format!("received {} times", max + 1))
            && reason.contains(&format!("max_receive_count is {max}")),
        "unexpected reason {reason:?}"
    );
    must(got.ack().await, "ack dead");
    expect_depth(queue, Lane::Dead, 0).await;
    must(queue.delete_all().await, "delete_all");
}

/// Explicit hand-backs (`nack(true)`, as workers do on shutdown) are redeliveries but
/// not failures: they must not push a message into the dead lane.
pub async fn requeues_do_not_count_towards_the_limit(queue: &SqlQueue, max: u32) {
    must(queue.declare().await, "declare");
    let sent = job("t1");
    must(
        queue
            .publish(Lane::Priority, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(queue.consume(Lane::Priority, 1).await, "consume");
    for receive in 1..=(max + 3) {
        let got = next_within(&mut consumer, Duration::from_secs(5)).await;
        assert_eq!(got.job, sent, "receive {receive}");
        assert_eq!(got.redelivered, receive > 1, "receive {receive}");
        must(got.nack(true).await, "nack");
    }
    let got = next_within(&mut consumer, Duration::from_secs(5)).await;
    assert_eq!(got.job, sent);
    must(got.ack().await, "ack");
    expect_depth(queue, Lane::Dead, 0).await;
    must(queue.delete_all().await, "delete_all");
}

/// A holder whose claim expired (a paused or partitioned process) must not delete the
/// message after someone else claimed it. `expire` ends every claim in the namespace
/// behind the queues' backs; `a` and `b` share the table and namespace.
pub async fn stale_ack_keeps_the_new_claim<F, Fut>(a: &SqlQueue, b: &SqlQueue, expire: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = ()>,
{
    must(a.declare().await, "declare");
    let sent = job("t1");
    must(
        a.publish(Lane::Standard, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut ca = must(a.consume(Lane::Standard, 1).await, "consume a");
    let stale = next_within(&mut ca, Duration::from_secs(5)).await;
    assert_eq!(stale.job, sent);

    let mut cb = must(b.consume(Lane::Standard, 1).await, "consume b");
    let mut fresh = None;
    // `a`'s heartbeat may renew its claim between the expiry and `b`'s claim: try again.
    for _ in 0..10 {
        expire().await;
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(1500), cb.next()).await {
            fresh = Some(must(item.unwrap(), "consumer b"));
            break;
        }
    }
    let fresh = fresh.expect("b never got the expired message");
    assert_eq!(fresh.job, sent);
    assert!(fresh.redelivered);

    let result = stale.ack().await;
    assert!(
        matches!(result, Err(BrokerError::Ack(_))),
        "stale ack: {result:?}"
    );
    // Had the stale ack deleted the row, this fenced ack would find nothing and fail.
    must(fresh.ack().await, "ack by the new holder");
    expect_depth(a, Lane::Standard, 0).await;
    drop(ca);
    drop(cb);
    must(a.delete_all().await, "delete_all");
}

/// Queues in different namespaces of one table see nothing of each other.
pub async fn namespaces_are_isolated(a: &SqlQueue, b: &SqlQueue) {
    assert_ne!(a.config().namespace, b.config().namespace);
    must(a.declare().await, "declare a");
    must(b.declare().await, "declare b");
    let sent = job("t1");
    must(
        a.publish(Lane::Batch, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    expect_depth(a, Lane::Batch, 1).await;
    expect_depth(b, Lane::Batch, 0).await;
    let mut cb = must(b.consume(Lane::Batch, 10).await, "consume b");
    conformance::expect_nothing(&mut cb).await;
    must(b.delete_all().await, "delete_all b");
    expect_depth(a, Lane::Batch, 1).await;
    let mut ca = must(a.consume(Lane::Batch, 10).await, "consume a");
    let got = next_within(&mut ca, Duration::from_secs(5)).await;
    assert_eq!(got.job, sent);
    must(got.ack().await, "ack");
    must(a.delete_all().await, "delete_all a");
}

/// Publishing before `declare()` fails loudly instead of vanishing.
pub async fn publish_before_declare_is_unroutable(queue: &SqlQueue) {
    let result = queue
        .publish(Lane::Batch, &job("t1"), PublishOptions::default())
        .await;
    assert!(
        matches!(result, Err(BrokerError::Unroutable { .. })),
        "{result:?}"
    );
    must(queue.delete_all().await, "delete_all before declare");
}

/// Reads one delivery in a task, so the consumer is idle-waiting while the test acts.
pub fn receive_in_background(
    mut consumer: Consumer,
) -> tokio::task::JoinHandle<(Instant, sluice_broker::Delivery, Consumer)> {
    tokio::spawn(async move {
        let got = match consumer.next().await {
            Some(Ok(delivery)) => delivery,
            other => panic!("consumer ended or failed: {other:?}"),
        };
        (Instant::now(), got, consumer)
    })
}

pub fn arc(queue: SqlQueue) -> Arc<dyn Broker> {
    Arc::new(queue)
}

/// `store`, enqueuing into `ingest_queue`'s lanes (`Store::enqueuing_into`), stores a job: it is
/// `Enqueued` with no outbox row, and `consumer_queue`'s consumer, idle with a fallback poll
/// longer than the wait here (so only a wake-up can bring the job in time), receives the job's
/// reference.
pub async fn jobs_the_store_enqueues_are_delivered(
    store: sluice_store::Store,
    ingest_queue: &SqlQueue,
    consumer_queue: &SqlQueue,
) {
    assert!(consumer_queue.config().poll_interval_ms >= 10_000);
    must(ingest_queue.declare().await, "declare");
    let store = store.enqueuing_into(sluice_store::LanesInDatabase {
        namespace: ingest_queue.config().namespace.clone(),
        channel: ingest_queue.notify_channel().to_owned(),
        wake: ingest_queue.waker(),
    });
    assert!(store.enqueues_directly());
    let consumer = must(consumer_queue.consume(Lane::Standard, 1).await, "consume");
    let receiving = receive_in_background(consumer);
    // Let the consumer find the lane empty and settle into its long wait.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let principal = sluice_core::Principal {
        tenant: "acme".into(),
        user: "u1".into(),
        tier: sluice_core::Tier::Pro,
        email: None,
        reuse_samples: false,
    };
    let request = sluice_core::JobRequest::new(
        "default",
        vec![sluice_core::Message::user(
            "a question of some forty characters",
        )],
    );
    let job = sluice_store::NewJob::new(principal, Lane::Standard, request.clone());
    let id = job.id;
    let writer = sluice_store::JobWriter::spawn(store.clone(), 1, 64);
    let stored = Instant::now();
    let accepted = writer.insert(job).await.unwrap();
    assert!(
        matches!(accepted, sluice_store::Accepted::Enqueued),
        "{accepted:?}"
    );
    let (arrived, got, _consumer) = tokio::time::timeout(Duration::from_secs(9), receiving)
        .await
        .expect("the idle consumer was not woken before its fallback poll")
        .unwrap();
    assert!(
        arrived - stored < Duration::from_secs(2),
        "the idle consumer took {:?} to notice the job",
        arrived - stored
    );
    assert_eq!(got.job.request_id, id);
    assert_eq!(got.job.tenant, "acme");
    assert_eq!(got.job.model, "default");
    assert_eq!(got.job.attempt, 0);
    assert_eq!(got.job.tokens, request.estimated_tokens());
    assert_eq!(
        store.outbox_len().await.unwrap(),
        0,
        "an outbox row was written"
    );
    let record = store.get_job("acme", id).await.unwrap().unwrap();
    assert_eq!(record.state, sluice_core::JobState::Queued);
    assert_eq!(store.events(id).await.unwrap().len(), 1);
    must(got.ack().await, "ack");
    store.close().await;
}
