//! Alerts: a fired rule with the `alert` action becomes an [`Alert`], de-duplicated per
//! (rule, scope) within the rule's cooldown, queued without waiting, and delivered by one
//! worker to the configured sinks (webhook, log).
//!
//! De-duplication has two steps. On the detection path, an in-process map drops repeats within
//! the cooldown at no cost (`reason="cooldown"`). Off it, the sender claims the cooldown window
//! in the store before delivering ([`crate::store::Store::claim_alert`], atomic), so replicas
//! sharing a PostgreSQL store send one alert per rule, scope and cooldown between them
//! (`reason="peer"` for the others); SQLite takes the same path. When the store cannot be
//! reached the alert is sent anyway: a duplicate is better than a missed alert.
//!
//! The queue is bounded; a full queue drops the alert and counts it. Webhook URLs are treated
//! as secrets (Slack's carry a token) and never logged.

mod webhook;

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::capture::Exchange;
use crate::policy::judge::FiredRule;
use crate::policy::{AlertsConfig, LogAlertConfig, Severity, WebhookConfig};
use crate::runtime::Tasks;
use crate::store::{Flag, Store, StoreError, StoreLocation, WatchedTrigger};
use crate::telemetry::{Metrics, ReasonLabels};

pub use webhook::WebhookError;

/// One alert, as sinks receive it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// The alert's id.
    pub id: uuid::Uuid,
    /// The rule that fired.
    pub rule: String,
    /// Its severity.
    pub severity: Severity,
    /// What the rule means.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The flag recorded for the exchange, when the rule also flags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag_id: Option<uuid::Uuid>,
    /// The exchange.
    pub exchange_id: uuid::Uuid,
    /// Its `x-request-id`.
    pub request_id: String,
    /// When it started (RFC 3339).
    pub created_at: String,
    /// The requested model.
    pub model: Option<String>,
    /// The route.
    pub route: String,
    /// Hash of the caller's API key.
    pub api_key_hash: Option<String>,
    /// The detector fields that made the rule fire.
    pub scores: serde_json::Map<String, serde_json::Value>,
    /// The first 280 characters of the output.
    pub output_excerpt: String,
    /// How to look at it.
    pub inspect: String,
    /// The rule's cooldown, seconds.
    #[serde(skip)]
    cooldown: Option<Duration>,
}

impl Alert {
    /// An alert for `rule` firing on `exchange`.
    pub fn new(rule: &FiredRule, exchange: &Exchange, flag: Option<&Flag>) -> Alert {
        let output = flag.map_or_else(|| exchange.output().to_owned(), |f| f.output.clone());
        let flag_id = flag.map(|f| f.id);
        Alert {
            id: uuid::Uuid::now_v7(),
            rule: rule.name.clone(),
            severity: rule.severity,
            description: rule.description.clone(),
            flag_id,
            exchange_id: exchange.id,
            request_id: exchange.request_id.clone(),
            created_at: crate::store::rfc3339(exchange.started_at_us),
            model: exchange.model.clone(),
            route: exchange.route.as_str().to_owned(),
            api_key_hash: exchange.api_key_hash.clone(),
            scores: rule.scores.clone(),
            output_excerpt: output.chars().take(280).collect(),
            inspect: match flag_id {
                Some(id) => format!("tripwire flags show {id}"),
                None => format!("tripwire exchanges show {}", exchange.request_id),
            },
            cooldown: rule.cooldown_s.map(Duration::from_secs),
        }
    }

