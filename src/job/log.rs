//! The append-only event log of one job: gap-free sequence numbers, replay, live follow.
//!
//! Events are stored in a `Vec` (the source of truth) and a `watch` channel only says "the log
//! grew". A subscriber keeps its own cursor and re-reads the log, so a slow subscriber never loses
//! an event and never needs a lagging broadcast buffer.
//!
//! The log also keeps the job's state folded as events arrive ([`Summary`]) and its size in bytes,
//! so `GET /jobs/{id}` and retention never re-read or copy the events.

use std::sync::{Arc, Mutex, MutexGuard};

use futures::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::state::Summary;
use crate::event::{Event, EventKind};

/// An event with its sequence number (1-based, gap-free within a job).
#[derive(Debug, Clone, PartialEq)]
pub struct Sequenced {
    pub seq: u64,
    pub event: Event,
}

#[derive(Debug)]
struct Inner {
    events: Vec<Sequenced>,
    closed: bool,
    summary: Summary,
    /// The events' size as JSON, for retention by bytes.
    bytes: usize,
}

/// Shared handle to one job's log. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct EventLog {
    inner: Arc<Mutex<Inner>>,
    len_tx: Arc<watch::Sender<u64>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

impl EventLog {
    pub fn new() -> Self {
        let (len_tx, _) = watch::channel(0);
        Self {
            inner: Arc::new(Mutex::new(Inner {
                events: Vec::new(),
                closed: false,
                summary: Summary::default(),
                bytes: 0,
            })),
            len_tx: Arc::new(len_tx),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the Vec half-written, so a poisoned lock is
        // still consistent; recover it rather than lose every later event.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends an event and returns its sequence number. After `Done` the log is closed: later
    /// appends are dropped (and return `None`), which is what makes `Done` always last.
    pub fn append(&self, kind: EventKind) -> Option<u64> {
        // Sized outside the lock: a `Diff` event can be hundreds of KiB of JSON, and readers wait
        // on this lock. The `timestamp` field adds at most 27 bytes.
        let bytes = serde_json::to_vec(&kind).map_or(0, |v| v.len()) + 27;
        let seq = {
            let mut inner = self.lock();
            if inner.closed {
                return None;
            }
            let seq = inner.events.len() as u64 + 1;
            inner.closed = kind.is_done();
            let event = Event {
                kind,
                timestamp: crate::now_ms(),
            };
            inner.bytes += bytes;
            inner.summary.apply(&event);
            inner.events.push(Sequenced { seq, event });
            seq
        };
        self.len_tx.send_replace(seq);
        Some(seq)
    }

    /// Every event with a sequence number greater than `seq`.
    pub fn replay_after(&self, seq: u64) -> Vec<Sequenced> {
        let inner = self.lock();
        let start = (seq as usize).min(inner.events.len());
        inner.events[start..].to_vec()
    }

    pub fn len(&self) -> u64 {
        self.lock().events.len() as u64
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

    /// The stored events' size as JSON.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Whether a reader that has seen up to `seq` has nothing more to come: the log is closed
    /// and `seq` is at or past its end.
    pub fn is_exhausted_after(&self, seq: u64) -> bool {
        let inner = self.lock();
        inner.closed && seq >= inner.events.len() as u64
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
        let mut len_rx = self.len_tx.subscribe();
        async_stream::stream! {
            let mut cursor = seq;
            let mut stopping = false;
            loop {
                // Mark the current length as seen *before* reading, so an append that lands after
                // the read still wakes us.
                len_rx.borrow_and_update();
                let batch = log.replay_after(cursor);
                for item in batch {
                    cursor = item.seq;
                    let done = item.event.kind.is_done();
                    yield item;
                    if done {
                        return;
                    }
                }
                if stopping {
                    return;
                }
                // No "is the log closed?" shortcut here: `Done` may have been appended after the
                // read above, and only the next read can yield it. The watch was marked seen before
                // that read, so `changed` resolves at once in that case.
                tokio::select! {
                    changed = len_rx.changed() => if changed.is_err() {
                        return;
                    },
                    // One last read drains what was stored before the stop.
                    _ = stop.cancelled() => stopping = true,
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
}
