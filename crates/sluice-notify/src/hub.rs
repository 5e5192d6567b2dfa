//! The API node's fan-out: subscriptions to jobs (or to all of a user's jobs) receive each
//! stored state change exactly once and in order, read from the event log when the bus says
//! a job changed, and again by a periodic poll that makes good what the bus lost.
//!
//! Each subscription remembers the last sequence number it saw per job, so duplicates from
//! the bus and the poll are dropped and gaps are filled from the log. A subscriber that does
//! not keep up (its buffer passes its bound in bytes) is cut off, emptied and dropped at once:
//! each message is encoded once and shared, and the hub never waits for a subscriber.

use crate::bus::{BusMessage, EventBus};
use crate::send_queue::{Frame, Pushed, SendQueue};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sluice_core::{JobState, RequestId};
use sluice_store::{OwnedEvent, Store};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

/// How an API node treats its stream subscribers (`[streams]` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamsConfig {
    /// Bytes of messages (their JSON, plus a small charge per message) a subscriber may have
    /// waiting before it counts as too slow and is cut off.
    pub buffer_bytes: usize,
    /// How long one write to a WebSocket subscriber may block (the peer not reading) before
    /// the connection is dropped. (An SSE response is written by the HTTP server, which has
    /// no write timeout yet.)
    pub write_timeout_secs: f64,
    /// How long a cut-off WebSocket may take to send what was under way and its close frame
    /// before the connection is dropped anyway (a peer that does not read never takes it).
    pub close_timeout_secs: f64,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            buffer_bytes: 1 << 20,
            write_timeout_secs: 10.0,
            close_timeout_secs: 5.0,
        }
    }
}

/// The smallest bound: one ordinary message must fit.
const MIN_BUFFER_BYTES: usize = 1_024;

impl StreamsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.buffer_bytes < MIN_BUFFER_BYTES {
            return Err(format!(
                "streams.buffer_bytes must be at least {MIN_BUFFER_BYTES}"
            ));
        }
        for (name, secs) in [
            ("write_timeout_secs", self.write_timeout_secs),
            ("close_timeout_secs", self.close_timeout_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                return Err(format!(
                    "streams.{name} must be a positive number of seconds, at most a day"
                ));
            }
        }
        Ok(())
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.write_timeout_secs)
    }

    pub fn close_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.close_timeout_secs)
    }
}

/// What a subscriber receives: the JSON messages of the WebSocket and SSE streams.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outgoing {
    /// A stored state change; `seq` counts from 1 per job without gaps.
    Event {
        request_id: RequestId,
        seq: i32,
        state: JobState,
        at: DateTime<Utc>,
        #[serde(skip_serializing_if = "Option::is_none")]
        detail: Option<serde_json::Value>,
    },
    /// Text streamed by a running job, in order from `index` 0 for each `attempt`: a retried
    /// job streams its answer again under a higher attempt.
    Delta {
        request_id: RequestId,
        attempt: i32,
        index: u32,
        text: String,
    },
}

impl Outgoing {
    fn event(e: &OwnedEvent) -> Outgoing {
        Outgoing::Event {
            request_id: e.request_id,
            seq: e.event.seq,
            state: e.event.state,
            at: e.event.at,
            detail: e.event.detail.clone(),
        }
    }

    /// True for the event of a terminal state.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Outgoing::Event { state, .. } if state.is_terminal())
    }
}

/// The fan-out of one API node; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    store: Store,
    config: StreamsConfig,
    subs: Mutex<HashMap<u64, Sub>>,
    next_id: AtomicU64,
}

struct Sub {
    tenant: String,
    /// Set for a subscription to all of this user's jobs.
    user: Option<String>,
    /// When a user-wide subscription began: earlier events of its jobs are not sent.
    since: DateTime<Utc>,
    /// Jobs followed, with the last sequence number sent.
    jobs: HashMap<RequestId, i32>,
    queue: Arc<SendQueue>,
}

