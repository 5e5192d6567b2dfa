//! The Google Gemini `generateContent` adapter (`POST {base_url}/models/{model}:generateContent`), plain and streamed:
//! jobs in OpenAI's vocabulary (images, tools, tool results, JSON formats) in, OpenAI-shaped answers and tool calls out.

use crate::config::{ConfigError, EndpointConfig};
use crate::error::{invalid_json, truncate, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::{
    ContentPartRef, FunctionCall, FunctionKind, JobRequest, Message, ResponseFormat, Role,
    ToolCall, ToolChoice, ToolMode,
};
use std::borrow::Cow;
use tokio::sync::mpsc;

/// One Gemini endpoint, e.g. `base_url = "https://generativelanguage.googleapis.com/v1beta"`.
/// `EndpointConfig::auth` is ignored: the key always goes in `x-goog-api-key`, never in the URL,
/// so it cannot end up in a logged URL.
#[derive(Debug)]
pub struct Gemini {
    transport: http::Transport,
    model: String,
    url: Url,
    stream_url: Url,
    /// Prebuilt and marked sensitive so the key never shows in Debug output.
    key: Option<HeaderValue>,
    http: reqwest::Client,
}

impl Gemini {
    /// Build the endpoint, reading its key from the environment if `api_key_env` is set.
    pub fn new(config: &EndpointConfig, http: reqwest::Client) -> Result<Self, ConfigError> {
        let key = http::resolve_key(config)?;
        let header = http::key_header(config, key.as_ref())?;
        // Google's own names are "models/gemini-..."; accept both spellings.
        let model = config
            .model
            .strip_prefix("models/")
            .unwrap_or(&config.model);
        let url = http::endpoint_url(config, &format!("/models/{model}:generateContent"))?;
        let mut stream_url =
            http::endpoint_url(config, &format!("/models/{model}:streamGenerateContent"))?;
        stream_url.query_pairs_mut().append_pair("alt", "sse");
        Ok(Self {
            transport: http::Transport::new(config, key)?,
            model: model.to_owned(),
            url,
            stream_url,
            key: header,
            http,
        })
    }

    fn request(&self, req: ChatRequest<'_>, url: &Url) -> RequestBuilder {
        let body = wire_request(req.job);
        let mut builder = self
            .http
            .post(url.clone())
            .header(REQUEST_ID_HEADER, req.request_id)
            .json(&body);
        if let Some(key) = &self.key {
            builder = builder.header("x-goog-api-key", key.clone());
        }
        builder
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct WireRequest<'a> {
    contents: Vec<Content<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<WireTool<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig<'a>>,
}

#[derive(Serialize, Debug)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part<'a>>,
}

/// One part; exactly one of the data fields is set (Gemini's `data` one-of).
#[derive(Serialize, Debug, Default)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<Cow<'a, str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    inline_data: Option<InlineData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_data: Option<FileData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_call: Option<WireFunctionCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function_response: Option<FunctionResponse<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thought_signature: Option<&'static str>,
}

impl<'a> Part<'a> {
    fn text(text: impl Into<Cow<'a, str>>) -> Part<'a> {
        Part {
            text: Some(text.into()),
            ..Part::default()
        }
    }
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct InlineData<'a> {
    mime_type: &'a str,
    data: &'a str,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct FileData<'a> {
    mime_type: &'static str,
    file_uri: &'a str,
}

#[derive(Serialize, Debug)]
struct WireFunctionCall<'a> {
    name: &'a str,
    args: Value,
}

#[derive(Serialize, Debug)]
struct FunctionResponse<'a> {
    name: &'a str,
    response: Value,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct WireTool<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

/// `parametersJsonSchema` takes the JSON Schema OpenAI-style tools carry as it is
/// (`additionalProperties`, `$ref`, `const`, ...), where `parameters` only takes Gemini's
/// OpenAPI subset and refuses fields it does not know.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a Value>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    function_calling_config: FunctionCallingConfig<'a>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    allowed_function_names: Vec<&'a str>,
}

