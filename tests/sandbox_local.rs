//! The local sandbox's confinement, proven by running real commands in it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::harness::{local_sandbox, repo_with};
use tiny_backspace::sandbox::{CloneSpec, ExecRequest, FileContent, RepoPath, Sandbox};

async fn sandbox_with_repo() -> (
    tempfile::TempDir,
    tempfile::TempDir,
    std::sync::Arc<dyn Sandbox>,
) {
    let repo = repo_with(&[("README.md", "hello\n")]);
    let root = tempfile::tempdir().unwrap();
    let provider = local_sandbox(root.path()).await;
    let sandbox = provider.create("job-1").await.unwrap();
    sandbox
        .clone_repo(&CloneSpec {
            url: format!("file://{}", repo.path().display()),
            branch: None,
            timeout: Duration::from_secs(60),
        })
        .await
        .unwrap();
    (repo, root, sandbox)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn commands_can_write_in_the_workspace_but_nowhere_else() {
    let (_repo, root, sandbox) = sandbox_with_repo().await;
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("escaped.txt");
    let out = sandbox
        .exec(&ExecRequest::new(format!(
            "echo inside > inside.txt && echo tmp > \"$TMPDIR/t\" && echo out > {}",
            target.display()
        )))
        .await
        .unwrap();
    assert_ne!(
        out.exit_code,
        0,
        "writing outside must fail: {}",
        out.combined()
    );
    // Refused, or not even there: the host's directories are outside the sandbox's root.
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("Permission denied") || stderr.contains("No such file or directory"),
        "{}",
        out.combined()
    );
    assert!(
        !target.exists(),
        "the file outside the workspace was created"
    );
    assert_eq!(
        sandbox
            .read_file(&RepoPath::parse("inside.txt").unwrap())
            .await
            .unwrap(),
        FileContent::File {
            bytes: b"inside\n".to_vec(),
            executable: false
        }
    );
    // Reading the rest of the system still works (compilers, interpreters, git need it).
    let out = sandbox
        .exec(&ExecRequest::new(
            "cat /etc/hosts >/dev/null && git status --short",
        ))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.combined());
    drop(root);
}

#[tokio::test]
async fn commands_cannot_open_network_sockets() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    // A listener on this host that the command would reach if it had a network.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let out = sandbox
        .exec(&ExecRequest::new(format!(
            "python3 -c \"import socket; s=socket.create_connection(('127.0.0.1', {port}), timeout=3); print('connected')\""
        )))
        .await
        .unwrap();
    assert_ne!(out.exit_code, 0);
    assert!(!text(&out.stdout).contains("connected"));
    assert!(
        text(&out.stderr).contains("Operation not permitted")
            || text(&out.stderr).contains("Permission denied"),
        "{}",
        out.combined()
    );
    // bash's /dev/tcp uses socket(2) too.
    let out = sandbox
        .exec(&ExecRequest::new(format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected"
        )))
        .await
        .unwrap();
    assert_ne!(out.exit_code, 0);
    assert!(!text(&out.stdout).contains("connected"));
}

#[tokio::test]
async fn a_timeout_kills_the_command_and_its_children() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    let marker = format!("tb-orphan-{}", std::process::id());
    let started = Instant::now();
    // The child is started in the background and would outlive its parent shell.
    let out = sandbox
        .exec(
            &ExecRequest::new(format!("(exec -a {marker} sleep 300) & sleep 300"))
                .timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, 124);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(ps.stdout.is_empty(), "child survived: {}", text(&ps.stdout));
}

#[tokio::test]
async fn background_processes_do_not_outlive_their_command() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    let marker = format!("tb-bg-{}", std::process::id());
    let out = sandbox
        .exec(&ExecRequest::new(format!(
            "(exec -a {marker} sleep 300) >/dev/null 2>&1 & echo started"
        )))
        .await
        .unwrap();
    assert_eq!(text(&out.stdout).trim(), "started");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .unwrap();
    assert!(
        ps.stdout.is_empty(),
        "background process survived: {}",
        text(&ps.stdout)
    );
    // Nor can a command leave its process group to escape the kill.
    let out = sandbox
        .exec(&ExecRequest::new("setsid --wait true"))
        .await
        .unwrap();
    assert_ne!(out.exit_code, 0, "{}", out.combined());
    assert!(
        out.combined().contains("Operation not permitted"),
        "{}",
        out.combined()
    );
}

