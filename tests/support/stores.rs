//! Job stores for tests (SQLite in a temporary directory, or a fresh database in the PostgreSQL
//! cluster `scripts/postgres` starts), and `serve` processes to kill and restart on them.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::Value;
use tiny_backspace::store::JobStore;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database of its own for one test.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                TestDb {
                    url: format!("sqlite://{}/jobs.db", dir.path().display()),
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                // Never skipped: scripts/test (and .ci/run) start the cluster.
                let admin = std::env::var("TEST_DATABASE_URL").expect(
                    "TEST_DATABASE_URL is not set: start PostgreSQL with `eval \"$(scripts/postgres start)\"` (scripts/test does this)",
                );
                let name = format!("t_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&admin)
                    .await
                    .expect("TEST_DATABASE_URL reachable");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let mut url = url::Url::parse(&admin).unwrap();
                url.set_path(&format!("/{name}"));
                TestDb {
                    url: url.to_string(),
                    _dir: None,
                }
            }
        }
    }

    pub async fn open(&self) -> Arc<dyn JobStore> {
        tiny_backspace::store::open(&self.url).await.unwrap()
    }
}

/// A `serve` process with its log captured.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `serve` on a free port with a clean environment plus `envs`. Waits for it on a
    /// blocking section, so fakes served by the test's runtime keep answering meanwhile (the
    /// tests run on the multi-threaded runtime).
    pub fn start(envs: &[(&str, &str)]) -> Server {
        tokio::task::block_in_place(|| Self::spawn(envs))
    }

    fn spawn(envs: &[(&str, &str)]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tiny-backspace"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", std::env::temp_dir())
            .env("PORT", "0")
            .env("LOG_FORMAT", "pretty")
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .arg("serve")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(String::new()));
        let deadline = Instant::now() + Duration::from_secs(60);
        let addr = loop {
            assert!(
                Instant::now() < deadline,
                "serve did not start: {}",
                log.lock().unwrap()
            );
            let mut line = String::new();
            if stderr.read_line(&mut line).unwrap() == 0 {
                panic!("serve exited: {}", log.lock().unwrap());
            }
            log.lock().unwrap().push_str(&line);
            if let Some(rest) = line.split("addr=").nth(1) {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        Server { child, addr, log }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// SIGKILL: nothing runs after it, no cleanup, no `Done`.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// `POST /jobs` and the new job's id.
pub async fn post_job(server: &Server, body: &Value) -> String {
    let response = client()
        .post(server.url("/jobs"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202, "{:?}", response.text().await);
    let v: Value = response.json().await.unwrap();
    v["job_id"].as_str().unwrap().to_owned()
}

/// Reads a job's SSE stream after `after`: (id, event) pairs, until `Done`, the end of the
/// stream, or `max` events.
pub async fn read_events(server: &Server, id: &str, after: u64, max: usize) -> Vec<(u64, Value)> {
    let response = client()
        .get(server.url(&format!("/jobs/{id}/events")))
        .header("last-event-id", after.to_string())
        .send()
        .await
        .unwrap();
    if response.status() == 204 {
        return Vec::new();
    }
    assert_eq!(response.status(), 200);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut events = Vec::new();
    let read = async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            while let Some(end) = text.find("\n\n") {
                let frame: String = text.drain(..end + 2).collect();
                let mut seq = None;
                let mut data = None;
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        seq = v.parse::<u64>().ok();
                    }
                    if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str::<Value>(v).ok();
                    }
                }
                if let (Some(seq), Some(data)) = (seq, data) {
                    let done = data["type"] == "Done";
                    events.push((seq, data));
                    if done || events.len() >= max {
                        return;
                    }
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .expect("events in time");
    events
}

/// Waits (boundedly) until `check` holds.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
