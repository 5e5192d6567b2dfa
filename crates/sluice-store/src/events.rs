//! Reading the job event log for subscribers: the events of some jobs after a sequence number,
//! and a user's recent events, each with the job's owner so callers can check tenant walls.
//! Shared types and the PostgreSQL statements; SQLite's are in `sqlite::events`.

use crate::jobs::{corrupt, JobEvent};
use crate::postgres::PgBackend;
use crate::StoreError;
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::time::Duration;
use uuid::Uuid;

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// One stored event with the job it belongs to and that job's owner.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub request_id: RequestId,
    pub tenant: String,
    pub user_id: String,
    pub event: JobEvent,
}

/// Keep, per job, the events before its first unsettled one: a later event may be settled while
/// an earlier one is not (transaction times are not in sequence order), and a subscriber must
/// never skip a sequence number. Input is ordered by job and sequence, each with its `settled`.
pub(crate) fn settled_prefix(events: Vec<(OwnedEvent, bool)>) -> Vec<OwnedEvent> {
    let mut out = Vec::with_capacity(events.len());
    let mut held: Option<RequestId> = None;
    for (event, settled) in events {
        if held == Some(event.request_id) {
            continue;
        }
        if settled {
            out.push(event);
        } else {
            held = Some(event.request_id);
        }
    }
    out
}

fn settled_rows(rows: &[PgRow]) -> Result<Vec<OwnedEvent>, StoreError> {
    let events = rows
        .iter()
        .map(|r| Ok((owned_event(r)?, r.try_get::<bool, _>("settled")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
    Ok(settled_prefix(events))
}

fn owned_event(r: &PgRow) -> Result<OwnedEvent, StoreError> {
    let state: String = r.try_get("state")?;
    Ok(OwnedEvent {
        request_id: RequestId(r.try_get("job_id")?),
        tenant: r.try_get("tenant")?,
        user_id: r.try_get("user_id")?,
        event: JobEvent {
            seq: r.try_get("seq")?,
            state: state.parse().map_err(corrupt)?,
            at: r.try_get("at")?,
            detail: r.try_get("detail")?,
        },
    })
}

impl PgBackend {
    /// For each `(job, after)`, the job's events with a sequence number above `after`, ordered
    /// by job and sequence, up to (not including) the first recorded less than `settle` ago.
    /// Unknown jobs have none.
    ///
    /// A settle time lets a poll that backs up a faster channel (the event bus) leave the
    /// newest events to it, so they arrive in the order that channel keeps (deltas first).
    pub(crate) async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| id.0).collect();
        let after: Vec<i32> = jobs.iter().map(|(_, seq)| *seq).collect();
        let rows = sqlx::query(
            "SELECT e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id,
                    e.at <= now() - $3 * interval '1 millisecond' AS settled
             FROM UNNEST($1::uuid[], $2::int[]) AS w(id, after)
             JOIN job_events e ON e.job_id = w.id AND e.seq > w.after
             JOIN jobs j ON j.id = e.job_id
             ORDER BY e.job_id, e.seq",
        )
        .bind(&ids)
        .bind(&after)
        .bind(millis(settle))
        .fetch_all(&self.pool)
        .await?;
        settled_rows(&rows)
    }

    /// Events of one user's jobs recorded at or after `since`, ordered by job and sequence,
    /// settled as in [`Store::events_after`].
    pub(crate) async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id,
                    e.at <= now() - $4 * interval '1 millisecond' AS settled
             FROM jobs j JOIN job_events e ON e.job_id = j.id
             WHERE j.tenant = $1 AND j.user_id = $2 AND e.at >= $3
               -- updated_at is the transaction's start, at most a little before its events;
               -- it bounds the scan to recently active jobs.
               AND j.updated_at >= $3 - interval '1 minute'
             ORDER BY e.job_id, e.seq",
        )
        .bind(tenant)
        .bind(user_id)
        .bind(since)
        .bind(millis(settle))
        .fetch_all(&self.pool)
        .await?;
        settled_rows(&rows)
    }
}
