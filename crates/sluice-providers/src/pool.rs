//! Pools of endpoints behind one model alias and the choice among them: each endpoint with its
//! provider, its health and (with Redis) the limits it shares with every worker.
//!
//! A pool grants [`Permit`]s: among the endpoints that can serve now it picks one in proportion
//! to its rate times its weight, and charges it under one lock so choosing and taking is atomic.

use crate::config::{ConfigError, EndpointConfig, PoolConfig, ProviderKind};
use crate::health::{idle_probe, token_burst, EndpointStats, Health};
use crate::openai::OpenAiCompatible;
use crate::permit::{Feedback, Permit};
use crate::shared::{SharedBudget, SharedLimiter, SharedLimits};
use crate::{Anthropic, Gemini, Provider};
use serde::Deserialize;
use sluice_core::{AdaptiveConfig, BreakerConfig};
use std::collections::BTreeSet;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One endpoint's fixed parts: what it is, what it costs, and the limits it shares.
pub(crate) struct Endpoint {
    pub(crate) name: String,
    /// The configured limit, against which use is measured.
    pub(crate) rpm: u32,
    /// What a call costs, for the job's cost and its tenant's budget.
    pub(crate) price: Option<sluice_core::Price>,
    pub(crate) provider: Arc<dyn Provider>,
    pub(crate) shared: Option<SharedLimiter>,
    /// The token budget shared with every worker, when the endpoint has a `tpm` and Redis is on.
    pub(crate) budget: Option<SharedBudget>,
}

/// How every pool's endpoints adapt and protect themselves.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolOptions {
    pub adaptive: AdaptiveConfig,
    pub breaker: BreakerConfig,
    /// Share each endpoint's limit with every worker through Redis.
    #[serde(skip)]
    pub shared: Option<SharedLimits>,
}

/// Health and the choice credit of a pool's endpoints, under one lock so choosing and taking
/// is atomic.
pub(crate) struct PoolState {
    pub(crate) health: Vec<Health>,
    /// Smooth weighted round-robin credit per endpoint (as nginx balances upstreams): among the
    /// endpoints that can serve now, each is chosen in proportion to its rpm times its weight.
    credit: Vec<f64>,
}

pub(crate) fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
    // The state is plain numbers that are always consistent, so a panic elsewhere while
    // holding the lock leaves nothing to repair.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A named set of endpoints serving one model alias.
pub struct Pool {
    name: String,
    endpoints: Vec<Arc<Endpoint>>,
    state: Arc<Mutex<PoolState>>,
    /// Each endpoint's share when several can serve: configured rpm times weight. Static, so
    /// equal endpoints alternate exactly; the limiters see to current rates.
    shares: Vec<f64>,
    /// Time origin for the limiters and breakers.
    origin: Instant,
}

impl Pool {
    /// Build the pool's endpoints from configuration, with default options.
    pub fn new(config: &PoolConfig, http: reqwest::Client) -> Result<Pool, ConfigError> {
        Pool::with_options(config, http, &PoolOptions::default())
    }

    /// Build the pool's endpoints from configuration.
    pub fn with_options(
        config: &PoolConfig,
        http: reqwest::Client,
        options: &PoolOptions,
    ) -> Result<Pool, ConfigError> {
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                let provider: Arc<dyn Provider> = match e.kind {
                    ProviderKind::Openai => Arc::new(OpenAiCompatible::new(e, http.clone())?),
                    ProviderKind::Anthropic => Arc::new(Anthropic::new(e, http.clone())?),
                    ProviderKind::Gemini => Arc::new(Gemini::new(e, http.clone())?),
                };
                Ok((e.clone(), provider))
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Pool::build(&config.name, endpoints, options)
    }

    /// Build a pool around ready providers (a fake in tests, or an adapter built elsewhere);
    /// each endpoint's `name`, `rpm` and `burst` come from its config.
    pub fn with_providers(
        name: &str,
        endpoints: Vec<(EndpointConfig, Arc<dyn Provider>)>,
    ) -> Result<Pool, ConfigError> {
        Pool::build(name, endpoints, &PoolOptions::default())
    }

