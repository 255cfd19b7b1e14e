//! `tiny-backspace __sandbox-exec <spec> -- program args…`: what runs between the server and a
//! command. The server spawns it in a process group of its own; it confines itself step by step
//! with safe wrappers (no `pre_exec` hook in the server), then replaces itself with the command.
//!
//! The order matters and is the same at every level:
//! 1. join the job's cgroups (this needs the server's privileges, so it comes first);
//! 2. stop being root, if the server is (commands never run as the server's uid 0);
//! 3. at the `namespaces` level, enter the namespaces; the launcher stays as the parent that
//!    relays the exit status, its child becomes the namespace's init (PID 1), builds the minimal
//!    root, and forks the command's process; when init exits, the kernel kills whatever the
//!    command left behind in the namespace;
//! 4. rlimits, Landlock, seccomp (which also sets `no_new_privs`), then `exec`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use nix::sys::resource::{Resource, setrlimit};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::fork::{Forked, fork};
use super::isolation::{
    self, HostIds, INNER_REPO, INNER_TMP, Isolation, LandlockRules, RootLayout,
};

/// Exit status of the launcher when it could not confine the command.
pub const EXIT_CONFINEMENT_FAILED: i32 = 125;
/// Exit status when the command could not be executed.
pub const EXIT_EXEC_FAILED: i32 = 127;
/// What every message of the launcher starts with.
const WHO: &str = "tiny-backspace sandbox";

/// What the server asks of the launcher (passed as one JSON argument).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchSpec {
    pub isolation: Isolation,
    /// The job's repository and private tmp on the host.
    pub repo: PathBuf,
    pub tmp: PathBuf,
    /// Extra host directories commands may read (`SANDBOX_READ_PATHS`).
    pub read_paths: Vec<PathBuf>,
    /// Who to become when the server runs as root.
    pub run_as: Option<HostIds>,
    /// The job cgroup's `cgroup.procs` files.
    pub cgroup_procs: Vec<PathBuf>,
    pub cpu_seconds: u64,
    /// The largest file a command may write (also what is left of the workspace's size).
    pub max_file_bytes: u64,
    /// rlimits used when there is no job cgroup.
    pub max_procs: Option<u64>,
    pub max_data_bytes: Option<u64>,
}

/// The launcher's argument list for `spec` and `program`.
pub fn arguments(spec: &LaunchSpec, program: &[&str]) -> Vec<String> {
    let mut args = vec![
        "__sandbox-exec".to_owned(),
        serde_json::to_string(spec).unwrap_or_default(),
        "--".to_owned(),
    ];
    args.extend(program.iter().map(|s| (*s).to_owned()));
    args
}

/// Parses what follows `__sandbox-exec`.
pub fn parse_arguments(args: &[String]) -> Result<(LaunchSpec, Vec<String>), String> {
    let [spec, dashes, program @ ..] = args else {
        return Err("usage: __sandbox-exec <spec> -- program [args…]".into());
    };
    if dashes != "--" || program.is_empty() {
        return Err("usage: __sandbox-exec <spec> -- program [args…]".into());
    }
    let spec: LaunchSpec =
        serde_json::from_str(spec).map_err(|e| format!("bad launch spec: {e}"))?;
    Ok((spec, program.to_vec()))
}

/// Never returns: the command replaces this process, or it exits with the command's status (the
/// namespaces' parent and init), or with a failure status after saying why on stderr.
pub fn run(spec: &LaunchSpec, program: &[String]) -> ! {
    let code = match launch(spec, program) {
        Ok(code) => code,
        Err(Failure::Confinement(reason)) => {
            eprintln!("{WHO}: {reason}");
            EXIT_CONFINEMENT_FAILED
        }
        Err(Failure::Exec(reason)) => {
            eprintln!("{WHO}: {reason}");
            EXIT_EXEC_FAILED
        }
    };
    std::process::exit(code)
}

enum Failure {
    Confinement(String),
    Exec(String),
}

fn confinement(reason: String) -> Failure {
    Failure::Confinement(reason)
}

fn launch(spec: &LaunchSpec, program: &[String]) -> Result<i32, Failure> {
    let pid = std::process::id().to_string();
    for procs in &spec.cgroup_procs {
        std::fs::write(procs, &pid).map_err(|e| {
            confinement(format!("joining the job's cgroup {}: {e}", procs.display()))
        })?;
    }
    let read_paths = match spec.isolation {
        Isolation::Namespaces => {
            let stage = spec.repo.parent().unwrap_or(&spec.repo).join("read-paths");
            isolation::stage_read_paths(&spec.read_paths, &stage, spec.run_as.is_some())
                .map_err(confinement)?
        }
        Isolation::Landlock | Isolation::None => Vec::new(),
    };
    if let Some(ids) = spec.run_as {
        isolation::become_ids(ids).map_err(confinement)?;
    }
    match spec.isolation {
        Isolation::Namespaces => {
            isolation::unshare_all().map_err(confinement)?;
            if let Forked::Parent(init) = fork().map_err(|e| confinement(format!("fork: {e}")))? {
                return Ok(wait_for(init));
            }
            // The namespace's init from here on.
            let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
            isolation::enter_minimal_root(&RootLayout {
                repo: &spec.repo,
                tmp: &spec.tmp,
                read_paths: &read_paths,
            })
            .map_err(confinement)?;
            if let Forked::Parent(command) =
                fork().map_err(|e| confinement(format!("fork: {e}")))?
            {
                return Ok(reap_until(command));
            }
            confine_and_exec(spec, program)
        }
        Isolation::Landlock | Isolation::None => confine_and_exec(spec, program),
    }
}

