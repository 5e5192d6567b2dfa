//! Endpoint rate limits shared by every worker through Redis: one GCRA key per endpoint, moved by one atomic Lua script.
//! While Redis is unreachable each worker limits locally at `rate / live workers`, and returns to the shared state when Redis answers.

mod budget;
mod limiter;
mod scripts;

pub use budget::SharedBudget;
pub use limiter::{SharedLimiter, SharedProbe};

use scripts::{GCRA_LUA, HEARTBEAT_LUA, PROBE_LUA, TOKENS_LUA};
use sluice_core::gcra::Gcra;
use sluice_redis::{redis, Pool, Redis, SetupError};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

/// Longest a Redis call may take before we treat Redis as unreachable: a limiter that blocks
/// for seconds on a sick Redis would stall dispatch worse than a conservative local share.
const CALL_TIMEOUT: Duration = Duration::from_millis(200);
/// How often an instance refreshes its heartbeat, and how often it probes Redis while degraded.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// A worker whose heartbeat is older than this is no longer counted.
const WORKER_TTL: Duration = Duration::from_secs(5);
/// Workers assumed before the registry has ever been read: dividing by too many only slows a
/// worker down during an outage, dividing by too few can multiply the provider's limit.
const DEFAULT_EXPECTED_WORKERS: u64 = 4;
/// Shortest wait reported on a refusal, so a retry loop never spins.
const MIN_WAIT: Duration = Duration::from_millis(1);
/// Connections per instance: decisions are single short scripts, a few connections suffice.
const POOL_SIZE: usize = 8;

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
/// - **Probe after idle.** For a limiter made with [`SharedLimits::limiter_probing`], the first
///   caller to find the key gone gets a [`SharedProbe`] and every other caller of every worker
///   waits (re-asking every 10 ms) until the probe's response reports the provider's remaining
///   requests: the shared bucket then holds that many (at most the burst), once, whichever worker
///   reports. Without a report, or once the hold has ended, the bucket is empty, as without
///   probing. Key `{prefix}:gcra:{endpoint}:probe` holds the probe's token while it is out.
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
    probe: redis::Script,
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
            probe: redis::Script::new(PROBE_LUA),
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
    /// shared with every worker that uses the same prefix and endpoint name. An idle endpoint
    /// starts with an empty bucket.
    pub fn limiter(&self, endpoint: &str, per_minute: u32, burst: u32) -> SharedLimiter {
        self.limiter_probing(endpoint, per_minute, burst, Duration::ZERO)
    }

    /// [`SharedLimits::limiter`] whose idle endpoint is woken by one probe, held for at most
    /// `hold` (zero: no probe), whose report of the provider's remaining requests every worker
    /// then shares (see the rules above and [`SharedLimiter::try_acquire_probing`]).
    pub fn limiter_probing(
        &self,
        endpoint: &str,
        per_minute: u32,
        burst: u32,
        hold: Duration,
    ) -> SharedLimiter {
        SharedLimiter::new(Arc::clone(&self.inner), endpoint, per_minute, burst, hold)
    }

    /// A token budget for `endpoint` at `per_minute` tokens with `burst` extra, shared with every
    /// worker that uses the same prefix and endpoint name.
    pub fn token_budget(&self, endpoint: &str, per_minute: u32, burst: u32) -> SharedBudget {
        SharedBudget::new(Arc::clone(&self.inner), endpoint, per_minute, burst)
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

/// The local fallback limiter and the worker count it was built for.
struct LocalShare {
    divisor: u64,
    gcra: Gcra,
}

impl LocalShare {
    /// Not built yet: the first use builds it for the worker count of the moment.
    fn new() -> LocalShare {
        LocalShare {
            divisor: 0,
            gcra: Gcra::per_minute(0, 0),
        }
    }

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

/// Lock a mutex whose data stays consistent even if a holder panicked (plain counters and
/// timestamps updated in one step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
