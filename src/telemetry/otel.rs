//! OpenTelemetry: exchange traces, the gateway's measurements and flag log records, exported over
//! OTLP to whatever collector the standard `OTEL_EXPORTER_OTLP_*` variables name.
//!
//! Nothing is built unless an OTLP endpoint variable is set (and `OTEL_SDK_DISABLED` is not
//! `true`): no provider, no exporter, no batch thread. Every record site reaches the pipeline
//! through `Metrics::otel`, one atomic load that finds nothing when export is
//! off, so the hot path then creates no span at all.
//!
//! Spans are made with the OpenTelemetry API directly rather than through `tracing`: an exchange
//! span starts on the proxy task, travels with the captured exchange to a blocking detection
//! worker and ends there with the response's end time as its timestamp; detector spans are made
//! after the fact from recorded timings. Explicit contexts and timestamps say that plainly, where
//! `tracing` spans would have to be entered across tasks and threads. Our `tracing` logs stay as
//! they are.
//!
//! Metrics: labelled counters and histograms are mirrored into OTel instruments where they are
//! recorded (the Prometheus families cannot be enumerated, and histograms cannot be observed);
//! plain counters and queue-depth gauges are observed at collection time straight from their
//! Prometheus atomics. `/metrics` is unchanged either way.
//!
//! Exporters sit behind the SDK's batch processors (bounded queues that drop when full, each on
//! its own thread), so no request waits for a collector. [`Otel::shutdown`] flushes them.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::logs::{SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};

use super::Metrics;
use crate::capture::{Exchange, Route};

/// One detector's run on one exchange, as traces report it.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectorRun {
    /// The detector's name in its policy.
    pub detector: String,
    /// Its `type:`.
    pub kind: String,
    /// When it started.
    pub started: std::time::SystemTime,
    /// How long it took.
    pub elapsed: std::time::Duration,
    /// Its `score` field, when it reports one.
    pub score: Option<f64>,
    /// `error` or `panic` when it failed.
    pub error: Option<&'static str>,
}

/// What detection concluded about one exchange, as its trace reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Judged<'a> {
    /// The rules that fired.
    pub rules: Vec<&'a str>,
    /// The detectors the fired rules read.
    pub detectors: Vec<&'a str>,
    /// Whether a fired rule flags the exchange.
    pub flagged: bool,
}

/// How bad a flag is, in OpenTelemetry's severity numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlagLevel {
    /// `info` flags.
    Info,
    /// `warning` flags.
    Warn,
    /// `high` flags.
    Error,
    /// `critical` flags.
    Fatal,
}

/// A flag as an OpenTelemetry log record reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct FlagRecord<'a> {
    /// The flag's id.
    pub id: String,
    /// The exchange's id.
    pub exchange_id: String,
    /// The request id the client saw.
    pub request_id: &'a str,
    /// The route.
    pub route: &'a str,
    /// The model, or empty.
    pub model: &'a str,
    /// The severity's name.
    pub severity: &'static str,
    /// The severity as a level.
    pub level: FlagLevel,
    /// The most severe rule that fired.
    pub rule: &'a str,
    /// The policy file of that rule.
    pub policy: &'a str,
    /// Every rule that fired.
    pub rules: Vec<&'a str>,
    /// The fired rules' detector fields, as a JSON object.
    pub scores: String,
}

/// The instrumentation scope of everything tripwire emits.
const SCOPE: &str = "tripwire";

/// Why the OpenTelemetry pipeline could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    /// An OTLP exporter could not be built.
    #[error("cannot build the OTLP {signal} exporter: {message}")]
    Exporter {
        /// `traces`, `metrics` or `logs`.
        signal: &'static str,
        /// What the exporter said.
        message: String,
    },
}

/// How a signal travels to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// `http/protobuf`, the default.
    HttpProtobuf,
    /// `http/json`.
    HttpJson,
}

impl OtlpProtocol {
    fn sdk(self) -> opentelemetry_otlp::Protocol {
        match self {
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::Protocol::HttpBinary,
            OtlpProtocol::HttpJson => opentelemetry_otlp::Protocol::HttpJson,
        }
    }
}

