//! The outbox: lane messages stored with the state change that needs them, deleted once the
//! broker confirmed them, republished by the relay if not: the type, its row and the public API.

use crate::jobs::{corrupt, parse_lane};
use crate::sql::{dispatch, reading, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
use sluice_core::{JobRef, JobRequest, Lane, RequestId};
use std::time::Duration;
use uuid::Uuid;

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

/// An outbox row with its job, as statements that queue or take messages return it.
#[derive(sqlx::FromRow)]
pub(crate) struct MessageRow {
    outbox_id: i64,
    lane: String,
    deliver_at: Ts,
    reason: Option<String>,
    id: Uuid,
    attempt: i32,
    tenant: String,
    model: String,
    request: serde_json::Value,
}

impl MessageRow {
    /// The message; `rate_limited` when a 429 queued it (it goes before fresh work).
    pub(crate) fn into_message(self, rate_limited: bool) -> Result<OutboxMessage, StoreError> {
        // The token estimate of the job, so a message republished from the database is charged
        // against token limits like the one first published.
        let request: JobRequest = serde_json::from_value(self.request).map_err(corrupt)?;
        Ok(OutboxMessage {
            outbox_id: self.outbox_id,
            lane: parse_lane(&self.lane)?,
            job: JobRef {
                waiting_since_ms: None,
                tokens: request.estimated_tokens(),
                rate_limited,
                request_id: RequestId(self.id),
                tenant: self.tenant,
                model: self.model,
                attempt: self.attempt,
            },
            deliver_at: self.deliver_at.into(),
            reason: self.reason,
        })
    }
}

/// The outbox.
impl Store {
    /// Forget outbox rows whose messages the broker confirmed.
    pub async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        if outbox_ids.is_empty() {
            return Ok(());
        }
        dispatch!(self.mark_published(outbox_ids))
    }

    /// Take outbox rows older than `grace` that nobody published, locking them for `lock`
    /// so concurrent relays do not publish the same row twice in a row.
    pub async fn unpublished(
        &self,
        grace: Duration,
        lock: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        dispatch!(self.unpublished(grace, lock, limit))
    }

    /// Outbox rows still waiting to be published (tests and readiness).
    pub async fn outbox_len(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = reading!(self, |pool| {
            sqlx::query_as("SELECT count(*) FROM outbox")
                .fetch_one(pool)
                .await?
        });
        Ok(n)
    }
}
