//! Publishing into a local repository: a new branch holding one commit, written with git plumbing
//! through a private index, so the repository's working tree, index and checked-out branch are
//! never touched.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use super::{
    ChangeSet, Forge, ForgeError, PublishMode, PullRequest, PullRequestDraft, PushedBranch,
    RepoInfo,
};
use crate::event::ErrorCode;
use crate::git::{GitError, HostGit};
use crate::repo::RepoRef;
use crate::sandbox::FileContent;

pub const AUTHOR_NAME: &str = "Tiny Backspace";
pub const AUTHOR_EMAIL: &str = "tiny-backspace@users.noreply.github.com";

const GIT_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LocalForge;

#[async_trait]
impl Forge for LocalForge {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn check_new_branch(&self, info: &RepoInfo, branch: &str) -> Result<(), ForgeError> {
        let RepoRef::Local { path } = &info.repo else {
            return Ok(());
        };
        let exists = git(
            path,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{branch}"),
            ],
            None,
            &[],
        )
        .await
        .is_ok();
        if exists {
            return Err(ForgeError::new(
                ErrorCode::BranchExists,
                format!("branch `{branch}` already exists in {}", path.display()),
            ));
        }
        Ok(())
    }

    async fn prepare(
        &self,
        repo: &RepoRef,
        base_branch: Option<&str>,
    ) -> Result<RepoInfo, ForgeError> {
        let RepoRef::Local { path } = repo else {
            return Err(ForgeError::new(
                ErrorCode::UnsupportedRepo,
                "the local forge only handles local repositories",
            ));
        };
        let branch = match base_branch {
            Some(b) => b.to_owned(),
            None => git(
                path,
                &["symbolic-ref", "--quiet", "--short", "HEAD"],
                None,
                &[],
            )
            .await
            .map(|s| s.trim().to_owned())
            .map_err(|_| {
                ForgeError::new(
                    ErrorCode::BaseBranchNotFound,
                    "the local repository has no branch checked out; pass baseBranch",
                )
            })?,
        };
        let commit = git(
            path,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                &format!("refs/heads/{branch}^{{commit}}"),
            ],
            None,
            &[],
        )
        .await
        .map_err(|_| {
            ForgeError::new(
                ErrorCode::BaseBranchNotFound,
                format!(
                    "branch `{branch}` does not exist (or has no commits) in {}",
                    path.display()
                ),
            )
        })?;
        Ok(RepoInfo {
            repo: repo.clone(),
            clone_url: repo.clone_url(),
            base_branch: Some(branch),
            base_commit: Some(commit.trim().to_owned()),
            publish: PublishMode::Push,
        })
    }

    async fn push_branch(
        &self,
        info: &RepoInfo,
        change: &ChangeSet,
        branch: &str,
        message: &str,
    ) -> Result<PushedBranch, ForgeError> {
        let RepoRef::Local { path } = &info.repo else {
            return Err(ForgeError::new(
                ErrorCode::UnsupportedRepo,
                "not a local repository",
            ));
        };
        git(path, &["check-ref-format", "--branch", branch], None, &[])
            .await
            .map_err(|_| {
                ForgeError::new(
                    ErrorCode::InvalidBranch,
                    format!("`{branch}` is not a valid branch name"),
                )
            })?;

        let scratch = tempfile::tempdir().map_err(|e| {
            ForgeError::new(
                ErrorCode::BranchWriteFailed,
                format!("temporary index: {e}"),
            )
        })?;
        let index = scratch.path().join("index");
        let index_env = [(
            "GIT_INDEX_FILE",
            index.as_os_str().to_string_lossy().into_owned(),
        )];

        git(path, &["read-tree", &change.base_commit], None, &index_env).await?;

        // One NUL-separated `--index-info` batch: `mode sha\tpath` per file, mode 0 removes.
        let mut index_info = Vec::new();
        for file in &change.files {
            let (mode, sha) = match &file.content {
                FileContent::Missing => ("0", "0".repeat(40)),
                FileContent::File { bytes, executable } => {
                    let sha =
                        git(path, &["hash-object", "-w", "--stdin"], Some(bytes), &[]).await?;
                    (
                        if *executable { "100755" } else { "100644" },
                        sha.trim().to_owned(),
                    )
                }
                FileContent::Symlink { target } => {
                    let sha = git(
                        path,
                        &["hash-object", "-w", "--stdin"],
                        Some(target.as_bytes()),
                        &[],
                    )
                    .await?;
                    ("120000", sha.trim().to_owned())
                }
            };
            index_info
                .extend_from_slice(format!("{mode} {sha}\t{}", file.path.as_str()).as_bytes());
            index_info.push(0);
        }
        git(
            path,
            &["update-index", "-z", "--index-info"],
            Some(&index_info),
            &index_env,
        )
        .await?;
        let tree = git(path, &["write-tree"], None, &index_env).await?;
        let identity = [
            ("GIT_AUTHOR_NAME", AUTHOR_NAME.to_owned()),
            ("GIT_AUTHOR_EMAIL", AUTHOR_EMAIL.to_owned()),
            ("GIT_COMMITTER_NAME", AUTHOR_NAME.to_owned()),
            ("GIT_COMMITTER_EMAIL", AUTHOR_EMAIL.to_owned()),
        ];
        let commit = git(
            path,
            &[
                "commit-tree",
                tree.trim(),
                "-p",
                &change.base_commit,
                "-F",
                "-",
            ],
            Some(message.as_bytes()),
            &identity,
        )
        .await?;
        let commit = commit.trim().to_owned();
        // The empty old value makes this fail rather than overwrite an existing branch.
        git(
            path,
            &[
                "update-ref",
                "-m",
                "tiny-backspace",
                &format!("refs/heads/{branch}"),
                &commit,
                "",
            ],
            None,
            &[],
        )
        .await
        .map_err(|e| {
            ForgeError::new(
                ErrorCode::BranchExists,
                format!("could not create branch `{branch}`: {e}"),
            )
        })?;
        Ok(PushedBranch {
            branch: branch.to_owned(),
            commit,
            head_ref: branch.to_owned(),
        })
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

/// Runs host git in the local repository (built by [`HostGit`]: no outside configuration, no
/// hooks, no fsmonitor), with `env` added.
async fn git(
    dir: &Path,
    args: &[&str],
    stdin: Option<&[u8]>,
    env: &[(&str, String)],
) -> Result<String, ForgeError> {
    let mut git = HostGit::new(dir)
        .map_err(|e| ForgeError::new(ErrorCode::GitUnavailable, e.to_string()))?
        .args(args);
    for (k, v) in env {
        git = git.env(k, v);
    }
    let out = match git.output(stdin, GIT_TIMEOUT).await {
        Ok(out) => out,
        Err(GitError::Spawn(e)) => {
            return Err(ForgeError::new(
                ErrorCode::GitUnavailable,
                format!("could not run git: {e}"),
            ));
        }
        Err(GitError::TimedOut(_)) => {
            return Err(ForgeError::new(
                ErrorCode::BranchWriteFailed,
                format!("git {} timed out", args.join(" ")),
            ));
        }
        Err(e @ (GitError::Home(_) | GitError::Io(_))) => {
            return Err(ForgeError::new(
                ErrorCode::BranchWriteFailed,
                format!("git: {e}"),
            ));
        }
    };
    if !out.status.success() {
        return Err(ForgeError::new(
            ErrorCode::BranchWriteFailed,
            format!(
                "git {} failed: {}",
                args.first().copied().unwrap_or_default(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
