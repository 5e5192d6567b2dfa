//! Admission's rules and their state: quotas, the exact and semantic caches, load levels,
//! budgets and routing, each decision a typed answer the intake acts on.

use crate::quotas::Quotas;
use crate::AdmitError;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_core::route::{RouteKey, RouteTarget};
use sluice_core::shedding::{assess, estimated_wait, Admission as LoadAdmission, Assessment};
use sluice_core::{
    budget_state, classify, semantic, BudgetState, Complexity, JobRequest, Lane, LaneLoad,
    Principal, RequestId, TierLanes, WaitTargets,
};
use sluice_providers::{Embeddings, EmbeddingsConfig};
use sluice_store::Store;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `[cache]`: answers reused from earlier identical jobs of the same tenant.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Answer a request from the tenant's identical job that succeeded within `ttl_secs`.
    pub enabled: bool,
    pub ttl_secs: u64,
    /// With the cache off, an identical request still takes the answer of a job that finished
    /// this recently (as well as attaching to one in flight).
    pub dedup_window_secs: f64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_secs: 3600,
            dedup_window_secs: 5.0,
        }
    }
}

impl CacheConfig {
    /// How old an answer may be to be reused.
    pub fn reuse_window(&self) -> Duration {
        let dedup = Duration::from_secs_f64(self.dedup_window_secs.max(0.0));
        if self.enabled {
            Duration::from_secs(self.ttl_secs).max(dedup)
        } else {
            dedup
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.dedup_window_secs.is_finite() || self.dedup_window_secs < 0.0 {
            return Err("cache.dedup_window_secs must be a finite number of seconds >= 0".into());
        }
        Ok(())
    }
}

/// `[shedding]`: load levels from each lane's estimated wait against its tiers' targets.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SheddingConfig {
    pub enabled: bool,
    /// Queue wait per tier, in seconds, above which load is heavy (free) or critical (others).
    pub targets: WaitTargets,
    /// How often each API node reads lane depths and drain rates.
    pub refresh_ms: u64,
    /// The window over which a lane's drain rate (jobs started per second) is measured.
    pub drain_window_secs: f64,
}

impl Default for SheddingConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            targets: WaitTargets::default(),
            refresh_ms: 1000,
            drain_window_secs: 10.0,
        }
    }
}

impl SheddingConfig {
    pub fn validate(&self) -> Result<(), String> {
        self.targets.validate()?;
        if self.refresh_ms == 0 {
            return Err("shedding.refresh_ms must be at least 1".into());
        }
        if !(self.drain_window_secs.is_finite() && self.drain_window_secs >= 1.0) {
            return Err("shedding.drain_window_secs must be at least 1".into());
        }
        Ok(())
    }
}

/// `[budgets]`: daily spend per tenant in US dollars (UTC days), from the endpoints' prices.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Share of the budget past which routes with a `cheaper` pool send jobs there.
    pub cheaper_at: f64,
    /// The budget of tenants not named in `tenants`; none means unlimited.
    pub default_daily_usd: Option<f64>,
    pub tenants: BTreeMap<String, f64>,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            cheaper_at: 0.8,
            default_daily_usd: None,
            tenants: BTreeMap::new(),
        }
    }
}

impl BudgetConfig {
    fn daily(&self, tenant: &str) -> Option<f64> {
        self.tenants.get(tenant).copied().or(self.default_daily_usd)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.cheaper_at.is_finite() && (0.0..=1.0).contains(&self.cheaper_at)) {
            return Err("budgets.cheaper_at must be between 0 and 1".into());
        }
        let all = self.default_daily_usd.iter().chain(self.tenants.values());
        if all.into_iter().any(|usd| !(usd.is_finite() && *usd >= 0.0)) {
            return Err("budgets must be finite amounts of US dollars >= 0".into());
        }
        Ok(())
    }
}

/// `[semantic_cache]`: for routes with `semantic_cache = true`, answer from the tenant's
/// earlier job whose prompt embedding is at least `threshold` similar (cosine).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticCacheConfig {
    pub embeddings: EmbeddingsConfig,
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default = "default_semantic_ttl")]
    pub ttl_secs: u64,
    /// Embeddings compared per look-up (an exact scan, newest first): bounds its cost.
    #[serde(default = "default_candidates")]
    pub max_candidates: i64,
}

fn default_threshold() -> f32 {
    0.95
}

fn default_semantic_ttl() -> u64 {
    1800
}

fn default_candidates() -> i64 {
    1000
}

impl SemanticCacheConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold.is_finite() && self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err("semantic_cache.threshold must be above 0 and at most 1".into());
        }
        if self.max_candidates < 1 {
            return Err("semantic_cache.max_candidates must be at least 1".into());
        }
        Ok(())
    }
}

