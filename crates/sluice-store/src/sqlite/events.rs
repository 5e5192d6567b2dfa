//! SQLite's reads of the job event log for subscribers, mirroring `postgres::events`: events
//! after a sequence number per job, and a user's recent events, each with the job's owner.

use super::SqliteBackend;
use crate::events::OwnedEventRow;
use crate::sql::Ts;
use crate::StoreError;
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use std::time::Duration;

const EVENT_COLUMNS: &str = "e.job_id, e.seq, e.state, e.at, e.detail, j.tenant, j.user_id";

impl SqliteBackend {
    pub(crate) async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEventRow>, StoreError> {
        let cutoff = Ts::now().before(settle);
        // Ordered by job as PostgreSQL orders uuids (bytewise, as SQLite orders blobs).
        let mut wanted = jobs.to_vec();
        wanted.sort_by_key(|(id, after)| (id.0, *after));
        // One read transaction: every job's events come from the same snapshot.
        let mut tx = self.read.begin().await?;
        let mut events = Vec::new();
        for (id, after) in wanted {
            let rows: Vec<OwnedEventRow> = sqlx::query_as(&format!(
                "SELECT {EVENT_COLUMNS}, e.at <= $1 AS settled
                 FROM job_events e JOIN jobs j ON j.id = e.job_id
                 WHERE e.job_id = $2 AND e.seq > $3
                 ORDER BY e.seq"
            ))
            .bind(cutoff)
            .bind(id.0)
            .bind(after)
            .fetch_all(&mut *tx)
            .await?;
            events.extend(rows);
        }
        tx.rollback().await?;
        Ok(events)
    }

    pub(crate) async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEventRow>, StoreError> {
        Ok(sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS}, e.at <= $1 AS settled
             FROM jobs j JOIN job_events e ON e.job_id = j.id
             WHERE j.tenant = $2 AND j.user_id = $3 AND e.at >= $4
               -- updated_at is written with the job's newest event; a minute's slack keeps
               -- this in step with PostgreSQL, where it is the transaction's start.
               AND j.updated_at >= $5
             ORDER BY e.job_id, e.seq"
        ))
        .bind(Ts::now().before(settle))
        .bind(tenant)
        .bind(user_id)
        .bind(Ts(since))
        .bind(Ts(since).before(Duration::from_secs(60)))
        .fetch_all(&self.read)
        .await?)
    }
}
