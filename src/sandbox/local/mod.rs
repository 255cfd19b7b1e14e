//! The `local` sandbox: a per-job workspace on this host.
//!
//! Layout: `<root>/<job_id>/repo` (the clone, the agent's working copy) and `<root>/<job_id>/tmp`
//! (its private `TMPDIR` and `HOME`), plus a marker file that says the workspace is ours and, by
//! a lock held while the workspace is in use, that it is live: at start-up, marked workspaces
//! nobody holds (left by a process that crashed) are removed.
//!
//! The host clones the repository; every command then runs through `tiny-backspace
//! __sandbox-exec` ([`launcher`]) in its own process group, with a clean environment, isolated
//! at the level decided at start-up ([`isolation`]), within the job's limits ([`limits`]), and is
//! killed with everything it started at its timeout or when it runs into a limit. File
//! operations are done by the host ([`files`]).

mod files;
mod fork;
pub mod isolation;
pub mod launcher;
pub mod limits;

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::capped::CappedBuf;
use crate::git::{GitError, HostGit};

use self::files::{chown_tree, content_len, list_beneath, mib, read_beneath, write_beneath};
use self::isolation::{HostIds, Isolation, IsolationChoice};
use self::launcher::LaunchSpec;
use self::limits::{CgroupParent, Enforcement, JobCgroup, JobLimits, LimitHit};
use super::{
    CloneSpec, Cloned, DirEntry, ExecOutput, ExecRequest, FileContent, RepoPath, Sandbox,
    SandboxError, SandboxProvider,
};

/// The file in each workspace directory that marks it as one this service created. Commands
/// cannot write there (only `repo` and `tmp` are writable to them).
const WORKSPACE_MARKER: &str = ".tiny-backspace-workspace";
const MARKER_CONTENT: &[u8] = b"tiny-backspace workspace\n";
/// How often a running command's disk use is estimated.
const DISK_TICK: Duration = Duration::from_millis(10);
/// The job's cgroup counters are read every this many ticks.
const CGROUP_EVERY_TICKS: u32 = 5;
/// The smallest file a command may always write (see `run`).
const MIN_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Settings of the local backend.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where per-job workspaces are created.
    pub root: PathBuf,
    /// The `tiny-backspace` binary that provides `__sandbox-exec`.
    pub launcher: PathBuf,
    /// `SANDBOX_ISOLATION`.
    pub isolation: IsolationChoice,
    /// Run commands even where the kernel cannot isolate them (an explicit operator decision).
    pub allow_unconfined: bool,
    /// `SANDBOX_MAX_PROCS`, `SANDBOX_MAX_MEMORY_MB`, `SANDBOX_MAX_DISK_MB`.
    pub limits: JobLimits,
    /// `SANDBOX_READ_PATHS`: extra host directories commands may read (toolchains).
    pub read_paths: Vec<PathBuf>,
    /// Who commands run as on the host when the server is root (`SANDBOX_UID`, `SANDBOX_GID`).
    pub run_as: HostIds,
    /// Use a job cgroup where one can be created (else rlimits).
    pub cgroups: bool,
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
            isolation: IsolationChoice::Auto,
            allow_unconfined: false,
            limits: JobLimits::default(),
            read_paths: Vec::new(),
            run_as: HostIds {
                uid: 65534,
                gid: 65534,
            },
            cgroups: true,
            max_file_bytes: 1024 * 1024 * 1024,
            max_read_bytes: super::DEFAULT_MAX_READ_BYTES,
        }
    }
}

/// What start-up decided: shared by every sandbox of the provider.
#[derive(Debug)]
struct Host {
    config: LocalConfig,
    isolation: Isolation,
    enforcement: Enforcement,
    /// Who commands run as, when not as the server itself.
    run_as: Option<HostIds>,
}

pub struct LocalProvider {
    host: Arc<Host>,
}

