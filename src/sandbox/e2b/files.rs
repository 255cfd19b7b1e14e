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

/// Prints one line per path argument (after the size limit): a kind letter and, for files and
/// symlinks, the base64 content or link target. Paths arrive as arguments, never spliced into
/// the script, so no quoting can go wrong. Kinds: `F` file, `X` executable file, `L` symlink,
/// `M` missing, `D` directory, `S` something else, `P` a parent is a symlink, `B` too big,
/// `E` unreadable.
pub const READ_SCRIPT: &str = r#"max=$1; shift
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
    if [ $((8#$mode & 8#111)) -ne 0 ]; then printf 'X '; else printf 'F '; fi
    base64 -w0 -- "$p"; echo
  elif [ -d "$p" ]; then echo D
  elif [ -e "$p" ]; then echo S
  else echo M
  fi
done
"#;

/// Arguments for [`READ_SCRIPT`] after `bash -c SCRIPT`: `$0`, the size limit, the paths.
pub fn read_script_args(paths: &[RepoPath]) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        READ_SCRIPT.to_owned(),
        "read-files".to_owned(),
        MAX_READ_BYTES.to_string(),
    ];
    args.extend(paths.iter().map(|p| p.as_str().to_owned()));
    args
}

/// Parses [`READ_SCRIPT`]'s output, one line per path.
pub fn parse_read_output(
    paths: &[RepoPath],
    stdout: &[u8],
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
        let got = parse_read_output(&paths(&["a", "b", "c", "d"]), out).unwrap();
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
        assert!(parse_read_output(&paths(&["a", "b"]), b"M\n").is_err());
        assert!(matches!(
            parse_read_output(&paths(&["a"]), b"P\n"),
            Err(SandboxError::Path(_))
        ));
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
