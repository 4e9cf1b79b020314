//! Every Prometheus metric tripwire exports, defined once: `tripwire_<area>_<thing>_<unit|total>`.
//!
//! Recording is lock-free on the hot path (atomic counters; label families take a read lock
//! on a hash map), and labels are low-cardinality: route and status class, never model names
//! chosen by callers.

use std::sync::{Arc, OnceLock};

use opentelemetry::KeyValue;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels: the API route.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// [`crate::capture::Route::as_str`].
    pub route: &'static str,
}

/// Labels: route and HTTP status code.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatusLabels {
    /// [`crate::capture::Route::as_str`].
    pub route: &'static str,
    /// The status code sent to the client.
    pub status: u16,
}

/// Labels: a reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// Why.
    pub reason: &'static str,
}

/// Labels: route and outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// [`crate::capture::Route::as_str`].
    pub route: &'static str,
    /// [`crate::capture::Outcome::as_str`].
    pub outcome: &'static str,
}

/// Labels: a detector instance.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorLabels {
    /// The detector's name in its policy.
    pub detector: String,
}

/// Labels: a detector and what went wrong.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DetectorErrorLabels {
    /// The detector's name in its policy.
    pub detector: String,
    /// `error` or `panic`.
    pub kind: &'static str,
}

/// Labels: a rule.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule's name.
    pub rule: String,
}

/// Labels: a rule and a severity.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleSeverityLabels {
    /// The rule's name.
    pub rule: String,
    /// Its severity.
    pub severity: &'static str,
}

/// One drift test of one detector in one scope. Scopes are capped by `drift.max_scopes`, which
/// bounds the model names that reach these labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    /// The drift detector's name in the policy.
    pub detector: String,
    /// The scope's model.
    pub model: String,
    /// The scope's route.
    pub route: &'static str,
    /// `mmd`, `mmd/topic-N`, or the feature.
    pub test: String,
}

impl DriftLabels {
    /// Labels for `test` of `detector` in the scope of `model` and `route`.
    pub fn new(detector: &str, model: &str, route: &'static str, test: &str) -> DriftLabels {
        DriftLabels {
            detector: detector.to_owned(),
            model: model.to_owned(),
            route,
            test: test.to_owned(),
        }
    }
}

/// One drift scope.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftScopeLabels {
    /// The scope's model.
    pub model: String,
    /// The scope's route.
    pub route: &'static str,
}

type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

fn detector_histogram() -> Histogram {
    // 1 µs … ~1 s, doubling.
    Histogram::new(exponential_buckets(0.000_001, 2.0, 21))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs … ~105 s, doubling.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 22))
}

fn overhead_histogram() -> Histogram {
    // 10 µs … ~42 ms, doubling: the gateway's own time should sit at the bottom.
    Histogram::new(exponential_buckets(0.000_01, 2.0, 13))
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    trigger: &'static str,
    result: &'static str,
}

/// The reload metrics.
#[derive(Debug, Clone, Default)]
pub struct ReloadMetrics {
    reloads: Family<ReloadLabels, Counter>,
    generation: Gauge,
    last_success: Gauge,
}

impl ReloadMetrics {
    /// New reload metrics, registered in `registry`.
    pub fn registered(registry: &mut Registry) -> ReloadMetrics {
        let metrics = ReloadMetrics::default();
        metrics.register(registry);
        metrics.succeeded(1);
        metrics
    }

    fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tripwire");
        r.register(
            "config_reloads",
            "Configuration reloads, by trigger (signal, admin, watch) and result (ok, error)",
            self.reloads.clone(),
        );
        r.register(
            "config_generation",
            "Configuration generation in force: 1 at start, one more per reload that took effect",
            self.generation.clone(),
        );
        r.register(
            "config_last_reload_success_timestamp_seconds",
            "Unix time of the last reload that took effect (or of the start)",
            self.last_success.clone(),
        );
    }

    /// Counts one reload asked for by `trigger` (`signal`, `admin`, `watch`).
    pub fn count(&self, trigger: &'static str, ok: bool) {
        let labels = ReloadLabels {
            trigger,
            result: if ok { "ok" } else { "error" },
        };
        self.reloads.get_or_create(&labels).inc();
    }

    /// Records that configuration `generation` took effect now.
    pub fn succeeded(&self, generation: u64) {
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.last_success.set(now);
    }
}

/// Labels of `tripwire_embed_device`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// `cpu` or `cuda`: where the embedding model runs.
    pub device: &'static str,
}

