//! Claude through the Anthropic Messages API (`POST {base}/v1/messages`), hand-written on reqwest.
//!
//! Every request streams (`"stream": true`); the named SSE events are folded back into the same
//! content blocks a non-streamed response would carry, text deltas go to the [`TextSink`] as they
//! arrive, and a compatible server that answers with one JSON document instead is accepted too.
//! Blocks we do not interpret (thinking, redacted thinking, server tools, future types) become
//! [`Part::Opaque`] and are echoed back byte for byte on the next request, as the API requires.
//! No sampling parameters are ever sent: the current API version rejects them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use serde_json::{Map, Value, json};

use super::provider::{
    FailureKind, Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn,
};
use super::sse::{self, Fed};
use super::transcript::{Part, Role, Transcript};

pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";
pub const DEFAULT_MODEL: &str = "claude-sonnet-5-5";
/// The `anthropic-version` header: the current API version.
pub const API_VERSION: &str = "2026-10-21";
/// Output budget per turn. Generous: an edit can carry a whole file.
const MAX_TOKENS: u32 = 32_000;
const NAME: &str = "anthropic";

/// Where and how to reach Claude.
#[derive(Clone, PartialEq, Eq)]
pub struct AnthropicConfig {
    pub api_key: String,
    /// Without `/v1`, like the official SDKs' `ANTHROPIC_BASE_URL`.
    pub base_url: String,
    pub model: String,
}

impl fmt::Debug for AnthropicConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicConfig")
            .field("api_key", &crate::redact::MARKER)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .finish()
    }
}

impl AnthropicConfig {
    /// The defaults for `api_key`.
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: api_key.into(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
        }
    }

    /// Reads `ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL` and `ANTHROPIC_MODEL` through `lookup`.
    /// `None` when no key is set (the provider is simply not configured); an error when a value is
    /// unusable. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<Result<Self, String>> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let api_key = get("ANTHROPIC_API_KEY")?;
        let mut config = Self::new(api_key.trim());
        if let Some(base) = get("ANTHROPIC_BASE_URL") {
            match sse::normalize_base_url(&base, "ANTHROPIC_BASE_URL") {
                Ok(base) => config.base_url = base,
                Err(e) => return Some(Err(e)),
            }
        }
        if let Some(model) = get("ANTHROPIC_MODEL") {
            config.model = model.trim().to_owned();
        }
        Some(Ok(config))
    }
}

/// The Anthropic Messages provider.
pub struct AnthropicProvider {
    client: reqwest::Client,
    endpoint: String,
    api_key: HeaderValue,
    /// Kept only to scrub it out of error messages.
    secret: String,
    model: String,
}

impl fmt::Debug for AnthropicProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnthropicProvider")
            .field("endpoint", &self.endpoint)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl AnthropicProvider {
    pub fn new(config: AnthropicConfig) -> Result<Self, String> {
        if config.api_key.trim().is_empty() {
            return Err("ANTHROPIC_API_KEY is empty".to_owned());
        }
        if config.model.trim().is_empty() {
            return Err("ANTHROPIC_MODEL is empty".to_owned());
        }
        let base = sse::normalize_base_url(&config.base_url, "ANTHROPIC_BASE_URL")?;
        Ok(Self {
            client: sse::http_client(sse::CONNECT_TIMEOUT, sse::IDLE_TIMEOUT)?,
            endpoint: format!("{base}/v1/messages"),
            api_key: sse::secret_header(&config.api_key, "ANTHROPIC_API_KEY")?,
            secret: config.api_key,
            model: config.model,
        })
    }

    /// Replaces the connect and idle (per-read) timeouts.
    pub fn with_timeouts(mut self, connect: Duration, idle: Duration) -> Result<Self, String> {
        self.client = sse::http_client(connect, idle)?;
        Ok(self)
    }

    /// The JSON body for one request.
    pub fn request_body(&self, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
        let mut body = Map::new();
        body.insert("model".into(), json!(self.model));
        body.insert("max_tokens".into(), json!(MAX_TOKENS));
        if !transcript.system.is_empty() {
            body.insert("system".into(), json!(transcript.system));
        }
        body.insert("messages".into(), Value::Array(wire_messages(transcript)));
        if !tools.is_empty() {
            let tools: Vec<Value> = tools
                .iter()
                .map(|t| {
                    json!({"name": t.name, "description": t.description, "input_schema": t.parameters})
                })
                .collect();
            body.insert("tools".into(), Value::Array(tools));
            body.insert("tool_choice".into(), json!({"type": "auto"}));
        }
        body.insert("stream".into(), json!(true));
        Value::Object(body)
    }
}

