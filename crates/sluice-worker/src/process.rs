//! One job's turn: claim it, call the provider through the permit, and record the outcome.
//! Every write is fenced by the claim's attempt, so a stale message changes nothing.

use crate::{telemetry, Worker};
use sluice_broker::Delivery;
use sluice_core::RetryDecision;
use sluice_notify::BusMessage;
use sluice_providers::{ChatRequest, Permit, ProviderError};
use sluice_store::{Claim, Completion, Failure, OutboxMessage};
use std::time::{Duration, Instant};
use tracing::Instrument;

impl Worker {
    /// Handle one delivery inside a span carrying its request_id, so every line logged
    /// meanwhile names the job.
    pub(crate) async fn process(&self, delivery: Delivery, permit: Option<Permit>) {
        let span = tracing::info_span!(
            "job",
            request_id = %delivery.job.request_id,
            attempt = delivery.job.attempt,
            lane = %delivery.lane,
        );
        self.process_in_span(delivery, permit)
            .instrument(span)
            .await
    }

    async fn process_in_span(&self, delivery: Delivery, permit: Option<Permit>) {
        let job = delivery.job.clone();
        let id = job.request_id;
        let claim = match self.claims.call(job.clone()).await {
            Ok(Some(claim)) => claim,
            Ok(None) => {
                tracing::debug!(message = "dropping stale or cancelled message", request_id = %id, attempt = job.attempt);
                ack(delivery).await;
                return;
            }
            Err(error) => {
                tracing::warn!(message = "claim failed; message goes back to its lane", request_id = %id, %error);
                tokio::time::sleep(Duration::from_secs(1)).await;
                if let Err(error) = delivery.nack(true).await {
                    tracing::debug!(message = "nack failed; the broker redelivers", %error);
                }
                return;
            }
        };
        // The first claim ever ends the job's wait in its lane (later ones follow retries).
        if claim.attempt == 1 {
            telemetry::queue_wait(claim.lane, claim.created_at);
        }
        let Some(permit) = permit else {
            let failure = Failure {
                error: format!("no route for model {:?}", claim.request.model),
                endpoint: None,
                throttled: false,
                status: None,
            };
            Box::pin(self.finish_failed(delivery, &claim, failure, None)).await;
            return;
        };

        self.held.insert(id, claim.attempt);
        let endpoint = permit.endpoint().to_owned();
        let price = permit.price();
        let request_id = id.to_string();
        let request = ChatRequest {
            request_id: &request_id,
            job: &claim.request,
        };
        let called = Instant::now();
        let outcome = if claim.request.stream {
            let (tx, mut deltas) = tokio::sync::mpsc::channel::<String>(256);
            let bus = self.bus.clone();
            let tenant = job.tenant.clone();
            let attempt = claim.attempt;
            // Deltas go out in order as they arrive; the stored result is the whole text.
            let forward = tokio::spawn(async move {
                let mut index = 0u32;
                while let Some(text) = deltas.recv().await {
                    bus.publish(BusMessage::Delta {
                        request_id: id,
                        tenant: tenant.clone(),
                        attempt,
                        index,
                        text,
                    });
                    index += 1;
                }
            });
            // Boxed, as below: the call's future is most of this one's size, and this one is
            // moved whole several times per job (docs/PERFORMANCE.md, tenth round).
            let outcome = Box::pin(permit.call_stream(request, tx)).await;
            // The sender is gone with the call, so the forwarder ends after the last delta.
            let _ = forward.await;
            outcome
        } else {
            Box::pin(permit.call(request)).await
        };
        self.held.remove(id);
        let call_outcome = match &outcome {
            Ok(_) => "ok",
            Err(ProviderError::RateLimited { .. }) => "rate_limited",
            Err(_) => "error",
        };
        telemetry::provider_call(&endpoint, call_outcome, called.elapsed());

        match outcome {
            Ok(response) => {
                let cost = price.map(|p| {
                    p.cost(
                        response.usage.prompt_tokens,
                        response.usage.completion_tokens,
                    )
                });
                // What the provider served and bills, whether or not the result is kept.
                telemetry::usage(
                    &endpoint,
                    response.usage.prompt_tokens,
                    response.usage.completion_tokens,
                    cost,
                );
                let result = match serde_json::to_value(&response) {
                    Ok(v) => v,
                    Err(error) => {
                        // The lease expires and another attempt runs; the message is done with.
                        tracing::error!(message = "could not encode a provider response", request_id = %id, %error);
                        ack(delivery).await;
                        return;
                    }
                };
                let completion = Completion {
                    id,
                    attempt: claim.attempt,
                    result,
                    endpoint: endpoint.clone(),
                    cost_usd: cost,
                };
                match self.completions.call(completion).await {
                    Ok(true) => {
                        telemetry::job("completed", claim.lane);
                        telemetry::job_duration(claim.lane, claim.created_at);
                        tracing::debug!(message = "job succeeded", request_id = %id, %endpoint)
                    }
                    Ok(false) => {
                        tracing::info!(message = "result discarded: the job was cancelled or taken over", request_id = %id)
                    }
                    // The lease expires and the reaper hands the job to another attempt.
                    Err(error) => {
                        tracing::warn!(message = "could not store a result", request_id = %id, %error)
                    }
                }
                ack(delivery).await;
            }
            Err(error) => {
                let throttled = matches!(error, ProviderError::RateLimited { .. });
                let failure = Failure {
                    error: error.to_string(),
                    endpoint: Some(endpoint),
                    throttled,
                    status: error.status(),
                };
                // A 429 is counted apart from the tries: it is the pool's state, not the job's fault.
                let count = if throttled {
                    claim.throttled.saturating_add(1)
                } else {
                    claim.tries
                };
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                // Boxed: a failure is rare, and its future would otherwise set the size of
                // every job's.
                Box::pin(self.finish_failed(delivery, &claim, failure, Some((&error, count))))
                    .await;
            }
        }
    }

