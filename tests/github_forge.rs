#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `github` forge against the fake GitHub: the published branch checked with real git, the
//! fork flow, the request budget, error mapping, idempotency, and the token staying in the
//! Authorization header.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pretty_assertions::assert_eq;
use support::fake_github::{FakeGithub, Fault, SeedFile};
use tiny_backspace::event::FileStatus;
use tiny_backspace::forge::github::{GithubConfig, GithubForge};
use tiny_backspace::forge::local::LocalForge;
use tiny_backspace::forge::{
    ChangeSet, ChangedFile, Forge, ForgeError, PublishMode, PullRequestDraft, RepoInfo,
};
use tiny_backspace::repo::RepoRef;
use tiny_backspace::retry::RetryPolicy;
use tiny_backspace::sandbox::{FileContent, RepoPath};

const ALICE: &str = "tok-alice-0123456789";
const BOB: &str = "tok-bob-0123456789";

fn remote(owner: &str, name: &str) -> RepoRef {
    RepoRef::Remote {
        host: "github.com".into(),
        owner: owner.into(),
        name: name.into(),
    }
}

/// The forge's retry policy with test-sized waits: a quick backoff, and server-requested waits
/// honoured up to 2 s. (How many retries fit is the step deadline's business: see [`forge`].)
fn quick_retry() -> RetryPolicy {
    RetryPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        max_retry_after: Duration::from_secs(2),
        ..tiny_backspace::forge::github::default_retry()
    }
}

fn forge(fake: &FakeGithub, token: &str) -> GithubForge {
    GithubForge::new(GithubConfig {
        token: token.into(),
        api_url: fake.api_url(),
    })
    .unwrap()
    .with_fork_wait(Duration::from_secs(10), Duration::from_millis(50))
    .with_retry_policy(quick_retry())
    .with_step_deadline(STEP)
}

/// The forge's step deadline in these tests.
const STEP: Duration = Duration::from_millis(1500);

fn file(path: &str, status: FileStatus, content: FileContent) -> ChangedFile {
    ChangedFile {
        path: RepoPath::parse(path).unwrap(),
        status,
        additions: 1,
        deletions: 0,
        content,
    }
}

fn text(path: &str, s: &str) -> ChangedFile {
    file(
        path,
        FileStatus::Modified,
        FileContent::File {
            bytes: s.as_bytes().to_vec(),
            executable: false,
        },
    )
}

fn change(base: &str, files: Vec<ChangedFile>) -> ChangeSet {
    ChangeSet {
        base_commit: base.into(),
        files,
        patch: String::new(),
        patch_truncated: false,
    }
}