#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<&'a [String]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    /// Full JSON Schema, like `parametersJsonSchema` (`responseSchema` is the OpenAPI subset).
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a Value>,
}

/// What Google documents for replaying a function call whose thought signature is unknown.
/// Gemini 3 models refuse a function call turn whose first call has no signature, and a
/// [`ToolCall`] has no field to keep the real one in, so every replayed call turn carries this.
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// Gemini wants a media type for file URIs; guess it from the extension as clients do.
fn mime_from_url(url: &str) -> &'static str {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("png") => "image/png",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        Some("heic") => "image/heic",
        Some("heif") => "image/heif",
        _ => "image/jpeg",
    }
}

fn content_parts(content: &sluice_core::Content) -> Vec<Part<'_>> {
    content
        .parts()
        .into_iter()
        .filter_map(|part| match part {
            // Gemini refuses parts without data, and an empty text is one.
            ContentPartRef::Text("") => None,
            ContentPartRef::Text(text) => Some(Part::text(text)),
            ContentPartRef::Image(image) => Some(match image.inline_data() {
                Some((mime_type, data)) => Part {
                    inline_data: Some(InlineData { mime_type, data }),
                    ..Part::default()
                },
                None => Part {
                    file_data: Some(FileData {
                        mime_type: mime_from_url(&image.url),
                        file_uri: &image.url,
                    }),
                    ..Part::default()
                },
            }),
        })
        .collect()
}

/// The function a tool message answers: the name of the nearest earlier call with its id;
/// failing that the message's own `name`, or its id, so the request still goes.
fn answered_name(messages: &[Message], at: usize) -> &str {
    let m = &messages[at];
    let id = m.tool_call_id.as_deref().unwrap_or_default();
    messages[..at]
        .iter()
        .rev()
        .flat_map(|earlier| earlier.tool_calls.iter())
        .find(|c| c.id == id)
        .map(|c| c.function.name.as_str())
        .or(m.name.as_deref())
        .unwrap_or(id)
}

