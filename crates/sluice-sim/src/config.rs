//! Simulator configuration: keys and their limits, latency, reply size and faults.
//! Everything here is plain serde data so the `sluice sim` CLI can load it from TOML or JSON.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The whole simulator configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SimConfig {
    /// Accepted keys. When empty, any non-empty key is accepted and gets its own
    /// bucket with `default_rpm`.
    pub keys: Vec<SimKey>,
    /// Requests per minute for keys without their own `rpm`. `0` disables limiting.
    pub default_rpm: u32,
    /// Bucket capacity in seconds of rate: capacity = max(1, rpm / 60 * burst_seconds).
    pub burst_seconds: f64,
    /// Time spent "generating" each successful answer.
    pub latency: Latency,
    /// Completion length in words (and usage tokens), capped by the request's `max_tokens`.
    pub completion_tokens: u32,
    /// Injected failures at start; replaceable at runtime.
    pub faults: Faults,
    /// A key answered 429 more than this many times within `hammer_window_secs` is blocked
    /// for `hammer_block_secs`, as real providers throttle clients that keep hitting limits.
    /// `0` disables the rule.
    pub hammer_limit: u32,
    pub hammer_window_secs: f64,
    pub hammer_block_secs: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            default_rpm: 600,
            burst_seconds: 1.0,
            latency: Latency::default(),
            completion_tokens: 16,
            faults: Faults::default(),
            hammer_limit: 20,
            hammer_window_secs: 10.0,
            hammer_block_secs: 5.0,
        }
    }
}

impl SimConfig {
    /// Rejects values that would make the simulator misbehave rather than simulate.
    pub fn validate(&self) -> Result<(), String> {
        if !self.burst_seconds.is_finite() || self.burst_seconds < 0.0 {
            return Err("burst_seconds must be a finite number >= 0".into());
        }
        if !self.hammer_window_secs.is_finite() || self.hammer_window_secs <= 0.0 {
            return Err("hammer_window_secs must be a finite number > 0".into());
        }
        // Capped so `Instant + block` cannot overflow.
        if !self.hammer_block_secs.is_finite()
            || !(0.0..=86_400.0).contains(&self.hammer_block_secs)
        {
            return Err("hammer_block_secs must be within 0..=86400".into());
        }
        for (i, k) in self.keys.iter().enumerate() {
            if k.key.is_empty() || k.name.is_empty() {
                return Err(format!("keys[{i}]: name and key must be non-empty"));
            }
            if self.keys[..i].iter().any(|o| o.key == k.key) {
                return Err(format!("keys[{i}] ({}): duplicate key", k.name));
            }
            if self.keys[..i].iter().any(|o| o.name == k.name) {
                return Err(format!("keys[{i}]: duplicate name {:?}", k.name));
            }
        }
        self.latency.validate()?;
        self.faults.validate()
    }
}

/// One accepted API key. `name` is what stats and logs show; `key` is never printed.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SimKey {
    pub name: String,
    pub key: String,
    /// Overrides `SimConfig::default_rpm` for this key.
    #[serde(default)]
    pub rpm: Option<u32>,
}

// Hand-written so a `{:?}` of the config in a log line cannot leak a key.
impl std::fmt::Debug for SimKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimKey")
            .field("name", &self.name)
            .field("key", &"<redacted>")
            .field("rpm", &self.rpm)
            .finish()
    }
}

/// How long a successful call takes before it is answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Latency {
    Fixed { ms: u64 },
    Uniform { min_ms: u64, max_ms: u64 },
    Lognormal { median_ms: f64, sigma: f64 },
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed { ms: 0 }
    }
}

/// A lognormal tail can produce absurd values; no real provider keeps a call open this long.
const MAX_LATENCY_MS: f64 = 600_000.0;

impl Latency {
    fn validate(&self) -> Result<(), String> {
        match *self {
            Latency::Fixed { .. } => Ok(()),
            Latency::Uniform { min_ms, max_ms } if min_ms > max_ms => {
                Err("latency: min_ms must be <= max_ms".into())
            }
            Latency::Uniform { .. } => Ok(()),
            Latency::Lognormal { median_ms, sigma } => {
                if median_ms.is_finite() && median_ms >= 0.0 && sigma.is_finite() && sigma >= 0.0 {
                    Ok(())
                } else {
                    Err("latency: median_ms and sigma must be finite and >= 0".into())
                }
            }
        }
    }

    /// Draws one delay.
    pub fn sample(&self, rng: &mut impl Rng) -> Duration {
        match *self {
            Latency::Fixed { ms } => Duration::from_millis(ms),
            Latency::Uniform { min_ms, max_ms } if min_ms >= max_ms => {
                Duration::from_millis(min_ms)
            }
            Latency::Uniform { min_ms, max_ms } => {
                Duration::from_millis(rng.gen_range(min_ms..=max_ms))
            }
            Latency::Lognormal { median_ms, sigma } => {
                // Box-Muller: rand 0.8 without rand_distr has no normal distribution.
                let u1: f64 = 1.0 - rng.gen::<f64>();
                let u2: f64 = rng.gen();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                let ms = (median_ms * (sigma * z).exp()).clamp(0.0, MAX_LATENCY_MS);
                Duration::from_secs_f64(if ms.is_finite() { ms / 1000.0 } else { 0.0 })
            }
        }
    }

