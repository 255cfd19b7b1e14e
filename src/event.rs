//! The wire contract of the event stream (API.md §2), defined once as serde types.
//!
//! This is the floor of the crate: every layer (sandbox, agent, forge, job, http) may use these
//! types, and this module uses none of them. The pipeline never formats JSON by hand: it emits
//! [`EventKind`] values and the job's event log stamps them with a sequence number and a timestamp.

use serde::{Deserialize, Serialize};

/// One event as stored in a job's log and sent on the wire (`data:` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// A pipeline step, as named in `Status` and `Error` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    Queue,
    Sandbox,
    Clone,
    Agent,
    Verify,
    Commit,
    Pr,
    Cleanup,
}

impl Step {
    /// The name on the wire (and in metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Queue => "queue",
            Step::Sandbox => "sandbox",
            Step::Clone => "clone",
            Step::Agent => "agent",
            Step::Verify => "verify",
            Step::Commit => "commit",
            Step::Pr => "pr",
            Step::Cleanup => "cleanup",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Succeeded,
    Failed,
    Skipped,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            StepState::Started => "started",
            StepState::Succeeded => "succeeded",
            StepState::Failed => "failed",
            StepState::Skipped => "skipped",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DoneStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// How one file changed, in `Diff` events, `GET /jobs/{id}` and PR bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Added,
    Modified,
    Deleted,
    Renamed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct FileSummary {
    pub path: String,
    pub status: FileStatus,
    pub additions: u64,
    pub deletions: u64,
}

/// Tokens one provider/model pair used in a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Every `Error.code` (and `Done.error.code`) a job can end with: one closed set, so clients can
/// match on it and the OpenAPI document can list it. Each layer's error type maps itself to one of
/// these with a `code()` method; nothing picks a code by looking at a formatted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    // The job itself.
    /// `DELETE /jobs/{id}` or shutdown.
    Cancelled,
    /// `JOB_TIMEOUT_SECS` ran out before the job could finish.
    Timeout,
    /// A bug: a task panicked or an invariant broke.
    Internal,
    /// The process running the job died (or lost its database for longer than its lease), and
    /// another instance, or the restarted one, ended the job.
    InstanceLost,
    /// The job store failed for so long that the job was stopped; its `Done` was stored once the
    /// database was back.
    StoreUnavailable,

    // The sandbox.
    SandboxCreateFailed,
    SandboxUnconfined,
    PathRefused,
    SandboxIo,
    CloneFailed,
    SandboxGone,
    SandboxTransport,
    NotFound,

    // The agent and its change.
    AgentFailed,
    AgentRefused,
    NoChanges,
    DiffFailed,
    /// The change is larger than `MAX_CHANGE_MB` (or than the sandbox's read limit).
    ChangeTooLarge,
    /// The change holds a configured secret (or an encoding of one) or a credential's shape;
    /// nothing was published (see `secret_scan`).
    SecretInChange,

    // The commit policy and the local forge.
    WorkflowChangeRefused,
    FileTooLarge,
    UnsupportedRepo,
    BaseBranchNotFound,
    InvalidBranch,
    BranchExists,
    BranchWriteFailed,
    GitUnavailable,
    PublishDisabled,

    // GitHub.
    InvalidGithubApiUrl,
    GithubTokenMissing,
    GithubClientFailed,
    GithubWorkflowPermission,
    GithubTimeout,
    GithubUnreachable,
    GithubBadResponse,
    GithubRateLimited,
    GithubUnauthorized,
    GithubForbidden,
    GithubNotFound,
    GithubConflict,
    GithubValidationFailed,
    GithubUnavailable,
    GithubRequestFailed,
    ForkNotReady,
    GithubRepoArchived,
    GithubEmptyRepository,
    EmptyChange,
    /// The repository is private and cannot be cloned into a sandbox without a credential.
    PrivateRepository,
}

