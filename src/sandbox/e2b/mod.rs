//! The `e2b` backend: one fresh E2B sandbox per job, driven over E2B's control-plane REST API
//! (`api.rs`) and the in-sandbox envd daemon (Connect RPC in `envd.rs`, files in `files.rs`).
//! No official Rust SDK exists; `shared/reference/e2b.md` holds the wire facts.
//!
//! A job costs few round trips: create, clone (one command that also reports head and branch),
//! the pipeline's commands, one batched read however many files, kill. The sandbox is renewed in
//! the background while the job runs, and killed by `kill` or, failing that, when the last
//! handle is dropped; its E2B lifetime bounds a leak if even that fails.
//!
//! The repository lives in `/home/user/repo`. Scripts we send never name that path: they run
//! with `cwd` set, so a fake envd that maps `/home/user` elsewhere runs them unchanged.

pub mod api;
pub mod envd;
pub mod files;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use self::api::ControlPlane;
use self::envd::{ProcessResult, ProcessSpec, Progress, RunError};
use crate::retry::{RetryPolicy, RetryVerdict, Retryable, with_retries};

use super::{
    CloneSpec, Cloned, DirEntry, ExecOutput, ExecRequest, FileContent, RepoPath, Sandbox,
    SandboxError, SandboxProvider,
};

/// The sandbox user's home; envd resolves relative paths against it.
pub const HOME_DIR: &str = "/home/user";
/// Where the repository is cloned.
pub const REPO_DIR: &str = "/home/user/repo";
/// envd's port inside every sandbox.
pub const ENVD_PORT: u16 = 49983;
/// Domains served by E2B's shared sandbox edge (`https://sandbox.<domain>`, routed by headers),
/// as listed by the official SDK; any other domain uses `https://49983-<id>.<domain>`.
const SHARED_EDGE_DOMAINS: &[&str] = &[
    "e2b.app",
    "e2b.dev",
    "e2b.pro",
    "e2b-staging.dev",
    "e2b-tango.dev",
    "e2b-juliett.dev",
    "foxtrot-2.e2b.dev",
];
/// Time budget of the batched file reader.
const READ_TIMEOUT: Duration = Duration::from_secs(300);

/// A value that must never be shown: `Debug` prints a placeholder.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(Arc::from(value.into()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[secret]")
    }
}

/// Timeouts and retry policy. The defaults suit E2B Cloud; tests shorten them.
#[derive(Debug, Clone)]
pub struct Timing {
    /// Any single request, and the wait for a command stream's headers.
    pub request_timeout: Duration,
    /// Silence tolerated on a command stream (envd sends keepalives).
    pub stream_idle_timeout: Duration,
    /// Asked of envd (`Keepalive-Ping-Interval`); well below `stream_idle_timeout`.
    pub keepalive_interval: Duration,
    /// Retries of operations safe to repeat (control-plane calls, envd reads and uploads,
    /// commands that certainly did not start).
    pub retry: RetryPolicy,
    /// Time to connect to either plane.
    pub connect_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(60),
            stream_idle_timeout: Duration::from_secs(120),
            keepalive_interval: Duration::from_secs(50),
            retry: default_retry(),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Close to the official SDK's: three retries, backoff from 250 ms doubling up to 10 s, shortened
/// by up to half at random, and a server's `Retry-After` honoured up to 30 s.
pub fn default_retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        initial_backoff: Duration::from_millis(250),
        max_backoff: Duration::from_secs(10),
        max_retry_after: Duration::from_secs(30),
        jitter: 0.5,
    }
}

/// Settings of the e2b backend, read from the same variables as the official SDK.
#[derive(Debug, Clone)]
pub struct E2bConfig {
    api_key: Secret,
    /// Control plane, `E2B_API_URL` or `https://api.<domain>`.
    pub api_url: String,
    /// envd for every sandbox (`E2B_SANDBOX_URL`), else derived from the domain.
    pub sandbox_url: Option<String>,
    /// `E2B_DOMAIN`, default `e2b.app`.
    pub domain: String,
    /// `E2B_TEMPLATE`, default `base`.
    pub template: String,
    /// Lifetime asked for on create and renewed every half of it while the sandbox is in use:
    /// also how long a sandbox we failed to kill survives.
    pub sandbox_ttl: Duration,
    /// Bytes one `read_files` call returns at most, all files together.
    pub max_read_bytes: u64,
    pub timing: Timing,
}

