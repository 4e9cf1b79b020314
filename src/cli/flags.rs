//! `tripwire flags …`: the flagged-response log for people (tables, highlighted evidence) and
//! for scripts (`--json`: one JSON object per line; `export --format csv`).

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};

use super::output::{StoreArg, clip, emit};
use crate::detect::Target;
use crate::policy::Severity;
use crate::store::{Flag, FlagFilter, Review, now_us};

/// Filters shared by list, tail and export.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Only flags newer than this (e.g. 30m, 1h, 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only flags where this rule fired.
    #[arg(long = "policy", alias = "rule")]
    rule: Option<String>,
    /// Only flags of at least this severity (info, warning, high, critical).
    #[arg(long, value_parser = parse_severity)]
    severity: Option<Severity>,
    /// Only this model.
    #[arg(long)]
    model: Option<String>,
    /// Only this route.
    #[arg(long)]
    route: Option<String>,
    /// Only flags with this label (true-positive, false-positive, none).
    #[arg(long, value_parser = parse_label)]
    label: Option<LabelFilter>,
}

#[derive(Debug, Clone, Copy)]
struct LabelFilter(Option<Review>);

fn parse_severity(text: &str) -> Result<Severity, String> {
    Severity::parse(text).ok_or_else(|| "expected info, warning, high or critical".to_owned())
}

fn parse_label(text: &str) -> Result<LabelFilter, String> {
    if text == "none" || text == "unlabelled" {
        return Ok(LabelFilter(None));
    }
    Review::parse(text)
        .map(|v| LabelFilter(Some(v)))
        .ok_or_else(|| "expected true-positive, false-positive or none".to_owned())
}

impl FilterArgs {
    fn filter(&self, limit: u32) -> FlagFilter {
        FlagFilter {
            since_us: self
                .since
                .map(|d| now_us() - i64::try_from(d.as_micros()).unwrap_or(0)),
            before_us: None,
            rule: self.rule.clone(),
            min_severity: self.severity,
            model: self.model.clone(),
            route: self.route.clone(),
            label: self.label.map(|l| l.0),
            limit: Some(limit),
        }
    }
}

/// Export formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header (loads into pandas as is).
    Csv,
}

