//! Keeping the lanes honest with the database: republish jobs whose lane message is gone,
//! and end jobs whose message the broker dead-lettered by itself.

use crate::{telemetry, Worker};
use futures::StreamExt;
use sluice_broker::{Backoff, Delivery};
use sluice_core::Lane;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Jobs republished per lane per round, so one round stays one short statement.
const REPUBLISH_PER_ROUND: i64 = 500;
/// Dead-lane messages held at once by one worker.
const DEAD_PREFETCH: u16 = 16;
/// Why a job whose message the broker dead-lettered without saying why is dead.
const BROKER_GAVE_UP: &str = "the broker dead-lettered its message: it was received more times \
                              than the lane allows without being acknowledged";

impl Worker {
    /// One round: for each lane not paused that the broker reports empty (nothing ready, so a message a
    /// waiting job had would have been taken by now), republish the jobs that have waited in
    /// it longer than they could with a message. A lane with messages ready is left alone:
    /// a backlog is not a loss, and republishing it would only double it.
    pub(crate) async fn reconcile(&self) {
        let after = self.config.reconcile_after();
        for lane in Lane::CONSUMED {
            // An operator's pause keeps jobs waiting on purpose, in worker buffers too.
            if self.paused_lanes[lane.index()].load(Ordering::Relaxed) {
                continue;
            }
            let broker = self.publisher.broker();
            match broker.depth(lane).await {
                Ok(0) => {}
                Ok(_) => continue,
                Err(error) => {
                    tracing::warn!(message = "reconciler cannot read a lane's depth", %lane, %error);
                    continue;
                }
            }
            // A retrying job's message is delayed by its backoff: it may wait that much more.
            let waited = if lane == Lane::Retry {
                after + self.config.retry.longest_delay()
            } else {
                after
            };
            let messages = match self
                .store
                .republish_waiting(lane, waited, REPUBLISH_PER_ROUND)
                .await
            {
                Ok(messages) if messages.is_empty() => continue,
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(message = "reconciler cannot look for lost messages", %lane, %error);
                    continue;
                }
            };
            tracing::warn!(
                message = "republished jobs that waited with no message in their lane",
                %lane,
                jobs = messages.len(),
                waited_secs = waited.as_secs_f64()
            );
            telemetry::republished(lane, messages.len());
            if let Err(error) = self.publisher.publish_many(messages).await {
                tracing::warn!(message = "publishing reconciled jobs failed; the relay will retry", %error);
            }
        }
    }

    /// Drain the dead lane: a message whose job still waits at that attempt was dead-lettered
    /// by the broker itself, so the job goes to `dead` with the reason; any other message
    /// (Sluice's own dead-letters, whose jobs are dead already) is dropped. The database
    /// keeps every dead job with its error.
    pub(crate) fn spawn_dead_lane_drain(self: &Arc<Self>, stop: CancellationToken) {
        let worker = Arc::clone(self);
        tokio::spawn(async move {
            let mut backoff = Backoff::default();
            let mut stream = loop {
                let consume = worker.publisher.broker().consume(Lane::Dead, DEAD_PREFETCH);
                match tokio::select! {
                    _ = stop.cancelled() => return,
                    consumer = consume => consumer,
                } {
                    Ok(stream) => break stream,
                    Err(error) => {
                        tracing::warn!(message = "cannot consume the dead lane", %error);
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_delay()) => {}
                        }
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(delivery)) => worker.settle_dead_letter(delivery).await,
                    Some(Err(error)) => {
                        tracing::warn!(message = "dead lane consumer error", %error);
                    }
                    None => return,
                }
            }
        });
    }

    async fn settle_dead_letter(&self, delivery: Delivery) {
        let reason = delivery.reason.as_deref().unwrap_or(BROKER_GAVE_UP);
        match self
            .store
            .dead_lettered_by_broker(&delivery.job, reason)
            .await
        {
            Ok(ended) => {
                if ended {
                    tracing::warn!(
                        message = "job dead: the broker dead-lettered its message",
                        request_id = %delivery.job.request_id,
                        attempt = delivery.job.attempt,
                        %reason
                    );
                    telemetry::job("dead", Lane::Dead);
                }
                if let Err(error) = delivery.ack().await {
                    tracing::warn!(message = "ack of a dead-lane message failed; it comes back", %error);
                }
            }
            Err(error) => {
                tracing::warn!(message = "cannot settle a dead-lane message; it comes back", %error);
                // Not at once: the store is the trouble, and an instant redelivery would spin.
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(error) = delivery.nack(true).await {
                    tracing::warn!(message = "cannot hand back a dead-lane message", %error);
                }
            }
        }
    }
}
