//! The fault soak: many jobs through a real `tiny-backspace serve` process whose E2B, Anthropic,
//! OpenAI and GitHub are this process's fakes, each failing at random under one seeded
//! [`FaultPlan`]. Every job's stream and the whole run are checked against the service's
//! guarantees; anything that does not hold is a violation.
//!
//! Used by `tests/soak.rs` (a fixed seed, 100 jobs, part of the suite) and `benches/soak.rs`
//! (`scripts/soak`: any number of jobs, seed and rate, with timings).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::fake_anthropic::{Block, FakeAnthropic, Reply, ScriptedTurn};
use super::fake_e2b::{self, FakeE2b};
use super::fake_github::{FakeGithub, SeedFile};
use super::fake_openai::FakeOpenAi;
use super::faults::{FaultPlan, Injected};

/// Secrets the server is given; none may appear in an event or a log line.
pub const GITHUB_TOKEN: &str = "ghp_SOAKCANARY_1a2b3c4d5e6f7a8b9c0d";
pub const ANTHROPIC_KEY: &str = "sk-ant-SOAKCANARY-0f1e2d3c4b5a6978";
pub const OPENAI_KEY: &str = "sk-SOAKCANARY-8f7e6d5c4b3a29180716";
pub const SERVICE_KEY: &str = "tb-svc-SOAKCANARY-31415926535";

/// Every secret of the run (the fake E2B's key included).
pub fn canaries() -> [&'static str; 5] {
    [
        GITHUB_TOKEN,
        ANTHROPIC_KEY,
        OPENAI_KEY,
        SERVICE_KEY,
        fake_e2b::API_KEY,
    ]
}

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    pub jobs: usize,
    pub concurrency: usize,
    pub seed: u64,
    /// Multiplies every fault probability of [`issue_plan`].
    pub rate: f64,
    /// The `tiny-backspace` binary.
    pub binary: PathBuf,
    /// Each fake request waits up to this long.
    pub max_latency: Duration,
    /// After the last job: how long the background cleaner gets to finish its kills.
    pub settle: Duration,
    /// A job's stream must end within this.
    pub job_timeout: Duration,
    /// Print a line every tenth of the jobs.
    pub progress: bool,
}

impl SoakConfig {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            jobs: 1000,
            concurrency: 16,
            seed: 1,
            rate: 1.0,
            binary,
            max_latency: Duration::from_millis(3),
            settle: Duration::from_secs(180),
            job_timeout: Duration::from_secs(300),
            progress: false,
        }
    }
}

/// The fault rates of issue 12 (what a new user met), times `rate`:
/// E2B create 503 (10 %), envd commands 502 (3 %), sandbox DELETE 502 (15 %), Anthropic 529/500
/// (12 %), OpenAI 500/429 (10 %), GitHub 502 on git data (4 %) and on pull-request, ref and fork
/// creation after carrying them out (8 %). Added to those: lost answers of E2B creates and kills,
/// closed connections after GitHub writes, and streams cut mid-way (model SSE, envd processes).
pub fn issue_plan(seed: u64, rate: f64, max_latency: Duration) -> FaultPlan {
    FaultPlan::new(seed)
        .latency(Duration::ZERO, max_latency)
        .rule("e2b.create", 0.10, Injected::Status(503))
        .rule("e2b.create", 0.01, Injected::CloseAfter)
        .rule("e2b.command", 0.03, Injected::Status(502))
        .rule("e2b.command", 0.01, Injected::CutStream)
        .rule("e2b.files", 0.03, Injected::Status(502))
        .rule("e2b.kill", 0.10, Injected::Status(502))
        .rule("e2b.kill", 0.05, Injected::StatusAfter(502))
        .rule("anthropic.messages", 0.08, Injected::Status(529))
        .rule("anthropic.messages", 0.04, Injected::Status(500))
        .rule("anthropic.messages", 0.02, Injected::CutStream)
        .rule("openai.chat", 0.06, Injected::Status(500))
        .rule("openai.chat", 0.04, Injected::Status(429))
        .rule("openai.chat", 0.02, Injected::CutStream)
        .rule("github.read", 0.04, Injected::Status(502))
        .rule("github.git", 0.04, Injected::Status(502))
        .rule("github.ref", 0.06, Injected::StatusAfter(502))
        .rule("github.ref", 0.02, Injected::CloseAfter)
        .rule("github.pull", 0.06, Injected::StatusAfter(502))
        .rule("github.pull", 0.02, Injected::CloseAfter)
        .rule("github.fork", 0.06, Injected::StatusAfter(502))
        .rule("github.fork", 0.02, Injected::CloseAfter)
        .scaled(rate)
}

