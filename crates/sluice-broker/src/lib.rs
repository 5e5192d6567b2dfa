//! The lanes jobs wait in: a backend-neutral [`Broker`] trait, its delivery and error types,
//! and the RabbitMQ backend. Every backend must pass the shared conformance suite.
//!
//! Delivery is at least once. A message may arrive twice (after a crash, a lost
//! connection or an unconfirmed publish that is retried), so consumers fence
//! effects by the job's `attempt` rather than trusting the broker to deliver once.

use std::fmt;
use std::pin::Pin;
use std::time::Duration;

pub use sluice_core::{JobRef, Lane};

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod rabbitmq;

pub use rabbitmq::{RabbitBroker, RabbitConfig};

/// Doubling waits between reconnects or retried receives, from 100 ms up to 5 s; start over
/// with `Backoff::default()` after a success.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            next: Duration::from_millis(100),
        }
    }
}

impl Backoff {
    /// The wait before the next try.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(Duration::from_secs(5));
        delay
    }
}

/// Any error a backend library raises, kept as the source of a [`BrokerError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// How to publish one message.
#[derive(Debug, Clone, Default)]
pub struct PublishOptions {
    /// Deliver no sooner than this from now (retry backoff). Backends may round it up, never down.
    pub delay: Option<Duration>,
    /// Why the job was dead-lettered; read back as [`Delivery::reason`].
    pub reason: Option<String>,
}

impl PublishOptions {
    pub fn delayed(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            reason: None,
        }
    }

    pub fn reason(reason: impl Into<String>) -> Self {
        Self {
            delay: None,
            reason: Some(reason.into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker connection failed: {0}")]
    Connection(#[source] BoxError),
    #[error("publishing to {queue} failed: {source}")]
    Publish {
        queue: String,
        #[source]
        source: BoxError,
    },
    #[error("the broker refused (nacked) a message published to {queue}")]
    NotConfirmed { queue: String },
    #[error("no queue {queue} to publish to (was declare() called?)")]
    Unroutable { queue: String },
    #[error("consuming {queue} failed: {source}")]
    Consume {
        queue: String,
        #[source]
        source: BoxError,
    },
    #[error("acknowledging a delivery failed, so it will be redelivered: {0}")]
    Ack(#[source] BoxError),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("managing queue {queue} failed: {source}")]
    Admin {
        queue: String,
        #[source]
        source: BoxError,
    },
    #[error("delay of {0:?} is longer than the broker supports")]
    DelayTooLong(Duration),
    #[error("invalid broker settings: {0}")]
    Config(String),
}

/// The queues jobs wait in. Implementations are shared across tasks behind an `Arc`.
#[async_trait::async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Publish one message and return only after the broker confirmed it durably.
    async fn publish(
        &self,
        lane: Lane,
        job: &JobRef,
        opts: PublishOptions,
    ) -> Result<(), BrokerError>;

    /// Publish many, pipelined where the backend can; a backend may pack jobs bound for one
    /// lane now into one message, each still delivered on its own. On error some of the
    /// messages may have been published; re-publishing all of them is safe.
    async fn publish_batch(
        &self,
        items: Vec<(Lane, JobRef, PublishOptions)>,
    ) -> Result<(), BrokerError> {
        for (lane, job, opts) in items {
            self.publish(lane, &job, opts).await?;
        }
        Ok(())
    }

    /// Start consuming a lane with at most `prefetch` unacknowledged deliveries.
    ///
    /// The stream survives connection loss by re-subscribing, so it normally
    /// never ends; an `Err` item reports a problem and the stream carries on.
    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError>;

    /// Messages ready in the lane (not counting unacked or still-delayed ones); a message
    /// that packs several jobs counts once.
    async fn depth(&self, lane: Lane) -> Result<u64, BrokerError>;

    /// Declare all lanes (idempotent). Called at startup.
    async fn declare(&self) -> Result<(), BrokerError>;

    /// Delete every queue under this broker's namespace (tests and `purge` tooling).
    async fn delete_all(&self) -> Result<(), BrokerError>;
}

/// A lane's deliveries, in the order the backend hands them out.
pub type Consumer =
    Pin<Box<dyn futures::Stream<Item = Result<Delivery, BrokerError>> + Send + 'static>>;

/// How a backend settles one delivery. Public so that other backends and test
/// doubles can build [`Delivery`] values.
#[async_trait::async_trait]
pub trait Acknowledge: Send + Sync + 'static {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError>;
}

/// One message taken from a lane. Settle it with [`Delivery::ack`] or
/// [`Delivery::nack`]; dropping it unsettled leaves it unacked until its
/// consumer goes away, after which the broker redelivers it.
pub struct Delivery {
    pub lane: Lane,
    pub job: JobRef,
    /// The broker has handed this message out before (it may have been processed).
    pub redelivered: bool,
    /// For the dead lane: why the job was dead-lettered.
    pub reason: Option<String>,
    handle: Box<dyn Acknowledge>,
    /// Released when the delivery is settled or dropped (see [`Delivery::holding`]).
    guard: Option<Box<dyn Send + Sync + 'static>>,
}

impl Delivery {
    pub fn new(
        lane: Lane,
        job: JobRef,
        redelivered: bool,
        reason: Option<String>,
        handle: Box<dyn Acknowledge>,
    ) -> Self {
        Self {
            lane,
            job,
            redelivered,
            reason,
            handle,
            guard: None,
        }
    }

    /// Keeps `guard` (a semaphore permit, say) until this delivery is settled or dropped, so a
    /// consumer can bound the jobs it holds when one message carries several.
    pub fn holding(mut self, guard: impl Send + Sync + 'static) -> Self {
        self.guard = Some(Box::new(guard));
        self
    }

    /// Remove the message for good. An error means it was not removed and will come back.
    pub async fn ack(self) -> Result<(), BrokerError> {
        self.handle.ack().await
    }

    /// Give the message back: `requeue = true` returns it to its lane now,
    /// `false` discards it (use the dead lane instead to keep it).
    pub async fn nack(self, requeue: bool) -> Result<(), BrokerError> {
        self.handle.nack(requeue).await
    }
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("lane", &self.lane)
            .field("job", &self.job)
            .field("redelivered", &self.redelivered)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_static<T: Send + 'static>() {}

    #[test]
    fn deliveries_and_consumers_can_move_between_tasks() {
        assert_send_static::<Delivery>();
        assert_send_static::<Consumer>();
        assert_send_static::<BrokerError>();
    }
}
