//! The mailer against a real PostgreSQL and a real SMTP server (aiosmtpd, `scripts/smtp_sink.py`,
//! started per test on a free port): one email per finished job, retries, crashes, give-ups.
#![allow(clippy::unwrap_used)]

use sluice_core::{JobRequest, Lane, Message, Principal, RequestId, Tier};
use sluice_notify::testing::{free_port, Maildir, Sink};
use sluice_notify::{Mailer, MailerConfig, TlsMode};
use sluice_store::{
    BatchLine, BatchStatus, Failure, FinishedFile, Ingested, NewBatch, NewFile, NewJob,
    NotificationState, NotificationSubject, Store,
};
use sluice_testkit::ScratchDb;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A migrated store in a scratch PostgreSQL schema. Fields drop in order: the store first,
/// then the scratch database, which drops the schema even if the test panicked.
struct TestDb {
    store: Store,
    _scratch: ScratchDb,
}

impl TestDb {
    async fn new(label: &str) -> TestDb {
        let scratch = ScratchDb::postgres(label);
        TestDb {
            store: scratch.store().await,
            _scratch: scratch,
        }
    }

    /// Close the store, then drop the schema.
    async fn drop(self) {
        self.store.close().await;
    }
}

const LEASE: Duration = Duration::from_secs(30);
const BASE_URL: &str = "http://sluice.test:8080";

/// A scratch database and an SMTP sink already listening: the sink's mail directory and port.
async fn db_and_sink() -> (TestDb, Maildir, u16, Sink) {
    let db = TestDb::new("notify_test").await;
    let dir = Maildir::new();
    let port = free_port();
    let sink = Sink::start(port, &dir).await;
    (db, dir, port, sink)
}

