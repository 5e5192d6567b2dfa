//! Endpoint rate limits shared by every worker through Redis: one GCRA key per endpoint, moved by one atomic Lua script.
//! While Redis is unreachable each worker limits locally at `rate / live workers`, and returns to the shared state when Redis answers.

use sluice_core::gcra::Gcra;
use sluice_redis::{redis, Pool, Redis, SetupError};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Longest a Redis call may take before we treat Redis as unreachable: a limiter that blocks
/// for seconds on a sick Redis would stall dispatch worse than a conservative local share.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);
/// How often an instance refreshes its heartbeat, and how often it probes Redis while degraded.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A worker whose heartbeat is older than this is no longer counted.
const WORKER_TTL: Duration = Duration::from_secs(5);
/// Most cells one round trip may lease.
const MAX_LEASE: u32 = 8;
/// Workers assumed before the registry has ever been read: dividing by too many only slows a
/// worker down during an outage, dividing by too few can multiply the provider's limit.
const DEFAULT_EXPECTED_WORKERS: u64 = 4;
/// Longest `acquire` sleeps between attempts, so it notices a switch of mode (shared/local).
const MAX_ACQUIRE_SLEEP: Duration = Duration::from_secs(1);
/// Shortest wait reported on a refusal, so a retry loop never spins.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// Connections per instance: decisions are single short scripts, a few connections suffice.
const POOL_SIZE: usize = 8;

/// GCRA on Redis server time. Grants as many of the wanted cells as conform now.
const GCRA_LUA: &str = r"
-- KEYS[1]: the endpoint's TAT in microseconds of Redis server time.
-- ARGV: emission interval T (us), burst tolerance tau (us), cells wanted.
-- Returns {granted, wait_us}: wait_us is how long until one more cell would conform.
-- Before Redis 5, TIME followed by writes needs effects replication; later it is the default.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
-- A missing key is an endpoint idle for over a second (or never used): start with an empty
-- bucket so it comes back at its steady rate instead of with a burst every worker shares in.
local tat = tonumber(redis.call('GET', KEYS[1])) or (now + tau)
if tat < now then tat = now end
-- Cell k (1-based) conforms when tat + k*t - (tau + t) <= now.
local granted = math.floor((now + tau + t - tat) / t)
if granted > want then granted = want end
if granted < 0 then granted = 0 end
if granted > 0 then
  tat = tat + granted * t
  -- Past its TAT the key means the same as no key, so let it expire soon after.
  local ttl_ms = math.ceil((tat - now) / 1000) + 1000
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
end
local wait = tat - tau - now
if wait < 0 then wait = 0 end
return {granted, wait}
";

/// A token budget on Redis server time: all-or-nothing takes, and corrections after the call.
const TOKENS_LUA: &str = r"
-- KEYS[1]: the endpoint's token TAT in microseconds of Redis server time.
-- ARGV: time per token T (us, fractional), burst tolerance tau (us), tokens, mode:
--   'take' records the tokens only if they conform now; 'charge' records them regardless (the
--   real usage was above the estimate); 'refund' gives them back (it was below).
-- Returns {1, 0} when recorded, or {0, wait_us} when a take does not conform yet.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local cost = tonumber(ARGV[3]) * t
local mode = ARGV[4]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if mode == 'take' then
  -- A call larger than the whole burst conforms once the budget is idle, as locally.
  local tolerance = math.max(tau + t, cost)
  local wait = tat + cost - tolerance - now
  if wait > 0 then return {0, math.ceil(wait)} end
  tat = tat + cost
elseif mode == 'charge' then
  tat = tat + cost
else
  tat = math.max(tat - cost, now)
end
local ttl_ms = math.ceil((tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl_ms))
return {1, 0}
";

/// Heartbeat registry: refresh this worker (unless ARGV[1] is empty), drop stale ones, count.
const HEARTBEAT_LUA: &str = r"
-- KEYS[1]: sorted set of worker ids scored by last heartbeat, ms of Redis server time.
-- ARGV[1]: worker id to refresh, or '' to only count. ARGV[2]: TTL in ms.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local ttl = tonumber(ARGV[2])
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], string.format('%.0f', ttl * 2))
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. string.format('%.0f', now - ttl))
return redis.call('ZCARD', KEYS[1])
";

