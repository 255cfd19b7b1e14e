//! E2B's control plane (`X-API-Key`): create, renew, look up and kill sandboxes, with retries
//! where repeating is safe.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::envd::{read_error_body, transport_error};
use super::{Secret, Timing};
use crate::retry::{RetryVerdict, Retryable, with_retries};
use crate::sandbox::SandboxError;

/// Metadata naming the job a sandbox belongs to.
pub const JOB_METADATA: &str = "tiny_backspace_job";
/// Metadata naming the create call that started a sandbox (its idempotency key), so that
/// sandboxes started by attempts whose answer was lost can be found.
pub const CREATE_METADATA: &str = "tiny_backspace_create";

/// What `POST /v2/sandboxes` returned.
#[derive(Debug, Clone)]
pub struct Created {
    pub sandbox_id: String,
    pub access_token: Option<Secret>,
    /// The sandbox's own domain, when it differs from the configured one.
    pub domain: Option<String>,
    pub envd_version: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SandboxBody {
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(default)]
    envd_access_token: Option<String>,
    #[serde(default)]
    domain: Option<String>,
    #[serde(default)]
    envd_version: String,
}

/// One failed control-plane attempt: the error, and whether (and when) it may be repeated.
#[derive(Debug)]
struct ApiFailure {
    error: SandboxError,
    verdict: RetryVerdict,
}

impl ApiFailure {
    fn retry(error: SandboxError, after: Option<Duration>) -> Self {
        Self {
            error,
            verdict: RetryVerdict::Retry { after },
        }
    }
}

impl Retryable for ApiFailure {
    fn verdict(&self) -> RetryVerdict {
        self.verdict
    }
}

impl fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.error.fmt(f)
    }
}

/// Decides whether a control-plane answer is worth repeating, as the official SDK does:
/// `Should-Retry` wins when present, otherwise 429 and 5xx other than 501; the wait is the
/// server's `Retry-After` when it sent one.
fn answer_verdict(status: u16, headers: &reqwest::header::HeaderMap) -> RetryVerdict {
    let retry = crate::retry::explicit_retry(headers, "should-retry")
        .unwrap_or(status == 429 || (status >= 500 && status != 501));
    if retry {
        RetryVerdict::Retry {
            after: crate::retry::retry_after(headers, SystemTime::now()),
        }
    } else {
        RetryVerdict::Stop
    }
}

/// The list query for running or paused sandboxes carrying `metadata`. As the official SDK
/// sends it, the `metadata` parameter is a URL-encoded `k=v&…` whose keys and values are
/// percent-encoded first, and the whole is encoded once more as a query value. One page of 100
/// is plenty: one create call starts at most a handful.
fn list_query(metadata: &[(&str, &str)]) -> String {
    let mut filter = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in metadata {
        filter.append_pair(&percent_encode(key), &percent_encode(value));
    }
    url::form_urlencoded::Serializer::new(String::new())
        .append_pair("metadata", &filter.finish())
        .append_pair("state", "running,paused")
        .append_pair("limit", "100")
        .finish()
}

/// Percent-encodes everything but RFC 3986's unreserved characters and `/` (Python's
/// `urllib.parse.quote`, which the SDK applies to metadata keys and values).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// The control-plane client.
#[derive(Clone)]
pub struct ControlPlane {
    pub http: reqwest::Client,
    pub base: String,
    pub key: Secret,
    pub timing: Timing,
}

