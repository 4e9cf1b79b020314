//! `tripwire calibrate`: re-derive each rule's threshold from the store, the review loop's last
//! step (flag → label → calibrate). For each rule whose condition compares a detector field with
//! a number, the detector runs again over the recent stored exchanges (prompt and output are
//! stored), and the threshold is chosen that keeps the rule's flag rate on clean traffic (every
//! exchange not labelled true positive) at or under `--target-clean-rate`, while firing on as
//! many flags labelled true positive as it can (`policy::calibrate`).
//!
//! The result is printed as a unified diff of the policy file and a table; nothing is written.
//! A threshold is a policy change: a person reviews it, applies it and runs `tripwire policy
//! check`.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use super::output::{StoreArg, emit};
use crate::capture::Exchange;
use crate::policy::calibrate::{self, Comparison, LineChange, NoProposal, Scores};
use crate::policy::judge::{exchange_fields, scope_matches};
use crate::policy::{CompiledPolicy, CompiledRule, DEFAULT_POLICY, Engine};
use crate::store::{ExchangeFilter, FlagFilter, Review, Store, now_us, rfc3339};
use crate::telemetry::Metrics;

/// Fewer exchanges than this say too little about clean traffic to move a threshold.
const MIN_EXCHANGES: usize = 200;

/// Options of `tripwire calibrate`.
#[derive(Debug, Args)]
pub struct CalibrateArgs {
    /// Policy file or directory (default: the built-in policy).
    #[arg(long)]
    policies: Option<PathBuf>,
    #[command(flatten)]
    store: StoreArg,
    /// How far back the clean traffic goes (e.g. 24h, 7d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "7d")]
    since: Duration,
    /// The share of clean exchanges a rule may flag (0.001: one in a thousand).
    #[arg(long, default_value_t = 0.001)]
    target_clean_rate: f64,
    /// Read at most this many of the newest exchanges.
    #[arg(long, default_value_t = 100_000)]
    max_exchanges: u32,
    /// Print the report (with the diff) as JSON.
    #[arg(long)]
    json: bool,
}

/// What `calibrate` found.
#[derive(Debug, Serialize)]
struct Report {
    /// Exchanges read (started within `--since`).
    exchanges: usize,
    /// The start of the window (RFC 3339).
    since: String,
    target_clean_rate: f64,
    /// Flags labelled true positive / false positive (any age).
    labelled_true_positive: usize,
    labelled_false_positive: usize,
    /// Why nothing was proposed, when so.
    #[serde(skip_serializing_if = "Option::is_none")]
    refused: Option<String>,
    rules: Vec<RuleReport>,
    skipped: Vec<Skipped>,
    /// The proposed change as a unified diff of the policy files (empty: none).
    diff: String,
}

/// One calibrated rule.
#[derive(Debug, Serialize)]
struct RuleReport {
    rule: String,
    policy: String,
    comparison: Comparison,
    current: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    proposed: Option<f64>,
    /// The comparison with the proposed threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    proposed_comparison: Option<String>,
    /// Clean exchanges in the rule's scope.
    clean_exchanges: usize,
    clean_rate_now: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    clean_rate_proposed: Option<f64>,
    /// Flags labelled true positive for this rule whose exchange is still stored.
    true_positives: usize,
    tp_kept_now: usize,
    tp_kept_proposed: usize,
    /// Flags labelled true positive that fire now and would not with the proposed threshold.
    tp_lost: Vec<String>,
    /// Flags labelled false positive for this rule whose exchange is still stored.
    false_positives: usize,
    fp_firing_now: usize,
    /// Of those, how many the proposed threshold no longer fires on.
    fp_removed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    note: Option<String>,
}

/// A rule with a numeric comparison that was not calibrated, and why.
#[derive(Debug, Serialize)]
struct Skipped {
    rule: String,
    policy: String,
    reason: String,
}

/// A rule to calibrate: its comparison and the condition with it replaced by true and false.
struct Target<'a> {
    policy: &'a CompiledPolicy,
    rule: &'a CompiledRule,
    comparison: Comparison,
    when_true: cel::Program,
    when_false: cel::Program,
    samples: Vec<Sample>,
}

/// One exchange as a rule sees it.
struct Sample {
    exchange_id: String,
    in_window: bool,
    score: Option<f64>,
    /// The condition with the comparison true / false.
    if_true: bool,
    if_false: bool,
}

impl Sample {
    fn fires(&self, op: calibrate::Op, threshold: f64) -> bool {
        self.if_false || (self.if_true && self.score.is_some_and(|s| op.holds(s, threshold)))
    }
}

