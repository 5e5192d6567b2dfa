//! The broker conformance suite and SQS-only cases (long delays, visibility heartbeat,
//! redrive, namespacing), each test against a moto server of its own.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName};
use futures::StreamExt;
use sluice_broker::conformance::{self, Fixture, RawAccess, RawMessage};
use sluice_broker::{broker_conformance_suite, Broker, BrokerError, Lane, PublishOptions};
use sluice_sqs::testing::MotoServer;
use sluice_sqs::{SqsBroker, SqsConfig, REASON_ATTRIBUTE};

/// Talks to the lanes with plain aws-sdk-sqs calls, beneath the broker's encoding.
/// Owns the moto server, so it lives exactly as long as the fixture.
struct SdkRaw {
    client: aws_sdk_sqs::Client,
    prefix: String,
    _moto: Arc<MotoServer>,
}

impl SdkRaw {
    async fn url(&self, lane: Lane) -> String {
        self.client
            .get_queue_url()
            .queue_name(format!("{}-{}", self.prefix, lane.as_str()))
            .send()
            .await
            .unwrap()
            .queue_url
            .unwrap()
    }
}

#[async_trait::async_trait]
impl RawAccess for SdkRaw {
    async fn inject(&self, lane: Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        let url = self.url(lane).await;
        // SQS bodies are text; the suite's malformed body is UTF-8.
        let body = String::from_utf8(body).map_err(|e| BrokerError::Malformed(e.to_string()))?;
        self.client
            .send_message()
            .queue_url(url)
            .message_body(body)
            .send()
            .await
            .map_err(|e| BrokerError::Publish {
                queue: lane.to_string(),
                source: Box::new(e),
            })?;
        Ok(())
    }

    async fn take(&self, lane: Lane) -> Result<Option<RawMessage>, BrokerError> {
        let url = self.url(lane).await;
        let consume_error = |e: BoxedError| BrokerError::Consume {
            queue: lane.to_string(),
            source: e,
        };
        let out = self
            .client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(1)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| consume_error(Box::new(e)))?;
        let Some(msg) = out.messages.unwrap_or_default().into_iter().next() else {
            return Ok(None);
        };
        self.client
            .delete_message()
            .queue_url(&url)
            .receipt_handle(msg.receipt_handle.clone().unwrap())
            .send()
            .await
            .map_err(|e| consume_error(Box::new(e)))?;
        let reason = msg
            .message_attributes
            .as_ref()
            .and_then(|a| a.get(REASON_ATTRIBUTE))
            .and_then(|v: &MessageAttributeValue| v.string_value.clone());
        Ok(Some(RawMessage {
            body: msg.body.unwrap_or_default().into_bytes(),
            reason,
        }))
    }
}

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// A broker with `tune` applied to the moto test config, and raw access to its lanes.
async fn setup(tune: impl FnOnce(&mut SqsConfig)) -> (SqsBroker, SdkRaw) {
    let moto = Arc::new(MotoServer::start().await);
    let mut config = moto.config();
    tune(&mut config);
    let broker = SqsBroker::connect(config.clone()).await.unwrap();
    let raw = SdkRaw {
        client: broker.client().clone(),
        prefix: config.prefix,
        _moto: moto,
    };
    (broker, raw)
}

async fn fixture() -> Fixture {
    // 5 s visibility: a dropped delivery comes back well inside RECEIVE_TIMEOUT (15 s), and
    // heartbeats (every third of it) stay few enough that moto, one Python process on a
    // loaded machine, answers them before a held message turns visible again (at 2 s it
    // sometimes did not, and a held message went to a second consumer).
    let (broker, raw) = setup(|c| c.visibility_timeout_secs = 5).await;
    Fixture {
        broker: Arc::new(broker),
        raw: Box::new(raw),
    }
}

broker_conformance_suite!(sqs, fixture());

