//! GCRA (generic cell rate algorithm): the limiter that spaces an endpoint's requests or tokens evenly.
//! Pure state with time passed in, so the same arithmetic can run locally, in tests, or mirrored in Redis.

use std::time::Duration;

/// One minute in nanoseconds.
const MINUTE_NANOS: u64 = 60_000_000_000;

/// A GCRA limiter: `rate` cells per period, of which up to `burst` extra may go back to back.
///
/// State is a single instant, the theoretical arrival time (`tat`) of the next
/// cell; a cell conforms when it would not push `tat` more than the burst
/// tolerance past `now`. Idle time only brings `tat` up to `now`, so a long idle
/// period never banks more than `burst` extra cells. (A second instant, the latest grant, is
/// kept only so that `set_rate` can tell promised grants from the bucket's fill.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gcra {
    /// Emission interval T = period / rate; `None` for a zero rate, which never conforms.
    interval: Option<Duration>,
    /// Burst tolerance tau = burst * T.
    tau: Duration,
    /// Theoretical arrival time of the next cell, as an offset from the caller's origin.
    tat: Duration,
    /// The latest instant granted (a reservation may lie in the future); only rate changes use it.
    last: Duration,
}

impl Gcra {
    /// `per_minute` cells per minute, with a burst tolerance of `burst` extra cells that may go
    /// back to back. `burst` 0 means perfectly spaced cells.
    ///
    /// `per_minute` 0 gives a limiter that never grants: `try_acquire` always fails and
    /// `reserve`/`wait_time` answer `Duration::MAX` without recording anything.
    pub fn per_minute(per_minute: u32, burst: u32) -> Gcra {
        // Rounding up can only make us slower than the configured rate, never faster.
        let interval = (per_minute > 0)
            .then(|| Duration::from_nanos(MINUTE_NANOS.div_ceil(u64::from(per_minute))));
        Gcra {
            interval,
            tau: interval.unwrap_or_default().saturating_mul(burst),
            tat: Duration::ZERO,
            last: Duration::ZERO,
        }
    }

    /// Like [`Gcra::per_minute`] for a fractional rate (an adaptive limiter's current rate).
    /// A rate that is not finite and positive never grants.
    pub fn per_minute_f64(per_minute: f64, burst: u32) -> Gcra {
        let interval = interval_for(per_minute);
        Gcra {
            interval,
            tau: interval.unwrap_or_default().saturating_mul(burst),
            tat: Duration::ZERO,
            last: Duration::ZERO,
        }
    }

    /// Change rate and burst in place, keeping the state, so that a change never creates a
    /// burst. Grants already promised by `reserve` keep their times; the bucket beyond the last
    /// promise (at most `burst + 1` cells) keeps its size in cells: a full bucket stays full, so
    /// a cut after a 429 cannot release the slower rate's longer tolerance as a burst, and a
    /// faster rate does not count past drain as if it had been fast. The last promise is
    /// invariant, so oscillating rates never inflate the state.
    pub fn set_rate(&mut self, now: Duration, per_minute: f64, burst: u32) {
        let new = interval_for(per_minute);
        if let (Some(old), Some(t)) = (self.interval, new) {
            // Not inferred from `tat`: an over-full bucket (the burst just shrank) would look
            // like promises and lose its cells.
            let from = now.max(self.last);
            let bucket = self.tat.saturating_sub(from);
            if !bucket.is_zero() {
                // Rounded up: the rescaled bucket may only be fuller.
                let nanos = (bucket.as_nanos() * t.as_nanos()).div_ceil(old.as_nanos());
                let bucket = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
                self.tat = from.saturating_add(bucket);
            }
        }
        self.interval = new;
        self.tau = new.unwrap_or_default().saturating_mul(burst);
    }

    /// The other side (a provider's `remaining` header) says only `cells` remain: make sure at
    /// most that many conform at `now`. Only ever delays; never adds capacity.
    pub fn cap_available(&mut self, now: Duration, cells: u32) {
        if let Some(t) = self.interval {
            // `k` cells conform at `now` iff tat + k*t <= now + tau + t.
            let room = self
                .tau
                .saturating_add(t)
                .saturating_sub(t.saturating_mul(cells));
            self.tat = self.tat.max(now.saturating_add(room));
        }
    }

