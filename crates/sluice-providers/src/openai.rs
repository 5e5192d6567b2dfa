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
use sluice_core::{
    Content, FunctionCall, FunctionKind, JobRequest, Message, ResponseFormat, Role, Tool, ToolCall,
    ToolChoice,
};
use std::collections::BTreeMap;
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
        let body = wire_request(&self.model, req.job, stream);
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

/// The job in OpenAI's own vocabulary, which it already is: only the choices OpenAI refuses
/// without tools (`tool_choice`, `parallel_tool_calls`) are dropped when there are none.
fn wire_request<'a>(model: &'a str, job: &'a JobRequest, stream: bool) -> WireRequest<'a> {
    let tools = job.tools.as_slice();
    WireRequest {
        model,
        messages: job.messages.iter().map(WireMessage::from).collect(),
        max_tokens: job.max_tokens,
        temperature: job.temperature,
        top_p: job.top_p,
        stop: job.stop.as_deref(),
        stream,
        // Without it the stream carries no usage, and the limiter's token correction needs it.
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
        seed: job.seed,
        tools,
        tool_choice: job.tool_choice.as_ref().filter(|_| !tools.is_empty()),
        parallel_tool_calls: job.parallel_tool_calls.filter(|_| !tools.is_empty()),
        response_format: job.response_format.as_ref(),
    }
}

/// `{base_url}/chat/completions` plus the configured query parameters.
fn completions_url(config: &EndpointConfig) -> Result<Url, ConfigError> {
    http::endpoint_url(config, "/chat/completions")
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: Vec<WireMessage<'a>>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tools: &'a [Tool],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<&'a ResponseFormat>,
}

/// A message as OpenAI takes it. It differs from [`Message`]'s own encoding in one way: an
/// assistant turn made only of tool calls sends `content: null`, not an empty string.
#[derive(Serialize)]
struct WireMessage<'a> {
    role: Role,
    content: Option<&'a Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    tool_calls: &'a [sluice_core::ToolCall],
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

impl<'a> From<&'a Message> for WireMessage<'a> {
    fn from(m: &'a Message) -> Self {
        let only_calls = m.content.is_empty() && !m.tool_calls.is_empty();
        WireMessage {
            role: m.role,
            content: (!only_calls).then_some(&m.content),
            name: m.name.as_deref(),
            tool_calls: &m.tool_calls,
            tool_call_id: m.tool_call_id.as_deref(),
        }
    }
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
    message: WireAnswer,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireAnswer {
    /// Null when the model answered only with tool calls.
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
}

/// A tool call, whole (in a message) or a piece of one (in a stream's delta); lenient, because
/// OpenAI-compatible servers differ in what they repeat and what they leave out.
#[derive(Deserialize, Default)]
struct WireToolCall {
    /// Ties the pieces of one call together in a stream.
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: WireFunction,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    /// JSON text; some servers send the object itself, which is kept as its JSON text.
    #[serde(default)]
    arguments: Option<Value>,
}

impl WireFunction {
    fn arguments_text(&self) -> Option<String> {
        match &self.arguments {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => Some(other.to_string()),
        }
    }
}

/// Complete calls from a message's `tool_calls`; a call without an id gets `call_<position>`.
fn tool_calls(calls: Vec<WireToolCall>) -> Vec<ToolCall> {
    calls
        .into_iter()
        .enumerate()
        .map(|(i, c)| ToolCall {
            id: c.id.unwrap_or_else(|| format!("call_{i}")),
            kind: FunctionKind::Function,
            function: FunctionCall {
                arguments: c.function.arguments_text().unwrap_or_default(),
                name: c.function.name.unwrap_or_default(),
            },
        })
        .collect()
}

/// Tool calls assembled from a stream's `delta.tool_calls` pieces: the first piece of a call
/// brings its id and name, later pieces with the same index append to its arguments.
#[derive(Default)]
struct CallAssembler {
    calls: BTreeMap<usize, ToolCall>,
}

impl CallAssembler {
    fn add(&mut self, pieces: Vec<WireToolCall>) {
        for (position, piece) in pieces.into_iter().enumerate() {
            // Servers that leave the index out send each call whole, in order.
            let index = piece.index.unwrap_or(position);
            let call = self.calls.entry(index).or_insert_with(|| ToolCall {
                id: String::new(),
                kind: FunctionKind::Function,
                function: FunctionCall {
                    name: String::new(),
                    arguments: String::new(),
                },
            });
            if let Some(id) = piece.id.filter(|id| !id.is_empty()) {
                call.id = id;
            }
            if let Some(arguments) = piece.function.arguments_text() {
                call.function.arguments.push_str(&arguments);
            }
            // The name comes whole in the first piece; some servers repeat it on later ones.
            if call.function.name.is_empty() {
                if let Some(name) = piece.function.name {
                    call.function.name = name;
                }
            }
        }
    }

