//! Anthropic Messages API wire format: requests mapped onto the common [`ChatRequest`], replies and errors.
//! The reply text and token counts come from [`wire::reply_for`], so they match the OpenAI format exactly.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::wire::{self, ChatRequest, Message, Reply};

#[derive(Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    /// A string or an array of `{type: "text", text}` blocks.
    #[serde(default)]
    system: Option<Value>,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    content: Value,
}

/// Parses and validates a Messages API body; the error is the message for a 400.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let req: MessagesRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid request body: {e}"))?;
    let model = req
        .model
        .filter(|m| !m.is_empty())
        .ok_or("model: Field required")?;
    let max_tokens = req.max_tokens.ok_or("max_tokens: Field required")?;
    if max_tokens == 0 {
        return Err("max_tokens: must be greater than or equal to 1".into());
    }
    if req.messages.is_empty() {
        return Err("messages: at least one message is required".into());
    }
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    if let Some(system) = req.system {
        check_content(&system, "system")?;
        messages.push(Message {
            role: "system".into(),
            content: system,
        });
    }
    for (i, m) in req.messages.into_iter().enumerate() {
        if m.role != "user" && m.role != "assistant" {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant'"
            ));
        }
        check_content(&m.content, &format!("messages.{i}.content"))?;
        messages.push(Message {
            role: m.role,
            content: m.content,
        });
    }
    Ok(ChatRequest {
        model: Some(model),
        messages,
        max_tokens: Some(max_tokens),
        max_completion_tokens: None,
        stream: req.stream,
        stream_options: None,
    })
}

fn check_content(content: &Value, field: &str) -> Result<(), String> {
    match content {
        Value::String(_) => Ok(()),
        Value::Array(blocks) if blocks.iter().all(|b| b.get("type").is_some()) => Ok(()),
        _ => Err(format!(
            "{field}: Input should be a valid string or a list of content blocks"
        )),
    }
}

/// A non-streamed `message` body.
pub fn message_body(id: &str, model: &str, reply: &Reply) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": reply.content}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
    })
}

/// A whole SSE stream in Anthropic's event sequence, one text delta per word, with a `ping`
/// as the real API sends so clients must skip events they do not know.
pub fn stream_body(id: &str, model: &str, reply: &Reply) -> String {
    let mut out = String::with_capacity(reply.content.len() * 6 + 1024);
    let mut event = |name: &str, data: Value| {
        // Writing to a String cannot fail.
        let _ = write!(out, "event: {name}\ndata: {data}\n\n");
    };
    event(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1},
        }}),
    );
    event(
        "content_block_start",
        json!({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}}),
    );
    event("ping", json!({"type": "ping"}));
    for piece in reply.content.split_inclusive(' ') {
        event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": piece}}),
        );
    }
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    event(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": "end_turn", "stop_sequence": null},
               "usage": {"output_tokens": reply.completion_tokens}}),
    );
    event("message_stop", json!({"type": "message_stop"}));
    out
}

/// Anthropic's error envelope.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

pub fn invalid_key_body() -> Value {
    error_body("authentication_error", "invalid x-api-key")
}

pub fn rate_limit_body(key_name: &str, limit: u32, retry_after: Duration) -> Value {
    let message = format!(
        "This request would exceed the rate limit for your organization of {limit} requests per \
         minute on key {key_name}. Please retry after {}.",
        wire::openai_duration(retry_after)
    );
    error_body("rate_limit_error", &message)
}

/// Body for an injected failure with `status`, using the error type Anthropic pairs with it.
pub fn fault_body(status: u16) -> Value {
    let (kind, message) = match status {
        429 => ("rate_limit_error", "Rate limited (simulated fault)."),
        529 => ("overloaded_error", "Overloaded"),
        500.. => ("api_error", "Internal server error"),
        401 => ("authentication_error", "invalid x-api-key"),
        403 => (
            "permission_error",
            "Your API key does not have permission to use the specified resource.",
        ),
        404 => (
            "not_found_error",
            "The requested resource could not be found.",
        ),
        413 => (
            "request_too_large",
            "Request exceeds the maximum allowed number of bytes.",
        ),
        _ => ("invalid_request_error", "Simulated client error."),
    };
    error_body(kind, message)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn maps_onto_the_openai_reply() {
        let anthropic = parse_request(
            json!({"model": "claude-sim", "max_tokens": 1024, "system": "be brief",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        let openai = wire::parse_request(
            json!({"model": "m", "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello there"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(
            wire::reply_for(&anthropic, 16),
            wire::reply_for(&openai, 16)
        );
    }

    #[test]
    fn rejects_what_anthropic_rejects() {
        let bad = |v: Value| parse_request(v.to_string().as_bytes()).unwrap_err();
        let msg = json!([{"role": "user", "content": "x"}]);
        assert!(bad(json!({"model": "m", "messages": msg})).contains("max_tokens"));
        assert!(bad(json!({"max_tokens": 5, "messages": msg})).contains("model"));
        assert!(bad(json!({"model": "m", "max_tokens": 5, "messages": []})).contains("messages"));
        let system_role = json!([{"role": "system", "content": "x"}]);
        assert!(
            bad(json!({"model": "m", "max_tokens": 5, "messages": system_role})).contains("role")
        );
        assert!(parse_request(b"{").is_err());
    }

    #[test]
    fn stream_deltas_concatenate_to_content() {
        let reply = Reply {
            content: "Simulated reply to: hi lorem".into(),
            prompt_tokens: 3,
            completion_tokens: 5,
        };
        let body = stream_body("msg_sim_1", "claude-sim", &reply);
        let mut text = String::new();
        let mut names = Vec::new();
        for event in body.split("\n\n").filter(|e| !e.is_empty()) {
            let (name, data) = event.split_once('\n').unwrap();
            names.push(name.strip_prefix("event: ").unwrap().to_owned());
            let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["type"], names[names.len() - 1]);
            if let Some(t) = v["delta"]["text"].as_str() {
                text.push_str(t);
            }
        }
        assert_eq!(text, reply.content);
        assert_eq!(names.first().map(String::as_str), Some("message_start"));
        assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    }
}
