//! Circuit breaker for one endpoint: stop calling an endpoint that keeps failing, then probe it.
//! Pure state with time passed in; the caller decides which outcomes speak to the endpoint's health.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// When a breaker opens and how long it stays open.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker; 0 is treated as 1.
    pub failure_threshold: u32,
    /// How long an open breaker refuses calls before it lets one probe through, in seconds.
    pub open_secs: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            open_secs: 60.0,
        }
    }
}

impl BreakerConfig {
    /// `open_secs` as a duration; a negative or non-finite value falls back to the default 60 s.
    pub fn open_for(&self) -> Duration {
        Duration::try_from_secs_f64(self.open_secs).unwrap_or(Duration::from_secs(60))
    }
}

/// What a breaker allows, as seen from outside (metrics, endpoint selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Healthy: every call may go.
    Closed,
    /// Failing: no call may go until the open period ends.
    Open,
    /// The open period has ended: one probe at a time decides between closed and open.
    HalfOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    Closed { consecutive_failures: u32 },
    Open { until: Duration },
    HalfOpen { probe_in_flight: bool },
}

/// A per-endpoint circuit breaker.
///
/// Report only outcomes that speak to the endpoint's health: 5xx, timeouts and connection
/// errors are failures; a 4xx rejection says the request was bad, and a 429 says we were too
/// fast (that is the rate limiter's business), so neither counts as a failure or a success —
/// release the slot with [`Breaker::on_cancelled`] instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Breaker {
    threshold: u32,
    open_for: Duration,
    inner: Inner,
}

impl Breaker {
    pub fn new(config: BreakerConfig) -> Breaker {
        Breaker {
            threshold: config.failure_threshold.max(1),
            open_for: config.open_for(),
            inner: Inner::Closed {
                consecutive_failures: 0,
            },
        }
    }

