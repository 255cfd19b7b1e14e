//! Durable jobs: the same test bodies against SQLite and PostgreSQL (the cluster `scripts/postgres`
//! starts; these tests fail, not skip, without it). Real `serve` processes are killed with SIGKILL
//! and restarted on the same database; two processes share one PostgreSQL.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use http_body_util::BodyExt;
use pretty_assertions::assert_eq;
use serde_json::{Value, json};
use support::fake_e2b::{FakeE2b, Fault};
use support::faults::{FaultPlan, Injected};
use support::harness::{Harness, HarnessOptions, Scripted, Step, git, repo_with};
use support::stores::{Backend, Server, TestDb, client, eventually, post_job, read_events};
use tiny_backspace::http::{AppState, router};
use tiny_backspace::repo::RepoPolicy;
use tiny_backspace::store::{self, StoreError};
use tower::ServiceExt;

/// Runs a test body once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$name(super::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$name(super::Backend::Postgres).await
                }
            }
        )*
    };
}

on_both_backends!(
    events_state_and_patch_survive_sigkill_and_restart,
    a_job_left_running_by_a_killed_process_ends_with_instance_lost,
    a_sandbox_kill_left_pending_by_a_killed_process_is_finished_by_the_next,
    the_same_idempotency_key_returns_the_same_job,
    get_jobs_pages_newest_first_and_shows_each_key_its_own,
    a_job_whose_database_goes_away_ends_once_it_is_back,
);

const MAX: usize = usize::MAX;

fn types(events: &[(u64, Value)]) -> Vec<String> {
    events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap().to_owned())
        .collect()
}

