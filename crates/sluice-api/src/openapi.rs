//! The OpenAPI 3 document of the public and admin API, generated from the handlers' annotations
//! and served at `GET /openapi.json`.
//!
//! sluice-core stays free of utoipa: its wire types are described here by schema-only mirrors
//! that handlers' types point at with `#[schema(value_type = ...)]`; a test keeps them in step.

use serde::Serialize;
use std::sync::LazyLock;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// Schema-only mirrors of sluice-core's wire types (never built: only described).
pub(crate) mod schemas {
    use super::*;

    /// Where a stored job is in its life.
    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum JobState {
        Queued,
        Running,
        Retrying,
        Succeeded,
        Failed,
        Cancelled,
        Dead,
    }

    /// The queue a job waits in.
    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum Lane {
        Priority,
        Standard,
        Batch,
        Retry,
        Dead,
    }

    /// A customer's service class; decides the lane its jobs wait in.
    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum Tier {
        Enterprise,
        Pro,
        Basic,
        Free,
    }

    /// Who wrote a chat message.
    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum Role {
        System,
        User,
        Assistant,
        Tool,
    }

    /// How loaded the system is, from least to most severe.
    #[derive(Serialize, ToSchema)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    pub(crate) enum LoadLevel {
        Normal,
        Heavy,
        Critical,
    }

    /// One chat message of a job.
    #[derive(Serialize, ToSchema)]
    #[allow(dead_code)]
    pub(crate) struct Message {
        pub role: Role,
        pub content: String,
    }

    /// Every error's body.
    #[derive(Serialize, ToSchema)]
    #[allow(dead_code)]
    pub(crate) struct ErrorBody {
        pub error: ErrorDetail,
    }

    /// `code` is stable and machine-readable; `message` is for people. Some codes add a
    /// field: `limit` (quota_exceeded), `budget` (budget_exhausted).
    #[derive(Serialize, ToSchema)]
    #[allow(dead_code)]
    pub(crate) struct ErrorDetail {
        pub code: String,
        pub message: String,
        #[schema(value_type = Object)]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub limit: Option<serde_json::Value>,
        #[schema(value_type = Object)]
        #[serde(skip_serializing_if = "Option::is_none")]
        pub budget: Option<serde_json::Value>,
    }
}

pub(crate) use schemas::ErrorBody;

/// Adds the two bearer schemes: tenant keys (`/v1`) and admin keys (`/admin/v1`).
struct BearerKeys;

impl Modify for BearerKeys {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        for (name, what) in [
            ("tenant_key", "a tenant API key (sluice keys create)"),
            ("admin_key", "an admin key (sluice keys create --admin)"),
        ] {
            components.add_security_scheme(
                name,
                SecurityScheme::Http(
                    HttpBuilder::new()
                        .scheme(HttpAuthScheme::Bearer)
                        .bearer_format("sk_sluice_...")
                        .description(Some(what))
                        .build(),
                ),
            );
        }
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sluice",
        description = "Queue-based worker system for LLM API traffic: submit, follow and cancel \
                       jobs; operate lanes, dead-lettered jobs and keys. Every JSON body is one \
                       object with no key twice: an array or a repeated key is 422 \
                       `invalid_request` (400 on the OpenAI routes)."
    ),
    paths(
        crate::jobs::submit,
        crate::jobs::get,
        crate::jobs::cancel,
        crate::events::sse,
        crate::stream::websocket,
        crate::health,
        crate::ready,
        crate::metrics,
        crate::openapi_json,
        crate::result_page::page,
        crate::admin::dead,
        crate::admin::inspect,
        crate::admin::purge,
        crate::admin::replay,
        crate::admin::lanes,
        crate::admin::pause_lane,
        crate::admin::pause_endpoint,
        crate::admin::keys,
        crate::admin::create_key,
        crate::admin::revoke_key,
        crate::dashboard::page,
        crate::dashboard::uplot_js,
        crate::dashboard::uplot_css,
        crate::dashboard::data,
        crate::openai::chat::completions,
        crate::openai::models::list,
        crate::openai::models::retrieve,
        crate::openai::files::upload,
        crate::openai::files::list,
        crate::openai::files::retrieve,
        crate::openai::files::content,
        crate::openai::files::delete,
        crate::openai::batches::create,
        crate::openai::batches::list,
        crate::openai::batches::retrieve,
        crate::openai::batches::cancel,
    ),
    components(schemas(
        schemas::JobState,
        schemas::Lane,
        schemas::Tier,
        schemas::Role,
        schemas::LoadLevel,
        schemas::Message,
        schemas::ErrorBody,
        schemas::ErrorDetail,
        crate::admin::PauseAction,
    )),
    modifiers(&BearerKeys),
    tags(
        (name = "jobs", description = "Submit, poll, follow and cancel jobs (tenant key)"),
        (name = "openai", description = "OpenAI-compatible chat completions, models, files and batches (tenant key): errors in OpenAI's shape"),
        (name = "admin", description = "Operators: dead jobs, lanes, pauses, keys (admin key)"),
        (name = "results", description = "A job's read-only result page, opened from its completion email's signed, expiring link (no key)"),
        (name = "ops", description = "Health, readiness, metrics and this document (no key)"),
    )
)]
struct ApiDoc;