    fn build(
        name: &str,
        endpoints: Vec<(EndpointConfig, Arc<dyn Provider>)>,
        options: &PoolOptions,
    ) -> Result<Pool, ConfigError> {
        if endpoints.is_empty() {
            return Err(ConfigError::EmptyPool { pool: name.into() });
        }
        let mut seen = BTreeSet::new();
        let mut health = Vec::with_capacity(endpoints.len());
        let mut weights = Vec::with_capacity(endpoints.len());
        let mut eps = Vec::with_capacity(endpoints.len());
        for (config, provider) in endpoints {
            if !seen.insert(config.name.clone()) {
                return Err(ConfigError::DuplicateEndpoint(config.name));
            }
            if config.rpm == 0 {
                return Err(ConfigError::ZeroRpm {
                    endpoint: config.name,
                });
            }
            if !(config.weight.is_finite() && config.weight > 0.0) {
                return Err(ConfigError::BadWeight {
                    endpoint: config.name,
                });
            }
            if let Some(Err(reason)) = config.price.as_ref().map(sluice_core::Price::validate) {
                return Err(ConfigError::BadPrice {
                    endpoint: config.name,
                    reason,
                });
            }
            weights.push(f64::from(config.rpm) * config.weight);
            health.push(Health::new(&config, options.adaptive, options.breaker));
            let shared = options.shared.as_ref().map(|limits| {
                limits.limiter_probing(
                    &config.name,
                    config.rpm,
                    config.effective_burst(),
                    idle_probe(&config, options.adaptive),
                )
            });
            let budget = options
                .shared
                .as_ref()
                .zip(config.tpm)
                .map(|(limits, tpm)| limits.token_budget(&config.name, tpm, token_burst(tpm)));
            eps.push(Arc::new(Endpoint {
                name: config.name,
                rpm: config.rpm,
                price: config.price,
                provider,
                shared,
                budget,
            }));
        }
        Ok(Pool {
            name: name.into(),
            endpoints: eps,
            state: Arc::new(Mutex::new(PoolState {
                credit: vec![0.0; health.len()],
                health,
            })),
            shares: weights,
            origin: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Names of the pool's endpoints, in configuration order.
    pub fn endpoints(&self) -> impl Iterator<Item = &str> {
        self.endpoints.iter().map(|e| e.name.as_str())
    }

    /// Wait for a permit on some endpoint that can serve.
    pub async fn acquire(&self) -> Permit {
        loop {
            if let Some(permit) = self.try_acquire().await {
                return permit;
            }
            let wait = self
                .wait_time()
                .clamp(Duration::from_millis(1), Duration::from_secs(1));
            tokio::time::sleep(wait).await;
        }
    }

    /// A permit now, or `None` if no endpoint can serve now. Endpoints whose breaker is open are
    /// skipped; among those whose limiter allows a call now, each is chosen in proportion to
    /// its rpm times its weight, so a large key takes a large share even when the pool is not
    /// saturated (and under load each serves at its own rate anyway).
    pub async fn try_acquire(&self) -> Option<Permit> {
        self.try_acquire_for(0).await
    }

    /// [`Pool::try_acquire`] for a call estimated at `tokens`, which endpoints with a token
    /// limit must also have room for.
    pub async fn try_acquire_for(&self, tokens: u32) -> Option<Permit> {
        let index = self.take_local(tokens)?;
        let endpoint = &self.endpoints[index];
        let give_back = || {
            // Other workers used this endpoint's share: give back the local cell, the probe
            // slot if any, and the local token charge.
            let now = self.origin.elapsed();
            lock(&self.state).health[index].release(now, tokens);
        };
        if let Some(budget) = &endpoint.budget {
            if budget.try_take(tokens).await.is_err() {
                give_back();
                return None;
            }
        }
        let mut shared_probe = None;
        if let Some(shared) = &endpoint.shared {
            match shared.try_acquire_probing().await {
                Ok(probe) => shared_probe = probe,
                Err(_) => {
                    if let Some(budget) = &endpoint.budget {
                        budget.adjust(-i64::from(tokens)).await;
                    }
                    give_back();
                    return None;
                }
            }
        }
        let now = self.origin.elapsed();
        lock(&self.state).health[index].count_grant(now);
        let mut permit = self.permit(index, tokens);
        permit.shared_probe = shared_probe;
        Some(permit)
    }

    fn take_local(&self, tokens: u32) -> Option<usize> {
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        let now = self.origin.elapsed();
        // Endpoints that could serve this call now, with their share: rpm x weight.
        let mut ready: Vec<(usize, f64)> = state
            .health
            .iter()
            .enumerate()
            .filter(|(_, h)| h.available(now) && h.wait(now, tokens).is_zero())
            .map(|(i, _)| (i, self.shares[i]))
            .collect();
        if ready.is_empty() {
            return None;
        }
        let total: f64 = ready.iter().map(|(_, share)| share).sum();
        for &(i, share) in &ready {
            state.credit[i] += share;
        }
        // The most credit goes first; the others are tried in turn if it cannot take the call.
        ready.sort_by(|a, b| state.credit[b.0].total_cmp(&state.credit[a.0]));
        for (i, _) in ready {
            if state.health[i].try_take(now, tokens) {
                state.credit[i] -= total;
                return Some(i);
            }
        }
        None
    }

    /// Calls per second the pool's endpoints allow together at their current rates, leaving
    /// out endpoints whose breaker is open: how fast a backlog for this pool drains.
    pub fn capacity_per_sec(&self) -> f64 {
        let state = lock(&self.state);
        let now = self.origin.elapsed();
        state
            .health
            .iter()
            // A paused endpoint keeps its pace here: it may be resumed any second, and jobs
            // waiting for it should be looked at again soon, not parked as if it were broken.
            .filter(|h| !h.is_open(now))
            .map(|h| h.effective_rpm(now) / 60.0)
            .sum()
    }

    /// How long until some endpoint could grant a permit (zero if one can now), without taking
    /// one. Lets a dispatcher skip jobs for a saturated pool instead of blocking on it. Does not
    /// see the Redis-shared limit, which only [`Pool::try_acquire`] asks.
    pub fn wait_time(&self) -> Duration {
        self.wait_time_for(0)
    }

    /// [`Pool::wait_time`] for a call estimated at `tokens`.
    pub fn wait_time_for(&self, tokens: u32) -> Duration {
        let state = lock(&self.state);
        let now = self.origin.elapsed();
        state
            .health
            .iter()
            .map(|h| h.wait(now, tokens))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// Whether every endpoint is paused or has its breaker open: the pool cannot serve at all
    /// for now, so its route's fallback pools may.
    pub fn is_down(&self) -> bool {
        let state = lock(&self.state);
        let now = self.origin.elapsed();
        state.health.iter().all(|h| !h.available(now))
    }

    /// Pause the endpoints named in `paused` and resume the others (an operator's choice,
    /// read by every worker from the database).
    pub fn set_paused(&self, paused: &std::collections::HashSet<String>) {
        let mut state = lock(&self.state);
        for (endpoint, health) in self.endpoints.iter().zip(state.health.iter_mut()) {
            health.set_paused(paused.contains(&endpoint.name));
        }
    }

    /// Each endpoint's current effective rate in requests per minute (for metrics and tests).
    pub fn effective_rpm(&self) -> Vec<(String, f64)> {
        let state = lock(&self.state);
        let now = self.origin.elapsed();
        self.endpoints
            .iter()
            .zip(&state.health)
            .map(|(e, h)| (e.name.clone(), h.effective_rpm(now)))
            .collect()
    }

    /// Each endpoint's configured rate, its use over the last minute and its breaker state.
    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        let mut state = lock(&self.state);
        let now = self.origin.elapsed();
        self.endpoints
            .iter()
            .zip(state.health.iter_mut())
            .map(|(e, h)| h.stats(&e.name, e.rpm, now))
            .collect()
    }

    fn permit(&self, index: usize, charged: u32) -> Permit {
        Permit {
            endpoint: Arc::clone(&self.endpoints[index]),
            feedback: Some(Feedback {
                state: Arc::clone(&self.state),
                origin: self.origin,
                index,
                charged,
            }),
            shared_probe: None,
        }
    }
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::{ChatRequest, ChatResponse, ProviderError};
    use sluice_core::{BreakerState, JobRequest, Message};

    /// Answers with a fixed outcome.
    struct Fixed(Result<(), ProviderError>);

    #[async_trait::async_trait]
    impl Provider for Fixed {
        async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
            self.0.clone().map(|()| ChatResponse {
                tool_calls: Vec::new(),
                content: req.request_id.to_owned(),
                usage: crate::Usage::default(),
                model: "fixed".into(),
                finish_reason: None,
                rate: None,
            })
        }
    }

    /// Succeeds, reporting in its headers that the provider holds `0` more requests.
    struct Reporting(u64);

    #[async_trait::async_trait]
    impl Provider for Reporting {
        async fn chat(&self, _req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
            Ok(ChatResponse {
                tool_calls: Vec::new(),
                content: String::new(),
                usage: crate::Usage::default(),
                model: "reporting".into(),
                finish_reason: None,
                rate: Some(crate::RateHeaders {
                    remaining: Some(self.0),
                    reset: Some(Duration::from_secs(1)),
                    remaining_tokens: None,
                }),
            })
        }
    }

    #[tokio::test]
    async fn an_idle_endpoint_probes_alone_then_spends_what_the_provider_reports() {
        // 600 rpm, burst 9: 10 at once when the ramp is not in the way.
        let reporting = |remaining: u64| {
            let provider: Arc<dyn Provider> = Arc::new(Reporting(remaining));
            let config = EndpointConfig::new("e0", "http://x/v1", "m", 600);
            Pool::with_providers("p", vec![(config, provider)]).unwrap()
        };
        for (reported, expected) in [(5, 5), (50, 9)] {
            let pool = reporting(reported);
            let probe = pool.try_acquire().await.unwrap();
            assert!(pool.try_acquire().await.is_none(), "the probe goes alone");
            assert!(pool.wait_time() <= Duration::from_millis(10));
            let job = job();
            probe
                .call(ChatRequest {
                    request_id: "probe",
                    job: &job,
                })
                .await
                .unwrap();
            // Held, not dropped: a dropped permit would free its slot, not its cell.
            let mut held = Vec::new();
            while let Some(permit) = pool.try_acquire().await {
                held.push(permit);
                assert!(held.len() <= 10, "runaway");
            }
            // The probe took one of the 10 cells; the rest is capped by the report.
            assert_eq!(held.len(), expected, "{reported} reported");
            assert_eq!(pool.effective_rpm()[0].1, 600.0, "no ramp after the report");
        }
    }

    fn pool_of(endpoints: Vec<(u32, Result<(), ProviderError>)>) -> Result<Pool, ConfigError> {
        let eps = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, (rpm, outcome))| {
                let provider: Arc<dyn Provider> = Arc::new(Fixed(outcome));
                (
                    EndpointConfig::new(format!("e{i}"), "http://x/v1", "m", rpm),
                    provider,
                )
            })
            .collect();
        Pool::with_providers("p", eps)
    }

