//! The Anthropic and OpenAI providers against the in-process fakes: streaming text deltas,
//! tool-call parsing (parallel and malformed), every stop reason, error classification, retries,
//! dropped streams, and the API key staying in the auth header.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Mutex;
use std::time::Duration;

use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use support::fake_anthropic::{Block, FakeAnthropic, Recorded, Reply, ScriptedTurn};
use support::fake_openai::FakeOpenAi;
use tiny_backspace::agent::anthropic::{AnthropicConfig, AnthropicProvider};
use tiny_backspace::agent::openai::{OpenAiApi, OpenAiConfig, OpenAiProvider};
use tiny_backspace::agent::retry::{RetryPolicy, with_retries};
use tiny_backspace::agent::{
    FailureKind, Message, Part, Provider, ProviderError, Role, StopReason, TextSink, TokenUsage,
    ToolSpec, Transcript, Turn,
};

const CANARY: &str = "sk-canary-4b1d9e27c0ffee";

/// Collects the text deltas a provider streams.
#[derive(Default)]
struct Deltas(Mutex<Vec<(String, String)>>);

impl TextSink for Deltas {
    fn text_delta(&self, provider: &str, delta: &str) {
        self.0
            .lock()
            .unwrap()
            .push((provider.to_owned(), delta.to_owned()));
    }
}

impl Deltas {
    fn pieces(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.clone())
            .collect()
    }
    fn providers(&self) -> Vec<String> {
        let mut p: Vec<String> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|(p, _)| p.clone())
            .collect();
        p.dedup();
        p
    }
}

fn tools() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "read_file",
            description: "Read a file",
            parameters: json!({"type": "object", "properties": {"path": {"type": "string"}},
                               "required": ["path"]}),
        },
        ToolSpec {
            name: "edit_file",
            description: "Replace old_str with new_str",
            parameters: json!({"type": "object", "properties": {
                "path": {"type": "string"}, "old_str": {"type": "string"},
                "new_str": {"type": "string"}}, "required": ["path", "old_str", "new_str"]}),
        },
    ]
}

fn transcript() -> Transcript {
    Transcript::new("You are a coding agent.", "Add a docstring to main.py")
}

fn anthropic(fake: &FakeAnthropic) -> AnthropicProvider {
    AnthropicProvider::new(AnthropicConfig {
        api_key: CANARY.into(),
        base_url: fake.base_url(),
        model: "claude-sonnet-5-5".into(),
    })
    .unwrap()
}

fn openai(fake: &FakeOpenAi, api: OpenAiApi) -> OpenAiProvider {
    OpenAiProvider::new(OpenAiConfig {
        api_key: CANARY.into(),
        base_url: fake.base_url(),
        model: "gpt-6.1-sol".into(),
        api,
    })
    .unwrap()
}

fn call(id: &str, name: &str, arguments: Value) -> Part {
    Part::ToolCall {
        id: id.into(),
        name: name.into(),
        arguments,
        raw_arguments: None,
    }
}

fn text(t: &str) -> Part {
    Part::Text { text: t.into() }
}

/// The key appears in the auth header and nowhere in the body.
fn assert_key_only_in_auth(request: &Recorded, header: &str, value: &str) {
    assert_eq!(request.header(header), Some(value));
    assert!(
        !request.raw_body.contains(CANARY),
        "the API key leaked into the body"
    );
    for (name, v) in &request.headers {
        if name != header {
            assert!(!v.contains(CANARY), "the API key leaked into header {name}");
        }
    }
}

fn no_sampling(body: &Value) {
    for field in ["temperature", "top_p", "top_k"] {
        assert!(body.get(field).is_none(), "{field} was sent");
    }
}

// ---------------------------------------------------------------------------------------------
// Anthropic

