//! The store against a real PostgreSQL and a SQLite file: ingest, fencing, retries, reaping,
//! replay, the outbox and notifications. Each test runs on both, as `postgres::name` and
//! `sqlite::name`; a few SQLite-only tests cover its single writer and its file.
#![allow(clippy::unwrap_used)]

use sha2::{Digest, Sha256};
use sluice_core::{JobRef, JobRequest, JobState, Lane, Message, Principal, RequestId, Tier};
use sluice_store::{
    Accepted, Announce, BatchLine, BatchStatus, CancelBatch, CancelOutcome, Failure, FinishedFile,
    Ingested, JobWriter, NewBatch, NewFile, NewJob, NotificationSubject, Reuse, SortOrder,
};
use sluice_testkit::ScratchDb;
use std::time::Duration;

/// A migrated store on a scratch database of its own. Fields drop in order, so the store goes
/// before the scratch database, which removes the schema or file even if the test panicked.
struct TestDb {
    store: sluice_store::Store,
    scratch: ScratchDb,
}

impl TestDb {
    /// On PostgreSQL, in a new schema `{label}_{id}`.
    async fn new(label: &str) -> TestDb {
        TestDb::on(ScratchDb::postgres(label)).await
    }

    /// On SQLite, in a new file `{label}_{id}.db` in the temporary directory.
    async fn sqlite(label: &str) -> TestDb {
        TestDb::on(ScratchDb::sqlite(label)).await
    }

    async fn on(scratch: ScratchDb) -> TestDb {
        TestDb {
            store: scratch.store().await,
            scratch,
        }
    }

    /// The SQLite file, for tests that reopen it; `None` on PostgreSQL.
    fn sqlite_path(&self) -> Option<&std::path::Path> {
        self.scratch.path()
    }

    /// Close the store, then remove the schema or file.
    async fn drop(self) {
        self.store.close().await;
    }
}

fn principal(tenant: &str) -> Principal {
    Principal {
        tenant: tenant.into(),
        user: "u1".into(),
        tier: Tier::Pro,
        email: None,
        reuse_samples: false,
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

/// Run each named `async fn(TestDb)` on both backends, as `postgres::name` and `sqlite::name`.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::TestDb::new("store_test").await).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::TestDb::sqlite("store_test").await).await
                }
            )*
        }
    };
}

on_both_backends!(
    api_keys_resolve_to_their_principal_and_are_stored_hashed,
    ingest_writes_job_event_and_outbox_together,
    idempotency_key_returns_the_same_job_or_a_conflict,
    batched_writer_stores_every_job,
    claim_and_completion_are_fenced_by_attempt,
    retry_then_dead_then_replay,
    a_429_is_counted_as_a_throttle_not_a_try_and_keeps_the_token_estimate,
    cancel_respects_tenants_and_terminal_states,
    expired_leases_are_reaped_once_and_heartbeats_keep_them,
    relay_takes_only_old_unlocked_rows,
    batched_claims_and_completions_answer_each_caller_once,
    a_succeeded_job_with_an_email_queues_one_notification_and_a_stale_completion_none,
    a_dead_job_with_an_email_queues_one_notification_but_a_retrying_one_does_not,
    a_job_reaped_into_dead_queues_its_notification_and_one_reaped_to_retry_does_not,
    a_cancelled_job_with_an_email_queues_one_notification,
    jobs_without_an_email_queue_no_notification_however_they_end,
    events_younger_than_the_settle_time_are_held_back_with_all_that_follow,
    mailers_claim_due_notifications_once_and_record_the_outcome,
    stats_summarise_finished_jobs,
    dashboard_series_count_finished_jobs_and_calls_per_endpoint,
    identical_jobs_in_flight_attach_to_one_leader_and_share_its_answer,
    concurrent_completions_add_every_cost_to_the_tenants_spend,
    a_reusable_answer_completes_a_job_at_once_within_its_tenant_only,
    the_batched_insert_looks_up_the_exact_cache_for_jobs_that_ask,
    followers_of_a_dead_leader_fail_with_it_and_of_a_cancelled_one_run_alone,
    lane_stats_and_positions_count_queued_leaders,
    semantic_candidates_are_the_tenants_recent_successes,
    admin_keys_stand_for_no_tenant_and_revoked_keys_for_nothing,
    only_dead_jobs_are_purged_and_they_leave_nothing_behind,
    error_status_is_stored_by_retry_later_and_dead_letter,
    waiting_jobs_with_no_outbox_row_are_republished_once_per_wait,
    a_broker_dead_letter_ends_only_a_job_still_waiting_at_its_attempt,
    a_shared_value_is_made_once_and_read_by_everyone_after,
    cancel_waiting_cancels_waiting_jobs_and_refuses_a_running_one,
    detached_jobs_are_reattached_once_or_cancelled_after_their_grace,
    concurrent_reattaches_take_a_job_once,
    files_round_trip_in_chunks_behind_tenant_walls,
    files_list_in_pages_both_ways_and_by_purpose,
    stale_uploads_are_purged_and_live_ones_kept,
    a_batch_is_created_whole_with_its_jobs_outbox_rows_and_lines,
    a_failing_batch_creation_leaves_nothing,
    batches_list_newest_first_within_their_tenant,
    cancelling_a_batch_cancels_its_jobs_and_ends_it_cancelled,
    batch_progress_counts_its_jobs_as_they_move,
    concurrent_finalizers_never_take_the_same_batch,
    finishing_a_batch_is_fenced_and_queues_one_email,
    every_change_to_a_job_is_announced_once_with_its_tenant,
    followers_and_answered_jobs_are_announced_with_the_jobs_that_settle_them,
    batch_lines_are_announced_when_created_and_when_cancelled,
);

/// End a test: check that every job's event log walks the state machine of `sluice_core`, then
/// drop the database.
async fn finish(db: TestDb) {
    assert_transitions_are_legal(&db).await;
    db.drop().await;
}

/// Every job's event log, whatever the test did to it, starts `queued`, numbers its events
/// 1, 2, 3, ..., moves only as [`JobState::can_become`] allows (`dead -> queued` is an
/// operator's replay), and ends in the state the job is in.
async fn assert_transitions_are_legal(db: &TestDb) {
    let events = "SELECT job_id, seq, state FROM job_events ORDER BY job_id, seq";
    let jobs = "SELECT id, state FROM jobs";
    type Events = Vec<(uuid::Uuid, i32, String)>;
    let (events, jobs): (Events, Vec<(uuid::Uuid, String)>) =
        match (db.store.pg_pool(), db.store.sqlite_pool()) {
            (Some(pool), _) => (
                sqlx::query_as(events).fetch_all(pool).await.unwrap(),
                sqlx::query_as(jobs).fetch_all(pool).await.unwrap(),
            ),
            (None, Some(pool)) => (
                sqlx::query_as(events).fetch_all(pool).await.unwrap(),
                sqlx::query_as(jobs).fetch_all(pool).await.unwrap(),
            ),
            (None, None) => unreachable!("a store has one backend"),
        };
    let mut logs: std::collections::BTreeMap<uuid::Uuid, Vec<(i32, JobState)>> =
        std::collections::BTreeMap::new();
    for (job, seq, state) in events {
        logs.entry(job)
            .or_default()
            .push((seq, state.parse().unwrap()));
    }
    for (job, state) in &jobs {
        let log = logs
            .get(job)
            .unwrap_or_else(|| panic!("job {job} has no events"));
        let seqs: Vec<i32> = log.iter().map(|(seq, _)| *seq).collect();
        let expected: Vec<i32> = (1..=i32::try_from(log.len()).unwrap()).collect();
        assert_eq!(seqs, expected, "job {job}: events numbered without gaps");
        assert_eq!(log[0].1, JobState::Queued, "job {job}: starts queued");
        for pair in log.windows(2) {
            let (from, to) = (pair[0].1, pair[1].1);
            assert!(
                from.can_become(to),
                "job {job}: the store moved it {from} -> {to}, which the state machine forbids"
            );
        }
        let last = log[log.len() - 1].1;
        assert_eq!(
            last.as_str(),
            state,
            "job {job}: its state is its last event's"
        );
    }
    assert_eq!(logs.len(), jobs.len(), "no events of jobs that are gone");
}

/// The stored hash and prefix of the only API key, by raw SQL on either backend.
async fn stored_key(db: &TestDb) -> (Vec<u8>, String) {
    let sql = "SELECT key_hash, key_prefix FROM api_keys";
    match (db.store.pg_pool(), db.store.sqlite_pool()) {
        (Some(pool), _) => sqlx::query_as(sql).fetch_one(pool).await.unwrap(),
        (None, Some(pool)) => sqlx::query_as(sql).fetch_one(pool).await.unwrap(),
        (None, None) => unreachable!("a store has one backend"),
    }
}

/// Move a job's events an hour into the past, except `running` (seq 2), which is made new:
/// a settled event after an unsettled one.
async fn age_events(db: &TestDb, id: RequestId) {
    if let Some(pool) = db.store.pg_pool() {
        sqlx::query("UPDATE job_events SET at = at - interval '1 hour' WHERE job_id = $1")
            .bind(id.0)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("UPDATE job_events SET at = now() WHERE job_id = $1 AND seq = 2")
            .bind(id.0)
            .execute(pool)
            .await
            .unwrap();
    } else if let Some(pool) = db.store.sqlite_pool() {
        // Timestamps are fixed-width UTC text (see migrations/sqlite/0001_init.sql).
        sqlx::query(
            "UPDATE job_events SET at = strftime('%Y-%m-%dT%H:%M:%fZ', at, '-1 hour')
             WHERE job_id = ?1",
        )
        .bind(id.0)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE job_events SET at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
             WHERE job_id = ?1 AND seq = 2",
        )
        .bind(id.0)
        .execute(pool)
        .await
        .unwrap();
    }
}

async fn api_keys_resolve_to_their_principal_and_are_stored_hashed(db: TestDb) {
    let p = principal("acme");
    let key = db.store.create_api_key(&p).await.unwrap();
    assert!(key.starts_with("sk_sluice_"));
    assert_eq!(db.store.principal_for_key(&key).await.unwrap(), Some(p));
    assert_eq!(
        db.store.principal_for_key("sk_sluice_nope").await.unwrap(),
        None
    );
    let (hash, prefix) = stored_key(&db).await;
    let hashed = hash == Sha256::digest(key.as_bytes()).as_slice();
    assert!(hashed, "the key is stored as its SHA-256");
    assert!(key.starts_with(&prefix) && prefix.len() < 16);
    // A key that opted in to reusing sampled answers says so when resolved and listed.
    let reusing = Principal {
        reuse_samples: true,
        ..principal("beta")
    };
    let key = db.store.create_api_key(&reusing).await.unwrap();
    assert_eq!(
        db.store.principal_for_key(&key).await.unwrap(),
        Some(reusing)
    );
    let listed = db.store.api_keys().await.unwrap();
    let flags: Vec<bool> = listed.iter().map(|k| k.principal.reuse_samples).collect();
    assert_eq!(flags, [false, true]);
    finish(db).await;
}

async fn ingest_writes_job_event_and_outbox_together(db: TestDb) {
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
    finish(db).await;
}

async fn idempotency_key_returns_the_same_job_or_a_conflict(db: TestDb) {
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
    finish(db).await;
}

async fn batched_writer_stores_every_job(db: TestDb) {
    let writer = JobWriter::spawn(db.store.clone(), 2, 64);
    let mut tasks = Vec::new();
    for n in 0..300 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let job = new_job("acme", &format!("job {n}"));
            let id = job.id;
            let msg = writer.insert(job).await.unwrap().into_queued().unwrap();
            assert_eq!(msg.job.request_id, id);
            id
        }));
    }
    for t in tasks {
        let id = t.await.unwrap();
        assert!(db.store.get_job("acme", id).await.unwrap().is_some());
    }
    assert_eq!(db.store.outbox_len().await.unwrap(), 300);
    finish(db).await;
}

async fn claim_and_completion_are_fenced_by_attempt(db: TestDb) {
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
    finish(db).await;
}

async fn retry_then_dead_then_replay(db: TestDb) {
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    let failure = Failure {
        error: "provider returned 500".into(),
        endpoint: Some("e1".into()),
        throttled: false,
        status: None,
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
    finish(db).await;
}

async fn a_429_is_counted_as_a_throttle_not_a_try_and_keeps_the_token_estimate(db: TestDb) {
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let throttle = Failure {
        error: "rate limited".into(),
        endpoint: Some("e1".into()),
        throttled: true,
        status: None,
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
    finish(db).await;
}

async fn cancel_respects_tenants_and_terminal_states(db: TestDb) {
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
    finish(db).await;
}

async fn expired_leases_are_reaped_once_and_heartbeats_keep_them(db: TestDb) {
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
    finish(db).await;
}

async fn relay_takes_only_old_unlocked_rows(db: TestDb) {
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
    finish(db).await;
}

async fn batched_claims_and_completions_answer_each_caller_once(db: TestDb) {
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
        cost_usd: None,
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
    finish(db).await;
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

async fn a_succeeded_job_with_an_email_queues_one_notification_and_a_stale_completion_none(
    db: TestDb,
) {
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
            cost_usd: None,
        }])
        .await
        .unwrap();
    assert_eq!(answers, vec![false]);
    assert_eq!(notifications_in_total(&db).await, 1);
    // Nor does queueing it by hand: one email per job.
    assert_eq!(db.store.queue_notifications_for(&[id]).await.unwrap(), 0);
    finish(db).await;
}

