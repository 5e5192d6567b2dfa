//! The bridge from the store's outbox to the broker: publish a message once its transaction
//! committed, forget the row once the broker confirmed it, and relay rows that were left behind.
//!
//! A crash between commit and confirm only delays a message; it never loses one.

use sluice_broker::{Broker, BrokerError, PublishOptions};
use sluice_store::{OutboxMessage, Store};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Messages waiting for a background publish; beyond this the relay picks them up later.
const BACKGROUND_QUEUE: usize = 16_384;
/// Background batches being confirmed at once.
const BACKGROUND_BATCHES: usize = 4;
/// Longest [`Publisher::settle`] waits for the background publishes under way: past it (a
/// broker that stopped answering) the process exits anyway and the relay publishes the rest.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a confirmed row waits to be forgotten together with later ones. Nobody waits on
/// the delete, and the relay leaves rows alone for far longer (`RelayConfig::grace`), so at a
/// moderate load one statement forgets what would otherwise take one statement per publish.
const FORGET_LINGER: Duration = Duration::from_millis(50);
/// Outbox rows forgotten in one statement at most; a full batch goes without lingering.
const FORGET_BATCH: usize = 1024;

/// Publishes outbox messages; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    broker: Arc<dyn Broker>,
    confirmed: mpsc::UnboundedSender<Forget>,
    background: mpsc::Sender<Background>,
}

/// What the background publisher is told.
enum Background {
    Publish(OutboxMessage),
    /// Answer once every message handed over before this one is confirmed (or has failed).
    Flush(oneshot::Sender<()>),
}

/// What the forgetting task is told.
enum Forget {
    /// The broker confirmed this outbox row's message.
    Row(i64),
    /// Forget every confirmed row now, then answer.
    Now(oneshot::Sender<()>),
}

impl Publisher {
    /// Also starts the task that deletes confirmed outbox rows in batches.
    pub fn new(store: Store, broker: Arc<dyn Broker>) -> Publisher {
        let (confirmed, rx) = mpsc::unbounded_channel();
        tokio::spawn(forget_confirmed(store, rx));
        let (background, rx) = mpsc::channel(BACKGROUND_QUEUE);
        let publisher = Publisher {
            broker,
            confirmed,
            background,
        };
        tokio::spawn(publisher.clone().publish_batches(rx));
        publisher
    }

    /// Before a process exits: finish the background publishes under way (for at most
    /// [`SETTLE_TIMEOUT`]), then forget the rows of every message confirmed. A row left behind
    /// waits for a relay, which publishes it late, or again (a duplicate the claims fence off).
    pub async fn settle(&self) {
        let (flushed, done) = oneshot::channel();
        if self
            .background
            .send(Background::Flush(flushed))
            .await
            .is_ok()
            && tokio::time::timeout(SETTLE_TIMEOUT, done).await.is_err()
        {
            tracing::warn!(
                message =
                    "background publishes still unconfirmed at exit; the relay will publish them"
            );
        }
        let (done, settled) = oneshot::channel();
        if self.confirmed.send(Forget::Now(done)).is_ok() {
            let _ = settled.await;
        }
    }

