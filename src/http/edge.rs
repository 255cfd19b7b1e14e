//! The rules every request meets before a handler: who may send it from where.
//!
//! - With no API key configured, the service trusts whoever reaches it, so it must be sure the
//!   request was meant for it: the `Host` header names one of `ALLOWED_HOSTS` (a DNS-rebinding
//!   page's requests carry its own host name and are refused).
//! - A browser page on another origin may not change state: `POST` and `DELETE` with an `Origin`
//!   that is neither the service itself nor in `CORS_ALLOWED_ORIGINS` are refused.
//! - `POST` bodies must be JSON: `text/plain` and form bodies are what a page can send cross-site
//!   without a preflight, so refusing them closes that door too.
//! - Oversized request heads (too many or too large headers, a too long URI) get the JSON error
//!   shape like every other refusal.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// At most this many request headers…
pub const MAX_HEADERS: usize = 100;
/// …holding at most this many bytes in all.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// The longest request target.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Refuses oversized request heads with the JSON error shape. Applied to every route.
pub async fn limit_head(request: Request, next: Next) -> Response {
    let headers = request.headers();
    let bytes: usize = headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if headers.len() > MAX_HEADERS || bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "headers_too_large",
            format!(
                "the request's headers are too large (at most {MAX_HEADERS} headers and {} KiB)",
                MAX_HEADER_BYTES / 1024
            ),
        )
        .into_response();
    }
    let uri = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "the request target is longer than {} KiB",
                MAX_URI_BYTES / 1024
            ),
        )
        .into_response();
    }
    next.run(request).await
}

/// Reads a request's whole body within `deadline` (in all, not per chunk: a client trickling a
/// byte at a time is never idle, but it does not get to hold the connection), then hands the
/// request on with the body in memory. Bodies are small (64 KiB at most).
pub async fn read_body_within(
    State(deadline): State<std::time::Duration>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let limit = super::MAX_BODY_BYTES;
    match tokio::time::timeout(deadline, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => {
            next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {} KiB", limit / 1024),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "body_timeout",
            format!(
                "the request body did not arrive within {} s",
                deadline.as_secs()
            ),
        )
        .into_response(),
    }
}

pub async fn guard(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match check(&state, request.method(), request.headers(), request.uri()) {
        Ok(()) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

fn check(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    uri: &axum::http::Uri,
) -> Result<(), ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| uri.authority().map(|a| a.to_string()))
        .unwrap_or_default()
        .to_ascii_lowercase();
    if state.api_keys.is_empty()
        && !state.allowed_hosts.is_empty()
        && !state
            .allowed_hosts
            .iter()
            .any(|allowed| host_matches(&host, allowed))
    {
        return Err(ApiError::new(
            StatusCode::MISDIRECTED_REQUEST,
            "host_not_allowed",
            "this service does not answer to that Host; add it to ALLOWED_HOSTS if a proxy forwards it",
        ));
    }
    let changes_state = matches!(
        *method,
        Method::POST | Method::DELETE | Method::PUT | Method::PATCH
    );
    if changes_state
        && let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
        && !origin_allowed(origin, &host, &state.cors_origins)
    {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "requests from this web origin may not change anything here; add it to CORS_ALLOWED_ORIGINS to allow it",
        ));
    }
    if *method == Method::POST {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the body must be JSON, sent with Content-Type: application/json",
            ));
        }
    }
    Ok(())
}

/// `host` (from the request, maybe with a port) names `allowed` (with or without a port).
fn host_matches(host: &str, allowed: &str) -> bool {
    if host == allowed {
        return true;
    }
    strip_port(host) == allowed
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // `[::1]:8000` → `[::1]`
        return match rest.find(']') {
            Some(end) => &host[..end + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// The page is the service itself (same host), or a configured origin.
fn origin_allowed(origin: &str, host: &str, allowed: &[String]) -> bool {
    let origin = origin.trim().to_ascii_lowercase();
    let same_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|authority| authority == host);
    same_host
        || allowed
            .iter()
            .any(|o| o == "*" || o.trim_end_matches('/').eq_ignore_ascii_case(&origin))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_with_or_without_a_port() {
        assert!(host_matches("localhost:8000", "localhost"));
        assert!(host_matches("[::1]:8000", "[::1]"));
        assert!(host_matches("tb.example.com", "tb.example.com"));
        assert!(host_matches("tb.example.com:443", "tb.example.com:443"));
        assert!(!host_matches("evil.example:8000", "localhost"));
        assert!(!host_matches("localhost.evil.example", "localhost"));
    }

    #[test]
    fn origins_are_the_service_itself_or_configured() {
        assert!(origin_allowed(
            "http://localhost:8000",
            "localhost:8000",
            &[]
        ));
        assert!(!origin_allowed(
            "http://evil.example",
            "localhost:8000",
            &[]
        ));
        let allowed = vec!["https://app.example.com".to_owned()];
        assert!(origin_allowed(
            "https://app.example.com",
            "api.example.com",
            &allowed
        ));
        assert!(origin_allowed("https://x.example", "h", &["*".to_owned()]));
    }
}
