//! The Anthropic Messages API adapter (`POST {base_url}/messages`), plain and streamed: jobs in
//! OpenAI's vocabulary (images, tools, JSON formats as a forced tool) in, OpenAI-shaped answers out.

use crate::config::{ConfigError, EndpointConfig};
use crate::error::{invalid_json, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::{
    ContentPartRef, FunctionCall, FunctionKind, ImageUrl, JobRequest, Message, ResponseFormat,
    Role, ToolCall, ToolChoice, ToolMode,
};
use std::borrow::Cow;
use std::collections::BTreeMap;
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
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<WireToolChoice<'a>>,
}

/// One system message as a plain string; several as text blocks, which keeps them apart
/// without inventing a separator.
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
enum System<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize, Debug, PartialEq)]
struct WireMessage<'a> {
    role: &'static str,
    content: MessageContent<'a>,
}

/// A turn that is one piece of text goes as a string, anything else as blocks.
#[derive(Serialize, Debug, PartialEq)]
#[serde(untagged)]
enum MessageContent<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Block<'a>>),
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: Cow<'a, str>,
    },
    Image {
        source: ImageSource<'a>,
    },
    ToolUse {
        id: Cow<'a, str>,
        name: &'a str,
        input: Value,
    },
    ToolResult {
        tool_use_id: Cow<'a, str>,
        #[serde(skip_serializing_if = "str::is_empty")]
        content: Cow<'a, str>,
    },
}

#[derive(Serialize, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource<'a> {
    Base64 { media_type: &'a str, data: &'a str },
    Url { url: &'a str },
}

#[derive(Serialize, Debug, PartialEq)]
struct WireTool<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Cow<'a, Value>,
}

#[derive(Serialize, Debug, PartialEq)]
struct WireToolChoice<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    disable_parallel_tool_use: bool,
}

/// The tool that stands in for `response_format`, which the Messages API does not have: the
/// model is made to "call" it, and the call's input is the JSON answer.
struct FormatTool<'a> {
    name: &'a str,
    description: Option<&'a str>,
    schema: Value,
}

/// Name of the stand-in tool for `json_object`, which has no name of its own.
const JSON_OBJECT_TOOL: &str = "json_object";

fn format_tool(job: &JobRequest) -> Option<FormatTool<'_>> {
    match job.response_format.as_ref()? {
        ResponseFormat::Text => None,
        ResponseFormat::JsonObject => Some(FormatTool {
            name: JSON_OBJECT_TOOL,
            description: None,
            schema: serde_json::json!({"type": "object"}),
        }),
        ResponseFormat::JsonSchema { json_schema } => Some(FormatTool {
            name: &json_schema.name,
            description: json_schema.description.as_deref(),
            schema: json_schema.schema_or_object(),
        }),
    }
}

/// Anthropic's pattern for tool_use ids is `^[a-zA-Z0-9_-]+$`. Ids from other providers (or
/// clients) that break it are mapped the same way in the call and in its result, so they
/// still pair up.
fn tool_use_id(id: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if !id.is_empty() && id.chars().all(ok) {
        return Cow::Borrowed(id);
    }
    let mapped: String = id.chars().map(|c| if ok(c) { c } else { '_' }).collect();
    Cow::Owned(if mapped.is_empty() {
        "_".into()
    } else {
        mapped
    })
}

fn image_block(image: &ImageUrl) -> Block<'_> {
    let source = match image.inline_data() {
        Some((media_type, data)) => ImageSource::Base64 { media_type, data },
        None => ImageSource::Url { url: &image.url },
    };
    Block::Image { source }
}

