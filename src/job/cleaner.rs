//! Sandboxes whose kill has not been confirmed. A failed or timed-out kill at the end of a job
//! does not leave the sandbox running (and, on E2B, billed) until its lifetime ends: it is handed
//! here, and a background task keeps killing it, with backoff, until the kill succeeds (an
//! already-gone sandbox counts as killed) or `GIVE_UP_AFTER` has passed. `/healthz` reports how
//! many are pending.
//!
//! A pending kill is durable: the job store holds the sandbox as a resource not yet released, and
//! a confirmed kill marks it released. A process that stops with kills pending leaves them in the
//! store, and the next one to start takes them over by the sandbox's id
//! ([`super::JobRegistry::start`]), so a crash never leaves a sandbox to its lifetime.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::sandbox::{Sandbox, SandboxError, SandboxProvider};
use crate::store::{JobStore, Resource};

/// After this long a sandbox is left to its own lifetime (E2B ends every sandbox at its timeout).
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Each kill attempt's own bound.
const KILL_TIMEOUT: Duration = Duration::from_secs(60);

/// What to kill.
pub enum Target {
    /// A sandbox this process created and still holds.
    Held(Arc<dyn Sandbox>),
    /// A sandbox known only by the id the store recorded (another process created it).
    Recorded {
        provider: Arc<dyn SandboxProvider>,
        id: String,
    },
}

impl Target {
    async fn kill(&self) -> Result<(), SandboxError> {
        match self {
            Target::Held(sandbox) => sandbox.kill().await,
            Target::Recorded { provider, id } => provider.reclaim(id).await,
        }
    }
}

pub struct Cleaner {
    pending: Arc<AtomicUsize>,
    first_backoff: Duration,
    store: Arc<dyn JobStore>,
    tasks: TaskTracker,
}

impl Cleaner {
    pub fn new(first_backoff: Duration, store: Arc<dyn JobStore>) -> Self {
        Self {
            pending: Arc::new(AtomicUsize::new(0)),
            first_backoff,
            store,
            tasks: TaskTracker::new(),
        }
    }

    /// Sandboxes whose kill is still being retried.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Keeps killing `target` in the background until that succeeds; then marks `resource` (the
    /// job's record of the sandbox, when it has one) released.
    pub fn hand_over(&self, job_id: &str, target: Target, resource: Option<Resource>) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let pending = self.pending.clone();
        let first = self.first_backoff;
        let store = self.store.clone();
        let job_id = job_id.to_owned();
        self.tasks.spawn(async move {
            let started = tokio::time::Instant::now();
            let mut wait = first;
            let mut attempts = 1u32;
            loop {
                tokio::time::sleep(wait).await;
                match tokio::time::timeout(KILL_TIMEOUT, target.kill()).await {
                    Ok(Ok(())) => {
                        tracing::info!(job_id, attempts, "sandbox killed after a failed cleanup");
                        if let Some(resource) = &resource {
                            release(store.as_ref(), &job_id, resource).await;
                        }
                        break;
                    }
                    Ok(Err(err)) => {
                        tracing::warn!(job_id, attempts, error = %err, "sandbox kill failed again")
                    }
                    Err(_) => tracing::warn!(job_id, attempts, "sandbox kill timed out again"),
                }
                if started.elapsed() >= GIVE_UP_AFTER {
                    tracing::error!(job_id, attempts, "giving up on killing a sandbox");
                    break;
                }
                attempts += 1;
                wait = (wait * 2).min(MAX_BACKOFF);
            }
            pending.fetch_sub(1, Ordering::AcqRel);
        });
    }

    /// Waits up to `grace` for the pending kills (at shutdown).
    pub async fn drain(&self, grace: Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(grace, self.tasks.wait()).await;
    }
}

/// Records a confirmed kill, retrying briefly: a record left unreleased only means the next
/// process to start kills an already-gone sandbox again, which succeeds.
async fn release(store: &dyn JobStore, job_id: &str, resource: &Resource) {
    let released = Resource {
        released: true,
        ..resource.clone()
    };
    for attempt in 1..=3u32 {
        match store.mark_released(job_id, &released).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(job_id, attempt, error = %err, "recording a killed sandbox failed");
                tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
            }
        }
    }
}
