//! The jobs of this instance, over the job store: admission (counted in the store, so every
//! instance sharing it counts the same jobs), the queue (this instance claims queued jobs while it
//! has a free slot), cancel, the heartbeat that keeps its claims, the reaper that ends the jobs of
//! instances that died, retention, and the supervisor that guarantees `Done` even after a panic.
//!
//! Jobs this process runs are kept in memory while they run; everything else (finished jobs, jobs
//! queued or running elsewhere) is read from the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::cleaner::{Cleaner, Target};
use super::pipeline::{self, Backends, Progress};
use super::state::Summary;
use super::step::JobError;
use super::{Emitter, EventLog};
use crate::event::{DoneStatus, ErrorCode, ErrorInfo, Event, EventKind, Step, StepState, Usage};
use crate::repo::RepoRef;
use crate::store::{
    Admission, Counts, Created, Idempotency, JobRecord, JobStore, ListQuery, NewEvent, NewJob,
    Notice, Refusal, Resource, Retention, StoreError, Unfinished,
};

/// Pending sandbox kills a new process takes over at start, at most.
const ADOPT_AT_START: usize = 1000;

/// A validated request to run a job.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JobRequest {
    pub repo: RepoRef,
    pub prompt: String,
    pub base_branch: Option<String>,
    pub draft: bool,
    pub branch: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Jobs this instance runs at once.
    pub max_concurrent: usize,
    /// Jobs waiting, beyond what every instance can run.
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
    /// How long a claim on a job lasts without a heartbeat (`JOB_LEASE_SECS`): after it, another
    /// instance ends the job with `instance_lost`.
    pub lease: Duration,
    /// How long the store may keep failing to store a running job's events before the job is
    /// stopped (`store_unavailable`); its `Done` is stored once the database is back.
    pub store_grace: Duration,
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
            lease: Duration::from_secs(30),
            store_grace: Duration::from_secs(60),
        }
    }
}

/// One job this process runs: its request, its event log and its cancel switch.
pub struct Job {
    id: String,
    request: JobRequest,
    created_at_ms: u64,
    created: Instant,
    emitter: Emitter,
    cancel: CancellationToken,
    /// Why the job was stopped, when not by a cancel (the store failed, the job was lost).
    stop_reason: OnceLock<JobError>,
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

    /// Stores the full patch (with the job's next events).
    pub(super) fn set_patch(&self, patch: Bytes, truncated: bool) {
        self.log().set_patch(patch, truncated);
    }

    pub(super) fn progress(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Stops the job for a reason other than a cancel: it ends as failed with `reason`.
    pub fn stop(&self, reason: JobError) {
        let _ = self.stop_reason.set(reason);
        self.cancel.cancel();
    }

    /// What the job's error is once its cancel switch has fired: the stop reason, if any.
    pub(super) fn stop_reason(&self) -> Option<JobError> {
        self.stop_reason.get().cloned()
    }
}

/// A submitted job, wherever it runs: its id and its log (a view over the store).
#[derive(Clone)]
pub struct JobHandle {
    id: String,
    log: EventLog,
    registry: Weak<JobRegistry>,
    replayed: bool,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl JobHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn log(&self) -> &EventLog {
        &self.log
    }

    /// Whether the submission found the job an earlier one with the same `Idempotency-Key`
    /// created, instead of creating one.
    pub fn replayed(&self) -> bool {
        self.replayed
    }

    pub async fn cancel(&self) -> Result<CancelOutcome, StoreError> {
        match self.registry.upgrade() {
            Some(registry) => registry.cancel(&self.id).await,
            None => Ok(CancelOutcome::NotFound),
        }
    }

    /// The job's patch, once stored.
    pub async fn patch(&self) -> Option<(Bytes, bool)> {
        let registry = self.registry.upgrade()?;
        registry.patch(&self.id).await.ok().flatten()
    }

    /// The job's stored row.
    pub async fn record(&self) -> Option<JobRecord> {
        let registry = self.registry.upgrade()?;
        registry.job(&self.id).await.ok().flatten()
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
    #[error(
        "this Idempotency-Key was already used with a different request; use a new key for a new job"
    )]
    IdempotencyConflict { job_id: String },
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job is being cancelled (or was, if it had not started).
    Cancelling,
    AlreadyFinished,
    NotFound,
}

/// A patch read once from the store and shared by the requests that asked for it meanwhile.
type PatchCell = Arc<tokio::sync::OnceCell<Option<(Bytes, bool)>>>;

