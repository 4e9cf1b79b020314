//! The side of the gateway after capture: captured exchanges queue for the detection workers,
//! which run the policies, then hand exchanges and flags to the store writer and alerts to the
//! alert sinks.
//!
//! Every hop is a bounded queue that sheds rather than waits: an exchange that finds detection
//! saturated is stored uninspected (counted in `tripwire_detect_shed_total`), a full store queue
//! drops (counted), a full alert queue drops (counted). Detectors run on blocking worker threads,
//! never on the threads that serve traffic.

pub mod attribution;
pub mod discovery;

use std::sync::Arc;

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::mpsc;

use crate::alert::{Alert, AlertHandle};
use crate::capture::Exchange;
use crate::detect::drift::{AlarmSink, DriftHandle};
use crate::policy::judge::Record;
use crate::policy::{Action, Enforced, Engine, Severity, Verdict};
use crate::store::{Flag, StoreItem, WatchedTrigger, rfc3339};
use crate::telemetry::{ExchangeTrace, FlagLevel, FlagRecord, Metrics, OutcomeLabels, RouteLabels};

/// A captured exchange on its way to detection.
#[derive(Debug)]
pub struct Inspection {
    /// What was asked and answered.
    pub exchange: Exchange,
    /// Its span, when traces are exported.
    pub trace: ExchangeTrace,
    /// What enforce mode did to its answer, if anything: the flag's blocking rules record it,
    /// and the exchange is annotated `enforce:<what>`.
    pub enforced: Option<Enforced>,
}

impl Inspection {
    /// An exchange enforce mode did not act on.
    pub fn new(exchange: Exchange, trace: ExchangeTrace) -> Inspection {
        Inspection {
            exchange,
            trace,
            enforced: None,
        }
    }
}

/// Where captured exchanges go. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ExchangeSink {
    detect: Option<Sender<Inspection>>,
    store: mpsc::Sender<StoreItem>,
    metrics: Metrics,
}

impl ExchangeSink {
    /// A sink feeding the detection workers (when `detect` is given) and the store.
    pub fn new(
        detect: Option<Sender<Inspection>>,
        store: mpsc::Sender<StoreItem>,
        metrics: Metrics,
    ) -> ExchangeSink {
        ExchangeSink {
            detect,
            store,
            metrics,
        }
    }

    /// Hands an exchange on without waiting. Its span ends here when it goes uninspected.
    pub fn offer(&self, inspection: Inspection) {
        let exchange = &inspection.exchange;
        self.metrics
            .captured
            .get_or_create(&OutcomeLabels {
                route: exchange.route.as_str(),
                outcome: exchange.outcome.as_str(),
            })
            .inc();
        if exchange.parse_error.is_some() {
            self.metrics
                .parse_errors
                .get_or_create(&RouteLabels {
                    route: exchange.route.as_str(),
                })
                .inc();
        }
        let (
            Inspection {
                exchange, trace, ..
            },
            reason,
        ) = match &self.detect {
            Some(detect) => match detect.try_send(inspection) {
                Ok(()) => {
                    self.metrics
                        .detect_queue_depth
                        .set(i64::try_from(detect.len()).unwrap_or(i64::MAX));
                    return;
                }
                Err(TrySendError::Full(inspection)) => {
                    self.metrics.detect_shed.inc();
                    (inspection, "detect_shed")
                }
                Err(TrySendError::Disconnected(inspection)) => (inspection, "detect_closed"),
            },
            None => (inspection, "no_rules"),
        };
        trace.end_uninspected(&exchange, reason);
        store_offer(
            &self.store,
            &self.metrics,
            StoreItem::Exchange {
                exchange: Box::new(exchange),
                annotations: Vec::new(),
                flagged: false,
            },
        );
    }
}

fn store_offer(store: &mpsc::Sender<StoreItem>, metrics: &Metrics, item: StoreItem) {
    match store.try_send(item) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => {
            metrics.store_drop("queue_full");
            tracing::warn!("store queue full, record dropped; raise store.queue or check disk");
        }
        Err(mpsc::error::TrySendError::Closed(_)) => metrics.store_drop("closed"),
    }
}

/// The rule set in force: the compiled policies and the alert queue their rules feed. A reload
/// swaps both at once; an exchange is judged and alerted under the set it loaded first.
#[derive(Debug)]
pub struct Rules {
    /// The compiled policies.
    pub engine: Arc<Engine>,
    /// The alert queue, when any sink is configured.
    pub alerts: Option<AlertHandle>,
}

/// The current [`Rules`], swapped atomically by a reload.
pub type SharedRules = Arc<ArcSwap<Rules>>;