#[async_trait]
impl Provider for AnthropicProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn model(&self) -> &str {
        &self.model
    }

    async fn complete(
        &self,
        transcript: &Transcript,
        tools: &[ToolSpec],
        text: &dyn TextSink,
    ) -> Result<Turn, ProviderError> {
        let body = self.request_body(transcript, tools);
        let response = self
            .client
            .post(&self.endpoint)
            .header("x-api-key", self.api_key.clone())
            .header("anthropic-version", API_VERSION)
            .json(&body)
            .send()
            .await
            .map_err(|e| retry_transport(&e))?;
        if !response.status().is_success() {
            return Err(sse::http_error(response, NAME, &self.secret, describe_error).await);
        }
        if sse::is_event_stream(&response) {
            sse::read_turn(response, NAME, MessageStream::default(), text).await
        } else {
            let message = sse::json_body(response, NAME).await?;
            if message.get("type").and_then(Value::as_str) == Some("error") {
                return Err(error_event(&message));
            }
            let blocks = message
                .get("content")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for block in &blocks {
                if let Some(t) = text_of(block).filter(|t| !t.is_empty()) {
                    text.text_delta(NAME, t);
                }
            }
            let stop = message.get("stop_reason").and_then(Value::as_str);
            let usage = usage_from(message.get("usage"), TokenUsage::default());
            let blocks = blocks.into_iter().map(|b| (b, None)).collect();
            Ok(turn_from_blocks(blocks, stop, usage))
        }
    }
}

fn retry_transport(error: &reqwest::Error) -> ProviderError {
    super::retry::transport_error(NAME, error)
}

/// `error.type: error.message (request_id)` from an Anthropic error body; the error itself when a
/// compatible server sent it as a bare string.
fn describe_error(body: &Value) -> Option<String> {
    let error = body.get("error")?;
    let mut out = match error.as_str() {
        Some(message) => message.to_owned(),
        None => {
            let kind = error.get("type").and_then(Value::as_str).unwrap_or("error");
            let message = error.get("message").and_then(Value::as_str).unwrap_or("");
            format!("{kind}: {message}")
        }
    };
    if let Some(id) = body.get("request_id").and_then(Value::as_str) {
        out.push_str(&format!(" (request_id {id})"));
    }
    Some(out)
}

/// An `event: error` inside a stream (after HTTP 200), classified by its error type.
fn error_event(data: &Value) -> ProviderError {
    let kind = data
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or("error");
    let message = describe_error(data).unwrap_or_else(|| kind.to_owned());
    let (failure, status) = match kind {
        "overloaded_error" => (FailureKind::Retryable, Some(529)),
        "rate_limit_error" => (FailureKind::Retryable, Some(429)),
        "api_error" => (FailureKind::Retryable, Some(500)),
        "timeout_error" => (FailureKind::Retryable, Some(504)),
        "invalid_request_error" => (FailureKind::Fallback, Some(400)),
        "authentication_error" => (FailureKind::Fallback, Some(401)),
        "permission_error" => (FailureKind::Fallback, Some(403)),
        "billing_error" => (FailureKind::Fallback, Some(402)),
        "not_found_error" => (FailureKind::Fallback, Some(404)),
        "request_too_large" => (FailureKind::Fallback, Some(413)),
        // An unknown error in the middle of a stream is most likely transient.
        _ => (FailureKind::Retryable, None),
    };
    ProviderError {
        kind: failure,
        status,
        message: format!("{NAME} stream error: {message}"),
        retry_after: None,
    }
}

