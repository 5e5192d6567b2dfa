//! Per-user and per-tenant submission quotas, counted in Redis (shared by every API node) or in
//! this process (embedded mode). A submission takes all of its counters or none.

use sluice_core::quota::{counters, Counter, Exceeded, LocalQuotas, QuotaConfig};
use sluice_core::{Principal, Tier};
use sluice_redis::{redis, Pool, Redis, SetupError};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest a quota check may wait on Redis: it sits in every submission's path, and on timeout
/// we admit anyway, so waiting longer only adds latency.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);
/// After a failed call, admit without asking Redis for this long, so that an outage (above all
/// one that times out rather than refuses) does not add `CALL_TIMEOUT` to every submission.
const RETRY_REDIS_AFTER: Duration = Duration::from_secs(1);
/// Added to a counter's time-to-live beyond its window's end, so a node whose clock runs a
/// little behind still finds the counter it shares with the others instead of a fresh one.
const EXPIRY_SLACK: Duration = Duration::from_secs(5);

/// Check every counter against its limit and, only if all are under, count one on each.
const TAKE_LUA: &str = r"
-- KEYS: the counters. ARGV: limit and time-to-live in ms for each key, in the same order.
-- Returns 0 when counted, else the 1-based index of the first counter at its limit (nothing
-- is counted then).
for i, key in ipairs(KEYS) do
  local count = tonumber(redis.call('GET', key)) or 0
  if count >= tonumber(ARGV[2 * i - 1]) then return i end
end
for i, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('PEXPIRE', key, ARGV[2 * i])
end
return 0
";

/// Why the Redis quotas could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    /// The Redis URL does not parse. The URL itself is left out: it may hold a password.
    #[error("invalid Redis URL for quotas: {0}")]
    InvalidUrl(String),
    /// The key prefix is empty.
    #[error("the Redis key prefix for quotas must not be empty")]
    EmptyPrefix,
}

impl QuotaError {
    fn from_setup(error: SetupError) -> QuotaError {
        match error {
            SetupError::EmptyPrefix => QuotaError::EmptyPrefix,
            // The reason only: the URL may hold a password.
            SetupError::InvalidUrl { reason, .. } | SetupError::Pool(reason) => {
                QuotaError::InvalidUrl(reason)
            }
        }
    }
}

/// Submission quotas for the API: fixed windows per user and per tenant, as configured per tier.
/// Cheap to clone; clones share their counters.
///
/// - **Local** ([`Quotas::local`]): counters in this process. Right for one API node (the
///   embedded mode); several local nodes would each allow the full limit.
/// - **Redis** ([`Quotas::redis`]): counters under `{prefix}:quota:` taken by one Lua script,
///   so every node sharing the prefix enforces one limit together, atomically. Windows are
///   aligned to the Unix epoch and computed from each node's clock, so node clocks should agree
///   to well within a window (NTP); keys outlive their window by a few seconds for the stragglers.
///
/// **Fails open.** When Redis cannot be reached or does not answer within 250 ms, the submission
/// is admitted: a limiter outage must not stop all traffic. The first failure logs a warning and
/// recovery an info line; for a second after each failure takes admit without asking Redis.
#[derive(Clone)]
pub struct Quotas {
    inner: Arc<Inner>,
}

struct Inner {
    config: QuotaConfig,
    backend: Backend,
}

enum Backend {
    Local(Mutex<LocalQuotas>),
    /// Boxed: the Redis handle holds its TLS settings, far larger than the local counters.
    Redis(Box<RedisCounters>),
}

struct RedisCounters {
    /// Where Redis is and the key prefix the counters live under.
    redis: Redis,
    pool: Pool,
    script: redis::Script,
    /// True from a failed call until the next successful one; only the transitions are logged.
    failing: AtomicBool,
    /// Unix ms before which takes admit without calling Redis (after a failure).
    skip_until_ms: AtomicU64,
}

impl Quotas {
    /// Quotas counted in this process.
    pub fn local(config: QuotaConfig) -> Quotas {
        Quotas::with_backend(config, Backend::Local(Mutex::new(LocalQuotas::new())))
    }

    /// Quotas counted in Redis at `url` under `{prefix}:quota:`, shared with every node that uses
    /// the same prefix. Connects lazily: an unreachable Redis is not an error here (takes fail
    /// open), only a malformed URL or an empty prefix is.
    pub fn redis(url: &str, prefix: &str, config: QuotaConfig) -> Result<Quotas, QuotaError> {
        let redis = Redis::open(url, prefix).map_err(QuotaError::from_setup)?;
        let pool = redis.pool(None).map_err(QuotaError::from_setup)?;
        Ok(Quotas::with_backend(
            config,
            Backend::Redis(Box::new(RedisCounters {
                redis,
                pool,
                script: redis::Script::new(TAKE_LUA),
                failing: AtomicBool::new(false),
                skip_until_ms: AtomicU64::new(0),
            })),
        ))
    }

