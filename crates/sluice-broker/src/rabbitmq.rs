//! The RabbitMQ backend (lapin): durable lane queues, publisher confirms, manual acks,
//! TTL holding queues for delayed delivery, and reconnection after connection loss.
//!
//! One connection per broker, named `sluice:{prefix}` so operators can find it.
//! Publishing uses one confirm-mode channel; every consumer gets its own channel
//! so its prefetch and its unacked deliveries are its own.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use lapin::acker::Acker;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use sluice_core::redact_url;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{
    Acknowledge, Backoff, BoxError, Broker, BrokerError, Consumer, Delivery, JobRef, Lane,
    PublishOptions,
};

/// Header carrying a dead-lettered job's reason.
pub const REASON_HEADER: &str = "x-sluice-reason";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for any single round trip, so a wedged connection surfaces as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
const PUBLISH_ATTEMPTS: u32 = 3;
/// Publishing does not count as "use" for `x-expires`, so a holding queue is
/// redeclared (renewing its lease) at least this often while we publish into it.
const REDECLARE_HOLDING_AFTER: Duration = Duration::from_secs(30);
/// Keeps `x-expires` (2 * ttl + 60 s) well inside RabbitMQ's 32-bit millisecond arguments.
const MAX_DELAY_MS: u64 = 7 * 24 * 3600 * 1000;

/// Where the lanes live. `prefix` namespaces every queue (`{prefix}.{lane}`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitConfig {
    pub url: String,
    pub prefix: String,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "sluice".into(),
        }
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .finish()
    }
}

/// Rounds a delay up to its holding-queue bucket in milliseconds; `None` means no delay.
///
/// Buckets keep the number of holding queues small; rounding up means a
/// message is never delivered sooner than asked.
pub fn delay_bucket_ms(delay: Duration) -> Result<Option<u64>, BrokerError> {
    let ms = delay.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return Ok(None);
    }
    let ms = u64::try_from(ms)
        .ok()
        .filter(|ms| *ms <= MAX_DELAY_MS)
        .ok_or(BrokerError::DelayTooLong(delay))?;
    let step = match ms {
        0..=10_000 => 100,
        10_001..=300_000 => 1_000,
        _ => 10_000,
    };
    Ok(Some(ms.div_ceil(step) * step))
}

/// The RabbitMQ [`Broker`]. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct RabbitBroker {
    shared: Arc<Shared>,
}

impl fmt::Debug for RabbitBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitBroker")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: RabbitConfig,
    conn: Mutex<Option<Arc<Connection>>>,
    publisher: Mutex<Option<Channel>>,
    /// Declares, deletes and passive declares, which close their channel on failure.
    admin: Mutex<Option<Channel>>,
    /// Holding queues this process declared, and when, for lease renewal and `delete_all`.
    holding: std::sync::Mutex<HashMap<String, Instant>>,
}

/// One message on its way out.
struct Outgoing {
    lane: Lane,
    body: Vec<u8>,
    message_id: Option<String>,
    opts: PublishOptions,
}

impl Outgoing {
    fn job(lane: Lane, job: &JobRef, opts: PublishOptions) -> Result<Self, BrokerError> {
        let body = serde_json::to_vec(job)
            .map_err(|e| BrokerError::Malformed(format!("cannot encode job: {e}")))?;
        Ok(Self {
            lane,
            body,
            message_id: Some(job.request_id.to_string()),
            opts,
        })
    }
}

impl RabbitBroker {
    /// Connects now, so a wrong URL or credentials fail at startup.
    pub async fn connect(config: RabbitConfig) -> Result<Self, BrokerError> {
        let shared = Arc::new(Shared {
            config,
            conn: Mutex::new(None),
            publisher: Mutex::new(None),
            admin: Mutex::new(None),
            holding: std::sync::Mutex::new(HashMap::new()),
        });
        shared.connection().await?;
        Ok(Self { shared })
    }

