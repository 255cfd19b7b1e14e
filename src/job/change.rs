//! Collecting the agent's change out of a sandbox in a constant number of requests: one command
//! for the file list, line counts, total size and patch, one batched read of the changed files.
//!
//! The change's total size is known before any file is read, so a change larger than the
//! configured limit is refused without ever being held in memory. A collected change is then
//! searched for secrets ([`refuse_secrets`]) before anything shows or publishes it.

use std::time::Duration;

use crate::event::FileStatus;
use crate::forge::{ChangeSet, ChangedFile};
use crate::redact::Redactor;
use crate::sandbox::{ExecRequest, FileContent, RepoPath, Sandbox, SandboxError};
use crate::secret_scan::{self, ChangedText, SecretScanner};

/// Largest patch kept for `Diff` events and `GET /jobs/{id}/patch`.
pub const MAX_PATCH_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("{0}")]
    Git(String),
    #[error("{0}")]
    TooLarge(String),
    /// The change holds a secret; the message names where and what kind, never the secret.
    #[error("{0}")]
    SecretInChange(String),
    /// The secret scan itself failed; the change is refused rather than published unscanned.
    #[error("{0}")]
    ScanFailed(String),
}

/// Stages everything in the sandbox's checkout and describes it relative to `base`.
/// `max_bytes` bounds the total size of the changed files' new contents.
pub async fn collect(
    sandbox: &dyn Sandbox,
    base: &str,
    max_bytes: u64,
) -> Result<ChangeSet, ChangeError> {
    if !base.chars().all(|c| c.is_ascii_hexdigit()) || base.len() < 7 {
        return Err(ChangeError::Git(format!("`{base}` is not a commit id")));
    }
    // A per-call nonce makes the section markers impossible to forge from file names or content.
    // The checkout's git configuration is the agent's: the patch is made without its diff
    // drivers, text conversions or prefixes, so what the user reviews is what is committed.
    let nonce: u64 = rand::random();
    let mark = |name: &str| format!("__TB_{nonce:016x}_{name}__");
    let command = format!(
        "git add -A >/dev/null 2>&1 || {{ echo 'git add failed' >&2; git add -A; exit 3; }}\n\
         printf '%s\\n' '{size}'\n\
         git diff --cached --no-renames --no-ext-diff --raw --no-abbrev {base} | awk '{{print $4}}' | git cat-file --batch-check='%(objectsize)' | awk '$1 ~ /^[0-9]+$/ {{s += $1}} END {{print s + 0}}'\n\
         printf '%s\\n' '{raw}'\n\
         git -c core.quotepath=off diff --cached --no-renames --no-ext-diff --raw -z {base} || exit 4\n\
         printf '\\n%s\\n' '{numstat}'\n\
         git -c core.quotepath=off diff --cached --no-renames --no-ext-diff --numstat -z {base} || exit 4\n\
         printf '\\n%s\\n' '{patch}'\n\
         git -c core.quotepath=off diff --cached --no-renames --no-ext-diff --no-textconv --src-prefix=a/ --dst-prefix=b/ --no-color --binary {base} | head -c {limit}\n",
        size = mark("SIZE"),
        raw = mark("RAW"),
        numstat = mark("NUMSTAT"),
        patch = mark("PATCH"),
        limit = MAX_PATCH_BYTES + 1,
    );
    // Staging and describing the change twice gives the same answer, so a run whose stream broke
    // is run again rather than failing the job (a first run still holding the index makes the
    // repeat's `git add` fail, which is reported).
    let out = sandbox
        .exec(
            &ExecRequest::new(command)
                .timeout(Duration::from_secs(300))
                .output_cap(4 * MAX_PATCH_BYTES)
                .repeatable(),
        )
        .await?;
    if out.truncated {
        // Only the file list and line counts can overflow the cap (the patch is cut short by
        // `head`): so many changed paths that the change cannot even be described.
        return Err(ChangeError::TooLarge(format!(
            "the change is too large: its file list alone is over {} MiB",
            4 * MAX_PATCH_BYTES / (1024 * 1024)
        )));
    }
    if !out.success() {
        return Err(ChangeError::Git(format!(
            "reading the change failed (exit {}): {}",
            out.exit_code,
            crate::text::truncate_middle(out.combined().trim(), 2000).0
        )));
    }
    let stdout = out.stdout;
    let section = |name: &str, next: Option<&str>| -> Result<Vec<u8>, ChangeError> {
        let start_mark = format!("{}\n", mark(name));
        let start = find(&stdout, start_mark.as_bytes()).ok_or_else(|| {
            ChangeError::Git(format!("malformed diff output (no {name} section)"))
        })? + start_mark.len();
        let end = match next {
            Some(next) => {
                let end_mark = format!("\n{}\n", mark(next));
                start
                    + find(&stdout[start..], end_mark.as_bytes()).ok_or_else(|| {
                        ChangeError::Git(format!("malformed diff output (no {next} section)"))
                    })?
            }
            None => stdout.len(),
        };
        Ok(stdout[start..end].to_vec())
    };
    let size = section("SIZE", Some("RAW"))?;
    let total: u64 = String::from_utf8_lossy(&size).trim().parse().map_err(|_| {
        ChangeError::Git("malformed diff output (the change's size is unreadable)".into())
    })?;
    if total > max_bytes {
        return Err(ChangeError::TooLarge(format!(
            "the change is too large: its files add up to {}, over the limit of {} (MAX_CHANGE_MB)",
            human_size(total),
            human_size(max_bytes)
        )));
    }
    let raw = section("RAW", Some("NUMSTAT"))?;
    let numstat = section("NUMSTAT", Some("PATCH"))?;
    let mut patch = section("PATCH", None)?;
    let patch_truncated = patch.len() > MAX_PATCH_BYTES;
    patch.truncate(MAX_PATCH_BYTES);

    let mut files = parse_raw(&raw)?;
    apply_numstat(&mut files, &numstat);
    let paths: Vec<RepoPath> = files
        .iter()
        .filter(|f| f.status != FileStatus::Deleted)
        .map(|f| f.path.clone())
        .collect();
    let contents = if paths.is_empty() {
        Vec::new()
    } else {
        sandbox.read_files(&paths).await?
    };
    if contents.len() != paths.len() {
        return Err(ChangeError::Git(
            "the sandbox returned the wrong number of files".into(),
        ));
    }
    let mut contents = paths
        .into_iter()
        .zip(contents)
        .collect::<std::collections::HashMap<_, _>>();
    for file in &mut files {
        if file.status != FileStatus::Deleted {
            file.content = contents.remove(&file.path).unwrap_or(FileContent::Missing);
        }
    }
    Ok(ChangeSet {
        base_commit: base.to_owned(),
        files,
        patch: String::from_utf8_lossy(&patch).into_owned(),
        patch_truncated,
    })
}

