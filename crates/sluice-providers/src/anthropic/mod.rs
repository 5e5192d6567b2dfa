//! The Anthropic Messages API adapter (`POST {base_url}/messages`), plain and streamed: jobs in
//! OpenAI's vocabulary (images, tools, JSON formats as a forced tool) in, OpenAI-shaped answers out.

//!
//! `request` translates a job into Anthropic's wire format, `response` reads answers and errors
//! back; this module holds the endpoint and the calls, plain and streamed.

mod request;
mod response;
#[cfg(test)]
mod tests;

use crate::config::{ConfigError, EndpointConfig};
use crate::error::{invalid_json, ProviderError};
use crate::http::{self, REQUEST_ID_HEADER};
use crate::{ChatRequest, ChatResponse, Provider, Usage};
use request::{format_tool, wire_request};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, Url};
use response::{status_for, Answer, WireResponse};
use serde_json::Value;
use std::collections::BTreeMap;
use tokio::sync::mpsc;

/// The API version this adapter speaks; Anthropic refuses calls that do not name one.
const API_VERSION: &str = "2023-06-01";

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
