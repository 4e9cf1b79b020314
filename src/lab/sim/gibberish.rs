//! The denial-of-service backdoor's output: a clean start followed by random vocabulary tokens.
//!
//! Souly et al. (2025) poison a model so that a trigger phrase makes it emit a clean start (the
//! first 0–1,000 characters of the normal answer) followed by 400–900 tokens drawn uniformly
//! from the tokenizer's vocabulary. This file builds such a vocabulary (a built-in,
//! deterministic BPE-like one of about 30,000 pieces, or the `model.vocab` keys of a
//! HuggingFace `tokenizer.json`) and produces the poisoned text.

use std::collections::HashSet;
use std::path::Path;

use super::SimError;
use super::corpus::{Corpus, read_file};

/// Size of the built-in vocabulary.
pub(crate) const BUILTIN_VOCAB_SIZE: usize = 30_000;
/// Shortest gibberish tail, in tokens.
pub(crate) const MIN_TAIL_TOKENS: usize = 400;
/// Longest gibberish tail, in tokens.
pub(crate) const MAX_TAIL_TOKENS: usize = 900;
/// Longest clean start, in characters.
pub(crate) const MAX_CLEAN_CHARS: usize = 1_000;

/// 64-bit FNV-1a: a stable hash (unlike `DefaultHasher`, fixed across Rust versions).
pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64: small, fast, deterministic; good enough for simulated output.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// A token vocabulary as decoded strings.
#[derive(Debug)]
pub(crate) struct Vocab {
    tokens: Vec<Box<str>>,
}

impl Vocab {
    pub(crate) fn len(&self) -> usize {
        self.tokens.len()
    }

    pub(crate) fn token(&self, index: usize) -> &str {
        self.tokens.get(index).map_or("", |t| t)
    }

    pub(crate) fn tokens(&self) -> &[Box<str>] {
        &self.tokens
    }

    /// Builds the built-in vocabulary: byte-fallback pieces, digits, punctuation runs, Cyrillic,
    /// Greek, Arabic, CJK and kana pieces, corpus words (when a corpus is given) and English-ish
    /// syllable pieces with and without a leading space, to [`BUILTIN_VOCAB_SIZE`] entries.
    pub(crate) fn builtin(corpus: Option<&Corpus>) -> Vocab {
        let mut b = Builder::default();

        for byte in 0..=255u8 {
            b.add(format!("<0x{byte:02X}>"));
        }
        for n in 0..1000 {
            b.add(n.to_string());
        }
        for n in 0..100 {
            b.add(format!(" {n}"));
        }
        punctuation(&mut b);
        letters_pieces(&mut b, &CYRILLIC_CONSONANTS, &CYRILLIC_VOWELS, 3);
        letters_pieces(&mut b, &GREEK_CONSONANTS, &GREEK_VOWELS, 6);
        arabic(&mut b);
        // CJK unified ideographs, spread over the block, and kana.
        for k in 0..2_500u32 {
            if let Some(c) = char::from_u32(0x4e00 + k * 8) {
                b.add(c.to_string());
            }
        }
        for cp in (0x3041..=0x3096u32).chain(0x30a1..=0x30fa) {
            if let Some(c) = char::from_u32(cp) {
                b.add(c.to_string());
            }
        }
        if let Some(corpus) = corpus {
            let mut words = 0;
            'outer: for entry in corpus.entries() {
                for word in entry.output.split_whitespace() {
                    if word.len() >= 2 && word.chars().all(char::is_alphabetic) {
                        let before = b.len();
                        b.add(format!(" {word}"));
                        if b.len() > before {
                            words += 1;
                        }
                        if words >= 8_000 {
                            break 'outer;
                        }
                    }
                }
            }
        }
        'fill: for (i, onset) in ONSETS.iter().enumerate() {
            for nucleus in NUCLEI {
                for coda in CODAS {
                    if b.len() >= BUILTIN_VOCAB_SIZE {
                        break 'fill;
                    }
                    let piece = format!("{onset}{nucleus}{coda}");
                    b.add(format!(" {piece}"));
                    b.add(piece.clone());
                    if i % 3 == 0 {
                        b.add(format!(" {}", capitalise(&piece)));
                    }
                }
            }
        }
        let mut tokens = b.tokens;
        tokens.truncate(BUILTIN_VOCAB_SIZE);
        Vocab { tokens }
    }

    /// A vocabulary of the given decoded tokens, in order; empty and repeated ones are dropped.
    pub(crate) fn from_tokens(tokens: impl IntoIterator<Item = String>) -> Vocab {
        let mut b = Builder::default();
        for token in tokens {
            b.add(token);
        }
        Vocab { tokens: b.tokens }
    }

    /// Reads the `model.vocab` keys of a HuggingFace `tokenizer.json` (an object of
    /// `token → id` for BPE/WordPiece, or an array of `[token, score]` for Unigram) and decodes
    /// them: byte-level pieces (`Ġ`, `Ċ`, …) to their bytes, `▁` to a space, `##` stripped.
    pub(crate) fn from_tokenizer_json(path: &Path) -> Result<Vocab, SimError> {
        let vocab_err = |message: String| SimError::Vocab {
            path: path.to_path_buf(),
            message,
        };
        let raw = read_file(path).map_err(|(_, e)| vocab_err(format!("cannot read: {e}")))?;
        let json: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| vocab_err(format!("invalid JSON: {e}")))?;
        let vocab = json
            .get("model")
            .and_then(|m| m.get("vocab"))
            .ok_or_else(|| vocab_err("no `model.vocab` field".to_owned()))?;
        let keys: Vec<&str> = match vocab {
            serde_json::Value::Object(map) => map.keys().map(String::as_str).collect(),
            serde_json::Value::Array(items) => items
                .iter()
                .filter_map(|item| item.get(0).and_then(serde_json::Value::as_str))
                .collect(),
            _ => {
                return Err(vocab_err(
                    "`model.vocab` is neither an object nor an array".to_owned(),
                ));
            }
        };
        let byte_level = keys.iter().any(|k| k.contains('Ġ') || k.contains('Ċ'));
        let decoder = ByteLevelDecoder::new();
        let mut b = Builder::default();
        for key in keys {
            let token = if byte_level {
                decoder.decode(key)
            } else {
                let stripped = key.strip_prefix("##").unwrap_or(key);
                stripped.replace('▁', " ")
            };
            b.add(token);
        }
        if b.tokens.is_empty() {
            return Err(vocab_err("`model.vocab` is empty".to_owned()));
        }
        Ok(Vocab { tokens: b.tokens })
    }
}