/// How often finished jobs past their retention are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Patches kept in memory for `GET /jobs/{id}/patch`, the most recent first.
const PATCH_CACHE: usize = 8;

pub struct JobRegistry {
    store: Arc<dyn JobStore>,
    /// This process's id in the store: its claims and writes carry it.
    instance: String,
    /// Jobs this process runs.
    running: Mutex<HashMap<String, Arc<Job>>>,
    /// Logs followed here, woken when the store says they grew.
    views: Mutex<HashMap<String, Vec<EventLog>>>,
    /// Recently served patches: concurrent requests for one share one copy.
    patches: Mutex<VecDeque<(String, PatchCell)>>,
    /// Sandboxes whose kill failed, still being killed.
    cleaner: Arc<Cleaner>,
    slots: Arc<Semaphore>,
    /// Wakes the dispatcher: a job was queued or a slot freed.
    wake: Arc<Notify>,
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
    /// Joins the store as a new instance: announces its capacity, starts the heartbeat and the
    /// reaper (whose first round ends the jobs a dead process left running, see
    /// [`JobRegistry::reap`]) and starts claiming queued jobs.
    pub async fn start(
        backends: Arc<Backends>,
        limits: Limits,
        store: Arc<dyn JobStore>,
    ) -> Result<Arc<Self>, StoreError> {
        let registry = Arc::new(Self {
            store: store.clone(),
            instance: uuid::Uuid::new_v4().to_string(),
            running: Mutex::new(HashMap::new()),
            views: Mutex::new(HashMap::new()),
            patches: Mutex::new(VecDeque::new()),
            cleaner: Arc::new(Cleaner::new(limits.cleanup_backoff, store.clone())),
            slots: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            wake: Arc::new(Notify::new()),
            backends,
            limits,
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            stopped: CancellationToken::new(),
        });
        registry
            .store
            .heartbeat(
                &registry.instance,
                registry.limits.max_concurrent,
                registry.limits.lease,
                &[],
            )
            .await?;
        // The reaper's first round, at once, ends the jobs a dead process left running.
        let weak = Arc::downgrade(&registry);
        tokio::spawn(dispatch(
            weak.clone(),
            registry.wake.clone(),
            registry.shutdown.clone(),
        ));
        tokio::spawn(keep_alive(weak.clone(), registry.stopped.clone()));
        tokio::spawn(reap_periodically(weak.clone(), registry.stopped.clone()));
        tokio::spawn(relay_notices(
            weak.clone(),
            registry.store.notices(),
            registry.stopped.clone(),
        ));
        tokio::spawn(prune_periodically(weak, registry.stopped.clone()));
        registry.adopt_pending_kills().await;
        tracing::info!(
            instance = %registry.instance,
            store = registry.store.backend(),
            max_concurrent = registry.limits.max_concurrent,
            "job registry started"
        );
        Ok(registry)
    }

    /// Cancelled once shutdown has finished; event streams end with it.
    pub fn stopped(&self) -> CancellationToken {
        self.stopped.clone()
    }