/// Why the shared limiter could not be set up, or why one Redis call failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The Redis URL does not parse (the URL in the message has its password redacted).
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The key prefix or the worker id is empty.
    #[error("the Redis key prefix and the worker id must not be empty")]
    EmptyName,
    /// No connection could be had from the pool (Redis down, refused, ...).
    #[error("no Redis connection: {0}")]
    Pool(String),
    /// Redis answered with an error, or the connection broke mid-call.
    #[error("Redis call failed: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis did not answer within the call timeout.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<SetupError> for SharedError {
    fn from(error: SetupError) -> SharedError {
        match error {
            SetupError::InvalidUrl { url, reason } => SharedError::InvalidUrl { url, reason },
            SetupError::EmptyPrefix => SharedError::EmptyName,
            SetupError::Pool(reason) => SharedError::Pool(reason),
        }
    }
}

/// Shared endpoint limits for one worker process: a Redis pool, its heartbeat, and the mode.
/// Cheap to clone; the heartbeat stops once this and every limiter made from it are dropped.
///
/// # Rules
///
/// - **Shared state.** Key `{prefix}:gcra:{endpoint}` holds the endpoint's theoretical arrival
///   time (TAT) in microseconds of *Redis server time* (`TIME` inside the script), so worker
///   clocks never matter. The key expires shortly after its TAT passes, so idle endpoints vanish.
/// - **Leasing.** One round trip may take up to [`SharedLimiter::lease_size`] cells (1 below
///   60 rpm, else `rpm / 60 / 4` clamped to 1..=8), but only as many as callers are waiting on
///   this limiter right now, so a lone sequential caller never wastes cells. Cells not used
///   within [`SharedLimiter::LEASE_HOLD`] (250 ms) are dropped, never returned: returning them
///   would let capacity granted in the past be spent later, above the limit. The trade-off is
///   that a dropped cell is lost capacity, and that a cell is used up to 250 ms after Redis
///   granted it, so in any window of length `W` the uses of one endpoint across all workers are
///   at most `floor(rate * (W + 250 ms)) + burst + 1`, against `floor(rate * W) + burst + 1`
///   without leases.
/// - **Fallback.** A Redis error or a call slower than 200 ms puts the whole [`SharedLimits`] in
///   degraded mode: every limiter then uses a local [`Gcra`] at `rpm / workers` (at least 1 rpm,
///   so an endpoint with more workers than rpm still serves) and `burst / workers`, where
///   `workers` is the last live count read from the heartbeat registry, or the expected number
///   of workers (default 4) if Redis never answered. The heartbeat retries every second and a
///   successful one ends degraded mode.
/// - **Registry.** Sorted set `{prefix}:workers`: each instance scores its worker id with Redis
///   time every second; members older than 5 s are removed before counting.
/// - **Round trips.** One caller at a time per limiter asks Redis; the others first take
///   leased cells, and are told to wait, without a round trip, until the instant the last
///   answer said the next cell is due (the shared TAT only moves forward).
#[derive(Clone)]
pub struct SharedLimits {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where Redis is (its URL shown without the password) and the key prefix.
    redis: Redis,
    pool: Pool,
    worker_id: String,
    workers_key: String,
    degraded: AtomicBool,
    /// Last live worker count read from the registry; 0 while never known.
    live: AtomicU64,
    expected: AtomicU64,
    gcra: redis::Script,
    tokens: redis::Script,
    heartbeat: redis::Script,
    heartbeat_task: Mutex<Option<tokio::task::AbortHandle>>,
}

impl SharedLimits {
    /// Set up the shared limits of worker `worker_id` under key prefix `prefix`.
    ///
    /// Fails only on a malformed URL or an empty name: an unreachable Redis is not an error, the
    /// instance starts degraded and switches to the shared state when Redis answers. Must be
    /// called inside a Tokio runtime (it spawns the heartbeat task).
    pub async fn connect(
        url: &str,
        prefix: &str,
        worker_id: &str,
    ) -> Result<SharedLimits, SharedError> {
        if prefix.is_empty() || worker_id.is_empty() {
            return Err(SharedError::EmptyName);
        }
        let redis = Redis::open(url, prefix)?;
        let pool = redis.pool(Some(POOL_SIZE))?;
        let inner = Arc::new(Inner {
            workers_key: redis.key("workers"),
            redis,
            pool,
            worker_id: worker_id.to_owned(),
            degraded: AtomicBool::new(false),
            live: AtomicU64::new(0),
            expected: AtomicU64::new(DEFAULT_EXPECTED_WORKERS),
            gcra: redis::Script::new(GCRA_LUA),
            tokens: redis::Script::new(TOKENS_LUA),
            heartbeat: redis::Script::new(HEARTBEAT_LUA),
            heartbeat_task: Mutex::new(None),
        });
        // Register now, so the first decisions already know the mode and the worker count.
        inner.beat().await;
        let task = tokio::spawn(heartbeat_loop(Arc::downgrade(&inner)));
        *lock(&inner.heartbeat_task) = Some(task.abort_handle());
        Ok(SharedLimits { inner })
    }