async fn get_json(server: &Server, path: &str) -> (u16, Value) {
    let response = client().get(server.url(path)).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_text(server: &Server, path: &str) -> (u16, String) {
    let response = client().get(server.url(path)).send().await.unwrap();
    (
        response.status().as_u16(),
        response.text().await.unwrap_or_default(),
    )
}

async fn events_state_and_patch_survive_sigkill_and_restart(backend: Backend) {
    let db = TestDb::new(backend).await;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let workspaces = tempfile::tempdir().unwrap();
    let ws = workspaces.path().display().to_string();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", ws.as_str()),
    ];
    let mut first = Server::start(&env);
    let id = post_job(
        &first,
        &json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"}),
    )
    .await;
    // A client reads the first three events, then loses its connection.
    let start = read_events(&first, &id, 0, 3).await;
    assert_eq!(types(&start), ["Job Started", "Status", "Status"]);
    let all = read_events(&first, &id, 0, MAX).await;
    assert_eq!(all.last().unwrap().1["status"], "succeeded");
    let (_, view) = get_json(&first, &format!("/jobs/{id}")).await;
    let (_, patch) = get_text(&first, &format!("/jobs/{id}/patch")).await;
    assert!(patch.contains("+b"), "{patch}");
    first.kill();

    let second = Server::start(&env);
    // Last-Event-ID resumes across the restart: exactly the events after 3.
    let rest = read_events(&second, &id, 3, MAX).await;
    assert_eq!([start, rest].concat(), all);
    assert_eq!(read_events(&second, &id, 0, MAX).await, all);
    assert_eq!(
        (
            get_json(&second, &format!("/jobs/{id}")).await,
            get_text(&second, &format!("/jobs/{id}/patch")).await
        ),
        ((200, view), (200, patch))
    );
    // Nothing after Done: 204, as before the restart.
    let last = all.last().unwrap().0;
    let response = client()
        .get(second.url(&format!("/jobs/{id}/events")))
        .header("last-event-id", last.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    // The job ran once: one branch.
    let branches = git(repo.path(), &["branch", "--list", "tiny-backspace/*"]);
    assert_eq!(branches.lines().count(), 1, "{branches}");
}

/// Environment for a `serve` on the fake E2B whose clone never answers: the job sits in its
/// sandbox until the process is killed.
fn e2b_env(fake: &FakeE2b, db: &TestDb, lease: &str) -> Vec<(String, String)> {
    let mut env = fake.env();
    env.extend([
        ("DATABASE_URL".into(), db.url.clone()),
        ("SANDBOX".into(), "e2b".into()),
        ("ALLOW_LOCAL_REPOS".into(), "true".into()),
        ("JOB_LEASE_SECS".into(), lease.into()),
    ]);
    env
}

fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Follows the job from `server` until its clone has started (its sandbox exists and is
/// recorded), returning what was read.
async fn until_cloning(server: &Server, id: &str) -> Vec<(u64, Value)> {
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|(_, e): &(u64, Value)| e["type"] == "Status" && e["step"] == "clone")
    {
        let after = seen.last().map_or(0, |(seq, _)| *seq);
        seen.extend(read_events(server, id, after, 1).await);
    }
    seen
}

/// A `serve` on `db` and a fake E2B whose clone never answers (its lease 2 s), with one job
/// started that will sit in its sandbox: the fake, the server's environment, the server, the job
/// and its repository.
async fn a_job_held_in_its_sandbox(
    db: &TestDb,
) -> (
    FakeE2b,
    Vec<(String, String)>,
    Server,
    String,
    tempfile::TempDir,
) {
    let fake = FakeE2b::start().await;
    fake.inject(Fault::Hang {
        path: "/process.Process/Start".into(),
        pattern: Some("TB-CLONED".into()),
    });
    let repo = repo_with(&[("a.txt", "a\n")]);
    let env = e2b_env(&fake, db, "2");
    let server = Server::start(&as_refs(&env));
    let id = post_job(
        &server,
        &json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"}),
    )
    .await;
    (fake, env, server, id, repo)
}

fn assert_lost(events: &[(u64, Value)]) {
    let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    let tail = &events[events.len() - 2..];
    assert_eq!(types(tail), ["Error", "Done"]);
    assert_eq!(tail[0].1["code"], "instance_lost");
    assert_eq!(tail[1].1["status"], "failed");
    assert_eq!(tail[1].1["error"]["code"], "instance_lost");
    assert_eq!(types(events).iter().filter(|t| *t == "Done").count(), 1);
}

async fn a_job_left_running_by_a_killed_process_ends_with_instance_lost(backend: Backend) {
    let db = TestDb::new(backend).await;
    let (fake, env, mut first, id, _repo) = a_job_held_in_its_sandbox(&db).await;
    let before = until_cloning(&first, &id).await;
    assert_eq!(fake.live_sandboxes(), 1);
    first.kill();
    assert_eq!(fake.live_sandboxes(), 1, "nothing cleaned up after SIGKILL");

    // The restarted process (SQLite: at once; PostgreSQL: once the lease has expired) ends the
    // job and kills its sandbox.
    let second = Server::start(&as_refs(&env));
    let after = read_events(&second, &id, before.last().unwrap().0, MAX).await;
    let all = [before, after].concat();
    assert_lost(&all);
    assert_eq!(read_events(&second, &id, 0, MAX).await, all);
    let (_, view) = get_json(&second, &format!("/jobs/{id}")).await;
    assert_eq!(
        (&view["state"], &view["error"]["code"]),
        (&json!("failed"), &json!("instance_lost"))
    );
    eventually(
        "the lost job's sandbox is killed",
        Duration::from_secs(30),
        || {
            let live = fake.live_sandboxes();
            async move { live == 0 }
        },
    )
    .await;
}

/// A job whose sandbox kill keeps failing leaves it with the cleaner; the process is then killed
/// with SIGKILL. The next process finds the kill pending in the store, kills the sandbox by its
/// recorded id once E2B answers again, and records it released.
async fn a_sandbox_kill_left_pending_by_a_killed_process_is_finished_by_the_next(backend: Backend) {
    let db = TestDb::new(backend).await;
    let fake = FakeE2b::start().await;
    fake.set_fault_plan(Arc::new(FaultPlan::new(1).rule(
        "e2b.kill",
        1.0,
        Injected::Status(502),
    )));
    let repo = repo_with(&[("a.txt", "a\n")]);
    let env = e2b_env(&fake, &db, "2");
    let mut first = Server::start(&as_refs(&env));
    let id = post_job(
        &first,
        &json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"}),
    )
    .await;
    let events = read_events(&first, &id, 0, MAX).await;
    let cleanup: Vec<&Value> = events
        .iter()
        .map(|(_, e)| e)
        .filter(|e| e["type"] == "Status" && e["step"] == "cleanup")
        .collect();
    assert_eq!(cleanup.last().unwrap()["state"], "failed", "{cleanup:?}");
    assert_eq!(types(&events).last().unwrap(), "Done");
    let (_, health) = get_json(&first, "/healthz").await;
    assert_eq!(health["cleanup_pending"], 1);
    first.kill();
    assert_eq!(fake.live_sandboxes(), 1, "the sandbox outlived its process");

    // E2B answers again; the next process takes the kill over.
    fake.set_fault_plan(Arc::new(FaultPlan::new(1)));
    let mut second = Server::start(&as_refs(&env));
    eventually(
        "the pending kill is carried out",
        Duration::from_secs(30),
        || {
            let done = fake.live_sandboxes() == 0 && fake.killed_sandboxes() == 1;
            async move { done }
        },
    )
    .await;
    let health_url = second.url("/healthz");
    eventually(
        "the cleaner has nothing left",
        Duration::from_secs(10),
        || {
            let url = health_url.clone();
            async move {
                let health: Value = client()
                    .get(url)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                health["cleanup_pending"] == 0
            }
        },
    )
    .await;
    assert_eq!(fake.expired_sandboxes(), 0);
    second.kill();
    // Recorded as released: a third process would find nothing to kill.
    let store = db.open().await;
    assert_eq!(store.unreleased_sandboxes(10).await.unwrap(), vec![]);
    let resources = store.resources(&id).await.unwrap();
    assert!(
        resources.iter().any(|r| r.kind == "sandbox" && r.released),
        "{resources:?}"
    );
}

/// Two `serve` processes on one PostgreSQL: 20 jobs submitted to each in turn all finish, each
/// exactly once, and every job is streamed from the instance it was not submitted to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_queue_and_stream_each_others_jobs() {
    let db = TestDb::new(Backend::Postgres).await;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let workspaces = tempfile::tempdir().unwrap();
    let ws = workspaces.path().display().to_string();
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", ws.as_str()),
        ("MAX_CONCURRENT_JOBS", "2"),
        ("MAX_QUEUED_JOBS", "40"),
    ];
    let servers = [Server::start(&env), Server::start(&env)];
    let mut ids = Vec::new();
    for i in 0..20 {
        let body = json!({
            "repoUrl": repo.path().display().to_string(),
            "prompt": format!("create a file f{i}.txt with the text \"{i}\""),
        });
        ids.push(post_job(&servers[i % 2], &body).await);
    }
    for (i, id) in ids.iter().enumerate() {
        let events = read_events(&servers[(i + 1) % 2], id, 0, MAX).await;
        let seqs: Vec<u64> = events.iter().map(|(s, _)| *s).collect();
        assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
        assert_eq!(events.last().unwrap().1["status"], "succeeded", "{id}");
        let started = events
            .iter()
            .filter(|(_, e)| e["step"] == "queue" && e["state"] == "succeeded")
            .count();
        assert_eq!(
            (
                started,
                types(&events).iter().filter(|t| *t == "Done").count()
            ),
            (1, 1)
        );
    }
    // Each job ran once, on one instance.
    let branches = git(repo.path(), &["branch", "--list", "tiny-backspace/*"]);
    assert_eq!(branches.lines().count(), 20, "{branches}");
    for id in &ids {
        let runs: usize = servers
            .iter()
            .map(|s| {
                s.log()
                    .lines()
                    .filter(|l| l.contains("job finished") && l.contains(id.as_str()))
                    .count()
            })
            .sum();
        assert_eq!(runs, 1, "{id}");
    }
}

