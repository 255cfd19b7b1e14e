//! How a command is kept apart from the host, other jobs and the server: the levels, and the
//! mechanisms the launcher applies for each.
//!
//! - `namespaces` (strongest): new user, mount, PID, IPC, UTS and network namespaces. The
//!   command sees a minimal root built on a tmpfs: system directories and an allow-list of `/etc`
//!   read-only, its workspace read-write at `/workspace`, its private tmp at `/tmp`, a fresh
//!   `/proc` showing only its own processes, a minimal `/dev`, no network device but loopback
//!   (down). It runs as uid 1000 inside, mapped to an unprivileged host uid. Landlock and seccomp
//!   still apply on top.
//! - `landlock` (where user namespaces are unavailable, as in many containers): Landlock with a
//!   read allow-list (system directories, the `/etc` allow-list, the own workspace; no `/proc`; not
//!   the workspace root, `/root`, `/home` or the server's directories), Landlock scopes (no signals
//!   to, and no abstract unix sockets of, processes outside the command's domain), a separate
//!   unprivileged uid when the server runs as root, seccomp.
//! - `none`: whatever of the above the kernel allows, best effort; only with
//!   `ALLOW_UNCONFINED_SANDBOX=true`.
//!
//! Done in the launcher with `nix` rather than with bubblewrap: the service stays one binary
//! with no setuid helper to install, and the same code decides, applies and reports the level.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, unshare};
use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

/// The isolation commands get, decided once at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    Namespaces,
    Landlock,
    /// Best effort, allowed by `ALLOW_UNCONFINED_SANDBOX=true` only.
    None,
}

impl Isolation {
    pub fn name(self) -> &'static str {
        match self {
            Isolation::Namespaces => "namespaces",
            Isolation::Landlock => "landlock",
            Isolation::None => "none",
        }
    }
}

/// `SANDBOX_ISOLATION`: the level to use, or `auto` for the strongest that works here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IsolationChoice {
    #[default]
    Auto,
    Namespaces,
    Landlock,
}

impl IsolationChoice {
    pub fn parse(value: &str) -> Result<Self, String> {
        match value {
            "auto" => Ok(IsolationChoice::Auto),
            "namespaces" => Ok(IsolationChoice::Namespaces),
            "landlock" => Ok(IsolationChoice::Landlock),
            other => Err(format!(
                "SANDBOX_ISOLATION must be auto, namespaces or landlock, not `{other}`"
            )),
        }
    }

    /// The levels to try, strongest first.
    pub fn candidates(self) -> &'static [Isolation] {
        match self {
            IsolationChoice::Auto => &[Isolation::Namespaces, Isolation::Landlock],
            IsolationChoice::Namespaces => &[Isolation::Namespaces],
            IsolationChoice::Landlock => &[Isolation::Landlock],
        }
    }
}

/// The uid and gid a command has inside the `namespaces` level.
pub const INNER_ID: u32 = 1000;
/// Where the workspace appears at the `namespaces` level.
pub const INNER_REPO: &str = "/workspace";
pub const INNER_TMP: &str = "/tmp";

/// System directories commands may read (and run programs from), where they exist.
pub const SYSTEM_DIRS: &[&str] = &[
    "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/opt",
];

/// What of `/etc` commands may read: what programs need to start, resolve names and users,
/// and verify TLS. Not `shadow`, `gshadow`, `sudoers`, `ssh` (host keys), `ssl/private` or
/// anything else that holds a credential.
pub const ETC_ALLOWED: &[&str] = &[
    "alternatives",
    "bash.bashrc",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "locale.alias",
    "locale.conf",
    "localtime",
    "magic",
    "magic.mime",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "pki/tls/certs",
    "pki/ca-trust/extracted",
    "profile",
    "profile.d",
    "protocols",
    "python3",
    "perl",
    "resolv.conf",
    "services",
    "ssl/certs",
    "ssl/openssl.cnf",
    "timezone",
    "xdg",
];

/// Device nodes a command may use.
const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];

/// Host ids a command runs as: the server's own when it is not root, else these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostIds {
    pub uid: u32,
    pub gid: u32,
}