    /// The state at `now`; an open breaker whose time has passed reads as half-open.
    pub fn state(&self, now: Duration) -> BreakerState {
        match self.inner {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { until } if now < until => BreakerState::Open,
            Inner::Open { .. } | Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// May a call go now? Closed: yes. Open: no. Half-open: yes for one probe at a time; the
    /// slot is taken until that probe's outcome is reported.
    pub fn try_acquire(&mut self, now: Duration) -> bool {
        self.settle(now);
        match self.inner {
            Inner::Closed { .. } => true,
            Inner::Open { .. }
            | Inner::HalfOpen {
                probe_in_flight: true,
            } => false,
            Inner::HalfOpen {
                probe_in_flight: false,
            } => {
                self.inner = Inner::HalfOpen {
                    probe_in_flight: true,
                };
                true
            }
        }
    }

    /// A call succeeded: closed resets its count, half-open closes. A late success while open
    /// (a call started before the breaker opened) is stale news and changes nothing.
    pub fn on_success(&mut self, now: Duration) {
        self.settle(now);
        match self.inner {
            Inner::Closed { .. } | Inner::HalfOpen { .. } => {
                self.inner = Inner::Closed {
                    consecutive_failures: 0,
                }
            }
            Inner::Open { .. } => {}
        }
    }

    /// A call failed in a way that speaks to the endpoint's health. Closed counts and opens at
    /// the threshold; half-open reopens for a full `open_for`. Late failures while open do not
    /// extend the open period, or a burst of in-flight failures would keep it open longer.
    pub fn on_failure(&mut self, now: Duration) {
        self.settle(now);
        match self.inner {
            Inner::Closed {
                consecutive_failures,
            } => {
                let n = consecutive_failures.saturating_add(1);
                self.inner = if n >= self.threshold {
                    self.open(now)
                } else {
                    Inner::Closed {
                        consecutive_failures: n,
                    }
                };
            }
            Inner::HalfOpen { .. } => self.inner = self.open(now),
            Inner::Open { .. } => {}
        }
    }

    /// A granted call did not happen or told nothing about health (cancelled, 4xx, 429): a
    /// half-open probe slot is freed so another call can probe.
    pub fn on_cancelled(&mut self, now: Duration) {
        self.settle(now);
        if let Inner::HalfOpen {
            probe_in_flight: true,
        } = self.inner
        {
            self.inner = Inner::HalfOpen {
                probe_in_flight: false,
            };
        }
    }

    /// Time until an open breaker turns half-open; `None` unless it is open at `now`.
    pub fn retry_in(&self, now: Duration) -> Option<Duration> {
        match self.inner {
            Inner::Open { until } if now < until => Some(until - now),
            _ => None,
        }
    }

    fn open(&self, now: Duration) -> Inner {
        Inner::Open {
            until: now.saturating_add(self.open_for),
        }
    }

    /// Make the stored state agree with `state(now)`.
    fn settle(&mut self, now: Duration) {
        if let Inner::Open { until } = self.inner {
            if now >= until {
                self.inner = Inner::HalfOpen {
                    probe_in_flight: false,
                };
            }
        }
    }
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker::new(BreakerConfig::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEC: Duration = Duration::from_secs(1);

    fn breaker(threshold: u32, open_secs: f64) -> Breaker {
        Breaker::new(BreakerConfig {
            failure_threshold: threshold,
            open_secs,
        })
    }

    #[test]
    fn opens_after_exactly_threshold_consecutive_failures() {
        let mut b = Breaker::default();
        let now = 10 * SEC;
        for _ in 0..4 {
            b.on_failure(now);
        }
        b.on_success(now); // resets the count
        for _ in 0..4 {
            b.on_failure(now);
            assert_eq!(b.state(now), BreakerState::Closed);
            assert!(b.try_acquire(now));
        }
        b.on_failure(now);
        assert_eq!(b.state(now), BreakerState::Open);
        assert!(!b.try_acquire(now));
        assert_eq!(b.retry_in(now), Some(60 * SEC));
    }

    #[test]
    fn half_open_after_open_for_with_one_probe_at_a_time() {
        let mut b = breaker(1, 30.0);
        b.on_failure(Duration::ZERO);
        assert!(!b.try_acquire(29 * SEC));
        assert_eq!(b.retry_in(29 * SEC), Some(SEC));
        assert_eq!(b.state(30 * SEC), BreakerState::HalfOpen);
        assert_eq!(b.retry_in(30 * SEC), None);
        assert!(b.try_acquire(30 * SEC));
        assert!(!b.try_acquire(30 * SEC));
        assert!(!b.try_acquire(40 * SEC));
        b.on_cancelled(41 * SEC); // the probe never happened: the slot is free again
        assert!(b.try_acquire(41 * SEC));
        assert!(!b.try_acquire(41 * SEC));
    }

    #[test]
    fn probe_success_closes() {
        let mut b = breaker(2, 5.0);
        b.on_failure(Duration::ZERO);
        b.on_failure(Duration::ZERO);
        assert!(b.try_acquire(5 * SEC));
        b.on_success(6 * SEC);
        assert_eq!(b.state(6 * SEC), BreakerState::Closed);
        assert!(b.try_acquire(6 * SEC) && b.try_acquire(6 * SEC));
        // The count starts afresh: one failure does not reopen a threshold-2 breaker.
        b.on_failure(7 * SEC);
        assert_eq!(b.state(7 * SEC), BreakerState::Closed);
    }

    #[test]
    fn probe_failure_reopens_for_a_full_period() {
        let mut b = breaker(1, 5.0);
        b.on_failure(Duration::ZERO);
        assert!(b.try_acquire(7 * SEC));
        b.on_failure(9 * SEC);
        assert_eq!(b.state(9 * SEC), BreakerState::Open);
        assert_eq!(b.retry_in(9 * SEC), Some(5 * SEC));
        assert!(!b.try_acquire(13 * SEC));
        assert!(b.try_acquire(14 * SEC));
    }

    #[test]
    fn late_outcomes_while_open_change_nothing() {
        let mut b = breaker(1, 5.0);
        b.on_failure(Duration::ZERO);
        b.on_failure(4 * SEC);
        b.on_success(4 * SEC);
        assert_eq!(b.retry_in(4 * SEC), Some(SEC));
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: BreakerConfig = serde_json::from_str(r#"{"open_secs": 2.5}"#).expect("parses");
        assert_eq!(c.failure_threshold, 5);
        assert_eq!(c.open_for(), Duration::from_millis(2500));
        assert!(serde_json::from_str::<BreakerConfig>(r#"{"open_for": 2}"#).is_err());
        let bad = BreakerConfig {
            open_secs: -1.0,
            ..BreakerConfig::default()
        };
        assert_eq!(bad.open_for(), 60 * SEC);
    }

    #[derive(Debug, Clone)]
    enum Event {
        Acquire,
        Success,
        Failure,
        Cancel,
        Advance(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            3 => Just(Event::Acquire),
            2 => Just(Event::Success),
            3 => Just(Event::Failure),
            1 => Just(Event::Cancel),
            2 => (0u64..4000).prop_map(Event::Advance),
        ]
    }

    proptest! {
        #[test]
        fn never_calls_while_open_and_one_probe_at_a_time(
            threshold in 1u32..6,
            open_ms in 1u64..5000,
            events in prop::collection::vec(event(), 1..300),
        ) {
            let mut b = breaker(threshold, open_ms as f64 / 1000.0);
            let mut now = Duration::ZERO;
            // Model: a probe granted in half-open is in flight until the next reported outcome.
            let mut probe_in_flight = false;
            let mut failures_while_closed = 0u32;
            for e in events {
                match e {
                    Event::Acquire => {
                        let before = b.state(now);
                        let granted = b.try_acquire(now);
                        match before {
                            BreakerState::Closed => prop_assert!(granted),
                            BreakerState::Open => prop_assert!(!granted, "call allowed while open"),
                            BreakerState::HalfOpen => {
                                prop_assert_eq!(granted, !probe_in_flight, "probe slot");
                                probe_in_flight |= granted;
                            }
                        }
                    }
                    Event::Success | Event::Failure | Event::Cancel => {
                        let before = b.state(now);
                        match e {
                            Event::Success => b.on_success(now),
                            Event::Failure => b.on_failure(now),
                            _ => b.on_cancelled(now),
                        }
                        probe_in_flight = false;
                        if before == BreakerState::Closed {
                            failures_while_closed = match e {
                                Event::Success => 0,
                                Event::Failure => failures_while_closed + 1,
                                _ => failures_while_closed,
                            };
                            let expected = if failures_while_closed >= threshold {
                                failures_while_closed = 0;
                                BreakerState::Open
                            } else {
                                BreakerState::Closed
                            };
                            prop_assert_eq!(b.state(now), expected);
                        }
                        if b.state(now) == BreakerState::Closed && before != BreakerState::Closed {
                            failures_while_closed = 0;
                        }
                    }
                    Event::Advance(ms) => now += Duration::from_millis(ms),
                }
                if b.state(now) == BreakerState::Open {
                    prop_assert!(b.retry_in(now).is_some_and(|d| d > Duration::ZERO));
                }
            }
        }
    }
}