impl LocalProvider {
    /// Decides the isolation level by running a command at each candidate level, strongest
    /// first, and refuses when none works (naming what is missing) unless `allow_unconfined`
    /// is set. Workspaces an earlier process left behind (it crashed before cleaning up) are
    /// removed first; see [`sweep_workspaces`].
    pub async fn new(config: LocalConfig) -> Result<Self, SandboxError> {
        create_root(&config.root)?;
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
        let enforcement = if config.cgroups {
            let (found, why_not) = tokio::task::spawn_blocking(Enforcement::detect)
                .await
                .map_err(|e| SandboxError::Create(format!("cgroup detection failed: {e}")))?;
            if let Some(reason) = why_not {
                tracing::info!(reason = %reason, "no job cgroups: limits are rlimits");
            }
            found
        } else {
            Enforcement::Rlimits
        };
        if let Enforcement::Cgroup(parent) = &enforcement {
            for job_id in &swept.names {
                parent.remove_job(job_id);
            }
        }
        let run_as = nix::unistd::geteuid().is_root().then_some(config.run_as);
        let mut missing = Vec::new();
        let mut levels = config.isolation.candidates().to_vec();
        if config.allow_unconfined {
            levels.push(Isolation::None);
        }
        for isolation in levels {
            let host = Arc::new(Host {
                config: config.clone(),
                isolation,
                enforcement: enforcement.clone(),
                run_as,
            });
            match probe(&host, "true").await? {
                None => {
                    if isolation == Isolation::None {
                        tracing::warn!(missing = %missing.join("; "), "commands run WITHOUT isolation (ALLOW_UNCONFINED_SANDBOX=true)");
                    }
                    check_read_paths(&host).await?;
                    return Ok(Self { host });
                }
                Some(reason) => missing.push(format!("{}: {reason}", isolation.name())),
            }
        }
        Err(SandboxError::Unconfined(format!(
            "no isolation level works here ({}). Set ALLOW_UNCONFINED_SANDBOX=true to run commands without isolation (not recommended), or use SANDBOX=e2b.",
            missing.join("; ")
        )))
    }

    /// The isolation level in force.
    pub fn isolation(&self) -> Isolation {
        self.host.isolation
    }
}

/// Refuses `SANDBOX_READ_PATHS` that commands cannot actually read at the chosen level: a
/// toolchain the operator listed and the agent cannot use is a configuration error, not a
/// surprise in the middle of a job.
async fn check_read_paths(host: &Arc<Host>) -> Result<(), SandboxError> {
    let paths = &host.config.read_paths;
    if paths.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    let command = "printf '%s\\n' \"$TB_READ_PATHS\" | while IFS= read -r p; do \
                   [ -r \"$p\" ] && [ -x \"$p\" ] || printf '%s\\n' \"$p\"; done";
    let unreadable = probe_with(host, command, &[("TB_READ_PATHS", &list.join("\n"))]).await?;
    let unreadable = match unreadable {
        Probe::Ran(out) => out,
        Probe::Refused(reason) => reason,
    };
    let unreadable = unreadable.trim();
    if unreadable.is_empty() {
        return Ok(());
    }
    let who = match host.run_as {
        Some(ids) => format!(
            " (commands run as uid {}: each directory above must be searchable by it)",
            ids.uid
        ),
        None => String::new(),
    };
    Err(SandboxError::Create(format!(
        "SANDBOX_READ_PATHS: commands cannot read {} at the {} level{who}",
        unreadable.replace('\n', ", "),
        host.isolation.name()
    )))
}

enum Probe {
    /// The command ran; its stdout.
    Ran(String),
    /// The launcher could not isolate it; why.
    Refused(String),
}

/// Runs `true` at the host's level: `None` when it works, else why not.
async fn probe(host: &Arc<Host>, command: &str) -> Result<Option<String>, SandboxError> {
    match probe_with(host, command, &[]).await? {
        Probe::Ran(_) => Ok(None),
        Probe::Refused(reason) => Ok(Some(reason)),
    }
}

