//! OpenAI and OpenAI-compatible models, over one of two wire protocols:
//!
//! - the **Responses API** (`POST {base}/responses`), used for api.openai.com: current OpenAI
//!   models refuse function tools with reasoning on Chat Completions;
//! - **Chat Completions** (`POST {base}/chat/completions`), the protocol every compatible server
//!   speaks (Ollama, vLLM, llama.cpp, OpenRouter), used for any other base URL.
//!
//! `OPENAI_API=responses|chat|auto` picks one. Both stream; text deltas reach the [`TextSink`] as
//! they arrive. Tool-call arguments arrive as a JSON *string*: when it does not parse, the call
//! keeps `raw_arguments` and `arguments = null`, so the tool layer can answer with an error.
//! Responses reasoning items become [`Part::Opaque`] and are sent back verbatim (the requests are
//! stateless, `store: false`). No sampling parameters are sent.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use reqwest::header::HeaderValue;
use serde_json::{Map, Value, json};

use super::provider::{
    FailureKind, Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn,
};
use super::sse;
use super::transcript::{Part, Role, Transcript, joined_text};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_MODEL: &str = "gpt-6.1-sol";
/// Output budget per turn on the Responses API (Chat Completions leaves it to the server, since
/// compatible servers disagree on the field's name).
const MAX_OUTPUT_TOKENS: u32 = 32_000;
const NAME: &str = "openai";

/// Which wire protocol to speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OpenAiApi {
    /// Responses for api.openai.com, Chat Completions for any other base URL.
    #[default]
    Auto,
    Responses,
    Chat,
}

impl OpenAiApi {
    /// Parses `OPENAI_API` (`responses`, `chat` or `auto`, any case).
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "responses" => Ok(Self::Responses),
            "chat" => Ok(Self::Chat),
            other => Err(format!(
                "OPENAI_API must be responses, chat or auto, not {other:?}"
            )),
        }
    }

    /// The concrete protocol for `base_url`: never [`OpenAiApi::Auto`].
    pub fn resolve(self, base_url: &str) -> Self {
        match self {
            Self::Responses | Self::Chat => self,
            Self::Auto => {
                let official = url::Url::parse(base_url)
                    .ok()
                    .and_then(|u| {
                        u.host_str()
                            .map(|h| h.eq_ignore_ascii_case("api.openai.com"))
                    })
                    .unwrap_or(false);
                if official {
                    Self::Responses
                } else {
                    Self::Chat
                }
            }
        }
    }
}

/// Where and how to reach the model.
#[derive(Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    pub api_key: String,
    /// With `/v1`, like the official SDKs' `OPENAI_BASE_URL`.
    pub base_url: String,
    pub model: String,
    pub api: OpenAiApi,
}

impl fmt::Debug for OpenAiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiConfig")
            .field("api_key", &crate::redact::MARKER)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api", &self.api)
            .finish()
    }
}

impl OpenAiConfig {
    /// The defaults for `api_key`.
    pub fn new(api_key: impl Into<String>) -> Self {
        Self {
            api_key: api_key.into(),
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            api: OpenAiApi::Auto,
        }
    }

    /// Reads `OPENAI_API_KEY`, `OPENAI_BASE_URL`, `OPENAI_MODEL` and `OPENAI_API` through
    /// `lookup`. `None` when no key is set; an error when a value is unusable. Empty values count
    /// as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Option<Result<Self, String>> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let api_key = get("OPENAI_API_KEY")?;
        let mut config = Self::new(api_key.trim());
        if let Some(base) = get("OPENAI_BASE_URL") {
            match sse::normalize_base_url(&base, "OPENAI_BASE_URL") {
                Ok(base) => config.base_url = base,
                Err(e) => return Some(Err(e)),
            }
        }
        if let Some(model) = get("OPENAI_MODEL") {
            config.model = model.trim().to_owned();
        }
        if let Some(api) = get("OPENAI_API") {
            match OpenAiApi::parse(&api) {
                Ok(api) => config.api = api,
                Err(e) => return Some(Err(e)),
            }
        }
        Some(Ok(config))
    }
}

/// The OpenAI (or compatible) provider.
pub struct OpenAiProvider {
    client: reqwest::Client,
    base_url: String,
    api: OpenAiApi,
    authorization: HeaderValue,
    /// Kept only to scrub it out of error messages.
    secret: String,
    model: String,
}

