//! One endpoint's token budget (`tpm`) shared through Redis: all-or-nothing takes before a call,
//! corrections by the real usage after it, and this worker's local share while Redis is unreachable.

use super::{lock, Inner, LocalShare, SharedError, MIN_WAIT};
use sluice_core::gcra::Gcra;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The budget of `endpoint` under `limits`' prefix (see [`super::SharedLimits::token_budget`]).
    pub(super) fn new(limits: Arc<Inner>, endpoint: &str, per_minute: u32, burst: u32) -> Self {
        let interval_us = 60_000_000.0 / f64::from(per_minute.max(1));
        SharedBudget {
            inner: Arc::new(BudgetInner {
                key: limits.redis.key(format_args!("tokens:{endpoint}")),
                limits,
                per_minute,
                burst,
                interval_us,
                tau_us: interval_us * f64::from(burst),
                local: Mutex::new(LocalShare::new()),
                origin: Instant::now(),
            }),
        }
    }

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
