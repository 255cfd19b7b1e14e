//! Turning GitHub's answers into [`ForgeError`]s a user can act on.
//!
//! octocrab's `Error` displays only as `GitHub`, so every failure is first reduced to a
//! [`Failure`] (status, message, `errors[]`, the diagnostic headers) and only then worded, with the
//! action that failed, the repository, and what to do about it. The token never reaches this
//! module, and [`Failure::into_forge_error`] is the only place that words messages.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::event::ErrorCode;
use crate::forge::ForgeError;
use crate::retry::{RetryVerdict, Retryable};

/// What a failed call was trying to do, for the message.
#[derive(Debug, Clone)]
pub(super) struct Ctx {
    /// An infinitive phrase: "read the repository", "create the branch".
    pub action: &'static str,
    /// `owner/name` of the repository the call went to.
    pub repo: String,
    /// What the step needs when GitHub does not say (no `X-Accepted-GitHub-Permissions`).
    pub needs: &'static str,
    /// The change touches `.github/workflows/`, so a refused write most likely means the token
    /// lacks the workflow permission.
    pub workflows: bool,
}

impl Ctx {
    pub fn new(action: &'static str, repo: impl Into<String>, needs: &'static str) -> Self {
        Self {
            action,
            repo: repo.into(),
            needs,
            workflows: false,
        }
    }

    pub fn with_workflows(mut self, workflows: bool) -> Self {
        self.workflows = workflows;
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum FailureKind {
    /// GitHub answered with an error status.
    Status(u16),
    /// No answer in time.
    Timeout,
    /// Connection refused, reset, TLS …
    Transport,
    /// An answer we could not read (a model field missing or mistyped).
    Decode,
}

impl FailureKind {
    /// The `outcome` label of `tb_github_requests_total`.
    pub fn label(&self) -> &'static str {
        match self {
            FailureKind::Status(status) if *status >= 500 => "5xx",
            FailureKind::Status(_) => "4xx",
            FailureKind::Timeout => "timeout",
            FailureKind::Transport => "transport",
            FailureKind::Decode => "decode",
        }
    }
}

/// One failed GitHub call, reduced to what the wording needs.
#[derive(Debug, Clone)]
pub(super) struct Failure {
    pub kind: FailureKind,
    pub message: String,
    pub errors: Vec<Value>,
    /// A write whose outcome stays unknown: it may have been carried out, and the read that
    /// would have told failed too.
    pub unsettled: bool,
    /// Boxed to keep `Result<_, Failure>` small.
    headers: Box<Headers>,
}

/// The diagnostic response headers the wording uses.
#[derive(Debug, Clone, Default)]
struct Headers {
    accepted_permissions: Option<String>,
    accepted_scopes: Option<String>,
    ratelimit_remaining: Option<u64>,
    ratelimit_reset: Option<u64>,
    retry_after: Option<u64>,
    /// How long a rate-limited answer asked us to wait (see [`crate::retry::rate_limit_wait`]).
    wait: Option<Duration>,
}

impl Failure {
    pub fn timeout(secs: u64) -> Self {
        Self::plain(
            FailureKind::Timeout,
            format!("no answer within {secs} seconds"),
        )
    }

    fn plain(kind: FailureKind, message: String) -> Self {
        Self {
            kind,
            message,
            errors: Vec::new(),
            unsettled: false,
            headers: Box::default(),
        }
    }

