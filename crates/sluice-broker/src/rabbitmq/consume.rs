//! Consuming a lane: one channel and subscription per consumer, re-subscribed after failures,
//! malformed messages moved to the dead lane, and acks settled on the delivery's own channel.

use std::future::Future;
use std::sync::Arc;

use futures::StreamExt;
use lapin::acker::Acker;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use tracing::{info, warn};

use super::publish::Outgoing;
use super::{timed, Shared, REASON_HEADER};
use crate::{Acknowledge, Backoff, BrokerError, Consumer, Delivery, JobRef, Lane, PublishOptions};

/// A consumer of `lane`: well-formed deliveries for ever, re-subscribing as often as needed.
pub(super) async fn start(
    shared: Arc<Shared>,
    lane: Lane,
    prefetch: u16,
) -> Result<Consumer, BrokerError> {
    // Subscribe once up front so a missing queue or bad permissions fail the call.
    let sub = subscribe(&shared, lane, prefetch).await?;
    let state = ConsumeLoop {
        shared,
        lane,
        prefetch,
        sub: Some(sub),
        backoff: Backoff::default(),
    };
    Ok(Box::pin(futures::stream::unfold(
        state,
        |mut state| async move {
            let delivery = state.next_delivery().await;
            Some((Ok(delivery), state))
        },
    )))
}

/// Only our own header counts: the `x-death` header that the holding queues add
/// when they release a delayed message says nothing about why a job died.
fn reason_of(props: &BasicProperties) -> Option<String> {
    match props.headers().as_ref()?.inner().get(REASON_HEADER)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// A consumer's channel and lapin stream; the channel closes when the last clone drops.
struct Subscription {
    channel: Channel,
    consumer: lapin::Consumer,
}

async fn subscribe(
    shared: &Shared,
    lane: Lane,
    prefetch: u16,
) -> Result<Subscription, BrokerError> {
    let queue = shared.queue_name(lane);
    let consume_error = |source| BrokerError::Consume {
        queue: queue.clone(),
        source,
    };
    let conn = shared.connection().await?;
    let channel = timed(conn.create_channel()).await.map_err(consume_error)?;
    // AMQP reads a prefetch of 0 as "unlimited", which is never what a caller means.
    timed(channel.basic_qos(prefetch.max(1), BasicQosOptions::default()))
        .await
        .map_err(consume_error)?;
    let tag = format!("sluice-{}-{}", lane.as_str(), uuid::Uuid::now_v7());
    let consumer = timed(channel.basic_consume(
        &queue,
        &tag,
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .map_err(consume_error)?;
    Ok(Subscription { channel, consumer })
}

struct ConsumeLoop {
    shared: Arc<Shared>,
    lane: Lane,
    prefetch: u16,
    sub: Option<Subscription>,
    backoff: Backoff,
}

impl ConsumeLoop {
    /// The next well-formed delivery, re-subscribing as often as needed.
    async fn next_delivery(&mut self) -> Delivery {
        let queue = self.shared.queue_name(self.lane);
        loop {
            let Some(sub) = self.sub.as_mut() else {
                match subscribe(&self.shared, self.lane, self.prefetch).await {
                    Ok(sub) => {
                        info!(%queue, "re-subscribed");
                        self.sub = Some(sub);
                        self.backoff = Backoff::default();
                    }
                    Err(e) => {
                        warn!(%queue, error = %e, "re-subscribing failed; will retry");
                        tokio::time::sleep(self.backoff.next_delay()).await;
                    }
                }
                continue;
            };
            let raw = match sub.consumer.next().await {
                Some(Ok(raw)) => raw,
                Some(Err(e)) => {
                    warn!(%queue, error = %e, "consumer failed; re-subscribing");
                    self.drop_subscription().await;
                    continue;
                }
                None => {
                    warn!(%queue, "consumer cancelled by the broker; re-subscribing");
                    self.drop_subscription().await;
                    continue;
                }
            };
            let reason = reason_of(&raw.properties);
            match serde_json::from_slice::<JobRef>(&raw.data) {
                Ok(job) => {
                    let handle = RabbitAck {
                        acker: raw.acker,
                        channel: sub.channel.clone(),
                    };
                    return Delivery::new(
                        self.lane,
                        job,
                        raw.redelivered,
                        reason,
                        Box::new(handle),
                    );
                }
                Err(e) => self.dead_letter_malformed(raw, e).await,
            }
        }
    }

    /// Moves a message that is not a `JobRef` to the dead lane so it cannot jam its lane.
    async fn dead_letter_malformed(&mut self, raw: lapin::message::Delivery, e: serde_json::Error) {
        let queue = self.shared.queue_name(self.lane);
        if self.lane == Lane::Dead {
            // Re-dead-lettering would loop; leave it unacked for an operator.
            warn!(%queue, error = %e, "malformed message in the dead lane left unacked");
            return;
        }
        warn!(%queue, error = %e, "malformed message moved to the dead lane");
        let item = Outgoing {
            lane: Lane::Dead,
            message_id: raw
                .properties
                .message_id()
                .as_ref()
                .map(|id| id.to_string()),
            body: raw.data,
            opts: PublishOptions::reason(format!("malformed message: {e}")),
        };
        match self.shared.publish_items(&[item]).await {
            Ok(()) => {
                if let Err(e) = timed(raw.acker.ack(BasicAckOptions::default())).await {
                    warn!(%queue, error = %e, "ack of a dead-lettered malformed message failed");
                }
            }
            Err(e) => {
                // Closing the channel returns the message to the lane for another try.
                warn!(%queue, error = %e, "cannot dead-letter a malformed message; re-subscribing");
                self.drop_subscription().await;
            }
        }
    }

    async fn drop_subscription(&mut self) {
        self.sub = None;
        tokio::time::sleep(self.backoff.next_delay()).await;
    }
}

/// Settles one delivery on the channel it came from. Holding the channel keeps it
/// open until every delivery from it is settled, even after its stream is dropped.
struct RabbitAck {
    acker: Acker,
    channel: Channel,
}

impl RabbitAck {
    async fn settle(self, op: impl Future<Output = lapin::Result<()>>) -> Result<(), BrokerError> {
        if !self.channel.status().connected() {
            return Err(BrokerError::Ack(
                "its channel is closed (connection lost or consumer dropped)".into(),
            ));
        }
        timed(op).await.map_err(BrokerError::Ack)
    }
}

#[async_trait::async_trait]
impl Acknowledge for RabbitAck {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let acker = self.acker.clone();
        self.settle(acker.ack(BasicAckOptions::default())).await
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        let acker = self.acker.clone();
        let opts = BasicNackOptions {
            requeue,
            multiple: false,
        };
        self.settle(acker.nack(opts)).await
    }
}