#[tokio::test]
async fn anthropic_streams_text_and_parses_tool_calls() {
    let fake = FakeAnthropic::start().await;
    fake.push([Reply::turn(
        ScriptedTurn::new(
            vec![
                Block::text("Let me read main.py first."),
                Block::call("toolu_01", "read_file", json!({"path": "main.py"})),
                Block::call("toolu_02", "read_file", json!({"path": "README.md"})),
            ],
            "tool_use",
        )
        .with_usage(120, 45),
    )]);
    let provider = anthropic(&fake);
    let deltas = Deltas::default();
    let turn = provider
        .complete(&transcript(), &tools(), &deltas)
        .await
        .unwrap();
    assert_eq!(
        turn,
        Turn {
            content: vec![
                text("Let me read main.py first."),
                call("toolu_01", "read_file", json!({"path": "main.py"})),
                call("toolu_02", "read_file", json!({"path": "README.md"})),
            ],
            stop: StopReason::ToolUse,
            usage: TokenUsage {
                input_tokens: 120,
                output_tokens: 45
            },
        }
    );
    // Text arrived as several deltas, in order, attributed to the provider.
    let pieces = deltas.pieces();
    assert!(pieces.len() > 1, "{pieces:?}");
    assert_eq!(pieces.concat(), "Let me read main.py first.");
    assert_eq!(deltas.providers(), ["anthropic"]);

    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/v1/messages");
    assert_key_only_in_auth(request, "x-api-key", CANARY);
    assert_eq!(request.header("anthropic-version"), Some("2026-10-21"));
    assert!(request.header("authorization").is_none());
    no_sampling(&request.body);
    assert_eq!(
        request.body,
        json!({
            "model": "claude-sonnet-5-5",
            "max_tokens": 32000,
            "system": "You are a coding agent.",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Add a docstring to main.py"}]}],
            "tools": [
                {"name": "read_file", "description": "Read a file",
                 "input_schema": tools()[0].parameters},
                {"name": "edit_file", "description": "Replace old_str with new_str",
                 "input_schema": tools()[1].parameters},
            ],
            "tool_choice": {"type": "auto"},
            "stream": true,
        })
    );
}

#[tokio::test]
async fn anthropic_malformed_tool_arguments_keep_the_raw_text() {
    let fake = FakeAnthropic::start().await;
    fake.push([Reply::turn(ScriptedTurn::new(
        vec![
            Block::raw_call(
                "toolu_bad",
                "edit_file",
                r#"{"path": "main.py", "old_str": "#,
            ),
            Block::call("toolu_ok", "read_file", json!({})),
        ],
        "tool_use",
    ))]);
    let turn = anthropic(&fake)
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap();
    assert_eq!(
        turn.content,
        vec![
            Part::ToolCall {
                id: "toolu_bad".into(),
                name: "edit_file".into(),
                arguments: Value::Null,
                raw_arguments: Some(r#"{"path": "main.py", "old_str": "#.into()),
            },
            call("toolu_ok", "read_file", json!({})),
        ]
    );
}

#[tokio::test]
async fn anthropic_every_stop_reason() {
    let fake = FakeAnthropic::start().await;
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
    let provider = anthropic(&fake);
    for stream in [true, false] {
        fake.ignore_stream(!stream);
        for (wire, want) in cases {
            let blocks = if wire == "refusal" {
                vec![]
            } else {
                vec![Block::text("partial")]
            };
            fake.push([Reply::turn(ScriptedTurn::new(blocks, wire))]);
            let turn = provider
                .complete(&transcript(), &tools(), &Deltas::default())
                .await
                .unwrap();
            assert_eq!(turn.stop, want, "{wire} (stream: {stream})");
        }
    }
}

#[tokio::test]
async fn anthropic_non_streamed_replies_give_the_same_turn() {
    let fake = FakeAnthropic::start().await;
    let scripted = ScriptedTurn::new(
        vec![
            Block::Thinking {
                thinking: "The user wants a docstring.".into(),
                signature: "c2lnbmF0dXJl".into(),
            },
            Block::text("Reading."),
            Block::call("toolu_01", "read_file", json!({"path": "main.py"})),
        ],
        "tool_use",
    );
    fake.push([Reply::turn(scripted.clone()), Reply::turn(scripted)]);
    let provider = anthropic(&fake);
    let streamed_text = Deltas::default();
    let streamed = provider
        .complete(&transcript(), &tools(), &streamed_text)
        .await
        .unwrap();
    fake.ignore_stream(true);
    let whole_text = Deltas::default();
    let whole = provider
        .complete(&transcript(), &tools(), &whole_text)
        .await
        .unwrap();
    assert_eq!(streamed, whole);
    assert_eq!(whole_text.pieces(), ["Reading."]);
    assert_eq!(streamed_text.pieces().concat(), "Reading.");
}

#[tokio::test]
async fn anthropic_echoes_the_assistant_turn_exactly() {
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::Thinking {
                    thinking: "Read first, then edit.".into(),
                    signature: "EqQBCkYIBxgCKkA=".into(),
                },
                Block::text("Reading main.py."),
                Block::call("toolu_01", "read_file", json!({"path": "main.py"})),
                Block::call("toolu_02", "read_file", json!({"path": "lib.py"})),
            ],
            "tool_use",
        )),
        Reply::text("Done."),
    ]);
    let provider = anthropic(&fake);
    let mut transcript = transcript();
    let turn = provider
        .complete(&transcript, &tools(), &Deltas::default())
        .await
        .unwrap();
    assert_eq!(
        turn.content[0],
        Part::Opaque {
            provider: "anthropic".into(),
            value: json!({"type": "thinking", "thinking": "Read first, then edit.",
                          "signature": "EqQBCkYIBxgCKkA="}),
        }
    );
    transcript.messages.push(Message {
        role: Role::Assistant,
        content: turn.content,
    });
    transcript.messages.push(Message {
        role: Role::User,
        content: vec![
            Part::ToolResult {
                call_id: "toolu_01".into(),
                content: "def main(): pass".into(),
                is_error: false,
            },
            Part::ToolResult {
                call_id: "toolu_02".into(),
                content: "no such file".into(),
                is_error: true,
            },
        ],
    });
    let done = provider
        .complete(&transcript, &tools(), &Deltas::default())
        .await
        .unwrap();
    assert_eq!(done.stop, StopReason::EndTurn);
    let second = &fake.requests()[1].body;
    assert_eq!(
        second["messages"][1],
        json!({"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Read first, then edit.", "signature": "EqQBCkYIBxgCKkA="},
            {"type": "text", "text": "Reading main.py."},
            {"type": "tool_use", "id": "toolu_01", "name": "read_file", "input": {"path": "main.py"}},
            {"type": "tool_use", "id": "toolu_02", "name": "read_file", "input": {"path": "lib.py"}},
        ]})
    );
    assert_eq!(
        second["messages"][2],
        json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01", "content": "def main(): pass",
             "is_error": false},
            {"type": "tool_result", "tool_use_id": "toolu_02", "content": "no such file",
             "is_error": true},
        ]})
    );
}

