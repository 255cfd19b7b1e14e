//! One job, start to finish: sandbox → clone → agent → diff → commit → pull request → cleanup.
//!
//! [`run`] never returns without having appended exactly one `Done`: errors, cancellation and the
//! job timeout all end in cleanup and `Done`. (A panic is caught one level up, in the registry.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::Emitter;
use super::change::{self, ChangeError};
use super::event::{DoneStatus, ErrorInfo, EventKind, Step, StepState, Usage};
use super::registry::Job;
use crate::agent::retry::RetryPolicy;
use crate::agent::runner::{self, AgentEnd, AgentLimits, AgentOutcome};
use crate::agent::tools::ToolExecutor;
use crate::agent::{Provider, Transcript};
use crate::forge::policy::CommitPolicy;
use crate::forge::{ChangeSet, Forge, Forges, PublishMode, PullRequestDraft, RepoInfo};
use crate::redact::Redactor;
use crate::sandbox::{CloneSpec, SandboxError, SandboxGuard, SandboxProvider};

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
}

impl Backends {
    pub fn agent_names(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.name().to_owned()).collect()
    }
}

/// Why a job did not succeed.
#[derive(Debug, Clone)]
enum Failure {
    Cancelled,
    Failed {
        code: String,
        message: String,
        step: Option<Step>,
        retryable: bool,
    },
}

impl Failure {
    fn at(step: Step, code: impl Into<String>, message: impl Into<String>) -> Self {
        Failure::Failed {
            code: code.into(),
            message: message.into(),
            step: Some(step),
            retryable: false,
        }
    }

    fn sandbox(step: Step, err: &SandboxError) -> Self {
        Failure::Failed {
            code: err.code().into(),
            message: err.to_string(),
            step: Some(step),
            retryable: err.retryable(),
        }
    }
}

/// What a successful job produced.
#[derive(Debug, Default)]
struct Success {
    pr_url: Option<String>,
    branch: Option<String>,
    summary: String,
    files_changed: usize,
}

/// Holds the job's sandbox so cleanup can find it however the work ended, including when the
/// work future was dropped mid-way by cancellation or the timeout, or while the sandbox was still
/// being created.
struct SandboxSlot {
    inner: Mutex<(Option<SandboxGuard>, bool)>,
    /// `true` while a creation is in flight.
    creating: tokio::sync::watch::Sender<bool>,
}

impl Default for SandboxSlot {
    fn default() -> Self {
        Self {
            inner: Mutex::new((None, false)),
            creating: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl SandboxSlot {
    /// Stores a new sandbox; if cleanup already gave up waiting for it, kills it at once.
    fn put(&self, guard: SandboxGuard) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.1 {
            drop(inner);
            drop(guard); // Drop kills it.
        } else {
            inner.0 = Some(guard);
        }
    }

    /// Waits (boundedly) for an in-flight creation, then hands the sandbox over for cleanup.
    async fn take_for_cleanup(&self) -> Option<SandboxGuard> {
        let mut creating = self.creating.subscribe();
        let _ = tokio::time::timeout(
            Duration::from_secs(120),
            creating.wait_for(|in_flight| !in_flight),
        )
        .await;
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.1 = true;
        inner.0.take()
    }
}

struct CreationDone(Arc<SandboxSlot>);

impl Drop for CreationDone {
    fn drop(&mut self) {
        self.0.creating.send_replace(false);
    }
}

/// Per-step timing for `Status` events.
struct Steps<'a> {
    events: &'a Emitter,
}

impl Steps<'_> {
    fn start(&self, step: Step, message: impl Into<String>) -> Instant {
        self.events.emit(EventKind::Status {
            step,
            state: StepState::Started,
            message: message.into(),
            elapsed_ms: None,
        });
        Instant::now()
    }

    fn end(&self, step: Step, state: StepState, started: Instant, message: impl Into<String>) {
        self.events.emit(EventKind::Status {
            step,
            state,
            message: message.into(),
            elapsed_ms: Some(started.elapsed().as_millis() as u64),
        });
    }

    fn skip(&self, step: Step, message: impl Into<String>) {
        self.events.emit(EventKind::Status {
            step,
            state: StepState::Skipped,
            message: message.into(),
            elapsed_ms: None,
        });
    }
}

