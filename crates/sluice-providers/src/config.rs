//! Configuration of provider endpoints and pools as read from the config file, and its errors.
//! Secrets are wrapped so that Debug, Display and error messages can never print them.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;

/// A credential. Prints as `[redacted]`; the value is reachable only through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// The wire format an endpoint speaks.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// OpenAI chat completions, also spoken by Azure OpenAI, vLLM, TGI and Ollama.
    #[default]
    Openai,
    /// Anthropic Messages API: `{base_url}/messages`, e.g. `https://api.anthropic.com/v1`.
    Anthropic,
    /// Google Gemini: `{base_url}/models/{model}:generateContent`, e.g.
    /// `https://generativelanguage.googleapis.com/v1beta`.
    Gemini,
}

/// How the API key is sent.
#[derive(Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthStyle {
    /// `Authorization: Bearer <key>`.
    #[default]
    #[serde(rename = "bearer")]
    Bearer,
    /// `api-key: <key>`, as Azure OpenAI expects.
    #[serde(rename = "api-key")]
    ApiKeyHeader,
}

fn default_timeout() -> u64 {
    60
}

/// One provider + model + API key, with its own request rate.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    pub name: String,
    #[serde(default)]
    pub kind: ProviderKind,
    /// Up to the API version, e.g. `https://api.openai.com/v1`; requests go to `{base_url}/chat/completions`
    /// (or the path of the endpoint's `kind`).
    pub base_url: String,
    /// Upstream model name sent to the provider.
    pub model: String,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Read the key from this environment variable when the endpoint is built.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub auth: AuthStyle,
    /// Extra query parameters, e.g. `api-version` for Azure.
    #[serde(default)]
    pub query: BTreeMap<String, String>,
    /// Requests per minute this endpoint allows.
    pub rpm: u32,
    /// Tokens per minute this endpoint allows (prompt plus completion); none if absent.
    #[serde(default)]
    pub tpm: Option<u32>,
    /// Requests that may go back to back above the steady rate; `None` means one second of rate
    /// in all (`max(1, rpm / 60) - 1` extra), which is what providers' per-second enforcement
    /// holds: one more and the first second after idle earns a 429.
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// Preference among the pool's endpoints that can all serve now: each is chosen in
    /// proportion to its current rate times this weight (default 1). Limits still cap it.
    #[serde(default = "default_weight")]
    pub weight: f64,
    /// US dollars per million input and output tokens: each job's cost, and what tenants'
    /// daily budgets are held against. Without it the endpoint's calls cost nothing.
    #[serde(default)]
    pub price: Option<sluice_core::Price>,
}

fn default_weight() -> f64 {
    1.0
}

impl EndpointConfig {
    /// An endpoint with every optional field at its default (no key, bearer auth, 60 s timeout).
    pub fn new(
        name: impl Into<String>,
        base_url: impl Into<String>,
        model: impl Into<String>,
        rpm: u32,
    ) -> Self {
        Self {
            name: name.into(),
            kind: ProviderKind::default(),
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            api_key_env: None,
            auth: AuthStyle::default(),
            query: BTreeMap::new(),
            rpm,
            tpm: None,
            burst: None,
            timeout_secs: default_timeout(),
            weight: default_weight(),
            price: None,
        }
    }

    /// The burst tolerance the endpoint's limiter uses.
    pub fn effective_burst(&self) -> u32 {
        self.burst.unwrap_or((self.rpm / 60).max(1) - 1)
    }
}

/// A named set of endpoints serving one model alias.
#[derive(Deserialize, Clone, Debug)]
pub struct PoolConfig {
    pub name: String,
    pub endpoints: Vec<EndpointConfig>,
}

/// A configuration that cannot be turned into endpoints, pools or a router.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("endpoint {endpoint}: environment variable {var} (api_key_env) is not set")]
    MissingEnv { endpoint: String, var: String },
    #[error("endpoint {endpoint}: set api_key or api_key_env, not both")]
    ConflictingKeys { endpoint: String },
    #[error("endpoint {endpoint}: the API key is not a valid HTTP header value")]
    InvalidKey { endpoint: String },
    #[error("endpoint {endpoint}: bad base_url: {reason}")]
    BadBaseUrl { endpoint: String, reason: String },
    #[error("endpoint {endpoint}: rpm must be at least 1")]
    ZeroRpm { endpoint: String },
    #[error("endpoint {endpoint}: weight must be a finite number above 0")]
    BadWeight { endpoint: String },
    #[error("endpoint {endpoint}: bad price: {reason}")]
    BadPrice { endpoint: String, reason: String },
    #[error("endpoint {endpoint}: timeout_secs must be at least 1")]
    ZeroTimeout { endpoint: String },
    #[error("pool {pool} has no endpoints")]
    EmptyPool { pool: String },
    #[error("duplicate pool name {0}")]
    DuplicatePool(String),
    #[error("duplicate endpoint name {0}")]
    DuplicateEndpoint(String),
    #[error("route alias {0:?} starts with \"pool:\", which names single pools")]
    ReservedAlias(String),
    #[error("route {alias} points to unknown pool {pool}")]
    UnknownPool { alias: String, pool: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_is_redacted() {
        let s = Secret::new("sk-very-secret");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert_eq!(s.to_string(), "[redacted]");
        assert_eq!(s.expose(), "sk-very-secret");
    }

    #[test]
    fn endpoint_parses_with_defaults_and_hides_key() {
        let json = r#"{"name":"a","base_url":"http://x/v1","model":"m","rpm":60,
                       "api_key":"sk-very-secret","auth":"api-key","query":{"api-version":"2024-06-01"}}"#;
        let e: EndpointConfig = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(e.kind, ProviderKind::Openai);
        for (name, kind) in [
            ("anthropic", ProviderKind::Anthropic),
            ("gemini", ProviderKind::Gemini),
        ] {
            let kind_json = format!(
                r#"{{"name":"a","kind":"{name}","base_url":"http://x","model":"m","rpm":1}}"#
            );
            let e: EndpointConfig =
                serde_json::from_str(&kind_json).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(e.kind, kind);
        }
        assert_eq!(e.auth, AuthStyle::ApiKeyHeader);
        assert_eq!(e.timeout_secs, 60);
        assert_eq!(e.effective_burst(), 0, "rpm 1: one at a time");
        let busy = EndpointConfig::new("b", "http://x", "m", 600);
        assert_eq!(
            busy.effective_burst(),
            9,
            "600 rpm: ten back to back, one second's worth"
        );
        assert!(!format!("{e:?}").contains("very-secret"));
    }

    #[test]
    fn endpoint_rejects_unknown_fields() {
        let json = r#"{"name":"a","base_url":"http://x/v1","model":"m","rpm":60,"rmp":1}"#;
        assert!(serde_json::from_str::<EndpointConfig>(json).is_err());
    }
}
