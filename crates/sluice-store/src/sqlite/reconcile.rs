//! SQLite's reconciler statements, mirroring `postgres::reconcile`: each one short write
//! transaction, so concurrent reconcilers take turns and never queue the same job twice.

use super::jobs::{insert_event, queue_notification};
use super::lifecycle::ChangedJob;
use super::SqliteBackend;
use crate::outbox::OutboxMessage;
use crate::reconcile::waiting_in;
use crate::sql::Ts;
use crate::StoreError;
use sluice_core::{JobRef, Lane};
use uuid::Uuid;

impl SqliteBackend {
    pub(crate) async fn republish_waiting(
        &self,
        lane: Lane,
        waited: std::time::Duration,
        limit: i64,
    ) -> Result<Vec<OutboxMessage>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let (condition, order) = waiting_in(lane);
        let waiting: Vec<(Uuid,)> = sqlx::query_as(&format!(
            "SELECT id FROM jobs
             WHERE {condition} AND updated_at < $2
               AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.job_id = jobs.id)
             ORDER BY {order} LIMIT $3",
        ))
        .bind(lane.as_str())
        .bind(now.before(waited))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut messages = Vec::with_capacity(waiting.len());
        for (id,) in waiting {
            let job: ChangedJob = sqlx::query_as(
                "UPDATE jobs SET updated_at = $2 WHERE id = $1
                 RETURNING event_seq, attempt, tenant, model, request, notify_email",
            )
            .bind(id)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            messages.push(job.queue_message(&mut tx, id, lane, now, None, now).await?);
        }
        tx.commit().await?;
        Ok(messages)
    }

    pub(crate) async fn dead_lettered_by_broker(
        &self,
        job: &JobRef,
        reason: &str,
    ) -> Result<Option<String>, StoreError> {
        let mut tx = self.begin_write().await?;
        let now = Ts::now();
        let changed: Option<ChangedJob> = sqlx::query_as(
            "UPDATE jobs SET state = 'dead', error = $3, error_status = NULL, lease_until = NULL,
                             updated_at = $4, finished_at = $4, event_seq = event_seq + 1
             WHERE id = $1 AND attempt = $2 AND state IN ('queued', 'retrying')
             RETURNING event_seq, attempt, tenant, model, request, notify_email",
        )
        .bind(job.request_id.0)
        .bind(job.attempt)
        .bind(reason)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(changed) = changed else {
            tx.rollback().await?;
            return Ok(None);
        };
        let id = job.request_id.0;
        let detail = serde_json::json!({ "error": reason });
        insert_event(&mut tx, id, changed.event_seq, "dead", Some(&detail), now).await?;
        queue_notification(&mut tx, id, changed.notify_email.as_deref(), now).await?;
        tx.commit().await?;
        Ok(Some(changed.tenant))
    }
}
