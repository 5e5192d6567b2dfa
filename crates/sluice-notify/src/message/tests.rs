//! Unit tests of the completion emails: both parts of job and batch emails, escaping, cut-off
//! results, stable Message-IDs and clear errors for bad recipients, read as a mail client would.

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
/// 2025-01-09T03:04:05Z, a week after the test job was submitted.
const EXPIRES: i64 = 1_736_391_845;

fn signer() -> &'static LinkSigner {
    static SIGNER: std::sync::OnceLock<LinkSigner> = std::sync::OnceLock::new();
    SIGNER.get_or_init(|| LinkSigner::new("a test secret of at least 32 bytes").unwrap())
}

fn links(base_url: &str) -> Links<'_> {
    Links {
        base_url,
        signer: signer(),
        expires_at: EXPIRES,
    }
}

/// The test job's signed result page under [`BASE`].
fn page() -> String {
    signer().url(
        BASE,
        "0190b5e4-7d2a-7cc0-8000-000000000001".parse().unwrap(),
        EXPIRES,
    )
}

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
    let message = compose(&n, &from(), &links("https://sluice.example.org/")).unwrap();
    let (plain, html, parsed) = parts(&message);
    assert!(plain.contains(LINK), "{plain}");
    assert!(
        html.contains(&format!("<a href=\"{LINK}\">{LINK}</a>")),
        "{html}"
    );
    // The result page, which a browser opens without a key, and until when it does.
    let page = page();
    assert!(page.starts_with(&format!(
        "{BASE}/r/0190b5e4-7d2a-7cc0-8000-000000000001?exp={EXPIRES}&sig="
    )));
    assert!(
        plain.contains(&format!(
            "(no key needed; the link works until 2025-01-09T03:04:05Z):\n{page}\n"
        )),
        "{plain}"
    );
    assert!(
        html.contains(&format!(
            "<a href=\"{}\">See the result</a>",
            escape_html(&page)
        )),
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
        let message = compose(&n, &from(), &links("https://sluice.example.org")).unwrap();
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
        assert!(
            plain.contains(&page()),
            "a failure links to its page too: {plain}"
        );
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
    assert!(plain_body(&n, &links(BASE)).contains("cancelled before it finished"));
    let n = with_job(notification(JobState::Succeeded), |content, _| {
        *content = None
    });
    assert!(plain_body(&n, &links(BASE)).contains("(the model returned no text)"));
}

#[test]
fn the_message_id_is_stable_per_job() {
    let n = notification(JobState::Succeeded);
    let a = compose(&n, &from(), &links("http://x")).unwrap();
    let b = compose(&n, &from(), &links("http://x")).unwrap();
    assert_eq!(
        a.headers().get_raw("Message-ID"),
        b.headers().get_raw("Message-ID")
    );
    let other = with_job(n.clone(), |_, id| *id = RequestId::new());
    let c = compose(&other, &from(), &links("http://x")).unwrap();
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
    let plain = plain_body(&n, &links(BASE));
    assert!(plain.contains("[truncated after 100000 characters"));
    assert_eq!(plain.matches('é').count(), MAX_CONTENT_CHARS);
}

#[test]
fn a_bad_recipient_is_a_clear_error() {
    let mut n = notification(JobState::Succeeded);
    n.email = "not an address".into();
    let err = compose(&n, &from(), &links("http://x")).unwrap_err();
    assert!(matches!(err, ComposeError::BadRecipient { .. }));
    assert!(err.to_string().contains("not an address"));
}

#[test]
fn a_batch_email_tells_how_it_ended_and_where_its_output_is() {
    let n = batch(BatchStatus::Completed);
    let message = compose(&n, &from(), &links("https://sluice.example.org/")).unwrap();
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
    assert!(
        plain_body(&batch(BatchStatus::Expired), &links(BASE)).contains("completion window passed")
    );
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
    let plain = plain_body(&n, &links(BASE));
    assert!(plain.contains("- line 1: not <JSON>"), "{plain}");
    assert!(plain.contains("- line 10: not <JSON>"));
    assert!(!plain.contains("line 11:"));
    assert!(plain.contains("... and 2 more"));
    assert!(plain.contains("No output file was written."));
    let html = html_body(&n, &links(BASE));
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