    fn job() -> JobRequest {
        JobRequest::new("m", vec![Message::user("hi")])
    }

    async fn call(pool: &Pool) -> Option<(String, Result<ChatResponse, ProviderError>)> {
        let permit = pool.try_acquire().await?;
        let name = permit.endpoint().to_owned();
        let job = job();
        let outcome = permit
            .call(ChatRequest {
                request_id: "r",
                job: &job,
            })
            .await;
        Some((name, outcome))
    }

    #[tokio::test]
    async fn permits_alternate_between_endpoints_then_run_dry() {
        let p = pool_of(vec![(60, Ok(())), (60, Ok(()))]).unwrap();
        let mut names = Vec::new();
        while let Some(permit) = p.try_acquire().await {
            names.push(permit.endpoint().to_owned());
            assert!(names.len() < 10, "a 60 rpm pair must run dry: {names:?}");
        }
        assert_eq!(&names[..2], ["e0", "e1"]);
        assert!(p.wait_time() > Duration::ZERO);
    }

    #[tokio::test]
    async fn endpoints_are_chosen_in_proportion_to_rate_times_weight() {
        let count = |permits: &[Permit], name: &str| {
            permits.iter().filter(|p| p.endpoint() == name).count()
        };
        // No ramp nor probe after idle, so neither endpoint runs dry within 22 calls (bursts of
        // 9 and 99) and only the choice decides the split: 1 : 10 by rate, where plain
        // round-robin would give 11 : 11.
        let options = PoolOptions {
            adaptive: AdaptiveConfig {
                ramp_secs: 0.0,
                idle_probe_secs: 0.0,
                ..AdaptiveConfig::default()
            },
            ..PoolOptions::default()
        };
        let endpoint = |name: &str, rpm: u32, weight: f64| {
            let mut config = EndpointConfig::new(name, "http://x/v1", "m", rpm);
            config.weight = weight;
            let provider: Arc<dyn Provider> = Arc::new(Fixed(Ok(())));
            (config, provider)
        };
        let by_rate = Pool::build(
            "r",
            vec![endpoint("e0", 600, 1.0), endpoint("e1", 6_000, 1.0)],
            &options,
        )
        .unwrap();
        let mut held = Vec::new();
        for _ in 0..22 {
            held.push(by_rate.try_acquire().await.unwrap());
        }
        assert_eq!((count(&held, "e0"), count(&held, "e1")), (2, 20));

        let by_weight = Pool::build(
            "w",
            vec![endpoint("slow", 6_000, 1.0), endpoint("fast", 6_000, 3.0)],
            &options,
        )
        .unwrap();
        let mut held = Vec::new();
        for _ in 0..40 {
            held.push(by_weight.try_acquire().await.unwrap());
        }
        assert_eq!((count(&held, "slow"), count(&held, "fast")), (10, 30));
        assert!((by_weight.capacity_per_sec() - 200.0).abs() < 1e-6);

        assert_eq!(
            Pool::build("b", vec![endpoint("bad", 60, 0.0)], &options).err(),
            Some(ConfigError::BadWeight {
                endpoint: "bad".into()
            })
        );
    }