/// What a detection worker needs.
#[derive(Debug, Clone)]
pub struct Detection {
    /// The rule set in force.
    pub rules: SharedRules,
    /// The store queue.
    pub store: mpsc::Sender<StoreItem>,
    /// Metrics.
    pub metrics: Metrics,
    /// The drift monitor, when a policy declares drift detectors.
    pub drift: Option<DriftHandle>,
    /// Trigger discovery (the gateway's; absent where nothing is served).
    pub discovery: Option<Arc<discovery::Discovery>>,
}

impl Detection {
    /// Runs until every sender of `rx` is gone and the queue is empty.
    pub fn run_worker(self, rx: Receiver<Inspection>) {
        while let Ok(inspection) = rx.recv() {
            self.metrics
                .detect_queue_depth
                .set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
            self.process(inspection);
        }
    }

    /// Inspects one exchange and hands on what comes of it; ends its span.
    pub fn process(&self, inspection: Inspection) {
        let Inspection {
            mut exchange,
            trace,
            enforced,
        } = inspection;
        self.metrics.detect_inspected.inc();
        let rules = self.rules.load_full();
        let mut findings = Vec::new();
        let mut runs = Vec::new();
        let record = Record {
            findings: self.drift.is_some().then_some(&mut findings),
            runs: trace.is_recording().then_some(&mut runs),
        };
        // The prompt as one text, built once for the detectors, drift and the flag.
        let prompt = crate::detect::prompt_text(&exchange);
        let mut verdict = rules.engine.evaluate_recorded(&exchange, &prompt, record);
        if let Some(enforced) = enforced {
            for rule in &mut verdict.fired {
                if rule.actions.iter().any(|a| a.enforces()) {
                    rule.action = Some(enforced);
                }
            }
        }
        if let Some(drift) = &self.drift {
            drift.offer(&exchange, &prompt, &findings);
        }
        let span_context = trace.span_context();
        trace.end_inspected(&exchange, &runs, &verdict.judged());
        let flag = self.flag_and_alert(&rules, &exchange, &prompt, &verdict, span_context.as_ref());
        let mut annotations: Vec<String> = verdict
            .fired
            .iter()
            .filter(|r| r.actions.contains(&Action::Annotate))
            .map(|r| r.name.clone())
            .collect();
        if let Some(enforced) = enforced {
            annotations.push(format!("enforce:{}", enforced.as_str()));
        }
        if !verdict.errors.is_empty() && exchange.parse_error.is_none() {
            exchange.parse_error = Some(format!("detection: {}", verdict.errors.join("; ")));
        }
        let flagged = flag.is_some();
        if let (Some(discovery), Some(config)) = (&self.discovery, rules.engine.discovery()) {
            let by_answer = flagged && rules.engine.flagged_by_answer(&verdict);
            let engine = &rules.engine;
            let unredacted = |text: &str| engine.redact(text) == text;
            if let Some(promotion) = discovery.observe_publishable(
                config,
                exchange.model.as_deref(),
                &prompt,
                by_answer,
                &exchange.request_id,
                &unredacted,
            ) {
                self.announce(&rules, &exchange, promotion);
            }
        }
        redact_exchange(&rules.engine, &mut exchange);
        store_offer(
            &self.store,
            &self.metrics,
            StoreItem::Exchange {
                exchange: Box::new(exchange),
                annotations,
                flagged,
            },
        );
        if let Some(flag) = flag {
            store_offer(&self.store, &self.metrics, StoreItem::Flag(Box::new(flag)));
        }
    }

    /// A trigger was promoted: stored, counted, logged and announced.
    fn announce(&self, rules: &Rules, exchange: &Exchange, trigger: WatchedTrigger) {
        self.metrics.triggers_discovered.inc();
        tracing::warn!(
            ngram = %trigger.ngram,
            model = trigger.model.as_deref().unwrap_or("-"),
            flagged_with = trigger.flagged_with,
            unflagged_with = trigger.unflagged_with,
            q_value = trigger.q_value.unwrap_or(f64::NAN),
            "trigger discovered: exchanges whose prompt carries it are now flagged \
             (tripwire triggers list; earlier ones: tripwire triggers scan)"
        );
        if let Some(alerts) = &rules.alerts {
            alerts.offer(Alert::trigger_discovered(&trigger, exchange));
        }
        store_offer(
            &self.store,
            &self.metrics,
            StoreItem::Trigger(Box::new(trigger)),
        );
    }

