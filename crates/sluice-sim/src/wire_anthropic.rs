//! Anthropic Messages API wire format: requests (text, images, tools, tool results) mapped onto
//! the common [`ChatRequest`] with Anthropic's own checks, replies (text or `tool_use`) and errors.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{self, ChatRequest, Message, Reply, Role, ToolChoice, ToolDef};
use crate::wire;

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
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
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
        messages.push(Message::new(Role::System, system_text(&system)?));
    }
    // The tool_use ids of the previous assistant turn, which the next turn must answer.
    let mut open: Vec<String> = Vec::new();
    let last = req.messages.len() - 1;
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "user" => Role::User,
            "assistant" => Role::Assistant,
            _ => {
                return Err(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                ))
            }
        };
        let turn = turn(i, role, &m.content, &open)?;
        if !open.is_empty() && turn.answered.len() < open.len() {
            let missing: Vec<&str> = open
                .iter()
                .filter(|id| !turn.answered.contains(id))
                .map(String::as_str)
                .collect();
            return Err(unanswered(i - 1, &missing));
        }
        open = turn.calls;
        messages.extend(turn.messages);
    }
    if !open.is_empty() {
        let ids: Vec<&str> = open.iter().map(String::as_str).collect();
        return Err(unanswered(last, &ids));
    }
    let tools = match req.tools {
        None => Vec::new(),
        Some(t) => t
            .iter()
            .enumerate()
            .map(|(i, tool)| parse_tool(i, tool))
            .collect::<Result<Vec<_>, _>>()?,
    };
    for (i, t) in tools.iter().enumerate() {
        if tools[..i].iter().any(|u| u.name == t.name) {
            return Err("tools: Tool names must be unique.".into());
        }
    }
    let tool_choice = match &req.tool_choice {
        None => ToolChoice::Auto,
        Some(choice) => parse_tool_choice(choice, &tools)?,
    };
    Ok(ChatRequest {
        model: Some(model),
        messages,
        max_tokens: Some(max_tokens),
        stream: req.stream,
        include_usage: false,
        tools,
        tool_choice,
        format: chat::Format::Text,
    })
}

fn unanswered(i: usize, ids: &[&str]) -> String {
    format!(
        "messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately after: \
         {}. Each `tool_use` block must have a corresponding `tool_result` block in the next \
         message.",
        ids.join(", ")
    )
}

