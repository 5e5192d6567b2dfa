//! Anthropic Messages API wire format: replies (text or `tool_use`; plain and streamed), error
//! bodies, and [`parse_request`] for requests. Pure functions, so the bytes are unit-tested.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{json, Value};

use crate::chat::{self, Reply};
use crate::wire;

mod request;
#[cfg(test)]
mod tests;

pub use request::parse_request;

fn stop_reason(reply: &Reply) -> &'static str {
    if reply.tool_call.is_some() {
        "tool_use"
    } else {
        "end_turn"
    }
}

/// A non-streamed `message` body.
pub fn message_body(id: &str, model: &str, reply: &Reply) -> Value {
    let content = match &reply.tool_call {
        None => json!([{"type": "text", "text": reply.content}]),
        Some(call) => json!([{"type": "tool_use", "id": wire::derived_id("toolu_sim_", id),
                              "name": call.name, "input": call.arguments}]),
    };
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(reply),
        "stop_sequence": null,
        "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": reply.completion_tokens},
    })
}

/// A whole SSE stream in Anthropic's event sequence, with a `ping` as the real API sends so
/// clients must skip events they do not know. Text comes one delta per word; a tool call as a
/// `tool_use` block whose input arrives as `input_json_delta` pieces.
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
    let delta = |delta: Value| json!({"type": "content_block_delta", "index": 0, "delta": delta});
    match &reply.tool_call {
        None => {
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                       "content_block": {"type": "text", "text": ""}}),
            );
            event("ping", json!({"type": "ping"}));
            for piece in chat::pieces(&reply.content) {
                event(
                    "content_block_delta",
                    delta(json!({"type": "text_delta", "text": piece})),
                );
            }
        }
        Some(call) => {
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {
                    "type": "tool_use", "id": wire::derived_id("toolu_sim_", id),
                    "name": call.name, "input": {}}}),
            );
            event("ping", json!({"type": "ping"}));
            // Anthropic opens with an empty piece; clients must cope with it.
            let text = call.arguments_text();
            for piece in std::iter::once("").chain(chat::pieces(&text)) {
                event(
                    "content_block_delta",
                    delta(json!({"type": "input_json_delta", "partial_json": piece})),
                );
            }
        }
    }
    event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    );
    event(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason(reply), "stop_sequence": null},
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