    /// Workers assumed for the local share while the registry has never been read (default 4).
    /// Overestimating only slows this worker during an outage; underestimating risks 429s.
    pub fn with_expected_workers(self, workers: u64) -> SharedLimits {
        self.inner.expected.store(workers.max(1), Ordering::Relaxed);
        self
    }

    /// A limiter for `endpoint` at `per_minute` requests with `burst` extra back-to-back cells,
    /// shared with every worker that uses the same prefix and endpoint name.
    pub fn limiter(&self, endpoint: &str, per_minute: u32, burst: u32) -> SharedLimiter {
        let interval_us = (per_minute > 0).then(|| 60_000_000u64.div_ceil(u64::from(per_minute)));
        SharedLimiter {
            inner: Arc::new(LimiterInner {
                limits: Arc::clone(&self.inner),
                key: self.inner.redis.key(format_args!("gcra:{endpoint}")),
                per_minute,
                burst,
                interval_us,
                tau_us: interval_us.unwrap_or(0).saturating_mul(u64::from(burst)),
                lease_size: lease_size(per_minute),
                demand: AtomicU32::new(0),
                leased: Mutex::new(VecDeque::new()),
                gate: tokio::sync::Mutex::new(None),
                local: Mutex::new(LocalShare {
                    divisor: 0,
                    gcra: Gcra::per_minute(0, 0),
                }),
                origin: Instant::now(),
            }),
        }
    }

    /// A token budget for `endpoint` at `per_minute` tokens with `burst` extra, shared with every
    /// worker that uses the same prefix and endpoint name.
    pub fn token_budget(&self, endpoint: &str, per_minute: u32, burst: u32) -> SharedBudget {
        let interval_us = 60_000_000.0 / f64::from(per_minute.max(1));
        SharedBudget {
            inner: Arc::new(BudgetInner {
                limits: Arc::clone(&self.inner),
                key: self.inner.redis.key(format_args!("tokens:{endpoint}")),
                per_minute,
                burst,
                interval_us,
                tau_us: interval_us * f64::from(burst),
                local: Mutex::new(LocalShare {
                    divisor: 0,
                    gcra: Gcra::per_minute(0, 0),
                }),
                origin: Instant::now(),
            }),
        }
    }

    /// Live workers in the registry: a fresh count from Redis, else the last count seen, `None`
    /// if Redis has never answered.
    pub async fn live_workers(&self) -> Option<u64> {
        match self.inner.registry(false).await {
            Ok(n) => Some(n),
            Err(_) => Some(self.inner.live.load(Ordering::Relaxed)).filter(|&n| n > 0),
        }
    }

