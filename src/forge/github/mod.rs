//! The `github` forge: one commit made through GitHub's Git Data API, then a pull request.
//!
//! The server reads the change out of the sandbox and writes it here as git objects, so the token
//! never enters the sandbox. A publish costs a constant number of requests for text files
//! (`GET repo`, `GET ref`, `GET commit`, `POST tree` with inline contents, `POST commit`,
//! `POST ref`, `POST pulls`: seven); only binary files add one blob upload each.
//!
//! Every write is idempotent, because the forge repeats calls after transient failures (5xx,
//! rate limits, dropped connections; see [`crate::retry`]) and callers retry whole publishes:
//! blobs and trees are content-addressed, a repeated commit is only an unreferenced object, an
//! existing branch holding the same tree on the same parent is reused, GitHub answers a repeated
//! fork with the existing fork, and "A pull request already exists" is answered by looking the
//! pull request up. octocrab's own retries are off: they re-send at once, with no backoff, and
//! ignore `retry-after`.
//!
//! A write whose outcome is unknown (a 5xx, no answer in time, a connection lost after the request
//! went out, an unreadable answer) is reconciled before it is retried or reported: the branch's
//! ref, the fork, or the open pull request for the head is read, and what is there is used
//! ([`GithubForge::write_reconciled`]). So a lost answer never turns into a failed job with its
//! pull request open, nor into a second pull request. Retries, reconciling reads included, are
//! bounded by a deadline per step (reading the repository, forking, writing the branch, opening
//! the pull request), not by a count, and still honour `retry-after` and secondary rate limits.

mod error;

use std::fmt;
use std::future::Future;
use std::sync::OnceLock;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use octocrab::Octocrab;
use octocrab::models::commits::GitCommitObject;
use octocrab::models::git::GitTree;
use octocrab::models::repos::{CommitAuthor, Object, Ref};
use octocrab::params::repos::Reference;
use octocrab::service::middleware::retry::RetryConfig;
use serde_json::{Value, json};
use tokio::time::Instant;
use tracing::Instrument as _;

use self::error::{Ctx, Failure};
use super::local::{AUTHOR_EMAIL, AUTHOR_NAME};
use super::{
    ChangeSet, Forge, ForgeError, PublishMode, PullRequest, PullRequestDraft, PushedBranch,
    RepoInfo,
};
use crate::event::ErrorCode;
use crate::repo::RepoRef;
use crate::retry::{Deadline, RetryPolicy, RetryVerdict, Retryable as _, with_retries_until};
use crate::sandbox::FileContent;

pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// Text files up to this size go inline in the tree request; larger ones are uploaded as blobs.
const MAX_INLINE_FILE: usize = 1024 * 1024;
/// Inline contents stop at this total per tree request; the rest go as blobs.
const MAX_INLINE_TOTAL: usize = 16 * 1024 * 1024;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// The bound on one attempt of a call.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Blob uploads carry up to 100 MiB of base64.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// GitHub: "If this takes longer than 5 minutes, be sure to contact GitHub Support."
const FORK_WAIT: Duration = Duration::from_secs(300);
/// How long one step (reading the repository, forking, writing the branch, opening the pull
/// request) may keep retrying: room for a secondary rate limit's minute and a few backoffs,
/// within the time a job keeps back for publishing.
const STEP_DEADLINE: Duration = Duration::from_secs(90);
const FORK_POLL: Duration = Duration::from_secs(2);

const READ_NEEDS: &str = "read access (classic token: `repo` scope for private repositories; fine-grained: Metadata and Contents: read)";
const WRITE_NEEDS: &str = "Contents: write (classic token: `repo` or `public_repo` scope)";
const PULL_NEEDS: &str = "Pull requests: write (classic token: `repo` or `public_repo` scope)";
const FORK_NEEDS: &str = "permission to fork (classic token: `repo` or `public_repo` scope; fine-grained: Administration: write and Contents: read)";

/// Where GitHub is and how to authenticate. Built from the environment by [`Self::from_lookup`].
#[derive(Clone)]
pub struct GithubConfig {
    pub token: String,
    /// REST root: `https://api.github.com`, or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub api_url: String,
}

impl fmt::Debug for GithubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubConfig")
            .field("token", &"[REDACTED]")
            .field("api_url", &self.api_url)
            .finish()
    }
}

impl GithubConfig {
    /// `GITHUB_TOKEN`, else `GITHUB_PAT` (blank values count as unset), and `GITHUB_API_URL`
    /// (default `https://api.github.com`). `None` when no token is set.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<GithubConfig> {
        let token = ["GITHUB_TOKEN", "GITHUB_PAT"]
            .into_iter()
            .filter_map(&lookup)
            .map(|t| t.trim().to_owned())
            .find(|t| !t.is_empty())?;
        let api_url = lookup("GITHUB_API_URL")
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        Some(GithubConfig { token, api_url })
    }
}

/// The GitHub forge. Cheap to share behind an `Arc`.
pub struct GithubForge {
    /// Built on first use (or in `new` when a runtime is running): octocrab's client spawns its
    /// worker on the current tokio runtime, so building it outside one panics.
    crab: OnceLock<Octocrab>,
    api_url: String,
    /// Sent as `Authorization: Bearer …`, and scrubbed from anything GitHub might echo back.
    token: String,
    fork_wait: Duration,
    fork_poll: Duration,
    retry: RetryPolicy,
    step_deadline: Duration,
}

