//! E2B's control plane (`X-API-Key`): create, renew, look up and kill sandboxes, with retries
//! where repeating is safe.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Deserialize;

use super::envd::{read_error_body, transport_error};
use super::{Secret, Timing};
use crate::retry::{RetryVerdict, Retryable, with_retries};
use crate::sandbox::SandboxError;

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

    fn stop(error: SandboxError) -> Self {
        Self {
            error,
            verdict: RetryVerdict::Stop,
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

    /// `POST /v2/sandboxes`. The idempotency key is the same for every retry, so that a retry
    /// after a lost answer does not start a second sandbox.
    pub async fn create(
        &self,
        template: &str,
        ttl: Duration,
        job_id: &str,
    ) -> Result<Created, SandboxError> {
        let body = serde_json::json!({
            "templateID": template,
            // Always sent: without it the v1 API kills the sandbox after 15 s.
            "timeout": ttl.as_secs().max(1),
            "metadata": { "tiny_backspace_job": job_id },
            "envVars": {},
        });
        let idempotency_key = format!("tb-{}", uuid::Uuid::new_v4());
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
                    return Err(ApiFailure::retry(
                        transport_error("creating an E2B sandbox", &e),
                        None,
                    ));
                }
            };
            let status = response.status();
            if status.is_success() {
                return match response.json::<SandboxBody>().await {
                    Ok(created) => Ok(Created {
                        sandbox_id: created.sandbox_id,
                        access_token: created
                            .envd_access_token
                            .filter(|t| !t.is_empty())
                            .map(Secret::new),
                        domain: created.domain.filter(|d| !d.is_empty()),
                        envd_version: created.envd_version,
                    }),
                    Err(e) => Err(ApiFailure::stop(SandboxError::Create(format!(
                        "E2B answered the create request with an unreadable body: {e}"
                    )))),
                };
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
        with_retries(&self.timing.retry, attempt)
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
        with_retries(&self.timing.retry, attempt)
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