    /// True while limiting locally because Redis is unreachable.
    pub fn is_degraded(&self) -> bool {
        self.inner.degraded.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for SharedLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the pool's own Debug would print the connection info, password included.
        f.debug_struct("SharedLimits")
            .field("url", &self.inner.redis.shown_url())
            .field("prefix", &self.inner.redis.prefix())
            .field("worker_id", &self.inner.worker_id)
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// Run one Redis operation on a pooled connection, within the call timeout.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, SharedError>
    where
        F: FnOnce(sluice_redis::Connection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| SharedError::Pool(e.to_string()))?;
            Ok(op(conn).await?)
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| SharedError::Timeout(CALL_TIMEOUT))?
    }

    /// Refresh this worker's heartbeat (if `refresh`), and count live workers.
    async fn registry(&self, refresh: bool) -> Result<u64, SharedError> {
        let member = if refresh { self.worker_id.as_str() } else { "" };
        let count: u64 = self
            .call(|mut conn| async move {
                self.heartbeat
                    .key(&self.workers_key)
                    .arg(member)
                    .arg(WORKER_TTL.as_millis() as u64)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        if count > 0 {
            self.live.store(count, Ordering::Relaxed);
        }
        Ok(count)
    }

    /// One heartbeat: its success or failure also decides the mode.
    async fn beat(&self) {
        match self.registry(true).await {
            Ok(_) => self.mark_healthy(),
            Err(e) => self.mark_degraded(&e),
        }
    }

    fn mark_degraded(&self, why: &SharedError) {
        if !self.degraded.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                redis = %self.redis.shown_url(),
                error = %why,
                workers = self.fallback_workers(),
                "Redis unreachable: limiting endpoints locally at rate / workers"
            );
        }
    }

    fn mark_healthy(&self) {
        if self.degraded.swap(false, Ordering::Relaxed) {
            tracing::info!(redis = %self.redis.shown_url(), "Redis reachable: endpoint limits are shared again");
        }
    }

    /// Divisor of the local share: last live count, else the expected number of workers.
    fn fallback_workers(&self) -> u64 {
        match self.live.load(Ordering::Relaxed) {
            0 => self.expected.load(Ordering::Relaxed).max(1),
            n => n,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The task only holds a weak reference, so it would end on its own at the next tick;
        // aborting stops the heartbeat at once, so other workers see this one gone after the TTL.
        if let Some(task) = lock(&self.heartbeat_task).take() {
            task.abort();
        }
    }
}

async fn heartbeat_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick fires at once; `connect` has just beaten.
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.beat().await;
    }
}

/// Cells one round trip may lease: enough to save round trips at high rates (a quarter second
/// of rate), one at low rates where a dropped lease would waste a noticeable share.
fn lease_size(per_minute: u32) -> u32 {
    if per_minute < 60 {
        1
    } else {
        (per_minute / 60 / 4).clamp(1, MAX_LEASE)
    }
}

/// One endpoint's limiter, shared through Redis with every worker using the same endpoint name.
/// Clones share the same leased cells and local fallback state.
#[derive(Clone)]
pub struct SharedLimiter {
    inner: Arc<LimiterInner>,
}

struct LimiterInner {
    limits: Arc<Inner>,
    key: String,
    per_minute: u32,
    burst: u32,
    /// Emission interval in microseconds; `None` for a zero rate, which never grants.
    interval_us: Option<u64>,
    tau_us: u64,
    lease_size: u32,
    /// Callers currently inside `try_acquire`/`acquire`: how many cells are worth leasing.
    demand: AtomicU32,
    /// Leased cells not used yet, as (use-by, count), oldest first.
    leased: Mutex<VecDeque<(Instant, u32)>>,
    /// One round trip at a time per limiter, and the earliest instant the shared GCRA can grant
    /// again as it last told us. The shared TAT only moves forward, so until then another round
    /// trip could only be refused: callers of one worker do not all wake up and ask Redis.
    gate: tokio::sync::Mutex<Option<Instant>>,
    local: Mutex<LocalShare>,
    /// Time origin of the local fallback GCRA.
    origin: Instant,
}

/// The local fallback limiter and the worker count it was built for.
struct LocalShare {
    divisor: u64,
    gcra: Gcra,
}

impl LocalShare {
    /// This worker's share (`1 / divisor`) of `per_minute` and `burst`. Rebuilt only when the
    /// count changes (it is frozen while Redis is down), so a new outage starts with at most
    /// this worker's share of the burst.
    fn share(&mut self, divisor: u64, per_minute: u32, burst: u32) -> &mut Gcra {
        if self.divisor != divisor {
            let part = |v: u32| u32::try_from(u64::from(v) / divisor).unwrap_or(u32::MAX);
            self.gcra = Gcra::per_minute(part(per_minute).max(1), part(burst));
            self.divisor = divisor;
        }
        &mut self.gcra
    }
}

impl SharedLimiter {
    /// How long a leased cell may wait for a caller before it is dropped.
    pub const LEASE_HOLD: Duration = Duration::from_millis(250);

    /// Most cells one round trip to Redis may lease for this limiter.
    pub fn lease_size(&self) -> u32 {
        self.inner.lease_size
    }