async fn anthropic_error(reply: Reply) -> ProviderError {
    let fake = FakeAnthropic::start().await;
    fake.push([reply]);
    anthropic(&fake)
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap_err()
}

#[tokio::test]
async fn anthropic_errors_are_classified() {
    let e = anthropic_error(Reply::overloaded()).await;
    assert_eq!((e.kind, e.status), (FailureKind::Retryable, Some(529)));
    assert!(e.message.contains("overloaded_error"), "{}", e.message);

    let e = anthropic_error(Reply::rate_limited(3)).await;
    assert_eq!((e.kind, e.status), (FailureKind::Retryable, Some(429)));
    assert_eq!(e.retry_after, Some(Duration::from_secs(3)));

    let e = anthropic_error(Reply::server_error()).await;
    assert_eq!((e.kind, e.status), (FailureKind::Retryable, Some(500)));

    let e = anthropic_error(Reply::unauthorized()).await;
    assert_eq!((e.kind, e.status), (FailureKind::Fallback, Some(401)));

    let e = anthropic_error(Reply::forbidden()).await;
    assert_eq!((e.kind, e.status), (FailureKind::Fallback, Some(403)));

    let e = anthropic_error(Reply::error(400, "invalid_request_error", "bad")).await;
    assert_eq!((e.kind, e.status), (FailureKind::Fallback, Some(400)));

    let e = anthropic_error(Reply::overloaded().with_header("x-should-retry", "false")).await;
    assert_eq!(e.kind, FailureKind::Fallback);

    let e = anthropic_error(
        Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after-ms", "1500"),
    )
    .await;
    assert_eq!(e.retry_after, Some(Duration::from_millis(1500)));

    let e = anthropic_error(Reply::error(
        401,
        "authentication_error",
        &format!("invalid key {CANARY}"),
    ))
    .await;
    assert!(!e.message.contains(CANARY), "{}", e.message);
}

