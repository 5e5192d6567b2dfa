//! The behaviour every [`Broker`] backend must show, as backend-neutral async checks.
//! [`broker_conformance_suite!`](crate::broker_conformance_suite) turns them into one test per case.
//!
//! A backend's test file supplies a [`Fixture`]: a broker in a namespace of
//! its own (a fresh queue prefix) plus [`RawAccess`] to the backend's storage,
//! which the malformed-message case needs to bypass the broker's encoding.
//! Checks panic on failure, like assertions; every wait is bounded.

use std::collections::HashSet;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use sluice_core::RequestId;

use crate::{Broker, BrokerError, Consumer, Delivery, JobRef, Lane, PublishOptions};

/// How long one case may take, setup and cleanup excluded.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long to wait for a message that should arrive.
pub const RECEIVE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to watch for a message that should not arrive.
pub const QUIET_PERIOD: Duration = Duration::from_millis(750);

/// One message as the backend stores it.
#[derive(Debug, Clone)]
pub struct RawMessage {
    pub body: Vec<u8>,
    pub reason: Option<String>,
}

/// Backend-specific access to a lane, beneath the [`Broker`] abstraction.
#[async_trait::async_trait]
pub trait RawAccess: Send + Sync {
    /// Put bytes into a lane as they are, durably.
    async fn inject(&self, lane: Lane, body: Vec<u8>) -> Result<(), BrokerError>;
    /// Remove one ready message from a lane, if there is one.
    async fn take(&self, lane: Lane) -> Result<Option<RawMessage>, BrokerError>;
}

/// What each case runs against. The broker must use a namespace no other test shares.
pub struct Fixture {
    pub broker: Arc<dyn Broker>,
    pub raw: Box<dyn RawAccess>,
}

/// Declares the lanes, runs one case under [`CASE_TIMEOUT`], then deletes the
/// fixture's queues whether the case passed or not.
pub async fn run<'a, Fut>(fixture: &'a Fixture, case: impl FnOnce(&'a Fixture) -> Fut)
where
    Fut: Future<Output = ()> + 'a,
{
    must(fixture.broker.declare().await, "declare");
    let outcome = AssertUnwindSafe(tokio::time::timeout(CASE_TIMEOUT, case(fixture)))
        .catch_unwind()
        .await;
    let cleanup = fixture.broker.delete_all().await;
    match outcome {
        Err(panic) => std::panic::resume_unwind(panic),
        Ok(Err(_)) => panic!("case did not finish within {CASE_TIMEOUT:?}"),
        Ok(Ok(())) => {}
    }
    must(cleanup, "delete_all");
}

/// Generates one `#[tokio::test]` per conformance case inside `mod $suite`.
///
/// `$fixture` is an expression evaluating to a future of [`Fixture`]; it is
/// evaluated once per test, inside the module (which imports `super::*`).
#[macro_export]
macro_rules! broker_conformance_suite {
    ($suite:ident, $fixture:expr) => {
        mod $suite {
            #[allow(unused_imports)]
            use super::*;

            $crate::broker_conformance_suite!(@cases $fixture;
                publish_then_consume_and_ack,
                nack_requeue_redelivers,
                delayed_publish_is_not_early,
                dead_lane_keeps_the_reason,
                dropped_consumer_gets_redelivered,
                depth_counts_ready_messages,
                concurrent_consumers_get_each_message_once,
                publish_batch_delivers_all,
                malformed_message_goes_to_dead,
            );
        }
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture: $crate::conformance::Fixture = $fixture.await;
                $crate::conformance::run(&fixture, $crate::conformance::$case).await;
            }
        )*
    };
}

/// A job with a fresh id.
pub fn job(tenant: &str) -> JobRef {
    JobRef {
        waiting_since_ms: None,
        tokens: 0,
        rate_limited: false,
        request_id: RequestId::new(),
        tenant: tenant.to_owned(),
        model: "small".to_owned(),
        attempt: 1,
    }
}

/// The value of a broker call that must succeed.
pub fn must<T>(result: Result<T, BrokerError>, what: &str) -> T {
    match result {
        Ok(value) => value,
        Err(e) => panic!("{what} failed: {e}"),
    }
}

/// The next delivery, which must arrive within `within`.
pub async fn next_within(consumer: &mut Consumer, within: Duration) -> Delivery {
    match tokio::time::timeout(within, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("consumer yielded an error: {e}"),
        Ok(None) => panic!("consumer stream ended"),
        Err(_) => panic!("no delivery within {within:?}"),
    }
}

pub async fn next(consumer: &mut Consumer) -> Delivery {
    next_within(consumer, RECEIVE_TIMEOUT).await
}

/// Fails if a delivery arrives during [`QUIET_PERIOD`].
pub async fn expect_nothing(consumer: &mut Consumer) {
    if let Ok(item) = tokio::time::timeout(QUIET_PERIOD, consumer.next()).await {
        panic!("expected no delivery, got {item:?}");
    }
}

