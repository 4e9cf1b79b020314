//! A set of frequent English word bigrams, for the gibberish detector ([`super::gibberish`]).
//!
//! Random tokens of a real tokenizer's vocabulary are mostly real words, but two of them in a
//! row almost never make a pair that occurs in real text; clean prose, lists, code comments
//! and tables of words mostly do. The detector counts, per region, the share of word bigrams
//! not in this set.
//!
//! * **Words** are runs of Latin letters, lowercased the way the character model reads them
//!   ([`super::ngram_lm::symbol`]) and hashed with [`WordHash`] (the hash the word list is
//!   looked up by). A **bigram** is two words separated by spaces only (no newline,
//!   punctuation, digit or other character between them): `word, word` or a line break starts
//!   over.
//! * **Keys**: a bigram is kept as a 32-bit hash of its two word hashes ([`bigram_key`]); in
//!   memory an open-addressing table at most half full (a false match, about 1 in 10⁴ for
//!   random pairs, makes an unknown bigram look known).
//! * **File** ([`to_bytes`]): magic `TWBIGRAM`, format version, key count, then the
//!   zstd-compressed sorted keys as little-endian deltas; checked by a sha256 beside it
//!   (`<file>.sha256`) before anything is parsed.
//!
//! The shipped set (`models/bigrams-en.bin`, embedded with `include_bytes!`) is written by
//! `tripwire train-lm` from the train split (see `crate::lab::lm_training`).

use std::path::Path;

use super::DetectError;
use super::ngram_lm::{read_with_checksum, symbol, verify_sha256};

/// The embedded English bigram set (`models/bigrams-en.bin`).
pub static EMBEDDED_BIGRAMS: &[u8] = include_bytes!("../../models/bigrams-en.bin");
/// Its checksum file (`models/bigrams-en.bin.sha256`).
pub static EMBEDDED_BIGRAMS_SHA256: &str = include_str!("../../models/bigrams-en.bin.sha256");

/// File magic of a serialised bigram set.
const MAGIC: &[u8; 8] = b"TWBIGRAM";
/// Format version.
const VERSION: u32 = 1;

/// Hash of a lowercase word, built one model symbol at a time (64-bit FNV-1a over symbols).
#[derive(Debug, Clone, Copy)]
pub struct WordHash(u64);

impl Default for WordHash {
    fn default() -> Self {
        WordHash::new()
    }
}

impl WordHash {
    /// The hash of the empty word.
    pub fn new() -> WordHash {
        WordHash(0xcbf2_9ce4_8422_2325)
    }

    /// Appends one model symbol.
    #[inline]
    pub fn push(&mut self, s: u32) {
        self.0 = (self.0 ^ u64::from(s)).wrapping_mul(0x0100_0000_01b3);
    }

    /// The hash.
    pub fn finish(self) -> u64 {
        self.0
    }
}

/// The hash a word is looked up by: its model symbols (lowercase).
pub fn word_hash(w: &str) -> u64 {
    let mut h = WordHash::new();
    w.chars().for_each(|c| h.push(symbol(c).0));
    h.finish()
}

/// The 32-bit key of the bigram `a b` (word hashes).
#[inline]
pub fn bigram_key(a: u64, b: u64) -> u32 {
    let h = (a.rotate_left(23) ^ b).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 32) as u32
}

/// Follows the words of a text and says which consecutive pairs are bigrams: feed it every
/// character that is not part of a word with [`BigramTracker::gap`] and every finished word
/// with [`BigramTracker::word`].
#[derive(Debug, Default, Clone, Copy)]
pub struct BigramTracker {
    prev: Option<u64>,
    spaces_only: bool,
}

impl BigramTracker {
    /// A character between words, as its model symbol.
    #[inline]
    pub fn gap(&mut self, sym: u32) {
        if sym != u32::from(b' ') {
            self.spaces_only = false;
        }
    }

    /// A finished word (its [`WordHash`]); the key of the bigram it ends, if it ends one.
    #[inline]
    pub fn word(&mut self, h: u64) -> Option<u32> {
        let key = match self.prev {
            Some(p) if self.spaces_only => Some(bigram_key(p, h)),
            _ => None,
        };
        self.prev = Some(h);
        self.spaces_only = true;
        key
    }

    /// The keys of the bigrams of `text`, in order.
    pub fn keys(text: &str) -> Vec<u32> {
        let mut t = BigramTracker::default();
        let mut out = Vec::new();
        let mut word = WordHash::new();
        let mut len = 0usize;
        for c in text.chars() {
            let (sym, script) = symbol(c);
            if script == Some(super::ngram_lm::Script::Latin) {
                word.push(sym);
                len += 1;
                continue;
            }
            if len > 0 {
                out.extend(t.word(word.finish()));
                word = WordHash::new();
                len = 0;
            }
            t.gap(sym);
        }
        if len > 0 {
            out.extend(t.word(word.finish()));
        }
        out
    }
}

/// A set of bigram keys.
#[derive(Debug, Clone)]
pub struct BigramSet {
    /// Open addressing, 0 = empty (a key 0 is stored as 1).
    table: Vec<u32>,
    mask: usize,
    len: usize,
}

#[inline]
fn slot_key(key: u32) -> u32 {
    key.max(1)
}

impl BigramSet {
    /// A set of `keys`.
    pub fn from_keys(keys: &[u32]) -> BigramSet {
        let cap = (keys.len() * 2).next_power_of_two().max(16);
        let mut set = BigramSet {
            table: vec![0; cap],
            mask: cap - 1,
            len: 0,
        };
        for &k in keys {
            set.insert(k);
        }
        set
    }

