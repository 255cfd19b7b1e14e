//! The dummy agent: a deterministic [`Provider`] that needs no network.
//!
//! It goes through the same loop and tools as a real model, so its events are real `Tool: Read`
//! and `Tool: Edit` events and its change is a real, reviewable diff. It understands three literal
//! requests and otherwise records the request in a clearly named file:
//!
//! - `create [a] [new] file PATH with [the] text|content "TEXT"`
//! - `append "TEXT" to PATH`
//! - `replace "OLD" with "NEW" in PATH`
//!
//! Quotes may be `"…"`, `'…'` or `` `…` ``.

use async_trait::async_trait;
use serde_json::json;

use super::provider::{Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn};
use super::transcript::{Part, Transcript};

/// The file the dummy agent writes when it does not understand the request.
pub const REQUEST_FILE: &str = "TINY_BACKSPACE_REQUEST.md";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Plan {
    Create {
        path: String,
        text: String,
    },
    Append {
        path: String,
        text: String,
    },
    Replace {
        path: String,
        old: String,
        new: String,
    },
    Record {
        request: String,
    },
}

#[derive(Debug, Default)]
pub struct DummyProvider;

#[async_trait]
impl Provider for DummyProvider {
    fn name(&self) -> &str {
        "dummy"
    }

    fn model(&self) -> &str {
        "dummy"
    }

    async fn complete(
        &self,
        transcript: &Transcript,
        _tools: &[ToolSpec],
        text: &dyn TextSink,
    ) -> Result<Turn, ProviderError> {
        let plan = plan(transcript.request());
        let done = transcript.tool_exchanges();
        let steps = steps(&plan);
        // A failed step ends the run with an honest summary instead of pressing on.
        if let Some((name, _, result, true)) = done.last() {
            let summary =
                format!("The dummy agent could not complete the request: {name} failed: {result}");
            return Ok(say_and_call(
                text,
                &summary,
                "finish",
                json!({
                    "title": "Dummy agent: request not completed",
                    "summary": summary,
                }),
                done.len(),
            ));
        }
        let Some((intro, tool, args)) = steps.into_iter().nth(done.len()) else {
            return Ok(Turn {
                content: vec![Part::Text {
                    text: "Done.".into(),
                }],
                stop: StopReason::EndTurn,
                usage: TokenUsage::default(),
            });
        };
        Ok(say_and_call(text, &intro, tool, args, done.len()))
    }
}

fn say_and_call(
    text: &dyn TextSink,
    message: &str,
    tool: &str,
    arguments: serde_json::Value,
    step: usize,
) -> Turn {
    text.text_delta("dummy", message);
    Turn {
        content: vec![
            Part::Text {
                text: message.to_owned(),
            },
            Part::ToolCall {
                id: format!("dummy-{step}"),
                name: tool.to_owned(),
                arguments,
                raw_arguments: None,
            },
        ],
        stop: StopReason::ToolUse,
        usage: TokenUsage::default(),
    }
}

/// The tool calls that carry out a plan, each with what the agent says before it.
fn steps(plan: &Plan) -> Vec<(String, &'static str, serde_json::Value)> {
    match plan {
        Plan::Create { path, text } => vec![
            (
                format!("Creating {path}."),
                "write_file",
                json!({"path": path, "content": with_newline(text)}),
            ),
            finish(
                format!("Create {path}"),
                format!("Created `{path}` with the requested text."),
            ),
        ],
        Plan::Append { path, text } => vec![
            (
                format!("Reading {path} before appending to it."),
                "read_file",
                json!({"path": path}),
            ),
            (
                format!("Appending the text to {path}."),
                "edit_file",
                json!({"path": path, "old_str": "", "new_str": with_newline(text)}),
            ),
            finish(
                format!("Append to {path}"),
                format!("Appended the requested text to `{path}`."),
            ),
        ],
        Plan::Replace { path, old, new } => vec![
            (
                format!("Reading {path}."),
                "read_file",
                json!({"path": path}),
            ),
            (
                format!("Replacing the text in {path}."),
                "edit_file",
                json!({"path": path, "old_str": old, "new_str": new}),
            ),
            finish(
                format!("Replace text in {path}"),
                format!("Replaced `{old}` with `{new}` in `{path}`."),
            ),
        ],
        Plan::Record { request } => vec![
            (
                "Looking at the repository.".into(),
                "list_files",
                json!({"path": "", "depth": 1}),
            ),
            (
                format!("No model is configured, so I am recording the request in {REQUEST_FILE}."),
                "write_file",
                json!({"path": REQUEST_FILE, "content": record(request)}),
            ),
            finish(
                "Record a change request".into(),
                format!(
                    "No model provider was available, so the request was recorded in `{REQUEST_FILE}` for a person to carry out."
                ),
            ),
        ],
    }
}

