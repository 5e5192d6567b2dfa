//! Consuming a lane: a task per consumer long-polls `ReceiveMessage` into a channel,
//! never holding more than `prefetch` unsettled deliveries, each kept invisible by a heartbeat.
//!
//! A prefetch slot is a semaphore permit that travels inside the delivery's
//! acknowledger and is freed when the delivery is settled or dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use sluice_broker::{Acknowledge, Backoff, BrokerError, Consumer, Delivery, JobRef, Lane};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use crate::client::{Shared, SqsCallError};
use crate::message::{now_ms, reason_attribute, remaining_delay_secs, Outgoing};
use crate::{NOT_BEFORE_ATTRIBUTE, REASON_ATTRIBUTE};

/// SQS returns at most ten messages per receive.
const MAX_RECEIVE: usize = 10;
/// Heartbeats never come closer together than this, however short the timeout.
const MIN_HEARTBEAT: Duration = Duration::from_millis(200);

type Item = Result<Delivery, BrokerError>;

/// Looks the queue up (so a lane that was never declared fails the call) and starts the poller.
pub(crate) async fn start(
    shared: Arc<Shared>,
    lane: Lane,
    prefetch: u16,
) -> Result<Consumer, BrokerError> {
    let url = shared.consume_url(lane).await?;
    // A prefetch of 0 would never receive anything; callers mean "one at a time".
    let prefetch = usize::from(prefetch.max(1));
    let (tx, rx) = mpsc::channel::<Item>(prefetch);
    let poller = Poller {
        queue: shared.queue_name(lane),
        shared,
        lane,
        url,
        slots: Arc::new(Semaphore::new(prefetch)),
        tx,
        backoff: Backoff::default(),
    };
    tokio::spawn(poller.run());
    Ok(Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })))
}

struct Poller {
    shared: Arc<Shared>,
    lane: Lane,
    queue: String,
    url: String,
    /// One permit per delivery that may be unsettled at once.
    slots: Arc<Semaphore>,
    tx: mpsc::Sender<Item>,
    backoff: Backoff,
}

