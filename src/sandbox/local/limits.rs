//! Per-job resource limits of the local sandbox: processes, memory and the workspace's size.
//!
//! - **A cgroup per job** where the service can create one (cgroup v2, or the v1 `pids` and
//!   `memory` hierarchies): `pids.max` and the memory limit hold for all of a job's processes
//!   together, and the kernel's event counters (`pids.events`, the OOM-kill count) say when a
//!   command hit one, so it can be stopped and the model told which.
//! - **rlimits** otherwise: `RLIMIT_NPROC` (counted per user namespace, so per job at the
//!   `namespaces` level) and `RLIMIT_DATA` (per process), set by the launcher.
//! - **The workspace's size** is measured by the host while a command runs (no filesystem
//!   quota is assumed): over the limit, the command is stopped. `RLIMIT_FSIZE` keeps any single
//!   file within what is left, so the overshoot between two measurements stays bounded.

use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The limits of one job, from `SANDBOX_MAX_PROCS`, `SANDBOX_MAX_MEMORY_MB` and
/// `SANDBOX_MAX_DISK_MB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub max_procs: u64,
    pub max_memory_bytes: u64,
    pub max_disk_bytes: u64,
}

impl Default for JobLimits {
    fn default() -> Self {
        Self {
            max_procs: 512,
            max_memory_bytes: 4096 * MIB,
            max_disk_bytes: 4096 * MIB,
        }
    }
}

pub const MIB: u64 = 1024 * 1024;

/// A limit a command ran into; the model is told which, by the setting's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Procs,
    Memory,
    Disk,
}

impl LimitHit {
    pub fn setting(self) -> &'static str {
        match self {
            LimitHit::Procs => "SANDBOX_MAX_PROCS",
            LimitHit::Memory => "SANDBOX_MAX_MEMORY_MB",
            LimitHit::Disk => "SANDBOX_MAX_DISK_MB",
        }
    }

    /// The line added to the command's output.
    pub fn explain(self, limits: &JobLimits) -> String {
        match self {
            LimitHit::Procs => format!(
                "tiny-backspace: the command was stopped: the job reached its process limit ({} processes, {}).",
                limits.max_procs,
                self.setting()
            ),
            LimitHit::Memory => format!(
                "tiny-backspace: the command was stopped: the job ran out of memory ({} MB, {}).",
                limits.max_memory_bytes / MIB,
                self.setting()
            ),
            LimitHit::Disk => format!(
                "tiny-backspace: the command was stopped: the workspace grew past its size limit ({} MB, {}). Delete files to make room.",
                limits.max_disk_bytes / MIB,
                self.setting()
            ),
        }
    }
}

/// How the limits are enforced on this host, decided once at start-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// Job cgroups are created under this one.
    Cgroup(CgroupParent),
    /// No cgroup could be created: rlimits.
    Rlimits,
}

impl Enforcement {
    /// What `/healthz` and the start-up log say.
    pub fn name(&self) -> &'static str {
        match self {
            Enforcement::Cgroup(CgroupParent::V2 { .. }) => "cgroup2",
            Enforcement::Cgroup(CgroupParent::V1 { .. }) => "cgroup1",
            Enforcement::Rlimits => "rlimits",
        }
    }

    /// Finds where this process may create job cgroups: a cgroup v2 subtree with the `pids` and
    /// `memory` controllers, else the v1 `pids` and `memory` hierarchies, each under this
    /// process's own cgroup. Creates (or reuses) a `tiny-backspace` group there and checks that
    /// a job group can be made in it and removed again.
    pub fn detect() -> (Self, Option<String>) {
        let own = match std::fs::read_to_string("/proc/self/cgroup") {
            Ok(own) => own,
            Err(e) => {
                return (
                    Enforcement::Rlimits,
                    Some(format!("/proc/self/cgroup: {e}")),
                );
            }
        };
        let mut reasons = Vec::new();
        match CgroupParent::v2(&own).and_then(|p| p.probe().map(|()| p)) {
            Ok(parent) => return (Enforcement::Cgroup(parent), None),
            Err(e) => reasons.push(format!("cgroup v2: {e}")),
        }
        match CgroupParent::v1(&own).and_then(|p| p.probe().map(|()| p)) {
            Ok(parent) => return (Enforcement::Cgroup(parent), None),
            Err(e) => reasons.push(format!("cgroup v1: {e}")),
        }
        (Enforcement::Rlimits, Some(reasons.join("; ")))
    }
}

