//! The worker: consumes every lane but `dead`, picks the next job by weighted fair queueing,
//! takes a provider permit, claims the job, calls the provider, and completes, retries or dead-letters it.
//!
//! Alongside run the lease heartbeat, the reaper for leases of dead workers, and the outbox relay.
//! Which job runs next is decided by the pure [`dispatch::Dispatcher`]; this file carries it out.

pub mod dispatch;
mod process;
mod reconcile;
mod telemetry;
mod view;

use dispatch::{Decision, Dispatcher, Now, Parked, Waiting};
use futures::StreamExt;
use serde::Deserialize;
use sluice_broker::{BrokerError, Delivery, PublishOptions};
use sluice_core::{JobRef, Lane, LaneWeights, RequestId, RetryPolicy};
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
use view::RouterView;

/// How a worker behaves; every field has a production default.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Jobs processed at once by this worker.
    pub concurrency: usize,
    /// Jobs held per lane, running or waiting in memory: the unacknowledged messages asked of
    /// the broker, and the bound on the jobs taken from them (a RabbitMQ message may pack
    /// several jobs; the rest of a pack waits in the broker client until one of these ends).
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
    /// A job that waited in its lane this long with no message in sight (the lane's broker
    /// queue had nothing ready) is published again; see `reconcile.rs`. `retry` waits the
    /// retry policy's longest backoff more.
    pub reconcile_after_secs: f64,
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
            reconcile_after_secs: 600.0,
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

    fn reconcile_after(&self) -> Duration {
        Duration::from_secs_f64(self.reconcile_after_secs.max(0.0))
    }

    /// How often the reconciler looks: a tenth of its age, between 1 s and 60 s.
    fn reconcile_every(&self) -> Duration {
        (self.reconcile_after() / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
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
            config.reconcile_after_secs,
        ];
        if finite.iter().any(|s| !s.is_finite() || *s < 0.0) {
            return Err(WorkerError::Config(
                "durations in seconds must be finite and not negative".into(),
            ));
        }
        // Shorter than a second would republish jobs whose message is merely on its way.
        if config.reconcile_after_secs < 1.0 {
            return Err(WorkerError::Config(
                "reconcile_after_secs must be at least 1".into(),
            ));
        }
        if config.concurrency == 0 || config.prefetch == 0 {
            return Err(WorkerError::Config(
                "concurrency and prefetch must be at least 1".into(),
            ));
        }
        let lease = config.lease();
        // One claim and one completion statement in flight per worker: what arrives meanwhile
        // waits for the next, bigger batch. Per job the database then does less (its cost is
        // mostly per statement), and at low load a batch is still one job sent at once
        // (docs/PERFORMANCE.md, sixth round).
        let claim_store = store.clone();
        let claims = Batcher::spawn("claim", 1, 256, move |jobs: Vec<JobRef>| {
            let store = claim_store.clone();
            async move { store.claim_many(&jobs, lease).await }
        });
        let complete_store = store.clone();
        let completions = Batcher::spawn("complete", 1, 256, move |done: Vec<Completion>| {
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
            let held = Arc::new(Semaphore::new(usize::from(self.config.prefetch)));
            tokio::spawn(async move {
                loop {
                    // A job taken holds a permit until it is settled, as an unacked message
                    // would if it carried one job.
                    let permit = tokio::select! {
                        _ = stop.cancelled() => return,
                        permit = Arc::clone(&held).acquire_owned() => match permit {
                            Ok(permit) => permit,
                            Err(_) => return,
                        },
                    };
                    let next = tokio::select! {
                        _ = stop.cancelled() => return,
                        next = stream.next() => next,
                    };
                    match next {
                        Some(Ok(delivery)) => {
                            if tx.send(delivery.holding(permit)).await.is_err() {
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
        let mut dispatcher: Dispatcher<Delivery> = Dispatcher::new(
            self.config.weights,
            self.config.fallback_after(),
            self.config.park_after(),
        );
        tracing::info!(
            message = "worker started",
            concurrency = self.config.concurrency
        );
        'dispatch: loop {
            if dispatcher.is_empty() {
                tokio::select! {
                    _ = shutdown.cancelled() => break 'dispatch,
                    next = rx.recv() => match next {
                        Some(d) => buffer(&mut dispatcher, d).await,
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
                buffer(&mut dispatcher, d).await;
            }
            let (job, pool) = loop {
                match dispatcher.decide(&self.view(), now()) {
                    Decision::Pick { job, pool } => break (job, pool),
                    Decision::Park(parked) => self.park(&mut dispatcher, parked).await,
                    Decision::Sleep { until } => {
                        drop(slot);
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'dispatch,
                            _ = tokio::time::sleep_until(until.into()) => {}
                            next = rx.recv() => match next {
                                Some(d) => buffer(&mut dispatcher, d).await,
                                None => break 'dispatch,
                            },
                        }
                        continue 'dispatch;
                    }
                }
            };
            let permit = match pool {
                Some(index) => {
                    let waiting = job.item();
                    let pool = self.router.route(&waiting.job.model).get(index);
                    let permit = match pool {
                        Some(pool) => pool.try_acquire_for(waiting.job.tokens).await,
                        None => None,
                    };
                    if permit.is_none() {
                        // The pool filled between the check and the take, or another worker
                        // took the shared share: try again shortly.
                        put_back(&mut dispatcher, job).await;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    permit
                }
                None => None,
            };
            let delivery = job.into_item();
            let worker = Arc::clone(&self);
            tokio::spawn(async move {
                worker.process(delivery, permit).await;
                drop(slot);
            });
        }

        consumers.cancel();
        rx.close();
        for delivery in dispatcher.drain() {
            release(delivery).await;
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

    /// The pools and lane pauses as the dispatcher sees them.
    fn view(&self) -> RouterView<'_> {
        RouterView {
            router: &self.router,
            paused_lanes: &self.paused_lanes,
        }
    }

    /// Hand parked jobs back to their lanes with their delays. Each is published before its
    /// message is acked: a crash between the two leaves a duplicate, which the claim's attempt
    /// fence drops, never a lost job. A job that cannot be published stays buffered.
    async fn park(&self, dispatcher: &mut Dispatcher<Delivery>, parked: Vec<Parked<Delivery>>) {
        tracing::debug!(
            message = "parking jobs whose pools are saturated",
            jobs = parked.len()
        );
        let broker = self.publisher.broker();
        let results = futures::future::join_all(parked.into_iter().map(|parked| async move {
            let Parked {
                job,
                message,
                delay,
            } = parked;
            match broker
                .publish(job.item().lane, &message, PublishOptions::delayed(delay))
                .await
            {
                Ok(()) => {
                    ack_quietly(job.into_item()).await;
                    None
                }
                Err(error) => {
                    tracing::warn!(message = "could not park a job; it stays in memory", %error);
                    Some(job)
                }
            }
        }))
        .await;
        for job in results.into_iter().flatten() {
            put_back(dispatcher, job).await;
        }
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

    /// The background duties: lease heartbeats, reaping dead workers' leases, reconciling
    /// lanes with the database, draining the dead lane, settling followers, reading pauses and
    /// sampling endpoint gauges.
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
            self.config.reconcile_every(),
            false,
            stop.clone(),
            |w| async move { w.reconcile().await },
        );
        self.spawn_dead_lane_drain(stop.clone());
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
fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The moment a decision is made for, read once per decision.
fn now() -> Now {
    Now {
        at: Instant::now(),
        unix_ms: unix_now_ms(),
    }
}

async fn buffer(dispatcher: &mut Dispatcher<Delivery>, delivery: Delivery) {
    if let Err(delivery) = dispatcher.push(delivery, now()) {
        // Only `dead` is refused, and workers never consume it.
        release(delivery).await;
    }
}

async fn put_back(dispatcher: &mut Dispatcher<Delivery>, job: Waiting<Delivery>) {
    if let Err(delivery) = dispatcher.put_back(job) {
        release(delivery).await;
    }
}

async fn ack_quietly(delivery: Delivery) {
    if let Err(error) = delivery.ack().await {
        tracing::debug!(message = "ack failed; the broker redelivers and the fence drops it", %error);
    }
}

/// Hand an unstarted message back to its lane.
async fn release(delivery: Delivery) {
    if let Err(error) = delivery.nack(true).await {
        tracing::debug!(message = "could not release a message; the broker redelivers it", %error);
    }
}