impl fmt::Debug for OpenAiProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenAiProvider")
            .field("base_url", &self.base_url)
            .field("api", &self.api)
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl OpenAiProvider {
    pub fn new(config: OpenAiConfig) -> Result<Self, String> {
        if config.api_key.trim().is_empty() {
            return Err("OPENAI_API_KEY is empty".to_owned());
        }
        if config.model.trim().is_empty() {
            return Err("OPENAI_MODEL is empty".to_owned());
        }
        let base_url = sse::normalize_base_url(&config.base_url, "OPENAI_BASE_URL")?;
        Ok(Self {
            client: sse::http_client(sse::CONNECT_TIMEOUT, sse::IDLE_TIMEOUT)?,
            api: config.api.resolve(&base_url),
            base_url,
            authorization: sse::secret_header(
                &format!("Bearer {}", config.api_key),
                "OPENAI_API_KEY",
            )?,
            secret: config.api_key,
            model: config.model,
        })
    }

    /// Replaces the connect and idle (per-read) timeouts.
    pub fn with_timeouts(mut self, connect: Duration, idle: Duration) -> Result<Self, String> {
        self.client = sse::http_client(connect, idle)?;
        Ok(self)
    }

    /// The protocol in use ([`OpenAiApi::Responses`] or [`OpenAiApi::Chat`]).
    pub fn api(&self) -> OpenAiApi {
        self.api
    }

    /// The JSON body for one request.
    pub fn request_body(&self, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
        match self.api {
            OpenAiApi::Chat => chat_body(&self.model, transcript, tools),
            OpenAiApi::Responses | OpenAiApi::Auto => {
                responses_body(&self.model, transcript, tools)
            }
        }
    }

    fn endpoint(&self) -> String {
        match self.api {
            OpenAiApi::Chat => format!("{}/chat/completions", self.base_url),
            OpenAiApi::Responses | OpenAiApi::Auto => format!("{}/responses", self.base_url),
        }
    }
}

#[async_trait]
impl Provider for OpenAiProvider {
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
            .post(self.endpoint())
            .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
            .json(&body)
            .send()
            .await
            .map_err(|e| super::retry::transport_error(NAME, &e))?;
        if !response.status().is_success() {
            let mut error = sse::http_error(response, NAME, &self.secret, describe_error).await;
            // Out of quota is a 429 that no amount of waiting fixes.
            if error.message.contains("insufficient_quota") {
                error.kind = FailureKind::Fallback;
            }
            return Err(error);
        }
        let streamed = sse::is_event_stream(&response);
        match (self.api, streamed) {
            (OpenAiApi::Chat, true) => read_chat_stream(response, text).await,
            (OpenAiApi::Chat, false) => {
                let body = sse::json_body(response, NAME).await?;
                chat_turn_from_completion(&body, text)
            }
            (OpenAiApi::Responses | OpenAiApi::Auto, true) => {
                read_responses_stream(response, text).await
            }
            (OpenAiApi::Responses | OpenAiApi::Auto, false) => {
                let body = sse::json_body(response, NAME).await?;
                if let Some(error) = body_error(&body) {
                    return Err(stream_error(error));
                }
                for item in body
                    .get("output")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    for t in output_texts(item) {
                        text.text_delta(NAME, t);
                    }
                }
                Ok(responses_turn(&body, Vec::new()))
            }
        }
    }
}

/// `type/code: message` from an OpenAI error body.
fn describe_error(body: &Value) -> Option<String> {
    body.get("error").map(describe)
}

/// `type/code: message` from an error object, or the error itself when a compatible server sent
/// a bare string.
fn describe(error: &Value) -> String {
    if let Some(message) = error.as_str() {
        return message.to_owned();
    }
    let field = |name: &str| error.get(name).and_then(Value::as_str);
    let message = field("message").unwrap_or("");
    match (field("type"), field("code")) {
        (Some(t), Some(c)) if t != c => format!("{t}/{c}: {message}"),
        (Some(k), _) | (None, Some(k)) => format!("{k}: {message}"),
        (None, None) => message.to_owned(),
    }
}

