//! Shared simulator state: keys with their buckets, counters and the fault plan.
//! One mutex guards it all; each call takes it once for auth, counting, limiting and faults.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::bucket::{Decision, LimitState, TokenBucket};
use crate::{Faults, SimConfig, SimStats};

/// What the handler should do with a call.
#[derive(Debug)]
pub enum Verdict {
    Unauthorized,
    /// The body was invalid; a chat call was counted as failed.
    Invalid,
    Limited {
        key_name: String,
        state: LimitState,
        retry_after: Duration,
        reason: LimitReason,
    },
    Fault {
        status: u16,
        state: LimitState,
    },
    Proceed {
        state: LimitState,
    },
}

/// Why a call got a 429, so each wire format can word its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitReason {
    /// The key's bucket was empty.
    Bucket,
    /// The key is serving a block for hammering.
    Blocked,
    /// The `rate_limit_retry_after_secs` fault.
    Told,
}

struct KeyEntry {
    name: String,
    bucket: TokenBucket,
    /// Embeddings have a bucket of their own at the key's rate, as providers limit each model
    /// separately: embedding calls never use up the chat budget the worker's limiter plans with.
    embed_bucket: TokenBucket,
    calls: u64,
    hammer: Hammer,
    /// Calls received per [`TIMELINE_STEP`] since start or reset, for window checks.
    timeline: Vec<u32>,
}

/// Resolution of the per-key call timeline.
pub const TIMELINE_STEP: Duration = Duration::from_millis(100);
/// The timeline covers the first hour; later calls are counted but not placed.
const TIMELINE_STEPS: usize = 36_000;

/// The "punish hammering" rule for one key: its recent 429s and its current block.
#[derive(Default)]
struct Hammer {
    /// Times of the most recent 429s; at most `hammer_limit + 1` are kept, which is all the
    /// rule needs, so a client hammering at any rate costs bounded memory.
    recent: VecDeque<Instant>,
    blocked_until: Option<Instant>,
}

impl Hammer {
    fn remaining_block(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .filter(|until| now < *until)
            .map(|until| until - now)
    }

    /// Records a 429 answered at `now`; returns true if it starts a block.
    fn note_429(&mut self, now: Instant, config: &SimConfig) -> bool {
        let limit = config.hammer_limit as usize;
        if limit == 0 {
            return false;
        }
        self.recent.push_back(now);
        while self.recent.len() > limit + 1 {
            self.recent.pop_front();
        }
        // Calls refused during a block are counted above but never extend the block.
        if self.remaining_block(now).is_some() || self.recent.len() <= limit {
            return false;
        }
        let window = Duration::from_secs_f64(config.hammer_window_secs);
        let oldest = self.recent.front().copied().unwrap_or(now);
        if now.saturating_duration_since(oldest) > window {
            return false;
        }
        self.blocked_until = Some(now + Duration::from_secs_f64(config.hammer_block_secs));
        // The 429s that caused this block are paid for by it; counting starts afresh.
        self.recent.clear();
        true
    }
}

#[derive(Default)]
struct JobEntry {
    calls: u64,
    /// Calls that got past the limiter, which is what `fail_first_per_job` counts.
    admitted: u64,
}

struct Inner {
    /// Raw key -> entry. Raw keys live only here and never reach stats or logs.
    keys: HashMap<String, KeyEntry>,
    jobs: HashMap<String, JobEntry>,
    total: u64,
    rate_limited: u64,
    failed: u64,
    blocked: u64,
    blocks: u64,
    /// Authenticated embeddings calls, whatever their outcome.
    embeddings: u64,
    /// Calls past the limiter since start or reset, for `fail_first`.
    admitted: u64,
    /// Origin of the per-key timelines.
    started: Instant,
    faults: Faults,
    rng: SmallRng,
}

pub struct Shared {
    pub config: SimConfig,
    inner: Mutex<Inner>,
    /// Bumped after the latency sleep, outside the lock, so slow calls never hold it.
    ok: AtomicU64,
}

impl Shared {
    pub fn new(config: SimConfig) -> Self {
        let inner = Inner {
            keys: configured_keys(&config),
            jobs: HashMap::new(),
            total: 0,
            rate_limited: 0,
            failed: 0,
            blocked: 0,
            blocks: 0,
            embeddings: 0,
            admitted: 0,
            started: Instant::now(),
            faults: config.faults.clone(),
            rng: SmallRng::from_entropy(),
        };
        Self {
            config,
            inner: Mutex::new(inner),
            ok: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent between statements, so a panic elsewhere cannot corrupt it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entry of an accepted key, created on first use when no keys are configured.
    fn authenticate<'a>(
        &self,
        keys: &'a mut HashMap<String, KeyEntry>,
        key: Option<&str>,
        now: Instant,
    ) -> Option<&'a mut KeyEntry> {
        let key = key.filter(|k| !k.is_empty())?;
        if !keys.contains_key(key) {
            if !self.config.keys.is_empty() {
                return None;
            }
            let entry = self.anonymous_entry(keys, key, now);
            keys.insert(key.to_owned(), entry);
        }
        keys.get_mut(key)
    }

