//! Parsing a Gemini `generateContent` request (text, inline and file data, function calls and
//! responses, tools, JSON output) into the common [`ChatRequest`], with Gemini's own checks.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::chat::{self, ChatRequest, Format, Message, Role, ToolChoice, ToolDef};

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
    #[serde(default)]
    tools: Vec<Value>,
    #[serde(default, alias = "tool_config")]
    tool_config: Option<Value>,
}

#[derive(Deserialize)]
struct Content {
    #[serde(default)]
    role: Option<String>,
    /// Raw, so that each part's one-of can be checked the way Gemini does.
    #[serde(default)]
    parts: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default, alias = "max_output_tokens")]
    max_output_tokens: Option<u32>,
    #[serde(default, alias = "response_mime_type")]
    response_mime_type: Option<String>,
    /// The OpenAPI-subset schema.
    #[serde(default, alias = "response_schema")]
    response_schema: Option<Value>,
    /// Full JSON Schema.
    #[serde(default, alias = "response_json_schema")]
    response_json_schema: Option<Value>,
}

/// The thought signature a Gemini 3 model attaches to its first function call, and the value
/// Google documents for replaying calls whose signature was lost.
pub(super) const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

/// The fields of a `Schema` (Gemini's OpenAPI subset); anything else in `parameters` or
/// `responseSchema` is an unknown field, which Gemini refuses.
const OPENAPI_FIELDS: [&str; 22] = [
    "type",
    "format",
    "title",
    "description",
    "nullable",
    "enum",
    "maxItems",
    "minItems",
    "properties",
    "required",
    "minProperties",
    "maxProperties",
    "minLength",
    "maxLength",
    "pattern",
    "example",
    "anyOf",
    "propertyOrdering",
    "default",
    "items",
    "minimum",
    "maximum",
];

/// A part's field under its camelCase or snake_case name.
fn field<'a>(part: &'a Value, camel: &str, snake: &str) -> Option<&'a Value> {
    part.get(camel).or_else(|| part.get(snake))
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
        let text: String = system
            .parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect();
        messages.push(Message::new(Role::System, text));
    }
    // Function calls of the previous model turn, which a function response turn must match.
    let mut calls_before = 0;
    for (i, c) in req.contents.iter().enumerate() {
        // A single-turn request may leave the role out; Gemini then treats it as the user.
        let role = match c.role.as_deref() {
            None | Some("user") => Role::User,
            Some("model") => Role::Assistant,
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
        let turn = turn(i, role, &c.parts)?;
        if turn.responses > 0 && turn.responses != calls_before {
            return Err(if calls_before == 0 {
                "Please ensure that function response turn comes immediately after a function \
                 call turn."
                    .to_owned()
            } else {
                "Please ensure that the number of function response parts is equal to the number \
                 of function call parts of the function call turn."
                    .to_owned()
            });
        }
        calls_before = turn.calls;
        messages.extend(turn.messages);
    }
    let tools = parse_tools(&req.tools)?;
    let tool_choice = match &req.tool_config {
        None => ToolChoice::Auto,
        Some(config) => parse_tool_config(config, &tools)?,
    };
    let config = req.generation_config;
    let format = match &config {
        None => Format::Text,
        Some(g) => parse_format(g)?,
    };
    Ok(ChatRequest {
        model: Some(model.to_owned()),
        messages,
        max_tokens: config.and_then(|g| g.max_output_tokens),
        stream,
        include_usage: false,
        tools,
        tool_choice,
        format,
    })
}

/// One content in the common form: function responses become `tool` messages after the turn's
/// own text, function calls count toward the prompt.
struct Turn {
    messages: Vec<Message>,
    calls: usize,
    responses: usize,
}

const DATA_FIELDS: [(&str, &str); 7] = [
    ("text", "text"),
    ("inlineData", "inline_data"),
    ("fileData", "file_data"),
    ("functionCall", "function_call"),
    ("functionResponse", "function_response"),
    ("executableCode", "executable_code"),
    ("codeExecutionResult", "code_execution_result"),
];