impl E2bConfig {
    /// Reads `E2B_API_KEY` (required), `E2B_API_URL`, `E2B_SANDBOX_URL`, `E2B_DOMAIN` and
    /// `E2B_TEMPLATE`. Empty values count as unset, as in the official SDK.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<E2bConfig, String> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let api_key = get("E2B_API_KEY")
            .ok_or_else(|| "E2B_API_KEY is not set; the e2b sandbox needs it".to_owned())?;
        let domain = get("E2B_DOMAIN").unwrap_or_else(|| "e2b.app".to_owned());
        if !domain
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(format!("E2B_DOMAIN `{domain}` is not a domain name"));
        }
        let api_url = match get("E2B_API_URL") {
            Some(url) => base_url("E2B_API_URL", &url)?,
            None => format!("https://api.{domain}"),
        };
        let sandbox_url = get("E2B_SANDBOX_URL")
            .map(|url| base_url("E2B_SANDBOX_URL", &url))
            .transpose()?;
        let template = get("E2B_TEMPLATE").unwrap_or_else(|| "base".to_owned());
        Ok(E2bConfig {
            api_key: Secret::new(api_key),
            api_url,
            sandbox_url,
            domain,
            template,
            sandbox_ttl: Duration::from_secs(600),
            max_read_bytes: super::DEFAULT_MAX_READ_BYTES,
            timing: Timing::default(),
        })
    }

    /// envd's base URL for a sandbox, as the official SDK derives it.
    pub fn envd_url(&self, sandbox_id: &str, sandbox_domain: Option<&str>) -> String {
        if let Some(url) = &self.sandbox_url {
            return url.clone();
        }
        let domain = sandbox_domain.unwrap_or(&self.domain);
        if SHARED_EDGE_DOMAINS.contains(&domain) {
            format!("https://sandbox.{domain}")
        } else {
            format!("https://{ENVD_PORT}-{sandbox_id}.{domain}")
        }
    }
}

/// Whether a `major.minor.patch` version is below `floor`; an unreadable one is taken as current.
fn version_below(version: &str, floor: (u64, u64, u64)) -> bool {
    let mut parts = version
        .trim()
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map(|p| p.parse::<u64>().ok());
    match (parts.next(), parts.next(), parts.next()) {
        (Some(Some(major)), Some(Some(minor)), Some(Some(patch))) => (major, minor, patch) < floor,
        _ => false,
    }
}

/// Checks an `http(s)` base URL and drops its trailing slash.
fn base_url(name: &str, raw: &str) -> Result<String, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{name} `{raw}` is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{name} `{raw}` must be an http(s) URL"));
    }
    if !url.username().is_empty() || url.password().is_some() || url.query().is_some() {
        return Err(format!("{name} must not carry credentials or a query"));
    }
    Ok(raw.trim_end_matches('/').to_owned())
}

/// Where one sandbox's envd is, and how to address it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    http: reqwest::Client,
    base: String,
    sandbox_id: String,
    access_token: Option<Secret>,
    /// envd before 0.4.0 has no default user: every request names `user`, as the SDK does.
    legacy_user: bool,
    pub timing: Timing,
}

impl Endpoint {
    fn envd_request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        // Both routing headers always go along, so that the shared edge (and a single-port
        // fake) can find the sandbox whatever the base URL.
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("E2b-Sandbox-Id", &self.sandbox_id)
            .header("E2b-Sandbox-Port", ENVD_PORT.to_string());
        if let Some(token) = &self.access_token {
            request = request.header("X-Access-Token", token.expose());
        }
        if self.legacy_user {
            // HTTP Basic with user `user` and an empty password.
            request = request.header("Authorization", "Basic dXNlcjo=");
        }
        request
    }

    pub fn envd_post(&self, path: &str) -> reqwest::RequestBuilder {
        self.envd_request(reqwest::Method::POST, path)
    }

    pub fn envd_get(&self, path: &str) -> reqwest::RequestBuilder {
        self.envd_request(reqwest::Method::GET, path)
    }

    /// Classifies a non-success answer from envd or the edge in front of it.
    pub fn status_error(&self, status: reqwest::StatusCode, text: &str) -> SandboxError {
        let code = status.as_u16();
        if code == 502 && text.contains("was not found") {
            return SandboxError::Gone(format!(
                "E2B sandbox {} was not found: it was killed or ran past its lifetime",
                self.sandbox_id
            ));
        }
        match code {
            401 | 403 => SandboxError::Transport {
                message: format!("envd refused the sandbox's access token ({status}): {text}"),
                retryable: false,
            },
            404 => SandboxError::NotFound(text.to_owned()),
            429 | 500 | 502 | 503 | 504 => SandboxError::Transport {
                message: format!("envd answered {status}: {text}"),
                retryable: true,
            },
            _ => SandboxError::Transport {
                message: format!("envd answered {status}: {text}"),
                retryable: false,
            },
        }
    }
}

