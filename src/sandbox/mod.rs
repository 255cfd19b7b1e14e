//! Where commands run. The pipeline and the agent's tools see only [`Sandbox`]; the `local`
//! backend confines commands on this host, the `e2b` backend drives a remote E2B sandbox.
//!
//! Paths given to a sandbox are relative to the repository root inside it (the clone target).
//! Every backend refuses paths that escape that root.

pub mod e2b;
pub mod local;
pub mod path;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

pub use path::RepoPath;

use crate::event::ErrorCode;

/// Bytes one `read_files` call returns at most, all files together, unless configured otherwise
/// (`LocalConfig::max_read_bytes`, `E2bConfig::max_read_bytes`). A change is read into memory
/// whole before it is published; a bound keeps a sandbox from exhausting the host's memory with
/// it. Above the per-file bound (100 MiB), so that one large file is still refused as that.
pub const DEFAULT_MAX_READ_BYTES: u64 = 256 * 1024 * 1024;

/// What to run. `command` is a shell command line run by `bash -c` in the repository root.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub command: String,
    /// Extra environment variables (never secrets: the pipeline only ever passes fixed values).
    pub env: Vec<(String, String)>,
    pub timeout: Duration,
    /// Bytes kept per stream; beyond it the head and tail are kept and the middle dropped.
    pub output_cap: usize,
    /// Running the command twice does no harm, so a backend may run it again after a transport
    /// failure even when the first run may have started (a cut stream, no answer in time). Off
    /// by default: an agent's command may have effects that must not happen twice.
    pub repeatable: bool,
}

impl ExecRequest {
    pub fn new(command: impl Into<String>) -> Self {
        Self {
            command: command.into(),
            env: Vec::new(),
            timeout: Duration::from_secs(120),
            output_cap: 256 * 1024,
            repeatable: false,
        }
    }

    /// See [`ExecRequest::repeatable`].
    pub fn repeatable(mut self) -> Self {
        self.repeatable = true;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn output_cap(mut self, cap: usize) -> Self {
        self.output_cap = cap;
        self
    }
}

/// What a command produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOutput {
    /// The exit status; a command killed by a signal reports `128 + signal`.
    pub exit_code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The command ran into its timeout and was killed with everything it started.
    pub timed_out: bool,
    /// Some output was dropped because of the cap.
    pub truncated: bool,
}

impl ExecOutput {
    /// stdout then stderr as text, the form tools and events show.
    pub fn combined(&self) -> String {
        let mut text = crate::text::lossy(&self.stdout);
        if !self.stderr.is_empty() {
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&crate::text::lossy(&self.stderr));
        }
        text
    }

    pub fn success(&self) -> bool {
        self.exit_code == 0 && !self.timed_out
    }
}

/// A file read out of the sandbox without following symlinks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileContent {
    File {
        bytes: Vec<u8>,
        executable: bool,
    },
    Symlink {
        target: String,
    },
    /// Nothing at that path.
    Missing,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Relative to the repository root, `/`-separated.
    pub path: String,
    pub is_dir: bool,
}

/// Which repository to clone and how.
#[derive(Debug, Clone)]
pub struct CloneSpec {
    /// A credential-free URL (`https://…` or `file://…`).
    pub url: String,
    /// The branch to check out; `None` means the remote's default branch.
    pub branch: Option<String>,
    pub timeout: Duration,
}

/// The result of a clone: the commit the work starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cloned {
    pub head: String,
    pub branch: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox could not be created: {0}")]
    Create(String),
    #[error("sandbox confinement is not available: {0}")]
    Unconfined(String),
    #[error("path refused: {0}")]
    Path(String),
    #[error("{0}")]
    Io(String),
    #[error("clone failed: {0}")]
    Clone(String),
    #[error("the sandbox is gone: {0}")]
    Gone(String),
    #[error("sandbox request failed: {message}")]
    Transport { message: String, retryable: bool },
    #[error("{0}")]
    NotFound(String),
    /// More bytes than a read may return (see [`DEFAULT_MAX_READ_BYTES`]).
    #[error("{0}")]
    TooLarge(String),
}

impl SandboxError {
    pub fn retryable(&self) -> bool {
        match self {
            SandboxError::Transport { retryable, .. } => *retryable,
            SandboxError::Create(_)
            | SandboxError::Unconfined(_)
            | SandboxError::Path(_)
            | SandboxError::Io(_)
            | SandboxError::Clone(_)
            | SandboxError::Gone(_)
            | SandboxError::NotFound(_)
            | SandboxError::TooLarge(_) => false,
        }
    }

    /// Whether the request itself was at fault (a bad path, a missing file, a file too large):
    /// for the agent's tools, a tool error the model can fix rather than the end of the job.
    pub fn is_request_error(&self) -> bool {
        match self {
            SandboxError::Path(_)
            | SandboxError::NotFound(_)
            | SandboxError::Io(_)
            | SandboxError::TooLarge(_) => true,
            SandboxError::Create(_)
            | SandboxError::Unconfined(_)
            | SandboxError::Clone(_)
            | SandboxError::Gone(_)
            | SandboxError::Transport { .. } => false,
        }
    }

    /// The code of the `Error` event this failure becomes.
    pub fn code(&self) -> ErrorCode {
        match self {
            SandboxError::Create(_) => ErrorCode::SandboxCreateFailed,
            SandboxError::Unconfined(_) => ErrorCode::SandboxUnconfined,
            SandboxError::Path(_) => ErrorCode::PathRefused,
            SandboxError::Io(_) => ErrorCode::SandboxIo,
            SandboxError::Clone(_) => ErrorCode::CloneFailed,
            SandboxError::Gone(_) => ErrorCode::SandboxGone,
            SandboxError::Transport { .. } => ErrorCode::SandboxTransport,
            SandboxError::NotFound(_) => ErrorCode::NotFound,
            SandboxError::TooLarge(_) => ErrorCode::ChangeTooLarge,
        }
    }
}

