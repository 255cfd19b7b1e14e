//! What operators see: Prometheus metrics (`GET /metrics`) and, with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, OpenTelemetry traces over OTLP.
//!
//! Metrics are recorded through the `metrics` facade from wherever the thing happens (a step
//! ends, a provider answers, a sandbox is created); without an installed recorder (tests, the
//! `run` command) each call is a no-op. Every name is here, so the list in the README is this
//! file.
//!
//! Traces follow the unit of work: a `job` span (keyed on `job_id`), a `step` span per pipeline
//! step, and under them `provider.request`, `sandbox.exec` and `github.request` spans. They are
//! ordinary `tracing` spans: without an OTLP endpoint nothing is exported and the only cost is
//! the spans the log already had.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::{DoneStatus, Step, StepState};

pub const JOBS_FINISHED: &str = "tb_jobs_finished_total";
pub const JOBS_RUNNING: &str = "tb_jobs_running";
pub const JOBS_QUEUED: &str = "tb_jobs_queued";
pub const STEP_SECONDS: &str = "tb_step_duration_seconds";
pub const PROVIDER_REQUESTS: &str = "tb_provider_requests_total";
pub const RETRIES: &str = "tb_retries_total";
pub const FALLBACKS: &str = "tb_fallbacks_total";
pub const TOKENS: &str = "tb_tokens_total";
pub const SANDBOXES_LIVE: &str = "tb_sandboxes_live";
pub const SANDBOXES_CLEANUP_PENDING: &str = "tb_sandboxes_cleanup_pending";
pub const GITHUB_REQUESTS: &str = "tb_github_requests_total";
pub const HTTP_REQUESTS: &str = "tb_http_requests_total";
pub const HTTP_SECONDS: &str = "tb_http_request_duration_seconds";

/// Seconds buckets for the duration histograms: from a fast HTTP answer to a long agent step.
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0,
];

/// Installs the Prometheus recorder (once per process) and returns the handle that renders it.
pub fn metrics() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .map_err(|e| format!("metrics buckets: {e}"))?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder)
                .map_err(|e| format!("installing the metrics recorder: {e}"))?;
            describe();
            Ok(handle)
        })
        .clone()
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(JOBS_FINISHED, "Jobs that ended, by final status.");
    describe_gauge!(JOBS_RUNNING, "Jobs running now.");
    describe_gauge!(JOBS_QUEUED, "Jobs waiting for a slot.");
    describe_histogram!(
        STEP_SECONDS,
        "How long pipeline steps took, by step and end state."
    );
    describe_counter!(
        PROVIDER_REQUESTS,
        "Model requests, by provider and outcome."
    );
    describe_counter!(RETRIES, "Retried calls, by layer (model, e2b, github).");
    describe_counter!(FALLBACKS, "Moves from one model provider to the next.");
    describe_counter!(TOKENS, "Tokens, by provider, model and kind.");
    describe_gauge!(
        SANDBOXES_LIVE,
        "Sandboxes created and not yet killed, by backend."
    );
    describe_gauge!(
        SANDBOXES_CLEANUP_PENDING,
        "Sandboxes whose kill is still being retried."
    );
    describe_counter!(
        GITHUB_REQUESTS,
        "GitHub API calls, by operation and outcome."
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route, method and status.");
    describe_histogram!(
        HTTP_SECONDS,
        "HTTP response times (to the headers), by route."
    );
}

pub fn job_finished(status: DoneStatus) {
    let status = match status {
        DoneStatus::Succeeded => "succeeded",
        DoneStatus::Failed => "failed",
        DoneStatus::Cancelled => "cancelled",
    };
    metrics::counter!(JOBS_FINISHED, "status" => status).increment(1);
}

pub fn jobs_now(running: usize, queued: usize) {
    metrics::gauge!(JOBS_RUNNING).set(running as f64);
    metrics::gauge!(JOBS_QUEUED).set(queued as f64);
}

