//! Sluice's domain model and policies: what a job, lane, tier and principal are,
//! and the pure decisions (state transitions, fair scheduling, rate limiting, retry) made about them.
//!
//! Nothing in this crate performs I/O; every other crate depends on it.

pub mod adaptive;
pub mod breaker;
pub mod gcra;
pub mod job;
pub mod lane;
pub mod principal;
pub mod retry;
pub mod scheduler;
pub mod semantic;
pub mod sse;

pub use adaptive::{AdaptiveConfig, AdaptiveRate};
pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use job::{InvalidTransition, JobRef, JobRequest, JobState, Message, RequestId, Role};
pub use lane::{Lane, LaneWeights, ParseLaneError};
pub use principal::{ParseTierError, Principal, Tier, TierLanes};

pub use retry::{RetryDecision, RetryPolicy};
pub use scheduler::FairQueue;
