//! Jobs: the request a client submits, its public handle, and the state machine
//! every stored job follows (`queued -> running -> succeeded | failed | cancelled | dead`, plus `retrying`).

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
    pub fn can_become(self, to: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, to),
            (Queued, Running)
                | (Queued, Cancelled)
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
            .ok_or_else(|| format!("unknown job state {s:?}"))
    }
}

/// Author of a chat message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

/// One chat message of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Message {
        Message {
            role,
            content: content.into(),
        }
    }

    /// A message from the user.
    pub fn user(content: impl Into<String>) -> Message {
        Message::new(Role::User, content)
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
        }
    }

    /// Tokens this request may cost before the provider says: about four characters a prompt
    /// token, plus the completion it may produce (`max_tokens`, else a default).
    pub fn estimated_tokens(&self) -> u32 {
        let chars: usize = self.messages.iter().map(|m| m.content.len()).sum();
        let prompt = u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX);
        prompt.saturating_add(self.max_tokens.unwrap_or(DEFAULT_COMPLETION_ESTIMATE))
    }
}

#[cfg(test)]
mod tests {
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
    fn a_job_cannot_finish_without_running() {
        for to in [Succeeded, Failed] {
            assert!(Queued.transition(to).is_err());
            assert!(Retrying.transition(to).is_err());
        }
        assert_eq!(
            Queued.transition(Succeeded),
            Err(InvalidTransition {
                from: Queued,
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
