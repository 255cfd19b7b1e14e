//! Retrying one provider: which failures deserve another attempt, and how long to wait first.
//!
//! Providers make exactly one attempt and classify their failure ([`FailureKind`]); this module
//! turns HTTP statuses and the servers' retry headers into that classification, and
//! [`with_retries`] repeats an attempt while it stays [`FailureKind::Retryable`]. When the retries
//! run out, the last error is returned and the fallback chain moves to the next provider with the
//! same transcript.
//!
//! Waiting uses [`tokio::time::sleep`], so tests drive it with `tokio::time::pause()`.

use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::header::HeaderMap;

use super::provider::{FailureKind, ProviderError};

/// How many times to retry and how long to wait in between.
///
/// The defaults mirror the official SDKs: two retries, exponential backoff from 0.5 s up to 8 s
/// with up to 25 % jitter, and a server-requested wait honoured up to a minute.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// The backoff before the first retry; it doubles for each later one.
    pub initial_backoff: Duration,
    /// The backoff never exceeds this.
    pub max_backoff: Duration,
    /// A server asking for a longer wait than this is not waited for: the error is returned at
    /// once so the next provider can take over.
    pub max_retry_after: Duration,
    /// The fraction (0.0–1.0) by which the computed backoff is randomly shortened, so that many
    /// clients do not retry in lockstep. A server-requested wait is never shortened.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 2,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
            max_retry_after: Duration::from_secs(60),
            jitter: 0.25,
        }
    }
}

impl RetryPolicy {
    /// No retries at all: the first failure is final.
    pub fn none() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