/// Runs the job after it left the queue. Always appends `Done`.
pub async fn run(
    job: Arc<Job>,
    backends: Arc<Backends>,
    cancel: CancellationToken,
    slots: Arc<Semaphore>,
) {
    let started = job.started_at();
    let events = job.emitter();
    let slot = Arc::new(SandboxSlot::default());
    let usage = Arc::new(Mutex::new(Vec::<Usage>::new()));
    // Waiting in the queue counts towards neither the job timeout nor any step.
    let permit = tokio::select! {
        permit = slots.acquire_owned() => permit.ok(),
        _ = cancel.cancelled() => None,
    };
    let result = match permit {
        None => Err(Failure::Cancelled),
        Some(_permit) => {
            events.emit(EventKind::Status {
                step: Step::Queue,
                state: StepState::Succeeded,
                message: "Started".into(),
                elapsed_ms: Some(started.elapsed().as_millis() as u64),
            });
            let work = work(&job, &backends, &slot, &usage);
            let result = tokio::select! {
                result = work => result,
                _ = cancel.cancelled() => Err(Failure::Cancelled),
                _ = tokio::time::sleep(backends.job_timeout) => Err(Failure::Failed {
                    code: "timeout".into(),
                    message: format!("the job did not finish within {} s (JOB_TIMEOUT_SECS)", backends.job_timeout.as_secs()),
                    step: None,
                    retryable: true,
                }),
            };
            result
        }
    };
    if let Err(Failure::Failed {
        code,
        message,
        step,
        retryable,
    }) = &result
    {
        tracing::warn!(job_id = events.job_id(), code = %code, step = ?step, "job failed: {message}");
        events.emit(EventKind::Error {
            code: code.clone(),
            message: message.clone(),
            step: *step,
            retryable: *retryable,
        });
    }
    cleanup(&events, &slot).await;
    let usage = usage.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let duration_ms = started.elapsed().as_millis() as u64;
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
            pr_url: None,
            branch: None,
            summary: "The job was cancelled.".into(),
            files_changed: 0,
            duration_ms,
            usage,
            error: Some(ErrorInfo {
                code: "cancelled".into(),
                message: "the job was cancelled".into(),
            }),
        },
        Err(Failure::Failed { code, message, .. }) => EventKind::Done {
            status: DoneStatus::Failed,
            pr_url: None,
            branch: None,
            summary: format!("The job failed: {message}"),
            files_changed: 0,
            duration_ms,
            usage,
            error: Some(ErrorInfo { code, message }),
        },
    };
    events.emit(done);
}

async fn cleanup(events: &Emitter, slot: &SandboxSlot) {
    let steps = Steps { events };
    let Some(guard) = slot.take_for_cleanup().await else {
        steps.skip(Step::Cleanup, "no sandbox to clean up");
        return;
    };
    let t = steps.start(Step::Cleanup, "Destroying the sandbox");
    // Cleanup must finish even when the job itself was cancelled or timed out.
    match tokio::time::timeout(Duration::from_secs(60), guard.kill()).await {
        Ok(Ok(())) => steps.end(Step::Cleanup, StepState::Succeeded, t, "Sandbox destroyed"),
        Ok(Err(err)) => {
            tracing::error!(job_id = events.job_id(), error = %err, "sandbox cleanup failed");
            steps.end(
                Step::Cleanup,
                StepState::Failed,
                t,
                format!("Sandbox cleanup failed: {err}"),
            );
        }
        Err(_) => steps.end(
            Step::Cleanup,
            StepState::Failed,
            t,
            "Sandbox cleanup timed out",
        ),
    }
}

