//! Whole jobs driven by the real Anthropic and OpenAI providers against the scripted fakes: the
//! model reads a file, edits it and finishes; Claude failing with 529 hands the *same* transcript
//! to OpenAI; bad tool calls go back to the model as tool errors; the API key never reaches a
//! request body, the sandbox or an event.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;

use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use support::fake_anthropic::{Block, FakeAnthropic, Recorded, Reply, ScriptedTurn};
use support::fake_openai::FakeOpenAi;
use support::harness::{Harness, HarnessOptions, done, events_of, git, repo_with, shape};
use tiny_backspace::agent::Provider;
use tiny_backspace::agent::anthropic::{AnthropicConfig, AnthropicProvider};
use tiny_backspace::agent::openai::{OpenAiApi, OpenAiConfig, OpenAiProvider};
use tiny_backspace::event::{Event, EventKind};

const APP: &str = "def greet(name):\n    return \"Hello \" + name\n";
const EDITED: &str = "def greet(name):\n    return \"Hi, \" + name\n";
const CANARY: &str = "sk-canary-job-5e2f0b7d91aa";
const PROMPT: &str = "Replace \"Hello \" with \"Hi, \" in app.py";

fn anthropic(fake: &FakeAnthropic) -> Arc<dyn Provider> {
    Arc::new(
        AnthropicProvider::new(AnthropicConfig {
            api_key: CANARY.into(),
            base_url: fake.base_url(),
            model: "claude-sonnet-5-5".into(),
        })
        .unwrap(),
    )
}

fn openai(fake: &FakeOpenAi, api: OpenAiApi) -> Arc<dyn Provider> {
    Arc::new(
        OpenAiProvider::new(OpenAiConfig {
            api_key: CANARY.into(),
            base_url: fake.base_url(),
            model: "gpt-6.1-sol".into(),
            api,
        })
        .unwrap(),
    )
}

/// Read app.py, edit it, finish: the three turns of a well-behaved model.
fn read_edit_finish(prefix: &str) -> Vec<Reply> {
    vec![
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::text("Let me read app.py."),
                Block::call(
                    &format!("{prefix}1"),
                    "read_file",
                    json!({"path": "app.py"}),
                ),
            ],
            "tool_use",
        )),
        edit_turn(prefix),
        finish_turn(prefix),
    ]
}

fn edit_turn(prefix: &str) -> Reply {
    Reply::turn(ScriptedTurn::new(
        vec![
            Block::text("Replacing the greeting."),
            Block::call(
                &format!("{prefix}2"),
                "edit_file",
                json!({"path": "app.py", "old_str": "Hello ", "new_str": "Hi, "}),
            ),
        ],
        "tool_use",
    ))
}

fn finish_turn(prefix: &str) -> Reply {
    Reply::tool_call(
        &format!("{prefix}3"),
        "finish",
        json!({"title": "Use a friendlier greeting", "summary": "Greets with \"Hi, \"."}),
    )
}

async fn run_job(agents: Vec<Arc<dyn Provider>>) -> (tempfile::TempDir, Harness, Vec<Event>) {
    let repo = repo_with(&[("app.py", APP), ("README.md", "# Demo\n")]);
    let h = Harness::new(HarnessOptions {
        agents,
        secrets: vec![CANARY.into()],
        ..HarnessOptions::default()
    })
    .await;
    let job = h.submit(repo.path(), PROMPT).await;
    let events = events_of(&job).await;
    (repo, h, events)
}

/// The branch holds exactly the edit, and the job succeeded.
fn assert_edited(repo: &tempfile::TempDir, events: &[Event]) {
    let done = done(events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["files_changed"], 1);
    let branch = done["branch"].as_str().unwrap();
    assert_eq!(
        git(repo.path(), &["diff", "--name-status", "main", branch]),
        "M\tapp.py\n"
    );
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:app.py")]),
        EDITED
    );
}

/// The agent step's events (between `Status:agent:started` and its end), in order.
fn agent_events(events: &[Event]) -> Vec<String> {
    shape(events)
        .into_iter()
        .skip_while(|s| s != "Status:agent:started")
        .skip(1)
        .take_while(|s| !s.starts_with("Status:agent:"))
        .collect()
}