/// Which signals to export, and how, read from the standard environment variables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OtelSettings {
    /// Export spans.
    pub traces: Option<OtlpProtocol>,
    /// Export metrics.
    pub metrics: Option<OtlpProtocol>,
    /// Export flags as log records.
    pub logs: Option<OtlpProtocol>,
    /// Set `service.name` to `tripwire` (neither `OTEL_SERVICE_NAME` nor
    /// `OTEL_RESOURCE_ATTRIBUTES` names one).
    pub default_service_name: bool,
}

impl OtelSettings {
    /// Reads the process environment.
    pub fn from_env() -> OtelSettings {
        OtelSettings::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads variables through `var` (the environment, or a table in tests). Invalid values are
    /// logged and leave the signal off, as the OpenTelemetry specification asks; the gateway
    /// serves regardless.
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> OtelSettings {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return OtelSettings::default();
        }
        let general = var("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
        let signal = |name: &str, upper: &str| {
            let endpoint =
                general || var(&format!("OTEL_EXPORTER_OTLP_{upper}_ENDPOINT")).is_some();
            if !endpoint {
                return None;
            }
            let exporter = format!("OTEL_{upper}_EXPORTER");
            match var(&exporter)
                .map(|v| v.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("otlp") => {}
                Some("none") => return None,
                Some(other) => {
                    tracing::warn!(
                        variable = %exporter,
                        value = other,
                        "only the `otlp` and `none` exporters are built in; {name} are not exported"
                    );
                    return None;
                }
            }
            let protocol_var = format!("OTEL_EXPORTER_OTLP_{upper}_PROTOCOL");
            let protocol = var(&protocol_var).or_else(|| var("OTEL_EXPORTER_OTLP_PROTOCOL"));
            match protocol.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
                // The SDK would pick JSON when both encodings are built in; the specification's
                // default is protobuf.
                None | Some("http/protobuf") => Some(OtlpProtocol::HttpProtobuf),
                Some("http/json") => Some(OtlpProtocol::HttpJson),
                Some(other) => {
                    tracing::warn!(
                        protocol = other,
                        "OTEL_EXPORTER_OTLP_PROTOCOL: this build exports over `http/protobuf` \
                         (default, port 4318) or `http/json`; {name} are not exported"
                    );
                    None
                }
            }
        };
        let named_in_attributes = var("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attrs| {
            attrs
                .split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
        OtelSettings {
            traces: signal("spans", "TRACES"),
            metrics: signal("metrics", "METRICS"),
            logs: signal("flag log records", "LOGS"),
            default_service_name: var("OTEL_SERVICE_NAME").is_none() && !named_in_attributes,
        }
    }

    /// Whether any signal is exported.
    pub fn any(&self) -> bool {
        self.traces.is_some() || self.metrics.is_some() || self.logs.is_some()
    }
}

/// The OpenTelemetry pipeline: providers (owned here, shut down by [`Otel::shutdown`]) and the
/// handles record sites use.
pub struct Otel {
    tracer_provider: Option<SdkTracerProvider>,
    meter_provider: Option<SdkMeterProvider>,
    logger_provider: Option<SdkLoggerProvider>,
    tracer: Option<SdkTracer>,
    logger: Option<SdkLogger>,
    instruments: Option<Instruments>,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel")
            .field("traces", &self.tracer.is_some())
            .field("metrics", &self.instruments.is_some())
            .field("logs", &self.logger.is_some())
            .finish()
    }
}

impl Otel {
    /// Builds the providers `settings` ask for and attaches the pipeline to `metrics`. Returns
    /// `None`, having built nothing, when no signal is exported.
    pub fn start(
        settings: &OtelSettings,
        metrics: &Metrics,
    ) -> Result<Option<Arc<Otel>>, OtelError> {
        if !settings.any() {
            return Ok(None);
        }
        let resource = if settings.default_service_name {
            Resource::builder().with_service_name(SCOPE).build()
        } else {
            Resource::builder().build()
        };
        let exporter_error = |signal: &'static str| {
            move |err: opentelemetry_otlp::ExporterBuildError| OtelError::Exporter {
                signal,
                message: err.to_string(),
            }
        };
        let tracer_provider = if let Some(protocol) = settings.traces {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(protocol.sdk())
                .build()
                .map_err(exporter_error("traces"))?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };
        let meter_provider = if let Some(protocol) = settings.metrics {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(protocol.sdk())
                .build()
                .map_err(exporter_error("metrics"))?;
            Some(
                SdkMeterProvider::builder()
                    .with_periodic_exporter(exporter)
                    .with_resource(resource.clone())
                    .build(),
            )
        } else {
            None
        };
        let logger_provider = if let Some(protocol) = settings.logs {
            let exporter = opentelemetry_otlp::LogExporter::builder()
                .with_http()
                .with_protocol(protocol.sdk())
                .build()
                .map_err(exporter_error("logs"))?;
            Some(
                SdkLoggerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        } else {
            None
        };
        let otel = Arc::new(Otel {
            tracer: tracer_provider.as_ref().map(|p| p.tracer(SCOPE)),
            logger: logger_provider.as_ref().map(|p| p.logger(SCOPE)),
            instruments: meter_provider
                .as_ref()
                .map(|p| Instruments::new(&p.meter(SCOPE), metrics)),
            tracer_provider,
            meter_provider,
            logger_provider,
        });
        metrics.attach_otel(Arc::clone(&otel));
        Ok(Some(otel))
    }

