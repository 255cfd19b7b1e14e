//! The agent's tools, their schemas, and their execution against a [`Sandbox`].
//!
//! Every failure a model can fix (a bad path, an edit that does not apply, malformed arguments,
//! an unknown tool) comes back as a tool result with `is_error: true`, never as a job failure.
//! Only a dead sandbox ends the run.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::observer::Observer;
use super::provider::ToolSpec;
use crate::event::EventKind;
use crate::sandbox::{ExecRequest, FileContent, RepoPath, Sandbox, SandboxError};
use crate::text::truncate_middle;

/// Bytes of tool output a model sees at most (head and tail kept).
pub const MODEL_OUTPUT_CAP: usize = 16 * 1024;
/// Bytes of a string kept in an event.
const EVENT_TEXT_CAP: usize = 32 * 1024;
/// Lines `read_file` returns at most per call.
const READ_MAX_LINES: usize = 2000;
const SEARCH_MAX_MATCHES: usize = 200;
const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
const MAX_COMMAND_TIMEOUT: Duration = Duration::from_secs(900);

pub const FINISH: &str = "finish";

/// The model's closing words: the PR title and the summary.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Finish {
    pub title: String,
    pub summary: String,
}

/// The result of one tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutcome {
    pub content: String,
    pub is_error: bool,
    /// Set by the `finish` tool.
    pub finish: Option<Finish>,
}

impl ToolOutcome {
    fn ok(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: false,
            finish: None,
        }
    }

    fn error(content: impl Into<String>) -> Self {
        Self {
            content: content.into(),
            is_error: true,
            finish: None,
        }
    }
}

/// Executes tool calls for one job.
pub struct ToolExecutor {
    sandbox: Arc<dyn Sandbox>,
    observer: Arc<dyn Observer>,
}

pub fn specs() -> Vec<ToolSpec> {
    vec![
        ToolSpec {
            name: "read_file",
            description: "Read a text file of the repository. Lines come numbered (`N\\tline`). Give start_line/end_line (1-based, inclusive) for a part of a long file.",
            parameters: json!({"type":"object","properties":{
                "path":{"type":"string","description":"Path relative to the repository root"},
                "start_line":{"type":"integer","minimum":1},
                "end_line":{"type":"integer","minimum":1}},
                "required":["path"]}),
        },
        ToolSpec {
            name: "list_files",
            description: "List files and directories (directories end with `/`) under a path, `.git` excluded.",
            parameters: json!({"type":"object","properties":{
                "path":{"type":"string","description":"Directory relative to the repository root; empty for the root"},
                "depth":{"type":"integer","minimum":1,"maximum":6,"description":"How many levels to descend (default 2)"}}}),
        },
        ToolSpec {
            name: "search",
            description: "Search file contents with an extended regular expression (grep -E). Returns `path:line:text` matches.",
            parameters: json!({"type":"object","properties":{
                "pattern":{"type":"string"},
                "path":{"type":"string","description":"Directory or file to search; empty for the whole repository"}},
                "required":["pattern"]}),
        },
        ToolSpec {
            name: "edit_file",
            description: "Replace exactly one occurrence of old_str with new_str in a file. old_str must match the file exactly (whitespace included) and be unique; include surrounding lines to make it unique. An empty old_str appends new_str to the file, creating it if needed.",
            parameters: json!({"type":"object","properties":{
                "path":{"type":"string"},
                "old_str":{"type":"string"},
                "new_str":{"type":"string"}},
                "required":["path","old_str","new_str"]}),
        },
        ToolSpec {
            name: "write_file",
            description: "Create a file, or replace a file's whole content. Prefer edit_file for changes to existing files.",
            parameters: json!({"type":"object","properties":{
                "path":{"type":"string"},
                "content":{"type":"string"}},
                "required":["path","content"]}),
        },
        ToolSpec {
            name: "run_command",
            description: "Run a shell command (bash) in the repository root, without network access. Use it to build and test. Output is truncated in the middle when long.",
            parameters: json!({"type":"object","properties":{
                "command":{"type":"string"},
                "timeout_secs":{"type":"integer","minimum":1,"maximum":900}},
                "required":["command"]}),
        },
        ToolSpec {
            name: FINISH,
            description: "Call once the change is complete. title: the pull request title (imperative, under 72 characters). summary: what changed and why, for the pull request body.",
            parameters: json!({"type":"object","properties":{
                "title":{"type":"string"},
                "summary":{"type":"string"}},
                "required":["title","summary"]}),
        },
    ]
}