    /// Route a failed attempt to `retry` or `dead`, then ack the message that carried it.
    /// `provider` is the provider's error with the job's tries so far, or for a 429 its throttles.
    async fn finish_failed(
        &self,
        delivery: Delivery,
        claim: &Claim,
        failure: Failure,
        provider: Option<(&ProviderError, u32)>,
    ) {
        let id = delivery.job.request_id;
        let attempt = claim.attempt;
        let decision = match provider {
            Some((ProviderError::RateLimited { retry_after, .. }, throttled)) => self
                .config
                .retry
                .decide_rate_limited(throttled, *retry_after, rand::random::<f64>()),
            Some((error, tries)) => {
                match self
                    .config
                    .retry
                    .decide(tries, error.is_retryable(), rand::random::<f64>())
                {
                    // A provider's own retry-after is a floor for our backoff.
                    RetryDecision::RetryAfter(d) => {
                        RetryDecision::RetryAfter(d.max(error.retry_after().unwrap_or_default()))
                    }
                    dead => dead,
                }
            }
            None => RetryDecision::Dead,
        };
        let event = match decision {
            RetryDecision::RetryAfter(_) => "failed",
            RetryDecision::Dead => "dead",
        };
        let stored = match decision {
            RetryDecision::RetryAfter(delay) => {
                tracing::info!(message = "attempt failed; retrying", request_id = %id, attempt, error = %failure.error, delay_ms = delay.as_millis() as u64);
                self.store.retry_later(id, attempt, &failure, delay).await
            }
            RetryDecision::Dead => {
                tracing::warn!(message = "job dead-lettered", request_id = %id, attempt, error = %failure.error);
                self.store.dead_letter(id, attempt, &failure).await
            }
        };
        match stored {
            Ok(Some(message)) => {
                telemetry::job(event, claim.lane);
                self.publish(message).await
            }
            Ok(None) => {
                tracing::info!(message = "failure not recorded: the job was cancelled or taken over", request_id = %id)
            }
            Err(error) => {
                tracing::warn!(message = "could not record a failure; the lease will expire", request_id = %id, %error)
            }
        }
        ack(delivery).await;
    }

    async fn publish(&self, message: OutboxMessage) {
        let id = message.job.request_id;
        if let Err(error) = self.publisher.publish(message).await {
            tracing::warn!(message = "publish failed; the relay will retry", request_id = %id, %error);
        }
    }
}

async fn ack(delivery: Delivery) {
    if let Err(error) = delivery.ack().await {
        // The broker will redeliver; the claim fence drops the duplicate.
        tracing::debug!(message = "ack failed", %error);
    }
}
