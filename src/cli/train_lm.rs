//! `tripwire train-lm`: trains the character n-gram model and the word list that the gibberish
//! detector embeds (`models/char-lm-en.bin`, its `.sha256`, `models/words-en.txt`, and the word bigram set
//! `models/bigrams-en.bin` with its `.sha256`).
//!
//! The shipped files come from the train split of the development data, in this order:
//! `tripwire train-lm --corpus data/alpaca_eval/{gpt4_1106_preview,claude-3-opus-20240229,Mistral-7B-Instruct-v0.2,vicuna-13b-v1.5}.jsonl.gz --out models/`
//! (see `crate::lab::devset::TRAIN_MODELS`). Training is deterministic: the same files give the
//! same bytes.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::detect::ngram_lm::LmParams;
use crate::lab::lm_training::{TrainOptions, train_lm};

/// Arguments of `tripwire train-lm`.
#[derive(Debug, Args)]
pub struct TrainLmArgs {
    /// JSONL or JSONL.gz files with an `output` field per line, read in the order given.
    #[arg(long, required = true, num_args = 1..)]
    pub corpus: Vec<PathBuf>,
    /// Directory to write `char-lm-en.bin`, `words-en.txt`, `bigrams-en.bin` and their checksums
    /// into.
    #[arg(long, default_value = "models")]
    pub out: PathBuf,
    /// Longest n-gram, in characters.
    #[arg(long, default_value_t = 5)]
    pub order: usize,
    /// N-grams of order 3 and more seen fewer times are pruned.
    #[arg(long, default_value_t = 2)]
    pub min_count: u32,
    /// Also train on the `instruction` fields.
    #[arg(long)]
    pub include_instructions: bool,
}

/// Runs `tripwire train-lm`.
#[expect(clippy::print_stdout, reason = "the command's report goes to stdout")]
pub fn run(args: TrainLmArgs) -> anyhow::Result<()> {
    let options = TrainOptions {
        params: LmParams {
            order: args.order,
            min_count: args.min_count,
            ..LmParams::default()
        },
        include_instructions: args.include_instructions,
        ..TrainOptions::default()
    };
    let report = train_lm(&args.corpus, &args.out, &options).context("train-lm")?;
    println!(
        "trained on {} texts ({} characters): {} n-grams, {} ({} bytes, sha256 {}); {} words in {}; {} bigrams in {} ({} bytes)",
        report.texts,
        report.chars,
        report.ngrams,
        report.model_path.display(),
        report.model_bytes,
        report.sha256,
        report.words,
        report.words_path.display(),
        report.bigrams,
        report.bigrams_path.display(),
        report.bigrams_bytes
    );
    Ok(())
}