struct Clients {
    api: reqwest::Client,
    envd: reqwest::Client,
}

/// Creates an E2B sandbox per job.
pub struct E2bProvider {
    config: E2bConfig,
    clients: Result<Clients, String>,
}

impl E2bProvider {
    pub fn new(config: E2bConfig) -> E2bProvider {
        let user_agent = concat!("tiny-backspace/", env!("CARGO_PKG_VERSION"));
        let api = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(config.timing.connect_timeout)
            .build();
        // envd gets HTTP/1.1 only: the edge pads h2 downloads with empty frames that trip
        // hyper's guard, which is why the official SDK pins downloads to HTTP/1.1 too.
        let envd = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(config.timing.connect_timeout)
            .http1_only()
            .build();
        let clients = match (api, envd) {
            (Ok(api), Ok(envd)) => Ok(Clients { api, envd }),
            (Err(e), _) | (_, Err(e)) => Err(format!("could not build an HTTP client: {e}")),
        };
        E2bProvider { config, clients }
    }

    fn control_plane(&self) -> Result<(ControlPlane, &Clients), SandboxError> {
        let clients = self
            .clients
            .as_ref()
            .map_err(|e| SandboxError::Create(e.clone()))?;
        let api = ControlPlane {
            http: clients.api.clone(),
            base: self.config.api_url.clone(),
            key: self.config.api_key.clone(),
            timing: self.config.timing.clone(),
        };
        Ok((api, clients))
    }

    /// Like [`SandboxProvider::create`], with the concrete type (tests and tools use its extras).
    pub async fn create_sandbox(&self, job_id: &str) -> Result<Arc<E2bSandbox>, SandboxError> {
        let (api, clients) = self.control_plane()?;
        let created = api
            .create(&self.config.template, self.config.sandbox_ttl, job_id)
            .await?;
        let id = created.sandbox_id.clone();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            // Not something we can put in a URL; the sandbox dies at its lifetime.
            return Err(SandboxError::Create(format!(
                "E2B returned an unusable sandbox id `{}`",
                crate::text::truncate_middle(&id, 60).0
            )));
        }
        tracing::info!(job_id, sandbox_id = %id, envd_version = %created.envd_version, "E2B sandbox created");
        let endpoint = Endpoint {
            http: clients.envd.clone(),
            base: self.config.envd_url(&id, created.domain.as_deref()),
            sandbox_id: id.clone(),
            access_token: created.access_token,
            legacy_user: version_below(&created.envd_version, (0, 4, 0)),
            timing: self.config.timing.clone(),
        };
        let sandbox = Arc::new(E2bSandbox {
            api: api.clone(),
            endpoint,
            id: id.clone(),
            closing: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            renewer: Mutex::new(None),
            ttl: self.config.sandbox_ttl,
            max_read_bytes: self.config.max_read_bytes,
        });
        let renewer = tokio::spawn(renew(api, id, self.config.sandbox_ttl));
        if let Ok(mut slot) = sandbox.renewer.lock() {
            *slot = Some(renewer.abort_handle());
        }
        Ok(sandbox)
    }
}

/// Keeps the sandbox alive while its owner uses it: renews its lifetime at every half of it.
/// Aborted by `kill` and by `Drop`.
async fn renew(api: ControlPlane, sandbox_id: String, ttl: Duration) {
    let period = (ttl / 2).max(Duration::from_secs(1));
    loop {
        tokio::time::sleep(period).await;
        match api.set_timeout(&sandbox_id, ttl).await {
            Ok(()) => tracing::debug!(sandbox_id, "E2B sandbox lifetime renewed"),
            Err(SandboxError::Gone(_)) => {
                tracing::warn!(sandbox_id, "E2B sandbox disappeared; no longer renewing it");
                return;
            }
            Err(e) => tracing::warn!(sandbox_id, error = %e, "renewing the E2B sandbox failed"),
        }
    }
}