    /// The emission interval (time per cell), or `None` for a zero rate.
    pub fn emission_interval(&self) -> Option<Duration> {
        self.interval
    }

    /// Conforming now? If yes, record the cells and return `Ok(())`; otherwise `Err(wait)`, how
    /// long until they would conform. Nothing is recorded on `Err`.
    pub fn try_acquire(&mut self, now: Duration, cells: u32) -> Result<(), Duration> {
        let wait = self.wait_time(now, cells);
        if !wait.is_zero() {
            return Err(wait);
        }
        self.record(now, cells);
        self.last = self.last.max(now);
        Ok(())
    }

    /// Reserve cells even if they do not conform now, and return how long the caller must wait
    /// before using them. Reservations are FIFO: each one is granted no earlier than the previous.
    pub fn reserve(&mut self, now: Duration, cells: u32) -> Duration {
        let wait = self.wait_time(now, cells);
        self.record(now, cells);
        if self.interval.is_some() {
            self.last = self.last.max(now.saturating_add(wait));
        }
        wait
    }

    /// How long until `cells` would conform, without recording anything.
    ///
    /// A request larger than the whole burst capacity (`burst + 1` cells) could never conform;
    /// it is let through once the limiter is idle instead, and later cells pay for it.
    pub fn wait_time(&self, now: Duration, cells: u32) -> Duration {
        let Some(t) = self.interval else {
            return Duration::MAX;
        };
        let cost = t.saturating_mul(cells);
        let new_tat = self.tat.max(now).saturating_add(cost);
        let tolerance = self.tau.saturating_add(t).max(cost);
        new_tat.saturating_sub(tolerance).saturating_sub(now)
    }

    /// Give back cells reserved but not used (e.g. a token estimate corrected downwards).
    /// `tat` never moves below `now`, so a refund cannot create capacity out of idle time.
    pub fn refund(&mut self, now: Duration, cells: u32) {
        if let Some(t) = self.interval {
            self.tat = self.tat.saturating_sub(t.saturating_mul(cells)).max(now);
        }
    }

    fn record(&mut self, now: Duration, cells: u32) {
        if let Some(t) = self.interval {
            self.tat = self.tat.max(now).saturating_add(t.saturating_mul(cells));
        }
    }
}

