//! Adaptive rate for one endpoint: a GCRA whose rate follows what the provider tells us.
//! AIMD on 429s, `retry-after` blocks, probes after 429s and after idle, a ramp; time is an argument.

use crate::gcra::Gcra;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Longest wait reported while the probe after idle is out: its answer comes after one call's
/// latency, often well under an emission interval, and the endpoint's budget follows at once.
const IDLE_PROBE_POLL: Duration = Duration::from_millis(10);
/// Longest hold [`AdaptiveConfig::idle_probe`] gives the probe after idle.
const MAX_IDLE_PROBE: Duration = Duration::from_secs(60);

/// How the effective rate reacts to 429s, recovery and idle periods.
///
/// Rates are fractions of the configured rate, so one config fits a 200 RPM key and a
/// 2,000 RPM key alike.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Multiplicative factor applied to the effective rate on a 429 (0.5: halve it).
    pub decrease: f64,
    /// Additive recovery once a probe has succeeded, as a fraction of the configured rate per
    /// second. 0.05 brings a single halving back to full in 10 s, and the floor in 18 s.
    pub increase_per_sec: f64,
    /// The decrease never goes below this fraction of the configured rate (clamped to >= 0.01).
    pub min_fraction: f64,
    /// After idle, the rate restarts at this fraction of the configured rate (clamped to >= 0.01)
    /// and the burst tolerance at zero, both growing linearly to full over `ramp_secs`.
    pub ramp_from: f64,
    /// Length of the ramp after idle, in seconds; 0 disables the ramp.
    pub ramp_secs: f64,
    /// No grant or outcome for longer than this, in seconds, counts as idle (0: any pause does).
    /// A new limiter is idle, so it ramps too.
    pub idle_secs: f64,
    /// After idle the first call goes out alone, as a probe, for at most this many seconds. If
    /// it succeeds in time and its response reports the provider's remaining requests, the
    /// ramp ends: the endpoint spends what remains at once (never more than reported, nor its
    /// burst) and runs at full rate. Without that report, or later, the ramp goes on. 0: no
    /// probe, the ramp alone. The wait costs one call's latency; the ramp, 1.25 s of rate and
    /// the provider's bucket.
    pub idle_probe_secs: f64,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            decrease: 0.5,
            increase_per_sec: 0.05,
            min_fraction: 0.1,
            // Half, not a quarter: a 5 s ramp from 0.5 costs 1.25 s of capacity per idle period,
            // which a burst of work into an idle pool must absorb.
            ramp_from: 0.5,
            ramp_secs: 5.0,
            idle_secs: 10.0,
            idle_probe_secs: 2.0,
        }
    }
}

impl AdaptiveConfig {
    /// Out-of-range or non-finite values replaced by their nearest sane value or the default.
    fn sanitized(self) -> AdaptiveConfig {
        let d = AdaptiveConfig::default();
        let pick = |x: f64, lo: f64, hi: f64, default: f64| {
            if x.is_finite() {
                x.clamp(lo, hi)
            } else {
                default
            }
        };
        AdaptiveConfig {
            decrease: pick(self.decrease, 0.0, 1.0, d.decrease),
            increase_per_sec: pick(self.increase_per_sec, 0.0, f64::MAX, d.increase_per_sec),
            // Positive floors keep the rate above zero, so probing can always resume.
            min_fraction: pick(self.min_fraction, 0.01, 1.0, d.min_fraction),
            ramp_from: pick(self.ramp_from, 0.01, 1.0, d.ramp_from),
            ramp_secs: pick(self.ramp_secs, 0.0, 1e9, d.ramp_secs),
            idle_secs: pick(self.idle_secs, 0.0, 1e9, d.idle_secs),
            idle_probe_secs: pick(
                self.idle_probe_secs,
                0.0,
                MAX_IDLE_PROBE.as_secs_f64(),
                d.idle_probe_secs,
            ),
        }
    }

    /// How long the probe after idle may hold an endpoint (zero: no probe), out-of-range values
    /// sanitized as the limiter does; a limiter shared between workers holds for as long.
    pub fn idle_probe(&self) -> Duration {
        Duration::from_secs_f64(self.sanitized().idle_probe_secs)
    }
}

