//! Unit tests of the dispatch policy with fake pools: one scenario per rule the worker keeps
//! (lane weights, tenant turns, no head-of-line blocking, fallbacks, parking, 429s, pauses).

use super::fakes::*;
use super::*;
use sluice_core::{Lane, LaneWeights};
use std::time::Duration;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

/// The job picked next and its pool, failing on any other decision.
fn pick(d: &mut Dispatcher<Item>, pools: &FakePools, now: Now) -> (Item, Option<usize>) {
    match d.decide(pools, now) {
        Decision::Pick { job, pool } => (job.into_item(), pool),
        other => panic!("expected a pick, got {other:?}"),
    }
}

fn sleep_until(d: &mut Dispatcher<Item>, pools: &FakePools, now: Now) -> Instant {
    match d.decide(pools, now) {
        Decision::Sleep { until } => until,
        other => panic!("expected a sleep, got {other:?}"),
    }
}

fn parked(d: &mut Dispatcher<Item>, pools: &FakePools, now: Now) -> Vec<Parked<Item>> {
    match d.decide(pools, now) {
        Decision::Park(parked) => parked,
        other => panic!("expected jobs parked, got {other:?}"),
    }
}

fn id(n: u128) -> RequestId {
    format!("{n:032x}").parse().expect("a valid uuid")
}

#[test]
fn an_empty_buffer_sleeps_the_longest_and_takes_no_dead_letters() {
    let mut d = dispatcher();
    let now = start();
    assert_eq!(
        sleep_until(&mut d, &FakePools::new(), now),
        now.at + MAX_SLEEP
    );
    let dead = item(1, Lane::Dead, "t", "m");
    assert_eq!(d.push(dead.clone(), now), Err(dead));
    assert!(d.is_empty());
}

#[test]
fn lane_weights_hold_among_ready_jobs_while_blocked_ones_wait() {
    let pools = FakePools::new()
        .route("free", vec![FakePool::free()])
        .route("full", vec![FakePool::busy(SEC)]);
    let mut d = unparking(LaneWeights::default());
    let now = start();
    let mut n = 0;
    for lane in Lane::CONSUMED {
        for k in 0..1_000 {
            n += 1;
            // A saturated pool's jobs sit in every lane among the ready ones.
            let model = if k % 3 == 0 { "full" } else { "free" };
            fill(&mut d, now, [item(n, lane, "t", model)]);
        }
    }
    let mut counts = [0usize; 4];
    for _ in 0..1_050 {
        let (job, pool) = pick(&mut d, &pools, now);
        assert_eq!((job.job.model.as_str(), pool), ("free", Some(0)));
        counts[job.lane.index()] += 1;
    }
    assert_eq!(counts, [500, 250, 50, 250]);
}

#[test]
fn lane_weights_hold_when_one_pool_is_the_bottleneck() {
    // Every lane backlogged for one pool that takes a call per 100 ms: picks come at the
    // pool's pace and split by the lane weights (a pick never ignores weights for readiness).
    // No fallback timers: once they ran out, every sleep would be 1 ms and the run slow.
    let mut d = Dispatcher::new(LaneWeights::default(), 3_600 * SEC, Duration::MAX);
    let mut now = start();
    for (n, lane) in (0..800u128).zip(Lane::CONSUMED.into_iter().cycle()) {
        fill(&mut d, now, [item(n, lane, "t", "m")]);
    }
    let mut free_at = now.at;
    let mut counts = [0usize; 4];
    let mut picks = 0;
    while picks < 210 {
        let wait = free_at.saturating_duration_since(now.at);
        let pools = FakePools::new().route(
            "m",
            vec![FakePool {
                wait,
                pace: 10.0,
                ..FakePool::free()
            }],
        );
        match d.decide(&pools, now) {
            Decision::Pick { job, pool } => {
                assert_eq!(pool, Some(0));
                assert!(wait.is_zero(), "picked for a pool busy for {wait:?}");
                counts[job.item().lane.index()] += 1;
                picks += 1;
                free_at = now.at + 100 * MS;
            }
            Decision::Sleep { until } => {
                assert!(until <= free_at.max(now.at + MIN_SLEEP));
                now = after(now, until.saturating_duration_since(now.at));
            }
            Decision::Park(p) => panic!("parked {} jobs with parking off", p.len()),
        }
    }
    assert_eq!(counts, [100, 50, 10, 50]);
}

