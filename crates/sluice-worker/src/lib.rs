//! The worker: consumes every lane but `dead`, picks the next job by weighted fair queueing,
//! takes a provider permit, claims the job, calls the provider, and completes, retries or dead-letters it.
//!
//! Alongside run the lease heartbeat, the reaper for leases of dead workers, and the outbox relay.

mod process;
mod telemetry;

use futures::StreamExt;
use serde::Deserialize;
use sluice_broker::{BrokerError, Delivery, PublishOptions};
use sluice_core::{FairQueue, JobRef, Lane, LaneWeights, RequestId, RetryPolicy};
use sluice_notify::EventBus;
use sluice_outbox::{Publisher, RelayConfig};
use sluice_providers::Router;
use sluice_store::{Batcher, Claim, Completion, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// How a worker behaves; every field has a production default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs processed at once by this worker.
    pub concurrency: usize,
    /// Unacknowledged messages held per lane: the bound on work waiting in memory.
    pub prefetch: u16,
    /// How long a claim stays valid without a heartbeat.
    pub lease_secs: f64,
    /// How often expired leases are looked for.
    pub reap_interval_secs: f64,
    /// How long shutdown waits for in-flight jobs.
    pub shutdown_grace_secs: f64,
    /// How long a job waits for its route's primary pool before a fallback pool may serve it.
    pub fallback_after_secs: f64,
    /// A job whose pools could not serve it for longer than this (by their current pace and the
    /// jobs ahead of it) is parked back in its lane with a delay, so the worker's bounded buffer
    /// holds jobs that can run soon and a saturated pool holds up no one bound elsewhere.
    pub park_after_secs: f64,
    pub weights: LaneWeights,
    pub retry: RetryPolicy,
    /// Where the worker process serves `GET /metrics` (Prometheus text); none by default.
    /// Served by the `sluice` binary, which owns the recorder; port 0 picks a free one.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            prefetch: 64,
            lease_secs: 60.0,
            reap_interval_secs: 5.0,
            shutdown_grace_secs: 30.0,
            fallback_after_secs: 10.0,
            park_after_secs: 2.0,
            weights: LaneWeights::default(),
            retry: RetryPolicy::default(),
            metrics_listen: None,
        }
    }
}

impl WorkerConfig {
    fn lease(&self) -> Duration {
        Duration::from_secs_f64(self.lease_secs.max(0.1))
    }

    fn fallback_after(&self) -> Duration {
        Duration::from_secs_f64(self.fallback_after_secs.max(0.0))
    }

    fn park_after(&self) -> Duration {
        Duration::from_secs_f64(self.park_after_secs.max(0.0))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("could not start consuming: {0}")]
    Consume(#[from] BrokerError),
    #[error("invalid worker configuration: {0}")]
    Config(String),
}

/// Jobs this worker holds a claim on, with their fencing attempt, for the heartbeat.
#[derive(Default, Clone)]
pub(crate) struct Held(Arc<Mutex<HashMap<RequestId, i32>>>);

impl Held {
    fn insert(&self, id: RequestId, attempt: i32) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, attempt);
    }
    fn remove(&self, id: RequestId) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
    fn snapshot(&self) -> Vec<(RequestId, i32)> {
        let held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        held.iter().map(|(id, a)| (*id, *a)).collect()
    }
}

/// A worker process's moving parts.
pub struct Worker {
    pub(crate) store: Store,
    /// Claims and completions from concurrent jobs share statements.
    pub(crate) claims: Batcher<JobRef, Option<Claim>>,
    pub(crate) completions: Batcher<Completion, bool>,
    pub(crate) publisher: Publisher,
    pub(crate) router: Arc<Router>,
    pub(crate) config: WorkerConfig,
    pub(crate) held: Held,
    /// Where state changes and streamed text are announced to API nodes.
    pub(crate) bus: EventBus,
    /// Lanes an operator paused, by [`Lane::index`]: their jobs stay buffered, untaken,
    /// until resumed. Read on every pick, so no lock.
    pub(crate) paused_lanes: [AtomicBool; Lane::ALL.len()],
}

