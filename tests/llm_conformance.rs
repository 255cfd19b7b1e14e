//! The fakes checked by the official SDKs: the pinned `anthropic` and `openai` Python packages,
//! with `_strict_response_validation=True`, run a tool-use round trip (streamed and not; for
//! OpenAI both Chat Completions and Responses) and the error mapping against them. A missing
//! venv fails these tests (run `scripts/setup-python.sh`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::json;
use support::fake_anthropic::{Block, FakeAnthropic, Reply, ScriptedTurn};
use support::fake_openai::FakeOpenAi;
use support::python::{assert_ok, run_script};

const KEY: &str = "sk-conformance-test-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_sdk_accepts_the_fake() {
    let fake = FakeAnthropic::start().await;
    let read = |id: &str, input| Block::call(id, "read_file", input);
    fake.push([
        // Non-streamed tool round trip.
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::text("Let me read it."),
                read("toolu_01", json!({"path": "main.py"})),
            ],
            "tool_use",
        )),
        Reply::text("Done."),
        // Streamed tool round trip, with a thinking block.
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::Thinking {
                    thinking: "I should read it.".into(),
                    signature: "c2lnbmF0dXJl".into(),
                },
                Block::text("Let me read it."),
                read("toolu_02", json!({"path": "main.py", "lines": [1, 20]})),
            ],
            "tool_use",
        )),
        Reply::text("Done."),
        Reply::turn(ScriptedTurn::new(vec![], "refusal")),
        // Errors.
        Reply::overloaded(),
        Reply::rate_limited(0),
        Reply::server_error(),
        Reply::unauthorized(),
        Reply::forbidden(),
        Reply::StreamError {
            turn: ScriptedTurn::text("Hello there"),
            after: 4,
            kind: "overloaded_error".into(),
            message: "Overloaded".into(),
        },
    ]);
    let out = run_script(
        "anthropic_sdk.py",
        vec![
            ("ANTHROPIC_BASE_URL".into(), fake.base_url()),
            ("ANTHROPIC_API_KEY".into(), KEY.into()),
        ],
    )
    .await;
    assert_ok(&out);
    assert_eq!(fake.remaining(), 0, "the script consumed every reply");

    let requests = fake.requests();
    assert_eq!(requests.len(), 11);
    for r in &requests {
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(
            r.header("authorization"),
            Some("Bearer sk-conformance-test-key")
        );
        assert_eq!(r.header("anthropic-version"), Some("2026-10-21"));
    }
    // The SDK sent the tool result back in the shape our client also uses.
    assert_eq!(
        requests[1].body["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_01", "content": "def main(): pass"})
    );
    // And echoed the streamed thinking block with its signature.
    assert_eq!(
        requests[3].body["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": "I should read it.", "signature": "c2lnbmF0dXJl"})
    );
    assert_eq!(requests[2].body["stream"], json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_sdk_accepts_the_fake() {
    let fake = FakeOpenAi::start().await;
    let read = |id: &str, path: &str| Block::call(id, "read_file", json!({"path": path}));
    fake.push([
        // Chat Completions, not streamed: parallel tool calls, then the answer.
        Reply::turn(ScriptedTurn::new(
            vec![read("call_a", "main.py"), read("call_b", "lib.py")],
            "tool_use",
        )),
        Reply::text("Done."),
        // Chat Completions, streamed (raw chunks, then the SDK's stream helper).
        Reply::turn(ScriptedTurn::new(
            vec![Block::text("Let me read it."), read("call_c", "main.py")],
            "tool_use",
        )),
        Reply::text("Done."),
        // Responses, not streamed, with a reasoning item.
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::Thinking {
                    thinking: String::new(),
                    signature: "gAAAAABencrypted".into(),
                },
                Block::text("Let me read it."),
                read("call_d", "main.py"),
            ],
            "tool_use",
        )),
        Reply::text("Done."),
        // Responses, streamed (the SDK's stream helper, then raw events).
        Reply::turn(ScriptedTurn::new(
            vec![Block::text("Let me read it."), read("call_e", "main.py")],
            "tool_use",
        )),
        Reply::text("Done."),
        // Errors.
        Reply::error(429, "rate_limit_exceeded", "Rate limit reached")
            .with_header("retry-after", "0"),
        Reply::error(401, "invalid_api_key", "Incorrect API key provided"),
        Reply::error(500, "server_error", "The server had an error"),
        Reply::StreamError {
            turn: ScriptedTurn::text("Hello there"),
            after: 2,
            kind: "server_error".into(),
            message: "The server had an error while processing your request".into(),
        },
    ]);
    let out = run_script(
        "openai_sdk.py",
        vec![
            ("OPENAI_BASE_URL".into(), fake.base_url()),
            ("OPENAI_API_KEY".into(), KEY.into()),
        ],
    )
    .await;
    assert_ok(&out);
    assert_eq!(fake.remaining(), 0, "the script consumed every reply");

    let requests = fake.requests();
    assert_eq!(requests.len(), 12);
    let paths: Vec<&str> = requests.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths[..8],
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/responses",
            "/v1/responses",
            "/v1/responses",
        ]
    );
    for r in &requests {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer sk-conformance-test-key")
        );
    }
    // The SDK answered both parallel calls with tool messages.
    let chat = &requests[1].body["messages"];
    assert_eq!(chat[3]["tool_call_id"], "call_a");
    assert_eq!(chat[4]["tool_call_id"], "call_b");
    // And sent the reasoning item back on the stateless Responses round trip.
    let input = &requests[5].body["input"];
    assert_eq!(input[1]["type"], "reasoning");
    assert_eq!(input[1]["encrypted_content"], "gAAAAABencrypted");
    assert_eq!(input[4]["type"], "function_call_output");
}
