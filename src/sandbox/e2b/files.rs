//! Files in the sandbox: uploads through envd's `POST /files`, listings through
//! `filesystem.Filesystem/ListDir`, and batched reads through one shell script.
//!
//! Reads go through a script rather than `GET /files` because one request must serve any number
//! of files and must report symlinks and executable bits without following links.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;

use super::Endpoint;
use super::envd::{read_error_body, transport_error};
use crate::sandbox::{DirEntry, FileContent, RepoPath, SandboxError};

/// Largest file `read_files` returns, as in the local backend.
pub const MAX_READ_BYTES: u64 = 100 * 1024 * 1024;
/// Entries `list_dir` returns at most, as in the local backend.
pub const MAX_LIST_ENTRIES: usize = 5000;

/// Prints one line per path argument (after the per-file and total size limits): a kind letter
/// and, for files and symlinks, the base64 content or link target. Paths arrive as arguments,
/// never spliced into the script, so no quoting can go wrong. Kinds: `F` file, `X` executable
/// file, `L` symlink, `M` missing, `D` directory, `S` something else, `P` a parent is a symlink,
/// `B` too big, `T` over the total (and so is every file after it), `E` unreadable.
pub const READ_SCRIPT: &str = r#"max=$1; total=$2; used=0; shift 2
for p in "$@"; do
  pre=; rest=$p; linked=
  while case $rest in */*) true;; *) false;; esac; do
    pre=$pre${rest%%/*}; rest=${rest#*/}
    if [ -L "$pre" ]; then linked=1; break; fi
    pre=$pre/
  done
  if [ -n "$linked" ]; then echo P
  elif [ -L "$p" ]; then t=$(readlink -n -- "$p" | base64 -w0) && echo "L $t" || echo E
  elif [ -f "$p" ]; then
    if [ ! -r "$p" ]; then echo E; continue; fi
    sm=$(stat -c '%s %a' -- "$p") || { echo E; continue; }
    size=${sm% *}; mode=${sm#* }
    if [ "$size" -gt "$max" ]; then echo B; continue; fi
    used=$((used + size)); if [ "$used" -gt "$total" ]; then echo T; continue; fi
    if [ $((8#$mode & 8#111)) -ne 0 ]; then printf 'X '; else printf 'F '; fi
    base64 -w0 -- "$p"; echo
  elif [ -d "$p" ]; then echo D
  elif [ -e "$p" ]; then echo S
  else echo M
  fi
done
"#;

/// Arguments for [`READ_SCRIPT`] after `bash -c SCRIPT`: `$0`, the per-file limit, the total,
/// the paths.
pub fn read_script_args(paths: &[RepoPath], max_total: u64) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        READ_SCRIPT.to_owned(),
        "read-files".to_owned(),
        MAX_READ_BYTES.to_string(),
        max_total.to_string(),
    ];
    args.extend(paths.iter().map(|p| p.as_str().to_owned()));
    args
}

/// Bytes of output [`READ_SCRIPT`] prints at most for `paths` whose contents stay within
/// `max_total`: base64 (4 bytes per 3, rounded up per file) plus a kind, a space and a newline
/// per line, with room for symlink targets. More means a file grew past the total while read.
pub fn read_output_cap(paths: &[RepoPath], max_total: u64) -> usize {
    let content = max_total.saturating_mul(4).div_ceil(3);
    let per_path = 8 + 4 * 4096; // framing and padding, or a symlink target (PATH_MAX)
    let cap = content.saturating_add(per_path * paths.len() as u64);
    usize::try_from(cap).unwrap_or(usize::MAX)
}

/// The error for a read over its total.
pub fn too_large(paths: &[RepoPath], max_total: u64) -> SandboxError {
    SandboxError::TooLarge(format!(
        "the {} files read together hold more than {} MiB; the change is too large",
        paths.len(),
        max_total / (1024 * 1024)
    ))
}

/// Parses [`READ_SCRIPT`]'s output, one line per path.
pub fn parse_read_output(
    paths: &[RepoPath],
    stdout: &[u8],
    max_total: u64,
) -> Result<Vec<FileContent>, SandboxError> {
    let text = std::str::from_utf8(stdout).map_err(|_| {
        SandboxError::Io("the file reader printed something that is not text".into())
    })?;
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() != paths.len() {
        return Err(SandboxError::Io(format!(
            "the file reader answered for {} of {} files",
            lines.len(),
            paths.len()
        )));
    }
    if lines.contains(&"T") {
        return Err(too_large(paths, max_total));
    }
    paths
        .iter()
        .zip(lines)
        .map(|(path, line)| {
            let (kind, payload) = line.split_once(' ').unwrap_or((line, ""));
            let decode = || {
                B64.decode(payload.trim())
                    .map_err(|e| SandboxError::Io(format!("{path}: unreadable content: {e}")))
            };
            match kind {
                "F" | "X" => Ok(FileContent::File {
                    bytes: decode()?,
                    executable: kind == "X",
                }),
                "L" => Ok(FileContent::Symlink {
                    target: String::from_utf8_lossy(&decode()?).into_owned(),
                }),
                "M" => Ok(FileContent::Missing),
                "D" => Err(SandboxError::Path(format!("{path} is a directory"))),
                "S" => Err(SandboxError::Path(format!("{path} is not a regular file"))),
                "P" => Err(SandboxError::Path(format!(
                    "{path}: a directory on the way is a symlink"
                ))),
                "B" => Err(SandboxError::Io(format!(
                    "{path} is larger than {} MiB",
                    MAX_READ_BYTES / (1024 * 1024)
                ))),
                "E" => Err(SandboxError::Io(format!("{path}: permission denied"))),
                "T" => Err(too_large(paths, max_total)),
                other => Err(SandboxError::Io(format!(
                    "{path}: the file reader answered `{}`",
                    crate::text::truncate_middle(other, 40).0
                ))),
            }
        })
        .collect()
}

/// `/files?path=<abs_path>`, the path percent-encoded (plus the user for envd < 0.4.0).
fn files_path(endpoint: &Endpoint, abs_path: &str) -> String {
    let encoded: String = url::form_urlencoded::byte_serialize(abs_path.as_bytes()).collect();
    if endpoint.legacy_user {
        format!("/files?path={encoded}&username=user")
    } else {
        format!("/files?path={encoded}")
    }
}

/// `POST /files?path=…` as multipart (every envd version accepts it), with the full path as
/// the part's file name as the official SDK does.
pub async fn upload(endpoint: &Endpoint, abs_path: &str, bytes: &[u8]) -> Result<(), SandboxError> {
    let boundary = format!("tb-{}", uuid::Uuid::new_v4().simple());
    let filename: String = abs_path
        .chars()
        .map(|c| match c {
            '"' | '\r' | '\n' | '\\' => '_',
            c => c,
        })
        .collect();
    let mut body = Vec::with_capacity(bytes.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let response = endpoint
        .envd_post(&files_path(endpoint, abs_path))
        .header(
            "Content-Type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .timeout(endpoint.timing.request_timeout)
        .body(body)
        .send()
        .await
        .map_err(|e| transport_error("uploading a file", &e))?;
    let status = response.status();
    if !status.is_success() {
        let text = read_error_body(response).await;
        return Err(match status.as_u16() {
            400 => SandboxError::Path(format!("envd refused to write the file: {text}")),
            507 => SandboxError::Io(format!("the sandbox's disk is full: {text}")),
            _ => endpoint.status_error(status, &text),
        });
    }
    Ok(())
}

/// `GET /files?path=…`: the raw bytes (gzip is decoded by the client), `None` when missing.
pub async fn download(
    endpoint: &Endpoint,
    abs_path: &str,
) -> Result<Option<Vec<u8>>, SandboxError> {
    let response = endpoint
        .envd_get(&files_path(endpoint, abs_path))
        .timeout(endpoint.timing.request_timeout)
        .send()
        .await
        .map_err(|e| transport_error("downloading a file", &e))?;
    let status = response.status();
    if status == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !status.is_success() {
        let text = read_error_body(response).await;
        return Err(endpoint.status_error(status, &text));
    }
    let bytes = response
        .bytes()
        .await
        .map_err(|e| transport_error("downloading a file", &e))?;
    Ok(Some(bytes.to_vec()))
}

#[derive(Debug, Deserialize)]
struct ListDirResponse {
    #[serde(default)]
    entries: Vec<EntryInfo>,
}

#[derive(Debug, Deserialize)]
struct EntryInfo {
    #[serde(default)]
    path: String,
    #[serde(default, rename = "type")]
    kind: serde_json::Value,
}

/// Turns a `ListDir` answer into repository-relative entries, without `.git`, sorted, capped.
pub fn list_entries(
    repo_dir: &str,
    answer: serde_json::Value,
) -> Result<Vec<DirEntry>, SandboxError> {
    let answer: ListDirResponse = serde_json::from_value(answer)
        .map_err(|e| SandboxError::Io(format!("unreadable directory listing from envd: {e}")))?;
    let prefix = format!("{}/", repo_dir.trim_end_matches('/'));
    let mut out: Vec<DirEntry> = answer
        .entries
        .into_iter()
        .filter_map(|entry| {
            let rel = entry.path.strip_prefix(&prefix)?;
            // RepoPath refuses `.git` components and anything odd.
            let rel = RepoPath::parse(rel).ok().filter(|p| !p.is_root())?;
            let is_dir = matches!(&entry.kind, serde_json::Value::String(s) if s == "FILE_TYPE_DIRECTORY")
                || entry.kind == serde_json::json!(2);
            Some(DirEntry {
                path: rel.as_str().to_owned(),
                is_dir,
            })
        })
        .collect();
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup();
    out.truncate(MAX_LIST_ENTRIES);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(raw: &[&str]) -> Vec<RepoPath> {
        raw.iter().map(|p| RepoPath::parse(p).unwrap()).collect()
    }

    #[test]
    fn parses_every_kind() {
        let out = b"F aGkK\nX \nL Li4vdA==\nM\n";
        let got = parse_read_output(&paths(&["a", "b", "c", "d"]), out, 100).unwrap();
        assert_eq!(
            got,
            vec![
                FileContent::File {
                    bytes: b"hi\n".to_vec(),
                    executable: false
                },
                FileContent::File {
                    bytes: Vec::new(),
                    executable: true
                },
                FileContent::Symlink {
                    target: "../t".into()
                },
                FileContent::Missing,
            ]
        );
    }

    #[test]
    fn a_short_answer_is_an_error() {
        assert!(parse_read_output(&paths(&["a", "b"]), b"M\n", 100).is_err());
        assert!(matches!(
            parse_read_output(&paths(&["a"]), b"P\n", 100),
            Err(SandboxError::Path(_))
        ));
    }

    /// Runs the read script as the sandbox would, in `dir`.
    fn run_script(dir: &std::path::Path, paths: &[RepoPath], max_total: u64) -> Vec<u8> {
        let out = std::process::Command::new("bash")
            .args(read_script_args(paths, max_total))
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        out.stdout
    }

    #[test]
    fn the_script_refuses_files_past_the_total() {
        let dir = tempfile::tempdir().unwrap();
        for (name, size) in [("a", 600), ("b", 400), ("c", 1), ("d", 0)] {
            std::fs::write(dir.path().join(name), vec![b'x'; size]).unwrap();
        }
        // Exactly the total is fine.
        let within = paths(&["a", "b", "d"]);
        let out = run_script(dir.path(), &within, 1000);
        assert!(out.len() <= read_output_cap(&within, 1000));
        let got = parse_read_output(&within, &out, 1000).unwrap();
        assert_eq!(got.len(), 3);
        // One byte more is not, and every file after the first refused is refused too.
        let over = paths(&["a", "b", "c", "d"]);
        let out = run_script(dir.path(), &over, 1000);
        assert_eq!(
            String::from_utf8_lossy(&out)
                .lines()
                .skip(2)
                .collect::<Vec<_>>(),
            ["T", "T"]
        );
        let e = parse_read_output(&over, &out, 1000).unwrap_err();
        assert_eq!(e.code().as_str(), "change_too_large");
    }

    #[test]
    fn output_within_the_total_fits_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let sizes = [0usize, 1, 2, 3, 4, 5, 97, 98, 99];
        let names: Vec<String> = sizes.iter().map(|s| format!("f{s}")).collect();
        for (name, size) in names.iter().zip(sizes) {
            std::fs::write(dir.path().join(name), vec![0xffu8; size]).unwrap();
        }
        std::os::unix::fs::symlink("a".repeat(200), dir.path().join("link")).unwrap();
        let mut all: Vec<&str> = names.iter().map(String::as_str).collect();
        all.push("link");
        let all = paths(&all);
        let total = sizes.iter().sum::<usize>() as u64;
        let out = run_script(dir.path(), &all, total);
        assert!(!String::from_utf8_lossy(&out).lines().any(|l| l == "T"));
        assert!(out.len() <= read_output_cap(&all, total), "{}", out.len());
    }

    #[test]
    fn listing_drops_git_and_outside_paths() {
        let answer = serde_json::json!({"entries": [
            {"name": "src", "type": "FILE_TYPE_DIRECTORY", "path": "/home/user/repo/src"},
            {"name": "a.rs", "type": "FILE_TYPE_FILE", "path": "/home/user/repo/src/a.rs", "size": "3"},
            {"name": ".git", "type": "FILE_TYPE_DIRECTORY", "path": "/home/user/repo/.git"},
            {"name": "HEAD", "type": "FILE_TYPE_FILE", "path": "/home/user/repo/.git/HEAD", "size": 4},
            {"name": "x", "type": "FILE_TYPE_FILE", "path": "/etc/x"},
        ]});
        assert_eq!(
            list_entries("/home/user/repo", answer).unwrap(),
            vec![
                DirEntry {
                    path: "src".into(),
                    is_dir: true
                },
                DirEntry {
                    path: "src/a.rs".into(),
                    is_dir: false
                },
            ]
        );
    }
}