/// Killing the instance that runs a job: another instance's reaper ends it within the lease, a
/// client following it there sees it from `Job Started` to that `Done`, and its sandbox is
/// killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_mid_job_lets_another_end_it() {
    let db = TestDb::new(Backend::Postgres).await;
    let (fake, env, mut a, id, _repo) = a_job_held_in_its_sandbox(&db).await;
    until_cloning(&a, &id).await;
    let b = Arc::new(Server::start(&as_refs(&env)));
    let follower = tokio::spawn({
        let b = b.clone();
        let id = id.clone();
        async move { read_events(&b, &id, 0, MAX).await }
    });
    // The follower on B is reading A's job live.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!follower.is_finished());
    let killed = tokio::time::Instant::now();
    a.kill();
    let events = follower.await.unwrap();
    assert_eq!(events[0].1["type"], "Job Started");
    assert_lost(&events);
    // Within the lease (2 s), the heartbeat that notices it and a margin for this machine.
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    eventually(
        "the lost job's sandbox is killed",
        Duration::from_secs(30),
        || {
            let live = fake.live_sandboxes();
            async move { live == 0 }
        },
    )
    .await;
}

/// `DELETE /jobs/{id}` through an instance that does not run the job: the owner notices the
/// stored request and cancels it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_through_another_instance_reaches_the_owner() {
    let db = TestDb::new(Backend::Postgres).await;
    let fake = FakeE2b::start().await;
    fake.inject(Fault::Hang {
        path: "/process.Process/Start".into(),
        pattern: Some("TB-CLONED".into()),
    });
    let repo = repo_with(&[("a.txt", "a\n")]);
    let env = e2b_env(&fake, &db, "30");
    let a = Server::start(&as_refs(&env));
    let id = post_job(
        &a,
        &json!({"repoUrl": repo.path().display().to_string(), "prompt": "append \"b\" to a.txt"}),
    )
    .await;
    until_cloning(&a, &id).await;
    let b = Server::start(&as_refs(&env));
    let response = client()
        .delete(b.url(&format!("/jobs/{id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let events = read_events(&b, &id, 0, MAX).await;
    let done = &events.last().unwrap().1;
    assert_eq!(
        (&done["type"], &done["status"]),
        (&json!("Done"), &json!("cancelled"))
    );
    assert_eq!(fake.live_sandboxes(), 0);
}

/// In-process API over a store of `backend`.
async fn api(backend: Backend, keys: Vec<String>) -> (axum::Router, Harness, TestDb) {
    let db = TestDb::new(backend).await;
    let hang = Scripted::new("hang", (0..20).map(|_| Step::Hang).collect());
    let harness = Harness::new(HarnessOptions {
        agents: vec![hang],
        store: Some(db.open().await),
        ..HarnessOptions::default()
    })
    .await;
    let app = router(Arc::new(AppState {
        registry: harness.registry.clone(),
        repo_policy: RepoPolicy {
            allow_local: true,
            ..RepoPolicy::default()
        },
        api_keys: keys,
        admin_api_keys: vec![],
        allowed_hosts: vec![],
        cors_origins: vec![],
        metrics: Default::default(),
    }));
    (app, harness, db)
}

async fn send(
    app: &axum::Router,
    request: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        headers,
        serde_json::from_slice(&body).unwrap_or(Value::Null),
    )
}

fn post(uri: &str, body: &Value, headers: &[(&str, &str)]) -> Request<Body> {
    let mut request = Request::post(uri).header(header::CONTENT_TYPE, "application/json");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.body(Body::from(body.to_string())).unwrap()
}

async fn the_same_idempotency_key_returns_the_same_job(backend: Backend) {
    let (app, harness, _db) =
        api(backend, vec!["key-a-111111".into(), "key-b-222222".into()]).await;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "x"});
    let as_a = [
        ("x-api-key", "key-a-111111"),
        ("idempotency-key", "order-7"),
    ];
    let (status, headers, first) = send(&app, post("/jobs", &body, &as_a)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert!(!headers.contains_key("idempotent-replayed"));
    let id = first["job_id"].as_str().unwrap().to_owned();
    // A retry (also through the streaming route) gets the same job.
    let (status, headers, again) = send(&app, post("/jobs", &body, &as_a)).await;
    assert_eq!((status, &again), (StatusCode::ACCEPTED, &first));
    assert_eq!(headers["idempotent-replayed"], "true");
    let response = app
        .clone()
        .oneshot(post("/code", &body, &as_a))
        .await
        .unwrap();
    assert_eq!(response.headers()["x-job-id"], id.as_str());
    drop(response);
    // Unknown fields do not make it another request; another prompt does.
    let extra = json!({"repoUrl": repo.path().display().to_string(), "prompt": "x", "note": 1});
    let (_, _, same) = send(&app, post("/jobs", &extra, &as_a)).await;
    assert_eq!(same["job_id"], id.as_str());
    let other = json!({"repoUrl": repo.path().display().to_string(), "prompt": "y"});
    let (status, _, error) = send(&app, post("/jobs", &other, &as_a)).await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (StatusCode::CONFLICT, &json!("idempotency_conflict"))
    );
    // Keys are scoped per API key: B's "order-7" is B's own.
    let as_b = [
        ("x-api-key", "key-b-222222"),
        ("idempotency-key", "order-7"),
    ];
    let (status, _, theirs) = send(&app, post("/jobs", &body, &as_b)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(theirs["job_id"], id.as_str());
    // A malformed key is a 400.
    let bad = [
        ("x-api-key", "key-a-111111"),
        ("idempotency-key", "tab\there"),
    ];
    let (status, _, error) = send(&app, post("/jobs", &body, &bad)).await;
    assert_eq!(
        (status, &error["error"]["code"]),
        (StatusCode::BAD_REQUEST, &json!("invalid_idempotency_key"))
    );
    assert_eq!(harness.registry.active().await, 2);
    harness.registry.shutdown(Duration::from_secs(30)).await;
}

