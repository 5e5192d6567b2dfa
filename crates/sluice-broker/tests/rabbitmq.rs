//! The broker conformance suite and RabbitMQ-only cases, against a real RabbitMQ
//! (`SLUICE_TEST_RABBITMQ_URL`, default guest@127.0.0.1:5672). Each test owns a random queue prefix.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_broker::conformance::{self, Fixture, RawAccess, RawMessage};
use sluice_broker::rabbitmq::REASON_HEADER;
use sluice_broker::{
    broker_conformance_suite, Broker, BrokerError, Lane, PublishOptions, RabbitBroker, RabbitConfig,
};

fn url() -> String {
    std::env::var("SLUICE_TEST_RABBITMQ_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn broker() -> RabbitBroker {
    let config = RabbitConfig {
        url: url(),
        prefix: format!("test-{}", uuid::Uuid::now_v7()),
        ..RabbitConfig::default()
    };
    RabbitBroker::connect(config).await.unwrap()
}

/// Talks to the lanes with plain lapin, beneath the broker's encoding.
struct LapinRaw {
    prefix: String,
    channel: Channel,
    _conn: Connection,
}

impl LapinRaw {
    async fn new(prefix: &str) -> Self {
        let conn = Connection::connect(&url(), ConnectionProperties::default())
            .await
            .unwrap();
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        Self {
            prefix: prefix.to_owned(),
            channel,
            _conn: conn,
        }
    }

    fn queue(&self, lane: Lane) -> String {
        format!("{}.{}", self.prefix, lane.as_str())
    }
}

#[async_trait::async_trait]
impl RawAccess for LapinRaw {
    async fn inject(&self, lane: Lane, body: Vec<u8>) -> Result<(), BrokerError> {
        let queue = self.queue(lane);
        let fail = |e: lapin::Error| BrokerError::Publish {
            queue: queue.clone(),
            source: Box::new(e),
        };
        let confirm = self
            .channel
            .basic_publish(
                "",
                &queue,
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .map_err(fail)?
            .await
            .map_err(fail)?;
        assert!(confirm.is_ack(), "raw publish not confirmed: {confirm:?}");
        Ok(())
    }

    async fn take(&self, lane: Lane) -> Result<Option<RawMessage>, BrokerError> {
        let queue = self.queue(lane);
        let got = self
            .channel
            .basic_get(&queue, BasicGetOptions { no_ack: true })
            .await
            .map_err(|e| BrokerError::Consume {
                queue: queue.clone(),
                source: Box::new(e),
            })?;
        Ok(got.map(|msg| {
            let reason = msg
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(REASON_HEADER).cloned())
                .and_then(|v| match v {
                    AMQPValue::LongString(s) => Some(s.to_string()),
                    _ => None,
                });
            RawMessage {
                body: msg.delivery.data.clone(),
                reason,
            }
        }))
    }
}

async fn fixture() -> Fixture {
    let broker = broker().await;
    let raw = LapinRaw::new(&broker.config().prefix).await;
    Fixture {
        broker: Arc::new(broker),
        raw: Box::new(raw),
    }
}

broker_conformance_suite!(rabbitmq, fixture());

/// The Erlang pids of the server-side processes of a client's connections.
async fn server_connection_pids(client_name: &str) -> Vec<String> {
    // The table format prints pids as `close_connection` wants them (JSON does not).
    let out = tokio::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "--quiet",
            "--no-table-headers",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "rabbitmqctl list_connections failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Prefixes are unique per test, so the quoted name identifies our connection.
    let quoted = format!("\"{client_name}\"");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&quoted))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// Closes the broker's connection from the server side, as a broker restart or a
