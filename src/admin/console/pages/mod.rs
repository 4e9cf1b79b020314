//! The console's pages: the flag list ([`flags`]), one flag ([`flag`]), the drift charts
//! ([`drift`]) and trigger attribution ([`triggers`]). Each page is built in two steps: a
//! query reads the store (on the admin's blocking store thread) or the drift monitor and
//! returns a plain struct, then a render function turns that struct into [`Html`] without
//! touching either. This file routes the GETs and holds what several pages draw alike.

mod drift;
mod flag;
mod flags;
mod triggers;

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::html::Html;
use super::{Viewer, page_error};
use crate::admin::AdminState;
use crate::detect::drift::history::ScopeHistory;
use crate::store::{Flag, Review, StoreError};

pub(super) use flag::label;
pub(super) use triggers::decide as decide_trigger;

/// Routes an authorised GET.
pub(super) async fn get(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    path: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["console", "flags"] => flags::flags(state, viewer, query).await,
        ["console", "flags", "poll"] => flags::poll(state, query).await,
        ["console", "flags", id] => flag::detail(state, viewer, id).await,
        ["console", "drift"] => drift::drift(state, viewer, query),
        ["console", "triggers"] => triggers::triggers(state, viewer, query).await,
        _ => page_error(StatusCode::NOT_FOUND, "no such page"),
    }
}

/// The page a store failure shows (logged with its kind).
fn store_error(err: &StoreError) -> Response<Full<Bytes>> {
    tracing::warn!(kind = err.kind(), error = %err, "console store error");
    page_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the flag store is unavailable",
    )
}

/// The first `chars` characters of `text`, on one line.
fn excerpt(text: &str, chars: usize) -> String {
    let mut out: String = text
        .chars()
        .take(chars)
        .map(|c| if c.is_whitespace() { ' ' } else { c })
        .collect();
    if text.chars().nth(chars).is_some() {
        out.push('…');
    }
    out
}

fn severity_badge(body: &mut Html, severity: crate::policy::Severity) {
    body.raw("<span class=\"sev sev-")
        .text(severity.as_str())
        .raw("\">")
        .text(severity.as_str())
        .raw("</span>");
}

fn label_badge(body: &mut Html, flag: &Flag) {
    match &flag.label {
        Some(label) => {
            let class = match label.verdict {
                Review::TruePositive => "<span class=\"label tp\">",
                Review::FalsePositive => "<span class=\"label fp\">",
            };
            body.raw(class).text(label.verdict.as_str()).raw("</span>");
        }
        None => {
            body.raw("<span class=\"label none\">unlabelled</span>");
        }
    }
}

/// The tests of one drift scope: reference, latest statistic, alarms (the flag page and the
/// drift page both show it).
fn reference_table(body: &mut Html, history: &ScopeHistory) {
    if history.tests.is_empty() {
        body.raw("<p>Still learning the reference: no test has run yet.</p>");
        return;
    }
    body.raw(
        "<table class=\"tests\"><thead><tr><th>Detector</th><th>Test</th><th>Reference</th>\
         <th>Tested from</th><th>Latest statistic</th><th>Threshold</th><th>Alarms</th></tr></thead><tbody>",
    );
    for test in &history.tests {
        let latest = test.all_points().last().cloned();
        body.raw("<tr><td>")
            .text(&test.detector)
            .raw("</td><td>")
            .text(&test.test)
            .raw("</td><td>");
        match &test.reference {
            Some(r) => body.text(&format!("{} ({})", r.source, r.created_at)),
            None => body.raw("-"),
        };
        body.raw("</td><td>observation ")
            .show(test.first_tested)
            .raw("</td><td>")
            .text(
                &latest
                    .as_ref()
                    .map_or("-".to_owned(), |p| format!("{:.4}", p.statistic)),
            )
            .raw("</td><td>")
            .text(
                &latest
                    .as_ref()
                    .map_or("-".to_owned(), |p| format!("{:.4}", p.threshold)),
            )
            .raw("</td><td>")
            .show(test.alarms)
            .raw("</td></tr>");
    }
    body.raw("</tbody></table>");
}
