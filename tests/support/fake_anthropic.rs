//! A fake Anthropic Messages API (`POST /v1/messages`) that replays scripted replies, streamed as
//! named SSE events or as one JSON message, and records every request (headers + JSON body).
//!
//! It follows `shared/reference/llm-apis.md` to the byte and is checked by the official
//! `anthropic` SDK with strict response validation (`tests/llm_conformance.rs`). Like the real
//! API it rejects requests that break the Messages rules our client must follow: a missing key
//! or `anthropic-version`, sampling parameters, empty text blocks, a `tool_use` without its
//! `tool_result`, tool results after text.
//!
//! The scripted-reply types ([`Reply`], [`ScriptedTurn`], [`Block`]) are shared with
//! `fake_openai`, so one script can drive either provider.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::post;
use futures::StreamExt;
use serde_json::{Value, json};

use super::faults::{FaultPlan, Injected};

/// One piece of a scripted assistant turn.
#[derive(Debug, Clone, PartialEq)]
pub enum Block {
    Text(String),
    ToolCall {
        id: String,
        name: String,
        input: Value,
    },
    /// A tool call whose arguments are not valid JSON (streamed replies only; a non-streamed
    /// Anthropic reply sends `{}` since `input` must be an object there).
    RawToolCall {
        id: String,
        name: String,
        raw: String,
    },
    /// A thinking block (Anthropic) / reasoning item (OpenAI Responses); ignored by Chat.
    Thinking {
        thinking: String,
        signature: String,
    },
}

/// An assistant turn to replay. `stop` uses Anthropic's vocabulary (`tool_use`, `end_turn`,
/// `max_tokens`, `refusal`, …); the OpenAI fake translates it.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedTurn {
    pub blocks: Vec<Block>,
    pub stop: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

impl ScriptedTurn {
    pub fn new(blocks: Vec<Block>, stop: &str) -> Self {
        Self {
            blocks,
            stop: stop.to_owned(),
            input_tokens: 25,
            output_tokens: 12,
        }
    }

    /// Text only, `end_turn`.
    pub fn text(text: &str) -> Self {
        Self::new(vec![Block::Text(text.to_owned())], "end_turn")
    }

    /// One tool call, `tool_use`.
    pub fn tool_call(id: &str, name: &str, input: Value) -> Self {
        Self::new(vec![Block::call(id, name, input)], "tool_use")
    }

    pub fn with_usage(mut self, input_tokens: u64, output_tokens: u64) -> Self {
        self.input_tokens = input_tokens;
        self.output_tokens = output_tokens;
        self
    }
}

impl Block {
    pub fn text(text: &str) -> Self {
        Self::Text(text.to_owned())
    }

    pub fn call(id: &str, name: &str, input: Value) -> Self {
        Self::ToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            input,
        }
    }

    pub fn raw_call(id: &str, name: &str, raw: &str) -> Self {
        Self::RawToolCall {
            id: id.to_owned(),
            name: name.to_owned(),
            raw: raw.to_owned(),
        }
    }
}

/// What the fake answers to one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// An assistant turn, streamed when the request asked for it.
    Turn(ScriptedTurn),
    /// An HTTP error with the provider's error body. `kind` is Anthropic's `error.type`, or
    /// OpenAI's `error.type` and `error.code`.
    Error {
        status: u16,
        kind: String,
        message: String,
        headers: Vec<(String, String)>,
    },
    /// HTTP 200 and the first `after` events of the streamed turn, then the connection drops
    /// (no terminating chunk).
    Cut { turn: ScriptedTurn, after: usize },
    /// HTTP 200 and the first `after` events of the streamed turn, then a clean end of body
    /// without the closing event.
    EndEarly { turn: ScriptedTurn, after: usize },
    /// HTTP 200 and the first `after` events of the streamed turn, then an in-stream error.
    StreamError {
        turn: ScriptedTurn,
        after: usize,
        kind: String,
        message: String,
    },
    /// An error whose `error` is a bare string rather than an object, as some compatible servers
    /// send it: after the first `after` events of the streamed turn, or as the whole 200 body
    /// when the reply is not streamed.
    BareError {
        turn: ScriptedTurn,
        after: usize,
        message: String,
    },
    /// HTTP 200 with an event-stream content type, then silence.
    Stall,
}

