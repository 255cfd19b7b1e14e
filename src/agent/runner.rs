//! The agent loop: ask the model for a turn, run its tool calls, answer them all, repeat, until it
//! calls `finish` or a budget runs out.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::chain::ProviderChain;
use super::observer::{Observer, add_usage};
use super::provider::{Provider, ProviderError, StopReason, TextSink, ToolSpec};
use super::tools::{Finish, ToolExecutor};
use super::transcript::{Message, Part, Role, Transcript, joined_text};
use crate::event::{EventKind, Usage};
use crate::redact::Redactor;
use crate::sandbox::SandboxError;
use crate::text::truncate_middle;

/// Budgets of one agent run.
#[derive(Debug, Clone)]
pub struct AgentLimits {
    pub max_turns: u32,
    /// Input + output tokens over the whole run.
    pub max_tokens: u64,
    /// Wall time of the whole run, tool calls included. The pipeline shortens it to what the job
    /// has left, minus a reserve for collecting and publishing the change.
    pub max_wall: Duration,
    /// Transcript size (characters) above which old tool outputs are shortened.
    pub context_chars: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_turns: 60,
            max_tokens: 3_000_000,
            max_wall: Duration::from_secs(20 * 60),
            context_chars: 400_000,
        }
    }
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEnd {
    /// The model called `finish`.
    Finished,
    /// The model stopped without calling `finish`.
    Stopped,
    /// A budget ran out; the string names it.
    Budget(String),
    /// The wall-time budget ran out (the job's deadline, less its publishing reserve).
    OutOfTime(Duration),
    /// The model repeated the same call with the same result.
    Loop,
    /// The model declined the request.
    Refused(String),
}

#[derive(Debug, Clone)]
pub struct AgentOutcome {
    pub end: AgentEnd,
    pub finish: Option<Finish>,
    /// Last text the model wrote (a summary when it did not call `finish`).
    pub last_text: String,
    pub used_dummy: bool,
    pub fell_back: bool,
    pub usage: Vec<Usage>,
    pub transcript: Transcript,
}

impl AgentOutcome {
    /// True when the work stopped before the model said it was done.
    pub fn partial(&self) -> bool {
        !matches!(self.end, AgentEnd::Finished)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("every model provider failed: {0}")]
    Provider(#[from] ProviderError),
}

/// Collects streamed text and emits it as `AI Message` events a line at a time.
struct AiText {
    observer: Arc<dyn Observer>,
    buffer: Mutex<(String, String)>,
}

impl AiText {
    fn flush(&self) {
        let mut guard = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let (provider, text) = &mut *guard;
        if !text.trim().is_empty() {
            self.observer.event(EventKind::AiMessage {
                message: std::mem::take(text),
                provider: provider.clone(),
            });
        }
        text.clear();
    }
}

impl TextSink for AiText {
    fn text_delta(&self, provider: &str, delta: &str) {
        let mut guard = self.buffer.lock().unwrap_or_else(|e| e.into_inner());
        let (current, text) = &mut *guard;
        if current != provider && !text.is_empty() {
            let message = std::mem::take(text);
            self.observer.event(EventKind::AiMessage {
                message,
                provider: current.clone(),
            });
        }
        *current = provider.to_owned();
        text.push_str(delta);
        // Emit whole lines as they complete.
        if let Some(cut) = text.rfind('\n')
            && cut + 1 >= 80
        {
            let rest = text.split_off(cut + 1);
            let message = std::mem::replace(text, rest);
            self.observer.event(EventKind::AiMessage {
                message,
                provider: provider.to_owned(),
            });
        }
    }
}

pub struct AgentRunner<'a> {
    pub chain: ProviderChain,
    pub tools: &'a ToolExecutor,
    pub specs: Vec<ToolSpec>,
    pub limits: AgentLimits,
    pub observer: Arc<dyn Observer>,
    /// Scrubs configured secrets out of every tool result before the model sees it. The sandbox
    /// should hold no secret at all; this is the second line of defence.
    pub redactor: Redactor,
}

