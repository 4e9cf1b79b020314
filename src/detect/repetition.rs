//! Repetition detector: degenerate repetition inside one answer, in one pass.
//!
//! DOCS_PLACEHOLDER

use std::collections::HashSet;
use std::hash::{BuildHasherDefault, Hasher};

use serde::{Deserialize, Serialize};

use super::{DetectError, Detector, Evidence, Finding, Input, Target};

/// Configuration of the repetition detector (`type: repetition`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct RepetitionConfig {
    /// The longest repeated unit looked for, in bytes of normalised text (a repeated
    /// paragraph longer than this is not seen as a loop).
    pub max_period: usize,
    /// Outputs with fewer characters get score 0 and `too_short: true`.
    pub min_chars: usize,
}

impl Default for RepetitionConfig {
    fn default() -> Self {
        RepetitionConfig {
            max_period: 4096,
            min_chars: 8,
        }
    }
}

/// Longest unit shown in the `unit` field, in characters.
const UNIT_DISPLAY_CHARS: usize = 80;
/// Bytes of the n-gram whose most recent earlier occurrence proposes a period.
const SEED: usize = 8;
/// Buckets of the last-occurrence table (a power of two).
const BUCKETS: usize = 8192;
/// Score lost by a mismatching byte inside a run (a match gains 1).
const MISMATCH_COST: i32 = 1;
/// A run ends once its score is this far below its best.
const DROP: i32 = 16;

/// The statistics of one output (the detector's fields, before JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Features {
    /// Calibrated score in [0, 1]; 0.5 is the threshold (see the module docs).
    pub score: f64,
    /// `score >= 0.5`.
    pub repeated: bool,
    /// Set when the output has fewer than `min_chars` characters (the score is then 0).
    pub too_short: bool,
    /// The repeated unit of the strongest run (lowercased, whitespace collapsed, at most 80
    /// characters); empty when there is none.
    pub unit: String,
    /// How many times the unit occurs in its run (copies, counting the first).
    pub repeats: usize,
    /// Copies in the run that equal the copy before them byte for byte (after lowercasing and
    /// collapsing whitespace), counting the first.
    pub exact_repeats: usize,
    /// Share of the output (normalised bytes) covered by the run.
    pub coverage: f64,
    /// Characters covered by the run in the output.
    pub run_chars: usize,
    /// Run strength before calibration (see the module docs).
    pub strength: f64,
    /// Share of normalised bytes that do not end an 8-byte n-gram seen earlier (an LZ-style
    /// estimate of compressed over raw size; 1 when nothing repeats).
    pub compression_ratio: f64,
    /// Distinct word bigrams over word bigrams (1 when there are none).
    pub distinct_2: f64,
    /// Byte offset of the run's start in the output.
    pub run_start: usize,
    /// Byte offset just past the run's end.
    pub run_end: usize,
}

/// The repetition detector, built once from its configuration.
#[derive(Debug)]
pub struct Repetition {
    config: RepetitionConfig,
}

/// One tandem run over the normalised bytes: `[start, end)` is covered, `matched` bytes of it
/// equal the byte `period` before them.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    start: usize,
    end: usize,
    period: usize,
    matched: usize,
    /// Matched bytes in stretches of at least one period of consecutive matches (whole copies
    /// equal to the one before, in any phase).
    exact: usize,
}

