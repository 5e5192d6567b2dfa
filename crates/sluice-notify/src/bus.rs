//! The event bus between processes: workers and API nodes announce that a job changed (its
//! events are in the store's log) and stream token deltas; API nodes listen and fan out.
//!
//! With Redis it is one pub/sub channel, published from one connection so a process's messages
//! arrive in the order it sent them; without Redis it is in-process (one-binary deployments).
//! Pub/sub may drop messages (Redis down, a slow listener): state changes are recovered from
//! the store by the hub's poll, deltas are best effort.

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_core::RequestId;
use sluice_redis::{redis, Redis, SetupError};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Messages waiting to be published; beyond this, new ones are dropped (the hub's poll covers
/// state changes, and a stream that far behind is better cut short than blocking workers).
const PUBLISH_QUEUE: usize = 16_384;
/// Messages a listener may fall behind before it loses some.
const LISTEN_QUEUE: usize = 16_384;
/// Pause before reconnecting to Redis after a failure.
const RECONNECT_AFTER: Duration = Duration::from_millis(500);

/// What travels on the bus.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BusMessage {
    /// The job's state changed: its new events are in the store's event log.
    Changed {
        request_id: RequestId,
        tenant: String,
    },
    /// Text a running `stream: true` job received, in order (`index` from 0 for each attempt).
    /// Not stored. A retried job streams again from index 0 under its new `attempt`.
    Delta {
        request_id: RequestId,
        tenant: String,
        /// The claim this text belongs to (the job's attempt counter).
        #[serde(default)]
        attempt: i32,
        index: u32,
        text: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("invalid Redis URL for the event bus: {0}")]
    InvalidUrl(String),
    /// The key prefix is empty (the channel is `{prefix}:events`).
    #[error("the Redis key prefix for the event bus must not be empty")]
    EmptyPrefix,
}

impl From<SetupError> for BusError {
    fn from(error: SetupError) -> BusError {
        match error {
            SetupError::EmptyPrefix => BusError::EmptyPrefix,
            // The reason only: the URL may hold a password.
            SetupError::InvalidUrl { reason, .. } | SetupError::Pool(reason) => {
                BusError::InvalidUrl(reason)
            }
        }
    }
}

/// What the publishing task is handed: a message, or a caller waiting until all before it
/// went out.
enum Outgoing {
    Message(BusMessage),
    Flush(oneshot::Sender<()>),
}

/// A handle on the bus; cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Transport>,
}

enum Transport {
    /// Listeners in this process only.
    Local(broadcast::Sender<BusMessage>),
    /// Boxed: the client holds its TLS settings, far larger than a local sender.
    Redis(Box<RedisBus>),
}

struct RedisBus {
    client: redis::Client,
    channel: String,
    outgoing: mpsc::Sender<Outgoing>,
    /// Started on the first `subscribe`: a process that only publishes never listens.
    listening: Mutex<Option<broadcast::Sender<BusMessage>>>,
    /// True while the listener is subscribed in Redis: what is published meanwhile is heard.
    subscribed: watch::Sender<bool>,
}

impl EventBus {
    /// A bus inside this process only.
    pub fn local() -> EventBus {
        let (local, _) = broadcast::channel(LISTEN_QUEUE);
        EventBus {
            inner: Arc::new(Transport::Local(local)),
        }
    }

    /// A bus over Redis channel `{prefix}:events`. An unreachable Redis is not an error: messages
    /// are dropped (with a warning) until it answers. Must be called inside a Tokio runtime.
    pub fn redis(url: &str, prefix: &str) -> Result<EventBus, BusError> {
        let redis = Redis::open(url, prefix)?;
        let client = redis.client().clone();
        let (outgoing, queue) = mpsc::channel(PUBLISH_QUEUE);
        let channel = redis.key("events");
        tokio::spawn(publish_loop(client.clone(), channel.clone(), queue));
        Ok(EventBus {
            inner: Arc::new(Transport::Redis(Box::new(RedisBus {
                client,
                channel,
                outgoing,
                listening: Mutex::new(None),
                subscribed: watch::Sender::new(false),
            }))),
        })
    }

    /// Announce a message; never waits.
    pub fn publish(&self, message: BusMessage) {
        match &*self.inner {
            Transport::Redis(redis) => {
                if redis.outgoing.try_send(Outgoing::Message(message)).is_err() {
                    tracing::warn!(message = "event bus backlog full; dropping an event");
                }
            }
            Transport::Local(local) => {
                // No listener is not an error.
                let _ = local.send(message);
            }
        }
    }

    /// The job's state changed.
    pub fn changed(&self, request_id: RequestId, tenant: &str) {
        self.publish(BusMessage::Changed {
            request_id,
            tenant: tenant.to_owned(),
        });
    }

