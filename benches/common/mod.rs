//! What the benchmarks share: a generated repository, the bare-git baseline, and the summary line.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tiny_backspace::agent::dummy::DummyProvider;
use tiny_backspace::agent::retry::RetryPolicy;
use tiny_backspace::agent::runner::AgentLimits;
use tiny_backspace::forge::Forges;
use tiny_backspace::forge::local::LocalForge;
use tiny_backspace::forge::policy::CommitPolicy;
use tiny_backspace::http::{AppState, router};
use tiny_backspace::job::pipeline::Backends;
use tiny_backspace::job::{JobRegistry, JobRequest};
use tiny_backspace::redact::Redactor;
use tiny_backspace::repo::{RepoPolicy, RepoRef};
use tiny_backspace::sandbox::SandboxProvider;

/// The request every benchmark job makes: one the dummy agent carries out.
pub const PROMPT: &str = "Replace \"Hello \" with \"Hi, \" in app.py";

/// The dummy agent and the local forge over `sandbox`.
pub fn dummy_backends(sandbox: Arc<dyn SandboxProvider>) -> Backends {
    Backends {
        sandbox,
        agents: vec![Arc::new(DummyProvider)],
        forges: Forges {
            local: Arc::new(LocalForge),
            remote: None,
        },
        commit_policy: CommitPolicy::default(),
        agent_limits: AgentLimits::default(),
        retry: RetryPolicy::default(),
        redactor: Redactor::default(),
        job_timeout: Duration::from_secs(600),
        clone_timeout: Duration::from_secs(600),
        max_change_bytes: 64 * 1024 * 1024,
    }
}

/// A registry over `store` (an in-memory SQLite database when `None`).
pub async fn start_registry(
    backends: Backends,
    limits: tiny_backspace::job::Limits,
    store: Option<Arc<dyn tiny_backspace::store::JobStore>>,
) -> Arc<JobRegistry> {
    let store = match store {
        Some(store) => store,
        None => tiny_backspace::store::open("sqlite::memory:")
            .await
            .unwrap(),
    };
    JobRegistry::start(Arc::new(backends), limits, store)
        .await
        .unwrap()
}

/// Runs one dummy job on `repo` to its `Done`, asserting it succeeded; returns its duration.
pub async fn run_dummy_job(registry: &Arc<JobRegistry>, repo: &Path) -> Duration {
    let started = Instant::now();
    let job = registry
        .submit(JobRequest {
            repo: RepoRef::Local {
                path: repo.to_path_buf(),
            },
            prompt: PROMPT.into(),
            base_branch: None,
            draft: false,
            branch: None,
        })
        .await
        .unwrap();
    let last = job.log().follow(0).collect::<Vec<_>>().await.pop().unwrap();
    let json = serde_json::to_value(&last.event).unwrap();
    assert_eq!(json["status"], "succeeded", "{json}");
    started.elapsed()
}

/// `POST /code` through the real router until `Job Started` is on the socket, `runs` times; each
/// sample starts once the job before has finished, so none queues.
pub async fn time_to_first_event(
    registry: Arc<JobRegistry>,
    repo: &Path,
    runs: usize,
) -> Vec<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let state = Arc::new(AppState {
        registry: registry.clone(),
        repo_policy: RepoPolicy {
            allow_local: true,
            ..RepoPolicy::default()
        },
        api_keys: vec![],
        admin_api_keys: vec![],
        allowed_hosts: vec![],
        cors_origins: vec![],
        metrics: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(state)).await });
    let body =
        serde_json::json!({"repoUrl": repo.display().to_string(), "prompt": PROMPT}).to_string();
    let request = format!(
        "POST /code HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut samples = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "stream ended early");
            seen.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&seen).contains("data: {\"type\":\"Job Started\"") {
                break;
            }
        }
        samples.push(started.elapsed());
        drop(stream);
        while registry.active().await > 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    samples
}

pub fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// A repository of `n` Python files (~80 lines each) in nested directories, plus `app.py`.
pub fn make_repo(dir: &Path, n: usize) {
    git(dir, &["init", "-q", "-b", "main"]);
    for i in 0..n {
        let path = dir.join(format!("pkg{}/mod{}/file{i}.py", i % 10, i % 7));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: String = (0..40)
            .map(|l| format!("def f{i}_{l}(x):\n    return x + {l}\n"))
            .collect();
        std::fs::write(path, body).unwrap();
    }
    std::fs::write(
        dir.join("app.py"),
        "def greet(name):\n    return \"Hello \" + name\n",
    )
    .unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "initial"]);
}

/// `git clone --depth 1` + the same edit the dummy job makes + `git diff`, timed `runs` times.
pub fn bare_git(repo: &Path, runs: usize) -> Vec<Duration> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let scratch = tempfile::tempdir().unwrap();
        let started = Instant::now();
        git(
            scratch.path(),
            &[
                "clone",
                "-q",
                "--depth",
                "1",
                &format!("file://{}", repo.display()),
                "c",
            ],
        );
        let clone = scratch.path().join("c");
        std::fs::write(
            clone.join("app.py"),
            "def greet(name):\n    return \"Hi, \" + name\n",
        )
        .unwrap();
        git(&clone, &["diff"]);
        samples.push(started.elapsed());
    }
    samples
}

/// Median, p90 and minimum of the samples.
pub fn stats(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = samples[samples.len() / 2];
    let p90 = samples[(samples.len() * 9 / 10).min(samples.len() - 1)];
    format!(
        "median {:8.2} ms   p90 {:8.2} ms   min {:8.2} ms   (n={})",
        ms(median),
        ms(p90),
        ms(samples[0]),
        samples.len()
    )
}
