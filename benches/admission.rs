//! Admission that fits the work (run with `cargo bench --bench admission`): E2B jobs with a
//! hosted model spend nearly all their time waiting on the network. Against the in-process fake
//! E2B with realistic latency added (sandbox creation +1 s, each model call +2 s, the dummy
//! agent's three calls), 1, 5 and 10 jobs submitted at once, with `MAX_CONCURRENT_JOBS=4` (the
//! old default) and with the default for `e2b` (32): wall time against one job's, and the
//! process's peak memory.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/fake_e2b.rs"]
mod fake_e2b;
#[path = "../tests/support/faults.rs"]
mod faults;

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::{dummy_backends, make_repo, run_dummy_job, start_registry};
use tiny_backspace::agent::dummy::DummyProvider;
use tiny_backspace::agent::{Provider, ProviderError, TextSink, ToolSpec, Transcript, Turn};
use tiny_backspace::config::{Host, default_concurrency};
use tiny_backspace::job::Limits;
use tiny_backspace::sandbox::e2b::E2bProvider;
use tiny_backspace::sandbox::{Sandbox, SandboxError, SandboxProvider};

const CREATE_LATENCY: Duration = Duration::from_secs(1);
const MODEL_LATENCY: Duration = Duration::from_secs(2);

/// E2B whose sandboxes take a second to boot, as real ones do.
struct SlowBoot(E2bProvider);

#[async_trait]
impl SandboxProvider for SlowBoot {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn isolation(&self) -> &'static str {
        self.0.isolation()
    }
    fn limits(&self) -> &'static str {
        self.0.limits()
    }
    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        tokio::time::sleep(CREATE_LATENCY).await;
        self.0.create(job_id).await
    }
}

/// The dummy agent, answering as slowly as a hosted model.
struct SlowModel(DummyProvider);

#[async_trait]
impl Provider for SlowModel {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn model(&self) -> &str {
        self.0.model()
    }
    async fn complete(
        &self,
        transcript: &Transcript,
        tools: &[ToolSpec],
        text: &dyn TextSink,
    ) -> Result<Turn, ProviderError> {
        tokio::time::sleep(MODEL_LATENCY).await;
        self.0.complete(transcript, tools, text).await
    }
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb / 1024.0
}

async fn batch(fake: &fake_e2b::FakeE2b, repo: &Path, jobs: usize, limit: usize) -> Duration {
    let mut backends = dummy_backends(Arc::new(SlowBoot(E2bProvider::new(fake.config()))));
    backends.agents = vec![Arc::new(SlowModel(DummyProvider))];
    let registry = start_registry(
        backends,
        Limits {
            max_concurrent: limit,
            max_queued: 100,
            ..Limits::default()
        },
        None,
    )
    .await;
    let started = Instant::now();
    let runs: Vec<_> = (0..jobs)
        .map(|_| {
            let registry = registry.clone();
            let repo = repo.to_path_buf();
            tokio::spawn(async move { run_dummy_job(&registry, &repo).await })
        })
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    let wall = started.elapsed();
    registry.shutdown(Duration::from_secs(30)).await;
    wall
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let repo = tempfile::tempdir().unwrap();
    make_repo(repo.path(), 20);
    let repo_path = repo.path().canonicalize().unwrap();
    let default = default_concurrency("e2b", 4 * 1024 * 1024 * 1024, &Host::this());
    runtime.block_on(async {
        let fake = fake_e2b::FakeE2b::start().await;
        let one = batch(&fake, &repo_path, 1, default).await;
        println!(
            "one job (create +1 s, 3 model calls +2 s each): {:.2} s",
            one.as_secs_f64()
        );
        for jobs in [5, 10] {
            for limit in [4, default] {
                let wall = batch(&fake, &repo_path, jobs, limit).await;
                println!(
                    "{jobs:>2} jobs at once, MAX_CONCURRENT_JOBS={limit:<2}: {:6.2} s = {:.2}× one job",
                    wall.as_secs_f64(),
                    wall.as_secs_f64() / one.as_secs_f64()
                );
            }
        }
        println!("peak RSS of the process: {:.0} MB", peak_rss_mb());
    });
}
