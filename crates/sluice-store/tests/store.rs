//! The store against a real PostgreSQL: ingest, fencing, retries, reaping, replay and the outbox.
#![allow(clippy::unwrap_used)]

use sluice_core::{JobRef, JobRequest, JobState, Lane, Message, Principal, RequestId, Tier};
use sluice_store::testing::TestDb;
use sluice_store::{CancelOutcome, Failure, Ingested, JobWriter, NewJob};
use std::time::Duration;

fn principal(tenant: &str) -> Principal {
    Principal {
        tenant: tenant.into(),
        user: "u1".into(),
        tier: Tier::Pro,
        email: None,
    }
}

fn new_job(tenant: &str, text: &str) -> NewJob {
    NewJob::new(
        principal(tenant),
        Lane::Priority,
        JobRequest::new("default", vec![Message::user(text)]),
    )
}

fn created(i: Ingested) -> sluice_store::OutboxMessage {
    match i {
        Ingested::Created(m) => m,
        other => panic!("expected a new job, got {other:?}"),
    }
}

const LEASE: Duration = Duration::from_secs(30);

#[tokio::test]
async fn api_keys_resolve_to_their_principal_and_are_stored_hashed() {
    let db = TestDb::new("store_test").await;
    let p = principal("acme");
    let key = db.store.create_api_key(&p).await.unwrap();
    assert!(key.starts_with("sk_sluice_"));
    assert_eq!(db.store.principal_for_key(&key).await.unwrap(), Some(p));
    assert_eq!(
        db.store.principal_for_key("sk_sluice_nope").await.unwrap(),
        None
    );
    let (hashed, prefix): (bool, String) = sqlx::query_as(
        "SELECT key_hash = sha256(convert_to($1, 'UTF8')), key_prefix FROM api_keys",
    )
    .bind(&key)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert!(hashed, "the key is stored as its SHA-256");
    assert!(key.starts_with(&prefix) && prefix.len() < 16);
    db.drop().await;
}

#[tokio::test]
async fn ingest_writes_job_event_and_outbox_together() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    assert_eq!(msg.job.request_id, job.id);
    assert_eq!(msg.job.attempt, 0);
    assert_eq!(msg.lane, Lane::Priority);
    assert_eq!(db.store.outbox_len().await.unwrap(), 1);
    let stored = db.store.get_job("acme", job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Queued);
    assert_eq!(stored.request, job.request);
    assert_eq!(db.store.events(job.id).await.unwrap().len(), 1);
    db.store.mark_published(&[msg.outbox_id]).await.unwrap();
    assert_eq!(db.store.outbox_len().await.unwrap(), 0);
    // Tenant walls: another tenant sees nothing.
    assert!(db.store.get_job("other", job.id).await.unwrap().is_none());
    db.drop().await;
}

#[tokio::test]
async fn idempotency_key_returns_the_same_job_or_a_conflict() {
    let db = TestDb::new("store_test").await;
    let mut first = new_job("acme", "hi");
    first.idempotency = Some(("k1".into(), vec![1, 2, 3]));
    created(db.store.insert_job(&first).await.unwrap());

    let mut again = new_job("acme", "hi");
    again.idempotency = Some(("k1".into(), vec![1, 2, 3]));
    match db.store.insert_job(&again).await.unwrap() {
        Ingested::Existing(job) => assert_eq!(job.id, first.id),
        other => panic!("expected the existing job, got {other:?}"),
    }
    let mut different = new_job("acme", "other body");
    different.idempotency = Some(("k1".into(), vec![9]));
    assert!(matches!(
        db.store.insert_job(&different).await.unwrap(),
        Ingested::Conflict
    ));
    // The same key in another tenant is another job.
    let mut elsewhere = new_job("beta", "hi");
    elsewhere.idempotency = Some(("k1".into(), vec![1, 2, 3]));
    created(db.store.insert_job(&elsewhere).await.unwrap());
    let counts = db.store.count_by_state().await.unwrap();
    assert_eq!(counts, vec![(JobState::Queued, 2)]);
    db.drop().await;
}

#[tokio::test]
async fn batched_writer_stores_every_job() {
    let db = TestDb::new("store_test").await;
    let writer = JobWriter::spawn(db.store.clone(), 2, 64);
    let mut tasks = Vec::new();
    for n in 0..300 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let job = new_job("acme", &format!("job {n}"));
            let id = job.id;
            let msg = writer.insert(job).await.unwrap();
            assert_eq!(msg.job.request_id, id);
            id
        }));
    }
    for t in tasks {
        let id = t.await.unwrap();
        assert!(db.store.get_job("acme", id).await.unwrap().is_some());
    }
    assert_eq!(db.store.outbox_len().await.unwrap(), 300);
    db.drop().await;
}