    /// The announcement of a trigger attribution promoted (rule `trigger-discovered`): the
    /// n-gram, its counts and example flags; `exchange` is the flagged exchange that tipped it.
    pub fn trigger_discovered(trigger: &WatchedTrigger, exchange: &Exchange) -> Alert {
        let mut scores = serde_json::Map::new();
        scores.insert("ngram".to_owned(), trigger.ngram.clone().into());
        scores.insert("flagged_with".to_owned(), trigger.flagged_with.into());
        scores.insert("unflagged_with".to_owned(), trigger.unflagged_with.into());
        if let Some(q) = trigger.q_value {
            scores.insert("q_value".to_owned(), q.into());
        }
        scores.insert(
            "example_request_ids".to_owned(),
            trigger.examples.clone().into(),
        );
        let model = trigger
            .model
            .as_deref()
            .map_or(String::new(), |m| format!(" --model {m}"));
        Alert {
            id: uuid::Uuid::now_v7(),
            rule: TRIGGER_DISCOVERED.to_owned(),
            severity: Severity::High,
            description: Some(format!(
                "Prompt n-gram \"{}\" is carried by {} flagged and {} unflagged prompts \
                 (q = {:.1e}): it is now a watched trigger, and every exchange carrying it is \
                 flagged by discovered-trigger. Earlier exchanges that carried it: the inspect \
                 command.",
                trigger.ngram,
                trigger.flagged_with,
                trigger.unflagged_with,
                trigger.q_value.unwrap_or(f64::NAN)
            )),
            flag_id: None,
            exchange_id: exchange.id,
            request_id: exchange.request_id.clone(),
            created_at: crate::store::rfc3339(exchange.started_at_us),
            model: exchange.model.clone(),
            route: exchange.route.as_str().to_owned(),
            api_key_hash: exchange.api_key_hash.clone(),
            scores,
            output_excerpt: String::new(),
            inspect: format!(
                "tripwire triggers scan '{}'{model}",
                trigger.ngram.replace('\'', "'\\''")
            ),
            cooldown: None,
        }
    }

    fn scope_key(&self) -> (String, String) {
        (
            self.rule.clone(),
            format!("{}|{}", self.model.as_deref().unwrap_or(""), self.route),
        )
    }
}

/// The rule name of a trigger discovery's announcement.
pub const TRIGGER_DISCOVERED: &str = "trigger-discovered";

/// The sending side of the alert queue, with cooldown de-duplication. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AlertHandle {
    tx: mpsc::Sender<Alert>,
    last_sent: Arc<DashMap<(String, String), Instant>>,
    metrics: Metrics,
}

impl AlertHandle {
    /// Shares `previous`'s cooldown clock, so a reload that replaces the alert sinks does not
    /// alert again for a (rule, scope) still inside its cooldown.
    pub fn keep_cooldowns_of(&mut self, previous: &AlertHandle) {
        self.last_sent = Arc::clone(&previous.last_sent);
    }

    /// Queues `alert` unless its rule already alerted for this scope within the cooldown.
    pub fn offer(&self, alert: Alert) {
        let key = alert.scope_key();
        let now = Instant::now();
        if let Some(cooldown) = alert.cooldown {
            let mut suppressed = false;
            self.last_sent
                .entry(key)
                .and_modify(|last| {
                    if now.saturating_duration_since(*last) < cooldown {
                        suppressed = true;
                    } else {
                        *last = now;
                    }
                })
                .or_insert(now);
            if suppressed {
                self.metrics
                    .alerts_suppressed
                    .get_or_create(&ReasonLabels { reason: "cooldown" })
                    .inc();
                return;
            }
        }
        match self.tx.try_send(alert) {
            Ok(()) => {
                self.metrics.alert_queue_depth.set(queued(&self.tx));
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.metrics.count_alert_dropped("queue_full");
                tracing::warn!("alert queue full, alert dropped; check the webhook endpoint");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.metrics.count_alert_dropped("closed");
            }
        }
    }
}

fn queued(tx: &mpsc::Sender<Alert>) -> i64 {
    i64::try_from(tx.max_capacity().saturating_sub(tx.capacity())).unwrap_or(i64::MAX)
}

