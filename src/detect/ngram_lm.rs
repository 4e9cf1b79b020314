//! A character n-gram language model: how surprising each character of an output is, in bits.
//!
//! The gibberish detector ([`super::gibberish`]) scores every character of an output with this
//! model and looks for the window where the text stops reading like language. The model is
//! small and self-contained so that it ships inside the binary (`models/char-lm-en.bin`, loaded
//! with `include_bytes!`) and costs a handful of hash probes per character.
//!
//! * **Alphabet** ([`symbol`]): characters are lowercased, every digit becomes `0`, tabs and
//!   carriage returns become a space, and each letter of a script other than Latin becomes one
//!   placeholder symbol per script (the detector scores those letters by script continuity,
//!   not by this model).
//! * **Model**: interpolated absolute discounting (discount `D`) up to `order` characters, with
//!   the text padded by `order − 1` start symbols. Probabilities are computed from the full
//!   counts, then n-grams of order ≥ 3 seen fewer than `min_count` times are pruned; what is
//!   kept is stored the way ARPA files store a back-off model: per n-gram its interpolated
//!   log-probability and, when it is a context, its back-off weight `γ(h) = D·N₁₊(h·)/c(h)`.
//!   Unseen characters cost the unknown-symbol probability of the add-one unigram.
//! * **Keys**: n-grams are identified by a 32-bit hash ([`NgramHasher`]) in the file; in
//!   memory, an open-addressing table of 4-byte slots (a 16-bit fingerprint, the cost in 1/8
//!   bit, the back-off weight in 1/16 bit) at most half full, about 2 MiB for the shipped
//!   model, so that lookups mostly hit the cache. A false match costs one wrong probability
//!   for one character, about once in 10⁴ probes.
//! * **File** ([`CharLm::to_bytes`]): magic `TWCHARLM`, format version, parameters, entry count,
//!   then the zstd-compressed entries (sorted keys as deltas, log-probabilities, back-off
//!   weights, each a little-endian column). Both are checked by a sha256 kept beside the file
//!   (`<file>.sha256`, `sha256sum` format) before anything is parsed.
//!
//! [`train`] builds a model from texts deterministically (same texts, same bytes);
//! [`train_lm`] reads JSONL(.gz) corpora and writes `char-lm-en.bin`, its checksum and the word
//! list `words-en.txt` (the most frequent lowercase words of the same corpus).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

use super::DetectError;

/// File magic of a serialised [`CharLm`].
const MAGIC: &[u8; 8] = b"TWCHARLM";
/// Format version of a serialised [`CharLm`].
const VERSION: u32 = 1;
/// Fixed-point scale of stored log-probabilities: 1/256 bit.
const SCALE: f32 = 256.0;
/// Start-of-text padding symbol.
const BOS: u32 = 0x02;
/// Base of the per-script placeholder symbols (Unicode private use area).
const SCRIPT_SYMBOL_BASE: u32 = 0xE000;
/// Highest order the model supports.
pub const MAX_ORDER: usize = 8;

/// The embedded English model (`models/char-lm-en.bin`).
pub static EMBEDDED_LM: &[u8] = include_bytes!("../../models/char-lm-en.bin");
/// The embedded model's checksum file (`models/char-lm-en.bin.sha256`).
pub static EMBEDDED_LM_SHA256: &str = include_str!("../../models/char-lm-en.bin.sha256");
/// The embedded English word list (`models/words-en.txt`), one lowercase word a line.
pub static EMBEDDED_WORDS: &str = include_str!("../../models/words-en.txt");

/// The script of a letter, with the Japanese and Chinese scripts taken as one (`Cjk`), since
/// one text mixes them freely.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Script {
    /// Latin, with its extensions and fullwidth forms.
    Latin,
    /// Greek.
    Greek,
    /// Cyrillic.
    Cyrillic,
    /// Armenian.
    Armenian,
    /// Hebrew.
    Hebrew,
    /// Arabic and its presentation forms.
    Arabic,
    /// The Brahmic scripts of India (Devanagari to Malayalam, and Sinhala).
    Indic,
    /// Thai and Lao.
    Thai,
    /// Georgian.
    Georgian,
    /// Hangul.
    Hangul,
    /// Han, Hiragana, Katakana and Bopomofo.
    Cjk,
    /// Any other letter.
    Other,
}

impl Script {
    /// Every script, in index order.
    pub const ALL: [Script; 12] = [
        Script::Latin,
        Script::Greek,
        Script::Cyrillic,
        Script::Armenian,
        Script::Hebrew,
        Script::Arabic,
        Script::Indic,
        Script::Thai,
        Script::Georgian,
        Script::Hangul,
        Script::Cjk,
        Script::Other,
    ];

