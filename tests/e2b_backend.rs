#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The `e2b` sandbox backend against the fake E2B: the whole lifecycle with its request count,
//! timeouts, retries, fault classification and cleanup.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tiny_backspace::sandbox::e2b::{E2bConfig, E2bProvider, E2bSandbox};
use tiny_backspace::sandbox::{
    CloneSpec, DirEntry, ExecRequest, FileContent, RepoPath, Sandbox, SandboxError, SandboxProvider,
};

use support::fake_e2b::{FakeE2b, Fault};

fn git(dir: &Path, args: &[&str]) -> String {
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

/// A repository with a text file, an executable, a symlink, a binary file and a `dev` branch.
fn seed_repo() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    git(root, &["init", "-q", "-b", "main"]);
    std::fs::write(root.join("README.md"), "# hello\n").unwrap();
    std::fs::create_dir_all(root.join("src/deep")).unwrap();
    std::fs::write(root.join("src/lib.rs"), "pub fn f() {}\n").unwrap();
    std::fs::write(root.join("src/deep/x.txt"), "x\n").unwrap();
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("src/lib.rs", root.join("link")).unwrap();
    std::os::unix::fs::symlink("src", root.join("srclink")).unwrap();
    std::fs::write(
        root.join("blob.bin"),
        (0..=255u8).cycle().take(100_000).collect::<Vec<_>>(),
    )
    .unwrap();
    git(root, &["add", "-A"]);
    git(
        root,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@e",
            "commit",
            "-q",
            "-m",
            "seed",
        ],
    );
    git(root, &["branch", "dev"]);
    dir
}

fn clone_spec(repo: &Path, branch: Option<&str>) -> CloneSpec {
    CloneSpec {
        url: format!("file://{}", repo.display()),
        branch: branch.map(str::to_owned),
        timeout: Duration::from_secs(60),
    }
}

fn path(p: &str) -> RepoPath {
    RepoPath::parse(p).unwrap()
}

/// Bounds every test step: a hang is a failure, never a stuck suite.
async fn bounded<T>(what: &str, secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {secs} s"))
}

