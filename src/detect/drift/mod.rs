//! Drift detection: poisoning that shows in no single response — a swapped or fine-tuned
//! model, answers slanted on one topic, a sentence injected into a share of outputs — shows in
//! the statistics of many.
//!
//! Two detector kinds, declared in a policy like any other and read by rules like any other,
//! but judged later, off the detection workers, once their statistic is ready:
//!
//! * `embedding_drift`: output embeddings (through the [`crate::infer`] batcher, on a uniform
//!   sample) tested against a reference by online MMD, overall and per prompt topic
//!   ([`mmd`], [`scope`]).
//! * `feature_drift`: per-response scores (length, the other detectors' scores, the embedding
//!   distance between prompt and output) each watched by a conformal CUSUM ([`conformal`]).
//!
//! Each scope (model × route) learns its reference from its first exchanges or loads one built
//! offline ([`reference`]), and keeps it on disk. The false-alarm budget, an expected run time
//! between false alarms, is per scope and split evenly over all its tests. The runtime side —
//! sampling ([`sampling`]), embedding, per-scope state, flags — is [`monitor`].

pub mod conformal;
pub mod history;
pub mod linalg;
pub mod mmd;
pub mod monitor;
pub mod reference;
pub mod sampling;
pub mod scope;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

pub use monitor::{AlarmSink, DriftHandle, DriftMonitor, DriftSettings};
pub use reference::{Reference, ReferenceError};

/// Detector kinds handled here rather than by [`crate::detect::build`].
pub const KINDS: &[&str] = &["embedding_drift", "feature_drift"];

/// The built-in feature computed from the output's length in characters.
pub const LENGTH_FEATURE: &str = "length";
/// The built-in feature `1 − cos(prompt embedding, output embedding)`, on embedded exchanges.
pub const PROMPT_DISTANCE_FEATURE: &str = "prompt_distance";

/// The `prompt_distance` feature: `1 − cosine` of the prompt and output embeddings.
pub fn prompt_distance(prompt: &[f32], output: &[f32]) -> f64 {
    f64::from(1.0 - crate::infer::cosine(prompt, output))
}

/// Where a drift detector's reference comes from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReferenceSource {
    /// Exchanges of each scope learned before testing starts (when no `file` is given).
    pub size: usize,
    /// A reference built offline by `tripwire baseline build`, used for every scope the
    /// detector's rules cover.
    pub file: Option<PathBuf>,
}

impl Default for ReferenceSource {
    fn default() -> ReferenceSource {
        ReferenceSource {
            size: 500,
            file: None,
        }
    }
}

/// Parameters of an `embedding_drift` detector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddingDriftConfig {
    /// `embedding_drift`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Share of a scope's exchanges embedded (a uniform random sample).
    pub sample_rate: f64,
    /// Each scope is sampled at least this many times a minute while it has the traffic, so a
    /// quiet scope still gets tested.
    pub min_sampled_per_minute: f64,
    /// Each scope is sampled at most this many times a minute: on a CPU, embedding costs far
    /// more than forwarding, and this bounds what it takes from the gateway.
    pub max_sampled_per_minute: f64,
    /// The reference.
    pub reference: ReferenceSource,
    /// Sliding-window length of the overall test.
    pub window: usize,
    /// Prompt topics (k-means clusters of the reference prompts); 0 or 1 turns them off.
    pub topics: usize,
    /// Sliding-window length of each topic's test.
    pub topic_window: usize,
    /// PCA dimensions of the kernel test.
    pub projection_dims: usize,
    /// Simulated windows for calibrating each threshold.
    pub bootstraps: usize,
    /// Multiplies the median-heuristic RBF bandwidth (smaller: more local differences count).
    pub bandwidth_scale: f64,
    /// Test `output − prompt` embeddings, so a change in what users ask does not read as
    /// drift, and how the model answers does.
    pub subtract_prompt: bool,
    /// Per-response scores (named as in `feature_drift`) tested per prompt topic, each by a
    /// conformal CUSUM against the scores of that topic's reference answers: a slant aimed at
    /// one topic moves its answers' scores while the overall mix hardly changes.
    pub topic_features: Vec<String>,
    /// Words that name a topic in its alarms: the most distinctive words of its reference
    /// prompts.
    pub topic_terms: usize,
    /// Which way of a topic feature's change is watched (`up`, `down` or `both`).
    pub topic_direction: conformal::Watch,
    /// Prompt topics of the topic-feature tests: finer than `topics`, because a slant aimed at
    /// one subject (1–5% of the traffic) is a small part of a coarse topic, and its answers'
    /// scores would be drowned by the rest of the topic's.
    pub feature_topics: usize,
    /// Scores a feature topic gathers before its tests start (from the reference, then from
    /// the traffic that follows).
    pub topic_reference: usize,
}

