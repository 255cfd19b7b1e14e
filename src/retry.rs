//! Retrying calls to services that fail transiently, one engine for every layer.
//!
//! Each layer keeps its own idea of which failures deserve another attempt (a model provider, the
//! E2B control plane and GitHub disagree on that) and says so through [`Retryable`]; this module
//! owns the rest: how long to wait ([`RetryPolicy`]: exponential backoff with jitter, or what the
//! server asked for), how to read the servers' wait headers, and the loop itself
//! ([`with_retries`], bounded by a count, or [`with_retries_until`], bounded by a deadline).
//!
//! Waiting uses [`tokio::time::sleep`], so tests drive it with `tokio::time::pause()`.

use std::fmt::Display;
use std::future::Future;
use std::time::{Duration, SystemTime};

use rand::Rng;
use reqwest::header::HeaderMap;
use tokio::time::Instant;

/// A server asking for longer than this is sending garbage, not a retry hint.
const MAX_SANE_WAIT: Duration = Duration::from_secs(86_400);

/// GitHub: a secondary rate limit without `retry-after` means "wait at least one minute".
pub const SECONDARY_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);

/// How many times to retry and how long to wait in between.
///
/// The defaults mirror the official model SDKs: two retries, exponential backoff from 0.5 s up
/// to 8 s with up to 25 % jitter, and a server-requested wait honoured up to a minute. Other
/// layers build their own (see `sandbox::e2b::Timing` and the GitHub forge).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (so `max_retries + 1` attempts in all).
    pub max_retries: u32,
    /// The backoff before the first retry; it doubles for each later one.
    pub initial_backoff: Duration,
    /// The backoff never exceeds this.
    pub max_backoff: Duration,
    /// A server asking for a longer wait than this is not waited for: the error is returned at
    /// once, so the caller (the next provider, the job's own error) can act instead of idling.
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

    /// How long to wait before retry number `retry` when the server asked for `requested` (or
    /// nothing), or `None` when the request must not be waited for (longer than
    /// [`RetryPolicy::max_retry_after`]).
    pub fn delay(&self, retry: u32, requested: Option<Duration>) -> Option<Duration> {
        match requested {
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

/// What a failed attempt says about the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryVerdict {
    /// Worth another attempt: after `after` when the server asked for a wait, else after the
    /// policy's backoff.
    Retry { after: Option<Duration> },
    /// Repeating cannot help, or is not safe.
    Stop,
}

/// An error that knows whether the attempt that produced it may be repeated. Each layer
/// implements it for its own error (or a small wrapper carrying the server's hint).
pub trait Retryable {
    fn verdict(&self) -> RetryVerdict;
}

/// Runs `attempt` until it succeeds, fails with a [`RetryVerdict::Stop`] error, asks for a wait
/// longer than the policy allows, or has failed `policy.max_retries + 1` times; returns its last
/// result. Each retry counts in `tb_retries_total` under `layer` (`model`, `e2b`, `github`).
pub async fn with_retries<T, E, F, Fut>(
    policy: &RetryPolicy,
    layer: &'static str,
    mut attempt: F,
) -> Result<T, E>
where
    E: Retryable + Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut retry = 0u32;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let requested = match error.verdict() {
            RetryVerdict::Stop => return Err(error),
            RetryVerdict::Retry { after } => after,
        };
        if retry >= policy.max_retries {
            return Err(error);
        }
        let Some(wait) = policy.delay(retry, requested) else {
            tracing::warn!(
                retry_after_ms = requested.map(|d| d.as_millis() as u64),
                error = %error,
                "the server asked for a longer wait than the policy allows; giving up"
            );
            return Err(error);
        };
        tracing::info!(
            retry = retry + 1,
            wait_ms = wait.as_millis() as u64,
            error = %error,
            "retrying"
        );
        crate::telemetry::retry(layer);
        tokio::time::sleep(wait).await;
        retry += 1;
    }
}

/// The retries of one operation bounded by a deadline rather than a count: after each failure it
/// says how long to wait before the next attempt, or that there is no time left for one. The
/// policy's backoff (and `max_retry_after`) applies; `max_retries` does not.
#[derive(Debug, Clone)]
pub struct Deadline<'a> {
    policy: &'a RetryPolicy,
    /// The `tb_retries_total` label.
    layer: &'static str,
    until: Instant,
    retry: u32,
}

impl<'a> Deadline<'a> {
    pub fn new(policy: &'a RetryPolicy, layer: &'static str, until: Instant) -> Self {
        Self {
            policy,
            layer,
            until,
            retry: 0,
        }
    }

    /// When the operation must be over.
    pub fn until(&self) -> Instant {
        self.until
    }

