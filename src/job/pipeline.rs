//! One job, start to finish: sandbox → clone → agent → commit → pull request → cleanup.
//!
//! The commit step collects the change and refuses it when it holds a secret, before the `Diff`
//! event, the stored patch or any forge call (see [`crate::secret_scan`]).
//!
//! [`run`] never returns without having appended exactly one `Done`: errors, cancellation and the
//! job timeout all end in cleanup and `Done`. (A panic is caught one level up, in the registry.)
//! Each step is a [`StepRun`]: the pipeline below is the list of steps, and the step values emit
//! the `Status` events, failed ones included.
//!
//! Time: the agent gets what the job has left minus a reserve for collecting and publishing, so a
//! job that runs out of time still publishes its partial work as a draft. The job timeout itself
//! is only a backstop; when it fires, the change is still collected so the patch is not lost.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::{Either, select};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::change;
use super::cleaner::{Cleaner, Target};
use super::lease::SandboxLease;
use super::pull_request::{branch_name, plural, pr_body, pr_title, short, summary_of};
use super::registry::Job;
use super::step::{JobError, StepRun, skipped};
use crate::agent::observer::{Observer, add_usage};
use crate::agent::retry::RetryPolicy;
use crate::agent::runner::{self, AgentEnd, AgentLimits, AgentOutcome};
use crate::agent::tools::ToolExecutor;
use crate::agent::{Provider, TokenUsage, Transcript};
use crate::event::{DoneStatus, ErrorCode, ErrorInfo, EventKind, Step, StepState, Usage};
use crate::forge::policy::CommitPolicy;
use crate::forge::{
    ChangeSet, Forge, Forges, PublishMode, PullRequestDraft, PushedBranch, RepoInfo,
};
use crate::redact::Redactor;
use crate::sandbox::{CloneSpec, Cloned, Sandbox, SandboxProvider};
use crate::store::Resource;

/// Everything a job needs from the outside, built once from the configuration.
pub struct Backends {
    pub sandbox: Arc<dyn SandboxProvider>,
    /// Providers in fallback order (the dummy last when configured).
    pub agents: Vec<Arc<dyn Provider>>,
    pub forges: Forges,
    pub commit_policy: CommitPolicy,
    pub agent_limits: AgentLimits,
    pub retry: RetryPolicy,
    pub redactor: Redactor,
    pub job_timeout: Duration,
    pub clone_timeout: Duration,
    /// The change's total size (new file contents) above which it is refused unread.
    pub max_change_bytes: u64,
}

impl Backends {
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name().to_owned()).collect()
    }
}

/// Time kept back from the agent for collecting and publishing its change, at most; a fifth of the
/// job timeout when that is shorter.
const PUBLISH_RESERVE: Duration = Duration::from_secs(120);
/// How long collecting the change of a job that hit its timeout may take.
const SALVAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long cleanup waits for a sandbox creation still in flight.
const CREATION_WAIT: Duration = Duration::from_secs(120);
const KILL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a job stopped while opening its pull request asks the forge whether it was opened;
/// short, as a shutdown waits for it within its grace.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

fn publish_reserve(job_timeout: Duration) -> Duration {
    PUBLISH_RESERVE.min(job_timeout / 5)
}

/// What the job has spent and left behind so far. `Done` reads it however the job ends, so usage,
/// a pushed branch or an opened pull request are reported after a failure, cancel, timeout or
/// panic too.
#[derive(Debug, Default)]
pub struct Progress {
    pub usage: Vec<Usage>,
    /// The commit the agent's work starts from, once cloned.
    pub base_commit: Option<String>,
    /// Set once the change has been collected.
    pub files_changed: Option<usize>,
    pub branch: Option<String>,
    pub pr_url: Option<String>,
    /// Set as the pull request step begins: what a job stopped during it needs to find out
    /// whether the pull request was opened all the same.
    pub opening: Option<Opening>,
}

/// A pull request being opened.
#[derive(Debug, Clone)]
pub struct Opening {
    pub info: RepoInfo,
    pub pushed: PushedBranch,
    pub title: String,
    pub summary: String,
    pub files_changed: usize,
}

