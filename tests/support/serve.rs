//! The real `tiny-backspace` binary as a child process: `run`, and `serve` on a free port.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The binary with a clean environment: no keys, so the dummy agent runs; each server its own
/// in-memory database unless the test names one (never `./data` in the checkout).
pub fn binary() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tiny-backspace"));
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", std::env::temp_dir())
        .env("DATABASE_URL", "sqlite::memory:");
    cmd
}

/// Starts `serve` on a free port and returns it with its address.
pub fn serve(envs: &[(&str, &str)]) -> (std::process::Child, String) {
    serve_with(binary(), envs)
}

/// [`serve`], with `command` (the binary, or a wrapper that runs it) as the program.
pub fn serve_with(mut command: Command, envs: &[(&str, &str)]) -> (std::process::Child, String) {
    let mut child = command
        .args(["serve"])
        .env("PORT", "0")
        // A wrapper (`prlimit`) may have cleared the environment `binary()` sets.
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
