//! Parsing an Anthropic Messages API request (text, images, tools, tool results) into the
//! common [`ChatRequest`], with Anthropic's own checks and error messages.

use serde::Deserialize;
use serde_json::Value;

use crate::chat::{self, ChatRequest, Message, Role, ToolChoice, ToolDef};

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