    fn finish(self) -> Vec<ToolCall> {
        self.calls
            .into_iter()
            .map(|(index, mut call)| {
                if call.id.is_empty() {
                    call.id = format!("call_{index}");
                }
                call
            })
            .collect()
    }
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
    #[serde(default)]
    tool_calls: Vec<WireToolCall>,
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
            tool_calls: tool_calls(choice.message.tool_calls),
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
        let mut calls = CallAssembler::default();
        while let Some(event) = events.next().await? {
            if event.data == "[DONE]" {
                out.tool_calls = calls.finish();
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
                if let Some(delta) = choice.delta {
                    if let Some(text) = delta.content {
                        http::emit(&deltas, &text).await;
                        out.content.push_str(&text);
                    }
                    calls.add(delta.tool_calls);
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

    fn weather_tool() -> Tool {
        serde_json::from_value(serde_json::json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string"}}}}}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn requests_keep_openai_shapes_with_null_content_for_bare_tool_calls() {
        use sluice_core::{ContentPart, ImageUrl, JsonSchemaFormat};
        let call = ToolCall {
            id: "call_1".into(),
            kind: FunctionKind::Function,
            function: FunctionCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into(),
            },
        };
        let image = Content::Parts(vec![
            ContentPart::Text {
                text: "and this?".into(),
            },
            ContentPart::ImageUrl {
                image_url: ImageUrl {
                    url: "data:image/png;base64,AAAA".into(),
                    detail: Some("low".into()),
                },
            },
        ]);
        let job = JobRequest {
            seed: Some(7),
            tools: vec![weather_tool()],
            tool_choice: Some(ToolChoice::Mode(sluice_core::ToolMode::Required)),
            parallel_tool_calls: Some(false),
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: "answer".into(),
                    description: None,
                    schema: Some(serde_json::json!({"type": "object"})),
                    strict: Some(true),
                },
            }),
            ..JobRequest::new(
                "alias",
                vec![
                    Message {
                        name: Some("ann".into()),
                        ..Message::user("weather in Paris?")
                    },
                    Message {
                        tool_calls: vec![call],
                        ..Message::new(Role::Assistant, "")
                    },
                    Message::tool_result("call_1", "sunny"),
                    Message::new(Role::User, image),
                ],
            )
        };
        let body = serde_json::to_value(wire_request("gpt", &job, true)).ok();
        let expected = serde_json::json!({
            "model": "gpt",
            "messages": [
                {"role": "user", "content": "weather in Paris?", "name": "ann"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
                {"role": "user", "content": [{"type": "text", "text": "and this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]}],
            "stream": true, "stream_options": {"include_usage": true}, "seed": 7,
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false,
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer",
                "schema": {"type": "object"}, "strict": true}},
        });
        assert_eq!(body, Some(expected));

        // Without tools, OpenAI refuses tool_choice and parallel_tool_calls: they are dropped.
        let bare = JobRequest {
            tools: Vec::new(),
            tool_choice: Some(ToolChoice::Mode(sluice_core::ToolMode::Auto)),
            response_format: None,
            seed: None,
            ..job
        };
        let body = serde_json::to_value(wire_request("gpt", &bare, false)).unwrap_or_default();
        let keys: Vec<&str> = body
            .as_object()
            .map(|o| o.keys().map(String::as_str).collect())
            .unwrap_or_default();
        assert_eq!(keys, ["messages", "model"]);
    }

    #[test]
    fn answers_with_tool_calls_parse() {
        let wire: WireResponse = serde_json::from_str(
            r#"{"model": "gpt", "choices": [{"finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\":1}"}},
                    {"type": "function", "function": {"name": "g", "arguments": {"y": true}}}]}}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let choice = wire.choices.into_iter().next();
        let calls = choice.map(|c| tool_calls(c.message.tool_calls));
        let call = |id: &str, name: &str, arguments: &str| ToolCall {
            id: id.into(),
            kind: FunctionKind::Function,
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        };
        assert_eq!(
            calls,
            Some(vec![
                call("call_a", "f", r#"{"x":1}"#),
                call("call_1", "g", r#"{"y":true}"#)
            ])
        );
    }

    #[test]
    fn streamed_tool_calls_assemble_by_index() {
        let pieces: Vec<Vec<WireToolCall>> = [
            r#"[{"index": 0, "id": "call_a", "type": "function", "function": {"name": "f", "arguments": ""}}]"#,
            r#"[{"index": 0, "function": {"arguments": "{\"ci"}}]"#,
            r#"[{"index": 1, "id": "call_b", "function": {"name": "g", "arguments": "{}"}},
                {"index": 0, "function": {"name": "f", "arguments": "ty\":\"sim\"}"}}]"#,
        ]
        .iter()
        .map(|p| serde_json::from_str(p).unwrap_or_else(|e| panic!("{e}")))
        .collect();
        let mut calls = CallAssembler::default();
        for p in pieces {
            calls.add(p);
        }
        let calls = calls.finish();
        let summary: Vec<(&str, &str, &str)> = calls
            .iter()
            .map(|c| {
                (
                    c.id.as_str(),
                    c.function.name.as_str(),
                    c.function.arguments.as_str(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [("call_a", "f", r#"{"city":"sim"}"#), ("call_b", "g", "{}")]
        );
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