/// Where job cgroups go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupParent {
    V2 { dir: PathBuf },
    V1 { pids: PathBuf, memory: PathBuf },
}

const GROUP: &str = "tiny-backspace";

impl CgroupParent {
    fn v2(own: &str) -> Result<Self, String> {
        let mount = Path::new("/sys/fs/cgroup");
        if !mount.join("cgroup.controllers").exists() {
            return Err("/sys/fs/cgroup is not a cgroup2 mount".into());
        }
        let path = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or("this process is in no cgroup2 group")?;
        let base = mount.join(path.trim_start_matches('/'));
        let dir = base.join(GROUP);
        make_dir(&dir)?;
        // Controllers reach a child only when every group above enables them for its children.
        for (parent, child) in [(&base, "pids memory"), (&dir, "pids memory")] {
            let available = read(&parent.join("cgroup.controllers"))?;
            for controller in child.split(' ') {
                if !available.split_whitespace().any(|c| c == controller) {
                    return Err(format!(
                        "{} does not offer the {controller} controller",
                        parent.display()
                    ));
                }
            }
        }
        let enable = |dir: &Path| write(&dir.join("cgroup.subtree_control"), "+pids +memory");
        if enable(&base).is_err() {
            // A group holding processes cannot pass controllers down. Where this process is the
            // only one in it (a container's entry point), it moves into a leaf of its own first.
            let me = std::process::id().to_string();
            let procs = read(&base.join("cgroup.procs"))?;
            if procs.split_whitespace().any(|p| p != me) {
                return Err(format!(
                    "{} holds other processes, so it cannot delegate controllers",
                    base.display()
                ));
            }
            let leaf = base.join("tiny-backspace-server");
            make_dir(&leaf)?;
            write(&leaf.join("cgroup.procs"), &me)?;
            enable(&base)?;
        }
        enable(&dir)?;
        Ok(CgroupParent::V2 { dir })
    }