    pub fn backends(&self) -> &Arc<Backends> {
        &self.backends
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    /// This process's id among the instances sharing the store.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    fn running_jobs(&self) -> MutexGuard<'_, HashMap<String, Arc<Job>>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a job and queues it, or refuses when every instance's slots and the queue are
    /// full.
    pub async fn submit(self: &Arc<Self>, request: JobRequest) -> Result<JobHandle, SubmitError> {
        self.submit_as(request, None, None).await
    }

    /// [`JobRegistry::submit`] for the API key whose id is `owner`: only that key (and admin
    /// keys) will see the job. Configured secrets in the prompt are redacted first, so no key
    /// reaches the model, an event or `GET /jobs/{id}`. With an `Idempotency-Key`, a request that
    /// repeats an earlier one (same key, same owner, same request) gets the earlier job.
    pub async fn submit_as(
        self: &Arc<Self>,
        mut request: JobRequest,
        owner: Option<String>,
        idempotency_key: Option<String>,
    ) -> Result<JobHandle, SubmitError> {
        if !self.backends.redactor.is_empty() {
            request.prompt = self.backends.redactor.redact(&request.prompt);
        }
        if self.shutdown.is_cancelled() {
            return Err(SubmitError::ShuttingDown);
        }
        let id = uuid::Uuid::new_v4().to_string();
        let request_json = serde_json::to_string(&request)
            .map_err(|e| StoreError::Corrupt(format!("the request cannot be stored: {e}")))?;
        let idempotency = idempotency_key.map(|key| Idempotency {
            key,
            fingerprint: Sha256::digest(request_json.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        });
        let new = NewJob {
            id: id.clone(),
            owner: owner.clone(),
            repo_url: request.repo.canonical(),
            prompt: request.prompt.clone(),
            request: request_json,
            created_at: crate::now_ms(),
            idempotency,
        };
        let started = EventKind::JobStarted {
            job_id: id.clone(),
            repo_url: request.repo.canonical(),
            prompt: request.prompt.clone(),
            sandbox: self.backends.sandbox.name().to_owned(),
            agents: self.backends.agent_names(),
            forge: self
                .backends
                .forges
                .for_repo(&request.repo)
                .name()
                .to_owned(),
        };
        let scrubber = Emitter::new(EventLog::new(), self.backends.redactor.clone(), id.clone());
        let first = Box::new(move |counts: &Counts| first_events(&scrubber, started, counts));
        let admission = Admission {
            max_queued: self.limits.max_queued,
            max_jobs_per_key: self.limits.max_jobs_per_key,
            key_rate_per_min: self.limits.key_rate_per_min,
        };
        let created = self.store.create_job(new, &admission, first).await?;
        let (id, replayed) = match created {
            Ok(Created::New) => {
                tracing::info!(job_id = %id, repo = %request.repo.canonical(), "job accepted");
                self.wake.notify_one();
                (id, false)
            }
            Ok(Created::Existing {
                id,
                same_request: true,
            }) => (id, true),
            Ok(Created::Existing {
                id,
                same_request: false,
            }) => return Err(SubmitError::IdempotencyConflict { job_id: id }),
            Err(Refusal::Busy { running, queued }) => {
                return Err(SubmitError::Busy {
                    running,
                    queued,
                    retry_after: Duration::from_secs(30),
                });
            }
            Err(Refusal::KeyBusy { active }) => {
                return Err(SubmitError::KeyBusy {
                    active,
                    retry_after: Duration::from_secs(30),
                });
            }
            Err(Refusal::KeyRate { count, retry_after }) => {
                return Err(SubmitError::KeyRate { count, retry_after });
            }
        };
        Ok(JobHandle {
            log: self.log(&id),
            id,
            registry: Arc::downgrade(self),
            replayed,
        })
    }

    /// The job's log: the running one when this process runs the job, else a view of the store.
    pub fn log(&self, id: &str) -> EventLog {
        if let Some(job) = self.running_jobs().get(id) {
            return job.log().clone();
        }
        let view = EventLog::view(id, self.store.clone());
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.len() >= 256 {
            for logs in views.values_mut() {
                logs.retain(EventLog::is_followed);
            }
            views.retain(|_, logs| !logs.is_empty());
        }
        views.entry(id.to_owned()).or_default().push(view.clone());
        view
    }

    /// A handle on a stored job.
    pub async fn handle(self: &Arc<Self>, id: &str) -> Result<Option<JobHandle>, StoreError> {
        Ok(self.job(id).await?.map(|record| JobHandle {
            log: self.log(&record.id),
            id: record.id,
            registry: Arc::downgrade(self),
            replayed: false,
        }))
    }

    /// The job's stored row.
    pub async fn job(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        self.store.job(id).await
    }

    pub async fn list(&self, query: &ListQuery) -> Result<Vec<JobRecord>, StoreError> {
        self.store.list_jobs(query).await
    }

    /// A job this process is running.
    pub fn running(&self, id: &str) -> Option<Arc<Job>> {
        self.running_jobs().get(id).cloned()
    }

    /// The job's patch. Concurrent requests for the same patch share one copy, so serving a
    /// large patch to many clients costs socket buffers, not copies.
    pub async fn patch(&self, id: &str) -> Result<Option<(Bytes, bool)>, StoreError> {
        let cell = {
            let mut cache = self.patches.lock().unwrap_or_else(|e| e.into_inner());
            match cache.iter().find(|(cached, _)| cached == id) {
                Some((_, cell)) => cell.clone(),
                None => {
                    let cell = Arc::new(tokio::sync::OnceCell::new());
                    cache.push_front((id.to_owned(), cell.clone()));
                    cache.truncate(PATCH_CACHE);
                    cell
                }
            }
        };
        let patch = cell.get_or_try_init(|| self.store.patch(id)).await.cloned();
        if !matches!(patch, Ok(Some(_))) {
            // Not there yet (or the read failed): ask the store again next time.
            let mut cache = self.patches.lock().unwrap_or_else(|e| e.into_inner());
            cache.retain(|(cached, _)| cached != id);
        }
        patch
    }

    /// Cancels a job wherever it runs: here at once; a queued job by ending it here; a job
    /// another instance runs by recording the request for it to notice.
    pub async fn cancel(&self, id: &str) -> Result<CancelOutcome, StoreError> {
        if let Some(job) = self.running(id) {
            if job.is_finished() {
                return Ok(CancelOutcome::AlreadyFinished);
            }
            job.cancel();
            return Ok(CancelOutcome::Cancelling);
        }
        let Some(record) = self.store.job(id).await? else {
            return Ok(CancelOutcome::NotFound);
        };
        if record.is_finished() {
            return Ok(CancelOutcome::AlreadyFinished);
        }
        if record.instance.is_none()
            && let Some(record) = self
                .store
                .claim_queued(id, &self.instance, self.limits.lease)
                .await?
        {
            let (log, emitter) = self.write_log(&record);
            end_unstarted(
                &emitter,
                &record,
                DoneStatus::Cancelled,
                ErrorCode::Cancelled,
                "the job was cancelled",
            );
            log.flushed().await;
            return Ok(CancelOutcome::Cancelling);
        }
        if let Some(job) = self.running(id) {
            // Claimed here meanwhile.
            job.cancel();
        } else {
            self.store.request_cancel(id).await?;
        }
        Ok(CancelOutcome::Cancelling)
    }

    /// Sandboxes whose kill failed and is still being retried.
    pub fn cleanup_pending(&self) -> usize {
        self.cleaner.pending()
    }

    /// Jobs queued or running, on every instance.
    pub async fn active(&self) -> usize {
        self.load().await.total()
    }

    /// Jobs running and jobs queued, on every instance (zero when the store cannot be read).
    pub async fn load(&self) -> Unfinished {
        self.store.unfinished().await.unwrap_or_default()
    }

    /// Jobs running in this process.
    pub fn running_count(&self) -> usize {
        self.running_jobs().len()
    }

    /// Drops finished jobs past their retention time, then the oldest until both the count and
    /// the byte limits hold. Runs on a timer.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        self.store
            .prune(&Retention {
                max_age: self.limits.retention,
                max_jobs: self.limits.max_retained,
                max_bytes: self.limits.max_retained_bytes as u64,
            })
            .await
    }

    /// A log this process writes for a job it has just claimed or taken over.
    fn write_log(&self, record: &JobRecord) -> (EventLog, Emitter) {
        let log = EventLog::view(&record.id, self.store.clone()).start_writing(
            &self.instance,
            record.last_seq,
            Summary::from_record(record),
            record.bytes,
        );
        log.set_failure_grace(self.limits.store_grace);
        let emitter = Emitter::new(log.clone(), self.backends.redactor.clone(), &record.id);
        (log, emitter)
    }

    /// Starts a job this instance has claimed.
    fn start_claimed(self: &Arc<Self>, record: JobRecord, permit: OwnedSemaphorePermit) {
        let (log, emitter) = self.write_log(&record);
        let request: JobRequest = match serde_json::from_str(&record.request) {
            Ok(request) => request,
            Err(err) => {
                tracing::error!(job_id = %record.id, error = %err, "a stored request cannot be read");
                end_unstarted(
                    &emitter,
                    &record,
                    DoneStatus::Failed,
                    ErrorCode::Internal,
                    "the stored request could not be read",
                );
                let wake = self.wake.clone();
                tokio::spawn(async move {
                    log.flushed().await;
                    drop(permit);
                    wake.notify_one();
                });
                return;
            }
        };
        let age = Duration::from_millis(crate::now_ms().saturating_sub(record.created_at));
        let job = Arc::new(Job {
            id: record.id.clone(),
            request,
            created_at_ms: record.created_at,
            created: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            emitter,
            cancel: self.shutdown.child_token(),
            stop_reason: OnceLock::new(),
            owner: record.owner.clone(),
            progress: Mutex::new(Progress::default()),
        });
        {
            let weak = Arc::downgrade(&job);
            log.on_store_failure(move |err| {
                if let Some(job) = weak.upgrade() {
                    job.stop(match err {
                        StoreError::LeaseLost => JobError::new(
                            ErrorCode::InstanceLost,
                            "another instance took the job over after this one's lease expired",
                        ),
                        StoreError::Unavailable(_) | StoreError::Corrupt(_) => JobError {
                            retryable: true,
                            ..JobError::new(
                                ErrorCode::StoreUnavailable,
                                format!("the job store kept failing ({err}); the job was stopped"),
                            )
                        },
                    });
                }
            });
        }
        if record.cancel_requested {
            job.cancel();
        }
        self.running_jobs().insert(job.id.clone(), job.clone());
        // Followers that started while the job was queued read its events from memory now.
        if let Some(views) = self
            .views
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&job.id)
        {
            for view in views {
                view.read_through(job.log());
            }
        }
        let supervisor = {
            let job = job.clone();
            let backends = self.backends.clone();
            let cleaner = self.cleaner.clone();
            let registry = Arc::downgrade(self);
            let wake = self.wake.clone();
            async move {
                // Every log line of the job (providers, sandbox, forge) carries its id.
                let span = tracing::info_span!("job", job_id = %job.id);
                let work = tokio::spawn(
                    pipeline::run(job.clone(), backends, job.cancel.clone(), cleaner)
                        .instrument(span),
                );
                if let Err(err) = work.await {
                    // The pipeline task panicked (or was aborted): its sandbox guard has been
                    // dropped, which kills the sandbox; still owe the client a Done.
                    tracing::error!(job_id = %job.id, error = %err, "job task crashed");
                    crashed(&job);
                }
                // The slot is free once `Done` is stored, not merely appended.
                job.log().flushed().await;
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
                drop(permit);
                wake.notify_one();
                if let Some(registry) = registry.upgrade() {
                    registry.running_jobs().remove(&job.id);
                    if let Err(err) = registry.prune().await {
                        tracing::warn!(error = %err, "pruning finished jobs failed");
                    }
                }
            }
        };
        self.tasks.spawn(supervisor);
    }

