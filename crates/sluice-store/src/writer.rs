//! Batched ingest: jobs from concurrent requests are inserted together (one statement on
//! PostgreSQL, a few short inserts per job under the write lock on SQLite).

use crate::batch::Batcher;
use crate::jobs::{Accepted, NewJob};
use crate::{Store, StoreError};
use std::sync::Arc;

/// Front of the batched ingest path; cheap to clone.
#[derive(Clone, Debug)]
pub struct JobWriter {
    batcher: Batcher<NewJob, Result<Accepted, StoreError>>,
}

impl JobWriter {
    /// Start `writers` tasks, each inserting up to `max_batch` jobs per statement.
    pub fn spawn(store: Store, writers: usize, max_batch: usize) -> JobWriter {
        let batcher = Batcher::spawn("insert", writers, max_batch, move |jobs: Vec<NewJob>| {
            let store = store.clone();
            async move { store.insert_jobs(&jobs).await }
        });
        JobWriter { batcher }
    }

    /// Store one job (batched with concurrent callers) once committed: queued with its outbox
    /// message, or attached to an identical job in flight; or not stored, when its
    /// `reuse_within` found an answer ([`Accepted::Answerable`]).
    pub async fn insert(&self, job: NewJob) -> Result<Accepted, Arc<StoreError>> {
        self.batcher
            .call(job)
            .await
            .and_then(|outcome| outcome.map_err(Arc::new))
    }
}
