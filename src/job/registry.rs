//! The jobs this process knows: admission (concurrency limit + bounded queue), lookup, cancel,
//! retention of finished jobs, and the supervisor that guarantees `Done` even after a panic.
//!
//! Lookups are a hash-map get under a short lock. Pruning finished jobs (by age, count and bytes)
//! runs on a timer and when a job finishes, never on a request's path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::cleaner::Cleaner;
use super::pipeline::{self, Backends, Progress};
use super::{Emitter, EventLog};
use crate::event::{DoneStatus, ErrorCode, ErrorInfo, EventKind, Step, StepState};
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
    /// How many bytes (events as JSON, plus patches) finished jobs may hold in all.
    pub max_retained_bytes: usize,
    /// Running-or-queued jobs one API key may hold (`MAX_JOBS_PER_KEY`); `None`: no limit.
    pub max_jobs_per_key: Option<usize>,
    /// Jobs one API key may submit per minute (`KEY_RATE_PER_MIN`); `None`: no limit.
    pub key_rate_per_min: Option<usize>,
    /// The first wait before a failed sandbox kill is tried again (it doubles, up to a minute).
    pub cleanup_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_concurrent: 4,
            max_queued: 16,
            retention: Duration::from_secs(168 * 3600),
            max_retained: 500,
            max_retained_bytes: 256 * 1024 * 1024,
            max_jobs_per_key: None,
            key_rate_per_min: None,
            cleanup_backoff: Duration::from_secs(2),
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
    patch: OnceLock<(Bytes, bool)>,
    /// The id of the API key that created the job; `None` when the API is open.
    owner: Option<String>,
    /// What the job has spent and left behind so far, for `Done` on every path.
    pub(super) progress: Mutex<Progress>,
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

    /// The id of the API key that created the job, if keys are in use.
    pub fn owner(&self) -> Option<&str> {
        self.owner.as_deref()
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

    /// Where the job's events go.
    pub fn events(&self) -> &Emitter {
        &self.emitter
    }

    pub fn is_finished(&self) -> bool {
        self.log().is_closed()
    }

    /// The full patch, once the agent has finished. `Bytes`, so serving it never copies it.
    pub fn patch(&self) -> Option<&(Bytes, bool)> {
        self.patch.get()
    }

    pub(super) fn set_patch(&self, patch: Bytes, truncated: bool) {
        let _ = self.patch.set((patch, truncated));
    }

    /// Memory the job holds: its events as JSON and its patch.
    pub fn bytes(&self) -> usize {
        self.log().bytes() + self.patch.get().map_or(0, |(p, _)| p.len())
    }

    pub(super) fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
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
    #[error("this API key already has {active} jobs running or queued (MAX_JOBS_PER_KEY)")]
    KeyBusy {
        active: usize,
        retry_after: Duration,
    },
    #[error("this API key submitted {count} jobs in the last minute (KEY_RATE_PER_MIN)")]
    KeyRate { count: usize, retry_after: Duration },
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// What one API key is using: its unfinished jobs and its submissions of the last minute.
#[derive(Debug, Default)]
struct KeyUse {
    active: usize,
    recent: std::collections::VecDeque<Instant>,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

/// How often finished jobs past their retention are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

pub struct JobRegistry {
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    /// Jobs admitted and not yet finished.
    active: AtomicUsize,
    /// Per API key id, for `MAX_JOBS_PER_KEY` and `KEY_RATE_PER_MIN`.
    keys: Mutex<HashMap<String, KeyUse>>,
    /// Sandboxes whose kill failed, still being killed.
    cleaner: Arc<Cleaner>,
    slots: Arc<Semaphore>,
    backends: Arc<Backends>,
    limits: Limits,
    tasks: TaskTracker,
    /// Cancelled when shutdown begins: every job is cancelled with it.
    shutdown: CancellationToken,
    /// Cancelled when shutdown has ended (jobs finished or the grace ran out): open event streams
    /// end then, even one whose job never wrote `Done`.
    stopped: CancellationToken,
}

impl JobRegistry {
    pub fn new(backends: Arc<Backends>, limits: Limits) -> Arc<Self> {
        let registry = Arc::new(Self {
            jobs: Mutex::new(HashMap::new()),
            active: AtomicUsize::new(0),
            keys: Mutex::new(HashMap::new()),
            cleaner: Arc::new(Cleaner::new(limits.cleanup_backoff)),
            slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            backends,
            limits,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&registry);
            let stopped = registry.stopped.clone();
            runtime.spawn(prune_periodically(weak, stopped));
        }
        registry
    }

    /// Cancelled once shutdown has finished; event streams end with it.
    pub fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    pub fn backends(&self) -> &Arc<Backends> {
        &self.backends
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a job and starts it, or refuses when the limit and the queue are full.
    pub fn submit(self: &Arc<Self>, request: JobRequest) -> Result<Arc<Job>, SubmitError> {
        self.submit_as(request, None)
    }

    /// [`JobRegistry::submit`] for the API key whose id is `owner`: only that key (and admin
    /// keys) will see the job. Configured secrets in the prompt are redacted first, so no key
    /// reaches the model, an event or `GET /jobs/{id}`.
    pub fn submit_as(
        self: &Arc<Self>,
        mut request: JobRequest,
        owner: Option<String>,
    ) -> Result<Arc<Job>, SubmitError> {
        if !self.backends.redactor.is_empty() {
            request.prompt = self.backends.redactor.redact(&request.prompt);
        }
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(owner) = &owner {
            self.admit_key(owner)?;
        }
        let id = uuid::Uuid::new_v4().to_string();
        let capacity = self.limits.max_concurrent + self.limits.max_queued;
        // Reserve a place first, so that concurrent submissions cannot overshoot the capacity.
        let admitted = self
            .active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < capacity).then_some(n + 1)
            });
        let active = match admitted {
            Ok(before) => before,
            Err(active) => {
                if let Some(owner) = &owner {
                    self.release_key(owner);
                }
                let running = active.min(self.limits.max_concurrent);
                return Err(SubmitError::Busy {
                    running,
                    queued: active - running,
                    retry_after: Duration::from_secs(30),
                });
            }
        };
        let job = {
            let mut jobs = self.lock();
            let log = EventLog::new();
            let job = Arc::new(Job {
                id: id.clone(),
                request,
                created_at_ms: crate::now_ms(),
                created: Instant::now(),
                emitter: Emitter::new(log, self.backends.redactor.clone(), id.clone()),
                cancel: self.shutdown.child_token(),
                patch: OnceLock::new(),
                owner,
                progress: Mutex::new(Progress::default()),
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
            let cleaner = self.cleaner.clone();
            let registry = Arc::downgrade(self);
            async move {
                // Every log line of the job (providers, sandbox, forge) carries its id.
                let span = tracing::info_span!("job", job_id = %job.id);
                let work = tokio::spawn(
                    pipeline::run(job.clone(), backends, job.cancel.clone(), slots, cleaner)
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
                        let (usage, branch, pr_url) = {
                            let progress = job.progress();
                            (
                                progress.usage.clone(),
                                progress.branch.clone(),
                                progress.pr_url.clone(),
                            )
                        };
                        events.emit(EventKind::Error {
                            code: ErrorCode::Internal,
                            message: message.clone(),
                            step: None,
                            retryable: true,
                        });
                        events.emit(EventKind::Done {
                            status: DoneStatus::Failed,
                            pr_url,
                            branch,
                            summary: format!("The job failed: {message}"),
                            files_changed: 0,
                            duration_ms: job.created.elapsed().as_millis() as u64,
                            usage,
                            error: Some(ErrorInfo {
                                code: ErrorCode::Internal,
                                message,
                            }),
                        });
                    }
                }
                let summary = job.log().summary();
                if job.is_finished() {
                    tracing::info!(
                        job_id = %job.id,
                        state = ?summary.state,
                        duration_ms = job.created.elapsed().as_millis() as u64,
                        files = summary.files.as_ref().map_or(0, Vec::len),
                        error = summary.error.map(|e| e.code.as_str()).unwrap_or_default(),
                        "job finished"
                    );
                } else {
                    tracing::error!(job_id = %job.id, "job ended without Done");
                }
                if let Some(registry) = registry.upgrade() {
                    registry.active.fetch_sub(1, Ordering::AcqRel);
                    if let Some(owner) = job.owner() {
                        registry.release_key(owner);
                    }
                    registry.prune();
                }
            }
        };
        self.tasks.spawn(supervisor);
        Ok(job)
    }

    /// Counts a submission against its key's limits, or says when to come back. Only accepted
    /// submissions count towards the rate.
    fn admit_key(&self, owner: &str) -> Result<(), SubmitError> {
        let (max_jobs, per_minute) = (self.limits.max_jobs_per_key, self.limits.key_rate_per_min);
        if max_jobs.is_none() && per_minute.is_none() {
            return Ok(());
        }
        let now = Instant::now();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let key = keys.entry(owner.to_owned()).or_default();
        while key
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= RATE_WINDOW)
        {
            key.recent.pop_front();
        }
        if let Some(limit) = per_minute
            && key.recent.len() >= limit
        {
            let oldest = key.recent.front().copied().unwrap_or(now);
            return Err(SubmitError::KeyRate {
                count: key.recent.len(),
                retry_after: (RATE_WINDOW.saturating_sub(now.duration_since(oldest)))
                    .max(Duration::from_secs(1)),
            });
        }
        if let Some(limit) = max_jobs
            && key.active >= limit
        {
            return Err(SubmitError::KeyBusy {
                active: key.active,
                retry_after: Duration::from_secs(30),
            });
        }
        key.recent.push_back(now);
        key.active += 1;
        Ok(())
    }

    fn release_key(&self, owner: &str) {
        if self.limits.max_jobs_per_key.is_none() && self.limits.key_rate_per_min.is_none() {
            return;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = keys.get_mut(owner) {
            key.active = key.active.saturating_sub(1);
            if key.active == 0 && key.recent.is_empty() {
                keys.remove(owner);
            }
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Job>> {
        self.lock().get(id).cloned()
    }

    /// Sandboxes whose kill failed and is still being retried.
    pub fn cleanup_pending(&self) -> usize {
        self.cleaner.pending()
    }

    /// Jobs admitted and not yet finished.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Jobs running and jobs queued, now.
    pub fn load(&self) -> (usize, usize) {
        let active = self.active();
        let running = active.min(self.limits.max_concurrent);
        (running, active - running)
    }

    /// Drops finished jobs past their retention time, then the oldest until both the count and
    /// the byte limits hold. Runs on a timer and whenever a job finishes.
    pub fn prune(&self) {
        let mut jobs = self.lock();
        let now = crate::now_ms();
        let retention = self.limits.retention.as_millis() as u64;
        // (finished at, created at, id, bytes) of every finished job.
        let mut finished: Vec<(u64, u64, String, usize)> = jobs
            .values()
            .filter_map(|job| {
                let at = job.log().finished_at()?;
                Some((at, job.created_at_ms, job.id.clone(), job.bytes()))
            })
            .collect();
        finished.sort();
        let mut count = finished.len();
        let mut bytes: usize = finished.iter().map(|f| f.3).sum();
        for (finished_at, _, id, size) in finished {
            let expired = now.saturating_sub(finished_at) >= retention;
            if !expired
                && count <= self.limits.max_retained
                && bytes <= self.limits.max_retained_bytes
            {
                break;
            }
            jobs.remove(&id);
            count -= 1;
            bytes -= size;
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
        if self.cleaner.pending() > 0 {
            tracing::warn!(
                pending = self.cleaner.pending(),
                "waiting briefly for sandbox kills still being retried"
            );
            self.cleaner.drain(grace.min(Duration::from_secs(10))).await;
        }
        self.stopped.cancel();
    }
}

async fn prune_periodically(registry: Weak<JobRegistry>, stopped: CancellationToken) {
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped.cancelled() => return,
        }
        match registry.upgrade() {
            Some(registry) => registry.prune(),
            None => return,
        }
    }
}
