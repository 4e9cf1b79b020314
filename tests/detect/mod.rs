//! Detection end to end: drift alarms, discovered triggers and the allow-list from
//! false-positive labels through a running gateway.

mod drift;
mod feedback;
mod triggers;