/// Runs an SQS-only case with the suite's declare / timeout / cleanup wrapper.
async fn run_case<'a, Fut>(fixture: &'a Fixture, case: impl FnOnce(&'a Fixture) -> Fut)
where
    Fut: std::future::Future<Output = ()> + 'a,
{
    conformance::run(fixture, case).await;
}

async fn fixture_with(tune: impl FnOnce(&mut SqsConfig)) -> (Fixture, SqsBroker) {
    let (broker, raw) = setup(tune).await;
    let fixture = Fixture {
        broker: Arc::new(broker.clone()),
        raw: Box::new(raw),
    };
    (fixture, broker)
}

/// A delay beyond `max_native_delay_secs` is re-delayed on receipt, never handed out early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_delay_beyond_native_limit_is_not_early() {
    let (fx, _) = fixture_with(|c| c.max_native_delay_secs = 1).await;
    run_case(&fx, |fx| async move {
        let broker = fx.broker.as_ref();
        let delay = Duration::from_secs(4);
        let sent = conformance::job("t1");
        let started = Instant::now();
        broker
            .publish(Lane::Retry, &sent, PublishOptions::delayed(delay))
            .await
            .unwrap();
        let mut consumer = broker.consume(Lane::Retry, 10).await.unwrap();
        let got =
            conformance::next_within(&mut consumer, delay + conformance::RECEIVE_TIMEOUT).await;
        let waited = started.elapsed();
        assert!(
            waited >= delay,
            "delivered after {waited:?}, asked {delay:?}"
        );
        assert_eq!(got.job, sent);
        assert!(
            !got.redelivered,
            "a re-delayed message counted as redelivered"
        );
        assert_eq!(got.reason, None);
        got.ack().await.unwrap();
        // The hops deleted their copies: nothing else turns up.
        conformance::expect_nothing(&mut consumer).await;
        conformance::expect_depth(broker, Lane::Retry, 0).await;
    })
    .await;
}

/// A held delivery stays invisible past its visibility timeout (the heartbeat
/// extends it, even after its stream was dropped), and comes back once dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_heartbeat_keeps_held_delivery_until_dropped() {
    let visibility = Duration::from_secs(2);
    let (fx, _) = fixture_with(|c| c.visibility_timeout_secs = 2).await;
    run_case(&fx, |fx| async move {
        let broker = fx.broker.as_ref();
        let sent = conformance::job("t1");
        broker
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await
            .unwrap();
        let mut holder = broker.consume(Lane::Standard, 1).await.unwrap();
        let held = conformance::next(&mut holder).await;
        assert_eq!(held.job, sent);
        // The holder's stream goes away; the delivery it handed out is still held.
        drop(holder);

        let mut other = broker.consume(Lane::Standard, 1).await.unwrap();
        let hold = visibility * 3;
        match tokio::time::timeout(hold, other.next()).await {
            Err(_) => {}
            Ok(item) => panic!("a held delivery was handed out again: {item:?}"),
        }
        assert_eq!(broker.depth(Lane::Standard).await.unwrap(), 0);

        let dropped_at = Instant::now();
        drop(held);
        let again = conformance::next(&mut other).await;
        assert_eq!(again.job, sent);
        assert!(again.redelivered, "redelivery not marked");
        // It came back by its visibility timeout running out, not at once.
        let after = dropped_at.elapsed();
        assert!(
            after >= visibility / 2,
            "redelivered {after:?} after the drop; the heartbeat should have left it invisible"
        );
        again.ack().await.unwrap();
    })
    .await;
}

