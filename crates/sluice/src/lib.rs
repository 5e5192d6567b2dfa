//! Sluice as a library: the configuration, and the wiring that builds running API nodes,
//! workers and the embedded mode from it. The `sluice` binary is a CLI over this; tests build
//! whole apps in-process with [`App::build`].

pub mod app;
pub mod config;
pub mod embedded;
pub mod logging;
pub mod metrics;
pub mod stack;

pub use app::{ApiNode, App, WorkerNode};
pub use config::Config;