/// Becomes `ids` (dropping every supplementary group first): the server runs as root, commands
/// must not.
pub fn become_ids(ids: HostIds) -> Result<(), String> {
    nix::unistd::setgroups(&[]).map_err(|e| format!("setgroups: {e}"))?;
    let gid = Gid::from_raw(ids.gid);
    let uid = Uid::from_raw(ids.uid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| format!("setresgid({}): {e}", ids.gid))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| format!("setresuid({}): {e}", ids.uid))?;
    // Changing uid made this process non-dumpable, which leaves its own `/proc/self` files
    // (the namespace maps among them) owned by root and closed to it.
    nix::sys::prctl::set_dumpable(true).map_err(|e| format!("set_dumpable: {e}"))?;
    Ok(())
}

/// Enters new user, mount, PID, IPC, UTS and network namespaces, mapping this process's uid
/// and gid to [`INNER_ID`]. The PID namespace applies to the children from here on.
pub fn unshare_all() -> Result<(), String> {
    let uid = nix::unistd::geteuid();
    let gid = nix::unistd::getegid();
    unshare(
        CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWNET,
    )
    .map_err(|e| format!("user namespaces are unavailable (unshare: {e})"))?;
    // An unprivileged map of one's own ids needs `setgroups` denied first.
    std::fs::write("/proc/self/setgroups", "deny").map_err(|e| format!("setgroups: {e}"))?;
    std::fs::write("/proc/self/uid_map", format!("{INNER_ID} {uid} 1"))
        .map_err(|e| format!("uid_map: {e}"))?;
    std::fs::write("/proc/self/gid_map", format!("{INNER_ID} {gid} 1"))
        .map_err(|e| format!("gid_map: {e}"))?;
    Ok(())
}

/// What the minimal root holds.
pub struct RootLayout<'a> {
    pub repo: &'a Path,
    pub tmp: &'a Path,
    /// `SANDBOX_READ_PATHS`: where each appears, and where to bind it from (see
    /// [`stage_read_paths`]).
    pub read_paths: &'a [(PathBuf, PathBuf)],
}

/// Makes the read paths reachable for the unprivileged user that builds the root: as root, in a
/// mount namespace of the launcher's own, each is bound under `stage` (inside the job's
/// workspace directory, which that user may enter), so that a toolchain under `/root` (0700)
/// can still be shown to commands. The namespaces entered later copy these mounts. Without
/// root, the paths are used as they are.
pub fn stage_read_paths(
    paths: &[PathBuf],
    stage: &Path,
    as_root: bool,
) -> Result<Vec<(PathBuf, PathBuf)>, String> {
    if !as_root || paths.is_empty() {
        return Ok(paths.iter().map(|p| (p.clone(), p.clone())).collect());
    }
    let none: Option<&str> = None;
    unshare(CloneFlags::CLONE_NEWNS).map_err(|e| format!("unshare(mount): {e}"))?;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("making mounts private: {e}"))?;
    mkdir_mode(stage)?;
    paths
        .iter()
        .enumerate()
        .map(|(i, path)| {
            let staged = stage.join(i.to_string());
            mkdir_mode(&staged)?;
            mount(
                Some(path),
                &staged,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )
            .map_err(|e| format!("SANDBOX_READ_PATHS {}: {e}", path.display()))?;
            Ok((path.clone(), staged))
        })
        .collect()
}

/// Creates `dir` (if needed) enterable but not listable by others.
fn mkdir_mode(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().mode(0o711).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("{}: {e}", dir.display())),
    }
}

const OLD_ROOT: &str = "/oldroot";