/// The repositories jobs go to: one the token can push to, one it must fork.
pub const PUSH_REPO: (&str, &str) = ("alice", "widgets");
pub const FORK_REPO: (&str, &str) = ("carol", "gadgets");

/// A job's prompt, understood alike by the fake models' responder and the dummy agent.
pub fn prompt(job: usize, seed: u64) -> String {
    format!("create a file soak/job-{job}.txt with the text \"soak job {job} of seed {seed}\"")
}

/// The fake models: write the file the prompt names, then finish. Stateless, so a transcript
/// handed over to another provider (or retried) is carried on from wherever it is.
fn respond(body: &Value, anthropic: bool) -> Reply {
    let text = body.to_string();
    let answered = if anthropic {
        text.contains("\"tool_result\"")
    } else {
        text.contains("\"role\":\"tool\"")
    };
    if answered {
        return Reply::tool_call(
            "call_soak_finish",
            "finish",
            json!({"title": "Add the soak file", "summary": "Wrote the file the request named."}),
        );
    }
    let job = text
        .split("soak/job-")
        .nth(1)
        .and_then(|rest| rest.split(".txt").next())
        .unwrap_or("0")
        .to_owned();
    Reply::Turn(ScriptedTurn::new(
        vec![
            Block::text("Writing the file."),
            Block::call(
                "call_soak_write",
                "write_file",
                json!({"path": format!("soak/job-{job}.txt"), "content": format!("soak job {job}\n")}),
            ),
        ],
        "tool_use",
    ))
}

/// The fakes of one run.
pub struct Fakes {
    pub e2b: FakeE2b,
    pub anthropic: FakeAnthropic,
    pub openai: FakeOpenAi,
    pub github: FakeGithub,
    pub plan: Arc<FaultPlan>,
}

impl Fakes {
    pub async fn start(plan: FaultPlan) -> Fakes {
        let plan = Arc::new(plan);
        let e2b = FakeE2b::start().await;
        let anthropic = FakeAnthropic::start().await;
        let openai = FakeOpenAi::start().await;
        let github = FakeGithub::start_at("/api/v3").await;
        github.add_user(GITHUB_TOKEN, "alice");
        github.add_user("ghp_carol_owner_0000000000", "carol");
        github.set_fork_delay(Duration::ZERO);
        let seed = [
            SeedFile::text("README.md", "# Soak\n"),
            SeedFile::text("src/lib.rs", "pub fn soak() {}\n"),
        ];
        github.create_repo(PUSH_REPO.0, PUSH_REPO.1, &seed);
        github.create_repo(FORK_REPO.0, FORK_REPO.1, &seed);
        anthropic.set_responder(Arc::new(|body: &Value| respond(body, true)));
        openai.set_responder(Arc::new(|body: &Value| respond(body, false)));
        // Tens of thousands of requests: nothing is kept but what the checks need.
        e2b.set_recording(false);
        anthropic.set_recording(false);
        openai.set_recording(false);
        github.set_recording(false);
        e2b.set_fault_plan(plan.clone());
        anthropic.set_fault_plan(plan.clone());
        openai.set_fault_plan(plan.clone());
        github.set_fault_plan(plan.clone());
        Fakes {
            e2b,
            anthropic,
            openai,
            github,
            plan,
        }
    }

