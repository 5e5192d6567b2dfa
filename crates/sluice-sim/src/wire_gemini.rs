//! Gemini `generateContent` wire format: replies (text or a `functionCall` part; plain and
//! streamed), errors in Google's envelope, and [`parse_request`] for requests.

use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::chat::{self, Reply};

mod request;
#[cfg(test)]
mod tests;

pub use request::parse_request;

fn usage(reply: &Reply) -> Value {
    json!({
        "promptTokenCount": reply.prompt_tokens,
        "candidatesTokenCount": reply.completion_tokens,
        "totalTokenCount": reply.prompt_tokens.saturating_add(reply.completion_tokens),
    })
}

/// A `functionCall` part with the thought signature a Gemini 3 model attaches to it. Like
/// Gemini's generateContent, no call id is given.
fn call_part(reply: &Reply) -> Option<Value> {
    use base64::Engine as _;
    let call = reply.tool_call.as_ref()?;
    let signature =
        base64::engine::general_purpose::STANDARD.encode(format!("sim-thought:{}", call.name));
    Some(
        json!({"functionCall": {"name": call.name, "args": call.arguments},
                "thoughtSignature": signature}),
    )
}

/// A non-streamed `GenerateContentResponse`.
pub fn response_body(model: &str, reply: &Reply) -> Value {
    let part = call_part(reply).unwrap_or_else(|| json!({"text": reply.content}));
    json!({
        "candidates": [{
            "content": {"role": "model", "parts": [part]},
            "finishReason": "STOP",
            "index": 0,
        }],
        "usageMetadata": usage(reply),
        "modelVersion": model,
    })
}

/// One chunk per word (a function call comes whole, in one chunk); the last one also carries
/// `finishReason` and the full `usageMetadata`, as Gemini's own streams do.
pub fn stream_chunks(model: &str, reply: &Reply) -> Vec<Value> {
    let parts: Vec<Value> = match call_part(reply) {
        Some(part) => vec![part],
        None => chat::pieces(&reply.content)
            .into_iter()
            .map(|piece| json!({"text": piece}))
            .collect(),
    };
    let last = parts.len().saturating_sub(1);
    parts
        .into_iter()
        .enumerate()
        .map(|(i, part)| {
            let mut candidate = Map::new();
            candidate.insert("content".into(), json!({"role": "model", "parts": [part]}));
            candidate.insert("index".into(), json!(0));
            let mut chunk = json!({"modelVersion": model});
            if i == last {
                candidate.insert("finishReason".into(), json!("STOP"));
                chunk["usageMetadata"] = usage(reply);
            }
            chunk["candidates"] = json!([candidate]);
            chunk
        })
        .collect()
}

/// The `alt=sse` form of a stream: one `data:` event per chunk.
pub fn sse_body(chunks: &[Value]) -> String {
    chunks.iter().map(|c| format!("data: {c}\n\n")).collect()
}

/// Google's error envelope; `status` is the canonical code name for `code`.
pub fn error_body(code: u16, message: &str) -> Value {
    json!({"error": {"code": code, "message": message, "status": status_name(code)}})
}

fn status_name(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        501 => "NOT_IMPLEMENTED",
        503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        500..=599 => "INTERNAL",
        _ => "FAILED_PRECONDITION",
    }
}

/// A missing key is unauthenticated; a wrong one is denied.
pub fn invalid_key_body(key_given: bool) -> (u16, Value) {
    if key_given {
        (
            403,
            error_body(403, "API key not valid. Please pass a valid API key."),
        )
    } else {
        (
            401,
            error_body(
                401,
                "Method doesn't allow unregistered callers. Please use an API key.",
            ),
        )
    }
}

/// A 429 body with Google's `RetryInfo` detail, which some clients read instead of the header.
pub fn rate_limit_body(key_name: &str, limit: u32, retry_after: Duration) -> Value {
    let message = format!(
        "Resource has been exhausted (e.g. check quota). Key {key_name} allows {limit} requests per minute."
    );
    let mut body = error_body(429, &message);
    body["error"]["details"] = json!([{
        "@type": "type.googleapis.com/google.rpc.RetryInfo",
        "retryDelay": format!("{}s", retry_after.as_secs_f64().ceil()),
    }]);
    body
}

pub fn fault_body(status: u16) -> Value {
    let message = match status {
        429 => "Resource has been exhausted (simulated fault).",
        503 => "The model is overloaded. Please try again later.",
        500.. => "An internal error has occurred.",
        _ => "Simulated client error.",
    };
    error_body(status, message)
}
