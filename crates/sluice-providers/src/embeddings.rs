//! A client for an OpenAI-compatible embeddings endpoint, which the semantic cache embeds prompts with.
//! It shares the chat adapters' key handling, URL checks, timeouts and error classification.

use crate::config::{ConfigError, EndpointConfig, Secret};
use crate::error::{invalid_json, ProviderError};
use crate::http;
use reqwest::header::{HeaderValue, AUTHORIZATION};
use reqwest::Url;
use serde::{Deserialize, Serialize};

/// The name configuration errors and logs give the embeddings endpoint.
const NAME: &str = "embeddings";

fn default_timeout() -> u64 {
    10
}

/// Where and how prompts are embedded.
#[derive(Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingsConfig {
    /// Up to the API version, e.g. `https://api.openai.com/v1`; requests go to `{base_url}/embeddings`.
    pub base_url: String,
    /// Upstream embedding model, e.g. `text-embedding-3-small`.
    pub model: String,
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Read the key from this environment variable when the client is built.
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Bounds each whole call; short, since a prompt waits for it before it is queued.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
}

impl EmbeddingsConfig {
    /// A config with no key and the default 10 s timeout.
    pub fn new(base_url: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            model: model.into(),
            api_key: None,
            api_key_env: None,
            timeout_secs: default_timeout(),
        }
    }

    /// The same settings as a chat endpoint, so the chat adapters' checks of keys, URLs and
    /// timeouts apply unchanged (their errors name the endpoint `embeddings`).
    fn as_endpoint(&self) -> EndpointConfig {
        let mut e = EndpointConfig::new(NAME, self.base_url.clone(), self.model.clone(), 1);
        e.api_key = self.api_key.clone();
        e.api_key_env = self.api_key_env.clone();
        e.timeout_secs = self.timeout_secs;
        e
    }
}

/// One embeddings endpoint.
#[derive(Debug)]
pub struct Embeddings {
    transport: http::Transport,
    model: String,
    url: Url,
    /// Prebuilt and marked sensitive so the key never shows in Debug output.
    auth: Option<HeaderValue>,
    http: reqwest::Client,
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    input: &'a str,
    encoding_format: &'static str,
}

#[derive(Deserialize)]
struct WireResponse {
    data: Vec<WireEmbedding>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: Option<u64>,
    embedding: Vec<f32>,
}

impl Embeddings {
    /// Build the client, reading its key from the environment if `api_key_env` is set.
    pub fn new(config: &EmbeddingsConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        let endpoint = config.as_endpoint();
        let key = http::resolve_key(&endpoint)?;
        let auth = key
            .as_ref()
            .map(|k| http::secret_header(&endpoint, &format!("Bearer {}", k.expose())))
            .transpose()?;
        Ok(Self {
            transport: http::Transport::new(&endpoint, key)?,
            model: config.model.clone(),
            url: http::endpoint_url(&endpoint, "/embeddings")?,
            auth,
            http,
        })
    }

    /// The embedding of `text`. Failures are classified like chat calls: 429, 5xx, timeouts and
    /// transport errors are retryable, other 4xx are [`ProviderError::Rejected`], and a 2xx
    /// without one finite, non-empty vector is [`ProviderError::InvalidResponse`].
    pub async fn embed(&self, text: &str) -> Result<Vec<f32>, ProviderError> {
        let body = WireRequest {
            model: &self.model,
            input: text,
            encoding_format: "float",
        };
        let mut builder = self.http.post(self.url.clone()).json(&body);
        if let Some(auth) = &self.auth {
            builder = builder.header(AUTHORIZATION, auth.clone());
        }
        // No job has a request id yet when its prompt is embedded.
        let (text, _rate) = self.transport.send(builder, "").await?;
        let wire: WireResponse = serde_json::from_str(&text).map_err(invalid_json)?;
        vector_of(wire)
    }
}

