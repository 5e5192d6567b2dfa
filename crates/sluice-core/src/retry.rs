//! Retry policy: how long a job waits before its next attempt, and when it is dead.
//! Exponential backoff whose jitter only lengthens the delay, so "no sooner than the backoff" holds.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Backoff and attempt budget for retryable failures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the first retry, in seconds; doubles with every further failure.
    pub base_delay_secs: f64,
    /// Upper bound of the delay before jitter, in seconds.
    pub max_delay_secs: f64,
    /// Attempts (provider calls) a job gets before it goes to `dead`.
    pub max_attempts: u32,
    /// Extra delay as a fraction of the backoff, drawn uniformly from `[0, jitter)`.
    pub jitter: f64,
    /// 429s a job may meet before it goes to `dead`. They do not count against `max_attempts`:
    /// a throttled call is the pool's state, not the job's fault, but a key that answers 429
    /// forever (a spent quota) must not hold jobs for ever either.
    pub max_rate_limited: u32,
    /// Wait after a job's first 429 when the provider names none, in seconds; doubles with every
    /// further 429. Short, because the endpoint's limiter already waits out the provider.
    pub rate_limited_delay_secs: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base_delay_secs: 10.0,
            max_delay_secs: 600.0,
            max_attempts: 5,
            jitter: 0.25,
            max_rate_limited: 20,
            rate_limited_delay_secs: 1.0,
        }
    }
}

/// What to do with a job after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RetryDecision {
    /// Publish to the `retry` lane, deliverable no sooner than this.
    RetryAfter(Duration),
    /// Give up: the failure is permanent or the attempts are spent.
    Dead,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum InvalidRetryPolicy {
    #[error("retry.max_attempts must be at least 1")]
    NoAttempts,
    #[error("retry delays must be finite and >= 0, and base <= max")]
    BadDelays,
    #[error("retry.jitter must be in [0, 1]")]
    BadJitter,
}

impl RetryPolicy {
    pub fn validate(&self) -> Result<(), InvalidRetryPolicy> {
        if self.max_attempts == 0 {
            return Err(InvalidRetryPolicy::NoAttempts);
        }
        let finite = self.base_delay_secs.is_finite()
            && self.max_delay_secs.is_finite()
            && self.rate_limited_delay_secs.is_finite();
        if !finite
            || self.base_delay_secs < 0.0
            || self.base_delay_secs > self.max_delay_secs
            || self.rate_limited_delay_secs < 0.0
        {
            return Err(InvalidRetryPolicy::BadDelays);
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(InvalidRetryPolicy::BadJitter);
        }
        Ok(())
    }

