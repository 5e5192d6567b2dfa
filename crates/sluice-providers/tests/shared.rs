//! The Redis-shared endpoint limiter against a real Redis (`SLUICE_TEST_REDIS_URL`, default
//! 127.0.0.1:6379): sharing across workers, local fallback, recovery, and the worker registry.
//!
//! Timing checks are bounds on counts with slack, never tight wall-clock bounds.
#![allow(clippy::unwrap_used)]

use sluice_providers::testing::PrivateRedis;
use sluice_providers::{SharedError, SharedLimiter, SharedLimits};
use sluice_redis::redis::{self, AsyncCommands};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const RATE: u32 = 600;
const BURST: u32 = 1;
const HAMMER: Duration = Duration::from_secs(3);

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or run) uses.
fn unique_prefix(tag: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "sluice-test:{tag}:{}-{nanos}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn conn(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("these tests need Redis at {url}: {e}"))
}

/// Delete every key of the test's prefix.
async fn cleanup(url: &str, prefix: &str) {
    let mut c = conn(url).await;
    let keys: Vec<String> = c.keys(format!("{prefix}:*")).await.unwrap();
    if !keys.is_empty() {
        let _: () = c.del(keys).await.unwrap();
    }
}

/// The largest number of permits all workers together may use in a window of `window`, from the
/// lease rule: GCRA grants at most floor(rate * span) + burst + 1 in a span, and a leased cell is
/// used at most `LEASE_HOLD` after it was granted, so uses in a window come from grants in a span
/// `LEASE_HOLD` longer.
fn max_uses(per_minute: u32, burst: u32, window: Duration) -> u64 {
    let span = window + SharedLimiter::LEASE_HOLD;
    (u128::from(per_minute) * span.as_micros() / 60_000_000) as u64 + u64::from(burst) + 1
}

/// `tasks` callers per limiter call `acquire` in a loop for `dur`. Returns the times (from the
/// start) at which permits were granted, sorted, and the elapsed time.
async fn hammer(
    limiters: &[SharedLimiter],
    tasks: usize,
    dur: Duration,
) -> (Vec<Duration>, Duration) {
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + dur);
    let mut handles = Vec::new();
    for limiter in limiters {
        for _ in 0..tasks {
            let limiter = limiter.clone();
            handles.push(tokio::spawn(async move {
                let mut grants = Vec::new();
                while tokio::time::timeout_at(deadline, limiter.acquire())
                    .await
                    .is_ok()
                {
                    let at = start.elapsed();
                    if at >= dur {
                        break;
                    }
                    grants.push(at);
                }
                grants
            }));
        }
    }
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    all.sort();
    (all, start.elapsed())
}