#[tokio::test]
async fn output_is_capped_head_and_tail() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    let out = sandbox
        .exec(
            &ExecRequest::new(
                "echo FIRST; head -c 2000000 /dev/zero | tr '\\0' x; echo; echo LAST",
            )
            .output_cap(64 * 1024),
        )
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0);
    assert!(out.truncated);
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("FIRST"));
    assert!(stdout.trim_end().ends_with("LAST"));
    assert!(stdout.contains("bytes truncated"));
    assert!(out.stdout.len() < 70 * 1024);
}

#[tokio::test]
async fn the_environment_is_clean() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    let out = sandbox.exec(&ExecRequest::new("env")).await.unwrap();
    let env = text(&out.stdout);
    for line in env.lines() {
        let name = line.split('=').next().unwrap_or("");
        assert!(
            [
                "PATH",
                "HOME",
                "TMPDIR",
                "LANG",
                "GIT_TERMINAL_PROMPT",
                "GIT_CONFIG_NOSYSTEM",
                "PWD",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(&name),
            "unexpected variable in the sandbox: {name}"
        );
    }
}

#[tokio::test]
async fn file_operations_do_not_follow_symlinks_out_of_the_workspace() {
    let (_repo, _root, sandbox) = sandbox_with_repo().await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret.txt");
    std::fs::write(&secret, "top secret").unwrap();
    let out = sandbox
        .exec(&ExecRequest::new(format!(
            "ln -s {} link.txt && ln -s {} linkdir",
            secret.display(),
            secret_dir.path().display()
        )))
        .await
        .unwrap();
    assert_eq!(out.exit_code, 0, "{}", out.combined());
    // Reading a symlink yields the link, never the target's content.
    assert_eq!(
        sandbox
            .read_file(&RepoPath::parse("link.txt").unwrap())
            .await
            .unwrap(),
        FileContent::Symlink {
            target: secret.display().to_string()
        }
    );
    // Writing through a symlink, or through a symlinked directory, is refused.
    assert!(
        sandbox
            .write_file(&RepoPath::parse("link.txt").unwrap(), b"pwned")
            .await
            .is_err()
    );
    assert!(
        sandbox
            .write_file(&RepoPath::parse("linkdir/new.txt").unwrap(), b"pwned")
            .await
            .is_err()
    );
    assert!(
        sandbox
            .read_file(&RepoPath::parse("linkdir/secret.txt").unwrap())
            .await
            .is_err()
    );
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "top secret");
    assert!(!secret_dir.path().join("new.txt").exists());
}

