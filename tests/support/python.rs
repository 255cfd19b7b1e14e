//! Runs a conformance script from `tests/conformance/` with the pinned venv's interpreter.

use std::path::PathBuf;
use std::process::Output;

/// The venv interpreter. `scripts/setup-python.sh` (run by `scripts/test`) creates it; a missing
/// venv fails the test rather than skipping it, so CI cannot pass without the SDK checks.
pub fn python() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup-python.sh (scripts/test does it)",
        path.display()
    );
    path
}

/// Runs `tests/conformance/<script>` with `env`, off the async runtime, and returns its output.
pub async fn run_script(script: &str, env: Vec<(String, String)>) -> Output {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/conformance")
        .join(script);
    let python = python();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(script)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env)
            .output()
            .expect("python runs")
    })
    .await
    .expect("python task")
}

/// Asserts the script succeeded, showing its output otherwise.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "conformance script failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
