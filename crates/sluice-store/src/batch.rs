//! Statement batching: concurrent callers hand items to a few tasks, which run whatever has
//! gathered as one statement. Under light load a batch is one item, so no latency is added.

use crate::StoreError;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot, Mutex};

type Reply<O> = oneshot::Sender<Result<O, Arc<StoreError>>>;

/// Each batch's statement time, from sent to answered (`statement` label).
pub const BATCH_SECONDS: &str = "sluice_store_batch_seconds";
/// How long each batch's oldest item waited for a free task: a caller's time before its
/// statement starts.
pub const BATCH_WAIT_SECONDS: &str = "sluice_store_batch_wait_seconds";
/// Items per batch.
pub const BATCH_ITEMS: &str = "sluice_store_batch_items";

/// The front of a batched statement; cheap to clone.
pub struct Batcher<I, O> {
    tx: mpsc::Sender<(I, Reply<O>, Instant)>,
}

impl<I, O> Clone for Batcher<I, O> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<I, O> std::fmt::Debug for Batcher<I, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher").finish_non_exhaustive()
    }
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// Start `tasks` tasks running `run` on up to `max_batch` items at a time; `statement`
    /// names them in the metrics. `run` must answer one output per input, in input order.
    pub fn spawn<F, Fut>(statement: &'static str, tasks: usize, max_batch: usize, run: F) -> Self
    where
        F: Fn(Vec<I>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, StoreError>> + Send,
    {
        let max_batch = max_batch.max(1);
        let tasks = tasks.max(1);
        let (tx, rx) = mpsc::channel::<(I, Reply<O>, Instant)>(max_batch * tasks * 4);
        let rx = Arc::new(Mutex::new(rx));
        let run = Arc::new(run);
        for _ in 0..tasks {
            let (rx, run) = (Arc::clone(&rx), Arc::clone(&run));
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(max_batch);
                loop {
                    {
                        let mut rx = rx.lock().await;
                        if rx.recv_many(&mut batch, max_batch).await == 0 {
                            return;
                        }
                    }
                    let started = Instant::now();
                    // The channel is first in, first out: the first item waited longest.
                    let oldest = batch.first().map(|(_, _, sent)| *sent);
                    let (items, replies): (Vec<I>, Vec<Reply<O>>) = batch
                        .drain(..)
                        .map(|(item, reply, _)| (item, reply))
                        .unzip();
                    let n = items.len();
                    let outcome = run(items).await;
                    let labels = [("statement", statement)];
                    metrics::histogram!(BATCH_SECONDS, &labels).record(started.elapsed());
                    if let Some(sent) = oldest {
                        metrics::histogram!(BATCH_WAIT_SECONDS, &labels)
                            .record(started.saturating_duration_since(sent));
                    }
                    metrics::histogram!(BATCH_ITEMS, &labels).record(n as f64);
                    match outcome {
                        Ok(outputs) if outputs.len() == n => {
                            for (reply, output) in replies.into_iter().zip(outputs) {
                                let _ = reply.send(Ok(output));
                            }
                        }
                        Ok(outputs) => {
                            let error = Arc::new(StoreError::Corrupt(format!(
                                "a batch of {n} produced {} answers",
                                outputs.len()
                            )));
                            for reply in replies {
                                let _ = reply.send(Err(Arc::clone(&error)));
                            }
                        }
                        Err(error) => {
                            tracing::warn!(message = "batched statement failed", %error, items = n);
                            let error = Arc::new(error);
                            for reply in replies {
                                let _ = reply.send(Err(Arc::clone(&error)));
                            }
                        }
                    }
                }
            });
        }
        Batcher { tx }
    }

    /// Submit one item and wait for its answer.
    pub async fn call(&self, item: I) -> Result<O, Arc<StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply, Instant::now()))
            .await
            .map_err(|_| Arc::new(StoreError::WriterStopped))?;
        answer
            .await
            .map_err(|_| Arc::new(StoreError::WriterStopped))?
    }
}