    /// Exports what is buffered and stops the exporters. Blocks (each batch processor joins its
    /// thread): call it from a blocking thread.
    pub fn shutdown(&self) {
        let results = [
            (
                "traces",
                self.tracer_provider
                    .as_ref()
                    .map(SdkTracerProvider::shutdown),
            ),
            (
                "metrics",
                self.meter_provider.as_ref().map(SdkMeterProvider::shutdown),
            ),
            (
                "logs",
                self.logger_provider
                    .as_ref()
                    .map(SdkLoggerProvider::shutdown),
            ),
        ];
        for (signal, result) in results {
            if let Some(Err(err)) = result {
                tracing::warn!(signal, error = %err, "OpenTelemetry export did not finish at shutdown");
            }
        }
    }

    /// The mirrored instruments, when metrics are exported.
    pub(crate) fn instruments(&self) -> Option<&Instruments> {
        self.instruments.as_ref()
    }

    /// Starts the span of one exchange at `received`, joining the caller's trace when `headers`
    /// carry a W3C `traceparent`. `None` when traces are not exported.
    pub fn start_exchange(
        &self,
        headers: &http::HeaderMap,
        route: Route,
        received: SystemTime,
        server: &ServerAddress,
    ) -> Option<ExchangeTrace> {
        let tracer = self.tracer.as_ref()?;
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let operation = operation_name(route);
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.provider.name", provider_name(route)),
            KeyValue::new("gen_ai.system", provider_name(route)),
            KeyValue::new("tripwire.route", route.as_str()),
            KeyValue::new("server.address", server.host.clone()),
        ];
        if let Some(port) = server.port {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        let span = tracer
            .span_builder(operation)
            .with_kind(SpanKind::Server)
            .with_start_time(received)
            .with_attributes(attributes)
            .start_with_context(tracer, &parent);
        Some(ExchangeTrace(Some(Box::new(LiveExchange {
            cx: Context::new().with_span(span),
            tracer: tracer.clone(),
            received,
            first_byte: Arc::new(OnceLock::new()),
        }))))
    }

    /// Emits one log record for `flag`, in the trace of its exchange when `trace` has one.
    pub fn emit_flag(&self, flag: &FlagRecord<'_>, trace: Option<&SpanContext>) {
        let Some(logger) = &self.logger else {
            return;
        };
        let severity = flag.severity;
        let mut record = logger.create_log_record();
        record.set_event_name("tripwire.flag");
        record.set_timestamp(SystemTime::now());
        record.set_severity_number(match flag.level {
            FlagLevel::Info => Severity::Info,
            FlagLevel::Warn => Severity::Warn,
            FlagLevel::Error => Severity::Error,
            FlagLevel::Fatal => Severity::Fatal,
        });
        record.set_severity_text(severity);
        record.set_body(AnyValue::from(format!(
            "tripwire flag: rule {} ({severity}) on exchange {}",
            flag.rule, flag.exchange_id
        )));
        let rules: Vec<AnyValue> = flag
            .rules
            .iter()
            .map(|r| AnyValue::from((*r).to_owned()))
            .collect();
        let model = flag.model.to_owned();
        record.add_attributes([
            ("tripwire.flag.id", AnyValue::from(flag.id.clone())),
            ("tripwire.flag.rule", AnyValue::from(flag.rule.to_owned())),
            ("tripwire.flag.rules", AnyValue::ListAny(Box::new(rules))),
            ("tripwire.flag.severity", AnyValue::from(severity)),
            (
                "tripwire.flag.policy",
                AnyValue::from(flag.policy.to_owned()),
            ),
            ("tripwire.flag.scores", AnyValue::from(flag.scores.clone())),
            (
                "tripwire.exchange.id",
                AnyValue::from(flag.exchange_id.clone()),
            ),
            (
                "tripwire.request_id",
                AnyValue::from(flag.request_id.to_owned()),
            ),
            ("tripwire.route", AnyValue::from(flag.route.to_owned())),
            (
                "tripwire.scope",
                AnyValue::from(format!("{model}|{}", flag.route)),
            ),
            ("gen_ai.request.model", AnyValue::from(model)),
        ]);
        if let Some(cx) = trace.filter(|cx| cx.is_valid()) {
            record.set_trace_context(cx.trace_id(), cx.span_id(), Some(cx.trace_flags()));
        }
        logger.emit(record);
    }
}