async fn work(
    job: &Job,
    b: &Backends,
    slot: &Arc<SandboxSlot>,
    usage_out: &Mutex<Vec<Usage>>,
) -> Result<Success, Failure> {
    let events = job.emitter();
    let steps = Steps { events: &events };
    let request = job.request();
    let forge = b.forges.for_repo(&request.repo);

    // The forge learns the base branch and commit while the sandbox boots: two independent
    // round trips, taken at the same time. Its result is reported in the clone step.
    let prepared = forge.prepare(&request.repo, request.base_branch.as_deref());

    // Sandbox: created in its own task so that a cancellation mid-creation still hands the
    // sandbox to cleanup instead of leaking it.
    let t = steps.start(
        Step::Sandbox,
        format!("Creating a {} sandbox", b.sandbox.name()),
    );
    let (sandbox, prepared) = {
        let provider = b.sandbox.clone();
        let slot = slot.clone();
        let job_id = job.id().to_owned();
        slot.creating.send_replace(true);
        let created = tokio::spawn(async move {
            // Clears the in-flight flag however this task ends, a panic included.
            let _creating = CreationDone(slot.clone());
            let result = provider.create(&job_id).await;
            if let Ok(sandbox) = &result {
                slot.put(SandboxGuard::new(sandbox.clone()));
            }
            (result, Instant::now())
        });
        let (created, prepared) = tokio::join!(created, prepared);
        let (created, ready_at) = match created {
            Ok((result, at)) => (Ok(result), at),
            Err(join) => (Err(join), Instant::now()),
        };
        let sandbox = match created {
            Ok(Ok(sandbox)) => sandbox,
            Ok(Err(err)) => {
                steps.end(Step::Sandbox, StepState::Failed, t, err.to_string());
                return Err(Failure::sandbox(Step::Sandbox, &err));
            }
            Err(join) => {
                steps.end(
                    Step::Sandbox,
                    StepState::Failed,
                    t,
                    "sandbox creation crashed",
                );
                return Err(Failure::at(
                    Step::Sandbox,
                    "internal",
                    format!("sandbox creation crashed: {join}"),
                ));
            }
        };
        // The step took until the sandbox was ready, not until `prepare` answered too.
        events.emit(EventKind::Status {
            step: Step::Sandbox,
            state: StepState::Succeeded,
            message: format!("{} sandbox ready", b.sandbox.name()),
            elapsed_ms: Some(ready_at.duration_since(t).as_millis() as u64),
        });
        (sandbox, prepared)
    };

    // Clone.
    let t = steps.start(Step::Clone, format!("Cloning {}", request.repo.canonical()));
    let info = match prepared {
        Ok(info) => info,
        Err(err) => {
            steps.end(Step::Clone, StepState::Failed, t, err.message.clone());
            return Err(Failure::Failed {
                code: err.code.into(),
                message: err.message,
                step: Some(Step::Clone),
                retryable: err.retryable,
            });
        }
    };
    let spec = CloneSpec {
        url: info.clone_url.clone(),
        branch: info.base_branch.clone(),
        timeout: b.clone_timeout,
    };
    let cloned = match sandbox.clone_repo(&spec).await {
        Ok(cloned) => cloned,
        Err(err) => {
            steps.end(Step::Clone, StepState::Failed, t, err.to_string());
            return Err(Failure::sandbox(Step::Clone, &err));
        }
    };
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
    steps.end(
        Step::Clone,
        StepState::Succeeded,
        t,
        format!("Cloned {} at {}", cloned.branch, short(&cloned.head)),
    );

    // Agent.
    let t = steps.start(
        Step::Agent,
        format!("Running the agent ({})", b.agent_names().join(" → ")),
    );
    let tools = ToolExecutor::new(sandbox.clone(), events.clone());
    let transcript = Transcript::new(
        runner::system_prompt(&request.repo.canonical(), &cloned.branch),
        request.prompt.clone(),
    );
    let runner = runner::new_runner(
        b.agents.clone(),
        b.retry.clone(),
        &tools,
        b.agent_limits.clone(),
        events.clone(),
    );
    let outcome = match runner.run(transcript).await {
        Ok(outcome) => outcome,
        Err(runner::AgentError::Sandbox(err)) => {
            steps.end(Step::Agent, StepState::Failed, t, err.to_string());
            return Err(Failure::sandbox(Step::Agent, &err));
        }
        Err(err @ runner::AgentError::Provider(_)) => {
            steps.end(Step::Agent, StepState::Failed, t, err.to_string());
            return Err(Failure::at(Step::Agent, "agent_failed", err.to_string()));
        }
    };
    *usage_out.lock().unwrap_or_else(|e| e.into_inner()) = outcome.usage.clone();
    let agent_message = match &outcome.end {
        AgentEnd::Finished => "The agent finished".to_owned(),
        AgentEnd::Stopped => "The agent stopped without calling finish".to_owned(),
        AgentEnd::Budget(why) => format!("The agent stopped early: {why}"),
        AgentEnd::Loop => "The agent stopped: it kept repeating the same call".to_owned(),
        AgentEnd::Refused(why) => format!("The model declined: {why}"),
    };
    if let AgentEnd::Refused(why) = &outcome.end {
        steps.end(Step::Agent, StepState::Failed, t, agent_message.clone());
        return Err(Failure::at(Step::Agent, "agent_refused", why.clone()));
    }
    steps.end(Step::Agent, StepState::Succeeded, t, agent_message);

    // Diff.
    let t = steps.start(Step::Commit, "Collecting the change");
    let change = match change::collect(sandbox.as_ref(), &cloned.head).await {
        Ok(change) => change,
        Err(ChangeError::Sandbox(err)) => {
            steps.end(Step::Commit, StepState::Failed, t, err.to_string());
            return Err(Failure::sandbox(Step::Commit, &err));
        }
        Err(ChangeError::Git(message)) => {
            steps.end(Step::Commit, StepState::Failed, t, message.clone());
            return Err(Failure::at(Step::Commit, "diff_failed", message));
        }
    };
    job.set_patch(change.patch.clone(), change.patch_truncated);
    events.emit(EventKind::Diff {
        files: change.files.iter().map(|f| f.summary()).collect(),
        patch: crate::text::truncate_middle(&change.patch, 256 * 1024).0,
        patch_truncated: change.patch_truncated || change.patch.len() > 256 * 1024,
    });
    if change.files.is_empty() {
        steps.end(
            Step::Commit,
            StepState::Failed,
            t,
            "The agent changed no files",
        );
        return Err(Failure::at(
            Step::Agent,
            "no_changes",
            format!(
                "the agent finished without changing any file ({})",
                outcome_text(&outcome)
            ),
        ));
    }
    publish(job, b, forge.as_ref(), &info, &change, &outcome, &steps, t).await
}