    /// Runs auth, counting, rate limiting and fault selection for one chat call.
    pub fn admit(&self, key: Option<&str>, job_id: Option<&str>, valid: bool) -> Verdict {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(entry) = self.authenticate(&mut inner.keys, key, now) else {
            return Verdict::Unauthorized;
        };

        entry.calls += 1;
        let step = (now.saturating_duration_since(inner.started).as_millis()
            / TIMELINE_STEP.as_millis()) as usize;
        if step < TIMELINE_STEPS {
            if entry.timeline.len() <= step {
                entry.timeline.resize(step + 1, 0);
            }
            entry.timeline[step] += 1;
        }
        inner.total += 1;
        let mut job = None;
        if let Some(id) = job_id {
            // Look up before inserting so repeat calls of a job do not allocate its id again.
            if !inner.jobs.contains_key(id) {
                inner.jobs.insert(id.to_owned(), JobEntry::default());
            }
            job = inner.jobs.get_mut(id);
        }
        if let Some(j) = job.as_deref_mut() {
            j.calls += 1;
        }
        if !valid {
            inner.failed += 1;
            return Verdict::Invalid;
        }

        if let Some(secs) = inner.faults.rate_limit_retry_after_secs {
            inner.rate_limited += 1;
            return Verdict::Limited {
                key_name: entry.name.clone(),
                state: entry.bucket.peek(now),
                retry_after: Duration::from_secs(secs),
                reason: LimitReason::Told,
            };
        }
        // A block is checked before the bucket so refused calls spend no tokens: the bucket
        // keeps refilling underneath, as the provider's own limit would.
        if let Some(left) = entry.hammer.remaining_block(now) {
            inner.rate_limited += 1;
            inner.blocked += 1;
            entry.hammer.note_429(now, &self.config);
            return Verdict::Limited {
                key_name: entry.name.clone(),
                state: entry.bucket.peek(now),
                retry_after: left,
                reason: LimitReason::Blocked,
            };
        }
        let state = match entry.bucket.try_acquire(now) {
            Decision::Allowed(state) => state,
            Decision::Limited { state, retry_after } => {
                inner.rate_limited += 1;
                let mut retry_after = retry_after;
                if entry.hammer.note_429(now, &self.config) {
                    inner.blocks += 1;
                    tracing::debug!(key = %entry.name, "simulated key blocked for hammering");
                    let block = entry.hammer.remaining_block(now).unwrap_or_default();
                    retry_after = retry_after.max(block);
                }
                return Verdict::Limited {
                    key_name: entry.name.clone(),
                    state,
                    retry_after,
                    reason: LimitReason::Bucket,
                };
            }
        };

        inner.admitted += 1;
        let job_admitted = job.map_or(0, |j| {
            j.admitted += 1;
            j.admitted
        });
        let f = &inner.faults;
        let status = if let Some(status) = f.always_fail {
            Some(status)
        } else if inner.admitted <= u64::from(f.fail_first)
            || (job_admitted > 0 && job_admitted <= u64::from(f.fail_first_per_job))
        {
            Some(f.fail_status)
        } else if f.error_rate > 0.0 && inner.rng.gen::<f64>() < f.error_rate {
            Some(500)
        } else {
            None
        };
        match status {
            Some(status) => {
                inner.failed += 1;
                Verdict::Fault { status, state }
            }
            None => Verdict::Proceed { state },
        }
    }

    /// Runs auth, counting, rate limiting and faults for one embeddings call.
    ///
    /// Kept apart from chat calls so that turning on a semantic cache changes no chat numbers:
    /// embeddings count only in `embeddings`, spend their own bucket, are never blocked for
    /// hammering and do not count toward `fail_first` or `fail_first_per_job`. The faults that
    /// describe the provider as a whole (`rate_limit_retry_after_secs`, `always_fail`,
    /// `error_rate`) apply to them too.
    pub fn admit_embeddings(&self, key: Option<&str>, valid: bool) -> Verdict {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(entry) = self.authenticate(&mut inner.keys, key, now) else {
            return Verdict::Unauthorized;
        };
        inner.embeddings += 1;
        if !valid {
            return Verdict::Invalid;
        }
        if let Some(secs) = inner.faults.rate_limit_retry_after_secs {
            return Verdict::Limited {
                key_name: entry.name.clone(),
                state: entry.embed_bucket.peek(now),
                retry_after: Duration::from_secs(secs),
                reason: LimitReason::Told,
            };
        }
        let state = match entry.embed_bucket.try_acquire(now) {
            Decision::Allowed(state) => state,
            Decision::Limited { state, retry_after } => {
                return Verdict::Limited {
                    key_name: entry.name.clone(),
                    state,
                    retry_after,
                    reason: LimitReason::Bucket,
                }
            }
        };
        let f = &inner.faults;
        let status = f.always_fail.or_else(|| {
            (f.error_rate > 0.0 && inner.rng.gen::<f64>() < f.error_rate).then_some(500)
        });
        match status {
            Some(status) => Verdict::Fault { status, state },
            None => Verdict::Proceed { state },
        }
    }

