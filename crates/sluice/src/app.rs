//! Sluice as a library: from a [`Config`] to API nodes and workers running in this process,
//! each stoppable on its own. `sluice serve` and `sluice worker` run one of each; tests build
//! whole apps in-process with [`App::build`].

use crate::config::Config;
use crate::stack;
use anyhow::Context;
use sluice_outbox::{Publisher, RelayConfig};
use sluice_worker::Worker;
use std::net::SocketAddr;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long a starting API node waits for its event bus to listen before serving anyway.
const BUS_LISTEN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// One API node (with its outbox relay, hub, finalizer and sweepers), serving until stopped.
pub struct ApiNode {
    /// Where it listens (the config's `listen`; port 0 picks a free one).
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl ApiNode {
    /// Open the store and lanes `config` names and start serving; migrates first with `migrate`.
    /// Stops with `parent` or [`ApiNode::stop`].
    pub async fn start(
        config: &Config,
        migrate: bool,
        parent: &CancellationToken,
    ) -> anyhow::Result<ApiNode> {
        if config.routes.is_empty() {
            tracing::warn!(
                message =
                    "no routes configured: every submission will be refused as an unknown model"
            );
        }
        let stop = parent.child_token();
        let bus = stack::event_bus(config)?;
        let store = stack::announcing_store(config, migrate, &bus).await?;
        let link_secret = stack::link_secret(config, &store).await?;
        let (broker, store) = stack::broker_with_store(config, store).await?;
        let publisher = Publisher::new(store.clone(), broker);
        sluice_outbox::spawn_relay(
            store.clone(),
            publisher.clone(),
            RelayConfig::default(),
            stop.clone(),
        );
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let poll = stack::hub_poll(config.redis.is_some());
        let state = stack::api_state(
            config,
            store,
            publisher.clone(),
            bus.clone(),
            poll,
            stop.clone(),
            Some(&link_secret),
        )?;
        // Streamed text published before the hub's Redis subscription exists is lost for good
        // (state changes come back through the poll): serve once it listens, or without it.
        if !bus.listening(BUS_LISTEN_TIMEOUT).await {
            tracing::warn!(
                message = "the event bus is not listening yet; streamed text may miss subscribers until it is"
            );
        }
        let serving = stop.clone();
        let http = config.http.clone();
        let task = tokio::spawn(async move {
            let served = sluice_api::serve(listener, state, http, serving)
                .await
                .context("the API server failed");
            publisher.settle().await;
            served
        });
        tracing::info!(message = "api listening", %addr);
        Ok(ApiNode { addr, stop, task })
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop taking connections, finish the requests in flight, and return how serving ended.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.wait().await
    }

    /// Wait until the node stops (its token was cancelled, or serving failed).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the API task panicked")?
    }
}

/// One worker (with its mailer when `[mail]` is set, and its metrics server when
/// `[worker] metrics_listen` is), running until stopped.
pub struct WorkerNode {
    /// Where it serves `/metrics`, if it does.
    pub metrics: Option<SocketAddr>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl WorkerNode {
    /// Connect to the store, the lanes and the pools `config` names and start working.
    pub async fn start(
        config: &Config,
        migrate: bool,
        parent: &CancellationToken,
    ) -> anyhow::Result<WorkerNode> {
        let stop = parent.child_token();
        let router = stack::router(config).await?;
        let bus = stack::event_bus(config)?;
        let store = stack::announcing_store(config, migrate, &bus).await?;
        let config = &stack::with_link_secret(config, &store).await?;
        let broker = stack::broker(config, &store).await?;
        let publisher = Publisher::new(store.clone(), broker);
        // Every worker with `[mail]` also sends completion emails; the notifications' leases
        // keep two workers from sending the same one.
        let mailer = match &config.mail {
            Some(mail) => Some(
                sluice_notify::Mailer::new(store.clone(), mail.clone())
                    .context("cannot set up the mailer from [mail]")?,
            ),
            None => None,
        };
        let worker = Worker::new(store, publisher.clone(), router, config.worker.clone(), bus)?;
        let metrics = match config.worker.metrics_listen {
            Some(addr) => {
                let handle = crate::metrics::install()?;
                Some(crate::metrics::serve_worker(addr, handle, stop.child_token()).await?)
            }
            None => None,
        };
        let mail_stop = stop.child_token();
        let mailer = mailer.map(|mailer| tokio::spawn(mailer.run(mail_stop.clone())));
        let running = stop.clone();
        let task = tokio::spawn(async move {
            let result = worker.run(running).await.context("the worker failed");
            publisher.settle().await;
            if let Some(mailer) = mailer {
                // The mailer finishes the send in progress; emails it had not started wait in
                // the database for the next mailer.
                mail_stop.cancel();
                if let Err(error) = mailer.await {
                    tracing::error!(message = "the mailer failed", %error);
                }
            }
            result
        });
        Ok(WorkerNode {
            metrics,
            stop,
            task,
        })
    }

    /// Stop as on SIGTERM: stop taking work, give back what has not started, finish what is in
    /// flight within `shutdown_grace_secs`.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.wait().await
    }

    /// Wait until the worker stops.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the worker task panicked")?
    }
}

/// A whole Sluice deployment in this process: one API node and any number of workers on the
/// configured store, lanes and pools.
pub struct App {
    pub config: Config,
    pub api: ApiNode,
    pub workers: Vec<WorkerNode>,
    shutdown: CancellationToken,
}

impl App {
    /// Migrate, then start an API node and `workers` workers on `config`. Bind `listen` (and
    /// `[worker] metrics_listen`) to port 0 to run several apps side by side.
    pub async fn build(config: Config, workers: usize) -> anyhow::Result<App> {
        // Two TLS crypto providers are linked (ring, aws-lc): rustls needs the process's
        // default named, as the binary does at start. Fails only if one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shutdown = CancellationToken::new();
        let api = ApiNode::start(&config, true, &shutdown).await?;
        let mut app = App {
            config,
            api,
            workers: Vec::new(),
            shutdown,
        };
        for _ in 0..workers {
            app.add_worker().await?;
        }
        Ok(app)
    }

    /// The API's base URL, `http://ADDR`.
    pub fn url(&self) -> String {
        self.api.url()
    }

    /// Start one more worker (the last of `workers`).
    pub async fn add_worker(&mut self) -> anyhow::Result<()> {
        let worker = WorkerNode::start(&self.config, false, &self.shutdown).await?;
        self.workers.push(worker);
        Ok(())
    }

    /// Start another API node on the same config (another port when `listen` is port 0).
    pub async fn add_api_node(&self) -> anyhow::Result<ApiNode> {
        ApiNode::start(&self.config, false, &self.shutdown).await
    }

    /// Stop everything at once without waiting: what is in flight is left to leases and
    /// visibility timeouts, as after a crash (tests end this way; use [`App::shutdown`] to
    /// drain).
    pub fn abort(self) {
        self.shutdown.cancel();
        for worker in &self.workers {
            worker.task.abort();
        }
        self.api.task.abort();
    }

    /// Stop everything, workers first (they finish what they hold), then the API.
    pub async fn shutdown(self) {
        for worker in self.workers {
            if let Err(error) = worker.stop().await {
                tracing::warn!(message = "a worker stopped with an error", %error);
            }
        }
        if let Err(error) = self.api.stop().await {
            tracing::warn!(message = "the API stopped with an error", %error);
        }
        self.shutdown.cancel();
    }
}
