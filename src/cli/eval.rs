//! `tripwire eval --data FILE.jsonl`: detectors and policies run offline on labelled lines;
//! precision, recall and F1 per rule, ROC-AUC per detector score.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Args;

use super::output::emit;
use crate::lab::quality::{evaluate, read_lines};
use crate::policy::Engine;
use crate::telemetry::Metrics;

/// Options of `tripwire eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Labelled JSON lines `{prompt, output, label[, model, split]}` (gzip accepted).
    #[arg(long)]
    data: PathBuf,
    /// Policy file or directory (default: the built-in policy).
    #[arg(long)]
    policies: Option<PathBuf>,
    /// Only lines of this split (e.g. report).
    #[arg(long)]
    split: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Also print up to this many clean lines that were flagged.
    #[arg(long, default_value_t = 0)]
    show_false_positives: usize,
}

/// Runs the evaluation and prints the report.
pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let policies = match &args.policies {
        Some(path) => crate::policy::load_path(path)?,
        None => vec![crate::policy::default_policy()?],
    };
    let engine = Engine::new(policies, Metrics::default());
    let mut lines = read_lines(&args.data)?;
    if let Some(split) = &args.split {
        lines.retain(|l| l.split.as_deref() == Some(split.as_str()));
    }
    anyhow::ensure!(
        !lines.is_empty(),
        "no lines to evaluate in {}",
        args.data.display()
    );
    let report = evaluate(&engine, &lines);
    if args.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(&report)?));
    }
    let mut out = String::new();
    let _ok = writeln!(
        out,
        "{} lines: {} clean, {}",
        report.lines,
        report.clean,
        report
            .labels
            .iter()
            .filter(|(k, _)| k.as_str() != "clean")
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ok = writeln!(
        out,
        "clean lines flagged by any rule: {} ({:.3}%)\n",
        report.clean_flagged,
        if report.clean == 0 {
            0.0
        } else {
            100.0 * report.clean_flagged as f64 / report.clean as f64
        }
    );
    let _ok = writeln!(
        out,
        "{:<24} {:>9} {:>7} {:>7} {:>6} {:>6} {:>6}  RECALL BY KIND",
        "RULE", "PRECISION", "RECALL", "F1", "TP", "FP", "FN"
    );
    for (rule, s) in &report.rules {
        let kinds = s
            .by_kind
            .iter()
            .map(|(k, (hit, n))| format!("{k} {hit}/{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ok = writeln!(
            out,
            "{:<24} {:>9.4} {:>7.4} {:>7.4} {:>6} {:>6} {:>6}  {}",
            rule,
            s.precision(),
            s.recall(),
            s.f1(),
            s.tp,
            s.fp,
            s.fn_,
            kinds
        );
    }
    let streams: Vec<_> = report
        .first_hit
        .iter()
        .filter(|(k, _)| k.contains('#'))
        .collect();
    if !streams.is_empty() {
        let _ok = writeln!(
            out,
            "\n{:<56} {:>12} {:>9}",
            "STREAM / LABEL", "FIRST FLAG", "AFFECTED"
        );
        for (key, (first, total)) in streams {
            let _ok = writeln!(
                out,
                "{:<56} {:>12} {:>9}",
                key,
                first.map_or("never".to_owned(), |n| format!("#{n}")),
                total
            );
        }
    }
    let _ok = writeln!(out, "\n{:<40} {:>8}", "DETECTOR SCORE / KIND", "ROC-AUC");
    for (detector, auc) in &report.auc {
        let _ok = writeln!(out, "{detector:<40} {auc:>8.4}");
    }
    for fp in report
        .false_positives
        .iter()
        .take(args.show_false_positives)
    {
        let _ok = writeln!(
            out,
            "\nfalse positive [{}] {}\n  prompt: {}\n  output: {}",
            fp.rules.join(","),
            fp.model,
            fp.prompt.replace('\n', " "),
            fp.output.replace('\n', " ")
        );
        for evidence in &fp.evidence {
            let _ok = writeln!(out, "  evidence: {evidence}");
        }
    }
    emit(&out)
}
