//! OpenAI chat-completions wire format: replies (text, JSON or a tool call; plain and streamed),
//! error bodies, and [`parse_request`] for requests. Pure functions, so the bytes are unit-tested.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};

use crate::chat::{self, Reply};

mod request;
#[cfg(test)]
mod tests;

pub use request::parse_request;

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl From<&Reply> for Usage {
    fn from(r: &Reply) -> Self {
        Usage {
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.prompt_tokens.saturating_add(r.completion_tokens),
        }
    }
}

/// An id for a simulated item, unique per response: `prefix` plus the last 24 letters and digits
/// of the response's id (short enough for every provider's id limits).
pub fn derived_id(prefix: &str, response_id: &str) -> String {
    let alnum: Vec<char> = response_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect();
    let tail: String = alnum[alnum.len().saturating_sub(24)..].iter().collect();
    format!("{prefix}{tail}")
}

fn finish_reason(reply: &Reply) -> &'static str {
    if reply.tool_call.is_some() {
        "tool_calls"
    } else {
        "stop"
    }
}

/// A non-streamed `chat.completion` body.
pub fn completion_body(id: &str, created: i64, model: &str, reply: &Reply) -> Value {
    let message = match &reply.tool_call {
        None => json!({"role": "assistant", "content": reply.content}),
        Some(call) => json!({"role": "assistant", "content": null, "tool_calls": [{
            "id": derived_id("call_", id), "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_text()},
        }]}),
    };
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(reply)}],
        "usage": Usage::from(reply),
    })
}

/// A whole SSE stream: a role chunk, one chunk per piece of text (or of a tool call's
/// arguments), a finish chunk, an optional usage chunk, then `[DONE]`. Concatenating the text
/// deltas gives exactly `reply.content`; a tool call's pieces, its arguments.
pub fn stream_body(
    id: &str,
    created: i64,
    model: &str,
    reply: &Reply,
    include_usage: bool,
) -> String {
    let mut out = String::with_capacity(reply.content.len() * 4 + 512);
    let mut push = |choices: Value, usage: Option<Usage>| {
        let mut chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": choices,
        });
        if let Some(u) = usage {
            chunk["usage"] = json!(u);
        }
        // Writing to a String cannot fail.
        let _ = write!(out, "data: {chunk}\n\n");
    };
    let choice = |delta: Value, finish: Value| json!([{"index": 0, "delta": delta, "finish_reason": finish}]);

    match &reply.tool_call {
        None => {
            push(
                choice(json!({"role": "assistant", "content": ""}), Value::Null),
                None,
            );
            for piece in chat::pieces(&reply.content) {
                push(choice(json!({"content": piece}), Value::Null), None);
            }
        }
        Some(call) => {
            // As OpenAI does: the id and name come first with empty arguments, then the
            // arguments in pieces that only the index ties to the call.
            let first = json!({"index": 0, "id": derived_id("call_", id), "type": "function",
                               "function": {"name": call.name, "arguments": ""}});
            push(
                choice(
                    json!({"role": "assistant", "content": null, "tool_calls": [first]}),
                    Value::Null,
                ),
                None,
            );
            for piece in chat::pieces(&call.arguments_text()) {
                let delta = json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]});
                push(choice(delta, Value::Null), None);
            }
        }
    }
    push(choice(json!({}), json!(finish_reason(reply))), None);
    if include_usage {
        push(json!([]), Some(Usage::from(reply)));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

/// OpenAI's error envelope.
pub fn error_body(message: &str, kind: &str, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

pub fn invalid_key_body() -> Value {
    error_body(
        "Incorrect API key provided",
        "invalid_request_error",
        Some("invalid_api_key"),
    )
}

pub fn rate_limit_body(key_name: &str, limit: u32, retry_after: Duration) -> Value {
    let message = format!(
        "Rate limit reached for requests per min (RPM) on key {key_name}: Limit {limit}, Used {limit}, \
         Requested 1. Please try again in {}.",
        openai_duration(retry_after)
    );
    error_body(&message, "requests", Some("rate_limit_exceeded"))
}

/// Body for an injected failure with `status`.
pub fn fault_body(status: u16) -> Value {
    match status {
        429 => error_body(
            "Rate limit reached for requests (simulated fault). Please try again in 1s.",
            "requests",
            Some("rate_limit_exceeded"),
        ),
        500.. => error_body(
            "The server had an error while processing your request.",
            "server_error",
            None,
        ),
        _ => error_body(
            &format!("Simulated client error (HTTP {status})."),
            "invalid_request_error",
            None,
        ),
    }
}

/// Formats like OpenAI's rate-limit headers: "120ms", "1s", "1.5s", "6m0s", "1h2m3s".
pub fn openai_duration(d: Duration) -> String {
    let ms = d.as_millis().max(u128::from(d > Duration::ZERO));
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let frac = format!("{:03}", rest % 1000);
        format!("{}.{}s", rest / 1000, frac.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}
