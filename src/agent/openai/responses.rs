//! The Responses API (`POST {base}/responses`): the stateless request body from a
//! [`Transcript`], and the reply, streamed as named events ending in `response.completed` (or
//! `incomplete`, `failed`) or sent as one `Response`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::{
    CallInProgress, NAME, arguments_string, body_error, cut_stream, parse_data, stop_from,
    stream_error, tool_output,
};
use crate::agent::provider::{ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn};
use crate::agent::sse::{Fed, TurnParser};
use crate::agent::transcript::{Part, Role, Transcript, joined_text};

/// Output budget per turn on the Responses API (Chat Completions leaves it to the server, since
/// compatible servers disagree on the field's name).
const MAX_OUTPUT_TOKENS: u32 = 32_000;

/// The streamed, stateless request for the next turn of `transcript`.
pub(super) fn body(model: &str, transcript: &Transcript, tools: &[ToolSpec]) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(model));
    if !transcript.system.is_empty() {
        body.insert("instructions".into(), json!(transcript.system));
    }
    body.insert("input".into(), Value::Array(input(transcript)));
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

/// The transcript as Responses `input` items: calls and their outputs as items of their own, and
/// our own reasoning items sent back verbatim; other providers' opaque parts are dropped.
fn input(transcript: &Transcript) -> Vec<Value> {
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

/// The non-empty `output_text` parts of a message item: what a stream would have shown.
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

/// The turn for a finished `Response`. `streamed` holds the output items a stream announced and
/// finished (`output_item.added`, `.done`), used when the final response does not repeat them.
fn turn_from_response(response: &Value, streamed: Vec<Value>) -> Turn {
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

/// The turn for a `Response` sent as one JSON document (by a server that does not stream).
pub(super) fn turn_from_body(body: &Value, sink: &dyn TextSink) -> Result<Turn, ProviderError> {
    if let Some(error) = body_error(body) {
        return Err(stream_error(error));
    }
    for item in body
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        for t in output_texts(item) {
            sink.text_delta(NAME, t);
        }
    }
    Ok(turn_from_response(body, Vec::new()))
}

/// Folds the named events of a streamed response into a turn.
#[derive(Default)]
pub(super) struct ResponsesStream {
    /// Output items by index, as `output_item.added` announced them and `.done` finished them.
    items: BTreeMap<u64, Value>,
    /// Function-call arguments by item index, from their deltas.
    arguments: BTreeMap<u64, String>,
    /// Set by `response.completed` or `response.incomplete`.
    turn: Option<Turn>,
}

impl TurnParser for ResponsesStream {
    fn feed(&mut self, event: &str, data: &str) -> Result<Fed, ProviderError> {
        if data.trim().is_empty() {
            return Ok(Fed::Nothing);
        }
        let data = parse_data(data)?;
        let kind = data.get("type").and_then(Value::as_str).unwrap_or(event);
        let index = data.get("output_index").and_then(Value::as_u64);
        match kind {
            "response.output_text.delta" => {
                if let Some(delta) = data.get("delta").and_then(Value::as_str)
                    && !delta.is_empty()
                {
                    return Ok(Fed::Text(delta.to_owned()));
                }
            }
            "response.output_item.added" | "response.output_item.done" => {
                if let (Some(index), Some(item)) = (index, data.get("item")) {
                    self.items.insert(index, item.clone());
                }
            }
            "response.function_call_arguments.delta" => {
                if let (Some(index), Some(delta)) =
                    (index, data.get("delta").and_then(Value::as_str))
                {
                    self.arguments.entry(index).or_default().push_str(delta);
                }
            }
            "response.completed" | "response.incomplete" => {
                let streamed = std::mem::take(&mut self.items)
                    .into_iter()
                    .map(|(index, mut item)| {
                        let missing = item
                            .get("arguments")
                            .and_then(Value::as_str)
                            .is_none_or(str::is_empty);
                        if missing
                            && let Some(fields) = item.as_object_mut()
                            && let Some(args) = self.arguments.remove(&index)
                        {
                            fields.insert("arguments".to_owned(), Value::String(args));
                        }
                        item
                    })
                    .collect();
                let response = data.get("response").unwrap_or(&Value::Null);
                self.turn = Some(turn_from_response(response, streamed));
                return Ok(Fed::End);
            }
            "response.failed" => {
                let error = data
                    .pointer("/response/error")
                    .filter(|e| !e.is_null())
                    .cloned()
                    .unwrap_or_else(|| json!({"message": "the response failed"}));
                return Err(stream_error(&error));
            }
            "error" => return Err(stream_error(data.get("error").unwrap_or(&data))),
            _ => {}
        }
        Ok(Fed::Nothing)
    }

    fn finish(self) -> Result<Turn, ProviderError> {
        self.turn.ok_or_else(|| cut_stream("response.completed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::openai::tests::transcript;
    use crate::agent::provider::{FailureKind, NoText};
    use crate::agent::sse::testing::{Failure, call, text, usage};
    use pretty_assertions::assert_eq;

    /// A recorded-style stream from `tests/fixtures/openai/responses/`.
    macro_rules! fixture {
        ($name:literal) => {
            include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/openai/responses/",
                $name
            ))
        };
    }

    fn read(sse: &str) -> (Result<Turn, Failure>, Vec<String>) {
        crate::agent::sse::testing::read(ResponsesStream::default(), sse)
    }

    #[test]
    fn stream_of_text() {
        let (turn, deltas) = read(fixture!("text.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![text("Added a docstring to `main` — done.")],
                stop: StopReason::EndTurn,
                usage: usage(120, 14),
            })
        );
        assert_eq!(deltas, ["Added a", " docstring to", " `main` — done."]);
    }

    #[test]
    fn stream_of_reasoning_and_parallel_tool_calls() {
        let (turn, deltas) = read(fixture!("tool_calls.sse"));
        let reasoning = json!({"id": "rs_68f1c2aa0d648190a1b2c3d4e5f6a7b80c1e9f7b3a2d4e5f",
            "type": "reasoning", "summary": [],
            "encrypted_content": "gAAAAABo8cKqZ3J1c3QtbWUtSSdtLXJlYXNvbmluZw=="});
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![
                    Part::Opaque {
                        provider: NAME.into(),
                        value: reasoning,
                    },
                    call("call_Qm1", "read_file", json!({"path": "main.py"})),
                    call(
                        "call_Qm2",
                        "edit_file",
                        json!({"path": "main.py", "old_str": "print(\"hi\")",
                               "new_str": "print(\"héllo\")"})
                    ),
                ],
                stop: StopReason::ToolUse,
                usage: usage(2048, 310),
            })
        );
        assert_eq!(deltas, Vec::<String>::new());
    }

    /// A server whose final response repeats no output: the items come from the stream, and the
    /// call's arguments from its deltas.
    #[test]
    fn stream_whose_final_response_has_no_output() {
        let (turn, deltas) = read(fixture!("completed_without_output.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![
                    text("Reading it."),
                    call("call_Zx9", "read_file", json!({"path": "main.py"})),
                ],
                stop: StopReason::ToolUse,
                usage: usage(64, 20),
            })
        );
        assert_eq!(deltas, ["Reading it."]);
    }

    #[test]
    fn stream_cut_by_the_output_limit() {
        let (turn, deltas) = read(fixture!("incomplete.sse"));
        assert_eq!(
            turn,
            Ok(Turn {
                content: vec![text("Here is the whole file:\ndef main():")],
                stop: StopReason::MaxTokens,
                usage: usage(900, 32000),
            })
        );
        assert_eq!(deltas, ["Here is the whole file:\n", "def main():"]);
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
        assert_eq!(deltas, Vec::<String>::new());
    }

    #[test]
    fn stream_errors() {
        assert_eq!(
            read(fixture!("failed.sse")).0,
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: server_error: The model failed to generate a response."
                    .into()
            ))
        );
        assert_eq!(
            read(fixture!("quota_error.sse")).0,
            Err((
                FailureKind::Fallback,
                None,
                "openai stream error: error/insufficient_quota: You exceeded your current quota, \
                 please check your plan and billing details."
                    .into()
            ))
        );
        let failed_without_error = "event: response.failed\n\
            data: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":null}}\n\n";
        assert_eq!(
            read(failed_without_error).0,
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: the response failed".into()
            ))
        );
    }

    #[test]
    fn stream_errors_given_as_a_bare_string_keep_their_text() {
        let error_event = "event: error\n\
            data: {\"type\":\"error\",\"sequence_number\":3,\"error\":\"upstream overloaded\"}\n\n";
        let failed = "event: response.failed\n\
            data: {\"type\":\"response.failed\",\"sequence_number\":3,\
                   \"response\":{\"status\":\"failed\",\"error\":\"upstream overloaded\"}}\n\n";
        let want = Err((
            FailureKind::Retryable,
            None,
            "openai stream error: upstream overloaded".to_owned(),
        ));
        assert_eq!([read(error_event).0, read(failed).0], [want.clone(), want]);
    }

    #[test]
    fn streams_that_end_early_or_garbled_are_retryable() {
        let text = fixture!("text.sse");
        let cut = &text[..text.find("event: response.completed").unwrap()];
        let (turn, deltas) = read(cut);
        assert_eq!(
            turn,
            Err((
                FailureKind::Retryable,
                None,
                "openai: the stream ended before response.completed".into()
            ))
        );
        assert_eq!(deltas, ["Added a", " docstring to", " `main` — done."]);

        let (kind, status, message) = read("event: response.created\ndata: {\"type\n\n")
            .0
            .unwrap_err();
        assert_eq!((kind, status), (FailureKind::Retryable, None));
        assert!(
            message.starts_with("openai: malformed stream event: "),
            "{message}"
        );
    }

    /// Data without a `type` is known by its event name.
    #[test]
    fn the_event_name_stands_in_for_a_missing_type() {
        let sse = "event: response.output_text.delta\ndata: {\"output_index\":0,\"delta\":\"Hi\"}\n\n\
                   event: response.completed\ndata: {\"response\":{\"status\":\"completed\",\
                   \"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\
                   \"text\":\"Hi\"}]}]}}\n\n";
        assert_eq!(
            read(sse),
            (
                Ok(Turn {
                    content: vec![text("Hi")],
                    stop: StopReason::EndTurn,
                    usage: TokenUsage::default(),
                }),
                vec!["Hi".to_owned()]
            )
        );
    }

    #[test]
    fn responses_sent_whole() {
        let body = json!({
            "id": "resp_1", "object": "response", "created_at": 1763700000, "status": "completed",
            "model": "gpt-6.1-sol", "error": null, "incomplete_details": null,
            "output": [
                {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                 "content": [{"type": "output_text", "text": "Reading.", "annotations": []}]},
                {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "read_file",
                 "arguments": "{\"path\": \"a\"}", "status": "completed"},
            ],
            "parallel_tool_calls": true, "tool_choice": "auto", "tools": [],
            "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
        });
        assert_eq!(
            turn_from_body(&body, &NoText).map_err(|e| e.message),
            Ok(Turn {
                content: vec![
                    text("Reading."),
                    call("call_1", "read_file", json!({"path": "a"}))
                ],
                stop: StopReason::ToolUse,
                usage: usage(10, 5),
            })
        );
        assert_eq!(
            turn_from_body(&json!({"error": "upstream overloaded"}), &NoText)
                .map_err(|e| (e.kind, e.status, e.message)),
            Err((
                FailureKind::Retryable,
                None,
                "openai stream error: upstream overloaded".into()
            ))
        );
    }

    #[test]
    fn responses_wire() {
        assert_eq!(
            Value::Array(input(&transcript())),
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
}
