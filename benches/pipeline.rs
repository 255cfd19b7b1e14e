//! Benchmarks of the embedded pipeline (run with `cargo bench --bench pipeline`):
//! - time to the first event of `POST /code`, over a real socket;
//! - a whole dummy job on a ~1,000-file repository, against the bare
//!   `git clone --depth 1` + `git diff` time on the same repository.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{bare_git, dummy_backends, make_repo, run_dummy_job, stats, time_to_first_event};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tiny_backspace::job::{JobRegistry, Limits};
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
    let first = runtime.block_on(async {
        time_to_first_event(registry(workspaces.path()).await, &repo_path, RUNS).await
    });
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