impl Worker {
    pub fn new(
        store: Store,
        publisher: Publisher,
        router: Arc<Router>,
        config: WorkerConfig,
        bus: EventBus,
    ) -> Result<Arc<Worker>, WorkerError> {
        config
            .retry
            .validate()
            .map_err(|e| WorkerError::Config(e.to_string()))?;
        let finite = [
            config.lease_secs,
            config.reap_interval_secs,
            config.shutdown_grace_secs,
            config.fallback_after_secs,
            config.park_after_secs,
        ];
        if finite.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(WorkerError::Config(
                "durations in seconds must be finite and not negative".into(),
            ));
        }
        if config.concurrency == 0 || config.prefetch == 0 {
            return Err(WorkerError::Config(
                "concurrency and prefetch must be at least 1".into(),
            ));
        }
        let lease = config.lease();
        let claim_store = store.clone();
        let claims = Batcher::spawn(2, 256, move |jobs: Vec<JobRef>| {
            let store = claim_store.clone();
            async move { store.claim_many(&jobs, lease).await }
        });
        let complete_store = store.clone();
        let completions = Batcher::spawn(2, 256, move |done: Vec<Completion>| {
            let store = complete_store.clone();
            async move { store.complete_many(&done).await }
        });
        Ok(Arc::new(Worker {
            store,
            claims,
            completions,
            publisher,
            router,
            config,
            held: Held::default(),
            bus,
            paused_lanes: Default::default(),
        }))
    }

    /// Run until `shutdown` fires: stop taking work, give back what was not started,
    /// and wait (up to the grace period) for jobs in flight.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), WorkerError> {
        let (tx, mut rx) = mpsc::channel::<Delivery>(usize::from(self.config.prefetch) * 4);
        let consumers = CancellationToken::new();
        for lane in Lane::CONSUMED {
            let mut stream = self
                .publisher
                .broker()
                .consume(lane, self.config.prefetch)
                .await?;
            let tx = tx.clone();
            let stop = consumers.clone();
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(delivery)) => {
                            if tx.send(delivery).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(error)) => {
                            tracing::warn!(message = "lane consumer error", %lane, %error);
                        }
                        None => return,
                    }
                }
            });
        }
        drop(tx);

        let background = CancellationToken::new();
        self.spawn_background(&background);
        sluice_outbox::spawn_relay(
            self.store.clone(),
            self.publisher.clone(),
            RelayConfig::default(),
            background.clone(),
        );

        let slots = Arc::new(Semaphore::new(self.config.concurrency));
        let mut queue: FairQueue<Waiting> = FairQueue::new(self.config.weights);
        let mut next_park = Instant::now();
        tracing::info!(
            message = "worker started",
            concurrency = self.config.concurrency
        );
        'dispatch: loop {
            if queue.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'dispatch,
                    next = rx.recv() => match next {
                        Some(d) => enqueue(&mut queue, d).await,
                        None => break 'dispatch,
                    },
                }
                continue;
            }
            let slot = tokio::select! {
                _ = shutdown.cancelled() => break 'dispatch,
                slot = Arc::clone(&slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => break 'dispatch,
                },
            };
            // Everything that arrived meanwhile competes for this pick.
            while let Ok(d) = rx.try_recv() {
                enqueue(&mut queue, d).await;
            }
            if Instant::now() >= next_park {
                self.park_overdue(&mut queue).await;
                next_park = Instant::now() + PARK_CHECK_EVERY;
            }
            // Only jobs one of whose pools can serve now compete, so a saturated pool holds
            // up no one else; a job turned away with a 429 goes first once its pool has room.
            let runnable =
                |w: &Waiting| !self.lane_paused(w.delivery.lane) && self.usable_pool(w).is_some();
            let picked = queue
                .pop_where(|w| w.delivery.job.rate_limited && runnable(w))
                .or_else(|| queue.pop_where(runnable));
            let Some((_, _, waiting)) = picked else {
                drop(slot);
                let wait = self.soonest_wait(&queue);
                tokio::select! {
                    _ = shutdown.cancelled() => break 'dispatch,
                    _ = tokio::time::sleep(wait) => {}
                    next = rx.recv() => match next {
                        Some(d) => enqueue(&mut queue, d).await,
                        None => break 'dispatch,
                    },
                }
                continue;
            };
            let permit = match self.usable_pool(&waiting) {
                Some(Some(index)) => {
                    let pool = &self.router.route(&waiting.delivery.job.model)[index];
                    match pool.try_acquire_for(waiting.delivery.job.tokens).await {
                        Some(permit) => Some(permit),
                        None => {
                            // The pool filled between the check and the take, or another
                            // worker took the shared share: try again shortly.
                            requeue(&mut queue, waiting).await;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let delivery = waiting.delivery;
            let worker = Arc::clone(&self);
            tokio::spawn(async move {
                worker.process(delivery, permit).await;
                drop(slot);
            });
        }

        consumers.cancel();
        rx.close();
        while let Some((_, _, waiting)) = queue.pop() {
            release(waiting.delivery).await;
        }
        while let Ok(delivery) = rx.try_recv() {
            release(delivery).await;
        }
        let all = u32::try_from(self.config.concurrency).unwrap_or(u32::MAX);
        let grace = Duration::from_secs_f64(self.config.shutdown_grace_secs.max(0.0));
        if tokio::time::timeout(grace, slots.acquire_many(all))
            .await
            .is_err()
        {
            tracing::warn!(
                message = "shutdown grace ran out; unfinished jobs return when their leases expire"
            );
        }
        background.cancel();
        tracing::info!(message = "worker stopped");
        Ok(())
    }

    /// Which pool of its route a waiting job may use now: `Some(Some(i))` for the route's
    /// i-th pool, `Some(None)` for a job without a route (dead-lettered at once), `None` if it
    /// must wait. Fallback pools are used only once the job has waited `fallback_after` or every
    /// earlier pool of the route is down.
    fn usable_pool(&self, waiting: &Waiting) -> Option<Option<usize>> {
        let route = self.router.route(&waiting.delivery.job.model);
        if route.is_empty() {
            return Some(None);
        }
        let patient = waiting.since.elapsed() >= self.config.fallback_after();
        for (i, pool) in route.iter().enumerate() {
            if i > 0 && !patient && !route[..i].iter().all(|p| p.is_down()) {
                break;
            }
            if pool.wait_time_for(waiting.delivery.job.tokens).is_zero() {
                return Some(Some(i));
            }
        }
        None
    }

    /// Hand back to the broker, with a delay, the jobs that would wait longer than
    /// `park_after` here: the wait of each is estimated from its primary pool's next free slot
    /// plus the jobs ahead of it at the pool's current pace (or the end of its fallback wait).
    async fn park_overdue(&self, queue: &mut FairQueue<Waiting>) {
        let park_after = self.config.park_after();
        let mut blocked: HashMap<&str, Vec<(bool, Instant, RequestId)>> = HashMap::new();
        for waiting in queue.iter() {
            if self.usable_pool(waiting).is_none() {
                let job = &waiting.delivery.job;
                blocked.entry(job.model.as_str()).or_default().push((
                    !job.rate_limited,
                    waiting.since,
                    job.request_id,
                ));
            }
        }
        let mut park: HashMap<RequestId, Duration> = HashMap::new();
        for (model, mut jobs) in blocked {
            let route = self.router.route(model);
            // Each pool's next free slot and pace; fallbacks count only after the fallback wait.
            let pools: Vec<(Duration, f64)> = route
                .iter()
                .map(|p| (p.wait_time(), p.capacity_per_sec()))
                .collect();
            // Jobs turned away with a 429 first, then by arrival: the order they would run in.
            jobs.sort_unstable();
            for (ahead, (_, since, id)) in jobs.into_iter().enumerate() {
                let fallback = self.config.fallback_after().saturating_sub(since.elapsed());
                let estimate = pools
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
                if estimate > park_after {
                    park.insert(id, estimate.clamp(MIN_PARK, MAX_PARK));
                }
            }
        }
        if park.is_empty() {
            return;
        }
        let parked = queue.remove_where(|w| park.contains_key(&w.delivery.job.request_id));
        tracing::debug!(
            message = "parking jobs whose pools are saturated",
            jobs = parked.len()
        );
        let broker = self.publisher.broker();
        let results = futures::future::join_all(parked.into_iter().map(|waiting| {
            let delay = park
                .get(&waiting.delivery.job.request_id)
                .copied()
                .unwrap_or(MIN_PARK);
            let mut job = waiting.delivery.job.clone();
            job.waiting_since_ms.get_or_insert_with(|| {
                let waited = i64::try_from(waiting.since.elapsed().as_millis()).unwrap_or(0);
                unix_now_ms() - waited
            });
            let lane = waiting.delivery.lane;
            async move {
                // Published before the ack: a crash between the two leaves a duplicate, which
                // the claim's attempt fence drops, never a lost job.
                match broker
                    .publish(lane, &job, PublishOptions::delayed(delay))
                    .await
                {
                    Ok(()) => {
                        ack_quietly(waiting.delivery).await;
                        None
                    }
                    Err(error) => {
                        tracing::warn!(message = "could not park a job; it stays in memory", %error);
                        Some(waiting)
                    }
                }
            }
        }))
        .await;
        for waiting in results.into_iter().flatten() {
            requeue(queue, waiting).await;
        }
    }

    /// How long until some waiting job could go: a pool frees up or a fallback timer runs out.
    /// Bounded, so new deliveries and shutdown are still noticed promptly.
    fn soonest_wait(&self, queue: &FairQueue<Waiting>) -> Duration {
        let mut soonest = Duration::from_millis(250);
        let mut seen: HashMap<&str, Duration> = HashMap::new();
        for waiting in queue.iter() {
            let model = waiting.delivery.job.model.as_str();
            let pools = *seen.entry(model).or_insert_with(|| {
                self.router
                    .route(model)
                    .iter()
                    .map(|p| p.wait_time())
                    .min()
                    .unwrap_or(Duration::ZERO)
            });
            let fallback = self
                .config
                .fallback_after()
                .saturating_sub(waiting.since.elapsed());
            soonest = soonest.min(pools).min(fallback);
        }
        soonest.max(Duration::from_millis(1))
    }

    /// Run `tick` on this worker every `period` until `stop` fires; the first run comes at
    /// once when `now`, else after one period.
    fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        period: Duration,
        now: bool,
        stop: CancellationToken,
        tick: F,
    ) where
        F: Fn(Arc<Worker>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let worker = Arc::clone(self);
        tokio::spawn(async move {
            if now {
                tick(Arc::clone(&worker)).await;
            }
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                tick(Arc::clone(&worker)).await;
            }
        });
    }

    /// The background duties: lease heartbeats, reaping dead workers' leases, settling
    /// followers, reading pauses and sampling endpoint gauges.
    fn spawn_background(self: &Arc<Self>, stop: &CancellationToken) {
        let lease = self.config.lease();
        let reap_every = Duration::from_secs_f64(self.config.reap_interval_secs.max(0.05));
        self.spawn_every(lease / 3, false, stop.clone(), |w| async move {
            w.heartbeat().await
        });
        self.spawn_every(reap_every, false, stop.clone(), |w| async move {
            w.reap().await
        });
        self.spawn_every(
            SETTLE_FOLLOWERS_EVERY,
            false,
            stop.clone(),
            |w| async move { w.settle_followers().await },
        );
        self.spawn_every(READ_PAUSES_EVERY, true, stop.clone(), |w| async move {
            w.read_pauses().await
        });
        // Limit use and breakers change with time, not only with calls: read on a clock.
        self.spawn_every(SAMPLE_ENDPOINTS_EVERY, true, stop.clone(), |w| async move {
            telemetry::endpoints(&w.router)
        });
    }

    async fn heartbeat(&self) {
        let held = self.held.snapshot();
        let lease = self.config.lease();
        if let Err(error) = self.store.heartbeat(&held, lease).await {
            tracing::warn!(message = "lease heartbeat failed", %error, jobs = held.len());
        }
    }

    async fn reap(&self) {
        match self
            .store
            .reap_expired(self.config.retry.max_attempts, 500)
            .await
        {
            Ok(messages) if messages.is_empty() => {}
            Ok(messages) => {
                tracing::warn!(
                    message = "requeued jobs whose worker stopped",
                    jobs = messages.len()
                );
                for m in &messages {
                    self.bus.changed(m.job.request_id, &m.job.tenant);
                }
                if let Err(error) = self.publisher.publish_many(messages).await {
                    tracing::warn!(message = "publishing reaped jobs failed; the relay will retry", %error);
                }
            }
            Err(error) => tracing::warn!(message = "reaper failed", %error),
        }
    }

    /// Give jobs attached to an identical one the outcome it ended with, when completion did
    /// not already (a failure, a cancel, or a follower attached as its leader finished).
    async fn settle_followers(&self) {
        match self.store.settle_followers(500).await {
            Ok(settled) => {
                for (id, tenant) in &settled.finished {
                    self.bus.changed(*id, tenant);
                }
                if !settled.released.is_empty() {
                    tracing::info!(
                        message = "jobs whose identical job was cancelled run on their own",
                        jobs = settled.released.len()
                    );
                    if let Err(error) = self.publisher.publish_many(settled.released).await {
                        tracing::warn!(message = "publishing released jobs failed; the relay will retry", %error);
                    }
                }
            }
            Err(error) => tracing::warn!(message = "settling followers failed", %error),
        }
    }

    fn lane_paused(&self, lane: Lane) -> bool {
        self.paused_lanes[lane.index()].load(Ordering::Relaxed)
    }

    /// Read what operators paused: lanes this worker stops taking jobs from, and endpoints its
    /// pools stop calling.
    async fn read_pauses(&self) {
        match self.store.pauses().await {
            Ok(targets) => {
                let endpoints: std::collections::HashSet<String> = targets
                    .iter()
                    .filter_map(|t| t.strip_prefix("endpoint:"))
                    .map(str::to_owned)
                    .collect();
                self.router.set_paused_endpoints(&endpoints);
                for lane in Lane::ALL {
                    let paused = targets.iter().any(|t| {
                        t.strip_prefix("lane:")
                            .is_some_and(|name| name == lane.as_str())
                    });
                    self.paused_lanes[lane.index()].store(paused, Ordering::Relaxed);
                }
            }
            // Keep the last known pauses: an outage must not resume what was paused.
            Err(error) => tracing::warn!(message = "could not read pauses", %error),
        }
    }
}