/// The upstream's host and port, for `server.address` and `server.port`.
#[derive(Debug, Clone, Default)]
pub struct ServerAddress {
    /// Host name or address.
    pub host: String,
    /// Port, when the URL names one or its scheme implies one.
    pub port: Option<u16>,
}

impl ServerAddress {
    /// Reads the upstream base URL; an unparsable URL gives an empty host.
    pub fn from_url(url: &str) -> ServerAddress {
        let Ok(uri) = url.parse::<http::Uri>() else {
            return ServerAddress::default();
        };
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            Some("http") => Some(80),
            _ => None,
        });
        ServerAddress {
            host: uri.host().unwrap_or_default().to_owned(),
            port,
        }
    }
}

/// The live span of one exchange, carried from the proxy through capture to detection, or
/// nothing when traces are not exported. Ending it takes the response's end time, whenever
/// that happens.
#[derive(Debug, Default)]
pub struct ExchangeTrace(Option<Box<LiveExchange>>);

#[derive(Debug)]
struct LiveExchange {
    cx: Context,
    tracer: SdkTracer,
    received: SystemTime,
    /// Set by the tee when the first body byte arrives: time since `received`.
    first_byte: Arc<OnceLock<Duration>>,
}

impl ExchangeTrace {
    /// No span (traces off).
    pub fn none() -> ExchangeTrace {
        ExchangeTrace(None)
    }

    /// Whether a span is being recorded: detection only measures detector timings then.
    pub fn is_recording(&self) -> bool {
        self.0.as_ref().is_some_and(|l| l.cx.span().is_recording())
    }

    /// The span's context (for log records and tests).
    pub fn span_context(&self) -> Option<SpanContext> {
        self.0.as_ref().map(|l| l.cx.span().span_context().clone())
    }

    /// Where the tee notes when the first body byte arrived.
    pub fn first_byte_slot(&self) -> Option<Arc<OnceLock<Duration>>> {
        self.0.as_ref().map(|l| Arc::clone(&l.first_byte))
    }

    /// Records the wait on the upstream: a CLIENT child span from `sent` to `answered`.
    pub fn upstream(
        &self,
        sent: SystemTime,
        answered: SystemTime,
        status: Option<u16>,
        error: Option<&'static str>,
    ) {
        let Some(live) = &self.0 else {
            return;
        };
        let mut attributes = Vec::with_capacity(2);
        if let Some(status) = status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(kind) = error {
            attributes.push(KeyValue::new("error.type", kind));
        }
        let mut span = live
            .tracer
            .span_builder("upstream")
            .with_kind(SpanKind::Client)
            .with_start_time(sent)
            .with_attributes(attributes)
            .start_with_context(&live.tracer, &live.cx);
        if let Some(kind) = error {
            span.set_status(Status::error(kind));
        }
        span.end_with_timestamp(answered);
    }

    /// Starts the capture span (body parsing), a child of the exchange.
    pub fn start_capture(&self) -> CaptureSpan {
        CaptureSpan(self.0.as_ref().map(|live| {
            live.tracer
                .span_builder("capture")
                .with_kind(SpanKind::Internal)
                .start_with_context(&live.tracer, &live.cx)
        }))
    }

