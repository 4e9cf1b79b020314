//! Telemetry: OpenTelemetry export to a real collector endpoint.

mod otel;
