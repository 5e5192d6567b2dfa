//! Files of the OpenAI-compatible Files API (batch inputs, batch outputs and errors): the shared
//! types and the PostgreSQL statements (SQLite's are in `sqlite::files`).
//!
//! The bytes live in the database in chunks, so any API node serves any file and no statement
//! ever holds a whole one: an upload begins (`uploading`), appends its chunks as they arrive and
//! finishes (`processed`); only processed, undeleted files are visible, and only to their tenant.

use crate::jobs::corrupt;
use crate::postgres::PgBackend;
use crate::{millis, StoreError};
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;
use std::time::Duration;

/// A file about to be uploaded (or written by a batch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFile {
    /// `file-<32 hex of a uuidv7>`: see [`new_file_id`].
    pub id: String,
    pub tenant: String,
    /// `batch` (an input) or `batch_output` (a batch's output or error file).
    pub purpose: String,
    pub filename: String,
}

/// A processed file as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub id: String,
    pub tenant: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub lines: i32,
    pub created_at: DateTime<Utc>,
}

/// The order of a listing, by id (which is by creation time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    Asc,
    #[default]
    Desc,
}

/// A fresh file id: `file-` and the 32 hex digits of a UUIDv7, so ids sort by creation time.
pub fn new_file_id() -> String {
    format!("file-{}", uuid::Uuid::now_v7().simple())
}

pub(crate) const FILE_COLUMNS: &str = "id, tenant, purpose, filename, bytes, lines, created_at";

fn file_from_row(r: &PgRow) -> Result<FileRecord, StoreError> {
    Ok(FileRecord {
        id: r.try_get("id")?,
        tenant: r.try_get("tenant")?,
        purpose: r.try_get("purpose")?,
        filename: r.try_get("filename")?,
        bytes: r.try_get("bytes")?,
        lines: r.try_get("lines")?,
        created_at: r.try_get("created_at")?,
    })
}

/// The comparison and direction of a page in `order`, as SQL (fixed strings, never input).
pub(crate) fn page_sql(order: SortOrder) -> (&'static str, &'static str) {
    match order {
        SortOrder::Asc => (">", "ASC"),
        SortOrder::Desc => ("<", "DESC"),
    }
}

/// Split the `limit + 1` rows a page query fetched into the page and whether more follow.
pub(crate) fn page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let limit = usize::try_from(limit.max(0)).unwrap_or(usize::MAX);
    let more = rows.len() > limit;
    rows.truncate(limit);
    (rows, more)
}

pub(crate) fn no_upload(file_id: &str) -> StoreError {
    StoreError::NotFound(format!("no upload in progress for file {file_id:?}"))
}

impl PgBackend {
    pub(crate) async fn begin_file(&self, file: &NewFile) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO files (id, tenant, purpose, filename, status)
             VALUES ($1, $2, $3, $4, 'uploading')",
        )
        .bind(&file.id)
        .bind(&file.tenant)
        .bind(&file.purpose)
        .bind(&file.filename)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

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

    pub(crate) async fn finish_file(
        &self,
        file_id: &str,
        bytes: i64,
        lines: i32,
    ) -> Result<FileRecord, StoreError> {
        let row = sqlx::query(&format!(
            "UPDATE files SET status = 'processed', bytes = $2, lines = $3, updated_at = now()
             WHERE id = $1 AND status = 'uploading'
             RETURNING {FILE_COLUMNS}"
        ))
        .bind(file_id)
        .bind(bytes)
        .bind(lines)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => file_from_row(&row),
            None => Err(no_upload(file_id)),
        }
    }

    pub(crate) async fn abort_file(&self, file_id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM files WHERE id = $1 AND status = 'uploading'")
            .bind(file_id)
            .execute(&self.pool)
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
             WHERE id = $1 AND tenant = $2 AND status = 'processed' AND deleted_at IS NULL"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
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
             WHERE tenant = $1 AND status = 'processed' AND deleted_at IS NULL
               AND ($2::text IS NULL OR purpose = $2)
               AND ($3::text IS NULL OR id {cmp} $3)
             ORDER BY id {dir} LIMIT $4"
        ))
        .bind(tenant)
        .bind(purpose)
        .bind(after)
        .bind(limit.max(0).saturating_add(1))
        .fetch_all(&self.pool)
        .await?;
        let files = rows.iter().map(file_from_row).collect::<Result<_, _>>()?;
        Ok(page(files, limit))
    }

    pub(crate) async fn file_chunk_count(&self, file_id: &str) -> Result<i32, StoreError> {
        let (n,): (i64,) = sqlx::query_as("SELECT count(*) FROM file_chunks WHERE file_id = $1")
            .bind(file_id)
            .fetch_one(&self.pool)
            .await?;
        i32::try_from(n).map_err(corrupt)
    }

    pub(crate) async fn file_chunk(
        &self,
        file_id: &str,
        seq: i32,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> =
            sqlx::query_as("SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2")
                .bind(file_id)
                .bind(seq)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|(data,)| data))
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
