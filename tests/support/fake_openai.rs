//! A fake OpenAI API speaking both wire protocols: Chat Completions (`POST /v1/chat/completions`)
//! and Responses (`POST /v1/responses`), streamed or not, replaying the same scripted replies as
//! `fake_anthropic` and recording every request.
//!
//! Checked by the official `openai` SDK with strict response validation. Like the real API it
//! rejects a request without a Bearer key, a tool call left unanswered, or sampling parameters
//! (which our client never sends).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::Response;
use axum::routing::post;
use serde_json::{Value, json};

pub use super::fake_anthropic::{Block, FakeServer, Recorded, Reply, ScriptedTurn};
use super::fake_anthropic::{
    Ending, Script, faulty_reply, frame, json_response, pieces, record, sse_response, take,
};

const CREATED: u64 = 1_763_700_000;

/// The fake OpenAI API.
pub struct FakeOpenAi {
    server: FakeServer,
}

impl std::ops::Deref for FakeOpenAi {
    type Target = FakeServer;
    fn deref(&self) -> &FakeServer {
        &self.server
    }
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let script = Arc::new(Mutex::new(Script::default()));
        let router = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/responses", post(responses))
            .with_state(script.clone());
        Self {
            server: FakeServer::start(router, script).await,
        }
    }

    /// The base URL for the client: with `/v1`, like `OPENAI_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.origin())
    }
}

fn error_json(kind: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": kind}})
}

fn error_response(
    status: u16,
    kind: &str,
    message: &str,
    headers: &[(String, String)],
) -> Response {
    let mut headers = headers.to_vec();
    headers.push(("x-request-id".to_owned(), "req_fake".to_owned()));
    json_response(status, &error_json(kind, message), &headers)
}

fn invalid(message: String) -> Response {
    json_response(
        400,
        &json!({"error": {"message": message, "type": "invalid_request_error", "param": null,
                          "code": null}}),
        &[],
    )
}

/// OpenAI's `error.type` for a status.
fn openai_error_kind(status: u16) -> &'static str {
    match status {
        429 => "rate_limit_exceeded",
        401 => "invalid_api_key",
        _ => "server_error",
    }
}

/// Common checks and bookkeeping: records the request, checks the key and the body, and hands
/// out the next reply (or the response to send instead), after waiting what the fault plan says.
async fn admit(
    script: &Arc<Mutex<Script>>,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    validate: fn(&Value) -> Result<(), String>,
) -> Result<(Recorded, Reply, bool, u64), Response> {
    let admitted = admit_now(script, path, headers, body, validate);
    if let Ok((_, _, _, _, delay)) = &admitted
        && !delay.is_zero()
    {
        tokio::time::sleep(*delay).await;
    }
    admitted.map(|(recorded, reply, stream, n, _)| (recorded, reply, stream, n))
}

#[allow(clippy::result_large_err)] // the error is the response itself, returned once per request
fn admit_now(
    script: &Arc<Mutex<Script>>,
    path: &str,
    headers: &HeaderMap,
    body: &Bytes,
    validate: fn(&Value) -> Result<(), String>,
) -> Result<(Recorded, Reply, bool, u64, std::time::Duration), Response> {
    let recorded = record("POST", path, headers, body);
    let mut s = script.lock().unwrap();
    s.record(&recorded);
    let key = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(key) = key else {
        return Err(error_response(
            401,
            "invalid_api_key",
            "You didn't provide an API key.",
            &[],
        ));
    };
    if s.expected_key.as_deref().is_some_and(|k| k != key) {
        return Err(error_response(
            401,
            "invalid_api_key",
            "Incorrect API key provided",
            &[],
        ));
    }
    if recorded.body.is_null() {
        return Err(invalid(
            "We could not parse the JSON body of your request.".into(),
        ));
    }
    if recorded.body.get("model").is_none() {
        return Err(invalid("you must provide a model parameter".into()));
    }
    for field in ["temperature", "top_p"] {
        if recorded.body.get(field).is_some() {
            return Err(invalid(format!("Unsupported parameter: '{field}'")));
        }
    }
    validate(&recorded.body).map_err(invalid)?;
    s.served += 1;
    let n = s.served;
    let ignore_stream = s.ignore_stream;
    let route = if path.ends_with("/responses") {
        "openai.responses"
    } else {
        "openai.chat"
    };
    let (delay, fault) = s.draw(route);
    let reply = faulty_reply(fault, openai_error_kind, || {
        s.next_reply(None, &recorded.body)
    })?;
    let Some(reply) = reply else {
        return Err(error_response(
            500,
            "server_error",
            "fake: the script has no more replies",
            &[("x-should-retry".into(), "false".into())],
        ));
    };
    let stream = recorded.body["stream"] == json!(true) && !ignore_stream;
    Ok((recorded, reply, stream, n, delay))
}

