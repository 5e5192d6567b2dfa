//! HTTP plumbing every adapter shares: keys, URLs, error classification, streamed reads and SSE parsing.
//! Kept in one place so all wire formats time out, fail and redact keys in the same way.

use crate::config::{ConfigError, EndpointConfig, Secret};
use crate::error::{truncate, ProviderError};
use crate::RateHeaders;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{RequestBuilder, Response, Url};
use sluice_core::sse::{SseEvent, SseParser};
use std::collections::VecDeque;
use std::time::Duration;

/// Header carrying the job's request id upstream (the simulator counts calls per job by it).
pub(crate) const REQUEST_ID_HEADER: &str = "x-sluice-request-id";

/// The endpoint's key from `api_key` or the `api_key_env` variable, read once at build time.
pub(crate) fn resolve_key(config: &EndpointConfig) -> Result<Option<Secret>, ConfigError> {
    match (&config.api_key, &config.api_key_env) {
        (Some(_), Some(_)) => Err(ConfigError::ConflictingKeys {
            endpoint: config.name.clone(),
        }),
        (Some(k), None) => Ok(Some(k.clone())),
        (None, Some(var)) => match std::env::var(var) {
            Ok(v) if !v.is_empty() => Ok(Some(Secret::new(v))),
            _ => Err(ConfigError::MissingEnv {
                endpoint: config.name.clone(),
                var: var.clone(),
            }),
        },
        (None, None) => Ok(None),
    }
}

/// A header value marked sensitive, so reqwest and our Debug output never show it.
pub(crate) fn secret_header(
    config: &EndpointConfig,
    value: &str,
) -> Result<HeaderValue, ConfigError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| ConfigError::InvalidKey {
        endpoint: config.name.clone(),
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The endpoint's key as a sensitive header value, for providers that send it in a header of
/// their own (Anthropic's `x-api-key`, Gemini's `x-goog-api-key`).
pub(crate) fn key_header(
    config: &EndpointConfig,
    key: Option<&Secret>,
) -> Result<Option<HeaderValue>, ConfigError> {
    key.map(|k| secret_header(config, k.expose())).transpose()
}

pub(crate) fn check_timeout(config: &EndpointConfig) -> Result<Duration, ConfigError> {
    if config.timeout_secs == 0 {
        return Err(ConfigError::ZeroTimeout {
            endpoint: config.name.clone(),
        });
    }
    Ok(Duration::from_secs(config.timeout_secs))
}

/// `{base_url}{suffix}` plus the configured query parameters; only http(s) base URLs.
pub(crate) fn endpoint_url(config: &EndpointConfig, suffix: &str) -> Result<Url, ConfigError> {
    let bad = |reason: String| ConfigError::BadBaseUrl {
        endpoint: config.name.clone(),
        reason,
    };
    let mut url = Url::parse(&config.base_url).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.cannot_be_a_base() {
        return Err(bad("must be an http or https URL".into()));
    }
    let path = format!("{}{suffix}", url.path().trim_end_matches('/'));
    url.set_path(&path);
    if !config.query.is_empty() {
        url.query_pairs_mut().extend_pairs(&config.query);
    }
    Ok(url)
}

/// `retry-after-ms` (more precise, sent by OpenAI) or `retry-after` in seconds; HTTP dates are ignored.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<f64> {
        let v: f64 = headers.get(name)?.to_str().ok()?.trim().parse().ok()?;
        (v.is_finite() && v >= 0.0).then_some(v)
    };
    number("retry-after-ms")
        .map(|ms| ms / 1000.0)
        .or_else(|| number("retry-after"))
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
}

/// The `retryDelay` of a `google.rpc.RetryInfo` error detail (`"5s"`, `"0.5s"`), which Gemini
/// may send instead of a `retry-after` header.
fn retry_delay(body: &str) -> Option<Duration> {
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v.get("error")?
        .get("details")?
        .as_array()?
        .iter()
        .find_map(|d| {
            let secs: f64 = d
                .get("retryDelay")?
                .as_str()?
                .strip_suffix('s')?
                .parse()
                .ok()?;
            Duration::try_from_secs_f64(secs).ok()
        })
}

