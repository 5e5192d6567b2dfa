//! The completion emails themselves: subject, headers, and plain-text and HTML parts carrying
//! the job's outcome or the batch's end, and the links to fetch them. Pure, so unit-tested.

use crate::link::LinkSigner;
use chrono::{DateTime, SecondsFormat, Utc};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::Message;
use sluice_core::{JobState, RequestId};
use sluice_store::{BatchStatus, Notification, NotificationSubject};
use std::fmt::Write as _;

/// Longest result quoted in an email, in characters; the link has the whole of it.
pub const MAX_CONTENT_CHARS: usize = 100_000;

/// Most of a failed batch's errors listed in its email; the batch's record has them all.
pub const MAX_BATCH_ERRORS: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    /// The job's address does not parse: no retry will help.
    #[error("invalid recipient address {address:?}: {source}")]
    BadRecipient {
        address: String,
        source: lettre::address::AddressError,
    },
    #[error("could not build the message: {0}")]
    Build(#[from] lettre::error::Error),
}

/// What an email links to: the API under `base_url`, and a job's result page signed by
/// `signer` until `expires_at` (Unix seconds).
#[derive(Debug, Clone, Copy)]
pub struct Links<'a> {
    pub base_url: &'a str,
    pub signer: &'a LinkSigner,
    pub expires_at: i64,
}

impl Links<'_> {
    /// The job's result page: opens in a browser without a key until the link expires.
    pub fn job_page(&self, id: RequestId) -> String {
        self.signer.url(self.base_url, id, self.expires_at)
    }

    /// When the result page's link stops opening it, as an RFC 3339 time.
    fn expiry(&self) -> String {
        time(DateTime::from_timestamp(self.expires_at, 0))
    }
}

/// Build the email telling `n.email` how its job or batch ended.
pub fn compose(n: &Notification, from: &Mailbox, links: &Links) -> Result<Message, ComposeError> {
    let to: Mailbox = n
        .email
        .trim()
        .parse()
        .map_err(|source| ComposeError::BadRecipient {
            address: n.email.clone(),
            source,
        })?;
    let (id_header, id, stable_id) = match &n.subject {
        NotificationSubject::Job { request_id, .. } => (
            "X-Sluice-Request-Id",
            request_id.to_string(),
            message_id(*request_id, from),
        ),
        NotificationSubject::Batch { batch_id, .. } => (
            "X-Sluice-Batch-Id",
            batch_id.clone(),
            batch_message_id(batch_id, from),
        ),
    };
    let message = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(subject(n))
        // The same id on every send of this email, so a duplicate sent after a crash (the
        // server took it, the mailer died before marking it sent) is recognisable.
        .message_id(Some(stable_id))
        // RFC 3834: an automatic message; auto-responders must not answer it.
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".into(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str(id_header),
            id,
        ))
        .multipart(MultiPart::alternative_plain_html(
            plain_body(n, links),
            html_body(n, links),
        ))?;
    Ok(message)
}

/// `<job-{request_id}@{domain of the sender}>`: stable per job, unique across jobs.
pub fn message_id(id: RequestId, from: &Mailbox) -> String {
    format!("<job-{id}@{}>", from.email.domain())
}

/// `<{batch_id}@{domain of the sender}>` (batch ids start `batch_`): stable per batch.
pub fn batch_message_id(batch_id: &str, from: &Mailbox) -> String {
    format!("<{batch_id}@{}>", from.email.domain())
}

fn base(base_url: &str) -> &str {
    base_url.trim_end_matches('/')
}

/// Where the job's full record is: `{base_url}/v1/jobs/{id}`.
pub fn job_link(base_url: &str, id: RequestId) -> String {
    format!("{}/v1/jobs/{id}", base(base_url))
}

/// Where the batch's record is: `{base_url}/v1/batches/{id}`.
pub fn batch_link(base_url: &str, id: &str) -> String {
    format!("{}/v1/batches/{id}", base(base_url))
}

/// Where a file's content is: `{base_url}/v1/files/{id}/content`.
pub fn file_content_link(base_url: &str, id: &str) -> String {
    format!("{}/v1/files/{id}/content", base(base_url))
}

pub fn subject(n: &Notification) -> String {
    match &n.subject {
        NotificationSubject::Job {
            request_id,
            job_state,
            ..
        } => format!("Your Sluice job {request_id} {}", verb(*job_state)),
        NotificationSubject::Batch {
            batch_id, status, ..
        } => format!("Your Sluice batch {batch_id} {}", batch_verb(*status)),
    }
}

fn verb(state: JobState) -> String {
    match state {
        JobState::Succeeded => "succeeded".into(),
        JobState::Failed | JobState::Dead => "failed".into(),
        JobState::Cancelled => "was cancelled".into(),
        other => format!("is {other}"),
    }
}