/// Passes the change through when it holds no secret the [`Redactor`] knows (in any encoding
/// the scan searches for) and no credential's shape; see [`crate::secret_scan`]. The scan runs on
/// a blocking thread: it is linear, but a change can be 64 MiB.
pub async fn refuse_secrets(
    change: ChangeSet,
    redactor: &Redactor,
) -> Result<ChangeSet, ChangeError> {
    let redactor = redactor.clone();
    let (change, findings) = tokio::task::spawn_blocking(move || {
        let findings = scan(&change, &redactor);
        (change, findings)
    })
    .await
    .map_err(|err| ChangeError::ScanFailed(format!("the secret scan did not finish: {err}")))?;
    let findings = findings.map_err(|err| ChangeError::ScanFailed(err.to_string()))?;
    if findings.is_empty() {
        Ok(change)
    } else {
        Err(ChangeError::SecretInChange(secret_scan::describe(
            &findings,
        )))
    }
}

fn scan(
    change: &ChangeSet,
    redactor: &Redactor,
) -> Result<Vec<secret_scan::Finding>, secret_scan::BuildError> {
    let scanner = SecretScanner::new(redactor.secrets())?;
    let files: Vec<ChangedText<'_>> = change
        .files
        .iter()
        .map(|file| ChangedText {
            path: file.path.as_str(),
            content: match &file.content {
                FileContent::File { bytes, .. } => Some(bytes.as_slice()),
                FileContent::Symlink { target } => Some(target.as_bytes()),
                // A deleted file, or one gone by the time it was read (published as a
                // deletion).
                FileContent::Missing => None,
            },
        })
        .collect();
    Ok(scanner.scan_change(&files, &change.patch))
}