fn draft(title: &str) -> PullRequestDraft {
    PullRequestDraft {
        title: title.into(),
        body: "What changed and why.".into(),
        draft: false,
    }
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn seed() -> Vec<SeedFile> {
    vec![
        SeedFile::text("README.md", "# Widgets\n"),
        SeedFile::text("old.txt", "to be deleted\n"),
        SeedFile::text("run.sh", "#!/bin/sh\necho hi\n"),
        SeedFile::text("src/lib.rs", "pub fn f() {}\n"),
    ]
}

/// Every kind of change: edit, deletion, binary, executable bit, symlink, new nested file.
fn every_kind(base: &str) -> ChangeSet {
    change(
        base,
        vec![
            text("README.md", "# Widgets\n\nNow with more widgets.\n"),
            file("old.txt", FileStatus::Deleted, FileContent::Missing),
            file(
                "assets/logo.bin",
                FileStatus::Added,
                FileContent::File {
                    bytes: vec![0, 159, 146, 150, 255, 0, 1, 2, b'\n'],
                    executable: false,
                },
            ),
            file(
                "run.sh",
                FileStatus::Modified,
                FileContent::File {
                    bytes: b"#!/bin/sh\necho hi\n".to_vec(),
                    executable: true,
                },
            ),
            file(
                "docs/readme-link",
                FileStatus::Added,
                FileContent::Symlink {
                    target: "../README.md".into(),
                },
            ),
            file(
                "src/new/mod.rs",
                FileStatus::Added,
                FileContent::File {
                    bytes: "// ünïcödé\r\nfn g() {}\n".as_bytes().to_vec(),
                    executable: false,
                },
            ),
        ],
    )
}

/// The tree `LocalForge` (git plumbing) makes of the same change on a clone of the repository.
async fn expected_tree(bare: &Path, change: &ChangeSet) -> String {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    git(
        dir.path(),
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
    let repo = RepoRef::Local { path: work.clone() };
    let info = LocalForge.prepare(&repo, Some("main")).await.unwrap();
    LocalForge
        .push_branch(&info, change, "expected", "expected\n")
        .await
        .unwrap();
    git(&work, &["rev-parse", "expected^{tree}"])
        .trim()
        .to_owned()
}

async fn publish_every_kind_of_change(prefix: &str) {
    let fake = FakeGithub::start_at(prefix).await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    assert_eq!(forge.name(), "github");

    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    assert_eq!(info.base_branch.as_deref(), Some("main"));
    assert_eq!(info.base_commit.as_deref(), Some(base.as_str()));
    assert_eq!(info.publish, PublishMode::Push);
    let bare = fake.git_dir("alice/widgets");
    assert_eq!(info.clone_url, format!("file://{}", bare.display()));

    let change = every_kind(&base);
    let message = "Add more widgets\n\nBody of the commit.\n";
    let pushed = forge
        .push_branch(&info, &change, "tiny-backspace/widgets-1a2b", message)
        .await
        .unwrap();
    assert_eq!(pushed.branch, "tiny-backspace/widgets-1a2b");
    assert_eq!(pushed.head_ref, "tiny-backspace/widgets-1a2b");
    assert_eq!(
        fake.branch_sha("alice/widgets", "tiny-backspace/widgets-1a2b"),
        Some(pushed.commit.clone())
    );

    // Real git: one commit on the base, by Tiny Backspace, holding exactly the change.
    let branch = "refs/heads/tiny-backspace/widgets-1a2b";
    assert_eq!(
        git(&bare, &["rev-list", "--parents", "-n1", branch]).trim(),
        format!("{} {base}", pushed.commit)
    );
    assert_eq!(
        git(
            &bare,
            &["log", "-1", "--format=%an <%ae>|%cn <%ce>", branch]
        )
        .trim(),
        "Tiny Backspace <tiny-backspace@users.noreply.github.com>|Tiny Backspace <tiny-backspace@users.noreply.github.com>"
    );
    assert_eq!(
        git(&bare, &["cat-file", "-p", branch])
            .split_once("\n\n")
            .unwrap()
            .1,
        message
    );
    assert_eq!(
        git(&bare, &["diff", "--name-status", &base, branch]),
        "M\tREADME.md\nA\tassets/logo.bin\nA\tdocs/readme-link\nD\told.txt\nM\trun.sh\nA\tsrc/new/mod.rs\n"
    );
    let ls = git(&bare, &["ls-tree", "-r", branch]);
    let modes: Vec<(&str, &str)> = ls
        .lines()
        .map(|l| {
            let (meta, path) = l.split_once('\t').unwrap();
            (path, meta.split(' ').next().unwrap())
        })
        .collect();
    assert_eq!(
        modes,
        vec![
            ("README.md", "100644"),
            ("assets/logo.bin", "100644"),
            ("docs/readme-link", "120000"),
            ("run.sh", "100755"),
            ("src/lib.rs", "100644"),
            ("src/new/mod.rs", "100644"),
        ]
    );
    let blob = |path: &str| {
        let out = Command::new("git")
            .arg("-C")
            .arg(&bare)
            .args(["cat-file", "blob", &format!("{branch}:{path}")])
            .output()
            .unwrap();
        out.stdout
    };
    assert_eq!(
        blob("assets/logo.bin"),
        vec![0, 159, 146, 150, 255, 0, 1, 2, b'\n']
    );
    assert_eq!(blob("docs/readme-link"), b"../README.md");
    assert_eq!(
        blob("src/new/mod.rs"),
        "// ünïcödé\r\nfn g() {}\n".as_bytes()
    );
    // One tree request: inline text, the uploaded blob, an explicit deletion, real modes.
    let requests = fake.requests();
    let tree_body: serde_json::Value = serde_json::from_str(
        &requests
            .iter()
            .find(|r| r.method == "POST" && r.path.ends_with("/git/trees"))
            .unwrap()
            .body,
    )
    .unwrap();
    let base_tree = git(&bare, &["rev-parse", &format!("{base}^{{tree}}")]);
    let logo = git(&bare, &["rev-parse", &format!("{branch}:assets/logo.bin")]);
    assert_eq!(
        tree_body,
        serde_json::json!({
            "base_tree": base_tree.trim(),
            "tree": [
                {"path": "README.md", "mode": "100644", "type": "blob", "content": "# Widgets\n\nNow with more widgets.\n"},
                {"path": "old.txt", "mode": "100644", "type": "blob", "sha": null},
                {"path": "assets/logo.bin", "mode": "100644", "type": "blob", "sha": logo.trim()},
                {"path": "run.sh", "mode": "100755", "type": "blob", "content": "#!/bin/sh\necho hi\n"},
                {"path": "docs/readme-link", "mode": "120000", "type": "blob", "content": "../README.md"},
                {"path": "src/new/mod.rs", "mode": "100644", "type": "blob", "content": "// ünïcödé\r\nfn g() {}\n"},
            ],
        })
    );
    // The same tree git plumbing (the local forge) makes of the same change.
    assert_eq!(
        git(&bare, &["rev-parse", &format!("{branch}^{{tree}}")]).trim(),
        expected_tree(&bare, &change).await
    );

    let pr = forge
        .open_pull_request(
            &info,
            &pushed,
            &PullRequestDraft {
                title: "Add more widgets".into(),
                body: "Body".into(),
                draft: true,
            },
        )
        .await
        .unwrap()
        .unwrap();
    let web = fake.api_url().trim_end_matches(prefix).to_owned();
    assert_eq!(pr.url, format!("{web}/alice/widgets/pull/1"));
    assert_eq!((pr.number, pr.draft), (1, true));
    let pulls = fake.pulls();
    assert_eq!(pulls.len(), 1);
    let p = &pulls[0];
    assert_eq!(
        (
            p.repo.as_str(),
            p.head_repo.as_str(),
            p.head_ref.as_str(),
            p.base_ref.as_str()
        ),
        (
            "alice/widgets",
            "alice/widgets",
            "tiny-backspace/widgets-1a2b",
            "main"
        )
    );
    assert_eq!(
        (p.title.as_str(), p.body.as_deref(), p.draft),
        ("Add more widgets", Some("Body"), true)
    );

    // Every request went under the prefix, authenticated with the token.
    for r in fake.requests() {
        assert!(
            r.path.starts_with(&format!("{prefix}/repos/alice/widgets")),
            "{}",
            r.path
        );
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {ALICE}").as_str())
        );
        assert!(
            r.other_headers
                .iter()
                .any(|h| h == "x-github-api-version: 2022-11-28"),
            "{:?}",
            r.other_headers
        );
    }
}

#[tokio::test]
async fn publishes_exactly_the_change_at_the_root() {
    publish_every_kind_of_change("").await;
}

#[tokio::test]
async fn publishes_exactly_the_change_under_api_v3() {
    publish_every_kind_of_change("/api/v3").await;
}

#[tokio::test]
async fn a_pull_request_costs_seven_requests_whatever_the_number_of_text_files() {
    for n in [1usize, 10, 200] {
        let fake = FakeGithub::start().await;
        fake.add_user(ALICE, "alice");
        let base = fake.create_repo("alice", "widgets", &seed());
        let forge = forge(&fake, ALICE);
        let files = (0..n)
            .map(|i| {
                let mut f = text(&format!("gen/file{i}.txt"), &format!("line {i}\n"));
                f.status = FileStatus::Added;
                f
            })
            .chain([file("old.txt", FileStatus::Deleted, FileContent::Missing)])
            .collect();
        let info = forge
            .prepare(&remote("alice", "widgets"), None)
            .await
            .unwrap();
        let pushed = forge
            .push_branch(&info, &change(&base, files), "tb/many", "many\n")
            .await
            .unwrap();
        forge
            .open_pull_request(&info, &pushed, &draft("Many files"))
            .await
            .unwrap()
            .unwrap();
        let calls: Vec<String> = fake
            .requests()
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect();
        assert_eq!(
            calls,
            vec![
                "GET /repos/alice/widgets".to_owned(),
                "GET /repos/alice/widgets/git/ref/heads/main".to_owned(),
                format!("GET /repos/alice/widgets/git/commits/{base}"),
                "POST /repos/alice/widgets/git/trees".to_owned(),
                "POST /repos/alice/widgets/git/commits".to_owned(),
                "POST /repos/alice/widgets/git/refs".to_owned(),
                "POST /repos/alice/widgets/pulls".to_owned(),
            ],
            "{n} text files"
        );
        let bare = fake.git_dir("alice/widgets");
        let listed = git(&bare, &["ls-tree", "-r", "--name-only", "tb/many", "gen"]);
        assert_eq!(listed.lines().count(), n);
    }
}

#[tokio::test]
async fn binary_files_add_one_blob_upload_each() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let binary = |path: &str| {
        file(
            path,
            FileStatus::Added,
            FileContent::File {
                bytes: vec![0xff, 0xfe, 0, 1],
                executable: false,
            },
        )
    };
    forge
        .push_branch(
            &info,
            &change(
                &base,
                vec![binary("a.bin"), binary("b.bin"), text("README.md", "x\n")],
            ),
            "tb/bin",
            "bin\n",
        )
        .await
        .unwrap();
    let blobs = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/git/blobs"))
        .count();
    assert_eq!((blobs, fake.requests().len()), (2, 8));
}

