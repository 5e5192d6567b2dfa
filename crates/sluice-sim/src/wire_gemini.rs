//! Gemini `generateContent` wire format: requests mapped onto the common [`ChatRequest`], replies and errors.
//! The reply text and token counts come from [`wire::reply_for`], so they match the OpenAI format exactly.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::wire::{ChatRequest, Message, Reply};

/// Gemini's JSON mapping accepts both camelCase and the proto's snake_case names.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    #[serde(default)]
    contents: Vec<Content>,
    #[serde(default, alias = "system_instruction")]
    system_instruction: Option<Content>,
    #[serde(default, alias = "generation_config")]
    generation_config: Option<GenerationConfig>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default, alias = "max_output_tokens")]
    max_output_tokens: Option<u32>,
}

fn text_of(parts: &[Part]) -> String {
    parts.iter().filter_map(|p| p.text.as_deref()).collect()
}

/// Parses and validates a `generateContent` body for `model`; the error is the message for a 400.
pub fn parse_request(body: &[u8], model: &str, stream: bool) -> Result<ChatRequest, String> {
    let req: GenerateRequest =
        serde_json::from_slice(body).map_err(|e| format!("Invalid JSON payload received. {e}"))?;
    if model.is_empty() {
        return Err("model name is required".into());
    }
    if req.contents.is_empty() {
        return Err("* GenerateContentRequest.contents: contents is not specified".into());
    }
    let mut messages = Vec::with_capacity(req.contents.len() + 1);
    if let Some(system) = req.system_instruction {
        messages.push(Message {
            role: "system".into(),
            content: Value::String(text_of(&system.parts)),
        });
    }
    for (i, c) in req.contents.into_iter().enumerate() {
        // A single-turn request may leave the role out; Gemini then treats it as the user.
        let role = match c.role.as_deref() {
            None | Some("user") => "user",
            Some("model") => "assistant",
            Some(other) => {
                return Err(format!(
                    "* GenerateContentRequest.contents[{i}].role: Please use a valid role: user, model. (got {other:?})"
                ))
            }
        };
        if c.parts.is_empty() {
            return Err(format!(
                "* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            ));
        }
        messages.push(Message {
            role: role.into(),
            content: Value::String(text_of(&c.parts)),
        });
    }
    Ok(ChatRequest {
        model: Some(model.to_owned()),
        messages,
        max_tokens: req.generation_config.and_then(|g| g.max_output_tokens),
        max_completion_tokens: None,
        stream,
        stream_options: None,
    })
}

fn usage(reply: &Reply) -> Value {
    json!({
        "promptTokenCount": reply.prompt_tokens,
        "candidatesTokenCount": reply.completion_tokens,
        "totalTokenCount": reply.prompt_tokens.saturating_add(reply.completion_tokens),
    })
}

/// A non-streamed `GenerateContentResponse`.
pub fn response_body(model: &str, reply: &Reply) -> Value {
    json!({
        "candidates": [{
            "content": {"role": "model", "parts": [{"text": reply.content}]},
            "finishReason": "STOP",
            "index": 0,
        }],
        "usageMetadata": usage(reply),
        "modelVersion": model,
    })
}

/// One chunk per word; the last one also carries `finishReason` and the full `usageMetadata`,
/// as Gemini's own streams do.
pub fn stream_chunks(model: &str, reply: &Reply) -> Vec<Value> {
    let pieces: Vec<&str> = reply.content.split_inclusive(' ').collect();
    let last = pieces.len().saturating_sub(1);
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut candidate = json!({
                "content": {"role": "model", "parts": [{"text": piece}]},
                "index": 0,
            });
            let mut chunk = json!({"modelVersion": model});
            if i == last {
                candidate["finishReason"] = json!("STOP");
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::wire;

    #[test]
    fn maps_onto_the_openai_reply() {
        let gemini = parse_request(
            json!({"systemInstruction": {"parts": [{"text": "be "}, {"text": "brief"}]},
                   "contents": [{"role": "user", "parts": [{"text": "hello"}]},
                                {"role": "model", "parts": [{"text": "hi"}]},
                                {"role": "user", "parts": [{"text": "hello there"}]}],
                   "generationConfig": {"maxOutputTokens": 9}})
            .to_string()
            .as_bytes(),
            "gemini-sim",
            false,
        )
        .unwrap();
        let openai = wire::parse_request(
            json!({"model": "m", "max_tokens": 9, "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "hello there"}]})
            .to_string()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(wire::reply_for(&gemini, 16), wire::reply_for(&openai, 16));
        assert_eq!(wire::reply_for(&gemini, 16).completion_tokens, 9);
    }

    #[test]
    fn rejects_bad_roles_and_empty_contents() {
        let bad = |v: Value| parse_request(v.to_string().as_bytes(), "m", false).unwrap_err();
        assert!(bad(json!({"contents": []})).contains("contents"));
        assert!(
            bad(json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}))
                .contains("role")
        );
        assert!(bad(json!({"contents": [{"role": "user", "parts": []}]})).contains("parts"));
    }

    #[test]
    fn last_chunk_carries_finish_and_usage() {
        let reply = Reply {
            content: "a b c".into(),
            prompt_tokens: 2,
            completion_tokens: 3,
        };
        let chunks = stream_chunks("g", &reply);
        assert_eq!(chunks.len(), 3);
        let text: String = chunks
            .iter()
            .map(|c| {
                c["candidates"][0]["content"]["parts"][0]["text"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        assert_eq!(text, "a b c");
        assert!(chunks[0].get("usageMetadata").is_none());
        assert_eq!(chunks[2]["candidates"][0]["finishReason"], "STOP");
        assert_eq!(chunks[2]["usageMetadata"]["totalTokenCount"], 5);
    }
}