impl Repetition {
    /// Checks the configuration.
    pub fn new(config: &RepetitionConfig) -> Result<Repetition, DetectError> {
        if config.max_period < 1 {
            return Err(DetectError::Config(
                "repetition: `max_period` must be at least 1".to_owned(),
            ));
        }
        if config.max_period > 1 << 20 {
            return Err(DetectError::Config(
                "repetition: `max_period` must be at most 1048576 bytes".to_owned(),
            ));
        }
        Ok(Repetition {
            config: config.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RepetitionConfig {
        &self.config
    }

    /// Computes the statistics of `text` and its score.
    pub fn features(&self, text: &str) -> Features {
        let mut f = Features {
            compression_ratio: 1.0,
            distinct_2: 1.0,
            ..Features::default()
        };
        let (norm, origin) = normalise(text);
        let (runs, novel) = tandem_runs(&norm, self.config.max_period);
        if !norm.is_empty() {
            f.compression_ratio = novel as f64 / norm.len() as f64;
        }
        f.distinct_2 = distinct_2(text);
        let chars = text.chars().count();
        if chars < self.config.min_chars {
            f.too_short = true;
            return f;
        }
        let total = norm.len().max(1);
        let best = merge(&runs)
            .into_iter()
            .map(|r| (strength(&r, total, &norm), r))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        if let Some((s, run)) = best {
            let start = floor_boundary(text, origin.get(run.start).copied().unwrap_or(0));
            let end = origin
                .get(run.end.saturating_sub(1))
                .map_or(text.len(), |&o| ceil_boundary(text, o + 1));
            let unit_end = origin
                .get(run.start + run.period - 1)
                .map_or(end, |&o| ceil_boundary(text, o + 1))
                .min(end);
            f.strength = s;
            f.unit = display_unit(text.get(start..unit_end).unwrap_or(""));
            f.repeats = (run.end - run.start) / run.period.max(1);
            f.exact_repeats = run.exact / run.period.max(1) + 1;
            f.coverage = (run.end - run.start) as f64 / total as f64;
            f.run_start = start;
            f.run_end = end;
            f.run_chars = text.get(start..end).map_or(0, |t| t.chars().count());
            f.score = score(s);
            f.repeated = f.score >= 0.5;
        }
        f
    }
}

impl Detector for Repetition {
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError> {
        let f = self.features(input.output);
        let mut finding = Finding::default();
        if let serde_json::Value::Object(map) = serde_json::to_value(&f)
            .map_err(|e| DetectError::Failed(format!("repetition: cannot encode fields: {e}")))?
        {
            finding.fields = map;
        }
        if f.repeated {
            finding.evidence.push(Evidence {
                target: Target::Output,
                start: f.run_start,
                end: f.run_end,
                note: format!("repeated \"{}\" × {}", f.unit, f.repeats),
            });
        }
        Ok(finding)
    }
}

/// The strength at which [`Features::score`] is 0.5 (see the module docs).
pub const THRESHOLD: f64 = 4.0;
/// Steepness of the logistic map from strength to score.
const SLOPE: f64 = 3.0;

/// The calibrated score.
fn score(strength: f64) -> f64 {
    1.0 / (1.0 + (-(strength - THRESHOLD) * SLOPE).exp())
}

/// How strongly a run looks like a loop (see the module docs).
fn strength(run: &Run, total: usize, norm: &[u8]) -> f64 {
    let covered = (run.end - run.start) as f64;
    let unit = norm.get(run.start..run.start + run.period).unwrap_or(&[]);
    let wordy = unit.iter().any(|b| b.is_ascii_alphanumeric() || *b >= 0x80);
    let weight = if wordy { 1.0 } else { PUNCTUATION_WEIGHT };
    let exact = run.exact as f64;
    let purity = exact / (covered - run.period as f64).max(1.0);
    let coverage = (exact + run.period as f64).min(covered) / total as f64;
    (1.0 + exact * weight).ln() + COVERAGE_WEIGHT * coverage * purity
}

/// Weight of a redundant byte of a unit without letters or digits (rules, dots, table
/// separators), relative to one with them.
const PUNCTUATION_WEIGHT: f64 = 0.25;
/// Strength added by a run that covers the whole output.
const COVERAGE_WEIGHT: f64 = 2.0;

/// The text lowercased (ASCII) with every run of ASCII whitespace collapsed to one space, and
/// for each of its bytes the offset of the byte it comes from.
fn normalise(text: &str) -> (Vec<u8>, Vec<usize>) {
    let mut norm = Vec::with_capacity(text.len());
    let mut origin = Vec::with_capacity(text.len());
    let mut space = false;
    for (i, &b) in text.as_bytes().iter().enumerate() {
        if b.is_ascii_whitespace() {
            if !space {
                norm.push(b' ');
                origin.push(i);
                space = true;
            }
        } else {
            norm.push(b.to_ascii_lowercase());
            origin.push(i);
            space = false;
        }
    }
    (norm, origin)
}

/// The run being extended by [`tandem_runs`].
#[derive(Debug, Clone, Copy)]
struct Active {
    period: usize,
    first: usize,
    score: i32,
    best: i32,
    best_end: usize,
}

/// Every tandem run of `s` (a stretch where bytes equal the byte `period` before them, for a
/// period proposed by the most recent earlier occurrence of the 8-byte n-gram there), and the
/// count of bytes that end an n-gram not seen before. One pass: each byte is hashed once and
/// compared a bounded number of times.
fn tandem_runs(s: &[u8], max_period: usize) -> (Vec<Run>, usize) {
    let mut runs = Vec::new();
    let mut table = vec![u32::MAX; BUCKETS];
    let mut key = 0u64;
    let mut novel = 0usize;
    let mut active: Option<Active> = None;
    let mut last_end = 0usize;
    for (i, &b) in s.iter().enumerate() {
        key = (key << 8) | u64::from(b);
        let mut candidate = None;
        if i + 1 >= SEED {
            let bucket = (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 51) as usize & (BUCKETS - 1);
            if let Some(slot) = table.get_mut(bucket) {
                let prev = *slot as usize;
                *slot = i as u32;
                if prev < i && same_gram(s, prev, i) {
                    candidate = Some(i - prev);
                }
            }
        }
        if candidate.is_none() {
            novel += 1;
        }
        match active.as_mut() {
            Some(run) => {
                if i >= run.period && s.get(i) == s.get(i - run.period) {
                    run.score += 1;
                } else {
                    run.score -= MISMATCH_COST;
                }
                if run.score > run.best {
                    run.best = run.score;
                    run.best_end = i + 1;
                }
                if run.score < run.best - DROP {
                    let done = close(s, &*run);
                    last_end = done.end;
                    runs.push(done);
                    active = None;
                }
            }
            None => {
                if let Some(d) = candidate.filter(|&d| d <= max_period) {
                    // Extend back over bytes that already match at this period.
                    let mut a = i + 1 - SEED;
                    let floor = last_end.max(d);
                    while a > floor && s.get(a - 1) == s.get(a - 1 - d) {
                        a -= 1;
                    }
                    let score = (i + 1 - a) as i32;
                    active = Some(Active {
                        period: d,
                        first: a,
                        score,
                        best: score,
                        best_end: i + 1,
                    });
                }
            }
        }
    }
    if let Some(run) = active {
        runs.push(close(s, &run));
    }
    (runs, novel)
}

/// A finished run: matched bytes from `first` to the best end at period `d` cover
/// `[first - d, best_end)`.
fn close(s: &[u8], run: &Active) -> Run {
    let d = run.period;
    let start = run.first.saturating_sub(d);
    let mut matched = 0usize;
    let mut exact = 0usize;
    let mut streak = 0usize;
    for k in run.first..run.best_end {
        if k >= d && s.get(k) == s.get(k - d) {
            matched += 1;
            streak += 1;
        } else {
            if streak >= d {
                exact += streak;
            }
            streak = 0;
        }
    }
    if streak >= d {
        exact += streak;
    }
    Run {
        start,
        end: run.best_end,
        period: d,
        matched,
        exact,
    }
}

/// Whether the 8-byte n-grams ending at `j` and `i` are equal.
fn same_gram(s: &[u8], j: usize, i: usize) -> bool {
    match (
        s.get(j + 1 - SEED..=j),
        s.get(i + 1 - SEED..=i),
    ) {
        (Some(x), Some(y)) => x == y,
        _ => false,
    }
}

/// Joins neighbouring runs of about the same period (a loop whose copies were perturbed by an
/// inserted or deleted character restarts its run at a shifted phase).
fn merge(runs: &[Run]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for r in runs {
        if let Some(last) = out.last_mut() {
            let near = r.start <= last.end + last.period.max(SEED);
            let slack = (last.period / 4).max(2);
            let similar = r.period.abs_diff(last.period) <= slack;
            if near && similar {
                let period = if r.matched > last.matched {
                    r.period
                } else {
                    last.period
                };
                *last = Run {
                    start: last.start,
                    end: r.end.max(last.end),
                    period,
                    matched: last.matched + r.matched,
                    exact: last.exact + r.exact,
                };
                continue;
            }
        }
        out.push(*r);
    }
    out
}

/// The unit as shown: lowercased, whitespace collapsed, trimmed, at most 80 characters.
fn display_unit(raw: &str) -> String {
    let words: Vec<&str> = raw.split_whitespace().collect();
    let joined = words.join(" ").to_lowercase();
    joined.chars().take(UNIT_DISPLAY_CHARS).collect()
}

/// The largest char boundary of `text` at or before `i`.
fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i > 0 && !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The smallest char boundary of `text` at or after `i`.
fn ceil_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while i < text.len() && !text.is_char_boundary(i) {
        i += 1;
    }
    i
}

/// Distinct word bigrams over word bigrams (whitespace words, lowercased by hash).
fn distinct_2(text: &str) -> f64 {
    let mut prev: Option<u64> = None;
    let mut total = 0usize;
    let mut seen: HashSet<u64, BuildHasherDefault<IdHasher>> = HashSet::default();
    seen.reserve(text.len() / 5);
    for w in text.split_ascii_whitespace() {
        let h = fnv1a_lower(w.as_bytes());
        if let Some(p) = prev {
            total += 1;
            seen.insert(p.rotate_left(17) ^ h);
        }
        prev = Some(h);
    }
    if total == 0 {
        1.0
    } else {
        seen.len() as f64 / total as f64
    }
}

/// 64-bit FNV-1a of the ASCII-lowercased bytes.
fn fnv1a_lower(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b.to_ascii_lowercase());
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A hasher for keys that are already hashes: one multiply.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

#[cfg(test)]
mod tests;