#[allow(clippy::too_many_arguments)]
async fn publish(
    job: &Job,
    b: &Backends,
    forge: &dyn Forge,
    info: &RepoInfo,
    change: &ChangeSet,
    outcome: &AgentOutcome,
    steps: &Steps<'_>,
    t: Instant,
) -> Result<Success, Failure> {
    let request = job.request();
    let summary = summary_of(outcome);
    let files_changed = change.files.len();
    if let PublishMode::Skip(reason) = &info.publish {
        steps.end(
            Step::Commit,
            StepState::Skipped,
            t,
            format!("Not committing: {reason}"),
        );
        steps.skip(Step::Pr, reason.clone());
        return Ok(Success {
            pr_url: None,
            branch: None,
            summary,
            files_changed,
        });
    }
    if let Err(err) = b.commit_policy.check(change) {
        steps.end(Step::Commit, StepState::Failed, t, err.message.clone());
        return Err(Failure::Failed {
            code: err.code.into(),
            message: err.message,
            step: Some(Step::Commit),
            retryable: false,
        });
    }
    let title = pr_title(outcome, &request.prompt);
    let branch = request
        .branch
        .clone()
        .unwrap_or_else(|| branch_name(&request.prompt, job.id()));
    let message = format!("{title}\n\n{summary}\n\nTiny-Backspace-Job: {}\n", job.id());
    let pushed = match forge.push_branch(info, change, &branch, &message).await {
        Ok(pushed) => pushed,
        Err(err) => {
            steps.end(Step::Commit, StepState::Failed, t, err.message.clone());
            return Err(Failure::Failed {
                code: err.code.into(),
                message: err.message,
                step: Some(Step::Commit),
                retryable: err.retryable,
            });
        }
    };
    steps.end(
        Step::Commit,
        StepState::Succeeded,
        t,
        format!(
            "Committed {} as {} on branch {}",
            plural(files_changed, "file"),
            short(&pushed.commit),
            pushed.branch
        ),
    );

    let draft = request.draft || outcome.partial() || outcome.used_dummy;
    let pr = PullRequestDraft {
        title: title.clone(),
        body: pr_body(&summary, &request.prompt, change, outcome, job.id()),
        draft,
    };
    let t = steps.start(Step::Pr, "Opening the pull request");
    match forge.open_pull_request(info, &pushed, &pr).await {
        Ok(Some(opened)) => {
            job.emitter().emit(EventKind::PrCreated {
                pr_url: opened.url.clone(),
                number: opened.number,
                branch: pushed.branch.clone(),
                title,
                draft: opened.draft,
            });
            steps.end(
                Step::Pr,
                StepState::Succeeded,
                t,
                format!("Opened {}", opened.url),
            );
            Ok(Success {
                pr_url: Some(opened.url),
                branch: Some(pushed.branch),
                summary,
                files_changed,
            })
        }
        Ok(None) => {
            steps.end(
                Step::Pr,
                StepState::Skipped,
                t,
                format!(
                    "No pull request for a local repository; branch {} holds the change",
                    pushed.branch
                ),
            );
            Ok(Success {
                pr_url: None,
                branch: Some(pushed.branch),
                summary,
                files_changed,
            })
        }
        Err(err) => {
            steps.end(Step::Pr, StepState::Failed, t, err.message.clone());
            Err(Failure::Failed {
                code: err.code.into(),
                message: err.message,
                step: Some(Step::Pr),
                retryable: err.retryable,
            })
        }
    }
}