/// Probing after a 429: one request at a time until one succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Off,
    /// Probing, and the next grant is the probe.
    Ready,
    /// Probing, and the probe is out: nothing more until its outcome.
    InFlight,
}

/// The probe after idle: the first call after idle goes out alone, and its report of the
/// provider's remaining budget replaces the ramp.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IdleProbe {
    Off,
    /// Idle, and the next grant is the probe.
    Ready,
    /// The probe is out: nothing more until its outcome or `until`, when the ramp takes over.
    Out {
        until: Duration,
    },
}

/// The adaptive request rate of one endpoint.
///
/// The effective rate is the least of the AIMD rate (cut on 429s, raised back over time after a
/// probe succeeds) and the ramp after idle; it never exceeds the configured rate and the burst
/// never exceeds the configured burst, so grants stay within `rpm * W + burst + 1` in any window.
/// Rate changes rescale the GCRA in place ([`Gcra::set_rate`]) so they never create a burst.
///
/// After idle the first call is a probe that goes out alone ([`AdaptiveConfig::idle_probe_secs`]).
/// When its success reports the provider's remaining requests
/// ([`AdaptiveRate::on_success_reporting`]), the provider has said what its bucket holds: the
/// ramp ends, the GCRA returns to full rate and burst, and its bucket is capped to what the
/// provider reported. So the endpoint spends the provider's bucket at once, never more than it
/// reports, and the window bound above still holds.
#[derive(Debug, Clone)]
pub struct AdaptiveRate {
    configured: f64,
    burst: u32,
    config: AdaptiveConfig,
    gcra: Gcra,
    /// Rate and burst last given to `gcra`.
    applied: (f64, u32),
    /// AIMD rate (requests/min) at `since`; held there while probing, then raised additively.
    base: f64,
    since: Duration,
    probe: Probe,
    /// No grant before this (`retry-after`, or `remaining: 0` until its reset).
    blocked_until: Duration,
    /// Latest grant or outcome, for idle detection; a grant counts at the time it may be used.
    last_activity: Option<Duration>,
    ramp_start: Option<Duration>,
    idle_probe: IdleProbe,
}

impl AdaptiveRate {
    /// `configured_rpm` requests per minute with `burst` extra back to back (at full rate).
    /// A configured rate of 0 never grants.
    pub fn new(configured_rpm: u32, burst: u32, config: AdaptiveConfig) -> AdaptiveRate {
        let configured = f64::from(configured_rpm);
        AdaptiveRate {
            configured,
            burst,
            config: config.sanitized(),
            gcra: Gcra::per_minute(configured_rpm, burst),
            applied: (configured, burst),
            base: configured,
            since: Duration::ZERO,
            probe: Probe::Off,
            blocked_until: Duration::ZERO,
            last_activity: None,
            ramp_start: None,
            idle_probe: IdleProbe::Off,
        }
    }

    /// Take one permit now, or learn how long until one may be available. While a probe is out
    /// the answer is a re-poll interval (one emission interval, at most 10 ms for the probe
    /// after idle): the real wait is its outcome.
    pub fn try_acquire(&mut self, now: Duration) -> Result<(), Duration> {
        self.sync(now);
        if self.probe == Probe::InFlight {
            return Err(self.poll_interval());
        }
        if let IdleProbe::Out { until } = self.idle_probe {
            return Err(self
                .poll_interval()
                .min(IDLE_PROBE_POLL)
                .min(until.saturating_sub(now)));
        }
        if now < self.blocked_until {
            let rest = self.blocked_until - now;
            return Err(rest.saturating_add(self.gcra.wait_time(self.blocked_until, 1)));
        }
        self.gcra.try_acquire(now, 1)?;
        self.granted(now);
        Ok(())
    }

    /// How long until [`AdaptiveRate::try_acquire`] would grant, without taking anything.
    pub fn wait_time(&self, now: Duration) -> Duration {
        let mut trial = self.clone();
        match trial.try_acquire(now) {
            Ok(()) => Duration::ZERO,
            Err(wait) => wait,
        }
    }

