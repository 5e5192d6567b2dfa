//! Lanes kept in the store's own database (the SQL queue): new jobs go into their lane in the
//! statement or transaction that stores them, so they need no outbox row and no publish.

use crate::Store;
use sluice_core::Lane;
use std::fmt;
use std::sync::Arc;

/// The SQL queue's table as the store's statements reach it: `sluice_lane_messages` in the
/// store's own schema, one namespace of it.
#[derive(Clone)]
pub struct LanesInDatabase {
    /// The queue's `namespace` column for these lanes.
    pub namespace: String,
    /// The queue's `LISTEN/NOTIFY` channel, told of each lane a commit added messages to
    /// (PostgreSQL; SQLite has no notifications, other processes poll).
    pub channel: String,
    /// Wakes this process's idle consumers of a lane, after the commit.
    pub wake: Arc<dyn Fn(Lane) + Send + Sync>,
}

impl fmt::Debug for LanesInDatabase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LanesInDatabase")
            .field("namespace", &self.namespace)
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl LanesInDatabase {
    /// Wake the consumers of each lane in `lanes` once.
    pub(crate) fn wake_all(&self, lanes: impl IntoIterator<Item = Lane>) {
        let mut woken = [false; Lane::ALL.len()];
        for lane in lanes {
            if !std::mem::replace(&mut woken[lane.index()], true) {
                (self.wake)(lane);
            }
        }
    }
}

impl Store {
    /// This store, putting the jobs its batched ingest stores straight into their lanes of
    /// `lanes` (same commit) instead of queueing outbox rows to publish; their outcome is then
    /// [`crate::Accepted::Enqueued`]. On PostgreSQL a batch's lines share that statement and go
    /// the same way. Every other path (idempotent submissions, SQLite's batch lines, retries,
    /// replays) still goes through the outbox. `lanes` must be the SQL queue's table
    /// in this store's own database and schema. Clones taken before this call keep what they had.
    pub fn enqueuing_into(mut self, lanes: LanesInDatabase) -> Store {
        let lanes = Some(Arc::new(lanes));
        match &mut self.db {
            crate::Db::Postgres(pg) => pg.lanes = lanes,
            crate::Db::Sqlite(lite) => lite.lanes = lanes,
        }
        self
    }

    /// True when the batched ingest puts jobs straight into their lanes ([`Store::enqueuing_into`]).
    pub fn enqueues_directly(&self) -> bool {
        match &self.db {
            crate::Db::Postgres(pg) => pg.lanes.is_some(),
            crate::Db::Sqlite(lite) => lite.lanes.is_some(),
        }
    }
}