/// How the test job ends.
enum End {
    Succeeded(&'static str),
    Dead(&'static str),
}

/// A free-tier job of tenant acme whose completion email goes to `email`.
fn free_job(email: Option<&str>, text: &str) -> NewJob {
    let principal = Principal {
        tenant: "acme".into(),
        user: "u1".into(),
        tier: Tier::Free,
        email: email.map(str::to_owned),
        reuse_samples: false,
    };
    let request = JobRequest::new("small", vec![Message::user(text)]);
    NewJob {
        notify_email: email.map(str::to_owned),
        ..NewJob::new(principal, Lane::Batch, request)
    }
}

/// Store a job for `email` and run it to its end with the store's own lifecycle calls, whose
/// finishing statement queues its notification.
async fn finished_job(store: &Store, email: Option<&str>, end: End) -> RequestId {
    let job = free_job(email, "hello");
    let message = match store.insert_job(&job).await.unwrap() {
        Ingested::Created(m) => m,
        other => panic!("expected a new job, got {other:?}"),
    };
    let claim = store.claim(&message.job, LEASE).await.unwrap().unwrap();
    match end {
        End::Succeeded(text) => {
            let result = serde_json::json!({
                "content": text,
                "usage": {"prompt_tokens": 3, "completion_tokens": 5},
                "model": "small-v1",
                "finish_reason": "stop",
            });
            assert!(store
                .complete(job.id, claim.attempt, &result, "e1")
                .await
                .unwrap());
        }
        End::Dead(error) => {
            let failure = Failure {
                error: error.into(),
                endpoint: Some("e1".into()),
                throttled: false,
                status: Some(400),
            };
            store
                .dead_letter(job.id, claim.attempt, &failure)
                .await
                .unwrap()
                .unwrap();
        }
    }
    let queued = store.notification_for(job.id).await.unwrap();
    assert_eq!(queued.is_some(), email.is_some());
    job.id
}

fn config(port: u16) -> MailerConfig {
    MailerConfig {
        smtp_host: "127.0.0.1".into(),
        smtp_port: Some(port),
        tls: TlsMode::None,
        from: "Sluice <sluice@sluice.test>".into(),
        public_base_url: BASE_URL.into(),
        link_secret: Some("a test secret of at least 32 bytes".into()),
        backoff_base_secs: 0.2,
        poll_interval_secs: 0.05,
        timeout_secs: 5.0,
        ..MailerConfig::default()
    }
}

fn spawn(store: &Store, config: MailerConfig) -> (CancellationToken, JoinHandle<()>) {
    let mailer = Mailer::new(store.clone(), config).unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(mailer.run(shutdown.clone()));
    (shutdown, handle)
}

async fn stop((shutdown, handle): (CancellationToken, JoinHandle<()>)) {
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the mailer stops on shutdown")
        .unwrap();
}

async fn state_of(store: &Store, id: RequestId) -> sluice_store::NotificationRow {
    store.notification_for(id).await.unwrap().unwrap()
}

/// Poll the notification row until `done` holds.
async fn wait_row(
    store: &Store,
    id: RequestId,
    within: Duration,
    done: impl Fn(&sluice_store::NotificationRow) -> bool,
) -> sluice_store::NotificationRow {
    let start = Instant::now();
    loop {
        let row = state_of(store, id).await;
        if done(&row) {
            return row;
        }
        assert!(start.elapsed() < within, "row never got there: {row:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn a_finished_job_gets_exactly_one_email_with_both_parts_and_the_link() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let id = finished_job(
        &db.store,
        Some("ada@example.com"),
        End::Succeeded("The answer is <b>42</b> & that's \"final\"."),
    )
    .await;
    // Queueing the same job again is a no-op: one email per job.
    assert_eq!(db.store.queue_notifications_for(&[id]).await.unwrap(), 0);

    let mailer = spawn(&db.store, config(port));
    let emails = dir.wait_for(1, Duration::from_secs(20)).await;
    stop(mailer).await;

    assert_eq!(emails.len(), 1, "{emails:#?}");
    let email = &emails[0];
    let link = format!("{BASE_URL}/v1/jobs/{id}");
    assert_eq!(email.to, "ada@example.com");
    assert_eq!(email.subject, format!("Your Sluice job {id} succeeded"));
    assert_eq!(email.message_id, format!("<job-{id}@sluice.test>"));
    assert_eq!(email.content_type, "multipart/alternative");
    assert!(email.plain.contains(&link), "{}", email.plain);
    assert!(email
        .plain
        .contains("The answer is <b>42</b> & that's \"final\"."));
    assert!(
        email.html.contains(&format!("href=\"{link}\"")),
        "{}",
        email.html
    );
    assert!(email
        .html
        .contains("The answer is &lt;b&gt;42&lt;/b&gt; &amp; that&#39;s &quot;final&quot;."));

    let row = state_of(&db.store, id).await;
    assert_eq!(row.state, NotificationState::Sent);
    assert_eq!(row.attempts, 1);
    assert!(row.sent_at.is_some() && row.locked_until.is_none());
    assert_eq!(row.email, "ada@example.com");
    db.drop().await;
}

#[tokio::test]
async fn with_the_server_down_the_mailer_backs_off_and_sends_once_it_is_up() {
    let db = TestDb::new("notify_test").await;
    let dir = Maildir::new();
    let port = free_port();
    let id = finished_job(&db.store, Some("bob@example.com"), End::Succeeded("ok")).await;

    let started = Instant::now();
    let mailer = spawn(&db.store, config(port));
    let row = wait_row(&db.store, id, Duration::from_secs(20), |r| r.attempts >= 3).await;
    // Backoff, not a hot loop: the second and third tries waited 0.2 s and 0.4 s at least.
    assert!(started.elapsed() >= Duration::from_millis(600));
    assert_eq!(row.state, NotificationState::Pending);
    let error = row.last_error.unwrap();
    assert!(error.starts_with("SMTP:"), "{error}");
    assert!(row.next_attempt_at > row.created_at);

    let _sink = Sink::start(port, &dir).await;
    let emails = dir.wait_for(1, Duration::from_secs(20)).await;
    stop(mailer).await;
    assert_eq!(emails.len(), 1, "no duplicate: {emails:#?}");
    assert_eq!(emails[0].to, "bob@example.com");
    let row = state_of(&db.store, id).await;
    assert_eq!(row.state, NotificationState::Sent);
    assert!(row.attempts >= 4, "{row:?}");
    db.drop().await;
}

#[tokio::test]
async fn a_mailer_that_died_after_claiming_is_replaced_once_its_lease_passes() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let id = finished_job(
        &db.store,
        Some("cy@example.com"),
        End::Dead("provider said <no> after 5 tries"),
    )
    .await;

    // The first mailer claims the email and dies before sending it.
    let claimed = db
        .store
        .claim_notifications(10, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert!(matches!(
        claimed[0].subject,
        NotificationSubject::Job { request_id, .. } if request_id == id
    ));
    let claimed_at = Instant::now();
    drop(claimed);

    let mailer = spawn(&db.store, config(port));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        dir.messages().is_empty(),
        "nobody sends while the lease holds"
    );
    let emails = dir.wait_for(1, Duration::from_secs(20)).await;
    assert!(claimed_at.elapsed() >= Duration::from_secs(2));
    stop(mailer).await;

    assert_eq!(emails.len(), 1, "{emails:#?}");
    let email = &emails[0];
    assert_eq!(email.subject, format!("Your Sluice job {id} failed"));
    assert!(email.plain.contains("provider said <no> after 5 tries"));
    assert!(email
        .html
        .contains("provider said &lt;no&gt; after 5 tries"));
    assert!(email.plain.contains(&format!("{BASE_URL}/v1/jobs/{id}")));
    let row = state_of(&db.store, id).await;
    assert_eq!((row.state, row.attempts), (NotificationState::Sent, 2));
    db.drop().await;
}

#[tokio::test]
async fn an_email_sent_but_not_recorded_before_a_crash_comes_again_with_the_same_message_id() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let id = finished_job(&db.store, Some("di@example.com"), End::Succeeded("hi")).await;

    // A mailer claims, hands the email to the server, and dies before marking it sent.
    let crashed = Mailer::new(db.store.clone(), config(port)).unwrap();
    let claimed = db
        .store
        .claim_notifications(10, Duration::from_secs(1))
        .await
        .unwrap();
    crashed.deliver(&claimed[0]).await.unwrap();
    drop(crashed);

    let mailer = spawn(&db.store, config(port));
    let emails = dir.wait_for(2, Duration::from_secs(20)).await;
    stop(mailer).await;
    assert_eq!(emails.len(), 2, "at least once: the duplicate is sent once");
    assert_eq!(emails[0].message_id, emails[1].message_id);
    assert_eq!(emails[0].message_id, format!("<job-{id}@sluice.test>"));
    assert_eq!(state_of(&db.store, id).await.state, NotificationState::Sent);
    db.drop().await;
}

#[tokio::test]
async fn jobs_without_an_email_address_or_not_finished_get_none() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let id = finished_job(&db.store, None, End::Succeeded("quiet")).await;
    assert!(db.store.notification_for(id).await.unwrap().is_none());

