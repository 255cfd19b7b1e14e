//! The confinement applied inside `tiny-backspace __sandbox-exec`, just before it `exec`s the
//! command. Running in a fresh process of our own binary means no `unsafe` `pre_exec` hook is
//! needed: the process restricts itself with safe wrappers, then replaces itself with the command.
//!
//! - Landlock: read-only access to the whole filesystem, read-write only to the listed directories
//!   (the workspace and its private tmp) and `/dev/null`; TCP bind/connect denied where the kernel
//!   supports it.
//! - seccomp: no sockets at all (`socket(2)` fails with EPERM; `socketpair(2)` still works), no
//!   escaping the process group (`setsid`, `setpgid`), and none of the kernel-facing calls a coding
//!   task never needs (ptrace, mount, bpf, module loading, namespaces, io_uring, …).
//! - rlimits: no core dumps, bounded file size, open files and CPU time.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr,
    RulesetCreatedAttr, RulesetStatus, path_beneath_rules,
};
use nix::sys::resource::{Resource, setrlimit};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

/// Exit status of the helper when it could not confine (and was not allowed to run unconfined).
pub const EXIT_CONFINEMENT_FAILED: i32 = 125;
/// Exit status when the command could not be executed.
pub const EXIT_EXEC_FAILED: i32 = 127;

/// What `__sandbox-exec` was asked to do.
#[derive(Debug, Clone)]
pub struct ConfineSpec {
    pub writable: Vec<PathBuf>,
    pub allow_unconfined: bool,
    pub cpu_seconds: u64,
    pub max_file_bytes: u64,
    pub program: Vec<String>,
}

/// Confines this process and execs the program. Returns only on failure, with the exit status to
/// use; the reason has been written to stderr.
pub fn confine_and_exec(spec: &ConfineSpec) -> i32 {
    if let Err(err) = apply_rlimits(spec) {
        eprintln!("tiny-backspace sandbox: setting resource limits failed: {err}");
        return EXIT_CONFINEMENT_FAILED;
    }
    match apply_landlock(&spec.writable) {
        Ok(()) => {}
        Err(err) if spec.allow_unconfined => {
            eprintln!("tiny-backspace sandbox: WARNING running without Landlock: {err}");
        }
        Err(err) => {
            eprintln!("tiny-backspace sandbox: {err}");
            return EXIT_CONFINEMENT_FAILED;
        }
    }
    match apply_seccomp() {
        Ok(()) => {}
        Err(err) if spec.allow_unconfined => {
            eprintln!("tiny-backspace sandbox: WARNING running without seccomp: {err}");
        }
        Err(err) => {
            eprintln!("tiny-backspace sandbox: {err}");
            return EXIT_CONFINEMENT_FAILED;
        }
    }
    let Some((program, args)) = spec.program.split_first() else {
        eprintln!("tiny-backspace sandbox: no program given");
        return EXIT_EXEC_FAILED;
    };
    let err = std::process::Command::new(program).args(args).exec();
    eprintln!("tiny-backspace sandbox: could not run {program}: {err}");
    EXIT_EXEC_FAILED
}

fn apply_rlimits(spec: &ConfineSpec) -> Result<(), nix::Error> {
    lower_limit(Resource::RLIMIT_CORE, 0, 0)?;
    lower_limit(
        Resource::RLIMIT_FSIZE,
        spec.max_file_bytes,
        spec.max_file_bytes,
    )?;
    lower_limit(Resource::RLIMIT_NOFILE, 4096, 4096)?;
    lower_limit(Resource::RLIMIT_CPU, spec.cpu_seconds, spec.cpu_seconds + 5)?;
    Ok(())
}

/// Sets a limit no higher than the one already in force: an unprivileged process may only lower
/// its hard limits, and where the operator already set a tighter one (a container, `prlimit`),
/// that one stays.
fn lower_limit(resource: Resource, soft: u64, hard: u64) -> Result<(), nix::Error> {
    let (_, current_hard) = nix::sys::resource::getrlimit(resource)?;
    let hard = hard.min(current_hard);
    setrlimit(resource, soft.min(hard), hard)
}

fn apply_landlock(writable: &[PathBuf]) -> Result<(), String> {
    let abi = ABI::V5;
    let status = Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi))))
        .and_then(|r| r.add_rules(path_beneath_rules(writable, AccessFs::from_all(abi))))
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                ["/dev/null"],
                AccessFs::from_read(abi) | AccessFs::WriteFile,
            ))
        })
        .and_then(|r| r.restrict_self())
        .map_err(|e| format!("Landlock could not be set up: {e}"))?;
    match status.ruleset {
        RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced => Ok(()),
        RulesetStatus::NotEnforced => Err(
            "this kernel does not enforce Landlock (Linux 5.13+ with Landlock enabled is needed)"
                .into(),
        ),
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
    ]
}

fn apply_seccomp() -> Result<(), String> {
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

/// Never returns: either the command replaces this process or the helper exits with a failure.
pub fn run(spec: &ConfineSpec) -> ! {
    std::process::exit(confine_and_exec(spec))
}