#[tokio::test]
async fn claim_and_completion_are_fenced_by_attempt() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    assert_eq!((claim.attempt, claim.tries), (1, 1));
    // The same message delivered twice cannot claim twice.
    assert!(db.store.claim(&msg.job, LEASE).await.unwrap().is_none());
    // A stale attempt cannot complete.
    let result = serde_json::json!({"content": "x"});
    assert!(!db.store.complete(job.id, 0, &result, "e1").await.unwrap());
    assert!(db.store.complete(job.id, 1, &result, "e1").await.unwrap());
    // Completion happens once.
    assert!(!db.store.complete(job.id, 1, &result, "e1").await.unwrap());
    let stored = db.store.job(job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.result, Some(result));
    assert_eq!(stored.endpoint.as_deref(), Some("e1"));
    let states: Vec<JobState> = db
        .store
        .events(job.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(
        states,
        vec![JobState::Queued, JobState::Running, JobState::Succeeded]
    );
    db.drop().await;
}

#[tokio::test]
async fn retry_then_dead_then_replay() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    let failure = Failure {
        error: "provider returned 500".into(),
        endpoint: Some("e1".into()),
        throttled: false,
    };
    let retry = db
        .store
        .retry_later(job.id, claim.attempt, &failure, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(retry.lane, Lane::Retry);
    assert_eq!(retry.job.attempt, 1);
    assert!(retry.delay() > Duration::from_secs(3));
    // The original message is stale now.
    assert!(db.store.claim(&msg.job, LEASE).await.unwrap().is_none());
    let claim2 = db.store.claim(&retry.job, LEASE).await.unwrap().unwrap();
    assert_eq!((claim2.attempt, claim2.tries), (2, 2));
    let dead = db
        .store
        .dead_letter(job.id, 2, &failure)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(dead.lane, Lane::Dead);
    assert_eq!(dead.reason.as_deref(), Some("provider returned 500"));
    let stored = db.store.job(job.id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Dead);
    assert_eq!(stored.error.as_deref(), Some("provider returned 500"));
    assert_eq!(db.store.dead_jobs(10).await.unwrap().len(), 1);

    let replayed = db.store.replay(job.id).await.unwrap().unwrap();
    assert_eq!(replayed.lane, Lane::Priority);
    assert!(
        db.store.replay(job.id).await.unwrap().is_none(),
        "only dead jobs replay"
    );
    let claim3 = db.store.claim(&replayed.job, LEASE).await.unwrap().unwrap();
    assert_eq!(
        (claim3.attempt, claim3.tries),
        (3, 1),
        "replay resets the retry budget, not the fence"
    );
    db.drop().await;
}

#[tokio::test]
async fn a_429_is_counted_as_a_throttle_not_a_try_and_keeps_the_token_estimate() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let throttle = Failure {
        error: "rate limited".into(),
        endpoint: Some("e1".into()),
        throttled: true,
    };
    let mut message = msg;
    for n in 1..=3 {
        let claim = db.store.claim(&message.job, LEASE).await.unwrap().unwrap();
        assert_eq!((claim.tries, claim.throttled), (1, n - 1));
        message = db
            .store
            .retry_later(job.id, claim.attempt, &throttle, Duration::ZERO)
            .await
            .unwrap()
            .unwrap();
        assert!(message.job.rate_limited, "the retry goes before fresh work");
        assert_eq!(message.job.tokens, job.request.estimated_tokens());
    }
    let claim = db.store.claim(&message.job, LEASE).await.unwrap().unwrap();
    assert_eq!((claim.attempt, claim.tries, claim.throttled), (4, 1, 3));
    db.drop().await;
}

