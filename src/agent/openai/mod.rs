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
//!
//! This file holds the configuration, the provider and what both protocols share (errors, tool
//! calls, stop reasons); `chat` and `responses` each hold one protocol: its request body, and its
//! reply folded into a [`Turn`] by a parser that does no I/O.

mod chat;
mod responses;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::header::HeaderValue;
use serde_json::Value;

use super::provider::{FailureKind, Provider, ProviderError, StopReason, TextSink, ToolSpec, Turn};
use super::sse;
use super::transcript::{Part, Transcript};

pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";
pub const DEFAULT_MODEL: &str = "gpt-6.1-sol";
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
            OpenAiApi::Chat => chat::body(&self.model, transcript, tools),
            OpenAiApi::Responses | OpenAiApi::Auto => {
                responses::body(&self.model, transcript, tools)
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
            (OpenAiApi::Chat, true) => {
                sse::read_turn(response, NAME, chat::ChatStream::default(), text).await
            }
            (OpenAiApi::Chat, false) => {
                chat::turn_from_completion(&sse::json_body(response, NAME).await?, text)
            }
            (OpenAiApi::Responses | OpenAiApi::Auto, true) => {
                let parser = responses::ResponsesStream::default();
                sse::read_turn(response, NAME, parser, text).await
            }
            (OpenAiApi::Responses | OpenAiApi::Auto, false) => {
                responses::turn_from_body(&sse::json_body(response, NAME).await?, text)
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

/// The JSON of one stream event.
fn parse_data(data: &str) -> Result<Value, ProviderError> {
    serde_json::from_str(data)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::transcript::{Message, Role};
    use pretty_assertions::assert_eq;
    use serde_json::json;

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

    /// A conversation with everything a request body has to carry.
    pub(super) fn transcript() -> Transcript {
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
