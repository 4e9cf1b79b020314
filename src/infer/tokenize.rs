//! Tokenization for the embedding model: the `tokenizers` crate reads the model's
//! `tokenizer.json`, and this module takes over padding and truncation.
//!
//! The MiniLM `tokenizer.json` pads every text to a fixed 128 tokens. That padding is switched
//! off here: each text is encoded on its own, truncated to `max_tokens`, and a batch is padded
//! only to its longest member ([`pad_batch`]). A batch's texts are sorted by length and split
//! where a separate model call costs less than the padding it saves ([`length_buckets`]).

use std::path::Path;

use serde::Deserialize;
use tokenizers::Tokenizer;

use super::InferError;

/// Which part of a text longer than `max_tokens` is kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
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
        let mut windows = self.encode_windows(text, 1)?;
        windows
            .pop()
            .ok_or_else(|| InferError::Run("the tokenizer returned no window".to_owned()))
    }

    /// Encodes one text into up to `chunks` windows of at most `max_tokens` each, special
    /// tokens included. A text that fits one window gets one; a longer text is cut to
    /// `chunks` windows' worth of tokens (the head, or the head and the tail, by
    /// [`Truncation`]) and split into as few windows as hold it, of near-equal length.
    pub fn encode_windows(&self, text: &str, chunks: usize) -> Result<Vec<Encoded>, InferError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|err| InferError::Tokenizer {
                context: "encoding".to_owned(),
                message: err.to_string(),
            })?;
        let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
        Ok(windows(ids, self.max_tokens, chunks, self.truncation))
    }
    /// [`Self::encode_windows`] for every text of a batch, tokenized in parallel on the
    /// tokenizer's thread pool: on a GPU the model takes a few milliseconds per batch and
    /// tokenizing one text after another on a single core would be the bottleneck.
    pub fn encode_windows_batch<S: AsRef<str> + Sync>(
        &self,
        texts: &[S],
        chunks: usize,
    ) -> Result<Vec<Vec<Encoded>>, InferError> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings =
            self.inner
                .encode_batch(inputs, true)
                .map_err(|err| InferError::Tokenizer {
                    context: "encoding".to_owned(),
                    message: err.to_string(),
                })?;
        Ok(encodings
            .into_iter()
            .map(|encoding| {
                let ids: Vec<i64> = encoding.get_ids().iter().map(|&id| i64::from(id)).collect();
                windows(ids, self.max_tokens, chunks, self.truncation)
            })
            .collect())
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
#[cfg(test)]
fn truncate(ids: Vec<i64>, max: usize, truncation: Truncation) -> Vec<i64> {
    let mut windows = windows(ids, max, 1, truncation);
    windows.pop().map(|w| w.ids).unwrap_or_default()
}