    /// Position in [`Script::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Snake-case name.
    pub fn name(self) -> &'static str {
        match self {
            Script::Latin => "latin",
            Script::Greek => "greek",
            Script::Cyrillic => "cyrillic",
            Script::Armenian => "armenian",
            Script::Hebrew => "hebrew",
            Script::Arabic => "arabic",
            Script::Indic => "indic",
            Script::Thai => "thai",
            Script::Georgian => "georgian",
            Script::Hangul => "hangul",
            Script::Cjk => "cjk",
            Script::Other => "other",
        }
    }
}

/// The script of `c` when it is a letter (or a CJK ideograph), `None` otherwise.
#[inline]
pub fn script_of(c: char) -> Option<Script> {
    if c.is_ascii() {
        return c.is_ascii_alphabetic().then_some(Script::Latin);
    }
    if !c.is_alphabetic() {
        return None;
    }
    let cp = c as u32;
    let script = match cp {
        0x00C0..=0x024F
        | 0x0250..=0x02AF
        | 0x1E00..=0x1EFF
        | 0x2C60..=0x2C7F
        | 0xA720..=0xA7FF
        | 0xFF21..=0xFF5A => Script::Latin,
        0x0370..=0x03FF | 0x1F00..=0x1FFF => Script::Greek,
        0x0400..=0x052F | 0x1C80..=0x1C8F | 0x2DE0..=0x2DFF | 0xA640..=0xA69F => Script::Cyrillic,
        0x0530..=0x058F => Script::Armenian,
        0x0590..=0x05FF | 0xFB1D..=0xFB4F => Script::Hebrew,
        0x0600..=0x06FF | 0x0750..=0x077F | 0x08A0..=0x08FF | 0xFB50..=0xFDFF | 0xFE70..=0xFEFF => {
            Script::Arabic
        }
        0x0900..=0x0DFF => Script::Indic,
        0x0E00..=0x0EFF => Script::Thai,
        0x10A0..=0x10FF | 0x2D00..=0x2D2F => Script::Georgian,
        0x1100..=0x11FF | 0x3130..=0x318F | 0xA960..=0xA97F | 0xAC00..=0xD7FF => Script::Hangul,
        0x3040..=0x30FF
        | 0x3100..=0x312F
        | 0x31A0..=0x31FF
        | 0x3400..=0x4DBF
        | 0x4E00..=0x9FFF
        | 0xF900..=0xFAFF
        | 0xFF66..=0xFF9F
        | 0x20000..=0x3FFFF => Script::Cjk,
        _ => Script::Other,
    };
    Some(script)
}

/// The model's symbol for `c` (see the module docs), with `c`'s script when it is a letter.
#[inline]
pub fn symbol(c: char) -> (u32, Option<Script>) {
    if c.is_ascii() {
        let b = c as u8;
        return match b {
            b'A'..=b'Z' => (u32::from(b | 0x20), Some(Script::Latin)),
            b'a'..=b'z' => (u32::from(b), Some(Script::Latin)),
            b'0'..=b'9' => (u32::from(b'0'), None),
            b'\n' => (u32::from(b'\n'), None),
            0..=0x1f | 0x7f => (u32::from(b' '), None),
            _ => (u32::from(b), None),
        };
    }
    match script_of(c) {
        Some(Script::Latin) => {
            let lower = c.to_lowercase().next().unwrap_or(c);
            (lower as u32, Some(Script::Latin))
        }
        Some(script) => (SCRIPT_SYMBOL_BASE + script as u32, Some(script)),
        None if c.is_numeric() => (u32::from(b'0'), None),
        None if c.is_whitespace() => (u32::from(b' '), None),
        None => (c as u32, None),
    }
}

/// Hashes of the n-grams ending at the current character, orders 1 to `order`, updated one
/// symbol at a time. `hashes()[k - 1]` is the order-`k` n-gram's 64-bit hash.
#[derive(Debug, Clone)]
pub struct NgramHasher {
    order: usize,
    history: [u32; MAX_ORDER],
    hashes: [u64; MAX_ORDER],
}

/// One step of the n-gram hash chain (multiply-rotate, as in FxHash); keys are finalised by
/// [`key32`].
#[inline]
fn mix(h: u64, s: u32) -> u64 {
    (h.rotate_left(5) ^ u64::from(s)).wrapping_mul(0x517c_c1b7_2722_0a95)
}

impl NgramHasher {
    /// A hasher at the start of a text (history full of start symbols).
    pub fn new(order: usize) -> NgramHasher {
        NgramHasher {
            order: order.clamp(1, MAX_ORDER),
            history: [BOS; MAX_ORDER],
            hashes: [0; MAX_ORDER],
        }
    }

