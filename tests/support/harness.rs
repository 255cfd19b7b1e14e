//! Building blocks for whole-job tests: real temporary git repositories, local backends that use
//! the built `tiny-backspace` binary as sandbox launcher, and scripted providers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use tiny_backspace::agent::dummy::DummyProvider;
use tiny_backspace::agent::retry::RetryPolicy;
use tiny_backspace::agent::runner::AgentLimits;
use tiny_backspace::agent::{
    Part, Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Transcript, Turn,
};
use tiny_backspace::event::{Event, EventKind};
use tiny_backspace::forge::local::LocalForge;
use tiny_backspace::forge::policy::CommitPolicy;
use tiny_backspace::forge::{Forge, Forges};
use tiny_backspace::job::pipeline::Backends;
use tiny_backspace::job::{JobHandle, JobRegistry, JobRequest, Limits};
use tiny_backspace::redact::Redactor;
use tiny_backspace::repo::RepoRef;
use tiny_backspace::sandbox::SandboxProvider;
use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};
use tiny_backspace::store::JobStore;

pub fn launcher() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tiny-backspace"))
}

/// Runs git in `dir`, panicking with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A git repository with one commit on `main` holding `files`.
pub fn repo_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    git(dir.path(), &["init", "-q", "-b", "main"]);
    for (path, content) in files {
        let full = dir.path().join(path);
        std::fs::create_dir_all(full.parent().expect("parent")).expect("mkdir");
        std::fs::write(full, content).expect("write");
    }
    git(dir.path(), &["add", "-A"]);
    git(dir.path(), &["commit", "-q", "-m", "initial"]);
    dir
}

/// The local sandbox provider with its workspaces under `root`.
pub async fn local_sandbox(root: &Path) -> Arc<dyn SandboxProvider> {
    let mut config = LocalConfig::new(launcher());
    config.root = root.to_path_buf();
    Arc::new(
        LocalProvider::new(config)
            .await
            .expect("local sandbox available"),
    )
}

pub struct Harness {
    pub registry: Arc<JobRegistry>,
    pub workspaces: tempfile::TempDir,
}

pub struct HarnessOptions {
    pub agents: Vec<Arc<dyn Provider>>,
    pub job_timeout: Duration,
    pub limits: Limits,
    pub remote: Option<Arc<dyn Forge>>,
    pub sandbox: Option<Arc<dyn SandboxProvider>>,
    pub secrets: Vec<String>,
    pub agent_limits: AgentLimits,
    pub max_change_bytes: u64,
    /// Provider retries (none by default, so faults show at once).
    pub retry: RetryPolicy,
    /// The job store; an in-memory SQLite database by default.
    pub store: Option<Arc<dyn JobStore>>,
}

impl Default for HarnessOptions {
    fn default() -> Self {
        Self {
            agents: vec![Arc::new(DummyProvider)],
            job_timeout: Duration::from_secs(120),
            limits: Limits::default(),
            remote: None,
            sandbox: None,
            secrets: Vec::new(),
            agent_limits: AgentLimits::default(),
            max_change_bytes: 64 * 1024 * 1024,
            retry: RetryPolicy {
                max_retries: 0,
                ..RetryPolicy::default()
            },
            store: None,
        }
    }
}

/// A fresh in-memory job store.
pub async fn memory_store() -> Arc<dyn JobStore> {
    tiny_backspace::store::open("sqlite::memory:")
        .await
        .expect("in-memory store")
}

impl Harness {
    pub async fn new(options: HarnessOptions) -> Self {
        let workspaces = tempfile::tempdir().expect("tempdir");
        let sandbox = match options.sandbox {
            Some(s) => s,
            None => local_sandbox(workspaces.path()).await,
        };
        let backends = Backends {
            sandbox,
            agents: options.agents,
            forges: Forges {
                local: Arc::new(LocalForge),
                remote: options.remote,
            },
            commit_policy: CommitPolicy::default(),
            agent_limits: options.agent_limits,
            retry: options.retry,
            redactor: Redactor::new(options.secrets),
            job_timeout: options.job_timeout,
            clone_timeout: Duration::from_secs(60),
            max_change_bytes: options.max_change_bytes,
        };
        let store = match options.store {
            Some(store) => store,
            None => memory_store().await,
        };
        Self {
            registry: JobRegistry::start(Arc::new(backends), options.limits, store)
                .await
                .expect("registry starts"),
            workspaces,
        }
    }

