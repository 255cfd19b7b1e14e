//! SSE framing: one `id:` line and one `data:` line per event, no `event:` line, and
//! `: keep-alive` comments while nothing else is sent.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::job::{EventLog, Sequenced};

pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The exact bytes of one event on the wire (what axum's `Sse` writes for it).
pub fn sse_frame(item: &Sequenced) -> String {
    format!(
        "id: {}\ndata: {}\n\n",
        item.seq,
        serde_json::to_string(&item.event).unwrap_or_else(|_| "{}".into())
    )
}

fn to_sse(item: Sequenced) -> Result<SseEvent, Infallible> {
    // serde_json never writes raw newlines, so the JSON stays on one `data:` line.
    let data = serde_json::to_string(&item.event).unwrap_or_else(|_| "{}".into());
    Ok(SseEvent::default().id(item.seq.to_string()).data(data))
}

/// Replays `log` after `after` and follows it to `Done`, or until `stopped` (the server's
/// shutdown has ended), so that no stream outlives the process's jobs.
pub fn stream(
    log: &EventLog,
    after: u64,
    stopped: CancellationToken,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static> {
    Sse::new(log.follow_until(after, stopped).map(to_sse))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{EventKind, Step, StepState};
    use axum::response::IntoResponse;

    #[tokio::test(start_paused = true)]
    async fn idle_streams_send_keep_alive_comments_every_15_s() {
        let log = EventLog::new();
        log.append(EventKind::Status {
            step: Step::Queue,
            state: StepState::Started,
            message: "Queued".into(),
            elapsed_ms: None,
        });
        let mut body = stream(&log, 0, CancellationToken::new())
            .into_response()
            .into_body()
            .into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(
            String::from_utf8(first.to_vec()).unwrap(),
            sse_frame(&log.replay_after(0)[0])
        );
        let started = tokio::time::Instant::now();
        let second = body.next().await.unwrap().unwrap();
        assert_eq!(&second[..], b": keep-alive\n\n");
        assert_eq!(started.elapsed(), KEEP_ALIVE);
    }

    /// A stream of a job that never wrote `Done` still ends once the server has stopped, so
    /// graceful shutdown cannot hang on it.
    #[tokio::test(start_paused = true)]
    async fn streams_end_when_the_server_has_stopped() {
        let log = EventLog::new();
        log.append(EventKind::Status {
            step: Step::Queue,
            state: StepState::Started,
            message: "Queued".into(),
            elapsed_ms: None,
        });
        let stopped = CancellationToken::new();
        let body = stream(&log, 0, stopped.clone())
            .into_response()
            .into_body()
            .into_data_stream();
        let reader = tokio::spawn(async move { body.collect::<Vec<_>>().await.len() });
        tokio::time::sleep(Duration::from_secs(50)).await;
        assert!(!reader.is_finished());
        stopped.cancel();
        // The event, then a keep-alive at 15, 30 and 45 s; then the stream ends.
        let chunks = reader.await.unwrap();
        assert_eq!(chunks, 1 + 3);
    }
}
