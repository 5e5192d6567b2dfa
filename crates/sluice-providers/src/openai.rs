//! The OpenAI chat-completions adapter, also used for Azure OpenAI, vLLM, TGI and Ollama.
//! Maps HTTP outcomes onto [`ProviderError`] so the worker can tell retryable failures from permanent ones.

use crate::config::{AuthStyle, ConfigError, EndpointConfig};
use crate::error::{invalid_json, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::{HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::{RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
#[cfg(test)]
use std::time::Duration;
use tokio::sync::mpsc;

/// One OpenAI-compatible endpoint.
#[derive(Debug)]
pub struct OpenAiCompatible {
    transport: http::Transport,
    model: String,
    url: Url,
    /// Prebuilt and marked sensitive so the key never shows in Debug output.
    auth: Option<(HeaderName, HeaderValue)>,
    http: reqwest::Client,
}

impl OpenAiCompatible {
    /// Build the endpoint, reading its key from the environment if `api_key_env` is set.
    pub fn new(config: &EndpointConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        let key = http::resolve_key(config)?;
        let auth = match &key {
            None => None,
            Some(k) => {
                let (name, value) = match config.auth {
                    AuthStyle::Bearer => (AUTHORIZATION, format!("Bearer {}", k.expose())),
                    AuthStyle::ApiKeyHeader => {
                        (HeaderName::from_static("api-key"), k.expose().to_owned())
                    }
                };
                Some((name, http::secret_header(config, &value)?))
            }
        };
        Ok(Self {
            transport: http::Transport::new(config, key)?,
            model: config.model.clone(),
            url: completions_url(config)?,
            auth,
            http,
        })
    }

    /// Build the error for a non-2xx answer.
    #[cfg(test)]
    fn status_error(
        &self,
        status: reqwest::StatusCode,
        retry_after: Option<Duration>,
        body: &str,
    ) -> ProviderError {
        self.transport
            .errors
            .status_error(status.as_u16(), retry_after, body)
    }

    fn request(&self, req: ChatRequest<'_>, stream: bool) -> RequestBuilder {
        let job = req.job;
        let body = WireRequest {
            model: &self.model,
            messages: &job.messages,
            max_tokens: job.max_tokens,
            temperature: job.temperature,
            top_p: job.top_p,
            stop: job.stop.as_deref(),
            stream,
            // Without it the stream carries no usage, and the limiter's token correction needs it.
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        let mut builder = self
            .http
            .post(self.url.clone())
            .header(REQUEST_ID_HEADER, req.request_id)
            .json(&body);
        if let Some((name, value)) = &self.auth {
            builder = builder.header(name.clone(), value.clone());
        }
        builder
    }
}

/// `{base_url}/chat/completions` plus the configured query parameters.
fn completions_url(config: &EndpointConfig) -> Result<Url, ConfigError> {
    http::endpoint_url(config, "/chat/completions")
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: &'a [sluice_core::Message],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    message: WireMessage,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireMessage {
    /// Null when the model answered only with tool calls.
    #[serde(default)]
    content: Option<String>,
}

/// Lenient: some OpenAI-compatible servers omit fields or send nulls.
#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u32>,
    #[serde(default)]
    completion_tokens: Option<u32>,
    #[serde(default)]
    total_tokens: Option<u32>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        Usage::new(u.prompt_tokens, u.completion_tokens, u.total_tokens)
    }
}

/// One `chat.completion.chunk`; everything optional because servers differ in what they send.
#[derive(Deserialize)]
struct WireChunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
    /// Some servers report a failure mid-stream as a chunk with an `error` object.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    delta: Option<WireDelta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    #[serde(default)]
    content: Option<String>,
}

#[async_trait::async_trait]
impl Provider for OpenAiCompatible {
    async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        let builder = self.request(req, false);
        let (text, rate) = self.transport.send(builder, req.request_id).await?;
        let wire: WireResponse = serde_json::from_str(&text).map_err(invalid_json)?;
        let Some(choice) = wire.choices.into_iter().next() else {
            return Err(ProviderError::InvalidResponse(
                "no choices in response".into(),
            ));
        };
        Ok(ChatResponse {
            tool_calls: Vec::new(),
            rate,
            content: choice.message.content.unwrap_or_default(),
            usage: wire.usage.unwrap_or_default().into(),
            model: wire.model.unwrap_or_else(|| self.model.clone()),
            finish_reason: choice.finish_reason,
        })
    }

    async fn chat_stream(
        &self,
        req: ChatRequest<'_>,
        deltas: mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        let builder = self.request(req, true);
        let mut events = self.transport.open_stream(builder, req.request_id).await?;
        let mut out = ChatResponse::streaming(self.model.clone(), events.rate());
        while let Some(event) = events.next().await? {
            if event.data == "[DONE]" {
                return Ok(out);
            }
            let chunk: WireChunk = serde_json::from_str(&event.data).map_err(invalid_json)?;
            if let Some(error) = chunk.error {
                // No status travels with a mid-stream error; the provider failed, so retry.
                return Err(self
                    .transport
                    .errors
                    .status_error(500, None, &error.to_string()));
            }
            if let Some(model) = chunk.model {
                out.model = model;
            }
            if let Some(usage) = chunk.usage {
                out.usage = usage.into();
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.and_then(|d| d.content) {
                    http::emit(&deltas, &text).await;
                    out.content.push_str(&text);
                }
                if choice.finish_reason.is_some() {
                    out.finish_reason = choice.finish_reason;
                }
            }
        }
        // A cut connection, not a bad answer: another attempt can succeed.
        Err(ProviderError::Connection(
            "stream ended before [DONE]".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;
    use reqwest::StatusCode;

    fn config() -> EndpointConfig {
        let mut c = EndpointConfig::new("e", "https://example.test/openai/v1/", "m", 60);
        c.query.insert("api-version".into(), "2024-06-01".into());
        c.api_key = Some(Secret::new("sk-abcdef"));
        c
    }

    #[test]
    fn url_joins_path_and_query() {
        let url = completions_url(&config()).map(|u| u.to_string());
        assert_eq!(
            url.as_deref(),
            Ok("https://example.test/openai/v1/chat/completions?api-version=2024-06-01")
        );
        let mut bad = config();
        bad.base_url = "ftp://x".into();
        assert!(matches!(
            completions_url(&bad),
            Err(ConfigError::BadBaseUrl { .. })
        ));
        bad.base_url = "not a url".into();
        assert!(matches!(
            completions_url(&bad),
            Err(ConfigError::BadBaseUrl { .. })
        ));
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        use crate::http::retry_after;
        use reqwest::header::HeaderMap;
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        h.insert("retry-after-ms", HeaderValue::from_static("soon"));
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }

    #[test]
    fn error_messages_scrub_the_key_and_keep_provider_text() {
        let p = OpenAiCompatible::new(&config(), reqwest::Client::new());
        let Ok(p) = p else {
            panic!("config should build")
        };
        let body = r#"{"error":{"message":"Incorrect API key provided: sk-abcdef","type":"auth"}}"#;
        let e = p.status_error(StatusCode::UNAUTHORIZED, None, body);
        assert_eq!(
            e,
            ProviderError::Rejected {
                status: 401,
                message: "Incorrect API key provided: [redacted]".into()
            }
        );
        assert!(!format!("{p:?}").contains("abcdef"));
        let e = p.status_error(StatusCode::BAD_GATEWAY, None, "upstream down\n");
        assert_eq!(e.to_string(), "provider server error 502: upstream down");
    }

    #[test]
    fn missing_env_key_is_a_config_error() {
        let mut c = EndpointConfig::new("e", "http://x/v1", "m", 60);
        c.api_key_env = Some("SLUICE_TEST_SURELY_UNSET_VAR".into());
        assert_eq!(
            OpenAiCompatible::new(&c, reqwest::Client::new()).err(),
            Some(ConfigError::MissingEnv {
                endpoint: "e".into(),
                var: "SLUICE_TEST_SURELY_UNSET_VAR".into()
            })
        );
    }
}