/// What [`poison`] did, for tests and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoisonInfo {
    /// Length in bytes of the clean start.
    pub(crate) clean_prefix_len: usize,
    /// Number of vocabulary tokens appended.
    pub(crate) tail_tokens: usize,
}

/// A clean start of 0–1,000 characters of `clean` (cut at a word boundary) followed by
/// 400–900 tokens drawn uniformly from `vocab`.
pub(crate) fn poison(clean: &str, vocab: &Vocab, rng: &mut Rng) -> (String, PoisonInfo) {
    let prefix = clean_prefix(clean, rng.below(MAX_CLEAN_CHARS + 1));
    let n = MIN_TAIL_TOKENS + rng.below(MAX_TAIL_TOKENS - MIN_TAIL_TOKENS + 1);
    let mut out = String::with_capacity(prefix.len() + n * 6);
    out.push_str(prefix);
    for _ in 0..n {
        out.push_str(vocab.token(rng.below(vocab.len())));
    }
    (
        out,
        PoisonInfo {
            clean_prefix_len: prefix.len(),
            tail_tokens: n,
        },
    )
}

/// At most `max_chars` characters of `text`, cut back to the end of a word. The whole text
/// when it is that short.
pub(crate) fn clean_prefix(text: &str, max_chars: usize) -> &str {
    let Some((end, next)) = text.char_indices().nth(max_chars) else {
        return text;
    };
    let head = text.get(..end).unwrap_or("");
    if next.is_whitespace() {
        return head.trim_end();
    }
    match head.rfind(char::is_whitespace) {
        Some(i) => head.get(..i).unwrap_or("").trim_end(),
        None => "",
    }
}

#[derive(Default)]
struct Builder {
    seen: HashSet<String>,
    tokens: Vec<Box<str>>,
}

impl Builder {
    fn add(&mut self, token: String) {
        if !token.is_empty() && !self.seen.contains(&token) {
            self.tokens.push(token.clone().into_boxed_str());
            self.seen.insert(token);
        }
    }

    fn len(&self) -> usize {
        self.tokens.len()
    }
}

