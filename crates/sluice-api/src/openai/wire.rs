//! OpenAI's chat-completions wire format at Sluice's edge: a request body into a [`JobRequest`]
//! (refusing what Sluice cannot honour, naming the field), and a stored job into the
//! `chat.completion` object or the `chat.completion.chunk` frames the SDKs validate.

use super::OpenAiError;
use serde_json::{json, Map, Value};
use sluice_core::{
    excerpt, FunctionKind, JobRequest, Lane, Message, ResponseFormat, Tool, ToolCall, ToolChoice,
};
use sluice_store::JobRecord;

/// A chat completion request, translated.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatCall {
    pub request: JobRequest,
    /// `stream_options.include_usage`: a last chunk with the usage.
    pub include_usage: bool,
    /// A lane the body asked for (`service_tier: "flex"`); it can only lower the key's lane.
    pub lane: Option<Lane>,
}

/// Fields accepted and not sent on: hints and bookkeeping that do not change the answer.
const DROPPED: [&str; 5] = [
    "user",
    "metadata",
    "store",
    "prompt_cache_key",
    "safety_identifier",
];

/// Parse a `/v1/chat/completions` body.
pub fn parse_chat(mut body: Map<String, Value>) -> Result<ChatCall, OpenAiError> {
    let model = match body.remove("model") {
        Some(Value::String(model)) if !model.is_empty() => model,
        Some(_) => return Err(OpenAiError::invalid("model", "model must be a string")),
        None => {
            return Err(OpenAiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
    };
    let messages = match body.remove("messages") {
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, m)| parse_message(i, m))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(OpenAiError::invalid(
                "messages",
                "messages must be an array",
            ))
        }
        None => {
            return Err(OpenAiError::invalid(
                "messages",
                "you must provide a messages parameter",
            ))
        }
    };
    let mut request = JobRequest::new(model, messages);
    let max_tokens: Option<u32> = take(&mut body, "max_tokens")?;
    let max_completion_tokens: Option<u32> = take(&mut body, "max_completion_tokens")?;
    request.max_tokens = max_completion_tokens.or(max_tokens);
    request.temperature = take(&mut body, "temperature")?;
    request.top_p = take(&mut body, "top_p")?;
    request.stop = match body.remove("stop") {
        None | Some(Value::Null) => None,
        Some(Value::String(one)) => Some(vec![one]),
        Some(value) => Some(serde_json::from_value(value).map_err(|_| {
            OpenAiError::invalid("stop", "stop must be a string or a list of strings")
        })?),
    };
    request.seed = take(&mut body, "seed")?;
    request.tools = take::<Vec<Tool>>(&mut body, "tools")?.unwrap_or_default();
    request.tool_choice = take::<ToolChoice>(&mut body, "tool_choice")?;
    request.parallel_tool_calls = take(&mut body, "parallel_tool_calls")?;
    request.response_format = take::<ResponseFormat>(&mut body, "response_format")?
        .filter(|f| *f != ResponseFormat::Text);
    request.stream = take::<bool>(&mut body, "stream")?.unwrap_or(false);
    let include_usage = match body.remove("stream_options") {
        None | Some(Value::Null) => false,
        Some(_) if !request.stream => {
            return Err(OpenAiError::invalid(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ))
        }
        Some(Value::Object(options)) => {
            for key in options.keys() {
                if key != "include_usage" && key != "include_obfuscation" {
                    return Err(OpenAiError::invalid(
                        format!("stream_options.{}", excerpt(key)),
                        format!("unknown stream option {:?}", excerpt(key)),
                    ));
                }
            }
            options.get("include_usage").and_then(Value::as_bool) == Some(true)
        }
        Some(_) => {
            return Err(OpenAiError::invalid(
                "stream_options",
                "stream_options must be an object",
            ))
        }
    };
    let lane = match take::<String>(&mut body, "service_tier")?.as_deref() {
        None | Some("auto" | "default" | "priority" | "scale") => None,
        Some("flex") => Some(Lane::Batch),
        Some(other) => {
            return Err(OpenAiError::invalid(
                "service_tier",
                format!(
                    "unknown service_tier {:?}: use auto, default, flex or priority",
                    excerpt(other)
                ),
            ))
        }
    };
    refuse_what_cannot_be_honoured(&mut body)?;
    for field in DROPPED {
        body.remove(field);
    }
    if let Some(field) = body.keys().next() {
        return Err(OpenAiError::invalid(
            excerpt(field).to_string(),
            format!("Unrecognized request argument supplied: {}", excerpt(field)),
        ));
    }
    request.validate()?;
    Ok(ChatCall {
        request,
        include_usage,
        lane,
    })
}

