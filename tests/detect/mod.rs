//! Detection end to end: drift alarms and discovered triggers through a running gateway.

mod drift;
mod triggers;