/// A size for people: MiB from 1 MiB up, bytes below.
fn human_size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
    } else {
        format!("{bytes} bytes")
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses `git diff --raw -z`: `:oldmode newmode oldsha newsha STATUS\0path\0` per file.
fn parse_raw(raw: &[u8]) -> Result<Vec<ChangedFile>, ChangeError> {
    let mut files = Vec::new();
    let mut fields = raw
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty() && *f != b"\n");
    while let Some(meta) = fields.next() {
        let meta = String::from_utf8_lossy(meta);
        let meta = meta.trim_start_matches('\n');
        let Some(path) = fields.next() else {
            return Err(ChangeError::Git("malformed raw diff (path missing)".into()));
        };
        let path = String::from_utf8_lossy(path).into_owned();
        let parts: Vec<&str> = meta.trim_start_matches(':').split(' ').collect();
        let (Some(new_mode), Some(status)) = (parts.get(1), parts.get(4)) else {
            return Err(ChangeError::Git(format!(
                "malformed raw diff entry `{meta}`"
            )));
        };
        if *new_mode == "160000" || parts.first() == Some(&"160000") {
            tracing::warn!(
                path,
                "skipping a nested git repository (submodule) in the change"
            );
            continue;
        }
        let status = match status.chars().next() {
            Some('A') => FileStatus::Added,
            Some('D') => FileStatus::Deleted,
            Some('M' | 'T') => FileStatus::Modified,
            other => {
                return Err(ChangeError::Git(format!(
                    "unexpected diff status {other:?} for {path}"
                )));
            }
        };
        let path = RepoPath::parse(&path)
            .map_err(|e| ChangeError::Git(format!("refusing a changed path: {e}")))?;
        files.push(ChangedFile {
            path,
            status,
            additions: 0,
            deletions: 0,
            content: FileContent::Missing,
        });
    }
    Ok(files)
}

/// Adds `git diff --numstat -z` counts (`add\tdel\tpath\0`; `-` for binary files).
fn apply_numstat(files: &mut [ChangedFile], numstat: &[u8]) {
    for record in numstat.split(|b| *b == 0) {
        let record = String::from_utf8_lossy(record);
        let record = record.trim_start_matches('\n');
        let mut parts = record.splitn(3, '\t');
        let (Some(add), Some(del), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let Some(file) = files.iter_mut().find(|f| f.path.as_str() == path) {
            file.additions = add.parse().unwrap_or(0);
            file.deletions = del.parse().unwrap_or(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{ExecOutput, FixedSandbox};

    #[tokio::test]
    async fn a_change_too_large_to_list_is_reported_as_too_large() {
        // The one command printed more than the output cap.
        let overflowing = FixedSandbox {
            exec_output: Some(ExecOutput {
                exit_code: 0,
                stdout: b"head\n[... 40000000 bytes truncated ...]\ntail".to_vec(),
                stderr: Vec::new(),
                timed_out: false,
                truncated: true,
            }),
        };
        let err = collect(&overflowing, &"a".repeat(40), u64::MAX)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ChangeError::TooLarge(m) if m.starts_with("the change is too large")),
            "{err}"
        );
    }

    #[test]
    fn parses_raw_and_numstat() {
        let zero = "0".repeat(40);
        let raw = format!(
            ":000000 100644 {zero} {zero} A\0new file.txt\0:100644 000000 {zero} {zero} D\0old.txt\0:100644 100755 {zero} {zero} M\0bin/run\0"
        );
        let mut files = parse_raw(raw.as_bytes()).unwrap();
        apply_numstat(
            &mut files,
            b"2\t0\tnew file.txt\x000\t5\told.txt\x00-\t-\tbin/run\x00",
        );
        let summary: Vec<_> = files
            .iter()
            .map(|f| (f.path.as_str(), f.status, f.additions, f.deletions))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("new file.txt", FileStatus::Added, 2, 0),
                ("old.txt", FileStatus::Deleted, 0, 5),
                ("bin/run", FileStatus::Modified, 0, 0),
            ]
        );
    }

    #[test]
    fn refuses_git_paths() {
        let zero = "0".repeat(40);
        let raw = format!(":000000 100644 {zero} {zero} A\0.git/config\0");
        assert!(parse_raw(raw.as_bytes()).is_err());
    }
}