#[tokio::test]
async fn cancel_respects_tenants_and_terminal_states() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    assert_eq!(
        db.store.cancel("other", job.id).await.unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(
        db.store.cancel("acme", job.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        db.store.cancel("acme", job.id).await.unwrap(),
        CancelOutcome::Terminal(JobState::Cancelled)
    );
    assert!(
        db.store.claim(&msg.job, LEASE).await.unwrap().is_none(),
        "a cancelled job is never claimed"
    );

    // Cancelling a running job discards its result.
    let running = new_job("acme", "two");
    let msg = created(db.store.insert_job(&running).await.unwrap());
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    assert_eq!(
        db.store.cancel("acme", running.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert!(!db
        .store
        .complete(running.id, claim.attempt, &serde_json::json!({}), "e")
        .await
        .unwrap());
    db.drop().await;
}

#[tokio::test]
async fn expired_leases_are_reaped_once_and_heartbeats_keep_them() {
    let db = TestDb::new("store_test").await;
    let kept = new_job("acme", "kept");
    let lost = new_job("acme", "lost");
    let spent = new_job("acme", "spent");
    let mut claims = Vec::new();
    for job in [&kept, &lost, &spent] {
        let msg = created(db.store.insert_job(job).await.unwrap());
        claims.push(
            db.store
                .claim(&msg.job, Duration::from_millis(300))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    db.store
        .heartbeat(&[(kept.id, claims[0].attempt)], LEASE)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // max_tries 1: `spent` has used its budget, `lost` too; use 2 for lost by reaping in two steps.
    let reaped = db.store.reap_expired(5, 100).await.unwrap();
    let ids: Vec<RequestId> = reaped.iter().map(|m| m.job.request_id).collect();
    assert!(ids.contains(&lost.id) && ids.contains(&spent.id) && !ids.contains(&kept.id));
    assert!(reaped
        .iter()
        .all(|m| m.lane == Lane::Retry && m.job.attempt == 1));
    assert!(
        db.store.reap_expired(5, 100).await.unwrap().is_empty(),
        "reaped once"
    );
    assert_eq!(
        db.store.job(lost.id).await.unwrap().unwrap().state,
        JobState::Retrying
    );

    // A job whose budget is spent goes to dead when its lease expires.
    let m = reaped
        .iter()
        .find(|m| m.job.request_id == spent.id)
        .unwrap();
    let again = db
        .store
        .claim(&m.job, Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.tries, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dead = db.store.reap_expired(2, 100).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].lane, Lane::Dead);
    assert!(dead[0].reason.as_deref().unwrap().contains("lease expired"));
    assert_eq!(
        db.store.job(spent.id).await.unwrap().unwrap().state,
        JobState::Dead
    );
    db.drop().await;
}

#[tokio::test]
async fn relay_takes_only_old_unlocked_rows() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    created(db.store.insert_job(&job).await.unwrap());
    let grace = Duration::from_millis(300);
    assert!(
        db.store
            .unpublished(grace, LEASE, 10)
            .await
            .unwrap()
            .is_empty(),
        "fresh rows are left to their writer"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rows = db.store.unpublished(grace, LEASE, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(
        rows[0].job,
        JobRef {
            waiting_since_ms: None,
            tokens: job.request.estimated_tokens(),
            rate_limited: false,
            request_id: job.id,
            tenant: "acme".into(),
            model: "default".into(),
            attempt: 0
        }
    );
    assert!(
        db.store
            .unpublished(grace, LEASE, 10)
            .await
            .unwrap()
            .is_empty(),
        "locked rows are skipped"
    );
    db.store.mark_published(&[rows[0].outbox_id]).await.unwrap();
    assert_eq!(db.store.outbox_len().await.unwrap(), 0);
    db.drop().await;
}

#[tokio::test]
async fn batched_claims_and_completions_answer_each_caller_once() {
    let db = TestDb::new("store_test").await;
    let a = created(db.store.insert_job(&new_job("acme", "a")).await.unwrap());
    let b = created(db.store.insert_job(&new_job("acme", "b")).await.unwrap());
    let cancelled = created(db.store.insert_job(&new_job("acme", "c")).await.unwrap());
    db.store
        .cancel("acme", cancelled.job.request_id)
        .await
        .unwrap();
    // The same message twice in one batch (a redelivered duplicate): one claim only.
    let claims = db
        .store
        .claim_many(
            &[
                a.job.clone(),
                b.job.clone(),
                a.job.clone(),
                cancelled.job.clone(),
            ],
            LEASE,
        )
        .await
        .unwrap();
    assert!(claims[0].is_some() && claims[1].is_some());
    assert!(
        claims[2].is_none(),
        "a duplicate must not get a second claim"
    );
    assert!(claims[3].is_none(), "a cancelled job is not claimed");

    let done = |id: RequestId, attempt: i32| sluice_store::Completion {
        id,
        attempt,
        result: serde_json::json!({"content": id.to_string()}),
        endpoint: "e1".into(),
    };
    let answers = db
        .store
        .complete_many(&[
            done(a.job.request_id, 1),
            done(b.job.request_id, 0),
            done(a.job.request_id, 1),
        ])
        .await
        .unwrap();
    assert_eq!(answers, vec![true, false, false]);
    let a_job = db.store.job(a.job.request_id).await.unwrap().unwrap();
    assert_eq!(a_job.state, JobState::Succeeded);
    assert_eq!(
        a_job.result.unwrap()["content"],
        a.job.request_id.to_string()
    );
    assert_eq!(
        db.store.job(b.job.request_id).await.unwrap().unwrap().state,
        JobState::Running
    );
    db.drop().await;
}

/// A job for `email`, inserted and claimed: ready to be finished one way or another.
async fn claimed_job_for(
    db: &TestDb,
    email: Option<&str>,
    lease: Duration,
) -> (RequestId, sluice_store::Claim) {
    let mut job = new_job("acme", "tell me");
    job.notify_email = email.map(str::to_owned);
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let claim = db.store.claim(&msg.job, lease).await.unwrap().unwrap();
    (job.id, claim)
}

/// The job's notification row, asserting it is a fresh pending one for `email`.
async fn assert_pending_email(db: &TestDb, id: RequestId, email: &str) {
    let row = db
        .store
        .notification_for(id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("job {id} has no notification"));
    assert_eq!(row.email, email);
    assert_eq!(row.state, sluice_store::NotificationState::Pending);
    assert_eq!(row.attempts, 0);
    assert!(row.locked_until.is_none() && row.sent_at.is_none());
}

async fn notifications_in_total(db: &TestDb) -> i64 {
    db.store
        .notification_counts()
        .await
        .unwrap()
        .iter()
        .map(|(_, n)| n)
        .sum()
}

#[tokio::test]
async fn a_succeeded_job_with_an_email_queues_one_notification_and_a_stale_completion_none() {
    let db = TestDb::new("store_test").await;
    let (id, claim) = claimed_job_for(&db, Some("ada@example.com"), LEASE).await;
    // Running is not finished: nothing to tell yet.
    assert!(db.store.notification_for(id).await.unwrap().is_none());
    let result = serde_json::json!({"content": "42"});
    assert!(db
        .store
        .complete(id, claim.attempt, &result, "e1")
        .await
        .unwrap());
    assert_pending_email(&db, id, "ada@example.com").await;

    // A duplicate completion (a redelivered message) fails the fence and adds nothing.
    assert!(!db
        .store
        .complete(id, claim.attempt, &result, "e1")
        .await
        .unwrap());
    let answers = db
        .store
        .complete_many(&[sluice_store::Completion {
            id,
            attempt: claim.attempt,
            result,
            endpoint: "e2".into(),
        }])
        .await
        .unwrap();
    assert_eq!(answers, vec![false]);
    assert_eq!(notifications_in_total(&db).await, 1);
    // Nor does queueing it by hand: one email per job.
    assert_eq!(db.store.queue_notifications_for(&[id]).await.unwrap(), 0);
    db.drop().await;
}

#[tokio::test]
async fn a_dead_job_with_an_email_queues_one_notification_but_a_retrying_one_does_not() {
    let db = TestDb::new("store_test").await;
    let failure = Failure {
        error: "boom".into(),
        endpoint: Some("e1".into()),
        throttled: false,
    };
    let (id, claim) = claimed_job_for(&db, Some("bo@example.com"), LEASE).await;
    let retry = db
        .store
        .retry_later(id, claim.attempt, &failure, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert!(
        db.store.notification_for(id).await.unwrap().is_none(),
        "a retrying job is not finished"
    );

    let again = db.store.claim(&retry.job, LEASE).await.unwrap().unwrap();
    db.store
        .dead_letter(id, again.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    assert_pending_email(&db, id, "bo@example.com").await;
    // A stale dead-letter of the same attempt changes nothing.
    assert!(db
        .store
        .dead_letter(id, again.attempt, &failure)
        .await
        .unwrap()
        .is_none());
    assert_eq!(notifications_in_total(&db).await, 1);
    db.drop().await;
}

#[tokio::test]
async fn a_job_reaped_into_dead_queues_its_notification_and_one_reaped_to_retry_does_not() {
    let db = TestDb::new("store_test").await;
    let short = Duration::from_millis(100);
    let (retried, _) = claimed_job_for(&db, Some("cy@example.com"), short).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    // Tries left (1 of 2 used): back to retry, not finished.
    let reaped = db.store.reap_expired(2, 100).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(reaped[0].lane, Lane::Retry);
    assert!(db.store.notification_for(retried).await.unwrap().is_none());

    // The second expiry spends the budget: dead, and the email is queued with it.
    db.store
        .claim(&reaped[0].job, short)
        .await
        .unwrap()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let dead = db.store.reap_expired(2, 100).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].lane, Lane::Dead);
    assert_eq!(
        db.store.job(retried).await.unwrap().unwrap().state,
        JobState::Dead
    );
    assert_pending_email(&db, retried, "cy@example.com").await;
    assert!(db.store.reap_expired(2, 100).await.unwrap().is_empty());
    assert_eq!(notifications_in_total(&db).await, 1);
    db.drop().await;
}

#[tokio::test]
async fn a_cancelled_job_with_an_email_queues_one_notification() {
    let db = TestDb::new("store_test").await;
    let mut queued = new_job("acme", "never mind");
    queued.notify_email = Some("di@example.com".into());
    created(db.store.insert_job(&queued).await.unwrap());
    let (running, _) = claimed_job_for(&db, Some("ed@example.com"), LEASE).await;

    for id in [queued.id, running] {
        assert_eq!(
            db.store.cancel("acme", id).await.unwrap(),
            CancelOutcome::Cancelled
        );
    }
    assert_pending_email(&db, queued.id, "di@example.com").await;
    assert_pending_email(&db, running, "ed@example.com").await;
    // Cancelling again is refused and queues nothing more.
    assert_eq!(
        db.store.cancel("acme", running).await.unwrap(),
        CancelOutcome::Terminal(JobState::Cancelled)
    );
    assert_eq!(notifications_in_total(&db).await, 2);
    db.drop().await;
}

#[tokio::test]
async fn jobs_without_an_email_queue_no_notification_however_they_end() {
    let db = TestDb::new("store_test").await;
    let (done, claim) = claimed_job_for(&db, None, LEASE).await;
    assert!(db
        .store
        .complete(
            done,
            claim.attempt,
            &serde_json::json!({"content": "x"}),
            "e1"
        )
        .await
        .unwrap());
    let (dead, claim) = claimed_job_for(&db, None, LEASE).await;
    let failure = Failure {
        error: "no".into(),
        endpoint: None,
        throttled: false,
    };
    db.store
        .dead_letter(dead, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    let (cancelled, _) = claimed_job_for(&db, None, LEASE).await;
    assert_eq!(
        db.store.cancel("acme", cancelled).await.unwrap(),
        CancelOutcome::Cancelled
    );
    // The batched ingest path stores the address (or its absence) just the same.
    let mut batched = new_job("acme", "batched");
    batched.notify_email = Some("fi@example.com".into());
    let writer = JobWriter::spawn(db.store.clone(), 1, 8);
    let msg = writer.insert(batched.clone()).await.unwrap();
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    assert!(db
        .store
        .complete(batched.id, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap());

    for id in [done, dead, cancelled] {
        assert!(db.store.notification_for(id).await.unwrap().is_none());
    }
    assert_pending_email(&db, batched.id, "fi@example.com").await;
    assert_eq!(notifications_in_total(&db).await, 1);
    db.drop().await;
}

#[tokio::test]
async fn events_younger_than_the_settle_time_are_held_back_with_all_that_follow() {
    let db = TestDb::new("store_test").await;
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    let result = serde_json::json!({"content": "x"});
    assert!(db.store.complete(job.id, 1, &result, "e1").await.unwrap());
    let job_after = [(job.id, 0)];
    let seqs = |events: Vec<sluice_store::OwnedEvent>| -> Vec<i32> {
        events.iter().map(|e| e.event.seq).collect()
    };
    let all = db.store.events_after(&job_after, Duration::ZERO);
    assert_eq!(seqs(all.await.unwrap()), [1, 2, 3]);
    let fresh = db.store.events_after(&job_after, Duration::from_secs(60));
    assert!(seqs(fresh.await.unwrap()).is_empty());
    // Transaction times need not follow sequence numbers: an unsettled `running` holds back
    // the settled `succeeded` after it, so no reader skips a number.
    sqlx::query("UPDATE job_events SET at = at - interval '1 hour' WHERE job_id = $1")
        .bind(job.id.0)
        .execute(db.store.pool())
        .await
        .unwrap();
    sqlx::query("UPDATE job_events SET at = now() WHERE job_id = $1 AND seq = 2")
        .bind(job.id.0)
        .execute(db.store.pool())
        .await
        .unwrap();
    let settled = db.store.events_after(&job_after, Duration::from_secs(60));
    assert_eq!(seqs(settled.await.unwrap()), [1]);
    let since = chrono::Utc::now() - chrono::Duration::hours(2);
    let user = db
        .store
        .user_events_since("acme", "u1", since, Duration::from_secs(60));
    assert_eq!(seqs(user.await.unwrap()), [1]);
    db.drop().await;
}