impl AgentRunner<'_> {
    pub async fn run(mut self, mut transcript: Transcript) -> Result<AgentOutcome, AgentError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.limits.max_wall;
        let max_wall = self.limits.max_wall;
        let out_of_time = || AgentEnd::OutOfTime(max_wall);
        let sink = AiText {
            observer: self.observer.clone(),
            buffer: Mutex::new((String::new(), String::new())),
        };
        let mut usage: Vec<Usage> = Vec::new();
        let mut total_tokens = 0u64;
        let mut repeats = RepeatDetector::default();
        let mut nudged = false;
        let mut last_text = String::new();
        let mut end = None;
        let mut finish = None;

        for _turn in 0..self.limits.max_turns {
            if started.elapsed() >= self.limits.max_wall {
                end = Some(out_of_time());
                break;
            }
            if total_tokens >= self.limits.max_tokens {
                end = Some(AgentEnd::Budget(format!(
                    "the token budget of {} tokens ran out",
                    self.limits.max_tokens
                )));
                break;
            }
            shorten_old_tool_outputs(&mut transcript, self.limits.context_chars);
            let next = tokio::time::timeout_at(
                deadline,
                self.chain
                    .next_turn(&transcript, &self.specs, &sink, self.observer.as_ref()),
            )
            .await;
            sink.flush();
            let (turn, provider) = match next {
                Ok(result) => result?,
                Err(_) => {
                    end = Some(out_of_time());
                    break;
                }
            };
            self.observer
                .usage(provider.name(), provider.model(), turn.usage);
            add_usage(&mut usage, provider.name(), provider.model(), turn.usage);
            total_tokens += turn.usage.input_tokens + turn.usage.output_tokens;

            let text = joined_text(&turn.content);
            if !text.trim().is_empty() {
                last_text = text;
            }
            let calls: Vec<(String, String, serde_json::Value, Option<String>)> = turn
                .content
                .iter()
                .filter_map(|p| match p {
                    Part::ToolCall {
                        id,
                        name,
                        arguments,
                        raw_arguments,
                    } => Some((
                        id.clone(),
                        name.clone(),
                        arguments.clone(),
                        raw_arguments.clone(),
                    )),
                    _ => None,
                })
                .collect();
            transcript.messages.push(Message {
                role: Role::Assistant,
                content: turn.content,
            });

            if calls.is_empty() {
                match turn.stop {
                    StopReason::PauseTurn => continue,
                    StopReason::MaxTokens => {
                        push_user_text(
                            &mut transcript,
                            "Your reply was cut off at the output token limit. Continue, in smaller steps.",
                        );
                        continue;
                    }
                    StopReason::Refusal => {
                        end = Some(AgentEnd::Refused(if last_text.is_empty() {
                            "the model declined the request".into()
                        } else {
                            last_text.clone()
                        }));
                        break;
                    }
                    StopReason::ContextWindowExceeded => {
                        let before = transcript_chars(&transcript);
                        shorten_old_tool_outputs(&mut transcript, before / 2);
                        if transcript_chars(&transcript) >= before {
                            end = Some(AgentEnd::Budget(
                                "the conversation no longer fits the model's context window".into(),
                            ));
                            break;
                        }
                        continue;
                    }
                    StopReason::EndTurn | StopReason::ToolUse => {
                        if nudged {
                            end = Some(AgentEnd::Stopped);
                            break;
                        }
                        nudged = true;
                        push_user_text(
                            &mut transcript,
                            "If the change is complete, call the finish tool with a pull request title and summary; otherwise continue working with the tools.",
                        );
                        continue;
                    }
                }
            }

            // Answer every call of the turn, in order, in one user message.
            let mut results = Vec::with_capacity(calls.len());
            let mut looping = false;
            for (id, name, arguments, raw) in &calls {
                if end.is_some() {
                    // Out of time: the remaining calls are answered without running them, so the
                    // transcript stays well-formed for whoever continues it.
                    results.push(Part::ToolResult {
                        call_id: id.clone(),
                        content: "Not run: the agent's time budget ran out.".into(),
                        is_error: true,
                    });
                    continue;
                }
                let executed = tokio::time::timeout_at(
                    deadline,
                    self.tools.execute(name, arguments, raw.as_deref()),
                )
                .await;
                let mut outcome = match executed {
                    Ok(result) => result?,
                    Err(_) => {
                        end = Some(out_of_time());
                        results.push(Part::ToolResult {
                            call_id: id.clone(),
                            content: "Interrupted: the agent's time budget ran out.".into(),
                            is_error: true,
                        });
                        continue;
                    }
                };
                if !self.redactor.is_empty() {
                    outcome.content = self.redactor.redact(&outcome.content);
                }
                match repeats.observe(name, arguments, &outcome.content) {
                    n if n >= 5 => looping = true,
                    n if n >= 3 => outcome.content.push_str(&format!(
                        "\n\n[You have made this exact call {n} times with the same result. Try a different approach.]"
                    )),
                    _ => {}
                }
                if let Some(f) = outcome.finish.take() {
                    finish = Some(f);
                }
                results.push(Part::ToolResult {
                    call_id: id.clone(),
                    content: outcome.content,
                    is_error: outcome.is_error,
                });
            }
            transcript.messages.push(Message {
                role: Role::User,
                content: results,
            });
            if end.is_some() {
                break;
            }
            if finish.is_some() {
                end = Some(AgentEnd::Finished);
                break;
            }
            if looping {
                end = Some(AgentEnd::Loop);
                break;
            }
        }
        sink.flush();
        let end = end.unwrap_or_else(|| {
            AgentEnd::Budget(format!(
                "the turn budget of {} turns ran out",
                self.limits.max_turns
            ))
        });
        Ok(AgentOutcome {
            end,
            finish,
            last_text,
            used_dummy: self.chain.on_dummy(),
            fell_back: self.chain.fell_back(),
            usage,
            transcript,
        })
    }
}