fn wire_request(job: &JobRequest) -> WireRequest<'_> {
    let mut system = Vec::new();
    // Consecutive messages of one role share a turn: all of a call turn's responses must be in
    // the one turn after it, and Gemini wants user and model turns to alternate.
    let mut contents: Vec<Content<'_>> = Vec::with_capacity(job.messages.len());
    for (at, m) in job.messages.iter().enumerate() {
        let (role, parts) = match m.role {
            Role::System => {
                system.push(Part::text(m.content.text()));
                continue;
            }
            Role::Assistant => {
                let mut parts = content_parts(&m.content);
                for (i, call) in m.tool_calls.iter().enumerate() {
                    // Arguments that are not a JSON object go as none, rather than failing
                    // the conversation.
                    let args = serde_json::from_str::<Value>(&call.function.arguments)
                        .ok()
                        .filter(Value::is_object)
                        .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
                    parts.push(Part {
                        function_call: Some(WireFunctionCall {
                            name: &call.function.name,
                            args,
                        }),
                        thought_signature: (i == 0).then_some(SKIP_SIGNATURE),
                        ..Part::default()
                    });
                }
                ("model", parts)
            }
            Role::Tool => {
                let text = m.content.text();
                // A result that is JSON goes as JSON, which the model reads as structure.
                let content = serde_json::from_str::<Value>(&text)
                    .unwrap_or_else(|_| Value::String(text.into_owned()));
                let part = Part {
                    function_response: Some(FunctionResponse {
                        name: answered_name(&job.messages, at),
                        response: serde_json::json!({ "content": content }),
                    }),
                    ..Part::default()
                };
                ("user", vec![part])
            }
            Role::User => ("user", content_parts(&m.content)),
        };
        if parts.is_empty() {
            // An empty message says nothing, and Gemini refuses a turn without parts.
            continue;
        }
        match contents.last_mut() {
            Some(last) if last.role == Some(role) => last.parts.extend(parts),
            _ => contents.push(Content {
                role: Some(role),
                parts,
            }),
        }
    }

    let declarations: Vec<FunctionDeclaration<'_>> = job
        .tools
        .iter()
        .map(|t| FunctionDeclaration {
            name: &t.function.name,
            description: t.function.description.as_deref(),
            parameters_json_schema: t.function.parameters.as_ref(),
        })
        .collect();
    let tool_config = job
        .tool_choice
        .as_ref()
        .filter(|_| !declarations.is_empty())
        .map(|choice| {
            let (mode, allowed) = match choice {
                ToolChoice::Mode(ToolMode::Auto) => ("AUTO", Vec::new()),
                ToolChoice::Mode(ToolMode::Required) => ("ANY", Vec::new()),
                ToolChoice::Mode(ToolMode::None) => ("NONE", Vec::new()),
                ToolChoice::Function(f) => ("ANY", vec![f.function.name.as_str()]),
            };
            ToolConfig {
                function_calling_config: FunctionCallingConfig {
                    mode,
                    allowed_function_names: allowed,
                },
            }
        });
    let tools = if declarations.is_empty() {
        Vec::new()
    } else {
        vec![WireTool {
            function_declarations: declarations,
        }]
    };

    let (response_mime_type, response_json_schema) = match &job.response_format {
        None | Some(ResponseFormat::Text) => (None, None),
        Some(ResponseFormat::JsonObject) => (Some("application/json"), None),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            (Some("application/json"), json_schema.schema.as_ref())
        }
    };
    let config = GenerationConfig {
        max_output_tokens: job.max_tokens,
        temperature: job.temperature,
        top_p: job.top_p,
        stop_sequences: job.stop.as_deref(),
        seed: job.seed.map(gemini_seed),
        response_mime_type,
        response_json_schema,
    };
    let has_config = config.max_output_tokens.is_some()
        || config.temperature.is_some()
        || config.top_p.is_some()
        || config.stop_sequences.is_some()
        || config.seed.is_some()
        || config.response_mime_type.is_some();
    WireRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(Content {
            role: None,
            parts: system,
        }),
        tools,
        tool_config,
        generation_config: has_config.then_some(config),
    }
}

/// Gemini's seed is 32 bits; a larger one is folded into range so it still picks one sample.
fn gemini_seed(seed: i64) -> i32 {
    i32::try_from(seed).unwrap_or_else(|_| {
        let folded = seed.rem_euclid(1_i64 << 31);
        i32::try_from(folded).unwrap_or(i32::MAX)
    })
}

/// A `GenerateContentResponse`, whole or one streamed chunk of it.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    model_version: Option<String>,
    #[serde(default)]
    prompt_feedback: Option<Value>,
    /// A failure reported inside a stream.
    #[serde(default)]
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<ResponsePart>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponsePart {
    #[serde(default)]
    text: Option<String>,
    /// Thinking models mark their reasoning parts; those are not the answer.
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<ResponseCall>,
}

#[derive(Deserialize)]
struct ResponseCall {
    /// Only some Gemini models give calls ids.
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: Option<u32>,
    #[serde(default)]
    candidates_token_count: Option<u32>,
    #[serde(default)]
    total_token_count: Option<u32>,
}

impl From<UsageMetadata> for Usage {
    fn from(u: UsageMetadata) -> Self {
        Usage::new(
            u.prompt_token_count,
            u.candidates_token_count,
            u.total_token_count,
        )
    }
}

impl Candidate {
    fn text(&self) -> String {
        self.content
            .iter()
            .flat_map(|c| &c.parts)
            .filter(|p| !p.thought)
            .filter_map(|p| p.text.as_deref())
            .collect()
    }

