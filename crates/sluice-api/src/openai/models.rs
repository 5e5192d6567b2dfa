//! `GET /v1/models`: the model aliases a key may name, in OpenAI's model-list shape.

use super::extract::OpenAiCaller;
use super::OpenAiError;
use crate::ApiState;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

fn model(id: &str) -> Value {
    // Aliases have no creation time of their own; 0 is the epoch the SDKs accept.
    json!({"id": id, "object": "model", "created": 0, "owned_by": "sluice"})
}

/// The route aliases this key may use.
#[utoipa::path(get, path = "/v1/models", tag = "openai",
    security(("tenant_key" = [])),
    responses(
        (status = 200, description = "`{object: list, data: [{id, object: model, created, owned_by}]}`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
    ))]
pub(crate) async fn list(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(_): OpenAiCaller,
) -> Json<Value> {
    let data: Vec<Value> = state.intake.models().map(model).collect();
    Json(json!({"object": "list", "data": data}))
}

/// One alias; an unknown one is 404.
#[utoipa::path(get, path = "/v1/models/{id}", tag = "openai",
    security(("tenant_key" = [])),
    params(("id" = String, Path, description = "A model alias")),
    responses(
        (status = 200, description = "`{id, object: model, created, owned_by}`", body = Object),
        (status = 401, description = "`authentication_error`", body = Object),
        (status = 404, description = "`model_not_found`", body = Object),
    ))]
pub(crate) async fn retrieve(
    State(state): State<Arc<ApiState>>,
    OpenAiCaller(_): OpenAiCaller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OpenAiError> {
    if state.intake.models().any(|m| m == id) {
        Ok(Json(model(&id)))
    } else {
        Err(OpenAiError::not_found(format!(
            "The model `{id}` does not exist or you do not have access to it"
        ))
        .param("model")
        .code("model_not_found"))
    }
}
