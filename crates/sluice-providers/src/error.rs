//! How a provider call can fail, classified so the worker can choose between retry and dead.
//! Messages carry the provider's own error text (truncated) but never a credential.

use std::time::Duration;

/// Longest provider error message kept, in characters.
const MAX_MESSAGE_CHARS: usize = 500;

/// A failed provider call.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// HTTP 429: the provider's limit was hit.
    #[error("rate limited by provider: {message}")]
    RateLimited {
        retry_after: Option<Duration>,
        message: String,
    },
    /// HTTP 5xx.
    #[error("provider server error {status}: {message}")]
    Server { status: u16, message: String },
    /// The request did not complete within the endpoint's timeout.
    #[error("provider request timed out")]
    Timeout,
    /// Connect, reset or another transport failure.
    #[error("connection to provider failed: {0}")]
    Connection(String),
    /// Any other 4xx: the request itself is wrong and retrying will not help.
    #[error("provider rejected the request with {status}: {message}")]
    Rejected { status: u16, message: String },
    /// A 2xx whose body could not be understood.
    #[error("invalid provider response: {0}")]
    InvalidResponse(String),
}

impl ProviderError {
    /// Whether another attempt (later, maybe elsewhere) can succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, ProviderError::Rejected { .. })
    }

    /// The wait the provider asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::RateLimited { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status the provider answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ProviderError::RateLimited { .. } => Some(429),
            ProviderError::Server { status, .. } | ProviderError::Rejected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// Cut `s` to at most [`MAX_MESSAGE_CHARS`] characters, marking the cut.
/// A provider's answer that is not the JSON its format promises.
pub(crate) fn invalid_json(e: serde_json::Error) -> ProviderError {
    ProviderError::InvalidResponse(truncate(&e.to_string()))
}

pub(crate) fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let rl = ProviderError::RateLimited {
            retry_after: Some(Duration::from_secs(2)),
            message: String::new(),
        };
        assert!(rl.is_retryable());
        assert_eq!(rl.retry_after(), Some(Duration::from_secs(2)));
        assert_eq!(rl.status(), Some(429));
        let rej = ProviderError::Rejected {
            status: 400,
            message: String::new(),
        };
        assert!(!rej.is_retryable());
        assert_eq!(rej.status(), Some(400));
        assert!(ProviderError::Timeout.is_retryable());
        assert_eq!(ProviderError::Timeout.status(), None);
    }

    #[test]
    fn truncates_on_char_boundaries() {
        let long = "é".repeat(600);
        let t = truncate(&long);
        assert_eq!(t.chars().count(), MAX_MESSAGE_CHARS + 3);
        assert_eq!(truncate("short"), "short");
    }
}
