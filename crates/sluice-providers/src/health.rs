//! One endpoint's health as this process sees it: its adaptive rate, circuit breaker, token
//! budget and pause; how taking a permit and a call's outcome move them; the stats metrics read.
//!
//! Everything here is plain state behind the pool's lock, changed in one step per event, so
//! choosing an endpoint and charging it stay atomic (see [`crate::Pool`]).

use crate::config::{EndpointConfig, ProviderKind};
use crate::{ChatResponse, ProviderError};
use sluice_core::gcra::Gcra;
use sluice_core::{AdaptiveConfig, AdaptiveRate, Breaker, BreakerConfig, BreakerState};
use std::collections::VecDeque;
use std::time::Duration;

/// The window of [`EndpointStats::used_last_minute`].
const USE_WINDOW: Duration = Duration::from_secs(60);

/// How long a paused endpoint reports until it could serve: it is looked at again then.
const PAUSED_WAIT: Duration = Duration::from_secs(1);

/// One endpoint as metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointStats {
    pub name: String,
    /// The configured requests per minute.
    pub rpm: u32,
    /// Permits this process was granted on the endpoint in the last minute (other workers'
    /// are theirs to report).
    pub used_last_minute: u32,
    pub breaker: BreakerState,
}

/// The burst of an endpoint's token budget (local or shared): one second's worth of its `tpm`.
pub(crate) fn token_burst(tpm: u32) -> u32 {
    (tpm / 60).max(1) - 1
}

/// How long the probe after idle may hold `config`'s endpoint: none for a provider that reports
/// no remaining budget (Gemini), whose probe could only delay the ramp.
pub(crate) fn idle_probe(config: &EndpointConfig, adaptive: AdaptiveConfig) -> Duration {
    match config.kind {
        ProviderKind::Gemini => Duration::ZERO,
        ProviderKind::Openai | ProviderKind::Anthropic => adaptive.idle_probe(),
    }
}

/// One endpoint's local view of its health and pace.
pub(crate) struct Health {
    rate: AdaptiveRate,
    breaker: Breaker,
    /// Token budget, when the endpoint has a `tpm`: charged the estimate up front and
    /// corrected with the real usage afterwards.
    tokens: Option<Gcra>,
    /// An operator paused the endpoint: it takes no calls until resumed.
    paused: bool,
    /// When this process's permits of the last minute were granted, oldest first: the
    /// limiter's state is a rate, not a count, and utilization wants the count.
    granted: VecDeque<Duration>,
}

impl Health {
    /// A fresh endpoint at its configured rate, burst and token budget, breaker closed.
    pub(crate) fn new(
        config: &EndpointConfig,
        adaptive: AdaptiveConfig,
        breaker: BreakerConfig,
    ) -> Health {
        let adaptive = AdaptiveConfig {
            idle_probe_secs: idle_probe(config, adaptive).as_secs_f64(),
            ..adaptive
        };
        Health {
            rate: AdaptiveRate::new(config.rpm, config.effective_burst(), adaptive),
            breaker: Breaker::new(breaker),
            tokens: config
                .tpm
                .map(|tpm| Gcra::per_minute(tpm, token_burst(tpm))),
            paused: false,
            granted: VecDeque::new(),
        }
    }

    fn forget_before(&mut self, now: Duration) {
        while self
            .granted
            .front()
            .is_some_and(|at| now.saturating_sub(*at) > USE_WINDOW)
        {
            self.granted.pop_front();
        }
    }

    /// Whether the endpoint may be asked at all: not paused, breaker not open.
    pub(crate) fn available(&self, now: Duration) -> bool {
        !self.paused && self.breaker.state(now) != BreakerState::Open
    }

    /// Whether the breaker is open (a paused endpoint is not: it may be resumed any second).
    pub(crate) fn is_open(&self, now: Duration) -> bool {
        self.breaker.state(now) == BreakerState::Open
    }

    /// How long until a call estimated at `tokens` could go, without taking anything.
    pub(crate) fn wait(&self, now: Duration, tokens: u32) -> Duration {
        if self.paused {
            return PAUSED_WAIT;
        }
        let requests = match self.breaker.retry_in(now) {
            Some(open) => open.max(self.rate.wait_time(now)),
            None => self.rate.wait_time(now),
        };
        let budget = self
            .tokens
            .as_ref()
            .map_or(Duration::ZERO, |t| t.wait_time(now, tokens));
        requests.max(budget)
    }