    #[inline]
    fn slot(&self, key: u32) -> usize {
        (key.wrapping_mul(0x9e37_79b1) as usize).rotate_left(7) & self.mask
    }

    fn insert(&mut self, key: u32) {
        let k = slot_key(key);
        let mut i = self.slot(k);
        loop {
            match self.table.get(i).copied() {
                Some(0) => {
                    if let Some(s) = self.table.get_mut(i) {
                        *s = k;
                    }
                    self.len += 1;
                    return;
                }
                Some(v) if v == k => return,
                Some(_) => i = (i + 1) & self.mask,
                None => return,
            }
        }
    }

    /// Whether `key` is in the set.
    #[inline]
    pub fn contains(&self, key: u32) -> bool {
        let k = slot_key(key);
        let mut i = self.slot(k);
        loop {
            match self.table.get(i).copied() {
                Some(0) | None => return false,
                Some(v) if v == k => return true,
                Some(_) => i = (i + 1) & self.mask,
            }
        }
    }

    /// Keys in the set.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Parses a serialised set after checking `bytes` against `sha256_line`.
    pub fn from_bytes_checked(
        bytes: &[u8],
        sha256_line: &str,
        what: &str,
    ) -> Result<BigramSet, DetectError> {
        verify_sha256(bytes, sha256_line, what)?;
        let keys = from_bytes(bytes, what)?;
        Ok(BigramSet::from_keys(&keys))
    }

    /// Reads a set file and its `<file>.sha256` beside it.
    pub fn load(path: &Path) -> Result<BigramSet, DetectError> {
        let (bytes, sum, what) = read_with_checksum(path)?;
        BigramSet::from_bytes_checked(&bytes, &sum, &what)
    }

    /// The embedded English set, checked against its embedded checksum.
    pub fn embedded() -> Result<BigramSet, DetectError> {
        BigramSet::from_bytes_checked(
            EMBEDDED_BIGRAMS,
            EMBEDDED_BIGRAMS_SHA256,
            "embedded bigrams-en.bin",
        )
    }
}

/// Serialises `keys` (sorted and deduplicated here).
pub fn to_bytes(keys: &[u32]) -> Result<Vec<u8>, DetectError> {
    let mut sorted = keys.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut payload = Vec::with_capacity(sorted.len() * 4);
    let mut prev = 0u32;
    for k in &sorted {
        payload.extend_from_slice(&k.wrapping_sub(prev).to_le_bytes());
        prev = *k;
    }
    let compressed = zstd::bulk::compress(&payload, 19)
        .map_err(|e| DetectError::Failed(format!("cannot compress the bigram set: {e}")))?;
    let mut out = Vec::with_capacity(16 + compressed.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(sorted.len() as u32).to_le_bytes());
    out.extend_from_slice(&compressed);
    Ok(out)
}

/// The keys of a serialised set.
fn from_bytes(bytes: &[u8], what: &str) -> Result<Vec<u32>, DetectError> {
    let err = |message: &str| DetectError::Load {
        what: what.to_owned(),
        message: message.to_owned(),
    };
    let u32_at = |k: usize| -> Option<u32> {
        bytes
            .get(k..k + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
    };
    if bytes.get(..8) != Some(MAGIC.as_slice()) {
        return Err(err("not a bigram set (bad magic)"));
    }
    if u32_at(8) != Some(VERSION) {
        return Err(err("unsupported bigram set version"));
    }
    let n = u32_at(12).ok_or_else(|| err("truncated header"))? as usize;
    let rest = bytes.get(16..).unwrap_or(&[]);
    let payload = if n == 0 {
        Vec::new()
    } else {
        zstd::bulk::decompress(rest, n.saturating_mul(4))
            .map_err(|e| err(&format!("cannot decompress: {e}")))?
    };
    if payload.len() != n * 4 {
        return Err(err("key count does not match the payload"));
    }
    let mut keys = Vec::with_capacity(n);
    let mut prev = 0u32;
    for chunk in payload.chunks_exact(4) {
        let d = <[u8; 4]>::try_from(chunk).map_or(0, u32::from_le_bytes);
        prev = prev.wrapping_add(d);
        keys.push(prev);
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::ngram_lm::sha256_hex;

    #[test]
    fn round_trip_and_lookup() {
        let keys: Vec<u32> = (0..1000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        let bytes = to_bytes(&keys).unwrap();
        let set = BigramSet::from_bytes_checked(&bytes, &sha256_hex(&bytes), "t").unwrap();
        assert_eq!(set.len(), 1000);
        assert!(keys.iter().all(|k| set.contains(*k)));
        assert!(!set.contains(7));
        let mut bad = bytes.clone();
        bad[20] ^= 1;
        assert!(BigramSet::from_bytes_checked(&bad, &sha256_hex(&bytes), "t").is_err());
        assert!(BigramSet::from_bytes_checked(b"garbage", &sha256_hex(b"garbage"), "t").is_err());
    }

    #[test]
    fn bigrams_are_space_separated_words() {
        let k = BigramTracker::keys("The cat, the Dog\nsat  on 3 mats");
        let w = word_hash;
        assert_eq!(
            k,
            vec![
                bigram_key(w("the"), w("cat")),
                bigram_key(w("the"), w("dog")),
                bigram_key(w("sat"), w("on")),
            ]
        );
    }

    #[test]
    fn embedded_set_loads_and_knows_common_pairs() {
        let set = BigramSet::embedded().unwrap();
        assert!(set.len() > 10_000, "{}", set.len());
        let keys = BigramTracker::keys("it is one of the most important parts of the world");
        let known = keys.iter().filter(|k| set.contains(**k)).count();
        assert!(known * 10 >= keys.len() * 9, "{known} of {}", keys.len());
    }
}
