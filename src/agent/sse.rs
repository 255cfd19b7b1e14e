//! What the HTTP providers share: server-sent events off a streaming response folded into a turn
//! by a protocol's [`TurnParser`], the HTTP client with its timeouts, bounded error bodies, and
//! scrubbing the API key out of anything we report.

use std::time::Duration;

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures::{Stream, StreamExt};
use reqwest::header::{CONTENT_TYPE, HeaderValue};

use super::provider::{ProviderError, TextSink, Turn};
use super::retry::{classify_http, transport_error};

/// How long to wait for a TCP (and TLS) connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a response may stay silent (no header, no byte of body) before we give up on it.
/// The official SDKs' read timeout: a reasoning model may think for minutes before its first
/// token, though streaming servers usually send `ping`s or deltas far more often.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Error bodies are read up to this many bytes; the message keeps less.
const ERROR_BODY_LIMIT: usize = 16 * 1024;
const ERROR_MESSAGE_LIMIT: usize = 600;

/// A client whose every request has a connect timeout and a per-read idle timeout (which covers
/// the wait for headers and every gap in a stream), but no total timeout, so long streams live.
pub(crate) fn http_client(connect: Duration, idle: Duration) -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(idle)
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))
}

/// A header value for a secret; marked sensitive so it is never printed by `Debug`. The error
/// never includes the value.
pub(crate) fn secret_header(value: &str, variable: &str) -> Result<HeaderValue, String> {
    let mut header = HeaderValue::from_str(value)
        .map_err(|_| format!("{variable} contains characters that cannot be sent in a header"))?;
    header.set_sensitive(true);
    Ok(header)
}

/// Checks a configured base URL and returns it without a trailing slash.
pub(crate) fn normalize_base_url(raw: &str, variable: &str) -> Result<String, String> {
    let trimmed = raw.trim();
    let url = url::Url::parse(trimmed)
        .map_err(|e| format!("{variable} is not a valid URL ({e}): {trimmed:?}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "{variable} must be an http or https URL: {trimmed:?}"
        ));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(format!(
            "{variable} must not carry credentials, a query or a fragment"
        ));
    }
    Ok(trimmed.trim_end_matches('/').to_owned())
}

/// Whether the server answered with an event stream (rather than one JSON document, which some
/// compatible servers send even when asked to stream).
pub(crate) fn is_event_stream(response: &reqwest::Response) -> bool {
    response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

/// What one event did to the turn being assembled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fed {
    /// Nothing the user sees; read on.
    Nothing,
    /// The model wrote this text; read on.
    Text(String),
    /// The protocol's closing event: stop reading.
    End,
}

/// One wire protocol's event stream folded into a [`Turn`], an event at a time and with no I/O,
/// so each protocol is tested on recorded streams and the reading lives in one place.
pub(crate) trait TurnParser {
    /// Applies one event: its `event:` name (`message` when the stream gave none) and `data:`.
    fn feed(&mut self, event: &str, data: &str) -> Result<Fed, ProviderError>;

    /// The turn, once [`Fed::End`] came or the events ran out; an error when the stream
    /// stopped before the turn was complete.
    fn finish(self) -> Result<Turn, ProviderError>;
}

/// Reads a streaming response into `parser`, handing text to `sink` as it arrives.
pub(crate) async fn read_turn(
    response: reqwest::Response,
    provider: &'static str,
    parser: impl TurnParser,
    sink: &dyn TextSink,
) -> Result<Turn, ProviderError> {
    fold(
        decode(response.bytes_stream(), provider),
        provider,
        parser,
        sink,
    )
    .await
}

/// Feeds `events` to `parser` until it has the turn. A broken stream is an error at once, even
/// when what came before would have been enough.
async fn fold<P: TurnParser>(
    mut events: impl Stream<Item = Result<Event, ProviderError>> + Unpin,
    provider: &str,
    mut parser: P,
    sink: &dyn TextSink,
) -> Result<Turn, ProviderError> {
    while let Some(event) = events.next().await {
        let event = event?;
        match parser.feed(&event.event, &event.data)? {
            Fed::Nothing => {}
            Fed::Text(text) => sink.text_delta(provider, &text),
            Fed::End => break,
        }
    }
    parser.finish()
}

/// The events in a response body. A connection that breaks, or a read that times out, becomes a
/// [`Retryable`](super::provider::FailureKind::Retryable) error.
fn decode<B: AsRef<[u8]>>(
    bytes: impl Stream<Item = Result<B, reqwest::Error>> + Unpin,
    provider: &'static str,
) -> impl Stream<Item = Result<Event, ProviderError>> + Unpin {
    bytes.eventsource().map(move |item| {
        item.map_err(|error| match error {
            EventStreamError::Transport(e) => transport_error(&format!("{provider} stream"), &e),
            other => {
                ProviderError::retryable(format!("{provider}: malformed event stream: {other}"))
            }
        })
    })
}

/// Reads a whole (non-streamed) JSON body.
pub(crate) async fn json_body(
    response: reqwest::Response,
    provider: &'static str,
) -> Result<serde_json::Value, ProviderError> {
    let bytes = response
        .bytes()
        .await
        .map_err(|e| transport_error(&format!("{provider} response"), &e))?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ProviderError::retryable(format!("{provider}: the response is not valid JSON: {e}"))
    })
}

