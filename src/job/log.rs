//! The append-only event log of one job: gap-free sequence numbers, replay, live follow, as a view
//! over the job store.
//!
//! - **Appends are durable before anyone sees them.** `append` stays synchronous (steps end in
//!   `Drop`, the agent reports through a plain trait): it numbers the event, folds it into the
//!   job's state and wakes the log's writer task, which stores everything pending in one
//!   transaction (events, the state they lead to, the patch, the transcript, resources) and only
//!   then marks the events visible and wakes followers. A burst of events costs one commit.
//! - **Replay reads the store**; the durable events of a job this process writes are also kept in
//!   memory, so following a running job costs no query per event.
//! - **Views.** A job another instance runs (or one not claimed yet) is followed through the
//!   store: the registry wakes the view when the store says the job's log grew, and a view also
//!   looks on its own every second, so a lost notification only delays an event.
//! - If the store keeps failing, the writer keeps trying (nothing is lost or shown early) and
//!   after a grace (a minute by default) tells the job once, so it can stop and end with one `Done` that is stored when the database
//!   is back. If another instance has taken the job over (this one's lease had expired), writes
//!   are refused; the log becomes a view of what that instance wrote.
//!
//! The log also keeps the job's state folded as events arrive ([`Summary`]), so the store gets
//! `GET /jobs/{id}`'s fields in the same transaction as the events that changed them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::state::Summary;
use crate::event::{Event, EventKind};
use crate::store::{Batch, JobStore, NewEvent, Resource, StoreError};

/// An event with its sequence number (1-based, gap-free within a job).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequenced {
    pub seq: u64,
    pub event: Event,
}

/// How many events one store read returns at most.
const PAGE: usize = 1000;
/// How often a view reads the store without being told to.
const VIEW_POLL: Duration = Duration::from_secs(1);
/// How long the store may fail before the job is told, unless set otherwise.
const FAILING_FOR: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a follower keeps retrying a failing store read before its stream ends (the client
/// reconnects with `Last-Event-ID`).
const READ_GIVE_UP: Duration = Duration::from_secs(30);

/// Called once when the store has failed for a while.
type FailureHook = Box<dyn Fn(&StoreError) + Send + Sync>;

#[derive(Debug, Default)]
struct Inner {
    /// The sequence number before the first event in `events` (a claimed job continues a log).
    base: u64,
    /// This process's events, `base + 1` onwards.
    events: Vec<Sequenced>,
    /// Events up to here are stored and may be shown.
    durable: u64,
    /// Events up to here have been handed to the writer.
    taken: u64,
    closed: bool,
    summary: Summary,
    /// The state last handed to the writer.
    written_summary: Option<Summary>,
    /// Writes other than events, waiting for the writer.
    pending: Batch,
    /// Writes handed to the writer and not yet stored.
    in_flight: bool,
    /// Whether this process writes the log. A view (and a log another instance took over) reads
    /// the store only.
    writes: bool,
    /// The stored events' size as JSON (plus the patch).
    bytes: u64,
}

struct Shared {
    job_id: String,
    /// `None`: a log kept in memory only (unit tests of the layers that emit events).
    store: Option<(Arc<dyn JobStore>, String)>,
    inner: Mutex<Inner>,
    /// Bumped when events become durable (here or, for views, elsewhere): followers wake.
    changed: watch::Sender<u64>,
    wake: Arc<Notify>,
    on_failure: OnceLock<FailureHook>,
    /// For a view of a job this process has since claimed: the log it writes, read from memory
    /// instead of the store.
    writer: OnceLock<EventLog>,
    /// Views reading through this log: woken with its own followers.
    mirrors: Mutex<Vec<Weak<Shared>>>,
    /// How long the store may fail before the job is told, in milliseconds.
    failure_grace: AtomicU64,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The writer task waits for work holding only a weak reference: let it see that the log
        // is gone and end.
        self.wake.notify_one();
    }
}

