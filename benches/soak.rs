//! The fault soak at any size (`scripts/soak`, or `cargo bench --bench soak -- --jobs N`): N jobs
//! at a given concurrency through a real `tiny-backspace serve` whose E2B, Anthropic, OpenAI and
//! GitHub are in-process fakes failing at random at issue 12's rates times `--rate`. Prints the
//! seed (pass it back with `--seed` to meet the same faults), the wall time, jobs per second,
//! the server's RSS, the error codes seen, the faults injected, and every broken guarantee; exits
//! 1 when any guarantee broke.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

#[path = "../tests/support/fake_anthropic.rs"]
mod fake_anthropic;
#[path = "../tests/support/fake_e2b.rs"]
mod fake_e2b;
#[path = "../tests/support/fake_github.rs"]
mod fake_github;
#[path = "../tests/support/fake_openai.rs"]
mod fake_openai;
#[path = "../tests/support/faults.rs"]
mod faults;
#[path = "../tests/support/soak.rs"]
mod soak;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: soak [--jobs N (1000)] [--concurrency C (16)] [--seed S (random)] \
[--rate R (1.0: issue 12's rates)] [--latency-ms L (3)] [--settle-secs T (180)]";

fn main() {
    let mut config = soak::SoakConfig::new(PathBuf::from(env!("CARGO_BIN_EXE_tiny-backspace")));
    config.progress = true;
    config.seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 % 1_000_000_007)
        .unwrap_or(1);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> String {
            args.next()
                .unwrap_or_else(|| panic!("{name} needs a value\n{USAGE}"))
        };
        match arg.as_str() {
            "--jobs" => config.jobs = value("--jobs").parse().expect(USAGE),
            "--concurrency" => config.concurrency = value("--concurrency").parse().expect(USAGE),
            "--seed" => config.seed = value("--seed").parse().expect(USAGE),
            "--rate" => config.rate = value("--rate").parse().expect(USAGE),
            "--latency-ms" => {
                config.max_latency =
                    Duration::from_millis(value("--latency-ms").parse().expect(USAGE))
            }
            "--settle-secs" => {
                config.settle = Duration::from_secs(value("--settle-secs").parse().expect(USAGE))
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            // `cargo bench` passes `--bench`; other harness flags mean nothing here.
            _ => {}
        }
    }
    println!(
        "soak: seed {} · {} jobs · concurrency {} · rate ×{} (reproduce with --seed {})",
        config.seed, config.jobs, config.concurrency, config.rate, config.seed
    );
    // The fake GitHub runs git under a lock, blocking its worker: give the fakes room.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(6)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(soak::run(&config));
    print!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
}
