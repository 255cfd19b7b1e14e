#![allow(clippy::unwrap_used, clippy::expect_used)]
//! PyGithub (pinned in `tests/conformance/requirements.txt`) runs the whole flow against the fake
//! GitHub (`tests/conformance/github_sdk.py`), at `/` and under `/api/v3`. A missing venv fails the
//! test (see `support::python`).

mod support;

use std::process::Command;

use support::fake_github::{FakeGithub, SeedFile};

const ALICE: &str = "tok-alice-py-0123456789";
const BOB: &str = "tok-bob-py-0123456789";

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn pygithub_flow(prefix: &str) {
    let fake = FakeGithub::start_at(prefix).await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    let base = fake.create_repo(
        "alice",
        "widgets",
        &[
            SeedFile::text("README.md", "# Widgets\n"),
            SeedFile::text("old.txt", "to be deleted\n"),
            SeedFile::text("run.sh", "#!/bin/sh\necho hi\n"),
        ],
    );
    let env = vec![
        ("GITHUB_API_URL".to_owned(), fake.api_url()),
        ("FAKE_ROOT".to_owned(), format!("http://{}", fake.addr)),
        ("ALICE_TOKEN".to_owned(), ALICE.to_owned()),
        ("BOB_TOKEN".to_owned(), BOB.to_owned()),
    ];
    let out = support::python::run_script("github_sdk.py", env).await;
    support::python::assert_ok(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("ALL OK"));

    // What PyGithub built, seen by real git.
    let bare = fake.git_dir("alice/widgets");
    let first = git(&bare, &["rev-parse", "agent/x~1"]);
    assert_eq!(git(&bare, &["rev-parse", "agent/x~2"]).trim(), base);
    assert_eq!(
        git(&bare, &["diff", "--name-status", &base, first.trim()]),
        "M\tREADME.md\nA\tassets/logo.bin\nA\tdocs/link\nD\told.txt\nM\trun.sh\nA\tsrc/new/deep.txt\n"
    );
    let modes: Vec<String> = git(&bare, &["ls-tree", first.trim(), "run.sh", "docs/link"])
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            format!("{} {path}", meta.split(' ').next().unwrap())
        })
        .collect();
    assert_eq!(modes, ["120000 docs/link", "100755 run.sh"]);
    assert_eq!(
        git(&bare, &["log", "-1", "--format=%an|%ae|%aI", first.trim()]).trim(),
        "Tiny Backspace|tiny-backspace@users.noreply.github.com|2024-05-01T12:00:00Z"
    );
    assert!(fake.branch_sha("bob/widgets", "fix").is_some());
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 2);
    assert_eq!(pulls[1].head_repo, "bob/widgets");
    for r in fake.requests() {
        assert!(r.path.starts_with(prefix), "{}", r.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pygithub_runs_the_whole_flow_at_the_root() {
    pygithub_flow("").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pygithub_runs_the_whole_flow_under_api_v3() {
    pygithub_flow("/api/v3").await;
}