/// Backoff from 1 s doubling up to 16 s, and a rate limit's requested wait honoured up to a minute,
/// GitHub's own advice for secondary limits. How many retries fit is the step's deadline's
/// business; `max_retries` is not used.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        initial_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(16),
        max_retry_after: Duration::from_secs(60),
        jitter: 0.25,
    }
}

impl fmt::Debug for GithubForge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GithubForge").finish_non_exhaustive()
    }
}

/// The repository a branch is written to: the upstream itself, or the token owner's fork.
#[derive(Debug, Clone)]
struct Target {
    owner: String,
    name: String,
    fork: bool,
}

impl Target {
    fn full_name(&self) -> String {
        format!("{}/{}", self.owner, self.name)
    }
}

/// Why writing the branch stopped.
enum WriteError {
    /// The first write was refused with 403/404: the token cannot push here after all.
    NoWriteAccess(Failure, Ctx),
    Forge(ForgeError),
}

impl From<ForgeError> for WriteError {
    fn from(e: ForgeError) -> Self {
        WriteError::Forge(e)
    }
}

/// One tree entry of the commit.
enum Entry {
    /// UTF-8 content GitHub turns into a blob itself.
    Inline {
        path: String,
        mode: &'static str,
        content: String,
    },
    /// Binary (or large) content, uploaded first.
    Blob {
        path: String,
        mode: &'static str,
        bytes: Vec<u8>,
    },
    /// `"sha": null` removes the path.
    Delete { path: String },
}

impl GithubForge {
    pub fn new(config: GithubConfig) -> Result<GithubForge, ForgeError> {
        let api_url = config.api_url.trim().trim_end_matches('/').to_owned();
        let parsed = url::Url::parse(&api_url).map_err(|e| {
            ForgeError::new(
                ErrorCode::InvalidGithubApiUrl,
                format!("GITHUB_API_URL `{api_url}` is not a URL: {e}"),
            )
        })?;
        if !matches!(parsed.scheme(), "https" | "http")
            || parsed.host_str().is_none()
            || !parsed.username().is_empty()
            || parsed.password().is_some()
            || parsed.query().is_some()
        {
            return Err(ForgeError::new(
                ErrorCode::InvalidGithubApiUrl,
                format!(
                    "GITHUB_API_URL must look like https://api.github.com or https://HOST/api/v3, not `{api_url}`"
                ),
            ));
        }
        let token = config.token.trim().to_owned();
        if token.is_empty() {
            return Err(ForgeError::new(
                ErrorCode::GithubTokenMissing,
                "GITHUB_TOKEN is empty",
            ));
        }
        if api_url.parse::<axum::http::Uri>().is_err() {
            return Err(ForgeError::new(
                ErrorCode::InvalidGithubApiUrl,
                format!("GITHUB_API_URL `{api_url}` is not a valid base URI"),
            ));
        }
        let forge = GithubForge {
            crab: OnceLock::new(),
            api_url,
            token,
            fork_wait: FORK_WAIT,
            fork_poll: FORK_POLL,
            retry: default_retry(),
            step_deadline: STEP_DEADLINE,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Surface client set-up problems (e.g. no CA roots) at start-up.
            forge
                .crab()
                .map_err(|f| ForgeError::new(ErrorCode::GithubClientFailed, f.message))?;
        }
        Ok(forge)
    }

    /// The octocrab client, built on first use.
    fn crab(&self) -> Result<&Octocrab, Failure> {
        if let Some(crab) = self.crab.get() {
            return Ok(crab);
        }
        let built = Octocrab::builder()
            .base_uri(self.api_url.as_str())
            .map_err(Failure::from_octocrab)?
            .personal_token(self.token.clone())
            // Retries are ours (`Self::retried`), with backoff and the server's requested wait.
            .add_retry_config(RetryConfig::None)
            .set_connect_timeout(Some(CONNECT_TIMEOUT))
            .set_read_timeout(Some(READ_TIMEOUT))
            .set_write_timeout(Some(READ_TIMEOUT))
            .build()
            .map_err(|e| {
                let mut f = Failure::from_octocrab(e);
                f.message = format!("could not set up the GitHub client: {}", f.message);
                f
            })?;
        Ok(self.crab.get_or_init(|| built))
    }

    /// [`Self::crab`], failing with a [`ForgeError`] worded for `ctx`.
    fn client(&self, ctx: &Ctx) -> Result<&Octocrab, ForgeError> {
        self.crab().map_err(|f| self.fail(f, ctx))
    }

    /// How long to wait for a new fork to become usable, and how often to look.
    pub fn with_fork_wait(mut self, total: Duration, poll: Duration) -> Self {
        self.fork_wait = total;
        self.fork_poll = poll;
        self
    }

    /// How transient failures are retried (tests shorten the waits).
    pub fn with_retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// How long one step may keep retrying (default 90 s).
    pub fn with_step_deadline(mut self, deadline: Duration) -> Self {
        self.step_deadline = deadline;
        self
    }

    /// The deadline of a step that starts now.
    fn step(&self) -> Instant {
        Instant::now() + self.step_deadline
    }