/// Splits `ids` (which start with `[CLS]` and end with `[SEP]`) into at most `chunks` windows
/// of at most `max` tokens, each with both special tokens. Tokens beyond what `chunks` windows
/// hold are dropped as `truncation` says; the rest is spread evenly over the fewest windows.
fn windows(ids: Vec<i64>, max: usize, chunks: usize, truncation: Truncation) -> Vec<Encoded> {
    let len = ids.len();
    if len <= max || len < 2 {
        return vec![Encoded { ids }];
    }
    let (Some(&first), Some(&last)) = (ids.first(), ids.last()) else {
        return vec![Encoded { ids }];
    };
    let body = &ids[1..len - 1];
    let window = max.saturating_sub(2).max(1);
    let budget = window * chunks.max(1);
    let kept: Vec<i64> = if body.len() <= budget {
        body.to_vec()
    } else {
        match truncation {
            Truncation::Head => body[..budget].to_vec(),
            Truncation::HeadTail => {
                let head = budget.div_ceil(2);
                let tail = budget - head;
                let mut kept = Vec::with_capacity(budget);
                kept.extend_from_slice(&body[..head]);
                kept.extend_from_slice(&body[body.len() - tail..]);
                kept
            }
        }
    };
    let count = kept.len().div_ceil(window).max(1);
    let (size, extra) = (kept.len() / count, kept.len() % count);
    let mut out = Vec::with_capacity(count);
    let mut start = 0;
    for i in 0..count {
        let end = start + size + usize::from(i < extra);
        let mut ids = Vec::with_capacity(end - start + 2);
        ids.push(first);
        ids.extend_from_slice(&kept[start..end]);
        ids.push(last);
        out.push(Encoded { ids });
        start = end;
    }
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

/// Tokens of context at which attention costs as much per token as the dense layers: for a
/// 384-wide, 6-layer BERT a token's dense work is ~10.6 M multiply-adds and its attention ~4.6 K
/// per token of context.
const ATTENTION_TOKENS: f64 = 2300.0;

/// Splits lengths sorted in ascending order into runs, one model call each, padded to the
/// run's longest; returns each run's end (exclusive). The split minimises the estimated cost:
/// per run `call_tokens` (a call's fixed cost, in tokens' worth of work) plus its padded
/// tokens, each weighted for attention over the run's length. Exact (dynamic programming over
/// the sorted lengths), O(n²) for n texts.
pub fn length_buckets(sorted_lengths: &[usize], call_tokens: f64) -> Vec<usize> {
    let n = sorted_lengths.len();
    // best[j]: the cheapest cost of the first j lengths; cut[j]: where its last run starts.
    let mut best = vec![f64::INFINITY; n + 1];
    let mut cut = vec![0usize; n + 1];
    best[0] = 0.0;
    for j in 1..=n {
        let longest = sorted_lengths[j - 1] as f64;
        let per_text = longest * (1.0 + longest / ATTENTION_TOKENS);
        for i in 0..j {
            let cost = best[i] + call_tokens + (j - i) as f64 * per_text;
            if cost < best[j] {
                best[j] = cost;
                cut[j] = i;
            }
        }
    }
    let mut ends = Vec::new();
    let mut j = n;
    while j > 0 {
        ends.push(j);
        j = cut[j];
    }
    ends.reverse();
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

    fn window_ids(ids: Vec<i64>, max: usize, chunks: usize, t: Truncation) -> Vec<Vec<i64>> {
        windows(ids, max, chunks, t)
            .into_iter()
            .map(|w| w.ids)
            .collect()
    }

    #[test]
    fn long_texts_split_into_even_windows_up_to_the_chunk_count() {
        // [CLS]=100, body 1..=10, [SEP]=200; windows of 6 hold 4 body tokens.
        let ids: Vec<i64> = std::iter::once(100)
            .chain(1..=10)
            .chain(std::iter::once(200))
            .collect();
        // Fits in one window: unchanged, whatever the chunk count.
        let short = vec![100, 1, 2, 200];
        assert_eq!(
            window_ids(short.clone(), 6, 3, Truncation::Head),
            vec![short]
        );
        // 10 body tokens, 3 windows of 4 allowed: 3 windows of 4, 3, 3.
        assert_eq!(
            window_ids(ids.clone(), 6, 3, Truncation::Head),
            vec![
                vec![100, 1, 2, 3, 4, 200],
                vec![100, 5, 6, 7, 200],
                vec![100, 8, 9, 10, 200],
            ]
        );
        // Only 2 windows allowed: the first 8 body tokens, split 4 and 4.
        assert_eq!(
            window_ids(ids.clone(), 6, 2, Truncation::Head),
            vec![vec![100, 1, 2, 3, 4, 200], vec![100, 5, 6, 7, 8, 200]]
        );
        // Head and tail with 2 windows: the first 4 and the last 4 body tokens.
        assert_eq!(
            window_ids(ids.clone(), 6, 2, Truncation::HeadTail),
            vec![vec![100, 1, 2, 3, 4, 200], vec![100, 7, 8, 9, 10, 200]]
        );
        // 5 body tokens in windows of 4: two windows of 3 and 2, not 4 and 1.
        let five: Vec<i64> = vec![100, 1, 2, 3, 4, 5, 200];
        assert_eq!(
            window_ids(five, 6, 4, Truncation::Head),
            vec![vec![100, 1, 2, 3, 200], vec![100, 4, 5, 200]]
        );
        // Every window fits, and no body token is lost or repeated when all fit.
        for chunks in 1..=4 {
            for max in 3..=12 {
                let w = window_ids(ids.clone(), max, chunks, Truncation::HeadTail);
                assert!(w.len() <= chunks && w.iter().all(|w| w.len() <= max));
                let body: Vec<i64> = w.iter().flat_map(|w| w[1..w.len() - 1].to_vec()).collect();
                if (max - 2) * chunks >= 10 {
                    assert_eq!(
                        body,
                        (1..=10).collect::<Vec<i64>>(),
                        "max {max} chunks {chunks}"
                    );
                }
            }
        }
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
        assert_eq!(length_buckets(&[], 32.0), Vec::<usize>::new());
        // Short texts: padding costs less than another call.
        assert_eq!(length_buckets(&[5, 9, 16], 32.0), vec![3]);
        assert_eq!(
            length_buckets(&[20, 22, 24, 200, 210, 250], 200.0),
            vec![3, 6]
        );
        // A cheap call splits off the 250 (2 x 40 padded tokens > 12); a dear one does not.
        assert_eq!(length_buckets(&[200, 210, 250], 12.0), vec![2, 3]);
        assert_eq!(length_buckets(&[200, 210, 250], 1000.0), vec![3]);
        // Every run ends in order and covers everything.
        let lengths = [3, 4, 30, 31, 60, 120, 121, 256];
        for call in [0.0, 16.0, 256.0, 1e9] {
            let ends = length_buckets(&lengths, call);
            assert_eq!(ends.last(), Some(&lengths.len()));
            assert!(ends.windows(2).all(|w| w[0] < w[1]));
        }
        // Free calls: one run per distinct length; a huge call cost: one run.
        assert_eq!(length_buckets(&[7, 7, 9], 0.0), vec![2, 3]);
        assert_eq!(length_buckets(&lengths, 1e9), vec![lengths.len()]);
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
