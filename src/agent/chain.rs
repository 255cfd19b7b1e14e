//! Providers in fallback order. Each is retried on transient failures; when one gives up, the
//! next continues the *same* transcript and an `Agent Fallback` event says so.

use std::sync::Arc;

use super::provider::{Provider, ProviderError, TextSink, ToolSpec, Turn};
use super::retry::{RetryPolicy, with_retries};
use super::transcript::Transcript;
use crate::job::{Emitter, EventKind};

pub struct ProviderChain {
    providers: Vec<Arc<dyn Provider>>,
    current: usize,
    retry: RetryPolicy,
}

impl ProviderChain {
    pub fn new(providers: Vec<Arc<dyn Provider>>, retry: RetryPolicy) -> Self {
        Self {
            providers,
            current: 0,
            retry,
        }
    }

    /// The provider answering now.
    pub fn current(&self) -> Option<&Arc<dyn Provider>> {
        self.providers.get(self.current)
    }

    /// Whether the provider answering now is the dummy agent.
    pub fn on_dummy(&self) -> bool {
        self.current().is_some_and(|p| p.name() == "dummy")
    }

    /// Whether a provider before the current one failed.
    pub fn fell_back(&self) -> bool {
        self.current > 0
    }

    /// The next assistant turn from the first provider that can give one.
    pub async fn next_turn(
        &mut self,
        transcript: &Transcript,
        tools: &[ToolSpec],
        text: &dyn TextSink,
        events: &Emitter,
    ) -> Result<(Turn, Arc<dyn Provider>), ProviderError> {
        loop {
            let Some(provider) = self.providers.get(self.current).cloned() else {
                return Err(ProviderError::fallback("no model provider is configured"));
            };
            let result =
                with_retries(&self.retry, || provider.complete(transcript, tools, text)).await;
            match result {
                Ok(turn) => return Ok((turn, provider)),
                Err(err) => {
                    tracing::warn!(
                        job_id = events.job_id(),
                        provider = provider.name(),
                        status = ?err.status,
                        error = %err.message,
                        "provider failed"
                    );
                    let Some(next) = self.providers.get(self.current + 1) else {
                        return Err(ProviderError {
                            message: format!("{} failed: {}", provider.name(), err.message),
                            ..err
                        });
                    };
                    events.emit(EventKind::AgentFallback {
                        from: provider.name().to_owned(),
                        to: next.name().to_owned(),
                        reason: err.message.clone(),
                    });
                    self.current += 1;
                }
            }
        }
    }
}