fn batch_verb(status: BatchStatus) -> String {
    match status {
        BatchStatus::Completed => "completed".into(),
        BatchStatus::Failed => "failed".into(),
        BatchStatus::Expired => "expired".into(),
        BatchStatus::Cancelled => "was cancelled".into(),
        other => format!("is {other}"),
    }
}

/// What happened to a job, as a heading and the text under it.
fn outcome(state: JobState, content: Option<&str>, error: Option<&str>) -> (&'static str, String) {
    match state {
        JobState::Succeeded => {
            let content = content.unwrap_or_default();
            if content.is_empty() {
                ("Result", "(the model returned no text)".into())
            } else {
                ("Result", truncate(content))
            }
        }
        JobState::Failed | JobState::Dead => (
            "Error",
            error.map_or_else(|| "(no error was recorded)".into(), str::to_owned),
        ),
        JobState::Cancelled => (
            "Outcome",
            "The job was cancelled before it finished.".into(),
        ),
        other => ("Outcome", format!("The job is {other}.")),
    }
}

fn truncate(content: &str) -> String {
    match content.char_indices().nth(MAX_CONTENT_CHARS) {
        Some((cut, _)) => format!(
            "{}\n\n[truncated after {MAX_CONTENT_CHARS} characters; the link has the whole result]",
            &content[..cut]
        ),
        None => content.to_owned(),
    }
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.to_rfc3339_opts(SecondsFormat::Secs, true))
        .unwrap_or_else(|| "-".into())
}

/// What a batch's end means for its results, in a sentence.
fn batch_outcome(status: BatchStatus) -> &'static str {
    match status {
        BatchStatus::Completed => "Every request of the batch finished.",
        BatchStatus::Failed => "The batch was refused before any request ran.",
        BatchStatus::Expired => {
            "The batch's completion window passed first; requests that finished are in its files."
        }
        BatchStatus::Cancelled => {
            "The batch was cancelled; requests that finished before are in its files."
        }
        _ => "The batch has not ended yet.",
    }
}

/// The lines of a failed batch's `errors` (OpenAI's `{"data": [{"code", "message", "line"}]}`),
/// at most [`MAX_BATCH_ERRORS`], and a count of the rest.
fn batch_errors(errors: Option<&serde_json::Value>) -> Vec<String> {
    let Some(errors) = errors else {
        return Vec::new();
    };
    let items = match errors.get("data").unwrap_or(errors) {
        serde_json::Value::Array(items) => items.clone(),
        other => vec![other.clone()],
    };
    let mut lines: Vec<String> = items
        .iter()
        .take(MAX_BATCH_ERRORS)
        .map(|item| {
            let text = item
                .get("message")
                .and_then(|m| m.as_str())
                .map_or_else(|| item.to_string(), str::to_owned);
            match item.get("line").and_then(|l| l.as_i64()) {
                Some(line) => format!("line {line}: {text}"),
                None => text,
            }
        })
        .collect();
    if items.len() > MAX_BATCH_ERRORS {
        lines.push(format!("... and {} more", items.len() - MAX_BATCH_ERRORS));
    }
    lines
}

/// The plain-text part.
pub fn plain_body(n: &Notification, links: &Links) -> String {
    let base_url = links.base_url;
    let mut body = String::new();
    // Writing to a String cannot fail.
    match &n.subject {
        NotificationSubject::Job {
            request_id,
            job_state,
            model,
            content,
            error,
            finished_at,
        } => {
            let (heading, text) = outcome(*job_state, content.as_deref(), error.as_deref());
            let _ = write!(
                body,
                "Your Sluice job {request_id} {verb}.\n\n\
                 Model:     {model}\n\
                 Submitted: {created}\n\
                 Finished:  {finished}\n\n\
                 {heading}:\n{text}\n\n\
                 See the result in a browser (no key needed; the link works until {expiry}):\n\
                 {page}\n\n\
                 With your API key: GET {link}\n\n\
                 -- \n\
                 Sluice sent this email because the job asked for one when it finished.\n",
                verb = verb(*job_state),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                link = job_link(base_url, *request_id),
                page = links.job_page(*request_id),
                expiry = links.expiry(),
            );
        }
        NotificationSubject::Batch {
            batch_id,
            status,
            total,
            completed,
            failed,
            output_file_id,
            error_file_id,
            errors,
            finished_at,
        } => {
            let _ = write!(
                body,
                "Your Sluice batch {batch_id} {verb}.\n\n\
                 Status:    {status}\n\
                 Requests:  {total} in total, {completed} completed, {failed} failed\n\
                 Submitted: {created}\n\
                 Finished:  {finished}\n\n\
                 {outcome}\n\n",
                verb = batch_verb(*status),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                outcome = batch_outcome(*status),
            );
            let errors = batch_errors(errors.as_ref());
            if !errors.is_empty() {
                body.push_str("Errors:\n");
                for line in errors {
                    let _ = writeln!(body, "- {line}");
                }
                body.push('\n');
            }
            for (name, file) in [
                ("Output file", output_file_id),
                ("Error file", error_file_id),
            ] {
                if let Some(file) = file {
                    let _ = write!(
                        body,
                        "{name}: {file}\n  GET {}\n",
                        file_content_link(base_url, file)
                    );
                }
            }
            if output_file_id.is_none() && error_file_id.is_none() {
                body.push_str("No output file was written.\n");
            }
            let _ = write!(
                body,
                "\nThe batch: GET {link}\n(send your API key as a bearer token)\n\n\
                 -- \n\
                 Sluice sent this email because the batch asked for one when it ended.\n",
                link = batch_link(base_url, batch_id),
            );
        }
    }
    body
}

