//! `/v1/batches`: OpenAI's Batch API over the `batch` lane. Every line of the input file is
//! checked at create (one bad line fails the batch and makes no job), then each becomes an
//! ordinary job in the `batch` lane; the finalizer (`finalizer.rs`) ends it.

use super::extract::{OpenAiCaller, OpenAiJson};
use super::files::{cursor, page, plausible_id};
use super::wire::parse_chat;
use super::OpenAiError;
use crate::ApiState;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use sluice_admission::{AdmitError, Intake};
use sluice_core::JobRequest;
use sluice_store::{new_batch_id, BatchRecord, CancelBatch, NewBatch, Store};
use std::collections::HashSet;
use std::sync::Arc;

/// The one endpoint batch lines may call.
const CHAT_ENDPOINT: &str = "/v1/chat/completions";
/// Errors reported for one refused batch; more are summed up in the last.
const MAX_REPORTED_ERRORS: usize = 1_000;

fn unix(at: Option<DateTime<Utc>>) -> Value {
    at.map_or(Value::Null, |t| json!(t.timestamp()))
}

/// A batch as OpenAI's `Batch` object.
pub(crate) fn batch_object(b: &BatchRecord) -> Value {
    json!({
        "id": b.id,
        "object": "batch",
        "endpoint": b.endpoint,
        "errors": b.errors,
        "input_file_id": b.input_file_id,
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id,
        "error_file_id": b.error_file_id,
        "created_at": b.created_at.timestamp(),
        "in_progress_at": unix(b.in_progress_at),
        "expires_at": b.expires_at.timestamp(),
        "finalizing_at": unix(b.finalizing_at),
        "completed_at": unix(b.completed_at),
        "failed_at": unix(b.failed_at),
        "expired_at": unix(b.expired_at),
        "cancelling_at": unix(b.cancelling_at),
        "cancelled_at": unix(b.cancelled_at),
        "request_counts": {"total": b.total, "completed": b.completed, "failed": b.failed},
        "metadata": b.metadata,
    })
}

/// One refused line, as an entry of the batch's `errors.data`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct LineError {
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub line: Option<usize>,
}

impl LineError {
    fn at(
        line: usize,
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        LineError {
            code,
            message: message.into(),
            param: param.map(str::to_owned),
            line: Some(line),
        }
    }

    fn json(&self) -> Value {
        use sluice_core::shorten_message;
        json!({
            "code": self.code,
            "message": shorten_message(&self.message),
            "param": self.param.as_deref().map(shorten_message),
            "line": self.line,
        })
    }
}

/// Check one input line: `{custom_id, method: "POST", url, body}` with a body the chat
/// completion route would accept for a known model, not streamed.
pub(crate) fn check_line(
    intake: &Intake,
    n: usize,
    text: &str,
    endpoint: &str,
) -> Result<(String, JobRequest), LineError> {
    let mut line = crate::json::parse_object(text.as_bytes()).map_err(|e| {
        use crate::json::BadJson;
        let (code, message) = match e {
            BadJson::Syntax(_) => (
                "invalid_json_line",
                format!("line {n} is not valid JSON: {e}"),
            ),
            BadJson::NotObject(_) => (
                "invalid_json_line",
                format!("line {n} is not a JSON object"),
            ),
            BadJson::DuplicateKey(_) | BadJson::Nul => {
                ("invalid_request", format!("line {n}: {e}"))
            }
        };
        LineError::at(n, code, None, message)
    })?;
    let custom_id = match line.remove("custom_id") {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= 512 => id,
        _ => {
            return Err(LineError::at(
                n,
                "missing_custom_id",
                Some("custom_id"),
                "custom_id must be a non-empty string of at most 512 characters",
            ))
        }
    };
    if line.remove("method").as_ref().and_then(Value::as_str) != Some("POST") {
        return Err(LineError::at(
            n,
            "invalid_method",
            Some("method"),
            "method must be POST",
        ));
    }
    match line.remove("url") {
        Some(Value::String(url)) if url == endpoint => {}
        _ => {
            return Err(LineError::at(
                n,
                "invalid_url",
                Some("url"),
                format!("url must be the batch's endpoint, {endpoint}"),
            ))
        }
    }
    let Some(Value::Object(body)) = line.remove("body") else {
        return Err(LineError::at(
            n,
            "invalid_body",
            Some("body"),
            "body must be a JSON object",
        ));
    };
    if let Some(key) = line.keys().next() {
        return Err(LineError::at(
            n,
            "invalid_request",
            Some(key),
            format!(
                "unknown field {:?}: a line holds custom_id, method, url and body",
                sluice_core::excerpt(key)
            ),
        ));
    }
    let call = parse_chat(body).map_err(|e| {
        let param = e.param.as_deref().map(|p| format!("body.{p}"));
        LineError {
            code: if e.code.as_deref() == Some("invalid_request") {
                "invalid_request"
            } else {
                "invalid_body"
            },
            message: e.message.clone(),
            param,
            line: Some(n),
        }
    })?;
    if call.request.stream {
        return Err(LineError::at(
            n,
            "stream_not_supported",
            Some("body.stream"),
            "batch requests are not streamed: leave stream out",
        ));
    }
    intake.check(&call.request).map_err(|e| match e {
        AdmitError::UnknownModel { .. } => {
            LineError::at(n, "model_not_found", Some("body.model"), e.to_string())
        }
        AdmitError::Invalid(invalid) => LineError {
            code: "invalid_request",
            param: invalid.param.map(|p| format!("body.{p}")),
            message: invalid.message,
            line: Some(n),
        },
        other => LineError::at(n, "invalid_request", None, other.to_string()),
    })?;
    Ok((custom_id, call.request))
}

