//! The secret scan on the largest change a job may publish (run with
//! `cargo bench --bench secret_scan`): 64 MiB of new content, half source text and half random
//! binary, plus an 8 MiB diff, against six configured secrets. Building the automaton is timed
//! with the scan, as a job pays for both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Instant;

use common::stats;
use rand::RngCore;
use tiny_backspace::secret_scan::{ChangedText, SecretScanner};

const RUNS: usize = 15;

fn main() {
    let source: Vec<u8> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/src/job"))
        .unwrap()
        .flat_map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
        .collect();
    let mut text = Vec::with_capacity(32 << 20);
    while text.len() < 32 << 20 {
        text.extend_from_slice(&source);
    }
    text.truncate(32 << 20);
    let mut binary = vec![0u8; 32 << 20];
    rand::rng().fill_bytes(&mut binary);
    let diff = String::from_utf8_lossy(&text[..8 << 20]).into_owned();
    let secrets = [
        "ghp_BENCHCANARY_0a1b2c3d4e5f67890a1b",
        "sk-ant-api03-BENCHCANARY-9f8e7d6c5b4a3928aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789",
        "sk-proj-BENCHCANARY-abcdefABCDEF0123456789abcdefABCDEF",
        "e2b_0000000000000000000000000000000000000000",
        "service-key-one-0001",
        "service-key-two-0002",
    ];
    let files = [
        ChangedText {
            path: "src/generated.rs",
            content: Some(&text),
        },
        ChangedText {
            path: "assets/blob.bin",
            content: Some(&binary),
        },
    ];
    let mut samples = Vec::new();
    for _ in 0..RUNS {
        let started = Instant::now();
        let scanner = SecretScanner::new(secrets).unwrap();
        let findings = scanner.scan_change(&files, &diff);
        samples.push(started.elapsed());
        assert!(findings.is_empty(), "{findings:?}");
    }
    println!(
        "secret scan, 64 MiB of files + 8 MiB diff, 6 secrets: {}",
        stats(samples)
    );
}
