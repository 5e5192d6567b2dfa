//! Builds the running pieces from configuration: store, broker, publisher, API and worker,
//! and the operator commands that need them directly (migrate, dlq).

use crate::app::{ApiNode, WorkerNode};
use crate::config::{Config, QueueBackend};
use anyhow::Context;
use sluice_admission::{Admission, AdmissionPolicy, Intake, Quotas, SemanticCache};
use sluice_api::ApiState;
use sluice_broker::rabbitmq::RabbitBroker;
use sluice_broker::Broker;
use sluice_core::RequestId;
use sluice_notify::{EventBus, Hub, Poll};
use sluice_outbox::Publisher;
use sluice_providers::{Router, SharedLimits};
use sluice_store::{Store, StoreConfig};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub async fn store(config: &Config, migrate: bool) -> anyhow::Result<Store> {
    let store_config = StoreConfig {
        migrate,
        ..config.database.clone()
    };
    Store::connect(&store_config).await.with_context(|| {
        format!(
            "cannot open the database at {}",
            sluice_store::redact_url(&config.database.url)
        )
    })
}

/// The store, telling `bus` of every job it changes (`sluice_store::Announce`), so subscribers
/// hear of every change whichever process or command made it.
pub async fn announcing_store(
    config: &Config,
    migrate: bool,
    bus: &EventBus,
) -> anyhow::Result<Store> {
    Ok(store(config, migrate)
        .await?
        .announcing(Arc::new(bus.clone())))
}

/// The lanes, in the backend `[queue]` names, declared and ready. The SQL queue lives in
/// `store`'s database (and schema).
pub async fn broker(config: &Config, store: &Store) -> anyhow::Result<Arc<dyn Broker>> {
    Ok(broker_with_store(config, store.clone()).await?.0)
}

/// [`broker`], and `store` as ingest should use it: with the SQL queue in the store's own
/// database and schema, its batched ingest puts new jobs straight into their lanes, in the
/// commit that stores them (no outbox row, no publish).
pub async fn broker_with_store(
    config: &Config,
    store: Store,
) -> anyhow::Result<(Arc<dyn Broker>, Store)> {
    let (broker, store) = connect_broker_with_store(config, store).await?;
    broker.declare().await.context("cannot declare the lanes")?;
    Ok((broker, store))
}

/// [`broker_with_store`] without declaring the lanes, for callers that must be able to delete them again even
/// if declaring fails half-way (the benchmark's throwaway lanes).
pub async fn connect_broker_with_store(
    config: &Config,
    store: Store,
) -> anyhow::Result<(Arc<dyn Broker>, Store)> {
    let broker: Arc<dyn Broker> = match config.queue.backend {
        QueueBackend::Rabbitmq => Arc::new(
            RabbitBroker::connect(config.rabbitmq.clone())
                .await
                .context("cannot connect to RabbitMQ")?,
        ),
        QueueBackend::Sqs => Arc::new(
            sluice_sqs::SqsBroker::connect(config.queue.sqs.clone())
                .await
                .context("cannot reach SQS")?,
        ),
        QueueBackend::Sql => {
            let sql = config.queue.sql.clone();
            let queue = match (store.pg_pool(), store.sqlite_pool()) {
                (Some(pool), _) => sluice_sqlqueue::SqlQueue::postgres(pool.clone(), sql),
                (None, Some(pool)) => sluice_sqlqueue::SqlQueue::sqlite(pool.clone(), sql),
                (None, None) => anyhow::bail!("the store has no SQL database for the queue"),
            };
            let queue = queue.context("invalid [queue.sql] section")?;
            // The store's statements name the table unqualified, so only a queue in the
            // store's own schema (SQLite has none) is theirs to write.
            let same_schema = match &queue.config().schema {
                None => true,
                Some(schema) => config.database.schema.as_ref() == Some(schema),
            };
            let store = if same_schema {
                store.enqueuing_into(sluice_store::LanesInDatabase {
                    namespace: queue.config().namespace.clone(),
                    channel: queue.notify_channel().to_owned(),
                    wake: queue.waker(),
                })
            } else {
                store
            };
            return Ok((Arc::new(queue), store));
        }
    };
    Ok((broker, store))
}

/// The provider pools; with `[redis]` configured their limits are shared by every worker.
pub async fn router(config: &Config) -> anyhow::Result<Arc<Router>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .context("cannot build the HTTP client")?;
    let mut options = config.limits.clone();
    if let Some(redis) = &config.redis {
        let worker = uuid::Uuid::now_v7().to_string();
        let shared = SharedLimits::connect(&redis.url, &redis.prefix, &worker)
            .await
            .context("invalid Redis configuration")?;
        options.shared = Some(shared);
    }
    let router = Router::with_options(&config.pools, &config.routes, http, &options)
        .context("invalid provider pools")?;
    Ok(Arc::new(router))
}