/// network cut would. Retries, since a fresh connection takes a moment to be listed.
async fn kill_connection(broker: &RabbitBroker) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let pids = loop {
        let pids = server_connection_pids(&broker.connection_name()).await;
        if !pids.is_empty() {
            break pids;
        }
        assert!(Instant::now() < deadline, "connection never listed");
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for pid in pids {
        let out = tokio::process::Command::new("rabbitmqctl")
            .args(["close_connection", &pid, "sluice conformance test"])
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "rabbitmqctl close_connection failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Case 10: after the server closes the connection, the consumer re-subscribes,
/// unacked work comes back, acks on the dead channel fail, and publishing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_survives_server_closing_the_connection() {
    let broker = broker().await;
    let fixture = Fixture {
        raw: Box::new(LapinRaw::new(&broker.config().prefix).await),
        broker: Arc::new(broker.clone()),
    };
    conformance::run(&fixture, |_| async {
        let before = conformance::job("t1");
        broker
            .publish(Lane::Standard, &before, PublishOptions::default())
            .await
            .unwrap();
        let mut consumer = broker.consume(Lane::Standard, 10).await.unwrap();
        let held = conformance::next(&mut consumer).await;
        assert_eq!(held.job, before);

        kill_connection(&broker).await;

        // The unacked message coming back proves the old channel is gone.
        let again = conformance::next_within(&mut consumer, Duration::from_secs(30)).await;
        assert_eq!(again.job, before);
        assert!(again.redelivered);
        let stale = held.ack().await;
        assert!(
            matches!(stale, Err(BrokerError::Ack(_))),
            "ack on a dead channel: {stale:?}"
        );
        again.ack().await.unwrap();

        let after = conformance::job("t1");
        broker
            .publish(Lane::Standard, &after, PublishOptions::default())
            .await
            .unwrap();
        let got = conformance::next(&mut consumer).await;
        assert_eq!(got.job, after);
        assert!(!got.redelivered);
        got.ack().await.unwrap();
        conformance::expect_nothing(&mut consumer).await;
        assert_eq!(
            server_connection_pids(&broker.connection_name())
                .await
                .len(),
            1,
            "expected exactly one live connection after reconnecting"
        );
    })
    .await;
}

/// Publishing into a lane that was never declared fails instead of vanishing.
#[tokio::test]
async fn rabbitmq_publish_to_undeclared_lane_fails() {
    let broker = broker().await;
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
    broker.delete_all().await.unwrap();
}

/// Delayed messages wait in a holding queue that `delete_all` removes too.
#[tokio::test]
async fn rabbitmq_delete_all_removes_holding_queues() {
    let broker = broker().await;
    broker.declare().await.unwrap();
    broker
        .publish(
            Lane::Retry,
            &conformance::job("t1"),
            PublishOptions::delayed(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    broker.delete_all().await.unwrap();
    let raw = LapinRaw::new(&broker.config().prefix).await;
    let holding = format!("{}.delay.retry.60000", broker.config().prefix);
    let gone = raw
        .channel
        .queue_declare(
            &holding,
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await;
    assert!(gone.is_err(), "holding queue {holding} survived delete_all");
}

async fn broker_packing(pack: usize) -> RabbitBroker {
    let config = RabbitConfig {
        url: url(),
        prefix: format!("test-{}", uuid::Uuid::now_v7()),
        pack,
    };
    let broker = RabbitBroker::connect(config).await.unwrap();
    broker.declare().await.unwrap();
    broker
}

fn jobs(n: usize) -> Vec<sluice_broker::JobRef> {
    (0..n).map(|i| conformance::job(&format!("t{i}"))).collect()
}

async fn publish_all(broker: &RabbitBroker, lane: Lane, jobs: &[sluice_broker::JobRef]) {
    let items = jobs
        .iter()
        .map(|j| (lane, j.clone(), PublishOptions::default()))
        .collect();
    broker.publish_batch(items).await.unwrap();
}

/// A batch's jobs share messages of up to `pack` jobs; each is delivered on its own, and a pack
/// is removed only once all its jobs are settled: one left unsettled brings its pack back whole.
#[tokio::test]
async fn rabbitmq_packs_a_batch_and_removes_a_pack_once_every_job_is_settled() {
    let broker = broker_packing(16).await;
    let sent = jobs(40);
    publish_all(&broker, Lane::Standard, &sent).await;
    conformance::expect_depth(&broker, Lane::Standard, 3).await;

    let mut consumer = broker.consume(Lane::Standard, 10).await.unwrap();
    let mut received = Vec::new();
    for _ in 0..sent.len() {
        received.push(conformance::next(&mut consumer).await);
    }
    let order: Vec<_> = received.iter().map(|d| d.job.clone()).collect();
    assert_eq!(order, sent, "jobs arrive in the order they were published");
    assert!(received.iter().all(|d| !d.redelivered));
    conformance::expect_nothing(&mut consumer).await;

    // Settle all but the first job; the two packs without it go, the first one stays unacked.
    let mut received = received.into_iter();
    let held = received.next().unwrap();
    for delivery in received {
        delivery.ack().await.unwrap();
    }
    drop(held);
    drop(consumer);

    let mut again = broker.consume(Lane::Standard, 10).await.unwrap();
    let mut back = Vec::new();
    for _ in 0..16 {
        let delivery = conformance::next(&mut again).await;
        assert!(delivery.redelivered, "{delivery:?}");
        back.push(delivery);
    }
    let back_jobs: Vec<_> = back.iter().map(|d| d.job.clone()).collect();
    assert_eq!(back_jobs, sent[..16], "the whole first pack comes back");
    conformance::expect_nothing(&mut again).await;
    for delivery in back {
        delivery.ack().await.unwrap();
    }
    drop(again);
    conformance::expect_depth(&broker, Lane::Standard, 0).await;
    let mut after = broker.consume(Lane::Standard, 10).await.unwrap();
    conformance::expect_nothing(&mut after).await;
    broker.delete_all().await.unwrap();
}

/// A job given back (`nack` with requeue) from a pack returns to its lane alone; the pack's
/// other jobs, acked or dropped from the queue, do not come with it.
#[tokio::test]
async fn rabbitmq_a_job_given_back_from_a_pack_comes_back_alone() {
    let broker = broker_packing(16).await;
    let sent = jobs(5);
    publish_all(&broker, Lane::Priority, &sent).await;
    conformance::expect_depth(&broker, Lane::Priority, 1).await;

    let mut consumer = broker.consume(Lane::Priority, 1).await.unwrap();
    for (i, job) in sent.iter().enumerate() {
        let delivery = conformance::next(&mut consumer).await;
        assert_eq!(&delivery.job, job);
        match i {
            2 => delivery.nack(true).await.unwrap(),
            4 => delivery.nack(false).await.unwrap(),
            _ => delivery.ack().await.unwrap(),
        }
    }
    let back = conformance::next(&mut consumer).await;
    assert_eq!(back.job, sent[2], "only the given-back job returns");
    back.ack().await.unwrap();
    conformance::expect_nothing(&mut consumer).await;
    drop(consumer);
    conformance::expect_depth(&broker, Lane::Priority, 0).await;
    broker.delete_all().await.unwrap();
}

/// What a worker that predates packs can read: with `pack = 1` every job is a message of its
/// own, a plain JSON object; by default a batch's jobs for one lane are one JSON array.
#[tokio::test]
async fn rabbitmq_pack_one_publishes_one_plain_message_per_job() {
    for (pack, messages) in [(1, 3), (16, 1)] {
        let broker = broker_packing(pack).await;
        let sent = jobs(3);
        publish_all(&broker, Lane::Batch, &sent).await;
        conformance::expect_depth(&broker, Lane::Batch, messages).await;
        let raw = LapinRaw::new(&broker.config().prefix).await;
        let mut bodies = Vec::new();
        while let Some(message) = raw.take(Lane::Batch).await.unwrap() {
            bodies.push(serde_json::from_slice::<serde_json::Value>(&message.body).unwrap());
        }
        let expected: Vec<serde_json::Value> = sent
            .iter()
            .map(|j| serde_json::to_value(j).unwrap())
            .collect();
        if pack == 1 {
            assert_eq!(bodies, expected, "pack = 1");
        } else {
            assert_eq!(bodies, [serde_json::Value::Array(expected)], "pack = 16");
        }
        broker.delete_all().await.unwrap();
    }
}

/// A pack size outside 1..=512 is refused before anything connects.
#[tokio::test]
async fn rabbitmq_refuses_a_pack_size_out_of_range() {
    for pack in [0, 513] {
        let config = RabbitConfig {
            url: url(),
            prefix: format!("test-{}", uuid::Uuid::now_v7()),
            pack,
        };
        match RabbitBroker::connect(config).await {
            Err(BrokerError::Config(message)) => {
                assert!(message.contains("pack"), "{message}");
            }
            other => panic!("pack = {pack}: {other:?}"),
        }
    }
}

/// What a delivery holds (`Delivery::holding`) is let go when it is settled or dropped, so a
/// worker can bound the jobs it takes from packs.
#[tokio::test]
async fn rabbitmq_a_delivery_lets_go_of_what_it_holds_when_settled_or_dropped() {
    let broker = broker_packing(16).await;
    let sent = jobs(3);
    publish_all(&broker, Lane::Standard, &sent).await;
    let held = Arc::new(tokio::sync::Semaphore::new(3));
    let mut consumer = broker.consume(Lane::Standard, 10).await.unwrap();
    let mut taken = Vec::new();
    for _ in 0..3 {
        let permit = Arc::clone(&held).acquire_owned().await.unwrap();
        taken.push(conformance::next(&mut consumer).await.holding(permit));
    }
    assert_eq!(held.available_permits(), 0);
    let mut taken = taken.into_iter();
    taken.next().unwrap().ack().await.unwrap();
    assert_eq!(held.available_permits(), 1, "after an ack");
    taken.next().unwrap().nack(false).await.unwrap();
    assert_eq!(held.available_permits(), 2, "after a nack");
    drop(taken);
    assert_eq!(held.available_permits(), 3, "after a drop");
    broker.delete_all().await.unwrap();
}
