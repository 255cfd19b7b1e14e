#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Whole jobs on the `e2b` backend against the fake E2B: dummy agent, a local repository (the
//! fake runs commands on this host, so a `file://` clone works), the local forge.
//!
//! Checks: the job succeeds with the change on its branch; no sandbox is left alive; the job's
//! own steps (create, clone, collect, read, kill) cost at most 5 requests whatever the agent does;
//! under every injected fault the job either recovers or ends with `Error` + `Done`, never hangs;
//! none of the server's secrets (GitHub token, model keys, API keys) reaches the sandbox, and the
//! E2B key only ever travels in the control plane's `X-API-Key` header.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use pretty_assertions::assert_eq;
use serde_json::json;
use support::fake_anthropic::{Block, FakeAnthropic, Reply, ScriptedTurn};
use support::fake_e2b::{FakeE2b, Fault};
use support::fake_github::{FakeGithub, SeedFile};
use support::harness::{self, Harness, HarnessOptions};
use tiny_backspace::agent::Provider;
use tiny_backspace::agent::anthropic::{AnthropicConfig, AnthropicProvider};
use tiny_backspace::agent::openai::{OpenAiApi, OpenAiConfig, OpenAiProvider};
use tiny_backspace::event::{Event, EventKind};
use tiny_backspace::forge::Forge;
use tiny_backspace::forge::github::{GithubConfig, GithubForge};
use tiny_backspace::job::JobRequest;
use tiny_backspace::repo::RepoRef;
use tiny_backspace::sandbox::e2b::E2bProvider;
use tiny_backspace::sandbox::{
    CloneSpec, Cloned, DirEntry, ExecOutput, ExecRequest, FileContent, RepoPath, Sandbox,
    SandboxError, SandboxProvider,
};

/// Which sandbox method caused how many requests to the fake, in call order.
type CallLog = Arc<Mutex<Vec<(&'static str, usize)>>>;

/// Wraps the e2b provider and attributes the fake's requests to each sandbox call. A job's
/// calls are sequential, so the fake's request count before and after a call is exact.
struct Counting {
    inner: E2bProvider,
    fake: Arc<FakeE2b>,
    calls: CallLog,
}

struct CountingSandbox {
    inner: Arc<dyn Sandbox>,
    fake: Arc<FakeE2b>,
    calls: CallLog,
}

impl CountingSandbox {
    async fn count<T>(&self, name: &'static str, fut: impl std::future::Future<Output = T>) -> T {
        let before = self.fake.request_count();
        let out = fut.await;
        let cost = self.fake.request_count() - before;
        self.calls.lock().unwrap().push((name, cost));
        out
    }
}

#[async_trait]
impl SandboxProvider for Counting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn isolation(&self) -> &'static str {
        self.inner.isolation()
    }

    fn limits(&self) -> &'static str {
        self.inner.limits()
    }

    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let before = self.fake.request_count();
        let sandbox = self.inner.create(job_id).await;
        let cost = self.fake.request_count() - before;
        self.calls.lock().unwrap().push(("create", cost));
        Ok(Arc::new(CountingSandbox {
            inner: sandbox?,
            fake: self.fake.clone(),
            calls: self.calls.clone(),
        }))
    }
}

#[async_trait]
impl Sandbox for CountingSandbox {
    async fn clone_repo(&self, spec: &CloneSpec) -> Result<Cloned, SandboxError> {
        self.count("clone_repo", self.inner.clone_repo(spec)).await
    }
    async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.count("exec", self.inner.exec(req)).await
    }
    async fn read_file(&self, path: &RepoPath) -> Result<FileContent, SandboxError> {
        self.count("read_file", self.inner.read_file(path)).await
    }
    async fn read_files(&self, paths: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError> {
        self.count("read_files", self.inner.read_files(paths)).await
    }
    async fn write_file(&self, path: &RepoPath, bytes: &[u8]) -> Result<(), SandboxError> {
        self.count("write_file", self.inner.write_file(path, bytes))
            .await
    }
    async fn list_dir(&self, path: &RepoPath, depth: u32) -> Result<Vec<DirEntry>, SandboxError> {
        self.count("list_dir", self.inner.list_dir(path, depth))
            .await
    }
    async fn kill(&self) -> Result<(), SandboxError> {
        self.count("kill", self.inner.kill()).await
    }
}

struct Setup {
    fake: Arc<FakeE2b>,
    harness: Harness,
    calls: CallLog,
    repo: tempfile::TempDir,
}