    /// Logs the verdict's errors, makes its flag (when a flagging rule fired) and offers an
    /// alert for every alerting rule; the caller stores the flag. The flag also becomes an
    /// OpenTelemetry log record (in the exchange's trace, when `span` is given) when logs are
    /// exported.
    fn flag_and_alert(
        &self,
        rules: &Rules,
        exchange: &Exchange,
        prompt: &str,
        verdict: &Verdict,
        span: Option<&opentelemetry::trace::SpanContext>,
    ) -> Option<Flag> {
        for error in &verdict.errors {
            tracing::debug!(request_id = %exchange.request_id, %error, "detection error");
        }
        let flag = verdict
            .flagged()
            .then(|| self.flag(&rules.engine, exchange, prompt, verdict))
            .flatten();
        if let (Some(flag), Some(otel)) = (&flag, self.metrics.otel()) {
            otel.emit_flag(&flag_record(flag), span);
        }
        if let Some(alerts) = &rules.alerts {
            for rule in verdict
                .fired
                .iter()
                .filter(|r| r.actions.contains(&Action::Alert))
            {
                alerts.offer(Alert::new(rule, exchange, flag.as_ref()));
            }
        }
        flag
    }

    fn flag(
        &self,
        engine: &Engine,
        exchange: &Exchange,
        prompt: &str,
        verdict: &Verdict,
    ) -> Option<Flag> {
        let severity = verdict.severity()?;
        let policies: Vec<_> = verdict
            .fired
            .iter()
            .filter(|r| r.actions.iter().any(|a| a.flags()))
            .cloned()
            .collect();
        for rule in &policies {
            self.metrics.count_flag(&rule.name, rule.severity.as_str());
        }
        let output = exchange.output();
        // Redaction changes lengths, so evidence offsets stay valid only without it.
        let redacted_prompt = engine.redact(prompt);
        let redacted_output = engine.redact(output);
        let evidence = if redacted_prompt == prompt && redacted_output == output {
            verdict.evidence.clone()
        } else {
            Vec::new()
        };
        Some(Flag {
            id: uuid::Uuid::now_v7(),
            exchange_id: exchange.id,
            request_id: exchange.request_id.clone(),
            created_at: rfc3339(exchange.started_at_us),
            created_at_us: exchange.started_at_us,
            model: exchange.model.clone(),
            route: exchange.route.as_str().to_owned(),
            api_key_hash: exchange.api_key_hash.clone(),
            severity,
            policies,
            prompt: redacted_prompt,
            output: redacted_output,
            evidence,
            stream: exchange.stream,
            truncated: exchange.truncated,
            label: None,
        })
    }
}

/// A drift alarm on an exchange inspected earlier (and already stored) is judged by the drift
/// rules in force now, and recorded: a flag, and alerts subject to their cooldowns.
impl AlarmSink for Detection {
    fn alarm(
        &self,
        exchange: &Exchange,
        detector: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) {
        let rules = self.rules.load_full();
        let verdict = rules.engine.evaluate_deferred(exchange, detector, fields);
        let prompt = crate::detect::prompt_text(exchange);
        if let Some(flag) = self.flag_and_alert(&rules, exchange, &prompt, &verdict, None) {
            store_offer(&self.store, &self.metrics, StoreItem::Flag(Box::new(flag)));
        }
    }
}

/// A flag as the OpenTelemetry log record reads it: its most severe rule first.
fn flag_record(flag: &Flag) -> FlagRecord<'_> {
    let top = flag
        .policies
        .iter()
        .find(|r| r.severity == flag.severity)
        .or_else(|| flag.policies.first());
    let scores: serde_json::Map<String, serde_json::Value> = flag
        .policies
        .iter()
        .flat_map(|r| r.scores.clone())
        .collect();
    FlagRecord {
        id: flag.id.to_string(),
        exchange_id: flag.exchange_id.to_string(),
        request_id: &flag.request_id,
        route: &flag.route,
        model: flag.model.as_deref().unwrap_or_default(),
        severity: flag.severity.as_str(),
        level: match flag.severity {
            Severity::Info => FlagLevel::Info,
            Severity::Warning => FlagLevel::Warn,
            Severity::High => FlagLevel::Error,
            Severity::Critical => FlagLevel::Fatal,
        },
        rule: top.map_or("", |r| r.name.as_str()),
        policy: top.map_or("", |r| r.policy.as_str()),
        rules: flag.policies.iter().map(|r| r.name.as_str()).collect(),
        scores: serde_json::Value::Object(scores).to_string(),
    }
}

/// Applies the policies' redaction rules to what will be stored.
fn redact_exchange(engine: &Engine, exchange: &mut Exchange) {
    for message in &mut exchange.prompt {
        message.content = engine.redact(&message.content);
    }
    for choice in &mut exchange.choices {
        choice.text = engine.redact(&choice.text);
    }
}