/// A message received and dropped `max_receive_count` times is moved to the dead
/// lane by the redrive policy `declare` sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_redrive_moves_repeatedly_dropped_message_to_dead() {
    const MAX_RECEIVES: u32 = 2;
    let (fx, _) = fixture_with(|c| {
        c.visibility_timeout_secs = 1;
        c.max_receive_count = MAX_RECEIVES;
    })
    .await;
    run_case(&fx, |fx| async move {
        let broker = fx.broker.as_ref();
        let sent = conformance::job("t1");
        broker
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await
            .unwrap();
        let mut consumer = broker.consume(Lane::Standard, 1).await.unwrap();
        for n in 1..=MAX_RECEIVES {
            let got = conformance::next(&mut consumer).await;
            assert_eq!(got.job, sent);
            assert_eq!(got.redelivered, n > 1, "receive {n}");
            drop(got);
        }
        // The next receive finds it over the limit and SQS moves it instead.
        match tokio::time::timeout(Duration::from_secs(4), consumer.next()).await {
            Err(_) => {}
            Ok(item) => panic!("received more than max_receive_count times: {item:?}"),
        }
        drop(consumer);
        conformance::expect_depth(broker, Lane::Standard, 0).await;
        conformance::expect_depth(broker, Lane::Dead, 1).await;
        let mut dead = broker.consume(Lane::Dead, 1).await.unwrap();
        let got = conformance::next(&mut dead).await;
        assert_eq!(got.job, sent);
        assert_eq!(got.lane, Lane::Dead);
        got.ack().await.unwrap();
    })
    .await;
}

/// `declare` is idempotent and sets each lane's visibility timeout and redrive policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_declare_sets_redrive_and_visibility() {
    let (fx, broker) = fixture_with(|c| {
        c.visibility_timeout_secs = 7;
        c.max_receive_count = 3;
    })
    .await;
    run_case(&fx, |_| async {
        broker.declare().await.unwrap();
        let client = broker.client();
        let url = |lane: Lane| {
            let name = broker.queue_name(lane);
            async move {
                client
                    .get_queue_url()
                    .queue_name(name)
                    .send()
                    .await
                    .unwrap()
                    .queue_url
                    .unwrap()
            }
        };
        let attrs = |url: String| async move {
            client
                .get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::All)
                .send()
                .await
                .unwrap()
                .attributes
                .unwrap_or_default()
        };
        let dead = attrs(url(Lane::Dead).await).await;
        let dead_arn = dead.get(&QueueAttributeName::QueueArn).unwrap().clone();
        assert!(
            !dead.contains_key(&QueueAttributeName::RedrivePolicy),
            "the dead lane must not redrive: {dead:?}"
        );
        for lane in Lane::ALL {
            let got = attrs(url(lane).await).await;
            assert_eq!(
                got.get(&QueueAttributeName::VisibilityTimeout)
                    .map(String::as_str),
                Some("7"),
                "{lane}"
            );
            if lane == Lane::Dead {
                continue;
            }
            let policy: serde_json::Value =
                serde_json::from_str(got.get(&QueueAttributeName::RedrivePolicy).unwrap()).unwrap();
            assert_eq!(policy["deadLetterTargetArn"], dead_arn.as_str(), "{lane}");
            let max = &policy["maxReceiveCount"];
            assert!(max == 3 || max == "3", "{lane}: {policy}");
        }
    })
    .await;
}

/// Publishing into a lane that was never declared fails instead of vanishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_publish_to_undeclared_lane_is_unroutable() {
    let (broker, _raw) = setup(|_| {}).await;
    let result = broker
        .publish(
            Lane::Batch,
            &conformance::job("t1"),
            PublishOptions::default(),
        )
        .await;
    assert!(
        matches!(result, Err(BrokerError::Unroutable { .. })),
        "{result:?}"
    );
    let consume = broker.consume(Lane::Batch, 1).await;
    assert!(
        matches!(consume, Err(BrokerError::Consume { .. })),
        "consume of an undeclared lane"
    );
}