fn ai_messages(events: &[Event]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::AiMessage { message, provider } => Some((provider.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

/// The key is in the auth header of every request and in no body; no event mentions it.
fn assert_key_stays_in_headers(requests: &[Recorded], header: &str, value: &str, events: &[Event]) {
    for r in requests {
        assert_eq!(r.header(header), Some(value));
        assert!(
            !r.raw_body.contains(CANARY),
            "the key reached a model request body"
        );
    }
    let all = serde_json::to_string(&events.iter().map(|e| &e.kind).collect::<Vec<_>>()).unwrap();
    assert!(!all.contains(CANARY), "the key reached an event");
}

#[tokio::test]
async fn an_anthropic_job_reads_edits_and_finishes() {
    let fake = FakeAnthropic::start().await;
    fake.push(read_edit_finish("toolu_0"));
    let (repo, h, events) = run_job(vec![anthropic(&fake)]).await;
    assert_edited(&repo, &events);
    assert_eq!(
        agent_events(&events),
        ["AI Message", "Tool: Read", "AI Message", "Tool: Edit",]
    );
    assert_eq!(
        ai_messages(&events),
        [
            ("anthropic".to_owned(), "Let me read app.py.".to_owned()),
            ("anthropic".to_owned(), "Replacing the greeting.".to_owned()),
        ]
    );
    let requests = fake.requests();
    assert_eq!(requests.len(), 3);
    assert_key_stays_in_headers(&requests, "x-api-key", CANARY, &events);
    // The third request carries the whole conversation, the edit's result included.
    let messages = requests[2].body["messages"].as_array().unwrap().clone();
    assert_eq!(messages.len(), 5);
    assert_eq!(messages[4]["content"][0]["tool_use_id"], "toolu_02");
    assert_eq!(messages[4]["content"][0]["is_error"], false);
    // Usage is reported per provider in Done.
    let done = done(&events);
    assert_eq!(
        done["usage"],
        json!([{"provider": "anthropic", "model": "claude-sonnet-5-5",
                "input_tokens": 75, "output_tokens": 36}])
    );
    assert_eq!(h.live_workspaces(), 0);
}

#[tokio::test]
async fn openai_jobs_read_edit_and_finish_on_both_apis() {
    for api in [OpenAiApi::Chat, OpenAiApi::Responses] {
        let fake = FakeOpenAi::start().await;
        fake.push(read_edit_finish("call_"));
        let (repo, _h, events) = run_job(vec![openai(&fake, api)]).await;
        assert_edited(&repo, &events);
        assert_eq!(
            agent_events(&events),
            ["AI Message", "Tool: Read", "AI Message", "Tool: Edit"],
            "{api:?}"
        );
        assert!(ai_messages(&events).iter().all(|(p, _)| p == "openai"));
        let requests = fake.requests();
        assert_eq!(requests.len(), 3);
        let bearer = format!("Bearer {CANARY}");
        assert_key_stays_in_headers(&requests, "authorization", &bearer, &events);
        let path = match api {
            OpenAiApi::Chat => "/v1/chat/completions",
            _ => "/v1/responses",
        };
        assert!(requests.iter().all(|r| r.path == path));
    }
}

#[tokio::test]
async fn claude_overloaded_hands_the_same_transcript_to_openai() {
    let claude = FakeAnthropic::start().await;
    let mut replies = vec![Reply::turn(ScriptedTurn::new(
        vec![
            Block::Thinking {
                thinking: "Read it first.".into(),
                signature: "c2ln".into(),
            },
            Block::text("Let me read app.py."),
            Block::call("toolu_01", "read_file", json!({"path": "app.py"})),
        ],
        "tool_use",
    ))];
    // From then on Claude is overloaded on every call.
    replies.extend((0..10).map(|_| Reply::overloaded()));
    claude.push(replies);
    let gpt = FakeOpenAi::start().await;
    gpt.push([edit_turn("call_"), finish_turn("call_")]);

    let (repo, _h, events) = run_job(vec![anthropic(&claude), openai(&gpt, OpenAiApi::Chat)]).await;
    assert_edited(&repo, &events);
    assert_eq!(
        agent_events(&events),
        [
            "AI Message",
            "Tool: Read",
            "Agent Fallback",
            "AI Message",
            "Tool: Edit",
        ]
    );
    let fallback = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::AgentFallback { from, to, reason } => {
                Some((from.clone(), to.clone(), reason.clone()))
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(
        (fallback.0.as_str(), fallback.1.as_str()),
        ("anthropic", "openai")
    );
    assert!(fallback.2.contains("529"), "{}", fallback.2);

    // OpenAI's first request continues Claude's conversation: its call and the file it read.
    let first = &gpt.requests()[0].body;
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[1], json!({"role": "user", "content": PROMPT}));
    assert_eq!(
        messages[2],
        json!({"role": "assistant", "content": "Let me read app.py.", "tool_calls": [
            {"id": "toolu_01", "type": "function",
             "function": {"name": "read_file", "arguments": "{\"path\":\"app.py\"}"}}]})
    );
    assert_eq!(messages[3]["role"], "tool");
    assert_eq!(messages[3]["tool_call_id"], "toolu_01");
    assert!(
        messages[3]["content"]
            .as_str()
            .unwrap()
            .contains("return \"Hello \" + name"),
        "{}",
        messages[3]
    );
    assert!(
        !first.to_string().contains("c2ln"),
        "Claude's thinking went to OpenAI"
    );
    // Claude's second request was the same transcript.
    let claude_requests = claude.requests();
    assert_eq!(claude_requests.len(), 2, "max_retries = 0 in the harness");
    assert_eq!(
        claude_requests[1].body["messages"][1]["content"][0],
        json!({"type": "thinking", "thinking": "Read it first.", "signature": "c2ln"})
    );
}

#[tokio::test]
async fn bad_tool_calls_go_back_to_the_model_as_tool_errors() {
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::raw_call("toolu_01", "edit_file", r#"{"path": "app.py", "old_str": "#),
                Block::call("toolu_02", "delete_everything", json!({})),
                Block::call(
                    "toolu_03",
                    "edit_file",
                    json!({"path": "app.py", "old_str": "Goodbye ", "new_str": "Bye "}),
                ),
            ],
            "tool_use",
        )),
        edit_turn("toolu_1"),
        finish_turn("toolu_1"),
    ]);
    let (repo, _h, events) = run_job(vec![anthropic(&fake)]).await;
    assert_edited(&repo, &events);
    let second = &fake.requests()[1].body;
    let results = second["messages"][2]["content"].as_array().unwrap();
    let summary: Vec<(&str, bool)> = results
        .iter()
        .map(|r| {
            (
                r["tool_use_id"].as_str().unwrap(),
                r["is_error"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("toolu_01", true), ("toolu_02", true), ("toolu_03", true)]
    );
    let text = |i: usize| results[i]["content"].as_str().unwrap().to_owned();
    assert!(text(0).contains("not valid JSON"), "{}", text(0));
    assert!(text(1).contains("delete_everything"), "{}", text(1));
    assert!(text(2).contains("old_str was not found"), "{}", text(2));
    // The malformed call was echoed as a tool_use with an object input, as the API requires.
    assert_eq!(
        second["messages"][1]["content"][0],
        json!({"type": "tool_use", "id": "toolu_01", "name": "edit_file", "input": {}})
    );
}

#[tokio::test]
async fn the_api_key_never_reaches_the_sandbox() {
    let fake = FakeOpenAi::start().await;
    fake.push([
        Reply::tool_call(
            "call_env",
            "run_command",
            json!({"command": "env; cat /proc/self/environ | tr '\\0' '\\n'"}),
        ),
        edit_turn("call_"),
        finish_turn("call_"),
    ]);
    let (repo, _h, events) = run_job(vec![openai(&fake, OpenAiApi::Responses)]).await;
    assert_edited(&repo, &events);
    let requests = fake.requests();
    let output: Vec<&Value> = requests[1].body["input"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["type"] == "function_call_output")
        .collect();
    assert_eq!(output.len(), 1);
    let env = output[0]["output"].as_str().unwrap();
    assert!(env.contains("PATH="), "the command ran: {env}");
    assert!(!env.contains(CANARY));
    assert_key_stays_in_headers(
        &requests,
        "authorization",
        &format!("Bearer {CANARY}"),
        &events,
    );
}

fn harness_options(agents: Vec<Arc<dyn Provider>>, secrets: &[&str]) -> HarnessOptions {
    HarnessOptions {
        agents,
        secrets: secrets.iter().map(|s| s.to_string()).collect(),
        ..HarnessOptions::default()
    }
}

/// A stream that breaks mid-text and is retried shows its text once: each attempt's text is held
/// back until the attempt succeeds.
#[tokio::test]
async fn a_retried_stream_does_not_repeat_its_text() {
    let fake = FakeAnthropic::start().await;
    let first = ScriptedTurn::new(
        vec![
            Block::text("I will read app.py first, then edit it."),
            Block::call("toolu_01", "read_file", json!({"path": "app.py"})),
        ],
        "tool_use",
    );
    // message_start, content_block_start and three text deltas, then the connection drops.
    fake.push([Reply::cut(first.clone(), 5), Reply::turn(first)]);
    fake.push([edit_turn("toolu_0"), finish_turn("toolu_0")]);
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        retry: tiny_backspace::agent::retry::RetryPolicy {
            max_retries: 2,
            initial_backoff: std::time::Duration::from_millis(10),
            jitter: 0.0,
            ..Default::default()
        },
        ..harness_options(vec![anthropic(&fake)], &[CANARY])
    })
    .await;
    let events = events_of(&h.submit(repo.path(), PROMPT).await).await;
    assert_edited(&repo, &events);
    assert_eq!(fake.requests().len(), 4);
    assert_eq!(
        ai_messages(&events),
        [
            (
                "anthropic".to_owned(),
                "I will read app.py first, then edit it.".to_owned()
            ),
            ("anthropic".to_owned(), "Replacing the greeting.".to_owned()),
        ]
    );
}