fn text_of(turn: &ScriptedTurn) -> String {
    turn.blocks
        .iter()
        .filter_map(|b| match b {
            Block::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("")
}

/// `(call_id, name, arguments string)` of every tool call in a turn.
fn calls_of(turn: &ScriptedTurn) -> Vec<(String, String, String)> {
    turn.blocks
        .iter()
        .filter_map(|b| match b {
            Block::ToolCall { id, name, input } => {
                Some((id.clone(), name.clone(), input.to_string()))
            }
            Block::RawToolCall { id, name, raw } => Some((id.clone(), name.clone(), raw.clone())),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Chat Completions

fn validate_chat(body: &Value) -> Result<(), String> {
    let messages = body["messages"]
        .as_array()
        .ok_or("Missing required parameter: 'messages'.")?;
    let mut pending: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = m["role"].as_str().unwrap_or("");
        if role == "tool" {
            let id = m["tool_call_id"].as_str().unwrap_or("");
            if !pending.iter().any(|p| p == id) {
                return Err(format!(
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'. (messages.[{i}])"
                ));
            }
            pending.retain(|p| p != id);
            continue;
        }
        if !pending.is_empty() {
            return Err(format!(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each 'tool_call_id'. The following tool_call_ids did not have response messages: {}",
                pending.join(", ")
            ));
        }
        if role == "assistant" {
            pending = m["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| c["id"].as_str().unwrap_or("").to_owned())
                .collect();
        }
    }
    Ok(())
}

async fn chat(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (recorded, reply, stream, n) = match admit(
        &script,
        "/v1/chat/completions",
        &headers,
        &body,
        validate_chat,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let model = recorded.body["model"].as_str().unwrap_or("gpt").to_owned();
    let id = format!("chatcmpl-fake{n:04}");
    let usage = recorded.body["stream_options"]["include_usage"] == json!(true);
    match reply {
        Reply::Error {
            status,
            kind,
            message,
            headers,
        } => error_response(status, &kind, &message, &headers),
        Reply::Turn(turn) if !stream => {
            json_response(200, &completion_json(&id, &model, &turn), &[])
        }
        Reply::Turn(turn) => sse_response(
            chat_frames(&id, &model, &turn, usage),
            Ending::Then(frame(None, "[DONE]")),
        ),
        Reply::Cut { turn, after } => sse_response(
            take(chat_frames(&id, &model, &turn, usage), after),
            Ending::Cut,
        ),
        Reply::EndEarly { turn, after } => sse_response(
            take(chat_frames(&id, &model, &turn, usage), after),
            Ending::Early,
        ),
        Reply::StreamError {
            turn,
            after,
            kind,
            message,
        } => sse_response(
            take(chat_frames(&id, &model, &turn, usage), after),
            Ending::Then(frame(None, &error_json(&kind, &message).to_string())),
        ),
        Reply::BareError { message, .. } if !stream => {
            json_response(200, &json!({ "error": message }), &[])
        }
        Reply::BareError {
            turn,
            after,
            message,
        } => sse_response(
            take(chat_frames(&id, &model, &turn, usage), after),
            Ending::Then(frame(None, &json!({ "error": message }).to_string())),
        ),
        Reply::Stall => sse_response(vec![], Ending::Stall),
    }
}

fn finish_reason(stop: &str) -> &str {
    match stop {
        "tool_use" => "tool_calls",
        "end_turn" | "stop_sequence" | "refusal" | "pause_turn" => "stop",
        "max_tokens" | "model_context_window_exceeded" => "length",
        other => other,
    }
}

fn chat_usage(turn: &ScriptedTurn) -> Value {
    json!({"prompt_tokens": turn.input_tokens, "completion_tokens": turn.output_tokens,
           "total_tokens": turn.input_tokens + turn.output_tokens})
}

fn completion_json(id: &str, model: &str, turn: &ScriptedTurn) -> Value {
    let text = text_of(turn);
    let refusal = turn.stop == "refusal";
    let calls: Vec<Value> = calls_of(turn)
        .into_iter()
        .map(|(id, name, args)| {
            json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
        })
        .collect();
    let mut message = json!({
        "role": "assistant",
        "content": if text.is_empty() || refusal { Value::Null } else { json!(text) },
        "refusal": if refusal { json!(text) } else { Value::Null },
    });
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": id, "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{"index": 0, "finish_reason": finish_reason(&turn.stop), "logprobs": null,
                     "message": message}],
        "usage": chat_usage(turn),
    })
}

fn chat_frames(id: &str, model: &str, turn: &ScriptedTurn, usage: bool) -> Vec<Bytes> {
    let chunk = |delta: Value, finish: Value| {
        let data = json!({"id": id, "object": "chat.completion.chunk", "created": CREATED,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                         "finish_reason": finish}]});
        frame(None, &data.to_string())
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let text = text_of(turn);
    let field = if turn.stop == "refusal" {
        "refusal"
    } else {
        "content"
    };
    if !text.is_empty() {
        for piece in pieces(&text, 7) {
            frames.push(chunk(json!({ field: piece }), Value::Null));
        }
    }
    for (index, (call_id, name, args)) in calls_of(turn).into_iter().enumerate() {
        frames.push(chunk(
            json!({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            Value::Null,
        ));
        for piece in pieces(&args, 9) {
            frames.push(chunk(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                Value::Null,
            ));
        }
    }
    frames.push(chunk(json!({}), json!(finish_reason(&turn.stop))));
    if usage {
        let data = json!({"id": id, "object": "chat.completion.chunk", "created": CREATED,
                          "model": model, "choices": [], "usage": chat_usage(turn)});
        frames.push(frame(None, &data.to_string()));
    }
    frames
}

// ---------------------------------------------------------------------------------------------
// Responses

fn validate_responses(body: &Value) -> Result<(), String> {
    let input = match &body["input"] {
        Value::String(_) => return Ok(()),
        Value::Array(items) => items,
        _ => return Err("Missing required parameter: 'input'.".into()),
    };
    let outputs: Vec<&str> = input
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .map(|i| i["call_id"].as_str().unwrap_or(""))
        .collect();
    for item in input {
        match item["type"].as_str() {
            Some("function_call") => {
                let call_id = item["call_id"].as_str().unwrap_or("");
                if !outputs.contains(&call_id) {
                    return Err(format!("No tool output found for function call {call_id}."));
                }
                if !item["arguments"].is_string() {
                    return Err("Invalid type for 'input[].arguments': expected a string".into());
                }
            }
            Some("function_call_output") | Some("reasoning") | Some("message") => {}
            Some(other) => return Err(format!("Invalid value: '{other}'.")),
            None => {
                if !matches!(
                    item["role"].as_str(),
                    Some("user" | "assistant" | "system" | "developer")
                ) {
                    return Err("Invalid input item: missing 'role'.".into());
                }
            }
        }
    }
    Ok(())
}

async fn responses(
    State(script): State<Arc<Mutex<Script>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (recorded, reply, stream, n) = match admit(
        &script,
        "/v1/responses",
        &headers,
        &body,
        validate_responses,
    )
    .await
    {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let id = format!("resp_fake{n:04}");
    let request = &recorded.body;
    match reply {
        Reply::Error {
            status,
            kind,
            message,
            headers,
        } => error_response(status, &kind, &message, &headers),
        Reply::Turn(turn) if !stream => {
            json_response(200, &response_json(&id, request, &turn, true), &[])
        }
        Reply::Turn(turn) => sse_response(response_frames(&id, request, &turn), Ending::Complete),
        Reply::Cut { turn, after } => sse_response(
            take(response_frames(&id, request, &turn), after),
            Ending::Cut,
        ),
        Reply::EndEarly { turn, after } => sse_response(
            take(response_frames(&id, request, &turn), after),
            Ending::Early,
        ),
        Reply::StreamError {
            turn,
            after,
            kind,
            message,
        } => {
            let error = json!({"type": "error", "code": kind, "message": message, "param": null,
                               "sequence_number": after});
            sse_response(
                take(response_frames(&id, request, &turn), after),
                Ending::Then(frame(Some("error"), &error.to_string())),
            )
        }
        Reply::BareError { message, .. } if !stream => {
            json_response(200, &json!({ "error": message }), &[])
        }
        Reply::BareError {
            turn,
            after,
            message,
        } => {
            let error = json!({"type": "error", "error": message, "sequence_number": after});
            sse_response(
                take(response_frames(&id, request, &turn), after),
                Ending::Then(frame(Some("error"), &error.to_string())),
            )
        }
        Reply::Stall => sse_response(vec![], Ending::Stall),
    }
}

/// The output items of a turn, finished (`done`) or as first announced.
fn output_items(id: &str, turn: &ScriptedTurn, done: bool) -> Vec<Value> {
    let status = if done { "completed" } else { "in_progress" };
    let mut items = Vec::new();
    for (k, block) in turn.blocks.iter().enumerate() {
        match block {
            Block::Thinking { signature, .. } => items.push(json!({
                "type": "reasoning", "id": format!("rs_{id}_{k}"), "summary": [],
                "encrypted_content": signature})),
            Block::Text(text) => {
                let part = if turn.stop == "refusal" {
                    json!({"type": "refusal", "refusal": text})
                } else {
                    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
                };
                items.push(json!({
                    "type": "message", "id": format!("msg_{id}_{k}"), "role": "assistant",
                    "status": status, "content": if done { json!([part]) } else { json!([]) }}));
            }
            Block::ToolCall { .. } | Block::RawToolCall { .. } => {}
        }
        let call = match block {
            Block::ToolCall {
                id: call_id,
                name,
                input,
            } => Some((call_id, name, input.to_string())),
            Block::RawToolCall {
                id: call_id,
                name,
                raw,
            } => Some((call_id, name, raw.clone())),
            _ => None,
        };
        if let Some((call_id, name, args)) = call {
            items.push(json!({
                "type": "function_call", "id": format!("fc_{id}_{k}"), "call_id": call_id,
                "name": name, "arguments": if done { args } else { String::new() },
                "status": status}));
        }
    }
    items
}

fn response_json(id: &str, request: &Value, turn: &ScriptedTurn, done: bool) -> Value {
    let incomplete = matches!(
        turn.stop.as_str(),
        "max_tokens" | "model_context_window_exceeded"
    );
    let status = match (done, incomplete) {
        (false, _) => "in_progress",
        (true, true) => "incomplete",
        (true, false) => "completed",
    };
    json!({
        "id": id, "object": "response", "created_at": CREATED, "status": status,
        "model": request["model"], "output": if done { json!(output_items(id, turn, true)) } else { json!([]) },
        "parallel_tool_calls": true,
        "tool_choice": request.get("tool_choice").cloned().unwrap_or(json!("auto")),
        "tools": request.get("tools").cloned().unwrap_or(json!([])),
        "instructions": request.get("instructions").cloned().unwrap_or(Value::Null),
        "incomplete_details": if done && incomplete { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "error": null,
        "store": false,
        "usage": if done { json!({
            "input_tokens": turn.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": turn.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": turn.input_tokens + turn.output_tokens}) } else { Value::Null },
    })
}

fn response_frames(id: &str, request: &Value, turn: &ScriptedTurn) -> Vec<Bytes> {
    let mut frames = Vec::new();
    let mut seq = 0u64;
    let mut push = |mut data: Value| {
        data["sequence_number"] = json!(seq);
        seq += 1;
        let name = data["type"].as_str().unwrap_or("").to_owned();
        frames.push(frame(Some(&name), &data.to_string()));
    };
    let pending = response_json(id, request, turn, false);
    push(json!({"type": "response.created", "response": pending}));
    push(json!({"type": "response.in_progress", "response": pending}));
    let started = output_items(id, turn, false);
    let finished = output_items(id, turn, true);
    for (index, (start, done)) in started.iter().zip(&finished).enumerate() {
        push(json!({"type": "response.output_item.added", "output_index": index, "item": start}));
        let item_id = done["id"].clone();
        match done["type"].as_str() {
            Some("message") => {
                let part = &done["content"][0];
                let empty = if part["type"] == "refusal" {
                    json!({"type": "refusal", "refusal": ""})
                } else {
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []})
                };
                push(
                    json!({"type": "response.content_part.added", "item_id": item_id,
                            "output_index": index, "content_index": 0, "part": empty}),
                );
                if part["type"] == "refusal" {
                    let text = part["refusal"].as_str().unwrap_or("");
                    for piece in pieces(text, 7) {
                        push(json!({"type": "response.refusal.delta", "item_id": item_id,
                                    "output_index": index, "content_index": 0, "delta": piece}));
                    }
                    push(json!({"type": "response.refusal.done", "item_id": item_id,
                                "output_index": index, "content_index": 0, "refusal": text}));
                } else {
                    let text = part["text"].as_str().unwrap_or("");
                    for piece in pieces(text, 7) {
                        push(
                            json!({"type": "response.output_text.delta", "item_id": item_id,
                                    "output_index": index, "content_index": 0, "delta": piece,
                                    "logprobs": []}),
                        );
                    }
                    push(
                        json!({"type": "response.output_text.done", "item_id": item_id,
                                "output_index": index, "content_index": 0, "text": text,
                                "logprobs": []}),
                    );
                }
                push(
                    json!({"type": "response.content_part.done", "item_id": item_id,
                            "output_index": index, "content_index": 0, "part": part}),
                );
            }
            Some("function_call") => {
                let args = done["arguments"].as_str().unwrap_or("");
                for piece in pieces(args, 9) {
                    push(json!({"type": "response.function_call_arguments.delta",
                                "item_id": item_id, "output_index": index, "delta": piece}));
                }
                push(
                    json!({"type": "response.function_call_arguments.done", "item_id": item_id,
                            "output_index": index, "arguments": args, "name": done["name"]}),
                );
            }
            _ => {}
        }
        push(json!({"type": "response.output_item.done", "output_index": index, "item": done}));
    }
    let last = response_json(id, request, turn, true);
    let kind = if last["status"] == "incomplete" {
        "response.incomplete"
    } else {
        "response.completed"
    };
    push(json!({"type": kind, "response": last}));
    frames
}