#[derive(Deserialize)]
struct ReadArgs {
    path: String,
    start_line: Option<u64>,
    end_line: Option<u64>,
}

#[derive(Deserialize)]
struct ListArgs {
    #[serde(default)]
    path: String,
    depth: Option<u32>,
}

#[derive(Deserialize)]
struct SearchArgs {
    pattern: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize)]
struct EditArgs {
    path: String,
    old_str: String,
    new_str: String,
}

#[derive(Deserialize)]
struct WriteArgs {
    path: String,
    content: String,
}

#[derive(Deserialize)]
struct CommandArgs {
    command: String,
    timeout_secs: Option<u64>,
}

/// Parses a tool's arguments, or says what is wrong with them.
fn args<T: serde::de::DeserializeOwned>(
    tool: &str,
    arguments: &serde_json::Value,
    raw: Option<&str>,
) -> Result<T, ToolOutcome> {
    if let Some(raw) = raw {
        let (shown, _) = truncate_middle(raw, 500);
        return Err(ToolOutcome::error(format!(
            "The arguments for {tool} are not valid JSON: {shown}"
        )));
    }
    serde_json::from_value(arguments.clone())
        .map_err(|e| ToolOutcome::error(format!("Invalid arguments for {tool}: {e}")))
}

fn path_arg(raw: &str) -> Result<RepoPath, ToolOutcome> {
    RepoPath::parse(raw).map_err(ToolOutcome::error)
}

fn cap(text: &str) -> String {
    truncate_middle(text, EVENT_TEXT_CAP).0
}

impl ToolExecutor {
    pub fn new(sandbox: Arc<dyn Sandbox>, observer: Arc<dyn Observer>) -> Self {
        Self { sandbox, observer }
    }