async fn get_jobs_pages_newest_first_and_shows_each_key_its_own(backend: Backend) {
    let (app, harness, _db) =
        api(backend, vec!["key-a-111111".into(), "key-b-222222".into()]).await;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let mut ids = Vec::new();
    for i in 0..5 {
        let body =
            json!({"repoUrl": repo.path().display().to_string(), "prompt": format!("job {i}")});
        let (status, _, v) =
            send(&app, post("/jobs", &body, &[("x-api-key", "key-a-111111")])).await;
        assert_eq!(status, StatusCode::ACCEPTED);
        ids.push(v["job_id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let body = json!({"repoUrl": repo.path().display().to_string(), "prompt": "b's"});
    send(&app, post("/jobs", &body, &[("x-api-key", "key-b-222222")])).await;
    let get = |uri: String| {
        Request::get(uri)
            .header("x-api-key", "key-a-111111")
            .body(Body::empty())
            .unwrap()
    };
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let uri = match &cursor {
            Some(c) => format!("/jobs?limit=2&cursor={c}"),
            None => "/jobs?limit=2".to_owned(),
        };
        let (status, _, page) = send(&app, get(uri)).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        pages += 1;
        for job in page["jobs"].as_array().unwrap() {
            seen.push(job["job_id"].as_str().unwrap().to_owned());
            assert!(job["prompt"].as_str().unwrap().starts_with("job "));
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(
        (seen, pages),
        (ids.clone(), 3),
        "newest first, A's jobs only"
    );
    // Filtered by state: the two jobs running (the hanging model) and the queued rest.
    let (_, _, running) = send(&app, get("/jobs?state=running".into())).await;
    let (_, _, queued) = send(&app, get("/jobs?state=queued".into())).await;
    let (_, _, finished) = send(&app, get("/jobs?state=succeeded".into())).await;
    let count = |v: &Value| v["jobs"].as_array().unwrap().len();
    assert_eq!(count(&running) + count(&queued), 5);
    assert_eq!(count(&finished), 0);
    for bad in [
        "/jobs?limit=0",
        "/jobs?limit=201",
        "/jobs?limit=x",
        "/jobs?state=done",
        "/jobs?cursor=nonsense",
    ] {
        let (status, _, error) = send(&app, get(bad.into())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {error}");
    }
    harness.registry.shutdown(Duration::from_secs(30)).await;
}

/// Bad `DATABASE_URL` values stop `serve` at start with a message naming it, never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_database_urls_are_clear_startup_errors() {
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.db");
    std::fs::write(&corrupt, vec![0x42u8; 8192]).unwrap();
    let locked = dir.path().join("locked.db");
    let locked_url = format!("sqlite://{}", locked.display());
    let holder = tiny_backspace::store::open(&locked_url).await.unwrap();
    let cases = [
        (
            "mysql://u:secret@127.0.0.1/db".to_owned(),
            "must start with sqlite: or postgres://",
        ),
        (
            format!("sqlite://{}", corrupt.display()),
            "file is not a database",
        ),
        (
            "sqlite:///nonexistent-dir/x/jobs.db".to_owned(),
            "does not exist",
        ),
        (locked_url, "another Tiny Backspace process is using"),
        (
            "postgres://u:secret@127.0.0.1:1/db".to_owned(),
            "cannot connect to PostgreSQL",
        ),
    ];
    for (url, expected) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tiny-backspace"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("DATABASE_URL", &url)
            .arg("serve")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(stderr.contains("DATABASE_URL"), "{url}: {stderr}");
        assert!(stderr.contains(expected), "{url}: {stderr}");
        assert!(!stderr.contains("panicked"), "{url}: {stderr}");
        assert!(
            !stderr.contains("secret"),
            "{url}: the password is shown: {stderr}"
        );
    }
    drop(holder);
}

/// `/healthz` answers 503 naming the store once the database is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_when_the_database_is_unreachable() {
    let (app, harness, db) = api(Backend::Postgres, vec![]).await;
    let health = || Request::get("/healthz").body(Body::empty()).unwrap();
    let (status, _, body) = send(&app, health()).await;
    assert_eq!(
        (status, &body["store"]),
        (StatusCode::OK, &json!("postgres"))
    );
    let admin = sqlx::PgPool::connect(&std::env::var("TEST_DATABASE_URL").unwrap())
        .await
        .unwrap();
    let name = url::Url::parse(&db.url)
        .unwrap()
        .path()
        .trim_start_matches('/')
        .to_owned();
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
        .execute(&admin)
        .await
        .unwrap();
    let (status, _, body) = send(&app, health()).await;
    assert_eq!(
        (status, &body["status"], &body["store"]),
        (
            StatusCode::SERVICE_UNAVAILABLE,
            &json!("unavailable"),
            &json!("postgres")
        )
    );
    assert!(body["store_error"].as_str().is_some(), "{body}");
    drop(harness);
}

/// A store whose writes fail while `failing` is set (the database went away), recording whether a
/// refused batch held the job's `Done`.
struct Flaky {
    inner: Arc<dyn tiny_backspace::store::JobStore>,
    failing: std::sync::atomic::AtomicBool,
    refused_done: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl tiny_backspace::store::JobStore for Flaky {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn shared(&self) -> bool {
        self.inner.shared()
    }
    async fn health(&self) -> Result<(), StoreError> {
        self.inner.health().await
    }
    async fn heartbeat(
        &self,
        instance: &str,
        max_concurrent: usize,
        lease: Duration,
        running: &[String],
    ) -> Result<store::Heartbeat, StoreError> {
        self.inner
            .heartbeat(instance, max_concurrent, lease, running)
            .await
    }
    async fn leave(&self, instance: &str) -> Result<(), StoreError> {
        self.inner.leave(instance).await
    }
    async fn create_job(
        &self,
        job: store::NewJob,
        admission: &store::Admission,
        first: store::FirstEvents,
    ) -> Result<Result<store::Created, store::Refusal>, StoreError> {
        self.inner.create_job(job, admission, first).await
    }
    async fn append(
        &self,
        id: &str,
        instance: &str,
        batch: &store::Batch,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.failing.load(Ordering::SeqCst) {
            if batch
                .events
                .iter()
                .any(|e| e.json.contains(r#""type":"Done""#))
            {
                self.refused_done.store(true, Ordering::SeqCst);
            }
            return Err(StoreError::Unavailable(
                "injected: the database is gone".into(),
            ));
        }
        self.inner.append(id, instance, batch).await
    }
    async fn job(&self, id: &str) -> Result<Option<store::JobRecord>, StoreError> {
        self.inner.job(id).await
    }
    async fn unfinished(&self) -> Result<store::Unfinished, StoreError> {
        self.inner.unfinished().await
    }
    async fn list_jobs(&self, q: &store::ListQuery) -> Result<Vec<store::JobRecord>, StoreError> {
        self.inner.list_jobs(q).await
    }
    async fn events_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<store::StoredEvent>, StoreError> {
        self.inner.events_after(id, after, limit).await
    }
    async fn patch(&self, id: &str) -> Result<Option<(bytes::Bytes, bool)>, StoreError> {
        self.inner.patch(id).await
    }
    async fn transcript(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.inner.transcript(id).await
    }
    async fn resources(&self, id: &str) -> Result<Vec<store::Resource>, StoreError> {
        self.inner.resources(id).await
    }
    async fn unreleased_sandboxes(
        &self,
        limit: usize,
    ) -> Result<Vec<(String, store::Resource)>, StoreError> {
        self.inner.unreleased_sandboxes(limit).await
    }
    async fn mark_released(
        &self,
        job_id: &str,
        resource: &store::Resource,
    ) -> Result<(), StoreError> {
        self.inner.mark_released(job_id, resource).await
    }
    async fn claim_next(
        &self,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<store::JobRecord>, StoreError> {
        self.inner.claim_next(instance, lease).await
    }
    async fn claim_queued(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<store::JobRecord>, StoreError> {
        self.inner.claim_queued(id, instance, lease).await
    }
    async fn request_cancel(&self, id: &str) -> Result<(), StoreError> {
        self.inner.request_cancel(id).await
    }
    async fn orphans(&self, instance: &str) -> Result<Vec<String>, StoreError> {
        self.inner.orphans(instance).await
    }
    async fn take_over(
        &self,
        id: &str,
        instance: &str,
        lease: Duration,
    ) -> Result<Option<store::JobRecord>, StoreError> {
        self.inner.take_over(id, instance, lease).await
    }
    async fn prune(&self, retention: &store::Retention) -> Result<usize, StoreError> {
        self.inner.prune(retention).await
    }
    fn notices(&self) -> tokio::sync::broadcast::Receiver<store::Notice> {
        self.inner.notices()
    }
}

/// A model that answers its first call once told to (with a command), then never again.
struct Gated {
    go: tokio::sync::Notify,
    calls: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl tiny_backspace::agent::Provider for Gated {
    fn name(&self) -> &str {
        "gated"
    }
    fn model(&self) -> &str {
        "gated"
    }
    async fn complete(
        &self,
        _: &tiny_backspace::agent::Transcript,
        _: &[tiny_backspace::agent::ToolSpec],
        _: &dyn tiny_backspace::agent::TextSink,
    ) -> Result<tiny_backspace::agent::Turn, tiny_backspace::agent::ProviderError> {
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) > 0 {
            std::future::pending::<()>().await;
        }
        self.go.notified().await;
        Ok(tiny_backspace::agent::Turn {
            content: vec![support::harness::call(
                "c1",
                "run_command",
                json!({"command": "true"}),
            )],
            stop: tiny_backspace::agent::StopReason::ToolUse,
            usage: tiny_backspace::agent::TokenUsage {
                input_tokens: 1,
                output_tokens: 1,
            },
        })
    }
}

/// The database goes away mid-job: nothing is shown that was not stored, the job is stopped, and
/// once the database is back its `Error` and one `Done` are stored and shown.
async fn a_job_whose_database_goes_away_ends_once_it_is_back(backend: Backend) {
    use std::sync::atomic::Ordering;
    let db = TestDb::new(backend).await;
    let flaky = Arc::new(Flaky {
        inner: db.open().await,
        failing: false.into(),
        refused_done: false.into(),
    });
    let model = Arc::new(Gated {
        go: tokio::sync::Notify::new(),
        calls: 0.into(),
    });
    let harness = Harness::new(HarnessOptions {
        agents: vec![model.clone()],
        store: Some(flaky.clone()),
        limits: tiny_backspace::job::Limits {
            store_grace: Duration::from_secs(2),
            ..tiny_backspace::job::Limits::default()
        },
        ..HarnessOptions::default()
    })
    .await;
    let repo = repo_with(&[("a.txt", "a\n")]);
    let job = harness.submit(repo.path(), "x").await;
    let mut follow = Box::pin(job.log().follow(0));
    let mut seen = Vec::new();
    while let Some(item) = futures::StreamExt::next(&mut follow).await {
        let agent = matches!(
            &item.event.kind,
            tiny_backspace::event::EventKind::Status {
                step: tiny_backspace::event::Step::Agent,
                ..
            }
        );
        seen.push(item);
        if agent {
            break;
        }
    }
    flaky.failing.store(true, Ordering::SeqCst);
    model.go.notify_one();
    eventually(
        "the job ends while its database is gone",
        Duration::from_secs(60),
        || {
            let refused = flaky.refused_done.load(Ordering::SeqCst);
            async move { refused }
        },
    )
    .await;
    // Nothing reached a follower meanwhile.
    let pending = tokio::time::timeout(
        Duration::from_millis(200),
        futures::StreamExt::next(&mut follow),
    )
    .await;
    assert!(pending.is_err(), "an event was shown before it was stored");
    flaky.failing.store(false, Ordering::SeqCst);
    while let Some(item) = futures::StreamExt::next(&mut follow).await {
        seen.push(item);
    }
    let seqs: Vec<u64> = seen.iter().map(|s| s.seq).collect();
    assert_eq!(seqs, (1..=seen.len() as u64).collect::<Vec<_>>());
    let done = serde_json::to_value(&seen.last().unwrap().event).unwrap();
    assert_eq!(
        (&done["type"], &done["status"], &done["error"]["code"]),
        (
            &json!("Done"),
            &json!("failed"),
            &json!("store_unavailable")
        )
    );
    assert_eq!(seen.iter().filter(|s| s.event.kind.is_done()).count(), 1);
    let record = harness.registry.job(job.id()).await.unwrap().unwrap();
    assert_eq!(record.last_seq, seen.len() as u64);
    assert_eq!(harness.live_workspaces(), 0);
}