/// Transport failures; the URL is dropped because it may carry credentials in its query.
pub(crate) fn transport_error(e: reqwest::Error) -> ProviderError {
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

/// Turns provider error answers into [`ProviderError`]s with our key scrubbed out.
#[derive(Debug)]
pub(crate) struct ErrorMapper {
    /// Kept only to scrub the key from provider messages that echo it.
    key: Option<Secret>,
}

impl ErrorMapper {
    pub(crate) fn new(key: Option<Secret>) -> Self {
        Self { key }
    }

    /// The same classification for every provider: 429 limited, 408 timeout, 5xx (including
    /// Anthropic's 529 "overloaded") server trouble, any other 4xx a permanent rejection.
    pub(crate) fn status_error(
        &self,
        status: u16,
        retry_after: Option<Duration>,
        body: &str,
    ) -> ProviderError {
        let message = self.message(body);
        match status {
            429 => ProviderError::RateLimited {
                retry_after: retry_after.or_else(|| retry_delay(body)),
                message,
            },
            408 => ProviderError::Timeout,
            500..=599 => ProviderError::Server { status, message },
            _ => ProviderError::Rejected { status, message },
        }
    }

    /// The provider's own error message (`{"error": {"message": ...}}` in all three formats),
    /// else the raw body; the key is scrubbed before truncation so no fragment of it survives.
    pub(crate) fn message(&self, body: &str) -> String {
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

/// The request-budget headers of an answer: OpenAI's `x-ratelimit-*-requests` (reset as a
/// duration like `6m0s` or `120ms`) or Anthropic's `anthropic-ratelimit-requests-*` (reset as an
/// RFC 3339 time). `None` when the provider sent neither.
pub(crate) fn rate_headers(headers: &HeaderMap) -> Option<RateHeaders> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let remaining = text("x-ratelimit-remaining-requests")
        .or_else(|| text("anthropic-ratelimit-requests-remaining"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    let reset = text("x-ratelimit-reset-requests")
        .and_then(parse_openai_duration)
        .or_else(|| {
            text("anthropic-ratelimit-requests-reset").and_then(|v| {
                let at = chrono::DateTime::parse_from_rfc3339(v.trim()).ok()?;
                (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                    .to_std()
                    .ok()
            })
        });
    let remaining_tokens = text("x-ratelimit-remaining-tokens")
        .or_else(|| text("anthropic-ratelimit-tokens-remaining"))
        .and_then(|v| v.trim().parse::<u64>().ok());
    (remaining.is_some() || reset.is_some() || remaining_tokens.is_some()).then_some(RateHeaders {
        remaining,
        reset,
        remaining_tokens,
    })
}

/// OpenAI's reset durations: number-unit pairs such as `1s`, `6m0s`, `1.5s`, `120ms`, `2h3m`.
fn parse_openai_duration(text: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..split].parse().ok()?;
        rest = &rest[split..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let seconds = match &rest[..unit_len] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += value * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// How one endpoint's calls travel: its name for logs, its error mapping (which knows the key
/// to scrub from messages) and its timeout.
#[derive(Debug)]
pub(crate) struct Transport {
    pub(crate) name: String,
    pub(crate) errors: ErrorMapper,
    pub(crate) timeout: Duration,
}

impl Transport {
    pub(crate) fn new(config: &EndpointConfig, key: Option<Secret>) -> Result<Self, ConfigError> {
        Ok(Self {
            name: config.name.clone(),
            errors: ErrorMapper::new(key),
            timeout: check_timeout(config)?,
        })
    }

    /// [`send`] through this endpoint.
    pub(crate) async fn send(
        &self,
        builder: RequestBuilder,
        request_id: &str,
    ) -> Result<(String, Option<RateHeaders>), ProviderError> {
        send(builder, self.timeout, &self.errors, &self.name, request_id).await
    }

    /// [`open_stream`] through this endpoint.
    pub(crate) async fn open_stream(
        &self,
        builder: RequestBuilder,
        request_id: &str,
    ) -> Result<SseStream, ProviderError> {
        open_stream(builder, self.timeout, &self.errors, &self.name, request_id).await
    }
}

/// Sends a non-streaming call and returns the body of a 2xx answer.
/// `timeout` bounds the whole exchange, since the answer is useless until it is complete.
pub(crate) async fn send(
    builder: RequestBuilder,
    timeout: Duration,
    errors: &ErrorMapper,
    endpoint: &str,
    request_id: &str,
) -> Result<(String, Option<RateHeaders>), ProviderError> {
    let response = builder
        .timeout(timeout)
        .send()
        .await
        .map_err(transport_error)?;
    let status = response.status();
    let wait = retry_after(response.headers());
    let rate = rate_headers(response.headers());
    let text = response.text().await.map_err(transport_error)?;
    tracing::debug!(
        endpoint,
        request_id,
        status = status.as_u16(),
        "provider call"
    );
    if !status.is_success() {
        return Err(errors.status_error(status.as_u16(), wait, &text));
    }
    Ok((text, rate))
}

/// Sends a streaming call and returns its SSE events, or the error of a non-2xx answer.
///
/// `idle` bounds the wait for the headers and then for each chunk rather than the whole
/// exchange: a long generation that keeps sending is healthy, a silent one is not.
pub(crate) async fn open_stream(
    builder: RequestBuilder,
    idle: Duration,
    errors: &ErrorMapper,
    endpoint: &str,
    request_id: &str,
) -> Result<SseStream, ProviderError> {
    let response = tokio::time::timeout(idle, builder.send())
        .await
        .map_err(|_| ProviderError::Timeout)?
        .map_err(transport_error)?;
    let status = response.status();
    tracing::debug!(
        endpoint,
        request_id,
        status = status.as_u16(),
        "provider stream"
    );
    if !status.is_success() {
        let wait = retry_after(response.headers());
        let text = tokio::time::timeout(idle, response.text())
            .await
            .map_err(|_| ProviderError::Timeout)?
            .map_err(transport_error)?;
        return Err(errors.status_error(status.as_u16(), wait, &text));
    }
    Ok(SseStream {
        rate: rate_headers(response.headers()),
        response,
        idle,
        parser: SseParser::default(),
        ready: VecDeque::new(),
        ended: false,
    })
}

/// The events of a streamed answer, read chunk by chunk as they arrive.
pub(crate) struct SseStream {
    rate: Option<RateHeaders>,
    response: Response,
    idle: Duration,
    parser: SseParser,
    ready: VecDeque<SseEvent>,
    ended: bool,
}

impl SseStream {
    /// The rate-limit headers the stream's answer came with.
    pub(crate) fn rate(&self) -> Option<RateHeaders> {
        self.rate
    }

    /// The next event; `None` once the body has ended.
    pub(crate) async fn next(&mut self) -> Result<Option<SseEvent>, ProviderError> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Ok(Some(event));
            }
            if self.ended {
                return Ok(None);
            }
            let chunk = tokio::time::timeout(self.idle, self.response.chunk())
                .await
                .map_err(|_| ProviderError::Timeout)?
                .map_err(transport_error)?;
            match chunk {
                Some(bytes) => self.parser.push(&bytes, &mut self.ready),
                None => {
                    self.parser.finish(&mut self.ready);
                    self.ended = true;
                }
            }
        }
    }
}

/// Sends one delta to the caller. A closed receiver means nobody listens for deltas any more;
/// the call still completes and returns the whole response, so that is not an error.
pub(crate) async fn emit(deltas: &tokio::sync::mpsc::Sender<String>, text: &str) {
    if !text.is_empty() {
        let _ = deltas.send(text.to_owned()).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {

    #[test]
    fn openai_reset_durations_parse() {
        assert_eq!(parse_openai_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_openai_duration("6m0s"),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            parse_openai_duration("120ms"),
            Some(Duration::from_millis(120))
        );
        assert_eq!(
            parse_openai_duration("1.5s"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_openai_duration("2h3m"),
            Some(Duration::from_secs(7380))
        );
        assert_eq!(parse_openai_duration(""), None);
        assert_eq!(parse_openai_duration("soon"), None);
        assert_eq!(parse_openai_duration("5 parsecs"), None);
    }

    #[test]
    fn rate_headers_read_openai_and_anthropic() {
        let mut h = HeaderMap::new();
        assert_eq!(rate_headers(&h), None);
        h.insert(
            "x-ratelimit-remaining-requests",
            HeaderValue::from_static("0"),
        );
        h.insert(
            "x-ratelimit-reset-requests",
            HeaderValue::from_static("750ms"),
        );
        assert_eq!(
            rate_headers(&h),
            Some(RateHeaders {
                remaining: Some(0),
                reset: Some(Duration::from_millis(750)),
                remaining_tokens: None,
            })
        );
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from_static("1234"),
        );
        assert_eq!(
            rate_headers(&h).and_then(|r| r.remaining_tokens),
            Some(1234)
        );
        let mut a = HeaderMap::new();
        a.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("7"),
        );
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc3339();
        a.insert(
            "anthropic-ratelimit-requests-reset",
            HeaderValue::from_str(&later).unwrap(),
        );
        let rate = rate_headers(&a).unwrap();
        assert_eq!(rate.remaining, Some(7));
        assert!(rate.reset.unwrap() > Duration::from_secs(25));
    }
    use super::*;

    #[test]
    fn classification_is_shared() {
        let m = ErrorMapper::new(Some(Secret::new("sk-abcdef")));
        assert!(matches!(
            m.status_error(529, None, r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#),
            ProviderError::Server { status: 529, ref message } if message == "Overloaded"
        ));
        assert_eq!(
            m.status_error(403, None, r#"{"error":{"code":403,"message":"bad key sk-abcdef","status":"PERMISSION_DENIED"}}"#),
            ProviderError::Rejected {
                status: 403,
                message: "bad key [redacted]".into()
            }
        );
        assert_eq!(m.status_error(408, None, ""), ProviderError::Timeout);
        let body = r#"{"error":{"code":429,"details":[{"@type":"x"},{"retryDelay":"2.5s"}]}}"#;
        assert_eq!(
            m.status_error(429, None, body).retry_after(),
            Some(Duration::from_millis(2500))
        );
        // The header wins over the body.
        assert_eq!(
            m.status_error(429, Some(Duration::from_secs(1)), body)
                .retry_after(),
            Some(Duration::from_secs(1))
        );
        assert_eq!(m.status_error(429, None, "{}").retry_after(), None);
    }
}