    /// Ends the jobs whose instance is gone (killed, or cut off from the database for longer
    /// than its lease): each gets `Error{instance_lost}` and one `Done{failed}`, and the
    /// sandbox it had recorded is killed. Queued jobs nobody had claimed are not touched: they
    /// start normally (nothing of theirs had run).
    pub async fn reap(&self) {
        let orphans = match self.store.orphans(&self.instance).await {
            Ok(orphans) => orphans,
            Err(err) => {
                tracing::warn!(error = %err, "looking for jobs of lost instances failed");
                return;
            }
        };
        for id in orphans {
            match self
                .store
                .take_over(&id, &self.instance, self.limits.lease)
                .await
            {
                Ok(Some(record)) => self.end_lost(record).await,
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(job_id = %id, error = %err, "taking over a lost job failed")
                }
            }
        }
    }

    async fn end_lost(&self, record: JobRecord) {
        tracing::warn!(job_id = %record.id, instance = ?record.instance, "ending a job whose instance was lost");
        let (log, emitter) = self.write_log(&record);
        let message = "the instance running the job stopped before it finished (it was killed, crashed or lost its database); the job cannot continue";
        emitter.emit(EventKind::Error {
            code: ErrorCode::InstanceLost,
            message: message.into(),
            step: None,
            retryable: true,
        });
        end_unstarted(
            &emitter,
            &record,
            DoneStatus::Failed,
            ErrorCode::InstanceLost,
            message,
        );
        log.flushed().await;
        let resources = match self.store.resources(&record.id).await {
            Ok(resources) => resources,
            Err(err) => {
                tracing::warn!(job_id = %record.id, error = %err, "reading a lost job's resources failed");
                return;
            }
        };
        for resource in resources
            .into_iter()
            .filter(|r| r.kind == "sandbox" && !r.released)
        {
            if resource.backend != self.backends.sandbox.name() {
                tracing::warn!(job_id = %record.id, backend = %resource.backend, sandbox = %resource.external_id, "a lost job's sandbox is on a backend this instance does not use; leaving it to its lifetime");
                continue;
            }
            match self.backends.sandbox.reclaim(&resource.external_id).await {
                Ok(()) => {
                    tracing::info!(job_id = %record.id, sandbox = %resource.external_id, "killed a lost job's sandbox");
                    log.record_resource(Resource {
                        released: true,
                        ..resource
                    });
                }
                Err(err) => {
                    tracing::warn!(job_id = %record.id, sandbox = %resource.external_id, error = %err, "killing a lost job's sandbox failed; retrying in the background");
                    self.cleaner.hand_over(
                        &record.id,
                        Target::Recorded {
                            provider: self.backends.sandbox.clone(),
                            id: resource.external_id.clone(),
                        },
                        Some(resource),
                    );
                }
            }
        }
        log.flushed().await;
    }

    /// Takes over the sandbox kills a stopped process left pending (finished jobs whose sandbox
    /// was never released): the cleaner kills each by its recorded id. On PostgreSQL a live
    /// instance may be retrying one of them too; killing a sandbox twice is harmless.
    async fn adopt_pending_kills(&self) {
        let pending = match self.store.unreleased_sandboxes(ADOPT_AT_START).await {
            Ok(pending) => pending,
            Err(err) => {
                tracing::warn!(error = %err, "reading the sandbox kills left pending failed");
                return;
            }
        };
        for (job_id, resource) in pending {
            if resource.backend != self.backends.sandbox.name() {
                tracing::warn!(job_id, backend = %resource.backend, sandbox = %resource.external_id, "a pending sandbox kill is on a backend this instance does not use; leaving it");
                continue;
            }
            tracing::info!(job_id, sandbox = %resource.external_id, "taking over a sandbox kill a stopped process left pending");
            self.cleaner.hand_over(
                &job_id,
                Target::Recorded {
                    provider: self.backends.sandbox.clone(),
                    id: resource.external_id.clone(),
                },
                Some(resource),
            );
        }
    }

    /// Cancels every job, waits (boundedly) for them to clean up, and leaves the store. Queued
    /// jobs this instance had not claimed stay queued, for another instance or the next start.
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
        if !self.stopped.is_cancelled()
            && let Err(err) = self.store.leave(&self.instance).await
        {
            tracing::warn!(error = %err, "leaving the job store failed");
        }
        self.stopped.cancel();
    }

    fn wake_views(&self, id: Option<&str>, seq: u64) {
        let mut views = self.views.lock().unwrap_or_else(|e| e.into_inner());
        let wake = |logs: &mut Vec<EventLog>| {
            // A view nobody follows any more holds the only other reference.
            logs.retain(|log| log.is_followed());
            for log in logs.iter() {
                log.notify_stored(seq);
            }
        };
        match id {
            Some(id) => {
                if let Some(logs) = views.get_mut(id) {
                    wake(logs);
                    if logs.is_empty() {
                        views.remove(id);
                    }
                }
            }
            None => {
                for logs in views.values_mut() {
                    wake(logs);
                }
                views.retain(|_, logs| !logs.is_empty());
            }
        }
    }
}

