//! The launcher's one `unsafe` call: `fork(2)`.
//!
//! Why it is needed: setting up namespaces takes two processes that keep running *this*
//! program without an `exec` in between. A process only enters a new PID namespace through its
//! children, and a mount of `/proc` shows the PID namespace of the process that mounts it, so
//! the namespace's first process (its init) must both be a child and still hold the
//! capabilities it got with the user namespace. Those capabilities do not survive an `exec` by
//! a non-root user, so the child cannot be a fresh `exec` of the launcher.
//!
//! Why it is sound here: `fork` is only unsafe in a multi-threaded process (the child may find
//! a lock held by a thread that does not exist in it). The launcher runs in `main` of a fresh
//! process before any runtime or thread is started, so it is single-threaded when it forks.
#![allow(unsafe_code)]

use nix::unistd::{ForkResult, Pid};

pub enum Forked {
    Parent(Pid),
    Child,
}

/// Forks this single-threaded launcher process.
pub fn fork() -> nix::Result<Forked> {
    if !single_threaded() {
        return Err(nix::Error::EDEADLK);
    }
    // SAFETY: called only by the `__sandbox-exec` launcher, which is single-threaded (see the
    // module's documentation).
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

/// Whether this process has one thread, as `/proc/self/status` says.
fn single_threaded() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .any(|l| l.strip_prefix("Threads:").is_some_and(|n| n.trim() == "1"))
    })
}