/// The labelled flags: exchange id → (flag id, verdict, rules that fired).
type Labels = HashMap<String, (String, Review, HashSet<String>)>;

/// Runs the calibration and prints the proposal.
pub fn run(args: CalibrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.target_clean_rate > 0.0 && args.target_clean_rate < 1.0,
        "--target-clean-rate must be between 0 and 1 (e.g. 0.001)"
    );
    let policies = match &args.policies {
        Some(path) => crate::policy::load_path(path)?,
        None => vec![crate::policy::default_policy()?],
    };
    let store = args.store.open()?;
    let since_us = now_us() - i64::try_from(args.since.as_micros()).unwrap_or(i64::MAX);
    let mut exchanges: Vec<Exchange> = store
        .list_exchanges(&ExchangeFilter {
            limit: Some(args.max_exchanges),
            ..ExchangeFilter::default()
        })?
        .into_iter()
        .filter(|e| e.started_at_us >= since_us)
        .collect();
    let labels = labelled(&store)?;
    let mut report = Report {
        exchanges: exchanges.len(),
        since: rfc3339(since_us),
        target_clean_rate: args.target_clean_rate,
        labelled_true_positive: labels
            .values()
            .filter(|l| l.1 == Review::TruePositive)
            .count(),
        labelled_false_positive: labels
            .values()
            .filter(|l| l.1 == Review::FalsePositive)
            .count(),
        refused: None,
        rules: Vec::new(),
        skipped: Vec::new(),
        diff: String::new(),
    };
    if exchanges.len() < MIN_EXCHANGES {
        report.refused = Some(format!(
            "too few exchanges since {} ({} < {MIN_EXCHANGES}): nothing proposed; widen --since \
             or wait for more traffic",
            report.since,
            exchanges.len()
        ));
        return print(&args, &report);
    }
    let in_window: HashSet<String> = exchanges.iter().map(|e| e.id.to_string()).collect();
    // Labelled flags older than the window still count as labelled examples.
    for exchange_id in labels.keys() {
        if !in_window.contains(exchange_id)
            && let Some(exchange) = store.get_exchange(exchange_id)?
        {
            exchanges.push(exchange);
        }
    }

    let engine = Engine::new(policies, Metrics::default());
    let mut targets = Vec::new();
    for policy in engine.policies() {
        let detectors: Vec<String> = policy.detectors.iter().map(|(n, _)| n.clone()).collect();
        for rule in policy.rules.iter().filter(|r| !r.deferred) {
            let mut found = calibrate::comparisons(&rule.when, &detectors);
            let skip = |reason: String| Skipped {
                rule: rule.name.clone(),
                policy: policy.source.clone(),
                reason,
            };
            match found.len() {
                0 => continue,
                1 => {}
                n => {
                    report.skipped.push(skip(format!(
                        "{n} numeric comparisons; calibrate one at a time by hand"
                    )));
                    continue;
                }
            }
            let comparison = found.remove(0);
            let compile = |with| cel::Program::compile(&comparison.replaced(&rule.when, with));
            match (compile("true"), compile("false")) {
                (Ok(when_true), Ok(when_false)) => targets.push(Target {
                    policy,
                    rule,
                    comparison,
                    when_true,
                    when_false,
                    samples: Vec::new(),
                }),
                _ => report.skipped.push(skip(
                    "the condition does not compile with the comparison replaced".to_owned(),
                )),
            }
        }
    }

    for exchange in &exchanges {
        sample(
            &engine,
            exchange,
            in_window.contains(&exchange.id.to_string()),
            &mut targets,
        );
    }

    let mut changes: HashMap<String, Vec<LineChange>> = HashMap::new();
    for target in &targets {
        let (rule_report, change) = judge(target, &labels, args.target_clean_rate);
        if let Some(change) = change {
            changes
                .entry(target.policy.source.clone())
                .or_default()
                .push(change);
        }
        report.rules.push(rule_report);
    }
    let mut sources: Vec<&String> = changes.keys().collect();
    sources.sort();
    for source in sources {
        let (name, text) = policy_text(source)?;
        report
            .diff
            .push_str(&calibrate::unified_diff(&name, &text, &changes[source]));
    }
    print(&args, &report)
}

/// Every labelled flag by its exchange.
fn labelled(store: &Store) -> anyhow::Result<Labels> {
    let mut labels = Labels::new();
    for verdict in [Review::FalsePositive, Review::TruePositive] {
        for flag in store.list_flags(&FlagFilter {
            label: Some(Some(verdict)),
            limit: Some(1_000_000),
            ..FlagFilter::default()
        })? {
            let rules = flag.policies.iter().map(|r| r.name.clone()).collect();
            // A true-positive label wins over a false-positive one on the same exchange.
            labels.insert(
                flag.exchange_id.to_string(),
                (flag.id.to_string(), verdict, rules),
            );
        }
    }
    Ok(labels)
}