/// Builds the minimal root and moves into it. Runs as the first process of the new PID
/// namespace (so that its `/proc` is that namespace's), holding the user namespace's
/// capabilities.
pub fn enter_minimal_root(layout: &RootLayout<'_>) -> Result<(), String> {
    let none: Option<&str> = None;
    // Nothing done here may reach the host's mount table.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(|e| format!("making mounts private: {e}"))?;
    // The new root is a tmpfs mounted over /tmp (in this namespace only); the old root stays
    // reachable under /oldroot until everything is bound.
    mount(
        Some("tmpfs"),
        "/tmp",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755,size=16m"),
    )
    .map_err(|e| format!("root tmpfs: {e}"))?;
    mkdir("/tmp/oldroot")?;
    nix::unistd::pivot_root("/tmp", "/tmp/oldroot").map_err(|e| format!("pivot_root: {e}"))?;
    nix::unistd::chdir("/").map_err(|e| format!("chdir: {e}"))?;

    for dir in SYSTEM_DIRS {
        expose(Path::new(dir), false)?;
    }
    mkdir("/etc")?;
    for name in ETC_ALLOWED {
        expose(&Path::new("/etc").join(name), false)?;
    }
    for (path, source) in layout.read_paths {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        }
        bind(&old(source), path, false)?;
    }
    write_identity()?;
    make_dev()?;
    mkdir("/proc")?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        none,
    )
    .map_err(|e| format!("mounting /proc: {e}"))?;
    bind(&old(layout.repo), Path::new(INNER_REPO), true)?;
    bind(&old(layout.tmp), Path::new(INNER_TMP), true)?;

    umount2(OLD_ROOT, MntFlags::MNT_DETACH).map_err(|e| format!("detaching the host root: {e}"))?;
    std::fs::remove_dir(OLD_ROOT).map_err(|e| format!("{OLD_ROOT}: {e}"))?;
    // The root itself (mount points, passwd) is read-only from here on.
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV,
        none,
    )
    .map_err(|e| format!("making the root read-only: {e}"))?;
    nix::unistd::sethostname("sandbox").map_err(|e| format!("sethostname: {e}"))?;
    nix::unistd::chdir(INNER_REPO).map_err(|e| format!("chdir {INNER_REPO}: {e}"))?;
    Ok(())
}

/// `path` as seen from the new root, before the old one is detached.
fn old(path: &Path) -> PathBuf {
    Path::new(OLD_ROOT).join(path.strip_prefix("/").unwrap_or(path))
}

/// Makes the host's `path` appear at the same place: a symlink is copied as a symlink (its
/// target must be exposed on its own), anything else is bound. Absent paths are skipped.
fn expose(path: &Path, writable: bool) -> Result<(), String> {
    let source = old(path);
    let Ok(meta) = std::fs::symlink_metadata(&source) else {
        return Ok(());
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(&source).map_err(|e| format!("{}: {e}", path.display()))?;
        return std::os::unix::fs::symlink(&target, path)
            .map_err(|e| format!("{}: {e}", path.display()));
    }
    bind(&source, path, writable)
}

/// Binds `source` at `target` (created as a directory or an empty file to match), read-only
/// unless `writable`, never with set-uid programs or device nodes of its own.
fn bind(source: &Path, target: &Path, writable: bool) -> Result<(), String> {
    let none: Option<&str> = None;
    let is_dir = std::fs::metadata(source)
        .map_err(|e| format!("{}: {e}", source.display()))?
        .is_dir();
    if is_dir {
        std::fs::create_dir_all(target)
    } else {
        std::fs::write(target, b"")
    }
    .map_err(|e| format!("{}: {e}", target.display()))?;
    mount(
        Some(source),
        target,
        none,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        none,
    )
    .map_err(|e| format!("binding {}: {e}", target.display()))?;
    let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(none, target, none, flags | locked_flags(target), none)
        .map_err(|e| format!("remounting {}: {e}", target.display()))
}

/// The flags a remount inside a user namespace must keep: those of the original mount are
/// locked, and dropping one is refused.
fn locked_flags(path: &Path) -> MsFlags {
    let Ok(stat) = statvfs(path) else {
        return MsFlags::empty();
    };
    let have = stat.flags();
    [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOSUID, MsFlags::MS_NOSUID),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ]
    .into_iter()
    .filter(|(st, _)| have.contains(*st))
    .fold(MsFlags::empty(), |acc, (_, ms)| acc | ms)
}

fn mkdir(path: &str) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("{path}: {e}"))
}