impl ErrorCode {
    /// The snake_case wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Timeout => "timeout",
            ErrorCode::InstanceLost => "instance_lost",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::SandboxCreateFailed => "sandbox_create_failed",
            ErrorCode::SandboxUnconfined => "sandbox_unconfined",
            ErrorCode::PathRefused => "path_refused",
            ErrorCode::SandboxIo => "sandbox_io",
            ErrorCode::CloneFailed => "clone_failed",
            ErrorCode::SandboxGone => "sandbox_gone",
            ErrorCode::SandboxTransport => "sandbox_transport",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AgentFailed => "agent_failed",
            ErrorCode::AgentRefused => "agent_refused",
            ErrorCode::NoChanges => "no_changes",
            ErrorCode::DiffFailed => "diff_failed",
            ErrorCode::ChangeTooLarge => "change_too_large",
            ErrorCode::SecretInChange => "secret_in_change",
            ErrorCode::WorkflowChangeRefused => "workflow_change_refused",
            ErrorCode::FileTooLarge => "file_too_large",
            ErrorCode::UnsupportedRepo => "unsupported_repo",
            ErrorCode::BaseBranchNotFound => "base_branch_not_found",
            ErrorCode::InvalidBranch => "invalid_branch",
            ErrorCode::BranchExists => "branch_exists",
            ErrorCode::BranchWriteFailed => "branch_write_failed",
            ErrorCode::GitUnavailable => "git_unavailable",
            ErrorCode::PublishDisabled => "publish_disabled",
            ErrorCode::InvalidGithubApiUrl => "invalid_github_api_url",
            ErrorCode::GithubTokenMissing => "github_token_missing",
            ErrorCode::GithubClientFailed => "github_client_failed",
            ErrorCode::GithubWorkflowPermission => "github_workflow_permission",
            ErrorCode::GithubTimeout => "github_timeout",
            ErrorCode::GithubUnreachable => "github_unreachable",
            ErrorCode::GithubBadResponse => "github_bad_response",
            ErrorCode::GithubRateLimited => "github_rate_limited",
            ErrorCode::GithubUnauthorized => "github_unauthorized",
            ErrorCode::GithubForbidden => "github_forbidden",
            ErrorCode::GithubNotFound => "github_not_found",
            ErrorCode::GithubConflict => "github_conflict",
            ErrorCode::GithubValidationFailed => "github_validation_failed",
            ErrorCode::GithubUnavailable => "github_unavailable",
            ErrorCode::GithubRequestFailed => "github_request_failed",
            ErrorCode::ForkNotReady => "fork_not_ready",
            ErrorCode::GithubRepoArchived => "github_repo_archived",
            ErrorCode::GithubEmptyRepository => "github_empty_repository",
            ErrorCode::EmptyChange => "empty_change",
            ErrorCode::PrivateRepository => "private_repository",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for ErrorCode {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The `error` object of a failed `Done` and of `GET /jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorInfo {
    pub code: ErrorCode,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type")]
pub enum EventKind {
    #[serde(rename = "Job Started")]
    JobStarted {
        job_id: String,
        repo_url: String,
        prompt: String,
        sandbox: String,
        agents: Vec<String>,
        forge: String,
    },
    Status {
        step: Step,
        state: StepState,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        elapsed_ms: Option<u64>,
    },
    #[serde(rename = "AI Message")]
    AiMessage { message: String, provider: String },
    #[serde(rename = "Tool: Read")]
    ToolRead {
        filepath: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        start_line: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end_line: Option<u64>,
    },
    #[serde(rename = "Tool: Edit")]
    ToolEdit {
        filepath: String,
        old_str: String,
        new_str: String,
    },
    #[serde(rename = "Tool: Bash")]
    ToolBash {
        command: String,
        output: String,
        exit_code: i32,
    },
    #[serde(rename = "Tool: Search")]
    ToolSearch {
        pattern: String,
        path: String,
        matches: u64,
    },
    #[serde(rename = "Agent Fallback")]
    AgentFallback {
        from: String,
        to: String,
        reason: String,
    },
    Diff {
        files: Vec<FileSummary>,
        patch: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        patch_truncated: bool,
    },
    Verify {
        command: String,
        exit_code: i32,
        passed: bool,
    },
    #[serde(rename = "PR Created")]
    PrCreated {
        pr_url: String,
        number: u64,
        branch: String,
        title: String,
        draft: bool,
    },
    Error {
        code: ErrorCode,
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        step: Option<Step>,
        retryable: bool,
    },
    Done {
        status: DoneStatus,
        pr_url: Option<String>,
        branch: Option<String>,
        summary: String,
        files_changed: usize,
        duration_ms: u64,
        usage: Vec<Usage>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorInfo>,
    },
}

impl EventKind {
    pub fn is_done(&self) -> bool {
        matches!(self, EventKind::Done { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pretty_assertions::assert_eq;

    #[test]
    fn step_names_are_the_wire_names() {
        use Step::*;
        for step in [Queue, Sandbox, Clone, Agent, Verify, Commit, Pr, Cleanup] {
            assert_eq!(serde_json::to_value(step).unwrap(), step.as_str());
        }
        use StepState::*;
        for state in [Started, Succeeded, Failed, Skipped] {
            assert_eq!(serde_json::to_value(state).unwrap(), state.as_str());
        }
    }

    #[test]
    fn tool_edit_keeps_the_original_shape() {
        let event = Event {
            kind: EventKind::ToolEdit {
                filepath: "app.py".into(),
                old_str: "def f(x):".into(),
                new_str: "def f(x: int):".into(),
            },
            timestamp: 1763769600123,
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap_or_default(),
            r#"{"type":"Tool: Edit","filepath":"app.py","old_str":"def f(x):","new_str":"def f(x: int):","timestamp":1763769600123}"#
        );
    }

    #[test]
    fn error_code_names_are_their_wire_names() {
        for code in [
            ErrorCode::Cancelled,
            ErrorCode::SandboxCreateFailed,
            ErrorCode::ChangeTooLarge,
            ErrorCode::SecretInChange,
            ErrorCode::GithubValidationFailed,
            ErrorCode::PrivateRepository,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap_or_default(),
                serde_json::Value::String(code.as_str().to_owned())
            );
        }
    }

    #[test]
    fn events_round_trip() {
        let event = Event {
            kind: EventKind::Status {
                step: Step::Clone,
                state: StepState::Succeeded,
                message: "cloned".into(),
                elapsed_ms: Some(12),
            },
            timestamp: 5,
        };
        let json = serde_json::to_value(&event).unwrap_or_default();
        assert_eq!(
            json,
            serde_json::json!({"type":"Status","step":"clone","state":"succeeded","message":"cloned","elapsed_ms":12,"timestamp":5})
        );
        let back: Event = serde_json::from_value(json).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, event);
    }
}
