//! Benchmarks of the embedded pipeline (run with `cargo bench --bench pipeline`):
//! - time to the first event of `POST /code`, over a real socket;
//! - a whole dummy job on a ~1,000-file repository, against the bare
//!   `git clone --depth 1` + `git diff` time on the same repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{PROMPT, bare_git, dummy_backends, make_repo, run_dummy_job, stats};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiny_backspace::http::{AppState, router};
use tiny_backspace::job::{JobRegistry, Limits};
use tiny_backspace::repo::RepoPolicy;
use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};

const RUNS: usize = 15;

/// A repository of `n` source files in nested directories (~40 lines each).
async fn registry(workspaces: &Path) -> Arc<JobRegistry> {
    let mut config = LocalConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_tiny-backspace")));
    config.root = workspaces.to_path_buf();
    let backends = dummy_backends(Arc::new(LocalProvider::new(config).await.unwrap()));
    common::start_registry(
        backends,
        Limits {
            max_concurrent: 2,
            ..Limits::default()
        },
        None,
    )
    .await
}

async fn time_to_first_event(repo: &Path, workspaces: &Path) -> Vec<Duration> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let registry = registry(workspaces).await;
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
    for _ in 0..RUNS {
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
        // Let the job finish before the next sample, so samples do not queue behind each other.
        drop(stream);
        while registry.active().await > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    samples
}

async fn whole_jobs(repo: &Path, workspaces: &Path) -> Vec<Duration> {
    let registry = registry(workspaces).await;
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        samples.push(run_dummy_job(&registry, repo).await);
    }
    samples
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let repo = tempfile::tempdir().unwrap();
    make_repo(repo.path(), 1000);
    let repo_path = repo.path().canonicalize().unwrap();
    let workspaces = tempfile::tempdir().unwrap();
    println!("repository: 1,001 files; {RUNS} runs each");
    let first = runtime.block_on(time_to_first_event(&repo_path, workspaces.path()));
    println!(
        "time to first event (POST /code → `Job Started` on the socket): {}",
        stats(first)
    );
    let jobs = runtime.block_on(whole_jobs(&repo_path, workspaces.path()));
    println!(
        "whole dummy job (queue → clone → agent → diff → branch → cleanup): {}",
        stats(jobs)
    );
    println!(
        "bare `git clone --depth 1` + edit + `git diff`:                   {}",
        stats(bare_git(&repo_path, RUNS))
    );
}