#[tokio::test]
async fn anthropic_broken_streams_are_retryable() {
    let turn = ScriptedTurn::new(
        vec![
            Block::text("Let me look at the file."),
            Block::call("toolu_01", "read_file", json!({"path": "main.py"})),
        ],
        "tool_use",
    );
    let cut = anthropic_error(Reply::cut(turn.clone(), 6)).await;
    assert_eq!(cut.kind, FailureKind::Retryable, "{}", cut.message);

    let early = anthropic_error(Reply::EndEarly {
        turn: turn.clone(),
        after: 9,
    })
    .await;
    assert_eq!(early.kind, FailureKind::Retryable);
    assert!(early.message.contains("message_stop"), "{}", early.message);

    let overloaded = anthropic_error(Reply::StreamError {
        turn: turn.clone(),
        after: 4,
        kind: "overloaded_error".into(),
        message: "Overloaded".into(),
    })
    .await;
    assert_eq!(
        (overloaded.kind, overloaded.status),
        (FailureKind::Retryable, Some(529))
    );

    let invalid = anthropic_error(Reply::StreamError {
        turn,
        after: 4,
        kind: "invalid_request_error".into(),
        message: "bad".into(),
    })
    .await;
    assert_eq!(invalid.kind, FailureKind::Fallback);
}

/// A compatible server's `{"type": "error", "error": "some text"}`: the text is the message,
/// streamed or not.
#[tokio::test]
async fn anthropic_errors_given_as_a_bare_string_keep_their_text() {
    let mut got = Vec::new();
    for stream in [true, false] {
        let fake = FakeAnthropic::start().await;
        fake.ignore_stream(!stream);
        fake.push([Reply::BareError {
            turn: ScriptedTurn::text("Hello there"),
            after: 4,
            message: "upstream overloaded".into(),
        }]);
        let e = anthropic(&fake)
            .complete(&transcript(), &tools(), &Deltas::default())
            .await
            .unwrap_err();
        got.push((stream, e.kind, e.status, e.message));
    }
    let want = |stream| {
        (
            stream,
            FailureKind::Retryable,
            None,
            "anthropic stream error: upstream overloaded".to_owned(),
        )
    };
    assert_eq!(got, [want(true), want(false)]);
}

#[tokio::test]
async fn anthropic_a_silent_stream_times_out_as_retryable() {
    let fake = FakeAnthropic::start().await;
    fake.push([Reply::Stall]);
    let provider = anthropic(&fake)
        .with_timeouts(Duration::from_secs(5), Duration::from_millis(300))
        .unwrap();
    let e = provider
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Retryable, "{}", e.message);
}

#[tokio::test]
async fn an_unreachable_server_is_retryable() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let provider = AnthropicProvider::new(AnthropicConfig {
        api_key: CANARY.into(),
        base_url: format!("http://127.0.0.1:{port}"),
        model: "claude-sonnet-5-5".into(),
    })
    .unwrap();
    let e = provider
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap_err();
    assert_eq!(e.kind, FailureKind::Retryable);
    assert!(!e.message.contains(CANARY));
}

#[tokio::test]
async fn retries_overloaded_then_succeeds() {
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::overloaded(),
        Reply::server_error(),
        Reply::text("Hello."),
    ]);
    let provider = anthropic(&fake);
    // Zero backoff: the retry loop runs without waiting (waits are tested with paused time).
    let policy = RetryPolicy {
        initial_backoff: Duration::ZERO,
        ..RetryPolicy::default()
    };
    let (transcript, tools) = (transcript(), tools());
    let turn = with_retries(&policy, "model", || {
        provider.complete(&transcript, &tools, &NoDeltas)
    })
    .await
    .unwrap();
    assert_eq!(turn.content, vec![text("Hello.")]);
    assert_eq!(fake.requests().len(), 3);
    // Every attempt sent the same body.
    let bodies: Vec<Value> = fake.requests().into_iter().map(|r| r.body).collect();
    assert!(bodies.windows(2).all(|w| w[0] == w[1]));
}

struct NoDeltas;
impl TextSink for NoDeltas {
    fn text_delta(&self, _: &str, _: &str) {}
}