    /// The server's environment for these fakes.
    pub fn env(&self, concurrency: usize) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self.e2b.env();
        env.extend(
            [
                ("SANDBOX", "e2b".to_owned()),
                ("ANTHROPIC_API_KEY", ANTHROPIC_KEY.to_owned()),
                ("ANTHROPIC_BASE_URL", self.anthropic.base_url()),
                ("OPENAI_API_KEY", OPENAI_KEY.to_owned()),
                ("OPENAI_BASE_URL", self.openai.base_url()),
                ("OPENAI_API", "chat".to_owned()),
                ("AGENTS", "anthropic,openai,dummy".to_owned()),
                ("GITHUB_TOKEN", GITHUB_TOKEN.to_owned()),
                ("GITHUB_API_URL", self.github.api_url()),
                ("API_KEYS", SERVICE_KEY.to_owned()),
                ("MAX_CONCURRENT_JOBS", concurrency.to_string()),
                ("MAX_QUEUED_JOBS", (concurrency * 4).to_string()),
                ("JOB_TIMEOUT_SECS", "600".to_owned()),
                ("HOST", "127.0.0.1".to_owned()),
                ("PORT", "0".to_owned()),
                ("RUST_LOG", "info".to_owned()),
                ("LOG_FORMAT", "json".to_owned()),
            ]
            .map(|(k, v)| (k.to_owned(), v)),
        );
        env
    }
}

/// The running `serve` process, its address, and what its log showed.
pub struct Server {
    pub child: Child,
    pub addr: String,
    /// Log lines holding a secret (the first few, with the secret masked).
    pub leaks: Arc<Mutex<Vec<String>>>,
    pub log_lines: Arc<AtomicUsize>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The job store's directory (a SQLite file, as a deployment has); a restarted server is
    /// given the same one.
    data: Arc<tempfile::TempDir>,
}

impl Server {
    /// Starts `binary serve` with `env` and its own data directory, and waits until it listens.
    pub fn start(binary: &PathBuf, env: &[(String, String)]) -> Server {
        let data = Arc::new(tempfile::tempdir().expect("a data directory"));
        Self::start_in(binary, env, data)
    }

    /// [`Server::start`] on an existing data directory: the restart of a server.
    pub fn start_in(
        binary: &PathBuf,
        env: &[(String, String)],
        data: Arc<tempfile::TempDir>,
    ) -> Server {
        let mut child = Command::new(binary)
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("DATA_DIR", data.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("serve starts");
        let stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let leaks = Arc::new(Mutex::new(Vec::new()));
        let log_lines = Arc::new(AtomicUsize::new(0));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let reader = {
            let leaks = leaks.clone();
            let log_lines = log_lines.clone();
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in stderr.lines() {
                    let Ok(line) = line else { break };
                    log_lines.fetch_add(1, Ordering::Relaxed);
                    if let Some(tx) = &addr_tx
                        && let Some(addr) = listening_addr(&line)
                    {
                        let _ = tx.send(addr);
                        addr_tx = None;
                    }
                    if canaries().iter().any(|c| line.contains(c)) {
                        let mut leaks = leaks.lock().unwrap();
                        if leaks.len() < 5 {
                            let mut masked = line.clone();
                            for c in canaries() {
                                masked = masked.replace(c, "<SECRET>");
                            }
                            leaks.push(masked);
                        }
                    }
                }
            })
        };
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("serve listens within 30 s");
        Server {
            child,
            addr,
            leaks,
            log_lines,
            reader: Some(reader),
            data,
        }
    }

    pub fn data(&self) -> Arc<tempfile::TempDir> {
        self.data.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// `(VmRSS, VmHWM)` in KiB: resident now, and the peak so far.
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    pub fn sigterm(&self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal the server");
    }

    /// Waits (bounded) for the process to exit; its exit status, `None` when it did not.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                if let Some(reader) = self.reader.take() {
                    let _ = reader.join();
                }
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `addr=127.0.0.1:PORT` from the "listening" log line (pretty or JSON).
fn listening_addr(line: &str) -> Option<String> {
    if !line.contains("tiny-backspace listening") {
        return None;
    }
    if let Ok(v) = serde_json::from_str::<Value>(line) {
        return v["fields"]["addr"]
            .as_str()
            .or_else(|| v["addr"].as_str())
            .map(str::to_owned);
    }
    line.split("addr=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
}

/// One SSE message of a job's stream.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub id: Option<u64>,
    pub data: Value,
}