    /// The wait before the next attempt after a failure with `verdict`, or `None` when there is
    /// none: the failure is final, the server asked for longer than the policy allows, or the
    /// wait would end past the deadline.
    pub fn next_wait(&mut self, verdict: RetryVerdict) -> Option<Duration> {
        let requested = match verdict {
            RetryVerdict::Stop => return None,
            RetryVerdict::Retry { after } => after,
        };
        let wait = self.policy.delay(self.retry, requested)?;
        if Instant::now() + wait >= self.until {
            return None;
        }
        self.retry = self.retry.saturating_add(1);
        crate::telemetry::retry(self.layer);
        Some(wait)
    }
}

/// Runs `attempt` until it succeeds, fails with a [`RetryVerdict::Stop`] error, or the wait
/// before another attempt would end past `until` (see [`Deadline`]); returns its last result.
/// An attempt already under way is not cut short by the deadline: each has its own bound.
pub async fn with_retries_until<T, E, F, Fut>(
    policy: &RetryPolicy,
    layer: &'static str,
    until: Instant,
    mut attempt: F,
) -> Result<T, E>
where
    E: Retryable + Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut deadline = Deadline::new(policy, layer, until);
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let Some(wait) = deadline.next_wait(error.verdict()) else {
            return Err(error);
        };
        tracing::info!(
            wait_ms = wait.as_millis() as u64,
            error = %error,
            "retrying before the step's deadline"
        );
        tokio::time::sleep(wait).await;
    }
}

/// An explicit yes/no header such as Anthropic's `x-should-retry` or E2B's `Should-Retry`, when
/// the server sent a recognisable value.
pub fn explicit_retry(headers: &HeaderMap, name: &str) -> Option<bool> {
    let value = header_str(headers, name)?;
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

/// Until an exhausted rate limit resets: `x-ratelimit-remaining: 0` with `x-ratelimit-reset` in
/// epoch seconds (GitHub's primary limit). `None` while requests remain, or without a usable
/// reset time.
pub fn rate_limit_reset(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let remaining = header_str(headers, "x-ratelimit-remaining")?
        .parse::<u64>()
        .ok()?;
    if remaining != 0 {
        return None;
    }
    let reset = header_str(headers, "x-ratelimit-reset")?
        .parse::<u64>()
        .ok()?;
    let reset = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(reset))?;
    let wait = reset.duration_since(now).unwrap_or(Duration::ZERO);
    (wait <= MAX_SANE_WAIT).then_some(wait)
}