    /// Moves one symbol on. The n-gram of order `k` is hashed from its last symbol backwards,
    /// so the order-`k` hash extends the order-`k − 1` one.
    #[inline]
    pub fn push(&mut self, s: u32) {
        for k in (1..MAX_ORDER).rev() {
            self.history[k] = self.history[k - 1];
        }
        self.history[0] = s;
        let mut h = 0x2545_f491_4f6c_dd1d_u64;
        for k in 0..MAX_ORDER {
            if k >= self.order {
                break;
            }
            h = mix(h, self.history[k]);
            self.hashes[k] = h;
        }
    }

    /// The current hashes, order 1 first.
    #[inline]
    pub fn hashes(&self) -> &[u64] {
        &self.hashes[..self.order]
    }

    /// All hash slots (those past `order` are 0).
    #[inline]
    pub fn hash_array(&self) -> [u64; MAX_ORDER] {
        self.hashes
    }
}

/// The 32-bit table key of a 64-bit n-gram hash (never 0, which marks an empty slot).
#[inline]
fn key32(h: u64) -> u32 {
    let x = (h ^ (h >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let k = (x >> 32) as u32;
    if k == 0 { 1 } else { k }
}

/// Where [`CharLm::cost`] is in a text: the longest n-gram matched at the previous character
/// and its back-off weight. Start each text with [`LmState::default`].
#[derive(Debug, Clone, Copy, Default)]
pub struct LmState {
    /// A character has been seen (back-off weights of contexts apply).
    started: bool,
    /// `matched` and `matched_backoff` describe the previous character.
    valid: bool,
    matched: usize,
    matched_backoff: u16,
}

impl LmState {
    /// Records a character that was not scored with [`CharLm::cost`] (its n-grams were still
    /// pushed into the hasher).
    #[inline]
    pub fn skip(&mut self) {
        self.started = true;
        self.valid = false;
    }
}

/// Training parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LmParams {
    /// Longest n-gram, in characters (1 to [`MAX_ORDER`]).
    pub order: usize,
    /// Absolute discount `D` in (0, 1).
    pub discount: f32,
    /// N-grams of order ≥ 3 seen fewer times than this are pruned after estimation.
    pub min_count: u32,
}

impl Default for LmParams {
    fn default() -> Self {
        LmParams {
            order: 5,
            discount: 0.75,
            min_count: 2,
        }
    }
}

/// A trained character n-gram model (see the module docs).
#[derive(Debug, Clone)]
pub struct CharLm {
    params: LmParams,
    /// Cost of a symbol never seen in training, in 1/256 bit.
    unk_cost: u16,
    /// Sorted keys with their costs: (key, −log₂P·256, −log₂γ·256).
    entries: Vec<(u32, u16, u16)>,
    /// Open-addressing table, 4 bytes a slot so that it stays in cache: a 16-bit key
    /// fingerprint, the cost in 1/8 bit and the back-off in 1/16 bit (8 bits each); 0 is empty.
    table: Vec<u32>,
    mask: usize,
}

/// Training counts for one n-gram.
#[derive(Debug, Clone, Copy)]
struct Count {
    order: u8,
    count: u32,
    context: u64,
    suffix: u64,
}

/// Context statistics: total count of continuations and number of distinct ones.
#[derive(Debug, Clone, Copy, Default)]
struct ContextStats {
    total: u64,
    distinct: u64,
}

/// Trains a model on `texts` (deterministic: the same texts in the same order give the same
/// model and the same bytes).
pub fn train<'a>(texts: impl Iterator<Item = &'a str>, params: LmParams) -> CharLm {
    let params = LmParams {
        order: params.order.clamp(1, MAX_ORDER),
        discount: params.discount.clamp(0.01, 0.99),
        min_count: params.min_count.max(1),
    };
    let order = params.order;
    let mut counts: HashMap<u64, Count> = HashMap::new();
    let mut prev = [0u64; MAX_ORDER];
    for text in texts {
        let mut hasher = NgramHasher::new(order);
        let mut first = true;
        for c in text.chars() {
            hasher.push(symbol(c).0);
            let hs = hasher.hashes();
            for (k, &h) in hs.iter().enumerate() {
                // The context of the order-(k+1) n-gram is the order-k n-gram ending one
                // character earlier; at the first character it is all start symbols (0).
                let context = if k == 0 || first { 0 } else { prev[k - 1] };
                let suffix = if k == 0 { 0 } else { hs[k - 1] };
                counts
                    .entry(h)
                    .and_modify(|c| c.count = c.count.saturating_add(1))
                    .or_insert(Count {
                        order: (k + 1) as u8,
                        count: 1,
                        context,
                        suffix,
                    });
            }
            prev[..order].copy_from_slice(hs);
            first = false;
        }
    }
    estimate(&counts, params)
}