    /// Gather messages handed to [`Publisher::publish_in_background`] into pipelined batches.
    async fn publish_batches(self, mut rx: mpsc::Receiver<Background>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(BACKGROUND_BATCHES));
        let mut received = Vec::with_capacity(512);
        let mut flushes = Vec::new();
        while rx.recv_many(&mut received, 512).await > 0 {
            let mut messages = Vec::with_capacity(received.len());
            for item in received.drain(..) {
                match item {
                    Background::Publish(message) => messages.push(message),
                    Background::Flush(done) => flushes.push(done),
                }
            }
            if !messages.is_empty() {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let publisher = self.clone();
                tokio::spawn(async move {
                    let n = messages.len();
                    if let Err(error) = publisher.publish_many(messages).await {
                        tracing::warn!(message = "publish failed; the relay will retry", messages = n, %error);
                    }
                    drop(slot);
                });
            }
            if !flushes.is_empty() {
                // Every slot free: every batch handed over so far is confirmed or has failed.
                let all = u32::try_from(BACKGROUND_BATCHES).unwrap_or(u32::MAX);
                let Ok(idle) = slots.acquire_many(all).await else {
                    return;
                };
                drop(idle);
                for done in flushes.drain(..) {
                    let _ = done.send(());
                }
            }
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
        let _ = self.confirmed.send(Forget::Row(id));
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
            let _ = self.confirmed.send(Forget::Row(id));
        }
        Ok(())
    }

    /// Publish without waiting, batched with other callers; on failure, or when too many
    /// are waiting, the relay publishes it later.
    pub fn publish_in_background(&self, message: OutboxMessage) {
        if let Err(error) = self.background.try_send(Background::Publish(message)) {
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

/// Deletes confirmed outbox rows: whatever arrives within [`FORGET_LINGER`] of the first goes
/// in one statement, and a [`Forget::Now`] sends what waits at once.
async fn forget_confirmed(store: Store, rx: mpsc::UnboundedReceiver<Forget>) {
    gather_forgets(rx, |ids| {
        let store = store.clone();
        async move {
            // A failed delete only means the relay publishes a duplicate later, which claims
            // fence off.
            if let Err(error) = store.mark_published(&ids).await {
                tracing::warn!(message = "could not forget published outbox rows", %error, rows = ids.len());
            }
        }
    })
    .await
}

/// The gathering behind [`forget_confirmed`], apart from the store: `forget` gets at most
/// [`FORGET_BATCH`] ids at a time, and every `Forget::Now` is answered after what came before it.
async fn gather_forgets<F, Fut>(mut rx: mpsc::UnboundedReceiver<Forget>, mut forget: F)
where
    F: FnMut(Vec<i64>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ids = Vec::with_capacity(FORGET_BATCH);
    let mut settled = Vec::new();
    let mut received = Vec::with_capacity(FORGET_BATCH);
    while rx.recv_many(&mut received, FORGET_BATCH).await > 0 {
        let until = tokio::time::Instant::now() + FORGET_LINGER;
        loop {
            for message in received.drain(..) {
                match message {
                    Forget::Row(id) => ids.push(id),
                    Forget::Now(done) => settled.push(done),
                }
            }
            // Receiving at most the room left keeps a batch within FORGET_BATCH.
            let room = FORGET_BATCH - ids.len();
            if !settled.is_empty() || room == 0 {
                break;
            }
            match tokio::time::timeout_at(until, rx.recv_many(&mut received, room)).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        if !ids.is_empty() {
            forget(std::mem::replace(
                &mut ids,
                Vec::with_capacity(FORGET_BATCH),
            ))
            .await;
        }
        for done in settled.drain(..) {
            let _ = done.send(());
        }
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Each batch `forget` got, in order.
    type Batches = Arc<Mutex<Vec<Vec<i64>>>>;

    /// Runs the gathering on a channel, recording each batch `forget` gets.
    fn gathering() -> (mpsc::UnboundedSender<Forget>, Batches, JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&batches);
        let task = tokio::spawn(gather_forgets(rx, move |ids| {
            seen.lock().unwrap().push(ids);
            async {}
        }));
        (tx, batches, task)
    }

    #[tokio::test(start_paused = true)]
    async fn confirms_a_millisecond_apart_are_forgotten_a_linger_at_a_time() {
        let (tx, batches, task) = gathering();
        for id in 0..200 {
            tx.send(Forget::Row(id)).unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(tx);
        task.await.unwrap();
        let batches = batches.lock().unwrap();
        // 200 ms of confirms in 50 ms lingers: four or five statements, not 200.
        assert!(
            (4..=5).contains(&batches.len()),
            "{} batches: {batches:?}",
            batches.len()
        );
        let all: Vec<i64> = batches.iter().flatten().copied().collect();
        assert_eq!(
            all,
            (0..200).collect::<Vec<_>>(),
            "every row, once, in order"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_confirm_waits_one_linger_and_settle_does_not_wait() {
        let (tx, batches, task) = gathering();
        let start = tokio::time::Instant::now();
        tx.send(Forget::Row(7)).unwrap();
        while batches.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Seen by the first 1 ms poll at or after the linger's end.
        let waited = start.elapsed();
        assert!(
            waited >= FORGET_LINGER && waited <= FORGET_LINGER + Duration::from_millis(1),
            "{waited:?}"
        );

        let start = tokio::time::Instant::now();
        tx.send(Forget::Row(8)).unwrap();
        let (done, settled) = oneshot::channel();
        tx.send(Forget::Now(done)).unwrap();
        settled.await.unwrap();
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "settle answers without lingering"
        );
        assert_eq!(*batches.lock().unwrap(), vec![vec![7], vec![8]]);
        drop(tx);
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_at_once_and_a_closed_channel_forgets_the_rest() {
        let (tx, batches, task) = gathering();
        for id in 0..(FORGET_BATCH as i64 + 10) {
            tx.send(Forget::Row(id)).unwrap();
        }
        let start = tokio::time::Instant::now();
        while batches.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            start.elapsed(),
            Duration::ZERO,
            "a full batch does not linger"
        );
        assert_eq!(batches.lock().unwrap()[0].len(), FORGET_BATCH);
        drop(tx);
        task.await.unwrap();
        let batches = batches.lock().unwrap();
        assert_eq!(
            batches.len(),
            2,
            "the ten left over go when the publishers are gone"
        );
        assert_eq!(
            batches[1],
            (FORGET_BATCH as i64..FORGET_BATCH as i64 + 10).collect::<Vec<_>>()
        );
    }
}