/// A content block being assembled from stream events. Deltas grow its strings in place.
struct BlockInProgress {
    value: Value,
    /// Concatenated `input_json_delta`s, parsed into `input` when the block stops (the pieces
    /// are not JSON on their own).
    json: Option<String>,
    /// Arguments that were not valid JSON.
    raw_arguments: Option<String>,
}

impl BlockInProgress {
    fn finish(&mut self) {
        let Some(json) = self.json.take() else {
            return;
        };
        let (input, raw) = sse::parse_arguments(&json);
        let input = if raw.is_some() { json!({}) } else { input };
        set(&mut self.value, "input", input);
        self.raw_arguments = raw;
    }
}

/// The stream events we act on. The SDKs skip events without an `event:` line (named `message`
/// by the parser), pings, and any event type they do not know; so do we.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamEvent {
    MessageStart,
    BlockStart,
    BlockDelta,
    BlockStop,
    MessageDelta,
    MessageStop,
    Error,
}

impl StreamEvent {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "message_start" => Some(Self::MessageStart),
            "content_block_start" => Some(Self::BlockStart),
            "content_block_delta" => Some(Self::BlockDelta),
            "content_block_stop" => Some(Self::BlockStop),
            "message_delta" => Some(Self::MessageDelta),
            "message_stop" => Some(Self::MessageStop),
            "error" => Some(Self::Error),
            _ => None,
        }
    }
}

/// Folds the named events of a streamed message into the blocks a non-streamed response would
/// carry, then into a turn.
#[derive(Default)]
struct MessageStream {
    blocks: BTreeMap<u64, BlockInProgress>,
    stop_reason: Option<String>,
    usage: TokenUsage,
    finished: bool,
}

impl sse::TurnParser for MessageStream {
    fn feed(&mut self, event: &str, data: &str) -> Result<Fed, ProviderError> {
        let Some(kind) = StreamEvent::from_name(event) else {
            return Ok(Fed::Nothing);
        };
        let data: Value = serde_json::from_str(data).map_err(|e| {
            ProviderError::retryable(format!("{NAME}: malformed {event} event: {e}"))
        })?;
        let index = data.get("index").and_then(Value::as_u64);
        match kind {
            StreamEvent::MessageStart => {
                self.usage = usage_from(data.pointer("/message/usage"), self.usage);
            }
            StreamEvent::BlockStart => {
                let (Some(index), Some(block)) = (index, data.get("content_block")) else {
                    return Ok(Fed::Nothing);
                };
                let shown = text_of(block).filter(|t| !t.is_empty()).map(str::to_owned);
                let takes_json = matches!(
                    block.get("type").and_then(Value::as_str),
                    Some("tool_use" | "server_tool_use")
                );
                self.blocks.insert(
                    index,
                    BlockInProgress {
                        value: block.clone(),
                        json: takes_json.then(String::new),
                        raw_arguments: None,
                    },
                );
                return Ok(shown.map_or(Fed::Nothing, Fed::Text));
            }
            StreamEvent::BlockDelta => {
                let (Some(block), Some(delta)) = (
                    index.and_then(|i| self.blocks.get_mut(&i)),
                    data.get("delta"),
                ) else {
                    return Ok(Fed::Nothing);
                };
                return Ok(apply_delta(block, delta).map_or(Fed::Nothing, Fed::Text));
            }
            StreamEvent::BlockStop => {
                if let Some(block) = index.and_then(|i| self.blocks.get_mut(&i)) {
                    block.finish();
                }
            }
            StreamEvent::MessageDelta => {
                if let Some(reason) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(reason.to_owned());
                }
                self.usage = usage_from(data.get("usage"), self.usage);
            }
            StreamEvent::MessageStop => {
                self.finished = true;
                return Ok(Fed::End);
            }
            StreamEvent::Error => return Err(error_event(&data)),
        }
        Ok(Fed::Nothing)
    }

    fn finish(self) -> Result<Turn, ProviderError> {
        if !self.finished {
            return Err(ProviderError::retryable(format!(
                "{NAME}: the stream ended before message_stop"
            )));
        }
        let blocks = self
            .blocks
            .into_values()
            .map(|mut b| {
                b.finish();
                (b.value, b.raw_arguments)
            })
            .collect();
        Ok(turn_from_blocks(
            blocks,
            self.stop_reason.as_deref(),
            self.usage,
        ))
    }
}

