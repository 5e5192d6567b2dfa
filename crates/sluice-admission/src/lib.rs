//! Everything between "authenticated" and "inserted": the one intake every front door calls,
//! with admission's rules (quotas, caches, dedup, shedding, budgets, routing) and their I/O.
//! The pure rules (windows, counters, load levels, prices) live in `sluice_core`.

mod error;
pub mod intake;
pub mod policy;
pub mod quotas;
pub mod telemetry;

pub use error::AdmitError;
pub use intake::{Admitted, Intake, ReusePolicy, Submission, Ticket};
pub use policy::{
    Admission, AdmissionPolicy, BudgetConfig, CacheConfig, LoadSnapshot, SemanticCache,
    SemanticCacheConfig, SheddingConfig,
};
pub use quotas::{QuotaError, Quotas};
