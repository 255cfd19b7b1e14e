//! The HTTP API (API.md §1): one `Router` built by [`router`], tested in-process.

mod edge;
mod error;
mod events_token;
mod handlers;
mod metrics;
pub mod openapi;
mod server;
mod sse;
mod web;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method, Request, header};
use axum::routing::{get, post};
use axum::{Extension, Router};
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

pub use error::{ApiError, QueryParams};
pub use server::{EdgeLimits, raise_descriptor_limit, serve};
pub use sse::sse_frame;

use crate::job::JobRegistry;
use crate::repo::RepoPolicy;

/// The one route that accepts an events token instead of an API key.
const EVENTS_ROUTE: &str = "/jobs/{id}/events";

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What the handlers share.
pub struct AppState {
    pub registry: Arc<JobRegistry>,
    pub repo_policy: RepoPolicy,
    /// Accepted service keys; empty means the API is open.
    pub api_keys: Vec<String>,
    /// Keys that see and cancel every job; each is also in `api_keys`.
    pub admin_api_keys: Vec<String>,
    /// `Host` values accepted when no key is configured; empty means unchecked.
    pub allowed_hosts: Vec<String>,
    pub cors_origins: Vec<String>,
    /// `GET /metrics`: the recorder and its token.
    pub metrics: MetricsAccess,
}

pub use metrics::MetricsAccess;

pub fn router(state: Arc<AppState>) -> Router {
    let cors = cors_layer(&state.cors_origins);
    let protected = Router::new()
        .route("/code", post(handlers::code))
        .route("/jobs", post(handlers::create_job).get(handlers::list_jobs))
        .route(
            "/jobs/{id}",
            get(handlers::get_job).delete(handlers::cancel_job),
        )
        .route(EVENTS_ROUTE, get(handlers::job_events))
        .route(
            "/jobs/{id}/events-token",
            post(handlers::create_events_token),
        )
        .route("/jobs/{id}/patch", get(handlers::job_patch))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            handlers::require_api_key,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            edge::guard,
        ))
        // The secret lives as long as this router: one per process.
        .layer(Extension(Arc::new(events_token::EventTokens::new())));
    // The page needs no key (it asks for one), but it meets the same Host rules.
    let page = web::routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        edge::guard,
    ));
    let mut app = Router::new()
        .route("/healthz", get(handlers::healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::openapi_json))
        .merge(page)
        .merge(protected)
        .route_layer(axum::middleware::from_fn(metrics::count_requests))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(edge::limit_head))
        // Spans name the path without the query, which may hold an events token.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                tracing::debug_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                )
            }),
        )
        .with_state(state);
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    app
}

fn cors_layer(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("x-api-key"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("idempotency-key"),
            ])
            .expose_headers([
                HeaderName::from_static("x-job-id"),
                HeaderName::from_static("idempotent-replayed"),
            ]),
    )
}