/// Turns a non-2xx response into a classified error. `describe` pulls a short description out of
/// the provider's JSON error body; `secret` is scrubbed from the message in case a server echoed it.
pub(crate) async fn http_error(
    response: reqwest::Response,
    provider: &'static str,
    secret: &str,
    describe: fn(&serde_json::Value) -> Option<String>,
) -> ProviderError {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= ERROR_BODY_LIMIT {
            break;
        }
    }
    let detail = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| describe(&v))
        .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
    let detail = truncate(&scrub(&detail, secret), ERROR_MESSAGE_LIMIT);
    let message = if detail.is_empty() {
        format!("{provider} returned HTTP {status}")
    } else {
        format!("{provider} returned HTTP {status}: {detail}")
    };
    classify_http(status, &headers, message)
}

/// `text` with every occurrence of `secret` replaced.
pub(crate) fn scrub(text: &str, secret: &str) -> String {
    if secret.len() >= 4 && text.contains(secret) {
        text.replace(secret, crate::redact::MARKER)
    } else {
        text.to_owned()
    }
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Parses the arguments of a tool call the way the tool layer wants them: a JSON value, or
/// `Null` plus the raw text when the model produced something that is not JSON. An empty string
/// means no arguments.
pub(crate) fn parse_arguments(raw: &str) -> (serde_json::Value, Option<String>) {
    if raw.trim().is_empty() {
        return (serde_json::Value::Object(serde_json::Map::new()), None);
    }
    match serde_json::from_str(raw) {
        Ok(value) => (value, None),
        Err(_) => (serde_json::Value::Null, Some(raw.to_owned())),
    }
}

/// What the providers' parser tests share: raw SSE text run through a parser the way a response
/// body would feed it, and builders for the values they compare.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Mutex;

    use super::*;
    use crate::agent::provider::{FailureKind, TokenUsage};
    use crate::agent::transcript::Part;

    /// A [`ProviderError`] as a value a test can compare whole.
    pub(crate) type Failure = (FailureKind, Option<u16>, String);

    /// Bytes per read: small and odd, so events, lines and UTF-8 characters arrive split.
    const READ_SIZE: usize = 13;

    #[derive(Default)]
    struct Collected(Mutex<Vec<String>>);

    impl TextSink for Collected {
        fn text_delta(&self, _provider: &str, delta: &str) {
            if let Ok(mut deltas) = self.0.lock() {
                deltas.push(delta.to_owned());
            }
        }
    }

    /// The turn (or error) `parser` makes of `sse`, and the text deltas it streamed, in order.
    pub(crate) fn read(parser: impl TurnParser, sse: &str) -> (Result<Turn, Failure>, Vec<String>) {
        let reads = sse
            .as_bytes()
            .chunks(READ_SIZE)
            .map(Ok::<_, reqwest::Error>);
        let sink = Collected::default();
        let turn = futures::executor::block_on(fold(
            decode(futures::stream::iter(reads), "test"),
            "test",
            parser,
            &sink,
        ));
        let turn = turn.map_err(|e| (e.kind, e.status, e.message));
        (turn, sink.0.into_inner().unwrap_or_default())
    }

    /// A tool call whose arguments parsed.
    pub(crate) fn call(id: &str, name: &str, arguments: serde_json::Value) -> Part {
        Part::ToolCall {
            id: id.into(),
            name: name.into(),
            arguments,
            raw_arguments: None,
        }
    }

    /// A tool call whose arguments are not JSON.
    pub(crate) fn broken_call(id: &str, name: &str, raw: &str) -> Part {
        Part::ToolCall {
            id: id.into(),
            name: name.into(),
            arguments: serde_json::Value::Null,
            raw_arguments: Some(raw.into()),
        }
    }

    pub(crate) fn text(text: &str) -> Part {
        Part::Text { text: text.into() }
    }

    pub(crate) fn usage(input_tokens: u64, output_tokens: u64) -> TokenUsage {
        TokenUsage {
            input_tokens,
            output_tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments() {
        assert_eq!(
            parse_arguments(r#"{"path":"a"}"#),
            (serde_json::json!({"path": "a"}), None)
        );
        assert_eq!(parse_arguments(""), (serde_json::json!({}), None));
        assert_eq!(
            parse_arguments(r#"{"path":"#),
            (serde_json::Value::Null, Some(r#"{"path":"#.to_owned()))
        );
    }

    #[test]
    fn base_urls() {
        assert_eq!(
            normalize_base_url("http://localhost:11434/v1/", "X").unwrap(),
            "http://localhost:11434/v1"
        );
        assert!(normalize_base_url("ftp://x", "X").is_err());
        assert!(normalize_base_url("https://u:p@x", "X").is_err());
        assert!(normalize_base_url("not a url", "X").is_err());
    }

    #[test]
    fn scrubbing() {
        assert_eq!(
            scrub("key sk-secret-1 echoed", "sk-secret-1"),
            "key [REDACTED] echoed"
        );
        assert_eq!(truncate("ééé", 3), "é…");
    }
}