/// Most grants seen in any window of `window` (by the time each grant was seen).
fn busiest_window(grants: &[Duration], window: Duration) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..grants.len() {
        while grants[hi] - grants[lo] >= window {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

/// Full-rate bound for the hammer, and 80% of the ideal count as the floor.
fn shared_bounds(elapsed: Duration) -> (u64, u64) {
    let ideal = u64::from(RATE) / 60 * HAMMER.as_secs() + u64::from(BURST);
    (ideal * 8 / 10, max_uses(RATE, BURST, elapsed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_one_endpoint_rate() {
    let url = redis_url();
    let prefix = unique_prefix("share");
    let mut workers = Vec::new();
    for w in 0..4 {
        workers.push(
            SharedLimits::connect(&url, &prefix, &format!("worker-{w}"))
                .await
                .unwrap(),
        );
    }
    let limiters: Vec<_> = workers
        .iter()
        .map(|w| w.limiter("ep-a", RATE, BURST))
        .collect();
    assert_eq!(limiters[0].lease_size(), 2);

    let (grants, elapsed) = hammer(&limiters, 3, HAMMER).await;

    assert!(workers.iter().all(|w| !w.is_degraded()));
    let (low, high) = shared_bounds(elapsed);
    let n = grants.len() as u64;
    let busiest = busiest_window(&grants, Duration::from_secs(1));
    eprintln!("4 workers: {n} permits in {elapsed:?} ({low}..={high}), busiest second {busiest}");
    assert!(
        (low..=high).contains(&n),
        "4 workers at {RATE} rpm burst {BURST} got {n} permits in {elapsed:?}, expected {low}..={high} (4 unshared limiters would get ~4x)"
    );
    // Any one second: at most the lease-rule bound (14), plus slack for tasks seeing their permit
    // late on a busy machine; unshared limiters would give ~40.
    let bound = max_uses(RATE, BURST, Duration::from_secs(1)) as usize + 3;
    assert!(
        busiest <= bound,
        "{busiest} permits in one second, bound {bound}"
    );
    drop(limiters);
    drop(workers);
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_limiter_gets_the_full_rate() {
    let url = redis_url();
    let prefix = unique_prefix("single");
    let limits = SharedLimits::connect(&url, &prefix, "solo").await.unwrap();
    let limiter = limits.limiter("ep-b", RATE, BURST);

    let (grants, elapsed) = hammer(std::slice::from_ref(&limiter), 4, HAMMER).await;

    assert!(!limits.is_degraded());
    let (low, high) = shared_bounds(elapsed);
    let n = grants.len() as u64;
    eprintln!("one worker: {n} permits in {elapsed:?} ({low}..={high})");
    assert!(
        (low..=high).contains(&n),
        "one worker got {n} permits in {elapsed:?}, expected {low}..={high}"
    );
    // The decisions really went through Redis.
    let mut c = conn(&url).await;
    let exists: bool = c.exists(format!("{prefix}:gcra:ep-b")).await.unwrap();
    assert!(exists, "no shared GCRA key in Redis");
    drop(limiter);
    drop(limits);
    cleanup(&url, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_redis_runs_on_a_local_share() {
    // Nothing listens on port 1: connection refused.
    let limits = SharedLimits::connect("redis://127.0.0.1:1", "sluice-test:down", "w1")
        .await
        .unwrap();
    assert!(limits.is_degraded());
    assert_eq!(limits.live_workers().await, None);
    let limiter = limits.limiter("ep-c", RATE, BURST);

    let (grants, elapsed) = hammer(std::slice::from_ref(&limiter), 3, HAMMER).await;

    // Never knew the worker count: 4 assumed, so 150 rpm and burst 1 / 4 = 0, i.e. at most
    // floor(2.5/s * elapsed) + 1 (the local GCRA runs on this process's clock: exact bound).
    let n = grants.len() as u64;
    let high = (u128::from(RATE / 4) * elapsed.as_micros() / 60_000_000) as u64 + 1;
    let low = (u64::from(RATE / 4) * HAMMER.as_secs() / 60) * 8 / 10;
    eprintln!("degraded from start: {n} permits in {elapsed:?} ({low}..={high})");
    assert!(
        (low..=high).contains(&n),
        "degraded worker got {n} permits in {elapsed:?}, expected {low}..={high}"
    );
    assert!(limits.is_degraded());
}

#[tokio::test]
async fn bad_url_fails_fast_without_leaking_the_password() {
    let err = SharedLimits::connect("redis://:hunter2@host:notaport", "p", "w")
        .await
        .unwrap_err();
    assert!(matches!(err, SharedError::InvalidUrl { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"), "{err}");
    assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");

    let err = SharedLimits::connect("redis://127.0.0.1:1", "", "w")
        .await
        .unwrap_err();
    assert!(matches!(err, SharedError::EmptyName), "{err:?}");
}

/// Poll `cond` every 50 ms for up to `limit`.
async fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_when_redis_dies_and_returns_when_it_is_back() {
    let mut server = PrivateRedis::start().await;
    let url = server.url();
    let prefix = unique_prefix("recover");
    let a = SharedLimits::connect(&url, &prefix, "a").await.unwrap();
    let b = SharedLimits::connect(&url, &prefix, "b").await.unwrap();
    assert!(!a.is_degraded());
    // `a` must have seen both workers before the outage: its local share is then rate / 2.
    assert_eq!(a.live_workers().await, Some(2));
    let limiter = a.limiter("ep-d", RATE, BURST);
    limiter.acquire().await;
    let key = format!("{prefix}:gcra:ep-d");
    let exists: bool = conn(&url).await.exists(&key).await.unwrap();
    assert!(exists, "shared key missing before the outage");

    server.stop().await;
    // The next decisions notice the outage (a failed call or a failed heartbeat).
    let (_, _) = hammer(
        std::slice::from_ref(&limiter),
        2,
        Duration::from_millis(500),
    )
    .await;
    assert!(
        eventually(Duration::from_secs(3), || a.is_degraded()).await,
        "not degraded after Redis stopped"
    );
    // Local share: 300 rpm, burst 1 / 2 = 0, so at most floor(5/s * elapsed) + 1.
    let (grants, elapsed) = hammer(std::slice::from_ref(&limiter), 3, Duration::from_secs(2)).await;
    let n = grants.len() as u64;
    let high = (u128::from(RATE / 2) * elapsed.as_micros() / 60_000_000) as u64 + 1;
    eprintln!("degraded after outage: {n} permits in {elapsed:?} (6..={high})");
    assert!(
        (6..=high).contains(&n),
        "degraded worker got {n} permits in {elapsed:?}, expected 6..={high}"
    );
    assert!(a.is_degraded());

    server.restart().await;
    assert!(
        eventually(Duration::from_secs(5), || !a.is_degraded()).await,
        "still degraded 5 s after Redis came back"
    );
    // Back on the shared state: the fresh server now holds the endpoint's key again.
    let (grants, _) = hammer(
        std::slice::from_ref(&limiter),
        2,
        Duration::from_millis(500),
    )
    .await;
    assert!(!grants.is_empty());
    let exists: bool = conn(&url).await.exists(&key).await.unwrap();
    assert!(exists, "shared key missing after recovery");
    assert!(!a.is_degraded());

    drop(limiter);
    drop((a, b));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_counts_live_workers_and_drops_stale_ones() {
    let url = redis_url();
    let prefix = unique_prefix("registry");
    let a = SharedLimits::connect(&url, &prefix, "a").await.unwrap();
    let b = SharedLimits::connect(&url, &prefix, "b").await.unwrap();
    let c = SharedLimits::connect(&url, &prefix, "c").await.unwrap();
    assert_eq!(a.live_workers().await, Some(3));
    assert_eq!(c.live_workers().await, Some(3));

    // `c` stops refreshing; it still counts within its 5 s TTL...
    drop(c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(a.live_workers().await, Some(3));
    // ...and is gone after it, while `a` and `b` keep refreshing themselves.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut live = a.live_workers().await;
    while live != Some(2) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        live = a.live_workers().await;
    }
    assert_eq!(live, Some(2), "stale worker still counted");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(b.live_workers().await, Some(2));

    drop((a, b));
    cleanup(&url, &prefix).await;
}

#[tokio::test]
async fn workers_share_one_token_budget_and_corrections_move_it() {
    let url = redis_url();
    let prefix = unique_prefix("tokens");
    let a = SharedLimits::connect(&url, &prefix, "wa").await.unwrap();
    let b = SharedLimits::connect(&url, &prefix, "wb").await.unwrap();
    // 6,000 tokens a minute = 100 a second, with 99 extra: 100 tokens at once, then 1 per 10 ms.
    let budget_a = a.token_budget("ep-t", 6_000, 99);
    let budget_b = b.token_budget("ep-t", 6_000, 99);
    budget_a.try_take(100).await.unwrap();
    let wait = budget_b.try_take(50).await.unwrap_err();
    assert!(
        wait >= Duration::from_millis(400),
        "worker b sees worker a's take: {wait:?}"
    );
    // The call used only 40 of the 100: the refund is b's to use at once.
    budget_a.adjust(-60).await;
    budget_b.try_take(50).await.unwrap();
    // A call that used more than its estimate pushes everyone back.
    budget_b.adjust(200).await;
    let wait = budget_a.try_take(1).await.unwrap_err();
    assert!(wait >= Duration::from_secs(1), "{wait:?}");

    // Over time, two workers taking 10 tokens at a time together stay within the budget.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let started = Instant::now();
    let mut taken = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        for budget in [&budget_a, &budget_b] {
            if budget.try_take(10).await.is_ok() {
                taken += 10;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let most = (100.0 * elapsed) as u64 + 100 + 10;
    assert!(
        (150..=most).contains(&taken),
        "{taken} tokens in {elapsed:.2} s (at most {most})"
    );
    assert!(!a.is_degraded() && !b.is_degraded());
    cleanup(&url, &prefix).await;
}

/// Four workers' limiters for one endpoint at 600 rpm, burst 9, probing after idle.
async fn probing_workers(
    url: &str,
    prefix: &str,
    endpoint: &str,
    hold: Duration,
) -> (Vec<SharedLimits>, Vec<SharedLimiter>) {
    let mut workers = Vec::new();
    for w in 0..4 {
        workers.push(
            SharedLimits::connect(url, prefix, &format!("worker-{w}"))
                .await
                .unwrap(),
        );
    }
    let limiters = workers
        .iter()
        .map(|w| w.limiter_probing(endpoint, 600, 9, hold))
        .collect();
    (workers, limiters)
}

/// Cells a 600 RPM limiter (one per 100 ms) may add in `d`: on a busy machine the calls and
/// sleeps of these tests take longer than planned, and the bucket refills meanwhile.
fn refilled(d: Duration) -> usize {
    usize::try_from(d.as_millis() / 100).unwrap_or(usize::MAX)
}

/// Grants all `limiters` together take, one caller at a time, until every one is refused.
async fn take_all(limiters: &[SharedLimiter]) -> usize {
    let mut granted = 0;
    loop {
        let mut any = false;
        for limiter in limiters {
            if let Ok(probe) = limiter.try_acquire_probing().await {
                assert!(probe.is_none(), "a second probe");
                granted += 1;
                any = true;
            }
        }
        if !any {
            return granted;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_probe_after_idle_fills_the_shared_bucket_once_for_all_workers() {
    let url = redis_url();
    let prefix = unique_prefix("probe");
    let (workers, limiters) = probing_workers(&url, &prefix, "ep-p", Duration::from_secs(2)).await;

    // All four workers find the endpoint idle at once: exactly one gets the probe.
    let tries = tokio::join!(
        limiters[0].try_acquire_probing(),
        limiters[1].try_acquire_probing(),
        limiters[2].try_acquire_probing(),
        limiters[3].try_acquire_probing(),
    );
    let tries = [tries.0, tries.1, tries.2, tries.3];
    let mut probes: Vec<_> = tries.into_iter().filter_map(Result::ok).collect();
    assert_eq!(probes.len(), 1, "one grant among four workers");
    let probe = probes.pop().flatten().expect("the grant is the probe");
    // While it is out nobody else gets anything, and is told to ask again soon.
    for limiter in &limiters {
        let wait = limiter.try_acquire_probing().await.unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
    }

    // The provider reports 7 remaining: the four workers share 7, not 4 x 7 (a refill of one
    // cell per 100 ms may add one on a slow machine).
    let reported = Instant::now();
    assert!(
        probe.report(Some(7)).await.unwrap(),
        "reported within the hold"
    );
    // Past the 10 ms every worker was told to wait.
    tokio::time::sleep(Duration::from_millis(15)).await;
    let granted = take_all(&limiters).await;
    let took = reported.elapsed();
    assert!(
        (7..=8 + refilled(took)).contains(&granted),
        "{granted} granted after a report of 7, {took:?} later"
    );
    // Then the steady rate, and no second probe while the endpoint stays busy.
    let paced = Instant::now();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let later = take_all(&limiters).await;
    let took = paced.elapsed();
    assert!(
        (1..=2 + refilled(took)).contains(&later),
        "{later} in {took:?} at 10/s"
    );

    // A report never fills more than the burst: 1,000 remaining is 9 at once after the probe.
    let prefix2 = unique_prefix("probe-cap");
    let (workers2, limiters2) =
        probing_workers(&url, &prefix2, "ep-p", Duration::from_secs(2)).await;
    let probe = limiters2[0].try_acquire_probing().await.unwrap().unwrap();
    let reported = Instant::now();
    assert!(probe.report(Some(1_000)).await.unwrap());
    tokio::time::sleep(Duration::from_millis(15)).await;
    let granted = take_all(&limiters2).await;
    let took = reported.elapsed();
    assert!(
        (9..=10 + refilled(took)).contains(&granted),
        "{granted} granted, burst 9, {took:?} after the report"
    );

    drop((limiters, workers, limiters2, workers2));
    cleanup(&url, &prefix).await;
    cleanup(&url, &prefix2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_without_a_report_or_past_its_hold_leaves_an_empty_bucket() {
    let url = redis_url();
    let prefix = unique_prefix("probe-late");
    let hold = Duration::from_millis(300);
    let (workers, limiters) = probing_workers(&url, &prefix, "ep-late", hold).await;

    // Reported after its hold: too late to speak for the provider, nothing is filled.
    let probed = Instant::now();
    let probe = limiters[0].try_acquire_probing().await.unwrap().unwrap();
    tokio::time::sleep(hold + Duration::from_millis(50)).await;
    assert!(!probe.report(Some(9)).await.unwrap(), "the hold had ended");
    let granted = take_all(&limiters).await;
    let late = probed
        .elapsed()
        .saturating_sub(hold + Duration::from_millis(60));
    assert!(
        granted <= 2 + refilled(late),
        "{granted} granted: an empty bucket, paced ({late:?} later than planned)"
    );

    // Dropped unreported (the call never went): released at once, then an empty bucket.
    let (workers2, limiters2) = probing_workers(&url, &prefix, "ep-drop", hold).await;
    let probe = limiters2[1].try_acquire_probing().await.unwrap();
    assert!(probe.is_some());
    drop(probe);
    let started = Instant::now();
    while limiters2[2].try_acquire_probing().await.is_err() {
        assert!(
            started.elapsed() < hold,
            "the release did not come before the hold's end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let released = Instant::now();
    let granted = take_all(&limiters2).await;
    let took = released.elapsed();
    assert!(
        granted <= 1 + refilled(took),
        "{granted} granted in {took:?}: no burst without a report"
    );

    // A plain limiter never probes: an idle endpoint starts from an empty bucket at once.
    let plain = workers[3].limiter("ep-plain", 600, 9);
    assert!(plain.try_acquire().await.is_ok());
    assert!(plain.try_acquire().await.is_err());

    drop((limiters, workers, limiters2, workers2, plain));
    cleanup(&url, &prefix).await;
}