    fn v1(own: &str) -> Result<Self, String> {
        let in_hierarchy = |name: &str| -> Result<PathBuf, String> {
            let mount = Path::new("/sys/fs/cgroup").join(name);
            let path = own
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                    controllers
                        .split(',')
                        .any(|c| c == name)
                        .then(|| path.to_owned())
                })
                .ok_or_else(|| format!("this process is in no {name} cgroup"))?;
            if !mount.join("cgroup.procs").exists() {
                return Err(format!("{} is not mounted", mount.display()));
            }
            let dir = mount.join(path.trim_start_matches('/')).join(GROUP);
            make_dir(&dir)?;
            Ok(dir)
        };
        Ok(CgroupParent::V1 {
            pids: in_hierarchy("pids")?,
            memory: in_hierarchy("memory")?,
        })
    }

    /// Removes the (empty) group a job of an earlier run left, if there is one.
    pub fn remove_job(&self, job_id: &str) {
        let dirs = match self {
            CgroupParent::V2 { dir } => vec![dir.join(job_id)],
            CgroupParent::V1 { pids, memory } => vec![pids.join(job_id), memory.join(job_id)],
        };
        for dir in dirs {
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// Creates and removes a job group, with its limits written, to know that jobs will get one.
    fn probe(&self) -> Result<(), String> {
        let name = format!("probe-{}", std::process::id());
        let group = JobCgroup::create(self, &name, &JobLimits::default())?;
        group.remove();
        Ok(())
    }
}

/// One job's cgroup; removed when the sandbox is killed.
#[derive(Debug, Clone)]
pub struct JobCgroup {
    dirs: Vec<PathBuf>,
    counters: Counters,
}

#[derive(Debug, Clone)]
struct Counters {
    pids_events: PathBuf,
    /// The file with the OOM-kill count, and the key to read in it.
    oom: (PathBuf, &'static str),
}

/// The event counts a command is compared against: an increase is a limit hit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    pub pids_refused: u64,
    pub oom_kills: u64,
}

impl JobCgroup {
    pub fn create(parent: &CgroupParent, job_id: &str, limits: &JobLimits) -> Result<Self, String> {
        match parent {
            CgroupParent::V2 { dir } => {
                let dir = dir.join(job_id);
                make_dir(&dir)?;
                let group = JobCgroup {
                    dirs: vec![dir.clone()],
                    counters: Counters {
                        pids_events: dir.join("pids.events"),
                        oom: (dir.join("memory.events"), "oom_kill"),
                    },
                };
                let set = || -> Result<(), String> {
                    write(&dir.join("pids.max"), &limits.max_procs.to_string())?;
                    write(
                        &dir.join("memory.max"),
                        &limits.max_memory_bytes.to_string(),
                    )?;
                    // Swap would let a job go past its memory limit at the disk's expense.
                    write_if_present(&dir.join("memory.swap.max"), "0")?;
                    // One OOM kill takes the whole group: no half-killed build goes on.
                    write_if_present(&dir.join("memory.oom.group"), "1")
                };
                set().inspect_err(|_| group.remove())?;
                Ok(group)
            }
            CgroupParent::V1 { pids, memory } => {
                let (pids, memory) = (pids.join(job_id), memory.join(job_id));
                make_dir(&pids)?;
                let group = JobCgroup {
                    dirs: vec![pids.clone()],
                    counters: Counters {
                        pids_events: pids.join("pids.events"),
                        oom: (memory.join("memory.oom_control"), "oom_kill"),
                    },
                };
                let set = |group: &mut JobCgroup| -> Result<(), String> {
                    write(&pids.join("pids.max"), &limits.max_procs.to_string())?;
                    make_dir(&memory)?;
                    group.dirs.push(memory.clone());
                    let bytes = limits.max_memory_bytes.to_string();
                    write(&memory.join("memory.limit_in_bytes"), &bytes)?;
                    // Memory plus swap: present only where swap accounting is on.
                    write_if_present(&memory.join("memory.memsw.limit_in_bytes"), &bytes)?;
                    let oom = read(&memory.join("memory.oom_control"))?;
                    if !oom.lines().any(|l| l.starts_with("oom_kill ")) {
                        return Err("memory.oom_control has no oom_kill count (Linux 4.13+)".into());
                    }
                    Ok(())
                };
                let mut group = group;
                if let Err(e) = set(&mut group) {
                    group.remove();
                    return Err(e);
                }
                Ok(group)
            }
        }
    }

    /// The `cgroup.procs` files the launcher writes its pid into (it joins before it drops root).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn events(&self) -> Events {
        Events {
            pids_refused: counter(&self.counters.pids_events, "max"),
            oom_kills: counter(&self.counters.oom.0, self.counters.oom.1),
        }
    }

    /// Removes the group (it must be empty: the commands are killed first). A few tries, since
    /// the kernel may still be tearing down the last process.
    pub fn remove(&self) {
        for dir in self.dirs.iter().rev() {
            for attempt in 0..20 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if attempt == 19 => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "could not remove a job cgroup");
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(25)),
                }
            }
        }
    }
}

impl Events {
    /// The limit hit between `self` (before the command) and `now`, if any.
    pub fn hit_since(&self, now: &Events) -> Option<LimitHit> {
        if now.oom_kills > self.oom_kills {
            Some(LimitHit::Memory)
        } else if now.pids_refused > self.pids_refused {
            Some(LimitHit::Procs)
        } else {
            None
        }
    }
}

/// `key N` from a cgroup counters file; 0 when absent or unreadable.
fn counter(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == key).then(|| v.trim().parse().ok())?
            })
        })
        .unwrap_or(0)
}

fn make_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_if_present(path: &Path, value: &str) -> Result<(), String> {
    if path.exists() {
        write(path, value)
    } else {
        Ok(())
    }
}

/// Bytes the files under `dir` take on disk (allocated blocks: a sparse file costs what it
/// uses), without following symlinks or crossing into other filesystems. Stops counting at
/// `stop_at`: over it is all the caller needs to know.
pub fn disk_usage(dir: &Path, stop_at: u64) -> u64 {
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let device = root.dev();
    let mut total = root.blocks() * 512;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            total += meta.blocks() * 512;
            if total > stop_at {
                return total;
            }
            if meta.is_dir() && meta.dev() == device {
                stack.push(entry.path());
            }
        }
    }
    total
}