#[tokio::test]
async fn forks_when_the_token_cannot_push_and_reuses_the_fork() {
    let fake = FakeGithub::start_at("/api/v3").await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    fake.set_fork_delay(Duration::from_millis(400));
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, BOB);

    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    assert_eq!(info.publish, PublishMode::Fork);
    let change = every_kind(&base);
    let pushed = forge
        .push_branch(&info, &change, "tb/from-fork", "From a fork\n")
        .await
        .unwrap();
    assert_eq!(pushed.head_ref, "bob:tb/from-fork");
    assert_eq!(
        fake.branch_sha("bob/widgets", "tb/from-fork"),
        Some(pushed.commit.clone())
    );
    assert_eq!(fake.branch_sha("alice/widgets", "tb/from-fork"), None);
    let fork_dir = fake.git_dir("bob/widgets");
    assert_eq!(
        git(&fork_dir, &["rev-parse", "tb/from-fork^{tree}"]).trim(),
        expected_tree(&fake.git_dir("alice/widgets"), &change).await
    );
    // The fork answered 409 while it was being created, and was polled until ready.
    let polls = fake
        .requests()
        .iter()
        .filter(|r| r.path.contains("/repos/bob/widgets/git/commits/") && r.method == "GET")
        .map(|r| r.status)
        .collect::<Vec<_>>();
    assert!(
        polls.len() >= 2 && polls.first() == Some(&409) && polls.last() == Some(&200),
        "{polls:?}"
    );

    let pr = forge
        .open_pull_request(&info, &pushed, &draft("From a fork"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pr.number, 1);
    let p = &fake.pulls()[0];
    assert_eq!(
        (
            p.repo.as_str(),
            p.head_repo.as_str(),
            p.head_ref.as_str(),
            p.maintainer_can_modify
        ),
        ("alice/widgets", "bob/widgets", "tb/from-fork", true)
    );

    // A second job reuses the fork.
    let pushed = forge
        .push_branch(&info, &change, "tb/second", "Second\n")
        .await
        .unwrap();
    assert_eq!(pushed.head_ref, "bob:tb/second");
    assert_eq!(fake.repo_names(), vec!["alice/widgets", "bob/widgets"]);
}

