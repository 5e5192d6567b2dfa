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
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, QueueAttributeName, SendMessageBatchRequestEntry};
use aws_sdk_sqs::Client;
use futures::{StreamExt, TryStreamExt};
use sluice_broker::{
    Backoff, BoxError, Broker, BrokerError, Consumer, JobRef, Lane, PublishOptions,
};
use tracing::{info, warn};

mod config;
mod consume;
pub mod moto;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::{ConfigError, SqsConfig};

/// Message attribute carrying a dead-lettered job's reason.
pub const REASON_ATTRIBUTE: &str = "sluice-reason";
/// Message attribute with the Unix time in milliseconds before which a message
/// delayed beyond SQS's own limit must not be handed out.
pub const NOT_BEFORE_ATTRIBUTE: &str = "sluice-not-before";

/// Longest delay accepted, as in the RabbitMQ backend: retries back off for minutes,
/// not weeks, and every re-delay hop costs a send and a delete.
const MAX_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);
/// SQS limits a whole message (body and attributes) to 256 KiB, and a batch of ten
/// to the same; reasons quote provider errors of any length, so they are cut short.
const MAX_REASON_BYTES: usize = 8 * 1024;
/// SQS takes at most this many entries in one batch call.
const BATCH_SIZE: usize = 10;
/// Batch calls in flight at once during `publish_batch`.
const BATCH_CONCURRENCY: usize = 4;
/// Rounds for re-sending the entries of a batch SQS failed on its side.
const BATCH_ATTEMPTS: u32 = 5;
/// Messages in the dead queue wait for an operator; keep them as long as SQS allows (14 days).
/// Lanes get the same, since SQS counts retention from the original enqueue even after a redrive.
const RETENTION_SECS: u32 = 1_209_600;
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
    fn new<E, R>(operation: &'static str, e: SdkError<E, R>) -> Self
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
enum Lookup {
    Missing,
    Failed(SqsCallError),
}

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

pub(crate) struct Shared {
    pub(crate) config: SqsConfig,
    pub(crate) client: Client,
    /// Lane queue URLs already looked up; a URL never changes while its queue exists.
    urls: std::sync::Mutex<HashMap<Lane, String>>,
}

impl SqsBroker {
    /// Checks the configuration and asks SQS for one queue URL, so a wrong endpoint,
    /// region or credentials fail at startup rather than at the first publish.
    pub async fn connect(config: SqsConfig) -> Result<Self, BrokerError> {
        config
            .validate()
            .map_err(|e| BrokerError::Connection(Box::new(e)))?;
        let client = Client::new(&sdk_config(&config).await);
        let shared = Arc::new(Shared {
            config,
            client,
            urls: std::sync::Mutex::new(HashMap::new()),
        });
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

/// The AWS SDK configuration: region, endpoint, timeouts and credentials.
async fn sdk_config(config: &SqsConfig) -> aws_config::SdkConfig {
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

    async fn queue_url(&self, lane: Lane) -> Result<String, Lookup> {
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
    async fn send_batch(&self, lane: Lane, msgs: Vec<Outgoing>) -> Result<(), BrokerError> {
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
    async fn create_queue(&self, lane: Lane) -> Result<String, BrokerError> {
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

    async fn set_attributes(
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

    async fn queue_attribute(
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
    async fn list_prefixed(&self) -> Result<Vec<String>, BrokerError> {
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

fn admin_error(queue: &str, e: SqsCallError) -> BrokerError {
    BrokerError::Admin {
        queue: queue.to_owned(),
        source: Box::new(e),
    }
}

fn non_empty<K, V>(map: HashMap<K, V>) -> Option<HashMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

/// One message on its way out.
#[derive(Debug, Clone)]
pub(crate) struct Outgoing {
    pub(crate) lane: Lane,
    pub(crate) body: String,
    pub(crate) delay_secs: i32,
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
}

impl Outgoing {
    fn job(
        config: &SqsConfig,
        lane: Lane,
        job: &JobRef,
        opts: &PublishOptions,
    ) -> Result<Self, BrokerError> {
        let body = serde_json::to_string(job)
            .map_err(|e| BrokerError::Malformed(format!("cannot encode job: {e}")))?;
        let plan = plan_delay(opts.delay, config.max_native_delay_secs, now_ms())?;
        let mut attributes = HashMap::new();
        if let Some(reason) = opts.reason.as_deref() {
            if let Some(value) = reason_attribute(reason)? {
                attributes.insert(REASON_ATTRIBUTE.to_owned(), value);
            }
        }
        if let Some(not_before) = plan.not_before_ms {
            attributes.insert(
                NOT_BEFORE_ATTRIBUTE.to_owned(),
                number_attribute(not_before)?,
            );
        }
        Ok(Self {
            lane,
            body,
            delay_secs: plan.delay_secs,
            attributes,
        })
    }
}

pub(crate) fn string_attribute(value: &str) -> Result<MessageAttributeValue, BrokerError> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(value)
        .build()
        .map_err(|e| BrokerError::Malformed(format!("cannot build a message attribute: {e}")))
}

fn number_attribute(value: u64) -> Result<MessageAttributeValue, BrokerError> {
    MessageAttributeValue::builder()
        .data_type("Number")
        .string_value(value.to_string())
        .build()
        .map_err(|e| BrokerError::Malformed(format!("cannot build a message attribute: {e}")))
}

/// The reason as SQS accepts it, or `None` for an empty one (SQS refuses empty values).
pub(crate) fn reason_attribute(reason: &str) -> Result<Option<MessageAttributeValue>, BrokerError> {
    let clean = sanitize_reason(reason);
    if clean.is_empty() {
        return Ok(None);
    }
    string_attribute(&clean).map(Some)
}

/// SQS rejects a whole message whose attributes hold characters outside XML's
/// character set, and dead-lettering must not fail over a provider's error text:
/// such characters become U+FFFD, and over-long reasons are cut at a char boundary.
fn sanitize_reason(reason: &str) -> String {
    let mut clean: String = reason
        .chars()
        .map(|c| match c {
            '\t' | '\n' | '\r' => c,
            c if c < ' ' || c == '\u{FFFE}' || c == '\u{FFFF}' => '\u{FFFD}',
            c => c,
        })
        .collect();
    if clean.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES - '…'.len_utf8();
        while !clean.is_char_boundary(end) {
            end -= 1;
        }
        clean.truncate(end);
        clean.push('…');
    }
    clean
}

/// How a requested delay is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DelayPlan {
    /// `DelaySeconds` for SQS.
    pub(crate) delay_secs: i32,
    /// For delays beyond the native limit: when the message is due (Unix ms).
    pub(crate) not_before_ms: Option<u64>,
}

/// Rounds the delay up to whole seconds (never deliver early), and splits delays
/// beyond `max_native_secs` into a native part and a due time.
pub(crate) fn plan_delay(
    delay: Option<Duration>,
    max_native_secs: u32,
    now_ms: u64,
) -> Result<DelayPlan, BrokerError> {
    let Some(delay) = delay.filter(|d| !d.is_zero()) else {
        return Ok(DelayPlan {
            delay_secs: 0,
            not_before_ms: None,
        });
    };
    if delay > MAX_DELAY {
        return Err(BrokerError::DelayTooLong(delay));
    }
    // Bounded by MAX_DELAY above, so these fit.
    let secs = u32::try_from(delay.as_nanos().div_ceil(1_000_000_000)).unwrap_or(u32::MAX);
    let ms = u64::try_from(delay.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX);
    if secs <= max_native_secs {
        return Ok(DelayPlan {
            delay_secs: native_secs(secs),
            not_before_ms: None,
        });
    }
    Ok(DelayPlan {
        delay_secs: native_secs(max_native_secs),
        not_before_ms: Some(now_ms.saturating_add(ms)),
    })
}

/// The `DelaySeconds` for a message that is due at `not_before_ms`, at most `max_native_secs`.
pub(crate) fn remaining_delay_secs(not_before_ms: u64, now_ms: u64, max_native_secs: u32) -> i32 {
    let remaining_ms = not_before_ms.saturating_sub(now_ms);
    let secs = u32::try_from(remaining_ms.div_ceil(1000)).unwrap_or(u32::MAX);
    native_secs(secs.min(max_native_secs))
}

fn native_secs(secs: u32) -> i32 {
    i32::try_from(secs).unwrap_or(i32::MAX)
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn delays_round_up_to_whole_seconds() {
        let plan = |d: Option<Duration>| plan_delay(d, 900, 1_000).unwrap();
        assert_eq!(plan(None).delay_secs, 0);
        assert_eq!(plan(Some(Duration::ZERO)).delay_secs, 0);
        assert_eq!(plan(Some(Duration::from_nanos(1))).delay_secs, 1);
        assert_eq!(plan(Some(Duration::from_millis(1200))).delay_secs, 2);
        assert_eq!(plan(Some(Duration::from_secs(3))).delay_secs, 3);
        let at_limit = plan(Some(Duration::from_secs(900)));
        assert_eq!(at_limit.delay_secs, 900);
        assert_eq!(at_limit.not_before_ms, None);
    }

    #[test]
    fn long_delays_get_a_due_time() {
        let plan = plan_delay(Some(Duration::from_millis(4_001)), 2, 10_000).unwrap();
        assert_eq!(plan.delay_secs, 2);
        assert_eq!(plan.not_before_ms, Some(14_001));
        // The re-delay on receipt covers what is left, up to the native limit again.
        assert_eq!(remaining_delay_secs(14_001, 12_000, 2), 2);
        assert_eq!(remaining_delay_secs(14_001, 13_500, 2), 1);
        assert_eq!(remaining_delay_secs(14_001, 10_000, 900), 5);
        assert!(plan_delay(Some(Duration::from_secs(8 * 24 * 3600)), 900, 0).is_err());
    }

    #[test]
    fn reasons_are_made_acceptable_to_sqs() {
        assert_eq!(sanitize_reason("a\tb\nc ✗"), "a\tb\nc ✗");
        assert_eq!(sanitize_reason("nul\0bell\u{7}"), "nul\u{FFFD}bell\u{FFFD}");
        let long = "é".repeat(MAX_REASON_BYTES);
        let cut = sanitize_reason(&long);
        assert!(cut.len() <= MAX_REASON_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
        assert!(reason_attribute("").unwrap().is_none());
    }
}
