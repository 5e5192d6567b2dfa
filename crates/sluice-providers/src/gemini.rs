//! The Google Gemini `generateContent` adapter (`POST {base_url}/models/{model}:generateContent`), plain and streamed.
//! Assistant turns become `model` turns, system messages the `systemInstruction`; finish reasons use OpenAI's words.

use crate::config::{ConfigError, EndpointConfig};
use crate::error::{invalid_json, truncate, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Url};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sluice_core::{JobRequest, Role};
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
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig<'a>>,
}

#[derive(Serialize, Debug)]
struct Content<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part<'a>>,
}

#[derive(Serialize, Debug)]
struct Part<'a> {
    text: &'a str,
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
}

fn wire_request(job: &JobRequest) -> WireRequest<'_> {
    let mut system = Vec::new();
    let mut contents = Vec::with_capacity(job.messages.len());
    for m in &job.messages {
        let role = match m.role {
            Role::System => {
                system.push(Part {
                    text: plain_text(&m.content),
                });
                continue;
            }
            Role::Assistant => "model",
            // Jobs carry tool output as plain text without a call id, so the user sends it.
            Role::User | Role::Tool => "user",
        };
        contents.push(Content {
            role: Some(role),
            parts: vec![Part {
                text: plain_text(&m.content),
            }],
        });
    }
    let config = GenerationConfig {
        max_output_tokens: job.max_tokens,
        temperature: job.temperature,
        top_p: job.top_p,
        stop_sequences: job.stop.as_deref(),
    };
    let has_config = config.max_output_tokens.is_some()
        || config.temperature.is_some()
        || config.top_p.is_some()
        || config.stop_sequences.is_some();
    WireRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(Content {
            role: None,
            parts: system,
        }),
        generation_config: has_config.then_some(config),
    }
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
struct ResponsePart {
    #[serde(default)]
    text: Option<String>,
    /// Thinking models mark their reasoning parts; those are not the answer.
    #[serde(default)]
    thought: bool,
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
        Ok(ChatResponse {
            tool_calls: Vec::new(),
            rate,
            content: candidate.text(),
            usage: wire.usage_metadata.map(Usage::from).unwrap_or_default(),
            model: wire.model_version.unwrap_or_else(|| self.model.clone()),
            finish_reason: candidate.finish_reason.as_deref().map(finish_reason),
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
                http::emit(&deltas, &text).await;
                out.content.push_str(&text);
                if let Some(reason) = &candidate.finish_reason {
                    out.finish_reason = Some(finish_reason(reason));
                }
            }
        }
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
mod tests {
    use super::*;
    use sluice_core::Message;

    #[test]
    fn roles_and_system_instruction() {
        let messages = vec![
            Message::new(Role::System, "be brief"),
            Message::user("hi"),
            Message::new(Role::Assistant, "hello"),
        ];
        let job = JobRequest {
            max_tokens: Some(9),
            top_p: Some(0.9),
            ..JobRequest::new("alias", messages)
        };
        let body = serde_json::to_value(wire_request(&job)).unwrap_or_default();
        let expected = serde_json::json!({
            "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                         {"role": "model", "parts": [{"text": "hello"}]}],
            "systemInstruction": {"parts": [{"text": "be brief"}]},
            "generationConfig": {"maxOutputTokens": 9, "topP": 0.8999999761581421},
        });
        assert_eq!(body, expected);
        let bare = JobRequest {
            messages: vec![job.messages[1].clone()],
            max_tokens: None,
            top_p: None,
            ..job
        };
        let body = serde_json::to_value(wire_request(&bare)).unwrap_or_default();
        assert!(body.get("generationConfig").is_none() && body.get("systemInstruction").is_none());
    }

    #[test]
    fn urls_and_finish_reasons() {
        let mut c = EndpointConfig::new("g", "http://x/v1beta/", "models/gemini-sim", 60);
        c.api_key = Some(crate::Secret::new("AIza-secret"));
        let Ok(g) = Gemini::new(&c, reqwest::Client::new()) else {
            panic!("config should build")
        };
        assert_eq!(
            g.url.as_str(),
            "http://x/v1beta/models/gemini-sim:generateContent"
        );
        assert_eq!(
            g.stream_url.as_str(),
            "http://x/v1beta/models/gemini-sim:streamGenerateContent?alt=sse"
        );
        assert!(!format!("{g:?}").contains("AIza-secret"));

        assert_eq!(finish_reason("MAX_TOKENS"), "length");
        assert_eq!(finish_reason("SAFETY"), "content_filter");
        assert_eq!(finish_reason("OTHER"), "other");
    }
}

// TEMPORARY until the adapters translate parts and tools: text content only.
fn plain_text(content: &sluice_core::Content) -> &str {
    match content {
        sluice_core::Content::Text(text) => text,
        sluice_core::Content::Parts(_) => "",
    }
}