    pub fn from_octocrab(err: octocrab::Error) -> Self {
        match err {
            octocrab::Error::GitHub { source, .. } => {
                let header = |name: &str| {
                    source
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .and_then(|v| v.to_str().ok())
                        .map(|v| v.trim().to_owned())
                        .filter(|v| !v.is_empty())
                };
                let number = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
                let status = source.status_code.as_u16();
                // GitHub answers 429 only for secondary limits; a 403 says so in its message.
                let secondary = status == 429
                    || source
                        .message
                        .to_ascii_lowercase()
                        .contains("secondary rate limit");
                let wait = source.headers.as_ref().and_then(|headers| {
                    crate::retry::rate_limit_wait(headers, SystemTime::now(), secondary)
                });
                Self {
                    kind: FailureKind::Status(source.status_code.as_u16()),
                    message: source.message.clone(),
                    errors: source.errors.clone().unwrap_or_default(),
                    unsettled: false,
                    headers: Box::new(Headers {
                        accepted_permissions: header("x-accepted-github-permissions"),
                        accepted_scopes: header("x-accepted-oauth-scopes"),
                        ratelimit_remaining: number("x-ratelimit-remaining"),
                        ratelimit_reset: source
                            .rate_limit_reset
                            .or_else(|| number("x-ratelimit-reset")),
                        retry_after: number("retry-after"),
                        wait,
                    }),
                }
            }
            octocrab::Error::Json { source, .. } => Self::plain(
                FailureKind::Decode,
                format!(
                    "unexpected answer at `{}`: {}",
                    source.path(),
                    source.inner()
                ),
            ),
            octocrab::Error::Serde { source, .. } => {
                Self::plain(FailureKind::Decode, format!("unexpected answer: {source}"))
            }
            // The remaining variants display without a backtrace (`Service Error: …`,
            // `Hyper Error: …`); never format them with `{:?}`.
            other => Self::plain(FailureKind::Transport, other.to_string()),
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self.kind {
            FailureKind::Status(s) => Some(s),
            FailureKind::Timeout | FailureKind::Transport | FailureKind::Decode => None,
        }
    }

    /// Whether the message or any `errors[]` entry contains `needle` (case-insensitive).
    pub fn mentions(&self, needle: &str) -> bool {
        let needle = needle.to_ascii_lowercase();
        self.message.to_ascii_lowercase().contains(&needle)
            || self
                .errors
                .iter()
                .any(|e| e.to_string().to_ascii_lowercase().contains(&needle))
    }

    pub fn is_rate_limit(&self) -> bool {
        match self.status() {
            Some(429) => true,
            Some(403) => {
                self.headers.ratelimit_remaining == Some(0)
                    || self.headers.retry_after.is_some()
                    || self.mentions("rate limit")
            }
            _ => false,
        }
    }

    /// Whether a write that failed like this may have been carried out all the same: GitHub
    /// answered 5xx, did not answer in time, the connection broke after the request went out, or
    /// the answer could not be read. Such a write is reconciled (its effect looked up) before it
    /// is retried or reported as failed.
    pub fn outcome_unknown(&self) -> bool {
        match self.kind {
            FailureKind::Status(s) => s >= 500,
            FailureKind::Timeout | FailureKind::Transport | FailureKind::Decode => true,
        }
    }

    /// Marks a write whose outcome stays unknown after reconciling failed.
    pub fn unsettled(mut self) -> Self {
        self.unsettled = true;
        self
    }

    /// A 403 or 404 on a write that is neither a rate limit nor about workflows: the token cannot
    /// write to this repository (the fork flow may still work).
    pub fn is_no_write_access(&self) -> bool {
        matches!(self.status(), Some(403 | 404))
            && !self.is_rate_limit()
            && !self.mentions("workflow")
    }

    /// `errors[]` messages (or codes) joined, for 422s.
    fn details(&self) -> String {
        let parts: Vec<String> = self
            .errors
            .iter()
            .filter_map(|e| match e {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| {
                        let field = o.get("field").and_then(Value::as_str)?;
                        let code = o.get("code").and_then(Value::as_str).unwrap_or("invalid");
                        Some(format!("{field} is {code}"))
                    }),
                _ => None,
            })
            .collect();
        parts.join("; ")
    }

    fn github_says(&self) -> String {
        let details = self.details();
        if details.is_empty() || self.message.contains(&details) {
            format!("GitHub: \"{}\"", self.message)
        } else {
            format!("GitHub: \"{}: {details}\"", self.message)
        }
    }

    fn when_it_resets(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if let Some(secs) = self.headers.retry_after {
            return format!("retry after {secs} seconds");
        }
        match self.headers.ratelimit_reset {
            Some(reset) => format!(
                "the limit resets at {} (in {} seconds)",
                format_utc(reset),
                reset.saturating_sub(now)
            ),
            None => "wait a few minutes before retrying".to_owned(),
        }
    }

    /// The permission GitHub says the call needed, else the step's default.
    fn needed(&self, ctx: &Ctx) -> String {
        match (
            &self.headers.accepted_permissions,
            &self.headers.accepted_scopes,
        ) {
            (Some(p), _) => format!("the `{p}` permission"),
            (None, Some(s)) => format!("the `{s}` scope"),
            (None, None) => ctx.needs.to_owned(),
        }
    }

    pub fn into_forge_error(self, ctx: &Ctx) -> ForgeError {
        let (code, message, retryable) = self.word(ctx);
        ForgeError {
            code,
            message,
            retryable,
        }
    }

