//! Jobs: the event wire format, the event log, the registry and the pipeline.

pub mod change;
pub mod cleaner;
pub mod lease;
pub mod log;
pub mod pipeline;
mod pull_request;
pub mod registry;
pub mod state;
pub mod step;

pub use crate::event::{Event, EventKind};
pub use log::{EventLog, Sequenced};
pub use registry::{CancelOutcome, Job, JobHandle, JobRegistry, JobRequest, Limits, SubmitError};

use crate::redact::Redactor;

/// How the pipeline, the agent and its tools report what they do: appends to the job's log,
/// scrubbing configured secrets on the way (a last line of defence; secrets should never get
/// this far).
#[derive(Debug, Clone)]
pub struct Emitter {
    log: EventLog,
    redactor: Redactor,
    job_id: String,
}

impl Emitter {
    pub fn new(log: EventLog, redactor: Redactor, job_id: impl Into<String>) -> Self {
        Self {
            log,
            redactor,
            job_id: job_id.into(),
        }
    }

    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Scrubs configured secrets out of text that is shown but is not an event (the patch).
    pub fn redact(&self, text: &str) -> String {
        if self.redactor.is_empty() {
            text.to_owned()
        } else {
            self.redactor.redact(text)
        }
    }

    pub fn emit(&self, kind: EventKind) -> Option<u64> {
        let kind = self.scrub(kind);
        tracing::debug!(job_id = %self.job_id, event = ?kind, "event");
        self.log.append(kind)
    }

    /// The event as it may be shown: configured secrets replaced.
    pub fn scrub(&self, kind: EventKind) -> EventKind {
        if self.redactor.is_empty() {
            return kind;
        }
        let Ok(mut value) = serde_json::to_value(&kind) else {
            return kind;
        };
        if !self.redactor.redact_json(&mut value) {
            return kind;
        }
        tracing::error!(job_id = %self.job_id, "a configured secret reached an event and was redacted");
        serde_json::from_value(value).unwrap_or(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_that_reaches_an_event_is_redacted_and_clean_events_pass_unchanged() {
        let log = EventLog::new();
        let emitter = Emitter::new(log.clone(), Redactor::new(["ghp_canary_0123456789"]), "job");
        emitter.emit(EventKind::ToolBash {
            command: "env".into(),
            output: "GITHUB_TOKEN=ghp_canary_0123456789".into(),
            exit_code: 0,
        });
        let clean = EventKind::AiMessage {
            message: "nothing secret".into(),
            provider: "dummy".into(),
        };
        emitter.emit(clean.clone());
        let events = log.replay_after(0);
        assert_eq!(
            events[0].event.kind,
            EventKind::ToolBash {
                command: "env".into(),
                output: "GITHUB_TOKEN=[REDACTED]".into(),
                exit_code: 0,
            }
        );
        assert_eq!(events[1].event.kind, clean);
    }
}