    #[tokio::test]
    async fn failing_endpoint_opens_its_breaker_and_traffic_moves_on() {
        let down = Err(ProviderError::Server {
            status: 503,
            message: "down".into(),
        });
        let p = pool_of(vec![(60_000, down), (60_000, Ok(()))]).unwrap();
        let mut failures = 0;
        for _ in 0..40 {
            let Some((name, outcome)) = call(&p).await else {
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            };
            if outcome.is_err() {
                assert_eq!(name, "e0");
                failures += 1;
            }
        }
        assert_eq!(
            failures, 5,
            "the breaker opens after 5 consecutive failures"
        );
        assert!(!p.is_down(), "the healthy endpoint keeps the pool up");
    }

    #[tokio::test]
    async fn endpoint_stats_count_granted_permits_and_show_the_breaker() {
        let down = Err(ProviderError::Server {
            status: 503,
            message: "down".into(),
        });
        let p = pool_of(vec![(60_000, down), (60_000, Ok(()))]).unwrap();
        let mut granted = 0;
        for _ in 0..40 {
            if call(&p).await.is_some() {
                granted += 1;
            } else {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let stats = p.endpoint_stats();
        assert_eq!(stats.len(), 2);
        assert_eq!(stats[0].rpm, 60_000);
        assert_eq!(
            stats.iter().map(|s| s.used_last_minute).sum::<u32>(),
            granted
        );
        assert_eq!(
            stats[0].used_last_minute, 5,
            "the failing one until it opened"
        );
        assert_eq!(stats[0].breaker, BreakerState::Open);
        assert_eq!(stats[1].breaker, BreakerState::Closed);
    }

    #[tokio::test]
    async fn a_429_with_retry_after_blocks_the_endpoint() {
        let limited = Err(ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(5)),
            message: "slow down".into(),
        });
        let p = pool_of(vec![(60_000, limited)]).unwrap();
        let (_, outcome) = call(&p).await.unwrap();
        assert!(matches!(outcome, Err(ProviderError::RateLimited { .. })));
        assert!(p.try_acquire().await.is_none());
        assert!(
            p.wait_time() >= Duration::from_secs(4),
            "{:?}",
            p.wait_time()
        );
        let rpm = p.effective_rpm()[0].1;
        assert!(rpm < 60_000.0, "the rate was cut: {rpm}");
    }