#[tokio::test]
async fn falls_back_to_a_fork_when_the_first_write_is_refused() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    fake.set_fork_delay(Duration::ZERO);
    let base = fake.create_repo("alice", "widgets", &seed());
    // `permissions.push` says yes, but the token may not write (a fine-grained token).
    fake.grant("alice/widgets", "bob", true);
    fake.fail(
        Fault::new(
            "POST",
            "/repos/alice/widgets/git/trees",
            403,
            "Resource not accessible by personal access token",
        )
        .header("x-accepted-github-permissions", "contents=write"),
    );
    let forge = forge(&fake, BOB);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    assert_eq!(info.publish, PublishMode::Push);
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "fork\n")]),
            "tb/x",
            "x\n",
        )
        .await
        .unwrap();
    assert_eq!(pushed.head_ref, "bob:tb/x");
    assert!(fake.branch_sha("bob/widgets", "tb/x").is_some());
}

async fn prepare_error(fake: &FakeGithub, token: &str, repo: &str) -> ForgeError {
    let (owner, name) = repo.split_once('/').unwrap();
    forge(fake, token)
        .prepare(&remote(owner, name), None)
        .await
        .unwrap_err()
}

#[tokio::test]
async fn maps_github_errors_to_clear_forge_errors() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    let base = fake.create_repo("alice", "widgets", &seed());
    fake.create_repo("alice", "secret", &seed());
    fake.set_private("alice/secret", true);

    // 401
    let e = prepare_error(&fake, "tok-wrong-000000", "alice/widgets").await;
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("github_unauthorized", false)
    );
    assert!(
        e.message.contains("GITHUB_TOKEN") && e.message.contains("Bad credentials"),
        "{}",
        e.message
    );

    // A private repository the token can see: refused before any sandbox clones it.
    let e = prepare_error(&fake, ALICE, "alice/secret").await;
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("private_repository", false)
    );
    assert!(
        e.message.contains("alice/secret is private"),
        "{}",
        e.message
    );

    // 404: missing, or private without access.
    for repo in ["alice/nope", "alice/secret"] {
        let e = prepare_error(&fake, BOB, repo).await;
        assert_eq!(e.code, "github_not_found", "{repo}");
        assert!(
            e.message.contains(repo) && e.message.contains("no access"),
            "{}",
            e.message
        );
    }

    // Missing base branch.
    let e = forge(&fake, ALICE)
        .prepare(&remote("alice", "widgets"), Some("nope/branch"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "base_branch_not_found");
    assert!(e.message.contains("nope/branch"), "{}", e.message);

    // Primary rate limit: when it resets.
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    fake.fail(
        Fault::new(
            "GET",
            "/repos/alice/widgets",
            403,
            "API rate limit exceeded for user ID 1001.",
        )
        .header("x-ratelimit-remaining", "0")
        .header("x-ratelimit-reset", &reset.to_string()),
    );
    let e = prepare_error(&fake, ALICE, "alice/widgets").await;
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("github_rate_limited", true)
    );
    assert!(
        e.message.contains("resets at") && e.message.contains("UTC"),
        "{}",
        e.message
    );

    // Secondary rate limit (429 asking for longer than the policy waits: given up at once).
    fake.fail(
        Fault::new("GET", "/repos/alice/widgets", 429, "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.")
            .header("retry-after", "60"),
    );
    let e = prepare_error(&fake, ALICE, "alice/widgets").await;
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("github_rate_limited", true)
    );
    assert!(
        e.message.contains("retry after 60 seconds"),
        "{}",
        e.message
    );

    // 403 missing permission: named.
    let forge_a = forge(&fake, ALICE);
    let info = forge_a
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let pushed = forge_a
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "y\n")]),
            "tb/err",
            "y\n",
        )
        .await
        .unwrap();
    fake.fail(
        Fault::new(
            "POST",
            "/pulls",
            403,
            "Resource not accessible by personal access token",
        )
        .header("x-accepted-github-permissions", "pull_requests=write"),
    );
    let e = forge_a
        .open_pull_request(&info, &pushed, &draft("t"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "github_forbidden");
    assert!(
        e.message.contains("pull_requests=write") && e.message.contains("open the pull request"),
        "{}",
        e.message
    );

    // 422 with errors[].
    fake.fail(
        Fault::new("POST", "/pulls", 422, "Validation Failed").body(serde_json::json!({
            "message": "Validation Failed",
            "errors": [{"resource": "PullRequest", "field": "head", "code": "invalid"}],
            "status": "422",
        })),
    );
    let e = forge_a
        .open_pull_request(&info, &pushed, &draft("t"))
        .await
        .unwrap_err();
    assert_eq!(e.code, "github_validation_failed");
    assert!(e.message.contains("head is invalid"), "{}", e.message);

    // 5xx until the step's deadline: retried (and reconciled) until then, then reported.
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").times(10_000));
    let e = forge_a
        .open_pull_request(&info, &pushed, &draft("t"))
        .await
        .unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("github_unavailable", true));
    assert!(statuses(&fake, "POST", "/pulls").len() > 3);
    // Each attempt was looked up and found missing: nothing may be open.
    assert!(!e.message.contains("may be open"), "{}", e.message);
    fake.clear_faults();

    // 422 for a workflow file without the `workflow` scope.
    fake.set_workflow_scope("alice", false);
    let mut wf = text(".github/workflows/ci.yml", "on: push\n");
    wf.status = FileStatus::Added;
    let e = forge_a
        .push_branch(&info, &change(&base, vec![wf]), "tb/wf", "wf\n")
        .await
        .unwrap_err();
    assert_eq!(e.code, "github_workflow_permission");
    assert!(e.message.contains("`workflow` scope"), "{}", e.message);

    // Archived repositories are refused up front.
    fake.set_archived("alice/widgets", true);
    let e = prepare_error(&fake, ALICE, "alice/widgets").await;
    assert_eq!(e.code, "github_repo_archived");

    // Nothing listens: retryable.
    let dead = GithubForge::new(GithubConfig {
        token: ALICE.into(),
        api_url: "http://127.0.0.1:9".into(),
    })
    .unwrap()
    .with_retry_policy(quick_retry())
    .with_step_deadline(STEP);
    let e = dead
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap_err();
    assert_eq!(
        (e.code.as_str(), e.retryable),
        ("github_unreachable", true),
        "{}",
        e.message
    );

    for bad in ["not a url", "ftp://x/api", "https://user:pw@x/api"] {
        let e = GithubForge::new(GithubConfig {
            token: ALICE.into(),
            api_url: bad.into(),
        })
        .unwrap_err();
        assert_eq!(e.code, "invalid_github_api_url", "{bad}");
    }
}

