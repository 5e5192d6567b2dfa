//! Parsing an OpenAI chat-completions request into the common [`ChatRequest`], with OpenAI's own
//! checks (roles, content parts, images, tool calls and results, tools, formats) and messages.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{self, ChatRequest, Format, Message, Role, ToolChoice, ToolDef};

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