    /// Sets what capture learnt of the exchange: models, usage, finish reasons, status.
    pub fn captured(&self, exchange: &Exchange) {
        let Some(live) = &self.0 else {
            return;
        };
        let span = live.cx.span();
        let operation = operation_name(exchange.route);
        if let Some(model) = &exchange.model {
            span.update_name(format!("{operation} {model}"));
            span.set_attribute(KeyValue::new("gen_ai.request.model", model.clone()));
        }
        if let Some(model) = &exchange.response_model {
            span.set_attribute(KeyValue::new("gen_ai.response.model", model.clone()));
        }
        if let Some(usage) = exchange.usage {
            if let Some(n) = usage.input_tokens.and_then(|n| i64::try_from(n).ok()) {
                span.set_attribute(KeyValue::new("gen_ai.usage.input_tokens", n));
            }
            if let Some(n) = usage.output_tokens.and_then(|n| i64::try_from(n).ok()) {
                span.set_attribute(KeyValue::new("gen_ai.usage.output_tokens", n));
            }
        }
        let reasons: Vec<opentelemetry::StringValue> = exchange
            .choices
            .iter()
            .filter_map(|c| c.finish_reason.clone())
            .map(Into::into)
            .collect();
        if !reasons.is_empty() {
            span.set_attribute(KeyValue::new(
                "gen_ai.response.finish_reasons",
                opentelemetry::Value::Array(reasons.into()),
            ));
        }
        if let Some(first) = live.first_byte.get() {
            span.set_attribute(KeyValue::new(
                "gen_ai.server.time_to_first_token",
                first.as_secs_f64(),
            ));
        }
        if let Some(status) = exchange.status {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if status >= 500 {
                span.set_status(Status::error(format!("HTTP {status}")));
            }
        }
        span.set_attributes([
            KeyValue::new("tripwire.exchange.id", exchange.id.to_string()),
            KeyValue::new("tripwire.request_id", exchange.request_id.clone()),
            KeyValue::new("tripwire.stream", exchange.stream),
            KeyValue::new("tripwire.outcome", exchange.outcome.as_str()),
            KeyValue::new("tripwire.truncated", exchange.truncated),
        ]);
        if let Some(error) = &exchange.parse_error {
            span.set_attribute(KeyValue::new("tripwire.parse_error", truncate(error, 200)));
        }
    }

    /// Ends the exchange without detection (it was not inspected: `reason`).
    pub fn end_uninspected(self, exchange: &Exchange, reason: &'static str) {
        let Some(live) = self.0 else {
            return;
        };
        let span = live.cx.span();
        span.set_attribute(KeyValue::new("tripwire.inspected", false));
        span.set_attribute(KeyValue::new("tripwire.uninspected_reason", reason));
        span.end_with_timestamp(end_time(live.received, exchange));
    }

    /// Records one child span per detector run, sets the verdict's attributes and ends the
    /// exchange span at the time its response ended.
    pub fn end_inspected(self, exchange: &Exchange, runs: &[DetectorRun], judged: &Judged<'_>) {
        let Some(live) = self.0 else {
            return;
        };
        for run in runs {
            let fired = judged.detectors.contains(&run.detector.as_str());
            let mut attributes = vec![
                KeyValue::new("tripwire.detector.name", run.detector.clone()),
                KeyValue::new("tripwire.detector.kind", run.kind.clone()),
                KeyValue::new("tripwire.detector.fired", fired),
            ];
            if let Some(score) = run.score {
                attributes.push(KeyValue::new("tripwire.detector.score", score));
            }
            let mut span = live
                .tracer
                .span_builder(run.detector.clone())
                .with_kind(SpanKind::Internal)
                .with_start_time(run.started)
                .with_attributes(attributes)
                .start_with_context(&live.tracer, &live.cx);
            if let Some(kind) = run.error {
                span.set_status(Status::error(kind));
            }
            span.end_with_timestamp(run.started + run.elapsed);
        }
        let rules: Vec<opentelemetry::StringValue> = judged
            .rules
            .iter()
            .map(|r| (*r).to_owned().into())
            .collect();
        let span = live.cx.span();
        span.set_attributes([
            KeyValue::new("tripwire.inspected", true),
            KeyValue::new("tripwire.flagged", judged.flagged),
            KeyValue::new(
                "tripwire.rules_fired",
                opentelemetry::Value::Array(rules.into()),
            ),
        ]);
        span.end_with_timestamp(end_time(live.received, exchange));
    }

