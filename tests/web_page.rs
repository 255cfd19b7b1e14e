//! The web page end to end: a real `tiny-backspace serve` on loopback (local sandbox, API keys,
//! local repositories allowed) and headless Chromium driven by playwright-core
//! (`tests/e2e/page.mjs`): submit the form and watch the steps arrive, survive a network drop
//! and a reload mid-job without showing an event twice, see the diff and the final state, and
//! cancel a job from the page. Screenshots are left in `target/e2e/`.
//!
//! Jobs are held in their agent step by a model server that answers only when the browser test
//! releases it (and then refuses, so the dummy agent finishes the job): the page is checked
//! while a job really is running, without any timing assumption.
//!
//! Needs Node.js, `tests/e2e/node_modules` (`scripts/setup-e2e.sh`) and Chromium
//! (`/usr/bin/chromium`, or `CHROMIUM`); without them this test fails, it does not skip.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, extract::State};
use serde_json::json;
use support::harness::{git, repo_with};
use tokio::io::{AsyncBufReadExt, BufReader};

const API_KEY: &str = "e2e-page-key-5b9d2c7e41";
const MODEL_KEY: &str = "sk-e2e-gate-canary-0123456789";

/// A model endpoint that holds each request until `POST /release`, then answers 401 (an
/// OpenAI-shaped "invalid API key"), which makes the provider chain fall back at once.
#[derive(Clone)]
struct Gate {
    released: Arc<tokio::sync::watch::Sender<u64>>,
    waiting: Arc<AtomicUsize>,
}

async fn held(State(gate): State<Gate>) -> (StatusCode, Json<serde_json::Value>) {
    let mut released = gate.released.subscribe();
    let arrived = *released.borrow();
    gate.waiting.fetch_add(1, Ordering::SeqCst);
    let _ = released.wait_for(|generation| *generation > arrived).await;
    gate.waiting.fetch_sub(1, Ordering::SeqCst);
    (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": null,
            "code": "invalid_api_key"
        }})),
    )
}

async fn release(State(gate): State<Gate>) -> Json<serde_json::Value> {
    let waiting = gate.waiting.load(Ordering::SeqCst);
    gate.released.send_modify(|generation| *generation += 1);
    Json(json!({ "released": waiting }))
}

async fn start_gate() -> String {
    let gate = Gate {
        released: Arc::new(tokio::sync::watch::channel(0).0),
        waiting: Arc::new(AtomicUsize::new(0)),
    };
    let app = Router::new()
        .route("/release", post(release))
        .fallback(held)
        .with_state(gate);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/e2e`, next to the build's other output.
fn screenshots_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("e2e")
}

/// What the browser test needs, or a failure that says how to get it.
fn prerequisites() -> PathBuf {
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "the web page test needs Node.js 20+ on PATH (apt-get install nodejs): {node:?}"
    );
    let playwright = manifest_dir().join("tests/e2e/node_modules/playwright-core/package.json");
    assert!(
        playwright.exists(),
        "the web page test needs playwright-core: run scripts/setup-e2e.sh"
    );
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.exists(),
        "the web page test needs Chromium at {} (apt-get install chromium, or set CHROMIUM)",
        chromium.display()
    );
    chromium
}

struct Server {
    child: tokio::process::Child,
    url: String,
    log: Arc<Mutex<String>>,
    /// Copies the log until the server exits.
    reader: tokio::task::JoinHandle<()>,
}

/// `serve` on loopback with the local sandbox; `envs` adds the keys and agents.
async fn start_server(workspaces: &Path, envs: &[(&str, &str)]) -> Server {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tiny-backspace"))
        .arg("serve")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("ALLOW_LOCAL_REPOS", "true")
        .env("SANDBOX", "local")
        .env("WORKSPACE_DIR", workspaces)
        .env("DATABASE_URL", "sqlite::memory:")
        .envs(envs.iter().copied())
        // Request spans are logged, so the log would show a token put in a span.
        .env(
            "RUST_LOG",
            "info,tower_http=debug,tiny_backspace::http=debug",
        )
        .env("LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let log = Arc::new(Mutex::new(String::new()));
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("serve starts")
            .unwrap()
            .expect("serve logs its address");
        log.lock().unwrap().push_str(&line);
        let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        if let Some(addr) = parsed["fields"]["addr"].as_str() {
            break addr.to_owned();
        }
    };
    let sink = log.clone();
    let reader = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    Server {
        child,
        url: format!("http://{addr}"),
        log,
        reader,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_runs_follows_resumes_and_cancels_jobs_in_a_real_browser() {
    let chromium = prerequisites();
    let repo = repo_with(&[
        (
            "app.py",
            "import sys\n\nname = sys.argv[1] if len(sys.argv) > 1 else \"world\"\nprint(\"Hello \" + name)\n",
        ),
        ("README.md", "# Greeter\n\nSays hello.\n"),
    ]);
    let workspaces = tempfile::tempdir().unwrap();
    let gate = start_gate().await;
    let model_url = format!("{gate}/v1");
    let mut server = start_server(
        workspaces.path(),
        &[
            ("API_KEYS", API_KEY),
            ("AGENTS", "openai,dummy"),
            ("OPENAI_API_KEY", MODEL_KEY),
            ("OPENAI_BASE_URL", &model_url),
        ],
    )
    .await;
    let open_workspaces = tempfile::tempdir().unwrap();
    let open = start_server(open_workspaces.path(), &[("AGENTS", "dummy")]).await;
    let out = screenshots_dir();

    let run = tokio::process::Command::new("node")
        .arg(manifest_dir().join("tests/e2e/page.mjs"))
        .arg(&server.url)
        .env("E2E_API_KEY", API_KEY)
        .env("E2E_REPO", repo.path())
        .env("E2E_GATE_URL", &gate)
        .env("E2E_OUT", &out)
        .env("E2E_OPEN_URL", &open.url)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "the browser test failed ({}):\n{stdout}\n{stderr}\nserver log:\n{}",
        run.status,
        server.log.lock().unwrap()
    );
    let checks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("ok - ")).collect();
    assert_eq!(checks.len(), 10, "{stdout}");
    let result = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("result {name}=")))
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .to_owned()
    };

    // What the page showed is what happened: the branch holds the change.
    let branch = result("branch");
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:app.py")]),
        "import sys\n\nname = sys.argv[1] if len(sys.argv) > 1 else \"world\"\nprint(\"Hello, \" + name)\n"
    );
    let open_branch = result("open_branch");
    assert_eq!(
        git(repo.path(), &["show", &format!("{open_branch}:README.md")]),
        "# Greeter\n\nSays hello.\nMade with Tiny Backspace\n"
    );
    // The cancelled job ended as cancelled on the server too, and no sandbox is left.
    let client = reqwest::Client::new();
    let view: serde_json::Value = client
        .get(format!("{}/jobs/{}", server.url, result("cancelled")))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["state"], "cancelled", "{view}");
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 0);
    for shot in ["finished.png", "page.png", "phone.png", "cancelled.png"] {
        assert!(out.join(shot).is_file(), "{shot} was saved");
    }

    // Neither the key nor an events token reached the server's log.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.child.id().unwrap() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = server.child.wait().await;
    server.reader.await.unwrap();
    let log = server.log.lock().unwrap().clone();
    assert!(log.contains("/events"), "request spans are in the log");
    assert!(!log.contains(API_KEY), "the API key is in the log");
    assert!(!log.contains("token="), "an events token is in the log");
    assert!(!log.contains(MODEL_KEY));
}