async fn a_dead_job_with_an_email_queues_one_notification_but_a_retrying_one_does_not(db: TestDb) {
    let failure = Failure {
        error: "boom".into(),
        endpoint: Some("e1".into()),
        throttled: false,
        status: None,
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
    finish(db).await;
}

async fn a_job_reaped_into_dead_queues_its_notification_and_one_reaped_to_retry_does_not(
    db: TestDb,
) {
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
    finish(db).await;
}

async fn a_cancelled_job_with_an_email_queues_one_notification(db: TestDb) {
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
    finish(db).await;
}

async fn jobs_without_an_email_queue_no_notification_however_they_end(db: TestDb) {
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
        status: None,
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
    let msg = writer
        .insert(batched.clone())
        .await
        .unwrap()
        .into_queued()
        .unwrap();
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
    finish(db).await;
}

async fn events_younger_than_the_settle_time_are_held_back_with_all_that_follow(db: TestDb) {
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
    age_events(&db, job.id).await;
    let settled = db.store.events_after(&job_after, Duration::from_secs(60));
    assert_eq!(seqs(settled.await.unwrap()), [1]);
    let since = chrono::Utc::now() - chrono::Duration::hours(2);
    let user = db
        .store
        .user_events_since("acme", "u1", since, Duration::from_secs(60));
    assert_eq!(seqs(user.await.unwrap()), [1]);
    finish(db).await;
}

async fn mailers_claim_due_notifications_once_and_record_the_outcome(db: TestDb) {
    use sluice_store::NotificationState;
    use sluice_store::NotificationSubject::Job;
    let (done, claim) = claimed_job_for(&db, Some("ada@example.com"), LEASE).await;
    let result = serde_json::json!({"content": "42"});
    assert!(db
        .store
        .complete(done, claim.attempt, &result, "e1")
        .await
        .unwrap());
    let failure = Failure {
        error: "boom".into(),
        endpoint: None,
        throttled: false,
        status: None,
    };
    let (dead, claim) = claimed_job_for(&db, Some("bo@example.com"), LEASE).await;
    db.store
        .dead_letter(dead, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();

    let taken = db.store.claim_notifications(10, LEASE).await.unwrap();
    assert_eq!(taken.len(), 2);
    let about = |id: RequestId| {
        taken
            .iter()
            .find(|n| matches!(&n.subject, Job { request_id, .. } if *request_id == id))
            .unwrap()
    };
    let ok = about(done);
    let Job {
        job_state, content, ..
    } = &ok.subject
    else {
        unreachable!()
    };
    assert_eq!(
        (*job_state, content.as_deref(), ok.attempts),
        (JobState::Succeeded, Some("42"), 1)
    );
    assert_eq!(ok.email, "ada@example.com");
    let bad = about(dead);
    let Job {
        job_state,
        content,
        error,
        ..
    } = &bad.subject
    else {
        unreachable!()
    };
    assert_eq!(
        (*job_state, content.as_deref(), error.as_deref()),
        (JobState::Dead, None, Some("boom"))
    );
    assert!(
        db.store
            .claim_notifications(10, LEASE)
            .await
            .unwrap()
            .is_empty(),
        "held rows are not taken twice"
    );

    // Given back untried: free at once, and the claim did not count.
    db.store.release_notifications(&[ok.id]).await.unwrap();
    let row = db.store.notification_for(done).await.unwrap().unwrap();
    assert_eq!((row.attempts, row.locked_until), (0, None));
    let again = db.store.claim_notifications(10, LEASE).await.unwrap();
    assert_eq!(again.len(), 1);
    // A transient failure is retried when due, a permanent one is given up.
    db.store
        .notification_failed(ok.id, "421 try later", Some(Duration::ZERO))
        .await
        .unwrap();
    db.store
        .notification_failed(bad.id, "550 no such user", None)
        .await
        .unwrap();
    let retried = db.store.claim_notifications(10, LEASE).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!((retried[0].id, retried[0].attempts), (ok.id, 2));
    db.store.notification_sent(ok.id).await.unwrap();
    // A late failure report cannot undo a send.
    db.store
        .notification_failed(ok.id, "late", None)
        .await
        .unwrap();
    let row = db.store.notification_for(done).await.unwrap().unwrap();
    assert_eq!(row.state, NotificationState::Sent);
    assert!(row.sent_at.is_some() && row.locked_until.is_none());
    assert_eq!(
        db.store
            .notification_for(dead)
            .await
            .unwrap()
            .unwrap()
            .last_error
            .as_deref(),
        Some("550 no such user")
    );
    assert_eq!(
        db.store.notification_counts().await.unwrap(),
        vec![(NotificationState::Failed, 1), (NotificationState::Sent, 1)]
    );
    assert!(db
        .store
        .claim_notifications(10, LEASE)
        .await
        .unwrap()
        .is_empty());
    finish(db).await;
}

async fn stats_summarise_finished_jobs(db: TestDb) {
    assert_eq!(
        db.store.latency_summary().await.unwrap(),
        sluice_store::LatencySummary::default()
    );
    assert_eq!(db.store.run_span().await.unwrap(), 0.0);
    let (done, claim) = claimed_job_for(&db, None, LEASE).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(db
        .store
        .complete(done, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap());
    let (dead, claim) = claimed_job_for(&db, None, LEASE).await;
    let failure = Failure {
        error: "no".into(),
        endpoint: None,
        throttled: false,
        status: None,
    };
    db.store
        .dead_letter(dead, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    created(
        db.store
            .insert_job(&new_job("acme", "waiting"))
            .await
            .unwrap(),
    );

    assert_eq!(db.store.finished_count().await.unwrap(), 2);
    let latency = db.store.latency_summary().await.unwrap();
    let (span, p50, p95, p99, not_succeeded) = (
        latency.span,
        latency.p50,
        latency.p95,
        latency.p99,
        latency.not_succeeded,
    );
    assert!(
        span >= 0.02 && p99 >= p95 && p95 >= p50 && p50 >= 0.0,
        "{span} {p50} {p95} {p99}"
    );
    assert_eq!(not_succeeded, 2, "one dead and one still queued");
    let waits = db.store.queue_wait_by_lane().await.unwrap();
    assert_eq!(waits.len(), 1);
    assert_eq!((waits[0].lane.as_str(), waits[0].jobs), ("priority", 2));
    assert!(waits[0].p95 >= waits[0].p50 && waits[0].p50 >= 0.0);
    assert!(db.store.run_span().await.unwrap() >= 0.02);
    assert_eq!(db.store.finished_in_window(0.0, 3600.0).await.unwrap(), 2);
    assert_eq!(
        db.store.finished_in_window(3600.0, 7200.0).await.unwrap(),
        0
    );
    finish(db).await;
}

async fn dashboard_series_count_finished_jobs_and_calls_per_endpoint(db: TestDb) {
    let since = chrono::Utc::now() - chrono::Duration::minutes(15);
    let (done, claim) = claimed_job_for(&db, None, LEASE).await;
    assert!(db
        .store
        .complete(done, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap());
    // A 429 from e2, then a failure on e2 that dead-letters the job.
    let (dead, claim) = claimed_job_for(&db, None, LEASE).await;
    let mut failure = Failure {
        error: "provider returned 429".into(),
        endpoint: Some("e2".into()),
        throttled: true,
        status: None,
    };
    let retry = db
        .store
        .retry_later(dead, claim.attempt, &failure, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    let claim = db.store.claim(&retry.job, LEASE).await.unwrap().unwrap();
    failure.error = "provider returned 400".into();
    failure.throttled = false;
    db.store
        .dead_letter(dead, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    created(
        db.store
            .insert_job(&new_job("acme", "waiting"))
            .await
            .unwrap(),
    );

    let buckets = db.store.finished_per_bucket(since, 10).await.unwrap();
    assert_eq!(
        buckets.iter().map(|b| b.jobs).sum::<i64>(),
        2,
        "{buckets:?}"
    );
    assert!(buckets.iter().all(|b| b.start.timestamp() % 10 == 0));
    let calls = db.store.endpoint_calls_per_minute(since).await.unwrap();
    let total = |name: &str| {
        calls
            .iter()
            .filter(|c| c.endpoint == name)
            .fold((0, 0), |(a, b), c| (a + c.calls, b + c.throttled))
    };
    assert_eq!(total("e1"), (1, 0), "{calls:?}");
    assert_eq!(total("e2"), (2, 1), "one 429 and one failure: {calls:?}");
    assert!(calls.iter().all(|c| c.minute.timestamp() % 60 == 0));
    let waits = db.store.queue_wait_by_lane_since(since).await.unwrap();
    assert_eq!(waits.len(), 1);
    assert_eq!(waits[0].jobs, 2);
    let later = chrono::Utc::now() + chrono::Duration::minutes(1);
    assert!(db
        .store
        .queue_wait_by_lane_since(later)
        .await
        .unwrap()
        .is_empty());
    assert!(db
        .store
        .finished_per_bucket(later, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(db
        .store
        .endpoint_calls_per_minute(later)
        .await
        .unwrap()
        .is_empty());
    finish(db).await;
}

/// SQLite's own concerns: one writer under concurrent load, durability of its file, and the
/// PostgreSQL-only operations it refuses.
mod sqlite_only {
    use super::*;
    use sluice_store::{Backend, Store, StoreConfig, StoreError};
    use std::io::BufRead;

    const JOBS: usize = 400;

    /// The database file and the WAL and shared-memory files SQLite makes beside it hold
    /// prompts, answers and key hashes: readable by their owner only.
    #[tokio::test]
    async fn a_new_database_file_and_its_wal_are_private_to_their_owner() {
        use std::os::unix::fs::PermissionsExt;
        let db = TestDb::sqlite("private_file").await;
        created(
            db.store
                .insert_job(&new_job("acme", "secret prompt"))
                .await
                .unwrap(),
        );
        let path = db.sqlite_path().unwrap().to_owned();
        let mut seen = 0;
        for suffix in ["", "-wal", "-shm"] {
            let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            let Ok(meta) = std::fs::metadata(&file) else {
                continue;
            };
            seen += 1;
            assert_eq!(
                meta.permissions().mode() & 0o777,
                0o600,
                "{} is readable by others",
                file.display()
            );
        }
        assert!(
            seen >= 2,
            "the file and its WAL exist while the store is open"
        );
        // A directory that does not exist is named in the error.
        let missing = std::env::temp_dir().join("no-such-sluice-dir").join("x.db");
        let error = Store::connect(&StoreConfig {
            url: format!("sqlite://{}", missing.display()),
            ..StoreConfig::default()
        })
        .await
        .unwrap_err();
        assert!(
            matches!(&error, StoreError::CreateFile { path, .. } if path == &missing),
            "{error}"
        );
        finish(db).await;
    }

    /// An API (ingest through the batched writer and one at a time with idempotency keys,
    /// reads) and a worker (batched claims, heartbeats, completions, outbox clean-up, reaper
    /// and relay sweeps) in one process on one file: no statement may fail with SQLITE_BUSY.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_concurrent_inserts_claims_and_completions_all_succeed() {
        let db = TestDb::sqlite("store_load").await;
        let store = db.store.clone();
        let writer = JobWriter::spawn(store.clone(), 2, 64);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<sluice_store::OutboxMessage>();
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));

        let mut api = Vec::new();
        for producer in 0..8 {
            let (store, writer, tx) = (store.clone(), writer.clone(), tx.clone());
            api.push(tokio::spawn(async move {
                for n in 0..JOBS / 8 {
                    let mut job = new_job("acme", &format!("job {producer}-{n}"));
                    let msg = if n % 4 == 0 {
                        job.idempotency = Some((format!("k{producer}-{n}"), vec![1]));
                        created(store.insert_job(&job).await.unwrap())
                    } else {
                        writer
                            .insert(job.clone())
                            .await
                            .unwrap()
                            .into_queued()
                            .unwrap()
                    };
                    // A poll right after the 202, as a client would.
                    assert!(store.get_job("acme", job.id).await.unwrap().is_some());
                    tx.send(msg).unwrap();
                }
            }));
        }
        drop(tx);

        let mut workers = Vec::new();
        for _ in 0..4 {
            let (store, rx) = (store.clone(), rx.clone());
            workers.push(tokio::spawn(async move {
                let mut done = 0;
                loop {
                    let mut batch = Vec::new();
                    if rx.lock().await.recv_many(&mut batch, 16).await == 0 {
                        return done;
                    }
                    let refs: Vec<JobRef> = batch.iter().map(|m| m.job.clone()).collect();
                    let claims = store.claim_many(&refs, LEASE).await.unwrap();
                    let held: Vec<(RequestId, i32)> =
                        claims.iter().flatten().map(|c| (c.id, c.attempt)).collect();
                    assert_eq!(held.len(), batch.len(), "every fresh message is claimed");
                    store.heartbeat(&held, LEASE).await.unwrap();
                    let ids: Vec<i64> = batch.iter().map(|m| m.outbox_id).collect();
                    store.mark_published(&ids).await.unwrap();
                    let completions: Vec<sluice_store::Completion> = held
                        .iter()
                        .map(|&(id, attempt)| sluice_store::Completion {
                            id,
                            attempt,
                            result: serde_json::json!({"content": "ok"}),
                            endpoint: "e1".into(),
                            cost_usd: None,
                        })
                        .collect();
                    let answers = store.complete_many(&completions).await.unwrap();
                    assert!(answers.iter().all(|&a| a));
                    done += answers.len();
                }
            }));
        }

        let sweeping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sweeper = {
            let (store, sweeping) = (store.clone(), sweeping.clone());
            tokio::spawn(async move {
                let mut sweeps = 0;
                while sweeping.load(std::sync::atomic::Ordering::Relaxed) {
                    assert!(store.reap_expired(5, 100).await.unwrap().is_empty());
                    let hour = Duration::from_secs(3600);
                    assert!(store
                        .unpublished(hour, LEASE, 100)
                        .await
                        .unwrap()
                        .is_empty());
                    store.count_by_state().await.unwrap();
                    sweeps += 1;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                sweeps
            })
        };

        for task in api {
            task.await.unwrap();
        }
        let mut completed = 0;
        for task in workers {
            completed += task.await.unwrap();
        }
        sweeping.store(false, std::sync::atomic::Ordering::Relaxed);
        assert!(sweeper.await.unwrap() > 0);

        assert_eq!(completed, JOBS);
        let states = store.count_by_state().await.unwrap();
        assert_eq!(states, vec![(JobState::Succeeded, JOBS as i64)]);
        assert_eq!(store.finished_count().await.unwrap(), JOBS as i64);
        assert_eq!(store.outbox_len().await.unwrap(), 0);
        drop(store);
        db.drop().await;
    }

    /// Set by the parent of [`accepted_jobs_survive_kill_9`] for the child it kills.
    const CHILD_DB: &str = "SLUICE_STORE_KILL_TEST_DB";

    /// The child half of [`accepted_jobs_survive_kill_9`]: accepts jobs until killed, printing
    /// each request_id once its insert returned. Does nothing in an ordinary test run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kill_9_child() {
        let Ok(path) = std::env::var(CHILD_DB) else {
            return;
        };
        let store = Store::connect(&StoreConfig {
            url: format!("sqlite://{path}"),
            ..StoreConfig::default()
        })
        .await
        .unwrap();
        let writer = JobWriter::spawn(store.clone(), 2, 16);
        for n in 0.. {
            let job = new_job("acme", &format!("job {n}"));
            let id = job.id;
            if n % 2 == 0 {
                writer.insert(job).await.unwrap();
            } else {
                created(store.insert_job(&job).await.unwrap());
            }
            println!("accepted {id}");
        }
    }

    /// Every job whose insert returned (a `202`) is in the file after the process holding it
    /// is killed with SIGKILL mid-stream.
    #[tokio::test]
    async fn accepted_jobs_survive_kill_9() {
        let db = TestDb::sqlite("store_kill").await;
        let path = db.sqlite_path().unwrap().to_owned();
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "sqlite_only::kill_9_child", "--nocapture"])
            .env(CHILD_DB, &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let accepted = tokio::task::spawn_blocking(move || {
            let mut ids = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let line = line.unwrap();
                if let Some(id) = line.strip_prefix("accepted ") {
                    ids.push(id.parse::<RequestId>().unwrap());
                    if ids.len() == 200 {
                        break;
                    }
                }
            }
            (ids, child)
        });
        let (ids, mut child) = accepted.await.unwrap();
        child.kill().unwrap(); // SIGKILL: no destructor, no checkpoint, no clean close.
        child.wait().unwrap();
        assert_eq!(ids.len(), 200, "the child accepted jobs");
        for id in ids {
            let job = db.store.job(id).await.unwrap();
            assert!(job.is_some(), "accepted job {id} was lost");
        }
        db.drop().await;
    }

    /// `sqlite::memory:` (throwaway use): reads see the writes, which share its one connection.
    #[tokio::test]
    async fn an_in_memory_database_serves_reads_and_writes() {
        let store = Store::connect(&StoreConfig {
            url: "sqlite::memory:".into(),
            ..StoreConfig::default()
        })
        .await
        .unwrap();
        let job = new_job("acme", "hi");
        let msg = created(store.insert_job(&job).await.unwrap());
        assert!(store.get_job("acme", job.id).await.unwrap().is_some());
        let claim = store.claim(&msg.job, LEASE).await.unwrap().unwrap();
        let result = serde_json::json!({"content": "x"});
        assert!(store
            .complete(job.id, claim.attempt, &result, "e1")
            .await
            .unwrap());
        assert_eq!(store.events(job.id).await.unwrap().len(), 3);
        store.close().await;
    }

    #[tokio::test]
    async fn postgres_only_operations_answer_a_typed_error() {
        let db = TestDb::sqlite("store_unsupported").await;
        assert_eq!(db.store.backend(), Backend::Sqlite);
        assert!(db.store.pg_pool().is_none());
        assert!(matches!(
            db.store.drop_schema("anything").await,
            Err(StoreError::Unsupported {
                backend: Backend::Sqlite,
                ..
            })
        ));
        let with_schema = Store::connect(&StoreConfig {
            url: format!("sqlite://{}", db.sqlite_path().unwrap().display()),
            schema: Some("elsewhere".into()),
            ..StoreConfig::default()
        })
        .await;
        assert!(matches!(with_schema, Err(StoreError::Unsupported { .. })));
        let unknown = Store::connect(&StoreConfig {
            url: "mysql://root:secret@localhost/db".into(),
            ..StoreConfig::default()
        })
        .await;
        match unknown {
            Err(error @ StoreError::UnsupportedUrl(_)) => {
                assert!(!error.to_string().contains("secret"), "{error}")
            }
            other => panic!("expected an unsupported URL, got {other:?}"),
        }
        assert!(db.store.ping().await);
        db.drop().await;
    }
}

fn hashed_job(tenant: &str, text: &str) -> NewJob {
    let mut job = new_job(tenant, text);
    job.request_hash = Some(Sha256::digest(text.as_bytes()).to_vec());
    job
}

async fn complete_with(db: &TestDb, message: &sluice_store::OutboxMessage, content: &str) {
    let claim = db.store.claim(&message.job, LEASE).await.unwrap().unwrap();
    let done = db
        .store
        .complete_many(&[sluice_store::Completion {
            id: claim.id,
            attempt: claim.attempt,
            result: serde_json::json!({ "content": content }),
            endpoint: "e1".into(),
            cost_usd: Some(0.25),
        }])
        .await
        .unwrap();
    assert_eq!(done, [true]);
}

/// Completions from many connections at once (each adds to a spend row of its own on
/// PostgreSQL) lose no cost, and each tenant reads only its own.
async fn concurrent_completions_add_every_cost_to_the_tenants_spend(db: TestDb) {
    let mut claims = Vec::new();
    for n in 0..48 {
        let tenant = if n % 4 == 3 { "other" } else { "acme" };
        let message = created(
            db.store
                .insert_job(&new_job(tenant, &format!("job {n}")))
                .await
                .unwrap(),
        );
        claims.push(db.store.claim(&message.job, LEASE).await.unwrap().unwrap());
    }
    let mut tasks = Vec::new();
    for group in claims.chunks(6) {
        let store = db.store.clone();
        let done: Vec<sluice_store::Completion> = group
            .iter()
            .map(|claim| sluice_store::Completion {
                id: claim.id,
                attempt: claim.attempt,
                result: serde_json::json!({ "content": "ok" }),
                endpoint: "e1".into(),
                cost_usd: Some(0.125),
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            store.complete_many(&done).await.unwrap()
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap().iter().all(|done| *done));
    }
    // 36 of acme's jobs and 12 of other's, at $0.125 each: exact in binary floating point.
    assert_eq!(db.store.spent_today("acme").await.unwrap(), 4.5);
    assert_eq!(db.store.spent_today("other").await.unwrap(), 1.5);
    assert_eq!(db.store.spent_today("nobody").await.unwrap(), 0.0);
    finish(db).await;
}

async fn identical_jobs_in_flight_attach_to_one_leader_and_share_its_answer(db: TestDb) {
    let writer = JobWriter::spawn(db.store.clone(), 2, 8);
    let mut tasks = Vec::new();
    for n in 0..20 {
        let writer = writer.clone();
        // The same request from two tenants: each tenant gets its own leader.
        let tenant = if n % 10 == 9 { "other" } else { "acme" };
        let job = hashed_job(tenant, "same question");
        tasks.push(tokio::spawn(async move {
            (job.id, tenant, writer.insert(job).await.unwrap())
        }));
    }
    let mut leaders = std::collections::HashMap::new();
    let mut followers = Vec::new();
    for task in tasks {
        let (id, tenant, accepted) = task.await.unwrap();
        match accepted {
            Accepted::Queued(message) => {
                assert!(
                    leaders.insert(tenant, message).is_none(),
                    "two leaders in {tenant}"
                );
            }
            Accepted::Attached { leader } => followers.push((id, tenant, leader)),
            Accepted::Answerable { source } => panic!("no job looked for an answer: {source}"),
            Accepted::Enqueued => panic!("this store has no lanes of its own"),
        }
    }
    assert_eq!(leaders.len(), 2, "one leader per tenant");
    assert_eq!(followers.len(), 18);
    for (_, tenant, leader) in &followers {
        assert_eq!(
            *leader, leaders[tenant].job.request_id,
            "followers stay in their tenant"
        );
    }
    // Jobs that opted out of reuse never attach.
    let alone = writer
        .insert(new_job("acme", "same question"))
        .await
        .unwrap();
    assert!(matches!(alone, Accepted::Queued(_)));

    complete_with(&db, &leaders["acme"], "the answer").await;
    for (id, tenant, _) in followers.iter().filter(|(_, t, _)| *t == "acme") {
        let job = db.store.get_job(tenant, *id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        assert_eq!(job.result.unwrap()["content"], "the answer");
        assert_eq!(job.cached, Some(Reuse::Dedup));
        assert_eq!(job.cost_usd, Some(0.0));
        let events = db.store.events(*id).await.unwrap();
        let states: Vec<JobState> = events.iter().map(|e| e.state).collect();
        assert_eq!(states, [JobState::Queued, JobState::Succeeded]);
        assert_eq!(
            events[0].detail.as_ref().unwrap()["attached_to"],
            leaders["acme"].job.request_id.to_string()
        );
    }
    // The other tenant's followers still wait for their own leader.
    for (id, tenant, _) in followers.iter().filter(|(_, t, _)| *t == "other") {
        assert_eq!(
            db.store.get_job(tenant, *id).await.unwrap().unwrap().state,
            JobState::Queued
        );
    }
    assert_eq!(db.store.spent_today("acme").await.unwrap(), 0.25);
    assert_eq!(db.store.spent_today("other").await.unwrap(), 0.0);
    // Once the leader finished, an identical job leads again.
    let next = writer
        .insert(hashed_job("acme", "same question"))
        .await
        .unwrap();
    assert!(matches!(next, Accepted::Queued(_)), "{next:?}");
    finish(db).await;
}

async fn the_batched_insert_looks_up_the_exact_cache_for_jobs_that_ask(db: TestDb) {
    let source = hashed_job("acme", "cache me");
    let message = created(db.store.insert_job(&source).await.unwrap());
    complete_with(&db, &message, "cached words").await;
    let hour = Duration::from_secs(3600);
    let looking = |tenant: &str, text: &str, within: Option<Duration>| NewJob {
        reuse_within: within,
        ..hashed_job(tenant, text)
    };
    let jobs = [
        looking("acme", "cache me", Some(hour)),
        looking("acme", "cache me", None),
        looking("other", "cache me", Some(hour)),
        looking("acme", "something new", Some(hour)),
    ];
    let outcomes = db.store.insert_jobs(&jobs).await.unwrap();
    let outcomes: Vec<Accepted> = outcomes.into_iter().map(Result::unwrap).collect();
    assert!(
        matches!(outcomes[0], Accepted::Answerable { source: s } if s == source.id),
        "{:?}",
        outcomes[0]
    );
    // Not asked to look, another tenant, a new request: each queued as usual.
    for outcome in &outcomes[1..] {
        assert!(matches!(outcome, Accepted::Queued(_)), "{outcome:?}");
    }
    assert!(
        db.store
            .get_job("acme", jobs[0].id)
            .await
            .unwrap()
            .is_none(),
        "an answerable job is not stored"
    );
    // An answer older than the window is not taken: the job queues, or attaches to the
    // identical job now in flight.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let late = db
        .store
        .insert_jobs(&[looking("acme", "cache me", Some(Duration::from_millis(5)))])
        .await
        .unwrap();
    assert!(
        matches!(late[..], [Ok(Accepted::Attached { leader })] if leader == jobs[1].id),
        "{late:?}"
    );
    finish(db).await;
}

async fn a_reusable_answer_completes_a_job_at_once_within_its_tenant_only(db: TestDb) {
    let source = hashed_job("acme", "cache me");
    let hash = source.request_hash.clone().unwrap();
    let message = created(db.store.insert_job(&source).await.unwrap());
    let hour = Duration::from_secs(3600);
    assert_eq!(
        db.store.reusable_answer("acme", &hash, hour).await.unwrap(),
        None,
        "not done yet"
    );
    complete_with(&db, &message, "cached words").await;
    assert_eq!(
        db.store.reusable_answer("acme", &hash, hour).await.unwrap(),
        Some(source.id)
    );
    assert_eq!(
        db.store
            .reusable_answer("other", &hash, hour)
            .await
            .unwrap(),
        None
    );
    // Many look-ups at once answer each in its place, tenants apart.
    let wanted = [
        ("other".to_owned(), hash.clone()),
        ("acme".to_owned(), b"another request".to_vec()),
        ("acme".to_owned(), hash.clone()),
        ("acme".to_owned(), hash.clone()),
    ];
    assert_eq!(
        db.store.reusable_answers(&wanted, hour).await.unwrap(),
        [None, None, Some(source.id), Some(source.id)]
    );
    assert!(db
        .store
        .reusable_answers(&[], hour)
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        db.store
            .reusable_answer("acme", &hash, Duration::from_millis(5))
            .await
            .unwrap(),
        None,
        "too old for the window"
    );

    let outbox_before = db.store.outbox_len().await.unwrap();
    let mut hit = hashed_job("acme", "cache me");
    hit.notify_email = Some("ada@example.com".into());
    assert!(db
        .store
        .insert_answered(&hit, source.id, Reuse::Exact)
        .await
        .unwrap());
    let job = db.store.get_job("acme", hit.id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.result.unwrap()["content"], "cached words");
    assert_eq!(job.cached, Some(Reuse::Exact));
    assert_eq!(job.cost_usd, Some(0.0));
    let states: Vec<JobState> = db
        .store
        .events(hit.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(states, [JobState::Queued, JobState::Succeeded]);
    assert_pending_email(&db, hit.id, "ada@example.com").await;
    assert_eq!(
        db.store.outbox_len().await.unwrap(),
        outbox_before,
        "an answered job is not queued"
    );

    // Another tenant cannot borrow the answer, even knowing its id.
    let stranger = hashed_job("other", "cache me");
    assert!(!db
        .store
        .insert_answered(&stranger, source.id, Reuse::Exact)
        .await
        .unwrap());
    assert!(
        db.store.job(stranger.id).await.unwrap().is_none(),
        "nothing written"
    );
    finish(db).await;
}

async fn followers_of_a_dead_leader_fail_with_it_and_of_a_cancelled_one_run_alone(db: TestDb) {
    let writer = JobWriter::spawn(db.store.clone(), 1, 8);
    let leader = writer
        .insert(hashed_job("acme", "doomed"))
        .await
        .unwrap()
        .into_queued()
        .unwrap();
    let follower = hashed_job("acme", "doomed");
    let follower_id = follower.id;
    assert!(matches!(
        writer.insert(follower).await.unwrap(),
        Accepted::Attached { .. }
    ));
    let claim = db.store.claim(&leader.job, LEASE).await.unwrap().unwrap();
    let failure = Failure {
        error: "provider said 400".into(),
        endpoint: Some("e1".into()),
        throttled: false,
        status: None,
    };
    db.store
        .dead_letter(claim.id, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    let settled = db.store.settle_followers(100).await.unwrap();
    assert_eq!(settled.finished, [(follower_id, "acme".to_owned())]);
    assert!(settled.released.is_empty());
    let job = db.store.job(follower_id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    let error = job.error.unwrap();
    assert!(
        error.contains(&leader.job.request_id.to_string()) && error.contains("provider said 400"),
        "{error}"
    );
    assert!(
        db.store
            .settle_followers(100)
            .await
            .unwrap()
            .finished
            .is_empty(),
        "settled once"
    );

    let leader = writer
        .insert(hashed_job("acme", "changed my mind"))
        .await
        .unwrap()
        .into_queued()
        .unwrap();
    let follower = hashed_job("acme", "changed my mind");
    let follower_id = follower.id;
    assert!(matches!(
        writer.insert(follower).await.unwrap(),
        Accepted::Attached { .. }
    ));
    assert_eq!(
        db.store
            .cancel("acme", leader.job.request_id)
            .await
            .unwrap(),
        CancelOutcome::Cancelled
    );
    let settled = db.store.settle_followers(100).await.unwrap();
    assert!(settled.finished.is_empty());
    assert_eq!(settled.released.len(), 1);
    assert_eq!(settled.released[0].job.request_id, follower_id);
    let job = db.store.job(follower_id).await.unwrap().unwrap();
    assert_eq!((job.state, job.leader), (JobState::Queued, None));
    // The released job runs like any other.
    complete_with(&db, &settled.released[0], "ran alone").await;
    finish(db).await;
}

async fn lane_stats_and_positions_count_queued_leaders(db: TestDb) {
    let writer = JobWriter::spawn(db.store.clone(), 1, 8);
    let mut priority = Vec::new();
    for n in 0..3 {
        priority.push(
            writer
                .insert(new_job("acme", &format!("p{n}")))
                .await
                .unwrap()
                .into_queued()
                .unwrap(),
        );
    }
    let mut batch = new_job("acme", "b0");
    batch.lane = Lane::Batch;
    writer.insert(batch).await.unwrap();
    // A follower waits in no lane.
    writer.insert(hashed_job("acme", "lead")).await.unwrap();
    assert!(matches!(
        writer.insert(hashed_job("acme", "lead")).await.unwrap(),
        Accepted::Attached { .. }
    ));
    for (n, message) in priority.iter().enumerate() {
        let position = db
            .store
            .queue_position(Lane::Priority, message.job.request_id)
            .await
            .unwrap();
        assert_eq!(position, n as u64 + 1);
    }
    db.store
        .claim(&priority[0].job, LEASE)
        .await
        .unwrap()
        .unwrap();
    let stats = db.store.lane_stats(Duration::from_secs(60)).await.unwrap();
    let of = |lane| stats.iter().find(|s| s.lane == lane).cloned().unwrap();
    assert_eq!(
        (of(Lane::Priority).depth, of(Lane::Priority).started),
        (3, 1),
        "{stats:?}"
    );
    assert_eq!((of(Lane::Batch).depth, of(Lane::Batch).started), (1, 0));
    assert!(of(Lane::Priority).oldest.is_some());
    assert_eq!(
        db.store
            .queue_position(Lane::Priority, priority[2].job.request_id)
            .await
            .unwrap(),
        2
    );
    finish(db).await;
}

async fn semantic_candidates_are_the_tenants_recent_successes(db: TestDb) {
    let done = created(db.store.insert_job(&new_job("acme", "one")).await.unwrap());
    let pending = created(db.store.insert_job(&new_job("acme", "two")).await.unwrap());
    complete_with(&db, &done, "answer one").await;
    let vector = sluice_core_vector(&[1.0, 0.0]);
    for (message, tenant) in [(&done, "acme"), (&pending, "acme")] {
        db.store
            .put_semantic_entry(message.job.request_id, tenant, "default", &vector)
            .await
            .unwrap();
    }
    let hour = Duration::from_secs(3600);
    let found = db
        .store
        .semantic_candidates("acme", "default", hour, 10)
        .await
        .unwrap();
    assert_eq!(found.len(), 1, "only finished successes answer");
    assert_eq!(
        (found[0].job, found[0].embedding.clone()),
        (done.job.request_id, vector)
    );
    assert!(db
        .store
        .semantic_candidates("other", "default", hour, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(db
        .store
        .semantic_candidates("acme", "auto", hour, 10)
        .await
        .unwrap()
        .is_empty());
    finish(db).await;
}

fn sluice_core_vector(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

async fn admin_keys_stand_for_no_tenant_and_revoked_keys_for_nothing(db: TestDb) {
    let admin = db.store.create_admin_key("ops").await.unwrap();
    let tenant = db.store.create_api_key(&principal("acme")).await.unwrap();
    assert_eq!(
        db.store.admin_for_key(&admin).await.unwrap().as_deref(),
        Some("ops")
    );
    assert!(db.store.principal_for_key(&admin).await.unwrap().is_none());
    assert!(db.store.admin_for_key(&tenant).await.unwrap().is_none());
    assert!(db.store.principal_for_key(&tenant).await.unwrap().is_some());
    let keys = db.store.api_keys().await.unwrap();
    assert_eq!(keys.iter().filter(|k| k.admin).count(), 1);
    let acme = keys.iter().find(|k| !k.admin).unwrap();
    assert!(tenant.starts_with(&acme.prefix) && acme.revoked_at.is_none());
    assert!(db.store.revoke_api_key(acme.id).await.unwrap());
    assert!(!db.store.revoke_api_key(acme.id).await.unwrap(), "once");
    assert!(db.store.principal_for_key(&tenant).await.unwrap().is_none());
    finish(db).await;
}

async fn only_dead_jobs_are_purged_and_they_leave_nothing_behind(db: TestDb) {
    let mut job = new_job("acme", "doomed");
    job.notify_email = Some("ada@example.com".into());
    let message = created(db.store.insert_job(&job).await.unwrap());
    assert!(
        !db.store.purge_dead(job.id).await.unwrap(),
        "queued jobs stay"
    );
    let claim = db.store.claim(&message.job, LEASE).await.unwrap().unwrap();
    let failure = Failure {
        error: "bad".into(),
        endpoint: None,
        throttled: false,
        status: None,
    };
    db.store
        .dead_letter(claim.id, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    assert!(db.store.notification_for(job.id).await.unwrap().is_some());
    assert!(db.store.purge_dead(job.id).await.unwrap());
    assert!(db.store.job(job.id).await.unwrap().is_none());
    assert!(db.store.events(job.id).await.unwrap().is_empty());
    assert!(db.store.notification_for(job.id).await.unwrap().is_none());
    assert!(!db.store.purge_dead(job.id).await.unwrap());
    finish(db).await;
}

/// A `sslmode=require` URL gets an encrypted connection (RDS forces TLS), and the default
/// `prefer` takes TLS where the server offers it.
#[tokio::test]
async fn postgres_connections_use_tls_when_the_url_requires_it() {
    let base = std::env::var("SLUICE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let separator = if base.contains('?') { '&' } else { '?' };
    let store = sluice_store::Store::connect(&sluice_store::StoreConfig {
        url: format!("{base}{separator}sslmode=require"),
        migrate: false,
        ..sluice_store::StoreConfig::default()
    })
    .await
    .unwrap();
    let (ssl,): (bool,) =
        sqlx::query_as("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(store.pg_pool().unwrap())
            .await
            .unwrap();
    assert!(ssl, "the connection is not encrypted");
    store.close().await;
}

fn failure(error: &str, status: Option<u16>) -> Failure {
    Failure {
        error: error.into(),
        endpoint: Some("e1".into()),
        throttled: false,
        status,
    }
}

async fn error_status_is_stored_by_retry_later_and_dead_letter(db: TestDb) {
    let job = new_job("acme", "hi");
    let msg = created(db.store.insert_job(&job).await.unwrap());
    let claim = db.store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    assert_eq!(
        db.store.job(job.id).await.unwrap().unwrap().error_status,
        None
    );
    let retry = db
        .store
        .retry_later(
            job.id,
            claim.attempt,
            &failure("upstream 503", Some(503)),
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    let stored = db.store.job(job.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.error_status),
        (JobState::Retrying, Some(503))
    );
    let events = db.store.events(job.id).await.unwrap();
    assert_eq!(
        events.last().unwrap().detail.as_ref().unwrap()["status"],
        503
    );

    let claim = db.store.claim(&retry.job, LEASE).await.unwrap().unwrap();
    db.store
        .dead_letter(job.id, claim.attempt, &failure("bad request", Some(400)))
        .await
        .unwrap()
        .unwrap();
    let stored = db.store.get_job("acme", job.id).await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.error_status),
        (JobState::Dead, Some(400))
    );
    assert_eq!(stored.error.as_deref(), Some("bad request"));

    // A later success clears the failure's status with its error.
    let replayed = db.store.replay(job.id).await.unwrap().unwrap();
    complete_with(&db, &replayed, "fine now").await;
    let stored = db.store.job(job.id).await.unwrap().unwrap();
    assert_eq!((stored.error, stored.error_status), (None, None));
    finish(db).await;
}

async fn cancel_waiting_cancels_waiting_jobs_and_refuses_a_running_one(db: TestDb) {
    let queued = new_job("acme", "waiting");
    created(db.store.insert_job(&queued).await.unwrap());
    assert_eq!(
        db.store.cancel_waiting("other", queued.id).await.unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(
        db.store.cancel_waiting("acme", queued.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(
        db.store.cancel_waiting("acme", queued.id).await.unwrap(),
        CancelOutcome::Terminal(JobState::Cancelled)
    );
    let states: Vec<JobState> = db
        .store
        .events(queued.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(states, [JobState::Queued, JobState::Cancelled]);

    // A retrying job is waiting too.
    let (retrying, claim) = claimed_job_for(&db, None, LEASE).await;
    db.store
        .retry_later(retrying, claim.attempt, &failure("500", Some(500)), LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.store.cancel_waiting("acme", retrying).await.unwrap(),
        CancelOutcome::Cancelled
    );

    let (running, claim) = claimed_job_for(&db, None, LEASE).await;
    assert_eq!(
        db.store.cancel_waiting("acme", running).await.unwrap(),
        CancelOutcome::Running
    );
    let job = db.store.job(running).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Running, "a running job is left alone");
    assert!(db
        .store
        .complete(running, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap());
    assert_eq!(
        db.store.cancel_waiting("acme", running).await.unwrap(),
        CancelOutcome::Terminal(JobState::Succeeded)
    );
    finish(db).await;
}

async fn detached_jobs_are_reattached_once_or_cancelled_after_their_grace(db: TestDb) {
    let minute = Duration::from_secs(60);
    let held = new_job("acme", "held");
    created(db.store.insert_job(&held).await.unwrap());
    assert!(!db
        .store
        .detach("other", held.id, b"h1", minute)
        .await
        .unwrap());
    assert!(db
        .store
        .detach("acme", held.id, b"h1", minute)
        .await
        .unwrap());
    assert_eq!(
        db.store.reattach("other", b"h1", false).await.unwrap(),
        None
    );
    assert_eq!(db.store.reattach("acme", b"h2", false).await.unwrap(), None);
    assert_eq!(
        db.store.reattach("acme", b"h1", false).await.unwrap(),
        Some(held.id)
    );
    assert_eq!(
        db.store.reattach("acme", b"h1", false).await.unwrap(),
        None,
        "taken once"
    );

    // A job that finished after its client left is taken up only by that client's own retry
    // (`finished_too`), which then gets the answer instead of asking again.
    let (left, claim) = claimed_job_for(&db, None, LEASE).await;
    assert!(db.store.detach("acme", left, b"h4", minute).await.unwrap());
    db.store
        .complete(left, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap();
    assert_eq!(db.store.reattach("acme", b"h4", false).await.unwrap(), None);
    assert_eq!(
        db.store.reattach("acme", b"h4", true).await.unwrap(),
        Some(left)
    );

    // A terminal job cannot be detached.
    let (done, claim) = claimed_job_for(&db, None, LEASE).await;
    db.store
        .complete(done, claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap();
    assert!(!db.store.detach("acme", done, b"h3", minute).await.unwrap());

    // Past their grace: the waiting one is cancelled (with its email), the running one only
    // loses its hold, the one still within its grace stays.
    let mut waiting = new_job("acme", "gone");
    waiting.notify_email = Some("ada@example.com".into());
    created(db.store.insert_job(&waiting).await.unwrap());
    let (running, running_claim) = claimed_job_for(&db, None, LEASE).await;
    let patient = new_job("acme", "patient");
    created(db.store.insert_job(&patient).await.unwrap());
    let short = Duration::from_millis(1);
    assert!(db
        .store
        .detach("acme", waiting.id, b"w", short)
        .await
        .unwrap());
    assert!(db.store.detach("acme", running, b"r", short).await.unwrap());
    assert!(db
        .store
        .detach("acme", patient.id, b"p", minute)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(
        db.store.reattach("acme", b"w", false).await.unwrap(),
        None,
        "grace passed"
    );
    let cancelled = db.store.cancel_detached(100).await.unwrap();
    assert_eq!(cancelled, [(waiting.id, "acme".to_owned())]);
    let job = db.store.job(waiting.id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let events = db.store.events(waiting.id).await.unwrap();
    assert_eq!(events.last().unwrap().state, JobState::Cancelled);
    assert_pending_email(&db, waiting.id, "ada@example.com").await;
    assert_eq!(
        db.store.job(running).await.unwrap().unwrap().state,
        JobState::Running
    );
    assert!(
        db.store.cancel_detached(100).await.unwrap().is_empty(),
        "the running job's hold was cleared, the cancelled one is done"
    );
    assert!(db
        .store
        .complete(running, running_claim.attempt, &serde_json::json!({}), "e1")
        .await
        .unwrap());
    assert_eq!(
        db.store.job(patient.id).await.unwrap().unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        db.store.reattach("acme", b"p", false).await.unwrap(),
        Some(patient.id)
    );
    finish(db).await;
}

async fn concurrent_reattaches_take_a_job_once(db: TestDb) {
    let minute = Duration::from_secs(60);
    let mut ids = Vec::new();
    for n in 0..3 {
        let job = new_job("acme", &format!("held {n}"));
        created(db.store.insert_job(&job).await.unwrap());
        assert!(db
            .store
            .detach("acme", job.id, b"same", minute)
            .await
            .unwrap());
        ids.push(job.id);
    }
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            store.reattach("acme", b"same", false).await.unwrap()
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        if let Some(id) = task.await.unwrap() {
            taken.push(id);
        }
    }
    taken.sort();
    ids.sort();
    assert_eq!(taken, ids, "each held job went to exactly one caller");
    finish(db).await;
}

fn new_file(tenant: &str, purpose: &str) -> NewFile {
    NewFile {
        id: sluice_store::new_file_id(),
        tenant: tenant.into(),
        purpose: purpose.into(),
        filename: "input.jsonl".into(),
    }
}

/// Upload `chunks` as a whole file and finish it.
async fn uploaded(db: &TestDb, file: &NewFile, chunks: &[&[u8]]) -> sluice_store::FileRecord {
    db.store.begin_file(file).await.unwrap();
    for (seq, chunk) in chunks.iter().enumerate() {
        db.store
            .append_file_chunk(&file.id, seq as i32, chunk)
            .await
            .unwrap();
    }
    let bytes = chunks.iter().map(|c| c.len() as i64).sum();
    db.store
        .finish_file(&file.id, bytes, chunks.len() as i32)
        .await
        .unwrap()
}

/// A file's content, read chunk by chunk as the API streams it.
async fn content(db: &TestDb, id: &str) -> Vec<u8> {
    let mut all = Vec::new();
    for seq in 0..db.store.file_chunk_count(id).await.unwrap() {
        all.extend(db.store.file_chunk(id, seq).await.unwrap().unwrap());
    }
    all
}

async fn files_round_trip_in_chunks_behind_tenant_walls(db: TestDb) {
    let file = new_file("acme", "batch");
    db.store.begin_file(&file).await.unwrap();
    let chunks: [&[u8]; 3] = [b"{\"a\":1}\n", &[0u8, 255, 7, 8], b"{\"c\":3}\n"];
    for (seq, chunk) in chunks.iter().enumerate() {
        db.store
            .append_file_chunk(&file.id, seq as i32, chunk)
            .await
            .unwrap();
    }
    assert!(
        db.store.get_file("acme", &file.id).await.unwrap().is_none(),
        "an upload is invisible until finished"
    );
    let record = db.store.finish_file(&file.id, 20, 2).await.unwrap();
    assert_eq!(
        (record.bytes, record.lines, record.purpose.as_str()),
        (20, 2, "batch")
    );
    assert_eq!(
        db.store.get_file("acme", &file.id).await.unwrap(),
        Some(record.clone())
    );
    assert_eq!(db.store.file_chunk_count(&file.id).await.unwrap(), 3);
    assert_eq!(content(&db, &file.id).await, chunks.concat());
    assert_eq!(db.store.file_chunk(&file.id, 3).await.unwrap(), None);

    // A finished file takes no more chunks and cannot be finished again.
    let late = db.store.append_file_chunk(&file.id, 3, b"x").await;
    assert!(matches!(late, Err(sluice_store::StoreError::NotFound(_))));
    assert!(db.store.finish_file(&file.id, 1, 1).await.is_err());
    assert_eq!(db.store.file_chunk_count(&file.id).await.unwrap(), 3);

    // Another tenant sees nothing and deletes nothing.
    assert!(db
        .store
        .get_file("other", &file.id)
        .await
        .unwrap()
        .is_none());
    let (theirs, more) = db
        .store
        .list_files("other", None, None, 10, SortOrder::Desc)
        .await
        .unwrap();
    assert!(theirs.is_empty() && !more);
    assert!(!db.store.delete_file("other", &file.id).await.unwrap());
    assert!(db.store.get_file("acme", &file.id).await.unwrap().is_some());

    assert!(db.store.delete_file("acme", &file.id).await.unwrap());
    assert!(
        !db.store.delete_file("acme", &file.id).await.unwrap(),
        "once"
    );
    assert!(db.store.get_file("acme", &file.id).await.unwrap().is_none());
    assert_eq!(db.store.file_chunk_count(&file.id).await.unwrap(), 0);
    let (listed, _) = db
        .store
        .list_files("acme", None, None, 10, SortOrder::Asc)
        .await
        .unwrap();
    assert!(listed.is_empty());

    // An aborted upload leaves nothing behind.
    let aborted = new_file("acme", "batch");
    db.store.begin_file(&aborted).await.unwrap();
    db.store
        .append_file_chunk(&aborted.id, 0, b"half")
        .await
        .unwrap();
    assert!(db.store.abort_file(&aborted.id).await.unwrap());
    assert!(!db.store.abort_file(&aborted.id).await.unwrap());
    assert_eq!(db.store.file_chunk_count(&aborted.id).await.unwrap(), 0);
    assert!(db
        .store
        .append_file_chunk(&aborted.id, 1, b"rest")
        .await
        .is_err());
    finish(db).await;
}

async fn files_list_in_pages_both_ways_and_by_purpose(db: TestDb) {
    let mut ids = Vec::new();
    for n in 0..5 {
        let purpose = if n % 2 == 0 { "batch" } else { "batch_output" };
        let file = new_file("acme", purpose);
        uploaded(&db, &file, &[format!("line {n}\n").as_bytes()]).await;
        ids.push(file.id);
    }
    uploaded(&db, &new_file("other", "batch"), &[b"x\n"]).await;
    let page = |order, after: Option<String>, limit| {
        let store = db.store.clone();
        async move {
            let (files, more) = store
                .list_files("acme", None, after.as_deref(), limit, order)
                .await
                .unwrap();
            (files.into_iter().map(|f| f.id).collect::<Vec<_>>(), more)
        }
    };
    let (first, more) = page(SortOrder::Asc, None, 2).await;
    assert_eq!((first.as_slice(), more), (&ids[0..2], true));
    let (second, more) = page(SortOrder::Asc, first.last().cloned(), 2).await;
    assert_eq!((second.as_slice(), more), (&ids[2..4], true));
    let (third, more) = page(SortOrder::Asc, second.last().cloned(), 2).await;
    assert_eq!((third.as_slice(), more), (&ids[4..5], false));

    let newest: Vec<String> = ids.iter().rev().cloned().collect();
    let (first, more) = page(SortOrder::Desc, None, 3).await;
    assert_eq!((first.as_slice(), more), (&newest[0..3], true));
    let (second, more) = page(SortOrder::Desc, first.last().cloned(), 3).await;
    assert_eq!((second.as_slice(), more), (&newest[3..5], false));
    let (exact, more) = page(SortOrder::Desc, None, 5).await;
    assert_eq!(
        (exact.len(), more),
        (5, false),
        "a full last page has no more"
    );

    let (outputs, more) = db
        .store
        .list_files("acme", Some("batch_output"), None, 10, SortOrder::Asc)
        .await
        .unwrap();
    let outputs: Vec<String> = outputs.into_iter().map(|f| f.id).collect();
    assert_eq!(
        (outputs, more),
        (vec![ids[1].clone(), ids[3].clone()], false)
    );
    finish(db).await;
}

async fn stale_uploads_are_purged_and_live_ones_kept(db: TestDb) {
    let abandoned = new_file("acme", "batch");
    db.store.begin_file(&abandoned).await.unwrap();
    db.store
        .append_file_chunk(&abandoned.id, 0, b"lost")
        .await
        .unwrap();
    let slow = new_file("acme", "batch");
    db.store.begin_file(&slow).await.unwrap();
    let done = new_file("acme", "batch");
    uploaded(&db, &done, &[b"kept\n"]).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Still receiving chunks: not stale, however old.
    db.store
        .append_file_chunk(&slow.id, 0, b"still here")
        .await
        .unwrap();
    let purged = db
        .store
        .purge_stale_uploads(Duration::from_millis(200))
        .await
        .unwrap();
    assert_eq!(purged, 1);
    assert_eq!(db.store.file_chunk_count(&abandoned.id).await.unwrap(), 0);
    assert!(db
        .store
        .append_file_chunk(&abandoned.id, 1, b"too late")
        .await
        .is_err());
    db.store.append_file_chunk(&slow.id, 1, b"!").await.unwrap();
    db.store.finish_file(&slow.id, 11, 0).await.unwrap();
    assert_eq!(content(&db, &slow.id).await, b"still here!");
    assert!(db.store.get_file("acme", &done.id).await.unwrap().is_some());
    finish(db).await;
}

fn new_batch(tenant: &str, email: Option<&str>) -> NewBatch {
    NewBatch {
        id: sluice_store::new_batch_id(),
        tenant: tenant.into(),
        user: "u1".into(),
        tier: Tier::Pro,
        input_file_id: "file-input".into(),
        endpoint: "/v1/chat/completions".into(),
        completion_window: "24h".into(),
        metadata: Some(serde_json::json!({ "project": "x" })),
        expires_in: std::time::Duration::from_secs(24 * 3600),
        notify_email: email.map(str::to_owned),
    }
}

fn lines_for(tenant: &str, n: i32) -> Vec<BatchLine> {
    (1..=n)
        .map(|line| BatchLine {
            line,
            custom_id: format!("req-{line}"),
            job: NewJob {
                lane: Lane::Batch,
                ..new_job(tenant, &format!("line {line}"))
            },
        })
        .collect()
}

/// Rows in `table`, by raw SQL on either backend.
async fn rows_in(db: &TestDb, table: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table}");
    let (n,): (i64,) = match (db.store.pg_pool(), db.store.sqlite_pool()) {
        (Some(pool), _) => sqlx::query_as(&sql).fetch_one(pool).await.unwrap(),
        (None, Some(pool)) => sqlx::query_as(&sql).fetch_one(pool).await.unwrap(),
        (None, None) => unreachable!("a store has one backend"),
    };
    n
}

async fn a_batch_is_created_whole_with_its_jobs_outbox_rows_and_lines(db: TestDb) {
    // More lines than one statement takes, so the chunks meet in one transaction.
    let n = 2_500;
    let batch = new_batch("acme", None);
    let lines = lines_for("acme", n);
    let messages = db.store.create_batch(&batch, &lines).await.unwrap();
    assert_eq!(messages.len(), n as usize);
    assert!(messages
        .iter()
        .all(|m| m.lane == Lane::Batch && m.job.attempt == 0));
    assert_eq!(db.store.outbox_len().await.unwrap(), i64::from(n));
    assert_eq!(
        db.store.count_by_state().await.unwrap(),
        [(JobState::Queued, i64::from(n))]
    );
    assert_eq!(rows_in(&db, "job_events").await, i64::from(n));
    assert_eq!(rows_in(&db, "batch_lines").await, i64::from(n));

    let stored = db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.status, BatchStatus::InProgress);
    assert_eq!((stored.total, stored.completed, stored.failed), (n, 0, 0));
    assert_eq!(stored.in_progress_at, Some(stored.created_at));
    // One clock reading for both, so the SDK's `expires_at - created_at` is the window itself.
    assert_eq!(
        (stored.expires_at - stored.created_at).to_std().unwrap(),
        batch.expires_in
    );
    assert_eq!(stored.metadata, batch.metadata);
    assert_eq!(stored.locked_until, None);
    assert!(db
        .store
        .get_batch("other", &batch.id)
        .await
        .unwrap()
        .is_none());

    let first = db.store.batch_line_results(&batch.id, 0, 3).await.unwrap();
    let numbers: Vec<(i32, &str)> = first
        .iter()
        .map(|r| (r.line, r.custom_id.as_str()))
        .collect();
    assert_eq!(numbers, [(1, "req-1"), (2, "req-2"), (3, "req-3")]);
    assert_eq!(first[0].job_id, lines[0].job.id);
    assert_eq!(first[0].state, JobState::Queued);
    let last = db
        .store
        .batch_line_results(&batch.id, n - 2, 100)
        .await
        .unwrap();
    assert_eq!(last.iter().map(|r| r.line).collect::<Vec<_>>(), [n - 1, n]);
    // Each job is an ordinary job of the tenant.
    let job = db
        .store
        .get_job("acme", lines[9].job.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((job.lane, job.state), (Lane::Batch, JobState::Queued));
    assert_eq!(
        db.store.pending_batch_lines("acme").await.unwrap(),
        i64::from(n)
    );
    finish(db).await;
}

async fn a_failing_batch_creation_leaves_nothing(db: TestDb) {
    let existing = new_job("acme", "already here");
    created(db.store.insert_job(&existing).await.unwrap());
    let before = (
        db.store.outbox_len().await.unwrap(),
        rows_in(&db, "jobs").await,
        rows_in(&db, "job_events").await,
    );

    // The 1,500th line's job id is taken: the first 1,499 must not stay behind.
    let batch = new_batch("acme", None);
    let mut lines = lines_for("acme", 2_000);
    lines[1_499].job.id = existing.id;
    assert!(db.store.create_batch(&batch, &lines).await.is_err());
    assert!(db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .is_none());
    assert!(db.store.job(lines[0].job.id).await.unwrap().is_none());
    let after = (
        db.store.outbox_len().await.unwrap(),
        rows_in(&db, "jobs").await,
        rows_in(&db, "job_events").await,
    );
    assert_eq!(after, before);
    assert_eq!(rows_in(&db, "batch_lines").await, 0);
    assert_eq!(rows_in(&db, "batches").await, 0);

    // Refused before writing: a job twice, a line twice, another tenant's job.
    let mut twice = lines_for("acme", 3);
    twice[2].job.id = twice[0].job.id;
    let err = db
        .store
        .create_batch(&new_batch("acme", None), &twice)
        .await;
    assert!(
        matches!(err, Err(sluice_store::StoreError::Invalid(_))),
        "{err:?}"
    );
    let mut same_line = lines_for("acme", 3);
    same_line[2].line = 1;
    assert!(db
        .store
        .create_batch(&new_batch("acme", None), &same_line)
        .await
        .is_err());
    let mut foreign = lines_for("acme", 3);
    foreign[1] = lines_for("other", 1).remove(0);
    foreign[1].line = 2;
    assert!(db
        .store
        .create_batch(&new_batch("acme", None), &foreign)
        .await
        .is_err());
    // A batch id used twice.
    let first = new_batch("acme", None);
    db.store
        .create_batch(&first, &lines_for("acme", 2))
        .await
        .unwrap();
    let jobs_before = rows_in(&db, "jobs").await;
    assert!(db
        .store
        .create_batch(&first, &lines_for("acme", 2))
        .await
        .is_err());
    assert_eq!(rows_in(&db, "jobs").await, jobs_before);
    assert_eq!(rows_in(&db, "batches").await, 1);
    finish(db).await;
}

async fn batches_list_newest_first_within_their_tenant(db: TestDb) {
    let mut ids = Vec::new();
    for n in 0..5 {
        let batch = new_batch("acme", None);
        if n % 2 == 0 {
            db.store
                .create_batch(&batch, &lines_for("acme", 1))
                .await
                .unwrap();
        } else {
            let errors = serde_json::json!({
                "object": "list",
                "data": [{ "code": "invalid", "message": "bad line 1" }],
            });
            let failed = db.store.create_failed_batch(&batch, &errors).await.unwrap();
            assert_eq!(failed.status, BatchStatus::Failed);
            assert_eq!((failed.total, failed.errors), (0, Some(errors)));
            assert!(failed.failed_at.is_some() && failed.in_progress_at.is_none());
            assert_eq!(
                (failed.expires_at - failed.created_at).to_std().unwrap(),
                batch.expires_in
            );
        }
        ids.push(batch.id);
    }
    let theirs = new_batch("other", None);
    db.store
        .create_batch(&theirs, &lines_for("other", 1))
        .await
        .unwrap();
    ids.reverse();
    let page = |after: Option<String>| {
        let store = db.store.clone();
        async move {
            let (batches, more) = store
                .list_batches("acme", after.as_deref(), 2)
                .await
                .unwrap();
            (batches.into_iter().map(|b| b.id).collect::<Vec<_>>(), more)
        }
    };
    let (first, more) = page(None).await;
    assert_eq!((first.as_slice(), more), (&ids[0..2], true));
    let (second, more) = page(first.last().cloned()).await;
    assert_eq!((second.as_slice(), more), (&ids[2..4], true));
    let (third, more) = page(second.last().cloned()).await;
    assert_eq!((third.as_slice(), more), (&ids[4..5], false));
    let (other, more) = db.store.list_batches("other", None, 10).await.unwrap();
    assert_eq!((other.len(), more), (1, false));
    assert_eq!(
        db.store.cancel_batch("other", &ids[0]).await.unwrap(),
        CancelBatch::NotFound
    );
    assert!(db
        .store
        .get_batch("other", &ids[0])
        .await
        .unwrap()
        .is_none());
    finish(db).await;
}

async fn cancelling_a_batch_cancels_its_jobs_and_ends_it_cancelled(db: TestDb) {
    let batch = new_batch("acme", None);
    let lines = lines_for("acme", 4);
    let messages = db.store.create_batch(&batch, &lines).await.unwrap();
    // One line runs, one already succeeded.
    let running = db
        .store
        .claim(&messages[0].job, LEASE)
        .await
        .unwrap()
        .unwrap();
    complete_with(&db, &messages[1], "done early").await;
    // A finalizer holds the batch: a cancel must make it due at once all the same.
    let taken = db.store.take_due_batch(LEASE).await.unwrap().unwrap();
    assert_eq!(taken.id, batch.id);

    let CancelBatch::Cancelling(cancelling) =
        db.store.cancel_batch("acme", &batch.id).await.unwrap()
    else {
        panic!("an in-progress batch is cancelled");
    };
    assert_eq!(cancelling.status, BatchStatus::Cancelling);
    assert!(cancelling.cancelling_at.is_some() && cancelling.locked_until.is_none());
    let again = db.store.cancel_batch("acme", &batch.id).await.unwrap();
    assert!(matches!(again, CancelBatch::Cancelling(b) if b.status == BatchStatus::Cancelling));
    // A stale finalizer cannot move it on as if nothing happened.
    assert!(!db
        .store
        .set_batch_status(&batch.id, BatchStatus::Finalizing)
        .await
        .unwrap());
    let taken = db.store.take_due_batch(LEASE).await.unwrap().unwrap();
    assert_eq!(taken.status, BatchStatus::Cancelling);

    let mut cancelled = db.store.cancel_batch_jobs(&batch.id).await.unwrap();
    cancelled.sort();
    let mut expected: Vec<(RequestId, String)> = [0, 2, 3]
        .iter()
        .map(|&i| (lines[i].job.id, "acme".to_owned()))
        .collect();
    expected.sort();
    assert_eq!(cancelled, expected);
    assert!(db
        .store
        .cancel_batch_jobs(&batch.id)
        .await
        .unwrap()
        .is_empty());
    assert!(
        !db.store
            .complete(running.id, running.attempt, &serde_json::json!({}), "e1")
            .await
            .unwrap(),
        "the running line's answer is discarded"
    );
    let events = db.store.events(lines[2].job.id).await.unwrap();
    assert_eq!(events.last().unwrap().state, JobState::Cancelled);
    let progress = db.store.batch_progress(&batch.id).await.unwrap();
    assert_eq!(
        (
            progress.total,
            progress.succeeded,
            progress.cancelled,
            progress.pending
        ),
        (4, 1, 3, 0)
    );

    assert!(
        !db.store
            .finish_batch(&batch.id, BatchStatus::Completed, (1, 0), None, None)
            .await
            .unwrap(),
        "a batch being cancelled does not end completed"
    );
    assert!(db
        .store
        .finish_batch(&batch.id, BatchStatus::Cancelled, (1, 0), None, None)
        .await
        .unwrap());
    let ended = db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.status, BatchStatus::Cancelled);
    assert!(ended.cancelled_at.is_some() && ended.locked_until.is_none());
    assert_eq!(
        db.store.cancel_batch("acme", &batch.id).await.unwrap(),
        CancelBatch::AlreadyEnded(BatchStatus::Cancelled)
    );
    assert!(db.store.take_due_batch(LEASE).await.unwrap().is_none());
    finish(db).await;
}

async fn batch_progress_counts_its_jobs_as_they_move(db: TestDb) {
    let batch = new_batch("acme", None);
    let lines = lines_for("acme", 5);
    let messages = db.store.create_batch(&batch, &lines).await.unwrap();
    let progress = db.store.batch_progress(&batch.id).await.unwrap();
    assert_eq!((progress.total, progress.pending), (5, 5));

    complete_with(&db, &messages[0], "answer one").await;
    let claim = db
        .store
        .claim(&messages[1].job, LEASE)
        .await
        .unwrap()
        .unwrap();
    db.store
        .dead_letter(
            claim.id,
            claim.attempt,
            &failure("provider said 400", Some(400)),
        )
        .await
        .unwrap()
        .unwrap();
    db.store
        .claim(&messages[2].job, LEASE)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.store.cancel("acme", lines[3].job.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let progress = db.store.batch_progress(&batch.id).await.unwrap();
    assert_eq!(
        progress,
        sluice_store::BatchProgress {
            total: 5,
            succeeded: 1,
            failed: 1,
            cancelled: 1,
            pending: 2,
        }
    );

    let results = db.store.batch_line_results(&batch.id, 0, 10).await.unwrap();
    assert_eq!(results.len(), 5);
    assert_eq!(results[0].state, JobState::Succeeded);
    assert_eq!(results[0].result.as_ref().unwrap()["content"], "answer one");
    assert_eq!(
        (
            results[1].state,
            results[1].error.as_deref(),
            results[1].error_status
        ),
        (JobState::Dead, Some("provider said 400"), Some(400))
    );
    assert_eq!(results[2].state, JobState::Running);

    // The per-tenant cap counts what the finalizer has not counted yet.
    assert_eq!(db.store.pending_batch_lines("acme").await.unwrap(), 5);
    db.store.set_batch_counts(&batch.id, 1, 2).await.unwrap();
    assert_eq!(db.store.pending_batch_lines("acme").await.unwrap(), 2);
    assert_eq!(db.store.pending_batch_lines("other").await.unwrap(), 0);
    let stored = db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((stored.completed, stored.failed), (1, 2));

    // A dead line stays while its batch is open: the output will report it.
    assert!(!db.store.purge_dead(lines[1].job.id).await.unwrap());
    assert!(db
        .store
        .finish_batch(&batch.id, BatchStatus::Expired, (1, 2), None, None)
        .await
        .unwrap());
    assert_eq!(db.store.pending_batch_lines("acme").await.unwrap(), 0);
    assert!(db.store.purge_dead(lines[1].job.id).await.unwrap());
    assert_eq!(
        db.store.batch_progress(&batch.id).await.unwrap().total,
        4,
        "the purged job took its line with it"
    );
    finish(db).await;
}

async fn concurrent_finalizers_never_take_the_same_batch(db: TestDb) {
    let mut ids = Vec::new();
    for _ in 0..6 {
        let batch = new_batch("acme", None);
        db.store
            .create_batch(&batch, &lines_for("acme", 1))
            .await
            .unwrap();
        ids.push(batch.id);
    }
    // Ended batches are never taken.
    db.store
        .create_failed_batch(&new_batch("acme", None), &serde_json::json!({}))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move {
            let mut taken = Vec::new();
            while let Some(batch) = store.take_due_batch(Duration::from_secs(60)).await.unwrap() {
                assert!(batch.locked_until.is_some());
                taken.push(batch.id);
            }
            taken
        }));
    }
    let mut taken = Vec::new();
    for task in tasks {
        taken.extend(task.await.unwrap());
    }
    taken.sort();
    assert_eq!(taken, ids, "every open batch taken exactly once");
    assert!(db.store.take_due_batch(LEASE).await.unwrap().is_none());
    // Released with no delay, a batch is due again; with one, it is not.
    db.store
        .release_batch(&ids[2], Duration::ZERO)
        .await
        .unwrap();
    db.store.release_batch(&ids[3], LEASE).await.unwrap();
    let again = db.store.take_due_batch(LEASE).await.unwrap().unwrap();
    assert_eq!(again.id, ids[2]);
    assert!(db.store.take_due_batch(LEASE).await.unwrap().is_none());
    finish(db).await;
}

async fn finishing_a_batch_is_fenced_and_queues_one_email(db: TestDb) {
    let batch = new_batch("acme", Some("ada@example.com"));
    let messages = db
        .store
        .create_batch(&batch, &lines_for("acme", 2))
        .await
        .unwrap();
    complete_with(&db, &messages[0], "one").await;
    let claim = db
        .store
        .claim(&messages[1].job, LEASE)
        .await
        .unwrap()
        .unwrap();
    db.store
        .dead_letter(claim.id, claim.attempt, &failure("bad", Some(422)))
        .await
        .unwrap()
        .unwrap();
    let taken = db.store.take_due_batch(LEASE).await.unwrap().unwrap();
    assert!(db
        .store
        .set_batch_status(&taken.id, BatchStatus::Finalizing)
        .await
        .unwrap());
    let finalizing = db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(finalizing.status, BatchStatus::Finalizing);
    assert!(finalizing.finalizing_at.is_some());
    assert!(
        finalizing.locked_until.is_some(),
        "the finalizer keeps its hold"
    );
    assert_eq!(
        db.store.cancel_batch("acme", &batch.id).await.unwrap(),
        CancelBatch::AlreadyEnded(BatchStatus::Finalizing)
    );

    // The finalizer writes both files as uploads; they appear with the batch's end.
    let output = new_file("acme", "batch_output");
    let errors = new_file("acme", "batch_output");
    for (file, text) in [(&output, "{\"ok\":1}\n"), (&errors, "{\"err\":1}\n")] {
        db.store.begin_file(file).await.unwrap();
        db.store
            .append_file_chunk(&file.id, 0, text.as_bytes())
            .await
            .unwrap();
    }
    assert!(db
        .store
        .get_file("acme", &output.id)
        .await
        .unwrap()
        .is_none());
    let finished_output = FinishedFile {
        id: output.id.clone(),
        bytes: 9,
        lines: 1,
    };
    let finished_errors = FinishedFile {
        id: errors.id.clone(),
        bytes: 10,
        lines: 1,
    };
    // An upload of another tenant cannot be passed off as the batch's output.
    let foreign = new_file("other", "batch_output");
    db.store.begin_file(&foreign).await.unwrap();
    let stolen = FinishedFile {
        id: foreign.id.clone(),
        bytes: 0,
        lines: 0,
    };
    assert!(db
        .store
        .finish_batch(
            &batch.id,
            BatchStatus::Completed,
            (1, 1),
            Some(&stolen),
            None
        )
        .await
        .is_err());
    assert_eq!(
        db.store
            .get_batch("acme", &batch.id)
            .await
            .unwrap()
            .unwrap()
            .status,
        BatchStatus::Finalizing,
        "a failed finish changes nothing"
    );
    assert!(db
        .store
        .batch_notification(&batch.id)
        .await
        .unwrap()
        .is_none());
    assert!(
        db.store
            .finish_batch(&batch.id, BatchStatus::Finalizing, (1, 1), None, None)
            .await
            .is_err(),
        "finalizing is not an end"
    );

    assert!(db
        .store
        .finish_batch(
            &batch.id,
            BatchStatus::Completed,
            (1, 1),
            Some(&finished_output),
            Some(&finished_errors)
        )
        .await
        .unwrap());
    let ended = db
        .store
        .get_batch("acme", &batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ended.status, BatchStatus::Completed);
    assert_eq!((ended.completed, ended.failed), (1, 1));
    assert_eq!(ended.output_file_id.as_deref(), Some(output.id.as_str()));
    assert_eq!(ended.error_file_id.as_deref(), Some(errors.id.as_str()));
    assert!(ended.completed_at.is_some() && ended.locked_until.is_none());
    let file = db
        .store
        .get_file("acme", &output.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((file.bytes, file.lines), (9, 1));
    assert_eq!(content(&db, &errors.id).await, b"{\"err\":1}\n");

    // Fenced: a stale finalizer's second end changes nothing and queues no second email.
    assert!(!db
        .store
        .finish_batch(&batch.id, BatchStatus::Expired, (0, 2), None, None)
        .await
        .unwrap());
    assert!(!db
        .store
        .set_batch_status(&batch.id, BatchStatus::Cancelled)
        .await
        .unwrap());
    let row = db
        .store
        .batch_notification(&batch.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (row.email.as_str(), row.batch_id.as_deref(), row.request_id),
        ("ada@example.com", Some(batch.id.as_str()), None)
    );
    assert_eq!(
        rows_in(&db, "notifications").await,
        1,
        "one email for the batch, none for its lines"
    );
    let claimed = db.store.claim_notifications(10, LEASE).await.unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].created_at, ended.created_at);
    assert_eq!(
        claimed[0].subject,
        NotificationSubject::Batch {
            batch_id: batch.id.clone(),
            status: BatchStatus::Completed,
            total: 2,
            completed: 1,
            failed: 1,
            output_file_id: Some(output.id.clone()),
            error_file_id: Some(errors.id.clone()),
            errors: None,
            finished_at: ended.completed_at,
        }
    );
    finish(db).await;
}

/// An [`Announce`] hook that writes down what it hears.
#[derive(Default)]
struct Heard(std::sync::Mutex<Vec<(RequestId, String)>>);

impl Announce for Heard {
    fn changed(&self, id: RequestId, tenant: &str) {
        self.0.lock().unwrap().push((id, tenant.to_owned()));
    }
}

impl Heard {
    /// What was announced since the last call, sorted.
    fn take(&self) -> Vec<(RequestId, String)> {
        let mut heard = std::mem::take(&mut *self.0.lock().unwrap());
        heard.sort();
        heard
    }
}

/// A clone of the test's store that announces to a fresh [`Heard`].
fn announcing(db: &TestDb) -> (sluice_store::Store, std::sync::Arc<Heard>) {
    let heard = std::sync::Arc::new(Heard::default());
    (db.store.clone().announcing(heard.clone()), heard)
}

fn each(tenant: &str, ids: &[RequestId]) -> Vec<(RequestId, String)> {
    let mut jobs: Vec<_> = ids.iter().map(|id| (*id, tenant.to_owned())).collect();
    jobs.sort();
    jobs
}

async fn every_change_to_a_job_is_announced_once_with_its_tenant(db: TestDb) {
    let (store, heard) = announcing(&db);
    assert!(heard.take().is_empty());

    // Ingest: a new job is announced; the same idempotency key again, or a conflict, is not.
    let mut job = new_job("acme", "hi");
    job.idempotency = Some(("k1".into(), vec![1]));
    let msg = created(store.insert_job(&job).await.unwrap());
    assert_eq!(heard.take(), each("acme", &[job.id]));
    assert!(matches!(
        store.insert_job(&job).await.unwrap(),
        Ingested::Existing(_)
    ));
    let mut conflict = new_job("acme", "other");
    conflict.idempotency = Some(("k1".into(), vec![2]));
    assert!(matches!(
        store.insert_job(&conflict).await.unwrap(),
        Ingested::Conflict
    ));
    assert!(heard.take().is_empty(), "nothing changed");
    // A clone of the announcing store announces too; the store it was made from does not.
    let (a, b) = (new_job("acme", "a"), new_job("beta", "b"));
    let accepted = store
        .clone()
        .insert_jobs(&[a.clone(), b.clone()])
        .await
        .unwrap();
    let mut both = vec![(a.id, "acme".to_owned()), (b.id, "beta".to_owned())];
    both.sort();
    assert_eq!(heard.take(), both);
    created(
        db.store
            .insert_job(&new_job("acme", "quiet"))
            .await
            .unwrap(),
    );
    assert!(heard.take().is_empty());

    // Claims: a claim is announced, a stale message is not; heartbeats change no state.
    let claim = store.claim(&msg.job, LEASE).await.unwrap().unwrap();
    assert_eq!(heard.take(), each("acme", &[job.id]));
    assert!(store.claim(&msg.job, LEASE).await.unwrap().is_none());
    store
        .heartbeat(&[(job.id, claim.attempt)], LEASE)
        .await
        .unwrap();
    assert!(heard.take().is_empty());
    let messages: Vec<_> = accepted
        .into_iter()
        .map(|a| a.unwrap().into_queued().unwrap())
        .collect();
    let refs: Vec<JobRef> = messages.iter().map(|m| m.job.clone()).collect();
    let claims = store.claim_many(&refs, LEASE).await.unwrap();
    assert_eq!(heard.take(), both);

    // Retry, dead-letter and replay, each announced; a stale attempt changes nothing.
    let failure = failure("provider returned 500", Some(500));
    store
        .retry_later(job.id, claim.attempt, &failure, Duration::ZERO)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(heard.take(), each("acme", &[job.id]));
    assert!(store
        .dead_letter(job.id, claim.attempt, &failure)
        .await
        .unwrap()
        .is_none());
    assert!(heard.take().is_empty());
    let retry = db.store.job(job.id).await.unwrap().unwrap();
    let again = JobRef {
        attempt: retry.attempt,
        ..msg.job.clone()
    };
    let claim = store.claim(&again, LEASE).await.unwrap().unwrap();
    heard.take();
    store
        .dead_letter(job.id, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(heard.take(), each("acme", &[job.id]));
    let replayed = store.replay(job.id).await.unwrap().unwrap();
    assert_eq!(heard.take(), each("acme", &[job.id]));
    assert!(store.replay(job.id).await.unwrap().is_none());
    assert!(heard.take().is_empty());

    // Completion: announced once; a second or stale completion is not.
    let (a_claim, b_claim) = (claims[0].clone().unwrap(), claims[1].clone().unwrap());
    let result = serde_json::json!({ "content": "x" });
    assert!(store
        .complete(a.id, a_claim.attempt, &result, "e1")
        .await
        .unwrap());
    assert!(!store
        .complete(a.id, a_claim.attempt, &result, "e1")
        .await
        .unwrap());
    assert_eq!(heard.take(), each("acme", &[a.id]));

    // Cancels: a waiting or running job is announced, a terminal one or a refused one not.
    assert_eq!(
        store.cancel_waiting("beta", b.id).await.unwrap(),
        CancelOutcome::Running
    );
    assert!(heard.take().is_empty());
    assert_eq!(
        store.cancel("beta", b.id).await.unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(heard.take(), each("beta", &[b.id]));
    assert!(!store
        .complete(b.id, b_claim.attempt, &result, "e1")
        .await
        .unwrap());
    assert_eq!(
        store.cancel("acme", a.id).await.unwrap(),
        CancelOutcome::Terminal(JobState::Succeeded)
    );
    assert_eq!(
        store
            .cancel_waiting("acme", replayed.job.request_id)
            .await
            .unwrap(),
        CancelOutcome::Cancelled
    );
    assert_eq!(heard.take(), each("acme", &[job.id]));

    // Detached jobs: detaching and taking back change no state; the sweep's cancels are
    // announced, the holds it only clears are not.
    let minute = Duration::from_secs(60);
    let held = new_job("acme", "held");
    created(store.insert_job(&held).await.unwrap());
    heard.take();
    assert!(store.detach("acme", held.id, b"h1", minute).await.unwrap());
    assert_eq!(
        store.reattach("acme", b"h1", false).await.unwrap(),
        Some(held.id)
    );
    assert!(store
        .detach("acme", held.id, b"h1", Duration::ZERO)
        .await
        .unwrap());
    let (running, _) = claimed_job_for(&db, None, LEASE).await;
    assert!(store
        .detach("acme", running, b"h2", Duration::ZERO)
        .await
        .unwrap());
    assert!(heard.take().is_empty());
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store.cancel_detached(10).await.unwrap(),
        [(held.id, "acme".to_owned())]
    );
    assert_eq!(heard.take(), each("acme", &[held.id]));

    // The reaper: each job it moves, to retry or to dead, is announced.
    let (lost, _) = claimed_job_for(&db, None, Duration::from_millis(10)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let reaped = store.reap_expired(5, 100).await.unwrap();
    assert_eq!(reaped.len(), 1);
    assert_eq!(heard.take(), each("acme", &[lost]));
    assert!(store.reap_expired(5, 100).await.unwrap().is_empty());

    // Purging a dead job removes it and its log: there is nothing new to read, no announcement.
    let (doomed, claim) = claimed_job_for(&db, None, LEASE).await;
    store
        .dead_letter(doomed, claim.attempt, &failure)
        .await
        .unwrap()
        .unwrap();
    heard.take();
    assert!(store.purge_dead(doomed).await.unwrap());
    assert!(heard.take().is_empty());
    finish(db).await;
}

async fn followers_and_answered_jobs_are_announced_with_the_jobs_that_settle_them(db: TestDb) {
    let (store, heard) = announcing(&db);
    let writer = JobWriter::spawn(store.clone(), 1, 8);
    // A follower is announced when attached, and again when its leader's completion answers it.
    let leader = writer
        .insert(hashed_job("acme", "same"))
        .await
        .unwrap()
        .into_queued()
        .unwrap();
    let follower = hashed_job("acme", "same");
    let follower_id = follower.id;
    assert!(matches!(
        writer.insert(follower).await.unwrap(),
        Accepted::Attached { .. }
    ));
    let leader_id = leader.job.request_id;
    assert_eq!(heard.take(), each("acme", &[leader_id, follower_id]));
    let claim = store.claim(&leader.job, LEASE).await.unwrap().unwrap();
    heard.take();
    let done = store
        .complete_many(&[sluice_store::Completion {
            id: claim.id,
            attempt: claim.attempt,
            result: serde_json::json!({ "content": "shared" }),
            endpoint: "e1".into(),
            cost_usd: None,
        }])
        .await
        .unwrap();
    assert_eq!(done, [true]);
    assert_eq!(heard.take(), each("acme", &[leader_id, follower_id]));

    // An answer reused from a finished job: the new job is announced, a refused reuse not.
    let hit = new_job("acme", "again");
    assert!(store
        .insert_answered(&hit, leader_id, Reuse::Exact)
        .await
        .unwrap());
    assert_eq!(heard.take(), each("acme", &[hit.id]));
    let stranger = new_job("other", "again");
    assert!(!store
        .insert_answered(&stranger, leader_id, Reuse::Exact)
        .await
        .unwrap());
    assert!(heard.take().is_empty());

    // Settling: a follower of a dead leader takes its end and is announced; a follower of a
    // cancelled leader is only released into a lane (no new state or event), not announced.
    let doomed = writer
        .insert(hashed_job("acme", "doomed"))
        .await
        .unwrap()
        .into_queued()
        .unwrap();
    let dead_follower = hashed_job("acme", "doomed");
    let dead_follower_id = dead_follower.id;
    writer.insert(dead_follower).await.unwrap();
    let claim = store.claim(&doomed.job, LEASE).await.unwrap().unwrap();
    store
        .dead_letter(claim.id, claim.attempt, &failure("400", Some(400)))
        .await
        .unwrap()
        .unwrap();
    let dropped = writer
        .insert(hashed_job("acme", "dropped"))
        .await
        .unwrap()
        .into_queued()
        .unwrap();
    writer.insert(hashed_job("acme", "dropped")).await.unwrap();
    store.cancel("acme", dropped.job.request_id).await.unwrap();
    heard.take();
    let settled = store.settle_followers(100).await.unwrap();
    assert_eq!(settled.finished, [(dead_follower_id, "acme".to_owned())]);
    assert_eq!(settled.released.len(), 1);
    assert_eq!(heard.take(), each("acme", &[dead_follower_id]));
    finish(db).await;
}

async fn batch_lines_are_announced_when_created_and_when_cancelled(db: TestDb) {
    let (store, heard) = announcing(&db);
    let batch = new_batch("acme", None);
    let lines = lines_for("acme", 3);
    let ids: Vec<RequestId> = lines.iter().map(|l| l.job.id).collect();
    let messages = store.create_batch(&batch, &lines).await.unwrap();
    assert_eq!(heard.take(), each("acme", &ids));
    // A refused batch has no jobs; cancelling a batch changes the batch, not yet its jobs.
    store
        .create_failed_batch(&new_batch("acme", None), &serde_json::json!({ "data": [] }))
        .await
        .unwrap();
    assert!(matches!(
        store.cancel_batch("acme", &batch.id).await.unwrap(),
        CancelBatch::Cancelling(_)
    ));
    assert!(heard.take().is_empty());
    complete_with(&db, &messages[0], "done early").await;
    let cancelled = store.cancel_batch_jobs(&batch.id).await.unwrap();
    assert_eq!(cancelled.len(), 2);
    assert_eq!(heard.take(), each("acme", &ids[1..]));
    assert!(store.cancel_batch_jobs(&batch.id).await.unwrap().is_empty());
    assert!(heard.take().is_empty());
    finish(db).await;
}

async fn waiting_jobs_with_no_outbox_row_are_republished_once_per_wait(db: TestDb) {
    let failure = Failure {
        error: "provider returned 500".into(),
        endpoint: None,
        throttled: false,
        status: None,
    };
    let queued = created(
        db.store
            .insert_job(&new_job("acme", "queued"))
            .await
            .unwrap(),
    );
    let unpublished = created(
        db.store
            .insert_job(&new_job("acme", "outbox"))
            .await
            .unwrap(),
    );
    let retried = created(
        db.store
            .insert_job(&new_job("acme", "retried"))
            .await
            .unwrap(),
    );
    let running = created(
        db.store
            .insert_job(&new_job("acme", "running"))
            .await
            .unwrap(),
    );
    let claim = db.store.claim(&retried.job, LEASE).await.unwrap().unwrap();
    let retry = db
        .store
        .retry_later(
            retried.job.request_id,
            claim.attempt,
            &failure,
            Duration::ZERO,
        )
        .await
        .unwrap()
        .unwrap();
    db.store.claim(&running.job, LEASE).await.unwrap().unwrap();
    // Every message but `unpublished`'s reached the broker; then all of them got lost.
    db.store
        .mark_published(&[
            queued.outbox_id,
            retried.outbox_id,
            retry.outbox_id,
            running.outbox_id,
        ])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;

    // Too young for a wait of a minute: nothing.
    let minute = Duration::from_secs(60);
    assert!(db
        .store
        .republish_waiting(Lane::Priority, minute, 10)
        .await
        .unwrap()
        .is_empty());
    let second = Duration::from_secs(1);
    let lane = db
        .store
        .republish_waiting(Lane::Priority, second, 10)
        .await
        .unwrap();
    let ids: Vec<RequestId> = lane.iter().map(|m| m.job.request_id).collect();
    // Not the one whose outbox row the relay still owes, nor the running or retrying ones.
    assert_eq!(ids, [queued.job.request_id]);
    assert_eq!((lane[0].lane, lane[0].job.attempt), (Lane::Priority, 0));
    let again = db
        .store
        .republish_waiting(Lane::Retry, second, 10)
        .await
        .unwrap();
    let ids: Vec<(RequestId, i32)> = again
        .iter()
        .map(|m| (m.job.request_id, m.job.attempt))
        .collect();
    assert_eq!(ids, [(retried.job.request_id, 1)]);
    assert_eq!(again[0].lane, Lane::Retry);
    assert!(db
        .store
        .republish_waiting(Lane::Batch, second, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(db
        .store
        .republish_waiting(Lane::Dead, second, 10)
        .await
        .unwrap()
        .is_empty());

    // Queued in the outbox, the fresh messages are not taken again; published, the jobs'
    // waits start over, so not again within the next second either.
    assert!(db
        .store
        .republish_waiting(Lane::Priority, second, 10)
        .await
        .unwrap()
        .is_empty());
    let fresh: Vec<i64> = lane.iter().chain(&again).map(|m| m.outbox_id).collect();
    db.store.mark_published(&fresh).await.unwrap();
    assert!(db
        .store
        .republish_waiting(Lane::Priority, second, 10)
        .await
        .unwrap()
        .is_empty());
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        db.store
            .republish_waiting(Lane::Priority, second, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // The copy and the original carry one attempt: whichever comes first runs, once.
    assert!(db.store.claim(&lane[0].job, LEASE).await.unwrap().is_some());
    assert!(db.store.claim(&queued.job, LEASE).await.unwrap().is_none());
    let events = db.store.events(queued.job.request_id).await.unwrap();
    assert_eq!(events.len(), 2, "republishing writes no event");
    assert_eq!(
        db.store
            .job(unpublished.job.request_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        JobState::Queued
    );
    finish(db).await;
}

async fn a_broker_dead_letter_ends_only_a_job_still_waiting_at_its_attempt(db: TestDb) {
    let mut job = new_job("acme", "poison");
    job.notify_email = Some("a@example.org".into());
    let waiting = created(db.store.insert_job(&job).await.unwrap());
    let ran = created(db.store.insert_job(&new_job("acme", "ran")).await.unwrap());
    db.store.claim(&ran.job, LEASE).await.unwrap().unwrap();

    // A running job (claimed under a newer attempt) is not the message's to end.
    assert!(!db
        .store
        .dead_lettered_by_broker(&ran.job, "gave up")
        .await
        .unwrap());
    assert_eq!(
        db.store
            .job(ran.job.request_id)
            .await
            .unwrap()
            .unwrap()
            .state,
        JobState::Running
    );

    assert!(db
        .store
        .dead_lettered_by_broker(&waiting.job, "gave up")
        .await
        .unwrap());
    let dead = db.store.job(job.id).await.unwrap().unwrap();
    assert_eq!(
        (dead.state, dead.error.as_deref()),
        (JobState::Dead, Some("gave up"))
    );
    assert!(dead.finished_at.is_some());
    let states: Vec<JobState> = db
        .store
        .events(job.id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(states, [JobState::Queued, JobState::Dead]);
    assert_eq!(db.store.dead_jobs(10).await.unwrap().len(), 1);
    // Twice (a duplicate in the dead lane) changes nothing more.
    assert!(!db
        .store
        .dead_lettered_by_broker(&waiting.job, "gave up")
        .await
        .unwrap());
    assert_eq!(db.store.events(job.id).await.unwrap().len(), 2);
    let mail = db.store.claim_notifications(10, LEASE).await.unwrap();
    assert_eq!(mail.len(), 1, "its email is queued once");
    finish(db).await;
}

async fn a_shared_value_is_made_once_and_read_by_everyone_after(db: TestDb) {
    let first = db
        .store
        .shared_value("mail.link_secret", "one")
        .await
        .unwrap();
    assert_eq!(first, "one");
    let second = db
        .store
        .shared_value("mail.link_secret", "two")
        .await
        .unwrap();
    assert_eq!(second, "one", "the first value stays");
    let other = db
        .store
        .shared_value("something.else", "three")
        .await
        .unwrap();
    assert_eq!(other, "three");
    // Racing processes all get the value that won.
    let racers = (0..8).map(|i| {
        let store = db.store.clone();
        async move {
            store
                .shared_value("raced", &format!("racer {i}"))
                .await
                .unwrap()
        }
    });
    let values = futures::future::join_all(racers).await;
    assert!(values.windows(2).all(|w| w[0] == w[1]), "{values:?}");
    finish(db).await;
}
