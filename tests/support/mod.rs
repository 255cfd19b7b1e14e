//! Shared helpers for the integration tests: fake servers that speak the real wire protocols of
//! E2B, Anthropic, OpenAI and GitHub, and a way to run the official Python SDKs against them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fake_anthropic;
pub mod fake_e2b;
pub mod fake_github;
pub mod fake_openai;
pub mod faults;
pub mod harness;
pub mod python;
pub mod serve;
pub mod soak;
pub mod stores;