    pub fn config(&self) -> &RabbitConfig {
        &self.shared.config
    }

    /// The queue backing a lane, e.g. `sluice.priority`.
    pub fn queue_name(&self, lane: Lane) -> String {
        self.shared.queue_name(lane)
    }

    /// The client-provided connection name, for finding it in `rabbitmqctl list_connections`.
    pub fn connection_name(&self) -> String {
        self.shared.connection_name()
    }
}

#[async_trait::async_trait]
impl Broker for RabbitBroker {
    async fn publish(
        &self,
        lane: Lane,
        job: &JobRef,
        opts: PublishOptions,
    ) -> Result<(), BrokerError> {
        self.shared
            .publish_items(&[Outgoing::job(lane, job, opts)?])
            .await
    }

    async fn publish_batch(
        &self,
        items: Vec<(Lane, JobRef, PublishOptions)>,
    ) -> Result<(), BrokerError> {
        let items = items
            .into_iter()
            .map(|(lane, job, opts)| Outgoing::job(lane, &job, opts))
            .collect::<Result<Vec<_>, _>>()?;
        self.shared.publish_items(&items).await
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError> {
        // Subscribe once up front so a missing queue or bad permissions fail the call.
        let sub = subscribe(&self.shared, lane, prefetch).await?;
        let state = ConsumeLoop {
            shared: self.shared.clone(),
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

    async fn depth(&self, lane: Lane) -> Result<u64, BrokerError> {
        let queue = self.shared.queue_name(lane);
        let opts = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        let declared = self
            .shared
            .admin_op(&queue, |ch| {
                let queue = queue.clone();
                async move { ch.queue_declare(&queue, opts, FieldTable::default()).await }
            })
            .await?;
        Ok(u64::from(declared.message_count()))
    }

    async fn declare(&self) -> Result<(), BrokerError> {
        for lane in Lane::ALL {
            let queue = self.shared.queue_name(lane);
            self.shared
                .admin_op(&queue, |ch| {
                    let queue = queue.clone();
                    async move {
                        ch.queue_declare(&queue, durable(), FieldTable::default())
                            .await
                    }
                })
                .await?;
        }
        Ok(())
    }

    async fn delete_all(&self) -> Result<(), BrokerError> {
        // Holding queues declared by other processes are unknown here; their
        // `x-expires` removes them soon after they empty.
        let holding: Vec<String> = self.shared.holding_names();
        let lanes = Lane::ALL.map(|lane| self.shared.queue_name(lane));
        for queue in holding.iter().chain(lanes.iter()) {
            self.shared
                .admin_op(queue, |ch| {
                    let queue = queue.clone();
                    async move { ch.queue_delete(&queue, QueueDeleteOptions::default()).await }
                })
                .await?;
            self.shared.forget_holding(queue);
        }
        Ok(())
    }
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

/// Runs one lapin operation under [`OP_TIMEOUT`].
async fn timed<T>(fut: impl Future<Output = lapin::Result<T>>) -> Result<T, BoxError> {
    match tokio::time::timeout(OP_TIMEOUT, fut).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(Box::new(e)),
        Err(_) => Err(format!("no answer from RabbitMQ within {OP_TIMEOUT:?}").into()),
    }
}

impl Shared {
    fn queue_name(&self, lane: Lane) -> String {
        format!("{}.{}", self.config.prefix, lane.as_str())
    }

    fn connection_name(&self) -> String {
        format!("sluice:{}", self.config.prefix)
    }

    /// The live connection, reconnecting (once) if the last one died.
    async fn connection(&self) -> Result<Arc<Connection>, BrokerError> {
        let mut slot = self.conn.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.status().connected() {
                return Ok(conn.clone());
            }
        }
        *slot = None;
        let props =
            ConnectionProperties::default().with_connection_name(self.connection_name().into());
        let conn = match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect(&self.config.url, props),
        )
        .await
        {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => return Err(BrokerError::Connection(Box::new(e))),
            Err(_) => {
                return Err(BrokerError::Connection(
                    format!("no connection within {CONNECT_TIMEOUT:?}").into(),
                ))
            }
        };
        let name = self.connection_name();
        conn.on_error(move |e| warn!(connection = %name, error = %e, "RabbitMQ connection lost"));
        info!(connection = %self.connection_name(), url = %redact_url(&self.config.url), "connected to RabbitMQ");
        let conn = Arc::new(conn);
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn channel(
        &self,
        slot: &Mutex<Option<Channel>>,
        confirm: bool,
    ) -> Result<Channel, BoxError> {
        let mut slot = slot.lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        *slot = None;
        let conn = self.connection().await.map_err(Box::new)?;
        let ch = timed(conn.create_channel()).await?;
        if confirm {
            timed(ch.confirm_select(ConfirmSelectOptions::default())).await?;
        }
        *slot = Some(ch.clone());
        Ok(ch)
    }

    /// Drops a cached channel so the next use opens a fresh one.
    async fn discard(slot: &Mutex<Option<Channel>>) {
        slot.lock().await.take();
    }

    async fn admin_op<T, F, Fut>(&self, queue: &str, op: F) -> Result<T, BrokerError>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<T>>,
    {
        let admin_error = |source| BrokerError::Admin {
            queue: queue.to_owned(),
            source,
        };
        let ch = self
            .channel(&self.admin, false)
            .await
            .map_err(admin_error)?;
        let result = timed(op(ch)).await;
        if result.is_err() {
            Self::discard(&self.admin).await;
        }
        result.map_err(admin_error)
    }

    fn holding_names(&self) -> Vec<String> {
        match self.holding.lock() {
            Ok(map) => map.keys().cloned().collect(),
            Err(poisoned) => poisoned.into_inner().keys().cloned().collect(),
        }
    }

    fn forget_holding(&self, queue: &str) {
        let mut map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(queue);
    }

    /// Declares (or renews the lease of) the holding queue for `lane` and `ms`.
    async fn holding_queue(&self, lane: Lane, ms: u64) -> Result<String, BrokerError> {
        let target = self.queue_name(lane);
        let queue = format!("{}.delay.{}.{ms}", self.config.prefix, lane.as_str());
        let fresh = {
            let map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
            map.get(&queue)
                .is_some_and(|at| at.elapsed() < REDECLARE_HOLDING_AFTER)
        };
        if fresh {
            return Ok(queue);
        }
        let mut args = FieldTable::default();
        let ttl =
            i64::try_from(ms).map_err(|_| BrokerError::DelayTooLong(Duration::from_millis(ms)))?;
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
        args.insert("x-expires".into(), AMQPValue::LongLongInt(2 * ttl + 60_000));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(target.into()),
        );
        let declared_at = Instant::now();
        self.admin_op(&queue, |ch| {
            let queue = queue.clone();
            async move { ch.queue_declare(&queue, durable(), args).await }
        })
        .await?;
        let mut map = self.holding.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(queue.clone(), declared_at);
        Ok(queue)
    }

    /// Publishes with confirms, retrying the whole set after connection trouble.
    /// A retry may duplicate messages that did arrive; consumers fence duplicates.
    async fn publish_items(&self, items: &[Outgoing]) -> Result<(), BrokerError> {
        let mut backoff = Backoff::default();
        let mut attempt = 1;
        loop {
            match self.publish_once(items).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < PUBLISH_ATTEMPTS && retryable(&e) => {
                    warn!(error = %e, attempt, "publish failed; retrying");
                    if let BrokerError::Unroutable { queue } = &e {
                        // A holding queue may have expired or been purged: redeclare it.
                        self.forget_holding(queue);
                    }
                    Self::discard(&self.publisher).await;
                    tokio::time::sleep(backoff.next_delay()).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn publish_once(&self, items: &[Outgoing]) -> Result<(), BrokerError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut targets = Vec::with_capacity(items.len());
        for item in items {
            let target = match item.opts.delay.map(delay_bucket_ms).transpose()?.flatten() {
                Some(ms) => self.holding_queue(item.lane, ms).await?,
                None => self.queue_name(item.lane),
            };
            targets.push(target);
        }
        let publish_error = |queue: &str, source| BrokerError::Publish {
            queue: queue.to_owned(),
            source,
        };
        let first = targets.first().map_or("", String::as_str);
        let ch = self
            .channel(&self.publisher, true)
            .await
            .map_err(|e| publish_error(first, e))?;

        // Send everything first, then wait for the confirms together: one round trip per batch.
        let mut pending = Vec::with_capacity(items.len());
        for (item, queue) in items.iter().zip(&targets) {
            let confirm = timed(ch.basic_publish(
                "",
                queue,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &item.body,
                properties(item),
            ))
            .await
            .map_err(|e| publish_error(queue, e))?;
            pending.push(timed(confirm));
        }
        let confirms = futures::future::join_all(pending).await;
        for (confirm, queue) in confirms.into_iter().zip(&targets) {
            match confirm.map_err(|e| publish_error(queue, e))? {
                Confirmation::Ack(None) => {}
                // With `mandatory`, an unroutable message comes back attached to its ack.
                Confirmation::Ack(Some(_)) => {
                    return Err(BrokerError::Unroutable {
                        queue: queue.clone(),
                    })
                }
                Confirmation::Nack(_) => {
                    return Err(BrokerError::NotConfirmed {
                        queue: queue.clone(),
                    })
                }
                Confirmation::NotRequested => {
                    return Err(publish_error(
                        queue,
                        "the publish channel is not in confirm mode".into(),
                    ))
                }
            }
        }
        Ok(())
    }
}

fn retryable(e: &BrokerError) -> bool {
    matches!(
        e,
        BrokerError::Connection(_)
            | BrokerError::Publish { .. }
            | BrokerError::Unroutable { .. }
            | BrokerError::Admin { .. }
    )
}

fn properties(item: &Outgoing) -> BasicProperties {
    let mut props = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    if let Some(id) = &item.message_id {
        props = props.with_message_id(id.as_str().into());
    }
    if let Some(reason) = &item.opts.reason {
        let mut headers = FieldTable::default();
        headers.insert(
            REASON_HEADER.into(),
            AMQPValue::LongString(reason.as_str().into()),
        );
        props = props.with_headers(headers);
    }
    props
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_buckets() {
        let ms = |n| Duration::from_millis(n);
        assert_eq!(delay_bucket_ms(Duration::ZERO).ok(), Some(None));
        assert_eq!(
            delay_bucket_ms(Duration::from_nanos(1)).ok(),
            Some(Some(100))
        );
        assert_eq!(delay_bucket_ms(ms(1200)).ok(), Some(Some(1200)));
        assert_eq!(delay_bucket_ms(ms(1201)).ok(), Some(Some(1300)));
        assert_eq!(delay_bucket_ms(ms(10_000)).ok(), Some(Some(10_000)));
        assert_eq!(delay_bucket_ms(ms(10_001)).ok(), Some(Some(11_000)));
        assert_eq!(delay_bucket_ms(ms(300_001)).ok(), Some(Some(310_000)));
        assert!(delay_bucket_ms(Duration::from_secs(30 * 24 * 3600)).is_err());
        for n in [1, 99, 101, 9_999, 10_500, 299_999, 1_234_567] {
            let bucket = delay_bucket_ms(ms(n)).ok().flatten().unwrap_or(0);
            assert!(bucket >= n, "{n} ms rounded down to {bucket}");
        }
    }

    #[test]
    fn debug_hides_the_password() {
        let config = RabbitConfig {
            url: "amqp://app:s3cret@rabbit:5672/%2f".into(),
            prefix: "p".into(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
    }
}