/// A configured secret that a tool reads out of the repository is scrubbed before the tool's
/// result enters the transcript: the model never receives it.
#[tokio::test]
async fn tool_results_are_redacted_before_the_model_sees_them() {
    const IN_REPO: &str = "ghp_canary_checked_in_0123456789abcdef";
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::tool_call("toolu_01", "read_file", json!({"path": "deploy.env"})),
        Reply::tool_call(
            "toolu_02",
            "run_command",
            json!({"command": "cat deploy.env; echo done"}),
        ),
    ]);
    fake.push([edit_turn("toolu_0"), finish_turn("toolu_0")]);
    let repo = repo_with(&[
        ("app.py", APP),
        ("deploy.env", &format!("TOKEN={IN_REPO}\n")),
    ]);
    let h = Harness::new(harness_options(vec![anthropic(&fake)], &[CANARY, IN_REPO])).await;
    let events = events_of(&h.submit(repo.path(), PROMPT).await).await;
    assert_edited(&repo, &events);
    let requests = fake.requests();
    assert_eq!(requests.len(), 4);
    for request in &requests {
        assert!(!request.raw_body.contains(IN_REPO), "{}", request.raw_body);
    }
    // Both the read and the command's output reached the model, scrubbed.
    let results: Vec<String> = requests[2].body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|m| m["content"].as_array().cloned().unwrap_or_default())
        .filter(|part| part["type"] == "tool_result")
        .map(|part| part["content"].to_string())
        .collect();
    assert_eq!(results.len(), 2, "{results:?}");
    assert!(
        results.iter().all(|r| r.contains("TOKEN=[REDACTED]")),
        "{results:?}"
    );
}