    /// Reserve one permit and return how long to wait before using it (FIFO with other
    /// reservations). `Duration::MAX` means nothing was reserved, as for [`Gcra::reserve`] at a
    /// zero rate: a probe is out (ask again after its outcome) or the configured rate is 0.
    pub fn reserve(&mut self, now: Duration) -> Duration {
        self.sync(now);
        if self.probe == Probe::InFlight || matches!(self.idle_probe, IdleProbe::Out { .. }) {
            return Duration::MAX;
        }
        let start = now.max(self.blocked_until);
        if start > now {
            // Waiting out a block: no burst at its end; the bucket counts as full there.
            self.gcra.cap_available(start, 1);
        }
        let wait = self.gcra.reserve(start, 1);
        if wait == Duration::MAX {
            return wait;
        }
        let at = start.saturating_add(wait);
        self.granted(at);
        at - now
    }

    /// A call succeeded. If it was the probe, probing ends and the rate starts climbing back
    /// additively from where the last cut left it. A success while probing with no probe out
    /// is a straggler sent before the 429 and proves nothing about now. Without a report of
    /// the provider's budget, the probe after idle leaves the ramp in place.
    pub fn on_success(&mut self, now: Duration) {
        self.on_success_reporting(now, None, None);
    }

    /// A call succeeded and its response reported the provider's budget: `remaining` requests
    /// now, the bucket full again after `reset` (see [`AdaptiveRate::observe_headers`]).
    ///
    /// If it was the probe after idle, answered within its hold, and `remaining` is known, the
    /// ramp ends: nothing else of ours was in flight, so `remaining` is what the provider holds
    /// for us, and the GCRA (back at full rate and burst) spends up to that at once.
    pub fn on_success_reporting(
        &mut self,
        now: Duration,
        remaining: Option<u64>,
        reset: Option<Duration>,
    ) {
        self.touch(now);
        if self.probe == Probe::InFlight {
            self.probe = Probe::Off;
            self.since = now;
        }
        if let IdleProbe::Out { until } = self.idle_probe {
            self.idle_probe = IdleProbe::Off;
            if now < until && remaining.is_some() {
                self.ramp_start = None;
                self.sync(now);
            }
        }
        self.observe_headers(now, remaining, reset);
    }

    /// The provider answered 429. Honour `retry_after`, cut the rate multiplicatively (not below
    /// the floor) and probe. A 429 while probing with no probe out is a straggler sent before
    /// the first one: it extends the block but does not cut again, so one overload event costs
    /// one cut however many requests were in flight.
    pub fn on_rate_limited(&mut self, now: Duration, retry_after: Option<Duration>) {
        // The probe after idle has its answer; the ramp goes on under the cut.
        self.idle_probe = IdleProbe::Off;
        if let Some(d) = retry_after {
            self.blocked_until = self.blocked_until.max(now.saturating_add(d));
        }
        if self.probe != Probe::Ready {
            let floor = self.configured * self.config.min_fraction;
            self.base = (self.effective_rpm(now) * self.config.decrease).max(floor);
            self.since = now;
            self.probe = Probe::Ready;
        }
        self.touch(now);
    }

    /// A call failed for another reason (5xx, timeout: the breaker's business) or a granted
    /// permit went unused. A probe that told us nothing frees the probe slot.
    pub fn on_other_failure(&mut self, now: Duration) {
        self.touch(now);
        if self.probe == Probe::InFlight {
            self.probe = Probe::Ready;
        }
        if let IdleProbe::Out { until } = self.idle_probe {
            self.idle_probe = if now < until {
                IdleProbe::Ready
            } else {
                IdleProbe::Off
            };
        }
    }

    /// Correct the model with the provider's rate-limit headers (`x-ratelimit-remaining-*`,
    /// `x-ratelimit-reset-*`, already parsed; `reset` is the time from `now`).
    ///
    /// Kept simple and one-sided: never more requests back to back than the provider says
    /// remain (our bucket is capped to `remaining`, the rate is unchanged, so a provider whose
    /// counter refills continuously does not slow us in steady state), and with 0 remaining,
    /// nothing until `reset`.
    pub fn observe_headers(
        &mut self,
        now: Duration,
        remaining: Option<u64>,
        reset: Option<Duration>,
    ) {
        let Some(remaining) = remaining else {
            return;
        };
        self.sync(now);
        self.gcra
            .cap_available(now, u32::try_from(remaining).unwrap_or(u32::MAX));
        if remaining == 0 {
            if let Some(reset) = reset {
                self.blocked_until = self.blocked_until.max(now.saturating_add(reset));
            }
        }
    }

