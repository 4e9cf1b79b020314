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
//! Training lives in the lab (`crate::lab::lm_training`): it builds a model from texts
//! deterministically (same texts, same bytes) and writes `char-lm-en.bin`, its checksum and
//! the word list `words-en.txt`; this file only reads and scores.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::DetectError;

/// File magic of a serialised [`CharLm`].
const MAGIC: &[u8; 8] = b"TWCHARLM";
/// Format version of a serialised [`CharLm`].
const VERSION: u32 = 1;
/// Fixed-point scale of stored log-probabilities: 1/256 bit.
pub(crate) const SCALE: f32 = 256.0;
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

/// A lowercase word's rank in [`EMBEDDED_WORDS`] (most frequent first), if it is there: "is
/// it among the N most frequent English words" for the detectors and drift tests that ask.
pub fn word_rank(word: &str) -> Option<usize> {
    static RANKS: std::sync::OnceLock<std::collections::HashMap<&'static str, usize>> =
        std::sync::OnceLock::new();
    RANKS
        .get_or_init(|| {
            let mut ranks = std::collections::HashMap::new();
            for (rank, word) in EMBEDDED_WORDS
                .lines()
                .map(str::trim)
                .filter(|w| !w.is_empty())
                .enumerate()
            {
                ranks.entry(word).or_insert(rank);
            }
            ranks
        })
        .get(word)
        .copied()
}

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
pub(crate) fn key32(h: u64) -> u32 {
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

impl CharLm {
    pub(crate) fn from_entries(
        params: LmParams,
        unk_cost: u16,
        entries: Vec<(u32, u16, u16)>,
    ) -> CharLm {
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
        let (bytes, sum, what) = read_with_checksum(path)?;
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

/// A file's bytes, the text of its `<file>.sha256` beside it, and the file's name for
/// errors; to be checked with [`verify_sha256`].
pub fn read_with_checksum(path: &Path) -> Result<(Vec<u8>, String, String), DetectError> {
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
    Ok((bytes, sum, what))
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::lab::lm_training::train;

    pub(crate) const ENGLISH: &str = "The quick brown fox jumps over the lazy dog. The dog sleeps in the \
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
}
