//! A fake E2B: the control plane and envd on ONE port, in process, following
//! `shared/reference/e2b.md` to the byte.
//!
//! - Requests carrying `E2b-Sandbox-Id` go to that sandbox's envd (as the official SDK sends them
//!   when `E2B_SANDBOX_URL` points here); everything else is the control plane (`X-API-Key`).
//! - Commands run for real (`bash`) on this host, in a per-sandbox temporary directory standing
//!   in for `/home/user`: `/home/user/...` paths in `cwd`, `/files` and the filesystem service are
//!   mapped onto it, and `HOME` points at it.
//! - Every request is logged; `live_sandboxes` counts sandboxes not yet killed or expired.
//! - One-shot faults: create 503, a create whose answer is unreadable, a stream cut mid-command, a
//!   stream that goes silent, a request that never gets an answer, a sandbox that vanishes.
//! - Seeded random faults ([`FakeE2b::set_fault_plan`]) on the routes `e2b.create`, `e2b.kill`
//!   (`DELETE /sandboxes/{id}`), `e2b.command` (`process.Process/Start`; `CutStream` cuts the
//!   process's stream after its start event), `e2b.files` and `e2b.other`.
//! - Sandboxes ended by a `DELETE` and sandboxes that ran past their lifetime are counted apart,
//!   so a test can tell "killed by the service" from "left to expire".

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::faults::{FaultPlan, Injected, closed_response};
use tiny_backspace::retry::RetryPolicy;
use tiny_backspace::sandbox::e2b::{E2bConfig, Timing};

