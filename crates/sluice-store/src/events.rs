//! Reading the job event log for subscribers: the events of some jobs after a sequence number,
//! and a user's recent events, each with the job's owner so callers can check tenant walls.

use crate::jobs::{corrupt, JobEvent};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use sqlx::postgres::PgRow;
use sqlx::Row;
use uuid::Uuid;

/// One stored event with the job it belongs to and that job's owner.
#[derive(Debug, Clone)]
pub struct OwnedEvent {
    pub request_id: RequestId,
    pub tenant: String,
    pub user_id: String,
    pub event: JobEvent,
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

impl Store {
    /// For each `(job, after)`, the job's events with a sequence number above `after`, ordered
    /// by job and sequence. Unknown jobs have none.
    pub async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| id.0).collect();
        let after: Vec<i32> = jobs.iter().map(|(_, seq)| *seq).collect();
        let rows = sqlx::query(
            "SELECT e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id
             FROM UNNEST($1::uuid[], $2::int[]) AS w(id, after)
             JOIN job_events e ON e.job_id = w.id AND e.seq > w.after
             JOIN jobs j ON j.id = e.job_id
             ORDER BY e.job_id, e.seq",
        )
        .bind(&ids)
        .bind(&after)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(owned_event).collect()
    }

    /// Events of one user's jobs recorded at or after `since`, ordered by job and sequence.
    pub async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id
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
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(owned_event).collect()
    }
}
