//! The SQS client and the calls Sluice makes with it: SDK configuration, queue URLs (cached),
//! single and batch sends, queue administration, and [`SqsCallError`] for a call that failed.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use sluice_broker::{Backoff, BoxError, BrokerError, Lane};
use tracing::warn;

use crate::message::Outgoing;
use crate::SqsConfig;

/// Rounds for re-sending the entries of a batch SQS failed on its side.
const BATCH_ATTEMPTS: u32 = 5;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Added to the long-poll wait to bound one attempt of any call.
const ATTEMPT_MARGIN: Duration = Duration::from_secs(10);

/// One SQS call that failed, with the service's error code or the transport's error chain.
#[derive(Debug, thiserror::Error)]
#[error("SQS {operation} failed: {detail}")]
pub struct SqsCallError {
    pub operation: &'static str,
    /// The service's error code, e.g. `AWS.SimpleQueueService.NonExistentQueue`.
    pub code: Option<String>,
    detail: String,
    #[source]
    source: BoxError,
}

impl SqsCallError {
    pub(crate) fn new<E, R>(operation: &'static str, e: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + Send + Sync + 'static,
    {
        let code = e.code().map(str::to_owned);
        // The SDK's own Display says only "service error"; the code and message say what.
        let detail = match (&code, e.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.clone(),
            _ => DisplayErrorContext(&e).to_string(),
        };
        Self {
            operation,
            code,
            detail,
            source: Box::new(e),
        }
    }

    /// The queue was deleted or never declared.
    pub fn queue_missing(&self) -> bool {
        matches!(
            self.code.as_deref(),
            Some("AWS.SimpleQueueService.NonExistentQueue" | "QueueDoesNotExist")
        )
    }
}

/// Why a lane's queue URL is unknown.
#[derive(Debug)]
pub(crate) enum Lookup {
    Missing,
    Failed(SqsCallError),
}

pub(crate) struct Shared {
    pub(crate) config: SqsConfig,
    pub(crate) client: Client,
    /// Lane queue URLs already looked up; a URL never changes while its queue exists.
    urls: std::sync::Mutex<HashMap<Lane, String>>,
}

impl Shared {
    pub(crate) fn new(config: SqsConfig, client: Client) -> Self {
        Self {
            config,
            client,
            urls: std::sync::Mutex::new(HashMap::new()),
        }
    }
}

/// The AWS SDK configuration: region, endpoint, timeouts and credentials.
pub(crate) async fn sdk_config(config: &SqsConfig) -> aws_config::SdkConfig {
    let attempt = Duration::from_secs(u64::from(config.wait_time_secs)) + ATTEMPT_MARGIN;
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        // A long poll legitimately takes `wait_time_secs`; anything much longer is a wedge.
        .operation_attempt_timeout(attempt)
        .build();
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(config.region.clone()))
        .timeout_config(timeouts);
    if let Some(url) = &config.endpoint_url {
        // A local emulator accepts any credentials, and asking instance metadata
        // (the last link of the default chain) would stall start-up off EC2.
        let credentials = CredentialsProviderChain::first_try(
            "Environment",
            aws_config::environment::EnvironmentVariableCredentialsProvider::new(),
        )
        .or_else(
            "Profile",
            aws_config::profile::ProfileFileCredentialsProvider::builder().build(),
        )
        .or_else(
            "LocalDummy",
            Credentials::new("sluice-local", "sluice-local", None, None, "sluice-local"),
        );
        loader = loader.endpoint_url(url).credentials_provider(credentials);
    }
    loader.load().await
}

impl Shared {
    pub(crate) fn queue_name(&self, lane: Lane) -> String {
        self.config.queue_name(lane)
    }

    fn cached_url(&self, lane: Lane) -> Option<String> {
        let urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls.get(&lane).cloned()
    }

    fn remember_url(&self, lane: Lane, url: String) {
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls.insert(lane, url);
    }

    /// Forgets a URL whose queue turned out to be gone, so the next call looks it up again.
    pub(crate) fn forget_url(&self, lane: Lane) {
        let mut urls = self.urls.lock().unwrap_or_else(|p| p.into_inner());
        urls.remove(&lane);
    }