pub fn step_finished(step: Step, state: StepState, elapsed: Duration) {
    metrics::histogram!(STEP_SECONDS, "step" => step.as_str(), "state" => state.as_str())
        .record(elapsed.as_secs_f64());
}

/// `outcome` is `ok` or a short error kind (`rate_limited`, `overloaded`, `server_error`, …).
pub fn provider_request(provider: &str, outcome: &'static str) {
    metrics::counter!(PROVIDER_REQUESTS, "provider" => provider.to_owned(), "outcome" => outcome)
        .increment(1);
}

pub fn retry(layer: &'static str) {
    metrics::counter!(RETRIES, "layer" => layer).increment(1);
}

pub fn fallback(from: &str, to: &str) {
    metrics::counter!(FALLBACKS, "from" => from.to_owned(), "to" => to.to_owned()).increment(1);
}

pub fn tokens(provider: &str, model: &str, kind: &'static str, count: u64) {
    if count > 0 {
        metrics::counter!(TOKENS, "provider" => provider.to_owned(), "model" => model.to_owned(), "kind" => kind)
            .increment(count);
    }
}

pub fn sandbox_created(backend: &'static str) {
    metrics::gauge!(SANDBOXES_LIVE, "backend" => backend).increment(1.0);
}

pub fn sandbox_killed(backend: &'static str) {
    metrics::gauge!(SANDBOXES_LIVE, "backend" => backend).decrement(1.0);
}

pub fn cleanup_pending(count: usize) {
    metrics::gauge!(SANDBOXES_CLEANUP_PENDING).set(count as f64);
}

/// `outcome` is `ok`, or the status class of the failure (`4xx`, `5xx`) or `error`.
pub fn github_request(operation: &'static str, outcome: &'static str) {
    metrics::counter!(GITHUB_REQUESTS, "operation" => operation, "outcome" => outcome).increment(1);
}

pub fn http_request(route: &str, method: &str, status: u16, elapsed: Duration) {
    metrics::counter!(
        HTTP_REQUESTS,
        "route" => route.to_owned(),
        "method" => method.to_owned(),
        "status" => status.to_string()
    )
    .increment(1);
    metrics::histogram!(HTTP_SECONDS, "route" => route.to_owned()).record(elapsed.as_secs_f64());
}

/// The OTLP trace pipeline, when `OTEL_EXPORTER_OTLP_ENDPOINT` (or the traces-specific
/// variable) is set: the exporter reads the standard `OTEL_*` variables itself (headers,
/// protocol, timeout). `shutdown` flushes what is buffered.
pub struct Tracing {
    provider: opentelemetry_sdk::trace::SdkTracerProvider,
}

impl Tracing {
    pub fn from_env(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>, String> {
        let configured = [
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ]
        .iter()
        .any(|k| lookup(k).is_some_and(|v| !v.trim().is_empty()));
        if !configured {
            return Ok(None);
        }
        let protocol = match lookup("OTEL_EXPORTER_OTLP_PROTOCOL")
            .as_deref()
            .map(str::trim)
        {
            None | Some("") | Some("http/protobuf") => opentelemetry_otlp::Protocol::HttpBinary,
            Some("http/json") => opentelemetry_otlp::Protocol::HttpJson,
            Some(other) => {
                return Err(format!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL must be http/protobuf or http/json, not `{other}`"
                ));
            }
        };
        use opentelemetry_otlp::WithExportConfig;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .build()
            .map_err(|e| format!("the OTLP exporter: {e}"))?;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name("tiny-backspace")
                    .build(),
            )
            .build();
        Ok(Some(Self { provider }))
    }

    /// The layer that turns `tracing` spans into OpenTelemetry spans.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S> + use<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer().with_tracer(self.provider.tracer("tiny-backspace"))
    }

    /// Exports what is still buffered; called once at exit.
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "flushing traces failed");
        }
    }
}