/// Parameters Sluice cannot honour are refused by name rather than silently dropped; their
/// neutral values (one choice, no logprobs, no penalties) are accepted.
fn refuse_what_cannot_be_honoured(body: &mut Map<String, Value>) -> Result<(), OpenAiError> {
    let refuse = |param: &str, why: &str| Err(OpenAiError::invalid(param, why.to_owned()));
    if let Some(n) = take::<u32>(body, "n")? {
        if n != 1 {
            return refuse(
                "n",
                "Sluice returns one choice per request: leave n out or send 1",
            );
        }
    }
    if take::<bool>(body, "logprobs")? == Some(true) {
        return refuse("logprobs", "Sluice does not return logprobs");
    }
    if take::<u32>(body, "top_logprobs")?.is_some() {
        return refuse("top_logprobs", "Sluice does not return logprobs");
    }
    for penalty in ["frequency_penalty", "presence_penalty"] {
        if take::<f64>(body, penalty)?.is_some_and(|p| p != 0.0) {
            return refuse(
                penalty,
                "Sluice does not send penalties to providers: leave it out or send 0",
            );
        }
    }
    if take::<Map<String, Value>>(body, "logit_bias")?.is_some_and(|b| !b.is_empty()) {
        return refuse("logit_bias", "Sluice does not send logit_bias to providers");
    }
    if let Some(modalities) = take::<Vec<String>>(body, "modalities")? {
        if modalities.iter().any(|m| m != "text") {
            return refuse("modalities", "Sluice answers with text only");
        }
    }
    for (param, why) in [
        ("audio", "Sluice answers with text only"),
        ("prediction", "Sluice does not support predicted outputs"),
        (
            "reasoning_effort",
            "Sluice does not send reasoning_effort to providers",
        ),
        ("verbosity", "Sluice does not send verbosity to providers"),
        ("web_search_options", "Sluice does not run web searches"),
        ("functions", "functions is deprecated: send tools instead"),
        (
            "function_call",
            "function_call is deprecated: send tool_choice instead",
        ),
    ] {
        if body.remove(param).is_some_and(|v| !v.is_null()) {
            return refuse(param, why);
        }
    }
    Ok(())
}

/// Remove `field` from the body and parse it; `null` counts as absent.
fn take<T: serde::de::DeserializeOwned>(
    body: &mut Map<String, Value>,
    field: &str,
) -> Result<Option<T>, OpenAiError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value)
            .map(Some)
            .map_err(|e| OpenAiError::invalid(field, format!("invalid {field}: {e}"))),
    }
}

/// One message in OpenAI's shape: `developer` becomes `system`, echoed response fields
/// (`refusal`, `annotations`, `audio: null`) are dropped, and part types Sluice cannot send
/// (audio, files) are refused by position.
fn parse_message(i: usize, message: Value) -> Result<Message, OpenAiError> {
    let at = |field: &str| format!("messages[{i}].{field}");
    let Value::Object(mut m) = message else {
        return Err(OpenAiError::invalid(
            format!("messages[{i}]"),
            "a message must be an object",
        ));
    };
    let role: &'static str = match m.get("role").and_then(Value::as_str) {
        Some("developer") => "system",
        Some("system") => "system",
        Some("user") => "user",
        Some("assistant") => "assistant",
        Some("tool") => "tool",
        Some("function") => {
            return Err(OpenAiError::invalid(
                at("role"),
                "the function role is deprecated: send tool messages instead",
            ))
        }
        Some(other) => {
            return Err(OpenAiError::invalid(
                at("role"),
                format!(
                    "unknown role {:?}: use system, developer, user, assistant or tool",
                    excerpt(other)
                ),
            ))
        }
        None => return Err(OpenAiError::invalid(at("role"), "a message needs a role")),
    };
    m.insert("role".into(), Value::String(role.to_owned()));
    // What the SDKs echo back when a caller appends the response's message to the next request.
    for echoed in ["refusal", "annotations", "audio", "function_call"] {
        match m.get(echoed) {
            Some(Value::Null) => {
                m.remove(echoed);
            }
            Some(_) if role == "assistant" && matches!(echoed, "refusal" | "annotations") => {
                m.remove(echoed);
            }
            _ => {}
        }
    }
    if m.get("tool_calls").is_some_and(Value::is_null) {
        m.remove("tool_calls");
    }
    if let Some(Value::Array(parts)) = m.get("content") {
        for (j, part) in parts.iter().enumerate() {
            match part.get("type").and_then(Value::as_str) {
                Some("text" | "image_url") => {}
                Some(kind @ ("input_audio" | "file" | "refusal")) => {
                    return Err(OpenAiError::invalid(
                        format!("messages[{i}].content[{j}].type"),
                        format!("Sluice cannot send {kind} content parts; send text and image_url parts"),
                    ))
                }
                _ => {
                    return Err(OpenAiError::invalid(
                        format!("messages[{i}].content[{j}].type"),
                        "a content part's type must be text or image_url",
                    ))
                }
            }
        }
    }
    serde_json::from_value(Value::Object(m)).map_err(|e| {
        OpenAiError::invalid(format!("messages[{i}]"), format!("invalid message: {e}"))
    })
}