/// Usage is recorded per turn as it happens: a job whose agent fails after a paid turn still
/// reports that turn's tokens in `Done` and `GET /jobs/{id}`.
#[tokio::test]
async fn usage_of_paid_turns_survives_an_agent_failure() {
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::turn(
            ScriptedTurn::new(
                vec![Block::call(
                    "toolu_01",
                    "read_file",
                    json!({"path": "app.py"}),
                )],
                "tool_use",
            )
            .with_usage(1200, 85),
        ),
        Reply::unauthorized(),
    ]);
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(harness_options(vec![anthropic(&fake)], &[CANARY])).await;
    let job = h.submit(repo.path(), PROMPT).await;
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "agent_failed");
    let expected = json!([{"provider": "anthropic", "model": "claude-sonnet-5-5",
                           "input_tokens": 1200, "output_tokens": 85}]);
    assert_eq!(done["usage"], expected);
    let view = serde_json::to_value(tiny_backspace::job::state::JobView::of(
        &job.record().await.unwrap(),
    ))
    .unwrap();
    assert_eq!(view["usage"], expected);
}

/// A job that runs out of time after the agent changed files keeps and publishes that work: the
/// agent's budget is what the job has left minus a reserve for collecting and publishing, so the
/// change becomes a `[partial]` draft with the paid turn's usage.
#[tokio::test]
async fn a_job_that_runs_out_of_time_publishes_its_partial_work() {
    let fake = FakeAnthropic::start().await;
    fake.push([
        Reply::turn(
            ScriptedTurn::new(
                vec![Block::call(
                    "toolu_01",
                    "edit_file",
                    json!({"path": "app.py", "old_str": "Hello ", "new_str": "Hi, "}),
                )],
                "tool_use",
            )
            .with_usage(500, 40),
        ),
        Reply::Stall,
    ]);
    let repo = repo_with(&[("app.py", APP)]);
    let h = Harness::new(HarnessOptions {
        job_timeout: std::time::Duration::from_secs(5),
        ..harness_options(vec![anthropic(&fake)], &[CANARY])
    })
    .await;
    let events = events_of(&h.submit(repo.path(), PROMPT).await).await;
    let done = done(&events);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["files_changed"], 1);
    assert_eq!(
        done["usage"],
        json!([{"provider": "anthropic", "model": "claude-sonnet-5-5",
                "input_tokens": 500, "output_tokens": 40}])
    );
    let branch = done["branch"].as_str().unwrap();
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:app.py")]),
        EDITED
    );
    let subject = git(repo.path(), &["log", "-1", "--format=%s", branch]);
    assert!(subject.starts_with("[partial] "), "{subject}");
    assert!(
        shape(&events).contains(&"Diff".to_owned()),
        "{:?}",
        shape(&events)
    );
    assert_eq!(h.live_workspaces(), 0);
}