    #[tokio::test]
    async fn bad_pools_are_rejected() {
        assert_eq!(
            pool_of(vec![]).err(),
            Some(ConfigError::EmptyPool { pool: "p".into() })
        );
        assert_eq!(
            pool_of(vec![(60, Ok(())), (0, Ok(()))]).err(),
            Some(ConfigError::ZeroRpm {
                endpoint: "e1".into()
            })
        );
    }

    #[tokio::test]
    async fn a_paused_endpoint_takes_no_calls_until_resumed() {
        let pool = pool_of(vec![(6000, Ok(())), (6000, Ok(()))]).unwrap();
        let names: Vec<String> = pool.endpoints().map(str::to_owned).collect();
        pool.set_paused(&std::collections::HashSet::from([names[0].clone()]));
        for _ in 0..3 {
            let (endpoint, _) = call(&pool).await.unwrap();
            assert_eq!(endpoint, names[1], "only the running endpoint serves");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        pool.set_paused(&names.iter().cloned().collect());
        assert!(pool.is_down());
        assert!(pool.try_acquire().await.is_none());
        assert!(pool.wait_time() > Duration::ZERO);
        pool.set_paused(&std::collections::HashSet::new());
        assert!(!pool.is_down());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(call(&pool).await.is_some());
    }
}