    /// Try to take one permit now: `Ok(())` granted, `Err(wait)` = try again after `wait`
    /// (`Duration::MAX` for a zero rate).
    pub async fn try_acquire(&self) -> Result<(), Duration> {
        let _demand = Demand::enter(&self.inner.demand);
        self.inner.attempt().await
    }

    /// Wait until a permit is granted.
    ///
    /// Nothing is reserved while sleeping, so dropping this future costs at most the cells of a
    /// round trip in flight. A zero-rate limiter never grants.
    pub async fn acquire(&self) {
        let _demand = Demand::enter(&self.inner.demand);
        while let Err(wait) = self.inner.attempt().await {
            tokio::time::sleep(wait.min(MAX_ACQUIRE_SLEEP)).await;
        }
    }
}

impl fmt::Debug for SharedLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedLimiter")
            .field("key", &self.inner.key)
            .field("per_minute", &self.inner.per_minute)
            .field("burst", &self.inner.burst)
            .field("lease_size", &self.inner.lease_size)
            .finish_non_exhaustive()
    }
}

impl LimiterInner {
    async fn attempt(&self) -> Result<(), Duration> {
        if self.take_leased() {
            return Ok(());
        }
        let Some(interval_us) = self.interval_us else {
            return Err(Duration::MAX);
        };
        if !self.limits.degraded.load(Ordering::Relaxed) {
            let mut next_grant = self.gate.lock().await;
            // While we queued, the caller before us may have leased cells, been refused, or
            // found Redis down.
            if self.take_leased() {
                return Ok(());
            }
            if let Some(wait) = next_grant.and_then(|at| at.checked_duration_since(Instant::now()))
            {
                return Err(wait.max(MIN_WAIT));
            }
            if !self.limits.degraded.load(Ordering::Relaxed) {
                // Dropping this future mid-call may lose the cells Redis granted: that errs on
                // the side of staying under the limit.
                match self.shared(interval_us).await {
                    Ok((0, wait_us)) => {
                        let wait = Duration::from_micros(wait_us).max(MIN_WAIT);
                        *next_grant = Some(Instant::now() + wait);
                        return Err(wait);
                    }
                    Ok((granted, wait_us)) => {
                        // Also remember when the next cell is due, so the callers behind us
                        // do not spend a round trip each to be refused.
                        *next_grant = Some(Instant::now() + Duration::from_micros(wait_us));
                        if granted > 1 {
                            let use_by = Instant::now() + SharedLimiter::LEASE_HOLD;
                            lock(&self.leased).push_back((use_by, granted - 1));
                        }
                        return Ok(());
                    }
                    // This call falls through to the local share at once; the heartbeat brings
                    // the shared state back when Redis answers again.
                    Err(e) => self.limits.mark_degraded(&e),
                }
            }
        }
        self.local()
    }

    /// Take one leased cell that is still within its hold time, dropping expired ones.
    fn take_leased(&self) -> bool {
        let mut leased = lock(&self.leased);
        let now = Instant::now();
        while leased.front().is_some_and(|&(use_by, _)| use_by <= now) {
            leased.pop_front();
        }
        match leased.front_mut() {
            Some((_, n)) => {
                *n -= 1;
                if *n == 0 {
                    leased.pop_front();
                }
                true
            }
            None => false,
        }
    }

