//! SQS lanes for Sluice: the [`SqsBroker`] backend of [`sluice_broker::Broker`], one standard
//! queue per lane, with long polling, visibility heartbeats, long delays and redrive to `dead`.
//!
//! How the broker's promises map onto SQS:
//!
//! * **Lanes** are standard queues named `{prefix}-{lane}`. [`Broker::declare`] creates
//!   them (the dead lane first) and gives every other lane a redrive policy into the
//!   dead queue, so a message received `max_receive_count` times without being
//!   deleted ends up there even if every consumer that took it died.
//! * **Unsettled deliveries** are kept invisible by a heartbeat that extends their
//!   visibility timeout while they are held. Acking, nacking or dropping a
//!   [`Delivery`](sluice_broker::Delivery) stops it, so the message of a dead
//!   consumer comes back after `visibility_timeout_secs`.
//! * **Delays** use `DelaySeconds`, rounded up to whole seconds. SQS stops at 900 s;
//!   longer delays carry a `not_before` attribute and are re-sent on receipt until
//!   they are due (a delay longer than the visibility timeout must be re-delayed,
//!   never slept on, or it would be handed out twice).
//! * **Reasons** travel as the [`REASON_ATTRIBUTE`] message attribute.
//!
//! SQS has no publisher confirms to wait for: a successful `SendMessage` is durable.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use aws_sdk_sqs::types::QueueAttributeName;
use aws_sdk_sqs::Client;
use futures::{StreamExt, TryStreamExt};
use sluice_broker::{Broker, BrokerError, Consumer, JobRef, Lane, PublishOptions};
use tracing::info;

use crate::client::{admin_error, sdk_config, Lookup, Shared};
use crate::message::Outgoing;

mod client;
mod config;
mod consume;
mod message;
#[cfg(feature = "moto")]
pub mod moto;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::SqsCallError;
pub use config::{ConfigError, SqsConfig};

/// Message attribute carrying a dead-lettered job's reason.
pub const REASON_ATTRIBUTE: &str = "sluice-reason";
/// Message attribute with the Unix time in milliseconds before which a message
/// delayed beyond SQS's own limit must not be handed out.
pub const NOT_BEFORE_ATTRIBUTE: &str = "sluice-not-before";

/// SQS takes at most this many entries in one batch call.
const BATCH_SIZE: usize = 10;
/// Batch calls in flight at once during `publish_batch`.
const BATCH_CONCURRENCY: usize = 4;
/// Messages in the dead queue wait for an operator; keep them as long as SQS allows (14 days).
/// Lanes get the same, since SQS counts retention from the original enqueue even after a redrive.
const RETENTION_SECS: u32 = 1_209_600;

/// The SQS [`Broker`]. Cheap to clone; clones share the client and the queue URLs.
#[derive(Clone)]
pub struct SqsBroker {
    shared: Arc<Shared>,
}

impl fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl SqsBroker {
    /// Checks the configuration and asks SQS for one queue URL, so a wrong endpoint,
    /// region or credentials fail at startup rather than at the first publish.
    pub async fn connect(config: SqsConfig) -> Result<Self, BrokerError> {
        config
            .validate()
            .map_err(|e| BrokerError::Connection(Box::new(e)))?;
        let client = Client::new(&sdk_config(&config).await);
        let shared = Arc::new(Shared::new(config, client));
        match shared.queue_url(Lane::Dead).await {
            // A missing queue is fine before the first declare(): SQS answered.
            Ok(_) | Err(Lookup::Missing) => {}
            Err(Lookup::Failed(e)) => return Err(BrokerError::Connection(Box::new(e))),
        }
        info!(
            prefix = %shared.config.prefix,
            region = %shared.config.region,
            endpoint = shared.config.endpoint_url.as_deref().unwrap_or("AWS"),
            "connected to SQS"
        );
        Ok(Self { shared })
    }

    pub fn config(&self) -> &SqsConfig {
        &self.shared.config
    }

    /// The queue backing a lane, e.g. `sluice-priority`.
    pub fn queue_name(&self, lane: Lane) -> String {
        self.shared.config.queue_name(lane)
    }

    /// The SQS client, for tooling that needs calls the [`Broker`] trait does not offer.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }
}

