//! OpenAI chat-completions wire format: request parsing and validation, replies (text, JSON or a
//! tool call; plain and streamed) and error bodies. Pure functions, so the exact bytes are unit-tested.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::chat::{self, ChatRequest, Format, Message, Reply, Role, ToolChoice, ToolDef};

/// The parts of an OpenAI chat request the simulator reads; unknown fields are ignored. Tools,
/// messages' parts and formats stay raw JSON so errors can name the field the way OpenAI does.
#[derive(Debug, Deserialize)]
struct WireRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<WireMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    /// Newer OpenAI clients send this instead of `max_tokens`.
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<Value>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Deserialize)]
struct WireMessage {
    role: String,
    /// A string, an array of content parts, or null (assistant tool calls).
    #[serde(default)]
    content: Value,
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

/// Parses and validates a request body; the error is the message for a 400.
pub fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let req: WireRequest = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request. ({e})"))?;
    if req.messages.is_empty() {
        return Err("[] is too short - 'messages'".into());
    }
    let messages = parse_messages(req.messages)?;
    let tools = match req.tools {
        None => Vec::new(),
        Some(t) if t.is_empty() => {
            return Err(
                "Invalid 'tools': empty array. Expected an array with minimum length 1, \
                        but got an empty array instead."
                    .into(),
            )
        }
        Some(t) => t
            .iter()
            .enumerate()
            .map(|(i, tool)| parse_tool(i, tool))
            .collect::<Result<_, _>>()?,
    };
    let tool_choice = match req.tool_choice {
        None => ToolChoice::Auto,
        Some(_) if tools.is_empty() => {
            return Err(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when \
                        'tools' are specified."
                    .into(),
            )
        }
        Some(choice) => parse_tool_choice(&choice, &tools)?,
    };
    if req.parallel_tool_calls.is_some() && tools.is_empty() {
        return Err(
            "Invalid value for 'parallel_tool_calls': 'parallel_tool_calls' is only \
                    allowed when 'tools' are specified."
                .into(),
        );
    }
    let format = match &req.response_format {
        None => Format::Text,
        Some(f) => parse_format(f, &messages)?,
    };
    Ok(ChatRequest {
        model: req.model,
        messages,
        max_tokens: req.max_tokens.or(req.max_completion_tokens),
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        tools,
        tool_choice,
        format,
    })
}

/// Messages in the common form, checking what OpenAI checks: roles, content shapes, images only
/// from the user, and that tool calls and tool results pair up by id.
fn parse_messages(wire: Vec<WireMessage>) -> Result<Vec<Message>, String> {
    let mut messages = Vec::with_capacity(wire.len());
    // Calls of the last assistant turn that no tool message has answered yet.
    let mut pending: Vec<String> = Vec::new();
    for (i, m) in wire.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(format!(
                    "Invalid value: '{other}'. Supported values are: 'system', 'assistant', \
                     'user', 'function', 'tool', and 'developer'."
                ))
            }
        };
        if role != Role::Tool && !pending.is_empty() {
            return Err(unanswered(&pending));
        }
        let calls = m.tool_calls.unwrap_or_default();
        if !calls.is_empty() && role != Role::Assistant {
            return Err(format!(
                "Invalid parameter: only messages with role 'assistant' can have 'tool_calls' \
                 (messages[{i}])."
            ));
        }
        let mut message = content(i, role, &m.content, !calls.is_empty())?;
        for (j, call) in calls.iter().enumerate() {
            let (id, chars) = parse_call(i, j, call)?;
            pending.push(id);
            message.call_chars += chars;
        }
        if role == Role::Tool {
            let Some(id) = m.tool_call_id else {
                return Err(format!(
                    "Missing required parameter: 'messages[{i}].tool_call_id'."
                ));
            };
            let Some(at) = pending.iter().position(|p| *p == id) else {
                return Err(
                    "Invalid parameter: messages with role 'tool' must be a response to a \
                            preceeding message with 'tool_calls'."
                        .into(),
                );
            };
            pending.remove(at);
        }
        messages.push(message);
    }
    if !pending.is_empty() {
        return Err(unanswered(&pending));
    }
    Ok(messages)
}

fn unanswered(ids: &[String]) -> String {
    format!(
        "An assistant message with 'tool_calls' must be followed by tool messages responding to \
         each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
        ids.join(", ")
    )
}

