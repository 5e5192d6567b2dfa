//! How every Sluice crate reaches Redis: one URL (TLS with `rediss://`), one key prefix under
//! which a deployment's keys live, and the connection pool. Quotas, the shared limiter and the event bus use it.
//!
//! Nothing here connects eagerly: [`Redis::open`] only checks the URL and the prefix, so a Redis
//! that is down at start is each user's to ride out (they all fail open or degrade).
//! The URL is kept private and shown only with its password hidden.

use sluice_core::redact_url;
use std::fmt;

pub use deadpool_redis::{redis, Connection, Pool};

/// Why a Redis handle could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The URL does not parse (the URL in the message has its password hidden).
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    /// The key prefix is empty: every key of a deployment lives under `{prefix}:`.
    #[error("the Redis key prefix must not be empty")]
    EmptyPrefix,
    /// The connection pool could not be built.
    #[error("Redis connection pool: {0}")]
    Pool(String),
}

/// One Redis server and the key prefix a deployment uses on it. Cheap to clone.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    /// The URL with any password hidden, for logs and errors.
    shown_url: String,
    prefix: String,
}

impl Redis {
    /// Redis at `url` (`redis://` or `rediss://` for TLS; `#insecure` skips the certificate
    /// check where the `insecure-tls` feature allows it), with keys under `{prefix}:`.
    /// Checks the URL and the prefix only; nothing connects yet.
    pub fn open(url: &str, prefix: &str) -> Result<Redis, SetupError> {
        if prefix.is_empty() {
            return Err(SetupError::EmptyPrefix);
        }
        let shown_url = redact_url(url);
        let client = redis::Client::open(url).map_err(|e| SetupError::InvalidUrl {
            url: shown_url.clone(),
            reason: e.to_string(),
        })?;
        Ok(Redis {
            client,
            shown_url,
            prefix: prefix.to_owned(),
        })
    }

    /// A client for connections outside the pool: pub/sub, or one long-lived multiplexed
    /// connection that keeps a process's messages in order.
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A pool of multiplexed connections on the Tokio runtime, each made when first needed.
    /// `max_size` caps it; `None` takes deadpool's default (four per CPU).
    pub fn pool(&self, max_size: Option<usize>) -> Result<Pool, SetupError> {
        let manager = deadpool_redis::Manager::new(self.client.get_connection_info().clone())
            .map_err(|e| SetupError::InvalidUrl {
                url: self.shown_url.clone(),
                reason: e.to_string(),
            })?;
        let config = max_size.map_or_else(
            deadpool_redis::PoolConfig::default,
            deadpool_redis::PoolConfig::new,
        );
        Pool::builder(manager)
            .config(config)
            .runtime(deadpool_redis::Runtime::Tokio1)
            .build()
            .map_err(|e| SetupError::Pool(e.to_string()))
    }

    /// The key `name` under this deployment's prefix: `{prefix}:{name}`.
    pub fn key(&self, name: impl fmt::Display) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// The key prefix, without the separator.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The URL with any password hidden, for logs.
    pub fn shown_url(&self) -> &str {
        &self.shown_url
    }
}

impl fmt::Debug for Redis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Not derived: the client's Debug would print the connection info, password included.
        f.debug_struct("Redis")
            .field("url", &self.shown_url)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_the_prefix() {
        let redis = Redis::open("redis://127.0.0.1:6379", "sluice").unwrap();
        assert_eq!(redis.key("events"), "sluice:events");
        assert_eq!(redis.key(format_args!("gcra:{}", "e1")), "sluice:gcra:e1");
        assert_eq!(redis.prefix(), "sluice");
    }

    #[test]
    fn bad_setups_are_refused_without_showing_the_password() {
        assert!(matches!(
            Redis::open("redis://127.0.0.1", ""),
            Err(SetupError::EmptyPrefix)
        ));
        let err = Redis::open("http://user:s3cret@host", "p").unwrap_err();
        let shown = err.to_string();
        assert!(matches!(err, SetupError::InvalidUrl { .. }), "{err:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("http://user:***@host"), "{shown}");
    }

    #[test]
    fn debug_hides_the_password() {
        let redis = Redis::open("rediss://user:s3cret@host:6380/0", "p").unwrap();
        let shown = format!("{redis:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("rediss://user:***@host:6380/0"), "{shown}");
        assert_eq!(redis.shown_url(), "rediss://user:***@host:6380/0");
    }
}
