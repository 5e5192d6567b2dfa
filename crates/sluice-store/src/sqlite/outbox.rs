//! SQLite's outbox statements, mirroring `postgres::outbox`: rows deleted once the broker
//! confirmed their message, and taken under the one write lock by the relay when left behind.

use super::SqliteBackend;
use crate::outbox::{MessageRow, OutboxMessage};
use crate::sql::Ts;
use crate::StoreError;
use std::time::Duration;

impl SqliteBackend {
    pub(crate) async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        for id in outbox_ids {
            sqlx::query("DELETE FROM outbox WHERE id = $1")
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
        let now = Ts::now();
        // Read and lock under the one write lock: no other relay can take the same rows.
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT o.id AS outbox_id, o.lane, o.deliver_at, o.reason, o.attempt,
                    j.id, j.tenant, j.model, j.request
             FROM outbox o JOIN jobs j ON j.id = o.job_id
             WHERE o.created_at < $1 AND (o.locked_until IS NULL OR o.locked_until < $2)
             ORDER BY o.id LIMIT $3",
        )
        .bind(now.before(grace))
        .bind(now)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let locked_until = now.after(lock);
        let mut messages = Vec::with_capacity(rows.len());
        for row in rows {
            let message = row.into_message(false)?;
            sqlx::query("UPDATE outbox SET locked_until = $2 WHERE id = $1")
                .bind(message.outbox_id)
                .bind(locked_until)
                .execute(&mut *tx)
                .await?;
            messages.push(message);
        }
        tx.commit().await?;
        Ok(messages)
    }
}