    /// One decision against the shared GCRA: (cells granted, microseconds until the next one).
    async fn shared(&self, interval_us: u64) -> Result<(u32, u64), SharedError> {
        let want = self
            .demand
            .load(Ordering::Relaxed)
            .clamp(1, self.lease_size);
        let limits = &self.limits;
        let (granted, wait_us): (i64, i64) = limits
            .call(|mut conn| async move {
                limits
                    .gcra
                    .key(&self.key)
                    .arg(interval_us)
                    .arg(self.tau_us)
                    .arg(want)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let granted = u32::try_from(granted.clamp(0, i64::from(want))).unwrap_or(0);
        Ok((granted, u64::try_from(wait_us).unwrap_or(0)))
    }

    /// The local fallback: this worker's share of the endpoint's rate and burst.
    fn local(&self) -> Result<(), Duration> {
        let divisor = self.limits.fallback_workers();
        lock(&self.local)
            .share(divisor, self.per_minute, self.burst)
            .try_acquire(self.origin.elapsed(), 1)
            .map_err(|wait| wait.max(MIN_WAIT))
    }
}

/// One endpoint's token budget (`tpm`), shared through Redis like [`SharedLimiter`]: a call
/// takes its estimate up front, all or nothing, and the real usage corrects it afterwards.
/// While Redis is unreachable, a local share (`tpm / workers`) decides instead.
#[derive(Clone)]
pub struct SharedBudget {
    inner: Arc<BudgetInner>,
}

struct BudgetInner {
    limits: Arc<Inner>,
    key: String,
    per_minute: u32,
    burst: u32,
    interval_us: f64,
    tau_us: f64,
    local: Mutex<LocalShare>,
    origin: Instant,
}

impl SharedBudget {
    /// Take `tokens` now if they fit: `Ok(())`, or `Err(wait)` until they would.
    pub async fn try_take(&self, tokens: u32) -> Result<(), Duration> {
        if tokens == 0 {
            return Ok(());
        }
        match self.inner.shared(tokens, "take").await {
            Some(Ok(())) => Ok(()),
            Some(Err(wait)) => Err(wait.max(MIN_WAIT)),
            None => self
                .inner
                .with_local(|gcra, now| gcra.try_acquire(now, tokens).map_err(|w| w.max(MIN_WAIT))),
        }
    }

    /// Correct an earlier take by `delta` tokens: positive charges more, negative refunds.
    pub async fn adjust(&self, delta: i64) {
        let tokens = u32::try_from(delta.unsigned_abs()).unwrap_or(u32::MAX);
        if tokens == 0 {
            return;
        }
        let mode = if delta > 0 { "charge" } else { "refund" };
        if self.inner.shared(tokens, mode).await.is_none() {
            self.inner.with_local(|gcra, now| {
                if delta > 0 {
                    gcra.reserve(now, tokens);
                } else {
                    gcra.refund(now, tokens);
                }
            });
        }
    }
}

impl fmt::Debug for SharedBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedBudget")
            .field("key", &self.inner.key)
            .field("per_minute", &self.inner.per_minute)
            .finish_non_exhaustive()
    }
}

impl BudgetInner {
    /// One decision on Redis; `None` when Redis is (or just turned) unreachable.
    async fn shared(&self, tokens: u32, mode: &str) -> Option<Result<(), Duration>> {
        if self.limits.degraded.load(Ordering::Relaxed) {
            return None;
        }
        let limits = &self.limits;
        let answer: Result<(i64, i64), SharedError> = limits
            .call(|mut conn| async move {
                limits
                    .tokens
                    .key(&self.key)
                    .arg(self.interval_us)
                    .arg(self.tau_us)
                    .arg(tokens)
                    .arg(mode)
                    .invoke_async(&mut conn)
                    .await
            })
            .await;
        match answer {
            Ok((1, _)) => Some(Ok(())),
            Ok((_, wait_us)) => Some(Err(Duration::from_micros(
                u64::try_from(wait_us).unwrap_or(0),
            ))),
            Err(e) => {
                self.limits.mark_degraded(&e);
                None
            }
        }
    }

    /// Run `f` on this worker's local share of the budget.
    fn with_local<T>(&self, f: impl FnOnce(&mut Gcra, Duration) -> T) -> T {
        let divisor = self.limits.fallback_workers();
        let mut local = lock(&self.local);
        f(
            local.share(divisor, self.per_minute, self.burst),
            self.origin.elapsed(),
        )
    }
}

/// Counts a caller in a limiter's demand for as long as it is inside the limiter.
struct Demand<'a>(&'a AtomicU32);

impl<'a> Demand<'a> {
    fn enter(counter: &'a AtomicU32) -> Demand<'a> {
        counter.fetch_add(1, Ordering::Relaxed);
        Demand(counter)
    }
}

impl Drop for Demand<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Lock a mutex whose data stays consistent even if a holder panicked (plain counters and
/// timestamps updated in one step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_sizes() {
        assert_eq!(lease_size(0), 1);
        assert_eq!(lease_size(59), 1);
        assert_eq!(lease_size(60), 1);
        assert_eq!(lease_size(600), 2);
        assert_eq!(lease_size(2_000), 8);
        assert_eq!(lease_size(100_000), MAX_LEASE);
    }
}