/// The one vector of an answer to a one-input request.
fn vector_of(wire: WireResponse) -> Result<Vec<f32>, ProviderError> {
    let invalid = |m: &str| Err(ProviderError::InvalidResponse(m.to_owned()));
    let mut data = wire.data.into_iter();
    let (Some(item), None) = (data.next(), data.next()) else {
        return invalid("expected exactly one embedding in data");
    };
    if item.index.is_some_and(|i| i != 0) {
        return invalid("the embedding's index is not 0");
    }
    if item.embedding.is_empty() {
        return invalid("empty embedding");
    }
    if item.embedding.iter().any(|x| !x.is_finite()) {
        return invalid("embedding has a non-finite component");
    }
    Ok(item.embedding)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(body: &str) -> Result<Vec<f32>, ProviderError> {
        vector_of(serde_json::from_str(body).map_err(invalid_json)?)
    }

    #[test]
    fn config_parses_with_defaults_and_hides_key() {
        let c: EmbeddingsConfig = serde_json::from_str(
            r#"{"base_url":"http://x/v1","model":"text-embedding-3-small","api_key":"sk-very-secret"}"#,
        )
        .unwrap();
        assert_eq!(c.timeout_secs, 10);
        assert!(!format!("{c:?}").contains("very-secret"));
        let e = Embeddings::new(&c, reqwest::Client::new()).unwrap();
        assert!(!format!("{e:?}").contains("very-secret"));
        assert_eq!(e.url.as_str(), "http://x/v1/embeddings");
        assert!(serde_json::from_str::<EmbeddingsConfig>(
            r#"{"base_url":"http://x/v1","model":"m","timeout":3}"#
        )
        .is_err());
    }

    #[test]
    fn config_errors_are_the_endpoint_ones() {
        let build = |c: &EmbeddingsConfig| Embeddings::new(c, reqwest::Client::new()).err();
        let mut c = EmbeddingsConfig::new("ftp://x", "m");
        assert!(matches!(build(&c), Some(ConfigError::BadBaseUrl { .. })));
        c.base_url = "http://x/v1".into();
        c.timeout_secs = 0;
        assert_eq!(
            build(&c),
            Some(ConfigError::ZeroTimeout {
                endpoint: "embeddings".into()
            })
        );
        c.timeout_secs = 10;
        c.api_key = Some(Secret::new("sk-a"));
        c.api_key_env = Some("X".into());
        assert_eq!(
            build(&c),
            Some(ConfigError::ConflictingKeys {
                endpoint: "embeddings".into()
            })
        );
        c.api_key = None;
        c.api_key_env = Some("SLUICE_TEST_SURELY_UNSET_VAR".into());
        assert!(matches!(build(&c), Some(ConfigError::MissingEnv { .. })));
        c.api_key_env = None;
        c.api_key = Some(Secret::new("bad\nkey"));
        assert!(matches!(build(&c), Some(ConfigError::InvalidKey { .. })));
    }

    #[test]
    fn answers_are_checked() {
        let ok = r#"{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.6,-0.8]}],
                     "model":"m","usage":{"prompt_tokens":1,"total_tokens":1}}"#;
        assert_eq!(parse(ok).unwrap(), vec![0.6, -0.8]);
        // Servers that leave out everything but the vector still work.
        assert_eq!(parse(r#"{"data":[{"embedding":[1]}]}"#).unwrap(), vec![1.0]);
        for bad in [
            "not json",
            "{}",
            r#"{"data":[]}"#,
            r#"{"data":[{"embedding":[]}]}"#,
            r#"{"data":[{"embedding":"AACAPw=="}]}"#,
            r#"{"data":[{"index":1,"embedding":[1]}]}"#,
            r#"{"data":[{"embedding":[1]},{"embedding":[1]}]}"#,
            r#"{"data":[{"embedding":[1e39]}]}"#,
        ] {
            assert!(
                matches!(parse(bad), Err(ProviderError::InvalidResponse(_))),
                "{bad}: {:?}",
                parse(bad)
            );
        }
    }
}