fn turn(i: usize, role: Role, parts: &[Value]) -> Result<Turn, String> {
    let mut message = Message::new(role, "");
    let mut results = Vec::new();
    let mut calls = 0;
    for (j, part) in parts.iter().enumerate() {
        let at = format!("contents[{i}].parts[{j}]");
        let set: Vec<(&str, &Value)> = DATA_FIELDS
            .iter()
            .filter_map(|(camel, snake)| field(part, camel, snake).map(|v| (*camel, v)))
            .collect();
        let (kind, value) = match set.as_slice() {
            [one] => *one,
            [] => {
                return Err(format!(
                    "* GenerateContentRequest.{at}.data: required oneof field 'data' must have \
                     one initialized field"
                ))
            }
            [_, (second, _), ..] => {
                return Err(format!(
                    "Invalid value at '{at}' (oneof), oneof field 'data' is already set. Cannot \
                     set '{second}'"
                ))
            }
        };
        match kind {
            "text" => {
                let Some(text) = value.as_str() else {
                    return Err(format!("Invalid value at '{at}.text' (TYPE_STRING)"));
                };
                // Thoughts are the model's reasoning, not what anyone said.
                if part.get("thought") != Some(&Value::Bool(true)) {
                    message.text.push_str(text);
                }
            }
            "inlineData" => {
                let mime = field(value, "mimeType", "mime_type").and_then(Value::as_str);
                let data = value.get("data").and_then(Value::as_str);
                let (Some(mime), Some(data)) = (mime, data) else {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.inline_data: mime_type and data are required"
                    ));
                };
                if !chat::is_base64(data) {
                    return Err(format!(
                        "Invalid value at '{at}.inline_data.data' (TYPE_BYTES), Base64 decoding \
                         failed"
                    ));
                }
                if mime.starts_with("image/") {
                    message.images += 1;
                }
            }
            "fileData" => {
                let uri = field(value, "fileUri", "file_uri").and_then(Value::as_str);
                if uri.is_none_or(str::is_empty) {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.file_data.file_uri: file_uri is required"
                    ));
                }
                let mime = field(value, "mimeType", "mime_type").and_then(Value::as_str);
                if mime.is_none_or(|m| m.starts_with("image/")) {
                    message.images += 1;
                }
            }
            "functionCall" => {
                if role != Role::Assistant {
                    return Err(format!(
                        "* GenerateContentRequest.{at}: function calls are only allowed in model turns"
                    ));
                }
                let Some(name) = value.get("name").and_then(Value::as_str) else {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.function_call.name: name is required"
                    ));
                };
                // Like Gemini 3: the first call of a turn must carry the signature the model gave
                // it (or the documented stand-in), or the conversation cannot continue.
                let signature = field(part, "thoughtSignature", "thought_signature")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if calls == 0 && signature.is_empty() {
                    return Err(format!(
                        "Function call is missing a thought_signature in functionCall parts. This \
                         is required for tools to work correctly. Additional data, function call \
                         `default_api:{name}` , position {}.",
                        j + 1
                    ));
                }
                if !signature.is_empty()
                    && signature != SKIP_SIGNATURE
                    && !chat::is_base64(signature)
                {
                    return Err(format!(
                        "Invalid value at '{at}.thought_signature' (TYPE_BYTES), Base64 decoding failed"
                    ));
                }
                let args = value.get("args").cloned().unwrap_or_else(|| json!({}));
                if !args.is_object() {
                    return Err(format!("Invalid value at '{at}.function_call.args' (type.googleapis.com/google.protobuf.Struct)"));
                }
                message.call_chars += name.len() + args.to_string().len();
                calls += 1;
            }
            "functionResponse" => {
                if role != Role::User {
                    return Err(format!(
                        "* GenerateContentRequest.{at}: function responses are only allowed in user turns"
                    ));
                }
                let name = value.get("name").and_then(Value::as_str);
                let response = value.get("response").filter(|r| r.is_object());
                let (Some(_), Some(response)) = (name, response) else {
                    return Err(format!(
                        "* GenerateContentRequest.{at}.function_response: name and response (an \
                         object) are required"
                    ));
                };
                // The usual shape is {"content": ...} or {"output": ...}; otherwise the whole object.
                let text = match response.get("content").or_else(|| response.get("output")) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => other.to_string(),
                    None => response.to_string(),
                };
                results.push(Message::new(Role::Tool, text));
            }
            // Code execution parts: accepted, nothing the simulator reads.
            _ => {}
        }
    }
    let responses = results.len();
    let mut messages = Vec::with_capacity(responses + 1);
    if !message.text.is_empty() || message.images > 0 || calls > 0 || results.is_empty() {
        messages.push(message);
    }
    messages.extend(results);
    Ok(Turn {
        messages,
        calls,
        responses,
    })
}

