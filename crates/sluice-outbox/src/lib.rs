//! The bridge from the store's outbox to the broker: publish a message once its transaction
//! committed, forget the row once the broker confirmed it, and relay rows that were left behind.
//!
//! A crash between commit and confirm only delays a message; it never loses one.

use sluice_broker::{Broker, BrokerError, PublishOptions};
use sluice_store::{OutboxMessage, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Messages waiting for a background publish; beyond this the relay picks them up later.
const BACKGROUND_QUEUE: usize = 16_384;
/// Background batches being confirmed at once.
const BACKGROUND_BATCHES: usize = 4;

/// Publishes outbox messages; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    broker: Arc<dyn Broker>,
    confirmed: mpsc::UnboundedSender<i64>,
    background: mpsc::Sender<OutboxMessage>,
}

impl Publisher {
    /// Also starts the task that deletes confirmed outbox rows in batches.
    pub fn new(store: Store, broker: Arc<dyn Broker>) -> Publisher {
        let (confirmed, mut rx) = mpsc::unbounded_channel::<i64>();
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(1024);
            while rx.recv_many(&mut ids, 1024).await > 0 {
                // A failed delete only means the relay publishes a duplicate later, which claims fence off.
                if let Err(error) = store.mark_published(&ids).await {
                    tracing::warn!(message = "could not forget published outbox rows", %error, rows = ids.len());
                }
                ids.clear();
            }
        });
        let (background, rx) = mpsc::channel(BACKGROUND_QUEUE);
        let publisher = Publisher {
            broker,
            confirmed,
            background,
        };
        tokio::spawn(publisher.clone().publish_batches(rx));
        publisher
    }

    /// Gather messages handed to [`Publisher::publish_in_background`] into pipelined batches.
    async fn publish_batches(self, mut rx: mpsc::Receiver<OutboxMessage>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(BACKGROUND_BATCHES));
        let mut batch = Vec::with_capacity(512);
        while rx.recv_many(&mut batch, 512).await > 0 {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let publisher = self.clone();
            let messages = std::mem::take(&mut batch);
            tokio::spawn(async move {
                let n = messages.len();
                if let Err(error) = publisher.publish_many(messages).await {
                    tracing::warn!(message = "publish failed; the relay will retry", messages = n, %error);
                }
                drop(slot);
            });
        }
    }

    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Publish one message and wait for the broker's confirm.
    pub async fn publish(&self, message: OutboxMessage) -> Result<(), BrokerError> {
        let id = message.outbox_id;
        self.broker
            .publish(message.lane, &message.job, options(&message))
            .await?;
        let _ = self.confirmed.send(id);
        Ok(())
    }

    /// Publish many messages, pipelined.
    pub async fn publish_many(&self, messages: Vec<OutboxMessage>) -> Result<(), BrokerError> {
        if messages.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = messages.iter().map(|m| m.outbox_id).collect();
        let items = messages
            .into_iter()
            .map(|m| {
                let opts = options(&m);
                (m.lane, m.job, opts)
            })
            .collect();
        self.broker.publish_batch(items).await?;
        for id in ids {
            let _ = self.confirmed.send(id);
        }
        Ok(())
    }

    /// Publish without waiting, batched with other callers; on failure, or when too many
    /// are waiting, the relay publishes it later.
    pub fn publish_in_background(&self, message: OutboxMessage) {
        if let Err(error) = self.background.try_send(message) {
            tracing::debug!(message = "background publish queue full; leaving the message to the relay", %error);
        }
    }
}

fn options(message: &OutboxMessage) -> PublishOptions {
    let delay = message.delay();
    PublishOptions {
        delay: (!delay.is_zero()).then_some(delay),
        reason: message.reason.clone(),
    }
}

/// How the relay behaves.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    pub interval: Duration,
    /// Rows younger than this belong to the writer that is publishing them right now.
    pub grace: Duration,
    pub batch: i64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            grace: Duration::from_secs(5),
            batch: 500,
        }
    }
}

/// Periodically publish outbox rows nobody published (broker down, process killed).
pub fn spawn_relay(
    store: Store,
    publisher: Publisher,
    config: RelayConfig,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(config.interval) => {}
            }
            loop {
                let rows = match store
                    .unpublished(config.grace, Duration::from_secs(30), config.batch)
                    .await
                {
                    Ok(rows) => rows,
                    Err(error) => {
                        tracing::warn!(message = "relay could not read the outbox", %error);
                        break;
                    }
                };
                let n = rows.len();
                if n == 0 {
                    break;
                }
                match publisher.publish_many(rows).await {
                    Ok(()) => tracing::info!(message = "relayed unpublished outbox rows", rows = n),
                    Err(error) => {
                        tracing::warn!(message = "relay publish failed; will retry", %error);
                        break;
                    }
                }
                if (n as i64) < config.batch {
                    break;
                }
            }
        }
    })
}
