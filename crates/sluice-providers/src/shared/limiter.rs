//! One endpoint's request limit shared through Redis: leased cells, one round trip at a time, one
//! probe after idle for all workers, and this worker's local share while Redis is unreachable.

use super::{lock, Inner, LocalShare, SharedError, MIN_WAIT};
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most cells one round trip may lease.
const MAX_LEASE: u32 = 8;
/// Longest `acquire` sleeps between attempts, so it notices a switch of mode (shared/local).
const MAX_ACQUIRE_SLEEP: Duration = Duration::from_secs(1);

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
    /// Holds the token of the probe after idle while it is out.
    probe_key: String,
    /// How long the probe after idle may hold the endpoint, in microseconds; 0: no probing.
    probe_hold_us: u64,
    /// Probes this limiter was granted, for unique tokens.
    probes: AtomicU64,
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

impl SharedLimiter {
    /// How long a leased cell may wait for a caller before it is dropped.
    pub const LEASE_HOLD: Duration = Duration::from_millis(250);

    /// The limiter of `endpoint` under `limits`' prefix (see
    /// [`super::SharedLimits::limiter_probing`]).
    pub(super) fn new(
        limits: Arc<Inner>,
        endpoint: &str,
        per_minute: u32,
        burst: u32,
        probe_hold: Duration,
    ) -> Self {
        let interval_us = (per_minute > 0).then(|| 60_000_000u64.div_ceil(u64::from(per_minute)));
        SharedLimiter {
            inner: Arc::new(LimiterInner {
                key: limits.redis.key(format_args!("gcra:{endpoint}")),
                probe_key: limits.redis.key(format_args!("gcra:{endpoint}:probe")),
                probe_hold_us: u64::try_from(probe_hold.as_micros()).unwrap_or(u64::MAX),
                probes: AtomicU64::new(0),
                limits,
                per_minute,
                burst,
                interval_us,
                tau_us: interval_us.unwrap_or(0).saturating_mul(u64::from(burst)),
                lease_size: lease_size(per_minute),
                demand: AtomicU32::new(0),
                leased: Mutex::new(VecDeque::new()),
                gate: tokio::sync::Mutex::new(None),
                local: Mutex::new(LocalShare::new()),
                origin: Instant::now(),
            }),
        }
    }

    /// Most cells one round trip to Redis may lease for this limiter.
    pub fn lease_size(&self) -> u32 {
        self.inner.lease_size
    }

    /// Try to take one permit now: `Ok(())` granted, `Err(wait)` = try again after `wait`
    /// (`Duration::MAX` for a zero rate). A probe after idle granted here is released at once
    /// (no report: the endpoint goes on from an empty bucket).
    pub async fn try_acquire(&self) -> Result<(), Duration> {
        self.try_acquire_probing().await.map(|_released| ())
    }

    /// [`SharedLimiter::try_acquire`], with the probe after idle when this grant is it: the
    /// caller sends its call and reports the outcome through it ([`SharedProbe::report`]).
    pub async fn try_acquire_probing(&self) -> Result<Option<SharedProbe>, Duration> {
        let _demand = Demand::enter(&self.inner.demand);
        self.inner.attempt().await
    }

    /// Wait until a permit is granted (a probe after idle granted here is released at once).
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

/// The probe after idle: the one call, among all workers, that goes to an endpoint whose shared
/// key had expired, while every other caller waits for its outcome.
///
/// Reported with the provider's remaining requests, it fills the shared bucket once; dropped
/// unreported (the call never went, or the permit was dropped), it is released on the runtime
/// and the endpoint goes on from an empty bucket, as without probing. Either way, once the
/// hold has ended the shared state has moved on and a report changes nothing.
pub struct SharedProbe {
    limiter: Arc<LimiterInner>,
    token: String,
    settled: bool,
}

impl SharedProbe {
    /// Settle the probe with its call's outcome: `remaining`, the provider's remaining requests
    /// from a successful response, lets every worker together spend that many at once (at most
    /// the endpoint's burst); `None` (a failure, a 429, no headers) leaves an empty bucket.
    /// Returns whether the probe was still out: false when its hold had ended first.
    pub async fn report(mut self, remaining: Option<u64>) -> Result<bool, SharedError> {
        self.settled = true;
        self.limiter.settle_probe(&self.token, remaining).await
    }
}

impl Drop for SharedProbe {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Drop cannot wait on Redis; without a runtime the hold's end releases it.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let limiter = Arc::clone(&self.limiter);
            let token = std::mem::take(&mut self.token);
            runtime.spawn(async move {
                if let Err(error) = limiter.settle_probe(&token, None).await {
                    tracing::debug!(%error, "could not release the probe after idle; its hold ends it");
                }
            });
        }
    }
}

