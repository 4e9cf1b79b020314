//! `tripwire exchanges list|show`: read captured exchanges from the store.

use std::fmt::Write as _;

use clap::Subcommand;

use super::output::{StoreArg, clip, emit};
use crate::capture::Exchange;
use crate::store::ExchangeFilter;

/// `tripwire exchanges …`
#[derive(Debug, Subcommand)]
pub enum ExchangesCommand {
    /// List captured exchanges, newest first.
    List {
        #[command(flatten)]
        store: StoreArg,
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Only this route (chat_completions, completions, responses, anthropic_messages).
        #[arg(long)]
        route: Option<String>,
        /// Only this requested model.
        #[arg(long)]
        model: Option<String>,
        /// Only exchanges whose response did not reach its end.
        #[arg(long)]
        truncated: bool,
        /// Print JSON (an array of exchanges) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one exchange by id or x-request-id.
    Show {
        /// Exchange id or request id.
        id: String,
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the subcommand.
pub fn run(command: ExchangesCommand) -> anyhow::Result<()> {
    match command {
        ExchangesCommand::List {
            store,
            limit,
            route,
            model,
            truncated,
            json,
        } => {
            let store = store.open()?;
            let rows = store.list_exchanges(&ExchangeFilter {
                limit: Some(limit),
                route,
                model,
                truncated_only: truncated,
            })?;
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&rows)?))
            } else {
                emit(&table(&rows))
            }
        }
        ExchangesCommand::Show { id, store, json } => {
            let store = store.open()?;
            let Some(exchange) = store.get_exchange(&id)? else {
                anyhow::bail!("no exchange with id or request id {id:?}");
            };
            if json {
                emit(&format!("{}\n", serde_json::to_string_pretty(&exchange)?))
            } else {
                emit(&detail(&exchange))
            }
        }
    }
}

/// A one-line-per-exchange table.
pub fn table(rows: &[Exchange]) -> String {
    let mut out = String::new();
    let _ok = writeln!(
        out,
        "{:<36}  {:<18}  {:<18}  {:>6}  {:<14}  {:>9}  OUTPUT",
        "REQUEST ID", "ROUTE", "MODEL", "STATUS", "OUTCOME", "LATENCY"
    );
    for e in rows {
        let status = e.status.map_or("-".to_owned(), |s| s.to_string());
        let _ok = writeln!(
            out,
            "{:<36}  {:<18}  {:<18}  {:>6}  {:<14}  {:>7.1}ms  {}",
            clip(&e.request_id, 36),
            e.route.as_str(),
            clip(e.model.as_deref().unwrap_or("-"), 18),
            status,
            format!("{}{}", e.outcome.as_str(), if e.stream { "*" } else { "" }),
            e.latency_us as f64 / 1000.0,
            clip(&e.output().replace(['\n', '\r'], " "), 60),
        );
    }
    if rows.is_empty() {
        out.push_str("(no exchanges captured yet)\n");
    }
    out
}

fn detail(e: &Exchange) -> String {
    let mut out = String::new();
    let _ok = writeln!(out, "id:          {}", e.id);
    let _ok = writeln!(out, "request id:  {}", e.request_id);
    let _ok = writeln!(
        out,
        "route:       {} {} {}",
        e.route.as_str(),
        e.method,
        e.path
    );
    let _ok = writeln!(out, "model:       {}", e.model.as_deref().unwrap_or("-"));
    let _ok = writeln!(
        out,
        "status:      {}",
        e.status.map_or("-".to_owned(), |s| s.to_string())
    );
    let _ok = writeln!(
        out,
        "outcome:     {}{}{}",
        e.outcome.as_str(),
        if e.truncated { " (truncated)" } else { "" },
        if e.capture_incomplete {
            " (capture incomplete)"
        } else {
            ""
        }
    );
    let _ok = writeln!(out, "stream:      {}", e.stream);
    let _ok = writeln!(out, "latency:     {:.1} ms", e.latency_us as f64 / 1000.0);
    if let Some(err) = &e.parse_error {
        let _ok = writeln!(out, "parse error: {err}");
    }
    let _ok = writeln!(out, "\nprompt:");
    for m in &e.prompt {
        let _ok = writeln!(out, "  [{}] {}", m.role, m.content);
    }
    for c in &e.choices {
        let _ok = writeln!(
            out,
            "\noutput (choice {}, finish: {}):\n{}",
            c.index,
            c.finish_reason.as_deref().unwrap_or("-"),
            c.text
        );
        for t in &c.tool_calls {
            let _ok = writeln!(out, "  tool call {}({})", t.name, t.arguments);
        }
    }
    out
}