    /// Wait (at most `timeout`) until every message published before this call has been handed
    /// to Redis: a short-lived process (the CLI) calls it before it exits, or its last
    /// announcements would die with it. Immediate for the in-process bus.
    pub async fn flush(&self, timeout: Duration) {
        let Transport::Redis(redis) = &*self.inner else {
            return;
        };
        let (done, flushed) = oneshot::channel();
        let sent = tokio::time::timeout(timeout, async {
            if redis.outgoing.send(Outgoing::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
        .await;
        if sent.is_err() {
            tracing::warn!(message = "event bus did not flush in time; some events may be lost");
        }
    }

    /// Hear every message from now on. A listener that falls far behind loses messages
    /// (`RecvError::Lagged`), which the hub's poll makes good for state changes.
    pub fn subscribe(&self) -> broadcast::Receiver<BusMessage> {
        let redis = match &*self.inner {
            Transport::Local(local) => return local.subscribe(),
            Transport::Redis(redis) => redis,
        };
        let mut listening = redis.listening.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = listening.as_ref() {
            return sender.subscribe();
        }
        let (sender, receiver) = broadcast::channel(LISTEN_QUEUE);
        tokio::spawn(listen_loop(
            redis.client.clone(),
            redis.channel.clone(),
            sender.clone(),
            redis.subscribed.clone(),
        ));
        *listening = Some(sender);
        receiver
    }

    /// Wait (at most `timeout`) until this process hears what is published from now on: with
    /// Redis, until its listener is subscribed, since a message published before that is never
    /// heard (a state change is read from the log later; a delta is gone). True when it does,
    /// or when nothing here listens; an API node waits on it before it serves.
    pub async fn listening(&self, timeout: Duration) -> bool {
        let Transport::Redis(redis) = &*self.inner else {
            return true;
        };
        let started = redis
            .listening
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if !started {
            return true;
        }
        let mut subscribed = redis.subscribed.subscribe();
        let heard = tokio::time::timeout(timeout, subscribed.wait_for(|s| *s)).await;
        heard.is_ok_and(|r| r.is_ok())
    }
}

/// Messages sent to Redis in one round trip, when that many are waiting.
const PUBLISH_BATCH: usize = 256;

async fn publish_loop(client: redis::Client, channel: String, mut queue: mpsc::Receiver<Outgoing>) {
    let mut connection: Option<redis::aio::MultiplexedConnection> = None;
    let mut batch = Vec::with_capacity(PUBLISH_BATCH);
    let mut flushed = Vec::new();
    // Whatever is waiting goes out in one pipeline: a streamed job's deltas come in bursts.
    while queue.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for outgoing in batch.drain(..) {
            match outgoing {
                Outgoing::Message(message) => {
                    if let Ok(payload) = serde_json::to_string(&message) {
                        pipe.cmd("PUBLISH").arg(&channel).arg(payload).ignore();
                    }
                }
                Outgoing::Flush(done) => flushed.push(done),
            }
        }
        // Answered once this pipeline is sent (or given up on): what came before has gone.
        let _flush = Flushed(&mut flushed);
        if connection.is_none() {
            match client.get_multiplexed_async_connection().await {
                Ok(c) => connection = Some(c),
                Err(error) => {
                    tracing::warn!(message = "event bus cannot reach Redis; events dropped", %error);
                    continue;
                }
            }
        }
        if let Some(c) = connection.as_mut() {
            let sent: Result<(), _> = pipe.query_async(c).await;
            if let Err(error) = sent {
                tracing::warn!(message = "event bus publish failed; events dropped", %error);
                connection = None;
            }
        }
    }
}

/// Answers the flushes of one round when it ends, however it ends.
struct Flushed<'a>(&'a mut Vec<oneshot::Sender<()>>);

impl Drop for Flushed<'_> {
    fn drop(&mut self) {
        for done in self.0.drain(..) {
            let _ = done.send(());
        }
    }
}

/// The store tells the bus of every job it changed, so every subscriber hears of it.
impl sluice_store::Announce for EventBus {
    fn changed(&self, request_id: RequestId, tenant: &str) {
        EventBus::changed(self, request_id, tenant);
    }
}

async fn listen_loop(
    client: redis::Client,
    channel: String,
    sender: broadcast::Sender<BusMessage>,
    subscribed: watch::Sender<bool>,
) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                Ok(()) => {
                    tracing::info!(message = "listening for job events", %channel);
                    subscribed.send_replace(true);
                    let mut messages = pubsub.on_message();
                    while let Some(msg) = messages.next().await {
                        let Ok(payload) = msg.get_payload::<String>() else {
                            continue;
                        };
                        match serde_json::from_str::<BusMessage>(&payload) {
                            Ok(message) => {
                                if sender.send(message).is_err() && sender.receiver_count() == 0 {
                                    return;
                                }
                            }
                            Err(error) => {
                                tracing::debug!(message = "ignoring a malformed bus message", %error)
                            }
                        }
                    }
                    subscribed.send_replace(false);
                    tracing::warn!(message = "event bus subscription ended; reconnecting");
                }
                Err(error) => tracing::warn!(message = "event bus subscribe failed", %error),
            },
            Err(error) => tracing::warn!(message = "event bus cannot reach Redis", %error),
        }
        if sender.receiver_count() == 0 {
            return;
        }
        tokio::time::sleep(RECONNECT_AFTER).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_json_shape() {
        let id = RequestId::new();
        let json = serde_json::to_value(BusMessage::Changed {
            request_id: id,
            tenant: "acme".into(),
        })
        .unwrap_or_default();
        assert_eq!(json["kind"], "changed");
        assert_eq!(json["request_id"], id.to_string());
    }

    #[tokio::test]
    async fn the_local_bus_delivers_in_order() {
        let bus = EventBus::local();
        let mut rx = bus.subscribe();
        let id = RequestId::new();
        for index in 0..3 {
            bus.publish(BusMessage::Delta {
                request_id: id,
                tenant: "t".into(),
                attempt: 1,
                index,
                text: format!("{index}"),
            });
        }
        for index in 0..3 {
            match rx.recv().await {
                Ok(BusMessage::Delta { index: got, .. }) => assert_eq!(got, index),
                other => panic!("{other:?}"),
            }
        }
    }
}