#[test]
fn a_lane_earns_no_credit_while_its_pool_is_saturated() {
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(
        &mut d,
        now,
        (0..200).map(|n| item(n, Lane::Batch, "t", "b")),
    );
    fill(
        &mut d,
        now,
        (200..400).map(|n| item(n, Lane::Priority, "t", "p")),
    );
    let blocked = FakePools::new()
        .route("p", vec![FakePool::free()])
        .route("b", vec![FakePool::busy(SEC)]);
    for _ in 0..100 {
        assert_eq!(pick(&mut d, &blocked, now).0.lane, Lane::Priority);
    }
    // Batch's pool frees up: it gets its one pick in eleven, not a burst of what it missed.
    let open = FakePools::new()
        .route("p", vec![FakePool::free()])
        .route("b", vec![FakePool::free()]);
    let batch = (0..22)
        .filter(|_| pick(&mut d, &open, now).0.lane == Lane::Batch)
        .count();
    assert!(batch <= 3, "batch took {batch} of 22 picks after waiting");
}

#[test]
fn tenants_take_turns_in_a_lane() {
    let pools = FakePools::new().route("m", vec![FakePool::free()]);
    let mut d = dispatcher();
    let now = start();
    let tenants = ["a", "a", "a", "a", "a", "b", "b", "c"];
    for (n, tenant) in (0..).zip(tenants) {
        fill(&mut d, now, [item(n, Lane::Standard, tenant, "m")]);
    }
    let order: Vec<String> = (0..tenants.len())
        .map(|_| pick(&mut d, &pools, now).0.job.tenant)
        .collect();
    assert_eq!(order, ["a", "b", "c", "a", "b", "a", "a", "a"]);
}

#[test]
fn a_tenant_whose_jobs_are_blocked_keeps_its_turn() {
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(
        &mut d,
        now,
        [
            item(1, Lane::Standard, "a", "full"),
            item(2, Lane::Standard, "b", "free"),
            item(3, Lane::Standard, "b", "free"),
        ],
    );
    let pools = FakePools::new()
        .route("free", vec![FakePool::free()])
        .route("full", vec![FakePool::busy(SEC)]);
    assert_eq!(pick(&mut d, &pools, now).0.job.tenant, "b");
    let open = pools.route("full", vec![FakePool::free()]);
    assert_eq!(pick(&mut d, &open, now).0.job.tenant, "a");
}

#[test]
fn a_saturated_pool_does_not_hold_up_jobs_for_another_pool() {
    let pools = FakePools::new()
        .route("large", vec![FakePool::busy(500 * MS)])
        .route("small", vec![FakePool::free()]);
    let mut d = unparking(LaneWeights::default());
    let now = start();
    // The same tenant's own blocked jobs come first in its queue and in the better lane.
    fill(
        &mut d,
        now,
        (0..50).map(|n| item(n, Lane::Priority, "t", "large")),
    );
    fill(&mut d, now, [item(50, Lane::Batch, "t", "small")]);
    let (job, pool) = pick(&mut d, &pools, now);
    assert_eq!((job.job.request_id, pool), (id(50), Some(0)));
}

#[test]
fn a_job_is_never_picked_for_a_pool_that_cannot_serve_now() {
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(&mut d, now, [item(1, Lane::Priority, "t", "m")]);
    let pools = FakePools::new().route("m", vec![FakePool::busy(40 * MS)]);
    assert_eq!(sleep_until(&mut d, &pools, now), now.at + 40 * MS);
    let later = after(now, 40 * MS);
    let pools = FakePools::new().route("m", vec![FakePool::free()]);
    assert_eq!(pick(&mut d, &pools, later).1, Some(0));
}

#[test]
fn a_call_over_the_token_budget_waits_while_a_smaller_one_goes() {
    let mut d = unparking(LaneWeights::default());
    let now = start();
    let mut big = item(1, Lane::Priority, "t", "m");
    big.job.tokens = 4_000;
    let mut small = item(2, Lane::Priority, "t", "m");
    small.job.tokens = 500;
    fill(&mut d, now, [big, small]);
    let pools = FakePools::new().route(
        "m",
        vec![FakePool {
            tokens_free: 1_000,
            ..FakePool::free()
        }],
    );
    assert_eq!(pick(&mut d, &pools, now).0.job.request_id, id(2));
    assert!(matches!(d.decide(&pools, now), Decision::Sleep { .. }));
}

#[test]
fn a_fallback_pool_serves_only_after_the_fallback_wait() {
    let pools = FakePools::new().route("m", vec![FakePool::busy(30 * SEC), FakePool::free()]);
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    // Sleeps end no later than the fallback wait (sooner while the fallback pool is free).
    let mut at = now;
    while at.at < now.at + FALLBACK_AFTER {
        let until = sleep_until(&mut d, &pools, at);
        assert!(until <= now.at + FALLBACK_AFTER);
        at = after(at, until - at.at);
    }
    let (_, pool) = pick(&mut d, &pools, after(now, FALLBACK_AFTER));
    assert_eq!(pool, Some(1));
}

