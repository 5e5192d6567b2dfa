//! Property tests of the dispatch policy: random buffers against random fake pools, checked
//! against the rules written out in `fakes::allowed`, plus fairness over long runs.

use super::fakes::*;
use super::*;
use proptest::prelude::*;
use sluice_core::{Lane, LaneWeights};
use std::time::Duration;

const MODELS: [&str; 4] = ["m0", "m1", "m2", "unrouted"];
const TENANTS: [&str; 3] = ["a", "b", "c"];

fn pool() -> impl Strategy<Value = FakePool> {
    prop_oneof![
        3 => Just(FakePool::free()),
        1 => Just(FakePool::down()),
        4 => (
            prop::sample::select(vec![10u64, 300, 1_500, 5_000, 40_000, 3_600_000]),
            prop::sample::select(vec![0.0, 0.2, 2.0, 50.0]),
        )
            .prop_map(|(ms, pace)| FakePool {
                wait: Duration::from_millis(ms),
                pace,
                ..FakePool::free()
            }),
        1 => (0u32..3_000).prop_map(|tokens_free| FakePool { tokens_free, ..FakePool::free() }),
    ]
}

/// Routes for the first three models (the fourth has none) and paused lanes.
fn pools() -> impl Strategy<Value = FakePools> {
    (
        prop::collection::vec(prop::collection::vec(pool(), 1..4), 3),
        prop::collection::vec(any::<bool>(), 4),
    )
        .prop_map(|(routes, paused)| {
            let mut view = FakePools::new();
            for (model, route) in MODELS.iter().zip(routes) {
                view = view.route(model, route);
            }
            for (lane, paused) in Lane::CONSUMED.into_iter().zip(paused) {
                if paused {
                    view = view.pause(lane);
                }
            }
            view
        })
}

/// A buffered job and how long before `now` it arrived (or the wait its message carried).
#[derive(Debug, Clone)]
struct Arrival {
    item: Item,
    waited: Duration,
    carried: bool,
}

fn arrivals() -> impl Strategy<Value = Vec<Arrival>> {
    prop::collection::vec(
        (
            0usize..4,
            0usize..3,
            0usize..4,
            any::<bool>(),
            0u64..20_000,
            prop_oneof![3 => Just(0u32), 1 => 0u32..4_000],
            any::<bool>(),
        ),
        0..40,
    )
    .prop_map(|jobs| {
        (0u128..)
            .zip(jobs)
            .map(
                |(n, (lane, tenant, model, limited, waited, tokens, carried))| {
                    let mut item = item(n, Lane::CONSUMED[lane], TENANTS[tenant], MODELS[model]);
                    item.job.rate_limited = limited;
                    item.job.tokens = tokens;
                    Arrival {
                        item,
                        waited: Duration::from_millis(waited),
                        carried,
                    }
                },
            )
            .collect()
    })
}

/// The arrivals buffered as of `now`: some pushed when they arrived, some carrying the wait
/// of an earlier worker in `waiting_since_ms`.
fn buffered(arrivals: &[Arrival], now: Now) -> Dispatcher<Item> {
    let mut d = dispatcher();
    for a in arrivals {
        let mut item = a.item.clone();
        let pushed = if a.carried {
            item.job.waiting_since_ms = Some(now.unix_ms - a.waited.as_millis() as i64);
            now
        } else {
            Now {
                at: now.at - a.waited,
                unix_ms: now.unix_ms - a.waited.as_millis() as i64,
            }
        };
        d.push(item, pushed).expect("not the dead lane");
    }
    d
}

