//! Pools of endpoints behind one model alias, their local rate limiters, and the alias router.
//! A [`Permit`] is the right to send one request to one endpoint now; pools hand them out round-robin.

use crate::config::{ConfigError, EndpointConfig, PoolConfig, ProviderKind};
use crate::openai::OpenAiCompatible;
use crate::{Anthropic, ChatRequest, ChatResponse, Gemini, Provider, ProviderError};
use sluice_core::gcra::Gcra;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

struct Endpoint {
    name: String,
    provider: Arc<dyn Provider>,
}

/// Limiters and the round-robin cursor, under one lock so choosing and reserving is atomic.
struct PoolState {
    limiters: Vec<Gcra>,
    next: usize,
}

/// A named set of endpoints serving one model alias, each with its own local RPM limiter.
pub struct Pool {
    name: String,
    endpoints: Vec<Arc<Endpoint>>,
    state: Mutex<PoolState>,
    /// Time origin for the limiters.
    origin: Instant,
}

impl Pool {
    /// Build the pool's endpoints from configuration.
    pub fn new(config: &PoolConfig, http: reqwest::Client) -> Result<Pool, ConfigError> {
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
        Pool::with_providers(&config.name, endpoints)
    }

    /// Build a pool around ready providers (a fake in tests, or an adapter built elsewhere);
    /// each endpoint's `name`, `rpm` and `burst` come from its config.
    pub fn with_providers(
        name: &str,
        endpoints: Vec<(EndpointConfig, Arc<dyn Provider>)>,
    ) -> Result<Pool, ConfigError> {
        if endpoints.is_empty() {
            return Err(ConfigError::EmptyPool { pool: name.into() });
        }
        let mut seen = BTreeSet::new();
        let mut limiters = Vec::with_capacity(endpoints.len());
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
            limiters.push(Gcra::per_minute(config.rpm, config.effective_burst()));
            eps.push(Arc::new(Endpoint {
                name: config.name,
                provider,
            }));
        }
        Ok(Pool {
            name: name.into(),
            endpoints: eps,
            state: Mutex::new(PoolState { limiters, next: 0 }),
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

    /// Wait for a permit on the endpoint that can serve soonest (round-robin among ties).
    ///
    /// The cell is reserved before sleeping, so concurrent callers are granted in the order they
    /// asked. If this future is dropped while sleeping, its one reserved cell is simply spent:
    /// that errs on the side of staying under the provider's limit.
    pub async fn acquire(&self) -> Permit {
        let (index, wait) = {
            let mut state = self.lock();
            let now = self.origin.elapsed();
            let index = soonest(&state, now);
            let wait = state.limiters[index].reserve(now, 1);
            state.next = (index + 1) % self.endpoints.len();
            (index, wait)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        self.permit(index)
    }

    /// Like [`Pool::acquire`] but never waits: `None` if no endpoint can serve now.
    pub fn try_acquire(&self) -> Option<Permit> {
        let mut state = self.lock();
        let now = self.origin.elapsed();
        let n = self.endpoints.len();
        let start = state.next;
        let index = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| state.limiters[i].try_acquire(now, 1).is_ok())?;
        state.next = (index + 1) % n;
        drop(state);
        Some(self.permit(index))
    }

    /// How long until some endpoint could grant a permit (zero if one can now), without reserving.
    /// Lets a dispatcher skip jobs for a saturated pool instead of blocking on it.
    pub fn wait_time(&self) -> Duration {
        let state = self.lock();
        let now = self.origin.elapsed();
        state.limiters[soonest(&state, now)].wait_time(now, 1)
    }

    fn permit(&self, index: usize) -> Permit {
        Permit {
            endpoint: Arc::clone(&self.endpoints[index]),
        }
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // The state is a few plain numbers that are always consistent, so a panic elsewhere
        // while holding the lock leaves nothing to repair.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The endpoint whose limiter grants soonest; ties go to the first from the round-robin cursor.
fn soonest(state: &PoolState, now: Duration) -> usize {
    let n = state.limiters.len();
    let mut best = (state.next % n, Duration::MAX);
    for k in 0..n {
        let i = (state.next + k) % n;
        let wait = state.limiters[i].wait_time(now, 1);
        if wait < best.1 {
            best = (i, wait);
        }
    }
    best.0
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("endpoints", &self.endpoints().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The right to send one request to one endpoint now.
pub struct Permit {
    endpoint: Arc<Endpoint>,
}

impl Permit {
    /// Name of the endpoint this permit is for, recorded on the job.
    pub fn endpoint(&self) -> &str {
        &self.endpoint.name
    }

    /// Spend the permit on one call.
    pub async fn call(self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        self.endpoint.provider.chat(req).await
    }

    /// Spend the permit on one streamed call: text deltas go to `deltas` as they arrive, and the
    /// assembled response is returned (see [`Provider::chat_stream`]).
    pub async fn call_stream(
        self,
        req: ChatRequest<'_>,
        deltas: tokio::sync::mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        self.endpoint.provider.chat_stream(req, deltas).await
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("endpoint", &self.endpoint.name)
            .finish()
    }
}

/// Model alias -> pool. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Router {
    routes: BTreeMap<String, Arc<Pool>>,
}

impl Router {
    /// Build every pool and the routes `alias -> pool name`. Pool names and endpoint names must be
    /// unique across the router, since an endpoint's name identifies it on jobs and in metrics.
    pub fn new(
        pools: &[PoolConfig],
        routes: &BTreeMap<String, String>,
        http: reqwest::Client,
    ) -> Result<Router, ConfigError> {
        let mut by_name = BTreeMap::new();
        let mut endpoint_names = BTreeSet::new();
        for config in pools {
            for e in &config.endpoints {
                if !endpoint_names.insert(e.name.as_str()) {
                    return Err(ConfigError::DuplicateEndpoint(e.name.clone()));
                }
            }
            let pool = Arc::new(Pool::new(config, http.clone())?);
            if by_name.insert(config.name.clone(), pool).is_some() {
                return Err(ConfigError::DuplicatePool(config.name.clone()));
            }
        }
        let routes = routes
            .iter()
            .map(|(alias, pool)| match by_name.get(pool) {
                Some(p) => Ok((alias.clone(), Arc::clone(p))),
                None => Err(ConfigError::UnknownPool {
                    alias: alias.clone(),
                    pool: pool.clone(),
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(Router { routes })
    }

    /// The pool serving a model alias.
    pub fn pool(&self, alias: &str) -> Option<&Pool> {
        self.routes.get(alias).map(|p| &**p)
    }

    /// The model aliases this router serves, sorted.
    pub fn aliases(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;

    #[async_trait::async_trait]
    impl Provider for Echo {
        async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
            Ok(ChatResponse {
                content: req.request_id.to_owned(),
                usage: crate::Usage::default(),
                model: "echo".into(),
                finish_reason: None,
            })
        }
    }

    fn pool(rpms: &[u32]) -> Result<Pool, ConfigError> {
        let eps = rpms
            .iter()
            .enumerate()
            .map(|(i, &rpm)| {
                let provider: Arc<dyn Provider> = Arc::new(Echo);
                (
                    EndpointConfig::new(format!("e{i}"), "http://x/v1", "m", rpm),
                    provider,
                )
            })
            .collect();
        Pool::with_providers("p", eps)
    }

    #[test]
    fn try_acquire_round_robins_then_runs_dry() {
        let Ok(p) = pool(&[60, 60]) else {
            panic!("pool")
        };
        // Each endpoint has burst 1, so two permits each, alternating.
        let names: Vec<String> = std::iter::from_fn(|| p.try_acquire())
            .map(|permit| permit.endpoint().to_owned())
            .collect();
        assert_eq!(names, ["e0", "e1", "e0", "e1"]);
        assert!(p.wait_time() > Duration::from_millis(900));
    }

    #[test]
    fn bad_pools_are_rejected() {
        assert_eq!(
            pool(&[]).err(),
            Some(ConfigError::EmptyPool { pool: "p".into() })
        );
        assert_eq!(
            pool(&[60, 0]).err(),
            Some(ConfigError::ZeroRpm {
                endpoint: "e1".into()
            })
        );
    }

    #[test]
    fn shared_types_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Router>();
        check::<Pool>();
        check::<Permit>();
    }
}