/// OpenAI's finish reasons; anything else a provider said reads as `stop`.
fn finish_reason(result: &Value, has_calls: bool) -> &'static str {
    match result.get("finish_reason").and_then(Value::as_str) {
        Some("length") => "length",
        Some("tool_calls") => "tool_calls",
        Some("content_filter") => "content_filter",
        _ if has_calls => "tool_calls",
        _ => "stop",
    }
}

/// The answer of a job as OpenAI would have it, from the stored result.
pub struct Answer {
    pub content: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: &'static str,
    pub usage: Value,
}

impl Answer {
    pub fn of(job: &JobRecord) -> Answer {
        let result = job.result.clone().unwrap_or(Value::Null);
        let content = result
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let tool_calls: Vec<ToolCall> = result
            .get("tool_calls")
            .cloned()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let usage = result.get("usage").cloned().unwrap_or_else(
            || json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
        );
        Answer {
            finish_reason: finish_reason(&result, !tool_calls.is_empty()),
            content,
            tool_calls,
            usage,
        }
    }
}

/// The completion's id: the job's request_id, so the two are one handle.
pub fn completion_id(job: &JobRecord) -> String {
    format!("chatcmpl-{}", job.id.0.simple())
}

/// A succeeded job as a `chat.completion` object.
pub fn completion(job: &JobRecord) -> Value {
    let answer = Answer::of(job);
    let content = if answer.content.is_empty() && !answer.tool_calls.is_empty() {
        Value::Null
    } else {
        Value::String(answer.content)
    };
    let mut message = json!({"role": "assistant", "content": content, "refusal": null});
    if !answer.tool_calls.is_empty() {
        message["tool_calls"] = json!(answer.tool_calls);
    }
    json!({
        "id": completion_id(job),
        "object": "chat.completion",
        "created": job.created_at.timestamp(),
        "model": job.request.model,
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": answer.finish_reason,
        }],
        "usage": answer.usage,
    })
}

/// Builds the `chat.completion.chunk` frames of one streamed answer: one id, created and model
/// throughout; `usage: null` on each when the caller asked for a usage chunk.
pub struct Chunks {
    id: String,
    created: i64,
    model: String,
    include_usage: bool,
}

impl Chunks {
    pub fn new(id: String, created: i64, model: String, include_usage: bool) -> Chunks {
        Chunks {
            id,
            created,
            model,
            include_usage,
        }
    }

    fn chunk(&self, choices: Value) -> Value {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    }

    fn delta(&self, delta: Value, finish: Option<&str>) -> Value {
        self.chunk(json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]))
    }

    /// The first frame: the assistant's role and empty content.
    pub fn role(&self) -> Value {
        self.delta(json!({"role": "assistant", "content": ""}), None)
    }

    pub fn text(&self, text: &str) -> Value {
        self.delta(json!({"content": text}), None)
    }

    /// The model's tool calls, whole, in one frame.
    pub fn tool_calls(&self, calls: &[ToolCall]) -> Value {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(index, c)| {
                json!({"index": index, "id": c.id, "type": FunctionKind::Function,
                       "function": {"name": c.function.name, "arguments": c.function.arguments}})
            })
            .collect();
        self.delta(json!({"tool_calls": calls}), None)
    }

    /// The last frame of the choice: an empty delta with the finish reason.
    pub fn finish(&self, reason: &str) -> Value {
        self.delta(json!({}), Some(reason))
    }

    /// The usage frame, after the finish frame: no choices.
    pub fn usage(&self, usage: &Value) -> Value {
        let mut chunk = self.chunk(json!([]));
        chunk["usage"] = usage.clone();
        chunk
    }
}

