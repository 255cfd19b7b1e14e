//! The job's sandbox, from creation to cleanup, as one small type.
//!
//! Creation runs in its own task, so the sandbox is accounted for even when the pipeline that
//! asked for it is dropped mid-way (cancel, timeout) or panics: whoever releases the lease gets the
//! sandbox to kill, a sandbox that appears after the release is killed at once, and dropping the
//! lease kills whatever it still holds.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::sandbox::{Sandbox, SandboxError, SandboxGuard, SandboxProvider};

enum Slot {
    Creating,
    Ready(SandboxGuard, Instant),
    Failed(Option<SandboxError>),
    Released,
}

pub struct SandboxLease {
    slot: Mutex<Slot>,
    /// Becomes `true` once creation has ended, however it ended.
    settled: watch::Sender<bool>,
}

impl SandboxLease {
    /// Starts creating the job's sandbox in the background.
    pub fn create(provider: Arc<dyn SandboxProvider>, job_id: String) -> Arc<Self> {
        let lease = Arc::new(Self {
            slot: Mutex::new(Slot::Creating),
            settled: watch::Sender::new(false),
        });
        let task_lease = lease.clone();
        tokio::spawn(async move {
            // Settles the lease even if `create` panics, so nobody waits for it forever.
            struct Settle(Arc<SandboxLease>);
            impl Drop for Settle {
                fn drop(&mut self) {
                    self.0
                        .settle(Err(SandboxError::Create("sandbox creation crashed".into())));
                }
            }
            let settle = Settle(task_lease);
            let result = provider.create(&job_id).await;
            settle.0.settle(result);
        });
        lease
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records how creation ended; only the first call counts.
    fn settle(&self, result: Result<Arc<dyn Sandbox>, SandboxError>) {
        let mut slot = self.lock();
        match (&*slot, result) {
            (Slot::Creating, Ok(sandbox)) => {
                *slot = Slot::Ready(SandboxGuard::new(sandbox), Instant::now())
            }
            (Slot::Creating, Err(err)) => *slot = Slot::Failed(Some(err)),
            // Released while creating: nobody will use it, so the guard's drop kills it now.
            (Slot::Released, Ok(sandbox)) => drop(SandboxGuard::new(sandbox)),
            (Slot::Ready(..) | Slot::Failed(_) | Slot::Released, _) => {}
        }
        drop(slot);
        self.settled.send_replace(true);
    }

    /// Waits for creation to end: the sandbox and when it became ready, or why there is none.
    pub async fn ready(&self) -> Result<(Arc<dyn Sandbox>, Instant), SandboxError> {
        let mut settled = self.settled.subscribe();
        let _ = settled.wait_for(|done| *done).await;
        match &mut *self.lock() {
            Slot::Ready(guard, at) => guard
                .sandbox()
                .cloned()
                .map(|sandbox| (sandbox, *at))
                .ok_or_else(|| SandboxError::Gone("the sandbox was released".into())),
            Slot::Failed(err) => Err(err
                .take()
                .unwrap_or_else(|| SandboxError::Create("sandbox creation failed".into()))),
            Slot::Creating | Slot::Released => {
                Err(SandboxError::Gone("the sandbox was released".into()))
            }
        }
    }

    /// The sandbox, if it is ready now.
    pub fn current(&self) -> Option<Arc<dyn Sandbox>> {
        match &*self.lock() {
            Slot::Ready(guard, _) => guard.sandbox().cloned(),
            Slot::Creating | Slot::Failed(_) | Slot::Released => None,
        }
    }

    /// Ends the lease: waits up to `wait` for a creation still in flight, then hands over the
    /// sandbox to kill. A sandbox that is created later is killed as soon as it appears.
    pub async fn release(&self, wait: Duration) -> Option<SandboxGuard> {
        let mut settled = self.settled.subscribe();
        let _ = tokio::time::timeout(wait, settled.wait_for(|done| *done)).await;
        match std::mem::replace(&mut *self.lock(), Slot::Released) {
            Slot::Ready(guard, _) => Some(guard),
            Slot::Creating | Slot::Failed(_) | Slot::Released => None,
        }
    }
}