impl Sub {
    /// Whether this subscription wants `event`, given what it already has.
    fn wants(&self, e: &OwnedEvent) -> bool {
        if e.tenant != self.tenant {
            return false;
        }
        match self.jobs.get(&e.request_id) {
            Some(&last) => e.event.seq > last,
            None => self.user.as_deref() == Some(e.user_id.as_str()) && e.event.at >= self.since,
        }
    }

    /// Queue `frame`; false once the subscriber is too slow or gone (it is then dropped).
    fn send(&self, frame: &Arc<Frame>) -> bool {
        match self.queue.push(frame) {
            Pushed::Queued => true,
            Pushed::Overflowed => {
                tracing::debug!(message = "a subscriber too slow to keep up was cut off");
                false
            }
            Pushed::Gone => false,
        }
    }
}

impl Hub {
    /// Start the hub: it listens on `bus` and polls the log every `poll.every` for jobs its
    /// subscribers follow, until `shutdown`.
    pub fn spawn(
        store: Store,
        bus: &EventBus,
        poll: Poll,
        config: StreamsConfig,
        shutdown: CancellationToken,
    ) -> Hub {
        let hub = Hub {
            inner: Arc::new(HubInner {
                store,
                config,
                subs: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        };
        tokio::spawn(listen(hub.clone(), bus.subscribe(), shutdown.clone()));
        tokio::spawn(poll_loop(hub.clone(), poll, shutdown));
        hub
    }

    /// A new subscription for `tenant`, following nothing yet.
    pub fn subscribe(&self, tenant: &str) -> Subscription {
        let queue = Arc::new(SendQueue::new(self.inner.config.buffer_bytes));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner.lock().insert(
            id,
            Sub {
                tenant: tenant.to_owned(),
                user: None,
                since: Utc::now(),
                jobs: HashMap::new(),
                queue: Arc::clone(&queue),
            },
        );
        Subscription {
            id,
            hub: self.clone(),
            queue,
        }
    }

    /// Bring every subscriber of `jobs` up to date from the log, up to events `settle` old.
    async fn refresh(&self, jobs: &[RequestId], settle: Duration) {
        let wanted: Vec<(RequestId, i32)> = {
            let subs = self.inner.lock();
            jobs.iter()
                .filter_map(|id| {
                    subs.values()
                        .filter_map(|s| s.jobs.get(id))
                        .min()
                        .map(|&last| (*id, last))
                })
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        match self.inner.store.events_after(&wanted, settle).await {
            Ok(events) => self.deliver(&events),
            Err(error) => tracing::warn!(message = "could not read job events", %error),
        }
    }

    /// Jobs changed: read, in one query, the new events of those anyone could want.
    async fn changed(&self, jobs: &[(RequestId, String)]) {
        let wanted: Vec<(RequestId, i32)> = {
            let subs = self.inner.lock();
            jobs.iter()
                .filter_map(|(id, tenant)| {
                    subs.values()
                        .filter(|s| &s.tenant == tenant)
                        .filter_map(|sub| match (sub.jobs.get(id), &sub.user) {
                            (Some(&last), _) => Some(last),
                            (None, Some(_)) => Some(0),
                            (None, None) => None,
                        })
                        .min()
                        .map(|after| (*id, after))
                })
                .collect()
        };
        if wanted.is_empty() {
            return;
        }
        match self.inner.store.events_after(&wanted, Duration::ZERO).await {
            Ok(events) => self.deliver(&events),
            Err(error) => tracing::warn!(message = "could not read job events", %error),
        }
    }

    /// Send each subscriber the events it has not had, in order; drop the ones too slow.
    /// Each event is encoded once, when the first subscriber wants it, and shared.
    fn deliver(&self, events: &[OwnedEvent]) {
        let mut frames: Vec<Option<Arc<Frame>>> = vec![None; events.len()];
        let mut subs = self.inner.lock();
        let mut gone = Vec::new();
        for (id, sub) in subs.iter_mut() {
            for (e, frame) in events.iter().zip(frames.iter_mut()) {
                if !sub.wants(e) {
                    continue;
                }
                let frame = frame.get_or_insert_with(|| Frame::new(Outgoing::event(e)));
                if !sub.send(frame) {
                    gone.push(*id);
                    break;
                }
                sub.jobs.insert(e.request_id, e.event.seq);
            }
        }
        for id in gone {
            subs.remove(&id);
        }
    }

    fn delta(&self, request_id: RequestId, tenant: &str, attempt: i32, index: u32, text: &str) {
        let mut frame = None;
        let mut subs = self.inner.lock();
        let mut gone = Vec::new();
        for (id, sub) in subs.iter() {
            if sub.tenant == tenant && sub.jobs.contains_key(&request_id) {
                let frame = frame.get_or_insert_with(|| {
                    Frame::new(Outgoing::Delta {
                        request_id,
                        attempt,
                        index,
                        text: text.to_owned(),
                    })
                });
                if !sub.send(frame) {
                    gone.push(*id);
                }
            }
        }
        for id in gone {
            subs.remove(&id);
        }
    }

    /// The settings subscribers' connections follow.
    pub fn config(&self) -> StreamsConfig {
        self.inner.config
    }

    /// Subscribers right now (for metrics and tests).
    pub fn subscribers(&self) -> usize {
        self.inner.lock().len()
    }
}

impl HubInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Sub>> {
        // Plain maps updated in single steps: nothing to repair after a panic elsewhere.
        self.subs.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One subscriber's stream of messages. Dropping it ends the subscription.
pub struct Subscription {
    id: u64,
    hub: Hub,
    queue: Arc<SendQueue>,
}

impl Subscription {
    /// Follow a job from after sequence number `after` (0: from the start); the stored events
    /// after it are sent at once. The caller has checked that the job is the tenant's.
    pub async fn follow(&self, id: RequestId, after: i32) {
        let added = match self.hub.inner.lock().get_mut(&self.id) {
            Some(sub) => {
                sub.jobs.entry(id).or_insert(after);
                true
            }
            None => false,
        };
        if added {
            self.hub.refresh(&[id], Duration::ZERO).await;
        }
    }

    /// Stop following a job.
    pub fn unfollow(&self, id: RequestId) {
        if let Some(sub) = self.hub.inner.lock().get_mut(&self.id) {
            sub.jobs.remove(&id);
        }
    }

    /// How many jobs this subscription follows by id.
    pub fn followed(&self) -> usize {
        self.hub
            .inner
            .lock()
            .get(&self.id)
            .map_or(0, |sub| sub.jobs.len())
    }

    /// Follow every job of `user` (in this subscription's tenant) that changes from now on.
    pub fn follow_user(&self, user: &str) {
        if let Some(sub) = self.hub.inner.lock().get_mut(&self.id) {
            sub.user = Some(user.to_owned());
            sub.since = Utc::now();
        }
    }

    /// The next message; `None` once the subscription was cut off (see [`Self::overloaded`]).
    pub async fn recv(&mut self) -> Option<Outgoing> {
        self.recv_frame().await.map(|f| f.message().clone())
    }

    /// The next message if one is waiting now. After [`Self::follow`] returns, the job's stored
    /// events after `after` are already waiting.
    pub fn try_recv(&mut self) -> Option<Outgoing> {
        self.try_recv_frame().map(|f| f.message().clone())
    }

    /// The next message, encoded and shared with the other subscribers; `None` once cut off.
    pub async fn recv_frame(&mut self) -> Option<Arc<Frame>> {
        self.queue.pop().await
    }

    /// The next encoded message if one is waiting now.
    pub fn try_recv_frame(&mut self) -> Option<Arc<Frame>> {
        self.queue.try_pop()
    }

    /// True if the subscription was cut off because its buffer passed its bound.
    pub fn overloaded(&self) -> bool {
        self.queue.is_cut()
    }

    /// Wait until the subscription is cut off for passing its bound (for a writer blocked
    /// on its connection, which must then stop and say why).
    pub async fn cut_off(&self) {
        self.queue.cut_off().await
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.inner.lock().remove(&self.id);
        self.queue.close();
    }
}

/// State changes waiting to be read from the log; beyond this the poll catches up.
const CHANGED_QUEUE: usize = 16_384;
/// Jobs whose new events are read in one query.
const CHANGED_BATCH: usize = 512;

/// Forward the bus: deltas at once, state changes through [`read_changes`], so a slow query
/// never holds up the deltas behind it. A job's deltas still precede the state change they
/// came before: that change is only read from the log after its bus message arrived.
async fn listen(hub: Hub, mut bus: broadcast::Receiver<BusMessage>, shutdown: CancellationToken) {
    let (changes, queue) = mpsc::channel(CHANGED_QUEUE);
    tokio::spawn(read_changes(hub.clone(), queue));
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return,
            message = bus.recv() => message,
        };
        match message {
            Ok(BusMessage::Changed { request_id, tenant }) => {
                if changes.try_send((request_id, tenant)).is_err() {
                    tracing::debug!(message = "state changes backed up; the poll catches up");
                }
            }
            Ok(BusMessage::Delta {
                request_id,
                tenant,
                attempt,
                index,
                text,
            }) => hub.delta(request_id, &tenant, attempt, index, &text),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::warn!(
                    message = "the hub fell behind the event bus; the poll catches up",
                    missed
                );
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Read changed jobs' new events, whatever has queued up in one query.
async fn read_changes(hub: Hub, mut queue: mpsc::Receiver<(RequestId, String)>) {
    let mut batch = Vec::with_capacity(CHANGED_BATCH);
    while queue.recv_many(&mut batch, CHANGED_BATCH).await > 0 {
        batch.sort_unstable();
        batch.dedup();
        hub.changed(&batch).await;
        batch.clear();
    }
}

/// A user-wide subscription as the poll reads it: tenant, user, since when.
type UserFollow = (String, String, DateTime<Utc>);

/// How the hub reads the log to make good what the bus lost.
#[derive(Debug, Clone, Copy)]
pub struct Poll {
    /// How often.
    pub every: Duration,
    /// Events younger than this are left to the bus, which delivers a job's deltas before the
    /// state change that follows them; zero when the bus does not reach other processes.
    pub settle: Duration,
}

/// Make good what the bus lost: followed jobs' new events, and user-wide subscriptions'.
async fn poll_loop(hub: Hub, poll: Poll, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(poll.every) => {}
        }
        let (jobs, users): (Vec<RequestId>, Vec<UserFollow>) = {
            let subs = hub.inner.lock();
            let mut jobs: Vec<RequestId> =
                subs.values().flat_map(|s| s.jobs.keys().copied()).collect();
            jobs.sort_unstable();
            jobs.dedup();
            // One read per user however many of its subscriptions are open (hundreds of
            // sockets of one user must not cost hundreds of queries a poll), from the
            // earliest start among them: `deliver` filters each by its own.
            let mut users: HashMap<(&str, &str), DateTime<Utc>> = HashMap::new();
            for s in subs.values() {
                if let Some(user) = &s.user {
                    let since = users.entry((&s.tenant, user)).or_insert(s.since);
                    *since = (*since).min(s.since);
                }
            }
            let users = users
                .into_iter()
                .map(|((tenant, user), since)| (tenant.to_owned(), user.to_owned(), since))
                .collect();
            (jobs, users)
        };
        hub.refresh(&jobs, poll.settle).await;
        for (tenant, user, since) in users {
            match hub
                .inner
                .store
                .user_events_since(&tenant, &user, since, poll.settle)
                .await
            {
                Ok(events) => hub.deliver(&events),
                Err(error) => {
                    tracing::warn!(message = "could not read a user's job events", %error)
                }
            }
        }
    }
}