/// Read a stored file line by line (chunks may split lines), calling `each(line_number, text)`
/// for every non-blank line.
async fn each_line(
    store: &Store,
    file_id: &str,
    mut each: impl FnMut(usize, &str),
) -> Result<(), OpenAiError> {
    let chunks = store
        .file_chunk_count(file_id)
        .await
        .map_err(OpenAiError::internal)?;
    let mut carry: Vec<u8> = Vec::new();
    let mut n = 0;
    let emit = |bytes: &[u8], n: &mut usize, each: &mut dyn FnMut(usize, &str)| {
        *n += 1;
        let text = String::from_utf8_lossy(bytes);
        if !text.trim().is_empty() {
            each(*n, text.trim_end_matches('\r'));
        }
    };
    for seq in 0..chunks {
        let chunk = store
            .file_chunk(file_id, seq)
            .await
            .map_err(OpenAiError::internal)?
            .ok_or_else(|| OpenAiError::internal(format!("file {file_id} lost chunk {seq}")))?;
        let mut rest = &chunk[..];
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            carry.extend_from_slice(&rest[..at]);
            emit(&carry, &mut n, &mut each);
            carry.clear();
            rest = &rest[at + 1..];
        }
        carry.extend_from_slice(rest);
    }
    if !carry.is_empty() {
        emit(&carry, &mut n, &mut each);
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    /// OpenAI's expiry of the output file; files here live until deleted.
    #[serde(default)]
    #[allow(dead_code)]
    output_expires_after: Option<Value>,
}

/// OpenAI's metadata rules: at most 16 pairs, keys up to 64 characters, string values up to 512.
fn check_metadata(metadata: &Map<String, Value>) -> Result<(), OpenAiError> {
    if metadata.len() > 16 {
        return Err(OpenAiError::invalid(
            "metadata",
            "metadata may hold at most 16 pairs",
        ));
    }
    for (key, value) in metadata {
        let ok =
            key.chars().count() <= 64 && value.as_str().is_some_and(|v| v.chars().count() <= 512);
        if !ok {
            return Err(OpenAiError::invalid(
                "metadata",
                "metadata keys are at most 64 characters and values strings of at most 512",
            ));
        }
    }
    Ok(())
}

