//! The seam between the agent loop and a model: one assistant turn at a time.

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::transcript::{Part, Transcript};

/// A tool as offered to a model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// JSON Schema of the arguments object.
    pub parameters: serde_json::Value,
}

/// Why the model stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// It wants its tool calls answered.
    ToolUse,
    /// It considers its turn complete.
    EndTurn,
    /// It ran out of output tokens mid-turn.
    MaxTokens,
    /// The provider paused a long turn; send the transcript back to continue.
    PauseTurn,
    /// It declined the request.
    Refusal,
    /// The conversation no longer fits the model's context window.
    ContextWindowExceeded,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUsage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// One assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn {
    pub content: Vec<Part>,
    pub stop: StopReason,
    pub usage: TokenUsage,
}

/// Receives text as the model writes it, so `AI Message` events appear while it streams.
pub trait TextSink: Send + Sync {
    fn text_delta(&self, provider: &str, delta: &str);
}

/// A sink that drops everything.
pub struct NoText;

impl TextSink for NoText {
    fn text_delta(&self, _provider: &str, _delta: &str) {}
}

/// How the loop should react to a provider failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Try the same provider again after a backoff (429, 5xx, 529, dropped stream).
    Retryable,
    /// Give up on this provider and let the next one continue (auth, quota, bad request).
    Fallback,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ProviderError {
    pub kind: FailureKind,
    /// HTTP status when there was one.
    pub status: Option<u16>,
    pub message: String,
    /// What the server asked us to wait (`retry-after`, `retry-after-ms`).
    pub retry_after: Option<Duration>,
}

impl ProviderError {
    pub fn fallback(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Fallback,
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Retryable,
            status: None,
            message: message.into(),
            retry_after: None,
        }
    }
}

/// A model behind some wire protocol.
#[async_trait]
pub trait Provider: Send + Sync {
    /// `anthropic`, `openai`, `dummy`.
    fn name(&self) -> &str;
    fn model(&self) -> &str;
    /// Produces the next assistant turn for `transcript`. Makes exactly one attempt; retries and
    /// fallback belong to the caller.
    async fn complete(
        &self,
        transcript: &Transcript,
        tools: &[ToolSpec],
        text: &dyn TextSink,
    ) -> Result<Turn, ProviderError>;
}