    pub(crate) async fn queue_url(&self, lane: Lane) -> Result<String, Lookup> {
        if let Some(url) = self.cached_url(lane) {
            return Ok(url);
        }
        let result = self
            .client
            .get_queue_url()
            .queue_name(self.queue_name(lane))
            .send()
            .await;
        match result {
            Ok(out) => {
                let url = out.queue_url.ok_or_else(|| {
                    Lookup::Failed(SqsCallError {
                        operation: "GetQueueUrl",
                        code: None,
                        detail: "the answer had no queue URL".into(),
                        source: "missing QueueUrl".into(),
                    })
                })?;
                self.remember_url(lane, url.clone());
                Ok(url)
            }
            Err(e) => {
                let e = SqsCallError::new("GetQueueUrl", e);
                if e.queue_missing() {
                    Err(Lookup::Missing)
                } else {
                    Err(Lookup::Failed(e))
                }
            }
        }
    }

    /// The URL to publish to, or `Unroutable` if the lane was never declared.
    async fn publish_url(&self, lane: Lane) -> Result<String, BrokerError> {
        let queue = self.queue_name(lane);
        self.queue_url(lane).await.map_err(|e| match e {
            Lookup::Missing => BrokerError::Unroutable { queue },
            Lookup::Failed(e) => BrokerError::Publish {
                queue,
                source: Box::new(e),
            },
        })
    }

    pub(crate) async fn admin_url(&self, lane: Lane) -> Result<String, BrokerError> {
        let queue = self.queue_name(lane);
        self.queue_url(lane).await.map_err(|e| BrokerError::Admin {
            queue,
            source: match e {
                Lookup::Missing => "the queue does not exist (was declare() called?)".into(),
                Lookup::Failed(e) => Box::new(e),
            },
        })
    }

    pub(crate) async fn consume_url(&self, lane: Lane) -> Result<String, BrokerError> {
        let queue = self.queue_name(lane);
        self.queue_url(lane)
            .await
            .map_err(|e| BrokerError::Consume {
                queue,
                source: match e {
                    Lookup::Missing => "the queue does not exist (was declare() called?)".into(),
                    Lookup::Failed(e) => Box::new(e),
                },
            })
    }

    /// Maps a failed send to `Unroutable` when the queue is gone, forgetting its URL.
    fn publish_error(&self, lane: Lane, e: SqsCallError) -> BrokerError {
        let queue = self.queue_name(lane);
        if e.queue_missing() {
            self.forget_url(lane);
            BrokerError::Unroutable { queue }
        } else {
            BrokerError::Publish {
                queue,
                source: Box::new(e),
            }
        }
    }