    pub async fn submit(&self, repo: &Path, prompt: &str) -> JobHandle {
        self.registry
            .submit(request(repo, prompt))
            .await
            .expect("job accepted")
    }

    /// Number of job workspaces still on disk.
    pub fn live_workspaces(&self) -> usize {
        std::fs::read_dir(self.workspaces.path())
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

pub fn request(repo: &Path, prompt: &str) -> JobRequest {
    JobRequest {
        repo: RepoRef::Local {
            path: repo.canonicalize().expect("repo path"),
        },
        prompt: prompt.to_owned(),
        base_branch: None,
        draft: false,
        branch: None,
    }
}

/// Waits for the job's `Done` (bounded) and returns every event.
pub async fn events_of(job: &JobHandle) -> Vec<Event> {
    tokio::time::timeout(
        Duration::from_secs(120),
        job.log().follow(0).map(|s| s.event).collect::<Vec<_>>(),
    )
    .await
    .expect("job finished in time")
}

/// The `type` of each event, e.g. `Status:clone:started`.
pub fn shape(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| {
            let v = serde_json::to_value(e).expect("serialize");
            let ty = v["type"].as_str().unwrap_or("?").to_owned();
            match &e.kind {
                EventKind::Status { .. } => format!(
                    "{ty}:{}:{}",
                    v["step"].as_str().unwrap_or("?"),
                    v["state"].as_str().unwrap_or("?")
                ),
                _ => ty,
            }
        })
        .collect()
}

pub fn done(events: &[Event]) -> serde_json::Value {
    let last = events.last().expect("events");
    assert!(last.kind.is_done(), "last event is not Done: {last:?}");
    assert_eq!(
        events.iter().filter(|e| e.kind.is_done()).count(),
        1,
        "exactly one Done"
    );
    serde_json::to_value(last).expect("serialize")
}

/// What a scripted provider does on each call.
pub enum Step {
    Turn(Vec<Part>),
    Fail(ProviderError),
    /// Never answers (for timeouts and cancellation).
    Hang,
    Panic,
}

/// A provider that replays scripted steps and records each transcript it was given.
pub struct Scripted {
    pub name: String,
    steps: Mutex<std::collections::VecDeque<Step>>,
    pub seen: Mutex<Vec<Transcript>>,
}

impl Scripted {
    pub fn new(name: &str, steps: Vec<Step>) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            steps: Mutex::new(steps.into()),
            seen: Mutex::new(Vec::new()),
        })
    }
}

pub fn call(id: &str, name: &str, args: serde_json::Value) -> Part {
    Part::ToolCall {
        id: id.into(),
        name: name.into(),
        arguments: args,
        raw_arguments: None,
    }
}

#[async_trait]
impl Provider for Scripted {
    fn name(&self) -> &str {
        &self.name
    }

    fn model(&self) -> &str {
        "scripted"
    }

    async fn complete(
        &self,
        transcript: &Transcript,
        _tools: &[ToolSpec],
        text: &dyn TextSink,
    ) -> Result<Turn, ProviderError> {
        self.seen.lock().unwrap().push(transcript.clone());
        let step = self.steps.lock().unwrap().pop_front();
        match step {
            Some(Step::Turn(content)) => {
                for part in &content {
                    if let Part::Text { text: t } = part {
                        text.text_delta(&self.name, t);
                    }
                }
                let stop = if content.iter().any(|p| matches!(p, Part::ToolCall { .. })) {
                    StopReason::ToolUse
                } else {
                    StopReason::EndTurn
                };
                Ok(Turn {
                    content,
                    stop,
                    usage: TokenUsage {
                        input_tokens: 10,
                        output_tokens: 5,
                    },
                })
            }
            Some(Step::Fail(err)) => Err(err),
            Some(Step::Hang) => {
                std::future::pending::<()>().await;
                unreachable!()
            }
            Some(Step::Panic) => panic!("scripted provider panic"),
            None => Err(ProviderError::fallback("script exhausted")),
        }
    }
}