#[async_trait::async_trait]
impl Broker for SqsBroker {
    async fn publish(
        &self,
        lane: Lane,
        job: &JobRef,
        opts: PublishOptions,
    ) -> Result<(), BrokerError> {
        let msg = Outgoing::job(&self.shared.config, lane, job, &opts)?;
        self.shared.send(msg).await
    }

    async fn publish_batch(
        &self,
        items: Vec<(Lane, JobRef, PublishOptions)>,
    ) -> Result<(), BrokerError> {
        let mut by_lane: HashMap<Lane, Vec<Outgoing>> = HashMap::new();
        for (lane, job, opts) in &items {
            let msg = Outgoing::job(&self.shared.config, *lane, job, opts)?;
            by_lane.entry(*lane).or_default().push(msg);
        }
        let mut batches = Vec::new();
        for (lane, mut msgs) in by_lane {
            while !msgs.is_empty() {
                let rest = msgs.split_off(msgs.len().min(BATCH_SIZE));
                batches.push((lane, std::mem::replace(&mut msgs, rest)));
            }
        }
        let shared = &self.shared;
        futures::stream::iter(batches)
            .map(|(lane, msgs)| shared.send_batch(lane, msgs))
            .buffer_unordered(BATCH_CONCURRENCY)
            .try_collect::<()>()
            .await
    }

    async fn consume(&self, lane: Lane, prefetch: u16) -> Result<Consumer, BrokerError> {
        consume::start(self.shared.clone(), lane, prefetch).await
    }

    async fn depth(&self, lane: Lane) -> Result<u64, BrokerError> {
        let url = self.shared.admin_url(lane).await?;
        let value = self
            .shared
            .queue_attribute(lane, &url, QueueAttributeName::ApproximateNumberOfMessages)
            .await?;
        value.parse().map_err(|e| BrokerError::Admin {
            queue: self.shared.queue_name(lane),
            source: format!("ApproximateNumberOfMessages {value:?} is not a count: {e}").into(),
        })
    }

    async fn declare(&self) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let visibility = shared.config.visibility_timeout_secs.to_string();
        let retention = RETENTION_SECS.to_string();
        // The dead queue first: the other lanes' redrive policies name its ARN.
        let dead_url = shared.create_queue(Lane::Dead).await?;
        shared
            .set_attributes(
                Lane::Dead,
                &dead_url,
                HashMap::from([
                    (QueueAttributeName::VisibilityTimeout, visibility.clone()),
                    (
                        QueueAttributeName::MessageRetentionPeriod,
                        retention.clone(),
                    ),
                ]),
            )
            .await?;
        let dead_arn = shared
            .queue_attribute(Lane::Dead, &dead_url, QueueAttributeName::QueueArn)
            .await?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dead_arn,
            "maxReceiveCount": shared.config.max_receive_count.to_string(),
        })
        .to_string();
        for lane in Lane::ALL.into_iter().filter(|lane| *lane != Lane::Dead) {
            let url = shared.create_queue(lane).await?;
            shared
                .set_attributes(
                    lane,
                    &url,
                    HashMap::from([
                        (QueueAttributeName::VisibilityTimeout, visibility.clone()),
                        (
                            QueueAttributeName::MessageRetentionPeriod,
                            retention.clone(),
                        ),
                        (QueueAttributeName::RedrivePolicy, redrive.clone()),
                    ]),
                )
                .await?;
        }
        Ok(())
    }

    /// Deletes this prefix's lane queues. Only the exact lane names are deleted:
    /// `ListQueues` matches by prefix, so `sluice-` would also list another
    /// deployment's `sluice-staging-priority`. SQS refuses to re-create a deleted
    /// queue's name for 60 s.
    async fn delete_all(&self) -> Result<(), BrokerError> {
        let shared = &self.shared;
        let ours: Vec<String> = Lane::ALL.iter().map(|l| shared.queue_name(*l)).collect();
        for url in shared.list_prefixed().await? {
            let name = url.rsplit('/').next().unwrap_or_default();
            if !ours.iter().any(|q| q == name) {
                continue;
            }
            if let Err(e) = shared.client.delete_queue().queue_url(&url).send().await {
                let e = SqsCallError::new("DeleteQueue", e);
                if !e.queue_missing() {
                    return Err(admin_error(name, e));
                }
            }
        }
        for lane in Lane::ALL {
            shared.forget_url(lane);
        }
        Ok(())
    }
}
