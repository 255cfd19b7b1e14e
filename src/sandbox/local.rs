//! The `local` sandbox: a per-job workspace on this host.
//!
//! Layout: `<root>/<job_id>/repo` (the clone, the agent's working copy) and `<root>/<job_id>/tmp`
//! (its private `TMPDIR` and `HOME`), plus a marker file that says the workspace is ours and, by
//! a lock held while the workspace is in use, that it is live: at start-up, marked workspaces
//! nobody holds (left by a process that crashed) are removed. The host clones the repository; every command then runs
//! through `tiny-backspace __sandbox-exec` (see `confine.rs`) in its own process group, with a
//! clean environment, and is killed with its whole group at its timeout.
//!
//! File operations are done by the host, so they resolve paths with `openat2(RESOLVE_BENEATH)`
//! and refuse symlinks: a link planted by a command cannot make us read or write outside the
//! workspace.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::capped::CappedBuf;
use crate::git::{GitError, HostGit};

use super::{
    CloneSpec, Cloned, DirEntry, ExecOutput, ExecRequest, FileContent, RepoPath, Sandbox,
    SandboxError, SandboxProvider,
};

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Entries `list_dir` returns at most.
const MAX_LIST_ENTRIES: usize = 5000;
/// Files `read_file` reads at most.
const MAX_READ_BYTES: u64 = 100 * 1024 * 1024;
/// The file in each workspace directory that marks it as one this service created. Commands
/// cannot write there (only `repo` and `tmp` are writable to them).
const WORKSPACE_MARKER: &str = ".tiny-backspace-workspace";
const MARKER_CONTENT: &[u8] = b"tiny-backspace workspace\n";

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where per-job workspaces are created.
    pub root: PathBuf,
    /// The `tiny-backspace` binary that provides `__sandbox-exec`.
    pub launcher: PathBuf,
    /// Run commands even where the kernel cannot confine them (an explicit operator decision).
    pub allow_unconfined: bool,
    /// Largest file a command may write.
    pub max_file_bytes: u64,
    /// Bytes one `read_files` call returns at most, all files together.
    pub max_read_bytes: u64,
}

impl LocalConfig {
    pub fn new(launcher: PathBuf) -> Self {
        Self {
            root: std::env::temp_dir().join("tiny-backspace"),
            launcher,
            allow_unconfined: false,
            max_file_bytes: 1024 * 1024 * 1024,
            max_read_bytes: super::DEFAULT_MAX_READ_BYTES,
        }
    }
}

pub struct LocalProvider {
    config: LocalConfig,
}

impl LocalProvider {
    /// Checks that commands can be confined on this kernel (by running one), and refuses
    /// otherwise unless `allow_unconfined` is set.
    /// Workspaces an earlier process left behind (it crashed before cleaning up) are removed
    /// first; see [`sweep_workspaces`].
    pub async fn new(config: LocalConfig) -> Result<Self, SandboxError> {
        std::fs::create_dir_all(&config.root).map_err(|e| {
            SandboxError::Create(format!("workspace root {}: {e}", config.root.display()))
        })?;
        let root = config.root.clone();
        let swept = tokio::task::spawn_blocking(move || sweep_workspaces(&root))
            .await
            .map_err(|e| SandboxError::Create(format!("workspace sweep failed: {e}")))?;
        if swept.removed > 0 || swept.failed > 0 {
            tracing::info!(
                root = %config.root.display(),
                removed = swept.removed,
                failed = swept.failed,
                "removed workspaces left by an earlier run"
            );
        }
        let probe = tempfile::tempdir_in(&config.root)
            .map_err(|e| SandboxError::Create(format!("probe workspace: {e}")))?;
        let sandbox = LocalSandbox::at(probe.path().to_path_buf(), config.clone())?;
        let out = sandbox
            .run(
                &ExecRequest::new("true").timeout(Duration::from_secs(20)),
                probe.path(),
            )
            .await?;
        if out.exit_code == super::confine::EXIT_CONFINEMENT_FAILED {
            return Err(SandboxError::Unconfined(format!(
                "{} Set ALLOW_UNCONFINED_SANDBOX=true to run commands without confinement (not recommended), or use SANDBOX=e2b.",
                crate::text::lossy(&out.stderr).trim()
            )));
        }
        if !out.success() {
            return Err(SandboxError::Create(format!(
                "the sandbox launcher {} does not work: {}",
                config.launcher.display(),
                out.combined().trim()
            )));
        }
        Ok(Self { config })
    }
}