impl EmbeddingDriftConfig {
    /// Whether the tests have topics to name (MMD topics or topic features): then each
    /// embedded exchange's prompt words and request id are kept with the reference.
    pub fn names_topics(&self) -> bool {
        self.topics > 1 || !self.topic_features.is_empty()
    }
}

impl Default for EmbeddingDriftConfig {
    fn default() -> EmbeddingDriftConfig {
        EmbeddingDriftConfig {
            kind: "embedding_drift".to_owned(),
            sample_rate: 0.05,
            min_sampled_per_minute: 6.0,
            max_sampled_per_minute: 120.0,
            reference: ReferenceSource::default(),
            window: 100,
            topics: 8,
            topic_window: 30,
            projection_dims: 32,
            bootstraps: 20_000,
            bandwidth_scale: 0.25,
            subtract_prompt: true,
            topic_features: Vec::new(),
            topic_terms: 6,
            topic_direction: conformal::Watch::Both,
            feature_topics: 24,
            topic_reference: 30,
        }
    }
}

/// Parameters of a `feature_drift` detector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureDriftConfig {
    /// `feature_drift`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Scores watched: `length`, `prompt_distance`, or `DETECTOR.FIELD` paths into the other
    /// detectors' findings (numbers, or booleans as 0/1).
    pub features: Vec<String>,
    /// Features watched one way only (`up` or `down`; the rest both ways), where a change the
    /// other way says nothing about poisoning: the recurring-span count falls as a scope's
    /// history learns its model's stock phrases, and rises when something new recurs.
    pub directions: BTreeMap<String, conformal::Watch>,
    /// The reference.
    pub reference: ReferenceSource,
}

impl Default for FeatureDriftConfig {
    fn default() -> FeatureDriftConfig {
        FeatureDriftConfig {
            kind: "feature_drift".to_owned(),
            features: vec![
                LENGTH_FEATURE.to_owned(),
                PROMPT_DISTANCE_FEATURE.to_owned(),
            ],
            directions: BTreeMap::new(),
            reference: ReferenceSource::default(),
        }
    }
}

/// The drift detectors of one policy and its false-alarm budget.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftPlan {
    /// The `embedding_drift` detector, by name.
    pub embedding: Option<(String, EmbeddingDriftConfig)>,
    /// The `feature_drift` detector, by name.
    pub features: Option<(String, FeatureDriftConfig)>,
    /// Expected exchanges between false alarms of a scope, all its tests together.
    pub expected_run_time: f64,
}

impl DriftPlan {
    /// How many tests share a scope's budget: the overall and per-topic embedding tests, the
    /// per-topic feature tests, and one per feature.
    pub fn tests(&self) -> usize {
        let embedding = self.embedding.as_ref().map_or(0, |(_, c)| {
            1 + if c.topics > 1 { c.topics } else { 0 }
                + if c.feature_topics > 1 {
                    c.feature_topics * c.topic_features.len()
                } else {
                    0
                }
        });
        let features = self.features.as_ref().map_or(0, |(_, c)| c.features.len());
        (embedding + features).max(1)
    }

    /// Each test's share of the budget, as its own expected run time (Bonferroni on rates).
    pub fn test_ert(&self) -> f64 {
        self.expected_run_time * self.tests() as f64
    }

    /// Whether any detector needs embeddings.
    pub fn needs_embeddings(&self) -> bool {
        self.embedding.is_some()
            || self
                .features
                .as_ref()
                .is_some_and(|(_, c)| c.features.iter().any(|f| f == PROMPT_DISTANCE_FEATURE))
    }