/// When to walk the workspace while a command runs.
pub struct DiskWatch {
    dir: PathBuf,
    /// What the workspace held when the command started: a command that starts over the limit
    /// (to delete files) is stopped only if it grows it further.
    start: u64,
    /// The walk's last result, and the filesystem's used bytes at that moment.
    used: u64,
    fs_used: u64,
    /// Time since the last walk, and the interval the schedule asks for.
    since: Duration,
    interval: Duration,
    /// Walks triggered by the estimate are at least this far apart (twice a walk's time).
    min_gap: Duration,
}

impl DiskWatch {
    pub fn new(dir: &Path, used: u64, took: Duration) -> Self {
        Self {
            dir: dir.to_path_buf(),
            start: used,
            used,
            fs_used: filesystem_used(dir),
            since: Duration::ZERO,
            interval: next_measurement(took),
            min_gap: took * 2,
        }
    }

    /// Whether a walk is due after another `tick`: on schedule, or because the filesystem grew
    /// by more than what is left under `limit` (anything written on it counts, so this only
    /// triggers a walk; the walk decides).
    pub fn due(&mut self, tick: Duration, limit: u64) -> bool {
        let limit = limit.max(self.start);
        self.since += tick;
        if self.since >= self.interval {
            return true;
        }
        let grown = filesystem_used(&self.dir).saturating_sub(self.fs_used);
        self.since >= self.min_gap && self.used.saturating_add(grown) > limit
    }

    /// Whether `used`, just walked, is past `limit` (or, for a command that started over it,
    /// past where it started).
    pub fn over(&self, used: u64, limit: u64) -> bool {
        used > limit.max(self.start)
    }

    pub fn walked(&mut self, used: u64, took: Duration) {
        self.used = used;
        self.fs_used = filesystem_used(&self.dir);
        self.since = Duration::ZERO;
        self.interval = next_measurement(took);
        self.min_gap = took * 2;
    }
}

/// Bytes in use on the filesystem holding `dir` (0 when it cannot be read).
fn filesystem_used(dir: &Path) -> u64 {
    nix::sys::statvfs::statvfs(dir)
        .map(|s| {
            s.blocks()
                .saturating_sub(s.blocks_free())
                .saturating_mul(s.fragment_size())
        })
        .unwrap_or(0)
}

/// How often the workspace is measured while a command runs: often while measuring is cheap, at
/// most a tenth of the time on a large tree.
pub fn next_measurement(took: Duration) -> Duration {
    (took * 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// Measures `dir`, returning the usage and how long it took.
pub fn measure(dir: &Path, stop_at: u64) -> (u64, Duration) {
    let started = Instant::now();
    let used = disk_usage(dir, stop_at);
    (used, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_by_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory.oom_control");
        std::fs::write(&file, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n").unwrap();
        assert_eq!(counter(&file, "oom_kill"), 3);
        assert_eq!(counter(&file, "under_oom"), 0);
        assert_eq!(counter(&dir.path().join("absent"), "max"), 0);
    }

    #[test]
    fn a_new_oom_kill_or_refused_fork_is_a_hit() {
        let before = Events {
            pids_refused: 2,
            oom_kills: 1,
        };
        assert_eq!(before.hit_since(&before), None);
        let forked = Events {
            pids_refused: 3,
            ..before
        };
        assert_eq!(before.hit_since(&forked), Some(LimitHit::Procs));
        let killed = Events {
            oom_kills: 2,
            ..forked
        };
        assert_eq!(before.hit_since(&killed), Some(LimitHit::Memory));
    }

    #[test]
    fn disk_usage_counts_allocated_blocks_not_apparent_size() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/data"), vec![1u8; 3 * MIB as usize]).unwrap();
        let sparse = std::fs::File::create(dir.path().join("sparse")).unwrap();
        sparse.set_len(100 * MIB).unwrap();
        let used = disk_usage(dir.path(), u64::MAX);
        assert!(
            (3 * MIB..5 * MIB).contains(&used),
            "used {used} bytes for 3 MiB of data and a 100 MiB sparse file"
        );
        assert!(disk_usage(dir.path(), MIB) > MIB);
    }

    #[test]
    fn the_message_names_the_setting() {
        let limits = JobLimits::default();
        for hit in [LimitHit::Procs, LimitHit::Memory, LimitHit::Disk] {
            assert!(hit.explain(&limits).contains(hit.setting()));
        }
    }
}