/// The semantic cache's settings and its embeddings client.
pub struct SemanticCache {
    pub config: SemanticCacheConfig,
    pub client: Embeddings,
}

/// Lane load as last read, and the level it means.
#[derive(Debug, Clone)]
pub struct LoadSnapshot {
    pub assessment: Assessment,
    pub lanes: BTreeMap<Lane, LaneLoad>,
}

/// Everything admission needs; one per API node.
pub struct Admission {
    pub cache: CacheConfig,
    pub shedding: SheddingConfig,
    pub budgets: BudgetConfig,
    pub quotas: Quotas,
    pub semantic: Option<SemanticCache>,
    /// Model alias -> route, for the route's cheaper and classified pools and semantic cache.
    pub routes: BTreeMap<String, RouteTarget>,
    /// Every configured endpoint's name (what operators may pause) with its requests per
    /// minute (what the dashboard measures its calls against).
    pub endpoints: BTreeMap<String, u32>,
    load: RwLock<Arc<LoadSnapshot>>,
    /// Tenants' spend today as last read, with when: budgets need not be exact to the cent.
    spend: Mutex<HashMap<String, (Instant, f64)>>,
}

/// How long a tenant's spend read from the database is trusted.
const SPEND_FRESH_FOR: Duration = Duration::from_secs(1);

/// Where admission sends a job.
#[derive(Debug, Default)]
pub struct Routing {
    /// The routing key and why, when it is not the request's alias.
    pub route: Option<(RouteKey, String)>,
}

impl Routing {
    /// The route as the store keeps it on the job: the key's text and the reason.
    pub fn stored(self) -> Option<(String, String)> {
        self.route.map(|(key, reason)| (key.to_string(), reason))
    }
}

/// The configuration sections admission follows: `[cache]`, `[shedding]`, `[budgets]`.
#[derive(Debug, Clone, Default)]
pub struct AdmissionPolicy {
    pub cache: CacheConfig,
    pub shedding: SheddingConfig,
    pub budgets: BudgetConfig,
}

impl Admission {
    pub fn new(
        policy: AdmissionPolicy,
        quotas: Quotas,
        semantic: Option<SemanticCache>,
        routes: BTreeMap<String, RouteTarget>,
        endpoints: BTreeMap<String, u32>,
        tiers: &TierLanes,
    ) -> Admission {
        let AdmissionPolicy {
            cache,
            shedding,
            budgets,
        } = policy;
        let idle = LoadSnapshot {
            assessment: assess(&BTreeMap::new(), tiers, &shedding.targets),
            lanes: BTreeMap::new(),
        };
        Admission {
            cache,
            shedding,
            budgets,
            quotas,
            semantic,
            routes,
            endpoints,
            load: RwLock::new(Arc::new(idle)),
            spend: Mutex::new(HashMap::new()),
        }
    }