#[tokio::test]
async fn retries_reuse_the_branch_and_the_pull_request() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let work = change(&base, vec![text("README.md", "retry\n")]);

    // The ref is created but the answer is lost (502): the forge reads the ref, sees it holds
    // our commit, and goes on without sending the POST again.
    fake.fail(Fault::new("POST", "/git/refs", 502, "Server Error").after_success());
    let first = forge
        .push_branch(&info, &work, "tb/retry", "retry\n")
        .await
        .unwrap();
    assert_eq!(
        fake.branch_sha("alice/widgets", "tb/retry"),
        Some(first.commit.clone())
    );
    assert_eq!(statuses(&fake, "POST", "/git/refs"), [502], "not re-sent");
    assert_eq!(statuses(&fake, "GET", "/git/ref/heads/tb/retry"), [200]);

    // A whole new attempt with the same change reuses the branch.
    let again = forge
        .push_branch(&info, &work, "tb/retry", "retry\n")
        .await
        .unwrap();
    assert_eq!(
        fake.branch_sha("alice/widgets", "tb/retry"),
        Some(again.commit.clone())
    );
    assert_eq!(
        git(
            &fake.git_dir("alice/widgets"),
            &["rev-parse", &format!("{}^{{tree}}", again.commit)]
        ),
        git(
            &fake.git_dir("alice/widgets"),
            &["rev-parse", &format!("{}^{{tree}}", first.commit)]
        )
    );

    // A different change on the same branch name is refused, not overwritten.
    let e = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "other\n")]),
            "tb/retry",
            "x\n",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "branch_exists");
    assert_eq!(
        fake.branch_sha("alice/widgets", "tb/retry"),
        Some(again.commit.clone())
    );

    // The PR is created but the answer is lost: found and adopted. A whole new attempt meets
    // "already exists" and finds it too.
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").after_success());
    let pr = forge
        .open_pull_request(&info, &again, &draft("Retry"))
        .await
        .unwrap()
        .unwrap();
    let pr2 = forge
        .open_pull_request(&info, &again, &draft("Retry"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((pr.number, pr2.number, pr.url.clone()), (1, 1, pr2.url));
    assert_eq!(fake.pulls().len(), 1);
    let pull_posts: Vec<u16> = fake
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/pulls"))
        .map(|r| r.status)
        .collect();
    assert_eq!(pull_posts, [502, 422]);
    let refs = git(
        &fake.git_dir("alice/widgets"),
        &["for-each-ref", "--format=%(refname)", "refs/heads"],
    );
    assert_eq!(refs, "refs/heads/main\nrefs/heads/tb/retry\n");
}

#[tokio::test]
async fn opens_a_normal_pull_request_where_drafts_are_unavailable() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.set_draft_supported(false);
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "d\n")]),
            "tb/d",
            "d\n",
        )
        .await
        .unwrap();
    let mut d = draft("Draft");
    d.draft = true;
    let pr = forge
        .open_pull_request(&info, &pushed, &d)
        .await
        .unwrap()
        .unwrap();
    assert!(!pr.draft);
    assert!(!fake.pulls()[0].draft);
}

