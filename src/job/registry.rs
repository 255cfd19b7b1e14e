//! The jobs this process knows: admission (concurrency limit + bounded queue), lookup, cancel,
//! retention of finished jobs, and the supervisor that guarantees `Done` even after a panic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::event::{DoneStatus, ErrorInfo, EventKind, Step, StepState};
use super::pipeline::{self, Backends};
use super::{Emitter, EventLog};
use crate::repo::RepoRef;

/// A validated request to run a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRequest {
    pub repo: RepoRef,
    pub prompt: String,
    pub base_branch: Option<String>,
    pub draft: bool,
    pub branch: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_concurrent: usize,
    pub max_queued: usize,
    /// How long a finished job stays queryable.
    pub retention: Duration,
    /// How many finished jobs are kept at most.
    pub max_retained: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            max_queued: 16,
            retention: Duration::from_secs(3600),
            max_retained: 500,
        }
    }
}

/// One job: its request, its event log and its cancel switch.
pub struct Job {
    id: String,
    request: JobRequest,
    created_at_ms: u64,
    created: Instant,
    emitter: Emitter,
    cancel: CancellationToken,
    patch: OnceLock<(String, bool)>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Job {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn request(&self) -> &JobRequest {
        &self.request
    }

    pub fn created_at_ms(&self) -> u64 {
        self.created_at_ms
    }

    pub fn started_at(&self) -> Instant {
        self.created
    }

    pub fn log(&self) -> &EventLog {
        self.emitter.log()
    }

    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    pub fn is_finished(&self) -> bool {
        self.log().is_closed()
    }

    /// The full patch, once the agent has finished.
    pub fn patch(&self) -> Option<&(String, bool)> {
        self.patch.get()
    }

    pub(super) fn set_patch(&self, patch: String, truncated: bool) {
        let _ = self.patch.set((patch, truncated));
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(
        "the service is at its job limit ({running} running, {queued} queued); try again later"
    )]
    Busy {
        running: usize,
        queued: usize,
        retry_after: Duration,
    },
    #[error("the service is shutting down")]
    ShuttingDown,
}

pub struct JobRegistry {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    slots: Arc<Semaphore>,
    backends: Arc<Backends>,
    limits: Limits,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

impl JobRegistry {
    pub fn new(backends: Arc<Backends>, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            jobs: Mutex::new(HashMap::new()),
            slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            backends,
            limits,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    pub fn backends(&self) -> &Arc<Backends> {
        &self.backends
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a job and starts it, or refuses when the limit and the queue are full.
    pub fn submit(self: &Arc<Self>, request: JobRequest) -> Result<Arc<Job>, SubmitError> {
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let job = {
            let mut jobs = self.lock();
            self.prune(&mut jobs);
            let active = jobs.values().filter(|j| !j.is_finished()).count();
            let capacity = self.limits.max_concurrent + self.limits.max_queued;
            if active >= capacity {
                let running = active.min(self.limits.max_concurrent);
                return Err(SubmitError::Busy {
                    running,
                    queued: active - running,
                    retry_after: Duration::from_secs(30),
                });
            }
            let log = EventLog::new();
            let job = Arc::new(Job {
                id: id.clone(),
                request,
                created_at_ms: crate::now_ms(),
                created: Instant::now(),
                emitter: Emitter::new(log, self.backends.redactor.clone(), id.clone()),
                cancel: self.shutdown.child_token(),
                patch: OnceLock::new(),
            });
            jobs.insert(id.clone(), job.clone());
            let ahead = active.saturating_sub(self.slots.available_permits().min(active));
            (job, ahead)
        };
        let (job, ahead) = job;
        let events = job.emitter();
        events.emit(EventKind::JobStarted {
            job_id: job.id.clone(),
            repo_url: job.request.repo.canonical(),
            prompt: job.request.prompt.clone(),
            sandbox: self.backends.sandbox.name().to_owned(),
            agents: self.backends.agent_names(),
            forge: self
                .backends
                .forges
                .for_repo(&job.request.repo)
                .name()
                .to_owned(),
        });
        events.emit(EventKind::Status {
            step: Step::Queue,
            state: StepState::Started,
            message: if ahead == 0 {
                "Queued".into()
            } else {
                format!("Queued behind {ahead} job(s)")
            },
            elapsed_ms: None,
        });
        tracing::info!(job_id = %job.id, repo = %job.request.repo.canonical(), "job accepted");
        let supervisor = {
            let job = job.clone();
            let backends = self.backends.clone();
            let slots = self.slots.clone();
            async move {
                // Every log line of the job (providers, sandbox, forge) carries its id.
                let span = tracing::info_span!("job", job_id = %job.id);
                let work = tokio::spawn(
                    pipeline::run(job.clone(), backends, job.cancel.clone(), slots)
                        .instrument(span),
                );
                if let Err(err) = work.await {
                    // The pipeline task panicked (or was aborted): its sandbox guard has been
                    // dropped, which kills the sandbox; still owe the client a Done.
                    tracing::error!(job_id = %job.id, error = %err, "job task crashed");
                    let events = job.emitter();
                    if !events.log().is_closed() {
                        let message =
                            "the job crashed unexpectedly; its sandbox was destroyed".to_owned();
                        events.emit(EventKind::Error {
                            code: "internal".into(),
                            message: message.clone(),
                            step: None,
                            retryable: true,
                        });
                        events.emit(EventKind::Done {
                            status: DoneStatus::Failed,
                            pr_url: None,
                            branch: None,
                            summary: format!("The job failed: {message}"),
                            files_changed: 0,
                            duration_ms: job.created.elapsed().as_millis() as u64,
                            usage: vec![],
                            error: Some(ErrorInfo {
                                code: "internal".into(),
                                message,
                            }),
                        });
                    }
                }
                match job.log().last().map(|last| last.event.kind) {
                    Some(EventKind::Done {
                        status,
                        duration_ms,
                        files_changed,
                        error,
                        ..
                    }) => {
                        tracing::info!(
                            job_id = %job.id,
                            status = ?status,
                            duration_ms,
                            files_changed,
                            error = error.map(|e| e.code).unwrap_or_default(),
                            "job finished"
                        );
                    }
                    _ => tracing::error!(job_id = %job.id, "job ended without Done"),
                }
            }
        };
        self.tasks.spawn(supervisor);
        Ok(job)
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        let mut jobs = self.lock();
        self.prune(&mut jobs);
        jobs.get(id).cloned()
    }

    /// Jobs not yet finished.
    pub fn active(&self) -> usize {
        self.lock().values().filter(|j| !j.is_finished()).count()
    }

    /// Drops finished jobs past their retention time, then the oldest beyond the count limit.
    fn prune(&self, jobs: &mut HashMap<String, Arc<Job>>) {
        let now = crate::now_ms();
        let retention = self.limits.retention.as_millis() as u64;
        jobs.retain(|_, job| match job.log().last() {
            Some(last) if last.event.kind.is_done() => {
                now.saturating_sub(last.event.timestamp) < retention
            }
            _ => true,
        });
        let mut finished: Vec<(u64, String)> = jobs
            .values()
            .filter(|j| j.is_finished())
            .map(|j| (j.created_at_ms, j.id.clone()))
            .collect();
        if finished.len() > self.limits.max_retained {
            finished.sort();
            let excess = finished.len() - self.limits.max_retained;
            for (_, id) in finished.into_iter().take(excess) {
                jobs.remove(&id);
            }
        }
    }

    /// Cancels every job and waits (boundedly) for them to clean up.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown.cancel();
        self.tasks.close();
        if tokio::time::timeout(grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some jobs did not finish cleaning up before shutdown");
        }
    }
}