/// Runs the detectors on `exchange` once and records, for each target in scope, the score and
/// the condition with the comparison true and false.
fn sample(engine: &Engine, exchange: &Exchange, in_window: bool, targets: &mut [Target<'_>]) {
    let (_verdict, findings) = engine.evaluate_with_findings(exchange);
    let mut context = cel::Context::default();
    let mut seen = HashSet::new();
    if let Ok(value) = cel::to_value(exchange_fields(exchange)) {
        context.add_variable_from_value("exchange", value);
    }
    for (name, fields) in &findings {
        if seen.insert(name.clone())
            && let Ok(value) = cel::to_value(fields)
        {
            context.add_variable_from_value(name.clone(), value);
        }
    }
    for target in targets.iter_mut() {
        if !scope_matches(&target.rule.scope, exchange) {
            continue;
        }
        let Some(fields) = findings
            .iter()
            .find(|(name, _)| *name == target.comparison.detector)
            .map(|(_, f)| f)
        else {
            continue;
        };
        let holds = |program: &cel::Program| {
            matches!(program.execute(&context), Ok(cel::Value::Bool(true)))
        };
        target.samples.push(Sample {
            exchange_id: exchange.id.to_string(),
            in_window,
            score: target.comparison.score(fields),
            if_true: holds(&target.when_true),
            if_false: holds(&target.when_false),
        });
    }
}

/// The proposal for one rule, and the policy line it changes.
fn judge(target: &Target<'_>, labels: &Labels, rate: f64) -> (RuleReport, Option<LineChange>) {
    let cmp = &target.comparison;
    let rule = &target.rule.name;
    let label_of = |s: &Sample| labels.get(&s.exchange_id);
    let is_tp = |s: &Sample| {
        label_of(s).is_some_and(|(_, v, rules)| *v == Review::TruePositive && rules.contains(rule))
    };
    let is_fp = |s: &Sample| {
        label_of(s).is_some_and(|(_, v, rules)| *v == Review::FalsePositive && rules.contains(rule))
    };
    let is_clean = |s: &Sample| {
        s.in_window && !label_of(s).is_some_and(|(_, v, _)| *v == Review::TruePositive)
    };
    let mut scores = Scores::default();
    for s in target.samples.iter() {
        if is_clean(s) {
            scores.clean_total += 1;
            if s.if_false {
                scores.clean_always += 1;
            } else if s.if_true
                && let Some(score) = s.score
            {
                scores.clean.push(score);
            }
        }
        if is_tp(s)
            && !s.if_false
            && s.if_true
            && let Some(score) = s.score
        {
            scores.true_positive.push(score);
        }
    }
    let negated = target.samples.iter().any(|s| s.if_false && !s.if_true);
    let clean: Vec<&Sample> = target.samples.iter().filter(|s| is_clean(s)).collect();
    let tps: Vec<&Sample> = target.samples.iter().filter(|s| is_tp(s)).collect();
    let fps: Vec<&Sample> = target.samples.iter().filter(|s| is_fp(s)).collect();
    let rate_at = |t: f64| {
        let fired = clean.iter().filter(|s| s.fires(cmp.op, t)).count();
        if clean.is_empty() {
            0.0
        } else {
            fired as f64 / clean.len() as f64
        }
    };
    let count_at = |set: &[&Sample], t: f64| set.iter().filter(|s| s.fires(cmp.op, t)).count();
    let mut report = RuleReport {
        rule: rule.clone(),
        policy: target.policy.source.clone(),
        comparison: cmp.clone(),
        current: cmp.threshold,
        proposed: None,
        proposed_comparison: None,
        clean_exchanges: clean.len(),
        clean_rate_now: rate_at(cmp.threshold),
        clean_rate_proposed: None,
        true_positives: tps.len(),
        tp_kept_now: count_at(&tps, cmp.threshold),
        tp_kept_proposed: count_at(&tps, cmp.threshold),
        tp_lost: Vec::new(),
        false_positives: fps.len(),
        fp_firing_now: count_at(&fps, cmp.threshold),
        fp_removed: 0,
        note: None,
    };
    if negated {
        report.note = Some("the comparison is negated in the condition; not calibrated".into());
        return (report, None);
    }
    if clean.is_empty() {
        report.note = Some("no clean exchange in the rule's scope".into());
        return (report, None);
    }
    let proposed = match calibrate::propose(cmp, &scores, rate) {
        Ok(t) => t,
        Err(NoProposal::FiresRegardless { exchanges }) => {
            report.note = Some(format!(
                "{exchanges} clean exchanges fire whatever the threshold: the target is out of \
                 this comparison's reach"
            ));
            return (report, None);
        }
    };
    let text = cmp.format(proposed);
    let proposed: f64 = text.parse().unwrap_or(proposed);
    report.proposed = Some(proposed);
    report.proposed_comparison = Some(cmp.with_threshold(proposed));
    report.clean_rate_proposed = Some(rate_at(proposed));
    report.tp_kept_proposed = count_at(&tps, proposed);
    report.tp_lost = tps
        .iter()
        .filter(|s| s.fires(cmp.op, cmp.threshold) && !s.fires(cmp.op, proposed))
        .filter_map(|s| label_of(s).map(|(id, _, _)| id.clone()))
        .collect();
    report.fp_removed = fps
        .iter()
        .filter(|s| s.fires(cmp.op, cmp.threshold) && !s.fires(cmp.op, proposed))
        .count();
    if text == cmp.literal || proposed == cmp.threshold {
        return (report, None);
    }
    let change = policy_text(&target.policy.source)
        .ok()
        .and_then(|(_, policy)| calibrate::change_line(&policy, rule, cmp, &text));
    if change.is_none() {
        report.note = Some(format!(
            "the condition was not found on one line of {}; change it by hand",
            target.policy.source
        ));
    }
    (report, change)
}

/// The name a diff shows for a policy and its text: the file, or the built-in policy.
fn policy_text(source: &str) -> anyhow::Result<(String, String)> {
    if source.starts_with("<built-in") {
        return Ok((
            "policies/default.yaml (built-in; copy it and pass --policies to change it)".into(),
            DEFAULT_POLICY.to_owned(),
        ));
    }
    let text = std::fs::read_to_string(source)
        .map_err(|e| anyhow::anyhow!("cannot read policy {source}: {e}"))?;
    Ok((source.to_owned(), text))
}

fn print(args: &CalibrateArgs, report: &Report) -> anyhow::Result<()> {
    if args.json {
        return emit(&format!("{}\n", serde_json::to_string_pretty(report)?));
    }
    let mut out = String::new();
    let _ok = writeln!(
        out,
        "{} exchanges since {}; {} flags labelled true positive, {} false positive; target \
         clean rate {:.3}%",
        report.exchanges,
        report.since,
        report.labelled_true_positive,
        report.labelled_false_positive,
        100.0 * report.target_clean_rate
    );
    if let Some(refused) = &report.refused {
        let _ok = writeln!(out, "{refused}");
        return emit(&out);
    }
    if report.diff.is_empty() {
        let _ok = writeln!(out, "\nNo threshold to change.");
    } else {
        let _ok = writeln!(out, "\n{}", report.diff);
    }
    let _ok = writeln!(
        out,
        "{:<24} {:<32} {:>9} {:>9} {:>21} {:>9} {:>10}",
        "RULE",
        "COMPARISON",
        "CURRENT",
        "PROPOSED",
        "CLEAN RATE NOW → NEW",
        "TP KEPT",
        "FP REMOVED"
    );
    for r in &report.rules {
        let _ok = writeln!(
            out,
            "{:<24} {:<32} {:>9} {:>9} {:>21} {:>9} {:>10}",
            r.rule,
            r.comparison.text,
            r.comparison.literal,
            r.proposed
                .map_or("-".to_owned(), |t| r.comparison.format(t)),
            format!(
                "{:.3}% → {}",
                100.0 * r.clean_rate_now,
                r.clean_rate_proposed
                    .map_or("-".to_owned(), |p| format!("{:.3}%", 100.0 * p))
            ),
            format!("{}/{}", r.tp_kept_proposed, r.true_positives),
            format!("{}/{}", r.fp_removed, r.fp_firing_now),
        );
    }
    for r in &report.rules {
        if !r.tp_lost.is_empty() {
            let _ok = writeln!(
                out,
                "warning: {} would no longer fire on {} flag(s) labelled true positive: {}",
                r.rule,
                r.tp_lost.len(),
                r.tp_lost.join(", ")
            );
        }
        if let Some(note) = &r.note {
            let _ok = writeln!(out, "note: {}: {note}", r.rule);
        }
    }
    for s in &report.skipped {
        let _ok = writeln!(out, "skipped: {}: {}", s.rule, s.reason);
    }
    let _ok = writeln!(
        out,
        "\nNothing was written. Review the diff, apply it to the policy file, run `tripwire \
         policy check`, then reload the gateway."
    );
    emit(&out)
}