#[async_trait]
impl SandboxProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        if job_id.is_empty()
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(SandboxError::Create(format!("bad job id `{job_id}`")));
        }
        let dir = self.config.root.join(job_id);
        std::fs::create_dir(&dir)
            .map_err(|e| SandboxError::Create(format!("workspace {}: {e}", dir.display())))?;
        Ok(Arc::new(LocalSandbox::at(dir, self.config.clone())?))
    }
}

pub struct LocalSandbox {
    dir: PathBuf,
    repo: PathBuf,
    tmp: PathBuf,
    config: LocalConfig,
    killed: AtomicBool,
    /// The workspace marker, locked (shared) while this sandbox lives; see [`sweep_workspaces`].
    _marker: File,
}

impl LocalSandbox {
    fn at(dir: PathBuf, config: LocalConfig) -> Result<Self, SandboxError> {
        let marker = mark_workspace(&dir)?;
        let repo = dir.join("repo");
        let tmp = dir.join("tmp");
        for d in [&repo, &tmp, &tmp.join("home")] {
            std::fs::create_dir_all(d)
                .map_err(|e| SandboxError::Create(format!("{}: {e}", d.display())))?;
        }
        Ok(Self {
            dir,
            repo,
            tmp,
            config,
            killed: AtomicBool::new(false),
            _marker: marker,
        })
    }

    /// The workspace's repository directory on the host.
    pub fn repo_dir(&self) -> &Path {
        &self.repo
    }

    fn check_alive(&self) -> Result<(), SandboxError> {
        if self.killed.load(Ordering::SeqCst) {
            Err(SandboxError::Gone("the sandbox was killed".into()))
        } else {
            Ok(())
        }
    }

    /// Runs `req` confined, with `cwd` as working directory.
    async fn run(&self, req: &ExecRequest, cwd: &Path) -> Result<ExecOutput, SandboxError> {
        let mut cmd = tokio::process::Command::new(&self.config.launcher);
        cmd.arg("__sandbox-exec")
            .arg("--write")
            .arg(&self.repo)
            .arg("--write")
            .arg(&self.tmp)
            .arg("--cpu-seconds")
            .arg(req.timeout.as_secs().saturating_add(1).to_string())
            .arg("--max-file-bytes")
            .arg(self.config.max_file_bytes.to_string());
        if self.config.allow_unconfined {
            cmd.arg("--allow-unconfined");
        }
        cmd.arg("--")
            .args(["/bin/bash", "-c", &req.command])
            .current_dir(cwd)
            .env_clear()
            .env("PATH", PATH)
            .env("HOME", self.tmp.join("home"))
            .env("TMPDIR", &self.tmp)
            .env("LANG", "C.UTF-8")
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| SandboxError::Io(format!("could not start the sandbox launcher: {e}")))?;
        let pgid = child.id().map(|id| Pid::from_raw(id as i32));
        // Kills the whole group however this function ends (timeout, cancellation, error).
        let _group = GroupKiller(pgid);
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let cap = req.output_cap.max(1024);
        let readers = async { tokio::join!(read_capped(stdout, cap), read_capped(stderr, cap)) };
        let waited = async {
            let status = child.wait().await;
            // The command is done; anything it left running in its group goes too, which also
            // closes the pipes so the readers finish.
            if let Some(pgid) = pgid {
                let _ = killpg(pgid, Signal::SIGKILL);
            }
            status
        };
        let run = async { tokio::join!(waited, readers) };
        match tokio::time::timeout(req.timeout, run).await {
            Ok((status, ((stdout, t1), (stderr, t2)))) => {
                let status = status.map_err(|e| SandboxError::Io(format!("wait: {e}")))?;
                Ok(ExecOutput {
                    exit_code: exit_code(&status),
                    stdout,
                    stderr,
                    timed_out: false,
                    truncated: t1 || t2,
                })
            }
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
                let _ = child.wait().await;
                Ok(ExecOutput {
                    exit_code: 124,
                    stdout: Vec::new(),
                    stderr: format!(
                        "command timed out after {} s and was killed",
                        req.timeout.as_secs()
                    )
                    .into_bytes(),
                    timed_out: true,
                    truncated: false,
                })
            }
        }
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, SandboxError>
    where
        T: Send + 'static,
        F: FnOnce(&Path) -> Result<T, SandboxError> + Send + 'static,
    {
        self.check_alive()?;
        let repo = self.repo.clone();
        tokio::task::spawn_blocking(move || f(&repo))
            .await
            .map_err(|e| SandboxError::Io(format!("file task failed: {e}")))?
    }
}

