//! Consumers: a stream that claims messages in batches of its free prefetch slots, a
//! heartbeat that keeps its held claims alive, and the handles that settle them.
//!
//! Claiming is driven by the stream being polled, so a consumer nobody reads takes no
//! work away from other consumers (other processes) that could do it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use sluice_broker::{Acknowledge, BrokerError, Consumer, Delivery, JobRef, Lane};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::{micros, timed, Shared, SqlQueueError};
use sluice_broker::Backoff;

/// Most messages one claim statement takes, however large the prefetch.
const MAX_CLAIM: usize = 256;
/// Shortest idle wait, so a lane whose ready rows are all being claimed by others
/// does not make this consumer spin.
const MIN_IDLE_WAIT: Duration = Duration::from_millis(10);
/// Waking a moment after a delayed message is due, rather than a moment before it.
const DUE_SLACK: Duration = Duration::from_millis(2);

/// The claims a consumer's deliveries hold, `id -> claim token`, for the heartbeat.
#[derive(Default)]
struct Held {
    claims: Mutex<HashMap<i64, i64>>,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, i64>> {
        self.claims.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn insert(&self, id: i64, token: i64) {
        self.lock().insert(id, token);
    }

    fn remove(&self, id: i64, token: i64) {
        let mut claims = self.lock();
        if claims.get(&id) == Some(&token) {
            claims.remove(&id);
        }
    }

    fn snapshot(&self) -> Vec<(i64, i64)> {
        self.lock()
            .iter()
            .map(|(id, token)| (*id, *token))
            .collect()
    }
}

/// A claimed message not yet handed to the reader of the stream.
struct Claimed {
    id: i64,
    token: i64,
    job: JobRef,
    redelivered: bool,
    reason: Option<String>,
    permit: OwnedSemaphorePermit,
}

pub(crate) async fn start(
    shared: Arc<Shared>,
    lane: Lane,
    prefetch: u16,
) -> Result<Consumer, BrokerError> {
    // Look once up front so a missing table or a dead database fails the call.
    timed(shared.db.next_available_in_us(lane))
        .await
        .map_err(|e| BrokerError::Consume {
            queue: shared.queue_name(lane),
            source: Box::new(e),
        })?;
    let held = Arc::new(Held::default());
    tokio::spawn(heartbeat(shared.clone(), Arc::downgrade(&held)));
    let state = ConsumeState {
        shared,
        lane,
        // A prefetch of 0 would never deliver anything, which is never what a caller means.
        slots: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        held,
        buffer: VecDeque::new(),
        pause: None,
        backoff: Backoff::default(),
    };
    Ok(Box::pin(futures::stream::unfold(
        state,
        |mut state| async move {
            let item = state.next().await;
            Some((item, state))
        },
    )))
}

/// Extends the visibility of every claim the consumer's deliveries hold, every third of
/// the visibility timeout, until the consumer and all its deliveries are gone.
async fn heartbeat(shared: Arc<Shared>, held: Weak<Held>) {
    let visibility = shared.config.visibility();
    let every = visibility / 3;
    loop {
        tokio::time::sleep(every).await;
        let Some(claims) = held.upgrade().map(|held| held.snapshot()) else {
            return;
        };
        if claims.is_empty() {
            continue;
        }
        match timed(shared.db.extend(&claims, micros(visibility))).await {
            Ok(extended) => {
                if extended < claims.len() as u64 {
                    // Settled in the meantime, or lost to an expiry: the ack will tell.
                    debug!(
                        held = claims.len(),
                        extended, "some claims were not extended"
                    );
                }
            }
            Err(e) => warn!(error = %e, held = claims.len(), "heartbeat failed; claims may expire"),
        }
    }
}

struct ConsumeState {
    shared: Arc<Shared>,
    lane: Lane,
    /// One permit per delivery out (buffered or handed over): the prefetch bound.
    slots: Arc<Semaphore>,
    held: Arc<Held>,
    buffer: VecDeque<Claimed>,
    /// Wait before the next claim, after an error was reported.
    pause: Option<Duration>,
    backoff: Backoff,
}

impl ConsumeState {
    fn consume_error(&self, source: SqlQueueError) -> BrokerError {
        BrokerError::Consume {
            queue: self.shared.queue_name(self.lane),
            source: Box::new(source),
        }
    }

