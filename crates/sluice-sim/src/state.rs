//! Shared simulator state: keys with their buckets, counters and the fault plan.
//! One mutex guards it all; each call takes it once for auth, counting, limiting and faults.

use std::collections::{BTreeMap, HashMap};
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
    /// The body was invalid; the call was counted as failed.
    Invalid,
    Limited {
        key_name: String,
        state: LimitState,
        retry_after: Duration,
    },
    Fault {
        status: u16,
        state: LimitState,
    },
    Proceed {
        state: LimitState,
    },
}

struct KeyEntry {
    name: String,
    bucket: TokenBucket,
    calls: u64,
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
    /// Calls past the limiter since start or reset, for `fail_first`.
    admitted: u64,
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
            admitted: 0,
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

    /// Runs auth, counting, rate limiting and fault selection for one call.
    pub fn admit(&self, key: Option<&str>, job_id: Option<&str>, valid: bool) -> Verdict {
        let now = Instant::now();
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(key) = key.filter(|k| !k.is_empty()) else {
            return Verdict::Unauthorized;
        };
        if !inner.keys.contains_key(key) {
            if !self.config.keys.is_empty() {
                return Verdict::Unauthorized;
            }
            let entry = self.anonymous_entry(inner, key, now);
            inner.keys.insert(key.to_owned(), entry);
        }
        let Some(entry) = inner.keys.get_mut(key) else {
            return Verdict::Unauthorized;
        };

        entry.calls += 1;
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

        let state = match entry.bucket.try_acquire(now) {
            Decision::Allowed(state) => state,
            Decision::Limited { state, retry_after } => {
                inner.rate_limited += 1;
                return Verdict::Limited {
                    key_name: entry.name.clone(),
                    state,
                    retry_after,
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

    /// Names an unconfigured key after a prefix of itself, made unique among known keys.
    fn anonymous_entry(&self, inner: &Inner, key: &str, now: Instant) -> KeyEntry {
        let prefix: String = key.chars().take(6).collect();
        let base = format!("anonymous-{prefix}");
        let taken = |n: &str| inner.keys.values().any(|e| e.name == n);
        let mut name = base.clone();
        let mut i = 2;
        while taken(&name) {
            name = format!("{base}-{i}");
            i += 1;
        }
        let bucket = TokenBucket::new(self.config.default_rpm, self.config.burst_seconds, now);
        KeyEntry {
            name,
            bucket,
            calls: 0,
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
        inner.admitted = 0;
        self.ok.store(0, Ordering::Relaxed);
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
                    bucket,
                    calls: 0,
                },
            )
        })
        .collect()
}
