//! The `tiny-backspace` binary: `serve` (the HTTP service) and `run` (one job in the terminal).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use tiny_backspace::config::{Config, LogFormat};
use tiny_backspace::event::{DoneStatus, EventKind, StepState};
use tiny_backspace::http::{AppState, MetricsAccess, router};
use tiny_backspace::job::{JobRegistry, JobRequest};
use tiny_backspace::redact::Redactor;
use tiny_backspace::sandbox::local::launcher;
use tiny_backspace::telemetry::Tracing;

#[derive(Parser)]
#[command(
    name = "tiny-backspace",
    version,
    about = "Turns a repository URL and a plain-language request into a pull request."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP service on HOST:PORT (the default).
    Serve,
    /// Run one job in the terminal.
    Run {
        /// Repository URL or local path.
        #[arg(long)]
        repo: String,
        /// What to change, in plain language.
        #[arg(long)]
        prompt: String,
        /// One JSON event per line instead of readable progress.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        base_branch: Option<String>,
        /// Open the pull request as a draft.
        #[arg(long)]
        draft: bool,
        /// Head branch name (default: generated, unique per job).
        #[arg(long)]
        branch: Option<String>,
    },
}

fn main() -> ExitCode {
    // The sandbox launcher: confine this process, then exec the command. Handled before anything
    // else so that it reads no configuration and starts no runtime.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("__sandbox-exec") {
        return match launcher::parse_arguments(&args[2..]) {
            Ok((spec, program)) => launcher::run(&spec, &program),
            Err(err) => {
                eprintln!("tiny-backspace __sandbox-exec: {err}");
                ExitCode::from(launcher::EXIT_CONFINEMENT_FAILED as u8)
            }
        };
    }
    let cli = Cli::parse();
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(err) => {
            eprintln!("configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    // `run` prints its own progress; its logs are for problems only unless RUST_LOG says otherwise.
    let default_level = match &cli.command {
        Some(Command::Run { .. }) => "warn",
        Some(Command::Serve) | None => "info",
    };
    let tracing = match init_logging(&config, default_level) {
        Ok(tracing) => tracing,
        Err(err) => {
            eprintln!("configuration error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("could not start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => serve(config).await.map(|()| ExitCode::SUCCESS),
            Command::Run {
                repo,
                prompt,
                json,
                base_branch,
                draft,
                branch,
            } => run(config, repo, prompt, json, base_branch, draft, branch).await,
        }
    });
    if let Some(tracing) = &tracing {
        tracing.shutdown();
    }
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Log lines go through the redactor too: a secret that slipped into a message prints as
/// `[REDACTED]`.
#[derive(Clone)]
struct RedactingStderr(Redactor);

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.0.redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// The log on stderr and, with an OTLP endpoint configured, the trace exporter (returned, to be
/// flushed at exit). Each has its own filter: `RUST_LOG` says what is logged, traces always carry
/// the job, step and call spans.
fn init_logging(config: &Config, default_level: &str) -> Result<Option<Tracing>, String> {
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let redactor = config.redactor();
    let writer = move || RedactingStderr(redactor.clone());
    let log = tracing_subscriber::fmt::layer().with_writer(writer);
    let log = match config.log_format {
        LogFormat::Json => log.json().boxed(),
        LogFormat::Pretty => log.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    let tracing = Tracing::from_env(&|k| config.var(k))?;
    let traces = tracing.as_ref().map(|t| {
        t.layer()
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(traces)
        .init();
    Ok(tracing)
}

/// How long shutdown waits for cancelled jobs to clean up their sandboxes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(60);

fn launcher() -> anyhow::Result<PathBuf> {
    std::env::current_exe()
        .context("cannot find this program's path (needed to launch sandboxed commands)")
}

async fn serve(config: Config) -> anyhow::Result<()> {
    config.check_open_server().map_err(|e| anyhow::anyhow!(e))?;
    tiny_backspace::http::raise_descriptor_limit();
    let backends = config
        .backends(launcher()?)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let store = config.open_store().await.map_err(|e| anyhow::anyhow!(e))?;
    let registry = JobRegistry::start(Arc::new(backends), config.limits.clone(), store)
        .await
        .map_err(|e| anyhow::anyhow!("DATABASE_URL: the job store failed at start: {e}"))?;
    let state = Arc::new(AppState {
        registry: registry.clone(),
        repo_policy: config.repo_policy(false),
        api_keys: config.api_keys.clone(),
        admin_api_keys: config.admin_api_keys.clone(),
        allowed_hosts: config.allowed_hosts.clone(),
        cors_origins: config.cors_origins.clone(),
        metrics: MetricsAccess {
            handle: Some(tiny_backspace::telemetry::metrics().map_err(|e| anyhow::anyhow!(e))?),
            token: config.var("METRICS_TOKEN").filter(|t| !t.trim().is_empty()),
        },
    });
    let addr = format!("{}:{}", config.host, config.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(
        addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or(addr),
        sandbox = registry.backends().sandbox.name(),
        isolation = registry.backends().sandbox.isolation(),
        limits = registry.backends().sandbox.limits(),
        agents = ?registry.backends().agent_names(),
        forge = registry.backends().forges.remote_name(),
        auth = !config.api_keys.is_empty(),
        "tiny-backspace listening"
    );
    // Signals are counted: the first starts an orderly shutdown, a second cuts it short.
    let signals = {
        let (count_tx, count_rx) = tokio::sync::watch::channel(0u32);
        tokio::spawn(async move {
            loop {
                shutdown_signal().await;
                count_tx.send_modify(|n| *n += 1);
            }
        });
        count_rx
    };
    let after = |n: u32| {
        let mut signals = signals.clone();
        async move {
            let _ = signals.wait_for(|count| *count >= n).await;
        }
    };
    // On the first signal the jobs are cancelled, which ends every event stream with
    // `Done{cancelled}`; the listener closes and open connections get SHUTDOWN_GRACE_SECS.
    let first = {
        let registry = registry.clone();
        let signal = after(1);
        async move {
            signal.await;
            tracing::info!("shutting down: cancelling running jobs and destroying their sandboxes");
            tokio::spawn(async move { registry.shutdown(SHUTDOWN_GRACE).await });
        }
    };
    tokio::select! {
        _ = tiny_backspace::http::serve(listener, router(state), config.edge.clone(), first) => {}
        _ = after(2) => tracing::warn!("second signal: not waiting for open connections"),
    }
    tokio::select! {
        _ = registry.shutdown(SHUTDOWN_GRACE) => {}
        _ = after(2) => {
            tracing::warn!("second signal: exiting once the sandboxes are killed");
            registry.shutdown(Duration::from_secs(5)).await;
        }
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

async fn run(
    config: Config,
    repo: String,
    prompt: String,
    json: bool,
    base_branch: Option<String>,
    draft: bool,
    branch: Option<String>,
) -> anyhow::Result<ExitCode> {
    let repo = config
        .repo_policy(true)
        .parse(&repo)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let prompt = prompt.trim().to_owned();
    anyhow::ensure!(!prompt.is_empty(), "--prompt is empty");
    let backends = config
        .backends(launcher()?)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    // One job in the terminal keeps nothing after it: an in-memory store, so a `serve` using the
    // data directory's database is left alone.
    let store = tiny_backspace::store::open("sqlite::memory:")
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let registry = JobRegistry::start(Arc::new(backends), config.limits.clone(), store)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let job = registry
        .submit(JobRequest {
            repo,
            prompt,
            base_branch,
            draft,
            branch,
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut events = Box::pin(job.log().follow(0));
    let mut interrupted = false;
    let mut status = None;
    loop {
        tokio::select! {
            item = events.next() => {
                let Some(item) = item else { break };
                if json {
                    println!("{}", serde_json::to_string(&item.event)?);
                } else {
                    print_human(&item.event.kind);
                }
                if let EventKind::Done { status: s, .. } = &item.event.kind {
                    status = Some(*s);
                }
            }
            _ = tokio::signal::ctrl_c(), if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: cancelling the job (cleaning up the sandbox)…");
                if let Err(err) = job.cancel().await {
                    eprintln!("cancelling failed: {err}");
                }
            }
        }
    }
    // With nothing pushed (a GitHub repository and no token), the patch is the result: show it.
    let record = job.record().await;
    if !json
        && matches!(status, Some(DoneStatus::Succeeded))
        && record
            .as_ref()
            .is_some_and(|r| r.result.branch.is_none() && r.result.pr_url.is_none())
        && let Some((patch, truncated)) = job.patch().await
    {
        println!("\nNothing was pushed; the change as a patch (apply it with `git apply`):\n");
        print!("{}", String::from_utf8_lossy(&patch));
        if truncated {
            println!("[patch truncated]");
        }
    }
    registry.shutdown(Duration::from_secs(30)).await;
    Ok(match status {
        Some(DoneStatus::Succeeded) => ExitCode::SUCCESS,
        Some(DoneStatus::Cancelled) => ExitCode::from(130),
        _ => ExitCode::FAILURE,
    })
}

fn print_human(kind: &EventKind) {
    let one_line = |s: &str, max: usize| {
        let line = s.lines().next().unwrap_or("").trim();
        if line.chars().count() > max {
            format!("{}…", line.chars().take(max).collect::<String>())
        } else {
            line.to_owned()
        }
    };
    match kind {
        EventKind::JobStarted {
            job_id,
            repo_url,
            sandbox,
            agents,
            forge,
            ..
        } => {
            println!(
                "job {job_id}\n  repo {repo_url}\n  sandbox {sandbox}, agents {}, forge {forge}",
                agents.join(" → ")
            );
        }
        EventKind::Status {
            step,
            state,
            message,
            elapsed_ms,
        } => {
            let mark = match state {
                StepState::Started => "…",
                StepState::Succeeded => "✓",
                StepState::Failed => "✗",
                StepState::Skipped => "-",
            };
            let step = serde_json::to_value(step)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let time = elapsed_ms
                .map(|ms| format!(" ({ms} ms)"))
                .unwrap_or_default();
            println!("{mark} {step:<8} {message}{time}");
        }
        EventKind::AiMessage { message, provider } => {
            println!("  {provider}: {}", one_line(message, 160))
        }
        EventKind::ToolRead {
            filepath,
            start_line,
            end_line,
        } => match (start_line, end_line) {
            (Some(s), Some(e)) => println!("  read    {filepath}:{s}-{e}"),
            _ => println!("  read    {filepath}"),
        },
        EventKind::ToolEdit {
            filepath,
            old_str,
            new_str,
        } => {
            if old_str.is_empty() {
                println!("  edit    {filepath} (+{} lines)", new_str.lines().count());
            } else {
                println!(
                    "  edit    {filepath}: {:?} → {:?}",
                    one_line(old_str, 40),
                    one_line(new_str, 40)
                );
            }
        }
        EventKind::ToolBash {
            command, exit_code, ..
        } => println!("  $ {} (exit {exit_code})", one_line(command, 120)),
        EventKind::ToolSearch {
            pattern,
            path,
            matches,
        } => println!("  search  {pattern:?} in {path}: {matches} matches"),
        EventKind::AgentFallback { from, to, reason } => println!(
            "! {from} failed ({}); {to} continues",
            one_line(reason, 120)
        ),
        EventKind::Diff { files, .. } => {
            for f in files {
                println!(
                    "  {:<8} {} (+{} −{})",
                    serde_json::to_value(f.status)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    f.path,
                    f.additions,
                    f.deletions
                );
            }
        }
        EventKind::Verify {
            command,
            exit_code,
            passed,
        } => println!(
            "  verify  {command}: {} (exit {exit_code})",
            if *passed { "passed" } else { "failed" }
        ),
        EventKind::PrCreated { pr_url, draft, .. } => println!(
            "✓ pull request {pr_url}{}",
            if *draft { " (draft)" } else { "" }
        ),
        EventKind::Error { code, message, .. } => println!("✗ error [{code}] {message}"),
        EventKind::Done {
            status,
            branch,
            pr_url,
            duration_ms,
            summary,
            ..
        } => {
            let status = match status {
                DoneStatus::Succeeded => "succeeded",
                DoneStatus::Failed => "failed",
                DoneStatus::Cancelled => "cancelled",
            };
            println!("done: {status} in {:.1} s", *duration_ms as f64 / 1000.0);
            if let Some(pr) = pr_url {
                println!("  pull request: {pr}");
            }
            if let Some(branch) = branch {
                println!("  branch: {branch}");
            }
            if !summary.is_empty() {
                println!("  {}", one_line(summary, 200));
            }
        }
    }
}
