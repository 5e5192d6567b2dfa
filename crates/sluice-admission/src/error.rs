//! Why the intake turned a submission away, as data: each front door maps it onto its own wire
//! shape (the job API's `{"error": {"code", ...}}`, OpenAI's `{"error": {"type", "param", ...}}`).

use sluice_core::InvalidRequest;
use sluice_store::StoreError;
use std::time::Duration;

/// A submission the intake refused; nothing was stored for it.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The request breaks a rule; `param` names the field.
    #[error("{0}")]
    Invalid(InvalidRequest),
    /// No route for the model alias.
    #[error("no route for model {:?}; known models: {}", sluice_core::excerpt(model), known.join(", "))]
    UnknownModel { model: String, known: Vec<String> },
    /// The request asked for a completion email and the key has no address.
    #[error(
        "notify.email asks for a completion email, but this API key has no email address; \
         use a key created with --email, or leave notify.email out"
    )]
    NoEmail,
    /// Over a user or tenant quota.
    #[error("{message}")]
    QuotaExceeded {
        message: String,
        scope: &'static str,
        window_secs: u64,
        limit: u64,
        retry_after: Duration,
    },
    /// Shed: the load level does not admit this tier into this lane now.
    #[error("{reason}")]
    Overloaded {
        reason: String,
        retry_after: Duration,
    },
    /// The tenant's daily budget is spent.
    #[error(
        "tenant {tenant} has spent ${spent:.4} of its ${daily:.2} daily budget; it renews at 00:00 UTC"
    )]
    BudgetExhausted {
        tenant: String,
        spent: f64,
        daily: f64,
        retry_after: Duration,
    },
    /// The same `Idempotency-Key` came with a different body.
    #[error("this Idempotency-Key was already used with a different body")]
    IdempotencyConflict,
    /// Too many batch lines of the tenant are waiting already.
    #[error(
        "the tenant's batches already hold {pending} unfinished lines; with these {adding} more \
         it would exceed the cap of {cap}: wait for a batch to finish"
    )]
    BatchQueueFull { pending: i64, adding: i64, cap: i64 },
    /// Sluice's own failure (the database); the submission may be retried.
    #[error("internal error: {0}")]
    Store(#[from] StoreError),
}

impl AdmitError {
    /// When trying again may succeed, for refusals that know.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AdmitError::QuotaExceeded { retry_after, .. }
            | AdmitError::Overloaded { retry_after, .. }
            | AdmitError::BudgetExhausted { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

impl From<InvalidRequest> for AdmitError {
    fn from(invalid: InvalidRequest) -> Self {
        AdmitError::Invalid(invalid)
    }
}