/// The error a 200 JSON body reports instead of a result: an object, or a bare string from
/// some compatible servers (`null` is how a successful Response says "no error").
fn body_error(body: &Value) -> Option<&Value> {
    body.get("error").filter(|e| e.is_object() || e.is_string())
}

/// An error reported inside a 200 response (a chat chunk `{"error": …}`, a Responses `error`
/// event or failed response), classified by its code.
fn stream_error(error: &Value) -> ProviderError {
    let field = |name: &str| error.get(name).and_then(Value::as_str).unwrap_or("");
    let final_codes = [
        "insufficient_quota",
        "invalid_api_key",
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "model_not_found",
        "context_length_exceeded",
        "invalid_prompt",
    ];
    let fatal = final_codes.contains(&field("code")) || final_codes.contains(&field("type"));
    // An error that says nothing readable is shown as sent rather than as an empty message.
    let description = match describe(error) {
        text if text.trim().is_empty() => error.to_string(),
        text => text,
    };
    ProviderError {
        kind: if fatal {
            FailureKind::Fallback
        } else {
            FailureKind::Retryable
        },
        status: None,
        message: format!("{NAME} stream error: {description}"),
        retry_after: None,
    }
}

fn cut_stream(what: &str) -> ProviderError {
    ProviderError::retryable(format!("{NAME}: the stream ended before {what}"))
}

fn parse_event_data(event: &eventsource_stream::Event) -> Result<Value, ProviderError> {
    serde_json::from_str(&event.data)
        .map_err(|e| ProviderError::retryable(format!("{NAME}: malformed stream event: {e}")))
}

/// A tool call assembled from indexed pieces.
#[derive(Default)]
struct CallInProgress {
    id: String,
    name: String,
    arguments: String,
}

impl CallInProgress {
    fn into_part(self) -> Part {
        let (arguments, raw_arguments) = sse::parse_arguments(&self.arguments);
        Part::ToolCall {
            id: if self.id.is_empty() {
                format!("call_{}", uuid::Uuid::new_v4().simple())
            } else {
                self.id
            },
            name: self.name,
            arguments,
            raw_arguments,
        }
    }
}