/// Writes the workspace marker into `dir` and returns it locked (shared) for as long as the
/// workspace is in use. The lock comes before the content, so a sweep never takes a workspace
/// being set up for a leftover; the kernel drops it when the process ends, however it ends.
fn mark_workspace(dir: &Path) -> Result<File, SandboxError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(WORKSPACE_MARKER);
    let failed = |e: &dyn std::fmt::Display| {
        SandboxError::Create(format!("workspace marker {}: {e}", path.display()))
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| failed(&e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockShared).map_err(|e| failed(&e))?;
    file.write_all(MARKER_CONTENT).map_err(|e| failed(&e))?;
    Ok(file)
}

/// What [`sweep_workspaces`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub removed: usize,
    /// Leftovers that could not be removed (logged one by one).
    pub failed: usize,
}

/// Removes the workspaces under `root` that this service created and no live process uses: a
/// direct child that is a real directory (not a symlink) holding our marker, as a regular file
/// with our content, that nobody holds a lock on. Anything else is left alone, whatever its
/// name: the root may be shared with other files, or with another running instance.
pub fn sweep_workspaces(root: &Path) -> Swept {
    use std::os::unix::fs::OpenOptionsExt;
    let mut swept = Swept::default();
    let Ok(entries) = std::fs::read_dir(root) else {
        return swept;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let is_dir = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.file_type().is_dir());
        if !is_dir {
            continue;
        }
        let Ok(mut marker) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(dir.join(WORKSPACE_MARKER))
        else {
            continue;
        };
        if !marker.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        // Held by a live sandbox (of this process or another sharing the root).
        if rustix::fs::flock(
            &marker,
            rustix::fs::FlockOperation::NonBlockingLockExclusive,
        )
        .is_err()
        {
            continue;
        }
        let mut content = Vec::new();
        let read = (&mut marker)
            .take(MARKER_CONTENT.len() as u64 + 1)
            .read_to_end(&mut content);
        if read.is_err() || content != MARKER_CONTENT {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => swept.removed += 1,
            Err(e) => {
                swept.failed += 1;
                tracing::warn!(workspace = %dir.display(), error = %e, "could not remove a leftover workspace");
            }
        }
    }
    swept
}

struct GroupKiller(Option<Pid>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            let _ = killpg(pgid, Signal::SIGKILL);
        }
    }
}

fn exit_code(status: &std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(-1)
}

/// Reads a pipe to its end, keeping the first and last `cap / 2` bytes.
async fn read_capped<R: AsyncRead + Unpin>(pipe: Option<R>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = CappedBuf::new(cap);
    let mut buf = [0u8; 16 * 1024];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => kept.push(&buf[..n]),
        }
    }
    let truncated = kept.truncated();
    (kept.into_bytes(), truncated)
}

