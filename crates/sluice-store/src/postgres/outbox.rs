//! PostgreSQL's outbox statements (the type and the public API in `crate::outbox`): confirmed
//! rows deleted in one statement, left-behind rows taken with `FOR UPDATE SKIP LOCKED`.

use crate::outbox::{MessageRow, OutboxMessage};
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use std::time::Duration;

impl PgBackend {
    /// Forget outbox rows whose messages the broker confirmed.
    pub(crate) async fn mark_published(&self, outbox_ids: &[i64]) -> Result<(), StoreError> {
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
        let rows: Vec<MessageRow> = sqlx::query_as(
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
        rows.into_iter().map(|r| r.into_message(false)).collect()
    }
}
