//! A pipeline step as one value: begun with a `Status{started}`, and ended exactly once — by
//! [`StepRun::succeed`] or [`StepRun::skip`], by an error passed through [`StepRun::check`], or, when
//! the work is dropped mid-way (cancel, timeout), by its own `Drop`. The failed status and the
//! job's error then always name the same step.

use std::time::Instant;

use super::Emitter;
use super::change::ChangeError;
use crate::agent::runner::AgentError;
use crate::event::{ErrorCode, EventKind, Step, StepState};
use crate::forge::ForgeError;
use crate::sandbox::SandboxError;

/// Why a job failed: what the `Error` event and `Done.error` say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    pub code: ErrorCode,
    pub message: String,
    /// The step that failed; [`StepRun::check`] fills it in.
    pub step: Option<Step>,
    pub retryable: bool,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            step: None,
            retryable: false,
        }
    }
}

impl From<SandboxError> for JobError {
    fn from(err: SandboxError) -> Self {
        Self {
            code: err.code(),
            retryable: err.retryable(),
            message: err.to_string(),
            step: None,
        }
    }
}

impl From<ForgeError> for JobError {
    fn from(err: ForgeError) -> Self {
        Self {
            code: err.code,
            retryable: err.retryable,
            message: err.message,
            step: None,
        }
    }
}

impl From<ChangeError> for JobError {
    fn from(err: ChangeError) -> Self {
        match err {
            ChangeError::Sandbox(err) => err.into(),
            ChangeError::Git(message) => Self::new(ErrorCode::DiffFailed, message),
            ChangeError::TooLarge(message) => Self::new(ErrorCode::ChangeTooLarge, message),
            ChangeError::SecretInChange(message) => Self::new(ErrorCode::SecretInChange, message),
            ChangeError::ScanFailed(message) => Self::new(ErrorCode::Internal, message),
        }
    }
}

impl From<AgentError> for JobError {
    fn from(err: AgentError) -> Self {
        match err {
            AgentError::Sandbox(err) => err.into(),
            err @ AgentError::Provider(_) => Self::new(ErrorCode::AgentFailed, err.to_string()),
        }
    }
}

/// One running step. See the module docs.
pub struct StepRun<'a> {
    events: &'a Emitter,
    step: Step,
    started: Instant,
    open: bool,
    /// The step's trace span: the work the pipeline does for it runs inside it.
    span: tracing::Span,
}

impl<'a> StepRun<'a> {
    pub fn begin(events: &'a Emitter, step: Step, message: impl Into<String>) -> Self {
        events.emit(EventKind::Status {
            step,
            state: StepState::Started,
            message: message.into(),
            elapsed_ms: None,
        });
        Self {
            events,
            step,
            started: Instant::now(),
            open: true,
            span: tracing::info_span!("step", step = step.as_str()),
        }
    }

    /// The step's span, for the work done in it (`fut.instrument(step.span())`), so that the
    /// sandbox commands, model requests and GitHub calls it makes nest under it in a trace.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Passes a success through; an error ends the step as failed and becomes the job's error at
    /// this step.
    pub fn check<T, E: Into<JobError>>(&mut self, result: Result<T, E>) -> Result<T, JobError> {
        result.map_err(|err| self.fail(err))
    }

    /// Ends the step as failed with `err`, which is returned for the job to report.
    pub fn fail(&mut self, err: impl Into<JobError>) -> JobError {
        let mut err = err.into();
        err.step.get_or_insert(self.step);
        self.end(StepState::Failed, err.message.clone(), self.started);
        err
    }

    pub fn succeed(mut self, message: impl Into<String>) {
        self.end(StepState::Succeeded, message.into(), self.started);
    }

    /// Ends the step as succeeded, timed up to `at` rather than now (for work that finished while
    /// the pipeline was waiting on something else).
    pub fn succeed_at(mut self, at: Instant, message: impl Into<String>) {
        let elapsed_from = self.started;
        self.end_timed(
            StepState::Succeeded,
            message.into(),
            at.saturating_duration_since(elapsed_from).as_millis() as u64,
        );
    }

    pub fn skip(mut self, message: impl Into<String>) {
        self.end(StepState::Skipped, message.into(), self.started);
    }

    fn end(&mut self, state: StepState, message: String, started: Instant) {
        self.end_timed(state, message, started.elapsed().as_millis() as u64);
    }

    fn end_timed(&mut self, state: StepState, message: String, elapsed_ms: u64) {
        if !std::mem::take(&mut self.open) {
            return;
        }
        crate::telemetry::step_finished(
            self.step,
            state,
            std::time::Duration::from_millis(elapsed_ms),
        );
        self.events.emit(EventKind::Status {
            step: self.step,
            state,
            message,
            elapsed_ms: Some(elapsed_ms),
        });
    }
}

impl Drop for StepRun<'_> {
    fn drop(&mut self) {
        if self.open {
            self.end(
                StepState::Failed,
                "Interrupted before it finished".into(),
                self.started,
            );
        }
    }
}

/// A step that is not run at all.
pub fn skipped(events: &Emitter, step: Step, message: impl Into<String>) {
    events.emit(EventKind::Status {
        step,
        state: StepState::Skipped,
        message: message.into(),
        elapsed_ms: None,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::EventLog;
    use crate::redact::Redactor;
    use pretty_assertions::assert_eq;

    fn states(log: &EventLog) -> Vec<(Step, StepState, String)> {
        log.replay_after(0)
            .into_iter()
            .filter_map(|s| match s.event.kind {
                EventKind::Status {
                    step,
                    state,
                    message,
                    ..
                } => Some((step, state, message)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_error_ends_the_step_once_and_names_it() {
        let log = EventLog::new();
        let events = Emitter::new(log.clone(), Redactor::default(), "job");
        let mut step = StepRun::begin(&events, Step::Clone, "Cloning");
        let err = step
            .check(Err::<(), _>(SandboxError::Clone("no such branch".into())))
            .unwrap_err();
        drop(step);
        assert_eq!(err.step, Some(Step::Clone));
        assert_eq!(err.code, ErrorCode::CloneFailed);
        assert_eq!(
            states(&log),
            vec![
                (Step::Clone, StepState::Started, "Cloning".into()),
                (
                    Step::Clone,
                    StepState::Failed,
                    "clone failed: no such branch".into()
                ),
            ]
        );
    }

    #[test]
    fn a_step_dropped_mid_way_ends_as_failed() {
        let log = EventLog::new();
        let events = Emitter::new(log.clone(), Redactor::default(), "job");
        drop(StepRun::begin(&events, Step::Agent, "Running"));
        StepRun::begin(&events, Step::Pr, "Opening").succeed("Opened");
        assert_eq!(
            states(&log),
            vec![
                (Step::Agent, StepState::Started, "Running".into()),
                (
                    Step::Agent,
                    StepState::Failed,
                    "Interrupted before it finished".into()
                ),
                (Step::Pr, StepState::Started, "Opening".into()),
                (Step::Pr, StepState::Succeeded, "Opened".into()),
            ]
        );
    }
}