/// Runs `command` at the host's level in a scratch workspace.
async fn probe_with(
    host: &Arc<Host>,
    command: &str,
    env: &[(&str, &str)],
) -> Result<Probe, SandboxError> {
    let dir = host
        .config
        .root
        .join(format!("probe-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir)
        .map_err(|e| SandboxError::Create(format!("probe workspace {}: {e}", dir.display())))?;
    let result = async {
        let sandbox = LocalSandbox::at(dir.clone(), host.clone(), None)?;
        let mut request = ExecRequest::new(command).timeout(Duration::from_secs(20));
        request.env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let out = sandbox.run(&request).await?;
        Ok::<_, SandboxError>(out)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    let out = result?;
    if out.exit_code == launcher::EXIT_CONFINEMENT_FAILED {
        return Ok(Probe::Refused(
            crate::text::lossy(&out.stderr).trim().to_owned(),
        ));
    }
    if !out.success() {
        return Err(SandboxError::Create(format!(
            "the sandbox launcher {} does not work: {}",
            host.config.launcher.display(),
            out.combined().trim()
        )));
    }
    Ok(Probe::Ran(crate::text::lossy(&out.stdout)))
}

/// Creates the workspace root, traversable but not listable by others: commands that run as
/// another user reach their own workspace through it, and nothing else.
fn create_root(root: &Path) -> Result<(), SandboxError> {
    let failed =
        |e: std::io::Error| SandboxError::Create(format!("workspace root {}: {e}", root.display()));
    if !root.exists() {
        std::fs::create_dir_all(root).map_err(failed)?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711)).map_err(failed)?;
    }
    Ok(())
}

#[async_trait]
impl SandboxProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolation(&self) -> &'static str {
        self.host.isolation.name()
    }

    fn limits(&self) -> &'static str {
        self.host.enforcement.name()
    }

    async fn create(&self, job_id: &str) -> Result<Arc<dyn Sandbox>, SandboxError> {
        if job_id.is_empty()
            || !job_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(SandboxError::Create(format!("bad job id `{job_id}`")));
        }
        let dir = self.host.config.root.join(job_id);
        std::fs::create_dir(&dir)
            .map_err(|e| SandboxError::Create(format!("workspace {}: {e}", dir.display())))?;
        let cgroup = match &self.host.enforcement {
            Enforcement::Cgroup(parent) => Some(create_cgroup(parent, job_id, &self.host)?),
            Enforcement::Rlimits => None,
        };
        let sandbox = LocalSandbox::at(dir, self.host.clone(), cgroup)?;
        crate::telemetry::sandbox_created("local");
        Ok(Arc::new(sandbox))
    }
}

fn create_cgroup(
    parent: &CgroupParent,
    job_id: &str,
    host: &Host,
) -> Result<JobCgroup, SandboxError> {
    JobCgroup::create(parent, job_id, &host.config.limits)
        .map_err(|e| SandboxError::Create(format!("the job's cgroup: {e}")))
}

pub struct LocalSandbox {
    dir: PathBuf,
    repo: PathBuf,
    tmp: PathBuf,
    host: Arc<Host>,
    cgroup: Option<JobCgroup>,
    killed: AtomicBool,
    /// The workspace marker, locked (shared) while this sandbox lives; see [`sweep_workspaces`].
    _marker: File,
}

