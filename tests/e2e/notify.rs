//! Completion emails end to end: real `sluice` processes whose workers' mailers send to a real
//! SMTP server (aiosmtpd), including with the server down and a worker killed mid-send.

use crate::helpers::{spawn_app, AppOptions, TestApp};
use reqwest::StatusCode;
use serde_json::json;
use sluice_core::{JobState, RequestId, Tier};
use sluice_notify::testing::{free_port, Email, Maildir, Sink};
use sluice_store::NotificationState;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// `public_base_url` of the harness's `[mail]` section.
const BASE_URL: &str = "http://sluice.test:8080";

async fn mail_app(port: u16) -> TestApp {
    spawn_app(AppOptions {
        smtp_port: Some(port),
        ..AppOptions::default()
    })
    .await
}

/// Check that `email` is the completion email of job `id`, which succeeded, sent to `to`.
fn assert_completion_email(email: &Email, id: RequestId, to: &str) {
    assert_eq!(email.to, to);
    assert_eq!(email.subject, format!("Your Sluice job {id} succeeded"));
    assert_eq!(email.message_id, format!("<job-{id}@sluice.test>"));
    let link = format!("{BASE_URL}/v1/jobs/{id}");
    assert!(email.plain.contains(&link), "{}", email.plain);
    assert!(email.html.contains(&link), "{}", email.html);
}