/// Why a job did not succeed.
#[derive(Debug)]
enum Failure {
    Cancelled,
    Failed(JobError),
}

/// What a successful job produced.
#[derive(Debug)]
struct Success {
    pr_url: Option<String>,
    branch: Option<String>,
    summary: String,
    files_changed: usize,
}

/// The agent's observer: its events go to the job's log, and each turn's tokens into the job's
/// progress as soon as the turn is paid for.
struct JobObserver {
    job: Arc<Job>,
}

impl Observer for JobObserver {
    fn event(&self, event: EventKind) {
        self.job.events().emit(event);
    }

    fn usage(&self, provider: &str, model: &str, usage: TokenUsage) {
        crate::telemetry::tokens(provider, model, "input", usage.input_tokens);
        crate::telemetry::tokens(provider, model, "output", usage.output_tokens);
        add_usage(&mut self.job.progress().usage, provider, model, usage);
    }
}

/// Why the job's cancel switch fired: a cancel, or a stop with a reason (the store failed, the
/// job was lost).
fn interrupted(job: &Job) -> Failure {
    match job.stop_reason() {
        Some(err) => Failure::Failed(err),
        None => Failure::Cancelled,
    }
}

/// Runs the job once this instance has claimed it (a slot is free). Always appends `Done`.
pub async fn run(
    job: Arc<Job>,
    backends: Arc<Backends>,
    cancel: CancellationToken,
    cleaner: Arc<Cleaner>,
) {
    let started = job.started_at();
    let events = job.events();
    // Cancelled while it waited in the queue: nothing ran.
    if cancel.is_cancelled() {
        finish(&job, Err(interrupted(&job)));
        return;
    }
    // Waiting in the queue counts towards neither the job timeout nor any step.
    events.emit(EventKind::Status {
        step: Step::Queue,
        state: StepState::Succeeded,
        message: "Started".into(),
        elapsed_ms: Some(started.elapsed().as_millis() as u64),
    });
    let deadline = Instant::now() + backends.job_timeout;
    let lease = SandboxLease::create(backends.sandbox.clone(), job.id().to_owned());
    // `stopped`: the work was dropped where it stood (its timeout, a cancel), not ended by
    // a failure of its own.
    let (result, stopped) = tokio::select! {
        result = tokio::time::timeout_at(deadline, work(&job, &backends, &lease, deadline)) => {
            match result {
                Ok(result) => (result.map_err(Failure::Failed), false),
                Err(_) => (
                    Err(Failure::Failed(JobError {
                        retryable: true,
                        ..JobError::new(
                            ErrorCode::Timeout,
                            format!(
                                "the job did not finish within {} s (JOB_TIMEOUT_SECS)",
                                backends.job_timeout.as_secs()
                            ),
                        )
                    })),
                    true,
                ),
            }
        }
        _ = cancel.cancelled() => (Err(interrupted(&job)), true),
    };
    let result = match result {
        Err(failure) if stopped => settle_opening(&job, &backends, failure).await,
        other => other,
    };
    if let Err(Failure::Failed(err)) = &result {
        if err.code == ErrorCode::Timeout {
            salvage(&job, &backends, &lease).await;
        }
        tracing::warn!(job_id = job.id(), code = %err.code, step = ?err.step, "job failed: {}", err.message);
        events.emit(EventKind::Error {
            code: err.code,
            message: err.message.clone(),
            step: err.step,
            retryable: err.retryable,
        });
    }
    cleanup(&job, &lease, &cleaner, backends.sandbox.name()).await;
    finish(&job, result);
}