    pub(crate) fn is_zero(&self) -> bool {
        matches!(*self, Latency::Fixed { ms: 0 })
    }
}

/// Injected failures. `rate_limit_retry_after_secs` is checked first, before any block and the
/// rate limiter; the others after the rate limiter, in the order:
/// `always_fail`, `fail_first`, `fail_first_per_job`, `error_rate`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Probability in 0..=1 that a call returns 500.
    pub error_rate: f64,
    /// The first N calls that pass the rate limiter (since start or reset) fail with `fail_status`.
    pub fail_first: u32,
    /// The first N such calls of each job (by `x-sluice-request-id`) fail with `fail_status`.
    pub fail_first_per_job: u32,
    pub fail_status: u16,
    /// Every call fails with this status.
    pub always_fail: Option<u16>,
    /// Every call is answered 429 with exactly this `retry-after` (a provider telling us to
    /// back off). Checked before the block and the bucket: it spends no token and does not
    /// count toward hammering, so clients see exactly this value.
    pub rate_limit_retry_after_secs: Option<u64>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            error_rate: 0.0,
            fail_first: 0,
            fail_first_per_job: 0,
            fail_status: 500,
            always_fail: None,
            rate_limit_retry_after_secs: None,
        }
    }
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("faults.error_rate must be within 0..=1".into());
        }
        let error_status = |s: u16| (400..=599).contains(&s);
        if !error_status(self.fail_status) {
            return Err("faults.fail_status must be an HTTP error status (400..=599)".into());
        }
        if self.always_fail.is_some_and(|s| !error_status(s)) {
            return Err("faults.always_fail must be an HTTP error status (400..=599)".into());
        }
        // A day is already absurd; the cap keeps `Duration` and header arithmetic far from overflow.
        if self.rate_limit_retry_after_secs.is_some_and(|s| s > 86_400) {
            return Err("faults.rate_limit_retry_after_secs must be at most 86400".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_and_parsing() {
        let c: SimConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, SimConfig::default());
        assert_eq!(c.default_rpm, 600);
        assert_eq!(c.faults.fail_status, 500);

        let c: SimConfig = serde_json::from_value(serde_json::json!({
            "keys": [{"name": "a", "key": "sk-a", "rpm": 60}],
            "latency": {"kind": "uniform", "min_ms": 1, "max_ms": 5},
            "faults": {"fail_first": 2}
        }))
        .unwrap();
        assert_eq!(c.keys[0].rpm, Some(60));
        assert_eq!(
            c.latency,
            Latency::Uniform {
                min_ms: 1,
                max_ms: 5
            }
        );
        assert_eq!(c.faults.fail_first, 2);
        assert_eq!(c.faults.fail_status, 500);
        assert!(c.validate().is_ok());
        assert!(!format!("{c:?}").contains("sk-a"));

        assert!(serde_json::from_str::<SimConfig>(r#"{"bogus":1}"#).is_err());
        assert!(serde_json::from_str::<Faults>(r#"{"error_rte":1}"#).is_err());
    }

    #[test]
    fn validation_rejects_nonsense() {
        let mut f = Faults {
            error_rate: 1.5,
            ..Faults::default()
        };
        assert!(f.validate().is_err());
        f.error_rate = 0.5;
        f.always_fail = Some(200);
        assert!(f.validate().is_err());

        let key = |n: &str, k: &str| SimKey {
            name: n.into(),
            key: k.into(),
            rpm: None,
        };
        let c = SimConfig {
            keys: vec![key("a", "x"), key("b", "x")],
            ..SimConfig::default()
        };
        assert!(c.validate().is_err());

        let c = SimConfig {
            hammer_window_secs: 0.0,
            ..SimConfig::default()
        };
        assert!(c.validate().is_err());
        let c = SimConfig {
            hammer_block_secs: f64::NAN,
            ..SimConfig::default()
        };
        assert!(c.validate().is_err());
        let f = Faults {
            rate_limit_retry_after_secs: Some(1_000_000),
            ..Faults::default()
        };
        assert!(f.validate().is_err());
    }

    #[test]
    fn latency_samples_stay_in_range() {
        let mut rng = rand::thread_rng();
        let u = Latency::Uniform {
            min_ms: 10,
            max_ms: 20,
        };
        let l = Latency::Lognormal {
            median_ms: 50.0,
            sigma: 0.5,
        };
        for _ in 0..1000 {
            let d = u.sample(&mut rng).as_millis();
            assert!((10..=20).contains(&d));
            assert!(l.sample(&mut rng).as_millis() <= MAX_LATENCY_MS as u128);
        }
        assert_eq!(
            Latency::Fixed { ms: 7 }.sample(&mut rng),
            Duration::from_millis(7)
        );
    }
}