    async fn next(&mut self) -> Result<Delivery, BrokerError> {
        if let Some(pause) = self.pause.take() {
            tokio::time::sleep(pause).await;
        }
        loop {
            if let Some(claimed) = self.buffer.pop_front() {
                return Ok(self.deliver(claimed));
            }
            // At most `prefetch` deliveries are out; wait for one to be settled or dropped.
            let Ok(first) = self.slots.clone().acquire_owned().await else {
                // The semaphore is never closed; this is unreachable in practice.
                return Err(self
                    .consume_error(SqlQueueError::InvalidConfig("prefetch slots closed".into())));
            };
            let mut permits = vec![first];
            while permits.len() < MAX_CLAIM {
                match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => permits.push(permit),
                    Err(_) => break,
                }
            }

            // Registered before claiming, so a publish between the claim and the wait
            // still wakes us.
            let wakers = self.shared.wakers.clone();
            let notified = wakers.lane(self.lane).notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let token: i64 = rand::random();
            let limit = i64::try_from(permits.len()).unwrap_or(1);
            let visibility_us = micros(self.shared.config.visibility());
            let claimed = timed(self.shared.db.claim(self.lane, limit, visibility_us, token)).await;
            let rows = match claimed {
                Ok(rows) => rows,
                Err(e) => {
                    self.pause = Some(self.backoff.next_delay());
                    return Err(self.consume_error(e));
                }
            };
            self.backoff = Backoff::default();

            if rows.is_empty() {
                drop(permits);
                let wait = self.idle_wait().await;
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            for row in rows {
                // The claim's LIMIT was the number of permits, so there is one per row.
                let Some(permit) = permits.pop() else {
                    break;
                };
                self.accept(row, token, permit).await;
            }
        }
    }

    /// How long an idle consumer sleeps unless woken: the fallback poll interval, or less
    /// when a delayed message (or an expiring claim) is due sooner.
    async fn idle_wait(&self) -> Duration {
        let poll = Duration::from_millis(self.shared.config.poll_interval_ms);
        let next = timed(self.shared.db.next_available_in_us(self.lane)).await;
        let wait = match next {
            Ok(Some(us)) => {
                Duration::from_micros(u64::try_from(us).unwrap_or(0)).saturating_add(DUE_SLACK)
            }
            Ok(None) => poll,
            Err(e) => {
                debug!(queue = %self.shared.queue_name(self.lane), error = %e, "cannot look ahead; polling");
                poll
            }
        };
        wait.clamp(MIN_IDLE_WAIT, poll.max(MIN_IDLE_WAIT))
    }

    /// Turns a claimed row into a buffered delivery, or moves it to the dead lane when it
    /// was received too often or is not a job.
    async fn accept(
        &mut self,
        row: crate::db::ClaimedRow,
        token: i64,
        permit: OwnedSemaphorePermit,
    ) {
        let max = self.shared.config.max_receive_count;
        // Explicit hand-backs (nack with requeue) are not failures; only receives that
        // ended in a crash, a lost claim or a dropped delivery count towards the limit.
        let unsettled = row.receive_count - row.requeue_count;
        if self.lane != Lane::Dead && unsettled > i64::from(max) {
            let reason = format!(
                "received {unsettled} times without being acknowledged \
                 (max_receive_count is {max}); the consumer died or dropped it each time"
            );
            self.dead_letter(row.id, token, &reason).await;
            return;
        }
        match serde_json::from_str::<JobRef>(&row.body) {
            Ok(job) => {
                self.held.insert(row.id, token);
                self.buffer.push_back(Claimed {
                    id: row.id,
                    token,
                    job,
                    redelivered: row.receive_count > 1,
                    reason: row.reason,
                    permit,
                });
            }
            Err(e) if self.lane == Lane::Dead => {
                // Re-dead-lettering would loop. Left claimed and unheld, it stays out of
                // the way for one visibility timeout at a time until an operator removes it.
                warn!(queue = %self.shared.queue_name(self.lane), id = row.id, error = %e,
                    "malformed message in the dead lane left for an operator");
            }
            Err(e) => {
                warn!(queue = %self.shared.queue_name(self.lane), id = row.id, error = %e,
                    "malformed message moved to the dead lane");
                self.dead_letter(row.id, token, &format!("malformed message: {e}"))
                    .await;
            }
        }
    }

    async fn dead_letter(&self, id: i64, token: i64, reason: &str) {
        let shared = &self.shared;
        let moved = timed(shared.db.dead_letter(id, token, reason)).await;
        match moved {
            Ok(true) => shared.wakers.wake(Lane::Dead),
            Ok(false) => debug!(id, "claim lost before dead-lettering; someone else has it"),
            // The claim expires and the next receive tries again.
            Err(e) => warn!(queue = %shared.queue_name(self.lane), id, error = %e,
                "cannot move a message to the dead lane; it comes back after the visibility timeout"),
        }
    }

