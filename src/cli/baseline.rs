//! `tripwire baseline build`: a drift reference built offline from a file of known-good
//! exchanges, for a policy to name (`reference: { file: … }`) so a scope tests from its first
//! exchange instead of learning from live traffic.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::capture::Exchange;
use crate::detect::drift::reference::{REFERENCE_VERSION, Reference};
use crate::detect::drift::{
    DriftPlan, EmbeddingDriftConfig, PROMPT_DISTANCE_FEATURE, feature_scores, prompt_distance,
    score_of,
};
use crate::infer::Embedder;
use crate::policy::Engine;
use crate::telemetry::Metrics;

/// `tripwire baseline …`.
#[derive(Debug, Subcommand)]
pub enum BaselineCommand {
    /// Embed prompts and outputs of a JSONL file and write a drift reference.
    Build(BuildArgs),
}

/// Options of `tripwire baseline build`.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// JSON lines (gzip accepted), one exchange per line.
    #[arg(long)]
    input: PathBuf,
    /// Where to write the reference (JSON).
    #[arg(long)]
    out: PathBuf,
    /// The field holding the prompt.
    #[arg(long, default_value = "instruction")]
    prompt_field: String,
    /// The field holding the output.
    #[arg(long, default_value = "output")]
    output_field: String,
    /// Use at most this many lines (the first ones).
    #[arg(long)]
    limit: Option<usize>,
    /// Policy file or directory whose feature_drift detector names the features (default: the
    /// built-in policy).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Gateway config whose `inference:` section to use, so the reference matches what the
    /// gateway embeds.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// Runs `tripwire baseline`.
pub fn run(command: BaselineCommand) -> anyhow::Result<()> {
    match command {
        BaselineCommand::Build(args) => build(&args),
    }
}

fn build(args: &BuildArgs) -> anyhow::Result<()> {
    let pairs = read_pairs(args)?;
    anyhow::ensure!(
        !pairs.is_empty(),
        "no line of {} has string fields `{}` and `{}`",
        args.input.display(),
        args.prompt_field,
        args.output_field
    );
    let policies = match &args.policies {
        Some(path) => crate::policy::load_path(path)?,
        None => vec![crate::policy::default_policy()?],
    };
    let engine = Engine::new(policies, Metrics::default());
    let plan = engine.drift_plan();
    let features = plan
        .and_then(|plan| plan.features.as_ref())
        .map(|(_, c)| c.features.clone())
        .unwrap_or_default();
    // Every score the tests read, computed once per exchange: the feature tests' go into
    // `features`; the per-topic tests' and the prompts' words (when the tests name topics) go
    // in too, so the reference's topics are named and tested from the first exchange, as a
    // learned reference's are.
    let score_names = plan.map(DriftPlan::score_names).unwrap_or_default();
    let embedding = plan
        .and_then(|plan| plan.embedding.as_ref())
        .map(|(_, c)| c.clone());
    let topic_features = embedding
        .as_ref()
        .map(|c| c.topic_features.clone())
        .unwrap_or_default();
    let names_topics = embedding
        .as_ref()
        .is_some_and(EmbeddingDriftConfig::names_topics);
    let embedder_config = match &args.config {
        Some(path) => crate::config::Config::load(path)?.inference,
        None => crate::infer::EmbedderConfig::default(),
    };
    let mut embedder = Embedder::load(&embedder_config)?;
    let started = tokio::time::Instant::now();
    let mut reference = Reference {
        version: REFERENCE_VERSION,
        source: args.input.display().to_string(),
        created_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ..Reference::default()
    };
    for chunk in pairs.chunks(64) {
        let prompts: Vec<&str> = chunk.iter().map(|(p, _)| p.as_str()).collect();
        let outputs: Vec<&str> = chunk.iter().map(|(_, o)| o.as_str()).collect();
        let prompt_embeddings = embedder.embed_batch(&prompts)?;
        let output_embeddings = embedder.embed_batch(&outputs)?;
        for (((prompt, output), p), o) in chunk.iter().zip(prompt_embeddings).zip(output_embeddings)
        {
            // In file order, so stateful detectors see the traffic as the gateway would.
            let exchange = Exchange::from_texts("baseline", prompt, output);
            let (_, findings) = engine.evaluate_with_findings(&exchange);
            let mut scores = feature_scores(&score_names, &findings, output.chars().count());
            if features.iter().any(|f| f == PROMPT_DISTANCE_FEATURE) {
                scores.push((PROMPT_DISTANCE_FEATURE.to_owned(), prompt_distance(&p, &o)));
            }
            for name in &topic_features {
                reference
                    .topic_scores
                    .entry(name.clone())
                    .or_default()
                    .push(score_of(&scores, name));
            }
            for (name, score) in scores {
                if features.contains(&name) {
                    reference.features.entry(name).or_default().push(score);
                }
            }
            if names_topics {
                reference
                    .prompt_terms
                    .push(crate::detect::drift::scope::prompt_terms(prompt));
            }
            reference.prompts.push(p);
            reference.outputs.push(o);
        }
    }
    reference.save(&args.out)?;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {}: {} exchanges embedded in {elapsed:.1} s ({:.1}/s), features: {}",
        args.out.display(),
        reference.outputs.len(),
        reference.outputs.len() as f64 / elapsed.max(1e-9),
        if reference.features.is_empty() {
            "none".to_owned()
        } else {
            reference
                .features
                .iter()
                .map(|(name, values)| format!("{name} ({})", values.len()))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    Ok(())
}

fn read_pairs(args: &BuildArgs) -> anyhow::Result<Vec<(String, String)>> {
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("cannot open {}", args.input.display()))?;
    let mut raw = BufReader::new(file);
    let gzip = raw.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    let mut text = String::new();
    if gzip {
        flate2::read::MultiGzDecoder::new(raw).read_to_string(&mut text)?;
    } else {
        raw.read_to_string(&mut text)?;
    }
    let mut pairs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not JSON", args.input.display(), n + 1))?;
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(str::to_owned);
        if let (Some(prompt), Some(output)) = (field(&args.prompt_field), field(&args.output_field))
        {
            pairs.push((prompt, output));
        }
        if args.limit.is_some_and(|limit| pairs.len() >= limit) {
            break;
        }
    }
    Ok(pairs)
}