    /// The smallest delay allowed after `attempts` failed attempts (1-based): `base * 2^(attempts-1)`, capped.
    pub fn min_backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(63) as i32;
        let secs = (self.base_delay_secs * 2f64.powi(exp)).min(self.max_delay_secs);
        Duration::from_secs_f64(secs.max(0.0))
    }

    /// The delay after `attempts` failed attempts; `unit` in `[0, 1)` draws the jitter.
    pub fn backoff(&self, attempts: u32, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        self.min_backoff(attempts).mul_f64(1.0 + self.jitter * unit)
    }

    /// The longest delay [`RetryPolicy::backoff`] or [`RetryPolicy::decide_rate_limited`]
    /// chooses (the cap with all its jitter), not counting a provider's longer `retry-after`.
    pub fn longest_delay(&self) -> Duration {
        Duration::from_secs_f64((self.max_delay_secs * (1.0 + self.jitter)).max(0.0))
    }

    /// Decide after a failed attempt. `attempts` counts the attempts made so far, this one included.
    pub fn decide(&self, attempts: u32, retryable: bool, unit: f64) -> RetryDecision {
        if !retryable || attempts >= self.max_attempts {
            RetryDecision::Dead
        } else {
            RetryDecision::RetryAfter(self.backoff(attempts, unit))
        }
    }

    /// Decide after a 429. `throttled` counts the job's 429s so far, this one included; the
    /// wait starts at `rate_limited_delay_secs`, doubles per 429, and the provider's
    /// `retry_after` is its floor.
    pub fn decide_rate_limited(
        &self,
        throttled: u32,
        retry_after: Option<Duration>,
        unit: f64,
    ) -> RetryDecision {
        if throttled > self.max_rate_limited {
            RetryDecision::Dead
        } else {
            let exp = throttled.saturating_sub(1).min(63) as i32;
            let secs = (self.rate_limited_delay_secs * 2f64.powi(exp)).min(self.max_delay_secs);
            let backoff = Duration::from_secs_f64(secs.max(0.0))
                .mul_f64(1.0 + self.jitter * unit.clamp(0.0, 1.0));
            RetryDecision::RetryAfter(backoff.max(retry_after.unwrap_or_default()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn defaults_match_the_design() {
        let p = RetryPolicy::default();
        assert_eq!(p.min_backoff(1), Duration::from_secs(10));
        assert_eq!(p.min_backoff(2), Duration::from_secs(20));
        assert_eq!(p.min_backoff(3), Duration::from_secs(40));
        assert_eq!(p.max_attempts, 5);
        assert_eq!(p.validate(), Ok(()));
    }

    #[test]
    fn no_backoff_is_longer_than_the_longest_delay() {
        let p = RetryPolicy::default();
        assert_eq!(p.longest_delay(), Duration::from_secs(750));
        for n in 1..40 {
            assert!(p.backoff(n, 0.999_999) <= p.longest_delay());
            let throttled = p.decide_rate_limited(n.min(p.max_rate_limited), None, 0.999_999);
            match throttled {
                RetryDecision::RetryAfter(d) => assert!(d <= p.longest_delay()),
                RetryDecision::Dead => panic!("{n} 429s are within the budget"),
            }
        }
    }

    #[test]
    fn exhausted_or_permanent_failures_are_dead() {
        let p = RetryPolicy::default();
        assert_eq!(p.decide(5, true, 0.5), RetryDecision::Dead);
        assert_eq!(p.decide(1, false, 0.5), RetryDecision::Dead);
        assert!(matches!(
            p.decide(4, true, 0.5),
            RetryDecision::RetryAfter(_)
        ));
    }

    #[test]
    fn rate_limits_have_their_own_budget_and_honour_retry_after() {
        let p = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        // Far more 429s than max_attempts still retry.
        assert_eq!(
            p.decide_rate_limited(12, None, 0.5),
            RetryDecision::RetryAfter(Duration::from_secs(600))
        );
        assert_eq!(
            p.decide_rate_limited(1, Some(Duration::from_secs(30)), 0.5),
            RetryDecision::RetryAfter(Duration::from_secs(30))
        );
        assert_eq!(
            p.decide_rate_limited(3, Some(Duration::from_secs(2)), 0.5),
            RetryDecision::RetryAfter(Duration::from_secs(4))
        );
        assert_eq!(
            p.decide_rate_limited(1, None, 0.5),
            RetryDecision::RetryAfter(Duration::from_secs(1))
        );
        assert!(matches!(
            p.decide_rate_limited(20, None, 0.5),
            RetryDecision::RetryAfter(_)
        ));
        assert_eq!(p.decide_rate_limited(21, None, 0.5), RetryDecision::Dead);
    }

    #[test]
    fn delay_is_capped() {
        let p = RetryPolicy {
            max_delay_secs: 30.0,
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(60, 0.9), Duration::from_secs(30));
    }

    #[test]
    fn invalid_policies_are_refused() {
        let zero = RetryPolicy {
            max_attempts: 0,
            ..RetryPolicy::default()
        };
        assert_eq!(zero.validate(), Err(InvalidRetryPolicy::NoAttempts));
        let inverted = RetryPolicy {
            base_delay_secs: 700.0,
            ..RetryPolicy::default()
        };
        assert_eq!(inverted.validate(), Err(InvalidRetryPolicy::BadDelays));
        let jitter = RetryPolicy {
            jitter: 2.0,
            ..RetryPolicy::default()
        };
        assert_eq!(jitter.validate(), Err(InvalidRetryPolicy::BadJitter));
    }

    proptest! {
        #[test]
        fn jitter_never_shortens_and_stays_bounded(attempts in 1u32..40, unit in 0.0f64..1.0) {
            let p = RetryPolicy::default();
            let d = p.backoff(attempts, unit);
            let min = p.min_backoff(attempts);
            prop_assert!(d >= min);
            prop_assert!(d <= min.mul_f64(1.0 + p.jitter));
        }

        #[test]
        fn backoff_grows_monotonically(attempts in 1u32..40) {
            let p = RetryPolicy::default();
            prop_assert!(p.min_backoff(attempts + 1) >= p.min_backoff(attempts));
        }
    }
}