/// Faults a [`Faulty`] sandbox injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    CreateFails,
    CloneFails,
    /// Every `exec` of the pipeline's change collection times out.
    CollectTimesOut,
    /// The first N kills fail (the sandbox lives on).
    KillFailsFirst(u32),
}

/// Wraps a sandbox provider and injects one fault.
pub struct Faulty {
    pub inner: Arc<dyn SandboxProvider>,
    pub fault: Fault,
}

struct FaultySandbox {
    inner: Arc<dyn tiny_backspace::sandbox::Sandbox>,
    fault: Fault,
    kills: std::sync::atomic::AtomicU32,
}

#[async_trait]
impl SandboxProvider for Faulty {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn isolation(&self) -> &'static str {
        self.inner.isolation()
    }

    fn limits(&self) -> &'static str {
        self.inner.limits()
    }

    async fn create(
        &self,
        job_id: &str,
    ) -> Result<Arc<dyn tiny_backspace::sandbox::Sandbox>, tiny_backspace::sandbox::SandboxError>
    {
        if self.fault == Fault::CreateFails {
            return Err(tiny_backspace::sandbox::SandboxError::Create(
                "injected: no capacity".into(),
            ));
        }
        let inner = self.inner.create(job_id).await?;
        Ok(Arc::new(FaultySandbox {
            inner,
            fault: self.fault,
            kills: std::sync::atomic::AtomicU32::new(0),
        }))
    }
}

#[async_trait]
impl tiny_backspace::sandbox::Sandbox for FaultySandbox {
    async fn clone_repo(
        &self,
        spec: &tiny_backspace::sandbox::CloneSpec,
    ) -> Result<tiny_backspace::sandbox::Cloned, tiny_backspace::sandbox::SandboxError> {
        if self.fault == Fault::CloneFails {
            return Err(tiny_backspace::sandbox::SandboxError::Clone(
                "injected: remote hung up".into(),
            ));
        }
        self.inner.clone_repo(spec).await
    }
    async fn exec(
        &self,
        req: &tiny_backspace::sandbox::ExecRequest,
    ) -> Result<tiny_backspace::sandbox::ExecOutput, tiny_backspace::sandbox::SandboxError> {
        if self.fault == Fault::CollectTimesOut && req.command.contains("git add -A") {
            // The real command, with a timeout too short for it.
            let mut short = req.clone();
            short.command = format!("sleep 30; {}", req.command);
            short.timeout = Duration::from_secs(1);
            return self.inner.exec(&short).await;
        }
        self.inner.exec(req).await
    }
    async fn read_file(
        &self,
        path: &tiny_backspace::sandbox::RepoPath,
    ) -> Result<tiny_backspace::sandbox::FileContent, tiny_backspace::sandbox::SandboxError> {
        self.inner.read_file(path).await
    }
    async fn read_files(
        &self,
        paths: &[tiny_backspace::sandbox::RepoPath],
    ) -> Result<Vec<tiny_backspace::sandbox::FileContent>, tiny_backspace::sandbox::SandboxError>
    {
        self.inner.read_files(paths).await
    }
    async fn write_file(
        &self,
        path: &tiny_backspace::sandbox::RepoPath,
        bytes: &[u8],
    ) -> Result<(), tiny_backspace::sandbox::SandboxError> {
        self.inner.write_file(path, bytes).await
    }
    async fn list_dir(
        &self,
        path: &tiny_backspace::sandbox::RepoPath,
        depth: u32,
    ) -> Result<Vec<tiny_backspace::sandbox::DirEntry>, tiny_backspace::sandbox::SandboxError> {
        self.inner.list_dir(path, depth).await
    }
    async fn kill(&self) -> Result<(), tiny_backspace::sandbox::SandboxError> {
        let attempt = self.kills.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if let Fault::KillFailsFirst(failures) = self.fault
            && attempt < failures
        {
            return Err(tiny_backspace::sandbox::SandboxError::Transport {
                message: "injected: kill failed".into(),
                retryable: true,
            });
        }
        self.inner.kill().await
    }
}
