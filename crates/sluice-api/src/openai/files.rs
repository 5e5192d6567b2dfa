//! `/v1/files`: batch input files uploaded as multipart and stored in the database in chunks
//! (any API node serves any file; nothing on local disk), listed with cursor paging, read back
//! byte for byte, deleted. A tenant sees only its own files.

use super::extract::OpenAiCaller;
use super::OpenAiError;
use crate::ApiState;
use axum::body::Body;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use sluice_store::{new_file_id, FileRecord, NewFile, SortOrder, Store};
use std::sync::Arc;

/// Largest file accepted: OpenAI's limit for batch input.
pub const MAX_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// Most requests (non-empty lines) in a batch input file: OpenAI's limit.
pub const MAX_FILE_LINES: u32 = 50_000;
/// Bytes per stored chunk: large enough to keep statements few, small enough to keep each short.
const CHUNK_BYTES: usize = 1 << 20;
/// The upload route's body limit: the file plus room for the multipart framing and fields.
pub const MAX_UPLOAD_BODY: usize = (MAX_FILE_BYTES as usize) + (1 << 20);

/// A file as OpenAI's `FileObject`.
pub(crate) fn file_object(file: &FileRecord) -> Value {
    json!({
        "id": file.id,
        "object": "file",
        "bytes": file.bytes,
        "created_at": file.created_at.timestamp(),
        "filename": file.filename,
        "purpose": file.purpose,
        "status": "processed",
        "status_details": null,
        "expires_at": null,
    })
}

/// Counts bytes and requests (non-empty lines) of a file as it streams past.
#[derive(Debug, Default)]
pub(crate) struct LineCounter {
    pub bytes: u64,
    pub lines: u32,
    /// The current line has a non-blank byte.
    filled: bool,
}

impl LineCounter {
    pub fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        for &b in data {
            match b {
                b'\n' => {
                    self.lines += u32::from(self.filled);
                    self.filled = false;
                }
                b' ' | b'\t' | b'\r' => {}
                _ => self.filled = true,
            }
        }
    }

    /// The count once the last byte is in (a last line without a newline counts).
    pub fn finish(&self) -> u32 {
        self.lines + u32::from(self.filled)
    }
}

/// Why an upload was refused, before the file became visible.
fn too_large() -> OpenAiError {
    OpenAiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "invalid_request_error",
        format!("the file exceeds {} MB", MAX_FILE_BYTES >> 20),
    )
    .param("file")
    .code("file_too_large")
}

/// Stream the `file` field into the store as an upload; the file record once finished.
async fn store_upload(
    store: &Store,
    tenant: &str,
    filename: String,
    field: &mut axum::extract::multipart::Field<'_>,
) -> Result<FileRecord, OpenAiError> {
    let id = new_file_id();
    let new = NewFile {
        id: id.clone(),
        tenant: tenant.to_owned(),
        purpose: "batch".into(),
        filename,
    };
    store
        .begin_file(&new)
        .await
        .map_err(OpenAiError::internal)?;
    let result = async {
        let mut counter = LineCounter::default();
        let mut buffer = Vec::with_capacity(CHUNK_BYTES);
        let mut seq = 0;
        while let Some(data) = field.chunk().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                OpenAiError::invalid("file", format!("the upload broke off: {e}"))
            }
        })? {
            counter.feed(&data);
            if counter.bytes > MAX_FILE_BYTES {
                return Err(too_large());
            }
            if counter.finish() > MAX_FILE_LINES {
                return Err(OpenAiError::invalid(
                    "file",
                    format!("a batch file may hold at most {MAX_FILE_LINES} requests (lines)"),
                )
                .code("too_many_lines"));
            }
            buffer.extend_from_slice(&data);
            while buffer.len() >= CHUNK_BYTES {
                let rest = buffer.split_off(CHUNK_BYTES);
                store
                    .append_file_chunk(&id, seq, &buffer)
                    .await
                    .map_err(OpenAiError::internal)?;
                seq += 1;
                buffer = rest;
            }
        }
        if !buffer.is_empty() {
            store
                .append_file_chunk(&id, seq, &buffer)
                .await
                .map_err(OpenAiError::internal)?;
        }
        let lines = i32::try_from(counter.finish()).unwrap_or(i32::MAX);
        let bytes = i64::try_from(counter.bytes).unwrap_or(i64::MAX);
        store
            .finish_file(&id, bytes, lines)
            .await
            .map_err(OpenAiError::internal)
    }
    .await;
    if result.is_err() {
        if let Err(error) = store.abort_file(&id).await {
            tracing::warn!(message = "could not drop a refused upload; the stale-upload purge will", file = %id, %error);
        }
    }
    result
}