#[async_trait]
impl SandboxProvider for E2bProvider {
    fn name(&self) -> &'static str {
        "e2b"
    }

    fn isolation(&self) -> &'static str {
        "vm"
    }

    fn limits(&self) -> &'static str {
        "vm"
    }

    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        let sandbox: Arc<dyn Sandbox> = self.create_sandbox(job_id).await?;
        crate::telemetry::sandbox_created("e2b");
        Ok(sandbox)
    }

    async fn reclaim(&self, resource_id: &str) -> Result<(), SandboxError> {
        let valid = !resource_id.is_empty()
            && resource_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid {
            return Err(SandboxError::NotFound(format!(
                "`{resource_id}` is not an E2B sandbox id"
            )));
        }
        let (api, _) = self.control_plane()?;
        let existed = api.kill(resource_id).await?;
        tracing::info!(sandbox_id = %resource_id, existed, "E2B sandbox of a lost job killed");
        Ok(())
    }
}

/// One E2B sandbox.
pub struct E2bSandbox {
    api: ControlPlane,
    endpoint: Endpoint,
    id: String,
    /// `kill` has begun: no new work.
    closing: AtomicBool,
    /// E2B confirmed the sandbox is gone.
    killed: AtomicBool,
    renewer: Mutex<Option<tokio::task::AbortHandle>>,
    /// The lifetime E2B enforces if we fail to kill it.
    ttl: Duration,
    /// Bytes one `read_files` call returns at most.
    max_read_bytes: u64,
}

impl fmt::Debug for E2bSandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("E2bSandbox")
            .field("id", &self.id)
            .field("envd", &self.endpoint.base)
            .finish_non_exhaustive()
    }
}

/// A failed command, and whether sending it again is safe.
#[derive(Debug)]
struct RunFailure {
    error: SandboxError,
    may_repeat: bool,
}

impl Retryable for RunFailure {
    fn verdict(&self) -> RetryVerdict {
        if self.may_repeat {
            self.error.verdict()
        } else {
            RetryVerdict::Stop
        }
    }
}

impl fmt::Display for RunFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Whether a failed command may be sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repeat {
    /// Only when envd certainly did not start it (commands with unknown side effects).
    IfNotStarted,
    /// Whenever the failure was transient (read-only scripts, the restartable clone, commands
    /// marked [`ExecRequest::repeatable`]).
    Always,
}

impl E2bSandbox {
    pub fn id(&self) -> &str {
        &self.id
    }

    fn check_alive(&self) -> Result<(), SandboxError> {
        if self.closing.load(Ordering::SeqCst) {
            Err(SandboxError::Gone("the sandbox was killed".into()))
        } else {
            Ok(())
        }
    }

    fn stop_renewing(&self) {
        if let Ok(mut slot) = self.renewer.lock()
            && let Some(handle) = slot.take()
        {
            handle.abort();
        }
    }

    /// Runs a process, repeating it after transient failures as `repeat` allows. A process
    /// left running by a broken stream or our own deadline is killed.
    async fn run(&self, spec: &ProcessSpec, repeat: Repeat) -> Result<ProcessResult, SandboxError> {
        let attempt = || async {
            self.check_alive().map_err(|error| RunFailure {
                error,
                may_repeat: false,
            })?;
            match envd::run_process(&self.endpoint, spec).await {
                Ok(result) => {
                    if let Some(pid) = result.still_running {
                        self.kill_process(pid).await;
                    }
                    Ok(result)
                }
                Err(RunError { error, progress }) => {
                    if let Progress::Started(pid) = progress {
                        self.kill_process(pid).await;
                    }
                    let may_repeat = match repeat {
                        Repeat::Always => true,
                        Repeat::IfNotStarted => progress == Progress::NotStarted,
                    };
                    tracing::debug!(sandbox_id = %self.id, error = %error, may_repeat, "a command failed");
                    Err(RunFailure { error, may_repeat })
                }
            }
        };
        match with_retries(&self.endpoint.timing.retry, "e2b", attempt).await {
            Ok(result) => Ok(result),
            Err(failure) => Err(self.classify(failure.error).await),
        }
    }