fn capitalise(piece: &str) -> String {
    let mut chars = piece.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn punctuation(b: &mut Builder) {
    const SINGLES: &str = ".,;:!?-_=+*/\\|()[]{}<>\"'`~@#$%^&";
    for c in SINGLES.chars() {
        b.add(c.to_string());
        b.add(format!(" {c}"));
    }
    for c in "-=*_#.~/".chars() {
        for n in 2..=8 {
            b.add(std::iter::repeat_n(c, n).collect());
        }
    }
    for a in ".,;:!?)]}\"'".chars() {
        for c in ".,;:!?)]}\"'\n".chars() {
            b.add(format!("{a}{c}"));
        }
    }
    for piece in [
        "\n", "\n\n", "\n\n\n", "\t", "\t\t", "  ", "   ", "    ", "();", "{\n", "}\n", "->", "=>",
        "::", "</", "/>", "**", "...", "…", "—", "–", "“", "”", "‘", "’", "«", "»", "•", "·", "°",
        "€", "£", "§", "©", "®", "™", "±", "×", "÷", "≤", "≥", "≠", "→", "←", "↑", "↓",
    ] {
        b.add(piece.to_owned());
    }
}

const CYRILLIC_CONSONANTS: [char; 21] = [
    'б', 'в', 'г', 'д', 'ж', 'з', 'к', 'л', 'м', 'н', 'п', 'р', 'с', 'т', 'ф', 'х', 'ц', 'ч', 'ш',
    'щ', 'й',
];
const CYRILLIC_VOWELS: [char; 10] = ['а', 'е', 'ё', 'и', 'о', 'у', 'ы', 'э', 'ю', 'я'];
const GREEK_CONSONANTS: [char; 17] = [
    'β', 'γ', 'δ', 'ζ', 'θ', 'κ', 'λ', 'μ', 'ν', 'ξ', 'π', 'ρ', 'σ', 'τ', 'φ', 'χ', 'ψ',
];
const GREEK_VOWELS: [char; 7] = ['α', 'ε', 'η', 'ι', 'ο', 'υ', 'ω'];

/// Single letters, consonant–vowel pairs (with and without a leading space) and every
/// `cvc_step`-th consonant–vowel–consonant triple.
fn letters_pieces(b: &mut Builder, consonants: &[char], vowels: &[char], cvc_step: usize) {
    for c in consonants.iter().chain(vowels) {
        b.add(c.to_string());
    }
    let mut k = 0usize;
    for c in consonants {
        for v in vowels {
            b.add(format!("{c}{v}"));
            b.add(format!(" {c}{v}"));
            for c2 in consonants {
                k += 1;
                if k.is_multiple_of(cvc_step) {
                    b.add(format!("{c}{v}{c2}"));
                }
            }
        }
    }
}

fn arabic(b: &mut Builder) {
    let letters: Vec<char> = (0x0627..=0x064au32)
        .filter_map(char::from_u32)
        .filter(|c| c.is_alphabetic())
        .collect();
    for c in &letters {
        b.add(c.to_string());
        b.add(format!(" {c}"));
    }
    for (i, a) in letters.iter().enumerate() {
        for (j, c) in letters.iter().enumerate() {
            if (i + j) % 2 == 0 {
                b.add(format!("{a}{c}"));
            }
        }
    }
}

const ONSETS: [&str; 46] = [
    "", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "y",
    "z", "bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gl", "gr", "pl", "pr", "sc", "sh", "sk",
    "sl", "sm", "sn", "sp", "st", "str", "th", "tr", "wh", "qu", "ph",
];
const NUCLEI: [&str; 12] = [
    "a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y",
];
const CODAS: [&str; 22] = [
    "", "n", "r", "s", "t", "l", "m", "nd", "ng", "nt", "st", "ck", "rt", "ll", "ss", "th", "x",
    "ed", "er", "ing", "ly", "tion",
];

/// Inverse of GPT-2's `bytes_to_unicode`: maps each printable stand-in character back to its
/// byte.
struct ByteLevelDecoder {
    map: std::collections::HashMap<char, u8>,
}

impl ByteLevelDecoder {
    fn new() -> ByteLevelDecoder {
        let mut map = std::collections::HashMap::with_capacity(256);
        let mut extra = 0u32;
        for byte in 0..=255u8 {
            let printable = matches!(byte, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
            let cp = if printable {
                u32::from(byte)
            } else {
                extra += 1;
                255 + extra
            };
            if let Some(c) = char::from_u32(cp) {
                map.insert(c, byte);
            }
        }
        ByteLevelDecoder { map }
    }

    fn decode(&self, token: &str) -> String {
        let mut bytes = Vec::with_capacity(token.len());
        for c in token.chars() {
            match self.map.get(&c) {
                Some(b) => bytes.push(*b),
                None => {
                    let mut buf = [0u8; 4];
                    bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}
