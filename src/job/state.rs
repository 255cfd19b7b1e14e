//! `GET /jobs/{id}`: the job's state, folded from its event log (the single source of truth) as
//! each event is appended, so reading it never walks or copies the log.

use serde::Serialize;

use super::registry::Job;
use crate::event::{DoneStatus, ErrorInfo, Event, EventKind, FileSummary, Step, StepState, Usage};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// What the events have said about the job so far.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub state: JobState,
    pub finished_at: Option<u64>,
    pub pr_url: Option<String>,
    pub branch: Option<String>,
    pub summary: Option<String>,
    pub files: Option<Vec<FileSummary>>,
    pub usage: Option<Vec<Usage>>,
    pub error: Option<ErrorInfo>,
}

impl Default for Summary {
    fn default() -> Self {
        Self {
            state: JobState::Queued,
            finished_at: None,
            pr_url: None,
            branch: None,
            summary: None,
            files: None,
            usage: None,
            error: None,
        }
    }
}

impl Summary {
    /// Folds one more event in.
    pub fn apply(&mut self, event: &Event) {
        match &event.kind {
            EventKind::Status {
                step: Step::Queue,
                state: StepState::Succeeded,
                ..
            } => self.state = JobState::Running,
            EventKind::Diff { files, .. } => self.files = Some(files.clone()),
            EventKind::PrCreated { pr_url, branch, .. } => {
                self.pr_url = Some(pr_url.clone());
                self.branch = Some(branch.clone());
            }
            EventKind::Error { code, message, .. } => {
                self.error = Some(ErrorInfo {
                    code: *code,
                    message: message.clone(),
                });
            }
            EventKind::Done {
                status,
                pr_url,
                branch,
                summary,
                usage,
                error,
                ..
            } => {
                self.state = match status {
                    DoneStatus::Succeeded => JobState::Succeeded,
                    DoneStatus::Failed => JobState::Failed,
                    DoneStatus::Cancelled => JobState::Cancelled,
                };
                self.finished_at = Some(event.timestamp);
                if pr_url.is_some() {
                    self.pr_url = pr_url.clone();
                }
                if branch.is_some() {
                    self.branch = branch.clone();
                }
                self.summary = Some(summary.clone());
                self.usage = Some(usage.clone());
                if error.is_some() {
                    self.error = error.clone();
                }
            }
            EventKind::JobStarted { .. }
            | EventKind::Status { .. }
            | EventKind::AiMessage { .. }
            | EventKind::ToolRead { .. }
            | EventKind::ToolEdit { .. }
            | EventKind::ToolBash { .. }
            | EventKind::ToolSearch { .. }
            | EventKind::AgentFallback { .. }
            | EventKind::Verify { .. } => {}
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub job_id: String,
    pub state: JobState,
    pub repo_url: String,
    pub prompt: String,
    /// Milliseconds since the Unix epoch, like event timestamps.
    pub created_at: u64,
    pub finished_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pr_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<FileSummary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Vec<Usage>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
}

impl JobView {
    pub fn of(job: &Job) -> Self {
        let s = job.log().summary();
        JobView {
            job_id: job.id().to_owned(),
            state: s.state,
            repo_url: job.request().repo.canonical(),
            prompt: job.request().prompt.clone(),
            created_at: job.created_at_ms(),
            finished_at: s.finished_at,
            pr_url: s.pr_url,
            branch: s.branch,
            summary: s.summary,
            files: s.files,
            usage: s.usage,
            error: s.error,
        }
    }
}