fn stop_from(finish_reason: Option<&str>, has_calls: bool, refused: bool) -> StopReason {
    match finish_reason {
        Some("length") => StopReason::MaxTokens,
        Some("content_filter") => StopReason::Refusal,
        _ if refused => StopReason::Refusal,
        Some("tool_calls" | "function_call") => StopReason::ToolUse,
        // Some compatible servers (older Ollama) say "stop" after tool calls.
        _ if has_calls => StopReason::ToolUse,
        Some("stop") | None => StopReason::EndTurn,
        Some(other) => {
            tracing::warn!(finish_reason = other, "unknown OpenAI finish reason");
            StopReason::EndTurn
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Chat Completions

fn chat_body(model: &str, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(chat_messages(transcript)));
    if !tools.is_empty() {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name, "description": t.description, "parameters": t.parameters}})
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
        body.insert("tool_choice".into(), json!("auto"));
    }
    body.insert("stream".into(), json!(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    Value::Object(body)
}

/// A tool result's content, marked when the tool failed (Chat has no `is_error` flag).
fn tool_output(content: &str, is_error: bool) -> String {
    if is_error
        && !content
            .trim_start()
            .to_ascii_lowercase()
            .starts_with("error")
    {
        format!("Error: {content}")
    } else {
        content.to_owned()
    }
}

/// The raw argument string of a call: what the model sent when it did not parse, else the JSON.
fn arguments_string(arguments: &Value, raw_arguments: &Option<String>) -> String {
    match raw_arguments {
        Some(raw) if arguments.is_null() => raw.clone(),
        _ if arguments.is_null() => "{}".to_owned(),
        _ => arguments.to_string(),
    }
}

fn chat_messages(transcript: &Transcript) -> Vec<Value> {
    let mut out = Vec::new();
    if !transcript.system.is_empty() {
        out.push(json!({"role": "system", "content": transcript.system}));
    }
    for message in &transcript.messages {
        let text = joined_text(&message.content);
        match message.role {
            Role::User => {
                // Tool answers must directly follow the assistant message that called.
                for part in &message.content {
                    if let Part::ToolResult {
                        call_id,
                        content,
                        is_error,
                    } = part
                    {
                        out.push(json!({"role": "tool", "tool_call_id": call_id,
                                        "content": tool_output(content, *is_error)}));
                    }
                }
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                let calls: Vec<Value> = message
                    .content
                    .iter()
                    .filter_map(|p| match p {
                        Part::ToolCall {
                            id,
                            name,
                            arguments,
                            raw_arguments,
                        } => Some(json!({"id": id, "type": "function", "function": {
                            "name": name, "arguments": arguments_string(arguments, raw_arguments)}})),
                        _ => None,
                    })
                    .collect();
                if calls.is_empty() && text.is_empty() {
                    continue;
                }
                let mut m = Map::new();
                m.insert("role".into(), json!("assistant"));
                m.insert(
                    "content".into(),
                    if text.is_empty() {
                        Value::Null
                    } else {
                        json!(text)
                    },
                );
                if !calls.is_empty() {
                    m.insert("tool_calls".into(), Value::Array(calls));
                }
                out.push(Value::Object(m));
            }
        }
    }
    out
}

fn chat_usage(usage: Option<&Value>) -> Option<TokenUsage> {
    let usage = usage.filter(|u| u.is_object())?;
    let count = |f: &str| usage.get(f).and_then(Value::as_u64).unwrap_or(0);
    Some(TokenUsage {
        input_tokens: count("prompt_tokens"),
        output_tokens: count("completion_tokens"),
    })
}

/// Accumulates one choice's deltas.
#[derive(Default)]
struct ChatAccumulator {
    text: String,
    refusal: String,
    calls: BTreeMap<u64, CallInProgress>,
    finish_reason: Option<String>,
    usage: TokenUsage,
}

impl ChatAccumulator {
    fn apply_tool_calls(&mut self, calls: &[Value]) {
        for (position, call) in calls.iter().enumerate() {
            let index = call
                .get("index")
                .and_then(Value::as_u64)
                .unwrap_or(position as u64);
            let acc = self.calls.entry(index).or_default();
            if let Some(id) = call
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
            {
                acc.id = id.to_owned();
            }
            let function = call.get("function");
            if let Some(name) = function
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                && acc.name.is_empty()
            {
                acc.name = name.to_owned();
            }
            match function.and_then(|f| f.get("arguments")) {
                Some(Value::String(piece)) => acc.arguments.push_str(piece),
                // Some servers send the arguments as an object rather than a string.
                Some(value @ Value::Object(_)) => acc.arguments.push_str(&value.to_string()),
                _ => {}
            }
        }
    }

    fn into_turn(self) -> Turn {
        let mut content = Vec::new();
        if !self.text.is_empty() {
            content.push(Part::Text { text: self.text });
        }
        let refused = !self.refusal.is_empty();
        if refused {
            content.push(Part::Text { text: self.refusal });
        }
        let has_calls = !self.calls.is_empty();
        content.extend(self.calls.into_values().map(CallInProgress::into_part));
        Turn {
            content,
            stop: stop_from(self.finish_reason.as_deref(), has_calls, refused),
            usage: self.usage,
        }
    }
}

async fn read_chat_stream(
    response: reqwest::Response,
    sink: &dyn TextSink,
) -> Result<Turn, ProviderError> {
    let mut events = sse::events(response, NAME);
    let mut acc = ChatAccumulator::default();
    let mut done = false;
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data.trim() == "[DONE]" {
            done = true;
            break;
        }
        if event.data.trim().is_empty() {
            continue;
        }
        let chunk = parse_event_data(&event)?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(stream_error(error));
        }
        if let Some(usage) = chat_usage(chunk.get("usage")) {
            acc.usage = usage;
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            continue;
        };
        if let Some(delta) = choice.get("delta") {
            if let Some(piece) = delta.get("content").and_then(Value::as_str)
                && !piece.is_empty()
            {
                sink.text_delta(NAME, piece);
                acc.text.push_str(piece);
            }
            if let Some(piece) = delta.get("refusal").and_then(Value::as_str) {
                acc.refusal.push_str(piece);
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                acc.apply_tool_calls(calls);
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            acc.finish_reason = Some(reason.to_owned());
        }
    }
    // `[DONE]` is the end; a server that closes right after the finish reason lost nothing.
    if !done && acc.finish_reason.is_none() {
        return Err(cut_stream("its finish_reason"));
    }
    Ok(acc.into_turn())
}