/// A message's text and images; null content only for an assistant turn that calls tools.
fn content(i: usize, role: Role, content: &Value, has_calls: bool) -> Result<Message, String> {
    let mut message = Message::new(role, "");
    match content {
        Value::String(s) => message.text.clone_from(s),
        Value::Null if role == Role::Assistant && has_calls => {}
        Value::Array(parts) if !parts.is_empty() => {
            for (j, part) in parts.iter().enumerate() {
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text").and_then(Value::as_str) {
                        Some(t) => message.text.push_str(t),
                        None => {
                            return Err(format!(
                                "Missing required parameter: 'messages[{i}].content[{j}].text'."
                            ))
                        }
                    },
                    Some("image_url") => {
                        if role != Role::User {
                            return Err(format!(
                                "Image URLs are only allowed for messages with role 'user', but \
                                 this message with role '{}' contains an image URL.",
                                role_name(role)
                            ));
                        }
                        let url = part
                            .pointer("/image_url/url")
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        let fetchable = url.starts_with("https://") || url.starts_with("http://");
                        let inline = url
                            .strip_prefix("data:image/")
                            .and_then(|rest| rest.split_once(";base64,"))
                            .is_some_and(|(_, data)| chat::is_base64(data));
                        if !fetchable && !inline {
                            return Err(format!(
                                "Invalid 'messages[{i}].content[{j}].image_url.url'. Expected a \
                                 valid URL, but got a value with an invalid format."
                            ));
                        }
                        message.images += 1;
                    }
                    // Accepted by OpenAI; nothing the simulator reads.
                    Some("input_audio" | "file" | "refusal") => {}
                    other => {
                        return Err(format!(
                            "Invalid value: '{}'. Supported values are: 'text', 'image_url', \
                             'input_audio', 'refusal', 'audio', and 'file'.",
                            other.unwrap_or_default()
                        ))
                    }
                }
            }
        }
        Value::Array(_) => {
            return Err(format!(
                "Invalid 'messages[{i}].content': empty array. Expected an array with minimum \
                 length 1, but got an empty array instead."
            ))
        }
        Value::Null => {
            return Err(format!(
                "Invalid value for 'messages[{i}].content': expected a string, got null."
            ))
        }
        _ => {
            return Err(format!(
                "Invalid type for 'messages[{i}].content': expected one of a string or array of \
                 objects."
            ))
        }
    }
    Ok(message)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    }
}

/// One assistant tool call: its id and the characters it adds to the prompt.
fn parse_call(i: usize, j: usize, call: &Value) -> Result<(String, usize), String> {
    let at = format!("messages[{i}].tool_calls[{j}]");
    let id = call.get("id").and_then(Value::as_str);
    let name = call.pointer("/function/name").and_then(Value::as_str);
    let arguments = call.pointer("/function/arguments").and_then(Value::as_str);
    let (Some(id), Some(name), Some(arguments)) = (id, name, arguments) else {
        return Err(format!(
            "Missing required parameter: '{at}' needs 'id', 'function.name' and \
             'function.arguments' (a string)."
        ));
    };
    if call.get("type").and_then(Value::as_str) != Some("function") {
        return Err(format!(
            "Invalid value for '{at}.type': supported values are: 'function'."
        ));
    }
    // Count arguments as compact JSON, as the other formats (which send objects) are counted.
    let args =
        serde_json::from_str::<Value>(arguments).map_or(arguments.len(), |v| v.to_string().len());
    Ok((id.to_owned(), name.len() + args))
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn parse_tool(i: usize, tool: &Value) -> Result<ToolDef, String> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        None => return Err(format!("Missing required parameter: 'tools[{i}].type'.")),
        Some(other) => {
            return Err(format!(
                "Invalid value: '{other}'. Supported values are: 'function' and 'custom'."
            ))
        }
    }
    let Some(function) = tool.get("function").filter(|f| f.is_object()) else {
        return Err(format!(
            "Missing required parameter: 'tools[{i}].function'."
        ));
    };
    let Some(name) = function.get("name").and_then(Value::as_str) else {
        return Err(format!(
            "Missing required parameter: 'tools[{i}].function.name'."
        ));
    };
    if !valid_name(name) {
        return Err(format!(
            "Invalid 'tools[{i}].function.name': string does not match pattern. Expected a string \
             that matches the pattern '^[a-zA-Z0-9_-]+$'."
        ));
    }
    let schema = match function.get("parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(format!(
                "Invalid type for 'tools[{i}].function.parameters': expected an object."
            ))
        }
    };
    Ok(ToolDef {
        name: name.to_owned(),
        description: function
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        schema,
    })
}

