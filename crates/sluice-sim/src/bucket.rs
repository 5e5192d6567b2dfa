//! Per-key token bucket that stands in for a provider's requests-per-minute limit.
//! Time is passed in explicitly so the arithmetic can be tested without sleeping.

use std::time::{Duration, Instant};

/// What the `x-ratelimit-*-requests` headers report after a decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimitState {
    /// Requests per minute; `u32::MAX` when unlimited.
    pub limit: u32,
    /// Whole requests that could be sent right now.
    pub remaining: u32,
    /// Time until the bucket is full again.
    pub reset: Duration,
}

/// Outcome of asking for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Allowed(LimitState),
    /// `retry_after` is when one whole token will be available.
    Limited {
        state: LimitState,
        retry_after: Duration,
    },
}

const UNLIMITED: LimitState = LimitState {
    limit: u32::MAX,
    remaining: u32::MAX,
    reset: Duration::ZERO,
};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    rpm: u32,
    per_sec: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rpm == 0` means unlimited.
    pub fn new(rpm: u32, burst_seconds: f64, now: Instant) -> Self {
        let per_sec = f64::from(rpm) / 60.0;
        let capacity = (per_sec * burst_seconds).max(1.0);
        Self {
            rpm,
            per_sec,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    pub fn try_acquire(&mut self, now: Instant) -> Decision {
        if self.rpm == 0 {
            return Decision::Allowed(UNLIMITED);
        }
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Decision::Allowed(self.state())
        } else {
            let retry_after = self.secs_until(1.0);
            Decision::Limited {
                state: self.state(),
                retry_after,
            }
        }
    }

    /// The current state without spending a token, for answers that refuse before the bucket.
    pub fn peek(&mut self, now: Instant) -> LimitState {
        if self.rpm == 0 {
            return UNLIMITED;
        }
        self.refill(now);
        self.state()
    }

    fn refill(&mut self, now: Instant) {
        // saturating: callers may hold an `Instant` taken just before another thread's.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.capacity);
        self.last = self.last.max(now);
    }

    fn state(&self) -> LimitState {
        LimitState {
            limit: self.rpm,
            // The float is in 0..=capacity and capacity <= rpm * burst, so the cast cannot wrap.
            remaining: self.tokens.floor() as u32,
            reset: self.secs_until(self.capacity),
        }
    }

    fn secs_until(&self, level: f64) -> Duration {
        let missing = (level - self.tokens).max(0.0);
        Duration::from_secs_f64(missing / self.per_sec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_limit_then_refill() {
        let t0 = Instant::now();
        // 60 rpm, burst 1 s -> capacity 1, one token per second.
        let mut b = TokenBucket::new(60, 1.0, t0);
        match b.try_acquire(t0) {
            Decision::Allowed(s) => {
                assert_eq!((s.limit, s.remaining), (60, 0));
                assert_eq!(s.reset, Duration::from_secs(1));
            }
            d => panic!("expected allowed, got {d:?}"),
        }
        let at = t0 + Duration::from_millis(250);
        match b.try_acquire(at) {
            Decision::Limited { retry_after, state } => {
                assert!((retry_after.as_secs_f64() - 0.75).abs() < 1e-9);
                assert_eq!(state.remaining, 0);
            }
            d => panic!("expected limited, got {d:?}"),
        }
        assert!(matches!(
            b.try_acquire(t0 + Duration::from_secs(1)),
            Decision::Allowed(_)
        ));
        // Peeking refills but never spends.
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.peek(later).remaining, 1);
        assert_eq!(b.peek(later).remaining, 1);
    }

    #[test]
    fn capacity_follows_burst_and_never_overfills() {
        let t0 = Instant::now();
        // 600 rpm = 10/s, burst 2 s -> 20 requests back to back.
        let mut b = TokenBucket::new(600, 2.0, t0);
        let allowed = (0..25)
            .filter(|_| matches!(b.try_acquire(t0), Decision::Allowed(_)))
            .count();
        assert_eq!(allowed, 20);
        // A long idle period refills to capacity, not beyond.
        let later = t0 + Duration::from_secs(3600);
        match b.try_acquire(later) {
            Decision::Allowed(s) => assert_eq!(s.remaining, 19),
            d => panic!("expected allowed, got {d:?}"),
        }
    }

    #[test]
    fn zero_rpm_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, 1.0, t0);
        assert!((0..1000).all(|_| matches!(b.try_acquire(t0), Decision::Allowed(_))));
    }
}
