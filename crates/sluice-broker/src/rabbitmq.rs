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

use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde::Deserialize;
use sluice_core::redact_url;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{BoxError, Broker, BrokerError, Consumer, JobRef, Lane, PublishOptions};

mod consume;
mod publish;

use publish::Outgoing;

/// Header carrying a dead-lettered job's reason.
pub const REASON_HEADER: &str = "x-sluice-reason";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bound for any single round trip, so a wedged connection surfaces as an error.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Keeps `x-expires` (2 * ttl + 60 s) well inside RabbitMQ's 32-bit millisecond arguments.
const MAX_DELAY_MS: u64 = 7 * 24 * 3600 * 1000;
/// A pack is settled only when all its jobs are, and comes back whole after a crash:
/// past a few hundred, one slow job would hold too many finished ones.
const MAX_PACK: usize = 512;

/// Jobs one message carries at most, by default.
pub const DEFAULT_PACK: usize = 16;

/// Where the lanes live. `prefix` namespaces every queue (`{prefix}.{lane}`).
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RabbitConfig {
    pub url: String,
    pub prefix: String,
    /// Most jobs one message carries: jobs published together to one lane share a message,
    /// since RabbitMQ's cost is per message (a persistent write, a confirm, a delivery, an ack).
    /// 1 publishes one message per job, which is all a worker older than packs can read.
    pub pack: usize,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "sluice".into(),
            pack: DEFAULT_PACK,
        }
    }
}

impl RabbitConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.pack == 0 || self.pack > MAX_PACK {
            return Err(format!(
                "pack = {} is out of range: 1 (one message per job) to {MAX_PACK}",
                self.pack
            ));
        }
        Ok(())
    }
}

impl fmt::Debug for RabbitConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitConfig")
            .field("url", &redact_url(&self.url))
            .field("prefix", &self.prefix)
            .field("pack", &self.pack)
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

impl RabbitBroker {
    /// Connects now, so a wrong URL or credentials fail at startup.
    pub async fn connect(config: RabbitConfig) -> Result<Self, BrokerError> {
        config.validate().map_err(BrokerError::Config)?;
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
        let items = Outgoing::packed(items, self.shared.config.pack)?;
        self.shared.publish_items(&items).await
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError> {
        consume::start(self.shared.clone(), lane, prefetch).await
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
}

/// A job with a fresh id, for the unit tests of this backend's modules.
#[cfg(test)]
fn test_job(tenant: &str) -> JobRef {
    JobRef {
        waiting_since_ms: None,
        tokens: 0,
        rate_limited: false,
        request_id: sluice_core::RequestId::new(),
        tenant: tenant.into(),
        model: "m".into(),
        attempt: 1,
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
            pack: 1,
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
    }
}
