#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The secret scan on whole jobs publishing to the fake GitHub: an agent that writes a configured
//! secret (plain, or base64 inside a longer stream), a token-shaped string nobody configured, or
//! a secret into a file's name, is refused at the commit step with `secret_in_change` naming the
//! file and never the secret, one `Done`, no `Diff`, no stored patch, and not a single GitHub
//! write. A change with text that only resembles a secret is published as usual.

mod support;

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use support::fake_github::{FakeGithub, SeedFile};
use support::harness::{self, Harness, HarnessOptions, Scripted, Step, call};
use tiny_backspace::agent::Part;
use tiny_backspace::event::{Event, EventKind};
use tiny_backspace::forge::Forge;
use tiny_backspace::forge::github::{GithubConfig, GithubForge};
use tiny_backspace::job::{JobHandle, JobRequest};
use tiny_backspace::repo::RepoRef;

/// The server's secrets, as the configuration would hand them to the redactor.
const GITHUB_CANARY: &str = "ghp_SCANCANARY_0a1b2c3d4e5f67890a1b";
const MODEL_CANARY: &str = "sk-ant-SCANCANARY-9f8e7d6c5b4a3928";
const API_KEY_CANARY: &str = "tb-api-key-SCANCANARY-31415926";
/// Shaped like a GitHub token, configured nowhere.
const LOOSE_TOKEN: &str = "ghp_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A";

struct Run {
    fake: FakeGithub,
    job: JobHandle,
    events: Vec<Event>,
    done: Value,
    _harness: Harness,
}

/// One job on `alice/widgets` in which the agent makes `calls` (one per turn), then finishes.
async fn run(calls: Vec<Part>) -> Run {
    let fake = FakeGithub::start_at("/api/v3").await;
    fake.add_user(GITHUB_CANARY, "alice");
    fake.create_repo(
        "alice",
        "widgets",
        &[SeedFile::text(
            "README.md",
            "# Widgets\n\nWidgets are great.\n",
        )],
    );
    let forge = GithubForge::new(GithubConfig {
        token: GITHUB_CANARY.into(),
        api_url: fake.api_url(),
    })
    .unwrap();
    let mut steps: Vec<Step> = calls.into_iter().map(|c| Step::Turn(vec![c])).collect();
    steps.push(Step::Turn(vec![call(
        "done",
        "finish",
        json!({"title": "Add the files", "summary": "Added what was asked."}),
    )]));
    let h = Harness::new(HarnessOptions {
        agents: vec![Scripted::new("scripted", steps)],
        remote: Some(Arc::new(forge) as Arc<dyn Forge>),
        secrets: vec![
            GITHUB_CANARY.into(),
            MODEL_CANARY.into(),
            API_KEY_CANARY.into(),
        ],
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
            prompt: "Add the files".into(),
            base_branch: None,
            draft: false,
            branch: None,
        })
        .await
        .unwrap();
    let events = harness::events_of(&job).await;
    let done = harness::done(&events);
    Run {
        fake,
        job,
        events,
        done,
        _harness: h,
    }
}

fn write(path: &str, content: &str) -> Part {
    call("w", "write_file", json!({"path": path, "content": content}))
}

fn command(command: &str) -> Part {
    call("c", "run_command", json!({ "command": command }))
}

