//! Test doubles for the dispatcher: pools whose state a test sets, a buffered message without a
//! broker, a clock that moves only when told, and a rule-by-rule oracle of what may run now.

use super::{Buffered, Dispatcher, Now, PoolState, PoolView};
use sluice_core::{JobRef, Lane, LaneWeights, RequestId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

pub const FALLBACK_AFTER: Duration = Duration::from_secs(10);
pub const PARK_AFTER: Duration = Duration::from_secs(2);
/// How long a call over a pool's token budget waits, in [`FakePool::wait_for`].
pub const TOKEN_WAIT: Duration = Duration::from_secs(5);

/// One pool as a test sets it: next free slot, pace, breakers and a token budget.
#[derive(Debug, Clone, PartialEq)]
pub struct FakePool {
    pub wait: Duration,
    pub pace: f64,
    pub down: bool,
    /// The largest call estimate it can take now; bigger ones wait [`TOKEN_WAIT`].
    pub tokens_free: u32,
}

impl FakePool {
    pub fn free() -> FakePool {
        FakePool {
            wait: Duration::ZERO,
            pace: 10.0,
            down: false,
            tokens_free: u32::MAX,
        }
    }

    /// Next free slot in `wait`, draining one call per `wait` after that.
    pub fn busy(wait: Duration) -> FakePool {
        FakePool {
            wait,
            pace: 1.0 / wait.as_secs_f64(),
            ..FakePool::free()
        }
    }

    /// Every endpoint paused or its breaker open.
    pub fn down() -> FakePool {
        FakePool {
            wait: Duration::MAX,
            pace: 0.0,
            down: true,
            tokens_free: u32::MAX,
        }
    }
}

impl PoolState for FakePool {
    fn wait_for(&self, tokens: u32) -> Duration {
        if tokens > self.tokens_free {
            self.wait.max(TOKEN_WAIT)
        } else {
            self.wait
        }
    }

    fn pace(&self) -> f64 {
        self.pace
    }

    fn is_down(&self) -> bool {
        self.down
    }
}

/// Routes by model alias and paused lanes.
#[derive(Debug, Clone, Default)]
pub struct FakePools {
    pub routes: HashMap<String, Vec<FakePool>>,
    pub paused: Vec<Lane>,
}

impl FakePools {
    pub fn new() -> FakePools {
        FakePools::default()
    }

    pub fn route(mut self, model: &str, pools: Vec<FakePool>) -> FakePools {
        self.routes.insert(model.to_owned(), pools);
        self
    }

    pub fn pause(mut self, lane: Lane) -> FakePools {
        self.paused.push(lane);
        self
    }
}

impl PoolView for FakePools {
    type Pool = FakePool;

    fn route(&self, model: &str) -> &[FakePool] {
        self.routes.get(model).map_or(&[], Vec::as_slice)
    }

    fn lane_paused(&self, lane: Lane) -> bool {
        self.paused.contains(&lane)
    }
}

/// A delivery without a broker behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub lane: Lane,
    pub job: JobRef,
}

impl Buffered for Item {
    fn lane(&self) -> Lane {
        self.lane
    }

    fn job(&self) -> &JobRef {
        &self.job
    }
}

/// Job `n`: ids sort by `n`, as UUIDv7s sort by arrival.
pub fn item(n: u128, lane: Lane, tenant: &str, model: &str) -> Item {
    let request_id: RequestId = format!("{n:032x}").parse().expect("a valid uuid");
    Item {
        lane,
        job: JobRef {
            request_id,
            tenant: tenant.to_owned(),
            model: model.to_owned(),
            attempt: 0,
            tokens: 0,
            rate_limited: false,
            waiting_since_ms: None,
        },
    }
}

pub fn rate_limited(mut item: Item) -> Item {
    item.job.rate_limited = true;
    item
}

pub fn start() -> Now {
    Now {
        at: Instant::now(),
        unix_ms: 1_700_000_000_000,
    }
}

pub fn after(now: Now, d: Duration) -> Now {
    Now {
        at: now.at + d,
        unix_ms: now.unix_ms + i64::try_from(d.as_millis()).expect("a short test"),
    }
}

pub fn dispatcher() -> Dispatcher<Item> {
    Dispatcher::new(LaneWeights::default(), FALLBACK_AFTER, PARK_AFTER)
}

/// A dispatcher that never parks, so blocked jobs stay and compete.
pub fn unparking(weights: LaneWeights) -> Dispatcher<Item> {
    Dispatcher::new(weights, FALLBACK_AFTER, Duration::MAX)
}

pub fn fill(d: &mut Dispatcher<Item>, now: Now, items: impl IntoIterator<Item = Item>) {
    for item in items {
        d.push(item, now).expect("not the dead lane");
    }
}

/// The rules, written out apart from the dispatcher: the route's pool `job` may use now, given
/// how long it has waited; `Some(None)` for no route, `None` when it must wait. `fallback` is
/// whether it may look past the primary pool.
pub fn allowed(pools: &FakePools, item: &Item, waited: Duration) -> Vec<Option<usize>> {
    if pools.paused.contains(&item.lane) {
        return Vec::new();
    }
    let route = PoolView::route(pools, &item.job.model);
    if route.is_empty() {
        return vec![None];
    }
    (0..route.len())
        .filter(|&i| {
            let may_fall_back = waited >= FALLBACK_AFTER || route[..i].iter().all(|p| p.down);
            (i == 0 || may_fall_back) && route[i].wait_for(item.job.tokens).is_zero()
        })
        .map(Some)
        .collect()
}

/// The first pool [`allowed`] lists, which is the one the dispatcher must choose.
pub fn first_allowed(pools: &FakePools, item: &Item, waited: Duration) -> Option<Option<usize>> {
    allowed(pools, item, waited).first().copied()
}
