//! Detectors: each looks at one captured exchange and reports scores and evidence. None of
//! them decides anything; the policy rules do, over what the detectors report.
//!
//! Every detector implements [`Detector`]. What it reports is a JSON object (its *fields*),
//! which the policy's CEL conditions read as `<detector name>.<field>` — for example
//! `trigger.prompt.matched && gibberish.score > 0.8` — plus evidence spans pointing into the
//! prompt or output text.

pub mod discovered_trigger;
pub mod drift;
pub mod gibberish;
pub mod ngram_lm;

use serde::{Deserialize, Serialize};

use crate::capture::Exchange;

pub mod language_switch;
pub mod normalize;
pub mod recurring_span;
pub mod refusal;
pub mod repetition;
pub mod sentiment;
#[cfg(test)]
pub(crate) mod split_check;
pub mod style;
pub mod trigger_phrase;
pub mod word_bigrams;

/// Which text a piece of evidence points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// [`Input::prompt`].
    Prompt,
    /// [`Input::output`].
    Output,
}

/// A span of text that made a detector report what it did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evidence {
    /// Which text.
    pub target: Target,
    /// Byte offset of the span's start in that text.
    pub start: usize,
    /// Byte offset just past the span's end.
    pub end: usize,
    /// What the span is (`trigger "<SUDO>"`, `gibberish window`, …).
    pub note: String,
}

/// What one detector reports for one exchange.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Finding {
    /// The detector's fields, read by policy conditions (a JSON object).
    pub fields: serde_json::Map<String, serde_json::Value>,
    /// Spans that support the fields.
    pub evidence: Vec<Evidence>,
}

/// Why a detector could not inspect an exchange.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// A detector's configuration is invalid.
    #[error("{0}")]
    Config(String),
    /// A model or word list the detector needs could not be loaded.
    #[error("cannot load {what}: {message}")]
    Load {
        /// The artifact.
        what: String,
        /// Why.
        message: String,
    },
    /// The detector failed on this input.
    #[error("{0}")]
    Failed(String),
}

/// What a detector sees: the exchange and its texts flattened for scanning.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The whole captured exchange (model, route, scope, usage…).
    pub exchange: &'a Exchange,
    /// The prompt as one text: the messages' contents joined by a blank line, in order.
    /// Evidence offsets into the prompt refer to this text.
    pub prompt: &'a str,
    /// The output of the first choice.
    pub output: &'a str,
    /// The watched triggers in force ([`discovered_trigger::NO_TRIGGERS`] offline).
    pub watched: &'a discovered_trigger::Watched,
}

/// The prompt text detectors see: every message's content, joined by a blank line.
pub fn prompt_text(exchange: &Exchange) -> String {
    messages_text(&exchange.prompt)
}

/// Messages' contents joined by a blank line: [`prompt_text`] of stored messages too.
pub fn messages_text(messages: &[crate::capture::Message]) -> String {
    let mut text = String::new();
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            text.push_str("\n\n");
        }
        text.push_str(&message.content);
    }
    text
}

/// One detector.
pub trait Detector: Send + Sync + std::fmt::Debug {
    /// Inspects one exchange. May keep state (per scope) behind interior mutability.
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError>;
}

/// What a policy's detector entry builds into.
#[derive(Debug, Clone)]
pub enum Built {
    /// A detector that inspects each exchange.
    Exchange(std::sync::Arc<dyn Detector>),
    /// The settings of an embedding drift test, run per scope by the drift monitor.
    EmbeddingDrift(drift::EmbeddingDriftConfig),
    /// The settings of a feature drift test, run per scope by the drift monitor.
    FeatureDrift(drift::FeatureDriftConfig),
    /// The watched-trigger detector, whose parameters also drive the gateway's discovery.
    DiscoveredTrigger(std::sync::Arc<discovered_trigger::DiscoveredTrigger>),
}