fn estimate(counts: &HashMap<u64, Count>, params: LmParams) -> CharLm {
    let d = f64::from(params.discount);
    // Deterministic processing order: by order, then hash.
    let mut grams: Vec<(u64, Count)> = counts.iter().map(|(h, c)| (*h, *c)).collect();
    grams.sort_unstable_by_key(|(h, c)| (c.order, *h));

    let mut unigram_total = 0u64;
    let mut contexts: HashMap<u64, ContextStats> = HashMap::new();
    for (_, c) in &grams {
        if c.order == 1 {
            unigram_total += u64::from(c.count);
        } else {
            let s = contexts.entry(c.context).or_default();
            s.total += u64::from(c.count);
            s.distinct += 1;
        }
    }
    let unigram_types = grams.iter().filter(|(_, c)| c.order == 1).count() as u64;
    let denom = (unigram_total + unigram_types + 1) as f64;
    let unk_bits = (denom).log2();

    // Interpolated log-probabilities, lower orders first.
    let mut logp: HashMap<u64, f64> = HashMap::with_capacity(grams.len());
    for (h, c) in &grams {
        let p = if c.order == 1 {
            (f64::from(c.count) + 1.0) / denom
        } else {
            let lower = logp
                .get(&c.suffix)
                .map_or(1.0 / denom, |bits| (-bits).exp2());
            match contexts.get(&c.context) {
                Some(s) if s.total > 0 => {
                    let total = s.total as f64;
                    let gamma = d * s.distinct as f64 / total;
                    (f64::from(c.count) - d).max(0.0) / total + gamma * lower
                }
                _ => lower,
            }
        };
        logp.insert(*h, -p.log2());
    }

    let mut entries: Vec<(u32, u16, u16)> = Vec::new();
    for (h, c) in &grams {
        if c.order >= 3 && c.count < params.min_count {
            continue;
        }
        let cost = logp.get(h).copied().unwrap_or(unk_bits);
        let backoff = contexts
            .get(h)
            .filter(|s| s.total > 0)
            .map_or(0.0, |s| -(d * s.distinct as f64 / s.total as f64).log2());
        entries.push((key32(*h), quantise(cost), quantise(backoff)));
    }
    entries.sort_unstable();
    entries.dedup_by_key(|e| e.0);
    CharLm::from_entries(params, quantise(unk_bits), entries)
}

fn quantise(bits: f64) -> u16 {
    (bits * f64::from(SCALE))
        .round()
        .clamp(0.0, f64::from(u16::MAX)) as u16
}

impl CharLm {
    fn from_entries(params: LmParams, unk_cost: u16, entries: Vec<(u32, u16, u16)>) -> CharLm {
        let capacity = (entries.len() * 2).next_power_of_two().max(16);
        let mask = capacity - 1;
        let mut table = vec![0u32; capacity];
        for &(key, cost, backoff) in &entries {
            let mut i = slot(key, mask);
            while table.get(i).copied().unwrap_or(0) != 0 {
                i = (i + 1) & mask;
            }
            if let Some(s) = table.get_mut(i) {
                let cost8 = (u32::from(cost) + 16) / 32;
                let backoff8 = (u32::from(backoff) + 8) / 16;
                *s = u32::from(fingerprint(key)) << 16 | cost8.min(255) << 8 | backoff8.min(255);
            }
        }
        CharLm {
            params,
            unk_cost,
            entries,
            table,
            mask,
        }
    }

    /// The parameters the model was trained with.
    pub fn params(&self) -> LmParams {
        self.params
    }

