//! The durable floor: what any design that keeps jobs in PostgreSQL and moves them through
//! RabbitMQ pays on this machine, measured beside Sluice so the bench reports a ratio.
//!
//! One job of the floor is one row inserted and committed, one persistent message published
//! with a confirm, consumed with a manual ack, and one update of the row committed; inserts,
//! publishes, updates and acks are batched and pipelined as far as they go. No HTTP, no JSON
//! request, no scheduling: only the durable work. It talks to the servers with `sqlx` and
//! `lapin` directly, never through Sluice's store or broker, so a slower Sluice lowers the
//! ratio instead of the floor.

use anyhow::{bail, Context};
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Rows per insert statement and messages per pipelined publish, at most.
const BATCH: usize = 256;
/// Insert-and-publish batches in flight at once, as Sluice's intake has writers.
const IN_FLIGHT: usize = 4;
/// Unacknowledged deliveries the consumer may hold.
const PREFETCH: u16 = 512;

/// What one floor run measured.
#[derive(Debug, Clone, Copy)]
pub struct Floor {
    pub jobs: usize,
    pub seconds: f64,
}

impl Floor {
    pub fn jobs_per_sec(&self) -> f64 {
        self.jobs as f64 / self.seconds
    }
}

/// Run `jobs` jobs from `clients` concurrent producers against a fresh table in the
/// PostgreSQL schema `schema` of `database_url` and a fresh queue on `amqp_url`.
pub async fn measure(
    database_url: &str,
    schema: &str,
    amqp_url: &str,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<Floor> {
    let search_path = format!("SET search_path TO \"{schema}\"");
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .after_connect(move |conn, _| {
            let search_path = search_path.clone();
            Box::pin(async move {
                sqlx::Executor::execute(&mut *conn, search_path.as_str()).await?;
                Ok(())
            })
        })
        .connect(database_url)
        .await
        .context("the floor cannot reach PostgreSQL")?;
    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .execute(&pool)
        .await
        .context("the floor cannot create its schema")?;
    sqlx::query(
        "CREATE TABLE floor_jobs (id bigint PRIMARY KEY, state text NOT NULL, body text NOT NULL,
                                  created_at timestamptz NOT NULL DEFAULT now(),
                                  finished_at timestamptz)",
    )
    .execute(&pool)
    .await
    .context("the floor cannot create its table")?;

    let queue = format!("sluice-floor-{}", uuid::Uuid::now_v7().simple());
    let connection = Connection::connect(amqp_url, ConnectionProperties::default())
        .await
        .context("the floor cannot reach RabbitMQ")?;
    let publish = connection.create_channel().await?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    publish
        .queue_declare(
            &queue,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let consume = connection.create_channel().await?;
    consume
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;

    let result = run(&pool, &publish, &consume, &queue, jobs, clients).await;
    let _ = publish
        .queue_delete(&queue, QueueDeleteOptions::default())
        .await;
    let _ = connection.close(200, "floor done").await;
    pool.close().await;
    result
}

type Insert = (i64, oneshot::Sender<anyhow::Result<()>>);

async fn run(
    pool: &sqlx::PgPool,
    publish: &lapin::Channel,
    consume: &lapin::Channel,
    queue: &str,
    jobs: usize,
    clients: usize,
) -> anyhow::Result<Floor> {
    let mut deliveries = consume
        .basic_consume(
            queue,
            "floor",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // The consumer: take what has arrived, update those rows in one statement, ack them at once.
    let updater = {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut done = 0usize;
            let mut ids = Vec::with_capacity(BATCH);
            while done < jobs {
                let Some(first) = deliveries.next().await else {
                    bail!("the floor's consumer stopped after {done} jobs");
                };
                let mut batch = vec![first?];
                while batch.len() < BATCH {
                    match deliveries.next().now_or_never() {
                        Some(Some(delivery)) => batch.push(delivery?),
                        _ => break,
                    }
                }
                ids.clear();
                for delivery in &batch {
                    let id: [u8; 8] = delivery.data.as_slice().try_into()?;
                    ids.push(i64::from_le_bytes(id));
                }
                sqlx::query(
                    "UPDATE floor_jobs SET state = 'done', finished_at = now() WHERE id = ANY($1)",
                )
                .bind(&ids)
                .execute(&pool)
                .await?;
                if let Some(last) = batch.last() {
                    last.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
                done += batch.len();
            }
            Ok::<(), anyhow::Error>(())
        })
    };

    // The inserter: whatever producers have handed over, in one statement and one commit, then
    // every row's message published pipelined and confirmed before the producers hear back.
    let (tx, mut rx) = mpsc::channel::<Insert>(BATCH * 4);
    let inserter = {
        let pool = pool.clone();
        let publish = publish.clone();
        let queue = queue.to_owned();
        tokio::spawn(async move {
            let slots = Arc::new(Semaphore::new(IN_FLIGHT));
            let mut batch: Vec<Insert> = Vec::with_capacity(BATCH);
            while rx.recv_many(&mut batch, BATCH).await > 0 {
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let (pool, publish, queue) = (pool.clone(), publish.clone(), queue.clone());
                let batch = std::mem::take(&mut batch);
                tokio::spawn(async move {
                    let outcome = insert_and_publish(&pool, &publish, &queue, &batch).await;
                    drop(slot);
                    let failed = outcome.as_ref().err().map(|e| format!("{e:#}"));
                    for (_, reply) in batch {
                        let _ = reply.send(match &failed {
                            None => Ok(()),
                            Some(error) => Err(anyhow::anyhow!("{error}")),
                        });
                    }
                });
            }
        })
    };

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut producers = Vec::new();
    for _ in 0..clients {
        let (tx, next) = (tx.clone(), Arc::clone(&next));
        producers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return Ok::<(), anyhow::Error>(());
                }
                let (reply, answer) = oneshot::channel();
                tx.send((n as i64, reply))
                    .await
                    .map_err(|_| anyhow::anyhow!("the floor's inserter stopped"))?;
                answer
                    .await
                    .map_err(|_| anyhow::anyhow!("the floor's inserter stopped"))??;
            }
        }));
    }
    drop(tx);
    for producer in producers {
        producer.await.context("a floor producer panicked")??;
    }
    tokio::time::timeout(Duration::from_secs(600), updater)
        .await
        .context("the floor's consumer did not finish within 600 s")?
        .context("the floor's consumer panicked")??;
    let seconds = started.elapsed().as_secs_f64();
    inserter.abort();
    Ok(Floor { jobs, seconds })
}

async fn insert_and_publish(
    pool: &sqlx::PgPool,
    publish: &lapin::Channel,
    queue: &str,
    batch: &[Insert],
) -> anyhow::Result<()> {
    let ids: Vec<i64> = batch.iter().map(|(id, _)| *id).collect();
    let bodies: Vec<String> = ids
        .iter()
        .map(|id| format!("{{\"model\":\"default\",\"messages\":[{{\"role\":\"user\",\"content\":\"floor job {id}\"}}]}}"))
        .collect();
    sqlx::query(
        "INSERT INTO floor_jobs (id, state, body) SELECT id, 'queued', body FROM UNNEST($1::bigint[], $2::text[]) AS t(id, body)",
    )
    .bind(&ids)
    .bind(&bodies)
    .execute(pool)
    .await?;
    let mut confirms = Vec::with_capacity(ids.len());
    for id in &ids {
        confirms.push(
            publish
                .basic_publish(
                    "",
                    queue,
                    BasicPublishOptions::default(),
                    &id.to_le_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?,
        );
    }
    for confirm in confirms {
        if !confirm.await?.is_ack() {
            bail!("RabbitMQ refused a floor message");
        }
    }
    Ok(())
}