/// The last steps, in the command's own process.
fn confine_and_exec(spec: &LaunchSpec, program: &[String]) -> Result<i32, Failure> {
    apply_rlimits(spec).map_err(|e| confinement(format!("setting resource limits failed: {e}")))?;
    let (rules, cwd, tmp) = match spec.isolation {
        Isolation::Namespaces => (
            LandlockRules::inside_namespaces(),
            PathBuf::from(INNER_REPO),
            PathBuf::from(INNER_TMP),
        ),
        Isolation::Landlock | Isolation::None => (
            LandlockRules::allow_list(
                &spec.repo,
                &spec.tmp,
                &spec.read_paths,
                spec.isolation == Isolation::Landlock,
            ),
            spec.repo.clone(),
            spec.tmp.clone(),
        ),
    };
    let best_effort = spec.isolation == Isolation::None;
    if let Err(reason) = rules.apply() {
        if !best_effort {
            return Err(confinement(reason));
        }
        eprintln!("{WHO}: WARNING running without Landlock: {reason}");
    }
    if let Err(reason) = isolation::apply_seccomp() {
        if !best_effort {
            return Err(confinement(reason));
        }
        eprintln!("{WHO}: WARNING running without seccomp: {reason}");
    }
    let Some((name, args)) = program.split_first() else {
        return Err(Failure::Exec("no program given".into()));
    };
    let err = std::process::Command::new(name)
        .args(args)
        .current_dir(&cwd)
        .env("PATH", isolation::command_path(&spec.read_paths))
        .env("HOME", tmp.join("home"))
        .env("TMPDIR", &tmp)
        .exec();
    Err(Failure::Exec(format!("could not run {name}: {err}")))
}

fn apply_rlimits(spec: &LaunchSpec) -> Result<(), nix::Error> {
    lower_limit(Resource::RLIMIT_CORE, 0)?;
    lower_limit(Resource::RLIMIT_FSIZE, spec.max_file_bytes)?;
    lower_limit(Resource::RLIMIT_NOFILE, 4096)?;
    lower_limit(Resource::RLIMIT_CPU, spec.cpu_seconds)?;
    if let Some(procs) = spec.max_procs {
        lower_limit(Resource::RLIMIT_NPROC, procs)?;
    }
    if let Some(bytes) = spec.max_data_bytes {
        lower_limit(Resource::RLIMIT_DATA, bytes)?;
    }
    Ok(())
}

/// Sets a limit no higher than the one already in force: an unprivileged process may only lower
/// its hard limits, and where the operator already set a tighter one (a container, `prlimit`),
/// that one stays.
fn lower_limit(resource: Resource, limit: u64) -> Result<(), nix::Error> {
    let (_, current_hard) = nix::sys::resource::getrlimit(resource)?;
    let limit = limit.min(current_hard);
    setrlimit(resource, limit, limit)
}

/// Waits for `child` and returns the status to exit with: its exit code, or 128 + the signal
/// that killed it.
fn wait_for(child: Pid) -> i32 {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, signal, _)) => return 128 + signal as i32,
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("{WHO}: waiting for the command: {e}");
                return EXIT_CONFINEMENT_FAILED;
            }
        }
    }
}

/// As init of the namespace: reaps every process that ends (orphans are re-parented to it)
/// until `command` itself ends.
fn reap_until(command: Pid) -> i32 {
    loop {
        match waitpid(None::<Pid>, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == command => return code,
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => {
                return 128 + signal as i32;
            }
            Ok(_) | Err(nix::Error::EINTR) => continue,
            Err(e) => {
                eprintln!("{WHO}: waiting for the command: {e}");
                return EXIT_CONFINEMENT_FAILED;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let spec = LaunchSpec {
            isolation: Isolation::Namespaces,
            repo: "/w/j/repo".into(),
            tmp: "/w/j/tmp".into(),
            read_paths: vec!["/opt/tool".into()],
            run_as: Some(HostIds {
                uid: 65534,
                gid: 65534,
            }),
            cgroup_procs: vec!["/sys/fs/cgroup/x/cgroup.procs".into()],
            cpu_seconds: 10,
            max_file_bytes: 1 << 20,
            max_procs: Some(64),
            max_data_bytes: None,
        };
        let args = arguments(&spec, &["/bin/bash", "-c", "echo hi"]);
        assert_eq!(args[0], "__sandbox-exec");
        let (parsed, program) = parse_arguments(&args[1..]).unwrap();
        assert_eq!(parsed, spec);
        assert_eq!(program, ["/bin/bash", "-c", "echo hi"]);
        assert!(parse_arguments(&args[1..2]).is_err());
    }
}