    /// Number of stored n-grams.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the model stores no n-gram.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The stored `(cost, backoff)` of an n-gram hash, in 1/256 bit.
    #[inline]
    fn get(&self, h: u64) -> Option<(u16, u16)> {
        let key = key32(h);
        let fp = u32::from(fingerprint(key));
        let mut i = slot(key, self.mask);
        loop {
            let v = *self.table.get(i)?;
            if v == 0 {
                return None;
            }
            if v >> 16 == fp {
                return Some((((v >> 8) & 0xff) as u16 * 32, (v & 0xff) as u16 * 16));
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Surprisal in bits of the current character given the previous ones: `now` holds the
    /// hashes of the n-grams ending at it, `before` those ending one character earlier, and
    /// `state` what the previous call matched. Back-off evaluation as in an ARPA model, started
    /// at one order above the previous match (pruning keeps the model prefix-closed, so no
    /// longer n-gram can be stored), which saves most probes.
    #[inline]
    pub fn cost(&self, now: &[u64], before: &[u64], state: &mut LmState) -> f32 {
        let n = now.len();
        let top = if state.valid {
            (state.matched + 1).min(n)
        } else {
            n
        };
        let mut acc = 0u32;
        let mut k = top;
        while k >= 1 {
            if let Some((cost, backoff)) = now.get(k - 1).and_then(|h| self.get(*h)) {
                *state = LmState {
                    started: true,
                    valid: true,
                    matched: k,
                    matched_backoff: backoff,
                };
                return (acc + u32::from(cost)) as f32 / SCALE;
            }
            if k > 1 && state.started {
                // Back-off weight of the context: the order-(k−1) n-gram before this character.
                if state.valid && k - 1 == state.matched {
                    acc += u32::from(state.matched_backoff);
                } else if let Some((_, backoff)) = before.get(k - 2).and_then(|h| self.get(*h)) {
                    acc += u32::from(backoff);
                }
            }
            k -= 1;
        }
        *state = LmState {
            started: true,
            valid: true,
            matched: 0,
            matched_backoff: 0,
        };
        (acc + u32::from(self.unk_cost)) as f32 / SCALE
    }

    /// Mean surprisal of `text` in bits per character (0 for an empty text).
    pub fn mean_surprisal(&self, text: &str) -> f64 {
        let mut hasher = NgramHasher::new(self.params.order);
        let mut before = [0u64; MAX_ORDER];
        let mut state = LmState::default();
        let (mut sum, mut n) = (0.0f64, 0usize);
        for c in text.chars() {
            hasher.push(symbol(c).0);
            let now = hasher.hashes();
            sum += f64::from(self.cost(now, &before, &mut state));
            before = hasher.hash_array();
            n += 1;
        }
        if n == 0 { 0.0 } else { sum / n as f64 }
    }

    /// The serialised model (see the module docs for the layout).
    pub fn to_bytes(&self) -> Result<Vec<u8>, DetectError> {
        let n = self.entries.len();
        let mut payload = Vec::with_capacity(n * 8);
        let mut last = 0u32;
        for &(key, _, _) in &self.entries {
            payload.extend_from_slice(&key.wrapping_sub(last).to_le_bytes());
            last = key;
        }
        for &(_, cost, _) in &self.entries {
            payload.extend_from_slice(&cost.to_le_bytes());
        }
        for &(_, _, backoff) in &self.entries {
            payload.extend_from_slice(&backoff.to_le_bytes());
        }
        let compressed = zstd::bulk::compress(&payload, 19)
            .map_err(|e| DetectError::Failed(format!("cannot compress the model: {e}")))?;
        let mut out = Vec::with_capacity(compressed.len() + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(self.params.order as u8);
        out.extend_from_slice(&self.params.discount.to_le_bytes());
        out.extend_from_slice(&self.params.min_count.to_le_bytes());
        out.extend_from_slice(&self.unk_cost.to_le_bytes());
        out.extend_from_slice(&(n as u32).to_le_bytes());
        out.extend_from_slice(&compressed);
        Ok(out)
    }

    /// Parses a serialised model after checking `bytes` against `sha256_hex` (the first
    /// whitespace-separated field of a `sha256sum` line, or the bare hex digest).
    pub fn from_bytes_checked(
        bytes: &[u8],
        sha256_hex: &str,
        what: &str,
    ) -> Result<CharLm, DetectError> {
        verify_sha256(bytes, sha256_hex, what)?;
        CharLm::from_bytes(bytes, what)
    }

    /// Reads a model file and its `<file>.sha256` beside it; refuses a missing or wrong
    /// checksum.
    pub fn load(path: &Path) -> Result<CharLm, DetectError> {
        let what = path.display().to_string();
        let load_err = |message: String| DetectError::Load {
            what: what.clone(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| load_err(format!("cannot read: {e}")))?;
        let sum_path = checksum_path(path);
        let sum = std::fs::read_to_string(&sum_path).map_err(|e| {
            load_err(format!(
                "cannot read its checksum file {}: {e}",
                sum_path.display()
            ))
        })?;
        CharLm::from_bytes_checked(&bytes, &sum, &what)
    }

    /// The embedded English model, checked against its embedded checksum.
    pub fn embedded() -> Result<CharLm, DetectError> {
        CharLm::from_bytes_checked(
            EMBEDDED_LM,
            EMBEDDED_LM_SHA256,
            "embedded models/char-lm-en.bin",
        )
    }

    fn from_bytes(bytes: &[u8], what: &str) -> Result<CharLm, DetectError> {
        let load_err = |message: &str| DetectError::Load {
            what: what.to_owned(),
            message: message.to_owned(),
        };
        let mut r = Reader { bytes, pos: 0 };
        if r.take(8).ok_or_else(|| load_err("truncated header"))? != MAGIC {
            return Err(load_err("not a tripwire character model (bad magic)"));
        }
        let version = r.u32().ok_or_else(|| load_err("truncated header"))?;
        if version != VERSION {
            return Err(load_err(&format!(
                "format version {version}, this build reads version {VERSION}"
            )));
        }
        let order = usize::from(r.take(1).and_then(|b| b.first().copied()).unwrap_or(0));
        let discount = f32::from_bits(r.u32().ok_or_else(|| load_err("truncated header"))?);
        let min_count = r.u32().ok_or_else(|| load_err("truncated header"))?;
        let unk_cost = r.u16().ok_or_else(|| load_err("truncated header"))?;
        let n = r.u32().ok_or_else(|| load_err("truncated header"))? as usize;
        if !(1..=MAX_ORDER).contains(&order) || !(0.0..1.0).contains(&discount) {
            return Err(load_err("invalid parameters in the header"));
        }
        let rest = bytes.get(r.pos..).unwrap_or(&[]);
        let payload = zstd::bulk::decompress(rest, n.saturating_mul(8).max(1))
            .map_err(|e| load_err(&format!("cannot decompress the entries: {e}")))?;
        if payload.len() != n * 8 {
            return Err(load_err("entry count does not match the payload"));
        }
        let mut p = Reader {
            bytes: &payload,
            pos: 0,
        };
        let mut keys = Vec::with_capacity(n);
        let mut last = 0u32;
        for _ in 0..n {
            last = last.wrapping_add(p.u32().ok_or_else(|| load_err("truncated payload"))?);
            keys.push(last);
        }
        let mut costs = Vec::with_capacity(n);
        for _ in 0..n {
            costs.push(p.u16().ok_or_else(|| load_err("truncated payload"))?);
        }
        let mut entries = Vec::with_capacity(n);
        for (key, cost) in keys.into_iter().zip(costs) {
            let backoff = p.u16().ok_or_else(|| load_err("truncated payload"))?;
            entries.push((key, cost, backoff));
        }
        let params = LmParams {
            order,
            discount,
            min_count,
        };
        Ok(CharLm::from_entries(params, unk_cost, entries))
    }
}

/// The 16-bit fingerprint a table slot keeps of a key (never 0).
#[inline]
fn fingerprint(key: u32) -> u16 {
    let fp = (key >> 16) as u16;
    if fp == 0 { 1 } else { fp }
}

#[inline]
fn slot(key: u32, mask: usize) -> usize {
    (u64::from(key).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as usize & mask
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.bytes.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_le_bytes)
    }
}

/// `<path>.sha256`.
pub fn checksum_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Checks `bytes` against the digest in `sha256_line` (`sha256sum` format or bare hex).
pub fn verify_sha256(bytes: &[u8], sha256_line: &str, what: &str) -> Result<(), DetectError> {
    let expected = sha256_line
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    let actual = sha256_hex(bytes);
    if expected != actual {
        return Err(DetectError::Load {
            what: what.to_owned(),
            message: format!(
                "sha256 mismatch: expected {expected:?}, file has {actual}; the file is corrupt \
                 or does not match its checksum (retrain with `tripwire train-lm`)"
            ),
        });
    }
    Ok(())
}

/// Options of [`train_lm`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Model parameters.
    pub params: LmParams,
    /// Also train on the `instruction` field, not only `output`.
    pub include_instructions: bool,
    /// How many words the word list keeps (the most frequent).
    pub max_words: usize,
    /// Words seen fewer times are left out of the word list.
    pub min_word_count: u32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            params: LmParams::default(),
            include_instructions: false,
            max_words: 40_000,
            min_word_count: 2,
        }
    }
}

/// What [`train_lm`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// Texts trained on.
    pub texts: usize,
    /// Characters trained on.
    pub chars: usize,
    /// N-grams kept in the model.
    pub ngrams: usize,
    /// The model file.
    pub model_path: PathBuf,
    /// Its size in bytes.
    pub model_bytes: usize,
    /// Its sha256 (also written to `<model>.sha256`).
    pub sha256: String,
    /// The word list file.
    pub words_path: PathBuf,
    /// Words in it.
    pub words: usize,
}