impl fmt::Debug for SharedProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedProbe")
            .field("key", &self.limiter.key)
            .field("token", &self.token)
            .finish_non_exhaustive()
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
    async fn attempt(self: &Arc<Self>) -> Result<Option<SharedProbe>, Duration> {
        if self.take_leased() {
            return Ok(None);
        }
        let Some(interval_us) = self.interval_us else {
            return Err(Duration::MAX);
        };
        if !self.limits.degraded.load(Ordering::Relaxed) {
            let mut next_grant = self.gate.lock().await;
            // While we queued, the caller before us may have leased cells, been refused, or
            // found Redis down.
            if self.take_leased() {
                return Ok(None);
            }
            if let Some(wait) = next_grant.and_then(|at| at.checked_duration_since(Instant::now()))
            {
                return Err(wait.max(MIN_WAIT));
            }
            if !self.limits.degraded.load(Ordering::Relaxed) {
                // Dropping this future mid-call may lose the cells Redis granted: that errs on
                // the side of staying under the limit.
                let token = format!(
                    "{}:{}",
                    self.limits.worker_id,
                    self.probes.fetch_add(1, Ordering::Relaxed)
                );
                match self.shared(interval_us, &token).await {
                    Ok((0, wait_us, _)) => {
                        let wait = Duration::from_micros(wait_us).max(MIN_WAIT);
                        *next_grant = Some(Instant::now() + wait);
                        return Err(wait);
                    }
                    Ok((granted, wait_us, probe)) => {
                        // Also remember when the next cell is due, so the callers behind us
                        // do not spend a round trip each to be refused.
                        *next_grant = Some(Instant::now() + Duration::from_micros(wait_us));
                        if granted > 1 {
                            let use_by = Instant::now() + SharedLimiter::LEASE_HOLD;
                            lock(&self.leased).push_back((use_by, granted - 1));
                        }
                        return Ok(probe.then(|| SharedProbe {
                            limiter: Arc::clone(self),
                            token,
                            settled: false,
                        }));
                    }
                    // This call falls through to the local share at once; the heartbeat brings
                    // the shared state back when Redis answers again.
                    Err(e) => self.limits.mark_degraded(&e),
                }
            }
        }
        self.local().map(|()| None)
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

    /// One decision against the shared GCRA: (cells granted, microseconds until the next one,
    /// whether the one cell granted is the probe after idle, under `token`).
    async fn shared(&self, interval_us: u64, token: &str) -> Result<(u32, u64, bool), SharedError> {
        let want = self
            .demand
            .load(Ordering::Relaxed)
            .clamp(1, self.lease_size);
        let limits = &self.limits;
        let (granted, wait_us, probe): (i64, i64, i64) = limits
            .call(|mut conn| async move {
                limits
                    .gcra
                    .key(&self.key)
                    .key(&self.probe_key)
                    .arg(interval_us)
                    .arg(self.tau_us)
                    .arg(want)
                    .arg(self.probe_hold_us)
                    .arg(token)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        let granted = u32::try_from(granted.clamp(0, i64::from(want))).unwrap_or(0);
        Ok((
            granted,
            u64::try_from(wait_us).unwrap_or(0),
            granted == 1 && probe == 1,
        ))
    }

    /// Settle the probe `token` (see [`SharedProbe::report`]): true if it was still out.
    async fn settle_probe(&self, token: &str, remaining: Option<u64>) -> Result<bool, SharedError> {
        let Some(interval_us) = self.interval_us else {
            return Ok(false);
        };
        // -1: nothing learnt. A count beyond i64 is capped by the burst anyway.
        let cells = remaining.map_or(-1, |r| i64::try_from(r).unwrap_or(i64::MAX));
        let limits = &self.limits;
        let settled: i64 = limits
            .call(|mut conn| async move {
                limits
                    .probe
                    .key(&self.key)
                    .key(&self.probe_key)
                    .arg(token)
                    .arg(interval_us)
                    .arg(self.tau_us)
                    .arg(cells)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(settled == 1)
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