/// How often endpoint gauges are refreshed.
const SAMPLE_ENDPOINTS_EVERY: Duration = Duration::from_secs(1);
/// How often followers of finished jobs are looked for.
const SETTLE_FOLLOWERS_EVERY: Duration = Duration::from_secs(1);
/// How often operators' pauses are read.
const READ_PAUSES_EVERY: Duration = Duration::from_secs(1);
/// How often the buffer is checked for jobs to park.
const PARK_CHECK_EVERY: Duration = Duration::from_millis(250);
/// Bounds of a parking delay: long enough not to churn, short enough to notice a freed pool.
const MIN_PARK: Duration = Duration::from_secs(1);
const MAX_PARK: Duration = Duration::from_secs(60);

/// A delivery in the worker's buffer, with since when it has waited for a pool (for fallback
/// decisions; a parked job keeps its first wait's start).
struct Waiting {
    delivery: Delivery,
    since: Instant,
}

fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

async fn enqueue(queue: &mut FairQueue<Waiting>, delivery: Delivery) {
    let now = Instant::now();
    let since = delivery
        .job
        .waiting_since_ms
        .and_then(|ms| u64::try_from(unix_now_ms().saturating_sub(ms)).ok())
        .and_then(|waited| now.checked_sub(Duration::from_millis(waited)))
        .unwrap_or(now);
    requeue(queue, Waiting { delivery, since }).await;
}

async fn ack_quietly(delivery: Delivery) {
    if let Err(error) = delivery.ack().await {
        tracing::debug!(message = "ack failed; the broker redelivers and the fence drops it", %error);
    }
}

async fn requeue(queue: &mut FairQueue<Waiting>, waiting: Waiting) {
    let lane = waiting.delivery.lane;
    let tenant = waiting.delivery.job.tenant.clone();
    if let Err(waiting) = queue.push(lane, &tenant, waiting) {
        // Only `dead` is refused, and workers never consume it.
        release(waiting.delivery).await;
    }
}

/// Hand an unstarted message back to its lane.
async fn release(delivery: Delivery) {
    if let Err(error) = delivery.nack(true).await {
        tracing::debug!(message = "could not release a message; the broker redelivers it", %error);
    }
}