#[tokio::test]
async fn retries_are_bounded_and_auth_failures_fall_through_at_once() {
    let (transcript, tools) = (transcript(), tools());
    let fake = FakeAnthropic::start().await;
    fake.push((0..5).map(|_| Reply::overloaded()));
    let provider = anthropic(&fake);
    let policy = RetryPolicy {
        initial_backoff: Duration::ZERO,
        ..RetryPolicy::default()
    };
    let e = with_retries(&policy, "model", || {
        provider.complete(&transcript, &tools, &NoDeltas)
    })
    .await
    .unwrap_err();
    assert_eq!(e.status, Some(529));
    assert_eq!(fake.requests().len(), 3, "max_retries = 2 means 3 attempts");

    let fake = FakeAnthropic::start().await;
    fake.push([Reply::unauthorized(), Reply::text("never")]);
    let provider = anthropic(&fake);
    let e = with_retries(&policy, "model", || {
        provider.complete(&transcript, &tools, &NoDeltas)
    })
    .await
    .unwrap_err();
    assert_eq!((e.kind, e.status), (FailureKind::Fallback, Some(401)));
    assert_eq!(fake.requests().len(), 1);
}

#[tokio::test]
async fn retry_after_from_the_server_is_honoured_with_paused_time() {
    let fake = FakeAnthropic::start().await;
    fake.push([Reply::rate_limited(4)]);
    let error = anthropic(&fake)
        .complete(&transcript(), &tools(), &NoDeltas)
        .await
        .unwrap_err();
    assert_eq!(error.retry_after, Some(Duration::from_secs(4)));

    // Replay that exact failure through the retry loop on paused time: no real sleep happens,
    // and the loop waits exactly what the server asked.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    let turn = with_retries(&RetryPolicy::default(), "model", || {
        attempts += 1;
        let result = if attempts == 1 {
            Err(error.clone())
        } else {
            Ok(Turn {
                content: vec![text("ok")],
                stop: StopReason::EndTurn,
                usage: TokenUsage::default(),
            })
        };
        async move { result }
    })
    .await
    .unwrap();
    assert_eq!(turn.content, vec![text("ok")]);
    assert_eq!(attempts, 2);
    // The timer wheel has millisecond resolution, and the clock was paused mid-millisecond.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited <= Duration::from_millis(4002),
        "{waited:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// OpenAI: both wire protocols

const APIS: [OpenAiApi; 2] = [OpenAiApi::Chat, OpenAiApi::Responses];

#[tokio::test]
async fn openai_streams_text_and_parallel_tool_calls() {
    for api in APIS {
        let fake = FakeOpenAi::start().await;
        fake.push([Reply::turn(
            ScriptedTurn::new(
                vec![
                    Block::text("Reading both files."),
                    Block::call("call_a", "read_file", json!({"path": "main.py"})),
                    Block::call("call_b", "read_file", json!({"path": "lib.py"})),
                ],
                "tool_use",
            )
            .with_usage(90, 30),
        )]);
        let deltas = Deltas::default();
        let turn = openai(&fake, api)
            .complete(&transcript(), &tools(), &deltas)
            .await
            .unwrap();
        assert_eq!(
            turn,
            Turn {
                content: vec![
                    text("Reading both files."),
                    call("call_a", "read_file", json!({"path": "main.py"})),
                    call("call_b", "read_file", json!({"path": "lib.py"})),
                ],
                stop: StopReason::ToolUse,
                usage: TokenUsage {
                    input_tokens: 90,
                    output_tokens: 30
                },
            },
            "{api:?}"
        );
        assert!(deltas.pieces().len() > 1);
        assert_eq!(deltas.pieces().concat(), "Reading both files.");
        assert_eq!(deltas.providers(), ["openai"]);

        let request = &fake.requests()[0];
        assert_key_only_in_auth(request, "authorization", &format!("Bearer {CANARY}"));
        no_sampling(&request.body);
        let parameters = tools()[0].parameters.clone();
        match api {
            OpenAiApi::Chat => {
                assert_eq!(request.path, "/v1/chat/completions");
                assert_eq!(
                    request.body["messages"],
                    json!([
                        {"role": "system", "content": "You are a coding agent."},
                        {"role": "user", "content": "Add a docstring to main.py"},
                    ])
                );
                assert_eq!(
                    request.body["tools"][0],
                    json!({"type": "function", "function": {"name": "read_file",
                           "description": "Read a file", "parameters": parameters}})
                );
                assert_eq!(request.body["stream"], json!(true));
                assert_eq!(
                    request.body["stream_options"],
                    json!({"include_usage": true})
                );
            }
            OpenAiApi::Responses | OpenAiApi::Auto => {
                assert_eq!(request.path, "/v1/responses");
                assert_eq!(request.body["instructions"], "You are a coding agent.");
                assert_eq!(
                    request.body["input"],
                    json!([{"role": "user", "content": "Add a docstring to main.py"}])
                );
                assert_eq!(
                    request.body["tools"][0],
                    json!({"type": "function", "name": "read_file", "description": "Read a file",
                           "parameters": parameters, "strict": false})
                );
                assert_eq!(request.body["store"], json!(false));
                assert_eq!(request.body["stream"], json!(true));
            }
        }
    }
}

