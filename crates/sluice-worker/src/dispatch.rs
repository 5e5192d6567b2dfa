//! The dispatch policy, pure: which buffered job runs next and on which pool, which jobs go back
//! to their lane for a while, and how long to sleep when none can run. No I/O, no clock reads.
//!
//! The worker's loop ([`crate::Worker::run`]) feeds deliveries in, asks [`Dispatcher::decide`]
//! with a [`PoolView`] of its pools and the time, and carries the [`Decision`] out.

use sluice_core::{FairQueue, JobRef, Lane, LaneWeights, RequestId};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How often the buffer is checked for jobs to park.
pub const PARK_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Bounds of a parking delay: long enough not to churn, short enough to notice a freed pool.
pub const MIN_PARK: Duration = Duration::from_secs(1);
pub const MAX_PARK: Duration = Duration::from_secs(60);
/// Bounds of a sleep with nothing to pick. The upper one looks at the pools again soon: the
/// Redis-shared limits and operators' pauses change without the dispatcher seeing it.
pub const MIN_SLEEP: Duration = Duration::from_millis(1);
pub const MAX_SLEEP: Duration = Duration::from_millis(250);

/// One moment on both clocks the policy needs: the monotonic one for waits, and the wall clock
/// for `waiting_since_ms`, which travels between workers inside parked messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub unix_ms: i64,
}

/// What the dispatcher needs to know of one pool, as of the moment it asks.
pub trait PoolState {
    /// How long until some endpoint could grant a permit for a call estimated at `tokens`
    /// (zero: one can now).
    fn wait_for(&self, tokens: u32) -> Duration;
    /// Calls per second the pool's endpoints allow together now: how fast a backlog drains.
    fn pace(&self) -> f64;
    /// Whether the pool cannot serve at all for now (every endpoint paused or its breaker
    /// open), which lets its route's fallback pools serve at once.
    fn is_down(&self) -> bool;
}

/// The pools and pauses the dispatcher decides against.
pub trait PoolView {
    type Pool: PoolState;
    /// The pools serving a model alias, primary first, then its fallbacks in order; empty when
    /// nothing serves it.
    fn route(&self, model: &str) -> &[Self::Pool];
    /// Whether an operator paused the lane: its jobs stay buffered, untaken.
    fn lane_paused(&self, lane: Lane) -> bool;
}

/// A buffered message: the lane it came from and the job it carries.
pub trait Buffered {
    fn lane(&self) -> Lane;
    fn job(&self) -> &JobRef;
}

/// A buffered message with since when it has waited for a pool (a parked job keeps its first
/// wait's start), which decides when it may use a fallback pool.
#[derive(Debug)]
pub struct Waiting<T> {
    item: T,
    since: Instant,
}

impl<T> Waiting<T> {
    pub fn item(&self) -> &T {
        &self.item
    }

    pub fn into_item(self) -> T {
        self.item
    }

    pub fn since(&self) -> Instant {
        self.since
    }
}

/// A job to hand back to its lane for `delay`: publish `message` (the job with
/// `waiting_since_ms` set), then ack the original. Should that fail, [`Dispatcher::put_back`].
#[derive(Debug)]
pub struct Parked<T> {
    pub job: Waiting<T>,
    pub message: JobRef,
    pub delay: Duration,
}

/// What the worker should do next.
#[derive(Debug)]
pub enum Decision<T> {
    /// Run `job` now on the `pool`-th pool of its route, which can serve it now; `None` for a
    /// job without a route, which is dead-lettered when claimed.
    Pick {
        job: Waiting<T>,
        pool: Option<usize>,
    },
    /// Hand these jobs back to their lanes with a delay: their pools will not serve them
    /// soon, and they would hold buffer room that jobs for other pools could use.
    Park(Vec<Parked<T>>),
    /// Nothing can run before `until`, unless a delivery arrives first.
    Sleep { until: Instant },
}

/// The worker's buffer of deliveries and the policy that drains it: by lane weight, then tenant
/// turn, among jobs one of whose pools can serve now; 429'd jobs first.
pub struct Dispatcher<T> {
    queue: FairQueue<Waiting<T>>,
    fallback_after: Duration,
    park_after: Duration,
    /// When the buffer is next checked for jobs to park; `None` before the first decision.
    next_park: Option<Instant>,
}

