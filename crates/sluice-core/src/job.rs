//! Jobs: the request a client submits, its public handle, and the state machine
//! every stored job follows (`queued -> running -> succeeded | failed | cancelled | dead`, plus `retrying`).

use crate::chat::{Message, ResponseFormat, Role, Tool, ToolChoice, ToolMode};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// A job's only public handle: a UUIDv7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub Uuid);

impl RequestId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for RequestId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Where a stored job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Retrying,
    Succeeded,
    Failed,
    Cancelled,
    Dead,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a job cannot move from {from} to {to}")]
pub struct InvalidTransition {
    pub from: JobState,
    pub to: JobState,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Running,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
        JobState::Dead,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
            JobState::Dead => "dead",
        }
    }

    /// A terminal job never changes again, except that an operator may replay a dead one.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled | JobState::Dead
        )
    }

    /// States a worker may claim a job from.
    pub fn is_claimable(self) -> bool {
        matches!(self, JobState::Queued | JobState::Retrying)
    }

    /// The legal moves of the job state machine.
    ///
    /// `running -> retrying` covers both a retryable failure and a lease that
    /// expired under a dead worker; `dead -> queued` is an operator's replay.
    /// A queued job ends without running only by taking another job's outcome: an
    /// answer reused from an identical job (`queued -> succeeded`), or the end of the
    /// identical job it was attached to (`queued -> succeeded | failed | dead`).
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Succeeded)
                | (Queued, Failed)
                | (Queued, Dead)
                | (Retrying, Running)
                | (Retrying, Cancelled)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Retrying)
                | (Running, Dead)
                | (Running, Cancelled)
                | (Retrying, Dead)
                | (Dead, Queued)
        )
    }

    /// Check a move against [`JobState::can_become`].
    pub fn transition(self, to: JobState) -> Result<JobState, InvalidTransition> {
        if self.can_become(to) {
            Ok(to)
        } else {
            Err(InvalidTransition { from: self, to })
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job state {:?}", crate::excerpt(s)))
    }
}

/// What a client asks the LLM: a model alias, the conversation and sampling parameters.
/// This is the part of a job that reaches the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    pub model: String,
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    /// Stream the answer: subscribers see its text as deltas while the job runs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Asks the provider for a repeatable sample.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    /// Functions the model may call.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
}

/// What travels through a lane: enough to schedule and claim a job without reading it first.
///
/// `attempt` is the job's attempt counter when this message was published; a
/// claim succeeds only if the stored counter still equals it, so stale
/// duplicates are dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRef {
    pub request_id: RequestId,
    pub tenant: String,
    pub model: String,
    pub attempt: i32,
    /// Estimated tokens of the call, for endpoints' token limits; 0 when unknown (messages
    /// republished from the database), in which case only the real usage is charged.
    #[serde(default)]
    pub tokens: u32,
    /// The last attempt was refused with a 429: once its pool has room again this job goes
    /// before fresh work for that pool, which was not turned away.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rate_limited: bool,
    /// When a worker first held this job waiting for its pool (Unix milliseconds), kept when the
    /// job is parked back in the broker so the wait before a fallback pool counts from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since_ms: Option<i64>,
}

/// A request that breaks a rule: the field at fault in OpenAI's notation (`messages[2].role`,
/// `tools[0].function.name`) and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct InvalidRequest {
    pub param: Option<String>,
    pub message: String,
}

impl InvalidRequest {
    pub fn new(param: impl Into<String>, message: impl Into<String>) -> InvalidRequest {
        InvalidRequest {
            param: Some(param.into()),
            message: message.into(),
        }
    }
}

/// Most messages one job may carry.
pub const MAX_MESSAGES: usize = 1_000;
/// Most tools one job may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// Names of functions and JSON schemas: 1 to 64 of `a-z A-Z 0-9 _ -`, as OpenAI requires.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Completion tokens assumed when a job sets no `max_tokens`.
pub const DEFAULT_COMPLETION_ESTIMATE: u32 = 256;