/// A `passwd` and `group` that name the command's user and nobody else of the host.
fn write_identity() -> Result<(), String> {
    let passwd = format!(
        "root:x:0:0:root:/root:/usr/sbin/nologin\n\
         sandbox:x:{INNER_ID}:{INNER_ID}:sandbox:{INNER_TMP}/home:/bin/bash\n\
         nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
    );
    let group = format!("root:x:0:\nsandbox:x:{INNER_ID}:\nnogroup:x:65534:\n");
    std::fs::write("/etc/passwd", passwd).map_err(|e| format!("/etc/passwd: {e}"))?;
    std::fs::write("/etc/group", group).map_err(|e| format!("/etc/group: {e}"))
}

/// A `/dev` with the harmless devices, `/dev/shm`, and the `fd` links.
fn make_dev() -> Result<(), String> {
    let none: Option<&str> = None;
    mkdir("/dev")?;
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| format!("/dev: {e}"))?;
    for name in DEVICES {
        let target = Path::new("/dev").join(name);
        std::fs::write(&target, b"").map_err(|e| format!("{}: {e}", target.display()))?;
        mount(Some(&old(&target)), &target, none, MsFlags::MS_BIND, none)
            .map_err(|e| format!("binding {}: {e}", target.display()))?;
    }
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, link).map_err(|e| format!("{link}: {e}"))?;
    }
    mkdir("/dev/shm")?;
    mount(
        Some("tmpfs"),
        "/dev/shm",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777,size=64m"),
    )
    .map_err(|e| format!("/dev/shm: {e}"))
}

/// The Landlock ABI this kernel offers (0 without Landlock).
pub fn landlock_abi() -> i64 {
    // `landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)`, through the crate's
    // own probing: a ruleset handling an access right of each ABI is created only if the kernel
    // knows it.
    let mut found = 0;
    for (version, abi) in [
        (1, ABI::V1),
        (2, ABI::V2),
        (3, ABI::V3),
        (4, ABI::V4),
        (5, ABI::V5),
        (6, ABI::V6),
    ] {
        let ok = Ruleset::default()
            .set_compatibility(CompatLevel::HardRequirement)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| {
                if version >= 4 {
                    r.handle_access(AccessNet::from_all(abi))
                } else {
                    Ok(r)
                }
            })
            .and_then(|r| {
                if version >= 6 {
                    r.scope(Scope::from_all(abi))
                } else {
                    Ok(r)
                }
            })
            .and_then(|r| r.create())
            .is_ok();
        if ok {
            found = version;
        } else {
            break;
        }
    }
    found
}

/// What Landlock lets a command do.
pub struct LandlockRules {
    /// Read (and run programs) beneath these.
    pub read: Vec<PathBuf>,
    /// Read, write, create and remove beneath these.
    pub write: Vec<PathBuf>,
    /// Read and write these device files.
    pub devices: Vec<PathBuf>,
    /// A missing kernel feature is an error (the `landlock` level), not a warning.
    pub required: bool,
}

impl LandlockRules {
    /// The rules of the `namespaces` level: everything in the minimal root may be read.
    pub fn inside_namespaces() -> Self {
        LandlockRules {
            read: vec!["/".into()],
            write: vec![INNER_REPO.into(), INNER_TMP.into(), "/dev/shm".into()],
            devices: DEVICES.iter().map(|d| Path::new("/dev").join(d)).collect(),
            required: false,
        }
    }

    /// The rules of the `landlock` level: the read allow-list.
    pub fn allow_list(repo: &Path, tmp: &Path, read_paths: &[PathBuf], required: bool) -> Self {
        let mut read: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        read.extend(ETC_ALLOWED.iter().map(|e| Path::new("/etc").join(e)));
        read.extend(["/etc/passwd", "/etc/group"].map(PathBuf::from));
        // Not `/proc`: Landlock cannot tell a process's own entry from the others', and the
        // others' command lines would show. Programs that need `/proc/self` need the
        // `namespaces` level.
        read.extend(read_paths.iter().cloned());
        read.retain(|p| p.exists());
        LandlockRules {
            read,
            write: vec![repo.to_path_buf(), tmp.to_path_buf()],
            devices: DEVICES.iter().map(|d| Path::new("/dev").join(d)).collect(),
            required,
        }
    }

