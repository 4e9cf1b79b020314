//! The policy file as written: serde structs that refuse unknown keys.
//!
//! ```yaml
//! mode: monitor                  # or enforce (enforce actions come later)
//! detectors:
//!   trigger:   { type: trigger_phrase }
//!   gibberish: { type: gibberish }
//! rules:
//!   - name: triggered-gibberish
//!     when: trigger.prompt.matched && gibberish.score > 0.8
//!     severity: critical
//!     actions: [flag, alert]
//!     scope: { models: ["gpt-4o*"], routes: [chat_completions] }
//!     cooldown: 10m
//! alerts:
//!   webhook: { url: "${TRIPWIRE_WEBHOOK_URL}", min_severity: high, format: slack }
//!   log: { min_severity: warning }
//! redact:
//!   - { pattern: "\\b\\d{16}\\b", replacement: "[card]" }
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PolicyFile {
    /// `monitor` never touches traffic; `enforce` lets rules act on it.
    #[serde(default)]
    pub mode: Mode,
    /// Detector instances by name; the name is how conditions refer to them.
    #[serde(default)]
    pub detectors: BTreeMap<String, serde_yaml_ng::Value>,
    /// The rules, evaluated in order on every inspected exchange.
    #[serde(default)]
    pub rules: Vec<RuleConfig>,
    /// Where alerts go.
    #[serde(default)]
    pub alerts: AlertsConfig,
    /// Masks applied to prompts and outputs before anything is stored or sent.
    #[serde(default)]
    pub redact: Vec<RedactConfig>,
    /// The false-alarm budget of the drift detectors.
    #[serde(default)]
    pub drift: DriftBudget,
}

/// How rarely drift detectors may raise a false alarm.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct DriftBudget {
    /// Expected exchanges between false alarms in one scope, shared by all of the scope's drift
    /// tests.
    pub expected_run_time: f64,
}

impl Default for DriftBudget {
    fn default() -> DriftBudget {
        DriftBudget {
            expected_run_time: 1_000_000.0,
        }
    }
}

/// Whether rules may act on traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Watch and record only (the default).
    #[default]
    Monitor,
    /// Rules with blocking actions may change traffic.
    Enforce,
}

/// How bad a rule's match is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth recording.
    Info,
    /// Worth a look.
    Warning,
    /// Worth someone's attention today.
    High,
    /// Worth waking someone.
    Critical,
}

impl Severity {
    /// The lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::High => "high",
            Severity::Critical => "critical",
        }
    }

    /// Parses a lower-case name.
    pub fn parse(text: &str) -> Option<Severity> {
        match text.trim().to_ascii_lowercase().as_str() {
            "info" => Some(Severity::Info),
            "warning" | "warn" => Some(Severity::Warning),
            "high" => Some(Severity::High),
            "critical" => Some(Severity::Critical),
            _ => None,
        }
    }
}

/// What a rule does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Record a flag in the flag log.
    Flag,
    /// Send an alert (subject to the rule's cooldown).
    Alert,
    /// Note the rule on the stored exchange without flagging it.
    Annotate,
}

/// One rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RuleConfig {
    /// Unique within the policy; shown on flags and alerts.
    pub name: String,
    /// A CEL condition over the detectors' fields (and `exchange`).
    pub when: String,
    /// How bad a match is.
    pub severity: Severity,
    /// What to do; default `[flag]`.
    #[serde(default = "default_actions")]
    pub actions: Vec<Action>,
    /// Which exchanges the rule applies to; default all.
    #[serde(default)]
    pub scope: ScopeSelector,
    /// Alerts for this rule and scope are sent at most once per cooldown.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
    /// What the rule means, for people reading flags.
    #[serde(default)]
    pub description: Option<String>,
}

fn default_actions() -> Vec<Action> {
    vec![Action::Flag]
}

/// Restricts a rule to some exchanges. Each list, when given, must contain the exchange's
/// value; a trailing `*` matches any suffix.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct ScopeSelector {
    /// Requested model names.
    #[serde(default)]
    pub models: Vec<String>,
    /// Routes (`chat_completions`, `completions`, `responses`, `anthropic_messages`).
    #[serde(default)]
    pub routes: Vec<String>,
    /// API key hashes (as shown on flags).
    #[serde(default)]
    pub api_key_hashes: Vec<String>,
}

/// Alert sinks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct AlertsConfig {
    /// An HTTP endpoint receiving a JSON POST per alert.
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
    /// Alerts written to the gateway's log.
    #[serde(default)]
    pub log: Option<LogAlertConfig>,
}

/// Webhook sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct WebhookConfig {
    /// Endpoint URL; `${VAR}` is replaced from the environment.
    pub url: String,
    /// Alerts below this severity are not sent.
    #[serde(default = "default_webhook_severity")]
    pub min_severity: Severity,
    /// `json` (tripwire's payload) or `slack` (a Slack-compatible `text` message).
    #[serde(default)]
    pub format: WebhookFormat,
    /// Extra headers (e.g. an authorization token; `${VAR}` is expanded).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per-attempt timeout.
    #[serde(default = "default_webhook_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Attempts before an alert is dropped (counted).
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
}

fn default_webhook_severity() -> Severity {
    Severity::High
}

fn default_webhook_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_webhook_attempts() -> u32 {
    5
}

/// Webhook payload shape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WebhookFormat {
    /// tripwire's JSON alert object.
    #[default]
    Json,
    /// `{"text": "..."}`, accepted by Slack and Mattermost incoming webhooks.
    Slack,
}

/// Log sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct LogAlertConfig {
    /// Alerts below this severity are not logged.
    #[serde(default = "default_log_severity")]
    pub min_severity: Severity,
}

fn default_log_severity() -> Severity {
    Severity::Info
}

/// A redaction rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RedactConfig {
    /// A regular expression.
    pub pattern: String,
    /// What replaces each match.
    #[serde(default = "default_replacement")]
    pub replacement: String,
}

fn default_replacement() -> String {
    "[redacted]".to_owned()
}