#[test]
fn a_fallback_serves_at_once_when_every_earlier_pool_is_down() {
    let now = start();
    let routes = [
        (vec![FakePool::down(), FakePool::free()], Some(Some(1))),
        (
            vec![FakePool::down(), FakePool::down(), FakePool::free()],
            Some(Some(2)),
        ),
        // The second pool is only busy, not down: the third must wait its turn.
        (
            vec![FakePool::down(), FakePool::busy(SEC), FakePool::free()],
            None,
        ),
        // The primary serves first whenever it can.
        (vec![FakePool::free(), FakePool::free()], Some(Some(0))),
    ];
    for (route, expected) in routes {
        let pools = FakePools::new().route("m", route.clone());
        let mut d = unparking(LaneWeights::default());
        fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
        let got = match d.decide(&pools, now) {
            Decision::Pick { pool, .. } => Some(pool),
            _ => None,
        };
        assert_eq!(got, expected, "route {route:?}");
    }
}

#[test]
fn a_job_without_a_route_is_picked_with_no_pool() {
    let mut d = dispatcher();
    let now = start();
    fill(&mut d, now, [item(1, Lane::Batch, "t", "nowhere")]);
    assert_eq!(pick(&mut d, &FakePools::new(), now).1, None);
}

#[test]
fn a_parked_job_is_not_parked_past_its_fallback() {
    let pools = FakePools::new().route("m", vec![FakePool::busy(30 * SEC), FakePool::free()]);
    let mut d = dispatcher();
    let now = start();
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    let later = after(now, 3 * SEC);
    let parked = parked(&mut d, &pools, later);
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].delay, FALLBACK_AFTER - 3 * SEC);
    // It comes back remembering when it started waiting, so it may fall back at once.
    assert_eq!(parked[0].message.waiting_since_ms, Some(now.unix_ms));
    assert!(d.is_empty());
    let back = after(now, FALLBACK_AFTER);
    let message = Item {
        lane: Lane::Standard,
        job: parked[0].message.clone(),
    };
    fill(&mut d, back, [message]);
    assert_eq!(pick(&mut d, &pools, back).1, Some(1));
}

#[test]
fn a_parked_message_keeps_the_first_wait_it_carried() {
    let pools = FakePools::new().route("m", vec![FakePool::busy(30 * SEC)]);
    let mut d = dispatcher();
    let now = start();
    let mut old = item(1, Lane::Standard, "t", "m");
    old.job.waiting_since_ms = Some(now.unix_ms - 4_000);
    fill(&mut d, now, [old]);
    let parked = parked(&mut d, &pools, now);
    assert_eq!(
        parked[0].message.waiting_since_ms,
        Some(now.unix_ms - 4_000)
    );
    assert_eq!(parked[0].job.since(), now.at - 4 * SEC);
}

#[test]
fn park_delays_stay_within_1_and_60_seconds() {
    let now = start();
    let cases = [
        (FakePool::busy(3_600 * SEC), PARK_AFTER, MAX_PARK),
        (FakePool::busy(2_500 * MS), PARK_AFTER, 2_500 * MS),
        (FakePool::busy(500 * MS), 100 * MS, MIN_PARK),
    ];
    for (pool, park_after, delay) in cases {
        let pools = FakePools::new().route("m", vec![pool]);
        let mut d = Dispatcher::new(LaneWeights::default(), FALLBACK_AFTER, park_after);
        fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
        let parked = parked(&mut d, &pools, now);
        assert_eq!(parked[0].delay, delay, "park after {park_after:?}");
    }
}

#[test]
fn jobs_that_will_run_soon_are_not_parked_and_the_rest_are() {
    // Free in 500 ms, then two calls a second: job k waits 0.5 + k/2 s.
    let pool = FakePool {
        wait: 500 * MS,
        pace: 2.0,
        ..FakePool::free()
    };
    let pools = FakePools::new().route("m", vec![pool]);
    let mut d = dispatcher();
    let now = start();
    fill(
        &mut d,
        now,
        (0..9).map(|n| item(n, Lane::Standard, "t", "m")),
    );
    // A 429'd job runs first, so it counts as first in line.
    fill(&mut d, now, [rate_limited(item(9, Lane::Retry, "t", "m"))]);
    let mut parked: Vec<(RequestId, Duration)> = parked(&mut d, &pools, now)
        .into_iter()
        .map(|p| (p.message.request_id, p.delay))
        .collect();
    parked.sort_unstable();
    let expected: Vec<(RequestId, Duration)> = (3..9)
        .map(|n| (id(n), 500 * MS + SEC * (n as u32 + 1) / 2))
        .collect();
    assert_eq!(parked, expected);
    assert_eq!(d.len(), 4);
}