#[cfg(test)]
fn roles(call: &ChatCall) -> Vec<sluice_core::Role> {
    call.request.messages.iter().map(|m| m.role).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(body: Value) -> Result<ChatCall, OpenAiError> {
        let Value::Object(map) = body else { panic!() };
        parse_chat(map)
    }

    use sluice_core::Role;

    fn param(body: Value) -> String {
        parse(body).unwrap_err().param.clone().unwrap()
    }

    #[test]
    fn openai_spellings_map_onto_the_job() {
        let call = parse(json!({
            "model": "default",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": null, "refusal": null, "annotations": [],
                 "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}
            ],
            "max_completion_tokens": 20, "stop": "END", "seed": 7, "user": "u-1",
            "metadata": {"k": "v"}, "store": false, "n": 1, "logprobs": false,
            "stream": true, "stream_options": {"include_usage": true}, "service_tier": "flex",
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "response_format": {"type": "text"}
        }))
        .unwrap();
        assert_eq!(
            roles(&call),
            [Role::System, Role::User, Role::Assistant, Role::Tool]
        );
        assert_eq!(call.request.messages[1].content.text(), "hi there");
        assert_eq!(call.request.max_tokens, Some(20));
        assert_eq!(call.request.stop, Some(vec!["END".to_owned()]));
        assert_eq!(call.request.seed, Some(7));
        assert!(call.request.stream && call.include_usage);
        assert_eq!(call.lane, Some(Lane::Batch));
        assert_eq!(call.request.response_format, None, "text is the default");
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        let base = |extra: Value| {
            let mut body = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            body
        };
        assert_eq!(param(base(json!({"n": 2}))), "n");
        assert_eq!(param(base(json!({"logprobs": true}))), "logprobs");
        assert_eq!(
            param(base(json!({"presence_penalty": 0.5}))),
            "presence_penalty"
        );
        assert_eq!(
            param(base(json!({"modalities": ["text", "audio"]}))),
            "modalities"
        );
        assert_eq!(param(base(json!({"audio": {"voice": "alloy"}}))), "audio");
        assert_eq!(param(base(json!({"frobnicate": 1}))), "frobnicate");
        assert_eq!(
            param(base(json!({"stream_options": {"include_usage": true}}))),
            "stream_options"
        );
        assert_eq!(
            param(base(json!({"service_tier": "turbo"}))),
            "service_tier"
        );
        assert_eq!(param(base(json!({"temperature": "hot"}))), "temperature");
        assert_eq!(param(base(json!({"temperature": 3}))), "temperature");
        assert_eq!(
            param(
                json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})
            ),
            "messages[0].content[0].type"
        );
        assert_eq!(
            param(json!({"model": "m", "messages": [{"role": "robot", "content": "x"}]})),
            "messages[0].role"
        );
        assert_eq!(param(json!({"messages": []})), "model");
        // Neutral values of the same fields are fine.
        assert!(parse(base(
            json!({"n": 1, "logprobs": false, "presence_penalty": 0,
                                  "logit_bias": {}, "modalities": ["text"], "audio": null})
        ))
        .is_ok());
    }

    #[test]
    fn a_stored_answer_becomes_a_completion_and_chunks() {
        use sluice_core::{JobState, RequestId, Tier};
        let job = JobRecord {
            id: RequestId::new(),
            tenant: "t".into(),
            user: "u".into(),
            tier: Tier::Pro,
            lane: Lane::Priority,
            model: "default".into(),
            state: JobState::Succeeded,
            attempt: 1,
            tries: 1,
            request: JobRequest::new("default", vec![Message::user("hi")]),
            result: Some(
                json!({"content": "", "model": "sim", "finish_reason": "tool_calls",
                "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}),
            ),
            error: None,
            error_status: None,
            endpoint: None,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            started_at: None,
            finished_at: None,
            leader: None,
            cached: None,
            route_reason: None,
            cost_usd: None,
        };
        let c = completion(&job);
        assert_eq!(c["choices"][0]["message"]["content"], Value::Null);
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(
            c["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
            "f"
        );
        assert_eq!(c["usage"]["total_tokens"], 3);
        assert_eq!(c["id"], completion_id(&job));
        let chunks = Chunks::new("id".into(), 1, "m".into(), true);
        assert_eq!(chunks.role()["usage"], Value::Null);
        assert_eq!(chunks.usage(&c["usage"])["choices"], json!([]));
        assert_eq!(chunks.finish("stop")["choices"][0]["finish_reason"], "stop");
    }
}
