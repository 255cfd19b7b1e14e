//! Chat Completions (`POST {base}/chat/completions`): the request body from a [`Transcript`], and
//! the reply, streamed as data-only chunks ending in `[DONE]` or sent as one completion.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{
    CallInProgress, NAME, arguments_string, body_error, cut_stream, parse_data, stop_from,
    stream_error, tool_output,
};
use crate::agent::provider::{ProviderError, TextSink, TokenUsage, ToolSpec, Turn};
use crate::agent::sse::{Fed, TurnParser};
use crate::agent::transcript::{Part, Role, Transcript, joined_text};

/// The streamed request for the next turn of `transcript`.
pub(super) fn body(model: &str, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    body.insert("messages".into(), Value::Array(messages(transcript)));
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

/// The transcript as Chat `messages`: the system prompt first, each assistant message's calls in
/// `tool_calls`, and their answers as `tool` messages right after it. Opaque parts are dropped.
fn messages(transcript: &Transcript) -> Vec<Value> {
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

/// Token counts from a `usage` object (the last chunk carries it when `include_usage` is set).
fn usage_from(usage: Option<&Value>) -> Option<TokenUsage> {
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

/// Folds the chunks of a streamed completion into a turn.
#[derive(Default)]
pub(super) struct ChatStream {
    acc: ChatAccumulator,
    done: bool,
}

impl TurnParser for ChatStream {
    fn feed(&mut self, _event: &str, data: &str) -> Result<Fed, ProviderError> {
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return Ok(Fed::End);
        }
        if data.is_empty() {
            return Ok(Fed::Nothing);
        }
        let chunk = parse_data(data)?;
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return Err(stream_error(error));
        }
        if let Some(usage) = usage_from(chunk.get("usage")) {
            self.acc.usage = usage;
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Ok(Fed::Nothing);
        };
        let mut shown = Fed::Nothing;
        if let Some(delta) = choice.get("delta") {
            if let Some(piece) = delta.get("content").and_then(Value::as_str)
                && !piece.is_empty()
            {
                self.acc.text.push_str(piece);
                shown = Fed::Text(piece.to_owned());
            }
            if let Some(piece) = delta.get("refusal").and_then(Value::as_str) {
                self.acc.refusal.push_str(piece);
            }
            if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
                self.acc.apply_tool_calls(calls);
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.acc.finish_reason = Some(reason.to_owned());
        }
        Ok(shown)
    }

    fn finish(self) -> Result<Turn, ProviderError> {
        // `[DONE]` is the end; a server that closes right after the finish reason lost nothing.
        if !self.done && self.acc.finish_reason.is_none() {
            return Err(cut_stream("its finish_reason"));
        }
        Ok(self.acc.into_turn())
    }
}

/// The turn for a completion sent as one JSON document (by a server that does not stream).
pub(super) fn turn_from_completion(
    body: &Value,
    sink: &dyn TextSink,
) -> Result<Turn, ProviderError> {
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
        usage: usage_from(body.get("usage")).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::openai::tests::transcript;
    use crate::agent::provider::{FailureKind, NoText, StopReason};
    use crate::agent::sse::testing::{Failure, broken_call, call, text, usage};
    use pretty_assertions::assert_eq;

    /// A recorded-style stream from `tests/fixtures/openai/chat/`.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/openai/chat/",
                $name
            ))
        };
    }

    fn read(sse: &str) -> (Result<Turn, Failure>, Vec<String>) {
        crate::agent::sse::testing::read(ChatStream::default(), sse)
    }

    #[test]
    fn stream_of_text_with_usage_last() {
        let (turn, deltas) = read(fixture!("text.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![text("Added a docstring to `main` — done.")],
                stop: StopReason::EndTurn,
                usage: usage(41, 9),
            })
        );
        assert_eq!(deltas, ["Added a", " docstring to", " `main` — done."]);
    }

    #[test]
    fn stream_of_a_tool_call_with_arguments_split_mid_escape() {
        let (turn, deltas) = read(fixture!("tool_call.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![
                    text("Fixing the greeting."),
                    call(
                        "call_Vx3oWbHnQd8pUgk2Jd9aS1fR",
                        "edit_file",
                        json!({"path": "main.py", "old_str": "print(\"hi\")",
                               "new_str": "print(\"héllo\")"})
                    ),
                ],
                stop: StopReason::ToolUse,
                usage: usage(812, 57),
            })
        );
        assert_eq!(deltas, ["Fixing the greeting."]);
    }

    #[test]
    fn stream_of_parallel_tool_calls_in_index_order() {
        let (turn, deltas) = read(fixture!("parallel_tool_calls.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![
                    call("call_a1", "read_file", json!({"path": "main.py"})),
                    call("call_b2", "read_file", json!({"path": "lib.py"})),
                    // Empty arguments mean none.
                    call("call_c3", "list_files", json!({})),
                    broken_call("call_d4", "edit_file", r#"{"path": "main.py", "old_s"#),
                ],
                stop: StopReason::ToolUse,
                usage: usage(300, 80),
            })
        );
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_of_a_refusal() {
        let (turn, deltas) = read(fixture!("refusal.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![text("I'm sorry, I can't help with that.")],
                stop: StopReason::Refusal,
                usage: usage(30, 10),
            })
        );
        // A refusal is the turn's content, not something the model wrote for the user.
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_cut_by_the_length_limit() {
        let (turn, deltas) = read(fixture!("length.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![text("Here is the whole file:\ndef main():")],
                stop: StopReason::MaxTokens,
                usage: TokenUsage::default(),
            })
        );
        assert_eq!(deltas, ["Here is the whole file:\n", "def main():"]);
    }

    /// Ollama-style: arguments as an object, `stop` after a tool call, no `[DONE]`.
    #[test]
    fn stream_from_a_compatible_server() {
        let (turn, deltas) = read(fixture!("compatible_server.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![call("call_k2a9x", "read_file", json!({"path": "main.py"}))],
                stop: StopReason::ToolUse,
                usage: TokenUsage::default(),
            })
        );
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_errors() {
        let (turn, deltas) = read(fixture!("server_error.sse"));
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: server_error: The server had an error while processing \
                 your request. Sorry about that!"
                    .into()
            ))
        );
        assert_eq!(deltas, ["Let me"]);

        let quota = r#"data: {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}"#;
        assert_eq!(
            read(&format!("{quota}\n\n")).0,
            Err((
                FailureKind::Fallback,
                None,
                "openai stream error: insufficient_quota: You exceeded your current quota".into()
            ))
        );
    }

    #[test]
    fn stream_error_given_as_a_bare_string_keeps_its_text() {
        let (turn, _) = read("data: {\"error\": \"upstream overloaded\"}\n\n");
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: upstream overloaded".into()
            ))
        );
        // An error with nothing readable in it is shown as sent.
        let (turn, _) = read("data: {\"error\": {\"param\": null}}\n\n");
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                None,
                r#"openai stream error: {"param":null}"#.into()
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
                "openai: the stream ended before its finish_reason".into()
            ))
        );
        assert_eq!(deltas, ["Let me look"]);

        let (kind, status, message) = read("data: {\"choices\": [\n\n").0.unwrap_err();
        assert_eq!((kind, status), (FailureKind::Retryable, None));
        assert!(
            message.starts_with("openai: malformed stream event: "),
            "{message}"
        );
    }

    /// `[DONE]` ends the reading: nothing after it can spoil the turn.
    #[test]
    fn nothing_is_read_after_done() {
        let text = fixture!("text.sse");
        let (turn, _) = read(&format!("{text}data: {{not json\n\n"));
        assert_eq!(turn, read(text).0);
        assert_eq!(turn.map(|t| t.stop), Ok(StopReason::EndTurn));
    }

    #[test]
    fn completions_sent_whole() {
        let body = json!({
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1763700000,
            "model": "gpt-6.1-sol",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": null,
                "message": {"role": "assistant", "content": "Reading.", "refusal": null,
                    "tool_calls": [{"id": "call_abc", "type": "function",
                        "function": {"name": "read_file", "arguments": "{\"path\": \"a\"}"}}]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        });
        assert_eq!(
            turn_from_completion(&body, &NoText).map_err(|e| e.message),
            Ok(Turn {
                content: vec![
                    text("Reading."),
                    call("call_abc", "read_file", json!({"path": "a"}))
                ],
                stop: StopReason::ToolUse,
                usage: usage(10, 5),
            })
        );
        let failure = |body: Value| {
            turn_from_completion(&body, &NoText).map_err(|e| (e.kind, e.status, e.message))
        };
        assert_eq!(
            failure(json!({"error": "upstream overloaded"})),
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: upstream overloaded".into()
            ))
        );
        assert_eq!(
            failure(json!({"id": "chatcmpl-2", "choices": []})),
            Err((
                FailureKind::Retryable,
                None,
                "openai: the completion has no choices".into()
            ))
        );
    }

    #[test]
    fn chat_wire() {
        assert_eq!(
            Value::Array(messages(&transcript())),
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
}