/// Wait until the job's notification is marked sent (the mailer marks it after the server
/// took the email) and return its row.
async fn wait_sent(app: &TestApp, id: RequestId) -> sluice_store::NotificationRow {
    app.wait_for(
        "the notification to be marked sent",
        Duration::from_secs(30),
        || async {
            app.store
                .notification_for(id)
                .await
                .unwrap()
                .is_some_and(|n| n.state == NotificationState::Sent)
        },
    )
    .await;
    app.store.notification_for(id).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_free_tier_job_gets_exactly_one_email_with_its_link_and_a_pro_job_none() {
    let dir = Maildir::new();
    let port = free_port();
    let _sink = Sink::start(port, &dir).await;
    let app = mail_app(port).await;
    let free = app
        .key_with_email("acme", Tier::Free, "ada@example.com")
        .await;
    let pro = app
        .key_with_email("acme", Tier::Pro, "bo@example.com")
        .await;

    let pro_id = app.submit(&pro, "a pro job").await;
    let free_id = app.submit(&free, "a free job").await;
    app.wait_terminal(&[pro_id, free_id], Duration::from_secs(30))
        .await;
    assert_eq!(app.state(free_id).await, JobState::Succeeded);
    assert_eq!(app.state(pro_id).await, JobState::Succeeded);

    let emails = dir.wait_for(1, Duration::from_secs(30)).await;
    let row = wait_sent(&app, free_id).await;
    // Both jobs ended before the wait; a pro email would have come with the free one.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let emails_now = dir.messages();
    assert_eq!(emails_now.len(), 1, "exactly one email: {emails:#?}");
    assert_completion_email(&emails_now[0], free_id, "ada@example.com");
    assert_eq!((row.attempts, row.email.as_str()), (1, "ada@example.com"));
    assert!(
        app.store.notification_for(pro_id).await.unwrap().is_none(),
        "a pro job without notify in its request gets no email"
    );
    app.cleanup().await;
}

#[tokio::test]
async fn the_request_turns_email_on_or_off_and_asking_without_an_address_is_refused() {
    let dir = Maildir::new();
    let port = free_port();
    let _sink = Sink::start(port, &dir).await;
    let app = mail_app(port).await;
    let pro = app
        .key_with_email("acme", Tier::Pro, "cy@example.com")
        .await;
    let free = app
        .key_with_email("acme", Tier::Free, "di@example.com")
        .await;
    let free_without_address = app.key("acme", Tier::Free).await;
    let body = |text: &str, email: bool| {
        json!({
            "model": "default",
            "messages": [{"role": "user", "content": text}],
            "notify": {"email": email},
        })
    };

    let (status, error) = app
        .post_job(&free_without_address, &body("tell me", true))
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{error}");
    assert_eq!(error["error"]["code"], "no_email");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no email address"),
        "{error}"
    );
    assert_eq!(
        app.total_jobs().await,
        0,
        "a refused request stores nothing"
    );

    let mut ids = Vec::new();
    for (key, body) in [
        (&pro, body("pro asks", true)),
        (&free, body("free declines", false)),
    ] {
        let (status, accepted) = app.post_job(key, &body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        ids.push(
            accepted["request_id"]
                .as_str()
                .unwrap()
                .parse::<RequestId>()
                .unwrap(),
        );
    }
    // A free key without an address just polls: no email, no error.
    ids.push(app.submit(&free_without_address, "free, no address").await);
    app.wait_terminal(&ids, Duration::from_secs(30)).await;

    dir.wait_for(1, Duration::from_secs(30)).await;
    wait_sent(&app, ids[0]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let emails = dir.messages();
    assert_eq!(emails.len(), 1, "{emails:#?}");
    assert_completion_email(&emails[0], ids[0], "cy@example.com");
    for id in &ids[1..] {
        assert!(app.store.notification_for(*id).await.unwrap().is_none());
    }
    app.cleanup().await;
}

#[tokio::test]
async fn with_the_smtp_server_down_the_email_waits_and_arrives_once_it_is_up() {
    let dir = Maildir::new();
    // Nothing listens here until the sink starts below.
    let port = free_port();
    let app = mail_app(port).await;
    let free = app
        .key_with_email("acme", Tier::Free, "ed@example.com")
        .await;
    let id = app.submit(&free, "while the mail server is down").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    assert_eq!(app.state(id).await, JobState::Succeeded);

    // The mailer tries, fails and backs off; the email stays pending.
    app.wait_for("two failed sends", Duration::from_secs(30), || async {
        app.store
            .notification_for(id)
            .await
            .unwrap()
            .is_some_and(|n| n.attempts >= 2 && n.last_error.is_some())
    })
    .await;
    let row = app.store.notification_for(id).await.unwrap().unwrap();
    assert_eq!(row.state, NotificationState::Pending);
    let error = row.last_error.unwrap_or_default();
    assert!(error.starts_with("SMTP:"), "{error}");
    assert!(dir.messages().is_empty());

    let _sink = Sink::start(port, &dir).await;
    dir.wait_for(1, Duration::from_secs(30)).await;
    let row = wait_sent(&app, id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let emails = dir.messages();
    assert_eq!(emails.len(), 1, "no duplicate: {emails:#?}");
    assert_completion_email(&emails[0], id, "ed@example.com");
    assert!(row.attempts >= 3, "{row:?}");
    app.cleanup().await;
}

/// An SMTP server that accepts connections and never says a word, so a send to it hangs
/// until the mailer's timeout: a send in flight that a test can interrupt.
struct Stall {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Stall {
    async fn start() -> Stall {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            // Held open, unanswered, until the task is aborted.
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        Stall {
            port,
            accepted,
            task,
        }
    }

    /// Close the listener and every connection, freeing the port.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

#[tokio::test]
async fn a_worker_killed_mid_send_does_not_lose_the_email() {
    let dir = Maildir::new();
    let stall = Stall::start().await;
    let port = stall.port;
    let mut app = spawn_app(AppOptions {
        smtp_port: Some(port),
        processes: true,
        ..AppOptions::default()
    })
    .await;
    let free = app
        .key_with_email("acme", Tier::Free, "fi@example.com")
        .await;
    let id = app.submit(&free, "the mailer dies mid-send").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    assert_eq!(app.state(id).await, JobState::Succeeded);

    // The worker's mailer claimed the email and is talking to the server: kill it now.
    app.wait_for(
        "the mailer to connect to the SMTP server",
        Duration::from_secs(30),
        || async { stall.accepted.load(Ordering::SeqCst) > 0 },
    )
    .await;
    let claimed = app.store.notification_for(id).await.unwrap().unwrap();
    assert_eq!(claimed.state, NotificationState::Pending);
    assert!(claimed.locked_until.is_some(), "claimed: {claimed:?}");
    assert_eq!(claimed.attempts, 1);
    app.kill_worker(0).await;
    let orphaned = app.store.notification_for(id).await.unwrap().unwrap();
    assert_eq!(orphaned.state, NotificationState::Pending);
    assert!(orphaned.locked_until.is_some() && orphaned.sent_at.is_none());

    // A working server on the same port, and a new worker: once the dead mailer's lease
    // passes, the new one sends the email.
    stall.stop().await;
    let _sink = Sink::start(port, &dir).await;
    app.start_worker().await;
    let emails = dir.wait_for(1, Duration::from_secs(40)).await;
    let row = wait_sent(&app, id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let emails_now = dir.messages();
    assert!(emails_now.len() >= emails.len() && !emails_now.is_empty());
    // At least once: a copy the dead mailer handed over before dying would carry the same id.
    for email in &emails_now {
        assert_completion_email(email, id, "fi@example.com");
    }
    assert_eq!(row.state, NotificationState::Sent);
    assert!(row.attempts >= 2, "{row:?}");
    app.cleanup().await;
}

/// The result-page link in a completion email, moved from the harness's `public_base_url`
/// to where the test's API listens.
fn page_link(email: &Email, api: &str) -> String {
    let line = email
        .plain
        .lines()
        .find(|l| l.starts_with(&format!("{BASE_URL}/r/")))
        .unwrap_or_else(|| panic!("no result-page link in {}", email.plain));
    let escaped = line.replace('&', "&amp;");
    assert!(
        email.html.contains(&format!("href=\"{escaped}\"")),
        "the HTML part links to the same page: {}",
        email.html
    );
    format!("{api}{}", &line[BASE_URL.len()..])
}

/// What a browser without a key gets for `url`: status, the headers checked, and the page.
async fn open_page(url: &str) -> (StatusCode, reqwest::header::HeaderMap, String) {
    // A fresh client: no key, no cookie, nothing the app's own client carries.
    let response = reqwest::Client::new().get(url).send().await.unwrap();
    let (status, headers) = (response.status(), response.headers().clone());
    (status, headers, response.text().await.unwrap())
}

#[tokio::test]
async fn the_emailed_link_opens_the_result_without_a_key_and_a_changed_link_does_not() {
    let dir = Maildir::new();
    let port = free_port();
    let _sink = Sink::start(port, &dir).await;
    let app = mail_app(port).await;
    let free = app
        .key_with_email("acme", Tier::Free, "ada@example.com")
        .await;
    let id = app.submit(&free, "what does a sluice gate do?").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let emails = dir.wait_for(1, Duration::from_secs(30)).await;
    let url = page_link(&emails[0], &app.api);
    let job = app.store.job(id).await.unwrap().unwrap();
    let answer = job.result.as_ref().unwrap()["content"].as_str().unwrap();
    assert!(!answer.is_empty());

    let (status, headers, page) = open_page(&url).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(
        page.contains(&sluice_notify::message::escape_html(answer)),
        "{page}"
    );
    assert!(
        page.contains(&id.to_string()) && page.contains("succeeded"),
        "{page}"
    );
    assert!(
        !page.contains("acme") && !page.contains("ada@example.com"),
        "{page}"
    );
    assert!(!page.contains("<script"), "the page runs nothing: {page}");
    let header = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        header("content-type").as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert_eq!(header("cache-control").as_deref(), Some("no-store"));
    assert_eq!(header("referrer-policy").as_deref(), Some("no-referrer"));
    assert_eq!(header("x-robots-tag").as_deref(), Some("noindex, nofollow"));
    let csp = header("content-security-policy").unwrap();
    assert!(
        csp.starts_with("default-src 'none';") && !csp.contains("unsafe"),
        "{csp}"
    );

    // One byte changed anywhere that matters (the id, the expiry, the signature) is refused,
    // and the refusal says nothing of the job.
    let at_id = url.find("/r/").unwrap() + 3;
    let at_exp = url.find("exp=").unwrap() + 4;
    let at_sig = url.len() - 5;
    for at in [at_id, at_exp, at_sig] {
        let mut bytes = url.clone().into_bytes();
        bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
        let changed = String::from_utf8(bytes).unwrap();
        let (status, headers, page) = open_page(&changed).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{changed}: {page}");
        assert!(page.contains("This link is not valid"), "{page}");
        assert!(
            !page.contains(answer) && !page.contains("succeeded"),
            "{page}"
        );
        assert_eq!(headers["cache-control"], "no-store");
    }
    let (status, _, _) = open_page(&url.replace("&sig=", "&nosig=")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    // A genuine link past its expiry is told apart from a forged one, and shows nothing.
    let signer = sluice_notify::LinkSigner::new(crate::helpers::LINK_SECRET).unwrap();
    let past = chrono::Utc::now().timestamp() - 1;
    let expired = format!("{}{}", app.api, signer.path(id, past));
    let (status, _, page) = open_page(&expired).await;
    assert_eq!(status, StatusCode::GONE, "{page}");
    assert!(page.contains("expired") && !page.contains(answer), "{page}");
    // The same link signed with another secret is a forgery.
    let other = sluice_notify::LinkSigner::new("not the server's secret, but 32+ bytes").unwrap();
    let future = chrono::Utc::now().timestamp() + 3600;
    let (status, _, _) = open_page(&format!("{}{}", app.api, other.path(id, future))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    app.cleanup().await;
}

#[tokio::test]
async fn with_no_link_secret_configured_mailers_and_api_nodes_share_the_databases() {
    // No SMTP server is needed: the link is checked, not sent.
    let app = mail_app(free_port()).await;
    let text = std::fs::read_to_string(&app.config_path).unwrap();
    let without: String = text
        .lines()
        .filter(|line| !line.starts_with("link_secret"))
        .map(|line| format!("{line}\n"))
        .collect();
    assert_ne!(
        without, text,
        "the harness's config has a link secret to take out"
    );
    let path = app.config_path.with_extension("no-link-secret.toml");
    std::fs::write(&path, without).unwrap();
    let config = sluice::Config::load(Some(&path)).unwrap();
    let _ = std::fs::remove_file(&path);
    let shutdown = tokio_util::sync::CancellationToken::new();

    // A worker (its mailer) and an API node with no [mail] at all both start.
    let worker = sluice::WorkerNode::start(&config, false, &shutdown)
        .await
        .expect("a worker with [mail] but no secret starts");
    let mut bare = config.clone();
    bare.mail = None;
    let api = sluice::ApiNode::start(&bare, false, &shutdown)
        .await
        .expect("an API node starts");
    // The first of them made the deployment's secret; it is kept, not made again.
    let secret = app
        .store
        .shared_value("mail.link_secret", "not the one")
        .await
        .unwrap();
    assert_ne!(secret, "not the one");
    assert!(secret.len() >= sluice_notify::link::MIN_SECRET_BYTES);

    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "what does a sluice gate do?").await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let signer = sluice_notify::LinkSigner::new(&secret).unwrap();
    let future = chrono::Utc::now().timestamp() + 3600;
    let (status, _, page) = open_page(&format!("{}{}", api.url(), signer.path(id, future))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains(&id.to_string()), "{page}");
    // The configured secret is another deployment's as far as these nodes know.
    let configured = sluice_notify::LinkSigner::new(crate::helpers::LINK_SECRET).unwrap();
    let (status, _, _) = open_page(&format!("{}{}", api.url(), configured.path(id, future))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), api.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), worker.wait()).await;
    app.cleanup().await;
}
