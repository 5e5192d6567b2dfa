//! The [`Permit`]: the right to send one request to one endpoint now, as a pool grants it.
//! Spent, its outcome flows back into the endpoint's health; dropped unused, it gives back what it held.

use crate::pool::{Endpoint, PoolState};
use crate::shared::SharedProbe;
use crate::{ChatRequest, ChatResponse, ProviderError};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a permit needs to report its outcome.
pub(crate) struct Feedback {
    pub(crate) state: Arc<Mutex<PoolState>>,
    pub(crate) origin: Instant,
    pub(crate) index: usize,
    /// Tokens charged to the endpoint's budget for this call.
    pub(crate) charged: u32,
}

impl Feedback {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        crate::pool::lock(&self.state)
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// The right to send one request to one endpoint now. Dropped unused, it gives back what it held.
pub struct Permit {
    pub(crate) endpoint: Arc<Endpoint>,
    pub(crate) feedback: Option<Feedback>,
    /// This call is the probe after idle for every worker: its outcome settles the shared
    /// bucket. Dropped unused, the probe releases itself.
    pub(crate) shared_probe: Option<SharedProbe>,
}

impl Permit {
    /// Name of the endpoint this permit is for, recorded on the job.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.name
    }

    /// The endpoint's price, if it has one: what its calls cost.
    pub fn price(&self) -> Option<sluice_core::Price> {
        self.endpoint.price
    }

    /// Spend the permit on one call.
    pub async fn call(mut self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        let outcome = self.endpoint.provider.chat(req).await;
        self.settle(&outcome).await;
        outcome
    }

    /// Spend the permit on one streamed call: text deltas go to `deltas` as they arrive, and the
    /// assembled response is returned (see [`crate::Provider::chat_stream`]).
    pub async fn call_stream(
        mut self,
        req: ChatRequest<'_>,
        deltas: tokio::sync::mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        let outcome = self.endpoint.provider.chat_stream(req, deltas).await;
        self.settle(&outcome).await;
        outcome
    }

    /// Report the outcome (to the shared probe too, if this call is it), then correct the shared
    /// token budget by what the call really used.
    async fn settle(&mut self, outcome: &Result<ChatResponse, ProviderError>) {
        let correction = self.report(outcome);
        if let Some(probe) = self.shared_probe.take() {
            // Only a success reports what the provider holds; a 429 or a failure tells nothing.
            let remaining = outcome
                .as_ref()
                .ok()
                .and_then(|response| response.rate)
                .and_then(|rate| rate.remaining);
            if let Err(error) = probe.report(remaining).await {
                tracing::debug!(endpoint = %self.endpoint.name, %error, "could not settle the probe after idle; its hold ends it");
            }
        }
        if let (Some(budget), Some(delta)) = (&self.endpoint.budget, correction) {
            budget.adjust(delta).await;
        }
    }

    /// Feed the outcome to the endpoint's health (see [`crate::health::Health::record`]).
    /// Returns the token correction (real use minus the charge), when there is one to make.
    fn report(&mut self, outcome: &Result<ChatResponse, ProviderError>) -> Option<i64> {
        let feedback = self.feedback.take()?;
        let now = feedback.now();
        let mut state = feedback.lock();
        state.health[feedback.index].record(now, outcome, feedback.charged)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(feedback) = self.feedback.take() {
            let now = feedback.now();
            feedback.lock().health[feedback.index].release(now, feedback.charged);
            // The shared budget is refunded on the runtime: drop cannot wait on Redis.
            if let (Some(budget), Ok(runtime)) = (
                self.endpoint.budget.clone(),
                tokio::runtime::Handle::try_current(),
            ) {
                let charged = i64::from(feedback.charged);
                runtime.spawn(async move { budget.adjust(-charged).await });
            }
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("endpoint", &self.endpoint.name)
            .finish()
    }
}
