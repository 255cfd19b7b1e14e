//! Retrying one provider: which failures deserve another attempt.
//!
//! Providers make exactly one attempt and classify their failure ([`FailureKind`]); this module
//! turns HTTP statuses and the servers' retry headers into that classification, and the shared
//! engine ([`crate::retry`], re-exported here) repeats an attempt while it stays
//! [`FailureKind::Retryable`]. When the retries run out, the last error is returned and the
//! fallback chain moves to the next provider with the same transcript.

use std::time::SystemTime;

use reqwest::header::HeaderMap;

pub use crate::retry::{RetryPolicy, RetryVerdict, Retryable, retry_after, with_retries};

use super::provider::{FailureKind, ProviderError};

impl Retryable for ProviderError {
    /// A retryable provider error waits for what the server asked (`retry-after-ms`,
    /// `retry-after`) when it said; a fallback error goes straight to the next provider.
    fn verdict(&self) -> RetryVerdict {
        match self.kind {
            FailureKind::Retryable => RetryVerdict::Retry {
                after: self.retry_after,
            },
            FailureKind::Fallback => RetryVerdict::Stop,
        }
    }
}

/// Whether an HTTP status deserves another attempt: 408, 409, 429 and every 5xx (529 included),
/// as the official SDKs decide. Auth failures (401, 403) and other client errors do not.
pub fn status_is_retryable(status: u16) -> bool {
    matches!(status, 408 | 409 | 429) || (500..=599).contains(&status)
}

/// Classifies a failed HTTP response from its status and headers. `x-should-retry: true|false`
/// overrides the status; the wait comes from `retry-after-ms` or `retry-after`.
pub fn classify_http(status: u16, headers: &HeaderMap, message: String) -> ProviderError {
    let retryable = match crate::retry::explicit_retry(headers, "x-should-retry") {
        Some(explicit) => explicit,
        None => status_is_retryable(status),
    };
    ProviderError {
        kind: if retryable {
            FailureKind::Retryable
        } else {
            FailureKind::Fallback
        },
        status: Some(status),
        message,
        retry_after: retry_after(headers, SystemTime::now()),
    }
}

/// A failure to reach the server or to read its answer: the connection was refused, timed out,
/// or dropped mid-stream. Always worth retrying. The message never includes the URL's query or
/// any header, so no key can leak through it.
pub fn transport_error(context: &str, error: &reqwest::Error) -> ProviderError {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "could not connect"
    } else if error.is_body() || error.is_decode() {
        "the response body broke off"
    } else {
        "request failed"
    };
    let mut source = String::new();
    let mut cause: Option<&dyn std::error::Error> = std::error::Error::source(error);
    while let Some(inner) = cause {
        source = inner.to_string();
        cause = inner.source();
    }
    let message = if source.is_empty() {
        format!("{context}: {what}")
    } else {
        format!("{context}: {what} ({source})")
    };
    ProviderError {
        status: error.status().map(|s| s.as_u16()),
        ..ProviderError::retryable(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::provider::{StopReason, TokenUsage, Turn};
    use reqwest::header::HeaderValue;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn turn() -> Turn {
        Turn {
            content: vec![],
            stop: StopReason::EndTurn,
            usage: TokenUsage::default(),
        }
    }

    #[test]
    fn statuses_are_classified_like_the_sdks() {
        for status in [408, 409, 429, 500, 502, 503, 504, 529] {
            let e = classify_http(status, &HeaderMap::new(), String::new());
            assert_eq!(e.kind, FailureKind::Retryable, "{status}");
        }
        for status in [400, 401, 402, 403, 404, 413, 422] {
            let e = classify_http(status, &HeaderMap::new(), String::new());
            assert_eq!(e.kind, FailureKind::Fallback, "{status}");
        }
    }

    #[test]
    fn x_should_retry_overrides_the_status() {
        let no = headers(&[("x-should-retry", "false")]);
        assert_eq!(
            classify_http(529, &no, String::new()).kind,
            FailureKind::Fallback
        );
        let yes = headers(&[("x-should-retry", "true")]);
        assert_eq!(
            classify_http(400, &yes, String::new()).kind,
            FailureKind::Retryable
        );
    }

    #[test]
    fn the_verdict_carries_the_servers_wait() {
        let h = headers(&[("retry-after-ms", "250")]);
        let e = classify_http(429, &h, String::new());
        assert_eq!(
            e.verdict(),
            RetryVerdict::Retry {
                after: Some(Duration::from_millis(250))
            }
        );
        assert_eq!(
            classify_http(401, &h, String::new()).verdict(),
            RetryVerdict::Stop
        );
    }

    #[tokio::test(start_paused = true)]
    async fn provider_errors_drive_the_shared_engine() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result = with_retries(&RetryPolicy::default(), "model", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                match n {
                    0 => Err(ProviderError {
                        retry_after: Some(Duration::from_secs(7)),
                        status: Some(429),
                        ..ProviderError::retryable("slow down")
                    }),
                    _ => Ok(turn()),
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), turn());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(7));

        let calls = AtomicU32::new(0);
        let result: Result<Turn, _> = with_retries(&RetryPolicy::default(), "model", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async {
                Err(ProviderError {
                    status: Some(401),
                    ..ProviderError::fallback("bad key")
                })
            }
        })
        .await;
        assert_eq!(result.unwrap_err().status, Some(401));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