#[tokio::test]
async fn refuses_bad_input_before_calling_github() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    fake.clear_requests();
    let e = forge
        .push_branch(
            &info,
            &change(&base, vec![text("a", "b")]),
            "bad branch#",
            "m\n",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "invalid_branch");
    let e = forge
        .push_branch(&info, &change(&base, vec![]), "tb/empty", "m\n")
        .await
        .unwrap_err();
    assert_eq!(e.code, "empty_change");
    let skip = RepoInfo {
        publish: PublishMode::Skip("no".into()),
        ..info.clone()
    };
    let e = forge
        .push_branch(&skip, &change(&base, vec![text("a", "b")]), "tb/x", "m\n")
        .await
        .unwrap_err();
    assert_eq!(e.code, "publish_disabled");
    let e = forge
        .prepare(
            &RepoRef::Local {
                path: "/tmp".into(),
            },
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "unsupported_repo");
    assert!(fake.requests().is_empty());
}

/// A `MakeWriter` collecting every log line.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn the_token_appears_only_in_the_authorization_header() {
    const CANARY: &str = "ghp_CANARY_9f8e7d6c5b4a39281706";
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let fake = FakeGithub::start().await;
    fake.add_user(CANARY, "alice");
    fake.add_user(BOB, "bob");
    let base = fake.create_repo("alice", "widgets", &seed());
    fake.create_repo("bob", "tools", &seed());
    let forge = forge(&fake, CANARY);
    let mut errors = Vec::new();

    // The whole flow, with the token even smuggled into the message, title and body.
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let pushed = forge
        .push_branch(
            &info,
            &every_kind(&base),
            "tb/canary",
            &format!("msg {CANARY}\n"),
        )
        .await
        .unwrap();
    let pr = forge
        .open_pull_request(
            &info,
            &pushed,
            &PullRequestDraft {
                title: format!("title {CANARY}"),
                body: format!("body {CANARY}"),
                draft: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert!(!pr.url.contains(CANARY));
    // The fork flow (alice cannot push to bob/tools) and failures of every kind.
    let info_b = forge.prepare(&remote("bob", "tools"), None).await.unwrap();
    forge
        .push_branch(
            &info_b,
            &change(
                &info_b.base_commit.clone().unwrap(),
                vec![text("README.md", "f\n")],
            ),
            "tb/f",
            "f\n",
        )
        .await
        .unwrap();
    fake.fail(Fault::new(
        "POST",
        "/pulls",
        422,
        &format!("echoing {CANARY}"),
    ));
    errors.push(
        forge
            .open_pull_request(&info, &pushed, &draft("x"))
            .await
            .unwrap_err(),
    );
    fake.fail(
        Fault::new(
            "GET",
            "/repos/alice/widgets",
            403,
            "API rate limit exceeded",
        )
        .header("x-ratelimit-remaining", "0"),
    );
    errors.push(
        forge
            .prepare(&remote("alice", "widgets"), None)
            .await
            .unwrap_err(),
    );
    errors.push(
        forge
            .prepare(&remote("alice", "nope"), None)
            .await
            .unwrap_err(),
    );
    fake.fail(Fault::new(
        "GET",
        "/repos/alice/widgets",
        401,
        "Bad credentials",
    ));
    errors.push(
        forge
            .prepare(&remote("alice", "widgets"), None)
            .await
            .unwrap_err(),
    );

    for e in &errors {
        assert!(!e.message.contains(CANARY), "{}", e.message);
        assert!(!format!("{e:?}").contains(CANARY));
    }
    let requests = fake.requests();
    assert!(requests.len() > 15);
    for r in &requests {
        assert_eq!(
            r.authorization.as_deref(),
            Some(format!("Bearer {CANARY}").as_str())
        );
        for part in [&r.path, &r.query, &r.body] {
            assert!(!part.contains(CANARY), "{} {}: {part}", r.method, r.path);
        }
        assert!(
            !r.other_headers.iter().any(|h| h.contains(CANARY)),
            "{:?}",
            r.other_headers
        );
    }
    let body = requests
        .iter()
        .find(|r| r.path.ends_with("/pulls"))
        .unwrap();
    assert!(body.body.contains("body [REDACTED]"), "{}", body.body);
    let logged = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logged.contains("github"), "logs were captured: {logged}");
    assert!(!logged.contains(CANARY), "{logged}");
    assert!(
        !format!(
            "{:?}",
            GithubConfig {
                token: CANARY.into(),
                api_url: fake.api_url()
            }
        )
        .contains(CANARY)
    );
}