/// The steps of a job.
async fn work(
    job: &Arc<Job>,
    b: &Backends,
    lease: &SandboxLease,
    deadline: Instant,
) -> Result<Success, JobError> {
    let events = job.events();
    let request = job.request();
    let forge = b.forges.for_repo(&request.repo);

    // The forge resolves the repository while the sandbox boots. A repository that cannot be used
    // (missing, private, archived) stops the job at once, without waiting for the sandbox.
    let mut step = StepRun::begin(
        events,
        Step::Sandbox,
        format!("Creating a {} sandbox", b.sandbox.name()),
    );
    let prepare = Box::pin(async {
        let info = forge
            .prepare(&request.repo, request.base_branch.as_deref())
            .await?;
        if let Some(branch) = &request.branch {
            forge.check_new_branch(&info, branch).await?;
        }
        Ok::<RepoInfo, crate::forge::ForgeError>(info)
    });
    let (ready, info) = match select(Box::pin(lease.ready()), prepare).await {
        Either::Left((ready, prepare)) => (ready, prepare.await),
        Either::Right((Ok(info), ready)) => (ready.await, Ok(info)),
        Either::Right((Err(err), _)) => {
            step.skip("Stopped: the repository cannot be used");
            let mut step = StepRun::begin(
                events,
                Step::Clone,
                format!("Cloning {}", request.repo.canonical()),
            );
            return Err(step.fail(err));
        }
    };
    let (sandbox, ready_at) = step.check(ready)?;
    // A sandbox that outlives this process is recorded before it is used, so that it can be
    // killed if the process dies.
    if let Some(resource) = sandbox_resource(sandbox.as_ref(), b.sandbox.name()) {
        job.log().record_resource(resource);
        job.log().flushed().await;
    }
    step.succeed_at(ready_at, format!("{} sandbox ready", b.sandbox.name()));

    let mut step = StepRun::begin(
        events,
        Step::Clone,
        format!("Cloning {}", request.repo.canonical()),
    );
    let info = step.check(info)?;
    let spec = CloneSpec {
        url: info.clone_url.clone(),
        branch: info.base_branch.clone(),
        timeout: b.clone_timeout,
    };
    let cloned = step.check(sandbox.clone_repo(&spec).instrument(step.span()).await)?;
    job.progress().base_commit = Some(cloned.head.clone());
    events.emit(EventKind::ToolBash {
        command: format!(
            "git clone --depth 1 --single-branch{} {} repo",
            spec.branch
                .as_ref()
                .map(|b| format!(" --branch {b}"))
                .unwrap_or_default(),
            request.repo.canonical()
        ),
        output: format!("HEAD is now at {} ({})", short(&cloned.head), cloned.branch),
        exit_code: 0,
    });
    step.succeed(format!(
        "Cloned {} at {}",
        cloned.branch,
        short(&cloned.head)
    ));

    let outcome = run_agent(job, b, &sandbox, &cloned, deadline).await?;

    let mut step = StepRun::begin(events, Step::Commit, "Collecting the change");
    let change = step.check(
        change::collect(sandbox.as_ref(), &cloned.head, b.max_change_bytes)
            .instrument(step.span())
            .await,
    )?;
    // Before the change is shown (Diff, patch) or handed to a forge.
    let change = step.check(
        change::refuse_secrets(change, &b.redactor)
            .instrument(step.span())
            .await,
    )?;
    record_change(job, &change);
    if change.files.is_empty() {
        if let AgentEnd::OutOfTime(_) = outcome.end {
            return Err(step.fail(JobError {
                retryable: true,
                ..JobError::new(
                    ErrorCode::Timeout,
                    format!(
                        "the job ran out of time (JOB_TIMEOUT_SECS = {} s) before the agent changed any file",
                        b.job_timeout.as_secs()
                    ),
                )
            }));
        }
        return Err(step.fail(JobError::new(
            ErrorCode::NoChanges,
            format!(
                "the agent finished without changing any file ({})",
                super::pull_request::outcome_text(&outcome)
            ),
        )));
    }
    publish(job, b, forge.as_ref(), &info, &change, &outcome, step).await
}