/// Create a batch from an uploaded file of chat completion requests.
#[utoipa::path(post, path = "/v1/batches", tag = "openai",
    security(("tenant_key" = [])),
    request_body(content = Object, content_type = "application/json",
        description = "`{input_file_id, endpoint: /v1/chat/completions, completion_window: 24h, metadata}`"),
    responses(
        (status = 200, description = "OpenAI's Batch object: `in_progress`, or `failed` with `errors.data[].line` when a line is refused (then no job is made)", body = Object),
        (status = 400, description = "`invalid_request_error`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 402, description = "`budget_exhausted`", body = Object),
        (status = 404, description = "`not_found`: no such input file", body = Object),
        (status = 429, description = "`batch_queue_full`: too many unfinished batch lines", body = Object),
    ))]
pub(crate) async fn create(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    OpenAiJson(body): OpenAiJson,
) -> Result<Json<Value>, OpenAiError> {
    let body: CreateBatch = serde_json::from_value(Value::Object(body))
        .map_err(|e| OpenAiError::invalid("body", format!("invalid batch: {e}")))?;
    if body.endpoint != CHAT_ENDPOINT {
        return Err(OpenAiError::invalid(
            "endpoint",
            format!("Sluice runs batches of {CHAT_ENDPOINT} only"),
        ));
    }
    if body.completion_window != "24h" {
        return Err(OpenAiError::invalid(
            "completion_window",
            "completion_window must be 24h",
        ));
    }
    if let Some(metadata) = &body.metadata {
        check_metadata(metadata)?;
    }
    let known = plausible_id(&body.input_file_id);
    let file = if known {
        state
            .store
            .get_file(&principal.tenant, &body.input_file_id)
            .await
            .map_err(OpenAiError::internal)?
    } else {
        None
    };
    let file = file.ok_or_else(|| {
        OpenAiError::not_found(format!("No such File object: {}", body.input_file_id))
            .param("input_file_id")
    })?;
    if file.purpose != "batch" {
        return Err(OpenAiError::invalid(
            "input_file_id",
            "the input file must have been uploaded with purpose=batch",
        ));
    }
    let config = &state.batches;
    let mut lines = Vec::new();
    let mut errors: Vec<LineError> = Vec::new();
    let mut seen = HashSet::new();
    each_line(&state.store, &file.id, |n, text| {
        if errors.len() >= MAX_REPORTED_ERRORS {
            return;
        }
        match check_line(&state.intake, n, text, &body.endpoint) {
            Ok((custom_id, request)) => {
                if !seen.insert(custom_id.clone()) {
                    errors.push(LineError::at(
                        n,
                        "duplicate_custom_id",
                        Some("custom_id"),
                        format!(
                            "custom_id {:?} appears on an earlier line",
                            sluice_core::excerpt(&custom_id)
                        ),
                    ));
                } else if errors.is_empty() {
                    lines.push((i32::try_from(n).unwrap_or(i32::MAX), custom_id, request));
                }
            }
            Err(error) => errors.push(error),
        }
    })
    .await?;
    if lines.is_empty() && errors.is_empty() {
        errors.push(LineError {
            code: "empty_file",
            message: "the input file holds no requests".into(),
            param: None,
            line: None,
        });
    }
    if lines.len() > super::files::MAX_FILE_LINES as usize {
        errors.push(LineError {
            code: "too_many_requests",
            message: format!(
                "a batch holds at most {} requests",
                super::files::MAX_FILE_LINES
            ),
            param: None,
            line: None,
        });
    }
    let email = principal
        .email
        .as_deref()
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned);
    let new = NewBatch {
        id: new_batch_id(),
        tenant: principal.tenant.clone(),
        user: principal.user.clone(),
        tier: principal.tier,
        input_file_id: file.id.clone(),
        endpoint: body.endpoint.clone(),
        completion_window: body.completion_window.clone(),
        metadata: body.metadata.map(Value::Object),
        expires_in: config.completion_window(),
        notify_email: email,
    };
    if !errors.is_empty() {
        let errors = json!({"object": "list", "data": errors.iter().map(LineError::json).collect::<Vec<_>>()});
        let record = state
            .store
            .create_failed_batch(&new, &errors)
            .await
            .map_err(OpenAiError::internal)?;
        tracing::info!(message = "batch refused", batch = %record.id, tenant = %principal.tenant);
        return Ok(Json(batch_object(&record)));
    }
    state
        .intake
        .submit_batch(&principal, &new, lines, config.max_pending_lines)
        .await?;
    let record = state
        .store
        .get_batch(&principal.tenant, &new.id)
        .await
        .map_err(OpenAiError::internal)?
        .ok_or_else(|| OpenAiError::internal("a created batch vanished"))?;
    Ok(Json(batch_object(&record)))
}