#[async_trait]
impl Sandbox for LocalSandbox {
    async fn clone_repo(&self, spec: &CloneSpec) -> Result<Cloned, SandboxError> {
        self.check_alive()?;
        // The host clones before any confined code runs: it needs the network (or the local
        // repository), which commands never get.
        let mut args: Vec<String> = vec![
            "-c".into(),
            "protocol.allow=never".into(),
            "-c".into(),
            "protocol.https.allow=always".into(),
            "clone".into(),
            "--quiet".into(),
            "--depth".into(),
            "1".into(),
            "--single-branch".into(),
            "--no-tags".into(),
        ];
        if let Some(branch) = &spec.branch {
            args.push("--branch".into());
            args.push(branch.clone());
        }
        args.push("--".into());
        args.push(spec.url.clone());
        args.push(self.repo.display().to_string());
        let clone = HostGit::new(&self.dir).map_err(git_error)?;
        let out = run_host_git(clone.allow_file_protocol(), &args, spec.timeout).await?;
        if !out.status.success() {
            return Err(SandboxError::Clone(
                crate::text::lossy(&out.stderr).trim().to_owned(),
            ));
        }
        // The checkout's files are the repository author's: these calls must not read any of
        // them as configuration (see `crate::git`).
        let head = run_host_git(
            HostGit::new(&self.repo).map_err(git_error)?,
            &["rev-parse".into(), "HEAD".into()],
            spec.timeout,
        )
        .await?;
        let branch = run_host_git(
            HostGit::new(&self.repo).map_err(git_error)?,
            &["symbolic-ref".into(), "--short".into(), "HEAD".into()],
            spec.timeout,
        )
        .await?;
        if !head.status.success() {
            return Err(SandboxError::Clone("the repository has no commits".into()));
        }
        Ok(Cloned {
            head: crate::text::lossy(&head.stdout).trim().to_owned(),
            branch: crate::text::lossy(&branch.stdout).trim().to_owned(),
        })
    }

    async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.check_alive()?;
        self.run(req, &self.repo).await
    }

    async fn read_file(&self, path: &RepoPath) -> Result<FileContent, SandboxError> {
        let path = path.clone();
        let budget = self.config.max_read_bytes;
        self.blocking(move |repo| read_beneath(repo, &path, budget))
            .await
    }

    async fn read_files(&self, paths: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError> {
        let paths = paths.to_vec();
        let max_total = self.config.max_read_bytes;
        self.blocking(move |repo| {
            let mut left = max_total;
            paths
                .iter()
                .map(|p| {
                    let content = read_beneath(repo, p, left).map_err(|e| match e {
                        SandboxError::TooLarge(_) => SandboxError::TooLarge(format!(
                            "the {} files read together hold more than {} (at {p}); the change is too large",
                            paths.len(),
                            mib(max_total)
                        )),
                        other => other,
                    })?;
                    left -= content_len(&content).min(left);
                    Ok(content)
                })
                .collect()
        })
        .await
    }

    async fn write_file(&self, path: &RepoPath, bytes: &[u8]) -> Result<(), SandboxError> {
        let path = path.clone();
        let bytes = bytes.to_vec();
        self.blocking(move |repo| write_beneath(repo, &path, &bytes))
            .await
    }

    async fn list_dir(&self, path: &RepoPath, depth: u32) -> Result<Vec<DirEntry>, SandboxError> {
        let path = path.clone();
        self.blocking(move |repo| list_beneath(repo, &path, depth))
            .await
    }

    async fn kill(&self) -> Result<(), SandboxError> {
        if self.killed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(SandboxError::Io(format!("removing {}: {e}", dir.display()))),
        })
        .await
        .map_err(|e| SandboxError::Io(format!("cleanup task failed: {e}")))?
    }
}

