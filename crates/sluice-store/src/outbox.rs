//! The outbox: lane messages stored with the state change that needs them. The writer deletes
//! a row once the broker confirmed its message; the relay republishes rows left behind.
//! Shared types and the PostgreSQL statements; SQLite's are in `sqlite::outbox`.

use crate::jobs::{corrupt, parse_lane};
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobRequest, Lane, RequestId};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::time::Duration;

/// A message to publish to a lane, backed by an outbox row.
#[derive(Debug, Clone)]
pub struct OutboxMessage {
    pub outbox_id: i64,
    pub lane: Lane,
    pub job: JobRef,
    /// Not to be delivered before this instant (retry backoff).
    pub deliver_at: DateTime<Utc>,
    /// Why the job went to `dead`, for that lane's header.
    pub reason: Option<String>,
}

impl OutboxMessage {
    /// How long the broker must still hold the message.
    pub fn delay(&self) -> Duration {
        (self.deliver_at - Utc::now())
            .to_std()
            .unwrap_or(Duration::ZERO)
    }
}

/// The token estimate of the job whose `request` the row carries, so a message republished
/// from the database is charged against token limits like the one first published.
pub(crate) fn estimated_tokens(r: &PgRow) -> Result<u32, StoreError> {
    let request: serde_json::Value = r.try_get("request")?;
    let request: JobRequest = serde_json::from_value(request).map_err(corrupt)?;
    Ok(request.estimated_tokens())
}

pub(crate) fn message_from_row(r: &PgRow) -> Result<OutboxMessage, StoreError> {
    let lane: String = r.try_get("lane")?;
    Ok(OutboxMessage {
        outbox_id: r.try_get("outbox_id")?,
        lane: parse_lane(&lane)?,
        job: JobRef {
            waiting_since_ms: None,
            tokens: estimated_tokens(r)?,
            rate_limited: false,
            request_id: RequestId(r.try_get("id")?),
            tenant: r.try_get("tenant")?,
            model: r.try_get("model")?,
            attempt: r.try_get("attempt")?,
        },
        deliver_at: r.try_get("deliver_at")?,
        reason: r.try_get("reason")?,
    })
}

impl PgBackend {
    /// Forget outbox rows whose messages the broker confirmed.
    pub(crate) async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM outbox WHERE id = ANY($1)")
            .bind(outbox_ids)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Take outbox rows older than `grace` that nobody published, locking them for `lock`
    /// so concurrent relays do not publish the same row twice in a row.
    pub(crate) async fn unpublished(
        &self,
        grace: Duration,
        lock: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let rows = sqlx::query(
            "WITH x AS (
                 SELECT id FROM outbox
                 WHERE created_at < now() - $1 * interval '1 millisecond'
                   AND (locked_until IS NULL OR locked_until < now())
                 ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED
             )
             UPDATE outbox o SET locked_until = now() + $2 * interval '1 millisecond'
             FROM x, jobs j
             WHERE o.id = x.id AND j.id = o.job_id
             RETURNING o.id AS outbox_id, o.lane, o.deliver_at, o.reason, o.attempt,
                       j.id, j.tenant, j.model, j.request",
        )
        .bind(millis(grace))
        .bind(millis(lock))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(message_from_row).collect()
    }

    /// Outbox rows still waiting to be published (tests and readiness).
    pub(crate) async fn outbox_len(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }
}
