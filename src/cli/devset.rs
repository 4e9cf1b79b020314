//! `tripwire devset`: writes the labelled development set built from data/ (the development
//! data committed with the repository). `tripwire devset attacks` runs the attack suite
//! ([`crate::lab::attacks`]) through a policy and prints the table of docs/detection.md.

use std::io::Write as _;
use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::output::emit;
use crate::lab::attacks::{
    Resources, StreamSpec, SuiteOptions, build_stream, read_models, render, run_suite,
};
use crate::lab::devset::{
    CALIBRATION_MODELS, DevsetOptions, REPORT_MODELS, TRAIN_MODELS, build_devset, build_streams,
    write_jsonl,
};
use crate::policy::Engine;
use crate::telemetry::Metrics;

/// Options of `tripwire devset`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DevsetArgs {
    #[command(subcommand)]
    command: Option<DevsetCommand>,
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

#[derive(Debug, Subcommand)]
enum DevsetCommand {
    /// Run the attack suite (every attack class in many forms, mixed into clean traffic at
    /// several rates) through a policy and print recall, first-flag occurrence and clean
    /// false positives per class × variant × rate.
    Attacks(AttacksArgs),
}

/// Options of `tripwire devset attacks`.
#[derive(Debug, Args)]
struct AttacksArgs {
    /// The development data directory (holding alpaca_eval/).
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// The directory of the pinned artifacts (`make models`): the tokenizer and language texts.
    #[arg(long, default_value = "models")]
    models_dir: PathBuf,
    /// Policy file or directory (default: the built-in policy).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Whose clean answers make the streams: `report` (measure), `calibration` (fit), or
    /// `all` twelve models (train split included).
    #[arg(long, default_value = "report", value_parser = ["report", "calibration", "all"])]
    split: String,
    /// Seeds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    seeds: Vec<u64>,
    /// Shares of attacked answers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.005,0.02,0.05,0.2")]
    rates: Vec<f64>,
    /// Attacked answers per stream.
    #[arg(long, default_value_t = 25)]
    occurrences: usize,
    /// Clean answers before the first attack of a stream.
    #[arg(long, default_value_t = 300)]
    warmup: usize,
    /// Only variants whose `class/variant` contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Share of triggered prompts whose answers stay clean (the backdoor did not fire).
    #[arg(long, default_value_t = 0.3)]
    misfire: f64,
    /// Run only each model's clean answers alone (false positives, triggers promoted on
    /// clean traffic), no attack streams.
    #[arg(long)]
    clean_only: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Instead of evaluating, write every stream as labelled JSON lines for `tripwire eval`.
    #[arg(long)]
    write: Option<PathBuf>,
    /// Exit with an error when a variant misses its target (for CI-style checks).
    #[arg(long)]
    check: bool,
}

/// Builds and writes the set, or runs the attack suite.
pub fn run(args: DevsetArgs) -> anyhow::Result<()> {
    if let Some(DevsetCommand::Attacks(attacks)) = args.command {
        return run_attacks(attacks);
    }
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

fn run_attacks(args: AttacksArgs) -> anyhow::Result<()> {
    let all: Vec<&str> = REPORT_MODELS
        .iter()
        .chain(CALIBRATION_MODELS.iter())
        .chain(TRAIN_MODELS.iter())
        .copied()
        .collect();
    let models: &[&str] = match args.split.as_str() {
        "report" => &REPORT_MODELS,
        "calibration" => &CALIBRATION_MODELS,
        _ => &all,
    };
    anyhow::ensure!(
        (0.0..1.0).contains(&args.misfire),
        "--misfire must be in [0, 1)"
    );
    let options = SuiteOptions {
        seeds: args.seeds,
        rates: args.rates,
        occurrences: args.occurrences,
        warmup: args.warmup,
        only: args.only,
        misfire: args.misfire,
        clean_only: args.clean_only,
        ..SuiteOptions::full(models)
    };
    let resources = Resources::load(&args.models_dir, &args.data)?;
    let clean = read_models(&args.data, &options.models)?;
    if let Some(path) = &args.write {
        return write_streams(path, &options, &clean, &resources);
    }
    let policies_path = args.policies.clone();
    let make_engine = move || -> Result<Engine, String> {
        let policies = match &policies_path {
            Some(path) => crate::policy::load_path(path).map_err(|e| e.to_string())?,
            None => vec![crate::policy::default_policy().map_err(|e| e.to_string())?],
        };
        Ok(Engine::new(policies, Metrics::default()))
    };
    // Fail on a bad policy before starting the workers.
    make_engine().map_err(anyhow::Error::msg)?;
    let report = run_suite(&make_engine, &clean, &resources, &options)?;
    if args.json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        emit(&render(&report))?;
    }
    anyhow::ensure!(
        !args.check || report.all_pass(),
        "some attack variants missed their target (rows marked MISSED)"
    );
    Ok(())
}

fn write_streams(
    path: &std::path::Path,
    options: &SuiteOptions,
    clean: &std::collections::BTreeMap<String, Vec<(String, String)>>,
    resources: &Resources,
) -> anyhow::Result<()> {
    let file = std::fs::File::create(path)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut lines = 0usize;
    for variant in &options.variants() {
        for &rate in &options.rates {
            for (model, answers) in clean {
                for &seed in &options.seeds {
                    let spec = StreamSpec {
                        model,
                        variant: *variant,
                        rate,
                        seed,
                    };
                    let scope = spec.scope();
                    for line in build_stream(&spec, answers, resources, options).lines {
                        let record = serde_json::json!({
                            "prompt": line.prompt,
                            "output": line.output,
                            "label": line.label,
                            "triggered": line.triggered,
                            "model": scope,
                            "variant": variant.name,
                            "rate": rate,
                            "seed": seed,
                        });
                        serde_json::to_writer(&mut out, &record)?;
                        out.write_all(b"\n")?;
                        lines += 1;
                    }
                }
            }
        }
    }
    out.flush()?;
    emit(&format!("{lines} lines written to {}\n", path.display()))
}