fn parse_tool_choice(choice: &Value, tools: &[ToolDef]) -> Result<ToolChoice, String> {
    match choice {
        Value::String(mode) => match mode.as_str() {
            "auto" => Ok(ToolChoice::Auto),
            "required" => Ok(ToolChoice::Required),
            "none" => Ok(ToolChoice::None),
            other => Err(format!(
                "Invalid value: '{other}'. Supported values are: 'none', 'auto', and 'required'."
            )),
        },
        Value::Object(_) if choice.get("type").and_then(Value::as_str) == Some("function") => {
            let Some(name) = choice.pointer("/function/name").and_then(Value::as_str) else {
                return Err("Missing required parameter: 'tool_choice.function.name'.".into());
            };
            if !tools.iter().any(|t| t.name == name) {
                return Err(format!(
                    "Invalid value for 'tool_choice': function '{name}' is not among 'tools'."
                ));
            }
            Ok(ToolChoice::Named(name.to_owned()))
        }
        _ => Err(
            "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or \
                  {\"type\": \"function\", \"function\": {\"name\": ...}}."
                .into(),
        ),
    }
}

fn parse_format(format: &Value, messages: &[Message]) -> Result<Format, String> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Format::Text),
        Some("json_object") => {
            // OpenAI refuses JSON mode unless the conversation asks for JSON somewhere.
            let asks = messages
                .iter()
                .any(|m| m.text.to_ascii_lowercase().contains("json"));
            if asks {
                Ok(Format::JsonObject)
            } else {
                Err(
                    "'messages' must contain the word 'json' in some form, to use \
                     'response_format' of type 'json_object'."
                        .into(),
                )
            }
        }
        Some("json_schema") => {
            let Some(spec) = format.get("json_schema").filter(|s| s.is_object()) else {
                return Err("Missing required parameter: 'response_format.json_schema'.".into());
            };
            match spec.get("name").and_then(Value::as_str) {
                Some(name) if valid_name(name) => {}
                Some(_) => {
                    return Err(
                        "Invalid 'response_format.json_schema.name': string does not \
                                match pattern. Expected a string that matches the pattern \
                                '^[a-zA-Z0-9_-]+$'."
                            .into(),
                    )
                }
                None => {
                    return Err(
                        "Missing required parameter: 'response_format.json_schema.name'.".into(),
                    )
                }
            }
            Ok(match spec.get("schema") {
                Some(schema) if schema.is_object() => Format::JsonSchema(schema.clone()),
                _ => Format::JsonObject,
            })
        }
        Some(other) => Err(format!(
            "Invalid value: '{other}'. Supported values are: 'text', 'json_object', and \
             'json_schema'."
        )),
        None => Err("Missing required parameter: 'response_format.type'.".into()),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chat::reply_for;

    fn req(v: Value) -> ChatRequest {
        parse_request(v.to_string().as_bytes()).unwrap()
    }

    fn bad(v: Value) -> String {
        parse_request(v.to_string().as_bytes()).unwrap_err()
    }

    fn weather_tool() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "required": ["city"],
                           "properties": {"city": {"type": "string"}}}}})
    }

    /// The data of each event of an SSE body, `[DONE]` as a string.
    fn events(body: &str) -> Vec<Value> {
        body.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or_else(|_| json!(d)))
            .collect()
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
    fn parses_into_the_common_form() {
        let r = req(
            json!({"model": "m", "max_completion_tokens": 9, "messages": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "what is "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "this?"}]}
        ], "stream": true, "stream_options": {"include_usage": true}}),
        );
        assert_eq!(
            r.messages,
            vec![
                Message::new(Role::System, "be brief"),
                Message {
                    images: 1,
                    ..Message::new(Role::User, "what is this?")
                }
            ]
        );
        assert_eq!(
            (r.max_tokens, r.stream, r.include_usage),
            (Some(9), true, true)
        );
        assert_eq!(
            reply_for(&r, 4).content,
            "Simulated reply to: [1 image] what is this?"
        );
    }

    #[test]
    fn tools_choices_and_formats() {
        let r = req(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "parallel_tool_calls": false}),
        );
        assert_eq!(r.tools[0].name, "get_weather");
        assert_eq!(r.tool_choice, ToolChoice::Named("get_weather".into()));
        let r = req(json!({"messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "a",
                "schema": {"type": "object", "properties": {"x": {"type": "boolean"}}}}}}));
        assert_eq!(
            r.format,
            Format::JsonSchema(json!({"type": "object", "properties": {"x": {"type": "boolean"}}}))
        );
        let r = req(
            json!({"messages": [{"role": "user", "content": "answer in JSON"}],
            "response_format": {"type": "json_object"}}),
        );
        assert_eq!(r.format, Format::JsonObject);
    }

    #[test]
    fn a_tool_call_answer_plain_and_streamed() {
        let r = req(
            json!({"model": "m", "messages": [{"role": "user", "content": "weather?"}],
                           "tools": [weather_tool()]}),
        );
        let reply = reply_for(&r, 16);
        let body = completion_body(
            "chatcmpl-sim-0123456789abcdef0123456789abcdef",
            1,
            "m",
            &reply,
        );
        assert_eq!(
            body["choices"][0],
            json!({"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_89abcdef0123456789abcdef", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"sim\"}"}}]}})
        );

        let stream = stream_body("chatcmpl-sim-x", 1, "m", &reply, false);
        let chunks = events(&stream);
        let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(
            (&first["id"], &first["function"]["name"], &first["index"]),
            (
                &json!("call_chatcmplsimx"),
                &json!("get_weather"),
                &json!(0)
            )
        );
        let pieces: Vec<&str> = chunks
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .filter(|a| !a.is_empty())
            .collect();
        assert!(pieces.len() >= 2, "{pieces:?}");
        assert_eq!(pieces.concat(), r#"{"city":"sim"}"#);
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "tool_calls"
        );
        assert_eq!(chunks[chunks.len() - 1], json!("[DONE]"));
    }

    #[test]
    fn the_follow_up_with_the_tool_result_gets_text() {
        let r = req(
            json!({"model": "m", "tools": [weather_tool()], "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]}),
        );
        assert_eq!(
            r.messages[1].call_chars,
            "get_weather".len() + r#"{"city":"Paris"}"#.len()
        );
        let reply = reply_for(&r, 10);
        assert!(reply.tool_call.is_none());
        let body = completion_body("id", 1, "m", &reply);
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        assert!(body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("Simulated reply to tool result: sunny, 21 C lorem"));
    }

    #[test]
    fn stream_concatenates_to_content() {
        let r = req(json!({"model": "m", "messages": [{"role": "user", "content": "a  b\nc"}]}));
        let reply = reply_for(&r, 12);
        let body = stream_body("id", 1, "m", &reply, true);
        let mut text = String::new();
        for v in events(&body) {
            if let Some(s) = v["choices"][0]["delta"]["content"].as_str() {
                text.push_str(s);
            }
        }
        assert!(body.ends_with("data: [DONE]\n\n"));
        assert_eq!(text, reply.content);
        assert!(body.contains("\"finish_reason\":\"stop\""));
        assert!(body.contains("\"total_tokens\""));
    }

    #[test]
    fn bad_requests() {
        assert!(parse_request(b"{").is_err());
        assert!(parse_request(br#"{"model":"m","messages":[]}"#).is_err());
        assert!(parse_request(br#"{"model":"m"}"#).is_err());
        let user = json!([{"role": "user", "content": "hi"}]);
        assert!(
            bad(json!({"messages": user, "tools": [{"type": "function"}]}))
                .contains("'tools[0].function'")
        );
        assert!(bad(
            json!({"messages": user, "tools": [{"type": "function", "function": {"name": "a b"}}]})
        )
        .contains("pattern"));
        assert!(bad(json!({"messages": user, "tools": []})).contains("empty array"));
        assert!(
            bad(json!({"messages": user, "tool_choice": "auto"})).contains("'tools' are specified")
        );
        assert!(bad(json!({"messages": user, "parallel_tool_calls": true}))
            .contains("'tools' are specified"));
        assert!(bad(json!({"messages": user, "tools": [weather_tool()],
            "tool_choice": {"type": "function", "function": {"name": "nope"}}}))
        .contains("nope"));
        assert!(
            bad(json!({"messages": user, "response_format": {"type": "json_object"}}))
                .contains("must contain the word 'json'")
        );
        assert!(
            bad(json!({"messages": user, "response_format": {"type": "json_schema"}}))
                .contains("json_schema'")
        );
        // A tool result needs the call it answers, and every call needs its result.
        assert!(bad(json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}))
        .contains("preceeding message with 'tool_calls'"));
        let call = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
        assert!(bad(json!({"messages": [{"role": "user", "content": "hi"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "user", "content": "and?"}]}))
        .contains("did not have response messages: call_1"));
        assert!(bad(json!({"messages": [{"role": "user", "content": null}]})).contains("got null"));
        assert!(bad(json!({"messages": [{"role": "assistant", "content": [
            {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]}))
        .contains("only allowed for messages with role 'user'"));
        assert!(bad(json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "ftp://x"}}]}]}))
        .contains("image_url.url"));
        assert!(bad(json!({"messages": [{"role": "robot", "content": "x"}]})).contains("robot"));
    }
}