    /// Restricts this process (and what it runs) to the rules.
    pub fn apply(&self) -> Result<(), String> {
        let abi = ABI::V6;
        let compat = if self.required {
            CompatLevel::HardRequirement
        } else {
            CompatLevel::BestEffort
        };
        let device_access = AccessFs::from_read(abi) | AccessFs::WriteFile | AccessFs::Truncate;
        let status = Ruleset::default()
            .set_compatibility(compat)
            .handle_access(AccessFs::from_all(abi))
            .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
            .and_then(|r| r.scope(Scope::from_all(abi)))
            .and_then(|r| r.create())
            .and_then(|r| r.add_rules(path_beneath_rules(&self.read, AccessFs::from_read(abi))))
            .and_then(|r| r.add_rules(path_beneath_rules(&self.write, AccessFs::from_all(abi))))
            .and_then(|r| r.add_rules(path_beneath_rules(&self.devices, device_access)))
            .and_then(|r| r.restrict_self())
            .map_err(|e| format!("Landlock could not be set up: {e}"))?;
        match status.ruleset {
            RulesetStatus::FullyEnforced => Ok(()),
            RulesetStatus::PartiallyEnforced if !self.required => Ok(()),
            RulesetStatus::PartiallyEnforced | RulesetStatus::NotEnforced => Err(format!(
                "this kernel does not enforce Landlock fully (ABI {} found; the landlock level needs ABI 6, Linux 6.12+, for signal and socket scoping)",
                landlock_abi()
            )),
        }
    }
}

/// The system calls refused with EPERM.
fn denied_syscalls() -> Vec<i64> {
    vec![
        libc::SYS_socket,
        libc::SYS_setsid,
        libc::SYS_setpgid,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_userfaultfd,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fsconfig,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
    ]
}

/// seccomp: no sockets (`socketpair(2)` still works), no leaving the process group, none of the
/// kernel-facing calls a coding task never needs.
pub fn apply_seccomp() -> Result<(), String> {
    use std::collections::BTreeMap;

    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| format!("seccomp: unsupported architecture: {e:?}"))?;
    let rules: BTreeMap<i64, Vec<SeccompRule>> = denied_syscalls()
        .into_iter()
        .map(|nr| (nr, Vec::new()))
        .collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter(&program).map_err(|e| format!("seccomp could not be applied: {e}"))
}

/// `PATH` for commands: the system's, then each read path's `bin` (or the path itself when it
/// is a `bin` directory).
pub fn command_path(read_paths: &[PathBuf]) -> String {
    let mut parts: Vec<String> = Vec::new();
    for path in read_paths {
        let bin = if path.file_name() == Some(OsStr::from_bytes(b"bin")) {
            path.clone()
        } else {
            path.join("bin")
        };
        if bin.is_dir() {
            parts.push(bin.display().to_string());
        }
    }
    parts.push("/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    parts.join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etc_allow_list_holds_no_credential() {
        for name in [
            "shadow",
            "gshadow",
            "sudoers",
            "ssh",
            "ssl/private",
            "passwd",
            "group",
        ] {
            assert!(!ETC_ALLOWED.contains(&name), "{name} is allowed");
        }
    }

    #[test]
    fn read_paths_put_their_bin_on_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("toolchain/bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("tools/bin")).unwrap();
        let path = command_path(&[
            dir.path().join("toolchain"),
            dir.path().join("tools/bin"),
            dir.path().join("absent"),
        ]);
        let expected = format!(
            "{0}/toolchain/bin:{0}/tools/bin:/usr/local/sbin",
            dir.path().display()
        );
        assert!(path.starts_with(&expected), "{path}");
    }

    #[test]
    fn choices_parse() {
        assert_eq!(
            IsolationChoice::parse("landlock").unwrap().candidates(),
            &[Isolation::Landlock]
        );
        assert!(IsolationChoice::parse("chroot").is_err());
    }
}