fn parse_tools(tools: &[Value]) -> Result<Vec<ToolDef>, String> {
    let mut out: Vec<ToolDef> = Vec::new();
    for (i, tool) in tools.iter().enumerate() {
        // Other tools (googleSearch, codeExecution, ...) are accepted and never "called".
        let Some(declarations) = field(tool, "functionDeclarations", "function_declarations")
        else {
            continue;
        };
        let Some(declarations) = declarations.as_array() else {
            return Err(format!(
                "Invalid value at 'tools[{i}].function_declarations', expected a list"
            ));
        };
        for (j, d) in declarations.iter().enumerate() {
            let at = format!("tools[{i}].function_declarations[{j}]");
            let name = d.get("name").and_then(Value::as_str).unwrap_or_default();
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .next()
                    .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.:-".contains(&b));
            if !valid {
                return Err(format!(
                    "* GenerateContentRequest.{at}.name: Invalid function name. Must start with a \
                     letter or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores \
                     (_), dots (.), colons (:) or dashes (-), with a maximum length of 64."
                ));
            }
            if out.iter().any(|t| t.name == name) {
                return Err(format!(
                    "* GenerateContentRequest.{at}.name: Duplicate function declaration found: {name}"
                ));
            }
            let openapi = d.get("parameters");
            let json_schema = field(d, "parametersJsonSchema", "parameters_json_schema");
            let schema = match (openapi, json_schema) {
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "* GenerateContentRequest.{at}: parameters and parameters_json_schema \
                         are mutually exclusive"
                    ))
                }
                (Some(p), None) => {
                    check_openapi(p, &format!("{at}.parameters"))?;
                    p.clone()
                }
                (None, Some(s)) => {
                    let is_object = s.get("type").and_then(Value::as_str) == Some("object");
                    if !is_object {
                        return Err(format!(
                            "* GenerateContentRequest.{at}.parameters_json_schema: the schema \
                             must describe an object"
                        ));
                    }
                    s.clone()
                }
                (None, None) => json!({"type": "object", "properties": {}}),
            };
            out.push(ToolDef {
                name: name.to_owned(),
                description: d
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                schema,
            });
        }
    }
    Ok(out)
}

/// Refuses keys Gemini's OpenAPI `Schema` does not have (such as `additionalProperties`, `$ref`
/// or `const`), the way Gemini's JSON parser does.
fn check_openapi(schema: &Value, at: &str) -> Result<(), String> {
    let Some(map) = schema.as_object() else {
        return Err(format!("Invalid value at '{at}', expected a Schema object"));
    };
    if let Some(unknown) = map.keys().find(|k| !OPENAPI_FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "Invalid JSON payload received. Unknown name \"{unknown}\" at '{at}': Cannot find field."
        ));
    }
    if let Some(properties) = map.get("properties").and_then(Value::as_object) {
        for (name, p) in properties {
            check_openapi(p, &format!("{at}.properties[{name}].value"))?;
        }
    }
    if let Some(items) = map.get("items") {
        check_openapi(items, &format!("{at}.items"))?;
    }
    for (k, branch) in map
        .get("anyOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        check_openapi(branch, &format!("{at}.any_of[{k}]"))?;
    }
    Ok(())
}

fn parse_tool_config(config: &Value, tools: &[ToolDef]) -> Result<ToolChoice, String> {
    let Some(calling) = field(config, "functionCallingConfig", "function_calling_config") else {
        return Ok(ToolChoice::Auto);
    };
    let mode = calling
        .get("mode")
        .and_then(Value::as_str)
        .unwrap_or("AUTO");
    let allowed: Vec<&str> = field(calling, "allowedFunctionNames", "allowed_function_names")
        .and_then(Value::as_array)
        .map(|names| names.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if let Some(unknown) = allowed
        .iter()
        .find(|a| !tools.iter().any(|t| t.name == **a))
    {
        return Err(format!(
            "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: \
             function {unknown} is not declared in tools"
        ));
    }
    match mode {
        "AUTO" | "MODE_UNSPECIFIED" | "VALIDATED" if allowed.is_empty() => Ok(ToolChoice::Auto),
        "NONE" if allowed.is_empty() => Ok(ToolChoice::None),
        "ANY" => Ok(match allowed.first() {
            Some(name) => ToolChoice::Named((*name).to_owned()),
            None => ToolChoice::Required,
        }),
        "AUTO" | "MODE_UNSPECIFIED" | "VALIDATED" | "NONE" => Err(
            "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: \
             allowed_function_names may only be set when mode is ANY"
                .into(),
        ),
        other => Err(format!(
            "Invalid value at 'tool_config.function_calling_config.mode' \
             (type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), \
             \"{other}\""
        )),
    }
}

fn parse_format(config: &GenerationConfig) -> Result<Format, String> {
    let schema = match (&config.response_schema, &config.response_json_schema) {
        (Some(_), Some(_)) => {
            return Err(
                "* GenerateContentRequest.generation_config: response_schema and \
                        response_json_schema are mutually exclusive"
                    .into(),
            )
        }
        (Some(s), None) => {
            check_openapi(s, "generation_config.response_schema")?;
            Some(s)
        }
        (None, s) => s.as_ref(),
    };
    match (config.response_mime_type.as_deref(), schema) {
        (Some("application/json"), Some(schema)) => Ok(Format::JsonSchema(schema.clone())),
        (Some("application/json"), None) => Ok(Format::JsonObject),
        (_, Some(_)) => Err(
            "* GenerateContentRequest.generation_config.response_mime_type: \
                             response_mime_type must be application/json when a response \
                             schema is set"
                .into(),
        ),
        (None | Some("text/plain"), None) => Ok(Format::Text),
        (Some(other), None) => Err(format!(
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes \
             are `text/plain`, `application/json`, got {other}"
        )),
    }
}