#[tokio::test]
async fn openai_malformed_arguments_keep_the_raw_text() {
    for api in APIS {
        for stream in [true, false] {
            let fake = FakeOpenAi::start().await;
            fake.ignore_stream(!stream);
            fake.push([Reply::turn(ScriptedTurn::new(
                vec![
                    Block::raw_call("call_bad", "edit_file", r#"{"path": "main.py", "#),
                    Block::call("call_ok", "read_file", json!({"path": "a"})),
                ],
                "tool_use",
            ))]);
            let turn = openai(&fake, api)
                .complete(&transcript(), &tools(), &Deltas::default())
                .await
                .unwrap();
            assert_eq!(
                turn.content,
                vec![
                    Part::ToolCall {
                        id: "call_bad".into(),
                        name: "edit_file".into(),
                        arguments: Value::Null,
                        raw_arguments: Some(r#"{"path": "main.py", "#.into()),
                    },
                    call("call_ok", "read_file", json!({"path": "a"})),
                ],
                "{api:?} stream={stream}"
            );
        }
    }
}

#[tokio::test]
async fn openai_stop_reasons() {
    let cases = [
        ("tool_use", StopReason::ToolUse),
        ("end_turn", StopReason::EndTurn),
        ("max_tokens", StopReason::MaxTokens),
        ("refusal", StopReason::Refusal),
    ];
    for api in APIS {
        for stream in [true, false] {
            let fake = FakeOpenAi::start().await;
            fake.ignore_stream(!stream);
            let provider = openai(&fake, api);
            for (wire, want) in cases {
                let blocks = match wire {
                    "tool_use" => vec![Block::call("call_1", "read_file", json!({"path": "a"}))],
                    "refusal" => vec![Block::text("I can't help with that.")],
                    _ => vec![Block::text("Some text")],
                };
                fake.push([Reply::turn(ScriptedTurn::new(blocks, wire))]);
                let turn = provider
                    .complete(&transcript(), &tools(), &Deltas::default())
                    .await
                    .unwrap();
                assert_eq!(turn.stop, want, "{api:?} stream={stream} {wire}");
            }
        }
    }
    // Chat's content filter.
    let fake = FakeOpenAi::start().await;
    fake.push([Reply::turn(ScriptedTurn::new(vec![], "content_filter"))]);
    let turn = openai(&fake, OpenAiApi::Chat)
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap();
    assert_eq!(turn.stop, StopReason::Refusal);
}

#[tokio::test]
async fn openai_round_trip_echoes_calls_results_and_reasoning() {
    for api in APIS {
        let fake = FakeOpenAi::start().await;
        fake.push([
            Reply::turn(ScriptedTurn::new(
                vec![
                    Block::Thinking {
                        thinking: String::new(),
                        signature: "gAAAAencrypted".into(),
                    },
                    Block::call("call_1", "read_file", json!({"path": "main.py"})),
                ],
                "tool_use",
            )),
            Reply::text("Done."),
        ]);
        let provider = openai(&fake, api);
        let mut transcript = transcript();
        let turn = provider
            .complete(&transcript, &tools(), &Deltas::default())
            .await
            .unwrap();
        transcript.messages.push(Message {
            role: Role::Assistant,
            content: turn.content.clone(),
        });
        transcript.messages.push(Message {
            role: Role::User,
            content: vec![Part::ToolResult {
                call_id: "call_1".into(),
                content: "def main(): pass".into(),
                is_error: false,
            }],
        });
        let done = provider
            .complete(&transcript, &tools(), &Deltas::default())
            .await
            .unwrap();
        assert_eq!(done.content, vec![text("Done.")]);
        let second = &fake.requests()[1].body;
        match api {
            OpenAiApi::Chat => {
                assert_eq!(
                    second["messages"],
                    json!([
                        {"role": "system", "content": "You are a coding agent."},
                        {"role": "user", "content": "Add a docstring to main.py"},
                        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                         "type": "function", "function": {"name": "read_file",
                         "arguments": "{\"path\":\"main.py\"}"}}]},
                        {"role": "tool", "tool_call_id": "call_1", "content": "def main(): pass"},
                    ])
                );
            }
            OpenAiApi::Responses | OpenAiApi::Auto => {
                let reasoning = match &turn.content[0] {
                    Part::Opaque { provider, value } => {
                        assert_eq!(provider, "openai");
                        value.clone()
                    }
                    other => panic!("expected the reasoning item, got {other:?}"),
                };
                assert_eq!(reasoning["encrypted_content"], "gAAAAencrypted");
                assert_eq!(
                    second["input"],
                    json!([
                        {"role": "user", "content": "Add a docstring to main.py"},
                        reasoning,
                        {"type": "function_call", "call_id": "call_1", "name": "read_file",
                         "arguments": "{\"path\":\"main.py\"}"},
                        {"type": "function_call_output", "call_id": "call_1",
                         "output": "def main(): pass"},
                    ])
                );
            }
        }
    }
}