fn short(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn outcome_text(outcome: &AgentOutcome) -> String {
    outcome
        .finish
        .as_ref()
        .map(|f| f.summary.clone())
        .unwrap_or_else(|| outcome.last_text.clone())
        .chars()
        .take(500)
        .collect()
}

fn summary_of(outcome: &AgentOutcome) -> String {
    let text = outcome_text(outcome);
    if text.trim().is_empty() {
        "The agent made the change described in the request.".into()
    } else {
        text
    }
}

fn pr_title(outcome: &AgentOutcome, prompt: &str) -> String {
    let title = outcome
        .finish
        .as_ref()
        .map(|f| f.title.trim().to_owned())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| prompt.lines().next().unwrap_or("Change").trim().to_owned());
    let mut title: String = title.chars().take(72).collect();
    if outcome.partial() {
        title = format!("[partial] {title}");
    }
    title
}

/// `tiny-backspace/<slug>-<short id>`: readable, and unique per job.
pub fn branch_name(prompt: &str, job_id: &str) -> String {
    let mut slug = String::new();
    for word in prompt
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .take(6)
    {
        if slug.len() + word.len() > 40 {
            break;
        }
        if !slug.is_empty() {
            slug.push('-');
        }
        slug.push_str(&word.to_ascii_lowercase());
    }
    if slug.is_empty() {
        slug.push_str("change");
    }
    let short_id: String = job_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("tiny-backspace/{slug}-{short_id}")
}

fn pr_body(
    summary: &str,
    prompt: &str,
    change: &ChangeSet,
    outcome: &AgentOutcome,
    job_id: &str,
) -> String {
    let mut body = String::new();
    body.push_str(summary.trim());
    body.push_str("\n\n## Request\n\n");
    for line in prompt.trim().lines() {
        body.push_str("> ");
        body.push_str(line);
        body.push('\n');
    }
    body.push_str("\n## Files changed\n\n| File | Change | + | − |\n|---|---|---:|---:|\n");
    for file in &change.files {
        let status = match file.status {
            super::event::FileStatus::Added => "added",
            super::event::FileStatus::Modified => "modified",
            super::event::FileStatus::Deleted => "deleted",
            super::event::FileStatus::Renamed => "renamed",
        };
        body.push_str(&format!(
            "| `{}` | {status} | {} | {} |\n",
            file.path.as_str().replace('|', "\\|"),
            file.additions,
            file.deletions
        ));
    }
    let mut notes = Vec::new();
    if outcome.used_dummy {
        notes.push("This change was made by the built-in **dummy agent**, because no model provider was available. Review it as a placeholder.".to_owned());
    }
    match &outcome.end {
        AgentEnd::Finished => {}
        AgentEnd::Stopped => notes.push(
            "The agent stopped without saying it was done; this may be **partial work**.".into(),
        ),
        AgentEnd::Budget(why) => notes.push(format!("This is **partial work**: {why}.")),
        AgentEnd::Loop => notes.push(
            "This is **partial work**: the agent kept repeating itself and was stopped.".into(),
        ),
        AgentEnd::Refused(_) => {}
    }
    if !notes.is_empty() {
        body.push_str("\n## Notes\n\n");
        for note in notes {
            body.push_str(&format!("- {note}\n"));
        }
    }
    body.push_str(&format!(
        "\n---\nOpened by Tiny Backspace (job `{job_id}`).\n"
    ));
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_names_are_slugged_and_unique_per_job() {
        assert_eq!(
            branch_name(
                "Add input validation to all POST endpoints!",
                "3f2a9c1e-77aa"
            ),
            "tiny-backspace/add-input-validation-to-all-post-3f2a9c1e"
        );
        assert_eq!(branch_name("¿¿", "abc"), "tiny-backspace/change-abc");
    }
}
