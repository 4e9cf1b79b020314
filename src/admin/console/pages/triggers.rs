//! Trigger attribution (`/console/triggers?model=…&route=…`): `tripwire flags triggers` in the
//! console, prompt n-grams over-represented among flagged exchanges, each with the flagged
//! exchanges that carry it. [`read_triggers`] reads the prompts and flags from the store and
//! runs the attribution; [`render_triggers`] draws the form and the table.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{excerpt, store_error};
use crate::admin::console::html::Html;
use crate::admin::console::{Viewer, page};
use crate::admin::{AdminState, param};
use crate::inspect::attribution::{Attribution, Candidate, ngrams};
use crate::store::{Flag, FlagFilter, StoreError};

/// Exchanges read for trigger attribution.
const TRIGGER_WINDOW: u32 = 20_000;
/// Flagged exchanges searched for each candidate's examples.
const TRIGGER_FLAGS: u32 = 2_000;

/// The attribution over one scope, as computed.
struct TriggerReport {
    /// The model asked for, if any.
    model: Option<String>,
    /// The route asked for, if any.
    route: Option<String>,
    /// Exchanges read.
    exchanges: usize,
    /// Of those, flagged.
    flagged: u64,
    /// Of those, not flagged.
    unflagged: u64,
    /// The newest flags of the scope.
    flags: Vec<Flag>,
    /// The candidates, each with the indices in `flags` of the flags whose prompt carries it.
    triggers: Vec<(Candidate, Vec<usize>)>,
}

/// `GET /console/triggers?model=…&route=…`: `tripwire flags triggers`, with the flagged
/// exchanges that carry each candidate.
pub(super) async fn triggers(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    query_text: &str,
) -> Response<Full<Bytes>> {
    let model = param(query_text, "model").filter(|v| !v.is_empty());
    let route = param(query_text, "route").filter(|v| !v.is_empty());
    match read_triggers(state, model, route).await {
        Ok(report) => page(
            StatusCode::OK,
            "Triggers",
            Some((viewer, "Triggers")),
            render_triggers(&report),
        ),
        Err(err) => store_error(&err),
    }
}

/// The newest prompts and flags of the scope, and the candidate triggers among them.
async fn read_triggers(
    state: &Arc<AdminState>,
    model: Option<String>,
    route: Option<String>,
) -> Result<TriggerReport, StoreError> {
    let (m, r) = (model.clone(), route.clone());
    let (prompts, flags) = state
        .with_store(move |store| {
            let prompts = store.prompts_with_flags(m.as_deref(), r.as_deref(), TRIGGER_WINDOW)?;
            let flags = store.list_flags(&FlagFilter {
                model: m,
                route: r,
                limit: Some(TRIGGER_FLAGS),
                ..FlagFilter::default()
            })?;
            Ok((prompts, flags))
        })
        .await?;
    let mut attribution = Attribution::new(200_000);
    for (prompt, flagged) in &prompts {
        attribution.add(prompt, *flagged);
    }
    let candidates = attribution.candidates(3, 0.05, 20);
    let (flagged, unflagged) = attribution.totals();
    let triggers = if candidates.is_empty() {
        Vec::new()
    } else {
        let flag_ngrams: Vec<HashSet<String>> = flags.iter().map(|f| ngrams(&f.prompt)).collect();
        candidates
            .into_iter()
            .map(|candidate| {
                let carrying = flag_ngrams
                    .iter()
                    .enumerate()
                    .filter(|(_, ngrams)| ngrams.contains(&candidate.ngram))
                    .map(|(i, _)| i)
                    .collect();
                (candidate, carrying)
            })
            .collect()
    };
    Ok(TriggerReport {
        model,
        route,
        exchanges: prompts.len(),
        flagged,
        unflagged,
        flags,
        triggers,
    })
}

/// The triggers page's body.
fn render_triggers(report: &TriggerReport) -> Html {
    let mut body = Html::new();
    body.raw("<h1>Trigger attribution</h1><form class=\"filters\" method=\"get\" action=\"/console/triggers\">\
              <label>Model<input name=\"model\" value=\"")
        .text(report.model.as_deref().unwrap_or(""))
        .raw("\"></label><label>Route<input name=\"route\" value=\"")
        .text(report.route.as_deref().unwrap_or(""))
        .raw("\"></label><button type=\"submit\">Show</button></form><p>Prompt n-grams over-represented among \
              flagged exchanges (Fisher's exact test, Benjamini–Hochberg q ≤ 0.05, in at least 3 flagged prompts), \
              over the newest ")
        .show(report.exchanges)
        .raw(" exchanges: ")
        .show(report.flagged)
        .raw(" flagged, ")
        .show(report.unflagged)
        .raw(" not.</p>");
    if report.triggers.is_empty() {
        body.raw("<p class=\"empty\">No candidate trigger stands out.</p>");
        return body;
    }
    body.raw(
        "<table class=\"triggers\"><thead><tr><th>N-gram</th><th>Flagged</th><th>Unflagged</th>\
         <th>Share of flagged</th><th>q</th><th>Flagged exchanges carrying it</th></tr></thead><tbody>",
    );
    for (candidate, carrying) in &report.triggers {
        body.raw("<tr><td><code class=\"ngram\">")
            .text(&candidate.ngram)
            .raw("</code></td><td>")
            .show(candidate.flagged_with)
            .raw("</td><td>")
            .show(candidate.unflagged_with)
            .raw("</td><td>")
            .text(&format!("{:.0}%", candidate.flagged_share * 100.0))
            .raw("</td><td>")
            .text(&format!("{:.1e}", candidate.q_value))
            .raw("</td><td><ul class=\"carriers\">");
        for flag in carrying.iter().take(5).filter_map(|&i| report.flags.get(i)) {
            body.raw("<li><a href=\"/console/flags/")
                .show(flag.id)
                .raw("\">")
                .text(&flag.created_at)
                .raw("</a> ")
                .text(&excerpt(&flag.prompt, 80))
                .raw("</li>");
        }
        if carrying.len() > 5 {
            body.raw("<li>and ")
                .show(carrying.len() - 5)
                .raw(" more</li>");
        }
        body.raw("</ul></td></tr>");
    }
    body.raw("</tbody></table>");
    body
}
