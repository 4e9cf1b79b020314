//! `tripwire eval-drift`: drift detection on the development data — false alarms on clean
//! streams (leave-one-model-out with `--lomo`, at several arrival rates), delays after model
//! swaps and sentence injection, and topic-targeted slant (see [`crate::lab::drift_replay`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::output::emit;
use crate::infer::{EmbedderConfig, Truncation};
use crate::lab::drift_replay::{ArrivalRate, DriftEvalOptions, StreamResult, run as evaluate};

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
    /// Leave-one-model-out: every model in the data directory (or `--models`, when given) gets
    /// `--seeds` clean streams of its own, each replayed at every `--rates` profile.
    #[arg(long)]
    lomo: bool,
    /// Arrival-rate profiles of the clean streams: `all` (every exchange embedded), `burst`, or
    /// exchanges a second (sampled as the gateway samples).
    #[arg(long, value_delimiter = ',', default_value = "all,1,100,burst")]
    rates: Vec<ArrivalRate>,
    /// Seeds per topic of the topic-slant streams (0: none).
    #[arg(long, default_value_t = 5)]
    slant_seeds: u64,
    /// Answers on the slanted topic after the change before a slant counts as missed.
    #[arg(long, default_value_t = 300)]
    slant_horizon: usize,
    /// Topics slanted (cooking, travel, health, finance, music, movies, games, pets, space);
    /// default: all.
    #[arg(long, value_delimiter = ',')]
    slant_topics: Vec<String>,
    /// Skip the model-swap and injection streams.
    #[arg(long)]
    no_changes: bool,
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
    let models = if args.lomo && !explicit_models() {
        all_models(&args.data)?
    } else {
        args.models.clone()
    };
    anyhow::ensure!(!models.is_empty(), "--models: name at least one model");
    anyhow::ensure!(!args.rates.is_empty(), "--rates: name at least one profile");
    let options = DriftEvalOptions {
        data_dir: args.data.clone(),
        models,
        lomo: args.lomo,
        rates: args.rates.clone(),
        slant_seeds: args.slant_seeds,
        slant_horizon: args.slant_horizon,
        slant_topics: args.slant_topics.clone(),
        changes: !args.no_changes,
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

/// Whether `--models` was given on the command line.
fn explicit_models() -> bool {
    std::env::args().any(|a| a == "--models" || a.starts_with("--models="))
}

/// Every model with outputs in `data/alpaca_eval/`, sorted.
fn all_models(data: &std::path::Path) -> anyhow::Result<Vec<String>> {
    let dir = data.join("alpaca_eval");
    let mut models: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            entry
                .file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".jsonl.gz"))
                .map(str::to_owned)
        })
        .collect();
    models.sort();
    Ok(models)
}

fn summary(results: &[StreamResult], args: &EvalDriftArgs) -> String {
    let mut out = String::new();
    if args.lomo {
        lomo_table(&mut out, results, args);
    }
    change_table(&mut out, results, args);
    slant_table(&mut out, results, args);
    out
}

/// False alarms per held-out model and arrival-rate profile.
fn lomo_table(out: &mut String, results: &[StreamResult], args: &EvalDriftArgs) {
    let _ok = writeln!(
        out,
        "Leave-one-model-out: clean streams of each model ({} seeds × {} exchanges after the \
         reference), its thresholds fitted on its own first exchanges, nothing fitted on it \
         beforehand.\n",
        args.seeds, args.clean
    );
    let _ok = writeln!(
        out,
        "| held-out model | arrival rate | streams | exchanges tested | embedding observations \
         tested | false alarms | streams with any |"
    );
    let _ok = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    let mut keys: Vec<(&str, &str)> = results
        .iter()
        .filter(|r| r.scenario == "clean")
        .map(|r| (r.model.as_str(), r.rate.as_str()))
        .collect();
    keys.sort();
    keys.dedup();
    let mut total = 0;
    for (model, rate) in keys {
        let streams: Vec<&StreamResult> = results
            .iter()
            .filter(|r| r.scenario == "clean" && r.model == model && r.rate == rate)
            .collect();
        let alarms: usize = streams.iter().map(|r| r.false_alarms).sum();
        total += alarms;
        let _ok = writeln!(
            out,
            "| {model} | {rate} | {} | {} | {} | {alarms} | {} |",
            streams.len(),
            streams.iter().map(|r| r.exchanges_before).sum::<usize>(),
            streams.iter().map(|r| r.embedded_before).sum::<usize>(),
            streams.iter().filter(|r| r.false_alarms > 0).count(),
        );
    }
    let _ok = writeln!(out, "\nFalse alarms in all clean streams: {total}.\n");
}

