//! Sandboxes whose kill has not been confirmed. A failed or timed-out kill at the end of a job
//! does not leave the sandbox running (and, on E2B, billed) until its lifetime ends: it is handed
//! here, and a background task keeps killing it, with backoff, until the kill succeeds (an
//! already-gone sandbox counts as killed) or `GIVE_UP_AFTER` has passed. `/healthz` reports how
//! many are pending.
//!
//! Pending kills live in this process only: a process that dies with some pending leaves those
//! sandboxes to their E2B lifetime. Once the durable job store exists (issue 11), `hand_over` is
//! where a pending cleanup gets recorded (and removed when the kill succeeds), and start-up is
//! where a new process takes over the ones it finds.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio_util::task::TaskTracker;

use crate::sandbox::Sandbox;

/// After this long a sandbox is left to its own lifetime (E2B ends every sandbox at its timeout).
const GIVE_UP_AFTER: Duration = Duration::from_secs(3600);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Each kill attempt's own bound.
const KILL_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Cleaner {
    pending: Arc<AtomicUsize>,
    first_backoff: Duration,
    tasks: TaskTracker,
}

impl Cleaner {
    pub fn new(first_backoff: Duration) -> Self {
        Self {
            pending: Arc::new(AtomicUsize::new(0)),
            first_backoff,
            tasks: TaskTracker::new(),
        }
    }

    /// Sandboxes whose kill is still being retried.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// Keeps killing `sandbox` in the background until that succeeds.
    pub fn hand_over(&self, job_id: &str, sandbox: Arc<dyn Sandbox>) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        let pending = self.pending.clone();
        let first = self.first_backoff;
        let job_id = job_id.to_owned();
        self.tasks.spawn(async move {
            let started = tokio::time::Instant::now();
            let mut wait = first;
            let mut attempts = 1u32;
            loop {
                tokio::time::sleep(wait).await;
                match tokio::time::timeout(KILL_TIMEOUT, sandbox.kill()).await {
                    Ok(Ok(())) => {
                        tracing::info!(job_id, attempts, "sandbox killed after a failed cleanup");
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
