//! `GET /jobs/{id}`: the job's state, folded from its event log (the single source of truth) as
//! each event is appended, and stored with the events that changed it, so reading it never walks
//! or copies the log.

use serde::Serialize;

use crate::event::{DoneStatus, ErrorInfo, Event, EventKind, FileSummary, Step, StepState, Usage};
pub use crate::store::JobState;
use crate::store::{JobRecord, JobResult};

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
    /// The state as stored: the lists as the JSON the wire carries.
    pub fn to_result(&self) -> JobResult {
        JobResult {
            state: Some(self.state),
            finished_at: self.finished_at,
            pr_url: self.pr_url.clone(),
            branch: self.branch.clone(),
            summary: self.summary.clone(),
            files: self
                .files
                .as_ref()
                .and_then(|f| serde_json::to_string(f).ok()),
            usage: self
                .usage
                .as_ref()
                .and_then(|u| serde_json::to_string(u).ok()),
            error: self
                .error
                .as_ref()
                .and_then(|e| serde_json::to_string(e).ok()),
        }
    }

    /// The state a stored job's events led to. A list that does not read back is left out.
    pub fn from_record(record: &JobRecord) -> Summary {
        let r = &record.result;
        Summary {
            state: record.state,
            finished_at: r.finished_at,
            pr_url: r.pr_url.clone(),
            branch: r.branch.clone(),
            summary: r.summary.clone(),
            files: r
                .files
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
            usage: r
                .usage
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
            error: r
                .error
                .as_deref()
                .and_then(|j| serde_json::from_str(j).ok()),
        }
    }

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
    pub fn of(record: &JobRecord) -> Self {
        let s = Summary::from_record(record);
        JobView {
            job_id: record.id.clone(),
            state: s.state,
            repo_url: record.repo_url.clone(),
            prompt: record.prompt.clone(),
            created_at: record.created_at,
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