impl Poller {
    /// Receives until the consumer stream is dropped.
    async fn run(mut self) {
        loop {
            let first = tokio::select! {
                _ = self.tx.closed() => return,
                permit = self.slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    // The semaphore is never closed; stop rather than spin if it were.
                    Err(_) => return,
                },
            };
            let mut permits = vec![first];
            while permits.len() < MAX_RECEIVE {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }
            let messages = tokio::select! {
                // A consumer that went away cancels its long poll at once.
                _ = self.tx.closed() => return,
                result = self.receive(permits.len()) => result,
            };
            let messages = match messages {
                Ok(messages) => messages,
                Err(e) => {
                    if e.queue_missing() {
                        // Re-resolve next time, in case the queue is re-created.
                        self.shared.forget_url(self.lane);
                    }
                    warn!(queue = %self.queue, error = %e, "receiving failed; backing off");
                    let item = Err(BrokerError::Consume {
                        queue: self.queue.clone(),
                        source: Box::new(e),
                    });
                    if self.tx.send(item).await.is_err() {
                        return;
                    }
                    let pause = self.backoff.next_delay();
                    tokio::select! {
                        _ = self.tx.closed() => return,
                        _ = tokio::time::sleep(pause) => {}
                    }
                    self.refresh_url().await;
                    continue;
                }
            };
            self.backoff = Backoff::default();
            let mut messages = messages.into_iter();
            while let Some(message) = messages.next() {
                // Never more messages than permits were asked for; be safe anyway.
                let permit = permits.pop();
                if !self.handle(message, permit).await {
                    // The consumer is gone: give back what it will never see.
                    for message in messages {
                        self.release(&message).await;
                    }
                    return;
                }
            }
        }
    }

    async fn receive(&self, max: usize) -> Result<Vec<Message>, SqsCallError> {
        let config = &self.shared.config;
        let out = self
            .shared
            .client
            .receive_message()
            .queue_url(&self.url)
            .max_number_of_messages(i32::try_from(max.min(MAX_RECEIVE)).unwrap_or(1))
            .wait_time_seconds(i32::try_from(config.wait_time_secs).unwrap_or(0))
            // Explicit, so the heartbeat's period matches whatever the queue was declared with.
            .visibility_timeout(i32::try_from(config.visibility_timeout_secs).unwrap_or(30))
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| SqsCallError::new("ReceiveMessage", e))?;
        Ok(out.messages.unwrap_or_default())
    }

    /// After errors, the queue may have been re-created with a new URL.
    async fn refresh_url(&mut self) {
        if let Ok(url) = self.shared.consume_url(self.lane).await {
            self.url = url;
        }
    }

    /// Hands one message to the consumer, re-delays it or dead-letters it.
    /// Returns false once the consumer stream is gone.
    async fn handle(&mut self, message: Message, permit: Option<OwnedSemaphorePermit>) -> bool {
        let Some(receipt) = message.receipt_handle.clone() else {
            warn!(queue = %self.queue, "SQS returned a message without a receipt handle");
            return true;
        };
        let Some(permit) = permit else {
            self.release(&message).await;
            return true;
        };
        let attributes = message.message_attributes.clone().unwrap_or_default();
        if let Some(not_before) = attr_number(&attributes, NOT_BEFORE_ATTRIBUTE) {
            let now = now_ms();
            if not_before > now {
                self.redelay(&message, &receipt, not_before, now).await;
                return true;
            }
        }
        let body = message.body.as_deref().unwrap_or_default();
        let job = match serde_json::from_str::<JobRef>(body) {
            Ok(job) => job,
            Err(e) => {
                self.dead_letter_malformed(&message, &receipt, &e).await;
                return true;
            }
        };
        let receive_count = message
            .attributes
            .as_ref()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(1);
        let reason = attr_string(&attributes, REASON_ATTRIBUTE);
        let handle = SqsAck::new(self.shared.clone(), self.url.clone(), receipt, permit);
        let delivery = Delivery::new(self.lane, job, receive_count > 1, reason, Box::new(handle));
        match self.tx.send(Ok(delivery)).await {
            Ok(()) => true,
            Err(mpsc::error::SendError(item)) => {
                if let Ok(delivery) = item {
                    // Visible again now rather than after the timeout.
                    let _ = delivery.nack(true).await;
                }
                false
            }
        }
    }

    /// Makes a message visible again at once.
    async fn release(&self, message: &Message) {
        if let Some(receipt) = message.receipt_handle.as_deref() {
            if let Err(e) = change_visibility(&self.shared, &self.url, receipt, 0).await {
                debug!(queue = %self.queue, error = %e, "could not release a message; it returns after its timeout");
            }
        }
    }

    /// Re-sends a message that is not due yet with the remaining delay, then
    /// deletes this copy. If either step fails the message comes back after its
    /// visibility timeout and is re-delayed then; a duplicate is fenced downstream.
    async fn redelay(&self, message: &Message, receipt: &str, not_before: u64, now: u64) {
        let outgoing = Outgoing {
            lane: self.lane,
            body: message.body.clone().unwrap_or_default(),
            delay_secs: remaining_delay_secs(
                not_before,
                now,
                self.shared.config.max_native_delay_secs,
            ),
            attributes: message.message_attributes.clone().unwrap_or_default(),
        };
        if let Err(e) = self.shared.send(outgoing).await {
            warn!(queue = %self.queue, error = %e, "could not re-delay a message; it returns after its visibility timeout");
            return;
        }
        if let Err(e) = delete(&self.shared, &self.url, receipt).await {
            warn!(queue = %self.queue, error = %e, "could not delete a re-delayed message; it may arrive twice");
        }
    }

    /// Moves a message that is not a `JobRef` to the dead lane so it cannot jam its lane.
    async fn dead_letter_malformed(
        &self,
        message: &Message,
        receipt: &str,
        error: &serde_json::Error,
    ) {
        if self.lane == Lane::Dead {
            // Re-dead-lettering would loop; it stays for an operator and shows up
            // again after each visibility timeout.
            warn!(queue = %self.queue, %error, "malformed message in the dead lane left in place");
            return;
        }
        warn!(queue = %self.queue, %error, "malformed message moved to the dead lane");
        let mut attributes = HashMap::new();
        match reason_attribute(&format!("malformed message: {error}")) {
            Ok(Some(value)) => {
                attributes.insert(REASON_ATTRIBUTE.to_owned(), value);
            }
            Ok(None) => {}
            Err(e) => warn!(queue = %self.queue, error = %e, "dead-lettering without a reason"),
        }
        let outgoing = Outgoing {
            lane: Lane::Dead,
            body: message.body.clone().unwrap_or_default(),
            delay_secs: 0,
            attributes,
        };
        if let Err(e) = self.shared.send(outgoing).await {
            // Left in place: it comes back after the timeout, and the redrive
            // policy moves it to the dead lane if this keeps failing.
            warn!(queue = %self.queue, error = %e, "cannot dead-letter a malformed message");
            return;
        }
        if let Err(e) = delete(&self.shared, &self.url, receipt).await {
            warn!(queue = %self.queue, error = %e, "could not delete a dead-lettered malformed message");
        }
    }
}