    /// After a transient failure: is the sandbox itself gone? Asks envd's health endpoint,
    /// whose edge answers "not found" for a dead sandbox.
    async fn classify(&self, error: SandboxError) -> SandboxError {
        if !matches!(
            error,
            SandboxError::Transport {
                retryable: true,
                ..
            }
        ) {
            return error;
        }
        match envd::health(&self.endpoint).await {
            Ok(false) => SandboxError::Gone(format!(
                "E2B sandbox {} disappeared during the request ({error})",
                self.id
            )),
            Ok(true) | Err(_) => error,
        }
    }

    /// Best effort: SIGKILL a process we no longer follow.
    async fn kill_process(&self, pid: u32) {
        let message = serde_json::json!({
            "process": { "pid": pid },
            "signal": "SIGNAL_SIGKILL",
        });
        if let Err(e) = envd::unary(&self.endpoint, "/process.Process/SendSignal", &message).await {
            tracing::debug!(sandbox_id = %self.id, pid, error = %e, "could not kill an abandoned process");
        }
    }

    /// Repeats an idempotent envd request after transient failures.
    async fn idempotent<T, F, Fut>(&self, op: F) -> Result<T, SandboxError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, SandboxError>>,
    {
        self.check_alive()?;
        match with_retries(&self.endpoint.timing.retry, "e2b", op).await {
            Ok(value) => Ok(value),
            Err(e) => Err(self.classify(e).await),
        }
    }

    /// Downloads a file by absolute path with `GET /files` (gzip is decoded). `None` when
    /// it does not exist.
    pub async fn download(&self, abs_path: &str) -> Result<Option<Vec<u8>>, SandboxError> {
        self.idempotent(|| files::download(&self.endpoint, abs_path))
            .await
    }

    fn repo_path(path: &RepoPath) -> String {
        if path.is_root() {
            REPO_DIR.to_owned()
        } else {
            format!("{REPO_DIR}/{}", path.as_str())
        }
    }
}

/// Clones shallowly into `./repo` (run with `cwd` = the home directory) and prints head and
/// branch on a marked line. URL and branch are arguments, never spliced into the script; the
/// URL carries no credential. The clone goes to a scratch directory that replaces `repo` only
/// when complete, and earlier scratch directories are removed first, so the script can be
/// repeated after a broken stream (the earlier attempt's shell is killed before that).
const CLONE_SCRIPT: &str = r#"url=$1; branch=$2; tmp=.tb-clone.$$
rm -rf .tb-clone.*
b=(); if [ -n "$branch" ]; then b=(--branch "$branch"); fi
git -c core.hooksPath=/dev/null -c protocol.allow=never -c protocol.https.allow=always \
  -c protocol.file.allow=always clone --quiet --depth 1 --single-branch --no-tags "${b[@]}" \
  -- "$url" "$tmp" || { rm -rf "$tmp"; exit 2; }
rm -rf repo && mv "$tmp" repo && cd repo || exit 1
head=$(git rev-parse --verify -q HEAD) || { echo "the repository has no commits" >&2; exit 3; }
current=$(git symbolic-ref --short -q HEAD) || current=$branch
printf 'TB-CLONED %s %s\n' "$head" "$current"
"#;

