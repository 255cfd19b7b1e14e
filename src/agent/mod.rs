//! The coding agent: a tool-use loop over a provider-neutral [`Transcript`], with providers tried
//! in fallback order.

pub mod anthropic;
pub mod chain;
pub mod dummy;
pub mod observer;
pub mod openai;
pub mod provider;
pub mod retry;
pub mod runner;
mod sse;
pub mod tools;
pub mod transcript;

pub use observer::Observer;
pub use provider::{
    FailureKind, NoText, Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn,
};
pub use transcript::{Message, Part, Role, Transcript};