/// Waits until the lane's depth is `expected` (backends may report it with a lag).
pub async fn expect_depth(broker: &dyn Broker, lane: Lane, expected: u64) {
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    loop {
        let depth = must(broker.depth(lane).await, "depth");
        if depth == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "depth of {lane} stayed {depth}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Case 1: a confirmed message round-trips and an ack removes it for good.
pub async fn publish_then_consume_and_ack(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let sent = job("t1");
    must(
        broker
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(broker.consume(Lane::Standard, 10).await, "consume");
    let got = next(&mut consumer).await;
    assert_eq!(got.job, sent);
    assert_eq!(got.lane, Lane::Standard);
    assert!(!got.redelivered, "first delivery marked redelivered");
    assert_eq!(got.reason, None);
    must(got.ack().await, "ack");
    expect_nothing(&mut consumer).await;
    drop(consumer);

    expect_depth(broker, Lane::Standard, 0).await;
    let mut again = must(broker.consume(Lane::Standard, 10).await, "re-consume");
    expect_nothing(&mut again).await;
}

/// Case 2: `nack(requeue = true)` hands the message out again, marked redelivered.
pub async fn nack_requeue_redelivers(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let sent = job("t1");
    must(
        broker
            .publish(Lane::Priority, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(broker.consume(Lane::Priority, 1).await, "consume");
    let first = next(&mut consumer).await;
    assert!(!first.redelivered);
    must(first.nack(true).await, "nack");
    let second = next(&mut consumer).await;
    assert_eq!(second.job, sent);
    assert!(
        second.redelivered,
        "requeued message not marked redelivered"
    );
    must(second.ack().await, "ack");
    expect_nothing(&mut consumer).await;
}

/// Case 3: a delayed message is neither ready nor delivered before its delay, then arrives.
pub async fn delayed_publish_is_not_early(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let delay = Duration::from_millis(1200);
    let sent = job("t1");
    let started = Instant::now();
    must(
        broker
            .publish(Lane::Retry, &sent, PublishOptions::delayed(delay))
            .await,
        "publish delayed",
    );
    assert_eq!(
        must(broker.depth(Lane::Retry).await, "depth"),
        0,
        "a delayed message counted as ready"
    );
    let mut consumer = must(broker.consume(Lane::Retry, 10).await, "consume");
    let got = next_within(&mut consumer, delay + RECEIVE_TIMEOUT).await;
    let waited = started.elapsed();
    assert!(
        waited >= delay,
        "delivered after {waited:?}, asked {delay:?}"
    );
    assert_eq!(got.job, sent);
    assert_eq!(got.lane, Lane::Retry);
    assert!(!got.redelivered, "delayed delivery marked redelivered");
    assert_eq!(got.reason, None);
    must(got.ack().await, "ack");
}

/// Case 4: the dead lane carries the reason a job died, and no reason when none was given.
pub async fn dead_lane_keeps_the_reason(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let reason = "provider returned 400: context length exceeded ✗";
    let with_reason = job("t1");
    let without = job("t2");
    must(
        broker
            .publish(Lane::Dead, &with_reason, PublishOptions::reason(reason))
            .await,
        "publish dead",
    );
    must(
        broker
            .publish(Lane::Dead, &without, PublishOptions::default())
            .await,
        "publish dead",
    );
    let mut consumer = must(broker.consume(Lane::Dead, 10).await, "consume dead");
    for _ in 0..2 {
        let got = next(&mut consumer).await;
        assert_eq!(got.lane, Lane::Dead);
        if got.job == with_reason {
            assert_eq!(got.reason.as_deref(), Some(reason));
        } else {
            assert_eq!(got.job, without);
            assert_eq!(got.reason, None);
        }
        must(got.ack().await, "ack");
    }
}

/// Case 5: a message whose consumer went away unacked goes to the next consumer.
pub async fn dropped_consumer_gets_redelivered(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let sent = job("t1");
    must(
        broker
            .publish(Lane::Batch, &sent, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(broker.consume(Lane::Batch, 1).await, "consume");
    let got = next(&mut consumer).await;
    assert_eq!(got.job, sent);
    drop(got);
    drop(consumer);

    let mut consumer = must(broker.consume(Lane::Batch, 1).await, "consume again");
    let again = next(&mut consumer).await;
    assert_eq!(again.job, sent);
    assert!(
        again.redelivered,
        "redelivery after a lost consumer not marked"
    );
    must(again.ack().await, "ack");
}

/// Case 6: depth counts ready messages per lane, not unacked ones.
pub async fn depth_counts_ready_messages(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    for lane in Lane::ALL {
        expect_depth(broker, lane, 0).await;
    }
    for (lane, count) in [(Lane::Priority, 3), (Lane::Batch, 2)] {
        for _ in 0..count {
            must(
                broker
                    .publish(lane, &job("t1"), PublishOptions::default())
                    .await,
                "publish",
            );
        }
    }
    expect_depth(broker, Lane::Priority, 3).await;
    expect_depth(broker, Lane::Batch, 2).await;
    for lane in [Lane::Standard, Lane::Retry, Lane::Dead] {
        expect_depth(broker, lane, 0).await;
    }

    let mut consumer = must(broker.consume(Lane::Priority, 1).await, "consume");
    let held = next(&mut consumer).await;
    expect_depth(broker, Lane::Priority, 2).await;
    must(held.ack().await, "ack");
    drop(consumer);
    expect_depth(broker, Lane::Priority, 2).await;
}

/// Case 7: competing consumers between them see every message exactly once.
pub async fn concurrent_consumers_get_each_message_once(fx: &Fixture) {
    const MESSAGES: usize = 200;
    const CONSUMERS: usize = 4;
    let broker = fx.broker.clone();
    let jobs: Vec<JobRef> = (0..MESSAGES).map(|i| job(&format!("t{}", i % 7))).collect();
    let items = jobs
        .iter()
        .map(|j| (Lane::Standard, j.clone(), PublishOptions::default()))
        .collect();
    must(broker.publish_batch(items).await, "publish_batch");

    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONSUMERS {
        let mut consumer = must(broker.consume(Lane::Standard, 10).await, "consume");
        let seen = seen.clone();
        tasks.spawn(async move {
            while let Some(item) = consumer.next().await {
                let delivery = must(item, "consumer item");
                let id = delivery.job.request_id;
                // Yield between messages so the consumers interleave.
                tokio::task::yield_now().await;
                must(delivery.ack().await, "ack");
                seen.lock().unwrap_or_else(|p| p.into_inner()).push(id);
            }
        });
    }

    let deadline = Instant::now() + RECEIVE_TIMEOUT * 2;
    while seen.lock().unwrap_or_else(|p| p.into_inner()).len() < MESSAGES {
        if let Some(Err(e)) = tasks.try_join_next() {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {} of {MESSAGES} messages consumed",
            seen.lock().unwrap_or_else(|p| p.into_inner()).len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give duplicates a chance to show up before counting.
    tokio::time::sleep(QUIET_PERIOD).await;
    tasks.abort_all();
    while let Some(result) = tasks.join_next().await {
        if let Err(e) = result {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(seen.len(), MESSAGES, "deliveries acked in total");
    let unique: HashSet<RequestId> = seen.into_iter().collect();
    let expected: HashSet<RequestId> = jobs.iter().map(|j| j.request_id).collect();
    assert_eq!(unique, expected);
    expect_depth(fx.broker.as_ref(), Lane::Standard, 0).await;
}

/// Case 8: a large pipelined batch arrives complete.
pub async fn publish_batch_delivers_all(fx: &Fixture) {
    // Many times any backend's batch size (SQS: 10, RabbitMQ: confirms in flight).
    const MESSAGES: usize = 200;
    let broker = fx.broker.as_ref();
    let jobs: Vec<JobRef> = (0..MESSAGES).map(|_| job("bulk")).collect();
    let items = jobs
        .iter()
        .map(|j| (Lane::Batch, j.clone(), PublishOptions::default()))
        .collect();
    must(broker.publish_batch(items).await, "publish_batch");
    // A backend may pack jobs published together into fewer messages, never into more.
    let deadline = Instant::now() + RECEIVE_TIMEOUT;
    loop {
        let depth = must(broker.depth(Lane::Batch).await, "depth");
        if (1..=MESSAGES as u64).contains(&depth) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "depth of the batch lane stayed {depth} after publishing {MESSAGES} jobs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut consumer = must(broker.consume(Lane::Batch, 100).await, "consume");
    let mut seen = HashSet::new();
    for _ in 0..MESSAGES {
        let got = next(&mut consumer).await;
        assert!(
            seen.insert(got.job.request_id),
            "duplicate {}",
            got.job.request_id
        );
        must(got.ack().await, "ack");
    }
    let expected: HashSet<RequestId> = jobs.iter().map(|j| j.request_id).collect();
    assert_eq!(seen, expected);
    expect_nothing(&mut consumer).await;
}

/// Case 9: a body that is not a job is moved to the dead lane with a reason,
/// is never handed to the consumer, and does not stop the stream.
pub async fn malformed_message_goes_to_dead(fx: &Fixture) {
    let broker = fx.broker.as_ref();
    let garbage = b"{\"request_id\": \"not a job\"".to_vec();
    must(
        fx.raw.inject(Lane::Standard, garbage.clone()).await,
        "inject raw",
    );
    let good = job("t1");
    must(
        broker
            .publish(Lane::Standard, &good, PublishOptions::default())
            .await,
        "publish",
    );
    let mut consumer = must(broker.consume(Lane::Standard, 10).await, "consume");
    let got = next(&mut consumer).await;
    assert_eq!(got.job, good, "the malformed message was not skipped");
    must(got.ack().await, "ack");
    expect_nothing(&mut consumer).await;
    expect_depth(broker, Lane::Standard, 0).await;

    expect_depth(broker, Lane::Dead, 1).await;
    let dead = must(fx.raw.take(Lane::Dead).await, "take dead");
    let Some(dead) = dead else {
        panic!("dead lane is empty");
    };
    assert_eq!(dead.body, garbage);
    let reason = dead.reason.unwrap_or_default();
    assert!(
        reason.starts_with("malformed message"),
        "unexpected reason {reason:?}"
    );
}