    /// The effective rate in requests per minute that the next grant at `now` would use.
    pub fn effective_rpm(&self, now: Duration) -> f64 {
        let aimd = if self.probe == Probe::Off {
            let secs = now.saturating_sub(self.since).as_secs_f64();
            self.base + self.config.increase_per_sec * self.configured * secs
        } else {
            self.base
        };
        let from = self.config.ramp_from;
        let ramp = from + (1.0 - from) * self.ramp_progress(now);
        aimd.min(self.configured * ramp)
    }

    /// Probing after a 429 until a probe succeeds.
    pub fn is_probing(&self) -> bool {
        self.probe != Probe::Off
    }

    /// The probe after idle is out: nothing else is granted until its outcome or its hold ends.
    pub fn is_probing_after_idle(&self) -> bool {
        matches!(self.idle_probe, IdleProbe::Out { .. })
    }

    /// No grant before this instant (zero when never blocked).
    pub fn blocked_until(&self) -> Duration {
        self.blocked_until
    }

    /// Progress of the ramp after idle at `now`, 0 to 1 (1: no ramp).
    fn ramp_progress(&self, now: Duration) -> f64 {
        let start = if self.is_idle(now) {
            now
        } else {
            match self.ramp_start {
                Some(s) => s,
                None => return 1.0,
            }
        };
        if self.config.ramp_secs <= 0.0 {
            return 1.0;
        }
        (now.saturating_sub(start).as_secs_f64() / self.config.ramp_secs).min(1.0)
    }

    fn is_idle(&self, now: Duration) -> bool {
        self.last_activity
            .is_none_or(|t| now.saturating_sub(t).as_secs_f64() > self.config.idle_secs)
    }

    /// Bring the GCRA to the rate and burst of `now`, starting a ramp if we were idle.
    fn sync(&mut self, now: Duration) {
        if self.is_idle(now) {
            self.ramp_start = Some(now);
            // The ramp has begun; polls that fail during it must not restart it.
            self.touch(now);
            // Probing after a 429 already sends one call at a time, and answers with a cut.
            if self.idle_probe == IdleProbe::Off
                && self.probe == Probe::Off
                && self.config.idle_probe_secs > 0.0
            {
                self.idle_probe = IdleProbe::Ready;
            }
        }
        if let IdleProbe::Out { until } = self.idle_probe {
            if now >= until {
                // Too slow to speak for the provider's bucket now: the ramp takes over.
                self.idle_probe = IdleProbe::Off;
            }
        }
        let progress = self.ramp_progress(now);
        if progress >= 1.0 {
            self.ramp_start = None;
        }
        // Floor: the burst returns one cell at a time over the ramp, never exceeding `burst`.
        let target = (
            self.effective_rpm(now),
            (f64::from(self.burst) * progress) as u32,
        );
        if target != self.applied {
            self.gcra.set_rate(now, target.0, target.1);
            self.applied = target;
        }
    }

    fn granted(&mut self, at: Duration) {
        self.touch(at);
        if self.probe == Probe::Ready {
            self.probe = Probe::InFlight;
        }
        if self.idle_probe == IdleProbe::Ready {
            let hold = Duration::from_secs_f64(self.config.idle_probe_secs);
            self.idle_probe = IdleProbe::Out {
                until: at.saturating_add(hold),
            };
        }
    }

    fn touch(&mut self, at: Duration) {
        self.last_activity = Some(self.last_activity.map_or(at, |t| t.max(at)));
    }