/// The job was refused at the commit step for `expected` (the message's finding), nothing left
/// the server, and no event carries a secret.
async fn assert_refused(run: &Run, expected: &str) {
    let done = &run.done;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "secret_in_change", "{done}");
    assert_eq!(
        done["error"]["message"],
        format!("nothing was published: {expected}"),
        "{done}"
    );
    assert_eq!(
        (&done["branch"], &done["pr_url"], &done["files_changed"]),
        (&Value::Null, &Value::Null, &json!(0)),
        "{done}"
    );
    let errors: Vec<Value> = run
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Error { .. }))
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (
            &errors[0]["code"],
            &errors[0]["step"],
            &errors[0]["message"]
        ),
        (
            &json!("secret_in_change"),
            &json!("commit"),
            &done["error"]["message"]
        )
    );
    let shape = harness::shape(&run.events);
    assert!(
        !shape.iter().any(|s| s == "Diff" || s == "PR Created"),
        "{shape:?}"
    );
    let commit: Vec<&String> = shape
        .iter()
        .filter(|s| s.starts_with("Status:commit"))
        .collect();
    assert_eq!(commit, ["Status:commit:started", "Status:commit:failed"]);
    assert!(
        !shape.iter().any(|s| s.starts_with("Status:pr")),
        "{shape:?}"
    );
    assert!(run.job.patch().await.is_none(), "no patch is kept");

    // Not one GitHub write: the requests are the repository lookups, all reads.
    let requests = run.fake.requests();
    assert!(!requests.is_empty());
    let writes: Vec<String> = requests
        .iter()
        .filter(|r| r.method != "GET")
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(writes, Vec::<String>::new());
    assert!(run.fake.pulls().is_empty());
    let bare = run.fake.git_dir("alice/widgets");
    assert_eq!(harness::git(&bare, &["branch", "--list"]).trim(), "* main");

    for event in &run.events {
        let text = serde_json::to_string(event).unwrap();
        for secret in [GITHUB_CANARY, MODEL_CANARY, API_KEY_CANARY, LOOSE_TOKEN] {
            assert!(!text.contains(secret), "an event carries a secret: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_secret_written_plain_is_refused_before_any_github_write() {
    let run = run(vec![write(
        "notes.txt",
        &format!("token for later: {GITHUB_CANARY}\n"),
    )])
    .await;
    assert_refused(&run, "`notes.txt` contains a configured secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_secret_base64_encoded_inside_a_longer_stream_is_refused() {
    // Two bytes before the key put it at the third alignment of the base64 groups.
    let encoded = B64.encode(format!("k={MODEL_CANARY};rest of the blob"));
    let run = run(vec![write(
        "assets/blob.b64",
        &format!("-- blob --\n{encoded}\n"),
    )])
    .await;
    assert_refused(
        &run,
        "`assets/blob.b64` contains a configured secret, base64-encoded",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_github_token_shape_nobody_configured_is_refused() {
    // The command decodes the token, so not even the agent's own events spell it out.
    let run = run(vec![command(&format!(
        "mkdir -p config && printf 'GH=%s\\n' \"$(echo {} | base64 -d)\" > config/creds.env",
        B64.encode(LOOSE_TOKEN)
    ))])
    .await;
    assert_refused(&run, "`config/creds.env` contains a GitHub token shape").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_in_a_file_name_is_refused_and_masked_in_the_message() {
    let run = run(vec![command(&format!(
        "mkdir -p keys && echo hi > \"keys/$(echo {} | base64 -d).txt\"",
        B64.encode(LOOSE_TOKEN)
    ))])
    .await;
    assert_refused(
        &run,
        "the path `keys/[REDACTED].txt` contains a GitHub token shape",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_in_binary_content_is_refused() {
    let run = run(vec![command(&format!(
        "printf '\\000\\377PNG\\001' > logo.bin; \
         printf '%s' {API_KEY_CANARY} | od -An -tx1 | tr -d ' \\n' | tr a-f A-F >> logo.bin; \
         printf '\\000' >> logo.bin"
    ))])
    .await;
    assert_refused(&run, "`logo.bin` contains a configured secret, hex-encoded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_that_only_resembles_a_secret_is_published() {
    let near_misses = "\
pip install scikit-learn  # import sk-learn, task-0123456789ABCDEFabcdef0123456789abcdef\n\
export GITHUB_TOKEN=ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx  # placeholder\n\
aws_access_key_id = AKIAIOSFODNN7EXAMPLE  # AWS's documented example\n\
-----BEGIN PUBLIC KEY-----\n\
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAu1SU1LfVLPHCozMxH2Mo\n\
-----END PUBLIC KEY-----\n\
const HEADER: &str = \"-----BEGIN PRIVATE KEY-----\";\n\
SCANCANARY is only part of a secret, and so is 0a1b2c3d4e5f67890a1b.\n";
    let run = run(vec![write("docs/setup.md", near_misses)]).await;
    assert_eq!(run.done["status"], "succeeded", "{}", run.done);
    assert!(run.done["pr_url"].as_str().unwrap().contains("/pull/1"));
    assert!(
        run.events.iter().any(
            |e| matches!(&e.kind, EventKind::Diff { patch, .. } if patch.contains("sk-learn"))
        )
    );
    assert!(run.job.patch().await.is_some());
    let bare = run.fake.git_dir("alice/widgets");
    let branch = run.done["branch"].as_str().unwrap();
    assert_eq!(
        harness::git(&bare, &["show", &format!("{branch}:docs/setup.md")]),
        near_misses
    );
}