/// File name of the model [`train_lm`] writes.
pub const MODEL_FILE: &str = "char-lm-en.bin";
/// File name of the word list [`train_lm`] writes.
pub const WORDS_FILE: &str = "words-en.txt";

/// Trains the character model and the word list on the `output` fields (and the
/// `instruction` fields when asked) of JSONL(.gz) corpus files, in the order given, and writes
/// `char-lm-en.bin`, `char-lm-en.bin.sha256` and `words-en.txt` into `out_dir`.
pub fn train_lm(
    corpus: &[PathBuf],
    out_dir: &Path,
    options: &TrainOptions,
) -> Result<TrainReport, DetectError> {
    let mut texts = Vec::new();
    for path in corpus {
        for (instruction, output) in read_jsonl(path)? {
            if options.include_instructions {
                texts.push(instruction);
            }
            texts.push(output);
        }
    }
    if texts.is_empty() {
        return Err(DetectError::Config(
            "the training corpus has no text".to_owned(),
        ));
    }
    let lm = train(texts.iter().map(String::as_str), options.params);
    let bytes = lm.to_bytes()?;
    let words = word_list(texts.iter().map(String::as_str), options);

    let write_err = |path: &Path, e: std::io::Error| {
        DetectError::Failed(format!("cannot write {}: {e}", path.display()))
    };
    std::fs::create_dir_all(out_dir).map_err(|e| write_err(out_dir, e))?;
    let model_path = out_dir.join(MODEL_FILE);
    std::fs::write(&model_path, &bytes).map_err(|e| write_err(&model_path, e))?;
    let sha256 = sha256_hex(&bytes);
    let sum_path = checksum_path(&model_path);
    std::fs::write(&sum_path, format!("{sha256}  {MODEL_FILE}\n"))
        .map_err(|e| write_err(&sum_path, e))?;
    let words_path = out_dir.join(WORDS_FILE);
    let mut words_text = String::new();
    for w in &words {
        words_text.push_str(w);
        words_text.push('\n');
    }
    std::fs::write(&words_path, words_text).map_err(|e| write_err(&words_path, e))?;
    Ok(TrainReport {
        texts: texts.len(),
        chars: texts.iter().map(|t| t.chars().count()).sum(),
        ngrams: lm.len(),
        model_path,
        model_bytes: bytes.len(),
        sha256,
        words_path,
        words: words.len(),
    })
}

