//! One whole job with every secret a canary: the GitHub token and the Anthropic key. With the
//! redactor switched off (so a leak would show, not be masked), neither appears in anything sent
//! into the sandbox, any model request (apart from the key's own auth header), any event, or any
//! log line, at TRACE level.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde_json::json;
use support::fake_anthropic::{Block, FakeAnthropic, Reply, ScriptedTurn};
use support::fake_github::{FakeGithub, SeedFile};
use support::harness::{Harness, HarnessOptions, done, events_of};
use tiny_backspace::agent::Provider;
use tiny_backspace::agent::anthropic::{AnthropicConfig, AnthropicProvider};
use tiny_backspace::event::EventKind;
use tiny_backspace::forge::Forge;
use tiny_backspace::forge::github::{GithubConfig, GithubForge};
use tiny_backspace::job::JobRequest;
use tiny_backspace::repo::RepoRef;

const GITHUB_CANARY: &str = "ghp_SECRETSCANARY_0a1b2c3d4e5f6789";
const MODEL_CANARY: &str = "sk-ant-SECRETSCANARY-9f8e7d6c5b4a";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_sandbox_a_model_an_event_or_a_log_line() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish(),
    )
    .unwrap();

    let github = FakeGithub::start_at("/api/v3").await;
    github.add_user(GITHUB_CANARY, "alice");
    github.create_repo(
        "alice",
        "widgets",
        &[SeedFile::text("README.md", "Widgets are great.\n")],
    );
    let model = FakeAnthropic::start().await;
    model.push([
        Reply::turn(ScriptedTurn::new(
            vec![
                Block::text("Checking the environment."),
                Block::call(
                    "t1",
                    "run_command",
                    json!({"command": "env; echo ---; cat .git/config; git remote -v; git config --list"}),
                ),
            ],
            "tool_use",
        )),
        Reply::turn(ScriptedTurn::new(
            vec![Block::call(
                "t2",
                "edit_file",
                json!({"path": "README.md", "old_str": "great", "new_str": "excellent"}),
            )],
            "tool_use",
        )),
        Reply::turn(ScriptedTurn::new(
            vec![Block::call(
                "t3",
                "finish",
                json!({"title": "Praise the widgets", "summary": "They are excellent."}),
            )],
            "tool_use",
        )),
    ]);
    let provider: Arc<dyn Provider> = Arc::new(
        AnthropicProvider::new(AnthropicConfig {
            api_key: MODEL_CANARY.into(),
            base_url: model.base_url(),
            model: "claude-sonnet-5-5".into(),
        })
        .unwrap(),
    );
    let forge = GithubForge::new(GithubConfig {
        token: GITHUB_CANARY.into(),
        api_url: github.api_url(),
    })
    .unwrap();
    let h = Harness::new(HarnessOptions {
        agents: vec![provider],
        remote: Some(Arc::new(forge) as Arc<dyn Forge>),
        // No redaction: a leak must be visible to this test, not masked.
        secrets: vec![],
        ..HarnessOptions::default()
    })
    .await;
    let job = h
        .registry
        .submit(JobRequest {
            repo: RepoRef::Remote {
                host: "github.com".into(),
                owner: "alice".into(),
                name: "widgets".into(),
            },
            prompt: "Praise the widgets more".into(),
            base_branch: None,
            draft: false,
            branch: None,
        })
        .await
        .unwrap();
    let events = events_of(&job).await;
    let done = done(&events);
    assert_eq!(done["status"], "succeeded", "{events:#?}");
    assert!(done["pr_url"].as_str().unwrap().contains("/pull/"));

    // The sandbox's view: its environment and git configuration, as the command printed them.
    let sandbox_view = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ToolBash {
                command, output, ..
            } if command.starts_with("env;") => Some(output.clone()),
            _ => None,
        })
        .expect("the command ran");
    assert!(
        sandbox_view.contains("PATH=") && sandbox_view.contains("[remote \"origin\"]"),
        "{sandbox_view}"
    );

    let mut places: Vec<(String, String)> = vec![("sandbox".into(), sandbox_view)];
    for e in &events {
        places.push(("event".into(), serde_json::to_string(e).unwrap()));
    }
    let requests = model.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert_eq!(r.header("x-api-key"), Some(MODEL_CANARY));
        let other_headers: Vec<String> = r
            .headers
            .iter()
            .filter(|(name, _)| name.as_str() != "x-api-key")
            .map(|(name, value)| format!("{name}: {value}"))
            .collect();
        places.push((
            "model request".into(),
            format!(
                "{} {}\n{}\n{}",
                r.method,
                r.path,
                other_headers.join("\n"),
                r.raw_body
            ),
        ));
    }
    for r in github.requests() {
        places.push((
            "github request".into(),
            format!("{} {}?{}\n{}", r.method, r.path, r.query, r.body),
        ));
    }
    let log = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(log.lines().count() > 10, "logs were captured");
    for line in log.lines() {
        places.push(("log line".into(), line.to_owned()));
    }
    for (place, text) in &places {
        for canary in [GITHUB_CANARY, MODEL_CANARY] {
            assert!(!text.contains(canary), "a secret reached a {place}: {text}");
        }
    }
}