#[tokio::test]
async fn a_refused_write_that_cannot_fork_reports_the_refusal() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    // The owner's own token is refused (e.g. a fine-grained token without Contents: write); an
    // owner cannot fork their own repository, so the refusal itself is the error.
    fake.fail(
        Fault::new(
            "POST",
            "/repos/alice/widgets/git/trees",
            403,
            "Resource not accessible by personal access token",
        )
        .header("x-accepted-github-permissions", "contents=write"),
    );
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let e = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "x\n")]),
            "tb/x",
            "x\n",
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, "github_forbidden");
    assert!(
        e.message.contains("contents=write") && e.message.contains("create the commit's tree"),
        "{}",
        e.message
    );
}

/// Statuses the fake answered to requests matching `method` and ending in `path_end`.
fn statuses(fake: &FakeGithub, method: &str, path_end: &str) -> Vec<u16> {
    fake.requests()
        .iter()
        .filter(|r| r.method == method && r.path.ends_with(path_end))
        .map(|r| r.status)
        .collect()
}

#[tokio::test]
async fn rate_limits_are_waited_out_and_server_errors_backed_off() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let repo = remote("alice", "widgets");

    // A secondary rate limit on a 403 asking for a second: waited for, then retried.
    fake.fail(
        Fault::new(
            "GET",
            "/repos/alice/widgets",
            403,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
        )
        .header("retry-after", "1"),
    );
    let start = std::time::Instant::now();
    forge.prepare(&repo, None).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(statuses(&fake, "GET", "/repos/alice/widgets"), [403, 200]);

    // An exhausted primary limit that resets within the policy's wait: retried after the reset.
    fake.clear_requests();
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    fake.fail(
        Fault::new(
            "GET",
            "/repos/alice/widgets",
            403,
            "API rate limit exceeded for user ID 1001.",
        )
        .header("x-ratelimit-remaining", "0")
        .header("x-ratelimit-reset", &reset.to_string()),
    );
    forge.prepare(&repo, None).await.unwrap();
    assert_eq!(statuses(&fake, "GET", "/repos/alice/widgets"), [403, 200]);

    // Server errors are retried after a backoff, not re-sent at once.
    fake.clear_requests();
    let slow = GithubForge::new(GithubConfig {
        token: ALICE.into(),
        api_url: fake.api_url(),
    })
    .unwrap()
    .with_retry_policy(RetryPolicy {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
        jitter: 0.0,
        ..quick_retry()
    });
    fake.fail(Fault::new("GET", "/git/ref/heads/main", 502, "Server Error").times(2));
    let start = std::time::Instant::now();
    slow.prepare(&repo, None).await.unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(200 + 400),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(
        statuses(&fake, "GET", "/git/ref/heads/main"),
        [502, 502, 200]
    );

    // Client errors are not retried.
    fake.clear_requests();
    fake.fail(Fault::new(
        "GET",
        "/repos/alice/widgets",
        401,
        "Bad credentials",
    ));
    let e = forge.prepare(&repo, None).await.unwrap_err();
    assert_eq!(e.code, "github_unauthorized");
    assert_eq!(statuses(&fake, "GET", "/repos/alice/widgets"), [401]);
}

/// A named head branch that already exists upstream is refused up front; a new one passes.
#[tokio::test]
async fn an_existing_head_branch_is_refused_before_any_work() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let err = forge.check_new_branch(&info, "main").await.unwrap_err();
    assert_eq!(err.code.as_str(), "branch_exists");
    assert!(err.message.contains("alice/widgets"), "{}", err.message);
    forge
        .check_new_branch(&info, "tiny-backspace/new")
        .await
        .unwrap();
}

/// The pull request is created, its answer is lost, and every retry fails too: the forge looks
/// before it gives up, finds the open pull request and adopts it, so the job is not reported as
/// failed with its pull request open.
#[tokio::test]
async fn a_pull_request_whose_answers_were_all_lost_is_found_and_adopted() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let work = change(&base, vec![text("README.md", "lost\n")]);
    let pushed = forge
        .push_branch(&info, &work, "tb/lost", "lost\n")
        .await
        .unwrap();
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").after_success());
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").times(20));
    let pr = forge
        .open_pull_request(&info, &pushed, &draft("Lost answers"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pr.number, 1);
    assert_eq!(fake.pulls().len(), 1);
    let statuses: Vec<u16> = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/pulls") || r.path.contains("/pulls?"))
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses.first(), Some(&502));
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
}