/// The answer for an unknown, malformed or another tenant's batch id: all alike.
fn no_such_batch(id: &str) -> OpenAiError {
    OpenAiError::not_found(format!("No such Batch object: {id}")).param("batch_id")
}

async fn tenant_batch(
    state: &ApiState,
    tenant: &str,
    id: &str,
) -> Result<BatchRecord, OpenAiError> {
    if !plausible_id(id) {
        return Err(no_such_batch(id));
    }
    state
        .store
        .get_batch(tenant, id)
        .await
        .map_err(OpenAiError::internal)?
        .ok_or_else(|| no_such_batch(id))
}

/// One batch, with its counts as last kept; another tenant's id is 404.
#[utoipa::path(get, path = "/v1/batches/{id}", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A batch id")),
    responses(
        (status = 200, description = "OpenAI's Batch object", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`not_found`", body = Object),
    ))]
pub(crate) async fn retrieve(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    Ok(Json(batch_object(
        &tenant_batch(&state, &principal.tenant, &id).await?,
    )))
}

/// Cancel a batch: `cancelling`, then `cancelled` once its unfinished lines are cancelled;
/// the lines that finished keep their output.
#[utoipa::path(post, path = "/v1/batches/{id}/cancel", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A batch id")),
    responses(
        (status = 200, description = "OpenAI's Batch object, `cancelling`", body = Object),
        (status = 400, description = "`batch_not_cancellable`: it already ended", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`not_found`", body = Object),
    ))]
pub(crate) async fn cancel(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    if !plausible_id(&id) {
        return Err(no_such_batch(&id));
    }
    match state
        .store
        .cancel_batch(&principal.tenant, &id)
        .await
        .map_err(OpenAiError::internal)?
    {
        CancelBatch::Cancelling(record) => Ok(Json(batch_object(&record))),
        CancelBatch::AlreadyEnded(status) => Err(OpenAiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("Cannot cancel a batch with status {status}."),
        )
        .code("batch_not_cancellable")
        .no_retry()),
        CancelBatch::NotFound => Err(no_such_batch(&id)),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BatchQuery {
    after: Option<String>,
    limit: Option<i64>,
}

/// The tenant's batches, newest first, paged by `after`.
#[utoipa::path(get, path = "/v1/batches", tag = "openai",
    security(("tenant_key" = [])),
    params(
        ("after" = Option<String>, Query, description = "The last id of the previous page"),
        ("limit" = Option<i64>, Query, description = "1 to 100 (default 20)"),
    ),
    responses(
        (status = 200, description = "`{object: list, data, first_id, last_id, has_more}`", body = Object),
        (status = 400, description = "`invalid_request_error`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
    ))]
pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(principal): OpenAiCaller,
    query: Result<Query<BatchQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let Query(query) = query.map_err(|e| OpenAiError::invalid("query", e.body_text()))?;
    let limit = query.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(OpenAiError::invalid(
            "limit",
            "limit must be between 1 and 100",
        ));
    }
    let after = cursor(query.after)?;
    let (batches, has_more) = state
        .store
        .list_batches(&principal.tenant, after.as_deref(), limit)
        .await
        .map_err(OpenAiError::internal)?;
    Ok(Json(page(
        batches.iter().map(batch_object).collect(),
        has_more,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_follows_openais_limits() {
        let ok: Map<String, Value> =
            serde_json::from_value(json!({"team": "ml"})).unwrap_or_default();
        assert!(check_metadata(&ok).is_ok());
        let long: Map<String, Value> =
            serde_json::from_value(json!({"k": "v".repeat(513)})).unwrap_or_default();
        assert!(check_metadata(&long).is_err());
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert!(check_metadata(&many).is_err());
        let number: Map<String, Value> =
            serde_json::from_value(json!({"k": 1})).unwrap_or_default();
        assert!(check_metadata(&number).is_err());
    }
}