/// `delete_all` removes this prefix's lanes and no queue of a longer prefix that starts with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_delete_all_spares_other_namespaces() {
    let moto = MotoServer::start().await;
    let config = moto.config();
    let neighbour_config = SqsConfig {
        prefix: format!("{}-staging", config.prefix),
        ..config.clone()
    };
    let broker = SqsBroker::connect(config).await.unwrap();
    let neighbour = SqsBroker::connect(neighbour_config).await.unwrap();
    broker.declare().await.unwrap();
    neighbour.declare().await.unwrap();
    broker.delete_all().await.unwrap();
    for lane in Lane::ALL {
        assert!(
            matches!(broker.depth(lane).await, Err(BrokerError::Admin { .. })),
            "{lane} survived delete_all"
        );
        assert_eq!(
            neighbour.depth(lane).await.unwrap(),
            0,
            "neighbour's {lane}"
        );
    }
    neighbour.delete_all().await.unwrap();
}

/// No more than `prefetch` deliveries are unsettled at once; settling one frees a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_consumer_respects_prefetch() {
    let (fx, _) = fixture_with(|_| {}).await;
    run_case(&fx, |fx| async move {
        let broker = fx.broker.as_ref();
        for _ in 0..5 {
            broker
                .publish(
                    Lane::Priority,
                    &conformance::job("t1"),
                    PublishOptions::default(),
                )
                .await
                .unwrap();
        }
        let mut consumer = broker.consume(Lane::Priority, 2).await.unwrap();
        let first = conformance::next(&mut consumer).await;
        let second = conformance::next(&mut consumer).await;
        let (first_id, second_id) = (first.job.request_id, second.job.request_id);
        match tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
            Err(_) => {}
            Ok(item) => panic!("a third unsettled delivery with prefetch 2: {item:?}"),
        }
        conformance::expect_depth(broker, Lane::Priority, 3).await;
        first.ack().await.unwrap();
        let third = conformance::next(&mut consumer).await;
        second.ack().await.unwrap();
        let third_id = third.job.request_id;
        third.ack().await.unwrap();
        let mut ids = HashSet::from([first_id, second_id, third_id]);
        for _ in 0..2 {
            let got = conformance::next(&mut consumer).await;
            ids.insert(got.job.request_id);
            got.ack().await.unwrap();
        }
        assert_eq!(ids.len(), 5, "every message once");
        conformance::expect_nothing(&mut consumer).await;
        conformance::expect_depth(broker, Lane::Priority, 0).await;
    })
    .await;
}

/// A receive error becomes an `Err` item and the stream carries on once the queue is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqs_consumer_reports_errors_and_carries_on() {
    let (fx, broker) = fixture_with(|_| {}).await;
    run_case(&fx, |_| async {
        let mut consumer = broker.consume(Lane::Standard, 1).await.unwrap();
        broker.delete_all().await.unwrap();
        match tokio::time::timeout(conformance::RECEIVE_TIMEOUT, consumer.next()).await {
            Ok(Some(Err(BrokerError::Consume { .. }))) => {}
            other => panic!("expected a consume error, got {other:?}"),
        }
        broker.declare().await.unwrap();
        let sent = conformance::job("t1");
        broker
            .publish(Lane::Standard, &sent, PublishOptions::default())
            .await
            .unwrap();
        let deadline = Instant::now() + conformance::RECEIVE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, consumer.next()).await {
                Ok(Some(Ok(got))) => {
                    assert_eq!(got.job, sent);
                    got.ack().await.unwrap();
                    break;
                }
                Ok(Some(Err(_))) => continue,
                other => panic!("the stream did not recover: {other:?}"),
            }
        }
    })
    .await;
}

/// A prefix SQS would refuse fails `connect` with a clear error, before any network call.
#[tokio::test]
async fn sqs_invalid_prefix_is_rejected() {
    let config = SqsConfig {
        prefix: "bad.prefix".into(),
        endpoint_url: Some("http://127.0.0.1:9".into()),
        ..SqsConfig::default()
    };
    let err = SqsBroker::connect(config).await.unwrap_err();
    let shown = format!("{err}");
    assert!(
        shown.contains("bad.prefix") && shown.contains("'.'"),
        "{shown}"
    );
}