/// `Job Started` and the queue's `Status`, numbered 1 and 2.
fn first_events(scrubber: &Emitter, started: EventKind, counts: &Counts) -> Vec<NewEvent> {
    // Jobs that must start before this one can: those before it beyond the free slots.
    let claimed = counts.active.saturating_sub(counts.ahead);
    let free = counts.capacity.saturating_sub(claimed);
    let ahead = counts.active.saturating_sub(free);
    let queued = EventKind::Status {
        step: Step::Queue,
        state: StepState::Started,
        message: if ahead == 0 {
            "Queued".into()
        } else {
            format!("Queued behind {ahead} job(s)")
        },
        elapsed_ms: None,
    };
    let now = crate::now_ms();
    [started, queued]
        .into_iter()
        .enumerate()
        .map(|(i, kind)| NewEvent {
            seq: i as u64 + 1,
            json: serde_json::to_string(&Event {
                kind: scrubber.scrub(kind),
                timestamp: now,
            })
            .unwrap_or_else(|_| "{}".into()),
        })
        .collect()
}

/// Ends a job this process did not run (or no longer can): one `Done` from what the store knows.
fn end_unstarted(
    emitter: &Emitter,
    record: &JobRecord,
    status: DoneStatus,
    code: ErrorCode,
    message: &str,
) {
    let summary = Summary::from_record(record);
    let summary_text = match status {
        DoneStatus::Cancelled => "The job was cancelled.".to_owned(),
        DoneStatus::Failed | DoneStatus::Succeeded => format!("The job failed: {message}"),
    };
    emitter.emit(EventKind::Done {
        status,
        pr_url: summary.pr_url,
        branch: summary.branch,
        summary: summary_text,
        files_changed: summary.files.as_ref().map_or(0, Vec::len),
        duration_ms: crate::now_ms().saturating_sub(record.created_at),
        usage: summary.usage.unwrap_or_default(),
        error: Some(ErrorInfo {
            code,
            message: message.to_owned(),
        }),
    });
}