    fn poll_interval(&self) -> Duration {
        self.gcra.emission_interval().unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    /// 600/min (100 ms), burst 10 (one second of rate), default config, past its start-up ramp.
    fn warm() -> (AdaptiveRate, Duration) {
        let mut r = AdaptiveRate::new(600, 10, AdaptiveConfig::default());
        let mut now = Duration::ZERO;
        while now < 6 * SEC {
            if r.try_acquire(now).is_ok() {
                r.on_success(now);
            }
            now += 10 * MS;
        }
        assert_eq!(r.effective_rpm(now), 600.0);
        (r, now)
    }

    /// Drives `r` with an attempt every `step`, each grant succeeding at once; returns grant times.
    fn drive(r: &mut AdaptiveRate, from: Duration, to: Duration, step: Duration) -> Vec<Duration> {
        let mut grants = Vec::new();
        let mut now = from;
        while now < to {
            while r.try_acquire(now).is_ok() {
                grants.push(now);
                r.on_success(now);
            }
            now += step;
        }
        grants
    }

    #[test]
    fn retry_after_blocks_then_one_probe_until_its_outcome() {
        let (mut r, t) = warm();
        r.on_rate_limited(t, Some(5 * SEC));
        assert!(r.is_probing());
        assert!(r.try_acquire(t).is_err_and(|w| w >= 5 * SEC));
        let mut now = t;
        while now < t + 5 * SEC {
            assert!(
                r.try_acquire(now).is_err(),
                "granted while blocked at {now:?}"
            );
            now += 10 * MS;
        }
        assert_eq!(r.try_acquire(t + 5 * SEC), Ok(()));
        // The probe is out: nothing else, by either method, however long it takes.
        for s in 0..60 {
            assert!(r.try_acquire(t + 5 * SEC + s * SEC).is_err());
        }
        assert_eq!(r.reserve(t + 6 * SEC), Duration::MAX);
        // A probe that told nothing frees the slot for exactly one more probe.
        r.on_other_failure(t + 70 * SEC);
        assert_eq!(r.try_acquire(t + 70 * SEC), Ok(()));
        assert!(r.try_acquire(t + 70 * SEC).is_err());
        r.on_success(t + 71 * SEC);
        assert!(!r.is_probing());
        assert_eq!(r.try_acquire(t + 71 * SEC), Ok(()));
        assert_eq!(r.try_acquire(t + 71 * SEC), Ok(()));
    }

    #[test]
    fn rate_climbs_back_within_the_documented_time() {
        let (mut r, t) = warm();
        r.on_rate_limited(t, None);
        assert_eq!(r.effective_rpm(t), 300.0);
        // Stragglers from before the 429 do not cut again, nor does their success end probing.
        r.on_rate_limited(t, None);
        r.on_success(t);
        assert_eq!(r.effective_rpm(t), 300.0);
        assert!(r.is_probing());
        // The bucket was full at 600/min and stays full at 300/min: the probe waits for room.
        assert!(r.try_acquire(t).is_err());
        assert_eq!(r.try_acquire(t + SEC), Ok(()));
        r.on_success(t + SEC);
        let back = t + SEC + 10 * SEC; // (1 - 0.5) / 0.05 per second = 10 s
        let grants = drive(&mut r, t + SEC, back + 10 * SEC, 5 * MS);
        assert!(r.effective_rpm(back - SEC) < 600.0);
        assert_eq!(r.effective_rpm(back), 600.0);
        // Half way, the rate is half way back, and grants follow it.
        assert!((r.effective_rpm(t + 6 * SEC) - 450.0).abs() < 1e-9);
        let late = grants.iter().filter(|g| **g >= back + SEC).count();
        assert!(
            (88..=101).contains(&late),
            "{late} grants in 9 s at 600/min"
        );
    }

    #[test]
    fn decrease_never_goes_below_the_floor() {
        let (mut r, mut now) = warm();
        for _ in 0..20 {
            r.on_rate_limited(now, None);
            assert!(r.effective_rpm(now) >= 60.0);
            assert_eq!(r.try_acquire(now + 10 * SEC), Ok(())); // the probe...
            now += 10 * SEC; // ...which then gets a 429 too
        }
        assert_eq!(r.effective_rpm(now), 60.0);
    }

    #[test]
    fn long_idle_ramps_instead_of_bursting() {
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.effective_rpm(start), 300.0);
        let mut plain = Gcra::per_minute(600, 10);
        let mut plain_grants = 0;
        let mut now = start;
        while now < start + SEC {
            while plain.try_acquire(now, 1).is_ok() {
                plain_grants += 1;
            }
            now += MS;
        }
        let first = drive(&mut r, start, start + SEC, MS);
        assert_eq!(first.iter().filter(|g| **g == start).count(), 1, "no burst");
        assert!(plain_grants >= 20);
        assert!(
            first.len() * 2 <= plain_grants,
            "{} vs {plain_grants}",
            first.len()
        );
        // Full rate and burst after ramp_secs.
        let ramp_end = start + 5 * SEC;
        let _ = drive(&mut r, start + SEC, ramp_end, MS);
        assert_eq!(r.effective_rpm(ramp_end), 600.0);
        let steady = drive(&mut r, ramp_end, ramp_end + 10 * SEC, MS);
        assert!((99..=111).contains(&steady.len()), "{}", steady.len());
    }