#[test]
fn jobs_are_parked_at_most_every_park_check() {
    let pools = FakePools::new().route("m", vec![FakePool::busy(30 * SEC)]);
    let mut d = dispatcher();
    let now = start();
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    assert_eq!(parked(&mut d, &pools, now).len(), 1);
    fill(&mut d, now, [item(2, Lane::Standard, "t", "m")]);
    let soon = after(now, PARK_CHECK_EVERY - MS);
    assert!(matches!(d.decide(&pools, soon), Decision::Sleep { .. }));
    assert_eq!(
        parked(&mut d, &pools, after(now, PARK_CHECK_EVERY)).len(),
        1
    );
}

#[test]
fn rate_limited_jobs_go_before_fresh_work_for_the_same_pool() {
    let pools = FakePools::new()
        .route("m", vec![FakePool::free()])
        .route("full", vec![FakePool::busy(SEC)]);
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(
        &mut d,
        now,
        (0..3).map(|n| item(n, Lane::Priority, "t", "m")),
    );
    fill(&mut d, now, [rate_limited(item(3, Lane::Retry, "u", "m"))]);
    // One whose pool is still full does not hold anyone up.
    fill(
        &mut d,
        now,
        [rate_limited(item(4, Lane::Retry, "u", "full"))],
    );
    let first = pick(&mut d, &pools, now).0;
    assert_eq!(first.job.request_id, id(3));
    let next = pick(&mut d, &pools, now).0;
    assert_eq!(next.job.request_id, id(0));
}

#[test]
fn a_paused_lane_is_not_picked() {
    let open = FakePools::new().route("m", vec![FakePool::free()]);
    let paused = open.clone().pause(Lane::Priority);
    let mut d = dispatcher();
    let now = start();
    fill(&mut d, now, [item(1, Lane::Priority, "t", "m")]);
    fill(
        &mut d,
        now,
        [rate_limited(item(2, Lane::Priority, "t", "m"))],
    );
    fill(&mut d, now, [item(3, Lane::Batch, "t", "m")]);
    assert_eq!(pick(&mut d, &paused, now).0.lane, Lane::Batch);
    // Held, not dropped, and not even a job without a route leaves a paused lane.
    fill(&mut d, now, [item(4, Lane::Priority, "t", "nowhere")]);
    assert!(matches!(d.decide(&paused, now), Decision::Sleep { .. }));
    assert_eq!(d.len(), 3);
    assert_eq!(pick(&mut d, &open, now).0.job.request_id, id(2));
}

#[test]
fn a_sleep_ends_when_a_pool_frees_or_a_fallback_wait_ends() {
    let now = start();
    let cases = [
        (vec![FakePool::busy(40 * MS)], 40 * MS),
        (vec![FakePool::busy(10 * SEC)], MAX_SLEEP),
        (
            vec![FakePool::busy(10 * SEC), FakePool::busy(70 * MS)],
            70 * MS,
        ),
    ];
    for (route, wait) in cases {
        let pools = FakePools::new().route("m", route);
        let mut d = unparking(LaneWeights::default());
        fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
        assert_eq!(sleep_until(&mut d, &pools, now), now.at + wait);
    }
    // A fallback wait about to end; and a job held only by a pause is looked at every 1 ms.
    let pools = FakePools::new().route("m", vec![FakePool::busy(10 * SEC), FakePool::busy(SEC)]);
    let mut d = unparking(LaneWeights::default());
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    let late = after(now, FALLBACK_AFTER - 30 * MS);
    assert_eq!(sleep_until(&mut d, &pools, late), late.at + 30 * MS);
    let mut d = unparking(LaneWeights::default());
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    let paused = FakePools::new()
        .route("m", vec![FakePool::free()])
        .pause(Lane::Standard);
    assert_eq!(sleep_until(&mut d, &paused, now), now.at + MIN_SLEEP);
}

#[test]
fn a_job_put_back_keeps_its_wait() {
    let mut d = unparking(LaneWeights::default());
    let now = start();
    fill(&mut d, now, [item(1, Lane::Standard, "t", "m")]);
    let free = FakePools::new().route("m", vec![FakePool::free(), FakePool::free()]);
    let Decision::Pick { job, .. } = d.decide(&free, now) else {
        panic!("expected a pick");
    };
    // Its permit went to another worker: back in the buffer, counting from its first wait.
    let later = after(now, FALLBACK_AFTER);
    d.put_back(job).expect("not the dead lane");
    let primary_full = FakePools::new().route("m", vec![FakePool::busy(SEC), FakePool::free()]);
    assert_eq!(pick(&mut d, &primary_full, later).1, Some(1));
}

#[test]
fn a_drain_hands_back_everything() {
    let mut d = dispatcher();
    let now = start();
    fill(
        &mut d,
        now,
        (0..7).map(|n| item(n, Lane::CONSUMED[n as usize % 4], "t", "m")),
    );
    let mut ids: Vec<RequestId> = d.drain().into_iter().map(|i| i.job.request_id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..7).map(id).collect::<Vec<_>>());
    assert!(d.is_empty());
}
