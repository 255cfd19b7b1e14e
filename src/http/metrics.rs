//! `GET /metrics` (the Prometheus text format) and the middleware that counts HTTP requests.
//!
//! The route is guarded by `METRICS_TOKEN` when it is set (a scraper then needs no API key), and
//! otherwise by `API_KEYS` like every other route.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::PrometheusHandle;

use super::AppState;
use super::error::ApiError;
use super::handlers::{key_matches, presented_key, unauthorized};

/// What `/metrics` serves, and who may read it.
#[derive(Clone, Default)]
pub struct MetricsAccess {
    /// The installed recorder; `None`: the route answers 404 (the process records no metrics).
    pub handle: Option<PrometheusHandle>,
    /// `METRICS_TOKEN`.
    pub token: Option<String>,
}

/// The Prometheus text format.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Every series, in the Prometheus text format", content_type = "text/plain", body = String),
        (status = 401, description = "METRICS_TOKEN or an API key is required", body = super::openapi::ErrorBody),
        (status = 404, description = "This process records no metrics", body = super::openapi::ErrorBody)
    )
)]
pub async fn metrics(State(state): State<Arc<AppState>>, request: Request) -> Response {
    let access = &state.metrics;
    let Some(handle) = &access.handle else {
        return ApiError::not_found("metrics are not recorded by this process").into_response();
    };
    let presented = presented_key(request.headers());
    let allowed = match (&access.token, presented) {
        (Some(token), Some(key)) => {
            key_matches(std::slice::from_ref(token), key) || key_matches(&state.api_keys, key)
        }
        (Some(_), None) => false,
        (None, _) if state.api_keys.is_empty() => true,
        (None, Some(key)) => key_matches(&state.api_keys, key),
        (None, None) => false,
    };
    if !allowed {
        return unauthorized(
            "METRICS_TOKEN or an API key is required (Authorization: Bearer <token>)",
        );
    }
    let load = state.registry.load().await;
    crate::telemetry::jobs_now(load.running, load.queued);
    crate::telemetry::cleanup_pending(state.registry.cleanup_pending());
    (
        StatusCode::OK,
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
        .into_response()
}

/// Counts every request by its route (the pattern, not the path: job ids would make a label
/// per job), method and status, and times it to its response headers.
pub async fn count_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = request.method().as_str().to_owned();
    let response = next.run(request).await;
    crate::telemetry::http_request(
        &route,
        &method,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}