async fn openai_error(api: OpenAiApi, reply: Reply) -> ProviderError {
    let fake = FakeOpenAi::start().await;
    fake.push([reply]);
    openai(&fake, api)
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap_err()
}

#[tokio::test]
async fn openai_errors_are_classified() {
    for api in APIS {
        let e = openai_error(
            api,
            Reply::error(429, "rate_limit_exceeded", "Rate limit reached")
                .with_header("retry-after-ms", "750"),
        )
        .await;
        assert_eq!((e.kind, e.status), (FailureKind::Retryable, Some(429)));
        assert_eq!(e.retry_after, Some(Duration::from_millis(750)));

        let e = openai_error(
            api,
            Reply::error(429, "insufficient_quota", "You exceeded your current quota"),
        )
        .await;
        assert_eq!((e.kind, e.status), (FailureKind::Fallback, Some(429)));

        for status in [500, 502, 503, 529] {
            let e = openai_error(api, Reply::error(status, "server_error", "oops")).await;
            assert_eq!(e.kind, FailureKind::Retryable, "{status}");
        }
        for status in [400, 401, 403, 404] {
            let e = openai_error(api, Reply::error(status, "invalid_request_error", "no")).await;
            assert_eq!(e.kind, FailureKind::Fallback, "{status}");
        }
    }
}

#[tokio::test]
async fn openai_broken_streams() {
    let turn = ScriptedTurn::new(
        vec![
            Block::text("Let me look."),
            Block::call("call_1", "read_file", json!({"path": "main.py"})),
        ],
        "tool_use",
    );
    for api in APIS {
        let e = openai_error(api, Reply::cut(turn.clone(), 3)).await;
        assert_eq!(e.kind, FailureKind::Retryable, "{api:?}: {}", e.message);

        let e = openai_error(
            api,
            Reply::EndEarly {
                turn: turn.clone(),
                after: 4,
            },
        )
        .await;
        assert_eq!(e.kind, FailureKind::Retryable, "{api:?}: {}", e.message);

        let e = openai_error(
            api,
            Reply::StreamError {
                turn: turn.clone(),
                after: 3,
                kind: "server_error".into(),
                message: "The server had an error".into(),
            },
        )
        .await;
        assert_eq!(e.kind, FailureKind::Retryable, "{api:?}: {}", e.message);

        let e = openai_error(
            api,
            Reply::StreamError {
                turn: turn.clone(),
                after: 3,
                kind: "insufficient_quota".into(),
                message: "quota".into(),
            },
        )
        .await;
        assert_eq!(e.kind, FailureKind::Fallback, "{api:?}: {}", e.message);
    }
}

