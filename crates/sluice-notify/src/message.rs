//! The completion emails themselves: subject, headers, and a plain-text and an HTML part that
//! both carry the job's outcome or the batch's end, and the links to fetch them. Pure, so what
//! a person receives is unit-tested.

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

/// Build the email telling `n.email` how its job or batch ended.
pub fn compose(n: &Notification, from: &Mailbox, base_url: &str) -> Result<Message, ComposeError> {
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
            plain_body(n, base_url),
            html_body(n, base_url),
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
pub fn plain_body(n: &Notification, base_url: &str) -> String {
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
                 The job: {link}\n\n\
                 -- \n\
                 Sluice sent this email because the job asked for one when it finished.\n",
                verb = verb(*job_state),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                link = job_link(base_url, *request_id),
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
pub fn html_body(n: &Notification, base_url: &str) -> String {
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
                 <p>The job: <a href=\"{link}\">{link}</a></p>\n\
                 <hr>\n<p><small>Sluice sent this email because the job asked for one when it finished.</small></p>\n",
                verb = escape_html(&verb(*job_state)),
                model = escape_html(model),
                created = time(Some(n.created_at)),
                finished = time(*finished_at),
                text = escape_html(&text),
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
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    fn notification(state: JobState) -> Notification {
        Notification {
            id: 7,
            email: "ada@example.com".into(),
            attempts: 1,
            created_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
            subject: NotificationSubject::Job {
                request_id: "0190b5e4-7d2a-7cc0-8000-000000000001".parse().unwrap(),
                job_state: state,
                model: "large".into(),
                content: Some("x < y && \"z\" > 'w'\n<script>alert(1)</script>".into()),
                error: Some("provider said <nope> & gave up".into()),
                finished_at: Some(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 9).unwrap()),
            },
        }
    }

    /// Change the job a test notification is about.
    fn with_job(
        mut n: Notification,
        change: impl FnOnce(&mut Option<String>, &mut RequestId),
    ) -> Notification {
        if let NotificationSubject::Job {
            content,
            request_id,
            ..
        } = &mut n.subject
        {
            change(content, request_id);
        }
        n
    }

    fn batch(status: BatchStatus) -> Notification {
        Notification {
            id: 8,
            email: "ada@example.com".into(),
            attempts: 1,
            created_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
            subject: NotificationSubject::Batch {
                batch_id: "batch_0190b5e47d2a7cc08000000000000002".into(),
                status,
                total: 10,
                completed: 8,
                failed: 2,
                output_file_id: Some("file-out".into()),
                error_file_id: Some("file-err".into()),
                errors: None,
                finished_at: Some(Utc.with_ymd_and_hms(2025, 1, 3, 3, 4, 9).unwrap()),
            },
        }
    }

    fn from() -> Mailbox {
        "Sluice <sluice@mail.example.org>".parse().unwrap()
    }

    const BASE: &str = "https://sluice.example.org";
    const LINK: &str = "https://sluice.example.org/v1/jobs/0190b5e4-7d2a-7cc0-8000-000000000001";

    fn parts(message: &Message) -> (String, String, mailparse::ParsedMail<'static>) {
        let raw: &'static [u8] = Box::leak(message.formatted().into_boxed_slice());
        let parsed = mailparse::parse_mail(raw).unwrap();
        assert_eq!(parsed.ctype.mimetype, "multipart/alternative");
        assert_eq!(parsed.subparts.len(), 2);
        assert_eq!(parsed.subparts[0].ctype.mimetype, "text/plain");
        assert_eq!(parsed.subparts[1].ctype.mimetype, "text/html");
        assert_eq!(parsed.subparts[0].ctype.charset, "utf-8");
        // SMTP bodies end lines with CRLF.
        let plain = parsed.subparts[0].get_body().unwrap().replace("\r\n", "\n");
        let html = parsed.subparts[1].get_body().unwrap().replace("\r\n", "\n");
        (plain, html, parsed)
    }

    #[test]
    fn success_has_both_parts_the_link_and_the_result() {
        let n = notification(JobState::Succeeded);
        let message = compose(&n, &from(), "https://sluice.example.org/").unwrap();
        let (plain, html, parsed) = parts(&message);
        assert!(plain.contains(LINK), "{plain}");
        assert!(
            html.contains(&format!("<a href=\"{LINK}\">{LINK}</a>")),
            "{html}"
        );
        // The plain part carries the result verbatim.
        assert!(plain.contains("x < y && \"z\" > 'w'\n<script>alert(1)</script>"));
        assert!(plain.contains("Model:     large"));
        assert!(plain.contains("Finished:  2025-01-02T03:04:09Z"));
        // The HTML part escapes it.
        assert!(html.contains(
            "x &lt; y &amp;&amp; &quot;z&quot; &gt; &#39;w&#39;\n&lt;script&gt;alert(1)&lt;/script&gt;"
        ));
        assert!(!html.contains("<script>"));
        assert!(!plain.contains("provider said"), "a success shows no error");

        let header = |name: &str| {
            use mailparse::MailHeaderMap;
            parsed.headers.get_first_value(name).unwrap()
        };
        assert_eq!(
            header("Subject"),
            "Your Sluice job 0190b5e4-7d2a-7cc0-8000-000000000001 succeeded"
        );
        assert_eq!(
            header("Message-ID"),
            "<job-0190b5e4-7d2a-7cc0-8000-000000000001@mail.example.org>"
        );
        assert_eq!(header("To"), "ada@example.com");
        assert_eq!(header("From"), "Sluice <sluice@mail.example.org>");
        assert_eq!(header("Auto-Submitted"), "auto-generated");
        assert_eq!(
            header("X-Sluice-Request-Id"),
            "0190b5e4-7d2a-7cc0-8000-000000000001"
        );
        assert_eq!(
            message.envelope().to()[0].to_string(),
            "ada@example.com",
            "the envelope goes to the job's address"
        );
    }

    #[test]
    fn failures_show_the_error_escaped() {
        for state in [JobState::Failed, JobState::Dead] {
            let n = notification(state);
            let message = compose(&n, &from(), "https://sluice.example.org").unwrap();
            let (plain, html, parsed) = parts(&message);
            assert!(
                plain.contains("Error:\nprovider said <nope> & gave up"),
                "{plain}"
            );
            assert!(
                html.contains("provider said &lt;nope&gt; &amp; gave up"),
                "{html}"
            );
            assert!(plain.contains(LINK) && html.contains(LINK));
            assert!(!plain.contains("alert(1)"), "a failure shows no result");
            use mailparse::MailHeaderMap;
            assert_eq!(
                parsed.headers.get_first_value("Subject").unwrap(),
                "Your Sluice job 0190b5e4-7d2a-7cc0-8000-000000000001 failed"
            );
        }
    }

    #[test]
    fn cancelled_and_empty_results_read_sensibly() {
        let n = notification(JobState::Cancelled);
        assert_eq!(
            subject(&n),
            "Your Sluice job 0190b5e4-7d2a-7cc0-8000-000000000001 was cancelled"
        );
        assert!(plain_body(&n, BASE).contains("cancelled before it finished"));
        let n = with_job(notification(JobState::Succeeded), |content, _| {
            *content = None
        });
        assert!(plain_body(&n, BASE).contains("(the model returned no text)"));
    }

    #[test]
    fn the_message_id_is_stable_per_job() {
        let n = notification(JobState::Succeeded);
        let a = compose(&n, &from(), "http://x").unwrap();
        let b = compose(&n, &from(), "http://x").unwrap();
        assert_eq!(
            a.headers().get_raw("Message-ID"),
            b.headers().get_raw("Message-ID")
        );
        let other = with_job(n.clone(), |_, id| *id = RequestId::new());
        let c = compose(&other, &from(), "http://x").unwrap();
        assert_ne!(
            a.headers().get_raw("Message-ID"),
            c.headers().get_raw("Message-ID")
        );
    }

    #[test]
    fn long_results_are_cut_with_a_pointer_to_the_link() {
        let n = with_job(notification(JobState::Succeeded), |content, _| {
            *content = Some("é".repeat(MAX_CONTENT_CHARS + 10))
        });
        let plain = plain_body(&n, BASE);
        assert!(plain.contains("[truncated after 100000 characters"));
        assert_eq!(plain.matches('é').count(), MAX_CONTENT_CHARS);
    }

    #[test]
    fn a_bad_recipient_is_a_clear_error() {
        let mut n = notification(JobState::Succeeded);
        n.email = "not an address".into();
        let err = compose(&n, &from(), "http://x").unwrap_err();
        assert!(matches!(err, ComposeError::BadRecipient { .. }));
        assert!(err.to_string().contains("not an address"));
    }

    #[test]
    fn a_batch_email_tells_how_it_ended_and_where_its_output_is() {
        let n = batch(BatchStatus::Completed);
        let message = compose(&n, &from(), "https://sluice.example.org/").unwrap();
        let (plain, html, parsed) = parts(&message);
        use mailparse::MailHeaderMap;
        let header = |name: &str| parsed.headers.get_first_value(name).unwrap();
        assert_eq!(
            header("Subject"),
            "Your Sluice batch batch_0190b5e47d2a7cc08000000000000002 completed"
        );
        assert_eq!(
            header("Message-ID"),
            "<batch_0190b5e47d2a7cc08000000000000002@mail.example.org>"
        );
        assert_eq!(
            header("X-Sluice-Batch-Id"),
            "batch_0190b5e47d2a7cc08000000000000002"
        );
        assert!(parsed
            .headers
            .get_first_value("X-Sluice-Request-Id")
            .is_none());
        assert!(plain.contains("Status:    completed"), "{plain}");
        assert!(plain.contains("Requests:  10 in total, 8 completed, 2 failed"));
        assert!(plain.contains(
            "Output file: file-out\n  GET https://sluice.example.org/v1/files/file-out/content"
        ));
        assert!(plain.contains(
            "Error file: file-err\n  GET https://sluice.example.org/v1/files/file-err/content"
        ));
        assert!(plain.contains(
            "GET https://sluice.example.org/v1/batches/batch_0190b5e47d2a7cc08000000000000002"
        ));
        assert!(plain.contains("Finished:  2025-01-03T03:04:09Z"));
        assert!(html.contains("<a href=\"https://sluice.example.org/v1/files/file-out/content\">"));
        assert!(html.contains(
            "<a href=\"https://sluice.example.org/v1/batches/batch_0190b5e47d2a7cc08000000000000002\">"
        ));
        assert!(!plain.contains("/v1/jobs/"), "a batch email links no job");
    }

    #[test]
    fn batch_ends_read_sensibly_and_a_failed_batch_lists_its_errors() {
        assert_eq!(
            subject(&batch(BatchStatus::Cancelled)),
            "Your Sluice batch batch_0190b5e47d2a7cc08000000000000002 was cancelled"
        );
        assert!(plain_body(&batch(BatchStatus::Expired), BASE).contains("completion window passed"));
        let mut n = batch(BatchStatus::Failed);
        let data: Vec<serde_json::Value> = (1..=12)
            .map(|line| serde_json::json!({ "code": "invalid_json", "message": "not <JSON>", "line": line }))
            .collect();
        n.subject = match n.subject {
            NotificationSubject::Batch {
                batch_id, status, ..
            } => NotificationSubject::Batch {
                batch_id,
                status,
                total: 0,
                completed: 0,
                failed: 0,
                output_file_id: None,
                error_file_id: None,
                errors: Some(serde_json::json!({ "object": "list", "data": data })),
                finished_at: None,
            },
            other => other,
        };
        let plain = plain_body(&n, BASE);
        assert!(plain.contains("- line 1: not <JSON>"), "{plain}");
        assert!(plain.contains("- line 10: not <JSON>"));
        assert!(!plain.contains("line 11:"));
        assert!(plain.contains("... and 2 more"));
        assert!(plain.contains("No output file was written."));
        let html = html_body(&n, BASE);
        assert!(html.contains("<li>line 1: not &lt;JSON&gt;</li>"), "{html}");
        assert_eq!(describe(&n), "batch batch_0190b5e47d2a7cc08000000000000002");
    }

    #[test]
    fn html_escaping_covers_the_five_specials() {
        assert_eq!(
            escape_html("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain ü"), "plain ü");
    }
}