/// The event bus: Redis pub/sub when `[redis]` is configured, else in-process only (API nodes
/// then learn of workers' state changes from the event log's poll alone).
pub fn event_bus(config: &Config) -> anyhow::Result<EventBus> {
    match &config.redis {
        Some(redis) => {
            EventBus::redis(&redis.url, &redis.prefix).context("invalid Redis configuration")
        }
        None => Ok(EventBus::local()),
    }
}

/// How the hub polls the event log. With a bus that reaches the workers (Redis, or the
/// in-process bus of the embedded mode) the poll only makes good what the bus lost and leaves
/// the newest events to it, so a job's deltas are not overtaken by its terminal event;
/// without one, the poll is the only way workers' changes reach subscribers.
pub fn hub_poll(bus_reaches_workers: bool) -> Poll {
    if bus_reaches_workers {
        Poll {
            every: Duration::from_secs(1),
            settle: Duration::from_secs(2),
        }
    } else {
        Poll {
            every: Duration::from_millis(250),
            settle: Duration::ZERO,
        }
    }
}

/// Admission's moving parts: quotas counted in Redis when `[redis]` is configured (else in
/// this process), the semantic cache's embeddings client, and the lane-load monitor.
pub fn admission(
    config: &Config,
    store: &Store,
    shutdown: CancellationToken,
) -> anyhow::Result<Arc<Admission>> {
    let quotas = match &config.redis {
        Some(redis) => Quotas::redis(&redis.url, &redis.prefix, config.quotas.clone())
            .context("invalid Redis configuration for quotas")?,
        None => Quotas::local(config.quotas.clone()),
    };
    let semantic = match &config.semantic_cache {
        Some(semantic) => {
            let http = reqwest::Client::new();
            let client = sluice_providers::Embeddings::new(&semantic.embeddings, http)
                .context("invalid [semantic_cache.embeddings] section")?;
            Some(SemanticCache {
                config: semantic.clone(),
                client,
            })
        }
        None => None,
    };
    let policy = AdmissionPolicy {
        cache: config.cache.clone(),
        shedding: config.shedding.clone(),
        budgets: config.budgets.clone(),
    };
    let admission = Arc::new(Admission::new(
        policy,
        quotas,
        semantic,
        config.routes.clone(),
        config
            .pools
            .iter()
            .flat_map(|p| p.endpoints.iter().map(|e| (e.name.clone(), e.rpm)))
            .collect(),
        &config.tiers,
    ));
    admission.spawn_load_monitor(store.clone(), config.tiers, shutdown);
    Ok(admission)
}

/// Where [`with_link_secret`] keeps the deployment's result-link secret.
const LINK_SECRET_SETTING: &str = "mail.link_secret";

/// The secret that signs result-page links: `[mail] link_secret` when configured, else the
/// deployment's own, kept in the database and made by the first process that needed it. So
/// mailers and API nodes (which may have no `[mail]` at all) agree with no secret to
/// configure; a deployment that configures one gives it to all of them.
pub async fn link_secret(config: &Config, store: &Store) -> anyhow::Result<String> {
    if let Some(secret) = config.mail.as_ref().and_then(|m| m.link_secret.clone()) {
        return Ok(secret);
    }
    let fresh = sluice_notify::link::generate_secret();
    store
        .shared_value(LINK_SECRET_SETTING, &fresh)
        .await
        .context("cannot read or make the result-link secret in the database")
}

/// `config` with `[mail] link_secret` filled in by [`link_secret`] when it names none.
pub async fn with_link_secret(config: &Config, store: &Store) -> anyhow::Result<Config> {
    let mut config = config.clone();
    if config
        .mail
        .as_ref()
        .is_some_and(|m| m.link_secret.is_none())
    {
        let secret = link_secret(&config, store).await?;
        if let Some(mail) = config.mail.as_mut() {
            mail.link_secret = Some(secret);
        }
    }
    Ok(config)
}