impl Reply {
    pub fn turn(turn: ScriptedTurn) -> Self {
        Self::Turn(turn)
    }

    pub fn text(text: &str) -> Self {
        Self::Turn(ScriptedTurn::text(text))
    }

    pub fn tool_call(id: &str, name: &str, input: Value) -> Self {
        Self::Turn(ScriptedTurn::tool_call(id, name, input))
    }

    pub fn error(status: u16, kind: &str, message: &str) -> Self {
        Self::Error {
            status,
            kind: kind.to_owned(),
            message: message.to_owned(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        if let Self::Error { headers, .. } = &mut self {
            headers.push((name.to_owned(), value.to_owned()));
        }
        self
    }

    pub fn overloaded() -> Self {
        Self::error(529, "overloaded_error", "Overloaded")
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        Self::error(
            429,
            "rate_limit_error",
            "Number of requests has exceeded your rate limit",
        )
        .with_header("retry-after", &retry_after_secs.to_string())
    }

    pub fn server_error() -> Self {
        Self::error(500, "api_error", "Internal server error")
    }

    pub fn unauthorized() -> Self {
        Self::error(401, "authentication_error", "invalid x-api-key")
    }

    pub fn forbidden() -> Self {
        Self::error(
            403,
            "permission_error",
            "Your API key does not have permission",
        )
    }

    pub fn cut(turn: ScriptedTurn, after: usize) -> Self {
        Self::Cut { turn, after }
    }
}

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Lower-case names; repeated headers joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The JSON body (`Null` when it was not JSON).
    pub body: Value,
    /// The body exactly as received.
    pub raw_body: String,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

pub(crate) fn record(method: &str, path: &str, headers: &HeaderMap, body: &Bytes) -> Recorded {
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        map.entry(name.as_str().to_owned())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Recorded {
        method: method.to_owned(),
        path: path.to_owned(),
        headers: map,
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        raw_body: String::from_utf8_lossy(body).into_owned(),
    }
}

/// Answers a request from its JSON body when no scripted reply is queued: a model that follows
/// a rule instead of a script (long runs, where each job needs its own turns).
pub type Responder = Arc<dyn Fn(&Value) -> Reply + Send + Sync>;

/// State shared by a fake's handlers.
#[derive(Default)]
pub(crate) struct Script {
    pub replies: VecDeque<Reply>,
    pub requests: Vec<Recorded>,
    /// Answer with one JSON document even when the request asked to stream.
    pub ignore_stream: bool,
    /// When set, the only key accepted.
    pub expected_key: Option<String>,
    pub served: u64,
    /// Replies kept for the requests whose first message contains the marker (Anthropic only):
    /// see [`FakeServer::push_for`].
    pub routes: Vec<(String, VecDeque<Reply>)>,
    /// Used when the queue is empty.
    pub responder: Option<Responder>,
    /// Seeded random faults (routes `anthropic.messages`, `openai.chat`, `openai.responses`).
    pub plan: Option<Arc<FaultPlan>>,
    /// Do not keep requests (long runs).
    pub quiet: bool,
}

impl Script {
    /// The next reply for a request: its marker's queue, the common queue, then the responder.
    pub fn next_reply(&mut self, first_message: Option<&str>, body: &Value) -> Option<Reply> {
        let routed = first_message.and_then(|first| {
            self.routes
                .iter()
                .position(|(m, _)| first.contains(m.as_str()))
        });
        let reply = match routed {
            Some(i) => self.routes[i].1.pop_front(),
            None => self.replies.pop_front(),
        };
        reply.or_else(|| self.responder.as_ref().map(|r| r(body)))
    }

    /// The random fault (and delay) for a request on `route`.
    pub fn draw(&self, route: &str) -> (Duration, Option<Injected>) {
        match &self.plan {
            Some(plan) => {
                let draw = plan.draw(route);
                (draw.delay, draw.fault)
            }
            None => (Duration::ZERO, None),
        }
    }

    pub fn record(&mut self, recorded: &Recorded) {
        if !self.quiet {
            self.requests.push(recorded.clone());
        }
    }
}

/// The reply to a request that drew `fault`: an error status instead of the model (`kind` names
/// the vendor's error type for it; the scripted turn stays queued), a streamed turn cut after its
/// first few events, or the model's answer lost to a closed connection. `next` takes the reply a
/// clean request gets.
#[allow(clippy::result_large_err)] // the error is the response itself, returned once per request
pub(crate) fn faulty_reply(
    fault: Option<Injected>,
    kind: fn(u16) -> &'static str,
    next: impl FnOnce() -> Option<Reply>,
) -> Result<Option<Reply>, Response> {
    match fault {
        None => Ok(next()),
        Some(Injected::Status(status)) => Ok(Some(Reply::error(
            status,
            kind(status),
            "fake: injected failure",
        ))),
        Some(Injected::CutStream) => Ok(next().map(|reply| match reply {
            Reply::Turn(turn) => Reply::Cut { turn, after: 4 },
            other => other,
        })),
        Some(Injected::StatusAfter(_) | Injected::CloseAfter) => {
            next();
            Err(super::faults::closed_response())
        }
    }
}

/// Splits `text` into pieces of at most `size` characters, the way deltas arrive.
pub(crate) fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// One SSE frame: an optional `event:` name and a `data:` payload.
pub(crate) fn frame(event: Option<&str>, data: &str) -> Bytes {
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// How a stream ends after its frames.
pub(crate) enum Ending {
    Complete,
    Cut,
    Early,
    Then(Bytes),
    Stall,
}

/// An event-stream response made of `frames`, ended as `ending` says.
pub(crate) fn sse_response(frames: Vec<Bytes>, ending: Ending) -> Response {
    let frames = futures::stream::iter(frames.into_iter().map(Ok::<_, std::io::Error>));
    let body = match ending {
        Ending::Complete | Ending::Early => Body::from_stream(frames),
        Ending::Then(last) => Body::from_stream(frames.chain(futures::stream::iter([Ok(last)]))),
        Ending::Cut => Body::from_stream(frames.chain(futures::stream::iter([Err(
            std::io::Error::new(std::io::ErrorKind::ConnectionReset, "fake: stream cut"),
        )]))),
        Ending::Stall => Body::from_stream(frames.chain(futures::stream::pending())),
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/event-stream; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap()
}

pub(crate) fn json_response(status: u16, body: &Value, headers: &[(String, String)]) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        builder = builder.header(name.as_str(), value.as_str());
    }
    builder.body(Body::from(body.to_string())).unwrap()
}

/// A running fake server; it stops when dropped.
pub struct FakeServer {
    pub(crate) addr: SocketAddr,
    pub(crate) script: Arc<Mutex<Script>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeServer {
    pub(crate) async fn start(router: Router, script: Arc<Mutex<Script>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.ok();
        });
        Self { addr, script, task }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Queues replies, answered in order, one per request.
    pub fn push(&self, replies: impl IntoIterator<Item = Reply>) {
        self.script.lock().unwrap().replies.extend(replies);
    }

    /// Queues replies answered, in order, only to requests whose first message (the job's prompt)
    /// contains `marker`, so that concurrent jobs each follow their own script whatever the order
    /// their requests arrive in. Other requests take the common queue ([`push`](Self::push)).
    /// Honoured by the Anthropic fake.
    pub fn push_for(&self, marker: &str, replies: impl IntoIterator<Item = Reply>) {
        let mut script = self.script.lock().unwrap();
        match script.routes.iter_mut().find(|(m, _)| m == marker) {
            Some((_, queue)) => queue.extend(replies),
            None => script
                .routes
                .push((marker.to_owned(), replies.into_iter().collect())),
        }
    }

    /// Answers requests from their body when no scripted reply is queued.
    pub fn set_responder(&self, responder: Responder) {
        self.script.lock().unwrap().responder = Some(responder);
    }

    /// Seeded random faults on every later request.
    pub fn set_fault_plan(&self, plan: Arc<FaultPlan>) {
        self.script.lock().unwrap().plan = Some(plan);
    }

    /// Whether requests are kept for [`Self::requests`] (default on; off for long runs).
    pub fn set_recording(&self, record: bool) {
        self.script.lock().unwrap().quiet = !record;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.script.lock().unwrap().requests.clone()
    }

    /// How many scripted replies are still queued.
    pub fn remaining(&self) -> usize {
        self.script.lock().unwrap().replies.len()
    }

    /// Answer with one JSON document even when asked to stream (as some compatible servers do).
    pub fn ignore_stream(&self, ignore: bool) {
        self.script.lock().unwrap().ignore_stream = ignore;
    }

    /// Accept only this key (any key is accepted otherwise).
    pub fn expect_key(&self, key: &str) {
        self.script.lock().unwrap().expected_key = Some(key.to_owned());
    }
}

/// The fake Anthropic API.
pub struct FakeAnthropic {
    server: FakeServer,
}

impl std::ops::Deref for FakeAnthropic {
    type Target = FakeServer;
    fn deref(&self) -> &FakeServer {
        &self.server
    }
}

impl FakeAnthropic {
    pub async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let router = Router::new()
            .route("/v1/messages", post(messages))
            .with_state(script.clone());
        Self {
            server: FakeServer::start(router, script).await,
        }
    }

    /// The base URL for the client: no `/v1`, like `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        self.origin()
    }
}