/// What one job's `POST /code` gave.
#[derive(Debug, Clone)]
pub struct JobRun {
    pub index: usize,
    pub status: u16,
    pub job_id: Option<String>,
    pub events: Vec<StreamEvent>,
    /// Set when the stream could not be read to its end (transport error, timeout).
    pub broken: Option<String>,
    /// Event texts holding a secret.
    pub leaks: usize,
}

impl JobRun {
    pub fn done(&self) -> Option<&Value> {
        self.events
            .last()
            .map(|e| &e.data)
            .filter(|d| d["type"] == "Done")
    }
}

/// Submits job `index` with `POST /code` and reads its stream to the end.
pub async fn run_job(
    client: &reqwest::Client,
    server_url: &str,
    index: usize,
    seed: u64,
    limit: Duration,
) -> JobRun {
    let (owner, name) = if index % 4 == 3 { FORK_REPO } else { PUSH_REPO };
    let body = json!({
        "repoUrl": format!("https://github.com/{owner}/{name}"),
        "prompt": prompt(index, seed),
    });
    let mut run = JobRun {
        index,
        status: 0,
        job_id: None,
        events: Vec::new(),
        broken: None,
        leaks: 0,
    };
    let response = client
        .post(format!("{server_url}/code"))
        .bearer_auth(SERVICE_KEY)
        .json(&body)
        .send();
    read_stream(&mut run, response, limit).await;
    run
}

/// Follows a job whose stream ended early (its server stopped) from its last event on, with
/// `Last-Event-ID`, appending what comes to `run`.
pub async fn resume_job(
    client: &reqwest::Client,
    server_url: &str,
    run: &mut JobRun,
    limit: Duration,
) {
    let id = run.job_id.clone().unwrap_or_default();
    let last = run.events.last().and_then(|e| e.id).unwrap_or(0);
    run.broken = None;
    let response = client
        .get(format!("{server_url}/jobs/{id}/events"))
        .bearer_auth(SERVICE_KEY)
        .header("last-event-id", last.to_string())
        .send();
    read_stream(run, response, limit).await;
}

/// Reads an event stream to its end into `run`.
async fn read_stream(
    run: &mut JobRun,
    response: impl std::future::Future<Output = reqwest::Result<reqwest::Response>>,
    limit: Duration,
) {
    let read = async {
        let response = response.await.map_err(|e| format!("request: {e}"))?;
        run.status = response.status().as_u16();
        if let Some(id) = response
            .headers()
            .get("x-job-id")
            .and_then(|v| v.to_str().ok())
        {
            run.job_id = Some(id.to_owned());
        }
        let mut stream = response.bytes_stream();
        let mut buffer: Vec<u8> = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("stream: {e}"))?;
            buffer.extend_from_slice(&chunk);
            while let Some(end) = find(&buffer, b"\n\n") {
                let message: Vec<u8> = buffer.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&message);
                if canaries().iter().any(|c| text.contains(c)) {
                    run.leaks += 1;
                }
                let mut id = None;
                let mut data = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str::<Value>(v).ok();
                    }
                }
                if let Some(data) = data {
                    run.events.push(StreamEvent { id, data });
                }
            }
        }
        Ok::<(), String>(())
    };
    match tokio::time::timeout(limit, read).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => run.broken = Some(e),
        Err(_) => run.broken = Some(format!("no end within {} s", limit.as_secs())),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The guarantees one job's stream must keep; each broken one is a line. A cancelled job is one
