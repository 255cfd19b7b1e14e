//! What the benchmarks share: a generated repository, the bare-git baseline, and the summary line.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

pub fn git(dir: &Path, args: &[&str]) {
    let status = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Bench",
            "-c",
            "user.email=bench@example.com",
        ])
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "git {args:?}");
}

/// A repository of `n` Python files (~80 lines each) in nested directories, plus `app.py`.
pub fn make_repo(dir: &Path, n: usize) {
    git(dir, &["init", "-q", "-b", "main"]);
    for i in 0..n {
        let path = dir.join(format!("pkg{}/mod{}/file{i}.py", i % 10, i % 7));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let body: String = (0..40)
            .map(|l| format!("def f{i}_{l}(x):\n    return x + {l}\n"))
            .collect();
        std::fs::write(path, body).unwrap();
    }
    std::fs::write(
        dir.join("app.py"),
        "def greet(name):\n    return \"Hello \" + name\n",
    )
    .unwrap();
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", "initial"]);
}

/// `git clone --depth 1` + the same edit the dummy job makes + `git diff`, timed `runs` times.
pub fn bare_git(repo: &Path, runs: usize) -> Vec<Duration> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let scratch = tempfile::tempdir().unwrap();
        let started = Instant::now();
        git(
            scratch.path(),
            &[
                "clone",
                "-q",
                "--depth",
                "1",
                &format!("file://{}", repo.display()),
                "c",
            ],
        );
        let clone = scratch.path().join("c");
        std::fs::write(
            clone.join("app.py"),
            "def greet(name):\n    return \"Hi, \" + name\n",
        )
        .unwrap();
        git(&clone, &["diff"]);
        samples.push(started.elapsed());
    }
    samples
}

/// Median, p90 and minimum of the samples.
pub fn stats(mut samples: Vec<Duration>) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let median = samples[samples.len() / 2];
    let p90 = samples[(samples.len() * 9 / 10).min(samples.len() - 1)];
    format!(
        "median {:8.2} ms   p90 {:8.2} ms   min {:8.2} ms   (n={})",
        ms(median),
        ms(p90),
        ms(samples[0]),
        samples.len()
    )
}