fn push_user_text(transcript: &mut Transcript, text: &str) {
    transcript.messages.push(Message {
        role: Role::User,
        content: vec![Part::Text { text: text.into() }],
    });
}

fn transcript_chars(t: &Transcript) -> usize {
    t.system.len()
        + t.messages
            .iter()
            .flat_map(|m| &m.content)
            .map(|p| match p {
                Part::Text { text } => text.len(),
                Part::ToolCall { arguments, .. } => arguments.to_string().len(),
                Part::ToolResult { content, .. } => content.len(),
                Part::Opaque { value, .. } => value.to_string().len(),
            })
            .sum::<usize>()
}

/// Tool results kept whole at the end of the conversation.
const KEEP_RECENT_RESULTS: usize = 6;
const SHORTENED_RESULT: usize = 600;

/// Shortens all but the most recent tool outputs until the transcript fits `budget` characters.
fn shorten_old_tool_outputs(t: &mut Transcript, budget: usize) {
    if transcript_chars(t) <= budget {
        return;
    }
    let total_results = t
        .messages
        .iter()
        .flat_map(|m| &m.content)
        .filter(|p| matches!(p, Part::ToolResult { .. }))
        .count();
    let mut seen = 0;
    for message in &mut t.messages {
        for part in &mut message.content {
            if let Part::ToolResult { content, .. } = part {
                seen += 1;
                if seen + KEEP_RECENT_RESULTS > total_results {
                    return;
                }
                if content.len() > SHORTENED_RESULT {
                    let (short, _) = truncate_middle(content, SHORTENED_RESULT);
                    *content = format!("{short}\n[older tool output shortened to save context]");
                }
            }
        }
    }
}

/// Counts how many times in a row the same call produced the same result.
#[derive(Default)]
struct RepeatDetector {
    last: Option<(String, String)>,
    count: u32,
}

impl RepeatDetector {
    fn observe(&mut self, name: &str, args: &serde_json::Value, result: &str) -> u32 {
        let key = (format!("{name}{args}"), result.to_owned());
        if self.last.as_ref() == Some(&key) {
            self.count += 1;
        } else {
            self.last = Some(key);
            self.count = 1;
        }
        self.count
    }
}

/// The system prompt: the repository, the tools and the expected finish.
pub fn system_prompt(repo: &str, base_branch: &str) -> String {
    format!(
        "You are Tiny Backspace, a careful software engineer. You work in a checkout of the git repository {repo} \
(branch `{base_branch}`) inside an isolated sandbox without network access. Your job is to make the change the user asks \
for, as a small, reviewable diff that will become a pull request.\n\n\
How to work:\n\
- Explore first: list_files, search and read_file. Read a file before editing it.\n\
- Change files with edit_file (exact, unique old_str) or write_file for new files. Keep the existing style.\n\
- Use run_command to build or run the project's tests when that is cheap; there is no network, so do not install packages.\n\
- Paths are relative to the repository root. `.git` is off limits.\n\
- Tool errors are for you to fix: read the message and adjust.\n\
- When the change is complete, call finish with a pull request title (imperative mood, under 72 characters) and a summary \
of what changed and why, for reviewers. Do not commit or push: Tiny Backspace does that."
    )
}

