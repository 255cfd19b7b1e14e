//! SSE framing: one `id:` line and one `data:` line per event, no `event:` line, and
//! `: keep-alive` comments while nothing else is sent.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures::{Stream, StreamExt};

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

/// Replays `log` after `after` and follows it to `Done`.
pub fn stream(
    log: &EventLog,
    after: u64,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static> {
    Sse::new(log.follow(after).map(to_sse))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive"))
}
