//! Tokenization for the embedding model: the `tokenizers` crate reads the model's
//! `tokenizer.json`, and this module takes over padding and truncation.
//!
//! The MiniLM `tokenizer.json` pads every text to a fixed 128 tokens. That padding is switched
//! off here: each text is encoded on its own, truncated to `max_tokens`, and a batch is padded
//! only to its longest member ([`pad_batch`]). Texts of similar length are grouped first
//! ([`length_buckets`]) so little padding is run through the model.

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use super::InferError;

/// Which part of a text longer than `max_tokens` is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// The beginning.
    #[default]
    Head,
    /// Half the budget from the beginning, half from the end.
    HeadTail,
}

/// One encoded text: token ids with `[CLS]` and `[SEP]`, no padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Token ids.
    pub ids: Vec<i64>,
}

impl Encoded {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A padded batch, row-major `[rows, seq]`, ready for the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedBatch {
    /// Number of texts.
    pub rows: usize,
    /// Tokens per row (the longest text's length).
    pub seq: usize,
    /// `input_ids`.
    pub input_ids: Vec<i64>,
    /// `attention_mask`: 1 for a real token, 0 for padding.
    pub attention_mask: Vec<i64>,
    /// `token_type_ids`: all 0 (one segment per text).
    pub token_type_ids: Vec<i64>,
}

/// The model's tokenizer with padding off and our own truncation.
pub struct TextTokenizer {
    inner: Tokenizer,
    max_tokens: usize,
    truncation: Truncation,
    pad_id: i64,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("max_tokens", &self.max_tokens)
            .field("truncation", &self.truncation)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json`, switching off its padding and truncation.
    pub fn from_file(
        path: &Path,
        max_tokens: usize,
        truncation: Truncation,
    ) -> Result<TextTokenizer, InferError> {
        let mut inner = Tokenizer::from_file(path).map_err(|err| InferError::Tokenizer {
            context: path.display().to_string(),
            message: err.to_string(),
        })?;
        let pad_id = inner
            .get_padding()
            .map(|p| i64::from(p.pad_id))
            .or_else(|| inner.token_to_id("[PAD]").map(i64::from))
            .unwrap_or(0);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|err| InferError::Tokenizer {
                context: path.display().to_string(),
                message: err.to_string(),
            })?;
        Ok(TextTokenizer {
            inner,
            // Room for [CLS] and [SEP] and at least one token.
            max_tokens: max_tokens.max(3),
            truncation,
            pad_id,
        })
    }

    /// Encodes one text with its special tokens, truncated to `max_tokens`.
    pub fn encode(&self, text: &str) -> Result<Encoded, InferError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|err| InferError::Tokenizer {
                context: "encoding".to_owned(),
                message: err.to_string(),
            })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        Ok(Encoded {
            ids: truncate(ids, self.max_tokens, self.truncation),
        })
    }

    /// The padding token id.
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The longest input, in tokens.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }
}

/// Cuts `ids` (which start with `[CLS]` and end with `[SEP]`) to `max` tokens, keeping both
/// special tokens.
fn truncate(ids: Vec<i64>, max: usize, truncation: Truncation) -> Vec<i64> {
    let len = ids.len();
    if len <= max || len < 2 {
        return ids;
    }
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return ids;
    };
    let body = &ids[1..len - 1];
    let budget = max.saturating_sub(2);
    let mut out = Vec::with_capacity(max);
    out.push(first);
    match truncation {
        Truncation::Head => out.extend_from_slice(&body[..budget]),
        Truncation::HeadTail => {
            let head = budget.div_ceil(2);
            let tail = budget - head;
            out.extend_from_slice(&body[..head]);
            out.extend_from_slice(&body[body.len() - tail..]);
        }
    }
    out.push(last);
    out
}

/// Pads the texts to the longest of them.
pub fn pad_batch<'a>(texts: impl IntoIterator<Item = &'a Encoded>, pad_id: i64) -> PaddedBatch {
    let texts: Vec<&Encoded> = texts.into_iter().collect();
    let rows = texts.len();
    let seq = texts.iter().map(|t| t.len()).max().unwrap_or(0);
    let mut input_ids = Vec::with_capacity(rows * seq);
    let mut attention_mask = Vec::with_capacity(rows * seq);
    for text in &texts {
        input_ids.extend_from_slice(&text.ids);
        input_ids.extend(std::iter::repeat_n(pad_id, seq - text.len()));
        attention_mask.extend(std::iter::repeat_n(1, text.len()));
        attention_mask.extend(std::iter::repeat_n(0, seq - text.len()));
    }
    PaddedBatch {
        rows,
        seq,
        input_ids,
        attention_mask,
        token_type_ids: vec![0; rows * seq],
    }
}

/// Lengths up to this are batched together whatever the padding: runs this short cost less
/// than a separate model call.
const SHORT_TOKENS: usize = 16;
/// Most padding, as a share of a sub-batch's padded tokens, before a new sub-batch starts.
const MAX_PADDING_SHARE: f64 = 0.25;

/// Splits lengths sorted in ascending order into runs of similar length; returns each run's
/// end (exclusive). A text joins the current run while padding the run to its length wastes
/// at most a quarter of the padded tokens, or while it is short.
pub fn length_buckets(sorted_lengths: &[usize]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut count = 0usize;
    let mut sum = 0usize;
    for (i, &len) in sorted_lengths.iter().enumerate() {
        let padded = len * (count + 1);
        let waste = padded - (sum + len).min(padded);
        let fits = count == 0
            || len <= SHORT_TOKENS
            || (waste as f64) <= MAX_PADDING_SHARE * padded as f64;
        if !fits {
            ends.push(i);
            count = 0;
            sum = 0;
        }
        count += 1;
        sum += len;
    }
    if count > 0 {
        ends.push(sorted_lengths.len());
    }
    ends
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_special_tokens() {
        let ids: Vec<i64> = (0..10).collect();
        assert_eq!(
            truncate(ids.clone(), 6, Truncation::Head),
            vec![0, 1, 2, 3, 4, 9]
        );
        assert_eq!(
            truncate(ids.clone(), 6, Truncation::HeadTail),
            vec![0, 1, 2, 7, 8, 9]
        );
        assert_eq!(
            truncate(ids.clone(), 7, Truncation::HeadTail),
            vec![0, 1, 2, 3, 7, 8, 9]
        );
        assert_eq!(truncate(ids.clone(), 10, Truncation::Head), ids);
    }

    #[test]
    fn padding_goes_to_the_longest_in_the_batch() {
        let a = Encoded {
            ids: vec![101, 7, 102],
        };
        let b = Encoded {
            ids: vec![101, 102],
        };
        let batch = pad_batch([&a, &b], 0);
        assert_eq!((batch.rows, batch.seq), (2, 3));
        assert_eq!(batch.input_ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 1, 0]);
        assert_eq!(batch.token_type_ids, vec![0; 6]);
    }

    #[test]
    fn buckets_split_where_padding_would_be_wasted() {
        assert_eq!(length_buckets(&[]), Vec::<usize>::new());
        assert_eq!(length_buckets(&[5, 9, 16]), vec![3]);
        assert_eq!(length_buckets(&[20, 22, 24, 200, 210, 250]), vec![3, 6]);
        // Every run ends in order and covers everything.
        let lengths = [3, 4, 30, 31, 60, 120, 121, 256];
        let ends = length_buckets(&lengths);
        assert_eq!(ends.last(), Some(&lengths.len()));
        assert!(ends.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn minilm_tokenizer_loads_without_fixed_padding() {
        let paths = crate::infer::test_models();
        let tokenizer = TextTokenizer::from_file(&paths.tokenizer, 8, Truncation::Head).unwrap();
        let short = tokenizer.encode("hello world").unwrap();
        assert_eq!(
            short.len(),
            4,
            "[CLS] hello world [SEP], no padding: {short:?}"
        );
        assert_eq!(short.ids.first(), Some(&101));
        assert_eq!(short.ids.last(), Some(&102));
        let long = tokenizer
            .encode("one two three four five six seven eight nine ten")
            .unwrap();
        assert_eq!(long.len(), 8);
        assert_eq!(long.ids.last(), Some(&102));
        assert_eq!(tokenizer.pad_id(), 0);
    }
}