    /// Sends one message; `SendMessage` returning means SQS stored it durably.
    pub(crate) async fn send(&self, msg: Outgoing) -> Result<(), BrokerError> {
        let url = self.publish_url(msg.lane).await?;
        let result = self
            .client
            .send_message()
            .queue_url(url)
            .message_body(msg.body)
            .delay_seconds(msg.delay_secs)
            .set_message_attributes(non_empty(msg.attributes))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(e) => Err(self.publish_error(msg.lane, SqsCallError::new("SendMessage", e))),
        }
    }

    /// Sends up to ten messages of one lane, re-sending the entries SQS failed on
    /// its side; entries it refused as malformed fail the call.
    pub(crate) async fn send_batch(
        &self,
        lane: Lane,
        msgs: Vec<Outgoing>,
    ) -> Result<(), BrokerError> {
        let url = self.publish_url(lane).await?;
        let queue = self.queue_name(lane);
        let mut pending: Vec<(String, Outgoing)> = msgs
            .into_iter()
            .enumerate()
            .map(|(i, msg)| (i.to_string(), msg))
            .collect();
        let mut backoff = Backoff::default();
        for attempt in 1..=BATCH_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|(id, msg)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(id)
                        .message_body(&msg.body)
                        .delay_seconds(msg.delay_secs)
                        .set_message_attributes(non_empty(msg.attributes.clone()))
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| BrokerError::Publish {
                    queue: queue.clone(),
                    source: Box::new(e),
                })?;
            let out = self
                .client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| self.publish_error(lane, SqsCallError::new("SendMessageBatch", e)))?;
            let failed = out.failed();
            if failed.is_empty() {
                return Ok(());
            }
            if let Some(refused) = failed.iter().find(|f| f.sender_fault()) {
                return Err(BrokerError::Publish {
                    queue,
                    source: format!(
                        "SQS refused a message of a batch: {}: {}",
                        refused.code(),
                        refused.message().unwrap_or("")
                    )
                    .into(),
                });
            }
            let retry: Vec<&str> = failed.iter().map(|f| f.id()).collect();
            warn!(%queue, failed = retry.len(), attempt, "SQS failed part of a batch; re-sending those");
            pending.retain(|(id, _)| retry.contains(&id.as_str()));
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(BrokerError::Publish {
            queue,
            source: format!(
                "{} message(s) of a batch still failed after {BATCH_ATTEMPTS} attempts",
                pending.len()
            )
            .into(),
        })
    }

    /// Creates a lane's queue if needed and returns its URL.
    pub(crate) async fn create_queue(&self, lane: Lane) -> Result<String, BrokerError> {
        let queue = self.queue_name(lane);
        // No attributes here: CreateQueue fails if they differ from an existing queue's,
        // so they are set separately, which also applies changed settings on restart.
        let out = self
            .client
            .create_queue()
            .queue_name(&queue)
            .send()
            .await
            .map_err(|e| admin_error(&queue, SqsCallError::new("CreateQueue", e)))?;
        let url = out.queue_url.ok_or_else(|| BrokerError::Admin {
            queue: queue.clone(),
            source: "CreateQueue returned no queue URL".into(),
        })?;
        self.remember_url(lane, url.clone());
        Ok(url)
    }

    pub(crate) async fn set_attributes(
        &self,
        lane: Lane,
        url: &str,
        attributes: HashMap<QueueAttributeName, String>,
    ) -> Result<(), BrokerError> {
        let queue = self.queue_name(lane);
        self.client
            .set_queue_attributes()
            .queue_url(url)
            .set_attributes(Some(attributes))
            .send()
            .await
            .map_err(|e| admin_error(&queue, SqsCallError::new("SetQueueAttributes", e)))?;
        Ok(())
    }

    pub(crate) async fn queue_attribute(
        &self,
        lane: Lane,
        url: &str,
        name: QueueAttributeName,
    ) -> Result<String, BrokerError> {
        let queue = self.queue_name(lane);
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| {
                let e = SqsCallError::new("GetQueueAttributes", e);
                if e.queue_missing() {
                    self.forget_url(lane);
                }
                admin_error(&queue, e)
            })?;
        out.attributes
            .and_then(|mut attrs| attrs.remove(&name))
            .ok_or_else(|| BrokerError::Admin {
                queue,
                source: format!("SQS did not return the queue attribute {name}").into(),
            })
    }

    /// Every queue URL whose name starts with `{prefix}-`.
    pub(crate) async fn list_prefixed(&self) -> Result<Vec<String>, BrokerError> {
        let name_prefix = format!("{}-", self.config.prefix);
        let mut urls = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .list_queues()
                .queue_name_prefix(&name_prefix)
                .max_results(1000)
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| admin_error(&name_prefix, SqsCallError::new("ListQueues", e)))?;
            urls.extend(out.queue_urls().iter().cloned());
            match out.next_token {
                Some(next) if !next.is_empty() => token = Some(next),
                _ => return Ok(urls),
            }
        }
    }
}

pub(crate) fn admin_error(queue: &str, e: SqsCallError) -> BrokerError {
    BrokerError::Admin {
        queue: queue.to_owned(),
        source: Box::new(e),
    }
}

fn non_empty<K, V>(map: HashMap<K, V>) -> Option<HashMap<K, V>> {
    (!map.is_empty()).then_some(map)
}
