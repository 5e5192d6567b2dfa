//! SQLite storage of the outbox, mirroring `crate::outbox`: rows deleted once the broker
//! confirmed their message, and taken under a short lock by the relay when left behind.

use super::jobs::req_ts;
use super::{ts, ts_after, ts_before, SqliteBackend};
use crate::jobs::{corrupt, parse_lane};
use crate::outbox::OutboxMessage;
use crate::StoreError;
use chrono::Utc;
use sluice_core::{JobRef, JobRequest, RequestId};
use sqlx::Row;
use std::time::Duration;

impl SqliteBackend {
    pub(crate) async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for id in outbox_ids {
            sqlx::query("DELETE FROM outbox WHERE id = ?1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn unpublished(
        &self,
        grace: Duration,
        lock: Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Utc::now();
        let at = ts(now);
        // Read and lock under the one write lock: no other relay can take the same rows.
        let rows = sqlx::query(
            "SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, o.attempt,
                    j.id, j.tenant, j.model, j.request
             FROM outbox o JOIN jobs j ON j.id = o.job_id
             WHERE o.created_at < ?1 AND (o.locked_until IS NULL OR o.locked_until < ?2)
             ORDER BY o.id LIMIT ?3",
        )
        .bind(ts_before(now, grace))
        .bind(&at)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let locked_until = ts_after(now, lock);
        let mut messages = Vec::with_capacity(rows.len());
        for r in &rows {
            let outbox_id: i64 = r.try_get("outbox_id")?;
            sqlx::query("UPDATE outbox SET locked_until = ?2 WHERE id = ?1")
                .bind(outbox_id)
                .bind(&locked_until)
                .execute(&mut *tx)
                .await?;
            let lane: String = r.try_get("lane")?;
            let request: String = r.try_get("request")?;
            let request: JobRequest = serde_json::from_str(&request).map_err(corrupt)?;
            messages.push(OutboxMessage {
                outbox_id,
                lane: parse_lane(&lane)?,
                job: JobRef {
                    waiting_since_ms: None,
                    tokens: request.estimated_tokens(),
                    rate_limited: false,
                    request_id: RequestId(r.try_get("id")?),
                    tenant: r.try_get("tenant")?,
                    model: r.try_get("model")?,
                    attempt: r.try_get("attempt")?,
                },
                deliver_at: req_ts(r, "deliver_at")?,
                reason: r.try_get("reason")?,
            });
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn outbox_len(&self) -> Result<i64, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
            .fetch_one(&self.read)
            .await?;
        Ok(n)
    }
}
