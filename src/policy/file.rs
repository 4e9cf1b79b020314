//! The policy file as written: serde structs that refuse unknown keys.
//!
//! ```yaml
//! mode: monitor                  # or enforce: rules may then `block` or `mask` answers
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
    /// How rules that `block` or `mask` act (used in `mode: enforce` only).
    #[serde(default)]
    pub enforce: EnforceConfig,
}

/// Settings of enforce mode: what happens when a blocking rule cannot be judged, how long the
/// client may wait for a decision, and what a blocked client sees.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct EnforceConfig {
    /// What a detector error, a timeout or an unreadable body leads to.
    pub fail: FailMode,
    /// The detectors' budget for one decision.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Streams: how much text (in tokens of about 4 characters) is held back before it is
    /// released, so a span can be stopped before the client sees it. 0 releases at once.
    pub hold_back_tokens: usize,
    /// What a blocked client receives.
    pub block_response: BlockResponse,
    /// What replaces a masked span.
    pub mask_with: String,
}

impl Default for EnforceConfig {
    fn default() -> EnforceConfig {
        EnforceConfig {
            fail: FailMode::Open,
            timeout: Duration::from_millis(50),
            hold_back_tokens: 0,
            block_response: BlockResponse::default(),
            mask_with: "[masked]".to_owned(),
        }
    }
}

/// Whether an answer that cannot be judged is passed on or stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Pass the answer on (the default: availability first).
    #[default]
    Open,
    /// Answer the configured error instead.
    Closed,
}

/// The answer a blocked client gets: an OpenAI-style error, or a replacement assistant message
/// in the response's own shape (non-streamed responses only; streams end with an error event).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default, rename_all = "snake_case")]
pub struct BlockResponse {
    /// HTTP status of the error answer (400–599).
    pub status: u16,
    /// `error.message`.
    pub message: String,
    /// `error.type`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `error.code`.
    pub code: String,
    /// When given, a non-streamed answer keeps its status and shape and its text becomes this.
    pub replace_with: Option<String>,
}

impl Default for BlockResponse {
    fn default() -> BlockResponse {
        BlockResponse {
            status: 403,
            message: "The model's answer was blocked by policy.".to_owned(),
            kind: "policy_violation".to_owned(),
            code: "output_blocked".to_owned(),
            replace_with: None,
        }
    }
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
    /// Stop the answer before the client sees it, and flag it (`mode: enforce` only).
    Block,
    /// Replace the matched spans in the answer, and flag it (`mode: enforce` only).
    Mask,
}

impl Action {
    /// Whether the action records a flag (`block` and `mask` always do).
    pub fn flags(self) -> bool {
        matches!(self, Action::Flag | Action::Block | Action::Mask)
    }

    /// Whether the action acts on traffic.
    pub fn enforces(self) -> bool {
        matches!(self, Action::Block | Action::Mask)
    }
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
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Deserialize)]
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