fn system_text(system: &Value) -> Result<String, String> {
    match system {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => blocks
            .iter()
            .enumerate()
            .map(|(j, b)| match (b["type"].as_str(), b["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t),
                _ => Err(format!("system.{j}: Input should be a valid text block")),
            })
            .collect(),
        _ => Err("system: Input should be a valid string or a list of text blocks".into()),
    }
}

/// One message in the common form: a user turn's tool results become `tool` messages (after any
/// text of the same turn), an assistant turn's tool_use blocks its calls.
struct Turn {
    messages: Vec<Message>,
    /// tool_use ids this (assistant) turn opened.
    calls: Vec<String>,
    /// tool_use ids this (user) turn answered.
    answered: Vec<String>,
}

fn turn(i: usize, role: Role, content: &Value, open: &[String]) -> Result<Turn, String> {
    let mut message = Message::new(role, "");
    let mut out = Turn {
        messages: Vec::new(),
        calls: Vec::new(),
        answered: Vec::new(),
    };
    let mut results = Vec::new();
    let blocks = match content {
        Value::String(s) if s.is_empty() => {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content except for the optional \
                 final assistant message"
            ))
        }
        Value::String(s) => {
            message.text.clone_from(s);
            out.messages.push(message);
            return Ok(out);
        }
        Value::Array(blocks) if !blocks.is_empty() => blocks,
        Value::Array(_) => {
            return Err(format!(
                "messages.{i}: all messages must have non-empty content except for the optional \
                 final assistant message"
            ))
        }
        _ => {
            return Err(format!(
                "messages.{i}.content: Input should be a valid string or a list of content blocks"
            ))
        }
    };
    let mut seen_other = false;
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        let kind = block
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if kind != "tool_result" {
            seen_other = true;
        }
        match kind {
            "text" => match block.get("text").and_then(Value::as_str) {
                Some("") => return Err("messages: text content blocks must be non-empty".into()),
                Some(t) => message.text.push_str(t),
                None => return Err(format!("{at}.text: Field required")),
            },
            "image" => {
                check_image(&at, block)?;
                message.images += 1;
            }
            "tool_use" if role == Role::Assistant => {
                let id = block.get("id").and_then(Value::as_str).unwrap_or_default();
                if id.is_empty()
                    || !id
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(format!(
                        "{at}.tool_use.id: String should match pattern '^[a-zA-Z0-9_-]+$'"
                    ));
                }
                let Some(name) = block.get("name").and_then(Value::as_str) else {
                    return Err(format!("{at}.tool_use.name: Field required"));
                };
                let Some(input) = block.get("input").filter(|v| v.is_object()) else {
                    return Err(format!(
                        "{at}.tool_use.input: Input should be a valid dictionary"
                    ));
                };
                message.call_chars += name.len() + input.to_string().len();
                out.calls.push(id.to_owned());
            }
            "tool_result" if role == Role::User => {
                // Anthropic wants the results first, before anything else the user says.
                if seen_other {
                    return Err(format!(
                        "messages.{i}: `tool_result` blocks must come first in the content of a \
                         user message, before any other block"
                    ));
                }
                let id = block
                    .get("tool_use_id")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if !open.iter().any(|o| o == id) {
                    return Err(format!(
                        "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each \
                         `tool_result` block must have a corresponding `tool_use` block in the \
                         previous message."
                    ));
                }
                out.answered.push(id.to_owned());
                results.push(result_message(&at, block.get("content"))?);
            }
            "tool_use" | "tool_result" => {
                return Err(format!(
                    "{at}: `{kind}` blocks are not allowed in a message with role '{}'",
                    if role == Role::User {
                        "user"
                    } else {
                        "assistant"
                    }
                ))
            }
            // Accepted by Anthropic; nothing the simulator reads.
            "document" | "thinking" | "redacted_thinking" => {}
            other => {
                return Err(format!(
                    "{at}: Input tag '{other}' found using 'type' does not match any of the \
                     expected tags: 'text', 'image', 'document', 'tool_use', 'tool_result', \
                     'thinking', 'redacted_thinking'"
                ))
            }
        }
    }
    // Text first, then the results, so a turn that answers tools ends with them.
    if !message.text.is_empty()
        || message.images > 0
        || message.call_chars > 0
        || results.is_empty()
    {
        out.messages.push(message);
    }
    out.messages.extend(results);
    Ok(out)
}

fn check_image(at: &str, block: &Value) -> Result<(), String> {
    let source = &block["source"];
    match source["type"].as_str() {
        Some("base64") => {
            let media = source["media_type"].as_str().unwrap_or_default();
            if !matches!(
                media,
                "image/jpeg" | "image/png" | "image/gif" | "image/webp"
            ) {
                return Err(format!(
                    "{at}.image.source.base64.media_type: Input should be 'image/jpeg', \
                     'image/png', 'image/gif' or 'image/webp'"
                ));
            }
            let data = source["data"].as_str().unwrap_or_default();
            if data.is_empty() || !chat::is_base64(data) {
                return Err(format!(
                    "{at}.image.source.base64.data: The image data is not valid base64"
                ));
            }
            Ok(())
        }
        Some("url") => match source["url"].as_str() {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => Ok(()),
            _ => Err(format!(
                "{at}.image.source.url.url: Input should be a valid URL"
            )),
        },
        _ => Err(format!(
            "{at}.image.source: Input tag found using 'type' does not match any of the expected \
             tags: 'base64', 'url'"
        )),
    }
}

