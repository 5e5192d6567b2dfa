//! sluice-sim: an HTTP server that imitates LLM providers in OpenAI, Anthropic and Gemini wire formats.
//! It enforces per-key request limits, punishes hammering, adds latency and injects faults for tests, benches and dev mode.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! let sim = sluice_sim::spawn(sluice_sim::SimConfig::default(), ([127, 0, 0, 1], 0).into()).await?;
//! println!("point an OpenAI client at {}", sim.base_url());
//! sim.shutdown();
//! # Ok(())
//! # }
//! ```

mod bucket;
mod chat;
mod config;
mod schema;
mod server;
mod state;
mod wire;
mod wire_anthropic;
mod wire_embeddings;
mod wire_gemini;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use config::{Faults, Latency, SimConfig, SimKey};
pub use server::{serve, spawn, SimHandle};

/// Counters since start or the last reset. Keys appear under their configured name.
///
/// Every counter but `embeddings` counts chat calls (in any format) only, so a semantic cache
/// in front of the same simulator leaves them as they were.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Authenticated calls, whatever their outcome.
    pub total: u64,
    pub ok: u64,
    pub rate_limited: u64,
    /// Injected faults plus malformed requests.
    pub failed: u64,
    /// Calls refused because their key was blocked for hammering (also in `rate_limited`).
    #[serde(default)]
    pub blocked: u64,
    /// Times a key got blocked for hammering.
    #[serde(default)]
    pub blocks: u64,
    /// Authenticated embeddings calls, whatever their outcome.
    #[serde(default)]
    pub embeddings: u64,
    pub by_key: BTreeMap<String, u64>,
    /// Calls per `x-sluice-request-id`.
    pub by_job: BTreeMap<String, u64>,
}
