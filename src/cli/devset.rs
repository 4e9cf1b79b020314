//! `tripwire devset`: writes the labelled development set built from data/ (the development data committed with the repository).

use std::path::PathBuf;

use clap::Args;

use super::output::emit;
use crate::lab::devset::{DevsetOptions, build_devset, build_streams, write_jsonl};

/// Options of `tripwire devset`.
#[derive(Debug, Args)]
pub struct DevsetArgs {
    /// The development data directory (holding alpaca_eval/).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Where to write the JSON lines.
    #[arg(long, default_value = "target/devset.jsonl")]
    out: PathBuf,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 2025)]
    seed: u64,
}

/// Builds and writes the set.
pub fn run(args: DevsetArgs) -> anyhow::Result<()> {
    let options = DevsetOptions::default();
    let mut examples = build_devset(&args.data, args.seed, &options)?;
    examples.extend(build_streams(&args.data, args.seed, &options.models)?);
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_jsonl(&examples, &args.out)?;
    emit(&format!(
        "{} examples written to {}\n",
        examples.len(),
        args.out.display()
    ))
}
