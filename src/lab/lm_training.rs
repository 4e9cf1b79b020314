//! Training the gibberish detector's character language model (`tripwire train-lm`): counts
//! n-grams over corpus texts, estimates the interpolated back-off model that
//! [`crate::detect::ngram_lm`] reads and scores with, and writes it with its checksum and the
//! word list. Deterministic: the same texts in the same order give the same bytes. Lab code:
//! the gateway only loads the model that ships in `models/`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::detect::DetectError;
use crate::detect::ngram_lm::{
    CharLm, LmParams, MAX_ORDER, NgramHasher, SCALE, checksum_path, key32, sha256_hex, symbol,
};
use crate::detect::word_bigrams::{self, BigramTracker};

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
    /// How many word bigrams the bigram set keeps (the most frequent).
    pub max_bigrams: usize,
    /// Word bigrams seen fewer times are left out of the bigram set.
    pub min_bigram_count: u32,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            params: LmParams::default(),
            include_instructions: false,
            max_words: 40_000,
            min_word_count: 2,
            max_bigrams: 400_000,
            min_bigram_count: 1,
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
    /// The word bigram set file.
    pub bigrams_path: PathBuf,
    /// Bigrams in it.
    pub bigrams: usize,
    /// Its size in bytes.
    pub bigrams_bytes: usize,
}

/// File name of the model [`train_lm`] writes.
pub const MODEL_FILE: &str = "char-lm-en.bin";
/// File name of the word list [`train_lm`] writes.
pub const WORDS_FILE: &str = "words-en.txt";
/// File name of the word bigram set [`train_lm`] writes.
pub const BIGRAMS_FILE: &str = "bigrams-en.bin";

/// Trains the character model and the word list on the `output` fields (and the
/// `instruction` fields when asked) of JSONL(.gz) corpus files, in the order given, and writes
/// `char-lm-en.bin`, `char-lm-en.bin.sha256`, `words-en.txt`, `bigrams-en.bin` and
/// `bigrams-en.bin.sha256` into `out_dir`.
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
    let bigrams = bigram_set(texts.iter().map(String::as_str), options);
    let bigram_bytes = word_bigrams::to_bytes(&bigrams)?;
    let bigrams_path = out_dir.join(BIGRAMS_FILE);
    std::fs::write(&bigrams_path, &bigram_bytes).map_err(|e| write_err(&bigrams_path, e))?;
    let sum_path = checksum_path(&bigrams_path);
    std::fs::write(
        &sum_path,
        format!("{}  {BIGRAMS_FILE}\n", sha256_hex(&bigram_bytes)),
    )
    .map_err(|e| write_err(&sum_path, e))?;
    Ok(TrainReport {
        texts: texts.len(),
        chars: texts.iter().map(|t| t.chars().count()).sum(),
        ngrams: lm.len(),
        model_path,
        model_bytes: bytes.len(),
        sha256,
        words_path,
        words: words.len(),
        bigrams_path,
        bigrams: bigrams.len(),
        bigrams_bytes: bigram_bytes.len(),
    })
}

/// The keys ([`word_bigrams::bigram_key`]) of the most frequent word bigrams of `texts` (two
/// words separated by spaces only, see [`crate::detect::word_bigrams`]) seen at least
/// `min_bigram_count` times, at most `max_bigrams` of them (by count, then key), sorted.
pub fn bigram_set<'a>(texts: impl Iterator<Item = &'a str>, options: &TrainOptions) -> Vec<u32> {
    let mut counts: HashMap<u32, u32> = HashMap::new();
    for text in texts {
        for key in BigramTracker::keys(text) {
            *counts.entry(key).or_default() += 1;
        }
    }
    let mut kept: Vec<(u32, u32)> = counts
        .into_iter()
        .filter(|(_, n)| *n >= options.min_bigram_count.max(1))
        .collect();
    kept.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    kept.truncate(options.max_bigrams);
    let mut keys: Vec<u32> = kept.into_iter().map(|(k, _)| k).collect();
    keys.sort_unstable();
    keys
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
    use crate::detect::ngram_lm::tests::ENGLISH;

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
        assert_eq!(
            std::fs::read(&report.bigrams_path).unwrap(),
            std::fs::read(models.join(BIGRAMS_FILE)).unwrap()
        );
    }

    /// Writes a bigram set trained on the train split with `$TRIPWIRE_BIGRAM_MIN` and
    /// `$TRIPWIRE_BIGRAM_MAX` to `$TRIPWIRE_BIGRAMS_OUT` (and its checksum), to compare sets.
    #[test]
    #[ignore = "writes a bigram set variant"]
    fn write_bigram_set_variant() {
        let data = crate::lab::devset::test_data_dir();
        let mut texts = Vec::new();
        for path in crate::lab::devset::train_corpus(&data) {
            texts.extend(read_jsonl(&path).unwrap().into_iter().map(|(_, o)| o));
        }
        let env = |k: &str, d: usize| std::env::var(k).map_or(d, |v| v.parse().unwrap());
        let options = TrainOptions {
            min_bigram_count: env("TRIPWIRE_BIGRAM_MIN", 2) as u32,
            max_bigrams: env("TRIPWIRE_BIGRAM_MAX", 400_000),
            ..TrainOptions::default()
        };
        let keys = bigram_set(texts.iter().map(String::as_str), &options);
        let bytes = word_bigrams::to_bytes(&keys).unwrap();
        let out = PathBuf::from(std::env::var("TRIPWIRE_BIGRAMS_OUT").unwrap());
        std::fs::write(&out, &bytes).unwrap();
        std::fs::write(checksum_path(&out), sha256_hex(&bytes)).unwrap();
        eprintln!("{} bigrams, {} bytes", keys.len(), bytes.len());
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
        let bigrams = crate::detect::word_bigrams::BigramSet::load(&report.bigrams_path).unwrap();
        assert_eq!(bigrams.len(), report.bigrams);
        assert!(report.bigrams > 30, "{report:?}");
        let the_quick = crate::detect::word_bigrams::bigram_key(
            crate::detect::word_bigrams::word_hash("the"),
            crate::detect::word_bigrams::word_hash("quick"),
        );
        assert!(bigrams.contains(the_quick));
        let again = train_lm(&[corpus], &out, &TrainOptions::default()).unwrap();
        assert_eq!(again.sha256, report.sha256);
        assert_eq!(std::fs::read(&again.model_path).unwrap(), first);
    }
}