impl JobRequest {
    /// A request for `model` with these messages and every parameter left to the provider.
    pub fn new(model: impl Into<String>, messages: Vec<Message>) -> JobRequest {
        JobRequest {
            model: model.into(),
            messages,
            max_tokens: None,
            temperature: None,
            top_p: None,
            stop: None,
            stream: false,
            seed: None,
            tools: Vec::new(),
            tool_choice: None,
            parallel_tool_calls: None,
            response_format: None,
        }
    }

    /// Check the rules every front door enforces; the first broken one is the error.
    pub fn validate(&self) -> Result<(), InvalidRequest> {
        if self.messages.is_empty() {
            return Err(InvalidRequest::new(
                "messages",
                "messages must hold at least one message",
            ));
        }
        if self.messages.len() > MAX_MESSAGES {
            return Err(InvalidRequest::new(
                "messages",
                format!("messages may hold at most {MAX_MESSAGES} messages"),
            ));
        }
        for (i, m) in self.messages.iter().enumerate() {
            validate_message(i, m)?;
        }
        if self.max_tokens == Some(0) {
            return Err(InvalidRequest::new(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        if let Some(t) = self.temperature {
            if !(0.0..=2.0).contains(&t) {
                return Err(InvalidRequest::new(
                    "temperature",
                    "temperature must be between 0 and 2",
                ));
            }
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(InvalidRequest::new(
                    "top_p",
                    "top_p must be between 0 and 1",
                ));
            }
        }
        if self.stop.as_ref().is_some_and(|s| s.len() > MAX_STOP) {
            return Err(InvalidRequest::new(
                "stop",
                format!("stop may hold at most {MAX_STOP} sequences"),
            ));
        }
        self.validate_tools()?;
        if let Some(ResponseFormat::JsonSchema { json_schema }) = &self.response_format {
            if !valid_name(&json_schema.name) {
                return Err(InvalidRequest::new(
                    "response_format.json_schema.name",
                    "response_format.json_schema.name must be 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            if json_schema.schema.as_ref().is_some_and(|s| !s.is_object()) {
                return Err(InvalidRequest::new(
                    "response_format.json_schema.schema",
                    "response_format.json_schema.schema must be a JSON Schema object",
                ));
            }
        }
        Ok(())
    }

    fn validate_tools(&self) -> Result<(), InvalidRequest> {
        if self.tools.len() > MAX_TOOLS {
            return Err(InvalidRequest::new(
                "tools",
                format!("tools may hold at most {MAX_TOOLS} functions"),
            ));
        }
        for (i, tool) in self.tools.iter().enumerate() {
            let f = &tool.function;
            if !valid_name(&f.name) {
                return Err(InvalidRequest::new(
                    format!("tools[{i}].function.name"),
                    "a function name must be 1 to 64 letters, digits, '_' or '-'",
                ));
            }
            if self.tools[..i].iter().any(|t| t.function.name == f.name) {
                return Err(InvalidRequest::new(
                    format!("tools[{i}].function.name"),
                    format!("function {:?} is defined twice", f.name),
                ));
            }
            if f.parameters.as_ref().is_some_and(|p| !p.is_object()) {
                return Err(InvalidRequest::new(
                    format!("tools[{i}].function.parameters"),
                    "function parameters must be a JSON Schema object",
                ));
            }
        }
        match &self.tool_choice {
            Some(ToolChoice::Mode(ToolMode::Required)) if self.tools.is_empty() => {
                Err(InvalidRequest::new(
                    "tool_choice",
                    "tool_choice \"required\" needs at least one tool in tools",
                ))
            }
            Some(choice) => match choice.named() {
                Some(name) if !self.tools.iter().any(|t| t.function.name == name) => {
                    Err(InvalidRequest::new(
                        "tool_choice",
                        format!(
                            "tool_choice names function {:?}, which is not in tools",
                            crate::excerpt(name)
                        ),
                    ))
                }
                _ => Ok(()),
            },
            None if self.parallel_tool_calls.is_some() && self.tools.is_empty() => {
                Err(InvalidRequest::new(
                    "parallel_tool_calls",
                    "parallel_tool_calls is only allowed when tools are given",
                ))
            }
            None => Ok(()),
        }
    }

    /// Whether asking again gives the same answer: greedy decoding (temperature 0) or a fixed
    /// seed. Anything else is a fresh sample each time, which a reused answer would not be.
    pub fn is_deterministic(&self) -> bool {
        self.temperature == Some(0.0) || self.seed.is_some()
    }

    /// Tokens this request may cost before the provider says: about four characters a prompt
    /// token, plus the completion it may produce (`max_tokens`, else a default).
    pub fn estimated_tokens(&self) -> u32 {
        let messages: usize = self
            .messages
            .iter()
            .map(|m| {
                let calls: usize = m
                    .tool_calls
                    .iter()
                    .map(|c| c.function.name.len() + c.function.arguments.len())
                    .sum();
                m.content.estimated_chars() + calls
            })
            .sum();
        // Tool definitions are sent with every call and billed as prompt.
        let tools: usize = self
            .tools
            .iter()
            .map(|t| {
                t.function.name.len()
                    + t.function.description.as_ref().map_or(0, String::len)
                    + t.function
                        .parameters
                        .as_ref()
                        .map_or(0, |p| p.to_string().len())
            })
            .sum();
        let chars = messages + tools;
        let prompt = u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX);
        prompt.saturating_add(self.max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE))
    }
}

fn validate_message(i: usize, m: &Message) -> Result<(), InvalidRequest> {
    use crate::chat::{Content, ContentPart};
    let at = |field: &str| format!("messages[{i}].{field}");
    if m.role == Role::Tool && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
        return Err(InvalidRequest::new(
            at("tool_call_id"),
            "a tool message needs the tool_call_id of the call it answers",
        ));
    }
    if m.role != Role::Tool && m.tool_call_id.is_some() {
        return Err(InvalidRequest::new(
            at("tool_call_id"),
            "only tool messages carry a tool_call_id",
        ));
    }
    if m.role != Role::Assistant && !m.tool_calls.is_empty() {
        return Err(InvalidRequest::new(
            at("tool_calls"),
            "only assistant messages carry tool_calls",
        ));
    }
    if let Some(j) = m
        .tool_calls
        .iter()
        .position(|c| c.id.is_empty() || !valid_name(&c.function.name))
    {
        return Err(InvalidRequest::new(
            format!("messages[{i}].tool_calls[{j}]"),
            "a tool call needs an id and a function name of 1 to 64 letters, digits, '_' or '-'",
        ));
    }
    if let Content::Parts(parts) = &m.content {
        if parts.is_empty() {
            return Err(InvalidRequest::new(
                at("content"),
                "content must not be an empty array",
            ));
        }
        for (j, part) in parts.iter().enumerate() {
            let ContentPart::ImageUrl { image_url } = part else {
                continue;
            };
            if m.role != Role::User {
                return Err(InvalidRequest::new(
                    format!("messages[{i}].content[{j}]"),
                    "image parts are only allowed in user messages",
                ));
            }
            let url = image_url.url.as_str();
            let fetchable = url.starts_with("https://") || url.starts_with("http://");
            if !fetchable && image_url.inline_data().is_none() {
                return Err(InvalidRequest::new(
                    format!("messages[{i}].content[{j}].image_url.url"),
                    "an image URL must be http(s):// or a data:<type>;base64,... URL",
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use JobState::*;

    #[test]
    fn happy_path_is_legal() {
        assert_eq!(Queued.transition(Running), Ok(Running));
        assert_eq!(Running.transition(Succeeded), Ok(Succeeded));
    }

    #[test]
    fn retry_path_is_legal() {
        assert!(Running.can_become(Retrying));
        assert!(Retrying.can_become(Running));
        assert!(Running.can_become(Dead));
        assert!(Dead.can_become(Queued));
    }

    #[test]
    fn terminal_states_stay_terminal() {
        for from in [Succeeded, Failed, Cancelled] {
            for to in JobState::ALL {
                assert!(!from.can_become(to), "{from} -> {to} must be illegal");
            }
        }
        for to in JobState::ALL {
            if to != Queued {
                assert!(!Dead.can_become(to), "dead -> {to} must be illegal");
            }
        }
    }

    #[test]
    fn only_a_queued_job_finishes_without_running_by_taking_another_jobs_outcome() {
        for to in [Succeeded, Failed, Dead] {
            assert_eq!(Queued.transition(to), Ok(to));
        }
        for to in [Succeeded, Failed] {
            assert!(Retrying.transition(to).is_err());
        }
        assert_eq!(
            Retrying.transition(Succeeded),
            Err(InvalidTransition {
                from: Retrying,
                to: Succeeded
            })
        );
    }

    #[test]
    fn claimable_states_can_run() {
        for s in JobState::ALL {
            assert_eq!(s.is_claimable(), s.can_become(Running));
        }
    }

    #[test]
    fn token_estimates_count_prompt_and_completion() {
        let mut job = JobRequest {
            max_tokens: Some(100),
            ..JobRequest::new("m", vec![Message::user("x".repeat(41))])
        };
        assert_eq!(job.estimated_tokens(), 11 + 100);
        job.max_tokens = None;
        assert_eq!(job.estimated_tokens(), 11 + DEFAULT_COMPLETION_ESTIMATE);
    }

    #[test]
    fn validation_names_the_field_at_fault() {
        let ok = JobRequest::new("m", vec![Message::user("hi")]);
        assert_eq!(ok.validate(), Ok(()));
        let param = |r: JobRequest| r.validate().unwrap_err().param.unwrap();
        assert_eq!(param(JobRequest::new("m", vec![])), "messages");
        assert_eq!(
            param(JobRequest {
                temperature: Some(2.5),
                ..ok.clone()
            }),
            "temperature"
        );
        assert_eq!(
            param(JobRequest::new(
                "m",
                vec![Message::user("a"), Message::new(Role::Tool, "42")]
            )),
            "messages[1].tool_call_id"
        );
        let tool: crate::chat::Tool = serde_json::from_value(serde_json::json!({
            "type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}
        }))
        .unwrap();
        let named = ToolChoice::Function(crate::chat::NamedFunction {
            kind: crate::chat::FunctionKind::Function,
            function: crate::chat::FunctionName {
                name: "other".into(),
            },
        });
        assert_eq!(
            param(JobRequest {
                tools: vec![tool.clone()],
                tool_choice: Some(named),
                ..ok.clone()
            }),
            "tool_choice"
        );
        assert_eq!(
            param(JobRequest {
                tools: vec![tool.clone(), tool.clone()],
                ..ok.clone()
            }),
            "tools[1].function.name"
        );
        assert_eq!(
            param(JobRequest {
                tool_choice: Some(ToolChoice::Mode(ToolMode::Required)),
                ..ok.clone()
            }),
            "tool_choice"
        );
        let image: Message =
            serde_json::from_value(serde_json::json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}))
            .unwrap();
        assert_eq!(
            param(JobRequest::new("m", vec![image])),
            "messages[0].content[0].image_url.url"
        );
    }

    #[test]
    fn only_greedy_or_seeded_requests_are_deterministic() {
        let mut r = JobRequest::new("m", vec![Message::user("hi")]);
        assert!(!r.is_deterministic(), "unset temperature samples");
        r.temperature = Some(1.0);
        assert!(!r.is_deterministic());
        r.temperature = Some(0.0);
        assert!(r.is_deterministic());
        r.temperature = Some(0.7);
        r.seed = Some(7);
        assert!(r.is_deterministic());
    }

    #[test]
    fn older_messages_without_an_estimate_still_parse() {
        let old = r#"{"request_id":"01a20d98-94be-75bd-8a09-e1e715d75876","tenant":"t","model":"m","attempt":2}"#;
        let job: JobRef = serde_json::from_str(old).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((job.attempt, job.tokens, job.rate_limited), (2, 0, false));
    }

    #[test]
    fn request_ids_are_v7_and_parse() {
        let id = RequestId::new();
        assert_eq!(id.0.get_version_num(), 7);
        assert_eq!(id.to_string().parse::<RequestId>().ok(), Some(id));
    }
}
