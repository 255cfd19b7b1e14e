//! What isolation costs per command on the local sandbox (run with `cargo bench --bench
//! sandbox`): `true` run through `Sandbox::exec` at each isolation level that works here, next
//! to spawning `bash -c true` directly. The difference is the launcher: namespaces, the minimal
//! root, Landlock, seccomp, and the limit bookkeeping around the command.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::stats;
use std::path::PathBuf;
use std::time::Instant;

use tiny_backspace::sandbox::local::isolation::IsolationChoice;
use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};
use tiny_backspace::sandbox::{ExecRequest, SandboxProvider};

const RUNS: usize = 200;

fn launcher() -> PathBuf {
    // The benchmark binary lives in target/<profile>/deps; the service binary one level up.
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("tiny-backspace")
}

#[tokio::main]
async fn main() {
    let launcher = launcher();
    assert!(
        launcher.exists(),
        "build the binary first: cargo build --release --bin tiny-backspace"
    );
    let root = tempfile::tempdir().unwrap();

    let mut direct = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let status = tokio::process::Command::new("/bin/bash")
            .args(["-c", "true"])
            .status()
            .await
            .unwrap();
        assert!(status.success());
        direct.push(started.elapsed());
    }
    println!("bash -c true, spawned directly          {}", stats(direct));

    for (name, choice) in [
        ("namespaces", IsolationChoice::Namespaces),
        ("landlock", IsolationChoice::Landlock),
    ] {
        let mut config = LocalConfig::new(launcher.clone());
        config.root = root.path().join(name);
        config.isolation = choice;
        let provider = match LocalProvider::new(config).await {
            Ok(provider) => provider,
            Err(e) => {
                println!("{name:<10} unavailable here: {e}");
                continue;
            }
        };
        let sandbox = provider.create(&format!("bench-{name}")).await.unwrap();
        let mut samples = Vec::new();
        for _ in 0..RUNS {
            let started = Instant::now();
            let out = sandbox.exec(&ExecRequest::new("true")).await.unwrap();
            assert_eq!(out.exit_code, 0, "{}", out.combined());
            samples.push(started.elapsed());
        }
        println!(
            "exec(\"true\"), {name:<10} ({:<7})   {}",
            provider.limits(),
            stats(samples)
        );
        sandbox.kill().await.unwrap();
    }
}
