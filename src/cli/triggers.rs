//! `tripwire triggers`: the watched triggers (discovered by trigger attribution or added by a
//! person), and the retro-scan of the store for the exchanges that carried one. Decisions are
//! written to the store; running gateways take them within a few seconds
//! (`app::TRIGGER_SYNC`), or at once through the admin API (`POST /admin/triggers`).

use std::fmt::Write as _;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::output::{StoreArg, clip, emit};
use crate::store::{TriggerState, WatchedTrigger, rfc3339};

/// What to do with the watched triggers.
#[derive(Debug, Subcommand)]
pub enum TriggersCommand {
    /// Every trigger: watched, removed and rejected, with how it was found.
    List {
        #[command(flatten)]
        store: StoreArg,
        /// Only watched ones.
        #[arg(long)]
        watched: bool,
        /// As JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Watch an n-gram: every later exchange whose prompt carries it is flagged by
    /// `discovered-trigger`.
    Add(Decision),
    /// Stop watching a trigger (discovery may promote it again if the evidence returns).
    Remove(Decision),
    /// Reject an n-gram for good: not watched, never promoted again (a false discovery).
    Reject(Decision),
    /// Retro-scan: every stored exchange whose prompt carried the n-gram — when it first
    /// appeared, which callers and models, which were flagged.
    Scan {
        /// The n-gram.
        ngram: String,
        /// Only this model's exchanges.
        #[arg(long)]
        model: Option<String>,
        /// How many of the newest carrying exchanges to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// As JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
}

/// The trigger a person decides about.
#[derive(Debug, Args)]
pub struct Decision {
    /// The n-gram (1 to 3 words are what discovery finds; any number works).
    ngram: String,
    /// The model it is (to be) watched for (default: every model).
    #[arg(long)]
    model: Option<String>,
    /// Why.
    #[arg(long)]
    note: Option<String>,
    #[command(flatten)]
    store: StoreArg,
}

/// Runs a `triggers` subcommand.
pub fn run(command: TriggersCommand) -> anyhow::Result<()> {
    match command {
        TriggersCommand::List {
            store,
            watched,
            json,
        } => {
            let triggers: Vec<WatchedTrigger> = store
                .open()?
                .list_triggers()?
                .into_iter()
                .filter(|t| !watched || t.state == TriggerState::Watched)
                .collect();
            if json {
                let mut out = String::new();
                for t in &triggers {
                    out.push_str(&serde_json::to_string(t)?);
                    out.push('\n');
                }
                return emit(&out);
            }
            emit(&table(&triggers))
        }
        TriggersCommand::Add(decision) => decide(decision, TriggerState::Watched),
        TriggersCommand::Remove(decision) => decide(decision, TriggerState::Removed),
        TriggersCommand::Reject(decision) => decide(decision, TriggerState::Rejected),
        TriggersCommand::Scan {
            ngram,
            model,
            limit,
            json,
            store,
        } => {
            let scan = store.open()?.retro_scan(&ngram, model.as_deref(), limit)?;
            if json {
                return emit(&format!("{}\n", serde_json::to_string_pretty(&scan)?));
            }
            let mut out = String::new();
            let _ok = writeln!(
                out,
                "\"{}\"{}: {} stored exchange(s) carried it, {} of them flagged ({} read)",
                scan.ngram,
                scan.model
                    .as_deref()
                    .map_or(String::new(), |m| format!(" (model {m})")),
                scan.carrying,
                scan.flagged,
                scan.read
            );
            if let (Some(first), Some(last)) = (&scan.first_seen, &scan.last_seen) {
                let _ok = writeln!(out, "first seen {first}, last seen {last}");
            }
            let list = |v: &[(String, u64)]| {
                v.iter()
                    .take(10)
                    .map(|(k, n)| format!("{} ×{n}", clip(k, 24)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            if !scan.callers.is_empty() {
                let _ok = writeln!(out, "callers (API key hash): {}", list(&scan.callers));
                let _ok = writeln!(out, "models: {}", list(&scan.models));
            }
            if !scan.exchanges.is_empty() {
                let _ok = writeln!(
                    out,
                    "\n{:<26} {:<38} {:<20} {:<8}",
                    "STARTED", "REQUEST ID", "MODEL", "FLAGGED"
                );
                for hit in &scan.exchanges {
                    let _ok = writeln!(
                        out,
                        "{:<26} {:<38} {:<20} {:<8}",
                        hit.started_at,
                        clip(&hit.request_id, 38),
                        clip(hit.model.as_deref().unwrap_or("-"), 20),
                        if hit.flagged { "yes" } else { "no" }
                    );
                }
            }
            emit(&out)
        }
    }
}

fn decide(decision: Decision, state: TriggerState) -> anyhow::Result<()> {
    let Decision {
        ngram,
        model,
        note,
        store,
    } = decision;
    let store = crate::store::Store::connect(&store.location()?)?;
    let decided = store
        .decide_trigger(&ngram, model.as_deref(), state, note.as_deref())?
        .with_context(|| match state {
            TriggerState::Removed => format!(
                "no trigger {ngram:?}{} on the list (tripwire triggers list)",
                model
                    .as_deref()
                    .map_or(String::new(), |m| format!(" for model {m}"))
            ),
            _ => format!("{ngram:?} has no words to watch"),
        })?;
    emit(&format!(
        "\"{}\"{} is now {} (running gateways take it within a few seconds)\n",
        decided.ngram,
        decided
            .model
            .as_deref()
            .map_or(String::new(), |m| format!(" for model {m}")),
        decided.state.as_str()
    ))
}

fn table(triggers: &[WatchedTrigger]) -> String {
    if triggers.is_empty() {
        return "(no trigger is watched; discovered ones appear here, or add one with \
                tripwire triggers add)\n"
            .to_owned();
    }
    let mut out = format!(
        "{:<28} {:<18} {:<9} {:<10} {:>7} {:>9} {:>9}  {}\n",
        "N-GRAM", "MODEL", "STATE", "SOURCE", "FLAGGED", "UNFLAGGED", "Q", "SINCE"
    );
    for t in triggers {
        let _ok = writeln!(
            out,
            "{:<28} {:<18} {:<9} {:<10} {:>7} {:>9} {:>9}  {}",
            clip(&t.ngram, 28),
            clip(t.model.as_deref().unwrap_or("*"), 18),
            t.state.as_str(),
            t.source.as_str(),
            t.flagged_with,
            t.unflagged_with,
            t.q_value.map_or("-".to_owned(), |q| format!("{q:.1e}")),
            rfc3339(t.created_at_us)
        );
    }
    out
}
