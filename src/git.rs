//! Git run on the host (outside any sandbox): the local sandbox's clone and the local forge.
//!
//! Host git touches repositories whose contents an untrusted party controls (a cloned
//! repository's files, a checkout an agent has worked in), with the service's own privileges.
//! So every call gets git with no configuration but the repository's own `.git/config`, and
//! nothing in that config may run a program:
//! - an empty private `HOME`, `GIT_CONFIG_GLOBAL=/dev/null` and `GIT_CONFIG_NOSYSTEM=1`: neither
//!   a `.gitconfig` in a checkout nor the operator's own applies (global-only keys such as
//!   `trace2.*Target` would otherwise write wherever they say);
//! - `core.hooksPath=/dev/null` and `core.fsmonitor=false`: no hook, no fsmonitor command;
//! - a clean environment (`PATH` only) and `GIT_TERMINAL_PROMPT=0`: no inherited `GIT_*`
//!   variable, no secret, and never a password prompt;
//! - its own process group, killed whole when the call ends, times out or is dropped (a
//!   cancelled job): a clone's `upload-pack` and `pack-objects` never outlive it.
//!
//! Commands the agent runs inside the sandbox are not host git; the sandbox launcher sets their
//! environment.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

const FALLBACK_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a git call produced no output.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("could not create git's private home directory: {0}")]
    Home(std::io::Error),
    #[error("could not run git: {0}")]
    Spawn(std::io::Error),
    #[error("could not talk to git: {0}")]
    Io(std::io::Error),
    #[error("git did not finish within {} s", .0.as_secs())]
    TimedOut(Duration),
}

/// One host git call, built with the settings above. Its private `HOME` is removed when the call
/// is over.
pub struct HostGit {
    command: tokio::process::Command,
    home: tempfile::TempDir,
}

impl HostGit {
    /// `git -C dir -c core.hooksPath=/dev/null -c core.fsmonitor=false`, in a clean environment.
    /// Fails only when the private `HOME` cannot be created.
    pub fn new(dir: &Path) -> Result<HostGit, GitError> {
        let home = tempfile::Builder::new()
            .prefix("tb-git-home-")
            .tempdir()
            .map_err(GitError::Home)?;
        let mut command = tokio::process::Command::new("git");
        command
            .arg("-C")
            .arg(dir)
            .args(["-c", "core.hooksPath=/dev/null"])
            .args(["-c", "core.fsmonitor=false"])
            .env_clear()
            .env(
                "PATH",
                std::env::var_os("PATH").unwrap_or_else(|| FALLBACK_PATH.into()),
            )
            .env("HOME", home.path())
            .env("GIT_CONFIG_GLOBAL", "/dev/null")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_TERMINAL_PROMPT", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        Ok(HostGit { command, home })
    }

    /// Allows `file://` remotes (the local sandbox clones local repositories that way); every
    /// other call keeps git's default, which refuses them in submodules and the like.
    pub fn allow_file_protocol(mut self) -> Self {
        self.command.args(["-c", "protocol.file.allow=always"]);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.command.arg(arg);
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    /// An extra variable for this call (`GIT_INDEX_FILE`, an identity); never a secret.
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// The private `HOME` this call runs with.
    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// Runs git with `stdin` as its input, killing it at `timeout`.
    pub async fn output(
        mut self,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output, GitError> {
        if stdin.is_some() {
            self.command.stdin(Stdio::piped());
        }
        let mut group: Option<ProcessGroup> = None;
        let run = async {
            let mut child = self.command.spawn().map_err(GitError::Spawn)?;
            group = child.id().map(ProcessGroup);
            if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
                pipe.write_all(data).await.map_err(GitError::Io)?;
                drop(pipe);
            }
            child.wait_with_output().await.map_err(GitError::Io)
        };
        let out = tokio::time::timeout(timeout, run)
            .await
            .map_err(|_| GitError::TimedOut(timeout));
        // Whatever git started goes with it; then the private HOME, which git is done with.
        drop(group);
        drop(self.home);
        out?
    }
}

/// Kills a process group when dropped: on every way out of [`HostGit::output`], the caller's
/// future being dropped included.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            // ESRCH (nothing left) is the usual, fine outcome.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(git: &HostGit) -> Vec<(String, Option<String>)> {
        let mut env: Vec<_> = git
            .command
            .as_std()
            .get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect();
        env.sort();
        env
    }

    #[test]
    fn every_call_is_built_without_outside_configuration() {
        let git = HostGit::new(Path::new("/repo")).unwrap().arg("status");
        let home = git.home().to_string_lossy().into_owned();
        let env = env_of(&git);
        let path = env.iter().find(|(k, _)| k == "PATH").cloned();
        assert_eq!(
            env,
            vec![
                ("GIT_CONFIG_GLOBAL".into(), Some("/dev/null".into())),
                ("GIT_CONFIG_NOSYSTEM".into(), Some("1".into())),
                ("GIT_TERMINAL_PROMPT".into(), Some("0".into())),
                ("HOME".into(), Some(home.clone())),
                path.unwrap(),
            ]
        );
        let args: Vec<String> = git
            .command
            .as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-C",
                "/repo",
                "-c",
                "core.hooksPath=/dev/null",
                "-c",
                "core.fsmonitor=false",
                "status"
            ]
        );
        // The private HOME exists, is empty, and is nobody else's.
        assert_eq!(std::fs::read_dir(&home).unwrap().count(), 0);
        let other = HostGit::new(Path::new("/repo")).unwrap();
        assert_ne!(other.home(), git.home());
    }

    #[tokio::test]
    async fn runs_git_and_removes_its_home() {
        let dir = tempfile::tempdir().unwrap();
        let git = HostGit::new(dir.path())
            .unwrap()
            .args(["hash-object", "--stdin"]);
        let home = git.home().to_path_buf();
        let out = git
            .output(Some(b"hello\n"), Duration::from_secs(30))
            .await
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        // git's blob id of "hello\n".
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert!(!home.exists());
    }

    /// A git call cut short (here by its timeout; a cancelled job drops it the same way) takes
    /// everything it started with it, not only the `git` process itself.
    #[tokio::test]
    async fn a_call_cut_short_leaves_no_process_behind() {
        let repo = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("git")
            .args(["init", "-q"])
            .arg(repo.path())
            .status()
            .unwrap();
        assert!(status.success());
        let dest = tempfile::tempdir().unwrap();
        // The upload-pack command runs in a shell that git starts: a grandchild.
        let marker = "sleep 3791";
        let git = HostGit::new(dest.path())
            .unwrap()
            .allow_file_protocol()
            .args([
                "clone",
                "-q",
                "--upload-pack",
                &format!("{marker}; git-upload-pack"),
            ])
            .arg(format!("file://{}", repo.path().display()))
            .arg("copy");
        let err = git
            .output(None, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert!(matches!(err, GitError::TimedOut(_)), "{err}");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let left = std::process::Command::new("pgrep")
            .args(["-f", marker])
            .output()
            .unwrap();
        assert!(
            left.stdout.is_empty(),
            "left running: {}",
            String::from_utf8_lossy(&left.stdout)
        );
    }
}