    /// Every per-response score the tests read: the feature tests' and the topic tests'.
    pub fn score_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .features
            .as_ref()
            .map(|(_, c)| c.features.clone())
            .unwrap_or_default();
        if let Some((_, c)) = &self.embedding {
            for name in &c.topic_features {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// Names of the drift detectors.
    pub fn detector_names(&self) -> Vec<&str> {
        self.embedding
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(self.features.iter().map(|(n, _)| n.as_str()))
            .collect()
    }
}

/// The fields a drift detector hands its rules: what the policy compiler checks conditions
/// against, and what an alarm carries into the flag.
pub fn sample_fields() -> serde_json::Map<String, serde_json::Value> {
    let value = serde_json::json!({
        "alarm": false,
        "test": "mmd",
        "statistic": 0.0,
        "threshold": 1.0,
        "p_value": 1.0,
        "direction": "",
        "sample_rate": 1.0,
        "reference": {"source": "learned", "size": 0, "created_at": ""},
        "topic": {"id": -1, "terms": [], "examples_before": [], "examples_after": [], "recent_terms": []},
    });
    match value {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    }
}

/// The finite score named `name` among `scores`, if any.
pub fn score_of(scores: &[(String, f64)], name: &str) -> Option<f64> {
    scores
        .iter()
        .find(|(n, s)| n == name && s.is_finite())
        .map(|(_, s)| *s)
}

/// Reads the scores `features` names from an exchange's findings. Missing fields and
/// non-numeric values are skipped, and so is every field of a detector that reports
/// `warming_up: true`; booleans count as 0 or 1; `prompt_distance` is added by the monitor
/// once embeddings exist.
pub fn feature_scores(
    features: &[String],
    findings: &[(String, serde_json::Map<String, serde_json::Value>)],
    output_chars: usize,
) -> Vec<(String, f64)> {
    let mut scores = Vec::with_capacity(features.len());
    for feature in features {
        if feature == LENGTH_FEATURE {
            scores.push((feature.clone(), output_chars as f64));
            continue;
        }
        let mut path = feature.split('.');
        let Some(detector) = path.next() else {
            continue;
        };
        let Some((_, fields)) = findings.iter().find(|(name, _)| name == detector) else {
            continue;
        };
        // A stateful detector still filling its history scores differently from later on; its
        // scores would make a reference that later traffic drifts from.
        if fields
            .get("warming_up")
            .and_then(serde_json::Value::as_bool)
            == Some(true)
        {
            continue;
        }
        let mut value = None;
        let mut map = Some(fields);
        for key in path {
            let next = map.and_then(|m| m.get(key));
            map = next.and_then(|v| v.as_object());
            value = next;
        }
        let score = match value {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::Bool(b)) => Some(f64::from(u8::from(*b))),
            _ => None,
        };
        if let Some(score) = score {
            scores.push((feature.clone(), score));
        }
    }
    scores
}

/// Checks an `embedding_drift` detector's parameters; the error says which is wrong.
pub fn check_embedding_drift(config: &EmbeddingDriftConfig) -> Result<(), String> {
    if !(0.0..=1.0).contains(&config.sample_rate) {
        return Err(format!(
            "sample_rate {} must be between 0 and 1",
            config.sample_rate
        ));
    }
    if config.window < 2 {
        return Err("window must be at least 2".to_owned());
    }
    if config.min_sampled_per_minute.is_nan()
        || config.max_sampled_per_minute.is_nan()
        || config.min_sampled_per_minute < 0.0
        || config.max_sampled_per_minute < config.min_sampled_per_minute
    {
        return Err(format!(
            "max_sampled_per_minute ({}) must be at least min_sampled_per_minute ({}), both \
             non-negative",
            config.max_sampled_per_minute, config.min_sampled_per_minute
        ));
    }
    if config.reference.file.is_none() && config.reference.size < config.window + 10 {
        return Err(format!(
            "reference.size {} must exceed window {} by at least 10",
            config.reference.size, config.window
        ));
    }
    if config.topics > 1 && config.topic_window < 2 {
        return Err("topic_window must be at least 2".to_owned());
    }
    if config.bandwidth_scale.is_nan() || config.bandwidth_scale <= 0.0 {
        return Err("bandwidth_scale must be positive".to_owned());
    }
    if config.projection_dims == 0 {
        return Err("projection_dims must be at least 1".to_owned());
    }
    if !config.topic_features.is_empty() && config.feature_topics < 2 {
        return Err("topic_features needs feature_topics of at least 2".to_owned());
    }
    if !config.topic_features.is_empty() && config.topic_reference < 5 {
        return Err("topic_reference must be at least 5".to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_paths_read_numbers_and_booleans_and_skip_the_rest() {
        let fields = |v: serde_json::Value| match v {
            serde_json::Value::Object(m) => m,
            _ => unreachable!(),
        };
        let findings = vec![
            (
                "gibberish".to_owned(),
                fields(serde_json::json!({"score": 0.25})),
            ),
            (
                "recurring".to_owned(),
                fields(serde_json::json!({"span": {"count": 3, "matched": true}, "text": "x"})),
            ),
            (
                "warm".to_owned(),
                fields(serde_json::json!({"count": 2, "warming_up": true})),
            ),
        ];
        let features: Vec<String> = [
            "length",
            "gibberish.score",
            "recurring.span.count",
            "recurring.span.matched",
            "recurring.text",
            "missing.score",
            "warm.count",
            "prompt_distance",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let scores = feature_scores(&features, &findings, 42);
        assert_eq!(
            scores,
            vec![
                ("length".to_owned(), 42.0),
                ("gibberish.score".to_owned(), 0.25),
                ("recurring.span.count".to_owned(), 3.0),
                ("recurring.span.matched".to_owned(), 1.0),
            ]
        );
    }

    #[test]
    fn the_budget_is_split_over_every_test() {
        let plan = DriftPlan {
            embedding: Some(("output_drift".to_owned(), EmbeddingDriftConfig::default())),
            features: Some(("feature_drift".to_owned(), FeatureDriftConfig::default())),
            expected_run_time: 1e6,
        };
        // 1 overall + 8 topics + 2 features.
        assert_eq!(plan.tests(), 11);
        assert_eq!(plan.test_ert(), 11e6);
        assert!(plan.needs_embeddings());
    }
}