/// Applies one `content_block_delta` to the block it belongs to; returns the text to show.
fn apply_delta(block: &mut BlockInProgress, delta: &Value) -> Option<String> {
    let piece = |field: &str| delta.get(field).and_then(Value::as_str).unwrap_or("");
    match delta.get("type").and_then(Value::as_str) {
        Some("text_delta") => {
            let text = piece("text");
            append(&mut block.value, "text", text);
            return (!text.is_empty()).then(|| text.to_owned());
        }
        Some("input_json_delta") => {
            block
                .json
                .get_or_insert_with(String::new)
                .push_str(piece("partial_json"));
        }
        Some("thinking_delta") => append(&mut block.value, "thinking", piece("thinking")),
        Some("signature_delta") => append(&mut block.value, "signature", piece("signature")),
        Some("citations_delta") => {
            if let Some(citation) = delta.get("citation") {
                match block
                    .value
                    .get_mut("citations")
                    .and_then(Value::as_array_mut)
                {
                    Some(list) => list.push(citation.clone()),
                    None => set(&mut block.value, "citations", json!([citation])),
                }
            }
        }
        // New delta types are allowed by the versioning policy; they cannot be applied blindly.
        _ => {}
    }
    None
}

/// Appends `piece` to the string `field` of `block` where it lies. Rebuilding the string instead
/// would copy everything received so far on every delta: quadratic in a long block.
fn append(block: &mut Value, field: &str, piece: &str) {
    match block.get_mut(field) {
        Some(Value::String(text)) => text.push_str(piece),
        _ => set(block, field, Value::String(piece.to_owned())),
    }
}

/// Sets `field` of a block. A block that is not an object (a broken stream) is left as it came:
/// indexing would panic.
fn set(block: &mut Value, field: &str, value: Value) {
    if let Some(block) = block.as_object_mut() {
        block.insert(field.to_owned(), value);
    }
}

fn text_of(block: &Value) -> Option<&str> {
    if block.get("type").and_then(Value::as_str) == Some("text") {
        block.get("text").and_then(Value::as_str)
    } else {
        None
    }
}

/// Token counts from a `usage` object, keeping `previous` for counts it does not carry
/// (`message_delta` repeats only some). Input counts include cache reads and writes.
fn usage_from(usage: Option<&Value>, previous: TokenUsage) -> TokenUsage {
    let Some(usage) = usage else {
        return previous;
    };
    let count = |field: &str| usage.get(field).and_then(Value::as_u64);
    let input = match (
        count("input_tokens"),
        count("cache_creation_input_tokens"),
        count("cache_read_input_tokens"),
    ) {
        (None, None, None) => previous.input_tokens,
        (a, b, c) => a.unwrap_or(0) + b.unwrap_or(0) + c.unwrap_or(0),
    };
    TokenUsage {
        input_tokens: input,
        output_tokens: count("output_tokens").unwrap_or(previous.output_tokens),
    }
}

