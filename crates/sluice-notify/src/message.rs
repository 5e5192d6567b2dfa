//! The completion email itself: subject, headers, and a plain-text and an HTML part that both
//! carry the job's outcome and its link. Pure, so what a person receives is unit-tested.

use chrono::{DateTime, SecondsFormat, Utc};
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::Message;
use sluice_core::{JobState, RequestId};
use sluice_store::Notification;
use std::fmt::Write as _;

/// Longest result quoted in an email, in characters; the link has the whole of it.
pub const MAX_CONTENT_CHARS: usize = 100_000;

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

/// Build the email telling `n.email` how job `n.request_id` ended.
pub fn compose(n: &Notification, from: &Mailbox, base_url: &str) -> Result<Message, ComposeError> {
    let to: Mailbox = n
        .email
        .trim()
        .parse()
        .map_err(|source| ComposeError::BadRecipient {
            address: n.email.clone(),
            source,
        })?;
    let link = job_link(base_url, n.request_id);
    let message = Message::builder()
        .from(from.clone())
        .to(to)
        .subject(subject(n))
        // The same id on every send of this job's email, so a duplicate sent after a crash
        // (the server took it, the mailer died before marking it sent) is recognisable.
        .message_id(Some(message_id(n.request_id, from)))
        // RFC 3834: an automatic message; auto-responders must not answer it.
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("Auto-Submitted"),
            "auto-generated".into(),
        ))
        .raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("X-Sluice-Request-Id"),
            n.request_id.to_string(),
        ))
        .multipart(MultiPart::alternative_plain_html(
            plain_body(n, &link),
            html_body(n, &link),
        ))?;
    Ok(message)
}

/// `<job-{request_id}@{domain of the sender}>`: stable per job, unique across jobs.
pub fn message_id(id: RequestId, from: &Mailbox) -> String {
    format!("<job-{id}@{}>", from.email.domain())
}

/// Where the job's full record is: `{base_url}/v1/jobs/{id}`.
pub fn job_link(base_url: &str, id: RequestId) -> String {
    format!("{}/v1/jobs/{id}", base_url.trim_end_matches('/'))
}

pub fn subject(n: &Notification) -> String {
    format!("Your Sluice job {} {}", n.request_id, verb(n.job_state))
}

fn verb(state: JobState) -> String {
    match state {
        JobState::Succeeded => "succeeded".into(),
        JobState::Failed | JobState::Dead => "failed".into(),
        JobState::Cancelled => "was cancelled".into(),
        other => format!("is {other}"),
    }
}

/// What happened, as a heading and the text under it.
fn outcome(n: &Notification) -> (&'static str, String) {
    match n.job_state {
        JobState::Succeeded => {
            let content = n.content.as_deref().unwrap_or_default();
            if content.is_empty() {
                ("Result", "(the model returned no text)".into())
            } else {
                ("Result", truncate(content))
            }
        }
        JobState::Failed | JobState::Dead => (
            "Error",
            n.error
                .clone()
                .unwrap_or_else(|| "(no error was recorded)".into()),
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

/// The plain-text part.
pub fn plain_body(n: &Notification, link: &str) -> String {
    let (heading, text) = outcome(n);
    let mut body = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        body,
        "Your Sluice job {id} {verb}.\n\n\
         Model:     {model}\n\
         Submitted: {created}\n\
         Finished:  {finished}\n\n\
         {heading}:\n{text}\n\n\
         The job: {link}\n\n\
         -- \n\
         Sluice sent this email because the job asked for one when it finished.\n",
        id = n.request_id,
        verb = verb(n.job_state),
        model = n.model,
        created = time(Some(n.created_at)),
        finished = time(n.finished_at),
    );
    body
}

/// The HTML part; everything that came from a model or a user is escaped.
pub fn html_body(n: &Notification, link: &str) -> String {
    let (heading, text) = outcome(n);
    let link = escape_html(link);
    let mut body = String::new();
    let _ = write!(
        body,
        "<!DOCTYPE html>\n<html>\n<head><meta charset=\"utf-8\"><title>{title}</title></head>\n<body>\n\
         <p>Your Sluice job <code>{id}</code> {verb}.</p>\n\
         <table>\n\
         <tr><th align=\"left\">Model</th><td>{model}</td></tr>\n\
         <tr><th align=\"left\">Submitted</th><td>{created}</td></tr>\n\
         <tr><th align=\"left\">Finished</th><td>{finished}</td></tr>\n\
         </table>\n\
         <h3>{heading}</h3>\n\
         <pre style=\"white-space: pre-wrap\">{text}</pre>\n\
         <p>The job: <a href=\"{link}\">{link}</a></p>\n\
         <hr>\n<p><small>Sluice sent this email because the job asked for one when it finished.</small></p>\n\
         </body>\n</html>\n",
        title = escape_html(&subject(n)),
        id = n.request_id,
        verb = escape_html(&verb(n.job_state)),
        model = escape_html(&n.model),
        created = time(Some(n.created_at)),
        finished = time(n.finished_at),
        text = escape_html(&text),
    );
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    fn notification(state: JobState) -> Notification {
        Notification {
            id: 7,
            request_id: "0190b5e4-7d2a-7cc0-8000-000000000001".parse().unwrap(),
            email: "ada@example.com".into(),
            attempts: 1,
            job_state: state,
            model: "large".into(),
            content: Some("x < y && \"z\" > 'w'\n<script>alert(1)</script>".into()),
            error: Some("provider said <nope> & gave up".into()),
            created_at: Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 5).unwrap(),
            finished_at: Some(Utc.with_ymd_and_hms(2025, 1, 2, 3, 4, 9).unwrap()),
        }
    }

    fn from() -> Mailbox {
        "Sluice <sluice@mail.example.org>".parse().unwrap()
    }

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
        assert!(plain_body(&n, LINK).contains("cancelled before it finished"));
        let mut n = notification(JobState::Succeeded);
        n.content = None;
        assert!(plain_body(&n, LINK).contains("(the model returned no text)"));
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
        let mut other = n.clone();
        other.request_id = RequestId::new();
        let c = compose(&other, &from(), "http://x").unwrap();
        assert_ne!(
            a.headers().get_raw("Message-ID"),
            c.headers().get_raw("Message-ID")
        );
    }

    #[test]
    fn long_results_are_cut_with_a_pointer_to_the_link() {
        let mut n = notification(JobState::Succeeded);
        n.content = Some("é".repeat(MAX_CONTENT_CHARS + 10));
        let plain = plain_body(&n, LINK);
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
    fn html_escaping_covers_the_five_specials() {
        assert_eq!(
            escape_html("<a href=\"x\">&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(escape_html("plain ü"), "plain ü");
    }
}