/// Registers the gauge `tripwire_embed_device{device="cpu"|"cuda"}`, 1 for the device the
/// loaded embedder runs on, so a dashboard shows whether the model-based detectors run on the
/// GPU or fell back to the CPU. Registered once the embedder is loaded (the device is known only
/// then), before the registry is handed to the admin endpoint.
pub fn register_embed_device(
    registry: &mut Registry,
    device: &'static str,
) -> Family<DeviceLabels, Gauge> {
    let family = Family::<DeviceLabels, Gauge>::default();
    family.get_or_create(&DeviceLabels { device }).set(1);
    registry.sub_registry_with_prefix("tripwire").register(
        "embed_device",
        "Where the embedding model runs: 1 for the device serving (cpu or cuda)",
        family.clone(),
    );
    family
}

/// The gateway's metrics, shared: one `Arc` to clone per request, not one per metric.
#[derive(Debug, Clone, Default)]
pub struct Metrics(Arc<MetricsInner>);

impl std::ops::Deref for Metrics {
    type Target = MetricsInner;

    fn deref(&self) -> &MetricsInner {
        &self.0
    }
}

/// Every metric; reached through [`Metrics`].
#[derive(Debug)]
pub struct MetricsInner {
    /// `tripwire_proxy_requests_total{route,status}`.
    pub requests: Family<RouteStatusLabels, Counter>,
    /// `tripwire_proxy_in_flight_requests`.
    pub in_flight: Gauge,
    /// `tripwire_proxy_upstream_latency_seconds{route}`: request sent to response headers.
    pub upstream_latency: HistogramFamily<RouteLabels>,
    /// `tripwire_proxy_ttfb_seconds{route}`: request received to first body byte from upstream.
    pub ttfb: HistogramFamily<RouteLabels>,
    /// `tripwire_proxy_duration_seconds{route}`: request received to last byte handed to the client.
    pub duration: HistogramFamily<RouteLabels>,
    /// `tripwire_proxy_overhead_seconds{route}`: duration minus time waiting on the upstream.
    pub overhead: HistogramFamily<RouteLabels>,
    /// `tripwire_proxy_gateway_errors_total{reason}`: answers the gateway made itself.
    pub gateway_errors: Family<ReasonLabels, Counter>,
    /// `tripwire_enforce_decisions_total{reason}`: enforce-mode decisions by what they did
    /// (`pass`, `blocked`, `masked`, `failed_open`, `failed_closed`).
    pub enforce_decisions: Family<ReasonLabels, Counter>,
    /// `tripwire_enforce_failures_total{reason}`: decisions that could not be made
    /// (`detector_error`, `timeout`, `body_too_large`, `unreadable`).
    pub enforce_failures: Family<ReasonLabels, Counter>,
    /// `tripwire_capture_dropped_chunks_total`: response chunks not copied to capture because
    /// its queue was full.
    pub capture_dropped_chunks: Counter,
    /// `tripwire_capture_skipped_total{reason}`: exchanges not captured at all.
    pub capture_skipped: Family<ReasonLabels, Counter>,
    /// `tripwire_capture_exchanges_total{route,outcome}`.
    pub captured: Family<OutcomeLabels, Counter>,
    /// `tripwire_capture_parse_errors_total{route}`.
    pub parse_errors: Family<RouteLabels, Counter>,
    /// `tripwire_store_rows_written_total`.
    pub store_written: Counter,
    /// `tripwire_store_dropped_total{reason}`: exchanges that never reached the database.
    pub store_dropped: Family<ReasonLabels, Counter>,
    /// `tripwire_store_write_errors_total{reason}`: batch writes that failed (and will be
    /// retried), by error kind (`disk_full`, `sql`, …).
    pub store_write_errors: Family<ReasonLabels, Counter>,
    /// `tripwire_store_write_failing`: 1 while the writer cannot write (disk full, database
    /// down), 0 once a write succeeds again.
    pub store_write_failing: Gauge,
    /// `tripwire_store_batch_seconds`: time to write one batch.
    pub store_batch_seconds: Histogram,
    /// `tripwire_store_queue_depth`.
    pub store_queue_depth: Gauge,
    /// `tripwire_store_batch_rows`: records per store batch.
    pub store_batch_rows: Histogram,
    /// `tripwire_detect_latency_seconds{detector}`.
    pub detect_latency: HistogramFamily<DetectorLabels>,
    /// `tripwire_detect_errors_total{detector,kind}`.
    pub detect_errors: Family<DetectorErrorLabels, Counter>,
    /// `tripwire_detect_exchanges_total`: exchanges inspected.
    pub detect_inspected: Counter,
    /// `tripwire_detect_shed_total`: exchanges not inspected because detection was saturated.
    pub detect_shed: Counter,
    /// `tripwire_detect_queue_depth`.
    pub detect_queue_depth: Gauge,
    /// `tripwire_triggers_discovered_total`: prompt n-grams promoted to watched triggers.
    pub triggers_discovered: Counter,
    /// `tripwire_policy_rule_errors_total{rule}`: conditions that failed to evaluate.
    pub rule_errors: Family<RuleLabels, Counter>,
    /// `tripwire_policy_rule_allowed_total{rule}`: rules that held but were not fired, every
    /// evidence span being allowed by a false-positive label in the exchange's scope.
    pub rule_allowed: Family<RuleLabels, Counter>,
    /// `tripwire_policy_flags_total{rule,severity}`.
    pub flags: Family<RuleSeverityLabels, Counter>,
    /// `tripwire_alert_sent_total{sink}`.
    pub alerts_sent: Family<ReasonLabels, Counter>,
    /// `tripwire_alert_dropped_total{reason}`.
    pub alerts_dropped: Family<ReasonLabels, Counter>,
    /// `tripwire_alert_suppressed_total{reason}`: alerts held back by a rule's cooldown, seen
    /// in this process (`cooldown`) or claimed in the store by another replica (`peer`).
    pub alerts_suppressed: Family<ReasonLabels, Counter>,
    /// `tripwire_alert_queue_depth`: alerts waiting for the sender.
    pub alert_queue_depth: Gauge,
    /// `tripwire_embed_batch_size`: texts per embedding batch.
    pub embed_batch_size: Histogram,
    /// `tripwire_embed_queue_wait_seconds`: time a text waited for its batch.
    pub embed_queue_wait: Histogram,
    /// `tripwire_embed_inference_seconds`: time to tokenise and run one batch.
    pub embed_inference: Histogram,
    /// `tripwire_embed_shed_total`: texts not embedded because the queue was full.
    pub embed_shed: Counter,
    /// `tripwire_drift_statistic{detector,model,route,test}`: the latest test statistic.
    pub drift_statistic: Family<DriftLabels, FloatGauge>,
    /// `tripwire_drift_threshold{…}`: its calibrated alarm threshold.
    pub drift_threshold: Family<DriftLabels, FloatGauge>,
    /// `tripwire_drift_p_value{…}`: the latest p-value-like score (small means drift).
    pub drift_p_value: Family<DriftLabels, FloatGauge>,
    /// `tripwire_drift_alarms_total{…}`.
    pub drift_alarms: Family<DriftLabels, Counter>,
    /// `tripwire_drift_reference_size{…}`: reference observations learned so far.
    pub drift_reference_size: Family<DriftLabels, Gauge>,
    /// `tripwire_drift_sample_rate{model,route}`: the embedding sample rate in force.
    pub drift_sample_rate: Family<DriftScopeLabels, FloatGauge>,
    /// `tripwire_drift_shed_total{reason}`: exchanges the drift monitor did not test.
    pub drift_shed: Family<ReasonLabels, Counter>,
    /// The OpenTelemetry pipeline, attached at start-up when an OTLP endpoint is configured.
    otel: OnceLock<Arc<super::Otel>>,
}