fn waited_of(arrivals: &[Arrival], id: RequestId) -> Duration {
    arrivals
        .iter()
        .find(|a| a.item.job.request_id == id)
        .map(|a| a.waited)
        .expect("a known job")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Decide until the dispatcher sleeps, with the pools as they are: every pick is a job and
    /// pool the rules allow, 429'd jobs before fresh ones for the same pool, parks only of jobs
    /// that cannot run, and a sleep only when nothing buffered can run.
    #[test]
    fn every_decision_follows_the_rules(arrivals in arrivals(), pools in pools()) {
        let now = start();
        let mut d = buffered(&arrivals, now);
        let mut left: Vec<Item> = arrivals.iter().map(|a| a.item.clone()).collect();
        let waited = |id| waited_of(&arrivals, id);
        for _ in 0..=arrivals.len() + 1 {
            match d.decide(&pools, now) {
                Decision::Pick { job, pool } => {
                    let job = job.into_item();
                    let rules = first_allowed(&pools, &job, waited(job.job.request_id));
                    prop_assert_eq!(rules, Some(pool), "picked {:?}", job);
                    if !job.job.rate_limited {
                        let limited_first = left.iter().find(|w| {
                            w.job.rate_limited && !allowed(&pools, w, waited(w.job.request_id)).is_empty()
                        });
                        prop_assert!(limited_first.is_none(), "{:?} before {:?}", job, limited_first);
                    }
                    left.retain(|w| w.job.request_id != job.job.request_id);
                }
                Decision::Park(parked) => {
                    prop_assert!(!parked.is_empty());
                    let buffered = left.clone();
                    for p in parked {
                        let job = p.job.item();
                        let id = job.job.request_id;
                        let waited = waited(id);
                        // Whether its lane is paused or not: a pause keeps jobs, not pools' slots.
                        let unpaused = FakePools { paused: Vec::new(), ..pools.clone() };
                        prop_assert!(allowed(&unpaused, job, waited).is_empty(), "parked a job that could run: {:?}", job);
                        prop_assert!((MIN_PARK..=MAX_PARK).contains(&p.delay), "delay {:?}", p.delay);
                        prop_assert!(p.delay > PARK_AFTER);
                        let since = job.job.waiting_since_ms.unwrap_or(now.unix_ms - waited.as_millis() as i64);
                        prop_assert_eq!(p.message.waiting_since_ms, Some(since));
                        prop_assert_eq!(&p.message.request_id, &id);
                        // Not past the end of its fallback wait, give or take the jobs of
                        // its model ahead of it at the fallback pool's pace.
                        let blocked = buffered.iter().filter(|w| w.job.model == job.job.model).count();
                        let route = PoolView::route(&pools, &job.job.model);
                        for fallback in route.iter().skip(1).filter(|f| f.pace > 0.0) {
                            let bound = FALLBACK_AFTER.saturating_sub(waited)
                                + fallback.wait
                                + Duration::from_secs_f64(blocked as f64 / fallback.pace);
                            prop_assert!(p.delay <= bound.max(MIN_PARK), "delay {:?} past {:?}", p.delay, bound);
                        }
                        left.retain(|w| w.job.request_id != id);
                    }
                }
                Decision::Sleep { until } => {
                    prop_assert!(until >= now.at + MIN_SLEEP && until <= now.at + MAX_SLEEP);
                    let runnable: Vec<&Item> = left
                        .iter()
                        .filter(|w| !allowed(&pools, w, waited(w.job.request_id)).is_empty())
                        .collect();
                    prop_assert!(runnable.is_empty(), "slept with {:?} ready", runnable);
                    prop_assert_eq!(d.len(), left.len());
                    return Ok(());
                }
            }
        }
        prop_assert!(false, "the dispatcher never slept");
    }

    /// Inside a lane, while two tenants both have ready jobs, neither gets two picks ahead.
    #[test]
    fn tenants_take_turns(tenants in prop::collection::vec(0usize..3, 1..60)) {
        let pools = FakePools::new().route("m", vec![FakePool::free()]);
        let mut d = dispatcher();
        let now = start();
        fill(&mut d, now, (0u128..).zip(&tenants).map(|(n, &t)| item(n, Lane::Standard, TENANTS[t], "m")));
        let mut left = [0usize; 3];
        for &t in &tenants {
            left[t] += 1;
        }
        let mut picked = [0usize; 3];
        for _ in 0..tenants.len() {
            let Decision::Pick { job, .. } = d.decide(&pools, now) else {
                return Err(TestCaseError::fail("no pick with ready jobs"));
            };
            let t = TENANTS.iter().position(|&t| t == job.item().job.tenant).expect("a known tenant");
            picked[t] += 1;
            left[t] -= 1;
            for (u, v) in [(0, 1), (0, 2), (1, 2)] {
                let both_waiting = left[u] > 0 && left[v] > 0;
                prop_assert!(!both_waiting || picked[u].abs_diff(picked[v]) <= 1, "{:?}", picked);
            }
        }
    }

}