/// The document, built once: it only changes with the code.
pub(crate) static DOCUMENT: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(ApiDoc::openapi);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// `(method, path)` of every `.route(...)` call in the router's sources.
    fn routed() -> Vec<(String, String)> {
        let mut found = Vec::new();
        for source in [
            include_str!("lib.rs"),
            include_str!("admin.rs"),
            include_str!("dashboard.rs"),
            include_str!("openai/mod.rs"),
        ] {
            for call in source.split(".route(\"").skip(1) {
                let (path, rest) = call.split_once('"').unwrap();
                // The method routers of this call: up to the end of the line.
                let handlers = rest.split('\n').next().unwrap();
                for method in ["get", "post", "put", "patch", "delete"] {
                    let called = handlers
                        .match_indices(&format!("{method}("))
                        .any(|(at, _)| {
                            at == 0 || !handlers.as_bytes()[at - 1].is_ascii_alphanumeric()
                        });
                    if called {
                        found.push((method.to_owned(), path.to_owned()));
                    }
                }
            }
        }
        found
    }

    #[test]
    fn the_document_lists_every_route_the_router_has() {
        let doc = serde_json::to_value(&*DOCUMENT).unwrap();
        let routes = routed();
        assert!(routes.len() >= 19, "found only {routes:?}");
        for (method, path) in &routes {
            assert!(
                doc["paths"][path][method].is_object(),
                "{} {path} is routed but not documented",
                method.to_uppercase()
            );
        }
        // And nothing documented that is not routed.
        let documented: usize = doc["paths"]
            .as_object()
            .unwrap()
            .values()
            .map(|item| item.as_object().unwrap().len())
            .sum();
        assert_eq!(documented, routes.len(), "{routes:?}");
    }

    #[test]
    fn every_reference_resolves() {
        let text = serde_json::to_string(&*DOCUMENT).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&text).unwrap();
        for piece in text.split("\"$ref\":\"#/").skip(1) {
            let pointer = format!("/{}", piece.split('"').next().unwrap());
            assert!(
                doc.pointer(&pointer).is_some(),
                "{pointer} is not in the document"
            );
        }
    }

    #[test]
    fn every_route_says_who_may_call_it() {
        let doc = serde_json::to_value(&*DOCUMENT).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let security = op["security"].to_string();
                let expected = if path.starts_with("/admin/") {
                    "admin_key"
                } else if path.starts_with("/v1/") {
                    "tenant_key"
                } else {
                    assert!(op.get("security").is_none(), "{method} {path}");
                    continue;
                };
                assert!(security.contains(expected), "{method} {path}: {security}");
                // The WebSocket refuses a bad key by closing the socket, not with a status.
                assert!(
                    path == "/v1/stream" || op["responses"]["401"].is_object(),
                    "{method} {path} does not document 401"
                );
            }
        }
    }

    #[test]
    fn the_mirrors_match_the_core_types() {
        use sluice_core as core;
        let doc = serde_json::to_value(&*DOCUMENT).unwrap();
        let values = |name: &str| doc["components"]["schemas"][name]["enum"].clone();
        fn wire<T: serde::Serialize>(items: &[T]) -> serde_json::Value {
            serde_json::to_value(items).unwrap()
        }
        assert_eq!(values("Lane"), wire(&core::Lane::ALL));
        assert_eq!(values("Tier"), wire(&core::Tier::ALL));
        use core::JobState as S;
        let states = [
            S::Queued,
            S::Running,
            S::Retrying,
            S::Succeeded,
            S::Failed,
            S::Cancelled,
            S::Dead,
        ];
        assert_eq!(values("JobState"), wire(&states));
        use core::Role as R;
        assert_eq!(
            values("Role"),
            wire(&[R::System, R::User, R::Assistant, R::Tool])
        );
        use core::LoadLevel as L;
        assert_eq!(
            values("LoadLevel"),
            wire(&[L::Normal, L::Heavy, L::Critical])
        );
        // A message the mirror describes parses as a core message.
        let message: core::Message =
            serde_json::from_value(serde_json::json!({"role": "user", "content": "hi"})).unwrap();
        assert_eq!(message.content.text(), "hi");
    }
}