/// How long a rate-limited answer asks us to wait, following GitHub's guidance: `retry-after`
/// when present; else, when the limit is exhausted, until `x-ratelimit-reset`; else, for a
/// `secondary` limit, at least [`SECONDARY_RATE_LIMIT_WAIT`]. `None` when nothing says.
pub fn rate_limit_wait(headers: &HeaderMap, now: SystemTime, secondary: bool) -> Option<Duration> {
    retry_after(headers, now)
        .or_else(|| rate_limit_reset(headers, now))
        .or(secondary.then_some(SECONDARY_RATE_LIMIT_WAIT))
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

fn seconds(secs: f64) -> Option<Duration> {
    if secs.is_finite() && (0.0..=MAX_SANE_WAIT.as_secs_f64()).contains(&secs) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    /// A test error: its verdict and a label for the last-error checks.
    #[derive(Debug, Clone, PartialEq)]
    struct Failed(RetryVerdict, String);

    impl Display for Failed {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.1)
        }
    }

    impl Retryable for Failed {
        fn verdict(&self) -> RetryVerdict {
            self.0
        }
    }

    fn retry_after_secs(secs: Option<u64>) -> Failed {
        Failed(
            RetryVerdict::Retry {
                after: secs.map(Duration::from_secs),
            },
            "slow down".into(),
        )
    }

    const NOW: u64 = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(NOW)
    }

    #[test]
    fn retry_after_forms() {
        let now = now();
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
    fn explicit_retry_headers() {
        let h = headers(&[("should-retry", "TRUE"), ("x-should-retry", "false")]);
        assert_eq!(explicit_retry(&h, "should-retry"), Some(true));
        assert_eq!(explicit_retry(&h, "x-should-retry"), Some(false));
        let h = headers(&[("should-retry", "maybe")]);
        assert_eq!(explicit_retry(&h, "should-retry"), None);
        assert_eq!(explicit_retry(&HeaderMap::new(), "should-retry"), None);
    }

    #[test]
    fn an_exhausted_rate_limit_waits_for_its_reset() {
        let now = now();
        let reset = (NOW + 90).to_string();
        let h = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &reset),
        ]);
        assert_eq!(rate_limit_reset(&h, now), Some(Duration::from_secs(90)));
        assert_eq!(
            rate_limit_wait(&h, now, false),
            Some(Duration::from_secs(90))
        );
        // A reset in the past: go now.
        let past = (NOW - 5).to_string();
        let h = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", &past)]);
        assert_eq!(rate_limit_reset(&h, now), Some(Duration::ZERO));
        // Requests left, no reset, or garbage: nothing to wait for.
        for h in [
            headers(&[
                ("x-ratelimit-remaining", "12"),
                ("x-ratelimit-reset", &reset),
            ]),
            headers(&[("x-ratelimit-remaining", "0")]),
            headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "soon"),
            ]),
            headers(&[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset", "99999999999"),
            ]),
        ] {
            assert_eq!(rate_limit_reset(&h, now), None, "{h:?}");
            assert_eq!(rate_limit_wait(&h, now, false), None, "{h:?}");
        }
    }

    #[test]
    fn rate_limit_wait_prefers_retry_after_then_the_reset_then_a_minute() {
        let now = now();
        let reset = (NOW + 90).to_string();
        let h = headers(&[
            ("retry-after", "7"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", &reset),
        ]);
        assert_eq!(rate_limit_wait(&h, now, true), Some(Duration::from_secs(7)));
        let h = headers(&[("x-ratelimit-remaining", "3")]);
        assert_eq!(
            rate_limit_wait(&h, now, true),
            Some(SECONDARY_RATE_LIMIT_WAIT)
        );
        assert_eq!(rate_limit_wait(&h, now, false), None);
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
        let result = with_retries(&RetryPolicy::default(), "test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    Err(retry_after_secs(Some(7)))
                } else {
                    Ok("done")
                }
            }
        })
        .await;
        assert_eq!(result, Ok("done"));
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
        let result: Result<(), _> = with_retries(&policy, "test", || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Err(Failed(
                    RetryVerdict::Retry { after: None },
                    format!("overloaded {n}"),
                ))
            }
        })
        .await;
        assert_eq!(result.unwrap_err().1, "overloaded 2");
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
        let _: Result<(), _> =
            with_retries(&policy, "test", || async { Err(retry_after_secs(None)) }).await;
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(375) && waited <= Duration::from_millis(500),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_verdicts_are_not_retried() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result: Result<(), _> = with_retries(&RetryPolicy::default(), "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(Failed(RetryVerdict::Stop, "bad key".into())) }
        })
        .await;
        assert_eq!(result.unwrap_err().1, "bad key");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_absurd_retry_after_falls_through_at_once() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let result: Result<(), _> = with_retries(&RetryPolicy::default(), "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(retry_after_secs(Some(3600))) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_bounds_the_retries_not_a_count() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let policy = RetryPolicy {
            max_retries: 0,
            jitter: 0.0,
            ..RetryPolicy::default()
        };
        // Waits of 0.5, 1, 2 and 4 s fit in 10 s; the next (8 s) would end past it.
        let until = start + Duration::from_secs(10);
        let result: Result<(), _> = with_retries_until(&policy, "test", until, || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                Err(Failed(
                    RetryVerdict::Retry { after: None },
                    format!("down {n}"),
                ))
            }
        })
        .await;
        assert_eq!(result.unwrap_err().1, "down 4");
        assert_eq!(calls.load(Ordering::SeqCst), 5);
        assert_eq!(
            start.elapsed(),
            Duration::from_millis(500 + 1000 + 2000 + 4000)
        );

        // A success within the deadline ends it; a server's wait is honoured exactly.
        calls.store(0, Ordering::SeqCst);
        let start = tokio::time::Instant::now();
        let result = with_retries_until(&policy, "test", start + Duration::from_secs(10), || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(retry_after_secs(Some(3)))
                } else {
                    Ok("done")
                }
            }
        })
        .await;
        assert_eq!(result, Ok("done"));
        assert_eq!(start.elapsed(), Duration::from_secs(6));

        // A wait that would end past the deadline is not started, nor is a Stop retried.
        let mut deadline = Deadline::new(
            &policy,
            "test",
            tokio::time::Instant::now() + Duration::from_secs(2),
        );
        assert_eq!(
            deadline.next_wait(RetryVerdict::Retry {
                after: Some(Duration::from_secs(3))
            }),
            None
        );
        assert_eq!(deadline.next_wait(RetryVerdict::Stop), None);
        assert_eq!(
            deadline.next_wait(RetryVerdict::Retry { after: None }),
            Some(Duration::from_millis(500))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_retries_means_one_attempt() {
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = with_retries(&RetryPolicy::none(), "test", || {
            calls.fetch_add(1, Ordering::SeqCst);
            async { Err(retry_after_secs(None)) }
        })
        .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