#[tokio::test]
async fn kill_removes_the_workspace_and_later_calls_fail() {
    let repo = repo_with(&[("a.txt", "a\n")]);
    let root = tempfile::tempdir().unwrap();
    let provider = local_sandbox(root.path()).await;
    let sandbox = provider.create("job-kill").await.unwrap();
    sandbox
        .clone_repo(&CloneSpec {
            url: format!("file://{}", repo.path().display()),
            branch: Some("main".into()),
            timeout: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert!(root.path().join("job-kill").exists());
    sandbox.kill().await.unwrap();
    sandbox.kill().await.unwrap();
    assert!(!root.path().join("job-kill").exists());
    assert!(sandbox.exec(&ExecRequest::new("true")).await.is_err());
}

#[tokio::test]
async fn without_confinement_the_service_refuses_unless_allowed() {
    use std::os::unix::fs::PermissionsExt;
    use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};
    // A launcher standing in for a kernel with neither user namespaces nor Landlock: it reports
    // so and exits with the launcher's "cannot confine" status, as `__sandbox-exec` does, except
    // at the `none` level.
    let dir = tempfile::tempdir().unwrap();
    let launcher = dir.path().join("launcher");
    std::fs::write(
        &launcher,
        "#!/bin/sh\ncase \"$2\" in *'\"isolation\":\"none\"'*) exec /bin/true;; esac\necho 'this kernel does not enforce Landlock' >&2\nexit 125\n",
    )
    .unwrap();
    std::fs::set_permissions(&launcher, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut config = LocalConfig::new(launcher);
    config.root = dir.path().join("ws");
    let err = LocalProvider::new(config.clone())
        .await
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(message.contains("does not enforce Landlock"), "{message}");
    assert!(
        message.contains("namespaces: ") && message.contains("landlock: "),
        "{message}"
    );
    assert!(
        message.contains("ALLOW_UNCONFINED_SANDBOX=true"),
        "{message}"
    );
    config.allow_unconfined = true;
    let provider = LocalProvider::new(config).await.unwrap();
    assert_eq!(provider.isolation().name(), "none");
}

#[tokio::test]
async fn host_git_never_reads_the_checkouts_own_gitconfig() {
    // The repository carries a `.gitconfig`. Were it git's global configuration on the host
    // (HOME = the checkout), trace2 would append to a file of its author's choosing on every git
    // call, and an fsmonitor command would run unconfined.
    let outside = tempfile::tempdir().unwrap();
    let traced = outside.path().join("traced");
    let monitored = outside.path().join("monitored");
    let config = format!(
        "[trace2]\n\tnormalTarget = {}\n[core]\n\tfsmonitor = \"touch {}; false\"\n",
        traced.display(),
        monitored.display()
    );
    let repo = repo_with(&[("README.md", "hello\n"), (".gitconfig", &config)]);
    let head = support::harness::git(repo.path(), &["rev-parse", "HEAD"]);
    let root = tempfile::tempdir().unwrap();
    let provider = local_sandbox(root.path()).await;
    let sandbox = provider.create("job-gitconfig").await.unwrap();
    let cloned = sandbox
        .clone_repo(&CloneSpec {
            url: format!("file://{}", repo.path().display()),
            branch: None,
            timeout: Duration::from_secs(60),
        })
        .await
        .unwrap();
    assert_eq!(
        (cloned.head.as_str(), cloned.branch.as_str()),
        (head.trim(), "main")
    );
    assert!(!traced.exists(), "host git read the checkout's .gitconfig");
    assert!(!monitored.exists(), "host git ran the checkout's fsmonitor");
    sandbox.kill().await.unwrap();
}

#[tokio::test]
async fn start_up_removes_only_our_own_leftover_workspaces() {
    use tiny_backspace::sandbox::local::sweep_workspaces;
    let repo = repo_with(&[("README.md", "hello\n")]);
    let root = tempfile::tempdir().unwrap();
    let spec = CloneSpec {
        url: format!("file://{}", repo.path().display()),
        branch: None,
        timeout: Duration::from_secs(60),
    };
    let provider = local_sandbox(root.path()).await;
    // A live workspace, and one whose owner went away without killing it (as after a crash:
    // nothing holds its marker any more).
    let live = provider.create("job-live").await.unwrap();
    live.clone_repo(&spec).await.unwrap();
    let left = provider.create("job-left").await.unwrap();
    left.clone_repo(&spec).await.unwrap();
    drop(left);
    assert!(root.path().join("job-left/repo/README.md").exists());

    // Things that are not our workspaces, whatever they look like.
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("victim")).unwrap();
    std::fs::copy(
        root.path().join("job-live/.tiny-backspace-workspace"),
        outside.path().join("victim/.tiny-backspace-workspace"),
    )
    .unwrap();
    std::os::unix::fs::symlink(outside.path().join("victim"), root.path().join("symlinked"))
        .unwrap();
    std::fs::create_dir_all(root.path().join("foreign/repo")).unwrap();
    std::fs::write(root.path().join("foreign/data"), "keep").unwrap();
    std::fs::create_dir(root.path().join("wrong-marker")).unwrap();
    std::fs::write(
        root.path().join("wrong-marker/.tiny-backspace-workspace"),
        "something else\n",
    )
    .unwrap();
    std::fs::create_dir(root.path().join("marker-is-a-link")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("victim/.tiny-backspace-workspace"),
        root.path()
            .join("marker-is-a-link/.tiny-backspace-workspace"),
    )
    .unwrap();
    std::fs::write(root.path().join("a-file"), "keep").unwrap();

    // A new process starting on the same root.
    let _again = local_sandbox(root.path()).await;
    let mut names: Vec<String> = std::fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "a-file",
            "foreign",
            "job-live",
            "marker-is-a-link",
            "symlinked",
            "wrong-marker"
        ]
    );
    assert!(
        outside
            .path()
            .join("victim/.tiny-backspace-workspace")
            .exists()
    );
    // The live sandbox still works.
    let out = live.exec(&ExecRequest::new("cat README.md")).await.unwrap();
    assert_eq!(text(&out.stdout), "hello\n");
    live.kill().await.unwrap();

    // Once nothing holds it, a second sweep takes it, and reports what it did.
    let marker_dir = root.path().join("again");
    std::fs::create_dir(&marker_dir).unwrap();
    std::fs::write(
        marker_dir.join(".tiny-backspace-workspace"),
        "tiny-backspace workspace\n",
    )
    .unwrap();
    let swept = sweep_workspaces(root.path());
    assert_eq!((swept.removed, swept.failed), (1, 0));
    assert_eq!(swept.names.len(), 1);
    assert!(!marker_dir.exists());
}