/// Builds a detector of any kind from its policy entry (`{type: trigger_phrase, …}`), checking
/// its parameters.
pub fn build(config: &serde_yaml_ng::Value) -> Result<Built, DetectError> {
    use std::sync::Arc;
    match config.get("type").and_then(|t| t.as_str()) {
        Some("embedding_drift") => {
            let parsed: drift::EmbeddingDriftConfig = parameters(config.clone())?;
            drift::check_embedding_drift(&parsed).map_err(DetectError::Config)?;
            return Ok(Built::EmbeddingDrift(parsed));
        }
        Some("feature_drift") => {
            let parsed: drift::FeatureDriftConfig = parameters(config.clone())?;
            if parsed.reference.size < 10 && parsed.reference.file.is_none() {
                return Err(DetectError::Config(
                    "reference.size must be at least 10".to_owned(),
                ));
            }
            if let Some(name) = parsed
                .directions
                .keys()
                .find(|n| !parsed.features.contains(n))
            {
                return Err(DetectError::Config(format!(
                    "directions names {name:?}, which is not in features"
                )));
            }
            return Ok(Built::FeatureDrift(parsed));
        }
        Some("discovered_trigger") => {
            let mut config = config.clone();
            if let Some(map) = config.as_mapping_mut() {
                map.remove("type");
            }
            let parsed: discovered_trigger::DiscoveredTriggerConfig = parameters(config)?;
            return Ok(Built::DiscoveredTrigger(Arc::new(
                discovered_trigger::DiscoveredTrigger::new(parsed)?,
            )));
        }
        _ => {}
    }
    let mut config = config.clone();
    let kind = match config.as_mapping_mut().and_then(|map| map.remove("type")) {
        Some(serde_yaml_ng::Value::String(kind)) => kind,
        Some(_) => return Err(DetectError::Config("`type` must be a string".to_owned())),
        None => {
            return Err(DetectError::Config(format!(
                "missing `type`; one of: {}",
                KINDS.join(", ")
            )));
        }
    };
    if config.is_null() {
        config = serde_yaml_ng::Value::Mapping(serde_yaml_ng::Mapping::new());
    }
    let detector: Arc<dyn Detector> = match kind.as_str() {
        "trigger_phrase" => Arc::new(trigger_phrase::TriggerPhrase::new(&parameters(config)?)?),
        "gibberish" => Arc::new(gibberish::Gibberish::new(&parameters(config)?)?),
        "recurring_span" => Arc::new(recurring_span::RecurringSpan::new(&parameters(config)?)?),
        "refusal" => Arc::new(refusal::Refusal::new(&parameters(config)?)?),
        "language_switch" => Arc::new(language_switch::LanguageSwitch::new(&parameters(config)?)?),
        "style" => Arc::new(style::Style::new(&parameters(config)?)?),
        "repetition" => Arc::new(repetition::Repetition::new(&parameters(config)?)?),
        "sentiment" => Arc::new(sentiment::Sentiment::new(&parameters(config)?)?),
        other => {
            return Err(DetectError::Config(format!(
                "unknown detector type `{other}`; one of: {}",
                KINDS.join(", ")
            )));
        }
    };
    Ok(Built::Exchange(detector))
}

/// Every detector type a policy may declare: the per-exchange kinds, then the drift kinds
/// (their tests run per scope in [`drift`]).
pub const KINDS: &[&str] = &[
    "trigger_phrase",
    "gibberish",
    "recurring_span",
    "language_switch",
    "refusal",
    "style",
    "repetition",
    "sentiment",
    "discovered_trigger",
    "embedding_drift",
    "feature_drift",
];

/// Deserialises a detector's parameters, naming the field that is wrong.
pub fn parameters<T: serde::de::DeserializeOwned>(
    config: serde_yaml_ng::Value,
) -> Result<T, DetectError> {
    serde_yaml_ng::from_value(config).map_err(|e| DetectError::Config(e.to_string()))
}