impl Default for MetricsInner {
    fn default() -> Self {
        MetricsInner {
            requests: Family::default(),
            in_flight: Gauge::default(),
            upstream_latency: Family::new_with_constructor(latency_histogram),
            ttfb: Family::new_with_constructor(latency_histogram),
            duration: Family::new_with_constructor(latency_histogram),
            overhead: Family::new_with_constructor(overhead_histogram),
            gateway_errors: Family::default(),
            enforce_decisions: Family::default(),
            enforce_failures: Family::default(),
            capture_dropped_chunks: Counter::default(),
            capture_skipped: Family::default(),
            captured: Family::default(),
            parse_errors: Family::default(),
            store_written: Counter::default(),
            store_dropped: Family::default(),
            store_write_errors: Family::default(),
            store_write_failing: Gauge::default(),
            store_batch_seconds: latency_histogram(),
            store_queue_depth: Gauge::default(),
            store_batch_rows: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            detect_latency: Family::new_with_constructor(detector_histogram),
            detect_errors: Family::default(),
            detect_inspected: Counter::default(),
            detect_shed: Counter::default(),
            detect_queue_depth: Gauge::default(),
            triggers_discovered: Counter::default(),
            rule_errors: Family::default(),
            rule_allowed: Family::default(),
            flags: Family::default(),
            alerts_sent: Family::default(),
            alerts_dropped: Family::default(),
            alerts_suppressed: Family::default(),
            alert_queue_depth: Gauge::default(),
            embed_batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 9)),
            embed_queue_wait: latency_histogram(),
            embed_inference: latency_histogram(),
            embed_shed: Counter::default(),
            drift_statistic: Family::default(),
            drift_threshold: Family::default(),
            drift_p_value: Family::default(),
            drift_alarms: Family::default(),
            drift_reference_size: Family::default(),
            drift_sample_rate: Family::default(),
            drift_shed: Family::default(),
            otel: OnceLock::new(),
        }
    }
}