impl LocalSandbox {
    fn at(dir: PathBuf, host: Arc<Host>, cgroup: Option<JobCgroup>) -> Result<Self, SandboxError> {
        let marker = mark_workspace(&dir)?;
        let repo = dir.join("repo");
        let tmp = dir.join("tmp");
        let failed =
            |d: &Path, e: std::io::Error| SandboxError::Create(format!("{}: {e}", d.display()));
        // Reachable, not listable, by the user commands run as.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| failed(&dir, e))?;
        std::fs::create_dir_all(&repo).map_err(|e| failed(&repo, e))?;
        // The repository is handed over once it is cloned (host git refuses to work in a
        // checkout another user owns).
        for d in [&tmp, &tmp.join("home")] {
            std::fs::create_dir_all(d).map_err(|e| failed(d, e))?;
            if let Some(ids) = host.run_as {
                std::os::unix::fs::chown(d, Some(ids.uid), Some(ids.gid))
                    .map_err(|e| failed(d, e))?;
            }
        }
        Ok(Self {
            dir,
            repo,
            tmp,
            host,
            cgroup,
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

    fn limits(&self) -> &JobLimits {
        &self.host.config.limits
    }

    /// Bytes the workspace takes, measured off the async threads.
    async fn workspace_usage(&self) -> (u64, Duration) {
        let dir = self.dir.clone();
        let stop_at = self.limits().max_disk_bytes.saturating_add(1);
        tokio::task::spawn_blocking(move || limits::measure(&dir, stop_at))
            .await
            .unwrap_or((0, Duration::ZERO))
    }

    /// Runs `req` in the repository, isolated; stops it when it runs into a limit.
    async fn run(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        let host = &self.host;
        let limits = *self.limits();
        let (used, took) = self.workspace_usage().await;
        // A file may take what is left of the workspace's size, and at least a little, so that a
        // command that first deletes can still write.
        let disk_left = limits
            .max_disk_bytes
            .saturating_sub(used)
            .max(MIN_FILE_BYTES.min(limits.max_disk_bytes));
        let rlimits = self.cgroup.is_none();
        let spec = LaunchSpec {
            isolation: host.isolation,
            repo: self.repo.clone(),
            tmp: self.tmp.clone(),
            read_paths: host.config.read_paths.clone(),
            run_as: host.run_as,
            cgroup_procs: self
                .cgroup
                .as_ref()
                .map(JobCgroup::procs_files)
                .unwrap_or_default(),
            cpu_seconds: req.timeout.as_secs().saturating_add(1),
            max_file_bytes: host.config.max_file_bytes.min(disk_left),
            max_procs: rlimits.then_some(limits.max_procs),
            max_data_bytes: rlimits.then_some(limits.max_memory_bytes),
        };
        let mut cmd = tokio::process::Command::new(&host.config.launcher);
        cmd.args(launcher::arguments(
            &spec,
            &["/bin/bash", "-c", &req.command],
        ))
        .current_dir(&self.repo)
        .env_clear()
        .env("LANG", "C.UTF-8")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .envs(req.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
        let before = self.cgroup.as_ref().map(JobCgroup::events);
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
        // Boxed: the futures are large, and a debug build polls them on the stack.
        let mut run = Box::pin(async { tokio::join!(waited, readers) });
        let watch = Box::pin(async {
            // The workspace is walked on a schedule that keeps walking cheap, and at once when
            // the filesystem's own count of used blocks (one `statvfs`, every tick) says it may
            // have grown past the limit: a fast writer is caught within a tick.
            let mut walk = limits::DiskWatch::new(&self.dir, used, took);
            let mut ticks = 0u32;
            loop {
                tokio::time::sleep(DISK_TICK).await;
                ticks += 1;
                if ticks.is_multiple_of(CGROUP_EVERY_TICKS)
                    && let (Some(before), Some(cgroup)) = (&before, &self.cgroup)
                    && let Some(hit) = before.hit_since(&cgroup.events())
                {
                    return hit;
                }
                if walk.due(DISK_TICK, limits.max_disk_bytes) {
                    let (used, took) = self.workspace_usage().await;
                    if walk.over(used, limits.max_disk_bytes) {
                        return LimitHit::Disk;
                    }
                    walk.walked(used, took);
                }
            }
        });
        let bounded = async {
            tokio::select! {
                done = &mut run => (done, None),
                hit = watch => {
                    if let Some(pgid) = pgid {
                        let _ = killpg(pgid, Signal::SIGKILL);
                    }
                    (run.await, Some(hit))
                }
            }
        };
        match tokio::time::timeout(req.timeout, bounded).await {
            Ok(((status, ((stdout, t1), (stderr, t2))), hit)) => {
                let status = status.map_err(|e| SandboxError::Io(format!("wait: {e}")))?;
                let hit = match hit {
                    Some(hit) => Some(hit),
                    None => self.hit_after(before.as_ref(), used).await,
                };
                let mut output = ExecOutput {
                    exit_code: exit_code(&status),
                    stdout,
                    stderr,
                    timed_out: false,
                    truncated: t1 || t2,
                };
                if let Some(hit) = hit {
                    tracing::info!(limit = hit.setting(), "a command ran into a job limit");
                    if !output.stderr.is_empty() && !output.stderr.ends_with(b"\n") {
                        output.stderr.push(b'\n');
                    }
                    output
                        .stderr
                        .extend_from_slice(hit.explain(&limits).as_bytes());
                    if output.exit_code == 0 {
                        output.exit_code = 1;
                    }
                }
                Ok(output)
            }
            Err(_) => {
                if let Some(pgid) = pgid {
                    let _ = killpg(pgid, Signal::SIGKILL);
                }
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

    /// A limit the command ran into that the watch had not seen yet (it ended first).
    async fn hit_after(&self, before: Option<&limits::Events>, start: u64) -> Option<LimitHit> {
        if let (Some(before), Some(cgroup)) = (before, &self.cgroup)
            && let Some(hit) = before.hit_since(&cgroup.events())
        {
            return Some(hit);
        }
        let (used, _) = self.workspace_usage().await;
        (used > self.limits().max_disk_bytes.max(start)).then_some(LimitHit::Disk)
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
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    pub removed: usize,
    /// The removed workspaces' names (their job ids): their job cgroups are leftovers too.
    pub names: Vec<String>,
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
            Ok(()) => {
                swept.removed += 1;
                swept
                    .names
                    .push(entry.file_name().to_string_lossy().into_owned());
            }
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
        if let Some(ids) = self.host.run_as {
            let repo = self.repo.clone();
            tokio::task::spawn_blocking(move || chown_tree(&repo, ids))
                .await
                .map_err(|e| SandboxError::Io(format!("handing the checkout over failed: {e}")))?
                .map_err(|e| SandboxError::Io(format!("handing the checkout over: {e}")))?;
        }
        Ok(Cloned {
            head: crate::text::lossy(&head.stdout).trim().to_owned(),
            branch: crate::text::lossy(&branch.stdout).trim().to_owned(),
        })
    }

    #[tracing::instrument(name = "sandbox.exec", skip_all, fields(backend = "local"))]
    async fn exec(&self, req: &ExecRequest) -> Result<ExecOutput, SandboxError> {
        self.check_alive()?;
        self.run(req).await
    }

    async fn read_file(&self, path: &RepoPath) -> Result<FileContent, SandboxError> {
        let path = path.clone();
        let budget = self.host.config.max_read_bytes;
        self.blocking(move |repo| read_beneath(repo, &path, budget))
            .await
    }

    async fn read_files(&self, paths: &[RepoPath]) -> Result<Vec<FileContent>, SandboxError> {
        let paths = paths.to_vec();
        let max_total = self.host.config.max_read_bytes;
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
        let owner = self.host.run_as;
        self.blocking(move |repo| write_beneath(repo, &path, &bytes, owner))
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
        crate::telemetry::sandbox_killed("local");
        let dir = self.dir.clone();
        let cgroup = self.cgroup.clone();
        tokio::task::spawn_blocking(move || {
            // Every command was killed with its group when it ended: the cgroup is empty.
            if let Some(cgroup) = cgroup {
                cgroup.remove();
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(SandboxError::Io(format!("removing {}: {e}", dir.display()))),
            }
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