fn chat_turn_from_completion(body: &Value, sink: &dyn TextSink) -> Result<Turn, ProviderError> {
    if let Some(error) = body_error(body) {
        return Err(stream_error(error));
    }
    let choice = body
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| c.first())
        .ok_or_else(|| {
            ProviderError::retryable(format!("{NAME}: the completion has no choices"))
        })?;
    let message = choice.get("message").cloned().unwrap_or(Value::Null);
    let mut acc = ChatAccumulator {
        usage: chat_usage(body.get("usage")).unwrap_or_default(),
        finish_reason: choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
        ..ChatAccumulator::default()
    };
    if let Some(text) = message.get("content").and_then(Value::as_str) {
        if !text.is_empty() {
            sink.text_delta(NAME, text);
        }
        acc.text = text.to_owned();
    }
    if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
        acc.refusal = refusal.to_owned();
    }
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        acc.apply_tool_calls(calls);
    }
    Ok(acc.into_turn())
}

// ---------------------------------------------------------------------------------------------
// Responses

fn responses_body(model: &str, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    if !transcript.system.is_empty() {
        body.insert("instructions".into(), json!(transcript.system));
    }
    body.insert("input".into(), Value::Array(responses_input(transcript)));
    if !tools.is_empty() {
        let tools: Vec<Value> = tools
            .iter()
            .map(|t| {
                json!({"type": "function", "name": t.name, "description": t.description,
                       "parameters": t.parameters, "strict": false})
            })
            .collect();
        body.insert("tools".into(), Value::Array(tools));
        body.insert("tool_choice".into(), json!("auto"));
    }
    body.insert("max_output_tokens".into(), json!(MAX_OUTPUT_TOKENS));
    // Stateless: every request carries the whole conversation, reasoning included.
    body.insert("store".into(), json!(false));
    body.insert("include".into(), json!(["reasoning.encrypted_content"]));
    body.insert("stream".into(), json!(true));
    Value::Object(body)
}