/// Blocks of a user or assistant message; empty text is left out, as Anthropic refuses it.
fn content_blocks(m: &Message) -> Vec<Block<'_>> {
    let mut blocks: Vec<Block<'_>> = m
        .content
        .parts()
        .into_iter()
        .filter_map(|part| match part {
            ContentPartRef::Text("") => None,
            ContentPartRef::Text(text) => Some(Block::Text {
                text: Cow::Borrowed(text),
            }),
            ContentPartRef::Image(image) => Some(image_block(image)),
        })
        .collect();
    for call in &m.tool_calls {
        // The model wrote the arguments; if they are not a JSON object, the call still goes
        // back, with no arguments, rather than failing the whole conversation.
        let input = serde_json::from_str::<Value>(&call.function.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        blocks.push(Block::ToolUse {
            id: tool_use_id(&call.id),
            name: &call.function.name,
            input,
        });
    }
    blocks
}

fn wire_request<'a>(model: &'a str, job: &'a JobRequest, stream: bool) -> WireRequest<'a> {
    let mut system = Vec::new();
    // (role, blocks) per turn; consecutive messages of one role share a turn, since Anthropic
    // wants user and assistant to alternate and all results of one tool turn in one message.
    let mut turns: Vec<(&'static str, Vec<Block<'a>>)> = Vec::with_capacity(job.messages.len());
    for m in &job.messages {
        let (role, blocks) = match (m.role, m.tool_call_id.as_deref()) {
            (Role::System, _) => {
                system.push(m.content.text());
                continue;
            }
            (Role::Assistant, _) => ("assistant", content_blocks(m)),
            (Role::Tool, Some(id)) => (
                "user",
                vec![Block::ToolResult {
                    tool_use_id: tool_use_id(id),
                    content: m.content.text(),
                }],
            ),
            // A tool message without the id of its call cannot be a tool_result: plain text.
            (Role::User | Role::Tool, _) => ("user", content_blocks(m)),
        };
        if blocks.is_empty() {
            // An empty message says nothing, and Anthropic refuses empty content.
            continue;
        }
        match turns.last_mut() {
            Some((last, existing)) if *last == role => existing.extend(blocks),
            _ => turns.push((role, blocks)),
        }
    }
    let messages = turns
        .into_iter()
        .map(|(role, mut blocks)| {
            let content = match blocks.as_mut_slice() {
                [Block::Text { text }] => MessageContent::Text(std::mem::take(text)),
                _ => MessageContent::Blocks(blocks),
            };
            WireMessage { role, content }
        })
        .collect();
    let system = match system.len() {
        0 => None,
        1 => system.pop().map(System::Text),
        _ => Some(System::Blocks(
            system
                .into_iter()
                .map(|text| Block::Text { text })
                .collect(),
        )),
    };

    let mut tools: Vec<WireTool<'a>> = job
        .tools
        .iter()
        .map(|t| WireTool {
            name: &t.function.name,
            description: t.function.description.as_deref(),
            input_schema: match &t.function.parameters {
                Some(schema) => Cow::Borrowed(schema),
                None => Cow::Owned(t.function.parameters_or_empty()),
            },
        })
        .collect();
    let no_parallel = job.parallel_tool_calls == Some(false);
    let mut tool_choice = job.tool_choice.as_ref().map(|choice| {
        let (kind, name) = match choice {
            ToolChoice::Mode(ToolMode::Auto) => ("auto", None),
            ToolChoice::Mode(ToolMode::Required) => ("any", None),
            ToolChoice::Mode(ToolMode::None) => ("none", None),
            ToolChoice::Function(f) => ("tool", Some(f.function.name.as_str())),
        };
        WireToolChoice {
            kind,
            name,
            disable_parallel_tool_use: no_parallel && kind != "none",
        }
    });
    if tool_choice.is_none() && no_parallel && !tools.is_empty() {
        tool_choice = Some(WireToolChoice {
            kind: "auto",
            name: None,
            disable_parallel_tool_use: true,
        });
    }
    if let Some(format) = format_tool(job) {
        // Alone, the stand-in tool is forced; beside real tools the model chooses, as it
        // would choose between calling a tool and answering.
        if tools.is_empty() {
            tool_choice = Some(WireToolChoice {
                kind: "tool",
                name: Some(format.name),
                disable_parallel_tool_use: false,
            });
        }
        tools.push(WireTool {
            name: format.name,
            description: Some(format.description.unwrap_or(
                "Give the answer as this tool's input: a JSON value that matches the schema.",
            )),
            input_schema: Cow::Owned(format.schema),
        });
    }
    if tools.is_empty() {
        // A choice without tools means nothing to Anthropic, and `any` or `tool` would be refused.
        tool_choice = None;
    }

    WireRequest {
        model,
        max_tokens: job.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system,
        messages,
        temperature: job.temperature,
        top_p: job.top_p,
        stop_sequences: job.stop.as_deref(),
        stream,
        tools,
        tool_choice,
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
    /// tool_use blocks: the call's id, function and arguments.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

/// A finished answer's text and calls, with the `response_format` stand-in tool turned back
/// into the answer: its input is the JSON text, and the turn ends as a normal stop.
struct Answer {
    content: String,
    tool_calls: Vec<ToolCall>,
    finish_reason: Option<String>,
}

impl Answer {
    /// A whole message's answer: its text and tool_use blocks (thinking blocks are not part of it).
    fn from_blocks(
        blocks: Vec<WireBlock>,
        stop_reason: Option<&str>,
        format_tool: Option<&str>,
    ) -> Answer {
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in blocks {
            match block.kind.as_str() {
                "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
                "tool_use" => calls.push((
                    block.id.unwrap_or_default(),
                    block.name.unwrap_or_default(),
                    block
                        .input
                        .map_or_else(|| "{}".to_owned(), |v| v.to_string()),
                )),
                _ => {}
            }
        }
        Answer::new(text, calls, stop_reason, format_tool)
    }

    /// `calls` are (id, name, arguments as JSON text) in the order the model made them.
    fn new(
        text: String,
        calls: Vec<(String, String, String)>,
        stop_reason: Option<&str>,
        format_tool: Option<&str>,
    ) -> Answer {
        let mut content = text;
        let mut tool_calls = Vec::with_capacity(calls.len());
        let mut formatted = false;
        for (id, name, arguments) in calls {
            if Some(name.as_str()) == format_tool && !formatted {
                // The JSON is the whole answer; any words before it are not.
                content = arguments;
                formatted = true;
                continue;
            }
            tool_calls.push(ToolCall {
                id,
                kind: FunctionKind::Function,
                function: FunctionCall { name, arguments },
            });
        }
        let finish_reason = match stop_reason {
            Some("tool_use") if formatted && tool_calls.is_empty() => Some("stop".to_owned()),
            other => other.map(finish_reason),
        };
        Answer {
            content,
            tool_calls,
            finish_reason,
        }
    }
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
        let format = format_tool(req.job);
        let answer = Answer::from_blocks(
            wire.content,
            wire.stop_reason.as_deref(),
            format.as_ref().map(|f| f.name),
        );
        let u = wire.usage.unwrap_or_default();
        Ok(ChatResponse {
            tool_calls: answer.tool_calls,
            rate,
            content: answer.content,
            usage: Usage::new(u.input_tokens, u.output_tokens, None),
            model: wire.model.unwrap_or_else(|| self.model.clone()),
            finish_reason: answer.finish_reason,
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
        let format = format_tool(req.job);
        let format = format.as_ref().map(|f| f.name);
        // tool_use blocks by index: (id, name, input JSON so far).
        let mut calls: BTreeMap<u64, (String, String, String)> = BTreeMap::new();
        let mut stop_reason: Option<String> = None;
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
                "content_block_start" if data["content_block"]["type"] == "tool_use" => {
                    let block = &data["content_block"];
                    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                    let index = data["index"].as_u64().unwrap_or_default();
                    calls.insert(
                        index,
                        (text(&block["id"]), text(&block["name"]), String::new()),
                    );
                }
                "content_block_delta" => {
                    let delta = &data["delta"];
                    match delta["type"].as_str().unwrap_or_default() {
                        "text_delta" => {
                            let text = delta["text"].as_str().unwrap_or_default();
                            http::emit(&deltas, text).await;
                            out.content.push_str(text);
                        }
                        "input_json_delta" => {
                            let piece = delta["partial_json"].as_str().unwrap_or_default();
                            let index = data["index"].as_u64().unwrap_or_default();
                            if let Some(call) = calls.get_mut(&index) {
                                // The stand-in tool's input is the answer: stream it as text.
                                if Some(call.1.as_str()) == format && !piece.is_empty() {
                                    http::emit(&deltas, piece).await;
                                }
                                call.2.push_str(piece);
                            }
                        }
                        // thinking and signature deltas are not part of the answer.
                        _ => {}
                    }
                }
                "message_delta" => {
                    if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                        stop_reason = Some(reason.to_owned());
                    }
                    // Cumulative, so the last one wins.
                    output = tokens(&data["usage"]["output_tokens"]).unwrap_or(output);
                }
                "message_stop" => {
                    // A call with no input pieces was made with no arguments.
                    let calls = calls
                        .into_values()
                        .map(|(id, name, json)| {
                            let json = if json.trim().is_empty() {
                                "{}".to_owned()
                            } else {
                                json
                            };
                            (id, name, json)
                        })
                        .collect();
                    let answer = Answer::new(
                        std::mem::take(&mut out.content),
                        calls,
                        stop_reason.as_deref(),
                        format,
                    );
                    out.content = answer.content;
                    out.tool_calls = answer.tool_calls;
                    out.finish_reason = answer.finish_reason;
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
                // ping, text block starts, content_block_stop, and event types added later.
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
    use serde_json::json;
    use sluice_core::{Content, ContentPart, JsonSchemaFormat, Tool};

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

    fn call(id: &str, name: &str, arguments: &str) -> ToolCall {
        ToolCall {
            id: id.into(),
            kind: FunctionKind::Function,
            function: FunctionCall {
                name: name.into(),
                arguments: arguments.into(),
            },
        }
    }

    fn weather_tool() -> Tool {
        serde_json::from_value(json!({"type": "function", "function": {
            "name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string"}}}}}))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn image(url: &str) -> ContentPart {
        ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: url.into(),
                detail: None,
            },
        }
    }

    #[test]
    fn images_tool_calls_and_results_become_blocks_in_alternating_turns() {
        let look = Content::Parts(vec![
            ContentPart::Text {
                text: "compare".into(),
            },
            image("data:image/png;base64,iVBORw0KGgo="),
            image("https://x.test/a.jpg"),
        ]);
        let job = JobRequest {
            seed: Some(3),
            tools: vec![weather_tool()],
            tool_choice: Some(
                serde_json::from_value(
                    json!({"type": "function", "function": {"name": "get_weather"}}),
                )
                .unwrap_or_else(|e| panic!("{e}")),
            ),
            parallel_tool_calls: Some(false),
            ..JobRequest::new(
                "alias",
                vec![
                    msg(Role::System, "be brief"),
                    Message::new(Role::User, look),
                    Message {
                        tool_calls: vec![
                            call("call_1", "get_weather", r#"{"city":"Paris"}"#),
                            call("call:2", "get_weather", "not json"),
                        ],
                        ..msg(Role::Assistant, "Checking.")
                    },
                    Message::tool_result("call_1", "sunny"),
                    Message::tool_result("call:2", "rain"),
                    msg(Role::User, "and tomorrow?"),
                ],
            )
        };
        let body = serde_json::to_value(wire_request("claude", &job, false)).ok();
        let expected = json!({
            "model": "claude", "max_tokens": 1024, "system": "be brief",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "compare"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}}]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                    {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                    {"type": "text", "text": "and tomorrow?"}]}],
            "tools": [{"name": "get_weather", "description": "Weather for a city",
                       "input_schema": {"type": "object", "required": ["city"],
                                        "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
        });
        assert_eq!(body, Some(expected));
    }

    #[test]
    fn response_formats_become_a_forced_tool() {
        let schema =
            json!({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}});
        let job = JobRequest {
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchemaFormat {
                    name: "count".into(),
                    description: None,
                    schema: Some(schema.clone()),
                    strict: Some(true),
                },
            }),
            // A choice about tools the job does not have is dropped, not sent.
            tool_choice: Some(ToolChoice::Mode(ToolMode::Auto)),
            ..JobRequest::new("alias", vec![msg(Role::User, "how many?")])
        };
        let body = serde_json::to_value(wire_request("claude", &job, false)).unwrap_or_default();
        assert_eq!(
            (&body["tools"], &body["tool_choice"]),
            (
                &json!([{"name": "count", "input_schema": schema,
                         "description": "Give the answer as this tool's input: a JSON value that matches the schema."}]),
                &json!({"type": "tool", "name": "count"})
            )
        );
        let object = JobRequest {
            response_format: Some(ResponseFormat::JsonObject),
            tools: vec![weather_tool()],
            tool_choice: None,
            ..job
        };
        let body = serde_json::to_value(wire_request("claude", &object, false)).unwrap_or_default();
        // Beside a real tool the stand-in is offered, not forced.
        assert_eq!(body["tools"][1]["name"], JSON_OBJECT_TOOL);
        assert_eq!(body["tools"][1]["input_schema"], json!({"type": "object"}));
        assert!(body.get("tool_choice").is_none(), "{body}");
        let bare = JobRequest {
            tool_choice: Some(ToolChoice::Mode(ToolMode::None)),
            response_format: None,
            tools: Vec::new(),
            ..object
        };
        let body = serde_json::to_value(wire_request("claude", &bare, false)).unwrap_or_default();
        assert!(body.get("tools").is_none() && body.get("tool_choice").is_none());
    }

    #[test]
    fn answers_turn_tool_use_into_calls_and_the_format_tool_into_content() {
        let wire: WireResponse = serde_json::from_value(json!({"model": "claude-x",
            "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 5, "output_tokens": 7}}))
        .unwrap_or_else(|e| panic!("{e}"));
        let a = Answer::from_blocks(wire.content, wire.stop_reason.as_deref(), None);
        assert_eq!(a.content, "Let me check.");
        assert_eq!(
            a.tool_calls,
            vec![call("toolu_1", "get_weather", r#"{"city":"Paris"}"#)]
        );
        assert_eq!(a.finish_reason.as_deref(), Some("tool_calls"));

        let wire: WireResponse = serde_json::from_value(json!({
            "content": [{"type": "tool_use", "id": "toolu_2", "name": "count", "input": {"n": 1}}],
            "stop_reason": "tool_use"}))
        .unwrap_or_else(|e| panic!("{e}"));
        let a = Answer::from_blocks(wire.content, wire.stop_reason.as_deref(), Some("count"));
        assert_eq!(
            (
                a.content.as_str(),
                a.tool_calls.len(),
                a.finish_reason.as_deref()
            ),
            (r#"{"n":1}"#, 0, Some("stop"))
        );
    }

    #[test]
    fn empty_messages_are_dropped_and_their_neighbours_merged() {
        let job = JobRequest::new(
            "alias",
            vec![
                msg(Role::User, "a"),
                msg(Role::Assistant, ""),
                msg(Role::User, "b"),
            ],
        );
        let body = serde_json::to_value(wire_request("claude", &job, false)).unwrap_or_default();
        assert_eq!(
            body["messages"],
            json!([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
        );
    }

    #[test]
    fn tool_use_ids_are_made_valid_for_anthropic() {
        assert_eq!(tool_use_id("toolu_01-ab"), "toolu_01-ab");
        assert_eq!(tool_use_id("call:1/2"), "call_1_2");
        assert_eq!(tool_use_id(""), "_");
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
