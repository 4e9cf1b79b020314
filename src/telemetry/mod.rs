//! Telemetry: the Prometheus metrics every part of the pipeline records into, the OpenTelemetry
//! pipeline (traces, the same metrics, flag log records over OTLP) and the logging set-up of the
//! binary.

mod logging;
mod metrics;
pub mod otel;
mod process;

pub use logging::init_logging;
pub use metrics::{
    DetectorLabels, DeviceLabels, DriftLabels, DriftScopeLabels, Metrics, OutcomeLabels,
    ReasonLabels, ReloadMetrics, RouteLabels, RouteStatusLabels, RuleLabels, RuleSeverityLabels,
    register_embed_device,
};
pub use otel::{DetectorRun, ExchangeTrace, FlagLevel, FlagRecord, Judged, Otel, OtelSettings};
pub use process::ProcessMetrics;