/// Anthropic's `error.type` for a status.
fn anthropic_error_kind(status: u16) -> &'static str {
    match status {
        429 => "rate_limit_error",
        529 => "overloaded_error",
        401 => "authentication_error",
        _ => "api_error",
    }
}

fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_fake"})
}

fn error_response(
    status: u16,
    kind: &str,
    message: &str,
    headers: &[(String, String)],
) -> Response {
    let mut headers = headers.to_vec();
    headers.push(("request-id".to_owned(), "req_fake".to_owned()));
    json_response(status, &error_body(kind, message), &headers)
}

fn invalid(message: String) -> Response {
    error_response(400, "invalid_request_error", &message, &[])
}

/// The key the request authenticated with: `x-api-key` (preferred, as the API does) or Bearer.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    if let Some(key) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(key.to_owned());
    }
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned)
}

/// The Messages API rules a request must follow; `Err` holds the 400 message.
fn validate(body: &Value) -> Result<(), String> {
    for field in ["model", "max_tokens", "messages"] {
        if body.get(field).is_none() {
            return Err(format!("{field}: Field required"));
        }
    }
    for field in ["temperature", "top_p", "top_k"] {
        if body.get(field).is_some() {
            return Err(format!(
                "{field}: sampling parameters are not supported with anthropic-version 2026-10-21"
            ));
        }
    }
    let messages = body["messages"]
        .as_array()
        .ok_or("messages: Input should be a list")?;
    let mut pending: Vec<String> = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        let role = message["role"].as_str().unwrap_or("");
        if i == 0 && role != "user" {
            return Err("messages: the first message must use the user role".into());
        }
        let blocks: Vec<Value> = match &message["content"] {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(blocks) => blocks.clone(),
            _ => return Err(format!("messages.{i}.content: Input should be a list")),
        };
        let mut answered = Vec::new();
        let mut seen_other = false;
        for (j, block) in blocks.iter().enumerate() {
            match block["type"].as_str() {
                Some("text") => {
                    if block["text"].as_str().unwrap_or("").trim().is_empty() {
                        return Err(format!(
                            "messages.{i}.content.{j}.text: text content blocks must contain non-whitespace text"
                        ));
                    }
                    seen_other = true;
                }
                Some("tool_result") => {
                    if role != "user" {
                        return Err(format!("messages.{i}: tool_result only in user messages"));
                    }
                    if seen_other {
                        return Err(format!(
                            "messages.{i}: tool_result blocks must come before any other content"
                        ));
                    }
                    answered.push(block["tool_use_id"].as_str().unwrap_or("").to_owned());
                }
                Some("tool_use") => {
                    if !block["input"].is_object() {
                        return Err(format!("messages.{i}.content.{j}.input: must be an object"));
                    }
                    seen_other = true;
                }
                Some(_) => seen_other = true,
                None => return Err(format!("messages.{i}.content.{j}.type: Field required")),
            }
        }
        if !pending.is_empty() {
            for id in &pending {
                if !answered.contains(id) {
                    return Err(format!(
                        "messages.{i}: tool_use ids were found without tool_result blocks immediately after: {id}"
                    ));
                }
            }
        }
        pending = if role == "assistant" {
            blocks
                .iter()
                .filter(|b| b["type"] == "tool_use")
                .map(|b| b["id"].as_str().unwrap_or("").to_owned())
                .collect()
        } else {
            Vec::new()
        };
    }
    Ok(())
}