fn responses_input(transcript: &Transcript) -> Vec<Value> {
    let mut out = Vec::new();
    for message in &transcript.messages {
        match message.role {
            Role::User => {
                for part in &message.content {
                    if let Part::ToolResult {
                        call_id,
                        content,
                        is_error,
                    } = part
                    {
                        out.push(json!({"type": "function_call_output", "call_id": call_id,
                                        "output": tool_output(content, *is_error)}));
                    }
                }
                let text = joined_text(&message.content);
                if !text.is_empty() {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                for part in &message.content {
                    match part {
                        Part::Text { text } => {
                            if !text.is_empty() {
                                out.push(json!({"role": "assistant", "content": text}));
                            }
                        }
                        Part::ToolCall {
                            id,
                            name,
                            arguments,
                            raw_arguments,
                        } => out.push(json!({"type": "function_call", "call_id": id, "name": name,
                            "arguments": arguments_string(arguments, raw_arguments)})),
                        Part::Opaque { provider, value } => {
                            if provider == NAME && value.get("type").is_some() {
                                out.push(value.clone());
                            }
                        }
                        Part::ToolResult { .. } => {}
                    }
                }
            }
        }
    }
    out
}

/// The texts of an output item (`output_text` and `refusal` parts of a message).
fn output_texts(item: &Value) -> Vec<&str> {
    if item.get("type").and_then(Value::as_str) != Some("message") {
        return Vec::new();
    }
    item.get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| match c.get("type").and_then(Value::as_str) {
            Some("output_text") => c.get("text").and_then(Value::as_str),
            _ => None,
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// The turn for a finished `Response`. `streamed` holds output items collected from
/// `output_item.done` events, used when the final response does not repeat them.
fn responses_turn(response: &Value, streamed: Vec<Value>) -> Turn {
    let output = response
        .get("output")
        .and_then(Value::as_array)
        .filter(|o| !o.is_empty())
        .cloned()
        .unwrap_or(streamed);
    let mut content = Vec::new();
    let mut refused = false;
    for item in output {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let text = match part.get("type").and_then(Value::as_str) {
                        Some("output_text") => part.get("text").and_then(Value::as_str),
                        Some("refusal") => {
                            refused = true;
                            part.get("refusal").and_then(Value::as_str)
                        }
                        _ => None,
                    };
                    if let Some(text) = text.filter(|t| !t.is_empty()) {
                        content.push(Part::Text {
                            text: text.to_owned(),
                        });
                    }
                }
            }
            Some("function_call") => {
                let field = |name: &str| {
                    item.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                content.push(
                    CallInProgress {
                        id: field("call_id"),
                        name: field("name"),
                        arguments: field("arguments"),
                    }
                    .into_part(),
                );
            }
            _ => content.push(Part::Opaque {
                provider: NAME.to_owned(),
                value: item,
            }),
        }
    }
    let has_calls = content.iter().any(|p| matches!(p, Part::ToolCall { .. }));
    let incomplete = response.get("status").and_then(Value::as_str) == Some("incomplete");
    let stop = if incomplete {
        match response
            .pointer("/incomplete_details/reason")
            .and_then(Value::as_str)
        {
            Some("content_filter") => StopReason::Refusal,
            _ => StopReason::MaxTokens,
        }
    } else {
        stop_from(None, has_calls, refused)
    };
    let usage = response
        .get("usage")
        .filter(|u| u.is_object())
        .map(|u| TokenUsage {
            input_tokens: u.get("input_tokens").and_then(Value::as_u64).unwrap_or(0),
            output_tokens: u.get("output_tokens").and_then(Value::as_u64).unwrap_or(0),
        })
        .unwrap_or_default();
    Turn {
        content,
        stop,
        usage,
    }
}

async fn read_responses_stream(
    response: reqwest::Response,
    sink: &dyn TextSink,
) -> Result<Turn, ProviderError> {
    let mut events = sse::events(response, NAME);
    // Output items by index, as `output_item.added` announced them and `.done` finished them.
    let mut items: BTreeMap<u64, Value> = BTreeMap::new();
    let mut arguments: BTreeMap<u64, String> = BTreeMap::new();
    while let Some(event) = events.next().await {
        let event = event?;
        if event.data.trim().is_empty() {
            continue;
        }
        let data = parse_event_data(&event)?;
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event.event.as_str())
            .to_owned();
        let index = data.get("output_index").and_then(Value::as_u64);
        match kind.as_str() {
            "response.output_text.delta" => {
                if let Some(delta) = data.get("delta").and_then(Value::as_str)
                    && !delta.is_empty()
                {
                    sink.text_delta(NAME, delta);
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                if let (Some(index), Some(item)) = (index, data.get("item")) {
                    items.insert(index, item.clone());
                }
            }
            "response.function_call_arguments.delta" => {
                if let (Some(index), Some(delta)) =
                    (index, data.get("delta").and_then(Value::as_str))
                {
                    arguments.entry(index).or_default().push_str(delta);
                }
            }
            "response.completed" | "response.incomplete" => {
                let final_response = data.get("response").cloned().unwrap_or(Value::Null);
                let streamed = items
                    .into_iter()
                    .map(|(index, mut item)| {
                        let missing = item
                            .get("arguments")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty);
                        if missing && let Some(args) = arguments.remove(&index) {
                            item["arguments"] = Value::String(args);
                        }
                        item
                    })
                    .collect();
                return Ok(responses_turn(&final_response, streamed));
            }
            "response.failed" => {
                let error = data
                    .pointer("/response/error")
                    .cloned()
                    .unwrap_or_else(|| json!({"message": "the response failed"}));
                return Err(stream_error(&error));
            }
            "error" => {
                let error = data.get("error").cloned().unwrap_or(data);
                return Err(stream_error(&error));
            }
            _ => {}
        }
    }
    Err(cut_stream("response.completed"))
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn api_resolution() {
        assert_eq!(
            OpenAiApi::Auto.resolve("https://api.openai.com/v1"),
            OpenAiApi::Responses
        );
        assert_eq!(
            OpenAiApi::Auto.resolve("http://localhost:11434/v1"),
            OpenAiApi::Chat
        );
        assert_eq!(
            OpenAiApi::Responses.resolve("http://localhost:11434/v1"),
            OpenAiApi::Responses
        );
        assert_eq!(
            OpenAiApi::Chat.resolve("https://api.openai.com/v1"),
            OpenAiApi::Chat
        );
        assert_eq!(OpenAiApi::parse("Chat").unwrap(), OpenAiApi::Chat);
        assert!(OpenAiApi::parse("completions").is_err());
    }

    #[test]
    fn config_from_lookup() {
        assert!(OpenAiConfig::from_lookup(lookup(&[])).is_none());
        let c = OpenAiConfig::from_lookup(lookup(&[("OPENAI_API_KEY", "sk-1")]))
            .unwrap()
            .unwrap();
        assert_eq!(c, OpenAiConfig::new("sk-1"));
        let c = OpenAiConfig::from_lookup(lookup(&[
            ("OPENAI_API_KEY", "sk-1"),
            ("OPENAI_BASE_URL", "http://localhost:11434/v1/"),
            ("OPENAI_MODEL", "qwen3"),
            ("OPENAI_API", "auto"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(c.base_url, "http://localhost:11434/v1");
        assert_eq!(c.model, "qwen3");
        assert_eq!(
            OpenAiProvider::new(c.clone()).unwrap().api(),
            OpenAiApi::Chat
        );
        assert!(!format!("{c:?}").contains("sk-1"));
        let bad = OpenAiConfig::from_lookup(lookup(&[
            ("OPENAI_API_KEY", "sk-1"),
            ("OPENAI_API", "both"),
        ]))
        .unwrap();
        assert!(bad.is_err());
    }

    fn transcript() -> Transcript {
        Transcript {
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
                            value: json!({"type": "thinking"}),
                        },
                        Part::Opaque {
                            provider: "openai".into(),
                            value: json!({"type": "reasoning", "id": "rs_1", "summary": []}),
                        },
                        Part::Text {
                            text: "Reading.".into(),
                        },
                        Part::ToolCall {
                            id: "call_1".into(),
                            name: "read_file".into(),
                            arguments: json!({"path": "a"}),
                            raw_arguments: None,
                        },
                        Part::ToolCall {
                            id: "call_2".into(),
                            name: "edit".into(),
                            arguments: Value::Null,
                            raw_arguments: Some("{oops".into()),
                        },
                    ],
                },
                Message {
                    role: Role::User,
                    content: vec![
                        Part::ToolResult {
                            call_id: "call_1".into(),
                            content: "x".into(),
                            is_error: false,
                        },
                        Part::ToolResult {
                            call_id: "call_2".into(),
                            content: "arguments are not JSON".into(),
                            is_error: true,
                        },
                    ],
                },
            ],
        }
    }

    #[test]
    fn chat_wire() {
        assert_eq!(
            Value::Array(chat_messages(&transcript())),
            json!([
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "fix"},
                {"role": "assistant", "content": "Reading.", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "read_file", "arguments": "{\"path\":\"a\"}"}},
                    {"id": "call_2", "type": "function",
                     "function": {"name": "edit", "arguments": "{oops"}},
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "x"},
                {"role": "tool", "tool_call_id": "call_2",
                 "content": "Error: arguments are not JSON"},
            ])
        );
    }

    #[test]
    fn responses_wire() {
        assert_eq!(
            Value::Array(responses_input(&transcript())),
            json!([
                {"role": "user", "content": "fix"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"role": "assistant", "content": "Reading."},
                {"type": "function_call", "call_id": "call_1", "name": "read_file",
                 "arguments": "{\"path\":\"a\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "edit", "arguments": "{oops"},
                {"type": "function_call_output", "call_id": "call_1", "output": "x"},
                {"type": "function_call_output", "call_id": "call_2",
                 "output": "Error: arguments are not JSON"},
            ])
        );
    }

    #[test]
    fn finish_reasons() {
        assert_eq!(
            stop_from(Some("tool_calls"), true, false),
            StopReason::ToolUse
        );
        assert_eq!(stop_from(Some("stop"), true, false), StopReason::ToolUse);
        assert_eq!(stop_from(Some("stop"), false, false), StopReason::EndTurn);
        assert_eq!(
            stop_from(Some("length"), true, false),
            StopReason::MaxTokens
        );
        assert_eq!(
            stop_from(Some("content_filter"), false, false),
            StopReason::Refusal
        );
        assert_eq!(stop_from(Some("stop"), false, true), StopReason::Refusal);
    }
}