/// The API state over an open store and broker, with its event hub on `bus`.
pub fn api_state(
    config: &Config,
    store: Store,
    publisher: Publisher,
    bus: EventBus,
    poll: Poll,
    shutdown: CancellationToken,
    link_secret: Option<&str>,
) -> anyhow::Result<Arc<ApiState>> {
    let admission = admission(config, &store, shutdown.clone())?;
    sluice_api::openai::spawn_disconnect_sweeper(store.clone(), &config.openai, shutdown.clone());
    sluice_api::openai::spawn_finalizer(store.clone(), &config.batches, shutdown.clone());
    let hub = Hub::spawn(store.clone(), &bus, poll, config.streams, shutdown);
    let intake = Arc::new(Intake::new(store, publisher, admission, config.tiers));
    // The links the mailers sign (see `link_secret`); without a secret, `/r` answers 404.
    let result_links = link_secret
        .map(sluice_notify::LinkSigner::new)
        .transpose()
        .context("invalid result-link secret (mail.link_secret)")?;
    Ok(ApiState::new(
        intake,
        hub,
        Some(crate::metrics::render(crate::metrics::install()?)),
        config.openai.clone(),
        config.batches.clone(),
        result_links,
    ))
}

/// `sluice serve`: one API node until `shutdown`.
pub async fn serve(
    config: Config,
    migrate: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = ApiNode::start(&config, migrate, &shutdown).await?;
    // Scripts and tests read this line to find the port.
    println!("sluice api listening on {}", node.url());
    node.wait().await
}

/// `sluice worker`: one worker until `shutdown`.
pub async fn worker(
    config: Config,
    migrate: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let node = WorkerNode::start(&config, migrate, &shutdown).await?;
    println!("sluice worker started");
    node.wait().await
}

pub async fn dlq_list(config: &Config, limit: i64) -> anyhow::Result<()> {
    let store = store(config, false).await?;
    let dead = store.dead_jobs(limit).await?;
    if dead.is_empty() {
        eprintln!("no dead jobs");
    }
    for job in dead {
        println!(
            "{}\t{}\t{}\t{}\t{}",
            job.id,
            job.tenant,
            job.model,
            job.at.to_rfc3339(),
            job.error.unwrap_or_default()
        );
    }
    Ok(())
}

pub async fn dlq_replay(config: &Config, id: RequestId) -> anyhow::Result<()> {
    let bus = event_bus(config)?;
    let store = announcing_store(config, false, &bus).await?;
    let message = store
        .replay(id)
        .await?
        .with_context(|| format!("job {id} is not dead (or does not exist)"))?;
    let broker = broker(config, &store).await?;
    let publisher = Publisher::new(store, broker);
    // If this publish fails the job is still queued in the outbox and a relay sends it.
    publisher
        .publish(message)
        .await
        .context("replayed, but publishing failed; the relay will retry")?;
    publisher.settle().await;
    // Subscribers hear of the replay now rather than from the hub's next poll.
    bus.flush(Duration::from_secs(2)).await;
    println!("{id}");
    Ok(())
}

pub async fn dlq_inspect(config: &Config, id: RequestId) -> anyhow::Result<()> {
    let store = store(config, false).await?;
    let job = store
        .job(id)
        .await?
        .with_context(|| format!("no job {id}"))?;
    println!(
        "{}\t{}\t{}\t{}\t{}\tattempts {}",
        job.id, job.tenant, job.user, job.model, job.state, job.attempt
    );
    if let Some(error) = &job.error {
        println!("error\t{error}");
    }
    for event in store.events(id).await? {
        let detail = event.detail.map(|d| d.to_string()).unwrap_or_default();
        println!(
            "{}\t{}\t{}\t{detail}",
            event.seq,
            event.at.to_rfc3339(),
            event.state
        );
    }
    Ok(())
}

pub async fn dlq_purge(config: &Config, id: RequestId) -> anyhow::Result<()> {
    let store = store(config, false).await?;
    if !store.purge_dead(id).await? {
        anyhow::bail!("job {id} is not dead (or does not exist): only dead jobs are purged");
    }
    eprintln!("purged {id}");
    Ok(())
}

/// Per lane: jobs queued (database), the broker's depth, the oldest job's wait; then pauses.
pub async fn lanes(config: &Config) -> anyhow::Result<()> {
    let store = store(config, false).await?;
    let broker = broker(config, &store).await?;
    let stats = store.lane_stats(Duration::from_secs(60)).await?;
    let now = chrono::Utc::now();
    println!("lane\tqueued\tbroker\toldest_wait_secs\tstarted_last_minute");
    for lane in sluice_core::Lane::ALL {
        let row = stats.iter().find(|s| s.lane == lane);
        let broker_depth = broker
            .depth(lane)
            .await
            .map_or_else(|e| format!("? ({e})"), |d| d.to_string());
        let oldest = row
            .and_then(|r| r.oldest)
            .map_or(0.0, |at| (now - at).num_milliseconds() as f64 / 1000.0);
        println!(
            "{lane}\t{}\t{broker_depth}\t{oldest:.1}\t{}",
            row.map_or(0, |r| r.depth),
            row.map_or(0, |r| r.started)
        );
    }
    for target in store.pauses().await? {
        println!("paused\t{target}");
    }
    Ok(())
}
