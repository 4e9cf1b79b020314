//! `tripwire eval-drift`: drift detection on the development data — false alarms on clean
//! streams, delays after model swaps and sentence injection (see [`crate::lab::drift_replay`]).

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::output::emit;
use crate::infer::{EmbedderConfig, Truncation};
use crate::lab::drift_replay::{DriftEvalOptions, StreamResult, run as evaluate};

/// Options of `tripwire eval-drift`.
#[derive(Debug, Args)]
pub struct EvalDriftArgs {
    /// The development data directory (holding alpaca_eval/).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Policy file with the drift detectors (default: the built-in policy).
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Seeds per scenario.
    #[arg(long, default_value_t = 20)]
    seeds: u64,
    /// Clean exchanges after the reference in the false-alarm streams.
    #[arg(long, default_value_t = 10_000)]
    clean: usize,
    /// Clean exchanges between the reference and the change.
    #[arg(long, default_value_t = 500)]
    warm: usize,
    /// Exchanges after the change before a stream counts as missed.
    #[arg(long, default_value_t = 1_000)]
    horizon: usize,
    /// Share of outputs carrying the injected sentence.
    #[arg(long, default_value_t = 0.2)]
    injection_rate: f64,
    /// Reference models of the clean and injection streams (rotated over seeds).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gpt4_1106_preview,alpaca-7b,Mistral-7B-Instruct-v0.2,Qwen1.5-7B-Chat,claude-3-opus-20240229,Meta-Llama-3-8B-Instruct"
    )]
    models: Vec<String>,
    /// Model swaps, FROM:TO.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "gpt4_1106_preview:alpaca-7b,Mistral-7B-Instruct-v0.2:Qwen1.5-7B-Chat,claude-3-opus-20240229:gpt4_1106_preview,Meta-Llama-3-8B-Instruct:Mistral-7B-Instruct-v0.2"
    )]
    swaps: Vec<String>,
    /// ONNX Runtime threads for embedding.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where embeddings are cached.
    #[arg(long, default_value = "target/drift-eval")]
    cache: PathBuf,
    /// Print every stream as JSON lines instead of the summary.
    #[arg(long)]
    json: bool,
}

/// Runs the evaluation and prints the summary.
pub fn run(args: EvalDriftArgs) -> anyhow::Result<()> {
    let policy = match &args.policy {
        Some(path) => std::fs::read_to_string(path)?,
        None => crate::policy::DEFAULT_POLICY.to_owned(),
    };
    let swaps = args
        .swaps
        .iter()
        .map(|s| {
            s.split_once(':')
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
                .ok_or_else(|| anyhow::anyhow!("--swaps: {s:?} is not FROM:TO"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!args.models.is_empty(), "--models: name at least one model");
    let options = DriftEvalOptions {
        data_dir: args.data.clone(),
        models: args.models.clone(),
        swaps,
        seeds: args.seeds,
        clean: args.clean,
        warm: args.warm,
        horizon: args.horizon,
        injection_rate: args.injection_rate,
        embedder: EmbedderConfig {
            intra_threads: args.threads,
            max_tokens: 256,
            truncation: Truncation::HeadTail,
            ..EmbedderConfig::default()
        },
        cache_dir: args.cache.clone(),
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    let results = evaluate(&options, &policy)?;
    if args.json {
        let mut out = String::new();
        for result in &results {
            let _ok = writeln!(out, "{}", serde_json::to_string(result)?);
        }
        return emit(&out);
    }
    emit(&summary(&results, &args))
}

fn summary(results: &[StreamResult], args: &EvalDriftArgs) -> String {
    let mut out = String::new();
    let clean: Vec<&StreamResult> = results.iter().filter(|r| r.scenario == "clean").collect();
    let false_alarms: usize = results.iter().map(|r| r.false_alarms).sum();
    let tested: usize = results.iter().map(|r| r.exchanges_before).sum();
    let clean_alarmed = clean.iter().filter(|r| r.false_alarms > 0).count();
    let _ok = writeln!(
        out,
        "False alarms: {} in {} clean streams of {} exchanges after the reference \
         ({clean_alarmed} streams with any); {false_alarms} over all {tested} pre-change \
         exchanges of every stream.\n",
        clean.iter().map(|r| r.false_alarms).sum::<usize>(),
        clean.len(),
        args.clean,
    );
    let _ok = writeln!(
        out,
        "| scenario | from | to | streams | alarmed within {} | median delay | max delay | \
         output-drift alone: alarmed, median | first alarm (most often) |",
        args.horizon
    );
    let _ok = writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---|");
    let mut groups: Vec<(&str, &str, Option<&str>)> = results
        .iter()
        .filter(|r| r.scenario != "clean")
        .map(|r| {
            (
                r.scenario.as_str(),
                if r.scenario == "injection" {
                    "(rotating)"
                } else {
                    r.model.as_str()
                },
                r.to.as_deref(),
            )
        })
        .collect();
    groups.dedup();
    groups.sort();
    groups.dedup();
    for (scenario, from, to) in groups {
        let streams: Vec<&StreamResult> = results
            .iter()
            .filter(|r| {
                r.scenario == scenario
                    && r.to.as_deref() == to
                    && (scenario == "injection" || r.model == from)
            })
            .collect();
        let mut delays: Vec<usize> = streams.iter().filter_map(|r| r.delay).collect();
        delays.sort_unstable();
        let mut embedding: Vec<usize> = streams.iter().filter_map(|r| r.embedding_delay).collect();
        embedding.sort_unstable();
        let mut firsts: std::collections::BTreeMap<&str, usize> = Default::default();
        for r in &streams {
            if let Some(first) = r.first_alarm.as_deref() {
                *firsts.entry(first).or_default() += 1;
            }
        }
        let top = firsts
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or("-".to_owned(), |(name, n)| format!("{name} ({n})"));
        let median = |v: &[usize]| v.get(v.len() / 2).map_or("-".to_owned(), |d| d.to_string());
        let _ok = writeln!(
            out,
            "| {scenario} | {from} | {} | {} | {} | {} | {} | {}, {} | {top} |",
            to.unwrap_or("20% injected"),
            streams.len(),
            delays.len(),
            median(&delays),
            delays.last().map_or("-".to_owned(), |d| d.to_string()),
            embedding.len(),
            median(&embedding),
        );
    }
    out
}
