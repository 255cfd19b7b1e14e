//! Providers in fallback order. Each is retried on transient failures; when one gives up, the
//! next continues the *same* transcript and an `Agent Fallback` event says so.
//!
//! Text a model streams is held per attempt and handed on only when the attempt succeeds: a
//! stream that breaks and is retried would otherwise show its partial text twice.

use std::sync::{Arc, Mutex};

use super::observer::Observer;
use super::provider::{Provider, ProviderError, TextSink, ToolSpec, Turn};
use super::retry::{RetryPolicy, with_retries};
use super::transcript::Transcript;
use crate::event::EventKind;
use tracing::Instrument;

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
        observer: &dyn Observer,
    ) -> Result<(Turn, Arc<dyn Provider>), ProviderError> {
        loop {
            let Some(provider) = self.providers.get(self.current).cloned() else {
                return Err(ProviderError::fallback("no model provider is configured"));
            };
            let result: Result<Turn, ProviderError> =
                with_retries(&self.retry, "model", || async {
                    let attempt = AttemptText::default();
                    let span = tracing::info_span!("provider.request", provider = provider.name());
                    let turn = provider
                        .complete(transcript, tools, &attempt)
                        .instrument(span)
                        .await;
                    crate::telemetry::provider_request(provider.name(), outcome(&turn));
                    let turn = turn?;
                    attempt.commit(text);
                    Ok(turn)
                })
                .await;
            match result {
                Ok(turn) => return Ok((turn, provider)),
                Err(err) => {
                    tracing::warn!(
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
                    crate::telemetry::fallback(provider.name(), next.name());
                    observer.event(EventKind::AgentFallback {
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

/// A model request's outcome as a metrics label.
fn outcome(turn: &Result<Turn, ProviderError>) -> &'static str {
    match turn {
        Ok(_) => "ok",
        Err(e) => match e.status {
            Some(429) => "rate_limited",
            Some(529) => "overloaded",
            Some(401 | 403) => "unauthorized",
            Some(s) if s >= 500 => "server_error",
            Some(_) => "client_error",
            None => "transport",
        },
    }
}

/// The text of one attempt, in the order it streamed.
#[derive(Default)]
struct AttemptText {
    deltas: Mutex<Vec<(String, String)>>,
}

impl AttemptText {
    /// Hands the attempt's text on, merging consecutive deltas of one provider.
    fn commit(self, sink: &dyn TextSink) {
        let deltas = self.deltas.into_inner().unwrap_or_else(|e| e.into_inner());
        for (provider, text) in deltas {
            sink.text_delta(&provider, &text);
        }
    }
}

impl TextSink for AttemptText {
    fn text_delta(&self, provider: &str, delta: &str) {
        let mut deltas = self.deltas.lock().unwrap_or_else(|e| e.into_inner());
        match deltas.last_mut() {
            Some((last, text)) if last == provider => text.push_str(delta),
            _ => deltas.push((provider.to_owned(), delta.to_owned())),
        }
    }
}