    /// Marks an answer the gateway made itself (413, 502, 504), of `kind`.
    pub fn mark_gateway_error(&self, kind: &'static str) {
        let Some(live) = &self.0 else {
            return;
        };
        let span = live.cx.span();
        span.set_attribute(KeyValue::new("error.type", kind));
        span.set_status(Status::error(kind));
    }

    /// Ends the span now: the exchange is forwarded without capture (`reason`), so nothing
    /// will report when its response ends.
    pub fn end_skipped(self, reason: &'static str) {
        let Some(live) = self.0 else {
            return;
        };
        let span = live.cx.span();
        span.set_attribute(KeyValue::new("tripwire.capture_skipped", reason));
        span.end();
    }
}

/// The capture span of one exchange; ends when [`CaptureSpan::end`] is called or it drops.
#[derive(Debug)]
pub struct CaptureSpan(Option<opentelemetry_sdk::trace::Span>);

impl CaptureSpan {
    /// Ends the span now.
    pub fn end(mut self) {
        if let Some(span) = self.0.as_mut() {
            span.end();
        }
    }
}

/// The OTel twins of the Prometheus metrics the issue names, recorded at the same sites.
#[derive(Debug)]
pub(crate) struct Instruments {
    pub(crate) requests: Counter<u64>,
    pub(crate) upstream_latency: Histogram<f64>,
    pub(crate) overhead: Histogram<f64>,
    pub(crate) detector_latency: Histogram<f64>,
    pub(crate) flags: Counter<u64>,
    pub(crate) alerts_sent: Counter<u64>,
    pub(crate) alerts_dropped: Counter<u64>,
    pub(crate) embed_batch_size: Histogram<u64>,
    pub(crate) store_batch_rows: Histogram<u64>,
}

impl Instruments {
    fn new(meter: &opentelemetry::metrics::Meter, metrics: &Metrics) -> Instruments {
        // Observed at collection time from the Prometheus atomics.
        let gauges = [
            (
                "tripwire.detect.queue.depth",
                metrics.detect_queue_depth.clone(),
            ),
            (
                "tripwire.store.queue.depth",
                metrics.store_queue_depth.clone(),
            ),
            (
                "tripwire.alert.queue.depth",
                metrics.alert_queue_depth.clone(),
            ),
            (
                "tripwire.proxy.in_flight_requests",
                metrics.in_flight.clone(),
            ),
        ];
        for (name, gauge) in gauges {
            meter
                .i64_observable_gauge(name)
                .with_callback(move |observer| observer.observe(gauge.get(), &[]))
                .build();
        }
        let counters = [
            (
                "tripwire.detect.exchanges",
                metrics.detect_inspected.clone(),
            ),
            ("tripwire.detect.shed", metrics.detect_shed.clone()),
            ("tripwire.store.rows_written", metrics.store_written.clone()),
            (
                "tripwire.capture.dropped_chunks",
                metrics.capture_dropped_chunks.clone(),
            ),
            ("tripwire.embed.shed", metrics.embed_shed.clone()),
        ];
        for (name, counter) in counters {
            meter
                .u64_observable_counter(name)
                .with_callback(move |observer| observer.observe(counter.get(), &[]))
                .build();
        }
        // Its reasons are a closed set, so the family can be read label by label.
        let suppressed = metrics.alerts_suppressed.clone();
        meter
            .u64_observable_counter("tripwire.alert.suppressed")
            .with_callback(move |observer| {
                for reason in ["cooldown", "peer"] {
                    let count = suppressed
                        .get_or_create(&super::ReasonLabels { reason })
                        .get();
                    observer.observe(count, &[KeyValue::new("reason", reason)]);
                }
            })
            .build();
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .build()
        };
        Instruments {
            requests: meter
                .u64_counter("tripwire.proxy.requests")
                .with_description("Requests answered, by route and status")
                .build(),
            upstream_latency: seconds(
                "tripwire.proxy.upstream_latency",
                "Time from sending the request upstream to its response headers",
            ),
            overhead: seconds(
                "tripwire.proxy.overhead",
                "Total time minus time waiting on the upstream, to the last byte written",
            ),
            detector_latency: seconds(
                "tripwire.detect.latency",
                "Time one detector took on one exchange",
            ),
            flags: meter
                .u64_counter("tripwire.policy.flags")
                .with_description("Flags raised, by rule and severity")
                .build(),
            alerts_sent: meter
                .u64_counter("tripwire.alert.sent")
                .with_description("Alerts delivered, by sink")
                .build(),
            alerts_dropped: meter
                .u64_counter("tripwire.alert.dropped")
                .with_description("Alerts not delivered, by reason")
                .build(),
            embed_batch_size: meter
                .u64_histogram("tripwire.embed.batch_size")
                .with_description("Texts per embedding batch")
                .build(),
            store_batch_rows: meter
                .u64_histogram("tripwire.store.batch_rows")
                .with_description("Records per store batch")
                .build(),
        }
    }
}