/// Some compatible servers report an error as `{"error": "some text"}`: the text is the message,
/// streamed or not.
#[tokio::test]
async fn openai_errors_given_as_a_bare_string_keep_their_text() {
    let mut got = Vec::new();
    let mut want = Vec::new();
    for api in APIS {
        for stream in [true, false] {
            let fake = FakeOpenAi::start().await;
            fake.ignore_stream(!stream);
            fake.push([Reply::BareError {
                turn: ScriptedTurn::text("Hello there"),
                after: 2,
                message: "upstream overloaded".into(),
            }]);
            let outcome = openai(&fake, api)
                .complete(&transcript(), &tools(), &Deltas::default())
                .await
                .map_err(|e| (e.kind, e.status, e.message));
            got.push((api, stream, outcome));
            let error = (
                FailureKind::Retryable,
                None,
                "openai stream error: upstream overloaded".to_owned(),
            );
            want.push((api, stream, Err(error)));
        }
    }
    assert_eq!(got, want);
}

#[tokio::test]
async fn openai_auto_uses_chat_for_other_servers() {
    let fake = FakeOpenAi::start().await;
    fake.push([Reply::text("hi")]);
    let provider = openai(&fake, OpenAiApi::Auto);
    assert_eq!(provider.api(), OpenAiApi::Chat);
    provider
        .complete(&transcript(), &tools(), &Deltas::default())
        .await
        .unwrap();
    assert_eq!(fake.requests()[0].path, "/v1/chat/completions");
}

// ---------------------------------------------------------------------------------------------
// Across providers

#[tokio::test]
async fn openai_continues_a_transcript_claude_started() {
    let claude = FakeAnthropic::start().await;
    claude.push([Reply::turn(ScriptedTurn::new(
        vec![
            Block::Thinking {
                thinking: "Read it.".into(),
                signature: "sig".into(),
            },
            Block::text("Reading main.py."),
            Block::call("toolu_01", "read_file", json!({"path": "main.py"})),
        ],
        "tool_use",
    ))]);
    let mut transcript = transcript();
    let turn = anthropic(&claude)
        .complete(&transcript, &tools(), &NoDeltas)
        .await
        .unwrap();
    transcript.messages.push(Message {
        role: Role::Assistant,
        content: turn.content,
    });
    transcript.messages.push(Message {
        role: Role::User,
        content: vec![Part::ToolResult {
            call_id: "toolu_01".into(),
            content: "def main(): pass".into(),
            is_error: false,
        }],
    });
    for api in APIS {
        let fake = FakeOpenAi::start().await;
        fake.push([Reply::text("Continuing.")]);
        openai(&fake, api)
            .complete(&transcript, &tools(), &NoDeltas)
            .await
            .unwrap();
        let body = &fake.requests()[0].body;
        let sent = body.to_string();
        assert!(
            !sent.contains("\"thinking\""),
            "Claude's thinking leaked: {sent}"
        );
        match api {
            OpenAiApi::Chat => assert_eq!(
                body["messages"],
                json!([
                    {"role": "system", "content": "You are a coding agent."},
                    {"role": "user", "content": "Add a docstring to main.py"},
                    {"role": "assistant", "content": "Reading main.py.", "tool_calls": [
                        {"id": "toolu_01", "type": "function", "function": {"name": "read_file",
                         "arguments": "{\"path\":\"main.py\"}"}}]},
                    {"role": "tool", "tool_call_id": "toolu_01", "content": "def main(): pass"},
                ])
            ),
            OpenAiApi::Responses | OpenAiApi::Auto => assert_eq!(
                body["input"],
                json!([
                    {"role": "user", "content": "Add a docstring to main.py"},
                    {"role": "assistant", "content": "Reading main.py."},
                    {"type": "function_call", "call_id": "toolu_01", "name": "read_file",
                     "arguments": "{\"path\":\"main.py\"}"},
                    {"type": "function_call_output", "call_id": "toolu_01",
                     "output": "def main(): pass"},
                ])
            ),
        }
    }
}