impl ControlPlane {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .header("X-API-Key", self.key.expose())
            .timeout(self.timing.request_timeout)
    }

    /// `POST /v2/sandboxes`, repeated after transient failures with the same idempotency key,
    /// so that a repeat after a lost answer does not start a second sandbox where E2B
    /// deduplicates.
    ///
    /// An attempt whose answer was lost (a broken connection, a gateway error, a 2xx we could not
    /// read) may still have started a sandbox we never learned the id of. Every sandbox this call
    /// asks for carries the key in its metadata, so afterwards, whatever the outcome, those
    /// sandboxes other than the one returned are found by it and killed instead of running until
    /// their lifetime ends.
    pub async fn create(
        &self,
        template: &str,
        ttl: Duration,
        job_id: &str,
    ) -> Result<Created, SandboxError> {
        let idempotency_key = format!("tb-{}", uuid::Uuid::new_v4());
        let body = serde_json::json!({
            "templateID": template,
            // Always sent: without it the v1 API kills the sandbox after 15 s.
            "timeout": ttl.as_secs().max(1),
            "metadata": {
                JOB_METADATA: job_id,
                CREATE_METADATA: idempotency_key,
            },
            "envVars": {},
        });
        let unsure = AtomicBool::new(false);
        let attempt = || async {
            let sent = self
                .request(reqwest::Method::POST, "/v2/sandboxes")
                .header("Idempotency-Key", &idempotency_key)
                .json(&body)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => {
                    // A connection never made carried no request; anything later may have.
                    if !e.is_connect() {
                        unsure.store(true, Ordering::SeqCst);
                    }
                    return Err(ApiFailure::retry(
                        transport_error("creating an E2B sandbox", &e),
                        None,
                    ));
                }
            };
            let status = response.status();
            if status.is_success() {
                let read = match response.bytes().await {
                    Ok(bytes) => serde_json::from_slice::<SandboxBody>(&bytes)
                        .map_err(|e| format!("an unreadable body ({e})")),
                    Err(e) => Err(format!("a body that broke off ({e})")),
                };
                return match read {
                    Ok(created) => Ok(Created {
                        sandbox_id: created.sandbox_id,
                        access_token: created
                            .envd_access_token
                            .filter(|t| !t.is_empty())
                            .map(Secret::new),
                        domain: created.domain.filter(|d| !d.is_empty()),
                        envd_version: created.envd_version,
                    }),
                    Err(what) => {
                        unsure.store(true, Ordering::SeqCst);
                        Err(ApiFailure::retry(
                            SandboxError::Transport {
                                message: format!(
                                    "E2B answered the create request ({status}) with {what}"
                                ),
                                retryable: true,
                            },
                            None,
                        ))
                    }
                };
            }
            if matches!(status.as_u16(), 500 | 502 | 504) {
                // The create may have gone through behind a failing gateway.
                unsure.store(true, Ordering::SeqCst);
            }
            let verdict = answer_verdict(status.as_u16(), response.headers());
            let retry = matches!(verdict, RetryVerdict::Retry { .. });
            let text = read_error_body(response).await;
            let error = match status.as_u16() {
                401 | 403 => SandboxError::Create(format!(
                    "E2B refused the API key ({status}: {text}); check E2B_API_KEY"
                )),
                404 => SandboxError::Create(format!(
                    "E2B does not know template `{template}` ({text}); check E2B_TEMPLATE"
                )),
                400 | 409 | 422 => SandboxError::Create(format!(
                    "E2B refused to create a sandbox ({status}): {text}"
                )),
                429 => SandboxError::Transport {
                    message: format!("E2B is rate-limiting sandbox creation: {text}"),
                    retryable: true,
                },
                _ => SandboxError::Transport {
                    message: format!("E2B could not create a sandbox ({status}): {text}"),
                    retryable: retry,
                },
            };
            Err(ApiFailure { error, verdict })
        };
        let outcome = with_retries(&self.timing.retry, "e2b", attempt)
            .await
            .map_err(|f| f.error);
        if unsure.load(Ordering::SeqCst) {
            let keep = outcome.as_ref().ok().map(|c| c.sandbox_id.as_str());
            self.kill_strays(job_id, &idempotency_key, keep).await;
        }
        outcome
    }

    /// Kills the sandboxes started by the create call tagged `create_key`, except `keep`.
    /// Best effort: what cannot be found or killed ends at its lifetime.
    async fn kill_strays(&self, job_id: &str, create_key: &str, keep: Option<&str>) {
        let found = match self.list_ids(&[(CREATE_METADATA, create_key)]).await {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "could not look for sandboxes started by a create whose answer was lost; they end at their lifetime");
                return;
            }
        };
        let strays: Vec<String> = found
            .into_iter()
            .filter(|id| Some(id.as_str()) != keep)
            .collect();
        let mut killed = 0usize;
        for id in &strays {
            match self.kill(id).await {
                Ok(_) => killed += 1,
                Err(e) => {
                    tracing::warn!(job_id, sandbox_id = %id, error = %e, "could not kill a sandbox started by a lost create answer")
                }
            }
        }
        tracing::info!(
            job_id,
            found = strays.len(),
            killed,
            "looked for sandboxes started by create attempts whose answer was lost"
        );
    }

    /// `GET /v2/sandboxes?metadata=…`: the ids of running or paused sandboxes whose metadata
    /// holds every pair in `metadata`.
    pub async fn list_ids(&self, metadata: &[(&str, &str)]) -> Result<Vec<String>, SandboxError> {
        #[derive(Deserialize)]
        struct Listed {
            #[serde(rename = "sandboxID")]
            sandbox_id: String,
        }
        let path = format!("/v2/sandboxes?{}", list_query(metadata));
        let what = "listing sandboxes";
        let attempt = || async {
            let response = match self.request(reqwest::Method::GET, &path).send().await {
                Ok(response) => response,
                Err(e) => return Err(ApiFailure::retry(transport_error(what, &e), None)),
            };
            let status = response.status();
            if status.is_success() {
                let read = match response.bytes().await {
                    Ok(bytes) => serde_json::from_slice::<Vec<Listed>>(&bytes)
                        .map_err(|e| format!("an unreadable list ({e})")),
                    Err(e) => Err(format!("a list that broke off ({e})")),
                };
                return match read {
                    Ok(listed) => Ok(listed.into_iter().map(|l| l.sandbox_id).collect()),
                    Err(what_went_wrong) => Err(ApiFailure::retry(
                        SandboxError::Transport {
                            message: format!("{what}: E2B answered with {what_went_wrong}"),
                            retryable: true,
                        },
                        None,
                    )),
                };
            }
            let verdict = answer_verdict(status.as_u16(), response.headers());
            let text = read_error_body(response).await;
            let error = SandboxError::Transport {
                message: format!("{what}: E2B answered {status}: {text}"),
                retryable: matches!(verdict, RetryVerdict::Retry { .. }),
            };
            Err(ApiFailure { error, verdict })
        };
        with_retries(&self.timing.retry, "e2b", attempt)
            .await
            .map_err(|f| f.error)
    }

    /// `DELETE /sandboxes/{id}`. `Ok(false)` when E2B no longer knew it.
    pub async fn kill(&self, sandbox_id: &str) -> Result<bool, SandboxError> {
        let path = format!("/sandboxes/{sandbox_id}");
        self.idempotent(reqwest::Method::DELETE, &path, None, "killing the sandbox")
            .await
    }

    /// `POST /sandboxes/{id}/timeout`: the sandbox now lives `ttl` from now.
    pub async fn set_timeout(&self, sandbox_id: &str, ttl: Duration) -> Result<(), SandboxError> {
        let path = format!("/sandboxes/{sandbox_id}/timeout");
        let body = serde_json::json!({ "timeout": ttl.as_secs().max(1) });
        let existed = self
            .idempotent(
                reqwest::Method::POST,
                &path,
                Some(&body),
                "extending the sandbox's lifetime",
            )
            .await?;
        if existed {
            Ok(())
        } else {
            Err(SandboxError::Gone(format!(
                "E2B no longer knows sandbox {sandbox_id} (it was killed or timed out)"
            )))
        }
    }

    /// `GET /sandboxes/{id}`: whether E2B still has the sandbox.
    pub async fn exists(&self, sandbox_id: &str) -> Result<bool, SandboxError> {
        let path = format!("/sandboxes/{sandbox_id}");
        self.idempotent(reqwest::Method::GET, &path, None, "looking up the sandbox")
            .await
    }

    /// A request that may be repeated freely. `Ok(false)` on 404.
    async fn idempotent(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
        what: &str,
    ) -> Result<bool, SandboxError> {
        let attempt = || async {
            let mut request = self.request(method.clone(), path);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => return Err(ApiFailure::retry(transport_error(what, &e), None)),
            };
            let status = response.status();
            if status.is_success() {
                return Ok(true);
            }
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(false);
            }
            let verdict = answer_verdict(status.as_u16(), response.headers());
            let text = read_error_body(response).await;
            let message = match status.as_u16() {
                401 | 403 => format!("{what}: E2B refused the API key ({status}): {text}"),
                _ => format!("{what}: E2B answered {status}: {text}"),
            };
            let error = SandboxError::Transport {
                message,
                retryable: matches!(verdict, RetryVerdict::Retry { .. }),
            };
            Err(ApiFailure { error, verdict })
        };
        with_retries(&self.timing.retry, "e2b", attempt)
            .await
            .map_err(|f| f.error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn the_metadata_filter_is_encoded_twice() {
        assert_eq!(
            list_query(&[("tiny_backspace_create", "tb-1"), ("k", "a b&c")]),
            // What the SDK sends for the same filter (`quote`, `urlencode`, then the query).
            "metadata=tiny_backspace_create%3Dtb-1%26k%3Da%252520b%252526c&state=running%2Cpaused&limit=100"
        );
    }

    #[test]
    fn control_plane_answers_are_classified_like_the_sdk() {
        let none = HeaderMap::new();
        for status in [429, 500, 502, 503, 504] {
            assert_eq!(
                answer_verdict(status, &none),
                RetryVerdict::Retry { after: None },
                "{status}"
            );
        }
        for status in [400, 401, 403, 404, 409, 422, 501] {
            assert_eq!(
                answer_verdict(status, &none),
                RetryVerdict::Stop,
                "{status}"
            );
        }
        // `Should-Retry` overrides the status either way.
        assert_eq!(
            answer_verdict(503, &headers(&[("should-retry", "false")])),
            RetryVerdict::Stop
        );
        assert_eq!(
            answer_verdict(409, &headers(&[("should-retry", "true")])),
            RetryVerdict::Retry { after: None }
        );
        // The server's wait comes along.
        assert_eq!(
            answer_verdict(429, &headers(&[("retry-after", "2")])),
            RetryVerdict::Retry {
                after: Some(Duration::from_secs(2))
            }
        );
    }
}