async fn setup(
    fake: FakeE2b,
    configure: impl FnOnce(&mut tiny_backspace::sandbox::e2b::E2bConfig),
) -> Setup {
    let fake = Arc::new(fake);
    let mut config = fake.config();
    configure(&mut config);
    let calls = CallLog::default();
    let provider = Counting {
        inner: E2bProvider::new(config),
        fake: fake.clone(),
        calls: calls.clone(),
    };
    let harness = Harness::new(HarnessOptions {
        sandbox: Some(Arc::new(provider)),
        job_timeout: Duration::from_secs(60),
        ..HarnessOptions::default()
    })
    .await;
    let repo = harness::repo_with(&[("README.md", "# Widgets\n\nWidgets are great.\n")]);
    Setup {
        fake,
        harness,
        calls,
        repo,
    }
}

const PROMPT: &str = r#"replace "great" with "excellent" in README.md"#;

/// Runs one job to its end, bounded, and checks the invariants every job keeps.
async fn run_job(s: &Setup) -> (Vec<Event>, serde_json::Value) {
    let job = s.harness.submit(s.repo.path(), PROMPT).await;
    let events = tokio::time::timeout(Duration::from_secs(90), harness::events_of(&job))
        .await
        .expect("the job never hangs");
    let done = harness::done(&events);
    if done["status"] != "succeeded" {
        assert!(
            events
                .iter()
                .any(|e| matches!(e.kind, EventKind::Error { .. })),
            "a failed job reports an Error before Done: {:?}",
            harness::shape(&events)
        );
    }
    // Cleanup ran before Done: nothing is left alive at E2B.
    assert_eq!(s.fake.live_sandboxes(), 0, "{:?}", harness::shape(&events));
    (events, done)
}

/// The requests of the job's own steps: create, clone, the collect command (the last `exec`
/// before the final `read_files`, or the last `exec` when nothing changed), read, kill.
fn own_requests(calls: &[(&'static str, usize)]) -> usize {
    let collect = calls
        .iter()
        .rposition(|(name, _)| *name == "exec")
        .map(|i| calls[i].1)
        .unwrap_or(0);
    let read = calls
        .iter()
        .rev()
        .take_while(|(name, _)| *name != "exec")
        .filter(|(name, _)| *name == "read_files")
        .map(|(_, cost)| cost)
        .sum::<usize>();
    let fixed: usize = calls
        .iter()
        .filter(|(name, _)| matches!(*name, "create" | "clone_repo" | "kill"))
        .map(|(_, cost)| cost)
        .sum();
    fixed + collect + read
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dummy_job_succeeds_in_five_requests_of_its_own() {
    let s = setup(FakeE2b::start().await, |_| {}).await;
    let (events, done) = run_job(&s).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    let branch = done["branch"].as_str().unwrap();
    let readme = harness::git(s.repo.path(), &["show", &format!("{branch}:README.md")]);
    assert_eq!(readme, "# Widgets\n\nWidgets are excellent.\n");
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::Diff { .. }))
    );

    let calls = s.calls.lock().unwrap().clone();
    let names: Vec<&str> = calls.iter().map(|(n, _)| *n).collect();
    assert_eq!(names.first(), Some(&"create"));
    assert_eq!(names.last(), Some(&"kill"));
    // Every sandbox call, the agent's tools included, is exactly one request.
    assert!(calls.iter().all(|(_, cost)| *cost == 1), "{calls:?}");
    assert_eq!(own_requests(&calls), 5, "{calls:?}");
    assert_eq!(
        s.fake.request_count(),
        calls.len(),
        "no request outside sandbox calls"
    );
    assert_eq!(s.fake.created_sandboxes(), 1);
}