/// The HTML part; everything that came from a model or a user is escaped.
pub fn html_body(n: &Notification, links: &Links) -> String {
    let base_url = links.base_url;
    let mut body = String::new();
    let _ = write!(
        body,
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body>\n",
        title = escape_html(&subject(n)),
    );
    match &n.subject {
        NotificationSubject::Job {
            request_id,
            job_state,
            model,
            content,
            error,
            finished_at,
        } => {
            let (heading, text) = outcome(*job_state, content.as_deref(), error.as_deref());
            let link = escape_html(&job_link(base_url, *request_id));
            let page = escape_html(&links.job_page(*request_id));
            let _ = write!(
                body,
                "<p>Your Sluice job <code>{request_id}</code> {verb}.</p>\n\
                 <table>\n\
                 <tr><th align=\"left\">Model</th><td>{model}</td></tr>\n\
                 <tr><th align=\"left\">Submitted</th><td>{created}</td></tr>\n\
                 <tr><th align=\"left\">Finished</th><td>{finished}</td></tr>\n\
                 </table>\n\
                 <h3>{heading}</h3>\n\
                 <pre style=\"white-space: pre-wrap\">{text}</pre>\n\
                 <p><a href=\"{page}\">See the result</a> (no key needed; the link works until {expiry}).</p>\n\
                 <p>With your API key: GET <a href=\"{link}\">{link}</a></p>\n\
                 <hr>\n<p><small>Sluice sent this email because the job asked for one when it finished.</small></p>\n",
                verb = escape_html(&verb(*job_state)),
                model = escape_html(model),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                text = escape_html(&text),
                expiry = links.expiry(),
            );
        }
        NotificationSubject::Batch {
            batch_id,
            status,
            total,
            completed,
            failed,
            output_file_id,
            error_file_id,
            errors,
            finished_at,
        } => {
            let link = escape_html(&batch_link(base_url, batch_id));
            let _ = write!(
                body,
                "<p>Your Sluice batch <code>{id}</code> {verb}.</p>\n\
                 <table>\n\
                 <tr><th align=\"left\">Status</th><td>{status}</td></tr>\n\
                 <tr><th align=\"left\">Requests</th><td>{total} in total, {completed} completed, {failed} failed</td></tr>\n\
                 <tr><th align=\"left\">Submitted</th><td>{created}</td></tr>\n\
                 <tr><th align=\"left\">Finished</th><td>{finished}</td></tr>\n\
                 </table>\n\
                 <p>{outcome}</p>\n",
                id = escape_html(batch_id),
                verb = escape_html(&batch_verb(*status)),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                outcome = escape_html(batch_outcome(*status)),
            );
            let errors = batch_errors(errors.as_ref());
            if !errors.is_empty() {
                body.push_str("<h3>Errors</h3>\n<ul>\n");
                for line in errors {
                    let _ = writeln!(body, "<li>{}</li>", escape_html(&line));
                }
                body.push_str("</ul>\n");
            }
            for (name, file) in [
                ("Output file", output_file_id),
                ("Error file", error_file_id),
            ] {
                if let Some(file) = file {
                    let content = escape_html(&file_content_link(base_url, file));
                    let _ = writeln!(
                        body,
                        "<p>{name}: <code>{file}</code><br>GET <a href=\"{content}\">{content}</a></p>",
                        file = escape_html(file),
                    );
                }
            }
            if output_file_id.is_none() && error_file_id.is_none() {
                body.push_str("<p>No output file was written.</p>\n");
            }
            let _ = write!(
                body,
                "<p>The batch: GET <a href=\"{link}\">{link}</a> (send your API key as a bearer token)</p>\n\
                 <hr>\n<p><small>Sluice sent this email because the batch asked for one when it ended.</small></p>\n",
            );
        }
    }
    body.push_str("</body>\n</html>\n");
    body
}

/// Escape text for HTML element content and quoted attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Which job or batch a notification is about, for logs: `job <id>` or `batch <id>`.
pub fn describe(n: &Notification) -> String {
    match &n.subject {
        NotificationSubject::Job { request_id, .. } => format!("job {request_id}"),
        NotificationSubject::Batch { batch_id, .. } => format!("batch {batch_id}"),
    }
}

#[cfg(test)]
mod tests;
