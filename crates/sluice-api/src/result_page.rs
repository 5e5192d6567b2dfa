//! A job's read-only result page, `GET /r/{id}?exp=..&sig=..`: what a completion email links
//! to, opened by a browser without a key because the link itself is signed and expires.

use crate::ApiState;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sluice_core::JobState;
use sluice_notify::message::escape_html;
use sluice_notify::Refusal;
use sluice_store::JobRecord;
use std::fmt::Write as _;
use std::sync::{Arc, LazyLock};

/// The pages' only style, allowed by its hash in the CSP instead of `'unsafe-inline'`.
const STYLE: &str = "body{font-family:system-ui,sans-serif;max-width:50rem;margin:2rem auto;\
padding:0 1rem;line-height:1.5}th{text-align:left;padding-right:1rem}\
pre{white-space:pre-wrap;word-wrap:break-word;background:#f4f4f4;padding:1rem}";

/// No script, no frame, no form, nothing fetched: the page is text and its one style sheet.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(STYLE));
    let policy = format!(
        "default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'"
    );
    // Base64 and ASCII only: always a valid header value.
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct Link {
    /// When the link stops opening the page, in Unix seconds.
    exp: Option<String>,
    /// The server's signature of the id and `exp` (base64url HMAC-SHA256).
    sig: Option<String>,
}

/// The job's status, model, times and answer or error, as HTML; the link is the credential.
#[utoipa::path(get, path = "/r/{id}", tag = "results",
    params(("id" = String, Path, description = "The job's request_id"), Link),
    responses(
        (status = 200, description = "The job's result page", body = String, content_type = "text/html"),
        (status = 403, description = "The link is malformed, altered or not this server's", body = String, content_type = "text/html"),
        (status = 404, description = "Result pages are not enabled, or the job is no longer kept", body = String, content_type = "text/html"),
        (status = 410, description = "The link has expired", body = String, content_type = "text/html"),
    ))]
pub(crate) async fn page(
    State(state): State<Arc<ApiState>>,
    id: Result<Path<String>, PathRejection>,
    link: Result<Query<Link>, QueryRejection>,
) -> Response {
    let Some(signer) = &state.result_links else {
        return notice(
            StatusCode::NOT_FOUND,
            "Not available",
            "Result pages are not enabled on this server.",
        );
    };
    // Anything that is not a well-formed link is refused exactly like a forged one.
    let (Ok(Path(id)), Ok(Query(Link { exp, sig }))) = (id, link) else {
        return forged();
    };
    let (Some(exp), Some(sig)) = (exp, sig) else {
        return forged();
    };
    let id = match signer.verify(&id, &exp, &sig, Utc::now().timestamp()) {
        Ok(id) => id,
        Err(Refusal::Forged) => return forged(),
        Err(Refusal::Expired) => {
            return notice(
                StatusCode::GONE,
                "Link expired",
                "This link to a job's result has expired. The job's record can still be read \
                 through the API with your key.",
            )
        }
    };
    match state.store.job(id).await {
        Ok(Some(job)) => html(StatusCode::OK, "Sluice job result", &job_body(&job)),
        Ok(None) => notice(
            StatusCode::NOT_FOUND,
            "Not found",
            "This job's record is no longer kept.",
        ),
        Err(error) => {
            tracing::error!(message = "result page failed", %error);
            notice(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Try again later",
                "The result could not be read just now. Please try again in a moment.",
            )
        }
    }
}

fn forged() -> Response {
    notice(
        StatusCode::FORBIDDEN,
        "Link not valid",
        "This link is not valid. Check that the whole link was copied from the email.",
    )
}

/// A page with one paragraph: refusals and errors, saying nothing about any job.
fn notice(status: StatusCode, title: &str, text: &str) -> Response {
    html(status, title, &format!("<p>{}</p>\n", escape_html(text)))
}

/// Only what the job's submitter asked about: no tenant, user, key, endpoint or messages.
fn job_body(job: &JobRecord) -> String {
    let mut body = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        body,
        "<table>\n\
         <tr><th>Job</th><td><code>{id}</code></td></tr>\n\
         <tr><th>Status</th><td>{state}</td></tr>\n\
         <tr><th>Model</th><td>{model}</td></tr>\n\
         <tr><th>Submitted</th><td>{created}</td></tr>\n\
         <tr><th>Started</th><td>{started}</td></tr>\n\
         <tr><th>Finished</th><td>{finished}</td></tr>\n\
         </table>\n",
        id = job.id,
        state = job.state,
        model = escape_html(&job.model),
        created = time(Some(job.created_at)),
        started = time(job.started_at),
        finished = time(job.finished_at),
    );
    let (heading, text) = match job.state {
        JobState::Succeeded => {
            let content = job
                .result
                .as_ref()
                .and_then(|r| r.get("content"))
                .and_then(|c| c.as_str())
                .unwrap_or_default();
            if content.is_empty() {
                ("Result", "(the model returned no text)")
            } else {
                ("Result", content)
            }
        }
        JobState::Failed | JobState::Dead => (
            "Error",
            job.error.as_deref().unwrap_or("(no error was recorded)"),
        ),
        JobState::Cancelled => ("Outcome", "The job was cancelled before it finished."),
        _ => (
            "Outcome",
            "The job has not finished yet; reload this page later.",
        ),
    };
    let _ = write!(
        body,
        "<h2>{heading}</h2>\n<pre>{}</pre>\n",
        escape_html(text)
    );
    body
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// A whole page with the headers every result page carries: not stored by caches, not
/// indexed, no referrer leaked to links out, nothing run.
fn html(status: StatusCode, title: &str, body: &str) -> Response {
    let title = escape_html(title);
    let page = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"robots\" content=\"noindex, nofollow\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n\
         {body}</body>\n</html>\n"
    );
    (
        status,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::CONTENT_SECURITY_POLICY, CSP.clone()),
            (
                HeaderName::from_static("x-robots-tag"),
                HeaderValue::from_static("noindex, nofollow"),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        page,
    )
        .into_response()
}
