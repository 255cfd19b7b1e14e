//! Jobs: the event wire format, the event log, the registry and the pipeline.

pub mod event;
pub mod log;

pub use event::{Event, EventKind};
pub use log::{EventLog, Sequenced};
