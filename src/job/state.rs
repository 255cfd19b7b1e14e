//! `GET /jobs/{id}`: the job's state, folded from its event log (the single source of truth).

use serde::Serialize;

use super::event::{DoneStatus, ErrorInfo, EventKind, FileSummary, Step, StepState, Usage};
use super::registry::Job;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
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
        let mut view = JobView {
            job_id: job.id().to_owned(),
            state: JobState::Queued,
            repo_url: job.request().repo.canonical(),
            prompt: job.request().prompt.clone(),
            created_at: job.created_at_ms(),
            finished_at: None,
            pr_url: None,
            branch: None,
            summary: None,
            files: None,
            usage: None,
            error: None,
        };
        for item in job.log().replay_after(0) {
            match item.event.kind {
                EventKind::Status {
                    step: Step::Queue,
                    state: StepState::Succeeded,
                    ..
                } => view.state = JobState::Running,
                EventKind::Diff { files, .. } => view.files = Some(files),
                EventKind::PrCreated { pr_url, branch, .. } => {
                    view.pr_url = Some(pr_url);
                    view.branch = Some(branch);
                }
                EventKind::Error { code, message, .. } => {
                    view.error = Some(ErrorInfo { code, message });
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
                    view.state = match status {
                        DoneStatus::Succeeded => JobState::Succeeded,
                        DoneStatus::Failed => JobState::Failed,
                        DoneStatus::Cancelled => JobState::Cancelled,
                    };
                    view.finished_at = Some(item.event.timestamp);
                    view.pr_url = pr_url.or(view.pr_url);
                    view.branch = branch.or(view.branch);
                    view.summary = Some(summary);
                    view.usage = Some(usage);
                    view.error = error.or(view.error);
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
        view
    }
}