    #[test]
    fn headers_cap_the_burst_and_block_on_zero_remaining() {
        let (mut r, t) = warm();
        let now = t + 2 * SEC; // bucket refilled: 11 would conform
        r.observe_headers(now, Some(2), Some(SEC));
        assert!(r.try_acquire(now).is_ok() && r.try_acquire(now).is_ok());
        assert!(r.try_acquire(now).is_err());
        let later = now + 5 * SEC;
        r.observe_headers(later, Some(0), Some(2 * SEC));
        assert!(r.try_acquire(later + 1999 * MS).is_err());
        assert_eq!(r.try_acquire(later + 2 * SEC), Ok(()));
        assert!(!r.is_probing());
    }

    /// Grants at `now` until refused.
    fn take_all(r: &mut AdaptiveRate, now: Duration) -> usize {
        let mut n = 0;
        while r.try_acquire(now).is_ok() {
            n += 1;
            assert!(n < 1000, "runaway");
        }
        n
    }

    #[test]
    fn after_idle_one_probe_then_the_reported_budget_at_once() {
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.try_acquire(start), Ok(()), "the probe");
        assert!(r.is_probing_after_idle());
        // Alone until its outcome, polled every 10 ms at most, by either method.
        for ms in [0, 5, 50, 1999] {
            let at = start + ms * MS;
            assert!(r.try_acquire(at).is_err_and(|w| w <= 10 * MS), "{ms} ms");
        }
        assert_eq!(r.reserve(start + 20 * MS), Duration::MAX);
        // 60 ms later the provider says 9 of its 10 remain: all 9 go at once, not one more.
        let answer = start + 60 * MS;
        r.on_success_reporting(answer, Some(9), Some(100 * MS));
        assert!(!r.is_probing_after_idle());
        assert_eq!(r.effective_rpm(answer), 600.0, "no ramp");
        assert_eq!(take_all(&mut r, answer), 9);
        // Then the full rate: 10 a second.
        let after = drive(&mut r, answer + MS, answer + 10 * SEC + MS, MS);
        assert!((99..=101).contains(&after.len()), "{}", after.len());
    }

    #[test]
    fn a_probe_report_never_grants_more_than_it_reports_nor_the_burst() {
        for (reported, expected) in [(0, 0), (1, 1), (3, 3), (10, 10), (1_000, 11)] {
            let (mut r, t) = warm();
            let start = t + 3600 * SEC;
            assert_eq!(r.try_acquire(start), Ok(()));
            // Long enough after the probe for the whole burst to have come back.
            let answer = start + 2 * SEC - MS;
            r.on_success_reporting(answer, Some(reported), Some(SEC));
            assert_eq!(take_all(&mut r, answer), expected, "{reported} reported");
        }
    }

    #[test]
    fn a_probe_without_a_report_or_answered_too_late_leaves_the_ramp() {
        // No budget in the response (Gemini sends none): the ramp goes on from half rate.
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.try_acquire(start), Ok(()));
        r.on_success_reporting(start + 50 * MS, None, None);
        assert!(!r.is_probing_after_idle());
        // Half rate plus 50 ms of the 5 s ramp.
        assert!((r.effective_rpm(start + 50 * MS) - 303.0).abs() < 1e-9);
        assert_eq!(take_all(&mut r, start + 50 * MS), 0, "no burst");

        // The hold (2 s) ran out: grants resume on the ramp, and the late answer changes nothing.
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.try_acquire(start), Ok(()));
        assert!(r.try_acquire(start + 1999 * MS).is_err());
        assert_eq!(r.try_acquire(start + 2 * SEC), Ok(()));
        assert!(!r.is_probing_after_idle());
        r.on_success_reporting(start + 3 * SEC, Some(100), None);
        assert!(r.effective_rpm(start + 3 * SEC) < 600.0, "still ramping");
    }

    #[test]
    fn a_failed_probe_frees_the_slot_and_a_429_on_it_still_halves() {
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.try_acquire(start), Ok(()));
        r.on_other_failure(start + 10 * MS);
        assert!(!r.is_probing_after_idle());
        // The next call is the probe again, alone.
        assert_eq!(r.try_acquire(start + SEC), Ok(()));
        assert!(r.is_probing_after_idle());
        let before = r.effective_rpm(start + SEC);
        r.on_rate_limited(start + SEC, None);
        assert!(r.is_probing() && !r.is_probing_after_idle());
        assert!((r.effective_rpm(start + SEC) - before * 0.5).abs() < 1e-9);

        // After a report has ended the ramp, a 429 halves the full rate.
        let (mut r, t) = warm();
        let start = t + 3600 * SEC;
        assert_eq!(r.try_acquire(start), Ok(()));
        r.on_success_reporting(start + 50 * MS, Some(5), None);
        r.on_rate_limited(start + 60 * MS, Some(SEC));
        assert_eq!(r.effective_rpm(start + 60 * MS), 300.0);
        assert!(r.try_acquire(start + 999 * MS).is_err());
    }

    #[test]
    fn no_probe_when_switched_off() {
        let config = AdaptiveConfig {
            idle_probe_secs: 0.0,
            ..AdaptiveConfig::default()
        };
        assert_eq!(config.idle_probe(), Duration::ZERO);
        assert_eq!(AdaptiveConfig::default().idle_probe(), 2 * SEC);
        let mut r = AdaptiveRate::new(600, 10, config);
        assert_eq!(r.try_acquire(Duration::ZERO), Ok(()));
        assert!(!r.is_probing_after_idle());
        assert!(
            r.try_acquire(10 * MS).is_err_and(|w| w > 10 * MS),
            "paced by the ramp"
        );
        assert_eq!(r.try_acquire(200 * MS), Ok(()), "not held");
    }

    #[test]
    fn zero_rate_never_grants() {
        let mut r = AdaptiveRate::new(0, 5, AdaptiveConfig::default());
        assert_eq!(r.try_acquire(Duration::ZERO), Err(Duration::MAX));
        assert_eq!(r.reserve(SEC), Duration::MAX);
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_unknown_fields() {
        let c: AdaptiveConfig = serde_json::from_str(r#"{"decrease": 0.7}"#).expect("parses");
        assert_eq!(c.decrease, 0.7);
        assert_eq!(c.ramp_secs, AdaptiveConfig::default().ramp_secs);
        assert!(serde_json::from_str::<AdaptiveConfig>(r#"{"ramp": 1}"#).is_err());
    }

    #[derive(Debug, Clone)]
    enum Event {
        TryAcquire(u32),
        Reserve,
        Success,
        RateLimited(Option<u64>),
        OtherFailure,
        Headers(u64, u64),
        /// A success whose response reports the provider's remaining requests.
        Report(u64),
        Advance(u64),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            6 => (1u32..4).prop_map(Event::TryAcquire),
            1 => Just(Event::Reserve),
            4 => Just(Event::Success),
            1 => prop::option::of(0u64..8000).prop_map(Event::RateLimited),
            1 => Just(Event::OtherFailure),
            1 => (0u64..5, 0u64..3000).prop_map(|(n, ms)| Event::Headers(n, ms)),
            2 => (0u64..12).prop_map(Event::Report),
            5 => (0u64..3000).prop_map(Event::Advance),
        ]
    }

    /// What the model remembers besides the limiter: the block, the probes, the last report.
    #[derive(Default)]
    struct Model {
        blocked: Duration,
        probing: bool,
        probe_out: bool,
        /// When the probe after idle went out, while it is out.
        idle_probe_at: Option<Duration>,
        /// The last report (time, remaining) and the grants at that same instant since.
        report: Option<(Duration, u64, u64)>,
    }

    impl Model {
        /// A grant must not come before the block, nor be a second probe while one is out,
        /// nor come while the probe after idle is out and within its `hold`, nor exceed at the
        /// instant of a report what that report said remains. `r` is the limiter after it.
        fn check_grant(
            &mut self,
            at: Duration,
            r: &AdaptiveRate,
            hold: Duration,
        ) -> Result<(), TestCaseError> {
            prop_assert!(
                at >= self.blocked,
                "grant at {:?} before {:?}",
                at,
                self.blocked
            );
            if self.probing {
                prop_assert!(!self.probe_out, "second probe while one is out");
                self.probe_out = true;
            }
            if let Some(p) = self.idle_probe_at {
                prop_assert!(
                    at >= p + hold,
                    "grant at {:?} while the probe of {:?} is out",
                    at,
                    p
                );
            }
            self.idle_probe_at = r.is_probing_after_idle().then_some(at);
            if let Some((t, remaining, granted)) = self.report.as_mut() {
                if *t == at {
                    *granted += 1;
                    prop_assert!(
                        *granted <= *remaining,
                        "{} granted, {} reported",
                        granted,
                        remaining
                    );
                }
            }
            Ok(())
        }
    }

    proptest! {
        #[test]
        fn never_above_configured_rate_block_or_one_probe(
            rpm in 1u32..6000,
            burst in 0u32..6,
            ramp_from in 0.01f64..=1.0,
            increase_per_sec in 0.0f64..2.0,
            idle_secs in 0.0f64..20.0,
            idle_probe_secs in prop_oneof![Just(0.0f64), 0.0f64..3.0],
            events in prop::collection::vec(event(), 1..300),
        ) {
            let config = AdaptiveConfig {
                ramp_from, increase_per_sec, idle_secs, idle_probe_secs, ..AdaptiveConfig::default()
            };
            let hold = config.idle_probe();
            let mut r = AdaptiveRate::new(rpm, burst, config);
            let mut now = Duration::ZERO;
            let mut grants = Vec::new();
            let mut m = Model::default();
            for e in events {
                match e {
                    Event::TryAcquire(n) => {
                        for _ in 0..n {
                            if r.try_acquire(now).is_ok() {
                                m.check_grant(now, &r, hold)?;
                                grants.push(now);
                            }
                        }
                    }
                    Event::Reserve => {
                        let wait = r.reserve(now);
                        if wait != Duration::MAX {
                            m.check_grant(now + wait, &r, hold)?;
                            grants.push(now + wait);
                        }
                    }
                    Event::Success | Event::Report(_) => {
                        match e {
                            Event::Report(remaining) => {
                                r.on_success_reporting(now, Some(remaining), Some(SEC));
                                m.report = Some((now, remaining, 0));
                                if remaining == 0 {
                                    m.blocked = m.blocked.max(now + SEC);
                                }
                            }
                            _ => r.on_success(now),
                        }
                        if m.probe_out {
                            m.probing = false;
                            m.probe_out = false;
                        }
                        m.idle_probe_at = None;
                    }
                    Event::RateLimited(ms) => {
                        let retry_after = ms.map(Duration::from_millis);
                        r.on_rate_limited(now, retry_after);
                        m.blocked = m.blocked.max(now + retry_after.unwrap_or_default());
                        m.probing = true;
                        m.probe_out = false;
                        m.idle_probe_at = None;
                    }
                    Event::OtherFailure => {
                        r.on_other_failure(now);
                        m.probe_out = false;
                        m.idle_probe_at = None;
                    }
                    Event::Headers(remaining, reset_ms) => {
                        let reset = Duration::from_millis(reset_ms);
                        r.observe_headers(now, Some(remaining), Some(reset));
                        if remaining == 0 {
                            m.blocked = m.blocked.max(now + reset);
                        }
                    }
                    Event::Advance(ms) => now += Duration::from_millis(ms),
                }
                let rate = r.effective_rpm(now);
                prop_assert!(rate <= f64::from(rpm) && rate >= 0.01 * f64::from(rpm) * 0.999);
            }
            grants.sort();
            for i in 0..grants.len() {
                for j in i..grants.len() {
                    let w = (grants[j] - grants[i]).as_nanos();
                    let excess = ((j - i + 1) as u128).saturating_sub(u128::from(burst) + 1);
                    prop_assert!(
                        excess * 60_000_000_000 <= w * u128::from(rpm),
                        "{} grants in {} ns at {}/min burst {}", j - i + 1, w, rpm, burst
                    );
                }
            }
        }
    }
}