fn attr_string(attrs: &HashMap<String, MessageAttributeValue>, name: &str) -> Option<String> {
    attrs.get(name)?.string_value.clone()
}

fn attr_number(attrs: &HashMap<String, MessageAttributeValue>, name: &str) -> Option<u64> {
    attrs.get(name)?.string_value.as_deref()?.parse().ok()
}

async fn delete(shared: &Shared, url: &str, receipt: &str) -> Result<(), SqsCallError> {
    shared
        .client
        .delete_message()
        .queue_url(url)
        .receipt_handle(receipt)
        .send()
        .await
        .map_err(|e| SqsCallError::new("DeleteMessage", e))?;
    Ok(())
}

async fn change_visibility(
    shared: &Shared,
    url: &str,
    receipt: &str,
    secs: u32,
) -> Result<(), SqsCallError> {
    shared
        .client
        .change_message_visibility()
        .queue_url(url)
        .receipt_handle(receipt)
        .visibility_timeout(i32::try_from(secs).unwrap_or(i32::MAX))
        .send()
        .await
        .map_err(|e| SqsCallError::new("ChangeMessageVisibility", e))?;
    Ok(())
}

/// SQS's answers to a visibility change that no retry can fix.
fn permanent_heartbeat_error(code: Option<&str>) -> bool {
    matches!(
        code,
        Some(
            "ReceiptHandleIsInvalid"
                | "MessageNotInflight"
                | "InvalidParameterValue"
                | "AWS.SimpleQueueService.MessageNotInflight"
        )
    )
}

/// Keeps one held message invisible by re-setting its visibility timeout every
/// third of it. Stops when its stop sender is sent to or dropped.
struct Heartbeat {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Heartbeat {
    fn start(shared: Arc<Shared>, url: String, receipt: String) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let visibility = shared.config.visibility_timeout_secs;
        let period = (Duration::from_secs(u64::from(visibility)) / 3).max(MIN_HEARTBEAT);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(period) => {}
                }
                if let Err(e) = change_visibility(&shared, &url, &receipt, visibility).await {
                    if e.queue_missing() || permanent_heartbeat_error(e.code.as_deref()) {
                        // Message gone, handle stale or the 12 h limit reached: retrying cannot help.
                        warn!(error = %e, "visibility heartbeat stopped; the message may be redelivered");
                        return;
                    }
                    warn!(error = %e, "visibility heartbeat failed; will retry");
                }
            }
        });
        Self { stop, task }
    }

    /// Stops and waits out an extension in flight, so it cannot land after a
    /// settlement that makes the message visible again.
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// Settles one delivery by its receipt handle. Dropping it unsettled stops the
/// heartbeat, so the message returns after its visibility timeout.
struct SqsAck {
    shared: Arc<Shared>,
    url: String,
    receipt: String,
    heartbeat: Option<Heartbeat>,
    /// Frees the consumer's prefetch slot when this is settled or dropped.
    _slot: OwnedSemaphorePermit,
}

impl SqsAck {
    fn new(shared: Arc<Shared>, url: String, receipt: String, slot: OwnedSemaphorePermit) -> Self {
        let heartbeat = Heartbeat::start(shared.clone(), url.clone(), receipt.clone());
        Self {
            shared,
            url,
            receipt,
            heartbeat: Some(heartbeat),
            _slot: slot,
        }
    }

    async fn stop_heartbeat(&mut self) {
        if let Some(heartbeat) = self.heartbeat.take() {
            heartbeat.stop().await;
        }
    }
}

#[async_trait::async_trait]
impl Acknowledge for SqsAck {
    async fn ack(mut self: Box<Self>) -> Result<(), BrokerError> {
        self.stop_heartbeat().await;
        delete(&self.shared, &self.url, &self.receipt)
            .await
            .map_err(|e| BrokerError::Ack(Box::new(e)))
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        self.stop_heartbeat().await;
        let result = if requeue {
            change_visibility(&self.shared, &self.url, &self.receipt, 0).await
        } else {
            delete(&self.shared, &self.url, &self.receipt).await
        };
        result.map_err(|e| BrokerError::Ack(Box::new(e)))
    }
}