/// The `Error` and `Done` a job whose task panicked still owes its clients.
fn crashed(job: &Job) {
    let events = job.emitter();
    if events.log().is_closed() {
        return;
    }
    let message = "the job crashed unexpectedly; its sandbox was destroyed".to_owned();
    let (usage, branch, pr_url): (Vec<Usage>, _, _) = {
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

/// Claims queued jobs while this instance has a free slot.
async fn dispatch(registry: Weak<JobRegistry>, wake: Arc<Notify>, shutdown: CancellationToken) {
    loop {
        let Some(slots) = registry.upgrade().map(|r| r.slots.clone()) else {
            return;
        };
        let permit = tokio::select! {
            permit = slots.acquire_owned() => permit.ok(),
            _ = shutdown.cancelled() => return,
        };
        let Some(permit) = permit else { return };
        let Some(current) = registry.upgrade() else {
            return;
        };
        let claimed = current
            .store
            .claim_next(&current.instance, current.limits.lease)
            .await;
        let poll = if current.store.shared() {
            Duration::from_secs(1)
        } else {
            Duration::from_secs(5)
        };
        match claimed {
            Ok(Some(record)) => {
                current.start_claimed(record, permit);
                continue;
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, "claiming a queued job failed"),
        }
        drop(permit);
        drop(current);
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(poll) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The reaper: ends the jobs of instances that are gone, at start and then as often as the
/// heartbeat beats (apart from it, so a slow sandbox kill never delays a heartbeat).
async fn reap_periodically(registry: Weak<JobRegistry>, stopped: CancellationToken) {
    loop {
        let Some(current) = registry.upgrade() else {
            return;
        };
        let every = (current.limits.lease / 3).max(Duration::from_millis(100));
        current.reap().await;
        drop(current);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.cancelled() => return,
        }
    }
}

/// The heartbeat: renews this instance's claims and notices cancel requests and jobs it lost.
async fn keep_alive(registry: Weak<JobRegistry>, stopped: CancellationToken) {
    loop {
        let Some(current) = registry.upgrade() else {
            return;
        };
        let every = (current.limits.lease / 3).max(Duration::from_millis(100));
        let running: Vec<String> = current.running_jobs().keys().cloned().collect();
        match current
            .store
            .heartbeat(
                &current.instance,
                current.limits.max_concurrent,
                current.limits.lease,
                &running,
            )
            .await
        {
            Ok(heartbeat) => {
                for id in heartbeat.cancel_requested {
                    if let Some(job) = current.running(&id) {
                        job.cancel();
                    }
                }
                for id in heartbeat.lost {
                    if let Some(job) = current.running(&id).filter(|job| !job.is_finished()) {
                        tracing::warn!(job_id = %id, "this instance no longer holds the job; stopping it");
                        job.stop(JobError::new(
                            ErrorCode::InstanceLost,
                            "another instance took the job over after this one's lease expired",
                        ));
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "the heartbeat to the job store failed"),
        }
        drop(current);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stopped.cancelled() => return,
        }
    }
}

/// Acts on what the store says other instances (and this one) did.
async fn relay_notices(
    registry: Weak<JobRegistry>,
    mut notices: tokio::sync::broadcast::Receiver<Notice>,
    stopped: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        let notice = tokio::select! {
            notice = notices.recv() => notice,
            _ = stopped.cancelled() => return,
        };
        let Some(current) = registry.upgrade() else {
            return;
        };
        match notice {
            Ok(Notice::Appended { job_id, seq }) => current.wake_views(Some(&job_id), seq),
            Ok(Notice::Queued) => current.wake.notify_one(),
            Ok(Notice::CancelRequested { job_id }) => {
                if let Some(job) = current.running(&job_id) {
                    job.cancel();
                }
            }
            Err(RecvError::Lagged(_)) => {
                current.wake_views(None, u64::MAX);
                current.wake.notify_one();
            }
            Err(RecvError::Closed) => return,
        }
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
            Some(registry) => {
                if let Err(err) = registry.prune().await {
                    tracing::warn!(error = %err, "pruning finished jobs failed");
                }
            }
            None => return,
        }
    }
}
