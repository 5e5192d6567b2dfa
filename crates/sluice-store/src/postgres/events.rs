//! PostgreSQL's reads of the job event log for subscribers (the public API in `crate::events`):
//! one statement for many jobs, each event marked settled or not by the database's clock.

use crate::events::OwnedEventRow;
use crate::postgres::PgBackend;
use crate::StoreError;
use chrono::{DateTime, Utc};
use sluice_core::RequestId;
use std::time::Duration;
use uuid::Uuid;

/// Milliseconds, fractional: a settle time shorter than a millisecond still counts.
fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

impl PgBackend {
    pub(crate) async fn events_after(
        &self,
        jobs: &[(RequestId, i32)],
        settle: Duration,
    ) -> Result<Vec<OwnedEventRow>, StoreError> {
        let ids: Vec<Uuid> = jobs.iter().map(|(id, _)| id.0).collect();
        let after: Vec<i32> = jobs.iter().map(|(_, seq)| *seq).collect();
        Ok(sqlx::query_as(
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
        .await?)
    }

    pub(crate) async fn user_events_since(
        &self,
        tenant: &str,
        user_id: &str,
        since: DateTime<Utc>,
        settle: Duration,
    ) -> Result<Vec<OwnedEventRow>, StoreError> {
        Ok(sqlx::query_as(
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
        .await?)
    }
}