    fn deliver(&self, claimed: Claimed) -> Delivery {
        let handle = SqlAck {
            shared: self.shared.clone(),
            held: self.held.clone(),
            lane: self.lane,
            id: claimed.id,
            token: claimed.token,
            _permit: claimed.permit,
        };
        Delivery::new(
            self.lane,
            claimed.job,
            claimed.redelivered,
            claimed.reason,
            Box::new(handle),
        )
    }
}

impl Drop for ConsumeState {
    /// Claimed messages nobody saw yet go straight back instead of waiting out their
    /// visibility timeout, and their receive is not counted.
    fn drop(&mut self) {
        if self.buffer.is_empty() {
            return;
        }
        let claims: Vec<(i64, i64)> = self
            .buffer
            .drain(..)
            .map(|c| {
                self.held.remove(c.id, c.token);
                (c.id, c.token)
            })
            .collect();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let shared = self.shared.clone();
        let lane = self.lane;
        runtime.spawn(async move {
            match timed(shared.db.unclaim(&claims)).await {
                Ok(_) => shared.wakers.wake(lane),
                Err(e) => debug!(error = %e, "cannot hand back buffered claims; they expire"),
            }
        });
    }
}

/// Settles one delivery, fenced by its claim token. Dropping it unsettled stops its
/// heartbeat, so the message comes back after the visibility timeout.
struct SqlAck {
    shared: Arc<Shared>,
    held: Arc<Held>,
    lane: Lane,
    id: i64,
    token: i64,
    /// Frees the consumer's prefetch slot when the delivery is settled or dropped.
    _permit: OwnedSemaphorePermit,
}

impl SqlAck {
    fn outcome<E>(&self, done: Result<bool, E>) -> Result<(), BrokerError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        match done {
            Ok(true) => Ok(()),
            Ok(false) => Err(BrokerError::Ack(Box::new(SqlQueueError::ClaimLost {
                id: self.id,
            }))),
            Err(e) => Err(BrokerError::Ack(Box::new(e))),
        }
    }
}

impl Drop for SqlAck {
    fn drop(&mut self) {
        self.held.remove(self.id, self.token);
    }
}

#[async_trait::async_trait]
impl Acknowledge for SqlAck {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let done = Deletes::of(&self.shared).delete(self.id, self.token).await;
        self.outcome(done)
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        let shared = &self.shared;
        if !requeue {
            let done = Deletes::of(shared).delete(self.id, self.token).await;
            return self.outcome(done);
        }
        let done = timed(shared.db.requeue(self.id, self.token)).await;
        let result = self.outcome(done);
        if result.is_ok() {
            shared.wakers.wake(self.lane);
        }
        result
    }
}

/// Most deletes one statement carries.
const MAX_DELETES: usize = 512;

/// One delete a delivery waits on: true when its claim was still ours and the row is gone.
type DeleteRequest = (i64, i64, oneshot::Sender<Result<bool, Arc<SqlQueueError>>>);

/// Settles deliveries' deletes (ack, nack without requeue) together: one task runs whatever
/// gathered while the previous statement ran as one statement, so a busy queue pays one
/// round trip and one commit per batch instead of one per message, and an idle one waits
/// for nothing.
pub(crate) struct Deletes {
    tx: mpsc::Sender<DeleteRequest>,
}

impl Deletes {
    /// The queue's, started on first use (the queue may be built outside a runtime).
    fn of(shared: &Arc<Shared>) -> &Deletes {
        shared.deletes.get_or_init(|| {
            let (tx, rx) = mpsc::channel(MAX_DELETES * 8);
            // Holds the queue weakly: the task ends when the queue (and this sender) goes.
            tokio::spawn(run_deletes(Arc::downgrade(shared), rx));
            Deletes { tx }
        })
    }

    async fn delete(&self, id: i64, token: i64) -> Result<bool, Arc<SqlQueueError>> {
        let (reply, answer) = oneshot::channel();
        // The task only stops with the queue: the message comes back after its claim expires.
        let gone = || Arc::new(SqlQueueError::Dropped);
        self.tx.send((id, token, reply)).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run_deletes(shared: Weak<Shared>, mut rx: mpsc::Receiver<DeleteRequest>) {
    let mut batch = Vec::with_capacity(MAX_DELETES);
    while rx.recv_many(&mut batch, MAX_DELETES).await > 0 {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let claims: Vec<(i64, i64)> = batch.iter().map(|(id, token, _)| (*id, *token)).collect();
        match timed(shared.db.delete(&claims)).await {
            Ok(deleted) => {
                let deleted: HashSet<i64> = deleted.into_iter().collect();
                for (id, _, reply) in batch.drain(..) {
                    let _ = reply.send(Ok(deleted.contains(&id)));
                }
            }
            Err(error) => {
                let error = Arc::new(error);
                for (_, _, reply) in batch.drain(..) {
                    let _ = reply.send(Err(Arc::clone(&error)));
                }
            }
        }
    }
}