impl<T: Buffered> Dispatcher<T> {
    /// `fallback_after`: how long a job waits for its primary pool before a fallback pool may
    /// serve it. `park_after`: a job whose estimated wait is longer goes back to its lane.
    pub fn new(weights: LaneWeights, fallback_after: Duration, park_after: Duration) -> Self {
        Self {
            queue: FairQueue::new(weights),
            fallback_after,
            park_after,
            next_park: None,
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Buffer a delivery. Its wait counts from its `waiting_since_ms` when a worker parked it
    /// before, else from now. Gives the item back if its lane is never scheduled (`dead`).
    pub fn push(&mut self, item: T, now: Now) -> Result<(), T> {
        let since = item
            .job()
            .waiting_since_ms
            .and_then(|ms| u64::try_from(now.unix_ms.saturating_sub(ms)).ok())
            .and_then(|waited| now.at.checked_sub(Duration::from_millis(waited)))
            .unwrap_or(now.at);
        self.put_back(Waiting { item, since })
    }

    /// Buffer again a job a decision took out but the worker could not carry out (its permit
    /// went elsewhere, its park failed to publish). It keeps its wait, and joins the back of
    /// its tenant's jobs.
    pub fn put_back(&mut self, waiting: Waiting<T>) -> Result<(), T> {
        let lane = waiting.item.lane();
        let tenant = waiting.item.job().tenant.clone();
        self.queue
            .push(lane, &tenant, waiting)
            .map_err(|w| w.into_item())
    }

    /// Everything buffered, taken out (at shutdown, to hand back unstarted).
    pub fn drain(&mut self) -> Vec<T> {
        std::iter::from_fn(|| self.queue.pop())
            .map(|(_, _, waiting)| waiting.into_item())
            .collect()
    }

    /// Decide the next step as of `now`, against `pools` as they are now. Every
    /// [`PARK_CHECK_EVERY`] it first parks the jobs that would wait longer than `park_after`.
    pub fn decide(&mut self, pools: &impl PoolView, now: Now) -> Decision<T> {
        if self.next_park.is_none_or(|at| now.at >= at) {
            self.next_park = Some(now.at + PARK_CHECK_EVERY);
            let parked = self.overdue(pools, now);
            if !parked.is_empty() {
                return Decision::Park(parked);
            }
        }
        if let Some((job, pool)) = self.pick(pools, now) {
            return Decision::Pick { job, pool };
        }
        Decision::Sleep {
            until: now.at + self.soonest_wait(pools, now),
        }
    }

    /// The next job by lane weight and tenant turn among those one of whose pools can serve
    /// now (so a saturated pool holds up no one else), jobs turned away with a 429 first.
    fn pick(&mut self, pools: &impl PoolView, now: Now) -> Option<(Waiting<T>, Option<usize>)> {
        let fallback_after = self.fallback_after;
        // `pop_where` takes the first item it finds ready, so the last pool found is the
        // picked job's.
        let mut chosen = None;
        let mut runnable = |w: &Waiting<T>, rate_limited_only: bool| {
            if rate_limited_only && !w.item.job().rate_limited {
                return false;
            }
            if pools.lane_paused(w.item.lane()) {
                return false;
            }
            match usable_pool(pools, w, fallback_after, now) {
                Some(pool) => {
                    chosen = Some(pool);
                    true
                }
                None => false,
            }
        };
        let (_, _, job) = match self.queue.pop_where(|w| runnable(w, true)) {
            Some(picked) => picked,
            None => self.queue.pop_where(|w| runnable(w, false))?,
        };
        match chosen {
            Some(pool) => Some((job, pool)),
            // Cannot happen while `pop_where` stops at the first ready item; should it change,
            // the job waits for the next decision rather than being lost or misrouted.
            None => {
                let _refused_only_for_dead = self.put_back(job);
                None
            }
        }
    }

    /// Take out the jobs that would wait longer than `park_after` here. Each one's wait is
    /// estimated from its pools' next free slot plus the blocked jobs of its model ahead of it
    /// at the pool's pace; a fallback pool counts only from the end of the job's fallback wait.
    fn overdue(&mut self, pools: &impl PoolView, now: Now) -> Vec<Parked<T>> {
        let mut blocked: HashMap<&str, Vec<(bool, Instant, RequestId)>> = HashMap::new();
        for waiting in self.queue.iter() {
            if usable_pool(pools, waiting, self.fallback_after, now).is_none() {
                let job = waiting.item.job();
                blocked.entry(job.model.as_str()).or_default().push((
                    !job.rate_limited,
                    waiting.since,
                    job.request_id,
                ));
            }
        }
        let mut park: HashMap<RequestId, Duration> = HashMap::new();
        for (model, mut jobs) in blocked {
            let route = pools.route(model);
            let paced: Vec<(Duration, f64)> =
                route.iter().map(|p| (p.wait_for(0), p.pace())).collect();
            // Jobs turned away with a 429 first, then by arrival: the order they would run in.
            jobs.sort_unstable();
            for (ahead, (_, since, id)) in jobs.into_iter().enumerate() {
                let waited = now.at.saturating_duration_since(since);
                let fallback = self.fallback_after.saturating_sub(waited);
                let estimate = paced
                    .iter()
                    .enumerate()
                    .map(|(i, &(free_at, pace))| {
                        let queued = if pace > 0.0 {
                            Duration::from_secs_f64(ahead as f64 / pace)
                        } else {
                            MAX_PARK
                        };
                        let start = if i == 0 { Duration::ZERO } else { fallback };
                        start.saturating_add(free_at).saturating_add(queued)
                    })
                    .min()
                    .unwrap_or(Duration::ZERO);
                if estimate > self.park_after {
                    park.insert(id, estimate.clamp(MIN_PARK, MAX_PARK));
                }
            }
        }
        if park.is_empty() {
            return Vec::new();
        }
        self.queue
            .remove_where(|w| park.contains_key(&w.item.job().request_id))
            .into_iter()
            .map(|job| {
                let delay = park
                    .get(&job.item.job().request_id)
                    .copied()
                    .unwrap_or(MIN_PARK);
                let mut message = job.item.job().clone();
                message.waiting_since_ms.get_or_insert_with(|| {
                    let waited = now.at.saturating_duration_since(job.since).as_millis();
                    now.unix_ms - i64::try_from(waited).unwrap_or(0)
                });
                Parked {
                    job,
                    message,
                    delay,
                }
            })
            .collect()
    }

    /// How long until some buffered job could go: a pool frees up or a fallback wait ends.
    fn soonest_wait(&self, pools: &impl PoolView, now: Now) -> Duration {
        let mut soonest = MAX_SLEEP;
        let mut seen: HashMap<&str, Duration> = HashMap::new();
        for waiting in self.queue.iter() {
            let model = waiting.item.job().model.as_str();
            let free = *seen.entry(model).or_insert_with(|| {
                pools
                    .route(model)
                    .iter()
                    .map(|p| p.wait_for(0))
                    .min()
                    .unwrap_or(Duration::ZERO)
            });
            let waited = now.at.saturating_duration_since(waiting.since);
            let fallback = self.fallback_after.saturating_sub(waited);
            soonest = soonest.min(free).min(fallback);
        }
        soonest.max(MIN_SLEEP)
    }
}

/// Which pool of its route a waiting job may use now: `Some(Some(i))` for the route's i-th pool,
/// `Some(None)` for a job without a route, `None` if it must wait. A fallback pool may serve only
/// once the job has waited `fallback_after`, or when every earlier pool of the route is down.
fn usable_pool<T: Buffered>(
    pools: &impl PoolView,
    waiting: &Waiting<T>,
    fallback_after: Duration,
    now: Now,
) -> Option<Option<usize>> {
    let job = waiting.item.job();
    let route = pools.route(&job.model);
    if route.is_empty() {
        return Some(None);
    }
    let patient = now.at.saturating_duration_since(waiting.since) >= fallback_after;
    for (i, pool) in route.iter().enumerate() {
        if i > 0 && !patient && !route[..i].iter().all(|p| p.is_down()) {
            break;
        }
        if pool.wait_for(job.tokens).is_zero() {
            return Some(Some(i));
        }
    }
    None
}

#[cfg(test)]
mod fakes;
#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;