    /// The current rate in requests per minute.
    pub(crate) fn effective_rpm(&self, now: Duration) -> f64 {
        self.rate.effective_rpm(now)
    }

    pub(crate) fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Take one call's cell, breaker slot and `tokens` from an endpoint that could serve now
    /// (checked with [`Health::wait`]). False when the limiter or the breaker says no.
    pub(crate) fn try_take(&mut self, now: Duration, tokens: u32) -> bool {
        if self.rate.try_acquire(now).is_err() {
            return false;
        }
        if !self.breaker.try_acquire(now) {
            // Half-open with its probe already out: this cell goes unused.
            self.rate.on_other_failure(now);
            return false;
        }
        if let Some(budget) = self.tokens.as_mut() {
            // Conforms (checked by the caller), so this records the charge without waiting.
            let _ = budget.reserve(now, tokens);
        }
        true
    }

    /// Count a permit granted now, for [`EndpointStats::used_last_minute`].
    pub(crate) fn count_grant(&mut self, now: Duration) {
        self.forget_before(now);
        self.granted.push_back(now);
    }

    /// Give back what a permit took and did not use: its cell, its probe slot if any, and the
    /// `tokens` charged locally.
    pub(crate) fn release(&mut self, now: Duration, tokens: u32) {
        self.rate.on_other_failure(now);
        self.breaker.on_cancelled(now);
        if let Some(budget) = self.tokens.as_mut() {
            budget.refund(now, tokens);
        }
    }

    /// Feed a call's outcome to the limiter and breaker, and correct the `charged` tokens. Only
    /// failures that speak to the endpoint's health (5xx, timeouts, broken connections) count
    /// against its breaker; a 429 is the limiter's business and a 4xx is the request's fault.
    /// Returns the token correction (real use minus the charge), when there is one to make.
    pub(crate) fn record(
        &mut self,
        now: Duration,
        outcome: &Result<ChatResponse, ProviderError>,
        charged: u32,
    ) -> Option<i64> {
        // Correct the token charge: the real usage on success; nothing on refusals, which
        // providers do not count; the estimate stands when we cannot know (timeouts, 5xx).
        let used = match outcome {
            Ok(response) => Some(response.usage.total_tokens),
            Err(ProviderError::RateLimited { .. } | ProviderError::Rejected { .. }) => Some(0),
            Err(_) => None,
        };
        if let (Some(budget), Some(used)) = (self.tokens.as_mut(), used) {
            if used > charged {
                let _ = budget.reserve(now, used - charged);
            } else {
                budget.refund(now, charged - used);
            }
        }
        let correction = used.map(|used| i64::from(used) - i64::from(charged));
        match outcome {
            Ok(response) => {
                let rate = response.rate.unwrap_or_default();
                // With the budget it reports, a probe after idle ends the ramp.
                self.rate
                    .on_success_reporting(now, rate.remaining, rate.reset);
                self.breaker.on_success(now);
                if let (Some(budget), Some(left)) = (self.tokens.as_mut(), rate.remaining_tokens) {
                    // The provider counts tokens its own way: never plan on more than it says.
                    budget.cap_available(now, u32::try_from(left).unwrap_or(u32::MAX));
                }
            }
            Err(ProviderError::RateLimited { retry_after, .. }) => {
                self.rate.on_rate_limited(now, *retry_after);
                self.breaker.on_cancelled(now);
            }
            Err(ProviderError::Rejected { .. }) => {
                self.rate.on_other_failure(now);
                self.breaker.on_cancelled(now);
            }
            Err(_) => {
                self.rate.on_other_failure(now);
                self.breaker.on_failure(now);
            }
        }
        correction
    }

    /// The endpoint as metrics see it, forgetting grants older than the window.
    pub(crate) fn stats(&mut self, name: &str, rpm: u32, now: Duration) -> EndpointStats {
        self.forget_before(now);
        EndpointStats {
            name: name.to_owned(),
            rpm,
            used_last_minute: u32::try_from(self.granted.len()).unwrap_or(u32::MAX),
            breaker: self.breaker.state(now),
        }
    }
}