/// `tripwire flags …`
#[derive(Debug, Subcommand)]
pub enum FlagsCommand {
    /// List flags, newest first.
    List {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one flag: prompt and output with the evidence highlighted, scores, label.
    Show {
        /// Flag id, exchange id or request id.
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// The record as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Follow new flags as they are written (Ctrl-C to stop); with --since, start that far back.
    Tail {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// How often to look, milliseconds.
        #[arg(long, default_value_t = 500)]
        interval_ms: u64,
    },
    /// Export flags for analysis.
    Export {
        #[command(flatten)]
        store: StoreArg,
        #[command(flatten)]
        filter: FilterArgs,
        /// jsonl or csv.
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// At most this many.
        #[arg(long, default_value_t = 1_000_000)]
        limit: u32,
    },
    /// Label a flag true or false positive.
    Label {
        /// Flag id, exchange id or request id.
        id: String,
        /// true-positive or false-positive.
        #[arg(long, value_parser = parse_verdict)]
        verdict: Review,
        /// Why.
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Trigger attribution: prompt n-grams over-represented among flagged exchanges
    /// (Fisher's exact test, Benjamini–Hochberg), ranked.
    Triggers {
        #[command(flatten)]
        store: StoreArg,
        /// Only this model's exchanges (a scope).
        #[arg(long)]
        model: Option<String>,
        /// Only this route's exchanges.
        #[arg(long)]
        route: Option<String>,
        /// How many of the newest exchanges to read.
        #[arg(long, default_value_t = 50_000)]
        window: u32,
        /// Ignore n-grams in fewer flagged prompts than this.
        #[arg(long, default_value_t = 3)]
        min_flagged: u64,
        /// Largest false-discovery-adjusted p-value (q) shown.
        #[arg(long, default_value_t = 0.05)]
        max_q: f64,
        /// How many candidates.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// As JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Counts by rule, severity and model, and the false-positive share from labels.
    Stats {
        #[command(flatten)]
        store: StoreArg,
        /// Only flags newer than this (e.g. 24h).
        #[arg(long, value_parser = humantime::parse_duration)]
        since: Option<Duration>,
        /// As JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_verdict(text: &str) -> Result<Review, String> {
    Review::parse(text).ok_or_else(|| "expected true-positive or false-positive".to_owned())
}

/// Runs the subcommand. `tail` runs until interrupted.
pub fn run(command: FlagsCommand) -> anyhow::Result<()> {
    match command {
        FlagsCommand::List {
            store,
            filter,
            limit,
            json,
        } => {
            let store = store.open()?;
            let flags = store.list_flags(&filter.filter(limit))?;
            if json {
                emit(&jsonl(&flags)?)
            } else {
                emit(&table(&flags, true))
            }
        }
        FlagsCommand::Show { id, store, json } => {
            let store = store.open()?;
            let flag = store
                .get_flag(&id)?
                .with_context(|| format!("no flag with id or request id {id:?}"))?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&flag)?))
            } else {
                emit(&detail(&flag, std::io::stdout().is_terminal()))
            }
        }
        FlagsCommand::Tail {
            store,
            filter,
            json,
            interval_ms,
        } => {
            let store = store.open()?;
            // From now on, or from --since (then the recent past is shown first).
            let mut since = filter.filter(1).since_us.unwrap_or_else(now_us);
            let mut header = !json;
            loop {
                let mut query = filter.filter(10_000);
                query.since_us = Some(since);
                let mut flags = store.list_flags(&query)?;
                flags.reverse();
                if let Some(last) = flags.last() {
                    since = last.created_at_us + 1;
                    if json {
                        emit(&jsonl(&flags)?)?;
                    } else {
                        emit(&table(&flags, header))?;
                        header = false;
                    }
                }
                std::thread::sleep(Duration::from_millis(interval_ms.max(50)));
            }
        }
        FlagsCommand::Export {
            store,
            filter,
            format,
            limit,
        } => {
            let store = store.open()?;
            let flags = store.list_flags(&filter.filter(limit))?;
            match format {
                ExportFormat::Jsonl => emit(&jsonl(&flags)?),
                ExportFormat::Csv => emit(&csv(&flags)?),
            }
        }
        FlagsCommand::Label {
            id,
            verdict,
            note,
            store,
        } => {
            let store = store.open()?;
            let flag = store
                .label_flag(&id, verdict, note.as_deref())?
                .with_context(|| format!("no flag with id or request id {id:?}"))?;
            let id = flag.id.to_string();
            let allowed = store
                .list_allowed()?
                .into_iter()
                .filter(|a| a.flag_id == id)
                .count();
            let scope = format!("{} × {}", flag.model.as_deref().unwrap_or("-"), flag.route);
            emit(&match verdict {
                Review::FalsePositive => format!(
                    "{id} labelled {}; {allowed} evidence span(s) allowed for its rules in \
                     {scope} (running gateways apply it within 5 s)\n",
                    verdict.as_str()
                ),
                Review::TruePositive => format!("{id} labelled {}\n", verdict.as_str()),
            })
        }
        FlagsCommand::Triggers {
            store,
            model,
            route,
            window,
            min_flagged,
            max_q,
            limit,
            json,
        } => {
            let store = store.open()?;
            let prompts = store.prompts_with_flags(model.as_deref(), route.as_deref(), window)?;
            let mut attribution = crate::inspect::attribution::Attribution::new(200_000);
            for (prompt, flagged) in &prompts {
                attribution.add(prompt, *flagged);
            }
            let candidates = attribution.candidates(min_flagged, max_q, limit);
            if json {
                let mut out = String::new();
                for c in &candidates {
                    out.push_str(&serde_json::to_string(c)?);
                    out.push('\n');
                }
                return emit(&out);
            }
            let (flagged, unflagged) = attribution.totals();
            let mut out = format!(
                "{flagged} flagged and {unflagged} unflagged prompts read\n\n{:<40} {:>8} {:>10} {:>10} {:>10}\n",
                "N-GRAM", "FLAGGED", "UNFLAGGED", "P", "Q"
            );
            for c in &candidates {
                let _ok = writeln!(
                    out,
                    "{:<40} {:>8} {:>10} {:>10.2e} {:>10.2e}",
                    clip(&c.ngram, 40),
                    c.flagged_with,
                    c.unflagged_with,
                    c.p_value,
                    c.q_value
                );
            }
            if candidates.is_empty() {
                out.push_str("(no n-gram is over-represented among flagged prompts)\n");
            }
            emit(&out)
        }
        FlagsCommand::Stats { store, since, json } => {
            let store = store.open()?;
            let stats = store
                .flag_stats(since.map(|d| now_us() - i64::try_from(d.as_micros()).unwrap_or(0)))?;
            if json {
                let mut value = serde_json::to_value(&stats)?;
                value["false_positive_share"] = serde_json::json!(stats.false_positive_share());
                return emit(&format!("{}\n", serde_json::to_string_pretty(&value)?));
            }
            let mut out = String::new();
            let _ok = writeln!(out, "flags: {}", stats.total);
            let _ok = writeln!(
                out,
                "labelled: {} true positive, {} false positive{}",
                stats.true_positives,
                stats.false_positives,
                stats
                    .false_positive_share()
                    .map_or(String::new(), |s| format!(
                        " (false-positive share {:.1}%)",
                        s * 100.0
                    ))
            );
            let _ok = writeln!(
                out,
                "\n{:<32} {:>8} {:>6} {:>6}",
                "RULE", "FLAGS", "TP", "FP"
            );
            for (rule, n, tp, fp) in &stats.by_rule {
                let _ok = writeln!(out, "{rule:<32} {n:>8} {tp:>6} {fp:>6}");
            }
            let _ok = writeln!(out, "\n{:<32} {:>8}", "SEVERITY", "FLAGS");
            for (severity, n) in &stats.by_severity {
                let _ok = writeln!(out, "{severity:<32} {n:>8}");
            }
            let _ok = writeln!(out, "\n{:<32} {:>8}", "MODEL", "FLAGS");
            for (model, n) in &stats.by_model {
                let _ok = writeln!(out, "{model:<32} {n:>8}");
            }
            emit(&out)
        }
    }
}

fn jsonl(flags: &[Flag]) -> anyhow::Result<String> {
    let mut out = String::new();
    for flag in flags {
        out.push_str(&serde_json::to_string(flag)?);
        out.push('\n');
    }
    Ok(out)
}

fn rules(flag: &Flag) -> String {
    flag.policies
        .iter()
        .map(|p| p.name.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn csv(flags: &[Flag]) -> anyhow::Result<String> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record([
        "id",
        "request_id",
        "created_at",
        "model",
        "route",
        "api_key_hash",
        "severity",
        "rules",
        "prompt",
        "output",
        "stream",
        "truncated",
        "label",
        "label_note",
    ])?;
    for f in flags {
        let label = f.label.as_ref();
        writer.write_record([
            f.id.to_string().as_str(),
            &f.request_id,
            &f.created_at,
            f.model.as_deref().unwrap_or(""),
            &f.route,
            f.api_key_hash.as_deref().unwrap_or(""),
            f.severity.as_str(),
            &rules(f),
            &f.prompt,
            &f.output,
            if f.stream { "true" } else { "false" },
            if f.truncated { "true" } else { "false" },
            label.map_or("", |l| l.verdict.as_str()),
            label.and_then(|l| l.note.as_deref()).unwrap_or(""),
        ])?;
    }
    Ok(String::from_utf8(writer.into_inner()?)?)
}

fn table(flags: &[Flag], header: bool) -> String {
    let mut out = String::new();
    if header {
        let _ok = writeln!(
            out,
            "{:<36}  {:<23}  {:<8}  {:<28}  {:<18}  {:<14}  OUTPUT",
            "ID", "CREATED", "SEVERITY", "RULES", "MODEL", "LABEL"
        );
    }
    for f in flags {
        let _ok = writeln!(
            out,
            "{:<36}  {:<23}  {:<8}  {:<28}  {:<18}  {:<14}  {}",
            f.id,
            f.created_at,
            f.severity.as_str(),
            clip(&rules(f), 28),
            clip(f.model.as_deref().unwrap_or("-"), 18),
            f.label.as_ref().map_or("-", |l| l.verdict.as_str()),
            clip(&f.output.replace(['\n', '\r'], " "), 50),
        );
    }
    if header && flags.is_empty() {
        out.push_str("(no flags)\n");
    }
    out
}

fn detail(flag: &Flag, color: bool) -> String {
    let mut out = String::new();
    let _ok = writeln!(out, "flag:        {}", flag.id);
    let _ok = writeln!(out, "request id:  {}", flag.request_id);
    let _ok = writeln!(out, "exchange:    {}", flag.exchange_id);
    let _ok = writeln!(out, "created at:  {}", flag.created_at);
    let _ok = writeln!(out, "severity:    {}", flag.severity.as_str());
    let _ok = writeln!(
        out,
        "scope:       model {} · route {} · key {}",
        flag.model.as_deref().unwrap_or("-"),
        flag.route,
        flag.api_key_hash.as_deref().unwrap_or("-")
    );
    let _ok = writeln!(
        out,
        "stream:      {}{}",
        flag.stream,
        if flag.truncated { " (truncated)" } else { "" }
    );
    match &flag.label {
        Some(label) => {
            let _ok = writeln!(
                out,
                "label:       {} at {}{}",
                label.verdict.as_str(),
                label.labelled_at,
                label
                    .note
                    .as_deref()
                    .map_or(String::new(), |n| format!(" — {n}"))
            );
        }
        None => {
            let _ok = writeln!(
                out,
                "label:       none (tripwire flags label {} --verdict true-positive|false-positive)",
                flag.id
            );
        }
    }
    let _ok = writeln!(out, "\nrules:");
    for rule in &flag.policies {
        let _ok = writeln!(
            out,
            "  {} [{}]  when {}",
            rule.name,
            rule.severity.as_str(),
            rule.when
        );
        if let Some(description) = &rule.description {
            let _ok = writeln!(out, "    {description}");
        }
        for (detector, fields) in &rule.scores {
            let _ok = writeln!(out, "    {detector}: {fields}");
        }
    }
    let _ok = writeln!(out, "\nprompt:");
    let _ok = writeln!(
        out,
        "{}",
        highlight(&flag.prompt, flag, Target::Prompt, color)
    );
    let _ok = writeln!(out, "\noutput:");
    let _ok = writeln!(
        out,
        "{}",
        highlight(&flag.output, flag, Target::Output, color)
    );
    if !flag.evidence.is_empty() {
        let _ok = writeln!(out, "\nevidence:");
        for e in &flag.evidence {
            let text = match e.evidence.target {
                Target::Prompt => &flag.prompt,
                Target::Output => &flag.output,
            };
            let span = text.get(e.evidence.start..e.evidence.end).unwrap_or("");
            let _ok = writeln!(
                out,
                "  {} {:?} {}..{}: {} — {:?}",
                e.detector,
                e.evidence.target,
                e.evidence.start,
                e.evidence.end,
                e.evidence.note,
                clip(span, 80)
            );
        }
    }
    out
}

/// Marks evidence spans: reverse video on a terminal, «» otherwise.
fn highlight(text: &str, flag: &Flag, target: Target, color: bool) -> String {
    let mut spans: Vec<(usize, usize)> = flag
        .evidence
        .iter()
        .filter(|e| e.evidence.target == target)
        .map(|e| (e.evidence.start, e.evidence.end))
        .filter(|&(s, e)| s < e && text.get(s..e).is_some())
        .collect();
    spans.sort_unstable();
    let (open, close) = if color {
        ("\x1b[7m", "\x1b[0m")
    } else {
        ("«", "»")
    };
    let mut out = String::with_capacity(text.len() + spans.len() * 8);
    let mut at = 0;
    for (start, end) in spans {
        if start < at {
            continue;
        }
        out.push_str(text.get(at..start).unwrap_or(""));
        out.push_str(open);
        out.push_str(text.get(start..end).unwrap_or(""));
        out.push_str(close);
        at = end;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    out
}