/// Shared handle to one job's log. Cloning is cheap.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLog")
            .field("job_id", &self.shared.job_id)
            .finish_non_exhaustive()
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    /// A log kept in memory only: every append is visible at once.
    pub fn new() -> Self {
        Self::build(String::new(), None, true)
    }

    fn build(job_id: String, store: Option<(Arc<dyn JobStore>, String)>, writes: bool) -> Self {
        let (changed, _) = watch::channel(0);
        EventLog {
            shared: Arc::new(Shared {
                job_id,
                store,
                inner: Mutex::new(Inner {
                    writes,
                    ..Inner::default()
                }),
                changed,
                wake: Arc::new(Notify::new()),
                on_failure: OnceLock::new(),
                writer: OnceLock::new(),
                mirrors: Mutex::new(Vec::new()),
                failure_grace: AtomicU64::new(FAILING_FOR.as_millis() as u64),
            }),
        }
    }

    /// A read-only view of a job's stored log.
    pub fn view(job_id: &str, store: Arc<dyn JobStore>) -> Self {
        Self::build(job_id.to_owned(), Some((store, String::new())), false)
    }

    /// Makes this process the log's writer, as `instance`, continuing after `base` stored events
    /// with the state `summary` they led to (and `bytes` stored so far). Starts the writer task.
    pub fn start_writing(&self, instance: &str, base: u64, summary: Summary, bytes: u64) -> Self {
        let Some((store, _)) = &self.shared.store else {
            return self.clone();
        };
        let writer = EventLog::build(
            self.shared.job_id.clone(),
            Some((store.clone(), instance.to_owned())),
            true,
        );
        {
            let mut inner = writer.lock();
            inner.base = base;
            inner.durable = base;
            inner.taken = base;
            inner.written_summary = Some(summary.clone());
            inner.closed = summary.state.is_finished();
            inner.summary = summary;
            inner.bytes = bytes;
        }
        writer.shared.changed.send_replace(base);
        tokio::spawn(write_loop(
            Arc::downgrade(&writer.shared),
            writer.shared.wake.clone(),
        ));
        writer
    }

    pub fn job_id(&self) -> &str {
        &self.shared.job_id
    }

    /// How long the store may keep failing before the job is told.
    pub fn set_failure_grace(&self, grace: Duration) {
        self.shared
            .failure_grace
            .store(grace.as_millis() as u64, Ordering::Relaxed);
    }

    /// Asks to be told (once) when the store has been failing for a while.
    pub fn on_store_failure(&self, hook: impl Fn(&StoreError) + Send + Sync + 'static) {
        let _ = self.shared.on_failure.set(Box::new(hook));
    }

    /// Lets this view read `writer`'s memory: this process has claimed the job and writes its
    /// log now. The view is still woken by the store's notices.
    pub fn read_through(&self, writer: &EventLog) {
        if self.is_view()
            && !Arc::ptr_eq(&self.shared, &writer.shared)
            && self.shared.writer.set(writer.clone()).is_ok()
        {
            let mut mirrors = writer
                .shared
                .mirrors
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            mirrors.retain(|m| m.strong_count() > 0);
            mirrors.push(Arc::downgrade(&self.shared));
        }
    }

    /// Wakes followers of a view: the store says the log has events up to `seq`.
    pub fn notify_stored(&self, seq: u64) {
        self.shared.changed.send_if_modified(|known| {
            let grew = seq > *known;
            *known = (*known).max(seq);
            grew
        });
    }

    /// Whether anyone but the registry's list of views still holds this log.
    pub fn is_followed(&self) -> bool {
        Arc::strong_count(&self.shared) > 1
    }

    /// Whether followers of this log read it from the store rather than memory.
    pub fn is_view(&self) -> bool {
        !self.lock().writes
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the Vec half-written, so a poisoned lock is
        // still consistent; recover it rather than lose every later event.
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and returns its sequence number. After `Done` the log is closed: later
    /// appends are dropped (and return `None`), which is what makes `Done` always last. A view
    /// takes no events.
    pub fn append(&self, kind: EventKind) -> Option<u64> {
        let seq = {
            let mut inner = self.lock();
            if inner.closed || !inner.writes {
                return None;
            }
            let seq = inner.base + inner.events.len() as u64 + 1;
            inner.closed = kind.is_done();
            let event = Event {
                kind,
                timestamp: crate::now_ms(),
            };
            inner.summary.apply(&event);
            inner.events.push(Sequenced { seq, event });
            if self.shared.store.is_none() {
                inner.durable = seq;
            }
            seq
        };
        self.after_write(seq);
        Some(seq)
    }

    fn after_write(&self, seq: u64) {
        if self.shared.store.is_some() {
            self.shared.wake.notify_one();
        } else {
            self.shared.changed.send_replace(seq);
        }
    }

    /// Stores the job's patch (with the next events).
    pub fn set_patch(&self, patch: Bytes, truncated: bool) {
        let seq = {
            let mut inner = self.lock();
            if !inner.writes || self.shared.store.is_none() {
                return;
            }
            inner.pending.bytes += patch.len() as u64;
            inner.pending.patch = Some((patch, truncated));
            inner.durable
        };
        self.after_write(seq);
    }

    /// Stores the agent's transcript, as JSON.
    pub fn set_transcript(&self, transcript: String) {
        let seq = {
            let mut inner = self.lock();
            if !inner.writes || self.shared.store.is_none() {
                return;
            }
            inner.pending.transcript = Some(transcript);
            inner.durable
        };
        self.after_write(seq);
    }

    /// Records an external resource the job holds (or that it has released it).
    pub fn record_resource(&self, resource: Resource) {
        let seq = {
            let mut inner = self.lock();
            if !inner.writes || self.shared.store.is_none() {
                return;
            }
            inner
                .pending
                .resources
                .retain(|r| (&r.kind, &r.external_id) != (&resource.kind, &resource.external_id));
            inner.pending.resources.push(resource);
            inner.durable
        };
        self.after_write(seq);
    }

    /// Waits until everything appended or set so far is stored (or this process can no longer
    /// store it: another instance took the job over).
    pub async fn flushed(&self) {
        let mut changed = self.shared.changed.subscribe();
        loop {
            changed.borrow_and_update();
            {
                let inner = self.lock();
                let last = inner.base + inner.events.len() as u64;
                let settled = inner.durable >= last && !inner.in_flight && inner.pending.is_empty();
                if !inner.writes || settled {
                    return;
                }
            }
            if changed.changed().await.is_err() {
                return;
            }
        }
    }

    /// Hands everything pending to the writer: the events not taken yet, the other writes and
    /// the state, as one batch.
    fn take_batch(&self) -> Option<(Batch, u64)> {
        let mut inner = self.lock();
        if !inner.writes {
            return None;
        }
        let start = (inner.taken - inner.base) as usize;
        let mut batch = std::mem::take(&mut inner.pending);
        let mut bytes = 0u64;
        for item in &inner.events[start..] {
            let json = serde_json::to_string(&item.event).unwrap_or_else(|_| "{}".into());
            bytes += json.len() as u64;
            batch.events.push(NewEvent {
                seq: item.seq,
                json,
            });
        }
        batch.bytes += bytes;
        if inner.written_summary.as_ref() != Some(&inner.summary) {
            batch.result = Some(inner.summary.to_result());
            inner.written_summary = Some(inner.summary.clone());
        }
        if batch.is_empty() {
            return None;
        }
        let last = inner.base + inner.events.len() as u64;
        inner.taken = last;
        inner.in_flight = true;
        inner.bytes += batch.bytes;
        Some((batch, last))
    }

    fn mark_durable(&self, seq: u64) {
        {
            let mut inner = self.lock();
            inner.durable = inner.durable.max(seq);
            inner.in_flight = false;
        }
        self.shared
            .changed
            .send_modify(|known| *known = (*known).max(seq));
        let mirrors = self
            .shared
            .mirrors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for mirror in mirrors.iter().filter_map(Weak::upgrade) {
            EventLog { shared: mirror }.notify_stored(seq);
        }
    }

    /// Another instance holds the job now: stop writing, read the store.
    fn fence(&self) {
        {
            let mut inner = self.lock();
            inner.writes = false;
            inner.in_flight = false;
            inner.closed = true;
        }
        self.shared.changed.send_modify(|_| {});
    }

    /// Every durable event with a sequence number greater than `seq` that this process holds in
    /// memory (all of them, for a log it wrote from the start).
    pub fn replay_after(&self, seq: u64) -> Vec<Sequenced> {
        let inner = self.lock();
        let start = seq.max(inner.base) - inner.base;
        let end = inner.durable.saturating_sub(inner.base);
        let (start, end) = (start as usize, end as usize);
        if start >= end {
            return Vec::new();
        }
        inner.events[start..end.min(inner.events.len())].to_vec()
    }

    /// Reads the events after `seq`: from memory when this process writes the log and holds
    /// them, from the store otherwise.
    async fn read_after(&self, seq: u64) -> Result<Vec<Sequenced>, StoreError> {
        if let Some(writer) = self.shared.writer.get() {
            let inner = writer.lock();
            if inner.writes && seq >= inner.base {
                drop(inner);
                return Ok(writer.replay_after(seq));
            }
        }
        {
            let inner = self.lock();
            if inner.writes && seq >= inner.base {
                drop(inner);
                return Ok(self.replay_after(seq));
            }
        }
        let Some((store, _)) = &self.shared.store else {
            return Ok(Vec::new());
        };
        let stored = store.events_after(&self.shared.job_id, seq, PAGE).await?;
        stored
            .into_iter()
            .map(|e| {
                serde_json::from_str(&e.json)
                    .map(|event| Sequenced { seq: e.seq, event })
                    .map_err(|err| StoreError::Corrupt(format!("event {}: {err}", e.seq)))
            })
            .collect()
    }

    /// Events appended here so far (stored or not).
    pub fn len(&self) -> u64 {
        let inner = self.lock();
        inner.base + inner.events.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `Done` has been appended.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The job's state, folded from every event so far.
    pub fn summary(&self) -> Summary {
        self.lock().summary.clone()
    }

    /// When `Done` was appended, once it has been.
    pub fn finished_at(&self) -> Option<u64> {
        self.lock().summary.finished_at
    }

    /// The stored events' size as JSON, plus the patch.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Whether a reader that has seen up to `seq` has nothing more to come: the log is closed
    /// and `seq` is at or past its end.
    pub fn is_exhausted_after(&self, seq: u64) -> bool {
        let inner = self.lock();
        inner.closed && inner.writes && seq >= inner.base + inner.events.len() as u64
    }

    /// Replays the events after `seq`, then follows live ones; ends after `Done`.
    pub fn follow(&self, seq: u64) -> impl Stream<Item = Sequenced> + Send + 'static {
        self.follow_until(seq, CancellationToken::new())
    }

    /// Like [`EventLog::follow`], but also ends once `stop` is cancelled, after yielding every
    /// event stored by then (so a `Done` appended just before the stop is never cut off).
    pub fn follow_until(
        &self,
        seq: u64,
        stop: CancellationToken,
    ) -> impl Stream<Item = Sequenced> + Send + 'static {
        let log = self.clone();
        let mut changed = self.shared.changed.subscribe();
        async_stream::stream! {
            let mut cursor = seq;
            let mut stopping = false;
            let mut failing_since: Option<tokio::time::Instant> = None;
            loop {
                // Mark the current state as seen *before* reading, so a write that lands after
                // the read still wakes us.
                changed.borrow_and_update();
                let batch = match log.read_after(cursor).await {
                    Ok(batch) => {
                        failing_since = None;
                        batch
                    }
                    Err(err) => {
                        let since = *failing_since.get_or_insert_with(tokio::time::Instant::now);
                        tracing::warn!(job_id = %log.shared.job_id, error = %err, "reading the job's events failed");
                        if since.elapsed() >= READ_GIVE_UP || stopping {
                            return;
                        }
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = stop.cancelled() => stopping = true,
                        }
                        continue;
                    }
                };
                let full = batch.len() >= PAGE;
                for item in batch {
                    cursor = item.seq;
                    let done = item.event.kind.is_done();
                    yield item;
                    if done {
                        return;
                    }
                }
                if full {
                    continue;
                }
                if stopping {
                    return;
                }
                // No "is the log closed?" shortcut here: `Done` may have become durable after the
                // read above, and only the next read can yield it. The watch was marked seen
                // before that read, so `changed` resolves at once in that case.
                let view = log.is_view();
                tokio::select! {
                    changed = changed.changed() => if changed.is_err() {
                        return;
                    },
                    _ = tokio::time::sleep(VIEW_POLL), if view => {}
                    // One last read drains what was stored before the stop.
                    _ = stop.cancelled() => stopping = true,
                }
            }
        }
    }
}

