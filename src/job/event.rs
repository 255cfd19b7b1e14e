//! The wire contract of the event stream (API.md §2), defined once as serde types.
//!
//! The pipeline never formats JSON by hand: it emits [`EventKind`] values and the [`super::EventLog`]
//! stamps them with a sequence number and a timestamp.

use serde::{Deserialize, Serialize};

/// One event as stored in a job's log and sent on the wire (`data:` line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(flatten)]
    pub kind: EventKind,
    /// Milliseconds since the Unix epoch.
    pub timestamp: u64,
}

/// A pipeline step, as named in `Status` and `Error` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Started,
    Succeeded,
    Failed,
    Skipped,
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DoneStatus {
    Succeeded,
    Failed,
    Cancelled,
}

/// How one file changed, in `Diff` events, `GET /jobs/{id}` and PR bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileStatus {
    Added,
    Modified,
    Deleted,
    Renamed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    pub path: String,
    pub status: FileStatus,
    pub additions: u64,
    pub deletions: u64,
}

/// Tokens one provider/model pair used in a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub provider: String,
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The `error` object of a failed `Done` and of `GET /jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        code: String,
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
