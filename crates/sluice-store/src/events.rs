//! The job event log for subscribers, each event with its job's owner for tenant walls: the
//! types, the row both backends read into, and the public API.

use crate::jobs::{corrupt, JobEvent};
use crate::sql::{dispatch, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use std::time::Duration;
use uuid::Uuid;

/// One stored event with the job it belongs to and that job's owner.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub request_id: RequestId,
    pub tenant: String,
    pub user_id: String,
    pub event: JobEvent,
}

/// An event row with its job's owner and whether it is settled (recorded at or before the
/// cut-off the caller asked for).
#[derive(sqlx::FromRow)]
pub(crate) struct OwnedEventRow {
    job_id: Uuid,
    seq: i32,
    state: String,
    at: Ts,
    detail: Option<serde_json::Value>,
    tenant: String,
    user_id: String,
    /// A boolean on PostgreSQL, an integer (0 or 1) on SQLite: both decode as `bool`.
    settled: bool,
}

/// Keep, per job, the events before its first unsettled one: a later event may be settled while
/// an earlier one is not (transaction times are not in sequence order), and a subscriber must
/// never skip a sequence number. Input is ordered by job and sequence.
pub(crate) fn settled_prefix(rows: Vec<OwnedEventRow>) -> Result<Vec<OwnedEvent>, StoreError> {
    let mut out = Vec::with_capacity(rows.len());
    let mut held: Option<Uuid> = None;
    for row in rows {
        if held == Some(row.job_id) {
            continue;
        }
        if !row.settled {
            held = Some(row.job_id);
            continue;
        }
        out.push(OwnedEvent {
            request_id: RequestId(row.job_id),
            tenant: row.tenant,
            user_id: row.user_id,
            event: JobEvent {
                seq: row.seq,
                state: row.state.parse().map_err(corrupt)?,
                at: row.at.into(),
                detail: row.detail,
            },
        });
    }
    Ok(out)
}

/// The event log for subscribers.
impl Store {
    /// For each `(job, after)`, the job's events with a sequence number above `after`, ordered
    /// by job and sequence, up to (not including) the first recorded less than `settle` ago.
    /// Unknown jobs have none.
    ///
    /// A settle time lets a poll that backs up a faster channel (the event bus) leave the
    /// newest events to it, so they arrive in the order that channel keeps (deltas first).
    pub async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let rows = dispatch!(self.events_after(jobs, settle))?;
        settled_prefix(rows)
    }

    /// Events of one user's jobs recorded at or after `since`, ordered by job and sequence,
    /// settled as in [`Store::events_after`].
    pub async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        let rows = dispatch!(self.user_events_since(tenant, user_id, since, settle))?;
        settled_prefix(rows)
    }
}