    fn word(&self, ctx: &Ctx) -> (ErrorCode, String, bool) {
        let Ctx { action, repo, .. } = ctx;
        let workflow = || {
            (
                ErrorCode::GithubWorkflowPermission,
                format!(
                    "GitHub refused to {action} on {repo} because the change touches `.github/workflows/` and the token lacks the `workflow` scope (fine-grained or App token: Workflows: write); {}",
                    self.github_says()
                ),
                false,
            )
        };
        match self.kind {
            FailureKind::Timeout => (
                ErrorCode::GithubTimeout,
                format!(
                    "GitHub did not answer in time while trying to {action} on {repo}; try again"
                ),
                true,
            ),
            FailureKind::Transport => (
                ErrorCode::GithubUnreachable,
                format!(
                    "could not reach GitHub to {action} on {repo}: {}",
                    self.message
                ),
                true,
            ),
            FailureKind::Decode => (
                ErrorCode::GithubBadResponse,
                format!(
                    "GitHub's answer to {action} on {repo} was not understood: {}",
                    self.message
                ),
                false,
            ),
            FailureKind::Status(_) if self.is_rate_limit() => (
                ErrorCode::GithubRateLimited,
                format!(
                    "GitHub's rate limit stopped the request to {action} on {repo}; {} ({})",
                    self.when_it_resets(),
                    self.github_says()
                ),
                true,
            ),
            FailureKind::Status(401) => (
                ErrorCode::GithubUnauthorized,
                format!(
                    "GitHub rejected the token (401) while trying to {action} on {repo}: check that GITHUB_TOKEN is valid and not expired or revoked ({})",
                    self.github_says()
                ),
                false,
            ),
            FailureKind::Status(403 | 404 | 422) if ctx.workflows && self.mentions("workflow") => {
                workflow()
            }
            FailureKind::Status(403) => (
                ErrorCode::GithubForbidden,
                format!(
                    "the token may not {action} on {repo}: it needs {} ({})",
                    self.needed(ctx),
                    self.github_says()
                ),
                false,
            ),
            FailureKind::Status(404) if ctx.workflows => workflow(),
            FailureKind::Status(404) => (
                ErrorCode::GithubNotFound,
                format!(
                    "could not {action}: {repo} does not exist or the token cannot see it (GitHub answers 404 when a token has no access to a private repository or lacks {})",
                    ctx.needs
                ),
                false,
            ),
            FailureKind::Status(409) => (
                ErrorCode::GithubConflict,
                format!(
                    "GitHub refused to {action} on {repo} ({})",
                    self.github_says()
                ),
                false,
            ),
            FailureKind::Status(422) => (
                ErrorCode::GithubValidationFailed,
                format!(
                    "GitHub refused to {action} on {repo} ({})",
                    self.github_says()
                ),
                false,
            ),
            FailureKind::Status(s) if s >= 500 => (
                ErrorCode::GithubUnavailable,
                format!(
                    "GitHub had an internal error ({s}) while trying to {action} on {repo}; try again later"
                ),
                true,
            ),
            FailureKind::Status(s) => (
                ErrorCode::GithubRequestFailed,
                format!(
                    "GitHub answered {s} when asked to {action} on {repo} ({})",
                    self.github_says()
                ),
                false,
            ),
        }
    }
}

impl Retryable for Failure {
    /// GitHub's transient failures: 5xx, a dropped connection, no answer in time, and rate limits
    /// whose wait is known (`retry-after`, the reset of an exhausted limit, a minute for a
    /// secondary limit). An exhausted limit without a reset time is not retried: it lasts up to
    /// an hour. The step's deadline decides whether there is time for another attempt.
    fn verdict(&self) -> RetryVerdict {
        match self.kind {
            FailureKind::Transport | FailureKind::Timeout => RetryVerdict::Retry { after: None },
            FailureKind::Status(s) if s >= 500 => RetryVerdict::Retry { after: None },
            FailureKind::Status(429) => RetryVerdict::Retry {
                after: self.headers.wait,
            },
            FailureKind::Status(403) if self.is_rate_limit() => match self.headers.wait {
                Some(wait) => RetryVerdict::Retry { after: Some(wait) },
                None => RetryVerdict::Stop,
            },
            FailureKind::Status(_) | FailureKind::Decode => RetryVerdict::Stop,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status() {
            Some(status) => write!(f, "{status}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC` for seconds since the epoch.
pub(super) fn format_utc(epoch: u64) -> String {
    let days = (epoch / 86_400) as i64;
    let secs = epoch % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3_600,
        (secs % 3_600) / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_epoch_seconds_as_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(1_709_251_199), "2024-02-29 23:59:59 UTC");
        assert_eq!(format_utc(1_763_769_600), "2025-11-22 00:00:00 UTC");
    }
}
