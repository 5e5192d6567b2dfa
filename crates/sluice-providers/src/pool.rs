//! Pools of endpoints behind one model alias, each endpoint with its adaptive rate limiter,
//! circuit breaker and (with Redis) a limiter shared by all workers; and the alias router.
//!
//! A [`Permit`] is the right to send one request to one endpoint now. Its outcome flows back
//! into the endpoint's limiter and breaker, which is how 429s and outages steer traffic.

use crate::config::{ConfigError, EndpointConfig, PoolConfig, ProviderKind};
use crate::openai::OpenAiCompatible;
use crate::shared::{SharedBudget, SharedLimiter, SharedLimits};
use crate::{Anthropic, ChatRequest, ChatResponse, Gemini, Provider, ProviderError};
use serde::Deserialize;
use sluice_core::gcra::Gcra;
use sluice_core::route::{RouteKey, RouteTarget};
use sluice_core::{AdaptiveConfig, AdaptiveRate, Breaker, BreakerConfig, BreakerState};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Endpoint {
    name: String,
    /// The configured limit, against which use is measured.
    rpm: u32,
    /// What a call costs, for the job's cost and its tenant's budget.
    price: Option<sluice_core::Price>,
    provider: Arc<dyn Provider>,
    shared: Option<SharedLimiter>,
    /// The token budget shared with every worker, when the endpoint has a `tpm` and Redis is on.
    budget: Option<SharedBudget>,
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

/// One endpoint's local view of its health and pace.
struct Health {
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

/// The window of [`EndpointStats::used_last_minute`].
const USE_WINDOW: Duration = Duration::from_secs(60);

impl Health {
    fn forget_before(&mut self, now: Duration) {
        while self
            .granted
            .front()
            .is_some_and(|at| now.saturating_sub(*at) > USE_WINDOW)
        {
            self.granted.pop_front();
        }
    }
}

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

/// How long a paused endpoint reports until it could serve: it is looked at again then.
const PAUSED_WAIT: Duration = Duration::from_secs(1);

impl Health {
    /// Whether the endpoint may be asked at all: not paused, breaker not open.
    fn available(&self, now: Duration) -> bool {
        !self.paused && self.breaker.state(now) != BreakerState::Open
    }

    /// How long until a call estimated at `tokens` could go, without taking anything.
    fn wait(&self, now: Duration, tokens: u32) -> Duration {
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
}

/// Limiters, breakers and the choice credit, under one lock so choosing and taking is atomic.
struct PoolState {
    health: Vec<Health>,
    /// Smooth weighted round-robin credit per endpoint (as nginx balances upstreams): among the
    /// endpoints that can serve now, each is chosen in proportion to its rpm times its weight.
    credit: Vec<f64>,
}

/// What a permit needs to report its outcome.
struct Feedback {
    state: Arc<Mutex<PoolState>>,
    origin: Instant,
    index: usize,
    /// Tokens charged to the endpoint's budget for this call.
    charged: u32,
}

impl Feedback {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        lock(&self.state)
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

fn lock(state: &Mutex<PoolState>) -> MutexGuard<'_, PoolState> {
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
            let burst = config.effective_burst();
            health.push(Health {
                rate: AdaptiveRate::new(config.rpm, burst, options.adaptive),
                breaker: Breaker::new(options.breaker),
                tokens: config
                    .tpm
                    .map(|tpm| Gcra::per_minute(tpm, (tpm / 60).max(1) - 1)),
                paused: false,
                granted: VecDeque::new(),
            });
            let shared = options
                .shared
                .as_ref()
                .map(|limits| limits.limiter(&config.name, config.rpm, burst));
            let budget = options
                .shared
                .as_ref()
                .zip(config.tpm)
                .map(|(limits, tpm)| limits.token_budget(&config.name, tpm, (tpm / 60).max(1) - 1));
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
            let mut state = lock(&self.state);
            let health = &mut state.health[index];
            health.rate.on_other_failure(now);
            health.breaker.on_cancelled(now);
            if let Some(budget) = health.tokens.as_mut() {
                budget.refund(now, tokens);
            }
        };
        if let Some(budget) = &endpoint.budget {
            if budget.try_take(tokens).await.is_err() {
                give_back();
                return None;
            }
        }
        if let Some(shared) = &endpoint.shared {
            if shared.try_acquire().await.is_err() {
                if let Some(budget) = &endpoint.budget {
                    budget.adjust(-i64::from(tokens)).await;
                }
                give_back();
                return None;
            }
        }
        {
            let now = self.origin.elapsed();
            let mut state = lock(&self.state);
            let health = &mut state.health[index];
            health.forget_before(now);
            health.granted.push_back(now);
        }
        Some(self.permit(index, tokens))
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
            let health = &mut state.health[i];
            if health.rate.try_acquire(now).is_err() {
                continue;
            }
            if !health.breaker.try_acquire(now) {
                // Half-open with its probe already out: this cell goes unused.
                health.rate.on_other_failure(now);
                continue;
            }
            if let Some(budget) = health.tokens.as_mut() {
                // Conforms (checked above), so this records the charge without waiting.
                let _ = budget.reserve(now, tokens);
            }
            state.credit[i] -= total;
            return Some(i);
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
            .filter(|h| h.breaker.state(now) != BreakerState::Open)
            .map(|h| h.rate.effective_rpm(now) / 60.0)
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
            health.paused = paused.contains(&endpoint.name);
        }
    }

    /// Each endpoint's current effective rate in requests per minute (for metrics and tests).
    pub fn effective_rpm(&self) -> Vec<(String, f64)> {
        let state = lock(&self.state);
        let now = self.origin.elapsed();
        self.endpoints
            .iter()
            .zip(&state.health)
            .map(|(e, h)| (e.name.clone(), h.rate.effective_rpm(now)))
            .collect()
    }

    /// Each endpoint's configured rate, its use over the last minute and its breaker state.
    pub fn endpoint_stats(&self) -> Vec<EndpointStats> {
        let mut state = lock(&self.state);
        let now = self.origin.elapsed();
        self.endpoints
            .iter()
            .zip(state.health.iter_mut())
            .map(|(e, h)| {
                h.forget_before(now);
                EndpointStats {
                    name: e.name.clone(),
                    rpm: e.rpm,
                    used_last_minute: u32::try_from(h.granted.len()).unwrap_or(u32::MAX),
                    breaker: h.breaker.state(now),
                }
            })
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

/// The right to send one request to one endpoint now. Dropped unused, it gives back what it held.
pub struct Permit {
    endpoint: Arc<Endpoint>,
    feedback: Option<Feedback>,
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
    /// assembled response is returned (see [`Provider::chat_stream`]).
    pub async fn call_stream(
        mut self,
        req: ChatRequest<'_>,
        deltas: tokio::sync::mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        let outcome = self.endpoint.provider.chat_stream(req, deltas).await;
        self.settle(&outcome).await;
        outcome
    }

    /// Report the outcome, then correct the shared token budget by what the call really used.
    async fn settle(&mut self, outcome: &Result<ChatResponse, ProviderError>) {
        let correction = self.report(outcome);
        if let (Some(budget), Some(delta)) = (&self.endpoint.budget, correction) {
            budget.adjust(delta).await;
        }
    }

    /// Feed the outcome to the endpoint's limiter and breaker. Only failures that speak to the
    /// endpoint's health (5xx, timeouts, broken connections) count against its breaker; a 429
    /// is the limiter's business and a 4xx is the request's fault.
    /// Returns the token correction (real use minus the charge), when there is one to make.
    fn report(&mut self, outcome: &Result<ChatResponse, ProviderError>) -> Option<i64> {
        let feedback = self.feedback.take()?;
        let now = feedback.now();
        let mut state = feedback.lock();
        let health = &mut state.health[feedback.index];
        // Correct the token charge: the real usage on success; nothing on refusals, which
        // providers do not count; the estimate stands when we cannot know (timeouts, 5xx).
        let used = match outcome {
            Ok(response) => Some(response.usage.total_tokens),
            Err(ProviderError::RateLimited { .. } | ProviderError::Rejected { .. }) => Some(0),
            Err(_) => None,
        };
        if let (Some(budget), Some(used)) = (health.tokens.as_mut(), used) {
            if used > feedback.charged {
                let _ = budget.reserve(now, used - feedback.charged);
            } else {
                budget.refund(now, feedback.charged - used);
            }
        }
        let correction = used.map(|used| i64::from(used) - i64::from(feedback.charged));
        match outcome {
            Ok(response) => {
                health.rate.on_success(now);
                health.breaker.on_success(now);
                if let Some(rate) = response.rate {
                    health.rate.observe_headers(now, rate.remaining, rate.reset);
                    if let (Some(budget), Some(left)) =
                        (health.tokens.as_mut(), rate.remaining_tokens)
                    {
                        // The provider counts tokens its own way: never plan on more than it says.
                        budget.cap_available(now, u32::try_from(left).unwrap_or(u32::MAX));
                    }
                }
            }
            Err(ProviderError::RateLimited { retry_after, .. }) => {
                health.rate.on_rate_limited(now, *retry_after);
                health.breaker.on_cancelled(now);
            }
            Err(ProviderError::Rejected { .. }) => {
                health.rate.on_other_failure(now);
                health.breaker.on_cancelled(now);
            }
            Err(_) => {
                health.rate.on_other_failure(now);
                health.breaker.on_failure(now);
            }
        }
        correction
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(feedback) = self.feedback.take() {
            let now = feedback.now();
            let mut state = feedback.lock();
            let health = &mut state.health[feedback.index];
            health.rate.on_other_failure(now);
            health.breaker.on_cancelled(now);
            if let Some(budget) = health.tokens.as_mut() {
                budget.refund(now, feedback.charged);
            }
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

/// Model alias -> pools (primary, then fallbacks), and every pool by name for the
/// [`RouteKey::Pool`] keys admission gives jobs. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Router {
    aliases: BTreeMap<String, Vec<Arc<Pool>>>,
    pools: BTreeMap<String, Arc<Pool>>,
}

impl Router {
    /// Build every pool and the routes. Pool names and endpoint names must be unique across the
    /// router, since an endpoint's name identifies it on jobs and in metrics.
    pub fn new(
        pools: &[PoolConfig],
        routes: &BTreeMap<String, RouteTarget>,
        http: reqwest::Client,
    ) -> Result<Router, ConfigError> {
        Router::with_options(pools, routes, http, &PoolOptions::default())
    }

    /// [`Router::new`] with the endpoints' adaptive, breaker and shared-limit options. Of each
    /// route the router serves its pools; it also checks that the pools admission may choose
    /// (cheaper, classified) exist, so a job is never sent to a pool no worker has.
    pub fn with_options(
        pools: &[PoolConfig],
        routes: &BTreeMap<String, RouteTarget>,
        http: reqwest::Client,
        options: &PoolOptions,
    ) -> Result<Router, ConfigError> {
        let mut by_name = BTreeMap::new();
        let mut endpoint_names = BTreeSet::new();
        for config in pools {
            for e in &config.endpoints {
                if !endpoint_names.insert(e.name.as_str()) {
                    return Err(ConfigError::DuplicateEndpoint(e.name.clone()));
                }
            }
            let pool = Arc::new(Pool::with_options(config, http.clone(), options)?);
            if by_name.insert(config.name.clone(), pool).is_some() {
                return Err(ConfigError::DuplicatePool(config.name.clone()));
            }
        }
        let mut aliases = BTreeMap::new();
        for (alias, target) in routes {
            if RouteKey::is_reserved(alias) {
                return Err(ConfigError::ReservedAlias(alias.clone()));
            }
            for pool in target.all_pools() {
                if !by_name.contains_key(pool) {
                    return Err(ConfigError::UnknownPool {
                        alias: alias.clone(),
                        pool: pool.to_owned(),
                    });
                }
            }
            let names = target.pools();
            if names.is_empty() {
                return Err(ConfigError::UnknownPool {
                    alias: alias.clone(),
                    pool: String::new(),
                });
            }
            let chain = names
                .into_iter()
                .map(|pool| {
                    by_name
                        .get(pool)
                        .cloned()
                        .ok_or_else(|| ConfigError::UnknownPool {
                            alias: alias.clone(),
                            pool: pool.to_owned(),
                        })
                })
                .collect::<Result<Vec<_>, _>>()?;
            aliases.insert(alias.clone(), chain);
        }
        Ok(Router {
            aliases,
            pools: by_name,
        })
    }

    /// The primary pool serving a model alias.
    pub fn pool(&self, alias: &str) -> Option<&Pool> {
        self.route(alias).first().map(|p| &**p)
    }

    /// Every pool of a route, primary first, then the fallbacks in order. `key` is a job's
    /// routing key as stored (see [`RouteKey`]): a model alias, or `pool:NAME` for one pool.
    pub fn route(&self, key: &str) -> &[Arc<Pool>] {
        match RouteKey::pool_name(key) {
            Some(name) => self.pools.get(name).map_or(&[], std::slice::from_ref),
            None => self.aliases.get(key).map_or(&[], Vec::as_slice),
        }
    }

    /// Pause the named endpoints in every pool and resume all others.
    pub fn set_paused_endpoints(&self, paused: &std::collections::HashSet<String>) {
        self.pools().for_each(|pool| pool.set_paused(paused));
    }

    /// Every pool once, by name.
    pub fn pools(&self) -> impl Iterator<Item = &Pool> {
        self.pools.values().map(|p| &**p)
    }

    /// The model aliases this router serves, sorted (not the `pool:NAME` keys).
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.aliases.keys().map(String::as_str)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use sluice_core::route::{ClassifyPools, RouteSpec};
    use sluice_core::{JobRequest, Message};

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
        // No ramp after idle, so neither endpoint runs dry within 22 calls (bursts of 9 and 99)
        // and only the choice decides the split: 1 : 10 by rate, where plain round-robin would
        // give 11 : 11.
        let options = PoolOptions {
            adaptive: AdaptiveConfig {
                ramp_secs: 0.0,
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

    #[test]
    fn pools_are_routable_by_name_and_aliases_may_not_take_that_form() {
        let pool = |name: &str| PoolConfig {
            name: name.into(),
            endpoints: vec![EndpointConfig::new(
                format!("{name}-1"),
                "http://x/v1",
                "m",
                60,
            )],
        };
        let pools = vec![pool("large"), pool("small")];
        let auto = RouteTarget::Spec(RouteSpec {
            classify: Some(ClassifyPools {
                simple: "small".into(),
                complex: "large".into(),
            }),
            ..RouteSpec::default()
        });
        let routes = BTreeMap::from([("auto".to_owned(), auto.clone())]);
        let router = Router::new(&pools, &routes, reqwest::Client::new()).unwrap();
        assert_eq!(
            router.route(&RouteKey::pool("small").to_string())[0].name(),
            "small"
        );
        assert_eq!(router.route("auto")[0].name(), "large");
        assert_eq!(router.aliases().collect::<Vec<_>>(), ["auto"]);

        let reserved = BTreeMap::from([("pool:x".to_owned(), auto)]);
        assert!(matches!(
            Router::new(&pools, &reserved, reqwest::Client::new()),
            Err(ConfigError::ReservedAlias(_))
        ));
        let unknown = RouteTarget::Spec(RouteSpec {
            pools: vec!["large".into()],
            cheaper: Some("tiny".into()),
            ..RouteSpec::default()
        });
        let routes = BTreeMap::from([("x".to_owned(), unknown)]);
        assert!(matches!(
            Router::new(&pools, &routes, reqwest::Client::new()),
            Err(ConfigError::UnknownPool { pool, .. }) if pool == "tiny"
        ));
    }

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Router>();
        check::<Pool>();
        check::<Permit>();
    }
}