// The longer runs: fewer cases keep the suite quick.
proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// With every lane backlogged with ready jobs (and blocked ones among them), each lane's
    /// share of the picks is its weight's share.
    #[test]
    fn lane_weights_hold_under_contention(
        weights in prop::array::uniform4(1u32..20),
        blocked_every in 2u128..6,
    ) {
        let weights = LaneWeights {
            priority: weights[0],
            standard: weights[1],
            batch: weights[2],
            retry: weights[3],
        };
        let total: u32 = Lane::CONSUMED.iter().map(|&l| weights.of(l)).sum();
        let rounds: u32 = 6;
        let pools = FakePools::new()
            .route("free", vec![FakePool::free()])
            .route("full", vec![FakePool::busy(Duration::from_secs(5))]);
        let mut d = unparking(weights);
        let now = start();
        let mut n = 0;
        for lane in Lane::CONSUMED {
            for k in 0..u128::from(rounds * 20 * 2) {
                n += 1;
                let model = if k % blocked_every == 0 { "full" } else { "free" };
                fill(&mut d, now, [item(n, lane, TENANTS[(k % 3) as usize], model)]);
            }
        }
        let mut counts = [0u32; 4];
        for _ in 0..rounds * total {
            let Decision::Pick { job, .. } = d.decide(&pools, now) else {
                return Err(TestCaseError::fail("no pick with ready jobs"));
            };
            prop_assert_eq!(job.item().job.model.as_str(), "free");
            counts[job.item().lane.index()] += 1;
        }
        for lane in Lane::CONSUMED {
            let want = rounds * weights.of(lane);
            let got = counts[lane.index()];
            prop_assert!(got.abs_diff(want) <= 1, "{}: {} picks, want {} ({:?})", lane, got, want, counts);
        }
    }

    /// Over time, with pools that free up at their pace and parked jobs coming back after
    /// their delay: no pool is picked while busy, and every job runs.
    #[test]
    fn every_job_runs_and_no_pool_is_picked_while_busy(
        intervals in prop::collection::vec(prop::sample::select(vec![20u64, 100, 700, 3_000]), 3),
        routes in prop::collection::vec(prop::collection::vec(0usize..3, 1..3), 3),
        jobs in prop::collection::vec((0usize..4, 0usize..3, 0usize..4, any::<bool>()), 1..40),
    ) {
        let mut now = start();
        let mut d = dispatcher();
        fill(&mut d, now, (0u128..).zip(&jobs).map(|(n, &(lane, tenant, model, limited))| {
            let mut it = item(n, Lane::CONSUMED[lane], TENANTS[tenant], MODELS[model]);
            it.job.rate_limited = limited;
            it
        }));
        let interval = |p: usize| Duration::from_millis(intervals[p]);
        let mut free_at = [now.at; 3];
        let mut returning: Vec<(Instant, Item)> = Vec::new();
        let mut done = 0;
        let deadline = now.at + Duration::from_secs(600);
        while done < jobs.len() {
            prop_assert!(now.at < deadline, "{} of {} jobs ran in 10 minutes", done, jobs.len());
            let (back, later): (Vec<_>, Vec<_>) =
                returning.into_iter().partition(|(at, _)| *at <= now.at);
            returning = later;
            for (_, item) in back {
                d.push(item, now).expect("not the dead lane");
            }
            let mut view = FakePools::new();
            for (model, route) in MODELS.iter().zip(&routes) {
                let route = route.iter().map(|&p| FakePool {
                    wait: free_at[p].saturating_duration_since(now.at),
                    pace: 1.0 / interval(p).as_secs_f64(),
                    ..FakePool::free()
                });
                view = view.route(model, route.collect());
            }
            match d.decide(&view, now) {
                Decision::Pick { job, pool } => {
                    if let Some(i) = pool {
                        let p = routes[MODELS.iter().position(|&m| m == job.item().job.model).expect("a model")][i];
                        prop_assert!(free_at[p] <= now.at, "pool {} busy", p);
                        free_at[p] = now.at + interval(p);
                    }
                    done += 1;
                }
                Decision::Park(parked) => {
                    for p in parked {
                        let item = Item { lane: p.job.item().lane, job: p.message };
                        returning.push((now.at + p.delay, item));
                    }
                }
                Decision::Sleep { until } => {
                    let next = returning.iter().map(|(at, _)| *at).min().unwrap_or(until);
                    let to = until.min(next).max(now.at + MIN_SLEEP);
                    now = after(now, to - now.at);
                }
            }
        }
    }
}
