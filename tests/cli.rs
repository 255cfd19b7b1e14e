//! The `tiny-backspace` binary itself: `run` (progress, `--json`, exit status) and `serve`
//! (a real socket, a streamed job, SIGTERM during a job).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::harness::{git, repo_with};

fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiny-backspace"));
    // A clean environment: no keys, so the dummy agent runs; workspaces in a temp dir.
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir());
    cmd
}

#[test]
fn run_prints_json_events_and_exits_zero_on_success() {
    let repo = repo_with(&[("notes.md", "one\n")]);
    let workspaces = tempfile::tempdir().unwrap();
    let out = binary()
        .current_dir(repo.path())
        .env("WORKSPACE_DIR", workspaces.path())
        .args([
            "run",
            "--repo",
            ".",
            "--prompt",
            "append \"two\" to notes.md",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let events: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["type"], "Job Started");
    let done = events.last().unwrap();
    assert_eq!(
        (done["type"].as_str(), done["status"].as_str()),
        (Some("Done"), Some("succeeded"))
    );
    let branch = done["branch"].as_str().unwrap();
    assert_eq!(
        git(repo.path(), &["show", &format!("{branch}:notes.md")]),
        "one\ntwo\n"
    );
    assert_eq!(std::fs::read_dir(workspaces.path()).unwrap().count(), 0);
}

#[test]
fn run_shows_readable_progress_and_fails_with_a_non_zero_status() {
    let repo = repo_with(&[("notes.md", "one\n")]);
    let workspaces = tempfile::tempdir().unwrap();
    let out = binary()
        .env("WORKSPACE_DIR", workspaces.path())
        .args(["run", "--repo"])
        .arg(repo.path())
        .args(["--prompt", "replace \"absent\" with \"x\" in notes.md"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("✓ clone"), "{stdout}");
    assert!(stdout.contains("read    notes.md"), "{stdout}");
    assert!(stdout.contains("done: failed"), "{stdout}");
    // A bad repository is refused before anything runs.
    let out = binary()
        .args(["run", "--repo", "/nonexistent/repo", "--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("local repository"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // So is a bad setting.
    let out = binary()
        .env("SANDBOX", "docker")
        .args(["run", "--repo", ".", "--prompt", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SANDBOX must be"));
}

/// Starts `serve` on a free port and returns it with its address.
fn serve(envs: &[(&str, &str)]) -> (std::process::Child, String) {
    serve_with(binary(), envs)
}

/// [`serve`], with `command` (the binary, or a wrapper that runs it) as the program.
fn serve_with(mut command: Command, envs: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = command
        .args(["serve"])
        .env("PORT", "0")
        // Each server its own database unless the test names one.
        .env("DATABASE_URL", "sqlite::memory:")
        .envs(envs.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        assert!(Instant::now() < deadline, "serve did not start");
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        if let Some(rest) = line.split("addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = String::new();
        let _ = stderr.read_to_string(&mut sink);
    });
    (child, addr)
}

fn http(addr: &str, request: &str) -> std::net::TcpStream {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    stream
}

#[test]
fn serve_streams_a_job_and_sigterm_cancels_running_jobs() {
    let repo = repo_with(&[("notes.md", "one\n")]);
    let workspaces = tempfile::tempdir().unwrap();
    // A "model" that accepts connections and never answers keeps the job in its agent step.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let model_url = format!("http://{}/v1", silent.local_addr().unwrap());
    let (mut server, addr) = serve(&[
        ("ALLOW_LOCAL_REPOS", "true"),
        ("WORKSPACE_DIR", workspaces.path().to_str().unwrap()),
        ("OPENAI_API_KEY", "sk-canary-cli-0123456789"),
        ("OPENAI_BASE_URL", &model_url),
        ("AGENTS", "openai,dummy"),
    ]);
    let mut health = String::new();
    http(
        &addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .read_to_string(&mut health)
    .unwrap();
    assert!(
        health.contains(r#""agents":["openai","dummy"]"#),
        "{health}"
    );

    let body = serde_json::json!({"repoUrl": repo.path().display().to_string(), "prompt": "x"})
        .to_string();
    let stream = http(
        &addr,
        &format!(
            "POST /code HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let mut reader = BufReader::new(stream);
    let mut seen = String::new();
    // Wait for the agent step, then ask the server to stop.
    while !seen.contains(r#""step":"agent","state":"started""#) {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early: {seen}"
        );
        seen.push_str(&line);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    seen.push_str(&rest);
    assert!(
        seen.contains(r#""type":"Done","status":"cancelled""#),
        "{seen}"
    );
    let status = server.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!seen.contains("sk-canary-cli"));
    assert_eq!(
        std::fs::read_dir(workspaces.path()).unwrap().count(),
        0,
        "sandbox cleaned up"
    );
    drop(silent);
}

/// Authentication fails closed: a key variable that names no key, or a non-loopback address with
/// no key at all, stops `serve` before it listens.
#[test]
fn serve_refuses_to_start_open_by_mistake() {
    let workspaces = tempfile::tempdir().unwrap();
    for (envs, expected) in [
        (vec![("API_KEYS", ",")], "API_KEYS is set but names no key"),
        (vec![("API_KEYS", " ")], "API_KEYS is set but names no key"),
        (vec![("HOST", "0.0.0.0")], "without API_KEYS"),
    ] {
        let out = binary()
            .env("WORKSPACE_DIR", workspaces.path())
            .env("PORT", "0")
            .envs(envs.iter().copied())
            .arg("serve")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{envs:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{envs:?}: {stderr}");
    }
}

/// With only 256 descriptors, 300 idle connections do not lock the service out: it keeps its
/// connections within the limit by closing the quietest, and `/healthz` is answered at once.
#[test]
fn idle_connections_beyond_the_descriptor_limit_leave_healthz_answering() {
    let workspaces = tempfile::tempdir().unwrap();
    let mut command = Command::new("prlimit");
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .args([
            "--nofile=256:256",
            "--",
            env!("CARGO_BIN_EXE_tiny-backspace"),
        ]);
    let workspaces_path = workspaces.path().display().to_string();
    let (mut server, addr) = serve_with(command, &[("WORKSPACE_DIR", &workspaces_path)]);
    let idle: Vec<std::net::TcpStream> = (0..300)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut health = String::new();
    http(
        &addr,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .read_to_string(&mut health)
    .unwrap();
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    drop(idle);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(server.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(server.wait().unwrap().success());
}