    /// Runs one octocrab call with a deadline, reducing any failure to a [`Failure`] whose
    /// message cannot hold the token (it is logged when retried).
    /// Each call is a `github.request` span and counts in `tb_github_requests_total` under `op`
    /// (`get_ref`, `create_pull`, …).
    async fn once<T>(
        &self,
        op: &'static str,
        limit: Duration,
        fut: impl Future<Output = octocrab::Result<T>>,
    ) -> Result<T, Failure> {
        let span = tracing::info_span!("github.request", operation = op);
        let result = match tokio::time::timeout(limit, fut).instrument(span).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                let mut failure = Failure::from_octocrab(e);
                failure.message = self.scrub(&failure.message);
                Err(failure)
            }
            Err(_) => Err(Failure::timeout(limit.as_secs())),
        };
        let outcome = match &result {
            Ok(_) => "ok",
            Err(failure) => failure.kind.label(),
        };
        crate::telemetry::github_request(op, outcome);
        result
    }

    /// Runs a call that is safe to repeat (see the module doc), each attempt bounded by `limit`,
    /// repeating it after transient failures under the forge's policy until `until`.
    async fn retried<T, F, Fut>(
        &self,
        op: &'static str,
        until: Instant,
        limit: Duration,
        mut call: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = octocrab::Result<T>>,
    {
        with_retries_until(&self.retry, "github", until, || {
            self.once(op, limit, call())
        })
        .await
    }

    /// [`Self::retried`] with the failure worded for `ctx`.
    async fn call<T, F, Fut>(
        &self,
        op: &'static str,
        until: Instant,
        ctx: &Ctx,
        call: F,
    ) -> Result<T, ForgeError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = octocrab::Result<T>>,
    {
        match self.retried(op, until, CALL_TIMEOUT, call).await {
            Ok(value) => Ok(value),
            Err(failure) => Err(self.fail(failure, ctx)),
        }
    }

    /// Runs a write whose effect `reconcile` can look up. When an attempt's outcome is unknown
    /// (see [`Failure::outcome_unknown`]), the write may have happened although its answer was
    /// lost: `reconcile` reads the state it would have made (retrying that read within the same
    /// deadline), and what it finds is the result. Only when it finds nothing is the write sent
    /// again, after a backoff, while the deadline allows. Any other failure is returned as it is
    /// (after retries when transient), for the caller to word or to handle (a 422 "already
    /// exists"); one whose reconciling read failed too is marked [`Failure::unsettled`].
    async fn write_reconciled<T, W, WFut, R, RFut>(
        &self,
        until: Instant,
        op: &'static str,
        mut write: W,
        mut reconcile: R,
    ) -> Result<T, Failure>
    where
        W: FnMut() -> WFut,
        WFut: Future<Output = octocrab::Result<T>>,
        R: FnMut() -> RFut,
        RFut: Future<Output = Result<Option<T>, Failure>>,
    {
        let mut deadline = Deadline::new(&self.retry, "github", until);
        loop {
            let failure = match self.once(op, CALL_TIMEOUT, write()).await {
                Ok(value) => return Ok(value),
                Err(failure) => failure,
            };
            if failure.outcome_unknown() {
                match reconcile().await {
                    Ok(Some(found)) => {
                        tracing::warn!(
                            op,
                            "github: the write was carried out although its answer was lost ({failure}); using what it made"
                        );
                        return Ok(found);
                    }
                    Ok(None) => {
                        tracing::info!(
                            op,
                            "github: the write was not carried out ({failure}); sending it again"
                        );
                    }
                    Err(read) => {
                        tracing::warn!(
                            op,
                            "github: could not find out whether the write was carried out ({failure}; the read failed: {read})"
                        );
                        return Err(failure.unsettled());
                    }
                }
            }
            let Some(wait) = deadline.next_wait(failure.verdict()) else {
                return Err(failure);
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Words a failure, logs it (message only: octocrab's `Debug` carries backtraces) and makes
    /// sure the token cannot be in it.
    fn fail(&self, failure: Failure, ctx: &Ctx) -> ForgeError {
        let mut err = failure.into_forge_error(ctx);
        err.message = self.scrub(&err.message);
        tracing::warn!(code = %err.code, repo = %ctx.repo, action = ctx.action, "github: {}", err.message);
        err
    }

    fn scrub(&self, text: &str) -> String {
        if self.token.len() >= 4 && text.contains(&self.token) {
            text.replace(&self.token, "[REDACTED]")
        } else {
            text.to_owned()
        }
    }

    /// The open pull request whose head is `head`, if any.
    async fn find_open_pull(
        &self,
        pulls: &octocrab::pulls::PullRequestHandler<'_>,
        head: &str,
        until: Instant,
    ) -> Result<Option<octocrab::models::pulls::PullRequest>, Failure> {
        let page = self
            .retried("list_pulls", until, CALL_TIMEOUT, || {
                pulls
                    .list()
                    .head(head.to_owned())
                    .state(octocrab::params::State::Open)
                    .send()
            })
            .await?;
        Ok(page.items.into_iter().next())
    }

    async fn get_ref(&self, until: Instant, target: &Target, branch: &str) -> Result<Ref, Failure> {
        let crab = self.crab()?;
        let reference = &Reference::Branch(encode_branch(branch));
        self.retried("get_ref", until, CALL_TIMEOUT, || async move {
            crab.git(&target.owner, &target.name)
                .get_ref(reference)
                .await
        })
        .await
    }

    /// The branch's ref, `None` when it does not exist.
    async fn find_ref(
        &self,
        until: Instant,
        target: &Target,
        branch: &str,
    ) -> Result<Option<Ref>, Failure> {
        match self.get_ref(until, target, branch).await {
            Ok(found) => Ok(Some(found)),
            Err(f) if f.status() == Some(404) => Ok(None),
            Err(f) => Err(f),
        }
    }

    async fn get_commit(
        &self,
        until: Instant,
        target: &Target,
        sha: &str,
    ) -> Result<GitCommitObject, Failure> {
        let crab = self.crab()?;
        self.retried("get_commit", until, CALL_TIMEOUT, || async move {
            crab.git(&target.owner, &target.name).get_commit(sha).await
        })
        .await
    }

    /// The token owner's fork of `owner/name`, looked up after a fork request whose answer was
    /// lost: the token's login, then that login's repository of the same name, when it is a fork
    /// of this upstream. `None` when there is none (GitHub may have named it differently; the
    /// repeated fork request then returns it).
    async fn find_fork(
        &self,
        until: Instant,
        owner: &str,
        name: &str,
    ) -> Result<Option<octocrab::models::Repository>, Failure> {
        let crab = self.crab()?;
        let me = self
            .retried("get_user", until, CALL_TIMEOUT, || async move {
                crab.current().user().await
            })
            .await;
        let me = match me {
            Ok(me) => me,
            // A token that may not read its user (a GitHub App's) cannot look: the fork request
            // is sent again instead, which GitHub answers with the existing fork.
            Err(f) if f.verdict() == RetryVerdict::Stop => return Ok(None),
            Err(f) => return Err(f),
        };
        let login = me.login.as_str();
        let found = self
            .retried("get_repo", until, CALL_TIMEOUT, || async move {
                crab.repos(login, name).get().await
            })
            .await;
        let repo = match found {
            Ok(repo) => repo,
            Err(f) if f.status() == Some(404) => return Ok(None),
            Err(f) => return Err(f),
        };
        let upstream = format!("{owner}/{name}");
        let of_upstream = repo
            .parent
            .as_ref()
            .and_then(|p| p.full_name.as_deref())
            .is_some_and(|p| p.eq_ignore_ascii_case(&upstream));
        Ok((repo.fork == Some(true) && of_upstream).then_some(repo))
    }

    /// Forks `upstream` for the token's owner (GitHub returns the existing fork when there is
    /// one) and waits, boundedly, until `base_commit` can be read in it.
    async fn ensure_fork(
        &self,
        owner: &str,
        name: &str,
        base_branch: &str,
        base_commit: &str,
    ) -> Result<(Target, String), ForgeError> {
        let upstream = format!("{owner}/{name}");
        let ctx = Ctx::new("fork the repository", upstream.clone(), FORK_NEEDS);
        let crab = self.client(&ctx)?;
        // GitHub answers a repeated fork request with the existing fork.
        let until = self.step();
        let fork = self
            .write_reconciled(
                until,
                "create_fork",
                || async move {
                    crab.repos(owner, name)
                        .create_fork()
                        .default_branch_only(false)
                        .send()
                        .await
                },
                || self.find_fork(until, owner, name),
            )
            .await
            .map_err(|f| self.fail(f, &ctx))?;
        let fork_owner = fork
            .owner
            .as_ref()
            .map(|o| o.login.clone())
            .ok_or_else(|| {
                ForgeError::new(
                    ErrorCode::GithubBadResponse,
                    format!("GitHub's answer to forking {upstream} names no owner"),
                )
            })?;
        let target = Target {
            owner: fork_owner,
            name: fork.name.clone(),
            fork: true,
        };
        tracing::info!(upstream = %upstream, fork = %target.full_name(), "github: using fork");

        let deadline = tokio::time::Instant::now() + self.fork_wait;
        let mut synced = false;
        loop {
            match self.get_commit(self.step(), &target, base_commit).await {
                Ok(commit) => return Ok((target, commit.tree.sha)),
                Err(f) if matches!(f.status(), Some(404 | 409)) => {
                    // A fresh fork is still being copied (409 "Git Repository is empty." or
                    // 404); an old one may predate the base commit, so sync it once.
                    if !synced {
                        synced = true;
                        self.sync_fork(&target, base_branch).await;
                    }
                }
                Err(f) => {
                    let ctx = Ctx::new("read the fork", target.full_name(), READ_NEEDS);
                    return Err(self.fail(f, &ctx));
                }
            }
            if tokio::time::Instant::now() + self.fork_poll > deadline {
                return Err(ForgeError {
                    code: ErrorCode::ForkNotReady,
                    message: format!(
                        "the fork {} of {upstream} was not ready after {} seconds; try again later",
                        target.full_name(),
                        self.fork_wait.as_secs()
                    ),
                    retryable: true,
                });
            }
            tokio::time::sleep(self.fork_poll).await;
        }
    }

    /// Best effort: fast-forwards the fork's `branch` to upstream's, so an old fork holds the base
    /// commit. Failures (diverged fork, branch missing in the fork) are only logged.
    async fn sync_fork(&self, fork: &Target, branch: &str) {
        let route = format!("/repos/{}/{}/merge-upstream", fork.owner, fork.name);
        let Ok(crab) = self.crab() else {
            return;
        };
        // One attempt: the sync is best effort, and the readiness poll that follows repeats.
        let result: Result<Value, Failure> = self
            .once(
                "merge_upstream",
                CALL_TIMEOUT,
                crab.post(route, Some(&json!({ "branch": branch }))),
            )
            .await;
        if let Err(f) = result {
            tracing::debug!(fork = %fork.full_name(), "github: fork sync skipped: {}", f.message);
        }
    }

    /// Turns the change into tree entries, deciding inline content versus blob per file.
    fn entries(change: &ChangeSet) -> Vec<Entry> {
        let mut inline_total = 0usize;
        change
            .files
            .iter()
            .map(|file| {
                let path = file.path.as_str().to_owned();
                match &file.content {
                    FileContent::Missing => Entry::Delete { path },
                    FileContent::Symlink { target } => Entry::Inline {
                        path,
                        mode: "120000",
                        content: target.clone(),
                    },
                    FileContent::File { bytes, executable } => {
                        let mode = if *executable { "100755" } else { "100644" };
                        let text = std::str::from_utf8(bytes)
                            .ok()
                            .filter(|t| !t.contains('\0'))
                            .filter(|t| t.len() <= MAX_INLINE_FILE)
                            .filter(|t| inline_total + t.len() <= MAX_INLINE_TOTAL);
                        match text {
                            Some(text) => {
                                inline_total += text.len();
                                Entry::Inline {
                                    path,
                                    mode,
                                    content: text.to_owned(),
                                }
                            }
                            None => Entry::Blob {
                                path,
                                mode,
                                bytes: bytes.clone(),
                            },
                        }
                    }
                }
            })
            .collect()
    }

    /// Writes blobs, the tree, the commit and the branch into `target`. Returns the commit.
    async fn write_branch(
        &self,
        target: &Target,
        base_tree: &str,
        change: &ChangeSet,
        branch: &str,
        message: &str,
    ) -> Result<String, WriteError> {
        let workflows = change
            .files
            .iter()
            .any(|f| f.path.as_str().starts_with(".github/workflows/"));
        let repo = target.full_name();
        let crab = self.client(&Ctx::new(
            "write to the repository",
            repo.clone(),
            WRITE_NEEDS,
        ))?;
        let git = crab.git(&target.owner, &target.name);
        // Only the first write may send us to the fork flow.
        let mut first_write = !target.fork;
        let until = self.step();

        let mut tree = Vec::with_capacity(change.files.len());
        for entry in Self::entries(change) {
            tree.push(match entry {
                Entry::Inline {
                    path,
                    mode,
                    content,
                } => json!({ "path": path, "mode": mode, "type": "blob", "content": content }),
                Entry::Delete { path } => {
                    json!({ "path": path, "mode": "100644", "type": "blob", "sha": null })
                }
                Entry::Blob { path, mode, bytes } => {
                    let ctx = Ctx::new("upload a file", repo.clone(), WRITE_NEEDS)
                        .with_workflows(workflows);
                    let encoded = base64::engine::general_purpose::STANDARD.encode(&bytes);
                    // Content-addressed: a repeated upload yields the same blob.
                    let blob = self
                        .retried("create_blob", until, UPLOAD_TIMEOUT, || {
                            git.create_blob(encoded.clone()).encoding("base64").send()
                        })
                        .await;
                    let blob = match blob {
                        Ok(blob) => blob,
                        Err(f) if first_write && f.is_no_write_access() => {
                            return Err(WriteError::NoWriteAccess(f, ctx));
                        }
                        Err(f) => return Err(self.fail(f, &ctx).into()),
                    };
                    first_write = false;
                    json!({ "path": path, "mode": mode, "type": "blob", "sha": blob.sha })
                }
            });
        }

        // Raw, because the typed `CreateTreeEntry` cannot send `"sha": null` for deletions.
        let ctx = Ctx::new("create the commit's tree", repo.clone(), WRITE_NEEDS)
            .with_workflows(workflows);
        let body = json!({ "base_tree": base_tree, "tree": tree });
        let route = format!("/repos/{}/{}/git/trees", target.owner, target.name);
        let created: Result<GitTree, Failure> = self
            .retried("create_tree", until, UPLOAD_TIMEOUT, || {
                crab.post(route.as_str(), Some(&body))
            })
            .await;
        let tree_sha = match created {
            Ok(tree) => tree.sha,
            Err(f) if first_write && f.is_no_write_access() => {
                return Err(WriteError::NoWriteAccess(f, ctx));
            }
            Err(f) => return Err(self.fail(f, &ctx).into()),
        };

        let identity = CommitAuthor {
            name: AUTHOR_NAME.to_owned(),
            email: Some(AUTHOR_EMAIL.to_owned()),
            date: None,
        };
        let ctx =
            Ctx::new("create the commit", repo.clone(), WRITE_NEEDS).with_workflows(workflows);
        // A repeated commit at worst leaves an unreferenced object behind: the branch names one.
        let commit = self
            .call("create_commit", until, &ctx, || {
                let (git, tree_sha, identity) = (&git, &tree_sha, &identity);
                async move {
                    git.create_commit(message, tree_sha.clone())
                        .parents(vec![change.base_commit.clone()])
                        .author(identity.clone())
                        .committer(identity.clone())
                        .send()
                        .await
                }
            })
            .await?;

        let ctx =
            Ctx::new("create the branch", repo.clone(), WRITE_NEEDS).with_workflows(workflows);
        let reference = Reference::Branch(branch.to_owned());
        // A lost answer is reconciled by reading the branch: the ref it made is the result.
        let created = self
            .write_reconciled(
                until,
                "create_ref",
                || git.create_ref(&reference, commit.sha.clone()),
                || self.find_ref(until, target, branch),
            )
            .await;
        let existing = match created {
            Ok(made) => made,
            Err(f) if f.status() == Some(422) && f.mentions("already exists") => {
                // A repeat (of the publish) that got this far, or someone else's branch.
                let ctx = Ctx::new("read the existing branch", target.full_name(), READ_NEEDS);
                self.get_ref(until, target, branch)
                    .await
                    .map_err(|f| self.fail(f, &ctx))?
            }
            Err(f) => {
                let unknown = f.unsettled;
                let mut err = self.fail(f, &ctx);
                if unknown {
                    // Nothing orphaned silently: the message says what may be there.
                    err.message.push_str(&format!(
                        "; branch `{branch}` may exist on {repo} all the same (GitHub could not be asked)"
                    ));
                }
                return Err(err.into());
            }
        };
        // Ours when it points at our commit, or at one with the same tree on the same parent.
        self.reuse_branch(
            until,
            target,
            branch,
            existing,
            &commit.sha,
            &tree_sha,
            &change.base_commit,
        )
        .await
        .map_err(WriteError::Forge)
    }

    #[allow(clippy::too_many_arguments)]
    async fn reuse_branch(
        &self,
        until: Instant,
        target: &Target,
        branch: &str,
        existing: Ref,
        commit: &str,
        tree: &str,
        parent: &str,
    ) -> Result<String, ForgeError> {
        let sha = match existing.object {
            Object::Commit { sha, .. } => sha,
            // Branches point at commits; anything else is someone else's ref.
            _ => {
                return Err(ForgeError::new(
                    ErrorCode::BranchExists,
                    format!(
                        "`refs/heads/{branch}` already exists on {} and does not point at a commit",
                        target.full_name()
                    ),
                ));
            }
        };
        if sha == commit {
            return Ok(sha);
        }
        let ctx = Ctx::new(
            "read the existing branch's commit",
            target.full_name(),
            READ_NEEDS,
        );
        let other = self
            .get_commit(until, target, &sha)
            .await
            .map_err(|f| self.fail(f, &ctx))?;
        let same_parent = other.parents.len() == 1
            && other.parents.first().and_then(|p| p.sha.as_deref()) == Some(parent);
        if other.tree.sha == tree && same_parent {
            tracing::info!(repo = %target.full_name(), branch, "github: branch already holds this change; reusing it");
            return Ok(sha);
        }
        Err(ForgeError::new(
            ErrorCode::BranchExists,
            format!(
                "branch `{branch}` already exists on {} with different content; choose another branch name",
                target.full_name()
            ),
        ))
    }
}

fn remote(repo: &RepoRef) -> Result<(&str, &str), ForgeError> {
    match repo {
        RepoRef::Remote { owner, name, .. } => Ok((owner, name)),
        RepoRef::Local { .. } => Err(ForgeError::new(
            ErrorCode::UnsupportedRepo,
            "the github forge only handles GitHub repositories",
        )),
    }
}

/// Percent-encodes each segment of a branch name for use in a route, keeping the `/` separators
/// (octocrab interpolates names unencoded).
fn encode_branch(branch: &str) -> String {
    let mut out = String::with_capacity(branch.len());
    for byte in branch.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Branch names we create: the characters git and URLs both take without escaping.
fn check_branch(branch: &str) -> Result<(), ForgeError> {
    let ok = !branch.is_empty()
        && branch.len() <= 200
        && branch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/'))
        && !branch.contains("..")
        && !branch.ends_with(".lock")
        && !branch.ends_with('.')
        && branch
            .split('/')
            .all(|segment| !segment.is_empty() && !segment.starts_with('.'));
    if ok {
        Ok(())
    } else {
        Err(ForgeError::new(
            ErrorCode::InvalidBranch,
            format!(
                "`{branch}` is not a valid branch name (use letters, digits, `-`, `_`, `.` and `/`)"
            ),
        ))
    }
}

#[async_trait]
impl Forge for GithubForge {
    fn name(&self) -> &'static str {
        "github"
    }

    async fn check_new_branch(&self, info: &RepoInfo, branch: &str) -> Result<(), ForgeError> {
        // With a fork, the branch goes to a fork that may not exist yet: `push_branch` decides.
        if info.publish != PublishMode::Push {
            return Ok(());
        }
        let (owner, name) = remote(&info.repo)?;
        let target = Target {
            owner: owner.to_owned(),
            name: name.to_owned(),
            fork: false,
        };
        match self.get_ref(self.step(), &target, branch).await {
            Ok(_) => Err(ForgeError::new(
                ErrorCode::BranchExists,
                format!("branch `{branch}` already exists in {owner}/{name}"),
            )),
            // Missing is what we want; any other answer is left to the push, which reports it.
            Err(_) => Ok(()),
        }
    }

    async fn prepare(
        &self,
        repo: &RepoRef,
        base_branch: Option<&str>,
    ) -> Result<RepoInfo, ForgeError> {
        let (owner, name) = remote(repo)?;
        let full = format!("{owner}/{name}");
        let ctx = Ctx::new("read the repository", full.clone(), READ_NEEDS);
        let crab = self.client(&ctx)?;
        let until = self.step();
        let meta = self
            .call("get_repo", until, &ctx, || async move {
                crab.repos(owner, name).get().await
            })
            .await?;
        if meta.archived == Some(true) {
            return Err(ForgeError::new(
                ErrorCode::GithubRepoArchived,
                format!("{full} is archived on GitHub, so no branch or pull request can be added"),
            ));
        }
        // The sandbox clones without credentials (the token never enters it), so a private
        // repository would fail only at the clone, after the sandbox is paid for: refuse it now.
        if meta.private == Some(true) {
            return Err(ForgeError::new(
                ErrorCode::PrivateRepository,
                format!(
                    "{full} is private; Tiny Backspace clones without credentials inside the sandbox, so private repositories are not supported yet"
                ),
            ));
        }
        let branch = match base_branch {
            Some(b) => b.to_owned(),
            None => meta.default_branch.clone().ok_or_else(|| {
                ForgeError::new(
                    ErrorCode::GithubEmptyRepository,
                    format!("{full} has no default branch (is it empty?); pass baseBranch"),
                )
            })?,
        };
        let target = Target {
            owner: owner.to_owned(),
            name: name.to_owned(),
            fork: false,
        };
        let ctx = Ctx::new("read the base branch", full.clone(), READ_NEEDS);
        let head = match self.get_ref(until, &target, &branch).await {
            Ok(head) => head,
            Err(f) if f.status() == Some(404) => {
                return Err(ForgeError::new(
                    ErrorCode::BaseBranchNotFound,
                    format!("branch `{branch}` does not exist in {full}"),
                ));
            }
            Err(f) if f.status() == Some(409) => {
                return Err(ForgeError::new(
                    ErrorCode::GithubEmptyRepository,
                    format!(
                        "{full} is empty (GitHub: \"{}\"); push a first commit",
                        f.message
                    ),
                ));
            }
            Err(f) => return Err(self.fail(f, &ctx)),
        };
        let base_commit = match head.object {
            Object::Commit { sha, .. } => sha,
            // `Object` is non-exhaustive.
            _ => {
                return Err(ForgeError::new(
                    ErrorCode::BaseBranchNotFound,
                    format!("`{branch}` in {full} does not point at a commit"),
                ));
            }
        };
        // `permissions` reflects the user's role, not what the token may do; a refused first
        // write still falls back to the fork flow (see `push_branch`).
        let can_push = meta.permissions.as_ref().map(|p| p.push).unwrap_or(true);
        let clone_url = meta
            .clone_url
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_else(|| repo.clone_url());
        Ok(RepoInfo {
            repo: repo.clone(),
            clone_url,
            base_branch: Some(branch),
            base_commit: Some(base_commit),
            publish: if can_push {
                PublishMode::Push
            } else {
                PublishMode::Fork
            },
        })
    }

    async fn push_branch(
        &self,
        info: &RepoInfo,
        change: &ChangeSet,
        branch: &str,
        message: &str,
    ) -> Result<PushedBranch, ForgeError> {
        let (owner, name) = remote(&info.repo)?;
        check_branch(branch)?;
        if change.files.is_empty() {
            return Err(ForgeError::new(
                ErrorCode::EmptyChange,
                "there is nothing to commit",
            ));
        }
        let base_branch = info.base_branch.as_deref().ok_or_else(|| {
            ForgeError::new(
                ErrorCode::BaseBranchNotFound,
                "no base branch is known; run prepare first",
            )
        })?;
        let mut fork = match &info.publish {
            PublishMode::Push => false,
            PublishMode::Fork => true,
            PublishMode::Skip(why) => {
                return Err(ForgeError::new(ErrorCode::PublishDisabled, why.clone()));
            }
        };
        let message = self.scrub(message);
        // The refusal that sent a pushable-looking repository to the fork flow: when forking
        // fails too (e.g. the token owner owns the repository), that refusal is the real error.
        let mut refused: Option<(Failure, Ctx)> = None;
        loop {
            let (target, base_tree) = if fork {
                match self
                    .ensure_fork(owner, name, base_branch, &change.base_commit)
                    .await
                {
                    Ok(found) => found,
                    Err(fork_err) => match refused.take() {
                        Some((f, ctx)) if !fork_err.retryable => {
                            tracing::info!(
                                code = %fork_err.code,
                                "github: fork fallback failed: {}",
                                fork_err.message
                            );
                            return Err(self.fail(f, &ctx));
                        }
                        Some(_) | None => return Err(fork_err),
                    },
                }
            } else {
                let target = Target {
                    owner: owner.to_owned(),
                    name: name.to_owned(),
                    fork: false,
                };
                let ctx = Ctx::new("read the base commit", target.full_name(), READ_NEEDS);
                let base = self
                    .get_commit(self.step(), &target, &change.base_commit)
                    .await
                    .map_err(|f| self.fail(f, &ctx))?;
                (target, base.tree.sha)
            };
            match self
                .write_branch(&target, &base_tree, change, branch, &message)
                .await
            {
                Ok(commit) => {
                    let head_ref = if target.fork {
                        format!("{}:{branch}", target.owner)
                    } else {
                        branch.to_owned()
                    };
                    return Ok(PushedBranch {
                        branch: branch.to_owned(),
                        commit,
                        head_ref,
                    });
                }
                Err(WriteError::NoWriteAccess(f, ctx)) => {
                    if fork {
                        return Err(self.fail(f, &ctx));
                    }
                    tracing::info!(repo = %target.full_name(), "github: no write access after all ({}); using a fork", f.message);
                    refused = Some((f, ctx));
                    fork = true;
                }
                Err(WriteError::Forge(e)) => return Err(e),
            }
        }
    }

    async fn open_pull_request(
        &self,
        info: &RepoInfo,
        pushed: &PushedBranch,
        pr: &PullRequestDraft,
    ) -> Result<Option<PullRequest>, ForgeError> {
        let (owner, name) = remote(&info.repo)?;
        let full = format!("{owner}/{name}");
        let base = info.base_branch.as_deref().ok_or_else(|| {
            ForgeError::new(
                ErrorCode::BaseBranchNotFound,
                "no base branch is known; run prepare first",
            )
        })?;
        let from_fork = pushed.head_ref.contains(':');
        let title = self.scrub(&pr.title);
        let body = self.scrub(&pr.body);
        let ctx = Ctx::new("open the pull request", full.clone(), PULL_NEEDS);
        let pulls = self.client(&ctx)?.pulls(owner, name);

        let head = pull_head(owner, pushed);
        let until = self.step();
        // The pull request open for this head, if any: how a lost answer is reconciled.
        let find_open = || self.find_open_pull(&pulls, &head, until);

        let mut draft = pr.draft;
        let created = loop {
            let attempt = self
                .write_reconciled(
                    until,
                    "create_pull",
                    || {
                        let mut request = pulls
                            .create(title.clone(), pushed.head_ref.clone(), base.to_owned())
                            .body(body.clone())
                            .draft(draft);
                        if from_fork {
                            request = request.maintainer_can_modify(true);
                        }
                        request.send()
                    },
                    &find_open,
                )
                .await;
            match attempt {
                Ok(created) => break Some(created),
                // Opened by an earlier publish of the same branch.
                Err(f) if f.status() == Some(422) && f.mentions("already exists") => break None,
                Err(f) if f.status() == Some(422) && draft && f.mentions("draft") => {
                    // Draft pull requests are unavailable on some plans: open a normal one.
                    tracing::info!(repo = %full, "github: draft pull requests unavailable ({}); opening a normal one", f.message);
                    draft = false;
                }
                Err(f) => {
                    let unknown = f.unsettled;
                    let mut err = self.fail(f, &ctx);
                    if unknown {
                        err.message.push_str(&format!(
                            "; a pull request for {head} may be open on {full} all the same (GitHub could not be asked)"
                        ));
                    }
                    return Err(err);
                }
            }
        };
        let created = match created {
            Some(created) => created,
            None => {
                let read = Ctx::new("find the existing pull request", full.clone(), READ_NEEDS);
                find_open()
                    .await
                    .map_err(|f| self.fail(f, &read))?
                    .ok_or_else(|| {
                        ForgeError::new(
                            ErrorCode::GithubValidationFailed,
                            format!(
                                "GitHub says a pull request already exists for {head} on {full}, but none is open"
                            ),
                        )
                    })?
            }
        };
        Ok(Some(pull_request(&created, draft)))
    }

    async fn find_pull_request(
        &self,
        info: &RepoInfo,
        pushed: &PushedBranch,
    ) -> Result<Option<PullRequest>, ForgeError> {
        let (owner, name) = remote(&info.repo)?;
        let ctx = Ctx::new(
            "find the pull request",
            format!("{owner}/{name}"),
            READ_NEEDS,
        );
        let pulls = self.client(&ctx)?.pulls(owner, name);
        let found = self
            .find_open_pull(&pulls, &pull_head(owner, pushed), self.step())
            .await
            .map_err(|f| self.fail(f, &ctx))?;
        Ok(found.map(|p| pull_request(&p, false)))
    }
}

/// How a pull request names its head (`owner:branch`), for finding one that already exists.
fn pull_head(owner: &str, pushed: &PushedBranch) -> String {
    if pushed.head_ref.contains(':') {
        pushed.head_ref.clone()
    } else {
        format!("{owner}:{}", pushed.head_ref)
    }
}

/// What the pipeline keeps of a pull request; `draft` when GitHub does not say.
fn pull_request(pull: &octocrab::models::pulls::PullRequest, draft: bool) -> PullRequest {
    PullRequest {
        url: pull
            .html_url
            .as_ref()
            .map(|u| u.to_string())
            .unwrap_or_else(|| pull.url.clone()),
        number: pull.number,
        draft: pull.draft.unwrap_or(draft),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_prefers_github_token_and_defaults_the_api_url() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |key: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let config =
            GithubConfig::from_lookup(env(&[("GITHUB_TOKEN", "t1"), ("GITHUB_PAT", "t2")]))
                .unwrap();
        assert_eq!(config.token, "t1");
        assert_eq!(config.api_url, DEFAULT_API_URL);
        let config = GithubConfig::from_lookup(env(&[
            ("GITHUB_TOKEN", " "),
            ("GITHUB_PAT", "t2"),
            ("GITHUB_API_URL", "https://ghe.example/api/v3"),
        ]))
        .unwrap();
        assert_eq!(config.token, "t2");
        assert_eq!(config.api_url, "https://ghe.example/api/v3");
        assert!(GithubConfig::from_lookup(env(&[])).is_none());
        assert!(!format!("{config:?}").contains("t2"));
    }

    #[test]
    fn builds_outside_a_runtime_and_normalises_the_api_url() {
        let forge = GithubForge::new(GithubConfig {
            token: "t-0123456789".into(),
            api_url: "https://ghe.example/api/v3/".into(),
        })
        .unwrap();
        assert_eq!(forge.name(), "github");
        assert!(!format!("{forge:?}").contains("t-0123456789"));
        let e = GithubForge::new(GithubConfig {
            token: " ".into(),
            api_url: DEFAULT_API_URL.into(),
        })
        .unwrap_err();
        assert_eq!(e.code, "github_token_missing");
    }

    #[test]
    fn branch_names_are_checked_and_encoded() {
        assert!(check_branch("tiny-backspace/fix-readme-1a2b3c").is_ok());
        for bad in [
            "", "a..b", "a b", "a/", "/a", "a//b", "a.lock", ".a", "a/.b", "a#b",
        ] {
            assert!(check_branch(bad).is_err(), "{bad}");
        }
        assert_eq!(encode_branch("feat/a b#c"), "feat/a%20b%23c");
    }
}