async fn run_agent(
    job: &Arc<Job>,
    b: &Backends,
    sandbox: &Arc<dyn Sandbox>,
    cloned: &Cloned,
    deadline: Instant,
) -> Result<AgentOutcome, JobError> {
    let request = job.request();
    let mut step = StepRun::begin(
        job.events(),
        Step::Agent,
        format!("Running the agent ({})", b.agent_names().join(" → ")),
    );
    // The agent stops early enough to leave time for collecting and publishing its work.
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(publish_reserve(b.job_timeout));
    let limits = AgentLimits {
        max_wall: b.agent_limits.max_wall.min(budget),
        ..b.agent_limits.clone()
    };
    let observer: Arc<dyn Observer> = Arc::new(JobObserver { job: job.clone() });
    let tools = ToolExecutor::new(sandbox.clone(), observer.clone());
    let transcript = Transcript::new(
        runner::system_prompt(&request.repo.canonical(), &cloned.branch),
        request.prompt.clone(),
    );
    let runner = runner::new_runner(
        b.agents.clone(),
        b.retry.clone(),
        &tools,
        limits,
        observer,
        b.redactor.clone(),
    );
    let outcome = step.check(runner.run(transcript).instrument(step.span()).await)?;
    // Kept so that a later request can continue the conversation.
    if let Ok(json) = serde_json::to_string(&outcome.transcript) {
        job.log().set_transcript(job.events().redact(&json));
    }
    let message = match &outcome.end {
        AgentEnd::Finished => "The agent finished".to_owned(),
        AgentEnd::Stopped => "The agent stopped without calling finish".to_owned(),
        AgentEnd::Budget(why) => format!("The agent stopped early: {why}"),
        AgentEnd::OutOfTime(budget) => format!(
            "The agent stopped early: its time budget of {} s ran out",
            budget.as_secs()
        ),
        AgentEnd::Loop => "The agent stopped: it kept repeating the same call".to_owned(),
        AgentEnd::Refused(why) => {
            return Err(step.fail(JobError::new(
                ErrorCode::AgentRefused,
                format!("The model declined: {why}"),
            )));
        }
    };
    step.succeed(message);
    Ok(outcome)
}

/// Keeps the change for `GET /jobs/{id}/patch` and shows it in a `Diff` event.
fn record_change(job: &Job, change: &ChangeSet) {
    // The patch is served as it is stored: without any configured secret in it.
    job.set_patch(
        Bytes::from(job.events().redact(&change.patch).into_bytes()),
        change.patch_truncated,
    );
    job.events().emit(EventKind::Diff {
        files: change.files.iter().map(|f| f.summary()).collect(),
        patch: crate::text::truncate_middle(&change.patch, 256 * 1024).0,
        patch_truncated: change.patch_truncated || change.patch.len() > 256 * 1024,
    });
    job.progress().files_changed = Some(change.files.len());
}

async fn publish(
    job: &Job,
    b: &Backends,
    forge: &dyn Forge,
    info: &RepoInfo,
    change: &ChangeSet,
    outcome: &AgentOutcome,
    mut step: StepRun<'_>,
) -> Result<Success, JobError> {
    let events = job.events();
    let request = job.request();
    let summary = summary_of(outcome);
    let files_changed = change.files.len();
    if let PublishMode::Skip(reason) = &info.publish {
        step.skip(format!("Not committing: {reason}"));
        skipped(events, Step::Pr, reason.clone());
        return Ok(Success {
            pr_url: None,
            branch: None,
            summary,
            files_changed,
        });
    }
    step.check(b.commit_policy.check(change))?;
    let title = pr_title(outcome, &request.prompt);
    let branch = request
        .branch
        .clone()
        .unwrap_or_else(|| branch_name(&request.prompt, job.id()));
    let message = format!("{title}\n\n{summary}\n\nTiny-Backspace-Job: {}\n", job.id());
    let pushed = step.check(
        forge
            .push_branch(info, change, &branch, &message)
            .instrument(step.span())
            .await,
    )?;
    job.progress().branch = Some(pushed.branch.clone());
    job.log().record_resource(Resource {
        kind: "branch".into(),
        backend: forge.name().into(),
        external_id: pushed.branch.clone(),
        released: false,
    });
    step.succeed(format!(
        "Committed {} as {} on branch {}",
        plural(files_changed, "file"),
        short(&pushed.commit),
        pushed.branch
    ));

    let pr = PullRequestDraft {
        title: title.clone(),
        body: pr_body(&summary, &request.prompt, change, outcome, job.id()),
        draft: request.draft || outcome.partial() || outcome.used_dummy,
    };
    job.progress().opening = Some(Opening {
        info: info.clone(),
        pushed: pushed.clone(),
        title: title.clone(),
        summary: summary.clone(),
        files_changed,
    });
    let mut step = StepRun::begin(events, Step::Pr, "Opening the pull request");
    let opened = step.check(
        forge
            .open_pull_request(info, &pushed, &pr)
            .instrument(step.span())
            .await,
    )?;
    let Some(opened) = opened else {
        step.skip(format!(
            "No pull request for a local repository; branch {} holds the change",
            pushed.branch
        ));
        return Ok(Success {
            pr_url: None,
            branch: Some(pushed.branch),
            summary,
            files_changed,
        });
    };
    job.progress().pr_url = Some(opened.url.clone());
    events.emit(EventKind::PrCreated {
        pr_url: opened.url.clone(),
        number: opened.number,
        branch: pushed.branch.clone(),
        title,
        draft: opened.draft,
    });
    step.succeed(format!("Opened {}", opened.url));
    Ok(Success {
        pr_url: Some(opened.url),
        branch: Some(pushed.branch),
        summary,
        files_changed,
    })
}

