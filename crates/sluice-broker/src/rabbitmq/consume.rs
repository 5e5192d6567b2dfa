//! Consuming a lane: one channel and subscription per consumer, re-subscribed after failures,
//! packs unpacked into one delivery per job, malformed messages moved to the dead lane, and
//! acks settled on the delivery's own channel.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
        unpacked: VecDeque::new(),
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
    /// The jobs of the last pack not handed out yet.
    unpacked: VecDeque<Delivery>,
}

/// What a message carries: one job, or a pack of them (a JSON array).
enum Body {
    One(JobRef),
    Pack(Vec<JobRef>),
}

fn decode(data: &[u8]) -> Result<Body, String> {
    let first = data.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let jobs: Vec<JobRef> = serde_json::from_slice(data).map_err(|e| e.to_string())?;
        if jobs.is_empty() {
            return Err("an empty pack".into());
        }
        Ok(Body::Pack(jobs))
    } else {
        serde_json::from_slice(data)
            .map(Body::One)
            .map_err(|e| e.to_string())
    }
}

impl ConsumeLoop {
    /// The next well-formed delivery, re-subscribing as often as needed.
    async fn next_delivery(&mut self) -> Delivery {
        let queue = self.shared.queue_name(self.lane);
        loop {
            if let Some(delivery) = self.unpacked.pop_front() {
                return delivery;
            }
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
            match decode(&raw.data) {
                Ok(Body::One(job)) => {
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
                Ok(Body::Pack(jobs)) => {
                    let pack = Arc::new(Pack {
                        shared: self.shared.clone(),
                        lane: self.lane,
                        message: RabbitAck {
                            acker: raw.acker,
                            channel: sub.channel.clone(),
                        },
                        unsettled: AtomicUsize::new(jobs.len()),
                        give_back: AtomicBool::new(false),
                    });
                    self.unpacked.extend(jobs.into_iter().map(|job| {
                        let part = PackPart {
                            pack: pack.clone(),
                            job: job.clone(),
                        };
                        Delivery::new(
                            self.lane,
                            job,
                            raw.redelivered,
                            reason.clone(),
                            Box::new(part),
                        )
                    }));
                }
                Err(e) => self.dead_letter_malformed(raw, e).await,
            }
        }
    }

    /// Moves a message that is neither a `JobRef` nor a pack of them to the dead lane, so it
    /// cannot jam its lane.
    async fn dead_letter_malformed(&mut self, raw: lapin::message::Delivery, e: String) {
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
        // Their channel went with the subscription: the broker hands their pack out again.
        self.unpacked.clear();
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
    fn open(&self) -> Result<(), BrokerError> {
        if self.channel.status().connected() {
            return Ok(());
        }
        Err(BrokerError::Ack(
            "its channel is closed (connection lost or consumer dropped)".into(),
        ))
    }

    /// Acks the message, or nacks it when `nack` says whether to requeue.
    async fn settle(&self, nack: Option<bool>) -> Result<(), BrokerError> {
        self.open()?;
        let settled = match nack {
            None => timed(self.acker.ack(BasicAckOptions::default())).await,
            Some(requeue) => {
                let opts = BasicNackOptions {
                    requeue,
                    multiple: false,
                };
                timed(self.acker.nack(opts)).await
            }
        };
        settled.map_err(BrokerError::Ack)
    }
}

#[async_trait::async_trait]
impl Acknowledge for RabbitAck {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.settle(None).await
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        self.settle(Some(requeue)).await
    }
}

/// One message carrying several jobs. It is settled once, when the last of its jobs is: acked,
/// or given back whole if a job could not be given back on its own. Until then a crash or a
/// lost channel returns every job in it, and the claims fence the ones that already ran.
struct Pack {
    shared: Arc<Shared>,
    lane: Lane,
    message: RabbitAck,
    unsettled: AtomicUsize,
    give_back: AtomicBool,
}

impl Pack {
    /// Counts one job settled, and settles the message after the last.
    async fn settle_one(&self) -> Result<(), BrokerError> {
        self.message.open()?;
        if self.unsettled.fetch_sub(1, Ordering::AcqRel) != 1 {
            return Ok(());
        }
        let give_back = self.give_back.load(Ordering::Acquire);
        self.message.settle(give_back.then_some(true)).await
    }
}

/// One job of a [`Pack`].
struct PackPart {
    pack: Arc<Pack>,
    job: JobRef,
}

#[async_trait::async_trait]
impl Acknowledge for PackPart {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.pack.settle_one().await
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        if !requeue {
            return self.pack.settle_one().await;
        }
        // Back to the lane on its own, so the pack's other jobs need not come back with it.
        let alone = Outgoing::job(self.pack.lane, &self.job, PublishOptions::default())?;
        match self.pack.shared.publish_items(&[alone]).await {
            Ok(()) => self.pack.settle_one().await,
            Err(e) => {
                self.pack.give_back.store(true, Ordering::Release);
                self.pack.settle_one().await?;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> JobRef {
        super::super::test_job("t")
    }

    #[test]
    fn a_body_is_one_job_or_a_pack_of_them() {
        let one = job();
        let Ok(Body::One(got)) = decode(&serde_json::to_vec(&one).unwrap_or_default()) else {
            panic!("a plain job did not decode as one");
        };
        assert_eq!(got, one);

        let pack = vec![job(), job()];
        let mut body = b" \n".to_vec();
        body.extend(serde_json::to_vec(&pack).unwrap_or_default());
        let Ok(Body::Pack(got)) = decode(&body) else {
            panic!("a pack did not decode as one");
        };
        assert_eq!(got, pack);
    }

    #[test]
    fn an_empty_or_broken_pack_is_malformed() {
        assert!(decode(b"[]").is_err());
        assert!(decode(b"[{\"request_id\": 1}]").is_err());
        assert!(decode(b"[").is_err());
        assert!(decode(b"").is_err());
    }
}
