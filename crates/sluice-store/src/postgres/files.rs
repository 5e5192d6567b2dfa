//! PostgreSQL's file statements that differ from SQLite's: a chunk lands with the touch of its
//! upload, and a deleted file's bytes go, in the statement that marks it.

use crate::files::no_upload;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use std::time::Duration;

impl PgBackend {
    pub(crate) async fn append_file_chunk(
        &self,
        file_id: &str,
        seq: i32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        // The touch and the insert in one statement: a chunk lands only in an upload still
        // in progress, and it keeps the upload from looking abandoned.
        let done = sqlx::query(
            "WITH f AS (
                 UPDATE files SET updated_at = now() WHERE id = $1 AND status = 'uploading'
                 RETURNING id
             )
             INSERT INTO file_chunks (file_id, seq, data) SELECT id, $2, $3 FROM f",
        )
        .bind(file_id)
        .bind(seq)
        .bind(data)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(no_upload(file_id));
        }
        Ok(())
    }

    pub(crate) async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        // The row stays (marked) so a batch naming the file still names something; the bytes go.
        let row: Option<(String,)> = sqlx::query_as(
            "WITH f AS (
                 UPDATE files SET deleted_at = now()
                 WHERE id = $1 AND tenant = $2 AND status = 'processed' AND deleted_at IS NULL
                 RETURNING id
             ), c AS (
                 DELETE FROM file_chunks USING f WHERE file_chunks.file_id = f.id
             )
             SELECT id FROM f",
        )
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.is_some())
    }

    pub(crate) async fn purge_stale_uploads(
        &self,
        older_than: Duration,
    ) -> Result<u64, StoreError> {
        let done = sqlx::query(
            "DELETE FROM files
             WHERE status = 'uploading' AND updated_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(millis(older_than))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
