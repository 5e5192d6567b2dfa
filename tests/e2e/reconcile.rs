//! The database is the truth about which jobs wait: a job whose lane message vanished behind
//! Sluice's back still runs once, and a message the broker dead-lettered by itself ends its job.

use crate::helpers::{spawn_app, AppOptions, Queue, TestApp};
use futures::StreamExt;
use sluice_broker::{Broker, PublishOptions};
use sluice_core::{JobState, Lane, RequestId, Tier};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn a_job_whose_rabbitmq_message_vanished_still_runs_once() {
    a_job_whose_message_vanished_still_runs_once(Queue::Rabbitmq).await;
}

#[tokio::test]
async fn a_job_whose_sqs_message_vanished_still_runs_once() {
    a_job_whose_message_vanished_still_runs_once(Queue::Sqs).await;
}

#[tokio::test]
async fn a_job_whose_sql_postgres_message_vanished_still_runs_once() {
    a_job_whose_message_vanished_still_runs_once(Queue::SqlPostgres).await;
}

#[tokio::test]
async fn a_job_whose_sqlite_message_vanished_still_runs_once() {
    a_job_whose_message_vanished_still_runs_once(Queue::Sqlite).await;
}

#[tokio::test]
async fn a_message_rabbitmq_dead_letters_ends_its_job() {
    a_message_the_broker_dead_letters_ends_its_job(Queue::Rabbitmq).await;
}

#[tokio::test]
async fn a_message_sqs_dead_letters_ends_its_job() {
    a_message_the_broker_dead_letters_ends_its_job(Queue::Sqs).await;
}

#[tokio::test]
async fn a_message_the_sql_postgres_queue_dead_letters_ends_its_job() {
    a_message_the_broker_dead_letters_ends_its_job(Queue::SqlPostgres).await;
}

#[tokio::test]
async fn a_message_the_sqlite_queue_dead_letters_ends_its_job() {
    a_message_the_broker_dead_letters_ends_its_job(Queue::Sqlite).await;
}

/// Two jobs are submitted with no worker running; one's message is taken out of its lane
/// and acknowledged by a stranger. Once a worker runs, the other completes at once, and the
/// reconciler publishes the lost one again after `reconcile_after_secs`: it runs exactly once.
async fn a_job_whose_message_vanished_still_runs_once(queue: Queue) {
    let mut app = spawn_app(AppOptions {
        queue,
        workers: 0,
        reconcile_after_secs: 2.0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let lost = app.submit(&key, "my message will vanish").await;
    let kept = app.submit(&key, "my message stays").await;
    let lanes = app.lanes().await;
    let lane = app.store.job(lost).await.unwrap().unwrap().lane;
    take_message_of(&app, &lanes, lane, lost).await;

    app.start_worker().await;
    app.wait_terminal(&[lost, kept], Duration::from_secs(60))
        .await;
    for id in [lost, kept] {
        let job = app.store.job(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{id}: {:?}", job.error);
        assert_eq!(job.attempt, 1, "{id} was claimed more than once");
        assert_eq!(app.sim.calls_for_job(&id.to_string()), 1, "{id}");
    }
    app.cleanup().await;
}

/// A job's message reaches the dead lane without Sluice putting it there (as SQS's redrive
/// policy or the SQL queue's receive limit do): once a worker runs, the job is `dead` with the
/// broker's reason, runs never, and asked no provider.
async fn a_message_the_broker_dead_letters_ends_its_job(queue: Queue) {
    let mut app = spawn_app(AppOptions {
        queue,
        workers: 0,
        ..Default::default()
    })
    .await;
    let key = app.key("acme", Tier::Pro).await;
    let id = app.submit(&key, "my message will be dead-lettered").await;
    let lanes = app.lanes().await;
    let lane = app.store.job(id).await.unwrap().unwrap().lane;
    let message = take_message_of(&app, &lanes, lane, id).await;
    lanes
        .publish(
            Lane::Dead,
            &message,
            PublishOptions::reason("received 5 times without an ack"),
        )
        .await
        .unwrap();

    app.start_worker().await;
    app.wait_terminal(&[id], Duration::from_secs(30)).await;
    let job = app.store.job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Dead);
    assert_eq!(
        job.error.as_deref(),
        Some("received 5 times without an ack")
    );
    assert_eq!(job.attempt, 0, "a dead-lettered job is not run");
    assert_eq!(app.sim.calls_for_job(&id.to_string()), 0);
    let states: Vec<JobState> = app
        .store
        .events(id)
        .await
        .unwrap()
        .iter()
        .map(|e| e.state)
        .collect();
    assert_eq!(states, [JobState::Queued, JobState::Dead]);
    app.cleanup().await;
}

/// Take `id`'s message out of `lane` and acknowledge it, as a stranger with the broker's
/// credentials would; messages of other jobs go back. Returns the message taken.
async fn take_message_of(
    app: &TestApp,
    lanes: &Arc<dyn Broker>,
    lane: Lane,
    id: RequestId,
) -> sluice_core::JobRef {
    app.wait_for(
        "the job's message to leave the outbox",
        Duration::from_secs(10),
        || async { app.store.outbox_len().await.unwrap() == 0 },
    )
    .await;
    let mut consumer = lanes.consume(lane, 10).await.unwrap();
    let mut others = Vec::new();
    let taken = loop {
        let delivery = tokio::time::timeout(Duration::from_secs(15), consumer.next())
            .await
            .expect("the job's message is in its lane")
            .expect("the lane's consumer ended")
            .unwrap();
        if delivery.job.request_id == id {
            let job = delivery.job.clone();
            delivery.ack().await.unwrap();
            break job;
        }
        others.push(delivery);
    };
    for other in others {
        other.nack(true).await.unwrap();
    }
    drop(consumer);
    taken
}