/// Wraps the shared pieces a runner needs.
pub fn new_runner<'a>(
    providers: Vec<Arc<dyn Provider>>,
    retry: super::retry::RetryPolicy,
    tools: &'a ToolExecutor,
    limits: AgentLimits,
    observer: Arc<dyn Observer>,
    redactor: Redactor,
) -> AgentRunner<'a> {
    AgentRunner {
        chain: ProviderChain::new(providers, retry),
        tools,
        specs: super::tools::specs(),
        limits,
        observer,
        redactor,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::observer::Recorder;
    use crate::agent::provider::{TokenUsage, Turn};
    use crate::sandbox::FixedSandbox;
    use async_trait::async_trait;

    struct Finisher;

    #[async_trait]
    impl Provider for Finisher {
        fn name(&self) -> &str {
            "scripted"
        }
        fn model(&self) -> &str {
            "m1"
        }
        async fn complete(
            &self,
            _: &Transcript,
            _: &[ToolSpec],
            text: &dyn TextSink,
        ) -> Result<Turn, ProviderError> {
            text.text_delta("scripted", "All done.");
            Ok(Turn {
                content: vec![
                    Part::Text {
                        text: "All done.".into(),
                    },
                    Part::ToolCall {
                        id: "c1".into(),
                        name: "finish".into(),
                        arguments: serde_json::json!({"title": "T", "summary": "S"}),
                        raw_arguments: None,
                    },
                ],
                stop: StopReason::ToolUse,
                usage: TokenUsage {
                    input_tokens: 10,
                    output_tokens: 3,
                },
            })
        }
    }

    /// The loop reports through its own observer: no job, no event log.
    #[tokio::test]
    async fn the_loop_reports_text_and_usage_to_its_observer() {
        let recorder = Arc::new(Recorder::default());
        let tools = ToolExecutor::new(
            Arc::new(FixedSandbox { exec_output: None }),
            recorder.clone(),
        );
        let runner = new_runner(
            vec![Arc::new(Finisher)],
            super::super::retry::RetryPolicy::none(),
            &tools,
            AgentLimits::default(),
            recorder.clone(),
            Redactor::default(),
        );
        let outcome = runner
            .run(Transcript::new("sys", "do it"))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome.end, AgentEnd::Finished);
        assert_eq!(
            recorder.events(),
            vec![EventKind::AiMessage {
                message: "All done.".into(),
                provider: "scripted".into(),
            }]
        );
        assert_eq!(
            recorder.usage(),
            vec![Usage {
                provider: "scripted".into(),
                model: "m1".into(),
                input_tokens: 10,
                output_tokens: 3,
            }]
        );
    }

    #[test]
    fn repeats_are_counted_per_identical_call_and_result() {
        let mut d = RepeatDetector::default();
        let args = serde_json::json!({"path": "a"});
        assert_eq!(d.observe("read_file", &args, "x"), 1);
        assert_eq!(d.observe("read_file", &args, "x"), 2);
        assert_eq!(d.observe("read_file", &args, "y"), 1);
    }

    #[test]
    fn old_tool_outputs_are_shortened_first() {
        let mut t = Transcript::new("sys", "req");
        for i in 0..10 {
            t.messages.push(Message {
                role: Role::User,
                content: vec![Part::ToolResult {
                    call_id: i.to_string(),
                    content: "x".repeat(10_000),
                    is_error: false,
                }],
            });
        }
        shorten_old_tool_outputs(&mut t, 50_000);
        let sizes: Vec<usize> = t
            .messages
            .iter()
            .flat_map(|m| &m.content)
            .filter_map(|p| match p {
                Part::ToolResult { content, .. } => Some(content.len()),
                _ => None,
            })
            .collect();
        assert!(sizes[..4].iter().all(|s| *s < 1000), "{sizes:?}");
        assert!(sizes[4..].iter().all(|s| *s == 10_000), "{sizes:?}");
    }
}
