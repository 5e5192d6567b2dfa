//! Batched ingest: concurrent requests hand their jobs to a few writer tasks, which insert
//! whatever has gathered in one statement. Under light load a batch is a single job, so no latency is added.

use crate::jobs::NewJob;
use crate::outbox::OutboxMessage;
use crate::{Store, StoreError};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Mutex};

type Reply = oneshot::Sender<Result<OutboxMessage, Arc<StoreError>>>;

/// Front of the batched ingest path; cheap to clone.
#[derive(Clone, Debug)]
pub struct JobWriter {
    tx: mpsc::Sender<(NewJob, Reply)>,
}

impl JobWriter {
    /// Start `writers` tasks, each inserting up to `max_batch` jobs per statement.
    pub fn spawn(store: Store, writers: usize, max_batch: usize) -> JobWriter {
        let (tx, rx) = mpsc::channel::<(NewJob, Reply)>(max_batch.max(1) * writers.max(1) * 4);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..writers.max(1) {
            let rx = Arc::clone(&rx);
            let store = store.clone();
            tokio::spawn(async move {
                let mut batch = Vec::with_capacity(max_batch);
                loop {
                    {
                        let mut rx = rx.lock().await;
                        if rx.recv_many(&mut batch, max_batch.max(1)).await == 0 {
                            return;
                        }
                    }
                    let (jobs, replies): (Vec<NewJob>, Vec<Reply>) = batch.drain(..).unzip();
                    match store.insert_jobs(&jobs).await {
                        Ok(messages) => {
                            for (reply, message) in replies.into_iter().zip(messages) {
                                let _ = reply.send(Ok(message));
                            }
                        }
                        Err(error) => {
                            tracing::warn!(message = "batched job insert failed", %error, jobs = jobs.len());
                            let error = Arc::new(error);
                            for reply in replies {
                                let _ = reply.send(Err(Arc::clone(&error)));
                            }
                        }
                    }
                }
            });
        }
        JobWriter { tx }
    }

    /// Store one job (batched with concurrent callers); returns its outbox message once committed.
    pub async fn insert(&self, job: NewJob) -> Result<OutboxMessage, Arc<StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((job, reply))
            .await
            .map_err(|_| Arc::new(StoreError::WriterStopped))?;
        answer
            .await
            .map_err(|_| Arc::new(StoreError::WriterStopped))?
    }
}