/// Environment every command gets: git must never wait for a password.
fn base_env() -> Vec<(String, String)> {
    vec![("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned())]
}

#[async_trait]
impl Sandbox for E2bSandbox {
    async fn clone_repo(&self, spec: &CloneSpec) -> Result<Cloned, SandboxError> {
        if let Ok(url) = url::Url::parse(&spec.url)
            && (!url.username().is_empty() || url.password().is_some())
        {
            return Err(SandboxError::Clone(
                "the clone URL carries credentials; they must never enter the sandbox".into(),
            ));
        }
        let process = ProcessSpec {
            cmd: "/bin/bash".into(),
            args: vec![
                "-c".into(),
                CLONE_SCRIPT.into(),
                "clone".into(),
                spec.url.clone(),
                spec.branch.clone().unwrap_or_default(),
            ],
            envs: base_env(),
            cwd: Some(HOME_DIR.into()),
            timeout: spec.timeout,
            output_cap: 64 * 1024,
        };
        let out = self.run(&process, Repeat::Always).await?;
        if out.timed_out {
            return Err(SandboxError::Clone(format!(
                "git clone timed out after {} s",
                spec.timeout.as_secs()
            )));
        }
        let stdout = crate::text::lossy(&out.stdout);
        let marked = stdout
            .lines()
            .rev()
            .find_map(|line| line.strip_prefix("TB-CLONED "));
        match (out.exit_code, marked) {
            (0, Some(rest)) => {
                let (head, branch) = rest.split_once(' ').unwrap_or((rest, ""));
                if head.len() < 40 || !head.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(SandboxError::Clone(format!(
                        "git reported an odd head commit `{head}`"
                    )));
                }
                Ok(Cloned {
                    head: head.to_owned(),
                    branch: branch.trim().to_owned(),
                })
            }
            (code, _) => {
                let stderr = crate::text::lossy(&out.stderr);
                let detail = crate::text::truncate_middle(stderr.trim(), 2000).0;
                Err(SandboxError::Clone(if detail.is_empty() {
                    format!("git clone exited with status {code}")
                } else {
                    detail
                }))
            }
        }
    }

    #[tracing::instrument(name = "sandbox.exec", skip_all, fields(backend = "e2b"))]
    async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        let mut envs = base_env();
        envs.extend(req.env.iter().cloned());
        let process = ProcessSpec {
            // A login shell, as the official SDK runs commands: it sets up the template's PATH.
            cmd: "/bin/bash".into(),
            args: vec!["-l".into(), "-c".into(), req.command.clone()],
            envs,
            cwd: Some(REPO_DIR.into()),
            timeout: req.timeout,
            output_cap: req.output_cap.max(1024),
        };
        let repeat = if req.repeatable {
            Repeat::Always
        } else {
            Repeat::IfNotStarted
        };
        let out = self.run(&process, repeat).await?;
        Ok(ExecOutput {
            exit_code: out.exit_code,
            stdout: out.stdout,
            stderr: out.stderr,
            timed_out: out.timed_out,
            truncated: out.truncated,
        })
    }

    async fn read_file(&self, path: &RepoPath) -> Result<FileContent, SandboxError> {
        let mut contents = self.read_files(std::slice::from_ref(path)).await?;
        contents
            .pop()
            .ok_or_else(|| SandboxError::Io(format!("{path}: the file reader answered nothing")))
    }

    async fn read_files(&self, paths: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError> {
        if paths.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(root) = paths.iter().find(|p| p.is_root()) {
            return Err(SandboxError::Path(format!("{root} is a directory")));
        }
        let max_total = self.max_read_bytes;
        let process = ProcessSpec {
            cmd: "/bin/bash".into(),
            args: files::read_script_args(paths, max_total),
            envs: Vec::new(),
            cwd: Some(REPO_DIR.into()),
            timeout: READ_TIMEOUT,
            // The most the script prints within the total: anything more shows as truncation.
            output_cap: files::read_output_cap(paths, max_total),
        };
        let out = self.run(&process, Repeat::Always).await?;
        if out.truncated {
            // A file grew past the total between the size check and the read.
            return Err(files::too_large(paths, max_total));
        }
        if out.timed_out || out.exit_code != 0 {
            return Err(SandboxError::Io(format!(
                "reading {} files failed (exit {}{}): {}",
                paths.len(),
                out.exit_code,
                if out.timed_out { ", timed out" } else { "" },
                crate::text::truncate_middle(crate::text::lossy(&out.stderr).trim(), 500).0
            )));
        }
        files::parse_read_output(paths, &out.stdout, max_total)
    }

    async fn write_file(&self, path: &RepoPath, bytes: &[u8]) -> Result<(), SandboxError> {
        if path.is_root() {
            return Err(SandboxError::Path(
                "cannot write the repository root".into(),
            ));
        }
        let target = Self::repo_path(path);
        self.idempotent(|| files::upload(&self.endpoint, &target, bytes))
            .await
    }

    async fn list_dir(&self, path: &RepoPath, depth: u32) -> Result<Vec<DirEntry>, SandboxError> {
        let message = serde_json::json!({
            "path": Self::repo_path(path),
            "depth": depth.max(1),
        });
        let answer = self
            .idempotent(|| envd::unary(&self.endpoint, "/filesystem.Filesystem/ListDir", &message))
            .await
            .map_err(|e| match e {
                SandboxError::NotFound(_) => {
                    SandboxError::NotFound(format!("{path}: no such directory"))
                }
                SandboxError::Transport { message, .. } if message.contains("invalid_argument") => {
                    SandboxError::Path(format!("{path} is not a directory"))
                }
                other => other,
            })?;
        files::list_entries(REPO_DIR, answer)
    }

    async fn kill(&self) -> Result<(), SandboxError> {
        self.closing.store(true, Ordering::SeqCst);
        self.stop_renewing();
        if self.killed.load(Ordering::SeqCst) {
            return Ok(());
        }
        match self.api.kill(&self.id).await {
            Ok(existed) => {
                if !self.killed.swap(true, Ordering::SeqCst) {
                    crate::telemetry::sandbox_killed("e2b");
                }
                tracing::info!(sandbox_id = %self.id, existed, "E2B sandbox killed");
                Ok(())
            }
            Err(e) => Err(SandboxError::Transport {
                message: format!(
                    "could not kill E2B sandbox {} ({e}); E2B ends it within {} s anyway",
                    self.id,
                    self.ttl.as_secs()
                ),
                retryable: true,
            }),
        }
    }

    fn resource_id(&self) -> Option<String> {
        Some(self.id.clone())
    }
}

impl Drop for E2bSandbox {
    fn drop(&mut self) {
        self.stop_renewing();
        if self.killed.load(Ordering::SeqCst) {
            return;
        }
        // Nobody killed it (a panic, a cancelled task): do it in the background.
        let api = self.api.clone();
        let id = std::mem::take(&mut self.id);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    match api.kill(&id).await {
                        Ok(_) => tracing::info!(sandbox_id = %id, "dropped E2B sandbox killed"),
                        Err(e) => {
                            tracing::warn!(sandbox_id = %id, error = %e, "killing a dropped E2B sandbox failed")
                        }
                    }
                });
            }
            Err(_) => {
                tracing::error!(sandbox_id = %id, "E2B sandbox dropped outside a runtime; it lives until its timeout")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_follow_the_sdk() {
        let config = E2bConfig::from_lookup(lookup(&[("E2B_API_KEY", "e2b_123")])).unwrap();
        assert_eq!(config.api_url, "https://api.e2b.app");
        assert_eq!(config.template, "base");
        assert_eq!(config.envd_url("abc", None), "https://sandbox.e2b.app");
        assert_eq!(
            config.envd_url("abc", Some("example.com")),
            "https://49983-abc.example.com"
        );
        assert!(!format!("{config:?}").contains("e2b_123"));
    }

    #[test]
    fn custom_domain_and_urls() {
        let config = E2bConfig::from_lookup(lookup(&[
            ("E2B_API_KEY", "k"),
            ("E2B_DOMAIN", "my.corp"),
            ("E2B_TEMPLATE", "tb"),
        ]))
        .unwrap();
        assert_eq!(config.api_url, "https://api.my.corp");
        assert_eq!(config.envd_url("id1", None), "https://49983-id1.my.corp");
        let config = E2bConfig::from_lookup(lookup(&[
            ("E2B_API_KEY", "k"),
            ("E2B_API_URL", "http://127.0.0.1:9/"),
            ("E2B_SANDBOX_URL", "http://127.0.0.1:9"),
            ("E2B_DOMAIN", ""),
        ]))
        .unwrap();
        assert_eq!(config.api_url, "http://127.0.0.1:9");
        assert_eq!(
            config.envd_url("id1", Some("e2b.dev")),
            "http://127.0.0.1:9"
        );
        assert_eq!(config.domain, "e2b.app");
    }

    #[test]
    fn old_envd_versions_are_recognised() {
        assert!(version_below("0.3.9", (0, 4, 0)));
        assert!(!version_below("0.4.0", (0, 4, 0)));
        assert!(!version_below("0.6.13", (0, 4, 0)));
        assert!(!version_below("", (0, 4, 0)));
    }

    #[test]
    fn refuses_missing_key_and_bad_urls() {
        assert!(E2bConfig::from_lookup(lookup(&[])).is_err());
        assert!(
            E2bConfig::from_lookup(lookup(&[("E2B_API_KEY", "k"), ("E2B_API_URL", "ftp://x")]))
                .is_err()
        );
        let err = E2bConfig::from_lookup(lookup(&[
            ("E2B_API_KEY", "k"),
            ("E2B_SANDBOX_URL", "http://u:p@x"),
        ]))
        .unwrap_err();
        assert!(!err.contains("u:p"));
    }
}
