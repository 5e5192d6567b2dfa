//! SQLite reads of the job event log for subscribers, mirroring `crate::events`: events after
//! a sequence number per job, and a user's recent events, each with the job's owner.

use super::jobs::{opt_json, req_ts};
use super::{ts, ts_before, SqliteBackend};
use crate::events::{settled_prefix, OwnedEvent};
use crate::jobs::{corrupt, JobEvent};
use crate::StoreError;
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::time::Duration;

const EVENT_COLUMNS: &str = "e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id";

/// An event row and whether it is settled (recorded at or before the cut-off bound as `?1`).
fn settled_event(r: &SqliteRow) -> Result<(OwnedEvent, bool), StoreError> {
    let state: String = r.try_get("state")?;
    let event = OwnedEvent {
        request_id: RequestId(r.try_get("job_id")?),
        tenant: r.try_get("tenant")?,
        user_id: r.try_get("user_id")?,
        event: JobEvent {
            seq: r.try_get("seq")?,
            state: state.parse().map_err(corrupt)?,
            at: req_ts(r, "at")?,
            detail: opt_json(r, "detail")?,
        },
    };
    // A comparison is an integer in SQLite.
    let settled: i64 = r.try_get("settled")?;
    Ok((event, settled != 0))
}

impl SqliteBackend {
    pub(crate) async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        let cutoff = ts_before(Utc::now(), settle);
        // Ordered by job as PostgreSQL orders uuids (bytewise, as SQLite orders blobs).
        let mut wanted = jobs.to_vec();
        wanted.sort_by_key(|(id, after)| (id.0, *after));
        // One read transaction: every job's events come from the same snapshot.
        let mut tx = self.read.begin().await?;
        let mut events = Vec::new();
        for (id, after) in wanted {
            let rows = sqlx::query(&format!(
                "SELECT {EVENT_COLUMNS}, e.at <= ?1 AS settled
                 FROM job_events e JOIN jobs j ON j.id = e.job_id
                 WHERE e.job_id = ?2 AND e.seq > ?3
                 ORDER BY e.seq"
            ))
            .bind(&cutoff)
            .bind(id.0)
            .bind(after)
            .fetch_all(&mut *tx)
            .await?;
            for r in &rows {
                events.push(settled_event(r)?);
            }
        }
        tx.rollback().await?;
        Ok(settled_prefix(events))
    }

    pub(crate) async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEvent>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS}, e.at <= ?1 AS settled
             FROM jobs j JOIN job_events e ON e.job_id = j.id
             WHERE j.tenant = ?2 AND j.user_id = ?3 AND e.at >= ?4
               -- updated_at is written with the job's newest event; a minute's slack keeps
               -- this in step with PostgreSQL, where it is the transaction's start.
               AND j.updated_at >= ?5
             ORDER BY e.job_id, e.seq"
        ))
        .bind(ts_before(Utc::now(), settle))
        .bind(tenant)
        .bind(user_id)
        .bind(ts(since))
        .bind(ts_before(since, Duration::from_secs(60)))
        .fetch_all(&self.read)
        .await?;
        let events = rows
            .iter()
            .map(settled_event)
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(settled_prefix(events))
    }
}
