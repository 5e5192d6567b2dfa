//! Admission decisions that need I/O: quotas shared through Redis or held in-process.
//! The pure rules (windows, counters, load levels) live in `sluice_core`; this crate counts.

pub mod quotas;

pub use quotas::{QuotaError, Quotas};
