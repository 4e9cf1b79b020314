//! Triggers (`/console/triggers?model=…&route=…`): the watched triggers (`tripwire triggers
//! list`: discovered or added, with buttons to stop watching, reject or watch again, and a form
//! to add one), then trigger attribution (`tripwire flags triggers`): prompt n-grams
//! over-represented among flagged exchanges, each with the flagged exchanges that carry it.
//! [`read_triggers`] reads the store and runs the attribution; [`render_triggers`] draws the
//! page; [`decide`] takes the buttons' POSTs.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{excerpt, store_error};
use crate::admin::console::html::Html;
use crate::admin::console::redirect;
use crate::admin::console::{Viewer, page};
use crate::admin::{AdminState, param};
use crate::inspect::attribution::{Attribution, Candidate, ngrams};
use crate::store::{Flag, FlagFilter, StoreError, TriggerState, WatchedTrigger};

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
    /// Every watched, removed or rejected trigger.
    watched: Vec<WatchedTrigger>,
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
            render_triggers(&report, &viewer.csrf),
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
    let (prompts, flags, watched) = state
        .with_store(move |store| {
            let prompts = store.prompts_with_flags(m.as_deref(), r.as_deref(), TRIGGER_WINDOW)?;
            let flags = store.list_flags(&FlagFilter {
                model: m,
                route: r,
                limit: Some(TRIGGER_FLAGS),
                ..FlagFilter::default()
            })?;
            Ok((prompts, flags, store.list_triggers()?))
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
        watched,
    })
}

/// `POST /console/triggers/decide` (`ngram`, `model`, `state`, `note`): the same call as
/// `tripwire triggers add|remove|reject` and `POST /admin/triggers`.
pub(in crate::admin::console) async fn decide(
    state: &Arc<AdminState>,
    form: &str,
) -> Response<Full<Bytes>> {
    let decision = match param(form, "state").as_deref() {
        Some("watched") => TriggerState::Watched,
        Some("removed") => TriggerState::Removed,
        Some("rejected") => TriggerState::Rejected,
        _ => {
            return crate::admin::console::page_error(
                StatusCode::BAD_REQUEST,
                "state must be watched, removed or rejected",
            );
        }
    };
    let Some(ngram) = param(form, "ngram").filter(|n| !n.trim().is_empty()) else {
        return crate::admin::console::page_error(StatusCode::BAD_REQUEST, "an n-gram is needed");
    };
    let model = param(form, "model");
    let note = param(form, "note");
    match state.decide_trigger(ngram, model, decision, note).await {
        Ok(Some(_)) => redirect("/console/triggers"),
        Ok(None) => crate::admin::console::page_error(
            StatusCode::NOT_FOUND,
            "no such trigger (an n-gram needs words; removing needs one on the list)",
        ),
        Err(err) => store_error(&err),
    }
}

/// One button that records a decision about `trigger`.
fn decision_button(body: &mut Html, csrf: &str, trigger: &WatchedTrigger, to: TriggerState) {
    let label = match to {
        TriggerState::Watched => "Watch again",
        TriggerState::Removed => "Stop watching",
        TriggerState::Rejected => "Reject",
    };
    body.raw(
        "<form class=\"inline\" method=\"post\" action=\"/console/triggers/decide\">\
              <input type=\"hidden\" name=\"csrf\" value=\"",
    )
    .text(csrf)
    .raw("\"><input type=\"hidden\" name=\"ngram\" value=\"")
    .text(&trigger.ngram)
    .raw("\"><input type=\"hidden\" name=\"model\" value=\"")
    .text(trigger.model.as_deref().unwrap_or(""))
    .raw("\"><button name=\"state\" value=\"")
    .text(to.as_str())
    .raw("\">")
    .text(label)
    .raw("</button></form>");
}

/// The watched triggers' table and the form that adds one.
fn render_watched(body: &mut Html, csrf: &str, watched: &[WatchedTrigger]) {
    body.raw("<h1>Watched triggers</h1><p>Prompt n-grams trigger attribution promoted (or a person \
              added): every exchange whose prompt carries one is flagged by <code>discovered-trigger</code>. \
              Earlier exchanges that carried one: <code>tripwire triggers scan</code> or \
              <code>GET /admin/triggers/scan?ngram=…</code>.</p>");
    if watched.is_empty() {
        body.raw("<p class=\"empty\">No trigger has been discovered or added.</p>");
    } else {
        body.raw(
            "<table class=\"watched\"><thead><tr><th>N-gram</th><th>Model</th><th>State</th>\
             <th>Source</th><th>Flagged</th><th>Unflagged</th><th>q</th><th>Since</th><th></th>\
             </tr></thead><tbody>",
        );
        for t in watched {
            body.raw("<tr><td><code class=\"ngram\">")
                .text(&t.ngram)
                .raw("</code></td><td>")
                .text(t.model.as_deref().unwrap_or("every model"))
                .raw("</td><td>")
                .text(t.state.as_str())
                .raw("</td><td>")
                .text(t.source.as_str())
                .raw("</td><td>")
                .show(t.flagged_with)
                .raw("</td><td>")
                .show(t.unflagged_with)
                .raw("</td><td>")
                .text(&t.q_value.map_or("-".to_owned(), |q| format!("{q:.1e}")))
                .raw("</td><td>")
                .text(&crate::store::rfc3339(t.created_at_us))
                .raw("</td><td>");
            match t.state {
                TriggerState::Watched => {
                    decision_button(body, csrf, t, TriggerState::Removed);
                    decision_button(body, csrf, t, TriggerState::Rejected);
                }
                TriggerState::Removed | TriggerState::Rejected => {
                    decision_button(body, csrf, t, TriggerState::Watched);
                }
            }
            body.raw("</td></tr>");
        }
        body.raw("</tbody></table>");
    }
    body.raw(
        "<form class=\"filters\" method=\"post\" action=\"/console/triggers/decide\">\
              <input type=\"hidden\" name=\"csrf\" value=\"",
    )
    .text(csrf)
    .raw(
        "\"><label>N-gram<input name=\"ngram\" required maxlength=\"200\"></label>\
              <label>Model<input name=\"model\" placeholder=\"every model\"></label>\
              <label>Note<input name=\"note\" maxlength=\"2000\"></label>\
              <button name=\"state\" value=\"watched\">Watch</button></form>",
    );
}

/// The triggers page's body.
fn render_triggers(report: &TriggerReport, csrf: &str) -> Html {
    let mut body = Html::new();
    render_watched(&mut body, csrf, &report.watched);
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