fn finish(title: String, summary: String) -> (String, &'static str, serde_json::Value) {
    (
        "Finishing.".into(),
        "finish",
        json!({"title": title, "summary": summary}),
    )
}

fn with_newline(text: &str) -> String {
    if text.ends_with('\n') {
        text.to_owned()
    } else {
        format!("{text}\n")
    }
}

fn record(request: &str) -> String {
    format!(
        "# Change request\n\nTiny Backspace ran without a model provider (no ANTHROPIC_API_KEY or OPENAI_API_KEY),\nso its dummy agent recorded this request instead of carrying it out:\n\n> {}\n",
        request.trim().replace('\n', "\n> ")
    )
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Quoted(String),
}

fn tokenize(input: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    let mut chars = input.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if matches!(c, '"' | '\'' | '`' | '“') {
            chars.next();
            let close = if c == '“' { '”' } else { c };
            let mut text = String::new();
            for ch in chars.by_ref() {
                if ch == close {
                    break;
                }
                text.push(ch);
            }
            tokens.push(Token::Quoted(unescape(&text)));
        } else {
            let mut word = String::new();
            while let Some(&ch) = chars.peek() {
                if ch.is_whitespace() {
                    break;
                }
                word.push(ch);
                chars.next();
            }
            tokens.push(Token::Word(word));
        }
    }
    tokens
}

fn unescape(text: &str) -> String {
    text.replace("\\n", "\n").replace("\\t", "\t")
}

fn is(token: Option<&Token>, words: &[&str]) -> bool {
    matches!(token, Some(Token::Word(w)) if words.iter().any(|x| w.eq_ignore_ascii_case(x)))
}

/// A path-like word, with trailing sentence punctuation removed.
fn path_of(token: Option<&Token>) -> Option<String> {
    let raw = match token? {
        Token::Word(w) | Token::Quoted(w) => w,
    };
    let path = raw.trim_end_matches(['.', ',', ';', ':', '!', '?']);
    (!path.is_empty()).then(|| path.to_owned())
}

fn quoted(token: Option<&Token>) -> Option<String> {
    match token? {
        Token::Quoted(q) => Some(q.clone()),
        Token::Word(_) => None,
    }
}

fn plan(request: &str) -> Plan {
    parse(&tokenize(request)).unwrap_or_else(|| Plan::Record {
        request: request.to_owned(),
    })
}

fn parse(t: &[Token]) -> Option<Plan> {
    let mut i = 0;
    let at = |i: usize| t.get(i);
    if is(at(0), &["create", "add", "make"]) {
        i += 1;
        while is(at(i), &["a", "new", "the"]) {
            i += 1;
        }
        if !is(at(i), &["file"]) {
            return None;
        }
        i += 1;
        if is(at(i), &["named", "called"]) {
            i += 1;
        }
        let path = path_of(at(i))?;
        i += 1;
        if !is(at(i), &["with", "containing"]) {
            return None;
        }
        i += 1;
        while is(at(i), &["the", "text", "content", "contents"]) {
            i += 1;
        }
        let text = quoted(at(i))?;
        return Some(Plan::Create { path, text });
    }
    if is(at(0), &["append"]) {
        let text = quoted(at(1))?;
        if !is(at(2), &["to"]) {
            return None;
        }
        let path = path_of(at(3))?;
        return Some(Plan::Append { path, text });
    }
    if is(at(0), &["replace", "change"]) {
        let old = quoted(at(1))?;
        if !is(at(2), &["with", "to"]) {
            return None;
        }
        let new = quoted(at(3))?;
        if !is(at(4), &["in"]) {
            return None;
        }
        let path = path_of(at(5))?;
        return Some(Plan::Replace { path, old, new });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn understands_the_literal_requests() {
        assert_eq!(
            plan("Create a file hello.txt with the text \"Hello, world\""),
            Plan::Create {
                path: "hello.txt".into(),
                text: "Hello, world".into()
            }
        );
        assert_eq!(
            plan("append 'one more line' to notes/todo.md."),
            Plan::Append {
                path: "notes/todo.md".into(),
                text: "one more line".into()
            }
        );
        assert_eq!(
            plan("Replace `foo()` with `bar()` in src/lib.rs"),
            Plan::Replace {
                path: "src/lib.rs".into(),
                old: "foo()".into(),
                new: "bar()".into()
            }
        );
    }

    #[test]
    fn records_anything_else() {
        assert_eq!(
            plan("Add input validation to all POST endpoints"),
            Plan::Record {
                request: "Add input validation to all POST endpoints".into()
            }
        );
        assert!(record("two\nlines").contains("> two\n> lines"));
    }
}