/// Runs host git (built by [`HostGit`]) with `args`, bounded by `timeout`.
async fn run_host_git(
    git: HostGit,
    args: &[String],
    timeout: Duration,
) -> Result<std::process::Output, SandboxError> {
    match git.args(args).output(None, timeout).await {
        Ok(out) => Ok(out),
        Err(GitError::TimedOut(_)) => Err(SandboxError::Clone(format!(
            "git {} timed out after {} s",
            args.iter()
                .find(|a| !a.starts_with('-') && !a.contains('='))
                .map(String::as_str)
                .unwrap_or(""),
            timeout.as_secs()
        ))),
        Err(e) => Err(git_error(e)),
    }
}

fn git_error(e: GitError) -> SandboxError {
    SandboxError::Io(e.to_string())
}

const BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

fn io_err(path: &RepoPath, e: impl std::fmt::Display) -> SandboxError {
    SandboxError::Io(format!("{path}: {e}"))
}

fn open_root(repo: &Path) -> Result<OwnedFd, SandboxError> {
    rustix::fs::open(
        repo,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| SandboxError::Io(format!("workspace: {e}")))
}

/// Opens the directory holding `path` (no symlinks anywhere on the way) and returns it with the
/// last component's name.
fn open_parent(repo: &Path, path: &RepoPath) -> Result<(OwnedFd, String), SandboxError> {
    let root = open_root(repo)?;
    let components: Vec<&str> = path.components().collect();
    let Some((name, parents)) = components.split_last() else {
        return Err(SandboxError::Path(
            "the repository root is not a file".into(),
        ));
    };
    if parents.is_empty() {
        return Ok((root, (*name).to_owned()));
    }
    let parent = rustix::fs::openat2(
        root.as_fd(),
        parents.join("/"),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        BENEATH,
    )
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => SandboxError::NotFound(format!("{path}: no such directory")),
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            SandboxError::Path(format!("{path}: a directory on the way is a symlink"))
        }
        e => io_err(path, e),
    })?;
    Ok((parent, (*name).to_owned()))
}

/// Bytes a read returned, for the total.
fn content_len(content: &FileContent) -> u64 {
    match content {
        FileContent::File { bytes, .. } => bytes.len() as u64,
        FileContent::Symlink { target } => target.len() as u64,
        FileContent::Missing => 0,
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads one file without following symlinks: refused when it is larger than the per-file
/// bound ([`MAX_READ_BYTES`], an I/O error the agent can be told about) or than `budget`, what
/// is left of the read's total ([`SandboxError::TooLarge`]).
fn read_beneath(repo: &Path, path: &RepoPath, budget: u64) -> Result<FileContent, SandboxError> {
    let (parent, name) = match open_parent(repo, path) {
        Ok(found) => found,
        Err(SandboxError::NotFound(_)) => return Ok(FileContent::Missing),
        Err(e) => return Err(e),
    };
    let stat = match rustix::fs::statat(parent.as_fd(), name.as_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(stat) => stat,
        Err(rustix::io::Errno::NOENT) => return Ok(FileContent::Missing),
        Err(e) => return Err(io_err(path, e)),
    };
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Symlink => {
            let target = rustix::fs::readlinkat(parent.as_fd(), name.as_str(), Vec::new())
                .map_err(|e| io_err(path, e))?;
            if target.as_bytes().len() as u64 > budget {
                return Err(SandboxError::TooLarge(format!(
                    "{path}: over the read's total"
                )));
            }
            Ok(FileContent::Symlink {
                target: target.to_string_lossy().into_owned(),
            })
        }
        FileType::RegularFile => {
            let too_big = |size: u64| {
                if size > MAX_READ_BYTES {
                    Some(SandboxError::Io(format!(
                        "{path} is larger than {}",
                        mib(MAX_READ_BYTES)
                    )))
                } else if size > budget {
                    Some(SandboxError::TooLarge(format!(
                        "{path} ({}) is over the read's total",
                        mib(size)
                    )))
                } else {
                    None
                }
            };
            if let Some(refused) = too_big(stat.st_size as u64) {
                return Err(refused);
            }
            let fd = rustix::fs::openat(
                parent.as_fd(),
                name.as_str(),
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err(path, e))?;
            // One byte more than allowed, to notice a file that grew since `stat`.
            let limit = MAX_READ_BYTES.min(budget);
            let mut bytes = Vec::new();
            File::from(fd)
                .take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| io_err(path, e))?;
            if let Some(refused) = too_big(bytes.len() as u64) {
                return Err(refused);
            }
            Ok(FileContent::File {
                bytes,
                executable: stat.st_mode & 0o111 != 0,
            })
        }
        FileType::Directory => Err(SandboxError::Path(format!("{path} is a directory"))),
        FileType::Fifo
        | FileType::Socket
        | FileType::CharacterDevice
        | FileType::BlockDevice
        | FileType::Unknown => Err(SandboxError::Path(format!("{path} is not a regular file"))),
    }
}

