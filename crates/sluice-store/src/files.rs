//! Files of the OpenAI-compatible Files API, their bytes in database chunks: the types and the
//! public API, with the statements both backends share.

use crate::jobs::corrupt;
use crate::sql::{dispatch, reading, writing, Ts};
use crate::{Store, StoreError};
use chrono::{DateTime, Utc};
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

/// A `files` row of [`FILE_COLUMNS`].
#[derive(sqlx::FromRow)]
pub(crate) struct FileRow {
    id: String,
    tenant: String,
    purpose: String,
    filename: String,
    bytes: i64,
    lines: i32,
    created_at: Ts,
}

impl From<FileRow> for FileRecord {
    fn from(r: FileRow) -> FileRecord {
        FileRecord {
            id: r.id,
            tenant: r.tenant,
            purpose: r.purpose,
            filename: r.filename,
            bytes: r.bytes,
            lines: r.lines,
            created_at: r.created_at.into(),
        }
    }
}

/// Files of the Files API (batch inputs, outputs and errors). The bytes live in the database in
/// chunks, so any API node serves any file and no statement ever holds a whole one: an upload
/// begins (`uploading`), appends its chunks as they arrive and finishes (`processed`); only
/// processed, undeleted files are visible, and only to their tenant.
impl Store {
    /// Start an upload (status `uploading`, invisible until [`Store::finish_file`]).
    pub async fn begin_file(&self, file: &NewFile) -> Result<(), StoreError> {
        writing!(self, |pool, now| {
            sqlx::query(&format!(
                "INSERT INTO files (id, tenant, purpose, filename, status, created_at, updated_at)
                 VALUES ($1, $2, $3, $4, 'uploading', {now}, {now})"
            ))
            .bind(&file.id)
            .bind(&file.tenant)
            .bind(&file.purpose)
            .bind(&file.filename)
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    /// Append chunk `seq` (0, 1, 2, ... in order) to an upload in progress, in a statement of
    /// its own; [`StoreError::NotFound`] if the file is not uploading (aborted, purged, done).
    pub async fn append_file_chunk(
        &self,
        file_id: &str,
        seq: i32,
        data: &[u8],
    ) -> Result<(), StoreError> {
        dispatch!(self.append_file_chunk(file_id, seq, data))
    }

    /// Finish an upload: the file becomes `processed` and visible with its size and line
    /// count; [`StoreError::NotFound`] if it is not uploading.
    pub async fn finish_file(
        &self,
        file_id: &str,
        bytes: i64,
        lines: i32,
    ) -> Result<FileRecord, StoreError> {
        let row: Option<FileRow> = writing!(self, |pool, now| {
            sqlx::query_as(&format!(
                "UPDATE files SET status = 'processed', bytes = $2, lines = $3, updated_at = {now}
                 WHERE id = $1 AND status = 'uploading'
                 RETURNING {FILE_COLUMNS}"
            ))
            .bind(file_id)
            .bind(bytes)
            .bind(lines)
            .fetch_optional(pool)
            .await?
        });
        row.map(FileRecord::from).ok_or_else(|| no_upload(file_id))
    }

    /// Drop an upload in progress and its chunks; `false` if there is none by that id.
    pub async fn abort_file(&self, file_id: &str) -> Result<bool, StoreError> {
        // The chunks go with their file (ON DELETE CASCADE).
        let done = writing!(self, |pool| {
            sqlx::query("DELETE FROM files WHERE id = $1 AND status = 'uploading'")
                .bind(file_id)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done > 0)
    }

    /// A tenant's processed, undeleted file; another tenant's id answers `None`.
    pub async fn get_file(&self, tenant: &str, id: &str) -> Result<Option<FileRecord>, StoreError> {
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files
             WHERE id = $1 AND tenant = $2 AND status = 'processed' AND deleted_at IS NULL"
        );
        let row: Option<FileRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(id)
                .bind(tenant)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(FileRecord::from))
    }

    /// A page of the tenant's processed, undeleted files (of one purpose, if given) after the
    /// id `after` in `order`, at most `limit`, and whether more follow.
    pub async fn list_files(
        &self,
        tenant: &str,
        purpose: Option<&str>,
        after: Option<&str>,
        limit: i64,
        order: SortOrder,
    ) -> Result<(Vec<FileRecord>, bool), StoreError> {
        let (cmp, dir) = page_sql(order);
        let sql = format!(
            "SELECT {FILE_COLUMNS} FROM files
             WHERE tenant = $1 AND status = 'processed' AND deleted_at IS NULL
               AND (CAST($2 AS TEXT) IS NULL OR purpose = $2)
               AND (CAST($3 AS TEXT) IS NULL OR id {cmp} $3)
             ORDER BY id {dir} LIMIT $4"
        );
        let rows: Vec<FileRow> = reading!(self, |pool| {
            sqlx::query_as(&sql)
                .bind(tenant)
                .bind(purpose)
                .bind(after)
                .bind(limit.max(0).saturating_add(1))
                .fetch_all(pool)
                .await?
        });
        Ok(page(
            rows.into_iter().map(FileRecord::from).collect(),
            limit,
        ))
    }

    /// How many chunks a file has (they are numbered from 0). Takes no tenant: check the file
    /// with [`Store::get_file`] first.
    pub async fn file_chunk_count(&self, file_id: &str) -> Result<i32, StoreError> {
        let (n,): (i64,) = reading!(self, |pool| {
            sqlx::query_as("SELECT count(*) FROM file_chunks WHERE file_id = $1")
                .bind(file_id)
                .fetch_one(pool)
                .await?
        });
        i32::try_from(n).map_err(corrupt)
    }

    /// One chunk of a file's content. Takes no tenant: check the file with
    /// [`Store::get_file`] first.
    pub async fn file_chunk(&self, file_id: &str, seq: i32) -> Result<Option<Vec<u8>>, StoreError> {
        let row: Option<(Vec<u8>,)> = reading!(self, |pool| {
            sqlx::query_as("SELECT data FROM file_chunks WHERE file_id = $1 AND seq = $2")
                .bind(file_id)
                .bind(seq)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(data,)| data))
    }

    /// Delete a tenant's file: marked deleted (the id stays known to batches naming it), its
    /// bytes dropped. `false` for an unknown, foreign or already deleted file.
    pub async fn delete_file(&self, tenant: &str, id: &str) -> Result<bool, StoreError> {
        dispatch!(self.delete_file(tenant, id))
    }

    /// Drop uploads no chunk reached for `older_than` (their node died mid-upload, or a
    /// finalizer lost its batch); answers how many.
    pub async fn purge_stale_uploads(&self, older_than: Duration) -> Result<u64, StoreError> {
        dispatch!(self.purge_stale_uploads(older_than))
    }
}