/// After the job timeout cut the work short: collects the change the agent made, if it was not
/// collected yet, so its patch stays available.
async fn salvage(job: &Job, b: &Backends, lease: &SandboxLease) {
    let base = {
        let progress = job.progress();
        match (&progress.base_commit, progress.files_changed) {
            (Some(base), None) => base.clone(),
            _ => return,
        }
    };
    let Some(sandbox) = lease.current() else {
        return;
    };
    let mut step = StepRun::begin(
        job.events(),
        Step::Commit,
        "Collecting the change made before the timeout",
    );
    let collected = tokio::time::timeout(SALVAGE_TIMEOUT, async {
        let change = change::collect(sandbox.as_ref(), &base, b.max_change_bytes).await?;
        change::refuse_secrets(change, &b.redactor).await
    })
    .await;
    match collected {
        Ok(Ok(change)) => {
            record_change(job, &change);
            step.succeed(format!(
                "Kept {} in the job's patch",
                plural(change.files.len(), "changed file")
            ));
        }
        Ok(Err(err)) => {
            step.fail(err);
        }
        Err(_) => drop(step),
    }
}

/// A job stopped (cancelled, timed out, interrupted) while its pull request was being opened:
/// the request may have reached the forge before it was dropped. Asks the forge, so that a pull
/// request that exists is reported: a timed-out job whose pull request is open has done its work
/// and succeeds; a cancelled or interrupted one names it in its `Done`.
async fn settle_opening(job: &Job, b: &Backends, failure: Failure) -> Result<Success, Failure> {
    let opening = {
        let progress = job.progress();
        match (&progress.opening, &progress.pr_url) {
            (Some(opening), None) => opening.clone(),
            _ => return Err(failure),
        }
    };
    let forge = b.forges.for_repo(&job.request().repo);
    let mut step = StepRun::begin(
        job.events(),
        Step::Pr,
        "Finding out whether the pull request was opened before the job stopped",
    );
    let found = tokio::time::timeout(
        SETTLE_TIMEOUT,
        forge.find_pull_request(&opening.info, &opening.pushed),
    )
    .instrument(step.span())
    .await;
    let opened = match found {
        Ok(Ok(Some(opened))) => opened,
        Ok(Ok(None)) => {
            step.succeed("No pull request was opened");
            return Err(failure);
        }
        Ok(Err(err)) => {
            step.fail(err);
            return Err(failure);
        }
        Err(_) => {
            step.fail(JobError::new(
                ErrorCode::GithubTimeout,
                format!(
                    "the forge did not answer within {} s",
                    SETTLE_TIMEOUT.as_secs()
                ),
            ));
            return Err(failure);
        }
    };
    job.progress().pr_url = Some(opened.url.clone());
    job.events().emit(EventKind::PrCreated {
        pr_url: opened.url.clone(),
        number: opened.number,
        branch: opening.pushed.branch.clone(),
        title: opening.title,
        draft: opened.draft,
    });
    step.succeed(format!("Opened {}", opened.url));
    match failure {
        Failure::Failed(err) if err.code == ErrorCode::Timeout => Ok(Success {
            pr_url: Some(opened.url),
            branch: Some(opening.pushed.branch),
            summary: opening.summary,
            files_changed: opening.files_changed,
        }),
        other => Err(other),
    }
}