    /// Runs one call. `Err` only when the sandbox itself is gone or broken.
    pub async fn execute(
        &self,
        name: &str,
        arguments: &serde_json::Value,
        raw_arguments: Option<&str>,
    ) -> Result<ToolOutcome, SandboxError> {
        let outcome = match name {
            "read_file" => match args::<ReadArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.read_file(a).await?,
                Err(e) => e,
            },
            "list_files" => match args::<ListArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.list_files(a).await?,
                Err(e) => e,
            },
            "search" => match args::<SearchArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.search(a).await?,
                Err(e) => e,
            },
            "edit_file" => match args::<EditArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.edit_file(a).await?,
                Err(e) => e,
            },
            "write_file" => match args::<WriteArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.write_file(a).await?,
                Err(e) => e,
            },
            "run_command" => match args::<CommandArgs>(name, arguments, raw_arguments) {
                Ok(a) => self.run_command(a).await?,
                Err(e) => e,
            },
            FINISH => match args::<Finish>(name, arguments, raw_arguments) {
                Ok(finish) if finish.title.trim().is_empty() => {
                    ToolOutcome::error("finish needs a non-empty title")
                }
                Ok(finish) => ToolOutcome {
                    content: "Finished.".into(),
                    is_error: false,
                    finish: Some(finish),
                },
                Err(e) => e,
            },
            other => ToolOutcome::error(format!(
                "Unknown tool `{other}`. Available tools: {}.",
                specs()
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        };
        Ok(outcome)
    }

    /// Reads a file as text, mapping "not a file" conditions to tool errors.
    async fn text_of(&self, path: &RepoPath) -> Result<Result<String, ToolOutcome>, SandboxError> {
        let content = match self.sandbox.read_file(path).await {
            Ok(c) => c,
            Err(e) if e.is_request_error() => {
                return Ok(Err(ToolOutcome::error(e.to_string())));
            }
            Err(e) => return Err(e),
        };
        Ok(match content {
            FileContent::Missing => Err(ToolOutcome::error(format!("{path} does not exist"))),
            FileContent::Symlink { target } => Err(ToolOutcome::error(format!(
                "{path} is a symbolic link to `{target}`; read the target instead"
            ))),
            FileContent::File { bytes, .. } => match String::from_utf8(bytes) {
                Ok(text) => Ok(text),
                Err(_) => Err(ToolOutcome::error(format!("{path} is a binary file"))),
            },
        })
    }

    async fn read_file(&self, a: ReadArgs) -> Result<ToolOutcome, SandboxError> {
        let path = match path_arg(&a.path) {
            Ok(p) => p,
            Err(e) => return Ok(e),
        };
        self.observer.event(EventKind::ToolRead {
            filepath: path.as_str().to_owned(),
            start_line: a.start_line,
            end_line: a.end_line,
        });
        let text = match self.text_of(&path).await? {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        let lines: Vec<&str> = text.lines().collect();
        let start = a.start_line.unwrap_or(1).max(1) as usize;
        if start > lines.len().max(1) {
            return Ok(ToolOutcome::error(format!(
                "{path} has {} lines; start_line {start} is past the end",
                lines.len()
            )));
        }
        let requested_end = a.end_line.map(|e| e as usize).unwrap_or(lines.len());
        let end = requested_end
            .min(lines.len())
            .min(start + READ_MAX_LINES - 1);
        let mut out = String::new();
        for (i, line) in lines.iter().enumerate().take(end).skip(start - 1) {
            out.push_str(&format!("{}\t{line}\n", i + 1));
        }
        if end < requested_end.min(lines.len()) {
            out.push_str(&format!(
                "[... showing lines {start}-{end} of {}; ask for more with start_line ...]\n",
                lines.len()
            ));
        }
        if lines.is_empty() {
            out.push_str("[empty file]\n");
        }
        Ok(ToolOutcome::ok(
            truncate_middle(&out, MODEL_OUTPUT_CAP * 4).0,
        ))
    }

    async fn list_files(&self, a: ListArgs) -> Result<ToolOutcome, SandboxError> {
        let path = match path_arg(&a.path) {
            Ok(p) => p,
            Err(e) => return Ok(e),
        };
        let depth = a.depth.unwrap_or(2).clamp(1, 6);
        match self.sandbox.list_dir(&path, depth).await {
            Ok(entries) => {
                let listing: String = entries
                    .iter()
                    .map(|e| {
                        if e.is_dir {
                            format!("{}/\n", e.path)
                        } else {
                            format!("{}\n", e.path)
                        }
                    })
                    .collect();
                if listing.is_empty() {
                    return Ok(ToolOutcome::ok(format!("{path} is empty")));
                }
                Ok(ToolOutcome::ok(
                    truncate_middle(&listing, MODEL_OUTPUT_CAP).0,
                ))
            }
            Err(e) if e.is_request_error() => Ok(ToolOutcome::error(e.to_string())),
            Err(e) => Err(e),
        }
    }

    async fn search(&self, a: SearchArgs) -> Result<ToolOutcome, SandboxError> {
        let path = match path_arg(&a.path) {
            Ok(p) => p,
            Err(e) => return Ok(e),
        };
        if a.pattern.is_empty() {
            return Ok(ToolOutcome::error("search needs a non-empty pattern"));
        }
        // The pattern and path travel as environment variables, never spliced into the shell line.
        let mut req = ExecRequest::new(
            "grep -rnIE --exclude-dir=.git --color=never -e \"$TB_PATTERN\" -- \"$TB_PATH\" 2>&1 | head -n 1000",
        )
        .timeout(Duration::from_secs(60));
        req.env = vec![
            ("TB_PATTERN".into(), a.pattern.clone()),
            (
                "TB_PATH".into(),
                if path.is_root() {
                    ".".into()
                } else {
                    path.as_str().to_owned()
                },
            ),
        ];
        let out = self.sandbox.exec(&req).await?;
        let text = crate::text::lossy(&out.stdout);
        let matches: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with("grep:"))
            .map(|l| l.strip_prefix("./").unwrap_or(l))
            .collect();
        self.observer.event(EventKind::ToolSearch {
            pattern: a.pattern.clone(),
            path: path.to_string(),
            matches: matches.len() as u64,
        });
        if matches.is_empty() {
            // grep's own complaint (a bad pattern, a missing path) is worth more than "no matches".
            return Ok(
                match text
                    .lines()
                    .find(|l| l.starts_with("grep:") && !l.contains("binary file"))
                {
                    Some(err) => ToolOutcome::error(err.to_owned()),
                    None => ToolOutcome::ok("No matches."),
                },
            );
        }
        let mut out: String = matches
            .iter()
            .take(SEARCH_MAX_MATCHES)
            .map(|l| format!("{}\n", truncate_middle(l, 300).0))
            .collect();
        if matches.len() > SEARCH_MAX_MATCHES {
            out.push_str(&format!(
                "[... {} more matches; narrow the pattern or the path ...]\n",
                matches.len() - SEARCH_MAX_MATCHES
            ));
        }
        Ok(ToolOutcome::ok(out))
    }

    async fn edit_file(&self, a: EditArgs) -> Result<ToolOutcome, SandboxError> {
        let path = match path_arg(&a.path) {
            Ok(p) => p,
            Err(e) => return Ok(e),
        };
        if a.old_str.is_empty() {
            // Append (or create).
            let existing = match self.sandbox.read_file(&path).await {
                Ok(FileContent::Missing) => String::new(),
                Ok(FileContent::File { bytes, .. }) => match String::from_utf8(bytes) {
                    Ok(t) => t,
                    Err(_) => return Ok(ToolOutcome::error(format!("{path} is a binary file"))),
                },
                Ok(FileContent::Symlink { target }) => {
                    return Ok(ToolOutcome::error(format!(
                        "{path} is a symbolic link to `{target}`"
                    )));
                }
                Err(e) if e.is_request_error() => {
                    return Ok(ToolOutcome::error(e.to_string()));
                }
                Err(e) => return Err(e),
            };
            let mut text = existing.clone();
            if !text.is_empty() && !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&a.new_str);
            return self
                .write(&path, &text, "", &a.new_str, existing.is_empty())
                .await;
        }
        let text = match self.text_of(&path).await? {
            Ok(t) => t,
            Err(e) => return Ok(e),
        };
        let count = text.matches(&a.old_str).count();
        match count {
            1 => {
                let updated = text.replacen(&a.old_str, &a.new_str, 1);
                self.write(&path, &updated, &a.old_str, &a.new_str, false)
                    .await
            }
            0 => Ok(ToolOutcome::error(format!(
                "old_str was not found in {path}. {}",
                closest_lines(&text, &a.old_str)
            ))),
            n => {
                let lines = occurrence_lines(&text, &a.old_str);
                Ok(ToolOutcome::error(format!(
                    "old_str occurs {n} times in {path} (at lines {}); include more surrounding lines so it matches exactly once",
                    lines
                        .iter()
                        .map(|l| l.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        }
    }

    async fn write_file(&self, a: WriteArgs) -> Result<ToolOutcome, SandboxError> {
        let path = match path_arg(&a.path) {
            Ok(p) => p,
            Err(e) => return Ok(e),
        };
        let old = match self.sandbox.read_file(&path).await {
            Ok(FileContent::File { bytes, .. }) => Some(crate::text::lossy(&bytes)),
            Ok(FileContent::Missing) => None,
            Ok(FileContent::Symlink { target }) => {
                return Ok(ToolOutcome::error(format!(
                    "{path} is a symbolic link to `{target}`; write the target instead"
                )));
            }
            Err(e) if e.is_request_error() => {
                return Ok(ToolOutcome::error(e.to_string()));
            }
            Err(e) => return Err(e),
        };
        let created = old.is_none();
        self.write(
            &path,
            &a.content,
            old.as_deref().unwrap_or(""),
            &a.content,
            created,
        )
        .await
    }

    async fn write(
        &self,
        path: &RepoPath,
        content: &str,
        old_str: &str,
        new_str: &str,
        created: bool,
    ) -> Result<ToolOutcome, SandboxError> {
        match self.sandbox.write_file(path, content.as_bytes()).await {
            Ok(()) => {}
            Err(e) if e.is_request_error() => {
                return Ok(ToolOutcome::error(e.to_string()));
            }
            Err(e) => return Err(e),
        }
        self.observer.event(EventKind::ToolEdit {
            filepath: path.as_str().to_owned(),
            old_str: cap(old_str),
            new_str: cap(new_str),
        });
        Ok(ToolOutcome::ok(if created {
            format!("Created {path}.")
        } else {
            format!("Updated {path}.")
        }))
    }

    async fn run_command(&self, a: CommandArgs) -> Result<ToolOutcome, SandboxError> {
        if a.command.trim().is_empty() {
            return Ok(ToolOutcome::error("command is empty"));
        }
        let timeout = a
            .timeout_secs
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_COMMAND_TIMEOUT)
            .min(MAX_COMMAND_TIMEOUT);
        let out = self
            .sandbox
            .exec(&ExecRequest::new(a.command.clone()).timeout(timeout))
            .await?;
        let output = out.combined();
        self.observer.event(EventKind::ToolBash {
            command: cap(&a.command),
            output: truncate_middle(&output, MODEL_OUTPUT_CAP).0,
            exit_code: out.exit_code,
        });
        let mut content = truncate_middle(&output, MODEL_OUTPUT_CAP).0;
        if out.timed_out {
            content.push_str(&format!(
                "\n[killed: timed out after {} s]",
                timeout.as_secs()
            ));
        }
        Ok(ToolOutcome {
            content: format!("exit code {}\n{content}", out.exit_code),
            is_error: !out.success(),
            finish: None,
        })
    }
}

fn occurrence_lines(text: &str, needle: &str) -> Vec<usize> {
    text.match_indices(needle)
        .map(|(i, _)| text[..i].matches('\n').count() + 1)
        .take(10)
        .collect()
}

/// Points the model at the lines most like the first line of `old_str`, the usual cause being
/// different whitespace or a stale view of the file.
fn closest_lines(text: &str, old_str: &str) -> String {
    let Some(probe) = old_str.lines().map(str::trim).find(|l| !l.is_empty()) else {
        return "old_str has only whitespace.".into();
    };
    let probe_grams = bigrams(probe);
    let mut scored: Vec<(f64, usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(i, line)| {
            let trimmed = line.trim();
            let score = if trimmed == probe {
                2.0
            } else {
                dice(&probe_grams, &bigrams(trimmed))
            };
            (score, i + 1, line)
        })
        .filter(|(score, _, _)| *score > 0.5)
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    if scored.is_empty() {
        return "No line of the file resembles its first line; read the file again before editing."
            .into();
    }
    let shown: Vec<String> = scored
        .iter()
        .take(3)
        .map(|(_, n, line)| format!("{n}\t{}", truncate_middle(line, 200).0))
        .collect();
    format!(
        "The closest lines are (check whitespace and indentation):\n{}",
        shown.join("\n")
    )
}

fn bigrams(s: &str) -> Vec<(char, char)> {
    let chars: Vec<char> = s.chars().collect();
    let mut grams: Vec<(char, char)> = chars.windows(2).map(|w| (w[0], w[1])).collect();
    grams.sort_unstable();
    grams
}

fn dice(a: &[(char, char)], b: &[(char, char)]) -> f64 {
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    let (mut i, mut j, mut common) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Equal => {
                common += 1;
                i += 1;
                j += 1;
            }
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
        }
    }
    2.0 * common as f64 / (a.len() + b.len()) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closest_lines_finds_whitespace_differences() {
        let text = "fn main() {\n    println!(\"hi\");\n}\n";
        let hint = closest_lines(text, "println!(\"hi\");  ");
        assert!(hint.contains("2\t    println!(\"hi\");"), "{hint}");
    }

    #[test]
    fn occurrences_are_reported_by_line() {
        assert_eq!(occurrence_lines("a\nx\nb\nx\n", "x"), vec![2, 4]);
    }
}