    /// The lane load as last read.
    pub fn load(&self) -> Arc<LoadSnapshot> {
        Arc::clone(&self.load.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Read lane load every `refresh_ms` until `shutdown`.
    pub fn spawn_load_monitor(
        self: &Arc<Self>,
        store: Store,
        tiers: TierLanes,
        shutdown: CancellationToken,
    ) {
        let admission = Arc::clone(self);
        tokio::spawn(async move {
            let every = Duration::from_millis(admission.shedding.refresh_ms);
            let window = Duration::from_secs_f64(admission.shedding.drain_window_secs);
            let mut last_level = None;
            loop {
                match store.lane_stats(window).await {
                    Ok(stats) => {
                        let now = chrono::Utc::now();
                        let lanes: BTreeMap<Lane, LaneLoad> = stats
                            .into_iter()
                            .map(|s| {
                                let oldest_wait = s
                                    .oldest
                                    .and_then(|at| (now - at).to_std().ok())
                                    .unwrap_or_default();
                                // Over the time the lane has drained within the window, so a
                                // burst's first seconds do not read as a slow lane.
                                let draining = s
                                    .first_started
                                    .and_then(|at| (now - at).to_std().ok())
                                    .unwrap_or(window)
                                    .clamp(Duration::from_secs(1), window);
                                let load = LaneLoad {
                                    depth: s.depth,
                                    oldest_wait,
                                    drained_per_sec: s.started as f64 / draining.as_secs_f64(),
                                };
                                (s.lane, load)
                            })
                            .collect();
                        let assessment = assess(&lanes, &tiers, &admission.shedding.targets);
                        crate::telemetry::lane_load(&lanes, assessment.level);
                        if last_level != Some(assessment.level) {
                            tracing::info!(message = "load level", level = %assessment.level, reason = %assessment.reason);
                            last_level = Some(assessment.level);
                        }
                        let snapshot = Arc::new(LoadSnapshot { assessment, lanes });
                        *admission.load.write().unwrap_or_else(|e| e.into_inner()) = snapshot;
                    }
                    Err(error) => tracing::warn!(message = "could not read lane load", %error),
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
    }

    /// Count the request against its user's and tenant's quotas: refused naming the limit if over.
    pub async fn take_quota(&self, principal: &Principal) -> Result<(), AdmitError> {
        if !self.quotas.is_limited(principal.tier) {
            return Ok(());
        }
        self.quotas
            .take(principal)
            .await
            .map_err(|exceeded| AdmitError::QuotaExceeded {
                message: exceeded.to_string(),
                scope: exceeded.scope.as_str(),
                window_secs: exceeded.window_secs,
                limit: exceeded.limit,
                retry_after: exceeded.retry_after,
            })
    }

    /// The request hash answers and followers are matched by: tenant, model alias, messages and
    /// every parameter that shapes the answer (not `stream`, which changes delivery only).
    /// Parameters added since the first version enter the hash only when set, so requests
    /// without them keep the hashes stored before.
    pub fn request_hash(tenant: &str, request: &JobRequest) -> Vec<u8> {
        let mut canonical = serde_json::json!({
            "tenant": tenant,
            "model": request.model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "stop": request.stop,
        });
        let extra = [
            ("seed", serde_json::to_value(request.seed)),
            ("tools", serde_json::to_value(&request.tools)),
            ("tool_choice", serde_json::to_value(&request.tool_choice)),
            (
                "parallel_tool_calls",
                serde_json::to_value(request.parallel_tool_calls),
            ),
            (
                "response_format",
                serde_json::to_value(&request.response_format),
            ),
        ];
        for (key, value) in extra {
            match value {
                Ok(serde_json::Value::Null) => {}
                Ok(serde_json::Value::Array(items)) if items.is_empty() => {}
                Ok(value) => canonical[key] = value,
                // Plain data always encodes; a value that did not still makes the hash unique.
                Err(error) => canonical[key] = serde_json::Value::String(error.to_string()),
            }
        }
        Sha256::digest(canonical.to_string().as_bytes()).to_vec()
    }

    /// Refuse what the load level does not admit.
    pub fn check_load(&self, principal: &Principal, lane: Lane) -> Result<(), AdmitError> {
        if !self.shedding.enabled {
            return Ok(());
        }
        match self.load().assessment.admit(principal.tier, lane) {
            LoadAdmission::Accept => Ok(()),
            LoadAdmission::Refuse {
                retry_after,
                reason,
            } => Err(AdmitError::Overloaded {
                reason,
                retry_after,
            }),
        }
    }

    async fn spent_today(&self, store: &Store, tenant: &str) -> Result<f64, AdmitError> {
        if let Some((at, usd)) = self
            .spend
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(tenant)
        {
            if at.elapsed() < SPEND_FRESH_FOR {
                return Ok(*usd);
            }
        }
        let usd = store.spent_today(tenant).await?;
        let mut spend = self.spend.lock().unwrap_or_else(|e| e.into_inner());
        if spend.len() > 100_000 {
            spend.retain(|_, (at, _)| at.elapsed() < SPEND_FRESH_FOR);
        }
        spend.insert(tenant.to_owned(), (Instant::now(), usd));
        Ok(usd)
    }

    /// Where the job goes: refused at its tenant's daily budget, to the route's cheaper pool
    /// past `cheaper_at` of it, else to the pool the classifier picks on a classified route.
    pub async fn route(
        &self,
        store: &Store,
        principal: &Principal,
        request: &JobRequest,
    ) -> Result<Routing, AdmitError> {
        let spec = self.routes.get(&request.model).and_then(RouteTarget::spec);
        if let Some(daily) = self.budgets.daily(&principal.tenant) {
            let spent = self.spent_today(store, &principal.tenant).await?;
            match budget_state(spent, daily, self.budgets.cheaper_at) {
                BudgetState::Exhausted => {
                    return Err(AdmitError::BudgetExhausted {
                        tenant: principal.tenant.clone(),
                        spent,
                        daily,
                        retry_after: until_utc_midnight(),
                    })
                }
                BudgetState::Cheaper => {
                    if let Some(cheaper) = spec.and_then(|s| s.cheaper.as_deref()) {
                        let reason = format!(
                            "tenant has spent {:.0}% of its daily budget (${spent:.4} of \
                             ${daily:.2}): cheaper pool {cheaper}",
                            100.0 * spent / daily.max(f64::MIN_POSITIVE)
                        );
                        return Ok(Routing {
                            route: Some((RouteKey::pool(cheaper), reason)),
                        });
                    }
                }
                BudgetState::Within => {}
            }
        }
        if let Some(pools) = spec.and_then(|s| s.classify.as_ref()) {
            let class = classify(&request.messages);
            let pool = match class.complexity {
                Complexity::Simple => &pools.simple,
                Complexity::Complex => &pools.complex,
            };
            let reason = format!("{}: {} -> pool {pool}", class.complexity, class.rule);
            return Ok(Routing {
                route: Some((RouteKey::pool(pool), reason)),
            });
        }
        Ok(Routing::default())
    }

    /// Whether `model`'s route reuses answers to sampled requests too (`reuse_samples`).
    pub fn reuses_samples(&self, model: &str) -> bool {
        self.routes
            .get(model)
            .and_then(RouteTarget::spec)
            .is_some_and(|s| s.reuse_samples)
    }

    /// Whether the semantic cache applies to this request now (its route opts in, and load
    /// is normal: under heavy load it is the first optional work to go).
    pub fn semantic_for(&self, request: &JobRequest) -> Option<&SemanticCache> {
        let opted_in = self
            .routes
            .get(&request.model)
            .and_then(RouteTarget::spec)
            .is_some_and(|s| s.semantic_cache);
        let allowed = !self.shedding.enabled || self.load().assessment.allows_optional_work();
        self.semantic.as_ref().filter(|_| opted_in && allowed)
    }

    /// The tenant's earlier job whose last message means the same after an identical
    /// conversation (same model alias, same earlier messages), with the last message's
    /// embedding to remember if there is none. An embeddings outage skips the cache.
    ///
    /// Only the last message is embedded: a long shared system prompt would otherwise
    /// dominate the vector and make different questions look alike.
    pub async fn semantic_answer(
        &self,
        cache: &SemanticCache,
        store: &Store,
        tenant: &str,
        request: &JobRequest,
    ) -> Result<SemanticLookup, AdmitError> {
        let Some((last, context)) = request.messages.split_last() else {
            return Ok(SemanticLookup::default());
        };
        let scope = semantic_scope(&request.model, context);
        let vector = match cache.client.embed(&last.content.text()).await {
            Ok(vector) => vector,
            Err(error) => {
                tracing::warn!(message = "embeddings failed; semantic cache skipped", %error);
                return Ok(SemanticLookup::default());
            }
        };
        let candidates = store
            .semantic_candidates(
                tenant,
                &scope,
                Duration::from_secs(cache.config.ttl_secs),
                cache.config.max_candidates,
            )
            .await?;
        let decoded: Vec<(RequestId, Vec<f32>)> = candidates
            .into_iter()
            .filter_map(|c| semantic::decode_vector(&c.embedding).map(|v| (c.job, v)))
            .collect();
        let hit = semantic::best_match(
            &vector,
            decoded.iter().map(|(id, v)| (*id, v.as_slice())),
            cache.config.threshold,
        );
        Ok(match hit {
            Some((id, _)) => SemanticLookup {
                hit: Some(id),
                remember: None,
            },
            None => SemanticLookup {
                hit: None,
                remember: Some((scope, semantic::encode_vector(&vector))),
            },
        })
    }

    /// Position and estimated wait of a job `position`-th in `lane`, from the last reading.
    pub fn estimate(&self, lane: Lane, position: u64) -> Option<f64> {
        let load = self.load();
        let drained = load.lanes.get(&lane).map_or(0.0, |l| l.drained_per_sec);
        estimated_wait(position, drained).map(|d| d.as_secs_f64())
    }

    /// Where a job accepted now stands in its lane, from the last reading.
    pub fn position_now(&self, lane: Lane) -> u64 {
        self.load().lanes.get(&lane).map_or(0, |l| l.depth) + 1
    }
}

/// What a semantic look-up found: an earlier job to answer from, or the scope and embedding
/// to store with the new job so later ones can find it.
#[derive(Debug, Default)]
pub struct SemanticLookup {
    pub hit: Option<RequestId>,
    pub remember: Option<(String, Vec<u8>)>,
}

/// Embeddings are compared only within one model alias and one exact earlier conversation.
fn semantic_scope(model: &str, context: &[sluice_core::Message]) -> String {
    let context = serde_json::to_string(context).unwrap_or_default();
    let digest = Sha256::digest(context.as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("{model}#{hex}")
}

fn until_utc_midnight() -> Duration {
    let now = chrono::Utc::now();
    let tomorrow = (now + chrono::Duration::days(1))
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc());
    tomorrow
        .and_then(|t| (t - now).to_std().ok())
        .unwrap_or(Duration::from_secs(3600))
}

#[cfg(test)]
mod tests;
