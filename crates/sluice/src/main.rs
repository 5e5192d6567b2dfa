//! The `sluice` command: runs the API, workers and the provider simulator (or all of them in
//! one process on SQLite: `dev`), and talks to a
//! running deployment (keys, submit, status, watch, dead-letter queue) and benchmarks it.

mod bench;
mod client;
mod config;
mod embedded;
mod metrics;
mod ratelimit;
mod stack;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use sluice_core::{Principal, RequestId, Tier};
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "A queue-based worker system for LLM API traffic"
)]
struct Cli {
    /// Config file (default: ./sluice.toml if it exists).
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API (and the outbox relay).
    Serve {
        /// Do not apply database migrations at start.
        #[arg(long)]
        no_migrate: bool,
        /// Run everything (API, worker, mailer) in this process on one SQLite file, with the
        /// lanes in it too: no PostgreSQL, RabbitMQ or Redis. Like `dev` without the simulator.
        #[arg(long)]
        embedded: bool,
        /// The SQLite file of `--embedded`.
        #[arg(long, env = "SLUICE_DATA", default_value = embedded::DEFAULT_DATA)]
        data: PathBuf,
    },
    /// Run the whole system in this process on one SQLite file, with the provider simulator
    /// when no real provider is configured; prints the URL and an API key (kept across
    /// restarts on the same file). Needs no other service.
    Dev {
        /// The SQLite file holding every job and the lanes.
        #[arg(long, env = "SLUICE_DATA", default_value = embedded::DEFAULT_DATA)]
        data: PathBuf,
        /// Listen here (default: the config's `listen`, 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Run a worker that drains the lanes into the provider pools.
    Worker {
        /// Do not apply database migrations at start.
        #[arg(long)]
        no_migrate: bool,
    },
    /// Run the provider simulator (OpenAI wire format).
    Sim {
        /// Address to listen on (default: [sim].listen or 127.0.0.1:9000).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Submit a job; prints its request_id.
    Submit {
        #[command(flatten)]
        api: client::ApiArgs,
        /// Model alias.
        #[arg(long, default_value = "default")]
        model: String,
        #[arg(long)]
        max_tokens: Option<u32>,
        /// Poll until the job ends and print it; exits non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
        /// The user message.
        #[arg(required = true)]
        message: Vec<String>,
    },
    /// Show a job.
    Status {
        #[command(flatten)]
        api: client::ApiArgs,
        id: RequestId,
    },
    /// Follow a job's events until it ends (resuming if the connection drops); exits
    /// non-zero unless it succeeded.
    Watch {
        #[command(flatten)]
        api: client::ApiArgs,
        /// Print each event as a line of JSON instead of text.
        #[arg(long)]
        json: bool,
        id: RequestId,
    },
    /// Inspect and replay dead-lettered jobs.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Benchmarks against this machine's services.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key; prints only the key.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        tier: Tier,
        #[arg(long)]
        email: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List the most recently dead-lettered jobs.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
    },
    /// Put a dead job back in its lane with a fresh retry budget.
    Replay { id: RequestId },
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn,lapin=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

/// Fires on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let fire = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!(message = "shutting down");
        fire.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    init_tracing();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let path = cli.config.as_deref();
    match cli.command {
        Command::Serve {
            no_migrate,
            embedded: true,
            data,
        } => {
            if no_migrate {
                anyhow::bail!(
                    "--no-migrate does not apply to --embedded: its file is always migrated"
                );
            }
            let config = Config::load(path)?;
            let options = embedded::Embedded {
                data,
                simulator: false,
                listen: None,
            };
            embedded::run(config, options, shutdown_signal()).await
        }
        Command::Serve { no_migrate, .. } => {
            let config = Config::load(path)?;
            stack::serve(config, !no_migrate, shutdown_signal()).await
        }
        Command::Dev { data, listen } => {
            let config = Config::load(path)?;
            let options = embedded::Embedded {
                data,
                simulator: true,
                listen,
            };
            embedded::run(config, options, shutdown_signal()).await
        }
        Command::Worker { no_migrate } => {
            let config = Config::load(path)?;
            stack::worker(config, !no_migrate, shutdown_signal()).await
        }
        Command::Sim { listen } => {
            let config = Config::load(path)?;
            let addr = listen
                .or(config.sim.listen)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9000)));
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))?;
            println!(
                "sluice sim listening on http://{}/v1",
                listener.local_addr()?
            );
            sluice_sim::serve(listener, config.sim.config)
                .await
                .context("simulator failed")
        }
        Command::Migrate => {
            let config = Config::load(path)?;
            stack::store(&config, true).await?;
            eprintln!("migrations applied");
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Create {
                    tenant,
                    user,
                    tier,
                    email,
                },
        } => {
            for (what, value) in [("tenant", &tenant), ("user", &user)] {
                if value.trim().is_empty() {
                    anyhow::bail!("--{what} must not be empty");
                }
            }
            let config = Config::load(path)?;
            let store = stack::store(&config, config.database.migrate).await?;
            let key = store
                .create_api_key(&Principal {
                    tenant,
                    user,
                    tier,
                    email,
                })
                .await
                .context("could not store the key")?;
            println!("{key}");
            Ok(())
        }
        Command::Submit {
            api,
            model,
            max_tokens,
            wait,
            message,
        } => client::submit(&api, &model, max_tokens, &message.join(" "), wait).await,
        Command::Status { api, id } => client::status(&api, id).await,
        Command::Watch { api, json, id } => client::watch(&api, id, json).await,
        Command::Dlq { command } => {
            let config = Config::load(path)?;
            match command {
                DlqCommand::List { limit } => stack::dlq_list(&config, limit).await,
                DlqCommand::Replay { id } => stack::dlq_replay(&config, id).await,
            }
        }
        Command::Bench { command } => {
            let config = Config::load(path)?;
            bench::run(command, config).await
        }
    }
}