/// A tool result as a `tool` message: its text (a string, or text blocks) and images.
fn result_message(at: &str, content: Option<&Value>) -> Result<Message, String> {
    let mut m = Message::new(Role::Tool, "");
    match content {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => m.text.clone_from(s),
        Some(Value::Array(blocks)) => {
            for (k, b) in blocks.iter().enumerate() {
                match b["type"].as_str() {
                    Some("text") => m.text.push_str(b["text"].as_str().unwrap_or_default()),
                    Some("image") => {
                        check_image(&format!("{at}.content.{k}"), b)?;
                        m.images += 1;
                    }
                    _ => {
                        return Err(format!(
                            "{at}.tool_result.content.{k}: Input should be a text or image block"
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(format!(
                "{at}.tool_result.content: Input should be a valid string or a list of blocks"
            ))
        }
    }
    Ok(m)
}

fn parse_tool(i: usize, tool: &Value) -> Result<ToolDef, String> {
    match tool.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(other) => {
            return Err(format!(
                "tools.{i}: the simulator serves custom tools only, not '{other}'"
            ))
        }
    }
    let name = tool.get("name").and_then(Value::as_str).unwrap_or_default();
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !valid {
        return Err(format!(
            "tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
        ));
    }
    let Some(schema) = tool.get("input_schema") else {
        return Err(format!("tools.{i}.custom.input_schema: Field required"));
    };
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(format!(
            "tools.{i}.custom.input_schema.type: Input should be 'object'"
        ));
    }
    Ok(ToolDef {
        name: name.to_owned(),
        description: tool
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        schema: schema.clone(),
    })
}

fn parse_tool_choice(choice: &Value, tools: &[ToolDef]) -> Result<ToolChoice, String> {
    if choice
        .get("disable_parallel_tool_use")
        .is_some_and(|d| !d.is_boolean())
    {
        return Err(
            "tool_choice.disable_parallel_tool_use: Input should be a valid boolean".into(),
        );
    }
    let kind = choice
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if matches!(kind, "any" | "tool") && tools.is_empty() {
        return Err(format!(
            "tool_choice: tool_choice.type '{kind}' may only be specified while providing tools"
        ));
    }
    match kind {
        "auto" => Ok(ToolChoice::Auto),
        "any" => Ok(ToolChoice::Required),
        "none" => Ok(ToolChoice::None),
        "tool" => match choice.get("name").and_then(Value::as_str) {
            Some(name) if tools.iter().any(|t| t.name == name) => {
                Ok(ToolChoice::Named(name.to_owned()))
            }
            Some(name) => Err(format!(
                "tool_choice.tool.name: Tool '{name}' not found in provided tools"
            )),
            None => Err("tool_choice.tool.name: Field required".into()),
        },
        other => Err(format!(
            "tool_choice: Input tag '{other}' found using 'type' does not match any of the \
             expected tags: 'auto', 'any', 'tool', 'none'"
        )),
    }
}

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chat::reply_for;

    fn parse(v: Value) -> Result<ChatRequest, String> {
        parse_request(v.to_string().as_bytes())
    }

    fn weather() -> Value {
        json!({"name": "get_weather", "description": "Weather",
               "input_schema": {"type": "object", "required": ["city"],
                                "properties": {"city": {"type": "string"}}}})
    }

    /// (event name, data) of each event of an SSE body.
    fn events(body: &str) -> Vec<(String, Value)> {
        body.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let v: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                (name.strip_prefix("event: ").unwrap().to_owned(), v)
            })
            .collect()
    }

    #[test]
    fn maps_onto_the_openai_reply() {
        let anthropic = parse(
            json!({"model": "claude-sim", "max_tokens": 1024, "system": "be brief",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}]}),
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
        assert_eq!(reply_for(&anthropic, 16), reply_for(&openai, 16));
    }

    #[test]
    fn images_tools_and_results_map_like_openai() {
        let png = "iVBORw0KGgo=";
        let anthropic = parse(json!({"model": "c", "max_tokens": 50, "tools": [weather()],
            "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}},
                    {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                    "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "sunny"}]}]}]}))
        .unwrap();
        let openai = wire::parse_request(json!({"model": "m", "max_tokens": 50,
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{png}")}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
            .to_string().as_bytes())
        .unwrap();
        assert_eq!(anthropic.messages, openai.messages);
        assert_eq!(
            (&anthropic.tools, &anthropic.tool_choice),
            (&openai.tools, &openai.tool_choice)
        );
        let reply = reply_for(&anthropic, 8);
        assert_eq!(reply, reply_for(&openai, 8));
        assert!(reply
            .content
            .starts_with("Simulated reply to tool result: sunny"));
    }

    #[test]
    fn a_tool_call_answer_plain_and_streamed() {
        let req = parse(json!({"model": "c", "max_tokens": 50, "tools": [weather()],
            "messages": [{"role": "user", "content": "weather?"}]}))
        .unwrap();
        let reply = reply_for(&req, 8);
        let body = message_body("msg_sim_0123456789abcdef0123456789abcdef", "c", &reply);
        assert_eq!(
            body["content"],
            json!([{"type": "tool_use", "id": "toolu_sim_89abcdef0123456789abcdef",
                    "name": "get_weather", "input": {"city": "sim"}}])
        );
        assert_eq!(body["stop_reason"], "tool_use");

        let events = events(&stream_body("msg_sim_1", "c", &reply));
        let start = &events[1].1;
        assert_eq!(
            start["content_block"],
            json!({"type": "tool_use", "id": "toolu_sim_msgsim1", "name": "get_weather", "input": {}})
        );
        let json: String = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .map(|(_, d)| {
                assert_eq!(d["delta"]["type"], "input_json_delta");
                d["delta"]["partial_json"].as_str().unwrap()
            })
            .collect();
        assert_eq!(json, r#"{"city":"sim"}"#);
        assert!(
            events
                .iter()
                .filter(|(n, _)| n == "content_block_delta")
                .count()
                >= 3
        );
        assert_eq!(
            events[events.len() - 2].1["delta"]["stop_reason"],
            "tool_use"
        );
    }

    #[test]
    fn rejects_what_anthropic_rejects() {
        let bad = |v: Value| parse(v).unwrap_err();
        let msg = json!([{"role": "user", "content": "x"}]);
        assert!(bad(json!({"model": "m", "messages": msg})).contains("max_tokens"));
        assert!(bad(json!({"max_tokens": 5, "messages": msg})).contains("model"));
        assert!(bad(json!({"model": "m", "max_tokens": 5, "messages": []})).contains("messages"));
        let system_role = json!([{"role": "system", "content": "x"}]);
        assert!(
            bad(json!({"model": "m", "max_tokens": 5, "messages": system_role})).contains("role")
        );
        assert!(parse_request(b"{").is_err());

        let with = |messages: Value| json!({"model": "m", "max_tokens": 5, "messages": messages});
        let call = json!({"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}]});
        // A result for a call the previous turn did not make.
        assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2"}]}])))
        .contains("unexpected `tool_use_id`"));
        // A call nobody answered.
        assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
            {"role": "user", "content": "and?"}])))
        .contains("without `tool_result` blocks immediately after: toolu_1"));
        // Results after text.
        assert!(bad(with(json!([{"role": "user", "content": "x"}, call,
            {"role": "user", "content": [{"type": "text", "text": "here"},
                {"type": "tool_result", "tool_use_id": "toolu_1"}]}])))
        .contains("must come first"));
        assert!(bad(with(
            json!([{"role": "user", "content": [{"type": "text", "text": ""}]}])
        ))
        .contains("non-empty"));
        assert!(
            bad(with(json!([{"role": "user", "content": [{"type": "image",
            "source": {"type": "base64", "media_type": "image/bmp", "data": "AAAA"}}]}])))
            .contains("media_type")
        );
        assert!(
            bad(with(json!([{"role": "user", "content": [{"type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": "not base64!"}}]}])))
            .contains("base64")
        );
        assert!(bad(with(
            json!([{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "https://x"}}]}])
        ))
        .contains("image_url"));

        let mut tools = with(json!([{"role": "user", "content": "x"}]));
        tools["tools"] = json!([{"name": "f", "parameters": {"type": "object"}}]);
        assert!(bad(tools.clone()).contains("input_schema: Field required"));
        tools["tools"] = json!([weather()]);
        tools["tool_choice"] = json!({"type": "tool", "name": "nope"});
        assert!(bad(tools.clone()).contains("nope"));
        tools["tool_choice"] = json!({"type": "function"});
        assert!(bad(tools).contains("'auto', 'any', 'tool', 'none'"));
    }

    #[test]
    fn stream_deltas_concatenate_to_content() {
        let reply = Reply {
            content: "Simulated reply to: hi lorem".into(),
            tool_call: None,
            prompt_tokens: 3,
            completion_tokens: 5,
        };
        let events = events(&stream_body("msg_sim_1", "claude-sim", &reply));
        let mut text = String::new();
        for (name, v) in &events {
            assert_eq!(&v["type"], name.as_str());
            if let Some(t) = v["delta"]["text"].as_str() {
                text.push_str(t);
            }
        }
        assert_eq!(text, reply.content);
        assert_eq!(events.first().map(|e| e.0.as_str()), Some("message_start"));
        assert_eq!(events.last().map(|e| e.0.as_str()), Some("message_stop"));
    }
}