/// only when `cancelled_ok` (a shutdown cancels jobs; nothing else does in a soak).
pub fn job_violations(run: &JobRun, cancelled_ok: bool) -> Vec<String> {
    let mut out = Vec::new();
    let who = format!(
        "job {} ({})",
        run.index,
        run.job_id.as_deref().unwrap_or("no id")
    );
    if run.status != 200 {
        out.push(format!("{who}: POST /code answered {}", run.status));
        return out;
    }
    if let Some(why) = &run.broken {
        out.push(format!("{who}: the stream broke: {why}"));
    }
    if run.leaks > 0 {
        out.push(format!("{who}: {} event(s) hold a secret", run.leaks));
    }
    for (i, event) in run.events.iter().enumerate() {
        if event.id != Some(i as u64 + 1) {
            out.push(format!(
                "{who}: event {} has id {:?}, not {}",
                i + 1,
                event.id,
                i + 1
            ));
            break;
        }
    }
    let dones = run
        .events
        .iter()
        .filter(|e| e.data["type"] == "Done")
        .count();
    let Some(done) = run.done() else {
        out.push(format!(
            "{who}: the last event is not Done ({dones} Done in {} events)",
            run.events.len()
        ));
        return out;
    };
    if dones != 1 {
        out.push(format!("{who}: {dones} Done events"));
    }
    match done["status"].as_str() {
        Some("succeeded") => {
            if !done["pr_url"].is_string() || !done["branch"].is_string() {
                out.push(format!("{who}: succeeded without a pull request: {done}"));
            }
        }
        Some("failed") => {
            let coded = run.events.iter().any(|e| {
                e.data["type"] == "Error" && e.data["code"].as_str().is_some_and(|c| !c.is_empty())
            });
            if !coded {
                out.push(format!("{who}: failed with no Error event before Done"));
            }
        }
        Some("cancelled") if cancelled_ok => {}
        other => out.push(format!("{who}: Done status {other:?}")),
    }
    out
}

/// What a soak found.
#[derive(Debug, Default)]
pub struct SoakReport {
    pub seed: u64,
    pub jobs: usize,
    pub concurrency: usize,
    pub rate: f64,
    pub wall: Duration,
    pub succeeded: usize,
    pub failed: usize,
    pub other: usize,
    /// `Error.code at Error.step` → how many Error events carried it.
    pub error_codes: BTreeMap<String, usize>,
    /// `Done.error.code` of failed jobs → how many.
    pub failure_codes: BTreeMap<String, usize>,
    pub injected: BTreeMap<String, u64>,
    pub requests: BTreeMap<String, u64>,
    pub pull_requests: usize,
    pub sandboxes_created: u64,
    pub sandboxes_killed: u64,
    pub rss_start_kib: u64,
    pub rss_end_kib: u64,
    pub rss_peak_kib: u64,
    pub log_lines: usize,
    pub violations: Vec<String>,
}

impl SoakReport {
    pub fn jobs_per_second(&self) -> f64 {
        self.jobs as f64 / self.wall.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for SoakReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "soak: seed {} · {} jobs · concurrency {} · fault rate ×{}",
            self.seed, self.jobs, self.concurrency, self.rate
        )?;
        writeln!(
            f,
            "  wall {:.1} s · {:.2} jobs/s · RSS start {} MiB, peak {} MiB, end {} MiB · {} log lines",
            self.wall.as_secs_f64(),
            self.jobs_per_second(),
            self.rss_start_kib / 1024,
            self.rss_peak_kib / 1024,
            self.rss_end_kib / 1024,
            self.log_lines
        )?;
        writeln!(
            f,
            "  {} succeeded, {} failed, {} other · {} pull requests · {} sandboxes created, {} killed",
            self.succeeded,
            self.failed,
            self.other,
            self.pull_requests,
            self.sandboxes_created,
            self.sandboxes_killed
        )?;
        writeln!(f, "  failed jobs' codes: {:?}", self.failure_codes)?;
        writeln!(f, "  Error events' codes: {:?}", self.error_codes)?;
        writeln!(f, "  faults injected: {:?}", self.injected)?;
        writeln!(f, "  requests per route: {:?}", self.requests)?;
        if self.violations.is_empty() {
            writeln!(f, "  0 invariant violations")
        } else {
            writeln!(f, "  {} INVARIANT VIOLATIONS:", self.violations.len())?;
            for v in self.violations.iter().take(50) {
                writeln!(f, "    - {v}")?;
            }
            Ok(())
        }
    }
}