/// Destroys the sandbox. A kill that fails or times out hands the sandbox to the cleaner, which
/// keeps trying after the job has ended.
async fn cleanup(job: &Job, lease: &SandboxLease, cleaner: &Cleaner, backend: &str) {
    let events = job.events();
    let Some(guard) = lease.release(CREATION_WAIT).await else {
        skipped(events, Step::Cleanup, "no sandbox to clean up");
        return;
    };
    let Some(sandbox) = guard.sandbox().cloned() else {
        skipped(events, Step::Cleanup, "no sandbox to clean up");
        return;
    };
    let mut step = StepRun::begin(events, Step::Cleanup, "Destroying the sandbox");
    // Cleanup must finish even when the job itself was cancelled or timed out.
    let outcome =
        match tokio::time::timeout(KILL_TIMEOUT, guard.kill().instrument(step.span())).await {
            Ok(Ok(())) => {
                if let Some(resource) = sandbox_resource(sandbox.as_ref(), backend) {
                    job.log().record_resource(Resource {
                        released: true,
                        ..resource
                    });
                }
                return step.succeed("Sandbox destroyed");
            }
            Ok(Err(err)) => JobError::new(
                err.code(),
                format!("Sandbox cleanup failed: {err}; retrying in the background"),
            ),
            Err(_) => JobError::new(
                ErrorCode::SandboxTransport,
                "Sandbox cleanup timed out; retrying in the background",
            ),
        };
    tracing::error!(error = %outcome.message, "sandbox cleanup failed");
    let resource = sandbox_resource(sandbox.as_ref(), backend);
    cleaner.hand_over(job.id(), Target::Held(sandbox), resource);
    step.fail(outcome);
}

/// The store's record of a sandbox that outlives this process (not yet released); `None` for
/// one that dies with it.
fn sandbox_resource(sandbox: &dyn Sandbox, backend: &str) -> Option<Resource> {
    Some(Resource {
        kind: "sandbox".into(),
        backend: backend.into(),
        external_id: sandbox.resource_id()?,
        released: false,
    })
}

/// Appends the job's one `Done`.
fn finish(job: &Job, result: Result<Success, Failure>) {
    let duration_ms = job.started_at().elapsed().as_millis() as u64;
    let (usage, branch, pr_url, files_changed) = {
        let progress = job.progress();
        (
            progress.usage.clone(),
            progress.branch.clone(),
            progress.pr_url.clone(),
            progress.files_changed.unwrap_or(0),
        )
    };
    // Whatever a failed job left behind is named, so nothing is orphaned silently.
    let left_behind = match (&pr_url, &branch) {
        (Some(url), _) => format!(" It had opened {url}."),
        (None, Some(branch)) => format!(" It had pushed branch {branch}."),
        (None, None) if files_changed > 0 => format!(
            " Its change ({}) is kept at /jobs/{}/patch.",
            plural(files_changed, "file"),
            job.id()
        ),
        (None, None) => String::new(),
    };
    let done = match result {
        Ok(success) => EventKind::Done {
            status: DoneStatus::Succeeded,
            pr_url: success.pr_url,
            branch: success.branch,
            summary: success.summary,
            files_changed: success.files_changed,
            duration_ms,
            usage,
            error: None,
        },
        Err(Failure::Cancelled) => EventKind::Done {
            status: DoneStatus::Cancelled,
            pr_url,
            branch,
            summary: format!("The job was cancelled.{left_behind}"),
            files_changed,
            duration_ms,
            usage,
            error: Some(ErrorInfo {
                code: ErrorCode::Cancelled,
                message: "the job was cancelled".into(),
            }),
        },
        Err(Failure::Failed(err)) => EventKind::Done {
            status: DoneStatus::Failed,
            pr_url,
            branch,
            summary: if left_behind.is_empty() {
                format!("The job failed: {}", err.message)
            } else {
                format!("The job failed: {}.{left_behind}", err.message)
            },
            files_changed,
            duration_ms,
            usage,
            error: Some(ErrorInfo {
                code: err.code,
                message: err.message,
            }),
        },
    };
    if let EventKind::Done { status, .. } = &done {
        crate::telemetry::job_finished(*status);
    }
    job.events().emit(done);
}