/// The turn for a list of finished content blocks (each with raw arguments when its tool input
/// was not valid JSON).
fn turn_from_blocks(
    blocks: Vec<(Value, Option<String>)>,
    stop_reason: Option<&str>,
    usage: TokenUsage,
) -> Turn {
    let mut content = Vec::new();
    for (block, raw_arguments) in blocks {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = text_of(&block).unwrap_or("");
                if !text.is_empty() {
                    content.push(Part::Text {
                        text: text.to_owned(),
                    });
                }
            }
            Some("tool_use") => {
                let field = |name: &str| {
                    block
                        .get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                let arguments = if raw_arguments.is_some() {
                    Value::Null
                } else {
                    block.get("input").cloned().unwrap_or_else(|| json!({}))
                };
                content.push(Part::ToolCall {
                    id: field("id"),
                    name: field("name"),
                    arguments,
                    raw_arguments,
                });
            }
            _ => content.push(Part::Opaque {
                provider: NAME.to_owned(),
                value: block,
            }),
        }
    }
    let has_calls = content.iter().any(|p| matches!(p, Part::ToolCall { .. }));
    let stop = match stop_reason {
        Some("tool_use") => StopReason::ToolUse,
        Some("end_turn" | "stop_sequence") => StopReason::EndTurn,
        Some("max_tokens") => StopReason::MaxTokens,
        Some("pause_turn") => StopReason::PauseTurn,
        Some("refusal") => StopReason::Refusal,
        Some("model_context_window_exceeded") => StopReason::ContextWindowExceeded,
        other => {
            tracing::warn!(stop_reason = ?other, "unknown Anthropic stop reason");
            if has_calls {
                StopReason::ToolUse
            } else {
                StopReason::EndTurn
            }
        }
    };
    Turn {
        content,
        stop,
        usage,
    }
}

/// Tool-use ids must match `^[a-zA-Z0-9_-]+$`; ids minted by another provider may not. The
/// mapping is deterministic so a call and its result still pair up.
fn wire_id(id: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "toolu_empty".to_owned()
    } else {
        clean
    }
}