async fn healthz(client: &reqwest::Client, server: &Server) -> Option<Value> {
    let response = client.get(server.url("/healthz")).send().await.ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json::<Value>().await.ok()
}

/// Runs the soak: fakes, a `serve` process, every job, then the run-wide checks.
pub async fn run(config: &SoakConfig) -> SoakReport {
    let plan = issue_plan(config.seed, config.rate, config.max_latency);
    let fakes = Fakes::start(plan).await;
    let mut server = Server::start(&config.binary, &fakes.env(config.concurrency));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(config.concurrency)
        .build()
        .expect("client");
    let mut report = SoakReport {
        seed: config.seed,
        jobs: config.jobs,
        concurrency: config.concurrency,
        rate: config.rate,
        ..SoakReport::default()
    };
    if healthz(&client, &server).await.is_none() {
        report
            .violations
            .push("the server is not healthy at start".into());
    }
    report.rss_start_kib = server.rss_kib().0;

    let started = Instant::now();
    let url = server.url("");
    let done = AtomicUsize::new(0);
    let every = (config.jobs / 10).max(1);
    let runs: Vec<JobRun> = futures::stream::iter(0..config.jobs)
        .map(|i| run_job(&client, &url, i, config.seed, config.job_timeout))
        .buffer_unordered(config.concurrency)
        .inspect(|_| {
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if config.progress && n.is_multiple_of(every) {
                eprintln!(
                    "soak: {n}/{} jobs after {:.0} s",
                    config.jobs,
                    started.elapsed().as_secs_f64()
                );
            }
        })
        .collect()
        .await;
    report.wall = started.elapsed();

    // Per job.
    let mut branches: HashMap<String, usize> = HashMap::new();
    let mut succeeded_prs: HashMap<String, String> = HashMap::new();
    for run in &runs {
        report.violations.extend(job_violations(run, false));
        for e in &run.events {
            if e.data["type"] == "Error" {
                let code = format!(
                    "{} at {}",
                    e.data["code"].as_str().unwrap_or("?"),
                    e.data["step"].as_str().unwrap_or("?")
                );
                *report.error_codes.entry(code).or_insert(0) += 1;
            }
        }
        let Some(done) = run.done() else {
            report.other += 1;
            continue;
        };
        match done["status"].as_str() {
            Some("succeeded") => {
                report.succeeded += 1;
                if let (Some(url), Some(branch)) =
                    (done["pr_url"].as_str(), done["branch"].as_str())
                {
                    succeeded_prs.insert(url.to_owned(), branch.to_owned());
                }
            }
            Some("failed") => {
                report.failed += 1;
                let code = done["error"]["code"].as_str().unwrap_or("?").to_owned();
                *report.failure_codes.entry(code).or_insert(0) += 1;
            }
            _ => report.other += 1,
        }
        if let Some(branch) = done["branch"].as_str() {
            *branches.entry(branch.to_owned()).or_insert(0) += 1;
        }
    }
    for (branch, n) in &branches {
        if *n > 1 {
            report
                .violations
                .push(format!("branch {branch} was reported by {n} jobs"));
        }
    }

    // The pull requests GitHub holds: each a succeeded job's, with its branch, one per branch.
    let web = format!("http://{}", fakes.github.addr);
    let pulls = fakes.github.pulls();
    report.pull_requests = pulls.len();
    let mut per_branch: HashMap<(String, String), usize> = HashMap::new();
    let mut found: HashSet<String> = HashSet::new();
    for p in &pulls {
        let url = format!("{web}/{}/pull/{}", p.repo, p.number);
        *per_branch
            .entry((p.head_repo.clone(), p.head_ref.clone()))
            .or_insert(0) += 1;
        match succeeded_prs.get(&url) {
            Some(branch) if *branch == p.head_ref => {
                found.insert(url);
            }
            Some(branch) => report.violations.push(format!(
                "{url} has head {} but its job reported branch {branch}",
                p.head_ref
            )),
            None => report.violations.push(format!(
                "{url} (head {}:{}) belongs to no job reported succeeded",
                p.head_repo, p.head_ref
            )),
        }
    }
    for ((repo, branch), n) in per_branch {
        if n > 1 {
            report
                .violations
                .push(format!("branch {repo}:{branch} has {n} pull requests"));
        }
    }
    for url in succeeded_prs.keys() {
        if !found.contains(url) {
            report.violations.push(format!(
                "{url} was reported but GitHub has no such pull request"
            ));
        }
    }

    // Sandboxes: every one killed by the service (the cleaner may still be at it for a while).
    let settle_until = Instant::now() + config.settle;
    let mut health = None;
    loop {
        health = healthz(&client, &server).await.or(health);
        let pending = health
            .as_ref()
            .and_then(|h| h["cleanup_pending"].as_u64())
            .unwrap_or(u64::MAX);
        if (pending == 0 && fakes.e2b.live_sandboxes() == 0) || Instant::now() > settle_until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match &health {
        Some(h) if h["status"] == "ok" => {}
        _ => report
            .violations
            .push("the server is not healthy after the run".into()),
    }
    report.sandboxes_created = fakes.e2b.created_sandboxes();
    report.sandboxes_killed = fakes.e2b.killed_sandboxes();
    if fakes.e2b.live_sandboxes() != 0 {
        report.violations.push(format!(
            "{} sandbox(es) still alive {} s after the last job",
            fakes.e2b.live_sandboxes(),
            config.settle.as_secs()
        ));
    }
    if fakes.e2b.expired_sandboxes() != 0 {
        report.violations.push(format!(
            "{} sandbox(es) ran past their lifetime instead of being killed",
            fakes.e2b.expired_sandboxes()
        ));
    }

    // Memory: the peak, and back near the start once the jobs are over. Finished jobs stay
    // queryable (JOB_RETENTION_MAX_JOBS, 500 by default), so "near" allows for those.
    let (rss_end, rss_peak) = server.rss_kib();
    report.rss_end_kib = rss_end;
    report.rss_peak_kib = rss_peak;
    let allowed = report.rss_start_kib + RSS_SLACK_KIB;
    if rss_end > allowed {
        report.violations.push(format!(
            "RSS after the run is {} MiB, more than {} MiB (start {} MiB + {} MiB)",
            rss_end / 1024,
            allowed / 1024,
            report.rss_start_kib / 1024,
            RSS_SLACK_KIB / 1024
        ));
    }

    // The log, to its last line.
    server.sigterm();
    match server.wait_exit(Duration::from_secs(90)) {
        Some(status) if status.success() => {}
        Some(status) => report
            .violations
            .push(format!("the server exited with {status} after SIGTERM")),
        None => report
            .violations
            .push("the server did not exit within 90 s of SIGTERM".into()),
    }
    report.log_lines = server.log_lines.load(Ordering::Relaxed);
    for line in server.leaks.lock().unwrap().iter() {
        report
            .violations
            .push(format!("a log line holds a secret: {line}"));
    }
    report.injected = fakes.plan.injected();
    report.requests = fakes.plan.seen();
    report
}

/// How far above its starting RSS the server may stay once every job is over: the retained
/// finished jobs (500 at most by default, each a few dozen events), allocator caches, and the
/// HTTP clients' connection pools.
pub const RSS_SLACK_KIB: u64 = 96 * 1024;