    fn with_backend(config: QuotaConfig, backend: Backend) -> Quotas {
        Quotas {
            inner: Arc::new(Inner { config, backend }),
        }
    }

    /// Whether `tier` has any quota rule; when not, `take` does nothing and callers may skip it.
    pub fn is_limited(&self, tier: Tier) -> bool {
        !self.inner.config.for_tier(tier).is_empty()
    }

    /// Count one submission by `principal` against every quota of its tier, or refuse it with
    /// the first quota at its limit; a refused submission counts against none.
    pub async fn take(&self, principal: &Principal) -> Result<(), Exceeded> {
        let rules = self.inner.config.for_tier(principal.tier);
        if rules.is_empty() {
            return Ok(());
        }
        let now = unix_ms();
        let counters = counters(principal, rules, now);
        match &self.inner.backend {
            Backend::Local(local) => lock(local).try_take(&counters, now),
            // Boxed: the Redis call's future is kilobytes, and every submission's future would
            // carry (and move) that space, local quotas too (docs/PERFORMANCE.md, tenth round).
            Backend::Redis(redis) => Box::pin(redis.take(&counters, now)).await,
        }
    }
}

impl fmt::Debug for Quotas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the pool's Debug would print the connection info, password included.
        let mode = match &self.inner.backend {
            Backend::Local(_) => "local".to_owned(),
            Backend::Redis(r) => format!("redis, prefix {:?}", r.redis.prefix()),
        };
        f.debug_struct("Quotas")
            .field("mode", &mode)
            .field("config", &self.inner.config)
            .finish()
    }
}

impl RedisCounters {
    async fn take(&self, counters: &[Counter], now_unix_ms: u64) -> Result<(), Exceeded> {
        if now_unix_ms < self.skip_until_ms.load(Ordering::Relaxed) {
            return Ok(());
        }
        match tokio::time::timeout(CALL_TIMEOUT, self.call(counters)).await {
            Ok(Ok(0)) => {
                self.mark_healthy();
                Ok(())
            }
            Ok(Ok(i)) => match usize::try_from(i)
                .ok()
                .and_then(|i| counters.get(i.checked_sub(1)?))
            {
                Some(full) => {
                    self.mark_healthy();
                    Err(full.exceeded())
                }
                None => self.fail_open(now_unix_ms, &format!("script answered {i}")),
            },
            Ok(Err(e)) => self.fail_open(now_unix_ms, &e),
            Err(_) => self.fail_open(
                now_unix_ms,
                &format!("no answer within {} ms", CALL_TIMEOUT.as_millis()),
            ),
        }
    }

    /// Run the script; its answer is 0 (counted) or the 1-based index of the full counter.
    async fn call(&self, counters: &[Counter]) -> Result<i64, String> {
        let mut conn = self.pool.get().await.map_err(|e| e.to_string())?;
        let mut invocation = self.script.prepare_invoke();
        for c in counters {
            let ttl = c.expires_in.saturating_add(EXPIRY_SLACK);
            invocation
                .key(self.redis.key(format_args!("quota:{}", c.key)))
                .arg(c.limit)
                .arg(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        }
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| e.to_string())
    }

    fn fail_open(&self, now_unix_ms: u64, why: &dyn fmt::Display) -> Result<(), Exceeded> {
        let retry_ms = u64::try_from(RETRY_REDIS_AFTER.as_millis()).unwrap_or(u64::MAX);
        self.skip_until_ms
            .store(now_unix_ms.saturating_add(retry_ms), Ordering::Relaxed);
        if !self.failing.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                prefix = %self.redis.prefix(),
                error = %why,
                "quota counters unreachable in Redis: admitting submissions without quotas until it answers"
            );
        } else {
            tracing::debug!(error = %why, "quota check skipped: Redis still unreachable");
        }
        Ok(())
    }

    fn mark_healthy(&self) {
        if self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!(prefix = %self.redis.prefix(), "quota counters reachable in Redis again");
        }
    }
}

fn unix_ms() -> u64 {
    // A clock before 1970 is a broken host; counting from 0 still gives valid windows.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Lock the local counters even if a holder panicked: each take leaves them consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
