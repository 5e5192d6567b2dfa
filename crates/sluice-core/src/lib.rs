//! Sluice's domain model and policies: what a job, lane, tier and principal are,
//! and the pure decisions (state transitions, fair scheduling, rate limiting, retry, admission) made about them.
//!
//! Nothing in this crate performs I/O; every other crate depends on it.

pub mod adaptive;
pub mod breaker;
pub mod chat;
pub mod complexity;
pub mod email;
pub mod excerpt;
pub mod gcra;
pub mod ident;
pub mod job;
pub mod lane;
pub mod price;
pub mod principal;
pub mod quota;
pub mod redact;
pub mod retry;
pub mod route;
pub mod scheduler;
pub mod semantic;
pub mod shedding;
pub mod sse;

pub use adaptive::{AdaptiveConfig, AdaptiveRate};
pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use chat::{
    Content, ContentPart, ContentPartRef, FunctionCall, FunctionDef, FunctionKind, ImageUrl,
    JsonSchemaFormat, Message, ResponseFormat, Role, Tool, ToolCall, ToolChoice, ToolMode,
};
pub use complexity::{classify, Classification, Complexity};
pub use email::{EmailAddress, InvalidEmail};
pub use excerpt::{excerpt, shorten_message};
pub use ident::valid_identifier;
pub use job::{
    InvalidRequest, InvalidTransition, JobRef, JobRequest, JobState, RequestId, MAX_MESSAGES,
    MAX_STOP, MAX_TOOLS,
};
pub use lane::{Lane, LaneWeights, ParseLaneError};
pub use price::{budget_state, BudgetState, Price};
pub use principal::{ParseTierError, Principal, Tier, TierLanes};
pub use quota::{
    counters, Counter, Exceeded, LocalQuotas, QuotaConfig, QuotaRule, QuotaScope, QuotaWindow,
    TierQuotas,
};
pub use redact::redact_url;
pub use retry::{RetryDecision, RetryPolicy};
pub use route::{ClassifyPools, RouteKey, RouteSpec, RouteTarget};
pub use scheduler::FairQueue;
pub use shedding::{
    assess, estimated_wait, Admission, Assessment, LaneEstimate, LaneLoad, LoadLevel, OverTarget,
    WaitTargets,
};