/// The fork is created but its answer is lost (502): the forge looks for the token owner's fork
/// of the upstream, finds it and writes there, without sending the fork request again.
#[tokio::test]
async fn a_fork_whose_answer_was_lost_is_found_and_used() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    fake.set_fork_delay(Duration::ZERO);
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, BOB);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    assert_eq!(info.publish, PublishMode::Fork);
    fake.fail(Fault::new("POST", "/forks", 502, "Server Error").after_success());
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "via a lost fork\n")]),
            "tb/lost-fork",
            "x\n",
        )
        .await
        .unwrap();
    assert_eq!(pushed.head_ref, "bob:tb/lost-fork");
    assert_eq!(statuses(&fake, "POST", "/forks"), [502], "not re-sent");
    assert_eq!(statuses(&fake, "GET", "/user"), [200]);
    assert_eq!(statuses(&fake, "GET", "/repos/bob/widgets"), [200]);
    assert_eq!(fake.repo_names(), vec!["alice/widgets", "bob/widgets"]);
    assert_eq!(
        fake.branch_sha("bob/widgets", "tb/lost-fork"),
        Some(pushed.commit.clone())
    );
    let pr = forge
        .open_pull_request(&info, &pushed, &draft("From a lost fork"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pr.number, 1);
    assert_eq!(fake.pulls().len(), 1);
}

/// A fork request that failed (502, nothing made) is found missing and sent again.
#[tokio::test]
async fn a_fork_request_that_failed_is_sent_again_after_looking() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    fake.add_user(BOB, "bob");
    fake.set_fork_delay(Duration::ZERO);
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, BOB);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    fake.fail(Fault::new("POST", "/forks", 502, "Server Error"));
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "fork again\n")]),
            "tb/fork-again",
            "x\n",
        )
        .await
        .unwrap();
    assert_eq!(pushed.head_ref, "bob:tb/fork-again");
    assert_eq!(statuses(&fake, "POST", "/forks"), [502, 202]);
    assert_eq!(statuses(&fake, "GET", "/repos/bob/widgets"), [404]);
}

/// The pull request is created, its answer lost, and the reads that look for it fail too for a
/// while: they are retried within the step's deadline, the pull request is found and adopted,
/// and no second one is opened.
#[tokio::test]
async fn a_reconciling_read_that_fails_is_retried_within_the_deadline() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "read fails\n")]),
            "tb/read-fails",
            "x\n",
        )
        .await
        .unwrap();
    fake.clear_requests();
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").after_success());
    fake.fail(Fault::new("GET", "/pulls", 502, "Server Error").times(3));
    let pr = forge
        .open_pull_request(&info, &pushed, &draft("Read fails"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(pr.number, 1);
    assert_eq!(fake.pulls().len(), 1);
    assert_eq!(statuses(&fake, "POST", "/pulls"), [502], "not re-sent");
    assert_eq!(statuses(&fake, "GET", "/pulls"), [502, 502, 502, 200]);

    // A ref whose answer is lost, and whose reads fail at first: the same.
    fake.clear_requests();
    fake.fail(Fault::new("POST", "/git/refs", 502, "Server Error").after_success());
    fake.fail(Fault::new("GET", "/git/ref/heads/tb/ref-read", 503, "Unavailable").times(2));
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "ref read fails\n")]),
            "tb/ref-read",
            "x\n",
        )
        .await
        .unwrap();
    assert_eq!(
        fake.branch_sha("alice/widgets", "tb/ref-read"),
        Some(pushed.commit)
    );
    assert_eq!(statuses(&fake, "POST", "/git/refs"), [502]);
    assert_eq!(
        statuses(&fake, "GET", "/git/ref/heads/tb/ref-read"),
        [503, 503, 200]
    );
}

/// When the reads keep failing past the step's deadline, the forge stops and reports the write's
/// own failure: it cannot know, and it never sends the write again blindly.
#[tokio::test]
async fn a_reconciling_read_that_fails_until_the_deadline_stops_the_step() {
    let fake = FakeGithub::start().await;
    fake.add_user(ALICE, "alice");
    let base = fake.create_repo("alice", "widgets", &seed());
    let forge = forge(&fake, ALICE);
    let info = forge
        .prepare(&remote("alice", "widgets"), None)
        .await
        .unwrap();
    let pushed = forge
        .push_branch(
            &info,
            &change(&base, vec![text("README.md", "never known\n")]),
            "tb/never-known",
            "x\n",
        )
        .await
        .unwrap();
    fake.clear_requests();
    fake.fail(Fault::new("POST", "/pulls", 502, "Server Error").after_success());
    fake.fail(Fault::new("GET", "/pulls", 502, "Server Error").times(10_000));
    let e = forge
        .open_pull_request(&info, &pushed, &draft("Never known"))
        .await
        .unwrap_err();
    assert_eq!((e.code.as_str(), e.retryable), ("github_unavailable", true));
    assert!(
        e.message
            .contains("may be open on alice/widgets all the same"),
        "the message says what may be there: {}",
        e.message
    );
    assert_eq!(statuses(&fake, "POST", "/pulls"), [502], "never re-sent");
    assert!(statuses(&fake, "GET", "/pulls").len() > 3);
    fake.clear_faults();
}