impl MetricsInner {
    /// Registers every metric under the `tripwire` prefix.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("tripwire");
        r.register(
            "proxy_requests",
            "Requests answered, by route and status",
            self.requests.clone(),
        );
        r.register(
            "proxy_in_flight_requests",
            "Requests being served now",
            self.in_flight.clone(),
        );
        r.register(
            "proxy_upstream_latency_seconds",
            "Time from sending the request upstream to its response headers",
            self.upstream_latency.clone(),
        );
        r.register(
            "proxy_ttfb_seconds",
            "Time from receiving the request to the first response body byte from upstream",
            self.ttfb.clone(),
        );
        r.register(
            "proxy_duration_seconds",
            "Time from receiving the request to the last byte handed to the client",
            self.duration.clone(),
        );
        r.register(
            "proxy_overhead_seconds",
            "Gateway overhead: total time minus time waiting on the upstream, to the last byte written",
            self.overhead.clone(),
        );
        r.register(
            "proxy_gateway_errors",
            "Error answers made by the gateway itself (413, 502, 504), by reason",
            self.gateway_errors.clone(),
        );
        r.register(
            "enforce_decisions",
            "Enforce-mode decisions, by what they did to the answer",
            self.enforce_decisions.clone(),
        );
        r.register(
            "enforce_failures",
            "Enforce-mode decisions that could not be made, by why (fail open or closed follows)",
            self.enforce_failures.clone(),
        );
        r.register(
            "capture_dropped_chunks",
            "Response chunks not copied to capture because its queue was full (raise limits.capture_queue_chunks)",
            self.capture_dropped_chunks.clone(),
        );
        r.register(
            "capture_skipped",
            "Exchanges forwarded without capture, by reason",
            self.capture_skipped.clone(),
        );
        r.register(
            "capture_exchanges",
            "Exchanges captured, by route and outcome",
            self.captured.clone(),
        );
        r.register(
            "capture_parse_errors",
            "Captured exchanges whose request or response could not be parsed",
            self.parse_errors.clone(),
        );
        r.register(
            "store_rows_written",
            "Exchanges written to the store",
            self.store_written.clone(),
        );
        r.register(
            "store_dropped",
            "Exchanges that never reached the store, by reason",
            self.store_dropped.clone(),
        );
        // Every reason exists from the start, at 0, so alert rules see the series.
        for reason in ["disk_full", "sql", "open", "json", "schema", "task"] {
            let _zero = self
                .store_write_errors
                .get_or_create(&ReasonLabels { reason });
        }
        r.register(
            "store_write_errors",
            "Batch writes that failed and are being retried, by reason (disk_full, sql, open, ...)",
            self.store_write_errors.clone(),
        );
        r.register(
            "store_write_failing",
            "1 while the store writer cannot write (full disk, database down); the proxy keeps serving",
            self.store_write_failing.clone(),
        );
        r.register(
            "store_batch_seconds",
            "Time to write one batch to the store",
            self.store_batch_seconds.clone(),
        );
        r.register(
            "store_queue_depth",
            "Exchanges waiting for the store writer",
            self.store_queue_depth.clone(),
        );
        r.register(
            "store_batch_rows",
            "Records (exchanges and flags) written per store batch",
            self.store_batch_rows.clone(),
        );
        r.register(
            "detect_latency_seconds",
            "Time one detector took on one exchange",
            self.detect_latency.clone(),
        );
        r.register(
            "detect_errors",
            "Detector failures (error or panic); the exchange is marked and the gateway continues",
            self.detect_errors.clone(),
        );
        r.register(
            "detect_exchanges",
            "Exchanges inspected by the detectors",
            self.detect_inspected.clone(),
        );
        r.register(
            "detect_shed",
            "Exchanges not inspected because detection was saturated (raise detect.queue or detect.workers)",
            self.detect_shed.clone(),
        );
        r.register(
            "triggers_discovered",
            "Prompt n-grams trigger attribution promoted to watched triggers (tripwire triggers list)",
            self.triggers_discovered.clone(),
        );
        r.register(
            "detect_queue_depth",
            "Exchanges waiting for the detectors",
            self.detect_queue_depth.clone(),
        );
        r.register(
            "policy_rule_errors",
            "Rule conditions that failed to evaluate",
            self.rule_errors.clone(),
        );
        r.register(
            "policy_rule_allowed",
            "Rules held back because all their evidence is allowed by false-positive labels",
            self.rule_allowed.clone(),
        );
        r.register(
            "policy_flags",
            "Flags raised, by rule and severity",
            self.flags.clone(),
        );
        r.register(
            "alert_sent",
            "Alerts delivered, by sink",
            self.alerts_sent.clone(),
        );
        r.register(
            "alert_dropped",
            "Alerts not delivered, by reason",
            self.alerts_dropped.clone(),
        );
        // Both reasons exist from the start, at 0, so rates and alert rules see the series.
        for reason in ["cooldown", "peer"] {
            let _zero = self
                .alerts_suppressed
                .get_or_create(&ReasonLabels { reason });
        }
        r.register(
            "alert_suppressed",
            "Alerts held back by their rule's cooldown, by reason (cooldown, peer)",
            self.alerts_suppressed.clone(),
        );
        r.register(
            "alert_queue_depth",
            "Alerts waiting for the sender",
            self.alert_queue_depth.clone(),
        );
        r.register(
            "embed_batch_size",
            "Texts per embedding batch",
            self.embed_batch_size.clone(),
        );
        r.register(
            "embed_queue_wait_seconds",
            "Time a text waited in the embedding queue for its batch",
            self.embed_queue_wait.clone(),
        );
        r.register(
            "embed_inference_seconds",
            "Time to tokenise and run one embedding batch",
            self.embed_inference.clone(),
        );
        r.register(
            "embed_shed",
            "Texts not embedded because the embedding queue was full (raise inference.queue_capacity)",
            self.embed_shed.clone(),
        );
        r.register(
            "drift_statistic",
            "Latest drift test statistic (MMD squared, or ln of the CUSUM e-detector)",
            self.drift_statistic.clone(),
        );
        r.register(
            "drift_threshold",
            "Calibrated alarm threshold of each drift test",
            self.drift_threshold.clone(),
        );
        r.register(
            "drift_p_value",
            "Latest p-value-like drift score; small means drift",
            self.drift_p_value.clone(),
        );
        r.register(
            "drift_alarms",
            "Drift alarms raised",
            self.drift_alarms.clone(),
        );
        r.register(
            "drift_reference_size",
            "Reference observations learned so far",
            self.drift_reference_size.clone(),
        );
        r.register(
            "drift_sample_rate",
            "Share of a scope's exchanges embedded for drift tests",
            self.drift_sample_rate.clone(),
        );
        r.register(
            "drift_shed",
            "Exchanges the drift monitor did not test, by reason",
            self.drift_shed.clone(),
        );
    }

    /// Attaches the OpenTelemetry pipeline; a second call does nothing.
    pub fn attach_otel(&self, otel: Arc<super::Otel>) {
        let _already = self.otel.set(otel);
    }

    /// The OpenTelemetry pipeline, when an OTLP endpoint is configured: one atomic load that
    /// finds nothing otherwise.
    pub fn otel(&self) -> Option<&super::Otel> {
        self.otel.get().map(|otel| &**otel)
    }

    fn instruments(&self) -> Option<&super::otel::Instruments> {
        self.otel().and_then(super::Otel::instruments)
    }

    /// Counts a request answered with `status`.
    pub fn count_request(&self, route: &'static str, status: u16) {
        self.requests
            .get_or_create(&RouteStatusLabels { route, status })
            .inc();
        if let Some(otel) = self.instruments() {
            otel.requests.add(
                1,
                &[
                    KeyValue::new("route", route),
                    KeyValue::new("status", i64::from(status)),
                ],
            );
        }
    }

    /// Records the wait for the upstream's response headers.
    pub fn observe_upstream_latency(&self, route: &'static str, seconds: f64) {
        self.upstream_latency
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
        if let Some(otel) = self.instruments() {
            otel.upstream_latency
                .record(seconds, &[KeyValue::new("route", route)]);
        }
    }

    /// Records the gateway's own time on a complete exchange.
    pub fn observe_overhead(&self, route: &'static str, seconds: f64) {
        self.overhead
            .get_or_create(&RouteLabels { route })
            .observe(seconds);
        if let Some(otel) = self.instruments() {
            otel.overhead
                .record(seconds, &[KeyValue::new("route", route)]);
        }
    }

    /// Counts a flag raised by `rule`.
    pub fn count_flag(&self, rule: &str, severity: &'static str) {
        self.flags
            .get_or_create(&RuleSeverityLabels {
                rule: rule.to_owned(),
                severity,
            })
            .inc();
        if let Some(otel) = self.instruments() {
            otel.flags.add(
                1,
                &[
                    KeyValue::new("rule", rule.to_owned()),
                    KeyValue::new("severity", severity),
                ],
            );
        }
    }

    /// Counts an alert delivered to `sink`.
    pub fn count_alert_sent(&self, sink: &'static str) {
        self.alerts_sent
            .get_or_create(&ReasonLabels { reason: sink })
            .inc();
        if let Some(otel) = self.instruments() {
            otel.alerts_sent.add(1, &[KeyValue::new("sink", sink)]);
        }
    }

    /// Counts an alert not delivered.
    pub fn count_alert_dropped(&self, reason: &'static str) {
        self.alerts_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
        if let Some(otel) = self.instruments() {
            otel.alerts_dropped
                .add(1, &[KeyValue::new("reason", reason)]);
        }
    }

    /// Records the size of one embedding batch.
    pub fn observe_embed_batch(&self, texts: usize) {
        self.embed_batch_size.observe(texts as f64);
        if let Some(otel) = self.instruments() {
            otel.embed_batch_size.record(texts as u64, &[]);
        }
    }

    /// Records the size of one store batch.
    pub fn observe_store_batch(&self, rows: usize) {
        self.store_batch_rows.observe(rows as f64);
        if let Some(otel) = self.instruments() {
            otel.store_batch_rows.record(rows as u64, &[]);
        }
    }

    /// Records one detector run.
    pub fn detector_latency(&self, detector: &str, elapsed: std::time::Duration) {
        self.detect_latency
            .get_or_create(&DetectorLabels {
                detector: detector.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        if let Some(otel) = self.instruments() {
            otel.detector_latency.record(
                elapsed.as_secs_f64(),
                &[KeyValue::new("detector", detector.to_owned())],
            );
        }
    }

    /// Counts a detector failure.
    pub fn detector_error(&self, detector: &str, kind: &'static str) {
        self.detect_errors
            .get_or_create(&DetectorErrorLabels {
                detector: detector.to_owned(),
                kind,
            })
            .inc();
    }

    /// Counts a rule whose condition failed to evaluate.
    pub fn rule_error(&self, rule: &str) {
        self.rule_errors
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// Counts a rule held back by the allow-list.
    pub fn rule_allowed(&self, rule: &str) {
        self.rule_allowed
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    /// Counts an exchange the capture side did not take.
    pub fn capture_skip(&self, reason: &'static str) {
        self.capture_skipped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an exchange that did not reach the store.
    pub fn store_drop(&self, reason: &'static str) {
        self.store_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an enforce-mode decision.
    pub fn enforce_decision(&self, reason: &'static str) {
        self.enforce_decisions
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an enforce-mode decision that could not be made.
    pub fn enforce_failure(&self, reason: &'static str) {
        self.enforce_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an error answer the gateway made itself.
    pub fn gateway_error(&self, reason: &'static str) {
        self.gateway_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_with_prefix_and_labels() {
        let metrics = Metrics::default();
        let mut registry = Registry::default();
        metrics.register(&mut registry);
        metrics
            .requests
            .get_or_create(&RouteStatusLabels {
                route: "chat_completions",
                status: 200,
            })
            .inc();
        metrics.capture_dropped_chunks.inc();
        metrics
            .overhead
            .get_or_create(&RouteLabels { route: "other" })
            .observe(0.0001);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                "tripwire_proxy_requests_total{route=\"chat_completions\",status=\"200\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("tripwire_capture_dropped_chunks_total 1"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tripwire_proxy_overhead_seconds histogram"),
            "{text}"
        );
    }
}
