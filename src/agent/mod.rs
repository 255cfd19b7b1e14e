//! The coding agent: a tool-use loop over a provider-neutral [`Transcript`], with providers tried
//! in fallback order.

pub mod provider;
pub mod transcript;

pub use provider::{
    FailureKind, NoText, Provider, ProviderError, StopReason, TextSink, TokenUsage, ToolSpec, Turn,
};
pub use transcript::{Message, Part, Role, Transcript};
