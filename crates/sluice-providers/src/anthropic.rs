//! The Anthropic Messages API adapter (`POST {base_url}/messages`), plain and streamed.
//! System messages move to the top-level `system`; stop reasons are reported in OpenAI's words.

use crate::config::{ConfigError, EndpointConfig};
use crate::error::{invalid_json, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::{JobRequest, Role};
use tokio::sync::mpsc;

/// The API version this adapter speaks; Anthropic refuses calls that do not name one.
const API_VERSION: &str = "2023-06-01";

/// Anthropic requires `max_tokens`; jobs that leave it out get this.
const DEFAULT_MAX_TOKENS: u32 = 1024;

/// One Anthropic endpoint. `EndpointConfig::auth` is ignored: the key always goes in `x-api-key`.
#[derive(Debug)]
pub struct Anthropic {
    transport: http::Transport,
    model: String,
    url: Url,
    /// Prebuilt and marked sensitive so the key never shows in Debug output.
    key: Option<HeaderValue>,
    http: reqwest::Client,
}

impl Anthropic {
    /// Build the endpoint, reading its key from the environment if `api_key_env` is set.
    pub fn new(config: &EndpointConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        let key = http::resolve_key(config)?;
        let header = http::key_header(config, key.as_ref())?;
        Ok(Self {
            transport: http::Transport::new(config, key)?,
            model: config.model.clone(),
            url: http::endpoint_url(config, "/messages")?,
            key: header,
            http,
        })
    }

    fn request(&self, req: ChatRequest<'_>, stream: bool) -> RequestBuilder {
        let body = wire_request(&self.model, req.job, stream);
        let mut builder = self
            .http
            .post(self.url.clone())
            .header("anthropic-version", API_VERSION)
            .header(REQUEST_ID_HEADER, req.request_id)
            .json(&body);
        if let Some(key) = &self.key {
            builder = builder.header("x-api-key", key.clone());
        }
        builder
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<System<'a>>,
    messages: Vec<WireMessage<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<&'a [String]>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

/// One system message as a plain string; several as text blocks, which keeps them apart
/// without inventing a separator.
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
enum System<'a> {
    Text(&'a str),
    Blocks(Vec<TextBlock<'a>>),
}

#[derive(Serialize, Debug, PartialEq)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize, Debug, PartialEq)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

fn wire_request<'a>(model: &'a str, job: &'a JobRequest, stream: bool) -> WireRequest<'a> {
    let mut system = Vec::new();
    let mut messages = Vec::with_capacity(job.messages.len());
    for m in &job.messages {
        let role = match m.role {
            Role::System => {
                system.push(plain_text(&m.content));
                continue;
            }
            Role::Assistant => "assistant",
            // Jobs carry tool output as plain text without a tool-use id, so the user sends it.
            Role::User | Role::Tool => "user",
        };
        messages.push(WireMessage {
            role,
            content: plain_text(&m.content),
        });
    }
    let system = match system.as_slice() {
        [] => None,
        [one] => Some(System::Text(one)),
        many => Some(System::Blocks(
            many.iter()
                .map(|text| TextBlock { kind: "text", text })
                .collect(),
        )),
    };
    WireRequest {
        model,
        max_tokens: job.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system,
        messages,
        temperature: job.temperature,
        top_p: job.top_p,
        stop_sequences: job.stop.as_deref(),
        stream,
    }
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize, Default)]
struct WireUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
}

/// Anthropic's stop reasons in the OpenAI vocabulary the rest of Sluice uses.
fn finish_reason(stop_reason: &str) -> String {
    match stop_reason {
        "end_turn" | "stop_sequence" => "stop",
        "max_tokens" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        other => other,
    }
    .to_owned()
}

/// The HTTP status Anthropic uses for an error type, for errors that arrive inside a stream.
fn status_for(error_type: &str) -> u16 {
    match error_type {
        "rate_limit_error" => 429,
        "overloaded_error" => 529,
        "api_error" => 500,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        _ => 400,
    }
}

#[async_trait::async_trait]
impl Provider for Anthropic {
    async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        let builder = self.request(req, false);
        let (text, rate) = self.transport.send(builder, req.request_id).await?;
        let wire: WireResponse = serde_json::from_str(&text).map_err(invalid_json)?;
        // Only text blocks are content; tool-use and thinking blocks are not part of the answer.
        let content = wire
            .content
            .into_iter()
            .filter(|b| b.kind == "text")
            .filter_map(|b| b.text)
            .collect();
        let u = wire.usage.unwrap_or_default();
        Ok(ChatResponse {
            tool_calls: Vec::new(),
            rate,
            content,
            usage: Usage::new(u.input_tokens, u.output_tokens, None),
            model: wire.model.unwrap_or_else(|| self.model.clone()),
            finish_reason: wire.stop_reason.as_deref().map(finish_reason),
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
        let (mut input, mut output) = (0, 0);
        while let Some(event) = events.next().await? {
            // The `type` inside the data names the event too, and unlike `event:` it is always there.
            let data: Value = serde_json::from_str(&event.data).map_err(invalid_json)?;
            let tokens = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
            match data["type"].as_str().unwrap_or_default() {
                "message_start" => {
                    let message = &data["message"];
                    if let Some(model) = message["model"].as_str() {
                        out.model = model.to_owned();
                    }
                    input = tokens(&message["usage"]["input_tokens"]).unwrap_or(input);
                    output = tokens(&message["usage"]["output_tokens"]).unwrap_or(output);
                }
                "content_block_delta" if data["delta"]["type"] == "text_delta" => {
                    let text = data["delta"]["text"].as_str().unwrap_or_default();
                    http::emit(&deltas, text).await;
                    out.content.push_str(text);
                }
                "message_delta" => {
                    if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                        out.finish_reason = Some(finish_reason(reason));
                    }
                    // Cumulative, so the last one wins.
                    output = tokens(&data["usage"]["output_tokens"]).unwrap_or(output);
                }
                "message_stop" => {
                    out.usage = Usage::new(Some(input), Some(output), None);
                    return Ok(out);
                }
                "error" => {
                    let kind = data["error"]["type"].as_str().unwrap_or_default();
                    return Err(self.transport.errors.status_error(
                        status_for(kind),
                        None,
                        &event.data,
                    ));
                }
                // ping, content_block_start/stop, and event types added later.
                _ => {}
            }
        }
        // A cut connection, not a bad answer: another attempt can succeed.
        Err(ProviderError::Connection(
            "stream ended before message_stop".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_core::Message;

    fn msg(role: Role, content: &str) -> Message {
        Message::new(role, content)
    }

    #[test]
    fn system_messages_move_to_the_top_and_max_tokens_defaults() {
        let messages = vec![
            msg(Role::System, "be brief"),
            msg(Role::User, "hi"),
            msg(Role::Assistant, "hello"),
            msg(Role::Tool, "42"),
        ];
        let job = JobRequest {
            temperature: Some(0.5),
            stop: Some(vec!["END".into()]),
            ..JobRequest::new("alias", messages)
        };
        let body = serde_json::to_value(wire_request("claude", &job, false)).ok();
        let expected = serde_json::json!({
            "model": "claude", "max_tokens": 1024, "system": "be brief",
            "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "42"}],
            "temperature": 0.5, "stop_sequences": ["END"],
        });
        assert_eq!(body, Some(expected));

        let two = JobRequest {
            messages: vec![
                msg(Role::System, "a"),
                msg(Role::System, "b"),
                msg(Role::User, "x"),
            ],
            max_tokens: Some(7),
            ..job
        };
        let body = serde_json::to_value(wire_request("claude", &two, true)).ok();
        let body = body.unwrap_or_default();
        assert_eq!(
            body["system"],
            serde_json::json!([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
        );
        assert_eq!(
            (body["max_tokens"].as_u64(), body["stream"].as_bool()),
            (Some(7), Some(true))
        );
    }

    #[test]
    fn stop_reasons_and_stream_error_types() {
        assert_eq!(finish_reason("end_turn"), "stop");
        assert_eq!(finish_reason("max_tokens"), "length");
        assert_eq!(finish_reason("pause_turn"), "pause_turn");
        assert_eq!(status_for("overloaded_error"), 529);
        assert_eq!(status_for("rate_limit_error"), 429);
        assert_eq!(status_for("something_new"), 400);
    }

    #[test]
    fn debug_hides_the_key() {
        let mut c = EndpointConfig::new("a", "http://x/v1", "claude", 60);
        c.api_key = Some(crate::Secret::new("sk-ant-secret"));
        let Ok(p) = Anthropic::new(&c, reqwest::Client::new()) else {
            panic!("config should build")
        };
        assert!(!format!("{p:?}").contains("sk-ant-secret"));
        assert_eq!(p.url.as_str(), "http://x/v1/messages");
    }
}

// TEMPORARY until the adapters translate parts and tools: text content only.
fn plain_text(content: &sluice_core::Content) -> &str {
    match content {
        sluice_core::Content::Text(text) => text,
        sluice_core::Content::Parts(_) => "",
    }
}
