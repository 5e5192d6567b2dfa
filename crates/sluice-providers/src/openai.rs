//! The OpenAI chat-completions adapter, also used for Azure OpenAI, vLLM, TGI and Ollama.
//! Maps HTTP outcomes onto [`ProviderError`] so the worker can tell retryable failures from permanent ones.

use crate::config::{AuthStyle, ConfigError, EndpointConfig, Secret};
use crate::error::{truncate, ProviderError};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use reqwest::{StatusCode, Url};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Header carrying the job's request id upstream (the simulator counts calls per job by it).
const REQUEST_ID_HEADER: &str = "x-sluice-request-id";

/// One OpenAI-compatible endpoint.
#[derive(Debug)]
pub struct OpenAiCompatible {
    name: String,
    model: String,
    url: Url,
    /// Prebuilt and marked sensitive so the key never shows in Debug output.
    auth: Option<(HeaderName, HeaderValue)>,
    /// Kept to scrub the key from provider error messages that echo it.
    key: Option<Secret>,
    timeout: Duration,
    http: reqwest::Client,
}

impl OpenAiCompatible {
    /// Build the endpoint, reading its key from the environment if `api_key_env` is set.
    pub fn new(config: &EndpointConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        let endpoint = || config.name.clone();
        let key = match (&config.api_key, &config.api_key_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::ConflictingKeys {
                    endpoint: endpoint(),
                })
            }
            (Some(k), None) => Some(k.clone()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    return Err(ConfigError::MissingEnv {
                        endpoint: endpoint(),
                        var: var.clone(),
                    })
                }
            },
            (None, None) => None,
        };
        let auth = match &key {
            None => None,
            Some(k) => {
                let (name, value) = match config.auth {
                    AuthStyle::Bearer => (AUTHORIZATION, format!("Bearer {}", k.expose())),
                    AuthStyle::ApiKeyHeader => {
                        (HeaderName::from_static("api-key"), k.expose().to_owned())
                    }
                };
                let mut value =
                    HeaderValue::from_str(&value).map_err(|_| ConfigError::InvalidKey {
                        endpoint: endpoint(),
                    })?;
                value.set_sensitive(true);
                Some((name, value))
            }
        };
        if config.timeout_secs == 0 {
            return Err(ConfigError::ZeroTimeout {
                endpoint: endpoint(),
            });
        }
        Ok(Self {
            name: config.name.clone(),
            model: config.model.clone(),
            url: completions_url(config)?,
            auth,
            key,
            timeout: Duration::from_secs(config.timeout_secs),
            http,
        })
    }

    /// Build the error for a non-2xx answer.
    fn status_error(
        &self,
        status: StatusCode,
        retry_after: Option<Duration>,
        body: &str,
    ) -> ProviderError {
        let message = self.provider_message(body);
        let status = status.as_u16();
        match status {
            429 => ProviderError::RateLimited {
                retry_after,
                message,
            },
            408 => ProviderError::Timeout,
            500..=599 => ProviderError::Server { status, message },
            _ => ProviderError::Rejected { status, message },
        }
    }

    /// The provider's own error message (`{"error": {"message": ...}}` or similar), else the raw
    /// body; with our key scrubbed out before truncation so no fragment of it survives.
    fn provider_message(&self, body: &str) -> String {
        let json = serde_json::from_str::<serde_json::Value>(body).ok();
        let from_json = json.as_ref().and_then(|v| {
            let e = v.get("error").unwrap_or(v);
            e.get("message")
                .and_then(serde_json::Value::as_str)
                .or_else(|| e.as_str())
        });
        let mut message = from_json.unwrap_or(body.trim()).to_owned();
        if let Some(key) = self.key.as_ref().filter(|k| !k.expose().is_empty()) {
            message = message.replace(key.expose(), "[redacted]");
        }
        truncate(&message)
    }
}

/// `{base_url}/chat/completions` plus the configured query parameters.
fn completions_url(config: &EndpointConfig) -> Result<Url, ConfigError> {
    let bad = |reason: String| ConfigError::BadBaseUrl {
        endpoint: config.name.clone(),
        reason,
    };
    let mut url = Url::parse(&config.base_url).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(bad("must be an http or https URL".into()));
    }
    let path = format!("{}/chat/completions", url.path().trim_end_matches('/'));
    url.set_path(&path);
    if !config.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&config.query);
    }
    Ok(url)
}

/// `retry-after-ms` (more precise, sent by OpenAI) or `retry-after` in seconds; HTTP dates are ignored.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
}

/// Transport failures; the URL is dropped because it may carry credentials in its query.
fn transport_error(e: reqwest::Error) -> ProviderError {
    if e.is_timeout() {
        return ProviderError::Timeout;
    }
    let e = e.without_url();
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    ProviderError::Connection(truncate(&message))
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

#[async_trait::async_trait]
impl Provider for OpenAiCompatible {
    async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        let job = req.job;
        let body = WireRequest {
            model: &self.model,
            messages: &job.messages,
            max_tokens: job.max_tokens,
            temperature: job.temperature,
            top_p: job.top_p,
            stop: job.stop.as_deref(),
        };
        let mut builder = self
            .http
            .post(self.url.clone())
            .timeout(self.timeout)
            .header(REQUEST_ID_HEADER, req.request_id)
            .json(&body);
        if let Some((name, value)) = &self.auth {
            builder = builder.header(name.clone(), value.clone());
        }
        let response = builder.send().await.map_err(transport_error)?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let text = response.text().await.map_err(transport_error)?;
        tracing::debug!(
            endpoint = %self.name,
            request_id = %req.request_id,
            status = status.as_u16(),
            "provider call"
        );
        if !status.is_success() {
            return Err(self.status_error(status, wait, &text));
        }
        let wire: WireResponse = serde_json::from_str(&text)
            .map_err(|e| ProviderError::InvalidResponse(truncate(&e.to_string())))?;
        let Some(choice) = wire.choices.into_iter().next() else {
            return Err(ProviderError::InvalidResponse(
                "no choices in response".into(),
            ));
        };
        let u = wire.usage.unwrap_or_default();
        let prompt_tokens = u.prompt_tokens.unwrap_or(0);
        let completion_tokens = u.completion_tokens.unwrap_or(0);
        Ok(ChatResponse {
            content: choice.message.content.unwrap_or_default(),
            usage: Usage {
                prompt_tokens,
                completion_tokens,
                total_tokens: u
                    .total_tokens
                    .unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
            },
            model: wire.model.unwrap_or_else(|| self.model.clone()),
            finish_reason: choice.finish_reason,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