/// Topic slant: delays in answers on the topic, and whether the alarm named it.
fn slant_table(out: &mut String, results: &[StreamResult], args: &EvalDriftArgs) {
    let slants: Vec<&StreamResult> = results.iter().filter(|r| r.scenario == "slant").collect();
    if slants.is_empty() {
        return;
    }
    let _ok = writeln!(
        out,
        "\nTopic slant: from the change on, answers to one topic's prompts carry one to three \
         sentences against a made-up entity ({} seeds per topic, horizon {} answers on the \
         topic). Delay: answers on the topic until the first alarm naming a topic.\n",
        args.slant_seeds, args.slant_horizon
    );
    let _ok = writeln!(
        out,
        "| topic | share of prompts | streams | alarmed | named the topic's cluster | its words \
         hold a topic keyword | examples mostly slanted | median delay | max delay | false alarms before | first topic alarm (most often) \
         | named by: the flagged answers' prompt words (the topic's) |"
    );
    let _ok = writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    let mut topics: Vec<&str> = slants.iter().filter_map(|r| r.to.as_deref()).collect();
    topics.sort();
    topics.dedup();
    let (mut all, mut named, mut within, mut pointing, mut words) = (0, 0, 0, 0, 0);
    for topic in topics {
        let streams: Vec<&&StreamResult> = slants
            .iter()
            .filter(|r| r.to.as_deref() == Some(topic))
            .collect();
        let mut delays: Vec<usize> = streams
            .iter()
            .filter_map(|r| r.slant.as_ref().and_then(|s| s.topic_answers))
            .collect();
        delays.sort_unstable();
        let correct = streams
            .iter()
            .filter(|r| {
                r.slant
                    .as_ref()
                    .is_some_and(|s| s.named_topic.is_some() && s.named_topic == s.expected_topic)
            })
            .count();
        // Worded: the words the alarm names the topic by hold one of the topic's keywords.
        let keywords = crate::lab::topic_slant::TOPICS
            .iter()
            .find(|t| t.name == topic)
            .map_or(&[][..], |t| t.keywords);
        let worded = streams
            .iter()
            .filter(|r| {
                r.slant.as_ref().is_some_and(|s| {
                    s.topic_answers.is_some()
                        && s.terms
                            .iter()
                            .chain(&s.recent_terms)
                            .any(|w| keywords.contains(&w.as_str()))
                })
            })
            .count();
        // Pointed: most answers the alarm names as examples are slanted ones.
        let pointed = streams
            .iter()
            .filter(|r| {
                r.slant
                    .as_ref()
                    .is_some_and(|s| s.topic_answers.is_some() && s.slanted_examples > 0.5)
            })
            .count();
        let share = streams
            .first()
            .and_then(|r| r.slant.as_ref())
            .map_or(0.0, |s| s.share);
        let mut tests: BTreeMap<String, usize> = BTreeMap::new();
        for r in &streams {
            if let Some(test) = r.slant.as_ref().and_then(|s| s.test.clone()) {
                *tests.entry(test).or_default() += 1;
            }
        }
        let top = tests
            .iter()
            .max_by_key(|(_, n)| **n)
            .map_or("-".to_owned(), |(name, n)| format!("{name} ({n})"));
        let example = streams
            .iter()
            .filter_map(|r| r.slant.as_ref())
            .find(|s| !s.recent_terms.is_empty() || !s.terms.is_empty())
            .map_or("-".to_owned(), |s| {
                format!(
                    "{} (topic: {})",
                    s.recent_terms.join(", "),
                    s.terms.join(", ")
                )
            });
        all += streams.len();
        named += correct;
        pointing += pointed;
        words += worded;
        within += delays.iter().filter(|&&d| d <= 150).count();
        let _ok = writeln!(
            out,
            "| {topic} | {:.1}% | {} | {} | {correct} | {worded} | {pointed} | {} | {} | {} | {top} | {example} |",
            share * 100.0,
            streams.len(),
            delays.len(),
            delays
                .get(delays.len() / 2)
                .map_or("-".to_owned(), |d| d.to_string()),
            delays.last().map_or("-".to_owned(), |d| d.to_string()),
            streams.iter().map(|r| r.false_alarms).sum::<usize>(),
        );
    }
    let _ok = writeln!(
        out,
        "\nSlant streams: {all}; alarmed within 150 answers on the topic: {within}; the alarm named \
         the topic's cluster: {named}; its words hold a topic keyword: {words}; its examples mostly \
         slanted answers: {pointing}."
    );
}

/// Swaps and injections: delays after the change.
fn change_table(out: &mut String, results: &[StreamResult], args: &EvalDriftArgs) {
    if !results
        .iter()
        .any(|r| r.scenario == "swap" || r.scenario == "injection")
    {
        return;
    }

    let clean: Vec<&StreamResult> = results
        .iter()
        .filter(|r| r.scenario == "clean" && r.rate == ArrivalRate::Every.to_string())
        .collect();
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
        .filter(|r| r.scenario == "swap" || r.scenario == "injection")
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
}