/// The most frequent lowercase words of `texts` (runs of letters, with inner apostrophes
/// split off), by count then alphabetically.
pub fn word_list<'a>(texts: impl Iterator<Item = &'a str>, options: &TrainOptions) -> Vec<String> {
    let mut counts: HashMap<String, u32> = HashMap::new();
    for text in texts {
        for word in text.split(|c: char| !c.is_alphabetic()) {
            if word.is_empty() {
                continue;
            }
            let lower = word.to_lowercase();
            *counts.entry(lower).or_default() += 1;
        }
    }
    let mut words: Vec<(String, u32)> = counts
        .into_iter()
        .filter(|(_, n)| *n >= options.min_word_count)
        .collect();
    words.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    words.truncate(options.max_words);
    words.into_iter().map(|(w, _)| w).collect()
}

/// `(instruction, output)` of every line of a JSONL or JSONL.gz file (gzip detected by its
/// magic bytes). Lines without an `output` string are errors; a missing `instruction` is
/// empty.
pub fn read_jsonl(path: &Path) -> Result<Vec<(String, String)>, DetectError> {
    let what = path.display().to_string();
    let load_err = |message: String| DetectError::Load {
        what: what.clone(),
        message,
    };
    let file = File::open(path).map_err(|e| load_err(format!("cannot open: {e}")))?;
    let mut raw = BufReader::new(file);
    let is_gzip = raw
        .fill_buf()
        .map_err(|e| load_err(format!("cannot read: {e}")))?
        .starts_with(&[0x1f, 0x8b]);
    let mut text = String::new();
    if is_gzip {
        MultiGzDecoder::new(raw).read_to_string(&mut text)
    } else {
        raw.read_to_string(&mut text)
    }
    .map_err(|e| load_err(format!("cannot read: {e}")))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| load_err(format!("line {}: invalid JSON: {e}", i + 1)))?;
        let Some(output) = value.get("output").and_then(serde_json::Value::as_str) else {
            return Err(load_err(format!(
                "line {}: no string field `output`",
                i + 1
            )));
        };
        let instruction = value
            .get("instruction")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("");
        out.push((instruction.to_owned(), output.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENGLISH: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps in the \
        sun while the fox runs into the forest. Every morning the fox comes back and the dog \
        barks at it, but the fox does not care about the dog at all.";

    fn tiny() -> CharLm {
        let texts = [
            ENGLISH,
            ENGLISH,
            "the cat sat on the mat, and the dog sat on the log.",
        ];
        train(texts.into_iter(), LmParams::default())
    }

    #[test]
    fn english_is_less_surprising_than_noise() {
        let lm = tiny();
        let clean = lm.mean_surprisal("the dog and the fox sat in the sun");
        let noise = lm.mean_surprisal("qxz vjk wpq zzkq jjx vvbq kxq zqw");
        assert!(clean < noise, "clean {clean} noise {noise}");
        assert!(noise > 6.0, "noise {noise}");
    }

    #[test]
    fn training_twice_gives_identical_bytes() {
        let a = tiny().to_bytes().unwrap();
        let b = tiny().to_bytes().unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn save_load_round_trip() {
        let lm = tiny();
        let bytes = lm.to_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lm.bin");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(
            checksum_path(&path),
            format!("{}  lm.bin\n", sha256_hex(&bytes)),
        )
        .unwrap();
        let loaded = CharLm::load(&path).unwrap();
        assert_eq!(loaded.entries, lm.entries);
        assert_eq!(loaded.params(), lm.params());
        let text = "the fox and the dog, again and again: 1234!";
        assert_eq!(loaded.mean_surprisal(text), lm.mean_surprisal(text));
    }

    #[test]
    fn corrupted_file_is_refused() {
        let bytes = tiny().to_bytes().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lm.bin");
        std::fs::write(checksum_path(&path), sha256_hex(&bytes)).unwrap();
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        let err = CharLm::load(&path).unwrap_err().to_string();
        assert!(err.contains("sha256 mismatch"), "{err}");
        // Missing checksum file.
        std::fs::remove_file(checksum_path(&path)).unwrap();
        let err = CharLm::load(&path).unwrap_err().to_string();
        assert!(err.contains("checksum file"), "{err}");
        // A right checksum over a wrong file still fails on parsing.
        let err = CharLm::from_bytes_checked(b"garbage", &sha256_hex(b"garbage"), "x")
            .unwrap_err()
            .to_string();
        assert!(err.contains("magic") || err.contains("truncated"), "{err}");
    }

    #[test]
    fn embedded_model_matches_its_checksum() {
        let lm = CharLm::embedded().unwrap();
        assert!(lm.len() > 10_000);
        assert_eq!(
            sha256_hex(EMBEDDED_LM),
            EMBEDDED_LM_SHA256.split_whitespace().next().unwrap()
        );
        let clean = lm.mean_surprisal(ENGLISH);
        assert!(clean < 3.0, "English costs {clean} bits/char");
    }

    /// Retrains on the train split and compares with the committed model. Set
    /// `TRIPWIRE_WRITE_MODELS=1` to write the result into `models/` instead.
    #[test]
    #[ignore = "trains on the whole train split (about a minute in release)"]
    fn committed_model_is_reproducible() {
        let data = crate::lab::devset::test_data_dir();
        let write = std::env::var("TRIPWIRE_WRITE_MODELS").is_ok_and(|v| v == "1");
        let tmp = tempfile::tempdir().unwrap();
        let models = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
        let out = if write {
            models.clone()
        } else {
            tmp.path().to_path_buf()
        };
        let report = train_lm(
            &crate::lab::devset::train_corpus(&data),
            &out,
            &TrainOptions::default(),
        )
        .unwrap();
        eprintln!("{report:?}");
        let committed = std::fs::read(models.join(MODEL_FILE)).unwrap();
        assert_eq!(std::fs::read(&report.model_path).unwrap(), committed);
        assert_eq!(
            std::fs::read(&report.words_path).unwrap(),
            std::fs::read(models.join(WORDS_FILE)).unwrap()
        );
    }

    #[test]
    fn symbols_fold_case_digits_and_scripts() {
        assert_eq!(symbol('A').0, u32::from(b'a'));
        assert_eq!(symbol('7').0, u32::from(b'0'));
        assert_eq!(symbol('É').0, 'é' as u32);
        assert_eq!(symbol('中').0, symbol('文').0);
        assert_eq!(symbol('中').1, Some(Script::Cjk));
        assert_eq!(symbol('ア').1, Some(Script::Cjk));
        assert_eq!(symbol('ж').1, Some(Script::Cyrillic));
        assert_eq!(symbol(',').1, None);
    }

    #[test]
    fn train_lm_writes_model_checksum_and_words() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("c.jsonl");
        let mut lines = String::new();
        for _ in 0..3 {
            lines.push_str(
                &serde_json::json!({"instruction": "say", "output": ENGLISH}).to_string(),
            );
            lines.push('\n');
        }
        std::fs::write(&corpus, lines).unwrap();
        let out = dir.path().join("models");
        let report = train_lm(
            std::slice::from_ref(&corpus),
            &out,
            &TrainOptions::default(),
        )
        .unwrap();
        let first = std::fs::read(&report.model_path).unwrap();
        let lm = CharLm::load(&report.model_path).unwrap();
        assert_eq!(lm.len(), report.ngrams);
        let words = std::fs::read_to_string(&report.words_path).unwrap();
        assert_eq!(words.lines().next(), Some("the"));
        let again = train_lm(&[corpus], &out, &TrainOptions::default()).unwrap();
        assert_eq!(again.sha256, report.sha256);
        assert_eq!(std::fs::read(&again.model_path).unwrap(), first);
    }
}