    /// The computed wait before retry number `retry` (0-based), without jitter.
    pub fn backoff(&self, retry: u32) -> Duration {
        let factor = 2u32.saturating_pow(retry.min(30));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// How long to wait before retry number `retry` after `error`, or `None` when the error must
    /// not be waited for (the server asked for longer than [`RetryPolicy::max_retry_after`]).
    fn delay(&self, retry: u32, error: &ProviderError) -> Option<Duration> {
        match error.retry_after {
            Some(wait) if wait > self.max_retry_after => None,
            Some(wait) => Some(wait),
            None => {
                let base = self.backoff(retry);
                let jitter = self.jitter.clamp(0.0, 1.0);
                if jitter == 0.0 {
                    return Some(base);
                }
                let shrink = rand::rng().random_range(0.0..=jitter);
                Some(base.mul_f64(1.0 - shrink))
            }
        }
    }
}

/// Runs `attempt` until it succeeds, fails with a [`FailureKind::Fallback`] error, or has failed
/// `policy.max_retries + 1` times; returns its last result.
///
/// Each retry waits for what the server asked (`retry-after-ms`, `retry-after`) when it said, and
/// for the policy's exponential backoff otherwise.
pub async fn with_retries<T, F, Fut>(
    policy: &RetryPolicy,
    mut attempt: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProviderError>>,
{
    let mut retry = 0u32;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        match error.kind {
            FailureKind::Fallback => return Err(error),
            FailureKind::Retryable => {}
        }
        if retry >= policy.max_retries {
            return Err(error);
        }
        let Some(wait) = policy.delay(retry, &error) else {
            tracing::warn!(
                status = ?error.status,
                retry_after_ms = error.retry_after.map(|d| d.as_millis() as u64),
                "provider asked for a longer wait than the policy allows; giving up on it"
            );
            return Err(error);
        };
        tracing::info!(
            status = ?error.status,
            retry = retry + 1,
            wait_ms = wait.as_millis() as u64,
            error = %error.message,
            "retrying provider"
        );
        tokio::time::sleep(wait).await;
        retry += 1;
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
    let retryable = match should_retry_header(headers) {
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

/// `x-should-retry`, when the server sent a recognisable value.
fn should_retry_header(headers: &HeaderMap) -> Option<bool> {
    let value = headers.get("x-should-retry")?.to_str().ok()?.trim();
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// The wait a server asked for: `retry-after-ms` (milliseconds), else `retry-after` as seconds or
/// as an HTTP date (relative to `now`). Negative, unparsable or absurd values are ignored.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, "retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        return seconds(ms / 1000.0);
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(secs) = value.parse::<f64>() {
        return seconds(secs);
    }
    let when = parse_http_date(value)?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn seconds(secs: f64) -> Option<Duration> {
    // A day is far beyond any sensible retry hint; treat larger values as garbage.
    if secs.is_finite() && (0.0..=86_400.0).contains(&secs) {
        Some(Duration::from_secs_f64(secs))
    } else {
        None
    }
}

/// Parses an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP date format servers
/// may still send.
fn parse_http_date(value: &str) -> Option<SystemTime> {
    let (_weekday, rest) = value.split_once(", ")?;
    let mut fields = rest.split(' ');
    let day: u64 = fields.next()?.parse().ok()?;
    let month = match fields.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: u64 = fields.next()?.parse().ok()?;
    let mut clock = fields.next()?.split(':');
    let hour: u64 = clock.next()?.parse().ok()?;
    let minute: u64 = clock.next()?.parse().ok()?;
    let second: u64 = clock.next()?.parse().ok()?;
    if fields.next()? != "GMT" || fields.next().is_some() || clock.next().is_some() {
        return None;
    }
    if !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 || year < 1970 {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), for years
/// from 1970 on.
fn days_from_civil(year: u64, month: u64, day: u64) -> u64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
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

    fn retryable_after(wait: Option<Duration>) -> ProviderError {
        ProviderError {
            retry_after: wait,
            status: Some(429),
            ..ProviderError::retryable("slow down")
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
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        let h = headers(&[("retry-after", "3")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(3)));
        let h = headers(&[("retry-after", "1.5")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(1500)));
        let h = headers(&[("retry-after", "3"), ("retry-after-ms", "250")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_millis(250)));
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:47 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(10)));
        let h = headers(&[("retry-after", "Sun, 06 Nov 1994 08:49:00 GMT")]);
        assert_eq!(retry_after(&h, now), Some(Duration::ZERO));
        for bad in ["-1", "soon", "Sun, 06 Nov 1994 25:00:00 GMT", "1e12"] {
            let h = headers(&[("retry-after", bad)]);
            assert_eq!(retry_after(&h, now), None, "{bad}");
        }
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn http_dates_after_leap_days() {
        // 2024-03-01 00:00:00 UTC = 1709251200.
        let t = parse_http_date("Fri, 01 Mar 2024 00:00:00 GMT").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_secs(1_709_251_200)
        );
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::default();
        let waits: Vec<_> = (0..6).map(|r| p.backoff(r)).collect();
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000, 8000, 8000].map(Duration::from_millis)
        );
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(8));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured_exactly() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result = with_retries(&RetryPolicy::default(), || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(retryable_after(Some(Duration::from_secs(7))))
                } else {
                    Ok(turn())
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), turn());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(start.elapsed(), Duration::from_secs(7));
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_is_bounded_and_returns_the_last_error() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let policy = RetryPolicy {
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        let result: Result<Turn, _> = with_retries(&policy, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Err(ProviderError {
                    status: Some(529),
                    ..ProviderError::retryable(format!("overloaded {n}"))
                })
            }
        })
        .await;
        let error = result.unwrap_err();
        assert_eq!(error.message, "overloaded 2");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(start.elapsed(), Duration::from_millis(500 + 1000));
    }

    #[tokio::test(start_paused = true)]
    async fn jitter_only_shortens_the_backoff() {
        let start = tokio::time::Instant::now();
        let policy = RetryPolicy {
            max_retries: 1,
            ..RetryPolicy::default()
        };
        let _: Result<Turn, _> =
            with_retries(&policy, || async { Err(retryable_after(None)) }).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(375) && waited <= Duration::from_millis(500),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn fallback_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result: Result<Turn, _> = with_retries(&RetryPolicy::default(), || {
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
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_retry_after_falls_through_at_once() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result: Result<Turn, _> = with_retries(&RetryPolicy::default(), || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(retryable_after(Some(Duration::from_secs(3600)))) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }
}
