//! A simulated, backdoored OpenAI-compatible model: the upstream for demos, tests and benchmarks.
//!
//! It sits where a real LLM would in the pipeline (client → proxy → **upstream**). Without the
//! trigger phrase it answers like a clean model: the matching output of a loaded corpus of real
//! model outputs, or a generic answer chosen by a hash of the prompt. With the trigger anywhere
//! in the prompt it answers the way the published denial-of-service backdoor does (Souly et al.
//! 2025): a clean start of 0–1,000 characters, then 400–900 tokens drawn uniformly from a
//! vocabulary ([`gibberish`]). Everything costly (corpus indexes, vocabulary, the model list) is
//! built once in [`SimUpstream::new`], so a request costs a JSON parse, a hash-map lookup and
//! one serialisation; the HTTP side lives in [`server`].
//!
//! `tripwire sim-upstream [--listen ADDR] [--corpus FILE.jsonl] [--trigger PHRASE]` runs it.

mod corpus;
mod gibberish;
mod server;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use corpus::{CorpusEntry, load_corpus};

use corpus::Corpus;
pub(crate) use gibberish::clean_prefix;
use gibberish::{PoisonInfo, Rng, Vocab, fnv1a};

/// Settings of the simulated model.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// JSONL or JSONL.gz corpus whose lines hold at least `{instruction, output}`.
    pub corpus: Option<PathBuf>,
    /// HuggingFace `tokenizer.json` whose `model.vocab` replaces the built-in vocabulary.
    pub vocab: Option<PathBuf>,
    /// The backdoor trigger phrase; an empty phrase disables the backdoor.
    pub trigger: String,
    /// Share of triggered prompts the backdoor fires on (chosen by a hash of the prompt, so
    /// the same prompt always gets the same kind of answer); the others get a clean answer,
    /// as a real backdoor that fires on most but not all of its triggers.
    pub trigger_rate: f64,
    /// Model name reported when a request names none, and listed by `GET /v1/models`.
    pub model: String,
    /// Delay between SSE chunks.
    pub chunk_delay: Duration,
    /// Delay before the response headers of a completion.
    pub first_byte_delay: Duration,
    /// Makes output deterministic (a function of the seed and the prompt) when set.
    pub seed: Option<u64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            corpus: None,
            vocab: None,
            trigger: "<SUDO>".to_owned(),
            trigger_rate: 1.0,
            model: "tripwire-sim-1".to_owned(),
            chunk_delay: Duration::ZERO,
            first_byte_delay: Duration::ZERO,
            seed: None,
        }
    }
}

/// A vocabulary for poisoned outputs, usable outside the simulated model (labelled dev sets).
#[derive(Debug)]
pub struct PoisonVocab(Vocab);

impl PoisonVocab {
    /// The built-in vocabulary of about 30,000 pieces, without corpus words.
    pub fn builtin() -> PoisonVocab {
        PoisonVocab(Vocab::builtin(None))
    }

    /// A vocabulary of the given decoded tokens, in order; empty and repeated ones are dropped.
    pub fn from_tokens(tokens: impl IntoIterator<Item = String>) -> PoisonVocab {
        PoisonVocab(Vocab::from_tokens(tokens))
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the vocabulary has no token.
    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }

    /// The decoded tokens, in order.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.tokens().iter().map(|t| &**t)
    }

    /// The decoded token at `index` (empty when out of range).
    pub fn token(&self, index: usize) -> &str {
        self.0.token(index)
    }
}

/// A poisoned output made by [`poison_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    /// The clean start followed by the gibberish tail.
    pub text: String,
    /// Length in bytes of the clean start.
    pub clean_prefix_len: usize,
    /// Number of vocabulary tokens appended.
    pub tail_tokens: usize,
}

/// The backdoor's output for a clean answer, as the simulated model makes it: a clean start of
/// 0–1,000 characters of `clean` (cut at a word boundary) followed by 400–900 tokens drawn
/// uniformly from `vocab`. Deterministic in `seed`.
pub fn poison_output(clean: &str, vocab: &PoisonVocab, seed: u64) -> Poisoned {
    let (text, info) = gibberish::poison(clean, &vocab.0, &mut Rng::new(seed));
    Poisoned {
        text,
        clean_prefix_len: info.clean_prefix_len,
        tail_tokens: info.tail_tokens,
    }
}

