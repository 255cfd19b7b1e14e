//! How the agent tells the world what it does. The agent owns this seam, so it never imports the
//! job layer above it, and its loop can be tested with nothing but a list that records what it saw.

use std::sync::Mutex;

use super::provider::TokenUsage;
use crate::event::{EventKind, Usage};

/// Receives what the agent does, as it happens.
pub trait Observer: Send + Sync {
    /// Something the agent did: model text, a tool call, a fallback. The event is the wire type
    /// that shows it; the observer decides where it goes.
    fn event(&self, event: EventKind);
    /// Tokens one model turn used, reported as soon as the turn is paid for, so that a job that is
    /// cancelled, times out or fails later still accounts for every turn.
    fn usage(&self, provider: &str, model: &str, usage: TokenUsage);
}

/// Adds one turn's tokens to a per-(provider, model) list.
pub fn add_usage(list: &mut Vec<Usage>, provider: &str, model: &str, turn: TokenUsage) {
    match list
        .iter_mut()
        .find(|u| u.provider == provider && u.model == model)
    {
        Some(u) => {
            u.input_tokens += turn.input_tokens;
            u.output_tokens += turn.output_tokens;
        }
        None => list.push(Usage {
            provider: provider.to_owned(),
            model: model.to_owned(),
            input_tokens: turn.input_tokens,
            output_tokens: turn.output_tokens,
        }),
    }
}

/// An observer that keeps everything in memory: for tests, and for callers that only want the
/// totals.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<EventKind>>,
    usage: Mutex<Vec<Usage>>,
}

impl Recorder {
    pub fn events(&self) -> Vec<EventKind> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn usage(&self) -> Vec<Usage> {
        self.usage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Observer for Recorder {
    fn event(&self, event: EventKind) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    fn usage(&self, provider: &str, model: &str, usage: TokenUsage) {
        let mut list = self.usage.lock().unwrap_or_else(|e| e.into_inner());
        add_usage(&mut list, provider, model, usage);
    }
}
