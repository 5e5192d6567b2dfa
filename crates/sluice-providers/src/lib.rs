//! Provider adapters and endpoint pools: how Sluice turns one job into one upstream LLM call.
//! A [`Router`] maps a model alias to a [`Pool`], whose local limiters grant [`Permit`]s to call an endpoint.

mod anthropic;
mod config;
mod embeddings;
mod error;
mod gemini;
mod health;
mod http;
mod openai;
mod permit;
mod pool;
mod router;
mod shared;
#[cfg(feature = "testing")]
pub mod testing;

use serde::{Deserialize, Serialize};
use std::time::Duration;

pub use anthropic::Anthropic;
pub use config::{AuthStyle, ConfigError, EndpointConfig, PoolConfig, ProviderKind, Secret};
pub use embeddings::{Embeddings, EmbeddingsConfig};
pub use error::ProviderError;
pub use gemini::Gemini;
pub use health::EndpointStats;
pub use openai::OpenAiCompatible;
pub use permit::Permit;
pub use pool::{Pool, PoolOptions};
pub use router::Router;
pub use shared::{SharedBudget, SharedError, SharedLimiter, SharedLimits};
/// Route configuration is plain data in `sluice_core::route`, read by the router and by
/// admission; re-exported here so callers that named it from this crate still compile.
pub use sluice_core::route::{ClassifyPools, RouteSpec, RouteTarget};

/// One call's input: the job's request and its id, which is sent upstream as `x-sluice-request-id`.
#[derive(Debug, Clone, Copy)]
pub struct ChatRequest<'a> {
    pub request_id: &'a str,
    pub job: &'a sluice_core::JobRequest,
}

/// Tokens the provider reports for one call (zeros when it reports none).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    /// Usage from the provider's counts; a missing total is the sum of the parts.
    pub fn new(prompt: Option<u32>, completion: Option<u32>, total: Option<u32>) -> Usage {
        let prompt_tokens = prompt.unwrap_or(0);
        let completion_tokens = completion.unwrap_or(0);
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: total.unwrap_or(prompt_tokens.saturating_add(completion_tokens)),
        }
    }
}

/// A successful completion.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChatResponse {
    pub content: String,
    /// Functions the model called, in OpenAI's form whatever the provider's wire format.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<sluice_core::ToolCall>,
    pub usage: Usage,
    /// The model the provider says answered.
    pub model: String,
    pub finish_reason: Option<String>,
    /// The provider's rate-limit headers on this answer, fed to the endpoint's limiter.
    #[serde(skip)]
    pub rate: Option<RateHeaders>,
}

impl ChatResponse {
    /// The empty answer a stream fills in as its events arrive.
    pub(crate) fn streaming(model: String, rate: Option<RateHeaders>) -> ChatResponse {
        ChatResponse {
            content: String::new(),
            tool_calls: Vec::new(),
            usage: Usage::default(),
            model,
            finish_reason: None,
            rate,
        }
    }
}

/// What a provider's rate-limit headers say about an endpoint's request and token budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateHeaders {
    /// Requests left in the provider's current window.
    pub remaining: Option<u64>,
    /// When the provider's window resets, from now.
    pub reset: Option<Duration>,
    /// Tokens left in the provider's current window.
    pub remaining_tokens: Option<u64>,
}

/// Something that can answer a chat request: one endpoint of one provider.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    async fn chat(&self, req: ChatRequest<'_>) -> Result<ChatResponse, ProviderError>;

    /// Like [`Provider::chat`], but streamed: each text delta is sent on `deltas` as it arrives,
    /// and the assembled response (content = the deltas concatenated, usage from the stream) is
    /// returned at the end. A dropped receiver does not stop the call.
    ///
    /// The default makes one non-streamed call and sends its whole content as a single delta,
    /// so providers without a streaming API (and test fakes) still work.
    async fn chat_stream(
        &self,
        req: ChatRequest<'_>,
        deltas: tokio::sync::mpsc::Sender<String>,
    ) -> Result<ChatResponse, ProviderError> {
        let response = self.chat(req).await?;
        http::emit(&deltas, &response.content).await;
        Ok(response)
    }
}
