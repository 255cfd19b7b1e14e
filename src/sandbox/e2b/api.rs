//! E2B's control plane (`X-API-Key`): create, renew, look up and kill sandboxes, with retries
//! where repeating is safe.

use std::time::Duration;

use serde::Deserialize;

use super::envd::{read_error_body, transport_error};
use super::{Secret, Timing};
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

/// Outcome of one attempt, for [`with_retries`].
pub enum Attempt<T> {
    Done(T),
    /// Worth another try, after the server's `Retry-After` if it sent one.
    Retry(SandboxError, Option<Duration>),
    Fail(SandboxError),
}

/// Runs `op` until it succeeds, fails for good, or has been retried `timing.max_retries`
/// times, backing off exponentially with jitter (capped at 10 s).
pub async fn with_retries<T, F, Fut>(timing: &Timing, mut op: F) -> Result<T, SandboxError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Attempt<T>>,
{
    let mut attempt = 0u32;
    loop {
        match op().await {
            Attempt::Done(value) => return Ok(value),
            Attempt::Fail(error) => return Err(error),
            Attempt::Retry(error, after) => {
                if attempt >= timing.max_retries {
                    return Err(error);
                }
                let wait = after.unwrap_or_else(|| backoff(timing.retry_base, attempt));
                tracing::debug!(attempt, wait_ms = wait.as_millis() as u64, error = %error, "retrying an E2B request");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// `base · 2^attempt`, capped at 10 s, times a random factor in [0.5, 1).
pub fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.min(16));
    let capped = exp.min(Duration::from_secs(10));
    capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Decides whether a control-plane answer is worth repeating: `Should-Retry` wins when present
/// (as in the official SDK), otherwise 429 and 5xx other than 501.
fn retry_hint(response: &reqwest::Response) -> (bool, Option<Duration>) {
    let headers = response.headers();
    let should = headers
        .get("should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.eq_ignore_ascii_case("true"));
    let status = response.status().as_u16();
    let retry = should.unwrap_or(status == 429 || (status >= 500 && status != 501));
    let after = headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(10.0)));
    (retry, after)
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
        let timing = self.timing.clone();
        with_retries(&timing, || async {
            let sent = self
                .request(reqwest::Method::POST, "/v2/sandboxes")
                .header("Idempotency-Key", &idempotency_key)
                .json(&body)
                .send()
                .await;
            let response = match sent {
                Ok(response) => response,
                Err(e) => {
                    return Attempt::Retry(transport_error("creating an E2B sandbox", &e), None);
                }
            };
            let status = response.status();
            if status.is_success() {
                return match response.json::<SandboxBody>().await {
                    Ok(created) => Attempt::Done(Created {
                        sandbox_id: created.sandbox_id,
                        access_token: created
                            .envd_access_token
                            .filter(|t| !t.is_empty())
                            .map(Secret::new),
                        domain: created.domain.filter(|d| !d.is_empty()),
                        envd_version: created.envd_version,
                    }),
                    Err(e) => Attempt::Fail(SandboxError::Create(format!(
                        "E2B answered the create request with an unreadable body: {e}"
                    ))),
                };
            }
            let (retry, after) = retry_hint(&response);
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
            if retry {
                Attempt::Retry(error, after)
            } else {
                Attempt::Fail(error)
            }
        })
        .await
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
        with_retries(&self.timing, || async {
            let mut request = self.request(method.clone(), path);
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(e) => return Attempt::Retry(transport_error(what, &e), None),
            };
            let status = response.status();
            if status.is_success() {
                return Attempt::Done(true);
            }
            if status == reqwest::StatusCode::NOT_FOUND {
                return Attempt::Done(false);
            }
            let (retry, after) = retry_hint(&response);
            let text = read_error_body(response).await;
            let message = match status.as_u16() {
                401 | 403 => format!("{what}: E2B refused the API key ({status}): {text}"),
                _ => format!("{what}: E2B answered {status}: {text}"),
            };
            let error = SandboxError::Transport {
                message,
                retryable: retry,
            };
            if retry {
                Attempt::Retry(error, after)
            } else {
                Attempt::Fail(error)
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let base = Duration::from_millis(100);
        assert!(backoff(base, 0) <= Duration::from_millis(100));
        assert!(backoff(base, 0) >= Duration::from_millis(50));
        assert!(backoff(base, 3) >= Duration::from_millis(400));
        assert!(backoff(base, 30) <= Duration::from_secs(10));
    }
}
