//! SQLite storage of uploaded and batch-written files, mirroring `crate::files`: the bytes in
//! chunk rows, one short write per chunk, so an upload never holds the write lock for long.

use super::jobs::req_ts;
use super::{ts, ts_before, SqliteBackend};
use crate::files::{no_upload, page, page_sql, FileRecord, NewFile, SortOrder, FILE_COLUMNS};
use crate::jobs::corrupt;
use crate::StoreError;
use chrono::Utc;
use sqlx::sqlite::SqliteRow;
use sqlx::Row;
use std::time::Duration;

fn file_from_row(r: &SqliteRow) -> Result<FileRecord, StoreError> {
    Ok(FileRecord {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        purpose: r.try_get("purpose")?,
        filename: r.try_get("filename")?,
        bytes: r.try_get("bytes")?,
        lines: r.try_get("lines")?,
        created_at: req_ts(r, "created_at")?,
    })
}

impl SqliteBackend {
    pub(crate) async fn begin_file(&self, file: &NewFile) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO files (id, tenant, purpose, filename, status, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, 'uploading', ?5, ?5)",
        )
        .bind(&file.id)
        .bind(&file.tenant)
        .bind(&file.purpose)
        .bind(&file.filename)
        .bind(ts(Utc::now()))
        .execute(&self.write)
        .await?;
        Ok(())
    }

    pub(crate) async fn append_file_chunk(
        &self,
        file_id: &str,
        seq: i32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        let touched =
            sqlx::query("UPDATE files SET updated_at = ?2 WHERE id = ?1 AND status = 'uploading'")
                .bind(file_id)
                .bind(ts(Utc::now()))
                .execute(&mut *tx)
                .await?;
        if touched.rows_affected() == 0 {
            tx.rollback().await?;
            return Err(no_upload(file_id));
        }
        sqlx::query("INSERT INTO file_chunks (file_id, seq, data) VALUES (?1, ?2, ?3)")
            .bind(file_id)
            .bind(seq)
            .bind(data)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(crate) async fn finish_file(
        &self,
        file_id: &str,
        bytes: i64,
        lines: i32,
    ) -> Result<FileRecord, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE files SET status = 'processed', bytes = ?2, lines = ?3, updated_at = ?4
             WHERE id = ?1 AND status = 'uploading'
             RETURNING {FILE_COLUMNS}"
        ))
        .bind(file_id)
        .bind(bytes)
        .bind(lines)
        .bind(ts(Utc::now()))
        .fetch_optional(&self.write)
        .await?;
        match row {
            Some(row) => file_from_row(&row),
            None => Err(no_upload(file_id)),
        }
    }

    pub(crate) async fn abort_file(&self, file_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM files WHERE id = ?1 AND status = 'uploading'")
            .bind(file_id)
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    pub(crate) async fn get_file(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<FileRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files
             WHERE id = ?1 AND tenant = ?2 AND status = 'processed' AND deleted_at IS NULL"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(file_from_row).transpose()
    }

    pub(crate) async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        order: SortOrder,
    ) -> Result<(Vec<FileRecord>, bool), StoreError> {
        let (cmp, dir) = page_sql(order);
        let rows = sqlx::query(&format!(
            "SELECT {FILE_COLUMNS} FROM files
             WHERE tenant = ?1 AND status = 'processed' AND deleted_at IS NULL
               AND (?2 IS NULL OR purpose = ?2)
               AND (?3 IS NULL OR id {cmp} ?3)
             ORDER BY id {dir} LIMIT ?4"
        ))
        .bind(tenant)
        .bind(purpose)
        .bind(after)
        .bind(limit.max(0).saturating_add(1))
        .fetch_all(&self.read)
        .await?;
        let files = rows.iter().map(file_from_row).collect::<Result<_, _>>()?;
        Ok(page(files, limit))
    }

    pub(crate) async fn file_chunk_count(&self, file_id: &str) -> Result<i32, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM file_chunks WHERE file_id = ?1")
            .bind(file_id)
            .fetch_one(&self.read)
            .await?;
        i32::try_from(n).map_err(corrupt)
    }

    pub(crate) async fn file_chunk(
        &self,
        file_id: &str,
        seq: i32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT data FROM file_chunks WHERE file_id = ?1 AND seq = ?2")
                .bind(file_id)
                .bind(seq)
                .fetch_optional(&self.read)
                .await?;
        Ok(row.map(|(data,)| data))
    }

    pub(crate) async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        // The row stays (marked) so a batch naming the file still names something; the bytes go.
        let marked = sqlx::query(
            "UPDATE files SET deleted_at = ?3
             WHERE id = ?1 AND tenant = ?2 AND status = 'processed' AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(tenant)
        .bind(ts(Utc::now()))
        .execute(&mut *tx)
        .await?;
        if marked.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query("DELETE FROM file_chunks WHERE file_id = ?1")
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
        let done = sqlx::query("DELETE FROM files WHERE status = 'uploading' AND updated_at < ?1")
            .bind(ts_before(Utc::now(), older_than))
            .execute(&self.write)
            .await?;
        Ok(done.rows_affected())
    }
}