async fn create(fake: &FakeE2b, config: E2bConfig) -> Arc<E2bSandbox> {
    let provider = E2bProvider::new(config);
    assert_eq!(provider.name(), "e2b");
    bounded("create", 30, provider.create_sandbox("job-1"))
        .await
        .unwrap_or_else(|e| panic!("create failed: {e}; log: {:?}", fake.requests().len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_lifecycle_costs_five_requests() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let provider = E2bProvider::new(fake.config());
    let sandbox: Arc<dyn Sandbox> = bounded("create", 30, provider.create("job-1"))
        .await
        .unwrap();
    assert_eq!(fake.live_sandboxes(), 1);

    let cloned = bounded(
        "clone",
        60,
        sandbox.clone_repo(&clone_spec(repo.path(), None)),
    )
    .await
    .unwrap();
    assert_eq!(cloned.head, git(repo.path(), &["rev-parse", "HEAD"]).trim());
    assert_eq!(cloned.branch, "main");

    let out = bounded(
        "exec",
        30,
        sandbox.exec(&ExecRequest::new(
            "git status --porcelain; git log --oneline | wc -l; echo err >&2; exit 4",
        )),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "1\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    assert_eq!(out.exit_code, 4);
    assert!(!out.timed_out && !out.truncated);

    let paths = [
        path("README.md"),
        path("run.sh"),
        path("link"),
        path("missing.txt"),
        path("blob.bin"),
        path("no/such/dir/file"),
    ];
    let files = bounded("read_files", 30, sandbox.read_files(&paths))
        .await
        .unwrap();
    assert_eq!(
        files,
        vec![
            FileContent::File {
                bytes: b"# hello\n".to_vec(),
                executable: false
            },
            FileContent::File {
                bytes: b"#!/bin/sh\necho run\n".to_vec(),
                executable: true
            },
            FileContent::Symlink {
                target: "src/lib.rs".into()
            },
            FileContent::Missing,
            FileContent::File {
                bytes: (0..=255u8).cycle().take(100_000).collect(),
                executable: false
            },
            FileContent::Missing,
        ]
    );

    bounded("kill", 30, sandbox.kill()).await.unwrap();
    assert_eq!(fake.live_sandboxes(), 0);
    let log = fake.requests();
    let summary: Vec<String> = log
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        summary,
        vec![
            "POST /v2/sandboxes",
            "POST /process.Process/Start",
            "POST /process.Process/Start",
            "POST /process.Process/Start",
            "DELETE /sandboxes/ifake000000000000000",
        ],
        "create, clone, exec, read, kill: one request each"
    );
    // Create always sends a timeout; envd gets the routing headers and the token only as a header.
    let create = &log[0];
    assert_eq!(create.headers["x-api-key"], support::fake_e2b::API_KEY);
    let body: serde_json::Value = serde_json::from_slice(&create.body).unwrap();
    assert_eq!(body["templateID"], "base");
    assert_eq!(body["timeout"], 600);
    let token = log[1].headers["x-access-token"]
        .to_str()
        .unwrap()
        .to_owned();
    for request in &log[1..4] {
        assert_eq!(request.headers["e2b-sandbox-id"], "ifake000000000000000");
        assert_eq!(request.headers["e2b-sandbox-port"], "49983");
        assert_eq!(request.headers["content-type"], "application/connect+json");
        let command = request.command.as_deref().unwrap();
        assert!(
            !command.contains(&token),
            "the access token leaked into a command"
        );
        assert!(!command.contains(support::fake_e2b::API_KEY));
    }
    // Our own timeout bounds the command, not envd's 60 s default.
    assert_eq!(log[2].headers["connect-timeout-ms"], "120000");
    // Idempotent kill.
    sandbox.kill().await.unwrap();
    assert_eq!(fake.request_count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_listing_and_branches() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let sandbox = create(&fake, fake.config()).await;
    let cloned = sandbox
        .clone_repo(&clone_spec(repo.path(), Some("dev")))
        .await
        .unwrap();
    assert_eq!(cloned.branch, "dev");

    sandbox
        .write_file(&path("new/dir/a.txt"), b"fresh\n")
        .await
        .unwrap();
    sandbox
        .write_file(&path("README.md"), b"changed\n")
        .await
        .unwrap();
    let files = sandbox
        .read_files(&[path("new/dir/a.txt"), path("README.md")])
        .await
        .unwrap();
    assert_eq!(
        files,
        vec![
            FileContent::File {
                bytes: b"fresh\n".to_vec(),
                executable: false
            },
            FileContent::File {
                bytes: b"changed\n".to_vec(),
                executable: false
            },
        ]
    );
    let status = sandbox
        .exec(&ExecRequest::new("git status --porcelain"))
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&status.stdout),
        " M README.md\n?? new/\n"
    );

    // gzip-encoded download through /files.
    let home = "/home/user/repo/blob.bin";
    let bytes = sandbox.download(home).await.unwrap().unwrap();
    assert_eq!(bytes.len(), 100_000);
    assert!(
        sandbox
            .download("/home/user/repo/nope")
            .await
            .unwrap()
            .is_none()
    );
    let download = fake
        .requests()
        .into_iter()
        .rfind(|r| r.path == "/files")
        .unwrap();
    assert!(
        download.headers["accept-encoding"]
            .to_str()
            .unwrap()
            .contains("gzip")
    );

    let top = sandbox.list_dir(&RepoPath::root(), 1).await.unwrap();
    let names: Vec<&str> = top.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        names,
        vec![
            "README.md",
            "blob.bin",
            "link",
            "new",
            "run.sh",
            "src",
            "srclink"
        ],
        ".git is never listed"
    );
    let deep = sandbox.list_dir(&path("src"), 5).await.unwrap();
    assert_eq!(
        deep,
        vec![
            DirEntry {
                path: "src/deep".into(),
                is_dir: true
            },
            DirEntry {
                path: "src/deep/x.txt".into(),
                is_dir: false
            },
            DirEntry {
                path: "src/lib.rs".into(),
                is_dir: false
            },
        ]
    );
    assert!(matches!(
        sandbox.list_dir(&path("nope"), 1).await,
        Err(SandboxError::NotFound(_))
    ));
    assert!(matches!(
        sandbox.list_dir(&path("README.md"), 1).await,
        Err(SandboxError::Path(_))
    ));
    // A symlinked directory on the way is refused, a directory is not a file.
    assert!(matches!(
        sandbox.read_files(&[path("srclink/lib.rs")]).await,
        Err(SandboxError::Path(_))
    ));
    assert!(matches!(
        sandbox.read_file(&path("src")).await,
        Err(SandboxError::Path(_))
    ));
    sandbox.kill().await.unwrap();
    assert_eq!(fake.live_sandboxes(), 0);
    // Everything after kill is refused locally.
    assert!(matches!(
        sandbox.exec(&ExecRequest::new("true")).await,
        Err(SandboxError::Gone(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_failures_are_clear() {
    let fake = FakeE2b::start().await;
    let sandbox = create(&fake, fake.config()).await;
    let missing = tempfile::tempdir().unwrap();
    let err = sandbox
        .clone_repo(&clone_spec(&missing.path().join("nope"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::Clone(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("not appear to be a git repository"),
        "{err}"
    );

    let repo = seed_repo();
    let err = sandbox
        .clone_repo(&clone_spec(repo.path(), Some("no-such-branch")))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::Clone(_)), "{err:?}");

    let before = fake.request_count();
    let err = sandbox
        .clone_repo(&CloneSpec {
            url: "https://user:ghp_secret@example.com/o/r".into(),
            branch: None,
            timeout: Duration::from_secs(5),
        })
        .await
        .unwrap_err();
    assert!(!err.to_string().contains("ghp_secret"));
    assert_eq!(
        fake.request_count(),
        before,
        "a URL with credentials never reaches the sandbox"
    );

    // Before any clone there is no repository to run in: a clear error, not a hang.
    let fresh = create(&fake, fake.config()).await;
    let err = fresh.exec(&ExecRequest::new("true")).await.unwrap_err();
    assert!(matches!(err, SandboxError::Io(_)), "{err:?}");
    sandbox.kill().await.unwrap();
    fresh.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_are_bounded_by_our_timeout_and_cap() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let sandbox = create(&fake, fake.config()).await;
    sandbox
        .clone_repo(&clone_spec(repo.path(), None))
        .await
        .unwrap();

    // Past the idle timeout (3 s) thanks to keepalives (1 s), within our own timeout.
    let out = bounded(
        "slow command",
        30,
        sandbox.exec(&ExecRequest::new("sleep 4; echo done").timeout(Duration::from_secs(20))),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "done\n");

    let started = std::time::Instant::now();
    let out = bounded(
        "timed-out command",
        30,
        sandbox.exec(&ExecRequest::new("echo before; sleep 60").timeout(Duration::from_secs(1))),
    )
    .await
    .unwrap();
    assert!(out.timed_out);
    assert!(!out.success());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stdout).contains("before"));

    // Big output crosses many chunk and envelope boundaries; the cap keeps head and tail.
    let out = sandbox
        .exec(&ExecRequest::new("seq 1 200000").output_cap(10_000))
        .await
        .unwrap();
    assert!(out.truncated);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("1\n2\n3\n"));
    assert!(text.ends_with("199999\n200000\n"));
    assert!(text.contains("bytes truncated"));
    let out = sandbox
        .exec(&ExecRequest::new(
            "seq 1 200000 | md5sum; seq 1 200000 | wc -c",
        ))
        .await
        .unwrap();
    let full = sandbox
        .exec(&ExecRequest::new("seq 1 200000").output_cap(4 << 20))
        .await
        .unwrap();
    assert!(!full.truncated);
    assert_eq!(
        full.stdout.len().to_string(),
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap()
    );

    // A killed command reports 128 + signal, like a shell.
    let out = sandbox.exec(&ExecRequest::new("kill -9 $$")).await.unwrap();
    assert_eq!(out.exit_code, 137);
    sandbox.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_create_failures_are_retried() {
    let fake = FakeE2b::start().await;
    fake.inject(Fault::CreateUnavailable(2));
    let sandbox = create(&fake, fake.config()).await;
    let creates = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v2/sandboxes")
        .count();
    assert_eq!(creates, 3);
    // Every attempt carried the same idempotency key.
    let keys: std::collections::HashSet<String> = fake
        .requests()
        .iter()
        .filter(|r| r.path == "/v2/sandboxes")
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 1);
    sandbox.kill().await.unwrap();

    // Past the retry budget: a retryable transport error, and nothing leaked.
    fake.inject(Fault::CreateUnavailable(10));
    let provider = E2bProvider::new(fake.config());
    let err = bounded("create", 30, provider.create("job-2"))
        .await
        .err()
        .unwrap();
    assert!(err.retryable(), "{err:?}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(fake.live_sandboxes(), 0);

    // A create that hangs times out and is retried.
    let fake = FakeE2b::start().await;
    fake.inject(Fault::Hang {
        path: "/v2/sandboxes".into(),
        pattern: None,
    });
    let mut config = fake.config();
    config.timing.request_timeout = Duration::from_secs(1);
    let sandbox = create(&fake, config).await;
    assert_eq!(fake.live_sandboxes(), 1);
    sandbox.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_answered_with_an_unreadable_body_is_retried_without_leaking() {
    let repo = seed_repo();
    // E2B deduplicates on the idempotency key: the repeat returns the sandbox the lost answer
    // described. Otherwise the repeat starts a second one, and the first must not be left running.
    for (idempotent, started) in [(true, 1), (false, 2)] {
        let fake = FakeE2b::start().await;
        fake.inject(Fault::CreateUnreadable { idempotent });
        let sandbox = create(&fake, fake.config()).await;
        assert_eq!(
            fake.created_sandboxes(),
            started,
            "idempotent: {idempotent}"
        );
        assert_eq!(fake.live_sandboxes(), 1, "idempotent: {idempotent}");
        assert!(fake.home_of(sandbox.id()).is_some(), "we hold the live one");
        // And it works.
        sandbox
            .clone_repo(&clone_spec(repo.path(), None))
            .await
            .unwrap();
        sandbox.kill().await.unwrap();
        assert_eq!(fake.live_sandboxes(), 0, "idempotent: {idempotent}");
    }

    // Unreadable, then failing for good: whatever the unreadable answer started is killed too.
    let fake = FakeE2b::start().await;
    fake.inject(Fault::CreateUnreadable { idempotent: false });
    fake.inject(Fault::CreateUnavailable(10));
    let provider = E2bProvider::new(fake.config());
    let err = bounded("create", 30, provider.create("job-3"))
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(fake.created_sandboxes(), 1);
    assert_eq!(fake.live_sandboxes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_over_its_total_is_refused() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let mut config = fake.config();
    // README.md (8 bytes) and blob.bin (100 000) fit; run.sh (19) more does not.
    config.max_read_bytes = 100_020;
    let sandbox = create(&fake, config).await;
    sandbox
        .clone_repo(&clone_spec(repo.path(), None))
        .await
        .unwrap();
    let got = bounded(
        "read",
        30,
        sandbox.read_files(&[path("README.md"), path("blob.bin")]),
    )
    .await
    .unwrap();
    assert_eq!(got.len(), 2);
    let e = bounded(
        "read",
        30,
        sandbox.read_files(&[path("README.md"), path("run.sh"), path("blob.bin")]),
    )
    .await
    .unwrap_err();
    assert!(matches!(e, SandboxError::TooLarge(_)), "{e:?}");
    assert_eq!(e.code().as_str(), "change_too_large");
    sandbox.kill().await.unwrap();
    assert_eq!(fake.live_sandboxes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_key_and_template_are_create_errors() {
    let fake = FakeE2b::start().await;
    let env = fake.env();
    let lookup = |key: &'static str, template: &'static str| {
        let env = env.clone();
        move |name: &str| match name {
            "E2B_API_KEY" => Some(key.to_owned()),
            "E2B_TEMPLATE" => Some(template.to_owned()),
            _ => env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone()),
        }
    };
    let config = E2bConfig::from_lookup(lookup("e2b_wrong_key_123456", "base")).unwrap();
    let err = E2bProvider::new(config).create("j").await.err().unwrap();
    assert!(matches!(err, SandboxError::Create(_)), "{err:?}");
    assert!(err.to_string().contains("E2B_API_KEY"));
    assert!(
        !err.to_string().contains("e2b_wrong_key_123456"),
        "no key in errors"
    );
    let config = E2bConfig::from_lookup(lookup(support::fake_e2b::API_KEY, "missing")).unwrap();
    let err = E2bProvider::new(config).create("j").await.err().unwrap();
    assert!(err.to_string().contains("E2B_TEMPLATE"), "{err}");
    assert_eq!(
        fake.requests().len(),
        2,
        "definitive errors are not retried"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_are_retried_only_when_safe() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let sandbox = create(&fake, fake.config()).await;

    // The clone and the batched read are safe to repeat: they recover.
    fake.inject(Fault::CutStream {
        pattern: "clone".into(),
    });
    bounded(
        "clone",
        60,
        sandbox.clone_repo(&clone_spec(repo.path(), None)),
    )
    .await
    .unwrap();
    fake.inject(Fault::CutStream {
        pattern: "read-files".into(),
    });
    let files = bounded("read", 30, sandbox.read_files(&[path("README.md")]))
        .await
        .unwrap();
    assert_eq!(
        files[0],
        FileContent::File {
            bytes: b"# hello\n".to_vec(),
            executable: false
        }
    );
    fake.inject(Fault::Hang {
        path: "/process.Process/Start".into(),
        pattern: Some("read-files".into()),
    });
    let files = bounded("read", 30, sandbox.read_files(&[path("README.md")]))
        .await
        .unwrap();
    assert_eq!(files.len(), 1);

    // A command may have side effects: a broken stream is reported, not repeated, and the
    // abandoned process is killed.
    fake.inject(Fault::CutStream {
        pattern: "touch ran".into(),
    });
    let before = fake.request_count();
    let err = bounded(
        "cut exec",
        30,
        sandbox.exec(&ExecRequest::new(
            "echo started; touch ran; sleep 30; touch finished",
        )),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::Transport {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    let after: Vec<String> = fake.requests()[before..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        after,
        vec![
            "/process.Process/Start",
            "/process.Process/SendSignal",
            "/health"
        ],
        "one start, the kill of the orphan, the health probe"
    );
    let out = sandbox
        .exec(&ExecRequest::new("ls ran finished 2>&1; true"))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ran") && text.contains("No such file"),
        "{text}"
    );

    // A command marked repeatable (the pipeline's collect step) is run again instead.
    fake.inject(Fault::CutStream {
        pattern: "repeat-me".into(),
    });
    let before = fake.request_count();
    let out = bounded(
        "cut repeatable exec",
        30,
        sandbox.exec(&ExecRequest::new("echo repeat-me >> runs.txt; cat runs.txt").repeatable()),
    )
    .await
    .unwrap();
    assert!(out.success(), "{out:?}");
    let starts = fake.requests()[before..]
        .iter()
        .filter(|r| r.path == "/process.Process/Start")
        .count();
    assert_eq!(starts, 2, "started again after the cut");

    // A stream that goes silent (no output, no keepalive) is bounded by the idle timeout:
    // repeated for the reader, reported for a command.
    fake.inject(Fault::Stall {
        pattern: "read-files".into(),
    });
    let files = bounded("stalled read", 30, sandbox.read_files(&[path("README.md")]))
        .await
        .unwrap();
    assert_eq!(files.len(), 1);
    fake.inject(Fault::Stall {
        pattern: "stall-me".into(),
    });
    let started = std::time::Instant::now();
    let err = bounded(
        "stalled exec",
        30,
        sandbox.exec(&ExecRequest::new("echo stall-me; sleep 20")),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            SandboxError::Transport {
                retryable: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("sent nothing"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));

    // A command whose answer never comes is bounded by the request timeout.
    fake.inject(Fault::Hang {
        path: "/process.Process/Start".into(),
        pattern: Some("hang-me".into()),
    });
    let err = bounded(
        "hung exec",
        30,
        sandbox.exec(&ExecRequest::new("echo hang-me")),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SandboxError::Transport { .. }), "{err:?}");
    sandbox.kill().await.unwrap();
    assert_eq!(fake.live_sandboxes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_sandbox_is_gone_not_retried() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let sandbox = create(&fake, fake.config()).await;
    sandbox
        .clone_repo(&clone_spec(repo.path(), None))
        .await
        .unwrap();
    fake.inject(Fault::Gone {
        pattern: "vanish".into(),
    });
    let before = fake.request_count();
    let err = bounded("exec", 30, sandbox.exec(&ExecRequest::new("echo vanish")))
        .await
        .unwrap_err();
    assert!(matches!(err, SandboxError::Gone(_)), "{err:?}");
    assert_eq!(fake.request_count(), before + 1, "gone is terminal");
    let err = sandbox.read_files(&[path("README.md")]).await.unwrap_err();
    assert!(matches!(err, SandboxError::Gone(_)), "{err:?}");
    // Killing a sandbox E2B already removed is fine.
    sandbox.kill().await.unwrap();
    assert_eq!(fake.live_sandboxes(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_kills_and_long_jobs_are_renewed() {
    let fake = FakeE2b::start().await;
    let repo = seed_repo();
    let mut config = fake.config();
    config.sandbox_ttl = Duration::from_secs(4);
    let sandbox = create(&fake, config).await;
    sandbox
        .clone_repo(&clone_spec(repo.path(), None))
        .await
        .unwrap();
    // Outlives its 4 s lifetime because it is renewed every 2 s.
    let out = bounded(
        "long exec",
        30,
        sandbox.exec(&ExecRequest::new("sleep 7; echo alive").timeout(Duration::from_secs(20))),
    )
    .await
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
    let renewals = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/timeout"))
        .count();
    assert!(renewals >= 2, "{renewals} renewals");
    assert_eq!(fake.live_sandboxes(), 1);

    // Nobody calls kill: dropping the last handle does.
    drop(sandbox);
    bounded("drop kill", 10, async {
        while fake.live_sandboxes() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}
