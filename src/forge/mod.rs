//! Where the change goes: a branch and a pull request on GitHub, or a branch in a local repository.
//!
//! A forge never sees the sandbox: the pipeline reads the changed files out of it and hands the
//! forge a [`ChangeSet`]. That keeps credentials (the GitHub token) on the server side only.

pub mod github;
pub mod local;
pub mod policy;

use std::sync::Arc;

use async_trait::async_trait;

use crate::event::{ErrorCode, FileStatus, FileSummary};
use crate::repo::RepoRef;
use crate::sandbox::{FileContent, RepoPath};

/// One changed file, with its new content (`FileContent::Missing` for a deletion).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedFile {
    pub path: RepoPath,
    pub status: FileStatus,
    pub additions: u64,
    pub deletions: u64,
    pub content: FileContent,
}

impl ChangedFile {
    pub fn summary(&self) -> FileSummary {
        FileSummary {
            path: self.path.as_str().to_owned(),
            status: self.status,
            additions: self.additions,
            deletions: self.deletions,
        }
    }
}

/// The agent's work, relative to `base_commit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSet {
    pub base_commit: String,
    pub files: Vec<ChangedFile>,
    /// The unified diff (`git diff --binary`), possibly truncated for display.
    pub patch: String,
    pub patch_truncated: bool,
}

/// How (and whether) a change can be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishMode {
    /// Push a branch to the repository itself.
    Push,
    /// Push to the token owner's fork and open the PR from there.
    Fork,
    /// No publishing; the string says why (shown in `Status{step:"pr", state:"skipped"}`).
    Skip(String),
}

/// What a forge learned about a repository before the job starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoInfo {
    pub repo: RepoRef,
    /// A credential-free URL the sandbox clones from.
    pub clone_url: String,
    /// The branch to base the work on; `None` lets the clone take the remote's default.
    pub base_branch: Option<String>,
    /// The base branch's head when the forge could tell.
    pub base_commit: Option<String>,
    pub publish: PublishMode,
}

/// A branch that now holds the change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushedBranch {
    pub branch: String,
    pub commit: String,
    /// How a pull request names the head (`branch` or `forkowner:branch`).
    pub head_ref: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequestDraft {
    pub title: String,
    pub body: String,
    pub draft: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub url: String,
    pub number: u64,
    pub draft: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ForgeError {
    /// snake_case code for `Error` events (`github_unauthorized`, `branch_write_failed`, …).
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
}

impl ForgeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retryable: false,
        }
    }
}

#[async_trait]
pub trait Forge: Send + Sync {
    /// `github`, `local`, `none`.
    fn name(&self) -> &'static str;
    async fn prepare(
        &self,
        repo: &RepoRef,
        base_branch: Option<&str>,
    ) -> Result<RepoInfo, ForgeError>;
    /// Refuses a head branch the request named that already exists where the change would go, so
    /// the job stops before any work rather than after it. Forges that cannot tell say nothing;
    /// `push_branch` refuses an existing branch in any case.
    async fn check_new_branch(&self, _info: &RepoInfo, _branch: &str) -> Result<(), ForgeError> {
        Ok(())
    }
    /// Creates `branch` holding one commit: `change` applied on `change.base_commit`.
    async fn push_branch(
        &self,
        info: &RepoInfo,
        change: &ChangeSet,
        branch: &str,
        message: &str,
    ) -> Result<PushedBranch, ForgeError>;
    /// Opens the pull request; `Ok(None)` when this forge has no pull requests (a local repository).
    async fn open_pull_request(
        &self,
        info: &RepoInfo,
        pushed: &PushedBranch,
        pr: &PullRequestDraft,
    ) -> Result<Option<PullRequest>, ForgeError>;
    /// The open pull request for `pushed`, if any: what a job stopped while opening one (a cancel,
    /// its timeout) uses to learn whether the request went through before it was dropped.
    async fn find_pull_request(
        &self,
        _info: &RepoInfo,
        _pushed: &PushedBranch,
    ) -> Result<Option<PullRequest>, ForgeError> {
        Ok(None)
    }
}

/// A remote repository with no token: nothing is pushed, the patch stays available.
pub struct PatchOnly;

#[async_trait]
impl Forge for PatchOnly {
    fn name(&self) -> &'static str {
        "none"
    }

    async fn prepare(
        &self,
        repo: &RepoRef,
        base_branch: Option<&str>,
    ) -> Result<RepoInfo, ForgeError> {
        Ok(RepoInfo {
            repo: repo.clone(),
            clone_url: repo.clone_url(),
            base_branch: base_branch.map(str::to_owned),
            base_commit: None,
            publish: PublishMode::Skip(
                "no GitHub token is configured (GITHUB_TOKEN); the change is available at GET /jobs/{id}/patch"
                    .into(),
            ),
        })
    }

    async fn push_branch(
        &self,
        _info: &RepoInfo,
        _change: &ChangeSet,
        _branch: &str,
        _message: &str,
    ) -> Result<PushedBranch, ForgeError> {
        Err(ForgeError::new(
            ErrorCode::PublishDisabled,
            "no GitHub token is configured",
        ))
    }

    async fn open_pull_request(
        &self,
        _info: &RepoInfo,
        _pushed: &PushedBranch,
        _pr: &PullRequestDraft,
    ) -> Result<Option<PullRequest>, ForgeError> {
        Ok(None)
    }
}

/// Picks the forge for a repository.
#[derive(Clone)]
pub struct Forges {
    pub local: Arc<dyn Forge>,
    /// The GitHub forge when a token is configured.
    pub remote: Option<Arc<dyn Forge>>,
}

impl Forges {
    pub fn for_repo(&self, repo: &RepoRef) -> Arc<dyn Forge> {
        match repo {
            RepoRef::Local { .. } => self.local.clone(),
            RepoRef::Remote { .. } => self
                .remote
                .clone()
                .unwrap_or_else(|| Arc::new(PatchOnly) as Arc<dyn Forge>),
        }
    }

    /// The name shown in `/healthz` for remote repositories.
    pub fn remote_name(&self) -> &'static str {
        self.remote.as_ref().map(|f| f.name()).unwrap_or("none")
    }
}
