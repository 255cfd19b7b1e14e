//! The orchestrator's own time with the `e2b` backend, against the in-process fake E2B
//! (run with `cargo bench --bench e2b`). The fake runs commands on this host, so a sandbox costs
//! nothing to boot; what remains is our client, the wire protocol and the commands themselves:
//! - each backend call's round trip (create, clone, exec, read_files of 20 files, kill), next to
//!   spawning the same `bash -l -c true` directly;
//! - a whole dummy job (sandbox → clone → agent → diff → branch → cleanup), with its request
//!   count, next to a bare `git clone --depth 1` + edit + `git diff` on the same repository.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/fake_e2b.rs"]
mod fake_e2b;
#[path = "../tests/support/faults.rs"]
mod faults;

mod common;

use common::{bare_git, dummy_backends, make_repo, run_dummy_job, stats};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_backspace::job::Limits;
use tiny_backspace::sandbox::e2b::E2bProvider;
use tiny_backspace::sandbox::{CloneSpec, ExecRequest, RepoPath, Sandbox};

const RUNS: usize = 15;
const FILES: usize = 200;

#[derive(Default)]
struct Phases {
    create: Vec<Duration>,
    clone: Vec<Duration>,
    exec: Vec<Duration>,
    read: Vec<Duration>,
    kill: Vec<Duration>,
}

async fn phases(fake: &fake_e2b::FakeE2b, repo: &Path) -> Phases {
    let provider = E2bProvider::new(fake.config());
    let spec = CloneSpec {
        url: format!("file://{}", repo.display()),
        branch: None,
        timeout: Duration::from_secs(120),
    };
    let paths: Vec<RepoPath> = (0..20)
        .map(|i| RepoPath::parse(&format!("pkg{}/file{i}.py", i % 10)).unwrap())
        .collect();
    let mut out = Phases::default();
    for _ in 0..RUNS {
        let t = Instant::now();
        let sandbox = provider.create_sandbox("bench").await.unwrap();
        out.create.push(t.elapsed());
        let t = Instant::now();
        sandbox.clone_repo(&spec).await.unwrap();
        out.clone.push(t.elapsed());
        let t = Instant::now();
        let result = sandbox.exec(&ExecRequest::new("true")).await.unwrap();
        assert!(result.success());
        out.exec.push(t.elapsed());
        let t = Instant::now();
        let files = sandbox.read_files(&paths).await.unwrap();
        assert_eq!(files.len(), paths.len());
        out.read.push(t.elapsed());
        let t = Instant::now();
        sandbox.kill().await.unwrap();
        out.kill.push(t.elapsed());
    }
    out
}

/// The same spawn the fake does for `exec("true")`: a login shell with a clean environment and
/// an empty home.
fn direct_bash() -> Vec<Duration> {
    let home = tempfile::tempdir().unwrap();
    (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let status = std::process::Command::new("/bin/bash")
                .args(["-l", "-c", "true"])
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .env("HOME", home.path())
                .current_dir(home.path())
                .status()
                .unwrap();
            assert!(status.success());
            t.elapsed()
        })
        .collect()
}

async fn whole_jobs(fake: &fake_e2b::FakeE2b, repo: &Path) -> (Vec<Duration>, Vec<usize>) {
    let backends = dummy_backends(Arc::new(E2bProvider::new(fake.config())));
    let registry = common::start_registry(backends, Limits::default(), None).await;
    let mut times = Vec::new();
    let mut requests = Vec::new();
    for _ in 0..RUNS {
        let before = fake.request_count();
        times.push(run_dummy_job(&registry, repo).await);
        requests.push(fake.request_count() - before);
        assert_eq!(fake.live_sandboxes(), 0);
    }
    (times, requests)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = tempfile::tempdir().unwrap();
    make_repo(repo.path(), FILES);
    let repo = repo.path().canonicalize().unwrap();
    let fake = runtime.block_on(fake_e2b::FakeE2b::start());
    println!(
        "e2b backend against the in-process fake; repository of {} files; {RUNS} runs each",
        FILES + 1
    );
    let p = runtime.block_on(phases(&fake, &repo));
    println!(
        "create (POST /v2/sandboxes):             {}",
        stats(p.create)
    );
    println!(
        "clone (one process.Start):               {}",
        stats(p.clone)
    );
    println!("exec `true` (one process.Start):         {}", stats(p.exec));
    println!(
        "  vs `bash -l -c true` spawned directly: {}",
        stats(direct_bash())
    );
    println!("read_files, 20 files (one Start):        {}", stats(p.read));
    println!("kill (DELETE):                           {}", stats(p.kill));
    let (jobs, requests) = runtime.block_on(whole_jobs(&fake, &repo));
    println!("whole dummy job on e2b:                  {}", stats(jobs));
    println!(
        "  requests per job (agent tools included): min {} max {}",
        requests.iter().min().unwrap(),
        requests.iter().max().unwrap()
    );
    println!(
        "bare git clone + edit + diff:            {}",
        stats(bare_git(&repo, RUNS))
    );
}