fn write_beneath(repo: &Path, path: &RepoPath, bytes: &[u8]) -> Result<(), SandboxError> {
    let root = open_root(repo)?;
    let components: Vec<&str> = path.components().collect();
    let Some((name, parents)) = components.split_last() else {
        return Err(SandboxError::Path(
            "cannot write the repository root".into(),
        ));
    };
    // Create missing parent directories one level at a time, never through a symlink.
    let mut dir = root;
    for part in parents {
        match rustix::fs::mkdirat(dir.as_fd(), *part, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(io_err(path, e)),
        }
        dir = rustix::fs::openat2(
            dir.as_fd(),
            *part,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
                SandboxError::Path(format!("{path}: `{part}` is a symlink"))
            }
            rustix::io::Errno::NOTDIR => SandboxError::Path(format!("{path}: `{part}` is a file")),
            e => io_err(path, e),
        })?;
    }
    let fd = rustix::fs::openat2(
        dir.as_fd(),
        *name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
        BENEATH,
    )
    .map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => {
            SandboxError::Path(format!("{path} is a symlink; refusing to write through it"))
        }
        rustix::io::Errno::ISDIR => SandboxError::Path(format!("{path} is a directory")),
        e => io_err(path, e),
    })?;
    File::from(fd).write_all(bytes).map_err(|e| io_err(path, e))
}

fn list_beneath(repo: &Path, path: &RepoPath, depth: u32) -> Result<Vec<DirEntry>, SandboxError> {
    let root = open_root(repo)?;
    let start = if path.is_root() {
        rustix::fs::openat(
            root.as_fd(),
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    } else {
        rustix::fs::openat2(
            root.as_fd(),
            path.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
            BENEATH,
        )
    }
    .map_err(|e| match e {
        rustix::io::Errno::NOENT => SandboxError::NotFound(format!("{path}: no such directory")),
        rustix::io::Errno::NOTDIR => SandboxError::Path(format!("{path} is not a directory")),
        e => io_err(path, e),
    })?;
    let mut out = Vec::new();
    let mut stack = vec![(start, path.clone(), 1u32)];
    while let Some((fd, rel, level)) = stack.pop() {
        let mut entries = Vec::new();
        let dir = rustix::fs::Dir::read_from(fd.as_fd()).map_err(|e| io_err(&rel, e))?;
        for entry in dir {
            let entry = entry.map_err(|e| io_err(&rel, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." || name == ".git" {
                continue;
            }
            let is_dir = match entry.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    rustix::fs::statat(fd.as_fd(), name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
                        .map(|s| FileType::from_raw_mode(s.st_mode) == FileType::Directory)
                        .unwrap_or(false)
                }
                _ => false,
            };
            entries.push((name, is_dir));
        }
        entries.sort();
        for (name, is_dir) in entries {
            let Ok(child) = rel.join(&name) else { continue };
            if out.len() >= MAX_LIST_ENTRIES {
                return Ok(out);
            }
            out.push(DirEntry {
                path: child.as_str().to_owned(),
                is_dir,
            });
            if is_dir
                && level < depth
                && let Ok(child_fd) = rustix::fs::openat2(
                    fd.as_fd(),
                    name.as_str(),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                    BENEATH,
                )
            {
                stack.push((child_fd, child, level + 1));
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}
