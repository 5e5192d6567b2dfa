//! Helpers shared by the simulator's integration tests: a keyed config and a started simulator.
#![allow(dead_code, clippy::unwrap_used)]

use reqwest::Client;
use sluice_sim::{spawn, SimConfig, SimHandle, SimKey};

pub const KEY: &str = "sk-test-main-0123456789";

/// One key named `main` with the given RPM.
pub fn keyed(rpm: Option<u32>) -> SimConfig {
    SimConfig {
        keys: vec![SimKey {
            name: "main".into(),
            key: KEY.into(),
            rpm,
        }],
        ..SimConfig::default()
    }
}

/// A simulator on a free port and a client that ignores proxy settings.
pub async fn start(config: SimConfig) -> (SimHandle, Client) {
    let sim = spawn(config, ([127, 0, 0, 1], 0).into()).await.unwrap();
    (sim, Client::builder().no_proxy().build().unwrap())
}
