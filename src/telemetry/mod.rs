//! Telemetry: the Prometheus metrics every part of the pipeline records into, and the logging
//! set-up of the binary.

mod logging;
mod metrics;

pub use logging::init_logging;
pub use metrics::{
    DetectorLabels, DriftLabels, DriftScopeLabels, Metrics, OutcomeLabels, ReasonLabels,
    RouteLabels, RouteStatusLabels, RuleSeverityLabels,
};