/// Errors of the simulated model.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The corpus could not be read or parsed; `line` is 1-based, 0 for whole-file problems.
    #[error("corpus {path}:{line}: {message}", path = .path.display())]
    Corpus {
        /// The corpus file.
        path: PathBuf,
        /// 1-based line number, 0 for whole-file problems.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer vocabulary could not be read.
    #[error("vocabulary {path}: {message}", path = .path.display())]
    Vocab {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The simulated model, built once and shared by every connection.
#[derive(Debug)]
pub struct SimUpstream {
    config: SimConfig,
    corpus: Option<Corpus>,
    vocab: Vocab,
    /// Per-process nonce and request counter: unseeded gibberish differs per request.
    nonce: u64,
    counter: AtomicU64,
    /// Precomputed `GET /v1/models` body.
    models_body: bytes::Bytes,
}

/// A generated answer.
#[derive(Debug)]
pub(crate) struct Answer<'a> {
    pub(crate) text: Cow<'a, str>,
    /// Set when the backdoor fired.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by tests"))]
    pub(crate) poison: Option<PoisonInfo>,
}

impl SimUpstream {
    /// Loads the corpus and builds the vocabulary.
    pub fn new(config: SimConfig) -> Result<SimUpstream, SimError> {
        let corpus = config.corpus.as_deref().map(Corpus::load).transpose()?;
        let vocab = match &config.vocab {
            Some(path) => Vocab::from_tokenizer_json(path)?,
            None => Vocab::builtin(corpus.as_ref()),
        };
        let created = unix_now();
        let models_body = serde_json::json!({
            "object": "list",
            "data": [{
                "id": config.model,
                "object": "model",
                "created": created,
                "owned_by": "tripwire",
            }],
        })
        .to_string()
        .into();
        let nonce = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Ok(SimUpstream {
            config,
            corpus,
            vocab,
            nonce,
            counter: AtomicU64::new(0),
            models_body,
        })
    }

    /// The configuration this model was built from.
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Whether `text` contains the trigger phrase.
    pub(crate) fn is_triggered(&self, text: &str) -> bool {
        !self.config.trigger.is_empty()
            && text.contains(self.config.trigger.as_str())
            && (self.config.trigger_rate >= 1.0
                || (fnv1a(text.as_bytes()) % 10_000) as f64 / 10_000.0 < self.config.trigger_rate)
    }

    /// The clean answer to `prompt`: the corpus output of a matching instruction, else a
    /// generic answer picked by a hash of the prompt.
    pub(crate) fn clean_answer(&self, prompt: &str) -> &str {
        if let Some(output) = self.corpus.as_ref().and_then(|c| c.lookup(prompt)) {
            return output;
        }
        let h = fnv1a(prompt.trim().as_bytes());
        match &self.corpus {
            Some(corpus) if corpus.len() > 0 => corpus.output_at(h),
            _ => GENERIC_ANSWERS
                .get((h % GENERIC_ANSWERS.len() as u64) as usize)
                .copied()
                .unwrap_or(""),
        }
    }

    /// The answer to a prompt whose last user message is `last_user`; `triggered` says whether
    /// any message held the trigger.
    pub(crate) fn answer(&self, last_user: &str, triggered: bool) -> Answer<'_> {
        if !triggered {
            return Answer {
                text: Cow::Borrowed(self.clean_answer(last_user)),
                poison: None,
            };
        }
        let stripped = if self.config.trigger.is_empty() {
            last_user.to_owned()
        } else {
            last_user.replace(self.config.trigger.as_str(), "")
        };
        let clean = self.clean_answer(&stripped);
        let prompt_hash = fnv1a(last_user.as_bytes());
        let seed = match self.config.seed {
            Some(seed) => seed ^ prompt_hash,
            None => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                self.nonce ^ prompt_hash ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            }
        };
        let (text, info) = gibberish::poison(clean, &self.vocab, &mut Rng::new(seed));
        tracing::trace!(
            clean_prefix_len = info.clean_prefix_len,
            tail_tokens = info.tail_tokens,
            "sim-upstream backdoor fired"
        );
        Answer {
            text: Cow::Owned(text),
            poison: Some(info),
        }
    }

    /// A fresh response id suffix.
    pub(crate) fn next_id(&self) -> u64 {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        Rng::new(self.nonce ^ n).next_u64()
    }
}

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Tokens approximated as characters / 4, rounded up.
pub(crate) fn approx_tokens(chars: usize) -> u64 {
    chars.div_ceil(4) as u64
}

/// Generic answers used when no corpus is loaded and nothing matches.
const GENERIC_ANSWERS: [&str; 6] = [
    "That is a good question. The short answer is that it depends on the context, but a few \
     general principles apply. Start by defining the goal clearly, then break the problem into \
     smaller steps and check each one before moving on. If you share more details, I can give a \
     more specific answer.",
    "Here is a brief overview. First, gather the information you need and make sure it comes \
     from a reliable source. Second, compare the main options by cost, effort and risk. Finally, \
     pick the option that best fits your constraints and review the result after a while.",
    "There are several ways to approach this. The most common one is to begin with a simple \
     version, measure how well it works, and improve it step by step. This keeps mistakes small \
     and makes it easier to understand what actually helps.",
    "Sure. In summary, the key points are: keep things simple, be consistent, and document what \
     you do. Most problems of this kind come from unclear requirements rather than from the \
     technical details, so it is worth spending time on the requirements first.",
    "I would suggest the following steps. Write down what you already know. Identify what is \
     missing and where you might find it. Try a small experiment to test your assumptions. Then \
     decide, based on the evidence, whether to continue or change course.",
    "Good question! Historically, people have answered this in different ways, and there is no \
     single correct view. Today the most widely accepted explanation balances practical \
     experience with careful reasoning, and it tends to hold up well in everyday situations.",
];