async fn messages(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let recorded = record("POST", "/v1/messages", &headers, &body);
    let (reply, ignore_stream, n, delay) = {
        let mut s = script.lock().unwrap();
        s.record(&recorded);
        let Some(key) = presented_key(&headers) else {
            return error_response(
                401,
                "authentication_error",
                "x-api-key header is required",
                &[],
            );
        };
        if s.expected_key.as_ref().is_some_and(|k| *k != key) {
            return error_response(401, "authentication_error", "invalid x-api-key", &[]);
        }
        if headers.get("anthropic-version").is_none() {
            return invalid("anthropic-version: header is required".into());
        }
        if recorded.body.is_null() {
            return invalid("There was an error parsing the body".into());
        }
        if let Err(message) = validate(&recorded.body) {
            return invalid(message);
        }
        s.served += 1;
        let (delay, fault) = s.draw("anthropic.messages");
        let first = recorded.body["messages"][0].to_string();
        let reply = match faulty_reply(fault, anthropic_error_kind, || {
            s.next_reply(Some(&first), &recorded.body)
        }) {
            Ok(reply) => reply,
            Err(closed) => return closed,
        };
        (reply, s.ignore_stream, s.served, delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let model = recorded.body["model"]
        .as_str()
        .unwrap_or("claude")
        .to_owned();
    let stream = recorded.body["stream"] == json!(true) && !ignore_stream;
    let id = format!("msg_fake_{n:04}");
    let Some(reply) = reply else {
        return error_response(
            500,
            "api_error",
            "fake: the script has no more replies",
            &[("x-should-retry".into(), "false".into())],
        );
    };
    match reply {
        Reply::Error {
            status,
            kind,
            message,
            headers,
        } => error_response(status, &kind, &message, &headers),
        Reply::Turn(turn) if !stream => json_response(200, &message_json(&id, &model, &turn), &[]),
        Reply::Turn(turn) => sse_response(stream_frames(&id, &model, &turn), Ending::Complete),
        Reply::Cut { turn, after } => {
            sse_response(take(stream_frames(&id, &model, &turn), after), Ending::Cut)
        }
        Reply::EndEarly { turn, after } => sse_response(
            take(stream_frames(&id, &model, &turn), after),
            Ending::Early,
        ),
        Reply::StreamError {
            turn,
            after,
            kind,
            message,
        } => {
            let error = json!({"type": "error", "error": {"type": kind, "message": message}});
            sse_response(
                take(stream_frames(&id, &model, &turn), after),
                Ending::Then(frame(Some("error"), &error.to_string())),
            )
        }
        Reply::BareError { message, .. } if !stream => {
            json_response(200, &json!({"type": "error", "error": message}), &[])
        }
        Reply::BareError {
            turn,
            after,
            message,
        } => {
            let error = json!({"type": "error", "error": message});
            sse_response(
                take(stream_frames(&id, &model, &turn), after),
                Ending::Then(frame(Some("error"), &error.to_string())),
            )
        }
        Reply::Stall => sse_response(
            vec![frame(Some("ping"), r#"{"type":"ping"}"#)],
            Ending::Stall,
        ),
    }
}

pub(crate) fn take(mut frames: Vec<Bytes>, after: usize) -> Vec<Bytes> {
    frames.truncate(after);
    frames
}

/// A content block as a non-streamed message carries it.
fn block_json(block: &Block) -> Value {
    match block {
        Block::Text(text) => json!({"type": "text", "text": text}),
        Block::ToolCall { id, name, input } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": input})
        }
        Block::RawToolCall { id, name, .. } => {
            json!({"type": "tool_use", "id": id, "name": name, "input": {}})
        }
        Block::Thinking {
            thinking,
            signature,
        } => json!({"type": "thinking", "thinking": thinking, "signature": signature}),
    }
}

fn message_json(id: &str, model: &str, turn: &ScriptedTurn) -> Value {
    let mut message = json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": turn.blocks.iter().map(block_json).collect::<Vec<_>>(),
        "stop_reason": turn.stop,
        "stop_sequence": null,
        "usage": {"input_tokens": turn.input_tokens, "output_tokens": turn.output_tokens,
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
    });
    if turn.stop == "refusal" {
        message["stop_details"] = json!({"type": "refusal", "category": null,
                                          "explanation": "The request was declined."});
    }
    message
}

/// The named events of a streamed message, in the real order (message_start, ping, per block
/// start/deltas/stop, message_delta, message_stop).
fn stream_frames(id: &str, model: &str, turn: &ScriptedTurn) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut push = |event: &str, data: Value| frames.push(frame(Some(event), &data.to_string()));
    push(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": turn.input_tokens, "output_tokens": 1,
                      "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}}),
    );
    push("ping", json!({"type": "ping"}));
    for (index, block) in turn.blocks.iter().enumerate() {
        let start = |content_block: Value| json!({"type": "content_block_start", "index": index, "content_block": content_block});
        let delta =
            |delta: Value| json!({"type": "content_block_delta", "index": index, "delta": delta});
        match block {
            Block::Text(text) => {
                push(
                    "content_block_start",
                    start(json!({"type": "text", "text": ""})),
                );
                for piece in pieces(text, 7) {
                    push(
                        "content_block_delta",
                        delta(json!({"type": "text_delta", "text": piece})),
                    );
                }
            }
            Block::ToolCall { id, name, input } => {
                push(
                    "content_block_start",
                    start(json!({"type": "tool_use", "id": id, "name": name, "input": {}})),
                );
                for piece in pieces(&input.to_string(), 9) {
                    push(
                        "content_block_delta",
                        delta(json!({"type": "input_json_delta", "partial_json": piece})),
                    );
                }
            }
            Block::RawToolCall { id, name, raw } => {
                push(
                    "content_block_start",
                    start(json!({"type": "tool_use", "id": id, "name": name, "input": {}})),
                );
                for piece in pieces(raw, 9) {
                    push(
                        "content_block_delta",
                        delta(json!({"type": "input_json_delta", "partial_json": piece})),
                    );
                }
            }
            Block::Thinking {
                thinking,
                signature,
            } => {
                push(
                    "content_block_start",
                    start(json!({"type": "thinking", "thinking": "", "signature": ""})),
                );
                for piece in pieces(thinking, 7) {
                    push(
                        "content_block_delta",
                        delta(json!({"type": "thinking_delta", "thinking": piece})),
                    );
                }
                push(
                    "content_block_delta",
                    delta(json!({"type": "signature_delta", "signature": signature})),
                );
            }
        }
        push(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        );
    }
    push(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": turn.stop, "stop_sequence": null},
               "usage": {"output_tokens": turn.output_tokens}}),
    );
    push("message_stop", json!({"type": "message_stop"}));
    frames
}