/// A key in the form real keys have (`e2b_` + hex), accepted by every SDK version.
pub const API_KEY: &str = "e2b_0000000000000000000000000000000000000000";
pub const ENVD_VERSION: &str = "0.6.13";
const HOME: &str = "/home/user";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct LoggedRequest {
    pub method: String,
    /// Path without the query.
    pub path: String,
    pub query: String,
    /// `E2b-Sandbox-Id`, for envd requests.
    pub sandbox_id: Option<String>,
    /// For `process.Process/Start`: the command and its arguments, space-joined.
    pub command: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl LoggedRequest {
    pub fn is_envd(&self) -> bool {
        self.sandbox_id.is_some()
    }

    /// For `process.Process/Start`: the whole start message (`process.cmd`, `args`, `envs`,
    /// `cwd`), decoded from its Connect envelope.
    pub fn start_message(&self) -> Option<Value> {
        if self.path == "/process.Process/Start" {
            decode_start(&self.body)
        } else {
            None
        }
    }
}

/// One file written through `POST /files`, as stored (gzip and multipart decoded).
#[derive(Debug, Clone)]
pub struct Upload {
    pub sandbox_id: String,
    pub path: String,
    pub content: Vec<u8>,
}

/// Faults, each used once by the first request it matches.
#[derive(Debug, Clone)]
pub enum Fault {
    /// The next `n` creates answer 503 (with `Retry-After: 0`).
    CreateUnavailable(usize),
    /// The next create starts a sandbox but its 201 answer breaks off mid-JSON, so the client
    /// never learns the id. With `idempotent: false` the fake forgets that create's
    /// `Idempotency-Key`, as a server that does not deduplicate would: a repeat starts another.
    CreateUnreadable { idempotent: bool },
    /// The next `process.Process/Start` whose command contains `pattern` starts the process,
    /// sends the start event, then the connection drops mid-body.
    /// The process keeps running, as envd's do when a client goes away.
    CutStream { pattern: String },
    /// The next `process.Process/Start` whose command contains `pattern` sends the start
    /// event, then nothing at all (no output, no keepalive) while the connection stays open.
    Stall { pattern: String },
    /// The next request to `path` (for `process.Process/Start`: whose command contains
    /// `pattern`, when given) never gets an answer.
    Hang {
        path: String,
        pattern: Option<String>,
    },
    /// At the next `process.Process/Start` whose command contains `pattern`, the sandbox
    /// vanishes (as if E2B reaped it): that request and all later ones see 502 "not found".
    Gone { pattern: String },
}

struct FakeSandbox {
    id: String,
    token: String,
    template: String,
    /// The create's `metadata`, which `GET /v2/sandboxes?metadata=` filters on.
    metadata: HashMap<String, String>,
    root: tempfile::TempDir,
    envs: HashMap<String, String>,
    started_at: SystemTime,
    expires_at: Mutex<Instant>,
    /// pid → process group of running processes.
    running: Mutex<HashMap<u32, i32>>,
}

impl FakeSandbox {
    fn kill_processes(&self) {
        for (_, pgid) in self.running.lock().unwrap().drain() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }

    /// Maps a sandbox path onto the temporary home. `None` for paths outside `/home/user`.
    fn map(&self, path: &str) -> Option<PathBuf> {
        let root = self.root.path();
        let rest = if path == HOME || path == "~" {
            ""
        } else if let Some(rest) = path.strip_prefix("/home/user/") {
            rest
        } else if let Some(rest) = path.strip_prefix("~/") {
            rest
        } else if path.starts_with('/') {
            return None;
        } else {
            path
        };
        Some(root.join(rest))
    }
}

#[derive(Default)]
struct Inner {
    sandboxes: Mutex<HashMap<String, Arc<FakeSandbox>>>,
    log: Mutex<Vec<LoggedRequest>>,
    faults: Mutex<Vec<Fault>>,
    idempotency: Mutex<HashMap<String, String>>,
    next_id: AtomicU64,
    created: AtomicU64,
    uploads: Mutex<Vec<Upload>>,
    /// Sandboxes removed by a `DELETE`.
    killed: AtomicU64,
    /// Sandboxes removed because they ran past their lifetime.
    expired: AtomicU64,
    plan: Mutex<Option<Arc<FaultPlan>>>,
    /// Keep requests and uploads for the accessors (on unless turned off for long runs).
    quiet: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn sandbox(&self, id: &str) -> Option<Arc<FakeSandbox>> {
        self.sandboxes.lock().unwrap().get(id).cloned()
    }

    fn remove(&self, id: &str) -> bool {
        let removed = self.sandboxes.lock().unwrap().remove(id);
        match removed {
            Some(sandbox) => {
                sandbox.kill_processes();
                true
            }
            None => false,
        }
    }

    /// Takes the first fault `matches` accepts.
    fn take_fault(&self, matches: impl Fn(&Fault) -> bool) -> Option<Fault> {
        let mut faults = self.faults.lock().unwrap();
        let index = faults.iter().position(matches)?;
        let fault = faults[index].clone();
        if let Fault::CreateUnavailable(n) = &mut faults[index]
            && *n > 1
        {
            *n -= 1;
            return Some(fault);
        }
        faults.remove(index);
        Some(fault)
    }
}

pub struct FakeE2b {
    addr: std::net::SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
    reaper: tokio::task::JoinHandle<()>,
}

impl Drop for FakeE2b {
    fn drop(&mut self) {
        self.task.abort();
        self.reaper.abort();
        for (_, sandbox) in self.inner.sandboxes.lock().unwrap().drain() {
            sandbox.kill_processes();
        }
    }
}

impl FakeE2b {
    pub async fn start() -> FakeE2b {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Inner::default());
        let app = Router::new().fallback(handle).with_state(inner.clone());
        // No Nagle: small frames (start, keepalive, end) go out at once, as from a real server.
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let reaper = tokio::spawn(reap(Arc::downgrade(&inner)));
        FakeE2b {
            addr,
            inner,
            task,
            reaper,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The variables the official SDK (and our config) need to use this fake for both planes.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("E2B_API_KEY".into(), API_KEY.into()),
            ("E2B_API_URL".into(), self.url()),
            ("E2B_SANDBOX_URL".into(), self.url()),
        ]
    }

    /// Our backend's configuration for this fake, with test-sized timeouts.
    pub fn config(&self) -> E2bConfig {
        let env = self.env();
        let mut config = E2bConfig::from_lookup(|name| {
            env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
        .unwrap();
        config.timing = Timing {
            request_timeout: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(3),
            keepalive_interval: Duration::from_secs(1),
            retry: RetryPolicy {
                max_retries: 3,
                initial_backoff: Duration::from_millis(20),
                ..tiny_backspace::sandbox::e2b::default_retry()
            },
            connect_timeout: Duration::from_secs(2),
        };
        config
    }

    pub fn inject(&self, fault: Fault) {
        self.inner.faults.lock().unwrap().push(fault);
    }

    pub fn requests(&self) -> Vec<LoggedRequest> {
        self.inner.log.lock().unwrap().clone()
    }

    /// Every file written into any sandbox through `POST /files`, decoded.
    pub fn uploads(&self) -> Vec<Upload> {
        self.inner.uploads.lock().unwrap().clone()
    }

    pub fn request_count(&self) -> usize {
        self.inner.log.lock().unwrap().len()
    }

    /// Sandboxes created and neither killed nor expired.
    pub fn live_sandboxes(&self) -> usize {
        self.inner.sandboxes.lock().unwrap().len()
    }

    /// Sandboxes ended by a `DELETE` (the service killing them).
    pub fn killed_sandboxes(&self) -> u64 {
        self.inner.killed.load(Ordering::SeqCst)
    }

    /// Sandboxes ended because they ran past their lifetime (nobody killed them).
    pub fn expired_sandboxes(&self) -> u64 {
        self.inner.expired.load(Ordering::SeqCst)
    }

    /// Seeded random faults on every later request (see [`FaultPlan`]).
    pub fn set_fault_plan(&self, plan: Arc<FaultPlan>) {
        *self.inner.plan.lock().unwrap() = Some(plan);
    }

    /// Whether requests and uploads are kept for the accessors (default on; off for long runs).
    pub fn set_recording(&self, record: bool) {
        self.inner.quiet.store(!record, Ordering::SeqCst);
    }

    /// Sandboxes ever created.
    pub fn created_sandboxes(&self) -> u64 {
        self.inner.created.load(Ordering::SeqCst)
    }

    /// The directory standing in for a sandbox's `/home/user`.
    pub fn home_of(&self, sandbox_id: &str) -> Option<PathBuf> {
        self.inner
            .sandbox(sandbox_id)
            .map(|s| s.root.path().to_path_buf())
    }

    /// Removes a sandbox as if E2B had reaped it.
    pub fn vanish(&self, sandbox_id: &str) -> bool {
        self.inner.remove(sandbox_id)
    }

    /// Seconds left before the sandbox expires.
    pub fn ttl_left(&self, sandbox_id: &str) -> Option<Duration> {
        self.inner.sandbox(sandbox_id).map(|s| {
            s.expires_at
                .lock()
                .unwrap()
                .saturating_duration_since(Instant::now())
        })
    }
}

/// Ends sandboxes past their lifetime, as E2B does.
async fn reap(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<String> = inner
            .sandboxes
            .lock()
            .unwrap()
            .values()
            .filter(|s| *s.expires_at.lock().unwrap() <= now)
            .map(|s| s.id.clone())
            .collect();
        for id in expired {
            if inner.remove(&id) {
                inner.expired.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

fn json_reply(status: u16, body: Value) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The control plane's error shape.
fn api_error(status: u16, message: &str) -> Response {
    json_reply(status, json!({"code": status, "message": message}))
}

/// A Connect unary error.
fn connect_error(status: u16, code: &str, message: &str) -> Response {
    json_reply(status, json!({"code": code, "message": message}))
}

fn not_found_sandbox(id: &str) -> Response {
    // What E2B's edge answers for an unknown or killed sandbox.
    json_reply(
        502,
        json!({"sandboxId": id, "message": "The sandbox was not found", "code": 502}),
    )
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match axum::body::to_bytes(body, 512 * 1024 * 1024).await {
        Ok(body) => body,
        Err(_) => return api_error(400, "unreadable body"),
    };
    let sandbox_id = parts
        .headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let start = if path == "/process.Process/Start" {
        decode_start(&body)
    } else {
        None
    };
    let command = start.as_ref().map(|s| {
        std::iter::once(s["process"]["cmd"].as_str().unwrap_or(""))
            .chain(
                s["process"]["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str),
            )
            .collect::<Vec<_>>()
            .join(" ")
    });
    if !inner.quiet.load(Ordering::SeqCst) {
        inner.log.lock().unwrap().push(LoggedRequest {
            method: parts.method.to_string(),
            path: path.clone(),
            query: query.clone(),
            sandbox_id: sandbox_id.clone(),
            command: command.clone(),
            headers: parts.headers.clone(),
            body: body.clone(),
        });
    }
    let plan = inner.plan.lock().unwrap().clone();
    let random = match plan {
        Some(plan) => {
            let draw = plan.draw(route_name(&parts.method, &path, sandbox_id.is_some()));
            if !draw.delay.is_zero() {
                tokio::time::sleep(draw.delay).await;
            }
            draw.fault
        }
        None => None,
    };
    if let Some(Injected::Status(status)) = random {
        return api_error(status, "fake: injected failure");
    }

    let hang = inner.take_fault(|f| match f {
        Fault::Hang { path: p, pattern } => {
            *p == path
                && match (pattern, &command) {
                    (None, _) => true,
                    (Some(pattern), Some(command)) => command.contains(pattern.as_str()),
                    (Some(_), None) => false,
                }
        }
        _ => false,
    });
    if hang.is_some() {
        std::future::pending::<()>().await;
    }

    let response = match sandbox_id {
        Some(id) => {
            envd(
                &inner,
                &id,
                &parts.method,
                &path,
                &query,
                &parts.headers,
                body,
                start,
                command,
                random == Some(Injected::CutStream),
            )
            .await
        }
        None => control_plane(&inner, &parts.method, &path, &query, &parts.headers, &body),
    };
    match random {
        Some(Injected::StatusAfter(status)) => api_error(status, "fake: injected failure"),
        Some(Injected::CloseAfter) => closed_response(),
        Some(Injected::Status(_) | Injected::CutStream) | None => response,
    }
}

/// The fault-plan route a request belongs to.
fn route_name(method: &Method, path: &str, envd: bool) -> &'static str {
    match (envd, method.as_str(), path) {
        (false, "POST", "/v2/sandboxes" | "/sandboxes") => "e2b.create",
        (false, "DELETE", _) => "e2b.kill",
        (true, "POST", "/process.Process/Start") => "e2b.command",
        (true, _, "/files") => "e2b.files",
        _ => "e2b.other",
    }
}

// ---------------------------------------------------------------- control plane

fn control_plane(
    inner: &Arc<Inner>,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if key != Some(API_KEY) {
        return api_error(401, "Invalid API key, it must start with 'e2b_' prefix");
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v2", "sandboxes"]) => create(inner, headers, body, 300),
        ("POST", ["sandboxes"]) => create(inner, headers, body, 15),
        ("GET", ["v2", "sandboxes"]) | ("GET", ["sandboxes"]) => {
            // `metadata` is itself a URL-encoded `k=v&...`, each key and value percent-encoded
            // first (the SDK's `urlencode({quote(k): quote(v)})`).
            let wanted: Vec<(String, String)> = query_param(query, "metadata")
                .map(|m| {
                    url::form_urlencoded::parse(m.as_bytes())
                        .map(|(k, v)| (percent_decode(&k), percent_decode(&v)))
                        .collect()
                })
                .unwrap_or_default();
            let mut list: Vec<(SystemTime, Value)> = inner
                .sandboxes
                .lock()
                .unwrap()
                .values()
                .filter(|s| {
                    wanted
                        .iter()
                        .all(|(k, v)| s.metadata.get(k).is_some_and(|have| have == v))
                })
                .map(|s| (s.started_at, detail(s)))
                .collect();
            list.sort_by_key(|(started, _)| *started);
            json_reply(
                200,
                Value::Array(list.into_iter().map(|(_, v)| v).collect()),
            )
        }
        ("GET", ["sandboxes", id]) => match inner.sandbox(id) {
            Some(sandbox) => json_reply(200, detail(&sandbox)),
            None => sandbox_missing(id),
        },
        ("DELETE", ["sandboxes", id]) => {
            if inner.remove(id) {
                inner.killed.fetch_add(1, Ordering::SeqCst);
                StatusCode::NO_CONTENT.into_response()
            } else {
                sandbox_missing(id)
            }
        }
        ("POST", ["sandboxes", id, "timeout"]) => {
            let Ok(body) = serde_json::from_slice::<Value>(body) else {
                return api_error(400, "invalid body");
            };
            let timeout = body["timeout"].as_i64().unwrap_or(0);
            if timeout <= 0 {
                return api_error(400, "Timeout must be greater than 0");
            }
            match inner.sandbox(id) {
                Some(sandbox) => {
                    *sandbox.expires_at.lock().unwrap() =
                        Instant::now() + Duration::from_secs(timeout as u64);
                    StatusCode::NO_CONTENT.into_response()
                }
                None => sandbox_missing(id),
            }
        }
        _ => api_error(404, "not found"),
    }
}

fn sandbox_missing(id: &str) -> Response {
    api_error(
        404,
        &format!("Sandbox \"{id}\" doesn't exist or you don't have access to it"),
    )
}

fn create(inner: &Arc<Inner>, headers: &HeaderMap, body: &[u8], default_timeout: i64) -> Response {
    let unreadable = match inner.take_fault(|f| matches!(f, Fault::CreateUnreadable { .. })) {
        Some(Fault::CreateUnreadable { idempotent }) => Some(idempotent),
        _ => None,
    };
    if unreadable.is_none()
        && inner
            .take_fault(|f| matches!(f, Fault::CreateUnavailable(_)))
            .is_some()
    {
        let mut reply = api_error(503, "Sandbox capacity is unavailable, try again later");
        reply
            .headers_mut()
            .insert("retry-after", HeaderValue::from_static("0"));
        return reply;
    }
    let Ok(body) = serde_json::from_slice::<Value>(body) else {
        return api_error(400, "invalid request body");
    };
    let Some(template) = body["templateID"].as_str() else {
        return api_error(400, "templateID is required");
    };
    if template == "missing" {
        return api_error(404, &format!("template '{template}' not found"));
    }
    let timeout = body["timeout"].as_i64().unwrap_or(default_timeout);
    if timeout <= 0 {
        return api_error(400, "Timeout must be greater than 0");
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if let Some(key) = &key
        && let Some(id) = inner.idempotency.lock().unwrap().get(key).cloned()
        && let Some(sandbox) = inner.sandbox(&id)
    {
        return json_reply(201, created_body(&sandbox));
    }
    let n = inner.next_id.fetch_add(1, Ordering::SeqCst);
    let id = format!("ifake{n:015x}");
    let metadata = body["metadata"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let envs = body["envVars"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let sandbox = Arc::new(FakeSandbox {
        id: id.clone(),
        token: format!("tok{}", uuid::Uuid::new_v4().simple()),
        template: template.to_owned(),
        metadata,
        root: tempfile::tempdir().unwrap(),
        envs,
        started_at: SystemTime::now(),
        expires_at: Mutex::new(Instant::now() + Duration::from_secs(timeout as u64)),
        running: Mutex::new(HashMap::new()),
    });
    inner
        .sandboxes
        .lock()
        .unwrap()
        .insert(id.clone(), sandbox.clone());
    inner.created.fetch_add(1, Ordering::SeqCst);
    if let Some(key) = key
        && unreadable != Some(false)
    {
        inner.idempotency.lock().unwrap().insert(key, id);
    }
    if unreadable.is_some() {
        let full = created_body(&sandbox).to_string();
        return (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            full[..full.len() / 2].to_owned(),
        )
            .into_response();
    }
    json_reply(201, created_body(&sandbox))
}

fn created_body(sandbox: &FakeSandbox) -> Value {
    json!({
        "templateID": "rki5dems9wqfm4r03t7g",
        "sandboxID": sandbox.id,
        "alias": sandbox.template,
        "clientID": "6532622b",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox.token,
        "trafficAccessToken": null,
        "domain": null,
    })
}

fn detail(sandbox: &FakeSandbox) -> Value {
    let left = sandbox
        .expires_at
        .lock()
        .unwrap()
        .saturating_duration_since(Instant::now());
    json!({
        "templateID": "rki5dems9wqfm4r03t7g",
        "alias": sandbox.template,
        "sandboxID": sandbox.id,
        "clientID": "6532622b",
        "startedAt": rfc3339(sandbox.started_at),
        "endAt": rfc3339(SystemTime::now() + left),
        "cpuCount": 2,
        "memoryMB": 512,
        "diskSizeMB": 10240,
        "metadata": sandbox.metadata,
        "state": "running",
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sandbox.token,
    })
}

/// RFC 3339 in UTC, from the civil-from-days algorithm.
fn rfc3339(time: SystemTime) -> String {
    let secs = time.duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

// ---------------------------------------------------------------- envd

#[allow(clippy::too_many_arguments)]
async fn envd(
    inner: &Arc<Inner>,
    id: &str,
    method: &Method,
    path: &str,
    query: &str,
    headers: &HeaderMap,
    body: Bytes,
    start: Option<Value>,
    command: Option<String>,
    cut: bool,
) -> Response {
    if let Some(command) = &command
        && inner
            .take_fault(
                |f| matches!(f, Fault::Gone { pattern } if command.contains(pattern.as_str())),
            )
            .is_some()
    {
        inner.remove(id);
    }
    let Some(sandbox) = inner.sandbox(id) else {
        return not_found_sandbox(id);
    };
    if (method, path) == (&Method::GET, "/health") {
        return StatusCode::NO_CONTENT.into_response();
    }
    let token = headers.get("x-access-token").and_then(|v| v.to_str().ok());
    if token != Some(sandbox.token.as_str()) {
        return json_reply(
            401,
            json!({"code": 401, "message": "unauthorized access, please provide a valid access token or method signing if supported"}),
        );
    }
    match (method.as_str(), path) {
        ("POST", "/process.Process/Start") => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            if !content_type.starts_with("application/connect+json") {
                return connect_error(415, "unknown", "expected application/connect+json");
            }
            let Some(start) = start else {
                return connect_error(400, "invalid_argument", "unreadable request envelope");
            };
            let stream_fault = command
                .as_ref()
                .and_then(|command| {
                    inner.take_fault(|f| match f {
                        Fault::CutStream { pattern } | Fault::Stall { pattern } => {
                            command.contains(pattern.as_str())
                        }
                        _ => false,
                    })
                })
                .or_else(|| {
                    cut.then(|| Fault::CutStream {
                        pattern: String::new(),
                    })
                });
            start_process(sandbox, headers, start, stream_fault)
        }
        ("POST", "/process.Process/SendSignal") => {
            let Ok(message) = serde_json::from_slice::<Value>(&body) else {
                return connect_error(400, "invalid_argument", "invalid JSON");
            };
            let pid = message["process"]["pid"].as_u64().unwrap_or(0) as u32;
            let pgid = sandbox.running.lock().unwrap().get(&pid).copied();
            match pgid {
                Some(pgid) => {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    json_reply(200, json!({}))
                }
                None => connect_error(
                    404,
                    "not_found",
                    &format!("process with pid {pid} not found"),
                ),
            }
        }
        ("POST", "/filesystem.Filesystem/ListDir") => {
            let Ok(message) = serde_json::from_slice::<Value>(&body) else {
                return connect_error(400, "invalid_argument", "invalid JSON");
            };
            let requested = message["path"].as_str().unwrap_or("").to_owned();
            let depth = message["depth"].as_u64().unwrap_or(1).max(1) as u32;
            list_dir(&sandbox, &requested, depth)
        }
        ("POST", "/filesystem.Filesystem/Stat") => {
            let Ok(message) = serde_json::from_slice::<Value>(&body) else {
                return connect_error(400, "invalid_argument", "invalid JSON");
            };
            let requested = message["path"].as_str().unwrap_or("").to_owned();
            match sandbox
                .map(&requested)
                .filter(|p| p.symlink_metadata().is_ok())
            {
                Some(real) => json_reply(200, json!({"entry": entry_info(&real, &requested)})),
                None => connect_error(
                    404,
                    "not_found",
                    &format!("path '{requested}' does not exist"),
                ),
            }
        }
        ("GET", "/files") => get_file(&sandbox, query, headers),
        ("POST", "/files") => post_file(inner, &sandbox, query, headers, &body),
        _ => connect_error(404, "unimplemented", "not implemented by the fake"),
    }
}

fn decode_start(body: &[u8]) -> Option<Value> {
    if body.len() < 5 || body[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    serde_json::from_slice(body.get(5..5 + len)?).ok()
}

fn envelope(flags: u8, message: &Value) -> Bytes {
    let payload = message.to_string().into_bytes();
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(flags);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Bytes::from(out)
}

fn event(event: Value) -> Bytes {
    envelope(0, &json!({ "event": event }))
}

type Frame = Result<Bytes, std::io::Error>;

fn stream_reply(rx: mpsc::Receiver<Frame>) -> Response {
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/connect+json")],
        body,
    )
        .into_response()
}

/// Answers a Start with an end-of-stream error only (as envd does for a bad cwd).
fn end_stream_error(code: &str, message: &str) -> Response {
    let (tx, rx) = mpsc::channel(1);
    let _ = tx.try_send(Ok(envelope(
        2,
        &json!({"error": {"code": code, "message": message}}),
    )));
    stream_reply(rx)
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<f64> {
    headers
        .get(name)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
}

fn start_process(
    sandbox: Arc<FakeSandbox>,
    headers: &HeaderMap,
    start: Value,
    fault: Option<Fault>,
) -> Response {
    let process = &start["process"];
    let cmd = process["cmd"].as_str().unwrap_or("").to_owned();
    let args: Vec<String> = process["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let cwd_raw = process["cwd"].as_str().unwrap_or(HOME).to_owned();
    let cwd = match sandbox.map(&cwd_raw) {
        Some(cwd) if cwd.is_dir() => cwd,
        _ => {
            return end_stream_error(
                "invalid_argument",
                &format!("cwd '{cwd_raw}' does not exist"),
            );
        }
    };
    let deadline = header_number(headers, "connect-timeout-ms")
        .map(|ms| Instant::now() + Duration::from_secs_f64(ms / 1000.0));
    let keepalive = header_number(headers, "keepalive-ping-interval")
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(90));

    let mut command = tokio::process::Command::new(&cmd);
    command
        .args(&args)
        .current_dir(&cwd)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", sandbox.root.path())
        .env("USER", "user")
        .env("LOGNAME", "user")
        .envs(&sandbox.envs)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(envs) = process["envs"].as_object() {
        command.envs(
            envs.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))),
        );
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return end_stream_error("internal", &format!("error starting process: {e}")),
    };
    let pid = child.id().unwrap_or(0);
    sandbox.running.lock().unwrap().insert(pid, pid as i32);

    let (tx, rx) = mpsc::channel::<Frame>(64);
    let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        let _ = tx.send(Ok(event(json!({"start": {"pid": pid}})))).await;
        let (data_tx, mut data_rx) = mpsc::channel::<(&'static str, Vec<u8>)>(16);
        for (name, pipe) in [
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            ),
        ] {
            let Some(mut pipe) = pipe else { continue };
            let data_tx = data_tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                while let Ok(n) = pipe.read(&mut buf).await {
                    if n == 0 || data_tx.send((name, buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(data_tx);
        let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
        let deadline_at = deadline.unwrap_or(far);
        let mut keepalive_at = Instant::now() + keepalive;
        let mut status = None;
        let mut timed_out = false;
        let mut pipes_closed = false;
        while !(pipes_closed && status.is_some()) {
            tokio::select! {
                data = data_rx.recv(), if !pipes_closed => match data {
                    Some((name, bytes)) => {
                        // A client that went away does not stop the process.
                        let _ = tx.send(Ok(event(json!({"data": {name: B64.encode(bytes)}})))).await;
                        keepalive_at = Instant::now() + keepalive;
                    }
                    None => pipes_closed = true,
                },
                exited = child.wait(), if status.is_none() => {
                    status = Some(exited.ok());
                    // Whatever the command left behind goes too, so the pipes close.
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                _ = tokio::time::sleep_until(keepalive_at) => {
                    let _ = tx.send(Ok(event(json!({"keepalive": {}})))).await;
                    keepalive_at = Instant::now() + keepalive;
                }
                _ = tokio::time::sleep_until(deadline_at), if !timed_out => {
                    timed_out = true;
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        sandbox.running.lock().unwrap().remove(&pid);
        if timed_out {
            let _ = tx
                .send(Ok(envelope(
                    2,
                    &json!({"error": {"code": "deadline_exceeded", "message": "context deadline exceeded"}}),
                )))
                .await;
            return;
        }
        use std::os::unix::process::ExitStatusExt;
        let end = match status.flatten() {
            Some(status) => match (status.code(), status.signal()) {
                (Some(0), _) => json!({"exited": true, "status": "exit status 0"}),
                (Some(code), _) => json!({
                    "exitCode": code, "exited": true,
                    "status": format!("exit status {code}"), "error": format!("exit status {code}"),
                }),
                (None, signal) => {
                    let name = match signal {
                        Some(9) => "killed",
                        Some(15) => "terminated",
                        _ => "aborted",
                    };
                    json!({"exitCode": -1, "status": format!("signal: {name}"), "error": format!("signal: {name}")})
                }
            },
            None => json!({"exitCode": -1, "status": "unknown", "error": "wait failed"}),
        };
        let _ = tx.send(Ok(event(json!({"end": end})))).await;
        let _ = tx.send(Ok(envelope(2, &json!({})))).await;
    });

    // The response forwards the process's frames. A cut stream forwards the start event only,
    // then fails, which aborts the connection mid-body; a stalled one goes silent instead.
    let mut rx = rx;
    tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if out_tx.send(frame).await.is_err() {
                break;
            }
            match fault {
                Some(Fault::CutStream { .. }) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    let _ = out_tx
                        .send(Err(std::io::Error::other("fault: stream cut")))
                        .await;
                    break;
                }
                Some(Fault::Stall { .. }) => {
                    // Silent until the client gives up; the process runs on meanwhile.
                    tokio::spawn(async move { while rx.recv().await.is_some() {} });
                    out_tx.closed().await;
                    return;
                }
                _ => {}
            }
        }
        // Keep draining so the process is never blocked on a full channel.
        while rx.recv().await.is_some() {}
    });
    stream_reply(out_rx)
}

fn entry_info(real: &Path, requested: &str) -> Value {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = real.symlink_metadata();
    let name = Path::new(requested)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let Ok(meta) = meta else {
        return json!({"name": name, "path": requested});
    };
    let kind = if meta.file_type().is_symlink() {
        "FILE_TYPE_SYMLINK"
    } else if meta.is_dir() {
        "FILE_TYPE_DIRECTORY"
    } else {
        "FILE_TYPE_FILE"
    };
    let mode = meta.permissions().mode();
    let mut entry = json!({
        "name": name,
        "type": kind,
        "path": requested,
        "size": meta.size().to_string(),
        "mode": mode & 0o7777,
        "permissions": permissions(mode, meta.is_dir()),
        "owner": "user",
        "group": "user",
        "modifiedTime": rfc3339(meta.modified().unwrap_or(UNIX_EPOCH)),
    });
    if meta.file_type().is_symlink()
        && let Ok(target) = std::fs::read_link(real)
    {
        entry["symlinkTarget"] = json!(target.to_string_lossy());
    }
    entry
}

fn permissions(mode: u32, dir: bool) -> String {
    let mut out = String::from(if dir { "d" } else { "-" });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

fn list_dir(sandbox: &FakeSandbox, requested: &str, depth: u32) -> Response {
    let Some(real) = sandbox.map(requested) else {
        return connect_error(
            404,
            "not_found",
            &format!("path '{requested}' does not exist"),
        );
    };
    match std::fs::metadata(&real) {
        Err(_) => {
            return connect_error(
                404,
                "not_found",
                &format!("path '{requested}' does not exist"),
            );
        }
        Ok(meta) if !meta.is_dir() => {
            return connect_error(
                400,
                "invalid_argument",
                &format!("path '{requested}' is not a directory"),
            );
        }
        Ok(_) => {}
    }
    let mut entries = Vec::new();
    let mut stack = vec![(real, requested.trim_end_matches('/').to_owned(), 1u32)];
    while let Some((dir, shown, level)) = stack.pop() {
        let Ok(read) = std::fs::read_dir(&dir) else {
            continue;
        };
        for item in read.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let child_shown = format!("{shown}/{name}");
            let child_real = item.path();
            entries.push(entry_info(&child_real, &child_shown));
            let is_dir = item.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if is_dir && level < depth {
                stack.push((child_real, child_shown, level + 1));
            }
        }
    }
    json_reply(200, json!({ "entries": entries }))
}

/// Decodes `%XX` escapes (and nothing else: `+` stays).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn get_file(sandbox: &FakeSandbox, query: &str, headers: &HeaderMap) -> Response {
    let Some(requested) = query_param(query, "path") else {
        return api_error(400, "path is required");
    };
    let Some(real) = sandbox.map(&requested) else {
        return api_error(404, &format!("path '{requested}' does not exist"));
    };
    if real.is_dir() {
        return api_error(400, &format!("path '{requested}' is a directory"));
    }
    let Ok(bytes) = std::fs::read(&real) else {
        return api_error(404, &format!("path '{requested}' does not exist"));
    };
    let gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("gzip"));
    let name = real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut response = if gzip {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&bytes).unwrap();
        let mut response = Response::new(Body::from(encoder.finish().unwrap()));
        response
            .headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        response
    } else {
        Response::new(Body::from(bytes))
    };
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Ok(value) = HeaderValue::from_str(&format!("inline; filename={name}")) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

fn post_file(
    inner: &Inner,
    sandbox: &FakeSandbox,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let query_path = query_param(query, "path");
    let mut uploads: Vec<(String, Vec<u8>)> = Vec::new();
    if let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| {
            rest.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
    {
        let boundary = boundary.trim_matches('"');
        for (filename, content) in multipart_files(body, boundary) {
            match query_path.clone().or(filename) {
                Some(path) => uploads.push((path, content)),
                None => return api_error(400, "a file part needs a filename or ?path="),
            }
        }
        if uploads.is_empty() {
            return api_error(400, "no part named `file`");
        }
    } else if content_type.starts_with("application/octet-stream") {
        let Some(path) = query_path else {
            return api_error(400, "path is required for octet-stream uploads");
        };
        let gzip = headers
            .get(header::CONTENT_ENCODING)
            .is_some_and(|v| v.as_bytes() == b"gzip");
        let content = if gzip {
            let mut out = Vec::new();
            if flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .is_err()
            {
                return api_error(400, "invalid gzip body");
            }
            out
        } else {
            body.to_vec()
        };
        uploads.push((path, content));
    } else {
        return api_error(400, "unsupported content type");
    }
    let mut written = Vec::new();
    for (path, content) in uploads {
        let Some(real) = sandbox.map(&path) else {
            return api_error(400, &format!("path '{path}' is outside the fake's home"));
        };
        if real.is_dir() {
            return api_error(400, &format!("path '{path}' is a directory"));
        }
        if let Some(parent) = real.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&real, &content).unwrap();
        if !inner.quiet.load(Ordering::SeqCst) {
            inner.uploads.lock().unwrap().push(Upload {
                sandbox_id: sandbox.id.clone(),
                path: path.clone(),
                content,
            });
        }
        let name = real
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let shown = if path.starts_with('/') {
            path.clone()
        } else {
            format!("{HOME}/{path}")
        };
        written.push(json!({"path": shown, "name": name, "type": "file"}));
    }
    json_reply(200, Value::Array(written))
}

/// The `file` parts of a multipart body: (filename, content).
fn multipart_files(body: &[u8], boundary: &str) -> Vec<(Option<String>, Vec<u8>)> {
    let delimiter = format!("--{boundary}").into_bytes();
    let mut out = Vec::new();
    let mut positions = Vec::new();
    let mut i = 0;
    while i + delimiter.len() <= body.len() {
        if body[i..].starts_with(&delimiter) {
            positions.push(i);
            i += delimiter.len();
        } else {
            i += 1;
        }
    }
    for pair in positions.windows(2) {
        let part = &body[pair[0] + delimiter.len()..pair[1]];
        let part = part.strip_prefix(b"\r\n").unwrap_or(part);
        let part = part.strip_suffix(b"\r\n").unwrap_or(part);
        let Some(split) = part.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&part[..split]).into_owned();
        let content = part[split + 4..].to_vec();
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition:"))
            .unwrap_or("");
        if !disposition.contains("name=\"file\"") {
            continue;
        }
        let filename = disposition
            .split(';')
            .find_map(|p| p.trim().strip_prefix("filename="))
            .map(|f| f.trim_matches('"').to_owned());
        out.push((filename, content));
    }
    out
}