    /// The candidate's function calls in OpenAI's form; `first` numbers the synthesized ids
    /// (`call_<n>`) of calls that came without one, counting calls earlier in the stream.
    fn tool_calls(&self, first: usize) -> Vec<ToolCall> {
        self.content
            .iter()
            .flat_map(|c| &c.parts)
            .filter_map(|p| p.function_call.as_ref())
            .enumerate()
            .map(|(i, call)| ToolCall {
                id: call
                    .id
                    .clone()
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| format!("call_{}", first + i)),
                kind: FunctionKind::Function,
                function: FunctionCall {
                    name: call.name.clone(),
                    arguments: call
                        .args
                        .as_ref()
                        .map_or_else(|| "{}".to_owned(), Value::to_string),
                },
            })
            .collect()
    }
}

/// The finish reason of an answer: a normal stop that made calls ended for the calls.
fn answer_finish(reason: Option<&str>, made_calls: bool) -> Option<String> {
    match reason {
        Some("STOP") if made_calls => Some("tool_calls".to_owned()),
        other => other.map(finish_reason),
    }
}

/// Gemini's finish reasons in the OpenAI vocabulary the rest of Sluice uses.
fn finish_reason(reason: &str) -> String {
    match reason {
        "STOP" => "stop".to_owned(),
        "MAX_TOKENS" => "length".to_owned(),
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
            "content_filter".to_owned()
        }
        other => other.to_ascii_lowercase(),
    }
}

#[async_trait::async_trait]
impl Provider for Gemini {
    async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError> {
        let builder = self.request(req, &self.url);
        let (text, rate) = self.transport.send(builder, req.request_id).await?;
        let wire: WireResponse = serde_json::from_str(&text).map_err(invalid_json)?;
        let Some(candidate) = wire.candidates.first() else {
            // A blocked prompt answers 200 with feedback instead of candidates.
            let why = wire.prompt_feedback.map_or_else(
                || "no candidates in response".to_owned(),
                |f| format!("no candidates in response; promptFeedback: {f}"),
            );
            return Err(ProviderError::InvalidResponse(truncate(&why)));
        };
        let tool_calls = candidate.tool_calls(0);
        Ok(ChatResponse {
            finish_reason: answer_finish(
                candidate.finish_reason.as_deref(),
                !tool_calls.is_empty(),
            ),
            tool_calls,
            rate,
            content: candidate.text(),
            usage: wire.usage_metadata.map(Usage::from).unwrap_or_default(),
            model: wire.model_version.unwrap_or_else(|| self.model.clone()),
        })
    }

    async fn chat_stream(
        &self,
        req: ChatRequest<'_>,
        deltas: mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        let builder = self.request(req, &self.stream_url);
        let mut events = self.transport.open_stream(builder, req.request_id).await?;
        let mut out = ChatResponse::streaming(self.model.clone(), events.rate());
        while let Some(event) = events.next().await? {
            let chunk: WireResponse = serde_json::from_str(&event.data).map_err(invalid_json)?;
            if let Some(error) = chunk.error {
                let status = error["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(500);
                return Err(self
                    .transport
                    .errors
                    .status_error(status, None, &event.data));
            }
            if let Some(model) = chunk.model_version {
                out.model = model;
            }
            // Usage may repeat on every chunk; the last one is complete.
            if let Some(usage) = chunk.usage_metadata {
                out.usage = usage.into();
            }
            if let Some(candidate) = chunk.candidates.first() {
                let text = candidate.text();
                if !text.is_empty() {
                    http::emit(&deltas, &text).await;
                    out.content.push_str(&text);
                }
                // Calls come whole, each in one chunk.
                let calls = candidate.tool_calls(out.tool_calls.len());
                out.tool_calls.extend(calls);
                if candidate.finish_reason.is_some() {
                    out.finish_reason = candidate.finish_reason.clone();
                }
            }
        }
        out.finish_reason = answer_finish(out.finish_reason.as_deref(), !out.tool_calls.is_empty());
        // Gemini's stream simply ends; only a finish reason tells a complete answer from a cut one.
        if out.finish_reason.is_none() {
            return Err(ProviderError::Connection(
                "stream ended without a finishReason".into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