    // A job still queued is not notified, whatever its address.
    let queued = free_job(Some("eve@example.com"), "later");
    db.store.insert_job(&queued).await.unwrap();
    assert_eq!(
        db.store
            .queue_notifications_for(&[queued.id])
            .await
            .unwrap(),
        0
    );

    let mailer = Mailer::new(db.store.clone(), config(port)).unwrap();
    let pass = mailer.run_once(&CancellationToken::new()).await.unwrap();
    assert_eq!(pass.claimed, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(dir.messages().is_empty());
    assert!(db.store.notification_counts().await.unwrap().is_empty());
    db.drop().await;
}

#[tokio::test]
async fn an_email_is_given_up_after_max_attempts_with_the_error() {
    let db = TestDb::new("notify_test").await;
    // Nothing listens on this port: every try fails.
    let port = free_port();
    let id = finished_job(&db.store, Some("fay@example.com"), End::Succeeded("x")).await;
    // A recipient no server will take fails at once, without retries.
    let bad = finished_job(&db.store, Some("not an address"), End::Succeeded("x")).await;

    let mailer = spawn(
        &db.store,
        MailerConfig {
            max_attempts: 3,
            backoff_base_secs: 0.05,
            ..config(port)
        },
    );
    let row = wait_row(&db.store, id, Duration::from_secs(20), |r| {
        r.state != NotificationState::Pending
    })
    .await;
    let bad_row = wait_row(&db.store, bad, Duration::from_secs(20), |r| {
        r.state != NotificationState::Pending
    })
    .await;
    // Nothing more happens to a row given up on.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop(mailer).await;

    assert_eq!(row.state, NotificationState::Failed);
    assert_eq!(row.attempts, 3);
    assert!(row.sent_at.is_none() && row.locked_until.is_none());
    let error = row.last_error.unwrap();
    assert!(error.starts_with("SMTP:"), "{error}");
    assert_eq!(state_of(&db.store, id).await.attempts, 3);

    assert_eq!(bad_row.state, NotificationState::Failed);
    assert_eq!(bad_row.attempts, 1);
    assert!(
        bad_row
            .last_error
            .unwrap()
            .contains("invalid recipient address"),
        "a bad address is not retried"
    );
    let counts = db.store.notification_counts().await.unwrap();
    assert_eq!(counts, vec![(NotificationState::Failed, 2)]);
    db.drop().await;
}

#[tokio::test]
async fn two_mailers_send_each_email_once() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let mut ids = Vec::new();
    for n in 0..20 {
        let email = format!("user{n}@example.com");
        ids.push(finished_job(&db.store, Some(&email), End::Succeeded("done")).await);
    }
    let small = MailerConfig {
        batch_size: 3,
        ..config(port)
    };
    let a = spawn(&db.store, small.clone());
    let b = spawn(&db.store, small);
    let emails = dir.wait_for(20, Duration::from_secs(30)).await;
    stop(a).await;
    stop(b).await;
    assert_eq!(emails.len(), 20);
    let mut to: Vec<&str> = emails.iter().map(|e| e.to.as_str()).collect();
    to.sort();
    to.dedup();
    assert_eq!(to.len(), 20, "every address got exactly one email");
    for id in ids {
        let row = state_of(&db.store, id).await;
        assert_eq!((row.state, row.attempts), (NotificationState::Sent, 1));
    }
    db.drop().await;
}