    /// Names an unconfigured key after a prefix of itself, made unique among known keys.
    fn anonymous_entry(
        &self,
        keys: &HashMap<String, KeyEntry>,
        key: &str,
        now: Instant,
    ) -> KeyEntry {
        let prefix: String = key.chars().take(6).collect();
        let base = format!("anonymous-{prefix}");
        let taken = |n: &str| keys.values().any(|e| e.name == n);
        let mut name = base.clone();
        let mut i = 2;
        while taken(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        let bucket = TokenBucket::new(self.config.default_rpm, self.config.burst_seconds, now);
        KeyEntry {
            name,
            embed_bucket: bucket.clone(),
            bucket,
            calls: 0,
            hammer: Hammer::default(),
            timeline: Vec::new(),
        }
    }

    pub fn record_ok(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SimStats {
        let inner = self.lock();
        SimStats {
            total: inner.total,
            ok: self.ok.load(Ordering::Relaxed),
            rate_limited: inner.rate_limited,
            failed: inner.failed,
            blocked: inner.blocked,
            blocks: inner.blocks,
            embeddings: inner.embeddings,
            by_key: inner
                .keys
                .values()
                .map(|e| (e.name.clone(), e.calls))
                .collect::<BTreeMap<_, _>>(),
            by_job: inner
                .jobs
                .iter()
                .map(|(id, j)| (id.clone(), j.calls))
                .collect(),
        }
    }

    pub fn calls_for_job(&self, request_id: &str) -> u64 {
        self.lock().jobs.get(request_id).map_or(0, |j| j.calls)
    }

    pub fn faults(&self) -> Faults {
        self.lock().faults.clone()
    }

    pub fn set_faults(&self, faults: Faults) {
        self.lock().faults = faults;
    }

    /// Back to a freshly started simulator, except that the current faults stay.
    pub fn reset(&self) {
        let mut inner = self.lock();
        inner.keys = configured_keys(&self.config);
        inner.jobs.clear();
        inner.total = 0;
        inner.rate_limited = 0;
        inner.failed = 0;
        inner.blocked = 0;
        inner.blocks = 0;
        inner.embeddings = 0;
        inner.admitted = 0;
        inner.started = Instant::now();
        self.ok.store(0, Ordering::Relaxed);
    }

    /// For each key (by name), the most calls it received within any `window` (in steps of
    /// [`TIMELINE_STEP`], so a window may reach one step further than `window` itself).
    pub fn busiest_window(&self, window: Duration) -> BTreeMap<String, u64> {
        let steps = (window.as_millis() / TIMELINE_STEP.as_millis()).max(1) as usize;
        let inner = self.lock();
        inner
            .keys
            .values()
            .map(|entry| {
                let mut best = 0u64;
                let mut sum = 0u64;
                for (i, n) in entry.timeline.iter().enumerate() {
                    sum += u64::from(*n);
                    if i >= steps {
                        sum -= u64::from(entry.timeline[i - steps]);
                    }
                    best = best.max(sum);
                }
                (entry.name.clone(), best)
            })
            .collect()
    }
}

fn configured_keys(config: &SimConfig) -> HashMap<String, KeyEntry> {
    let now = Instant::now();
    config
        .keys
        .iter()
        .map(|k| {
            let rpm = k.rpm.unwrap_or(config.default_rpm);
            let bucket = TokenBucket::new(rpm, config.burst_seconds, now);
            (
                k.key.clone(),
                KeyEntry {
                    name: k.name.clone(),
                    embed_bucket: bucket.clone(),
                    bucket,
                    calls: 0,
                    hammer: Hammer::default(),
                    timeline: Vec::new(),
                },
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(limit: u32) -> SimConfig {
        SimConfig {
            hammer_limit: limit,
            hammer_window_secs: 10.0,
            hammer_block_secs: 5.0,
            ..SimConfig::default()
        }
    }

    #[test]
    fn more_than_limit_429s_within_the_window_block() {
        let c = config(3);
        let t0 = Instant::now();
        let mut h = Hammer::default();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert!(!h.note_429(at(0), &c));
        assert!(!h.note_429(at(1000), &c));
        assert!(!h.note_429(at(2000), &c));
        assert!(h.note_429(at(3000), &c), "the 4th 429 in 10 s blocks");
        assert_eq!(h.remaining_block(at(4000)), Some(Duration::from_secs(4)));
        // Refusals during the block do not extend it.
        for ms in [4000, 4100, 4200, 4300] {
            assert!(!h.note_429(at(ms), &c));
        }
        assert_eq!(h.remaining_block(at(8000)), None);
    }

    #[test]
    fn spread_out_429s_and_a_zero_limit_never_block() {
        let t0 = Instant::now();
        let mut h = Hammer::default();
        let c = config(3);
        // One 429 every 4 s: never more than three within 10 s.
        assert!((0..20).all(|i| !h.note_429(t0 + Duration::from_secs(4 * i), &c)));
        let mut h = Hammer::default();
        assert!((0..100).all(|_| !h.note_429(t0, &config(0))));
        assert!(h.recent.is_empty());
    }
}
