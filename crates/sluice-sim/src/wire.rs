//! OpenAI chat-completions wire format: request parsing, deterministic replies, error bodies.
//! Pure functions, so the exact bytes other crates' tests rely on are unit-tested here.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// The parts of a chat request the simulator looks at; unknown fields are ignored.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// Newer OpenAI clients send this instead of `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
}

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    /// A string, an array of content parts, or null (assistant tool calls).
    #[serde(default)]
    pub content: Value,
}

/// Parses and validates a request body; the error is the message for a 400.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request. ({e})"))?;
    if req.messages.is_empty() {
        return Err("[] is too short - 'messages'".into());
    }
    Ok(req)
}

fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

fn char_len(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        other => text_of(other).chars().count(),
    }
}

const FILLER: [&str; 8] = [
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "consectetur",
    "adipiscing",
    "elit",
];

/// The deterministic answer and its usage numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub content: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

/// Builds the reply for `req`: an echo of the last user message padded with filler
/// words up to `completion_tokens` words (capped by the request's max tokens).
pub fn reply_for(req: &ChatRequest, completion_tokens: u32) -> Reply {
    let cap = req
        .max_tokens
        .or(req.max_completion_tokens)
        .unwrap_or(u32::MAX);
    let words = completion_tokens.min(cap);
    let last = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .or(req.messages.last());
    let echo: String = last
        .map(|m| text_of(&m.content))
        .unwrap_or_default()
        .chars()
        .take(64)
        .collect();

    let mut content = format!("Simulated reply to: {echo}");
    let missing = (words as usize).saturating_sub(content.split_whitespace().count());
    for word in FILLER.iter().cycle().take(missing) {
        content.push(' ');
        content.push_str(word);
    }

    let chars: usize = req.messages.iter().map(|m| char_len(&m.content)).sum();
    let prompt_tokens = u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX).max(1);
    Reply {
        content,
        prompt_tokens,
        completion_tokens: words,
    }
}

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

/// A non-streamed `chat.completion` body.
pub fn completion_body(id: &str, created: i64, model: &str, reply: &Reply) -> Value {
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": reply.content},
            "finish_reason": "stop"
        }],
        "usage": Usage::from(reply),
    })
}

/// A whole SSE stream: a role chunk, one chunk per word, a stop chunk, an optional
/// usage chunk, then `[DONE]`. Concatenating the deltas gives exactly `reply.content`.
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

    push(
        choice(json!({"role": "assistant", "content": ""}), Value::Null),
        None,
    );
    for piece in reply.content.split_inclusive(' ') {
        push(choice(json!({"content": piece}), Value::Null), None);
    }
    push(choice(json!({}), json!("stop")), None);
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn req(v: Value) -> ChatRequest {
        parse_request(v.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn durations() {
        assert_eq!(openai_duration(Duration::ZERO), "0ms");
        assert_eq!(openai_duration(Duration::from_micros(300)), "1ms");
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
    }

    #[test]
    fn reply_is_deterministic_and_sized() {
        let r = req(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello there"}
        ]}));
        let a = reply_for(&r, 16);
        assert_eq!(a, reply_for(&r, 16));
        assert!(a
            .content
            .starts_with("Simulated reply to: hello there lorem"));
        assert_eq!(a.content.split_whitespace().count(), 16);
        assert_eq!(a.completion_tokens, 16);
        assert_eq!(a.prompt_tokens, 5); // 8 + 11 chars -> ceil(19 / 4)

        let capped = req(
            json!({"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "x"}]}),
        );
        let c = reply_for(&capped, 16);
        assert_eq!(
            (c.completion_tokens, c.content.split_whitespace().count()),
            (7, 7)
        );

        let long = "y".repeat(100);
        let l = reply_for(
            &req(json!({"messages": [{"role": "user", "content": long}]})),
            1,
        );
        assert_eq!(l.content, format!("Simulated reply to: {}", "y".repeat(64)));
    }

    #[test]
    fn stream_concatenates_to_content() {
        let r = req(json!({"model": "m", "messages": [{"role": "user", "content": "a  b\nc"}]}));
        let reply = reply_for(&r, 12);
        let body = stream_body("id", 1, "m", &reply, true);
        let mut text = String::new();
        let mut saw_done = false;
        for line in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
            if line == "[DONE]" {
                saw_done = true;
                continue;
            }
            let v: Value = serde_json::from_str(line).unwrap();
            if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(s);
            }
        }
        assert!(saw_done);
        assert_eq!(text, reply.content);
        assert!(body.contains("\"finish_reason\":\"stop\""));
        assert!(body.contains("\"total_tokens\""));
    }

    #[test]
    fn bad_requests() {
        assert!(parse_request(b"{").is_err());
        assert!(parse_request(br#"{"model":"m","messages":[]}"#).is_err());
        assert!(parse_request(br#"{"model":"m"}"#).is_err());
        let parts = req(json!({"model": "m", "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]}
        ]}));
        assert!(reply_for(&parts, 4)
            .content
            .starts_with("Simulated reply to: hi"));
    }
}