/// One fault, one job: it must recover or fail cleanly.
async fn job_under(fault: Fault) -> (Setup, Vec<Event>, serde_json::Value) {
    let fake = FakeE2b::start().await;
    fake.inject(fault);
    let s = setup(fake, |config| {
        config.timing.request_timeout = Duration::from_secs(3);
    })
    .await;
    let (events, done) = run_job(&s).await;
    (s, events, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovers_from_transient_faults() {
    for fault in [
        Fault::CreateUnavailable(2),
        Fault::Hang {
            path: "/v2/sandboxes".into(),
            pattern: None,
        },
        Fault::CutStream {
            pattern: "TB-CLONED".into(),
        },
        Fault::Hang {
            path: "/process.Process/Start".into(),
            pattern: Some("TB-CLONED".into()),
        },
        Fault::CutStream {
            pattern: "read-files".into(),
        },
        Fault::Stall {
            pattern: "read-files".into(),
        },
        Fault::Hang {
            path: "/process.Process/Start".into(),
            pattern: Some("read-files".into()),
        },
        // Collecting the change (git add + diff) is repeatable: run again after its stream broke.
        Fault::CutStream {
            pattern: "__TB_".into(),
        },
        Fault::Hang {
            path: "/process.Process/Start".into(),
            pattern: Some("__TB_".into()),
        },
        Fault::Stall {
            pattern: "__TB_".into(),
        },
    ] {
        let label = format!("{fault:?}");
        let (s, _, done) = job_under(fault).await;
        assert_eq!(done["status"], "succeeded", "{label}: {done}");
        assert_eq!(s.fake.created_sandboxes(), 1, "{label}: one sandbox only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fails_cleanly_when_it_cannot_recover() {
    let cases = [
        (
            Fault::CreateUnavailable(100),
            "sandbox_transport",
            "sandbox",
        ),
        (
            Fault::Gone {
                pattern: "__TB_".into(),
            },
            "sandbox_gone",
            "commit",
        ),
        (
            Fault::Gone {
                pattern: "TB-CLONED".into(),
            },
            "sandbox_gone",
            "clone",
        ),
    ];
    for (fault, code, step) in cases {
        let label = format!("{fault:?}");
        let (_, events, done) = job_under(fault).await;
        assert_eq!(done["status"], "failed", "{label}: {done}");
        assert_eq!(done["error"]["code"], code, "{label}: {done}");
        let message = done["error"]["message"].as_str().unwrap();
        assert!(
            !message.contains(support::fake_e2b::API_KEY),
            "{label}: {message}"
        );
        let error = events
            .iter()
            .find(|e| matches!(e.kind, EventKind::Error { .. }))
            .map(|e| serde_json::to_value(e).unwrap())
            .unwrap();
        assert_eq!(error["step"], step, "{label}: {error}");
    }
}

const GITHUB_CANARY: &str = "ghp_E2BCANARY_0a1b2c3d4e5f67890a1b";
const ANTHROPIC_CANARY: &str = "sk-ant-E2BCANARY-9f8e7d6c5b4a3928";
const OPENAI_CANARY: &str = "sk-E2BCANARY-0123456789abcdefABCD";
const API_KEY_CANARY: &str = "tb-api-key-E2BCANARY-27182818";

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// A whole job with every secret configured as a canary (GitHub token, Anthropic and OpenAI
/// keys, a service API key, the E2B key), publishing to the fake GitHub through the `e2b` backend,
/// with a model that looks for secrets from inside the sandbox. Everything that enters a sandbox
/// enters through a request to E2B, so the fake's record of them is complete: the create body
/// (`envVars`, `metadata`), every process start (command, arguments, environment), every file
/// upload, and every header, path and query.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_secrets_never_reach_the_e2b_sandbox() {
    let e2b = FakeE2b::start().await;
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
            vec![Block::call(
                "t1",
                "run_command",
                json!({"command": "env; echo ---; cat ~/.git-credentials ~/.gitconfig ~/.netrc .git/config 2>&1; \
                    git config --list --show-origin; ls -la ~"}),
            )],
            "tool_use",
        )),
        Reply::turn(ScriptedTurn::new(
            vec![Block::call(
                "t2",
                "write_file",
                json!({"path": "NOTES.md", "content": "Widgets are excellent.\n"}),
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
    let anthropic: Arc<dyn Provider> = Arc::new(
        AnthropicProvider::new(AnthropicConfig {
            api_key: ANTHROPIC_CANARY.into(),
            base_url: model.base_url(),
            model: "claude-sonnet-5-5".into(),
        })
        .unwrap(),
    );
    // Configured as the fallback; the Anthropic script never lets the job reach it.
    let openai: Arc<dyn Provider> = Arc::new(
        OpenAiProvider::new(OpenAiConfig {
            api_key: OPENAI_CANARY.into(),
            base_url: "http://127.0.0.1:9/v1".into(),
            model: "gpt-test".into(),
            api: OpenAiApi::Chat,
        })
        .unwrap(),
    );
    let forge = GithubForge::new(GithubConfig {
        token: GITHUB_CANARY.into(),
        api_url: github.api_url(),
    })
    .unwrap();
    let h = Harness::new(HarnessOptions {
        sandbox: Some(Arc::new(E2bProvider::new(e2b.config()))),
        agents: vec![anthropic, openai],
        remote: Some(Arc::new(forge) as Arc<dyn Forge>),
        // As the configuration does: every secret is the redactor's, so one that reached an event
        // would show up below as a redaction.
        secrets: [
            GITHUB_CANARY,
            ANTHROPIC_CANARY,
            OPENAI_CANARY,
            API_KEY_CANARY,
            support::fake_e2b::API_KEY,
        ]
        .map(String::from)
        .to_vec(),
        job_timeout: Duration::from_secs(60),
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
            prompt: "Praise the widgets".into(),
            base_branch: None,
            draft: false,
            branch: None,
        })
        .await
        .unwrap();
    let events = tokio::time::timeout(Duration::from_secs(90), harness::events_of(&job))
        .await
        .expect("the job never hangs");
    let done = harness::done(&events);
    assert_eq!(done["status"], "succeeded", "{:?}", harness::shape(&events));
    assert_eq!(e2b.live_sandboxes(), 0);

    // What the sandbox itself saw: its environment, git configuration and home directory.
    let probe = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::ToolBash {
                command, output, ..
            } if command.starts_with("env;") => Some(output.clone()),
            _ => None,
        })
        .expect("the probe ran");
    assert!(
        probe.contains("PATH=") && probe.contains("[remote \"origin\"]"),
        "{probe}"
    );
    for event in &events {
        let text = serde_json::to_string(event).unwrap();
        assert!(
            !text.contains(tiny_backspace::redact::MARKER),
            "a secret reached an event: {text}"
        );
    }

    let requests = e2b.requests();
    let secrets = [
        GITHUB_CANARY,
        ANTHROPIC_CANARY,
        OPENAI_CANARY,
        API_KEY_CANARY,
    ];
    for r in &requests {
        let label = format!("{} {}", r.method, r.path);
        let mut parts: Vec<(String, Vec<u8>)> = vec![
            ("path".into(), r.path.clone().into_bytes()),
            ("query".into(), r.query.clone().into_bytes()),
            ("body".into(), r.body.to_vec()),
        ];
        for (name, value) in &r.headers {
            if name == "x-api-key" {
                assert!(!r.is_envd(), "{label}: the E2B key went to envd");
                assert_eq!(value.as_bytes(), support::fake_e2b::API_KEY.as_bytes());
                continue;
            }
            parts.push((format!("header {name}"), value.as_bytes().to_vec()));
        }
        for (place, bytes) in &parts {
            for secret in secrets.iter().chain([&support::fake_e2b::API_KEY]) {
                assert!(!holds(bytes, secret), "{label}: a secret in its {place}");
            }
        }
    }

    // The create asks for no environment at all, and its metadata holds none of the secrets.
    let creates: Vec<serde_json::Value> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/sandboxes"))
        .map(|r| serde_json::from_slice(&r.body).unwrap())
        .collect();
    assert_eq!(creates.len(), 1);
    assert_eq!(creates[0]["envVars"], json!({}), "{}", creates[0]);
    assert!(creates[0]["metadata"].is_object(), "{}", creates[0]);

    // Every process: its command, arguments and environment.
    let starts: Vec<serde_json::Value> =
        requests.iter().filter_map(|r| r.start_message()).collect();
    assert!(starts.len() >= 3, "clone, probe, collect: {starts:?}");
    for start in &starts {
        let process = &start["process"];
        let envs = process["envs"].as_object().cloned().unwrap_or_default();
        for (name, value) in &envs {
            assert!(
                !tiny_backspace::config::SECRET_VARS.contains(&name.as_str()) && name != "API_KEYS",
                "a secret's variable in a process environment: {name}"
            );
            let value = value.as_str().unwrap_or_default();
            assert!(!secrets.iter().any(|s| value.contains(s)), "{name}={value}");
        }
        let text = process.to_string();
        assert!(!secrets.iter().any(|s| text.contains(s)), "{text}");
    }

    // Every file written into the sandbox, as stored.
    let uploads = e2b.uploads();
    assert!(
        uploads.iter().any(|u| u.path.ends_with("NOTES.md")),
        "{:?}",
        uploads.iter().map(|u| &u.path).collect::<Vec<_>>()
    );
    for upload in &uploads {
        for secret in secrets.iter().chain([&support::fake_e2b::API_KEY]) {
            assert!(!holds(&upload.content, secret), "{}", upload.path);
        }
    }
}
