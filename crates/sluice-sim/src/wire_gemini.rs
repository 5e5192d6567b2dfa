//! Gemini `generateContent` wire format: requests (text, inline and file data, function calls and
//! responses, tools, JSON output) mapped onto the common [`ChatRequest`] with Gemini's checks.
//! Replies are text or a `functionCall` part; errors use Google's envelope.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::chat::{self, ChatRequest, Format, Message, Reply, Role, ToolChoice, ToolDef};

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
const SKIP_SIGNATURE: &str = "skip_thought_signature_validator";

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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::chat::reply_for;
    use crate::wire;

    fn parse(v: Value) -> Result<ChatRequest, String> {
        parse_request(v.to_string().as_bytes(), "gemini-sim", false)
    }

    fn weather() -> Value {
        json!({"functionDeclarations": [{"name": "get_weather", "description": "Weather",
            "parametersJsonSchema": {"type": "object", "required": ["city"],
                "properties": {"city": {"type": "string"}}, "additionalProperties": false}}]})
    }

    #[test]
    fn maps_onto_the_openai_reply() {
        let gemini = parse(
            json!({"systemInstruction": {"parts": [{"text": "be "}, {"text": "brief"}]},
                   "contents": [{"role": "user", "parts": [{"text": "hello"}]},
                                {"role": "model", "parts": [{"text": "hi"}]},
                                {"role": "user", "parts": [{"text": "hello there"}]}],
                   "generationConfig": {"maxOutputTokens": 9}}),
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
        assert_eq!(reply_for(&gemini, 16), reply_for(&openai, 16));
        assert_eq!(reply_for(&gemini, 16).completion_tokens, 9);
    }

    #[test]
    fn images_calls_and_responses_map_like_openai() {
        let gemini = parse(json!({"tools": [weather()],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
            "contents": [
                {"role": "user", "parts": [{"text": "look"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                    {"file_data": {"file_uri": "https://x.test/a.jpg"}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                                             "thoughtSignature": SKIP_SIGNATURE}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                    "response": {"content": "sunny"}}}]}]}))
        .unwrap();
        let openai = wire::parse_request(json!({"model": "m",
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                "parameters": {"type": "object", "required": ["city"],
                    "properties": {"city": {"type": "string"}}, "additionalProperties": false}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]})
            .to_string().as_bytes())
        .unwrap();
        assert_eq!(gemini.messages, openai.messages);
        assert_eq!(
            (&gemini.tools, &gemini.tool_choice),
            (&openai.tools, &openai.tool_choice)
        );
        assert_eq!(reply_for(&gemini, 8), reply_for(&openai, 8));
    }

    #[test]
    fn a_function_call_answer_plain_and_streamed() {
        let req = parse(json!({"tools": [weather()],
            "contents": [{"role": "user", "parts": [{"text": "weather?"}]}]}))
        .unwrap();
        let reply = reply_for(&req, 8);
        let body = response_body("g", &reply);
        let candidate = &body["candidates"][0];
        assert_eq!(candidate["finishReason"], "STOP");
        let part = &candidate["content"]["parts"][0];
        assert_eq!(
            part["functionCall"],
            json!({"name": "get_weather", "args": {"city": "sim"}})
        );
        assert!(part["thoughtSignature"]
            .as_str()
            .is_some_and(chat::is_base64));

        let chunks = stream_chunks("g", &reply);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0]["candidates"][0]["content"]["parts"][0], *part);
        assert_eq!(chunks[0]["candidates"][0]["finishReason"], "STOP");

        // NONE turns calling off; the answer is text.
        let none = parse(json!({"tools": [weather()],
            "toolConfig": {"functionCallingConfig": {"mode": "NONE"}},
            "contents": [{"role": "user", "parts": [{"text": "weather?"}]}]}))
        .unwrap();
        assert!(reply_for(&none, 8).tool_call.is_none());
    }

    #[test]
    fn json_output_follows_the_schema() {
        let req = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"responseMimeType": "application/json",
                "responseJsonSchema": {"type": "object", "required": ["n"],
                    "properties": {"n": {"type": "integer"}}}}}))
        .unwrap();
        let text = response_body("g", &reply_for(&req, 8))["candidates"][0]["content"]["parts"][0]
            ["text"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(text, r#"{"n":1}"#);
        let openapi = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"responseMimeType": "application/json",
                "responseSchema": {"type": "OBJECT", "properties": {"ok": {"type": "BOOLEAN"}}}}}))
        .unwrap();
        assert_eq!(reply_for(&openapi, 8).content, r#"{"ok":true}"#);
        let any = parse(json!({"contents": [{"parts": [{"text": "x"}]}],
            "generationConfig": {"responseMimeType": "application/json"}}))
        .unwrap();
        assert_eq!(any.format, Format::JsonObject);
    }

    #[test]
    fn rejects_what_gemini_rejects() {
        let bad = |v: Value| parse(v).unwrap_err();
        assert!(bad(json!({"contents": []})).contains("contents"));
        assert!(
            bad(json!({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}))
                .contains("role")
        );
        assert!(bad(json!({"contents": [{"role": "user", "parts": []}]})).contains("parts"));
        assert!(bad(json!({"contents": [{"parts": [{}]}]})).contains("oneof"));
        assert!(
            bad(json!({"contents": [{"parts": [{"text": "a", "inlineData": {}}]}]}))
                .contains("already set")
        );
        assert!(bad(json!({"contents": [{"parts": [
            {"inlineData": {"mimeType": "image/png", "data": "%%%"}}]}]}))
        .contains("Base64"));

        let user = json!({"role": "user", "parts": [{"text": "x"}]});
        let call = |signature: Option<&str>| {
            let mut part = json!({"functionCall": {"name": "get_weather", "args": {}}});
            if let Some(s) = signature {
                part["thoughtSignature"] = json!(s);
            }
            json!({"role": "model", "parts": [part]})
        };
        let response = json!({"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}}]});
        let two = json!({"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}},
            {"functionResponse": {"name": "get_weather", "response": {"content": "ok"}}}]});
        assert!(
            bad(json!({"contents": [user, call(None), response]})).contains("thought_signature")
        );
        assert!(parse(json!({"contents": [user, call(Some(SKIP_SIGNATURE)), response]})).is_ok());
        assert!(
            bad(json!({"contents": [user, call(Some(SKIP_SIGNATURE)), two]}))
                .contains("number of function response parts")
        );
        assert!(bad(json!({"contents": [user, response]})).contains("immediately after"));

        let with_tools = |tools: Value| json!({"contents": [user], "tools": tools});
        assert!(
            bad(with_tools(json!([{"functionDeclarations": [{"name": "f",
            "parameters": {"type": "object", "additionalProperties": false}}]}])))
            .contains("Unknown name \"additionalProperties\"")
        );
        assert!(
            bad(with_tools(json!([{"functionDeclarations": [{"name": "f",
            "parameters": {"type": "object"}, "parametersJsonSchema": {"type": "object"}}]}])))
            .contains("mutually exclusive")
        );
        assert!(bad(with_tools(
            json!([{"functionDeclarations": [{"name": "1f"}]}])
        ))
        .contains("Invalid function name"));
        let mut config = with_tools(json!([weather()]));
        config["toolConfig"] =
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["nope"]}});
        assert!(bad(config.clone()).contains("nope"));
        config["toolConfig"] = json!({"functionCallingConfig": {"mode": "SOMETIMES"}});
        assert!(bad(config).contains("SOMETIMES"));
        let mut format = json!({"contents": [user]});
        format["generationConfig"] = json!({"responseJsonSchema": {"type": "object"}});
        assert!(bad(format).contains("response_mime_type"));
    }

    #[test]
    fn last_chunk_carries_finish_and_usage() {
        let reply = Reply {
            content: "a b c".into(),
            tool_call: None,
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