#[tokio::test]
async fn a_replayed_dead_job_is_told_its_final_outcome() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let id = finished_job(&db.store, Some("gus@example.com"), End::Dead("boom")).await;
    // An operator replays it before the mailer got to its email.
    let replayed = db.store.replay(id).await.unwrap().unwrap();
    let mailer = Mailer::new(db.store.clone(), config(port)).unwrap();
    let pass = mailer.run_once(&CancellationToken::new()).await.unwrap();
    assert_eq!(
        pass.claimed, 0,
        "the job is running again: nothing to tell yet"
    );

    let claim = db.store.claim(&replayed.job, LEASE).await.unwrap().unwrap();
    let result = serde_json::json!({"content": "second time lucky"});
    assert!(db
        .store
        .complete(id, claim.attempt, &result, "e1")
        .await
        .unwrap());
    let pass = mailer.run_once(&CancellationToken::new()).await.unwrap();
    assert_eq!((pass.claimed, pass.sent), (1, 1));
    let emails = dir.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(emails.len(), 1);
    assert_eq!(emails[0].subject, format!("Your Sluice job {id} succeeded"));
    assert!(emails[0].plain.contains("second time lucky"));
    db.drop().await;
}

#[tokio::test]
async fn an_ended_batch_gets_one_email_with_its_counts_and_where_its_output_is() {
    let (db, dir, port, _sink) = db_and_sink().await;
    let store = &db.store;
    let batch = NewBatch {
        id: sluice_store::new_batch_id(),
        tenant: "acme".into(),
        user: "u1".into(),
        tier: Tier::Free,
        input_file_id: "file-input".into(),
        endpoint: "/v1/chat/completions".into(),
        completion_window: "24h".into(),
        metadata: None,
        expires_in: std::time::Duration::from_secs(24 * 3600),
        notify_email: Some("hal@example.com".into()),
    };
    // The lines ask for no email of their own: one email tells about the whole batch.
    let lines: Vec<BatchLine> = (1..=3)
        .map(|line| BatchLine {
            line,
            custom_id: format!("req-{line}"),
            job: free_job(None, &format!("line {line}")),
        })
        .collect();
    let messages = store.create_batch(&batch, &lines).await.unwrap();
    for (n, message) in messages.iter().enumerate() {
        let claim = store.claim(&message.job, LEASE).await.unwrap().unwrap();
        if n < 2 {
            let result = serde_json::json!({ "content": "ok" });
            assert!(store
                .complete(claim.id, claim.attempt, &result, "e1")
                .await
                .unwrap());
        } else {
            let failure = Failure {
                error: "provider said 400".into(),
                endpoint: Some("e1".into()),
                throttled: false,
                status: Some(400),
            };
            store
                .dead_letter(claim.id, claim.attempt, &failure)
                .await
                .unwrap()
                .unwrap();
        }
    }
    let output = NewFile {
        id: sluice_store::new_file_id(),
        tenant: "acme".into(),
        purpose: "batch_output".into(),
        filename: "batch_output.jsonl".into(),
    };
    store.begin_file(&output).await.unwrap();
    store
        .append_file_chunk(&output.id, 0, b"{}\n{}\n")
        .await
        .unwrap();
    let mailer = Mailer::new(store.clone(), config(port)).unwrap();
    assert_eq!(
        mailer
            .run_once(&CancellationToken::new())
            .await
            .unwrap()
            .claimed,
        0,
        "an open batch has nothing to tell"
    );
    let file = FinishedFile {
        id: output.id.clone(),
        bytes: 6,
        lines: 2,
    };
    assert!(store
        .finish_batch(&batch.id, BatchStatus::Completed, (2, 1), Some(&file), None)
        .await
        .unwrap());

    let running = spawn(store, config(port));
    let emails = dir.wait_for(1, Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(running).await;
    let emails_now = dir.messages();
    assert_eq!(
        emails_now.len(),
        1,
        "one email for the batch: {emails_now:#?}"
    );
    let email = &emails[0];
    assert_eq!(email.to, "hal@example.com");
    assert_eq!(
        email.subject,
        format!("Your Sluice batch {} completed", batch.id)
    );
    assert_eq!(email.message_id, format!("<{}@sluice.test>", batch.id));
    assert!(
        email
            .plain
            .contains("Requests:  3 in total, 2 completed, 1 failed"),
        "{}",
        email.plain
    );
    let content = format!("{BASE_URL}/v1/files/{}/content", output.id);
    assert!(email.plain.contains(&format!("Output file: {}", output.id)));
    assert!(email.plain.contains(&content));
    assert!(email
        .plain
        .contains(&format!("GET {BASE_URL}/v1/batches/{}", batch.id)));
    assert!(email.html.contains(&format!("href=\"{content}\"")));

    let row = store.batch_notification(&batch.id).await.unwrap().unwrap();
    assert_eq!((row.state, row.attempts), (NotificationState::Sent, 1));
    assert_eq!(
        store.notification_counts().await.unwrap(),
        vec![(NotificationState::Sent, 1)]
    );
    db.drop().await;
}
