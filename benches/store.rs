//! What durability costs (run with `cargo bench --bench store`; PostgreSQL figures need
//! `TEST_DATABASE_URL`, e.g. `eval "$(scripts/postgres start)"`):
//! - events appended per second, in bursts (one transaction per batch) and one by one (each
//!   append waits for its own commit, the worst case);
//! - time to the first event of `POST /code`, over a real socket;
//! - the wall time of 200 dummy jobs, 4 at a time;
//!
//! each for an in-memory SQLite database (nothing reaches a disk: the baseline), a SQLite file
//! (WAL) and PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{dummy_backends, make_repo, start_registry, stats, time_to_first_event};
use tiny_backspace::event::{EventKind, Step, StepState};
use tiny_backspace::job::state::Summary;
use tiny_backspace::job::{EventLog, JobRegistry, Limits};
use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};
use tiny_backspace::store::{Admission, JobStore, NewJob};

const EVENTS: u64 = 20_000;
const ONE_BY_ONE: u64 = 2_000;
const FIRST_EVENT_RUNS: usize = 100;
const JOBS: usize = 200;

fn status(i: u64) -> EventKind {
    EventKind::Status {
        step: Step::Agent,
        state: StepState::Started,
        message: format!("event {i} with a message of a typical length for a tool event"),
        elapsed_ms: None,
    }
}

async fn claimed_job(store: &Arc<dyn JobStore>) -> String {
    let id = uuid::Uuid::new_v4().to_string();
    let job = NewJob {
        id: id.clone(),
        owner: None,
        repo_url: "https://github.com/octo/hello".into(),
        prompt: "bench".into(),
        request: "{}".into(),
        created_at: tiny_backspace::now_ms(),
        idempotency: None,
    };
    let admission = Admission {
        max_queued: 1_000_000,
        max_jobs_per_key: None,
        key_rate_per_min: None,
    };
    store
        .create_job(job, &admission, Box::new(|_| Vec::new()))
        .await
        .unwrap()
        .unwrap();
    store
        .claim_queued(&id, "bench", Duration::from_secs(600))
        .await
        .unwrap()
        .unwrap();
    id
}

/// Events per second: `EVENTS` appended as fast as the pipeline can, then `ONE_BY_ONE` each
/// waiting for its commit.
async fn append_rate(store: &Arc<dyn JobStore>) -> (f64, f64) {
    let id = claimed_job(store).await;
    let log = EventLog::view(&id, store.clone()).start_writing("bench", 0, Summary::default(), 0);
    let started = Instant::now();
    for i in 0..EVENTS {
        log.append(status(i));
    }
    log.flushed().await;
    let burst = EVENTS as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for i in 0..ONE_BY_ONE {
        log.append(status(i));
        log.flushed().await;
    }
    let single = ONE_BY_ONE as f64 / started.elapsed().as_secs_f64();
    // Ended, so that the jobs measured next do not count it as running.
    log.append(EventKind::Done {
        status: tiny_backspace::event::DoneStatus::Cancelled,
        pr_url: None,
        branch: None,
        summary: String::new(),
        files_changed: 0,
        duration_ms: 0,
        usage: vec![],
        error: None,
    });
    log.flushed().await;
    (burst, single)
}

async fn registry(
    store: Arc<dyn JobStore>,
    workspaces: &Path,
    max_concurrent: usize,
) -> Arc<JobRegistry> {
    let mut config = LocalConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_tiny-backspace")));
    config.root = workspaces.to_path_buf();
    let backends = dummy_backends(Arc::new(LocalProvider::new(config).await.unwrap()));
    start_registry(
        backends,
        Limits {
            max_concurrent,
            max_queued: JOBS,
            ..Limits::default()
        },
        Some(store),
    )
    .await
}

async fn many_jobs(registry: &Arc<JobRegistry>, repo: &Path) -> Duration {
    let started = Instant::now();
    let mut runs = Vec::new();
    for _ in 0..JOBS {
        let registry = registry.clone();
        let repo = repo.to_path_buf();
        runs.push(tokio::spawn(async move {
            common::run_dummy_job(&registry, &repo).await
        }));
        // Submitted at a steady pace, as clients would; the queue holds the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for run in runs {
        run.await.unwrap();
    }
    started.elapsed()
}

fn percentile(mut samples: Vec<Duration>, p: f64) -> f64 {
    samples.sort();
    let i = ((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1;
    samples[i].as_secs_f64() * 1000.0
}

async fn measure(name: &str, url: &str, repo: &Path) {
    let store = tiny_backspace::store::open(url).await.unwrap();
    let (burst, single) = append_rate(&store).await;
    println!(
        "{name:<8} events appended: {burst:>9.0}/s in bursts, {single:>7.0}/s one commit each"
    );
    // One registry per store: a second instance on the same SQLite database would take the
    // first one's jobs for orphans (a file database is locked against that).
    let workspaces = tempfile::tempdir().unwrap();
    let registry = registry(store, workspaces.path(), 4).await;
    let first = time_to_first_event(registry.clone(), repo, FIRST_EVENT_RUNS).await;
    println!(
        "{name:<8} POST /code → Job Started: {}   p99 {:.2} ms",
        stats(first.clone()),
        percentile(first, 0.99)
    );
    let wall = many_jobs(&registry, repo).await;
    println!(
        "{name:<8} {JOBS} dummy jobs, 4 at a time: {:.1} s ({:.0} ms a job)",
        wall.as_secs_f64(),
        wall.as_secs_f64() * 1000.0 / JOBS as f64
    );
    registry.shutdown(Duration::from_secs(30)).await;
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let repo = tempfile::tempdir().unwrap();
    make_repo(repo.path(), 10);
    let repo_path = repo.path().canonicalize().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}/bench.db", dir.path().display());
    runtime.block_on(async {
        measure("memory", "sqlite::memory:", &repo_path).await;
        measure("sqlite", &sqlite, &repo_path).await;
        match std::env::var("TEST_DATABASE_URL") {
            Ok(admin) => {
                let name = format!("bench_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&admin).await.unwrap();
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                let mut url = url::Url::parse(&admin).unwrap();
                url.set_path(&format!("/{name}"));
                measure("postgres", url.as_str(), &repo_path).await;
            }
            Err(_) => println!("postgres: not measured (set TEST_DATABASE_URL)"),
        }
    });
}
