//! Detection end to end: drift alarms through a running gateway.

mod drift;
