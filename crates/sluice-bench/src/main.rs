//! `sluice-bench` (also reached as `sluice bench`): Sluice's benchmarks against this machine's
//! services. `throughput` runs the whole job path in one process per lane backend; `ratelimit`
//! drains a backlog through a rate-limited pool with worker processes; `memory` watches the
//! processes' resident memory under a large backlog; `cost` measures the cost of one job;
//! `subscribers` measures what stalled stream subscribers cost everyone else.
//! Measurements, not tests.

mod common;
mod cost;
mod floor;
mod memory;
mod ratelimit;
mod subscribers;
mod throughput;

/// jemalloc, not glibc's malloc: it returns freed memory to the system (see .cargo/config.toml).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use clap::Parser;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "sluice-bench",
    version,
    about = "Benchmarks of Sluice on this machine"
)]
struct Cli {
    /// Config file (default: ./sluice.toml if it exists).
    #[arg(long, short, global = true, env = "SLUICE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: throughput::BenchCommand,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Startup: fails only if another provider was installed first, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let telemetry = sluice::logging::init();
    let cli = Cli::parse();
    let result = match sluice::Config::load(cli.config.as_deref()) {
        Ok(config) => throughput::run(cli.command, config).await,
        Err(error) => Err(error),
    };
    telemetry.shutdown();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
