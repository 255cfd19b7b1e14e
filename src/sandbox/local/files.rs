//! File operations on a workspace, done by the host. Paths are resolved with
//! `openat2(RESOLVE_BENEATH)` and symlinks are refused, so a link planted by a command cannot
//! make the server read or write outside the workspace. When commands run as another user
//! (the server is root), what the host creates is handed to that user.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, ResolveFlags};

use super::isolation::HostIds;
use crate::sandbox::{DirEntry, FileContent, RepoPath, SandboxError};

/// Entries `list_dir` returns at most.
const MAX_LIST_ENTRIES: usize = 5000;
/// Files `read_file` reads at most.
const MAX_READ_BYTES: u64 = 100 * 1024 * 1024;

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
pub(super) fn content_len(content: &FileContent) -> u64 {
    match content {
        FileContent::File { bytes, .. } => bytes.len() as u64,
        FileContent::Symlink { target } => target.len() as u64,
        FileContent::Missing => 0,
    }
}

pub(super) fn mib(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else {
        format!("{bytes} bytes")
    }
}

/// Reads one file without following symlinks: refused when it is larger than the per-file
/// bound ([`MAX_READ_BYTES`], an I/O error the agent can be told about) or than `budget`, what
/// is left of the read's total ([`SandboxError::TooLarge`]).
pub(super) fn read_beneath(
    repo: &Path,
    path: &RepoPath,
    budget: u64,
) -> Result<FileContent, SandboxError> {
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

pub(super) fn write_beneath(
    repo: &Path,
    path: &RepoPath,
    bytes: &[u8],
    owner: Option<HostIds>,
) -> Result<(), SandboxError> {
    let hand_over = |fd: &OwnedFd| match owner {
        Some(ids) => {
            std::os::unix::fs::fchown(fd, Some(ids.uid), Some(ids.gid)).map_err(|e| io_err(path, e))
        }
        None => Ok(()),
    };
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
        let created = match rustix::fs::mkdirat(dir.as_fd(), *part, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(rustix::io::Errno::EXIST) => false,
            Err(e) => return Err(io_err(path, e)),
        };
        dir = rustix::fs::openat2(
            dir.as_fd(),
            *part,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
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
        if created {
            hand_over(&dir)?;
        }
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
    hand_over(&fd)?;
    File::from(fd).write_all(bytes).map_err(|e| io_err(path, e))
}

/// Hands every file under `dir` to `ids` (symlinks themselves, never what they point to): the
/// host cloned the repository, commands must be able to change it.
pub(super) fn chown_tree(dir: &Path, ids: HostIds) -> std::io::Result<()> {
    let owner = (Some(ids.uid), Some(ids.gid));
    std::os::unix::fs::lchown(dir, owner.0, owner.1)?;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            std::os::unix::fs::lchown(&path, owner.0, owner.1)?;
            if std::fs::symlink_metadata(&path)?.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok(())
}

pub(super) fn list_beneath(
    repo: &Path,
    path: &RepoPath,
    depth: u32,
) -> Result<Vec<DirEntry>, SandboxError> {
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