/// Stores what the log's appends leave pending, one transaction per batch, until the log is
/// dropped (a closed log may still get writes: a resource released after `Done`).
async fn write_loop(shared: Weak<Shared>, wake: Arc<Notify>) {
    let mut told = false;
    loop {
        wake.notified().await;
        loop {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let log = EventLog { shared };
            let Some((store, instance)) = log.shared.store.clone() else {
                return;
            };
            let Some((mut batch, mut last)) = log.take_batch() else {
                break;
            };
            let mut backoff = Duration::from_millis(50);
            let started = tokio::time::Instant::now();
            loop {
                match store.append(&log.shared.job_id, &instance, &batch).await {
                    Ok(()) => {
                        if told {
                            tracing::info!(job_id = %log.shared.job_id, "the job store is reachable again");
                            told = false;
                        }
                        log.mark_durable(last);
                        break;
                    }
                    Err(StoreError::LeaseLost) => {
                        tracing::warn!(job_id = %log.shared.job_id, "another instance has taken this job over; no longer writing its log");
                        log.fence();
                        if let Some(hook) = log.shared.on_failure.get() {
                            hook(&StoreError::LeaseLost);
                        }
                        return;
                    }
                    Err(err) => {
                        tracing::warn!(job_id = %log.shared.job_id, error = %err, "storing the job's events failed; retrying");
                        let grace =
                            Duration::from_millis(log.shared.failure_grace.load(Ordering::Relaxed));
                        if !told && started.elapsed() >= grace {
                            told = true;
                            if let Some(hook) = log.shared.on_failure.get() {
                                hook(&err);
                            }
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        // What was appended meanwhile goes into the same transaction.
                        if let Some((more, more_last)) = log.take_batch() {
                            batch.absorb(more);
                            last = more_last;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{DoneStatus, Step, StepState};
    use futures::StreamExt;

    fn status(msg: &str) -> EventKind {
        EventKind::Status {
            step: Step::Queue,
            state: StepState::Started,
            message: msg.into(),
            elapsed_ms: None,
        }
    }

    fn done() -> EventKind {
        EventKind::Done {
            status: DoneStatus::Succeeded,
            pr_url: None,
            branch: None,
            summary: String::new(),
            files_changed: 0,
            duration_ms: 0,
            usage: vec![],
            error: None,
        }
    }

    #[test]
    fn sequence_numbers_are_gap_free_and_done_closes() {
        let log = EventLog::new();
        assert_eq!(log.append(status("a")), Some(1));
        assert_eq!(log.append(status("b")), Some(2));
        assert_eq!(log.append(done()), Some(3));
        assert_eq!(log.append(status("late")), None);
        let seqs: Vec<u64> = log.replay_after(0).iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(
            log.replay_after(1)
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            vec![2, 3]
        );
        assert!(log.replay_after(99).is_empty());
    }

    #[tokio::test]
    async fn follow_replays_then_streams_live_until_done() {
        let log = EventLog::new();
        log.append(status("1"));
        log.append(status("2"));
        let follower = tokio::spawn({
            let log = log.clone();
            async move { log.follow(1).map(|s| s.seq).collect::<Vec<_>>().await }
        });
        tokio::task::yield_now().await;
        for i in 0..50 {
            log.append(status(&i.to_string()));
        }
        log.append(done());
        let seqs = follower.await.unwrap();
        assert_eq!(seqs, (2..=53).collect::<Vec<u64>>());
    }

    /// Regression: a follower reading while `Done` is appended must still yield `Done` last.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn follow_never_ends_without_done_when_it_races_the_append() {
        for _ in 0..500 {
            let log = EventLog::new();
            log.append(status("a"));
            let follower = tokio::spawn({
                let log = log.clone();
                async move { log.follow(0).collect::<Vec<_>>().await }
            });
            let appender = std::thread::spawn({
                let log = log.clone();
                move || {
                    log.append(status("b"));
                    log.append(done());
                }
            });
            appender.join().unwrap();
            let events = follower.await.unwrap();
            assert!(events.last().unwrap().event.kind.is_done());
            assert_eq!(events.len(), 3);
        }
    }

    async fn memory_store() -> Arc<dyn JobStore> {
        Arc::new(
            crate::store::sqlite::SqliteStore::open("sqlite::memory:")
                .await
                .unwrap(),
        )
    }

    async fn stored_job(store: &Arc<dyn JobStore>, id: &str) {
        let job = crate::store::NewJob {
            id: id.into(),
            owner: None,
            repo_url: "https://github.com/a/b".into(),
            prompt: "p".into(),
            request: "{}".into(),
            created_at: crate::now_ms(),
            idempotency: None,
        };
        let admission = crate::store::Admission {
            max_queued: 10,
            max_jobs_per_key: None,
            key_rate_per_min: None,
        };
        store
            .create_job(job, &admission, Box::new(|_| Vec::new()))
            .await
            .unwrap()
            .unwrap();
        store
            .claim_queued(id, "me", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
    }

    /// What a follower sees is stored: a view that reads only the store gets the same events,
    /// and a writer's followers see nothing before it is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_are_stored_before_followers_see_them_and_views_read_the_store() {
        let store = memory_store().await;
        stored_job(&store, "j1").await;
        let log = EventLog::view("j1", store.clone()).start_writing("me", 0, Summary::default(), 0);
        let follower = tokio::spawn({
            let log = log.clone();
            let store = store.clone();
            async move {
                let mut seen = Vec::new();
                let mut events = Box::pin(log.follow(0));
                while let Some(item) = events.next().await {
                    // Whatever a follower is given is already in the store.
                    let stored = store.events_after("j1", item.seq - 1, 1).await.unwrap();
                    assert_eq!(stored.len(), 1, "event {} not stored yet", item.seq);
                    seen.push(item);
                }
                seen
            }
        });
        for i in 0..200 {
            log.append(status(&i.to_string()));
        }
        log.set_patch(Bytes::from_static(b"diff"), false);
        log.append(done());
        log.flushed().await;
        let seen = follower.await.unwrap();
        assert_eq!(seen.len(), 201);
        let view: Vec<Sequenced> = EventLog::view("j1", store.clone())
            .follow(0)
            .collect()
            .await;
        assert_eq!(view, seen);
        let record = store.job("j1").await.unwrap().unwrap();
        assert_eq!(record.last_seq, 201);
        assert_eq!(record.state, crate::store::JobState::Succeeded);
        assert_eq!(
            store.patch("j1").await.unwrap(),
            Some((Bytes::from_static(b"diff"), false))
        );
    }

    /// Writes after `Done` (a sandbox released by the reaper) are still stored.
    #[tokio::test]
    async fn writes_after_done_are_still_stored() {
        let store = memory_store().await;
        stored_job(&store, "j3").await;
        let log = EventLog::view("j3", store.clone()).start_writing("me", 0, Summary::default(), 0);
        log.append(done());
        log.flushed().await;
        log.record_resource(Resource {
            kind: "sandbox".into(),
            backend: "e2b".into(),
            external_id: "sbx-1".into(),
            released: true,
        });
        tokio::time::timeout(Duration::from_secs(10), log.flushed())
            .await
            .expect("stored");
        let resources = store.resources("j3").await.unwrap();
        assert_eq!(resources.len(), 1);
        assert!(resources[0].released);
    }

    /// A writer whose job was taken over by another instance stops writing and reads the store.
    #[tokio::test]
    async fn a_log_whose_job_was_taken_over_stops_writing() {
        let store = memory_store().await;
        stored_job(&store, "j2").await;
        let log = EventLog::view("j2", store.clone()).start_writing("me", 0, Summary::default(), 0);
        log.append(status("mine"));
        log.flushed().await;
        // Another instance takes the job over (as the reaper does once a lease has expired).
        store
            .take_over("j2", "other", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        log.append(status("too late"));
        log.flushed().await;
        assert!(log.is_view());
        let stored = store.events_after("j2", 0, 10).await.unwrap();
        assert_eq!(stored.len(), 1);
    }
}