/// Upload a file (`multipart/form-data` with `file` and `purpose=batch`).
#[utoipa::path(post, path = "/v1/files", tag = "openai",
    security(("tenant_key" = [])),
    request_body(content = Object, content_type = "multipart/form-data",
        description = "`file` (JSONL, up to 200 MB and 50,000 lines) and `purpose` (`batch`)"),
    responses(
        (status = 200, description = "OpenAI's FileObject", body = Object),
        (status = 400, description = "`invalid_request_error`: no file, another purpose, too many lines", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 413, description = "`file_too_large`: over 200 MB", body = Object),
        (status = 415, description = "`unsupported_media_type`: not multipart/form-data", body = Object),
    ))]
pub(crate) async fn upload(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let mut multipart = multipart.map_err(|e| {
        OpenAiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            format!("send the file as multipart/form-data with fields file and purpose ({e})"),
        )
        .code("unsupported_media_type")
    })?;
    let mut purpose = None;
    let mut file: Option<FileRecord> = None;
    let refused = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            OpenAiError::invalid("file", format!("could not read the multipart body: {e}"))
        }
    };
    let result = async {
        while let Some(mut field) = multipart.next_field().await.map_err(refused)? {
            match field.name().unwrap_or_default() {
                "purpose" => {
                    let value = field.text().await.map_err(refused)?;
                    purpose = Some(value.trim().to_owned());
                }
                "file" => {
                    if file.is_some() {
                        return Err(OpenAiError::invalid("file", "send one file per upload"));
                    }
                    let name = field
                        .file_name()
                        .filter(|n| !n.is_empty())
                        .unwrap_or("upload.jsonl")
                        .chars()
                        .take(255)
                        .collect();
                    file = Some(
                        store_upload(&state.store, &principal.tenant, name, &mut field).await?,
                    );
                }
                // `expires_after[...]` and other fields OpenAI knows: files here live until deleted.
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    let refuse = |why: OpenAiError| async {
        if let Some(f) = &file {
            let _ = state.store.delete_file(&principal.tenant, &f.id).await;
        }
        Err(why)
    };
    if let Err(error) = result {
        return refuse(error).await;
    }
    match purpose.as_deref() {
        Some("batch") => {}
        Some(other) => {
            return refuse(OpenAiError::invalid(
                "purpose",
                format!(
                "purpose {:?} is not supported: Sluice stores files for batches (purpose=batch)",
                sluice_core::excerpt(other)
            ),
            ))
            .await
        }
        None => {
            return refuse(OpenAiError::invalid(
                "purpose",
                "purpose is required: send purpose=batch",
            ))
            .await
        }
    }
    let Some(file) = file else {
        return Err(OpenAiError::invalid("file", "file is required"));
    };
    Ok(Json(file_object(&file)))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileQuery {
    after: Option<String>,
    limit: Option<i64>,
    order: Option<String>,
    purpose: Option<String>,
}

/// Whether `id` could be one of Sluice's file or batch ids (`file-<hex>`, `batch_<hex>`): an id
/// that cannot is unknown without asking the database (which refuses some bytes, e.g. NUL).
pub(crate) fn plausible_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A cursor from the query: the last id of the previous page.
pub(crate) fn cursor(after: Option<String>) -> Result<Option<String>, OpenAiError> {
    match after {
        Some(id) if !plausible_id(&id) => Err(OpenAiError::invalid(
            "after",
            "after must be the id of the last object of the previous page",
        )),
        other => Ok(other),
    }
}

/// Purposes OpenAI defines; files here are only ever `batch` or `batch_output`.
const PURPOSES: [&str; 8] = [
    "batch",
    "batch_output",
    "assistants",
    "assistants_output",
    "fine-tune",
    "fine-tune-results",
    "vision",
    "user_data",
];

/// A page of OpenAI's list shape: `first_id`, `last_id`, `has_more`.
pub(crate) fn page(data: Vec<Value>, has_more: bool) -> Value {
    let first = data.first().map(|v| v["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|v| v["id"].clone()).unwrap_or(Value::Null);
    json!({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": has_more})
}

/// The tenant's files, newest first by default, paged by `after` (the last id of a page).
#[utoipa::path(get, path = "/v1/files", tag = "openai",
    security(("tenant_key" = [])),
    params(
        ("after" = Option<String>, Query, description = "The last id of the previous page"),
        ("limit" = Option<i64>, Query, description = "1 to 10,000 (default 10,000)"),
        ("order" = Option<String>, Query, description = "`desc` (default) or `asc`"),
        ("purpose" = Option<String>, Query, description = "Only files of this purpose"),
    ),
    responses(
        (status = 200, description = "`{object: list, data, first_id, last_id, has_more}`", body = Object),
        (status = 400, description = "`invalid_request_error`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
    ))]
pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    query: Result<Query<FileQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let Query(query) = query.map_err(|e| OpenAiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(OpenAiError::invalid(
            "limit",
            "limit must be between 1 and 10000",
        ));
    }
    let order = match query.order.as_deref() {
        None | Some("desc") => SortOrder::Desc,
        Some("asc") => SortOrder::Asc,
        Some(_) => return Err(OpenAiError::invalid("order", "order must be asc or desc")),
    };
    if let Some(purpose) = &query.purpose {
        if !PURPOSES.contains(&purpose.as_str()) {
            return Err(OpenAiError::invalid(
                "purpose",
                format!("unknown purpose; one of {}", PURPOSES.join(", ")),
            ));
        }
    }
    let after = cursor(query.after)?;
    let (files, has_more) = state
        .store
        .list_files(
            &principal.tenant,
            query.purpose.as_deref(),
            after.as_deref(),
            limit,
            order,
        )
        .await
        .map_err(OpenAiError::internal)?;
    Ok(Json(page(
        files.iter().map(file_object).collect(),
        has_more,
    )))
}

/// The answer for an unknown, deleted, malformed or another tenant's file id: all alike.
fn no_such_file(id: &str) -> OpenAiError {
    OpenAiError::not_found(format!("No such File object: {id}")).param("file_id")
}

async fn tenant_file(state: &ApiState, tenant: &str, id: &str) -> Result<FileRecord, OpenAiError> {
    if !plausible_id(id) {
        return Err(no_such_file(id));
    }
    state
        .store
        .get_file(tenant, id)
        .await
        .map_err(OpenAiError::internal)?
        .ok_or_else(|| no_such_file(id))
}

/// One file's metadata; another tenant's id is 404.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A file id")),
    responses(
        (status = 200, description = "OpenAI's FileObject", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`not_found`", body = Object),
    ))]
pub(crate) async fn retrieve(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    let file = tenant_file(&state, &principal.tenant, &id).await?;
    Ok(Json(file_object(&file)))
}

/// A file's bytes, as uploaded (or as the batch wrote them), streamed chunk by chunk.
#[utoipa::path(get, path = "/v1/files/{id}/content", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A file id")),
    responses(
        (status = 200, description = "The file's bytes", body = String, content_type = "application/octet-stream"),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`not_found`", body = Object),
    ))]
pub(crate) async fn content(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Response, OpenAiError> {
    let file = tenant_file(&state, &principal.tenant, &id).await?;
    let count = state
        .store
        .file_chunk_count(&file.id)
        .await
        .map_err(OpenAiError::internal)?;
    let store = state.store.clone();
    let file_id = file.id.clone();
    // One chunk in memory at a time, whatever the file's size.
    let chunks = futures::stream::unfold(0, move |seq| {
        let store = store.clone();
        let file_id = file_id.clone();
        async move {
            if seq >= count {
                return None;
            }
            let chunk = match store.file_chunk(&file_id, seq).await {
                Ok(Some(bytes)) => Ok(bytes::Bytes::from(bytes)),
                Ok(None) => Err(std::io::Error::other("a chunk of the file is missing")),
                Err(error) => Err(std::io::Error::other(error.to_string())),
            };
            Some((chunk, seq + 1))
        }
    });
    let mut response = Body::from_stream(chunks).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(length) = header::HeaderValue::try_from(file.bytes.to_string()) {
        headers.insert(header::CONTENT_LENGTH, length);
    }
    Ok(response)
}

/// Delete a file (its bytes go; batches that named it keep their results).
#[utoipa::path(delete, path = "/v1/files/{id}", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A file id")),
    responses(
        (status = 200, description = "`{id, object: file, deleted: true}`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`not_found`", body = Object),
    ))]
pub(crate) async fn delete(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    if !plausible_id(&id)
        || !state
            .store
            .delete_file(&principal.tenant, &id)
            .await
            .map_err(OpenAiError::internal)?
    {
        return Err(no_such_file(&id));
    }
    Ok(Json(json!({"id": id, "object": "file", "deleted": true})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_non_blank_lines_across_chunk_boundaries() {
        let mut c = LineCounter::default();
        let pieces = [&b"{\"a\":1}\n\n  \n{\"b\""[..], b":2}", b"\r\n{\"c\":3}"];
        for piece in pieces {
            c.feed(piece);
        }
        assert_eq!(c.finish(), 3);
        assert_eq!(c.bytes, pieces.iter().map(|p| p.len() as u64).sum::<u64>());
        let mut empty = LineCounter::default();
        empty.feed(b"\n\n");
        assert_eq!(empty.finish(), 0);
    }
}