#[tokio::test]
async fn a_read_over_its_total_is_refused() {
    use tiny_backspace::sandbox::local::{LocalConfig, LocalProvider};
    use tiny_backspace::sandbox::{SandboxError, SandboxProvider};
    let six = "x".repeat(600);
    let four = "y".repeat(400);
    let repo = repo_with(&[("a.txt", &six), ("b.txt", &four), ("c.txt", "z")]);
    let root = tempfile::tempdir().unwrap();
    let mut config = LocalConfig::new(support::harness::launcher());
    config.root = root.path().to_path_buf();
    config.max_read_bytes = 1000;
    let provider = LocalProvider::new(config).await.unwrap();
    let sandbox = provider.create("job-read").await.unwrap();
    sandbox
        .clone_repo(&CloneSpec {
            url: format!("file://{}", repo.path().display()),
            branch: None,
            timeout: Duration::from_secs(60),
        })
        .await
        .unwrap();
    let p = |s: &str| RepoPath::parse(s).unwrap();

    // Up to the total, everything is read.
    let got = sandbox
        .read_files(&[p("a.txt"), p("b.txt"), p("missing.txt")])
        .await
        .unwrap();
    assert_eq!(
        got,
        [
            FileContent::File {
                bytes: six.clone().into_bytes(),
                executable: false
            },
            FileContent::File {
                bytes: four.clone().into_bytes(),
                executable: false
            },
            FileContent::Missing
        ]
    );
    // One byte more, and the whole read is refused.
    let e = sandbox
        .read_files(&[p("a.txt"), p("b.txt"), p("c.txt")])
        .await
        .unwrap_err();
    assert!(matches!(e, SandboxError::TooLarge(_)), "{e:?}");
    assert_eq!(e.code().as_str(), "change_too_large");
    assert!(!e.retryable());
    assert!(e.to_string().contains("1000 bytes"), "{e}");
    // A single file over the total too.
    sandbox
        .exec(&ExecRequest::new("head -c 1001 /dev/zero > big.bin"))
        .await
        .unwrap();
    let e = sandbox.read_file(&p("big.bin")).await.unwrap_err();
    assert_eq!(e.code().as_str(), "change_too_large", "{e}");
    sandbox.kill().await.unwrap();
}