/// The transcript as Messages API `messages`: our own opaque blocks verbatim, other providers'
/// dropped, consecutive same-role messages merged, and tool results first in each user message.
fn wire_messages(transcript: &Transcript) -> Vec<Value> {
    let mut out: Vec<(Role, Vec<Value>)> = Vec::new();
    for message in &transcript.messages {
        let mut blocks = Vec::new();
        for part in &message.content {
            match part {
                Part::Text { text } => {
                    // The API rejects text blocks that are empty or only whitespace.
                    if !text.trim().is_empty() {
                        blocks.push(json!({"type": "text", "text": text}));
                    }
                }
                Part::ToolCall {
                    id,
                    name,
                    arguments,
                    ..
                } => {
                    // Unparsable arguments were answered with a tool error; the call itself
                    // still has to appear, with an object as input.
                    let input = if arguments.is_object() {
                        arguments.clone()
                    } else {
                        json!({})
                    };
                    blocks.push(json!({"type": "tool_use", "id": wire_id(id), "name": name, "input": input}));
                }
                Part::ToolResult {
                    call_id,
                    content,
                    is_error,
                } => {
                    let mut block = json!({
                        "type": "tool_result",
                        "tool_use_id": wire_id(call_id),
                        "is_error": is_error,
                    });
                    // `content` is optional; an empty one is left out rather than risk a 400.
                    if !content.is_empty() {
                        block["content"] = json!(content);
                    }
                    blocks.push(block);
                }
                Part::Opaque { provider, value } => {
                    if provider == NAME {
                        blocks.push(value.clone());
                    }
                }
            }
        }
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some((role, existing)) if *role == message.role => existing.extend(blocks),
            _ => out.push((message.role, blocks)),
        }
    }
    out.into_iter()
        .map(|(role, mut blocks)| {
            let role = match role {
                Role::User => {
                    // Tool results must lead the user message that answers the calls.
                    blocks.sort_by_key(|b| {
                        b.get("type").and_then(Value::as_str) != Some("tool_result")
                    });
                    "user"
                }
                Role::Assistant => "assistant",
            };
            json!({"role": role, "content": blocks})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::sse::testing::{Failure, broken_call, call, text, usage};
    use crate::agent::transcript::Message;
    use pretty_assertions::assert_eq;

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn config_from_lookup() {
        assert!(AnthropicConfig::from_lookup(lookup(&[])).is_none());
        assert!(AnthropicConfig::from_lookup(lookup(&[("ANTHROPIC_API_KEY", " ")])).is_none());
        let c = AnthropicConfig::from_lookup(lookup(&[("ANTHROPIC_API_KEY", "k-123")]))
            .unwrap()
            .unwrap();
        assert_eq!(c, AnthropicConfig::new("k-123"));
        assert_eq!(c.base_url, "https://api.anthropic.com");
        assert_eq!(c.model, DEFAULT_MODEL);
        let c = AnthropicConfig::from_lookup(lookup(&[
            ("ANTHROPIC_API_KEY", "k-123"),
            ("ANTHROPIC_BASE_URL", "http://127.0.0.1:9/"),
            ("ANTHROPIC_MODEL", "claude-haiku-5-5"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.base_url, "http://127.0.0.1:9");
        assert_eq!(c.model, "claude-haiku-5-5");
        let bad = AnthropicConfig::from_lookup(lookup(&[
            ("ANTHROPIC_API_KEY", "k-123"),
            ("ANTHROPIC_BASE_URL", "nope"),
        ]))
        .unwrap();
        assert!(bad.is_err());
        assert!(!format!("{c:?}").contains("k-123"));
    }

    #[test]
    fn transcript_to_wire() {
        let thinking = json!({"type": "thinking", "thinking": "hmm", "signature": "sig=="});
        let transcript = Transcript {
            system: "sys".into(),
            messages: vec![
                Message {
                    role: Role::User,
                    content: vec![Part::Text { text: "fix".into() }],
                },
                Message {
                    role: Role::Assistant,
                    content: vec![
                        Part::Opaque {
                            provider: "anthropic".into(),
                            value: thinking.clone(),
                        },
                        Part::Opaque {
                            provider: "openai".into(),
                            value: json!({"type": "reasoning"}),
                        },
                        Part::Text { text: " \n".into() },
                        Part::ToolCall {
                            id: "call.1".into(),
                            name: "read_file".into(),
                            arguments: json!({"path": "a"}),
                            raw_arguments: None,
                        },
                        Part::ToolCall {
                            id: "toolu_2".into(),
                            name: "edit".into(),
                            arguments: Value::Null,
                            raw_arguments: Some("{oops".into()),
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Part::Text {
                            text: "also".into(),
                        },
                        Part::ToolResult {
                            call_id: "call.1".into(),
                            content: "x".into(),
                            is_error: false,
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Part::ToolResult {
                            call_id: "toolu_2".into(),
                            content: "bad json".into(),
                            is_error: true,
                        },
                        Part::ToolResult {
                            call_id: "toolu_3".into(),
                            content: String::new(),
                            is_error: false,
                        },
                    ],
                },
            ],
        };
        assert_eq!(
            Value::Array(wire_messages(&transcript)),
            json!([
                {"role": "user", "content": [{"type": "text", "text": "fix"}]},
                {"role": "assistant", "content": [
                    thinking,
                    {"type": "tool_use", "id": "call_1", "name": "read_file", "input": {"path": "a"}},
                    {"type": "tool_use", "id": "toolu_2", "name": "edit", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "x", "is_error": false},
                    {"type": "tool_result", "tool_use_id": "toolu_2", "content": "bad json", "is_error": true},
                    {"type": "tool_result", "tool_use_id": "toolu_3", "is_error": false},
                    {"type": "text", "text": "also"},
                ]},
            ])
        );
    }

    /// A recorded-style stream from `tests/fixtures/anthropic/`.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/anthropic/",
                $name
            ))
        };
    }

    fn read(sse: &str) -> (Result<Turn, Failure>, Vec<String>) {
        sse::testing::read(MessageStream::default(), sse)
    }

    #[test]
    fn stream_of_text() {
        let (turn, deltas) = read(fixture!("text.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![text(
                    "The docstring is in place — `main()` now says what it does."
                )],
                stop: StopReason::EndTurn,
                usage: usage(472, 19),
            }
        );
        assert_eq!(
            deltas,
            [
                "The docstring is ",
                "in place — ",
                "`main()` now says what it does."
            ]
        );
    }

    #[test]
    fn stream_of_a_tool_call_with_split_arguments() {
        let (turn, deltas) = read(fixture!("tool_use.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![
                    text("I'll fix the greeting."),
                    call(
                        "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
                        "edit_file",
                        json!({"path": "main.py", "old_str": "print(\"hi\")",
                               "new_str": "print(\"héllo\")\n"})
                    ),
                ],
                stop: StopReason::ToolUse,
                // Input counts include cache writes and reads.
                usage: usage(1024 + 2048 + 4096, 89),
            }
        );
        assert_eq!(deltas, ["I'll fix the ", "greeting."]);
    }

    #[test]
    fn stream_of_parallel_tool_calls() {
        let (turn, deltas) = read(fixture!("parallel_tool_use.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![
                    call("toolu_01", "read_file", json!({"path": "main.py"})),
                    // No input deltas at all means no arguments.
                    call("toolu_02", "list_files", json!({})),
                    broken_call("toolu_03", "edit_file", r#"{"path": "main.py", "old_s"#),
                ],
                stop: StopReason::ToolUse,
                usage: usage(310, 61),
            }
        );
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_with_thinking_keeps_opaque_blocks_and_skips_unknown_events() {
        let (turn, deltas) = read(fixture!("thinking.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![
                    Part::Opaque {
                        provider: NAME.into(),
                        value: json!({"type": "thinking",
                            "thinking": "The user wants a docstring. Read main.py first.",
                            "signature": "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}),
                    },
                    Part::Opaque {
                        provider: NAME.into(),
                        value: json!({"type": "redacted_thinking",
                            "data": "EmwKAhgBEgy3va3pzix/LafPsn4aDFIT2Xlxh0L5L8rLVyIwxtE3rAFBa8cr3qpP"}),
                    },
                    text("Reading main.py."),
                ],
                stop: StopReason::EndTurn,
                usage: usage(88, 40),
            }
        );
        assert_eq!(deltas, ["Reading", " main.py."]);
    }

    #[test]
    fn stream_of_a_refusal() {
        let (turn, deltas) = read(fixture!("refusal.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![],
                stop: StopReason::Refusal,
                usage: usage(52, 0),
            }
        );
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_cut_by_max_tokens_keeps_the_partial_arguments() {
        let (turn, _) = read(fixture!("max_tokens.sse"));
        assert_eq!(
            turn.unwrap(),
            Turn {
                content: vec![broken_call(
                    "toolu_cut",
                    "write_file",
                    r#"{"path": "big.txt", "content": "line 1\nline"#
                )],
                stop: StopReason::MaxTokens,
                // `message_delta` may repeat the input counts; the latest win.
                usage: usage(900 + 100, 32000),
            }
        );
    }

    #[test]
    fn stream_errors() {
        let (turn, deltas) = read(fixture!("overloaded.sse"));
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                Some(529),
                "anthropic stream error: overloaded_error: Overloaded \
                 (request_id req_011CSHoEeqs5C35K2UUqR7Fy)"
                    .into()
            ))
        );
        assert_eq!(deltas, ["Let me"]);

        let bare = "event: error\ndata: {\"type\":\"error\",\"error\":\"upstream overloaded\"}\n\n";
        assert_eq!(
            read(bare).0,
            Err((
                FailureKind::Retryable,
                None,
                "anthropic stream error: upstream overloaded".into()
            ))
        );

        let invalid = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\
                       \"invalid_request_error\",\"message\":\"prompt is too long\"}}\n\n";
        assert_eq!(
            read(invalid).0,
            Err((
                FailureKind::Fallback,
                Some(400),
                "anthropic stream error: invalid_request_error: prompt is too long".into()
            ))
        );
    }

    #[test]
    fn streams_that_end_early_or_garbled_are_retryable() {
        let (turn, deltas) = read(fixture!("cut.sse"));
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                None,
                "anthropic: the stream ended before message_stop".into()
            ))
        );
        assert_eq!(deltas, ["Let me look"]);

        // Without an `event:` line the event is a `message`, which the SDKs skip.
        let unnamed = "data: {\"type\":\"message_stop\"}\n\n";
        assert_eq!(
            read(unnamed).0,
            Err((
                FailureKind::Retryable,
                None,
                "anthropic: the stream ended before message_stop".into()
            ))
        );

        let (turn, _) = read("event: content_block_delta\ndata: {\"index\": 0,\n\n");
        let (kind, status, message) = turn.unwrap_err();
        assert_eq!((kind, status), (FailureKind::Retryable, None));
        assert!(
            message.starts_with("anthropic: malformed content_block_delta event: "),
            "{message}"
        );
    }

    /// Long turns arrive as tens of thousands of deltas; each must cost only its own length.
    #[test]
    fn many_deltas_accumulate_exactly() {
        use sse::TurnParser;
        const DELTAS: usize = 50_000;
        let numbered = |i: usize| format!("{i:05} ");
        let start = |index: usize, block: &str| {
            let data = format!(
                r#"{{"type":"content_block_start","index":{index},"content_block":{block}}}"#
            );
            ("content_block_start", data)
        };
        let delta = |index: usize, kind: &str, field: &str, piece: &str| {
            let data = format!(
                r#"{{"type":"content_block_delta","index":{index},"delta":{{"type":"{kind}","{field}":{}}}}}"#,
                Value::from(piece)
            );
            ("content_block_delta", data)
        };
        let mut stream = MessageStream::default();
        let mut feed = |(event, data): (&str, String)| stream.feed(event, &data).unwrap();

        feed(start(
            0,
            r#"{"type":"thinking","thinking":"","signature":""}"#,
        ));
        for i in 0..DELTAS {
            feed(delta(0, "thinking_delta", "thinking", &numbered(i)));
        }
        feed(start(1, r#"{"type":"text","text":""}"#));
        let shown: Vec<Fed> = (0..DELTAS)
            .map(|i| feed(delta(1, "text_delta", "text", &numbered(i))))
            .collect();
        feed(start(
            2,
            r#"{"type":"tool_use","id":"toolu_1","name":"write_file","input":{}}"#,
        ));
        for i in 0..DELTAS {
            let piece = match i {
                0 => r#"{"lines": ["00000""#.to_owned(),
                _ => format!(r#", "{i:05}""#),
            };
            feed(delta(2, "input_json_delta", "partial_json", &piece));
        }
        feed(delta(2, "input_json_delta", "partial_json", "]}"));
        let stop = r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"}}"#;
        feed(("message_delta", stop.to_owned()));
        let end = feed(("message_stop", r#"{"type":"message_stop"}"#.to_owned()));
        assert_eq!(end, Fed::End);

        let text: String = (0..DELTAS).map(numbered).collect();
        let lines: Vec<String> = (0..DELTAS).map(|i| format!("{i:05}")).collect();
        // The plain assertion: a character diff of two 300 KB strings would help no one.
        std::assert_eq!(
            stream.finish().unwrap(),
            Turn {
                content: vec![
                    Part::Opaque {
                        provider: NAME.into(),
                        value: json!({"type": "thinking", "thinking": text, "signature": ""}),
                    },
                    Part::Text { text: text.clone() },
                    call("toolu_1", "write_file", json!({ "lines": lines })),
                ],
                stop: StopReason::ToolUse,
                usage: TokenUsage::default(),
            }
        );
        let want: Vec<Fed> = (0..DELTAS).map(|i| Fed::Text(numbered(i))).collect();
        std::assert_eq!(shown, want, "every text delta is shown once, in order");
    }

    #[test]
    fn stop_reasons() {
        let cases = [
            ("tool_use", StopReason::ToolUse),
            ("end_turn", StopReason::EndTurn),
            ("stop_sequence", StopReason::EndTurn),
            ("max_tokens", StopReason::MaxTokens),
            ("pause_turn", StopReason::PauseTurn),
            ("refusal", StopReason::Refusal),
            (
                "model_context_window_exceeded",
                StopReason::ContextWindowExceeded,
            ),
        ];
        for (wire, want) in cases {
            let turn = turn_from_blocks(vec![], Some(wire), TokenUsage::default());
            assert_eq!(turn.stop, want, "{wire}");
        }
    }
}