/// Creates the alert queue and starts its sender on `tasks` (`alert-sender`); returns the
/// queue's handle. Alerts go to the sinks configured in `configs`; when none is configured and
/// `rules_alert` (some rule has the `alert` action), to the log, so that no alert goes
/// nowhere. Start-up says where they go. The sender claims cooldown windows in the store at
/// `claims`, and exits once every handle is dropped and the queue is delivered.
pub fn start(
    configs: &[&AlertsConfig],
    rules_alert: bool,
    queue: usize,
    claims: StoreLocation,
    metrics: Metrics,
    tasks: &Tasks,
) -> Result<Option<AlertHandle>, WebhookError> {
    let webhooks: Vec<WebhookConfig> = configs.iter().filter_map(|c| c.webhook.clone()).collect();
    let mut logs: Vec<LogAlertConfig> = configs.iter().filter_map(|c| c.log.clone()).collect();
    if webhooks.is_empty() && logs.is_empty() {
        if !rules_alert {
            tracing::info!("no rule has the alert action and no alert sink is configured");
            return Ok(None);
        }
        tracing::info!(
            "alerts go to the log (a WARN line `tripwire alert` each): no policy configures \
             `alerts:`; add `alerts: {{ webhook: {{ url: … }} }}` to send them elsewhere"
        );
        logs.push(LogAlertConfig {
            min_severity: Severity::Info,
        });
    } else {
        tracing::info!(
            webhooks = webhooks.len(),
            log = !logs.is_empty(),
            "alerts go to the configured sinks"
        );
    }
    let senders = webhooks
        .into_iter()
        .map(webhook::Webhook::new)
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = mpsc::channel(queue.max(1));
    let handle = AlertHandle {
        tx,
        last_sent: Arc::new(DashMap::new()),
        metrics: metrics.clone(),
    };
    let claims = Claims {
        location: claims,
        store: None,
        tasks: tasks.clone(),
    };
    tasks.spawn("alert-sender", run(rx, senders, logs, claims, metrics));
    Ok(Some(handle))
}

/// The sender's own store connection for cooldown claims, opened on first use and again after
/// a failure.
struct Claims {
    location: StoreLocation,
    store: Option<Store>,
    /// Where the store calls run (blocking threads, tracked).
    tasks: Tasks,
}

impl Claims {
    /// Whether this process may send `alert`: always without a cooldown; otherwise when it
    /// claimed the cooldown window in the store (or the store could not be asked).
    async fn claim(&mut self, alert: &Alert, metrics: &Metrics) -> bool {
        let Some(cooldown) = alert.cooldown else {
            return true;
        };
        let (rule, scope) = alert.scope_key();
        let location = self.location.clone();
        let store = self.store.take();
        let cooldown_us = i64::try_from(cooldown.as_micros()).unwrap_or(i64::MAX);
        let joined = self
            .tasks
            .spawn_blocking("alert-claim", move || {
                let store = match store {
                    Some(store) => store,
                    None => match Store::connect(&location) {
                        Ok(store) => store,
                        Err(err) => return (None, Err(err)),
                    },
                };
                let now_us = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
                let claimed = store.claim_alert(&rule, &scope, now_us, cooldown_us);
                (Some(store), claimed)
            })
            .await;
        let result = match joined {
            Ok((store, result)) => {
                self.store = store;
                result
            }
            Err(err) => Err(StoreError::Task(err.to_string())),
        };
        match result {
            Ok(true) => true,
            Ok(false) => {
                metrics
                    .alerts_suppressed
                    .get_or_create(&ReasonLabels { reason: "peer" })
                    .inc();
                false
            }
            Err(err) => {
                // Reconnect next time.
                self.store = None;
                tracing::warn!(
                    alert = %alert.id,
                    rule = %alert.rule,
                    kind = err.kind(),
                    error = %err,
                    "cannot claim the alert's cooldown in the store; sending it anyway"
                );
                true
            }
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<Alert>,
    webhooks: Vec<webhook::Webhook>,
    logs: Vec<LogAlertConfig>,
    mut claims: Claims,
    metrics: Metrics,
) {
    while let Some(alert) = rx.recv().await {
        metrics
            .alert_queue_depth
            .set(i64::try_from(rx.len()).unwrap_or(i64::MAX));
        if !claims.claim(&alert, &metrics).await {
            continue;
        }
        for log in &logs {
            if alert.severity >= log.min_severity {
                tracing::warn!(
                    alert = %alert.id,
                    rule = %alert.rule,
                    severity = alert.severity.as_str(),
                    model = alert.model.as_deref().unwrap_or("-"),
                    route = %alert.route,
                    request_id = %alert.request_id,
                    inspect = %alert.inspect,
                    "tripwire alert"
                );
                metrics.count_alert_sent("log");
            }
        }
        for hook in &webhooks {
            if alert.severity < hook.min_severity() {
                continue;
            }
            match hook.send(&alert).await {
                Ok(()) => {
                    metrics.count_alert_sent("webhook");
                }
                Err(err) => {
                    metrics.count_alert_dropped("webhook_failed");
                    tracing::error!(alert = %alert.id, rule = %alert.rule, error = %err, "webhook alert not delivered");
                }
            }
        }
    }
}