/// Time per cell at `per_minute` cells per minute, rounded up (never faster than asked).
fn interval_for(per_minute: f64) -> Option<Duration> {
    (per_minute.is_finite() && per_minute > 0.0).then(|| {
        // `as` saturates; at least 1 ns so an absurd rate still spaces cells.
        let nanos = (MINUTE_NANOS as f64 / per_minute).ceil() as u64;
        Duration::from_nanos(nanos.max(1))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    /// Checks that in every window between two grants there are at most `rate * W + burst + 1`.
    fn assert_window_bound(grants: &[Duration], per_minute: u32, burst: u32) {
        for i in 0..grants.len() {
            for j in i..grants.len() {
                let w = grants[j].saturating_sub(grants[i]).as_nanos();
                let count = (j - i + 1) as u128;
                let excess = count.saturating_sub(u128::from(burst) + 1);
                // excess <= rate * W, with rate = per_minute / minute, in integers.
                assert!(
                    excess * u128::from(MINUTE_NANOS) <= w * u128::from(per_minute),
                    "{count} grants in {w} ns at {per_minute}/min burst {burst}"
                );
            }
        }
    }

    #[test]
    fn burst_then_spacing() {
        let mut g = Gcra::per_minute(60, 2);
        let now = Duration::from_secs(100);
        for _ in 0..3 {
            assert_eq!(g.try_acquire(now, 1), Ok(()));
        }
        assert_eq!(g.try_acquire(now, 1), Err(Duration::from_secs(1)));
        assert_eq!(g.try_acquire(now + Duration::from_secs(1), 1), Ok(()));
    }

    #[test]
    fn zero_rate_never_grants() {
        let mut g = Gcra::per_minute(0, 5);
        assert_eq!(g.try_acquire(Duration::ZERO, 1), Err(Duration::MAX));
        assert_eq!(g.reserve(Duration::from_secs(9), 1), Duration::MAX);
        assert_eq!(g.wait_time(Duration::from_secs(3600), 1), Duration::MAX);
    }

    #[test]
    fn refund_restores_capacity() {
        let mut g = Gcra::per_minute(60, 0);
        let now = Duration::from_secs(5);
        assert!(g.try_acquire(now, 1).is_ok());
        assert!(g.try_acquire(now, 1).is_err());
        g.refund(now, 1);
        assert_eq!(g.try_acquire(now, 1), Ok(()));
        // Refunding more than was taken cannot bank capacity beyond the burst.
        g.refund(now, 100);
        assert!(g.try_acquire(now, 1).is_ok());
        assert!(g.try_acquire(now, 1).is_err());
    }

    #[test]
    fn oversized_request_passes_when_idle_and_is_paid_for() {
        let mut g = Gcra::per_minute(600, 1); // T = 100 ms, capacity 2 cells
        let now = Duration::from_secs(1);
        assert_eq!(g.try_acquire(now, 5), Ok(()));
        assert_eq!(g.wait_time(now, 1), 400 * MS);
    }

    #[test]
    fn cap_available_limits_what_conforms_now() {
        let mut g = Gcra::per_minute(600, 10);
        let now = Duration::from_secs(1);
        g.cap_available(now, 2);
        assert!(g.try_acquire(now, 1).is_ok());
        assert!(g.try_acquire(now, 1).is_ok());
        assert_eq!(g.try_acquire(now, 1), Err(100 * MS));
        // A cap above what is available changes nothing.
        g.cap_available(now, 50);
        assert_eq!(g.try_acquire(now, 1), Err(100 * MS));
    }

    #[test]
    fn slowing_down_a_full_bucket_releases_no_burst() {
        let mut g = Gcra::per_minute(600, 10); // 100 ms, 11 cells
        let now = Duration::from_secs(1);
        while g.try_acquire(now, 1).is_ok() {}
        g.set_rate(now, 300.0, 10); // 200 ms: still full, next cell one new interval away
        assert_eq!(g.try_acquire(now, 1), Err(200 * MS));
        g.set_rate(now, 1200.0, 10); // faster: still full, next cell one (shorter) interval away
        assert_eq!(g.try_acquire(now, 1), Err(50 * MS));
        // Promised reservations keep their times across a change; only the tail is rescaled.
        let mut g = Gcra::per_minute(600, 0);
        assert_eq!(g.reserve(now, 1), Duration::ZERO);
        assert_eq!(g.reserve(now, 1), 100 * MS);
        g.set_rate(now, 60.0, 0);
        assert_eq!(g.reserve(now, 1), 1100 * MS);
        g.set_rate(now, 600.0, 0);
        g.set_rate(now, 60.0, 0);
        assert_eq!(
            g.reserve(now, 1),
            2100 * MS,
            "oscillation does not inflate the state"
        );
    }

    #[test]
    fn shrinking_the_burst_keeps_the_fill_in_cells() {
        // Three cells used; the burst drops to 0 (over-full), the rate halves, the burst returns:
        // the three cells still count, so only two more fit in the 4 + 1 capacity.
        let mut g = Gcra::per_minute(600, 4);
        let now = Duration::from_secs(1);
        for _ in 0..3 {
            assert!(g.try_acquire(now, 1).is_ok());
        }
        g.set_rate(now, 600.0, 0);
        g.set_rate(now, 300.0, 0);
        g.set_rate(now, 300.0, 4);
        let mut more = 0;
        while g.try_acquire(now, 1).is_ok() {
            more += 1;
        }
        assert_eq!(more, 2);
    }

    proptest! {
        #[test]
        fn f64_constructor_matches_integer_one(per_minute in 1u32..10_000_000, burst in 0u32..20) {
            prop_assert_eq!(
                Gcra::per_minute_f64(f64::from(per_minute), burst),
                Gcra::per_minute(per_minute, burst)
            );
        }

        #[test]
        fn rate_and_burst_changes_never_exceed_the_largest(
            max_rate in 1u32..6000,
            burst in 0u32..5,
            steps in prop::collection::vec(
                (0u64..1000, 1u32..4, 0.05f64..=1.0, 0.0f64..=1.0, any::<bool>()),
                1..200,
            ),
        ) {
            let mut g = Gcra::per_minute(max_rate, burst);
            let mut now = Duration::ZERO;
            let mut grants = Vec::new();
            for (dt_ms, tries, fraction, burst_fraction, reserve) in steps {
                now += Duration::from_millis(dt_ms);
                let b = (f64::from(burst) * burst_fraction) as u32;
                g.set_rate(now, f64::from(max_rate) * fraction, b);
                for _ in 0..tries {
                    if reserve {
                        grants.push(now + g.reserve(now, 1));
                    } else if g.try_acquire(now, 1).is_ok() {
                        grants.push(now);
                    }
                }
            }
            grants.sort();
            assert_window_bound(&grants, max_rate, burst);
        }

        #[test]
        fn any_window_respects_rate_plus_burst(
            per_minute in 1u32..6000,
            burst in 0u32..5,
            steps in prop::collection::vec((0u64..2000, 1u32..4), 1..200),
        ) {
            let mut g = Gcra::per_minute(per_minute, burst);
            let mut now = Duration::ZERO;
            let mut grants = Vec::new();
            for (dt_ms, tries) in steps {
                now += Duration::from_millis(dt_ms);
                for _ in 0..tries {
                    if g.try_acquire(now, 1).is_ok() {
                        grants.push(now);
                    }
                }
            }
            assert_window_bound(&grants, per_minute, burst);
        }

        #[test]
        fn reservations_respect_rate_and_are_fifo(
            per_minute in 1u32..6000,
            burst in 0u32..5,
            steps in prop::collection::vec((0u64..500, 1u32..4), 1..150),
        ) {
            let mut g = Gcra::per_minute(per_minute, burst);
            let mut now = Duration::ZERO;
            let mut grants: Vec<Duration> = Vec::new();
            for (dt_ms, n) in steps {
                now += Duration::from_millis(dt_ms);
                let mut prev_wait = None;
                for _ in 0..n {
                    let wait = g.reserve(now, 1);
                    if let Some(p) = prev_wait {
                        prop_assert!(wait >= p, "FIFO: later reservation must not wait less");
                        if !p.is_zero() {
                            prop_assert!(wait > p);
                        }
                    }
                    prev_wait = Some(wait);
                    let at = now + wait;
                    if let Some(last) = grants.last() {
                        prop_assert!(at >= *last, "grants must come in reservation order");
                    }
                    grants.push(at);
                }
            }
            assert_window_bound(&grants, per_minute, burst);
        }

        #[test]
        fn burst_zero_spaces_grants_by_the_interval(
            per_minute in 1u32..6000,
            steps in prop::collection::vec(0u64..3000, 1..200),
        ) {
            let mut g = Gcra::per_minute(per_minute, 0);
            let t = g.emission_interval().unwrap_or_default();
            let mut now = Duration::ZERO;
            let mut last: Option<Duration> = None;
            for dt_ms in steps {
                now += Duration::from_millis(dt_ms);
                if g.try_acquire(now, 1).is_ok() {
                    if let Some(l) = last {
                        prop_assert!(now - l >= t);
                    }
                    last = Some(now);
                }
            }
        }

        #[test]
        fn idle_does_not_accumulate_beyond_burst(
            per_minute in 1u32..6000,
            burst in 0u32..10,
            busy in 0u32..50,
            idle_secs in 0u64..100_000,
        ) {
            let mut g = Gcra::per_minute(per_minute, burst);
            for _ in 0..busy {
                let _ = g.try_acquire(Duration::ZERO, 1);
            }
            // Past any `tat` the busy phase could have built up (at most (burst + 1) minutes).
            let now = Duration::from_secs(idle_secs + 60 * u64::from(burst + 2));
            let mut granted = 0;
            while g.try_acquire(now, 1).is_ok() {
                granted += 1;
                prop_assert!(granted <= burst + 1);
            }
            prop_assert_eq!(granted, burst + 1);
        }

        #[test]
        fn refund_never_goes_below_now(
            per_minute in 1u32..6000,
            burst in 0u32..5,
            taken in 0u32..20,
            refunded in 0u32..40,
        ) {
            let mut g = Gcra::per_minute(per_minute, burst);
            let now = Duration::from_secs(10);
            for _ in 0..taken {
                g.reserve(now, 1);
            }
            g.refund(now, refunded);
            let mut granted = 0;
            while g.try_acquire(now, 1).is_ok() {
                granted += 1;
            }
            let expected = (burst + 1).saturating_sub(taken.saturating_sub(refunded));
            prop_assert_eq!(granted, expected);
        }
    }
}
