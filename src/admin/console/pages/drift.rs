//! The drift page (`/console/drift?model=…&route=…`): every scope the drift monitor follows,
//! and one scope's tests as charts. [`read_drift`] takes the monitor's history and picks the
//! scope to show; [`render_drift`] draws the table and the charts of [`chart`].
//!
//! [`chart`]: crate::admin::console::chart

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::reference_table;
use crate::admin::console::chart::drift_chart;
use crate::admin::console::html::{Html, query};
use crate::admin::console::{Viewer, page};
use crate::admin::{AdminState, param};
use crate::detect::drift::history::ScopeHistory;
use crate::detect::drift::monitor::ScopeKey;

/// What the drift monitor has to show.
enum DriftView {
    /// No drift detectors are configured.
    NoMonitor,
    /// The monitor has seen no traffic yet.
    NoTraffic,
    /// Every scope, and the one whose tests are charted.
    Scopes {
        scopes: Vec<(ScopeKey, ScopeHistory)>,
        selected: usize,
    },
}

/// `GET /console/drift?model=…&route=…`: each scope, and one scope's tests as charts.
pub(super) fn drift(
    state: &AdminState,
    viewer: &Viewer,
    query_text: &str,
) -> Response<Full<Bytes>> {
    page(
        StatusCode::OK,
        "Drift",
        Some((viewer, "Drift")),
        render_drift(&read_drift(state, query_text)),
    )
}

/// The monitor's scopes; the one selected is the scope `query_text` names, else the first
/// with an alarm, else the first.
fn read_drift(state: &AdminState, query_text: &str) -> DriftView {
    let Some(monitor) = state.drift() else {
        return DriftView::NoMonitor;
    };
    let scopes = monitor.history();
    if scopes.is_empty() {
        return DriftView::NoTraffic;
    }
    let want_model = param(query_text, "model");
    let want_route = param(query_text, "route");
    let selected = scopes
        .iter()
        .position(|(scope, _)| {
            Some(&scope.model) == want_model.as_ref() && Some(scope.route) == want_route.as_deref()
        })
        .or_else(|| scopes.iter().position(|(_, h)| alarms(h) > 0))
        .unwrap_or(0);
    DriftView::Scopes { scopes, selected }
}

/// Alarms over all of a scope's tests.
fn alarms(history: &ScopeHistory) -> u64 {
    history.tests.iter().map(|t| t.alarms).sum::<u64>()
}

/// The drift page's body.
fn render_drift(view: &DriftView) -> Html {
    let mut body = Html::new();
    body.raw("<h1>Drift</h1>");
    let (scopes, selected) = match view {
        DriftView::NoMonitor => {
            body.raw(
                "<p>No drift detectors are configured: add an <code>embedding_drift</code> or \
                 <code>feature_drift</code> detector and a rule on its <code>alarm</code> to a policy.</p>",
            );
            return body;
        }
        DriftView::NoTraffic => {
            body.raw("<p>No traffic has reached the drift monitor yet.</p>");
            return body;
        }
        DriftView::Scopes { scopes, selected } => (scopes, *selected),
    };
    body.raw(
        "<table class=\"scopes\"><thead><tr><th>Model</th><th>Route</th><th>Observed</th>\
         <th>Tests</th><th>Alarms</th></tr></thead><tbody>",
    );
    for (i, (scope, history)) in scopes.iter().enumerate() {
        body.raw(if i == selected {
            "<tr class=\"selected\"><td><a href=\""
        } else {
            "<tr><td><a href=\""
        })
        .text(&format!(
            "/console/drift{}",
            query(&[("model", Some(&scope.model)), ("route", Some(scope.route))])
        ))
        .raw("\">")
        .text(if scope.model.is_empty() {
            "(none)"
        } else {
            &scope.model
        })
        .raw("</a></td><td>")
        .text(scope.route)
        .raw("</td><td>")
        .show(history.observed)
        .raw("</td><td>")
        .show(history.tests.len())
        .raw("</td><td>")
        .show(alarms(history))
        .raw("</td></tr>");
    }
    body.raw("</tbody></table>");
    if let Some((scope, history)) = scopes.get(selected) {
        body.raw("<h2>")
            .text(if scope.model.is_empty() {
                "(none)"
            } else {
                &scope.model
            })
            .raw(" · ")
            .text(scope.route)
            .raw("</h2>");
        reference_table(&mut body, history);
        body.raw(
            "<p class=\"legend\"><span class=\"key statistic\">statistic</span> \
                  <span class=\"key threshold\">alarm threshold</span> \
                  <span class=\"key alarm\">alarm</span> \
                  <span class=\"key reference\">reference period</span></p>",
        );
        let mut tests: Vec<_> = history.tests.iter().collect();
        tests.sort_by_key(|t| std::cmp::Reverse(t.alarms));
        for test in tests {
            body.raw("<figure class=\"drift\"><figcaption>")
                .text(&format!("{} · {}", test.detector, test.test))
                .raw(" <span class=\"where\">")
                .text(&format!("{} results, {} alarms", test.results, test.alarms))
                .raw("</span></figcaption>")
                .append(drift_chart(test))
                .raw("</figure>");
        }
    }
    body
}
