//! The `sluice` command: runs the API, workers and the provider simulator (or all of them in
//! one process on SQLite: `dev`), and talks to a
//! running deployment (keys, submit, status, watch, dead-letter queue) and benchmarks it.

mod client;

/// jemalloc, not glibc's malloc: it returns freed memory to the system (see .cargo/config.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::Config;
use sluice::{embedded, logging, stack};
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
    /// Lane depths (database and broker), the oldest job's wait, and what is paused.
    Lanes,
    /// Pause a lane or an endpoint: workers stop taking its jobs or calling it within a second.
    Pause {
        #[command(subcommand)]
        target: PauseTarget,
    },
    /// Resume a paused lane or endpoint.
    Resume {
        #[command(subcommand)]
        target: PauseTarget,
    },
    /// Inspect and replay dead-lettered jobs.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Benchmarks against this machine's services: runs the `sluice-bench` binary built beside
    /// this one (`cargo build --release -p sluice-bench`) with the same arguments.
    #[command(disable_help_flag = true)]
    Bench {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create an API key; prints only the key.
    Create {
        #[arg(long, required_unless_present = "admin")]
        tenant: Option<String>,
        /// The user; for an admin key, the operator's name.
        #[arg(long)]
        user: String,
        #[arg(long, required_unless_present = "admin")]
        tier: Option<Tier>,
        #[arg(long)]
        email: Option<String>,
        /// Reuse answers to this key's sampled requests too (by default only deterministic
        /// requests, temperature 0 or a seed, are answered from another job).
        #[arg(long)]
        reuse_samples: bool,
        /// An operator key for /admin/v1 (and nothing else).
        #[arg(long, conflicts_with_all = ["tenant", "tier", "email", "reuse_samples"])]
        admin: bool,
    },
    /// List keys (never the secrets): id, prefix, role, tenant, user, tier, revoked.
    List,
    /// Revoke a key by its id (from `keys list`).
    Revoke { id: uuid::Uuid },
}

#[derive(Subcommand)]
enum PauseTarget {
    /// priority, standard, batch or retry.
    Lane { name: sluice_core::Lane },
    /// An endpoint's name from `[[pools.endpoints]]`.
    Endpoint { name: String },
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
    /// Show a job (any state) with its event log.
    Inspect { id: RequestId },
    /// Delete a dead job for good.
    Purge { id: RequestId },
}

async fn pause(config: &Config, target: PauseTarget, pause: bool) -> anyhow::Result<()> {
    let target = match target {
        PauseTarget::Lane { name } => {
            if !sluice_core::Lane::CONSUMED.contains(&name) {
                anyhow::bail!("lane {name} is not consumed by workers: pause priority, standard, batch or retry");
            }
            format!("lane:{name}")
        }
        PauseTarget::Endpoint { name } => {
            let known = config
                .pools
                .iter()
                .flat_map(|p| &p.endpoints)
                .any(|e| e.name == name);
            if !known {
                anyhow::bail!("no endpoint named {name:?} in the configuration");
            }
            format!("endpoint:{name}")
        }
    };
    let store = stack::store(config, false).await?;
    let operator = std::env::var("USER").unwrap_or_else(|_| "cli".into());
    let changed = if pause {
        store.pause(&target, &operator).await?
    } else {
        store.resume(&target).await?
    };
    let (done, already) = if pause {
        ("paused", "was already paused")
    } else {
        ("resumed", "was not paused")
    };
    eprintln!("{target} {}", if changed { done } else { already });
    Ok(())
}

async fn keys(store: &sluice_store::Store, command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Create {
            tenant,
            user,
            tier,
            email,
            reuse_samples,
            admin,
        } => {
            if user.trim().is_empty() {
                anyhow::bail!("--user must not be empty");
            }
            let key = if admin {
                store.create_admin_key(&user).await
            } else {
                let (Some(tenant), Some(tier)) = (tenant, tier) else {
                    anyhow::bail!("a tenant key needs --tenant and --tier (or pass --admin)");
                };
                if tenant.trim().is_empty() {
                    anyhow::bail!("--tenant must not be empty");
                }
                let email = email
                    .map(|email| sluice_core::EmailAddress::parse(&email))
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("--email is {e}"))?
                    .map(sluice_core::EmailAddress::into_string);
                store
                    .create_api_key(&Principal {
                        tenant,
                        user,
                        tier,
                        email,
                        reuse_samples,
                    })
                    .await
            }
            .context("could not store the key")?;
            println!("{key}");
        }
        KeysCommand::List => {
            for key in store.api_keys().await.context("could not list keys")? {
                let role = if key.admin { "admin" } else { "tenant" };
                let revoked = key.revoked_at.map_or_else(
                    || "active".to_owned(),
                    |at| format!("revoked {}", at.to_rfc3339()),
                );
                println!(
                    "{}\t{}...\t{role}\t{}\t{}\t{}\t{revoked}",
                    key.id,
                    key.prefix,
                    key.principal.tenant,
                    key.principal.user,
                    key.principal.tier
                );
            }
        }
        KeysCommand::Revoke { id } => {
            if !store.revoke_api_key(id).await.context("could not revoke")? {
                anyhow::bail!("no active key with id {id}");
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(())
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

/// `sluice bench ...`: the benchmarks live in their own binary, kept out of this one.
async fn bench(config: Option<&std::path::Path>, args: &[String]) -> anyhow::Result<()> {
    let exe = std::env::current_exe()
        .context("cannot find this executable")?
        .with_file_name(format!("sluice-bench{}", std::env::consts::EXE_SUFFIX));
    if !exe.exists() {
        anyhow::bail!(
            "{} is missing: build it with `cargo build --release -p sluice-bench` (or run \
             `cargo run --release -p sluice-bench -- ...`)",
            exe.display()
        );
    }
    let mut command = tokio::process::Command::new(&exe);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let status = command
        .args(args)
        .status()
        .await
        .with_context(|| format!("cannot run {}", exe.display()))?;
    if !status.success() {
        anyhow::bail!("the benchmark failed ({status})");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Startup: fails only if another provider was installed first, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = logging::init();
    let code = match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    };
    // Spans still batched go out before the process ends.
    telemetry.shutdown();
    code
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
        Command::Keys { command } => {
            let config = Config::load(path)?;
            let store = stack::store(&config, config.database.migrate).await?;
            keys(&store, command).await
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
        Command::Lanes => stack::lanes(&Config::load(path)?).await,
        Command::Pause { target } => pause(&Config::load(path)?, target, true).await,
        Command::Resume { target } => pause(&Config::load(path)?, target, false).await,
        Command::Dlq { command } => {
            let config = Config::load(path)?;
            match command {
                DlqCommand::List { limit } => stack::dlq_list(&config, limit).await,
                DlqCommand::Replay { id } => stack::dlq_replay(&config, id).await,
                DlqCommand::Inspect { id } => stack::dlq_inspect(&config, id).await,
                DlqCommand::Purge { id } => stack::dlq_purge(&config, id).await,
            }
        }
        Command::Bench { args } => bench(path, &args).await,
    }
}
