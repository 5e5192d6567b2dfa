//! SQLite's file statements, mirroring `postgres::files`: one short write per chunk, so an
//! upload never holds the write lock for long, and a deleted file's bytes go in its transaction.

use super::SqliteBackend;
use crate::files::no_upload;
use crate::sql::Ts;
use crate::StoreError;
use std::time::Duration;

impl SqliteBackend {
    pub(crate) async fn append_file_chunk(
        &self,
        file_id: &str,
        seq: i32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let touched =
            sqlx::query("UPDATE files SET updated_at = $2 WHERE id = $1 AND status = 'uploading'")
                .bind(file_id)
                .bind(Ts::now())
                .execute(&mut *tx)
                .await?;
        if touched.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(no_upload(file_id));
        }
        sqlx::query("INSERT INTO file_chunks (file_id, seq, data) VALUES ($1, $2, $3)")
            .bind(file_id)
            .bind(seq)
            .bind(data)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        // The row stays (marked) so a batch naming the file still names something; the bytes go.
        let marked = sqlx::query(
            "UPDATE files SET deleted_at = $3
             WHERE id = $1 AND tenant = $2 AND status = 'processed' AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(tenant)
        .bind(Ts::now())
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM file_chunks WHERE file_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(crate) async fn purge_stale_uploads(
        &self,
        older_than: Duration,
    ) -> Result<u64, StoreError> {
        // The chunks go with their files (ON DELETE CASCADE; the store turns foreign keys on).
        let done = sqlx::query("DELETE FROM files WHERE status = 'uploading' AND updated_at < $1")
            .bind(Ts::now().before(older_than))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }
}