/// The GenAI operation of a route.
fn operation_name(route: Route) -> &'static str {
    match route {
        Route::Completions => "text_completion",
        _ => "chat",
    }
}

/// The GenAI provider whose API a route speaks.
fn provider_name(route: Route) -> &'static str {
    match route {
        Route::AnthropicMessages => "anthropic",
        _ => "openai",
    }
}

fn end_time(received: SystemTime, exchange: &Exchange) -> SystemTime {
    received + Duration::from_micros(exchange.latency_us)
}

fn truncate(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// Reads W3C trace context from request headers. Only `traceparent` and `tracestate` are read;
/// no other header goes near telemetry.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" | "tracestate" => self.0.get(key).and_then(|v| v.to_str().ok()),
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(vars: &[(&str, &str)]) -> OtelSettings {
        OtelSettings::from_lookup(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint() {
        assert!(!settings(&[]).any());
        assert!(
            !settings(&[
                ("OTEL_SERVICE_NAME", "gw"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
            ])
            .any()
        );
        let metrics = Metrics::default();
        assert!(Otel::start(&settings(&[]), &metrics).unwrap().is_none());
        assert!(metrics.otel().is_none());
    }

    #[test]
    fn endpoints_exporters_and_the_kill_switch_pick_the_signals() {
        let endpoint = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318");
        let proto = Some(OtlpProtocol::HttpProtobuf);
        let all = settings(&[endpoint]);
        assert_eq!((all.traces, all.metrics, all.logs), (proto, proto, proto));
        assert!(all.default_service_name);
        assert!(!settings(&[endpoint, ("OTEL_SDK_DISABLED", "TRUE")]).any());
        let no_logs = settings(&[endpoint, ("OTEL_LOGS_EXPORTER", "none")]);
        assert_eq!(
            (no_logs.traces, no_logs.metrics, no_logs.logs),
            (proto, proto, None)
        );
        let traces_only = settings(&[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://c/v1/traces")]);
        assert_eq!(
            (traces_only.traces, traces_only.metrics, traces_only.logs),
            (proto, None, None)
        );
        // gRPC is not built in: warned about and off, never a failed start.
        assert!(!settings(&[endpoint, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).any());
        let json = settings(&[
            endpoint,
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
            ("OTEL_EXPORTER_OTLP_LOGS_PROTOCOL", "http/protobuf"),
        ]);
        assert_eq!(json.traces, Some(OtlpProtocol::HttpJson));
        assert_eq!(json.logs, proto);
        assert!(!settings(&[endpoint, ("OTEL_SERVICE_NAME", "gw")]).default_service_name);
        assert!(
            !settings(&[
                endpoint,
                ("OTEL_RESOURCE_ATTRIBUTES", "a=b, service.name=gw")
            ])
            .default_service_name
        );
    }

    #[test]
    fn only_trace_context_headers_are_read() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer sk-secret".parse().unwrap());
        headers.insert(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
                .parse()
                .unwrap(),
        );
        let extractor = HeaderExtractor(&headers);
        assert_eq!(extractor.get("authorization"), None);
        let cx = TraceContextPropagator::new().extract(&extractor);
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
    }

    #[test]
    fn server_address_comes_from_the_upstream_url() {
        let a = ServerAddress::from_url("https://api.openai.com/v1");
        assert_eq!((a.host.as_str(), a.port), ("api.openai.com", Some(443)));
        let a = ServerAddress::from_url("http://127.0.0.1:8000");
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", Some(8000)));
    }
}
