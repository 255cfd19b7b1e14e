//! Tiny Backspace: turns a repository URL and a plain-language request into a pull request.
//!
//! A job runs as one tokio task ([`job::pipeline`]) and reports everything it does through an
//! append-only [`job::EventLog`]; the HTTP layer ([`http`]) and the CLI only start jobs and relay
//! their events. The pipeline talks to the outside world through three seams: [`sandbox::Sandbox`]
//! (where commands run), [`agent::Provider`] (who decides what to do) and [`forge::Forge`] (where the
//! change goes).

pub mod agent;
pub mod capped;
pub mod config;
pub mod event;
pub mod forge;
pub mod git;
pub mod http;
pub mod job;
pub mod redact;
pub mod repo;
pub mod retry;
pub mod sandbox;
pub mod secret_scan;
pub mod store;
pub mod telemetry;
pub mod text;

/// Milliseconds since the Unix epoch, the timestamp unit of every event.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