impl crate::retry::Retryable for SandboxError {
    /// Backends repeat operations that are safe to repeat while the failure is transient; no
    /// sandbox error carries a server-requested wait (control-plane answers that do are
    /// classified where they are read).
    fn verdict(&self) -> crate::retry::RetryVerdict {
        if self.retryable() {
            crate::retry::RetryVerdict::Retry { after: None }
        } else {
            crate::retry::RetryVerdict::Stop
        }
    }
}

/// One job's sandbox. Implementations must be safe to call concurrently and `kill` must be
/// idempotent.
#[async_trait]
pub trait Sandbox: Send + Sync {
    /// Clones the repository into the repository root and checks out the branch.
    async fn clone_repo(&self, spec: &CloneSpec) -> Result<Cloned, SandboxError>;
    /// Runs a command in the repository root, confined, bounded by its timeout and output cap.
    async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError>;
    async fn read_file(&self, path: &RepoPath) -> Result<FileContent, SandboxError>;
    /// Reads many files in as few round trips as the backend allows (one for `e2b`), refusing
    /// with [`SandboxError::TooLarge`] when they hold more than the backend's configured total.
    async fn read_files(&self, paths: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError>;
    /// Writes a file, creating parent directories.
    async fn write_file(&self, path: &RepoPath, bytes: &[u8]) -> Result<(), SandboxError>;
    /// Lists entries under `path` (the root when empty) up to `depth` levels, without `.git`.
    async fn list_dir(&self, path: &RepoPath, depth: u32) -> Result<Vec<DirEntry>, SandboxError>;
    /// Destroys the sandbox and everything running in it.
    async fn kill(&self) -> Result<(), SandboxError>;
    /// The id the backend knows the sandbox by, when it outlives this process (an E2B sandbox):
    /// the job store records it so the sandbox can be killed after a crash.
    fn resource_id(&self) -> Option<String> {
        None
    }
}

/// Creates one sandbox per job.
#[async_trait]
pub trait SandboxProvider: Send + Sync {
    /// `local` or `e2b`, as shown in `Job Started` and `/healthz`.
    fn name(&self) -> &'static str;
    /// How commands are kept apart from the host, as `/healthz` shows it: the local backend's
    /// level (`namespaces`, `landlock`, `none`), or `vm` for a backend whose sandboxes are
    /// machines of their own.
    fn isolation(&self) -> &'static str;
    /// How per-job resource limits are enforced, as `/healthz` shows it: `cgroup2`, `cgroup1`
    /// or `rlimits` for the local backend, `vm` where each sandbox is a machine with its own.
    fn limits(&self) -> &'static str;
    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError>;
    /// Kills a sandbox a lost process created, by its [`Sandbox::resource_id`]. Backends whose
    /// sandboxes die with the process (the local one) have nothing to do.
    async fn reclaim(&self, _resource_id: &str) -> Result<(), SandboxError> {
        Ok(())
    }
}

/// Owns a sandbox and kills it when dropped, so that a panic or a cancelled task cannot leak it.
/// The pipeline calls [`SandboxGuard::kill`] itself on the normal path to see the result.
pub struct SandboxGuard {
    sandbox: Option<Arc<dyn Sandbox>>,
}

impl SandboxGuard {
    pub fn new(sandbox: Arc<dyn Sandbox>) -> Self {
        Self {
            sandbox: Some(sandbox),
        }
    }

    pub fn sandbox(&self) -> Option<&Arc<dyn Sandbox>> {
        self.sandbox.as_ref()
    }

    pub async fn kill(mut self) -> Result<(), SandboxError> {
        match self.sandbox.take() {
            Some(sandbox) => sandbox.kill().await,
            None => Ok(()),
        }
    }
}

impl Drop for SandboxGuard {
    fn drop(&mut self) {
        if let Some(sandbox) = self.sandbox.take() {
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move {
                        if let Err(err) = sandbox.kill().await {
                            tracing::warn!(error = %err, "killing a dropped sandbox failed");
                        }
                    });
                }
                Err(_) => tracing::error!("sandbox dropped outside a runtime; it may leak"),
            }
        }
    }
}

/// A sandbox for unit tests of the layers above: every command prints `exec_output` (or fails
/// when there is none), and every other call fails as if the sandbox were gone.
#[cfg(test)]
pub(crate) struct FixedSandbox {
    pub exec_output: Option<ExecOutput>,
}

#[cfg(test)]
#[async_trait]
impl Sandbox for FixedSandbox {
    async fn clone_repo(&self, _: &CloneSpec) -> Result<Cloned, SandboxError> {
        Err(SandboxError::Gone("test sandbox".into()))
    }
    async fn exec(&self, _: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.exec_output
            .clone()
            .ok_or_else(|| SandboxError::Gone("test sandbox".into()))
    }
    async fn read_file(&self, _: &RepoPath) -> Result<FileContent, SandboxError> {
        Err(SandboxError::Gone("test sandbox".into()))
    }
    async fn read_files(&self, _: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError> {
        Err(SandboxError::Gone("test sandbox".into()))
    }
    async fn write_file(&self, _: &RepoPath, _: &[u8]) -> Result<(), SandboxError> {
        Err(SandboxError::Gone("test sandbox".into()))
    }
    async fn list_dir(&self, _: &RepoPath, _: u32) -> Result<Vec<DirEntry>, SandboxError> {
        Err(SandboxError::Gone("test sandbox".into()))
    }
    async fn kill(&self) -> Result<(), SandboxError> {
        Ok(())
    }
}
