//! The console's pages: the flag list, one flag, the drift charts, trigger attribution. Each
//! reads the store on the admin's blocking store thread and renders through [`Html`].

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::html::{Html, query, url_encode};
use super::{Viewer, json_response, page, page_error, redirect};
use crate::admin::{AdminState, flag_filter, param};
use crate::detect::drift::history::ScopeHistory;
use crate::store::{Flag, FlagFilter, FlagStats, StoreError, Verdict};

/// Flags per page of the list.
pub const PAGE_SIZE: u32 = 50;

/// Routes an authorised GET.
pub(super) async fn get(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    path: &str,
    query: &str,
) -> Response<Full<Bytes>> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    match segments.as_slice() {
        ["console", "flags"] => flags(state, viewer, query).await,
        ["console", "flags", "poll"] => poll(state, query).await,
        ["console", "flags", id] => detail(state, viewer, id).await,
        ["console", "drift"] => drift(state, viewer, query),
        ["console", "triggers"] => triggers(state, viewer, query).await,
        _ => page_error(StatusCode::NOT_FOUND, "no such page"),
    }
}

fn store_error(err: &StoreError) -> Response<Full<Bytes>> {
    tracing::warn!(kind = err.kind(), error = %err, "console store error");
    page_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the flag store is unavailable",
    )
}

/// The list's filters as given, to echo into the form and the links.
struct Filters {
    since: Option<String>,
    rule: Option<String>,
    severity: Option<String>,
    model: Option<String>,
    route: Option<String>,
    label: Option<String>,
}

impl Filters {
    fn read(query: &str) -> Filters {
        let get = |name: &str| param(query, name).filter(|v| !v.is_empty());
        Filters {
            since: get("since"),
            rule: get("rule").or_else(|| get("policy")),
            severity: get("severity"),
            model: get("model"),
            route: get("route"),
            label: get("label"),
        }
    }

    /// The query string of these filters plus `extra`.
    fn query(&self, extra: &[(&str, Option<&str>)]) -> String {
        let mut pairs = vec![
            ("since", self.since.as_deref()),
            ("rule", self.rule.as_deref()),
            ("severity", self.severity.as_deref()),
            ("model", self.model.as_deref()),
            ("route", self.route.as_deref()),
            ("label", self.label.as_deref()),
        ];
        pairs.extend_from_slice(extra);
        query(&pairs)
    }

    /// `query_text` without its empty parameters (an unset form field), for
    /// [`flag_filter`].
    fn without_empty(query_text: &str) -> String {
        Filters::read(query_text)
            .query(&[])
            .trim_start_matches('?')
            .to_owned()
    }
}

/// `GET /console/flags`: newest first, filtered, a page at a time, with counts per rule.
async fn flags(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    query_text: &str,
) -> Response<Full<Bytes>> {
    let mut filter = match flag_filter(&Filters::without_empty(query_text)) {
        Ok(filter) => filter,
        Err(message) => return page_error(StatusCode::BAD_REQUEST, &message),
    };
    filter.limit = Some(PAGE_SIZE);
    filter.before_us = param(query_text, "before").and_then(|v| v.parse().ok());
    let since = filter.since_us;
    let listed = filter.clone();
    let result = state
        .with_store(move |store| Ok((store.list_flags(&listed)?, store.flag_stats(since)?)))
        .await;
    let (flags, stats) = match result {
        Ok(found) => found,
        Err(err) => return store_error(&err),
    };
    let filters = Filters::read(query_text);
    let mut body = Html::new();
    body.raw("<h1>Flags</h1>");
    filter_form(&mut body, &filters, &stats);
    rule_counts(&mut body, &filters, &stats);
    if filter.before_us.is_none() {
        let newest = flags
            .first()
            .map_or(since.unwrap_or(0), |f| f.created_at_us);
        body.raw("<p id=\"live\" class=\"live\" hidden data-poll=\"")
            .text(&format!(
                "/console/flags/poll{}",
                filters.query(&[("after", Some(&newest.to_string()))])
            ))
            .raw("\"><span></span> · <a href=\"")
            .text(&format!("/console/flags{}", filters.query(&[])))
            .raw("\">show them</a></p>");
    }
    flag_table(&mut body, &flags);
    body.raw("<nav class=\"pages\">");
    if filter.before_us.is_some() {
        body.raw("<a href=\"")
            .text(&format!("/console/flags{}", filters.query(&[])))
            .raw("\">« Newest</a>");
    }
    if flags.len() == PAGE_SIZE as usize
        && let Some(last) = flags.last()
    {
        body.raw("<a rel=\"next\" href=\"")
            .text(&format!(
                "/console/flags{}",
                filters.query(&[("before", Some(&last.created_at_us.to_string()))])
            ))
            .raw("\">Older »</a>");
    }
    body.raw("</nav>");
    page(StatusCode::OK, "Flags", Some((viewer, "Flags")), body)
}

fn select(
    body: &mut Html,
    name: &'static str,
    label: &'static str,
    current: Option<&str>,
    options: &[(String, String)],
) {
    body.raw("<label>")
        .raw(label)
        .raw("<select name=\"")
        .raw(name)
        .raw("\">");
    for (value, text) in options {
        body.raw("<option value=\"").text(value).raw("\"");
        if current.unwrap_or("") == value {
            body.raw(" selected");
        }
        body.raw(">").text(text).raw("</option>");
    }
    body.raw("</select></label>");
}

fn filter_form(body: &mut Html, filters: &Filters, stats: &FlagStats) {
    let pairs = |items: &[(&str, &str)]| -> Vec<(String, String)> {
        items
            .iter()
            .map(|(v, t)| ((*v).to_owned(), (*t).to_owned()))
            .collect()
    };
    body.raw("<form class=\"filters\" method=\"get\" action=\"/console/flags\">");
    select(
        body,
        "since",
        "Time range",
        filters.since.as_deref(),
        &pairs(&[
            ("", "all time"),
            ("15m", "last 15 minutes"),
            ("1h", "last hour"),
            ("6h", "last 6 hours"),
            ("24h", "last 24 hours"),
            ("7d", "last 7 days"),
            ("30d", "last 30 days"),
        ]),
    );
    let mut rules = vec![(String::new(), "any rule".to_owned())];
    rules.extend(stats.by_rule.iter().map(|(r, ..)| (r.clone(), r.clone())));
    if let Some(rule) = &filters.rule
        && !rules.iter().any(|(r, _)| r == rule)
    {
        rules.push((rule.clone(), rule.clone()));
    }
    select(body, "rule", "Rule", filters.rule.as_deref(), &rules);
    select(
        body,
        "severity",
        "Severity at least",
        filters.severity.as_deref(),
        &pairs(&[
            ("", "any"),
            ("info", "info"),
            ("warning", "warning"),
            ("high", "high"),
            ("critical", "critical"),
        ]),
    );
    body.raw("<label>Model<input name=\"model\" list=\"models\" value=\"")
        .text(filters.model.as_deref().unwrap_or(""))
        .raw("\"></label><datalist id=\"models\">");
    for (model, _) in &stats.by_model {
        body.raw("<option value=\"").text(model).raw("\">");
    }
    body.raw(
        "</datalist><label>Route<input name=\"route\" placeholder=\"chat_completions\" value=\"",
    )
    .text(filters.route.as_deref().unwrap_or(""))
    .raw("\"></label>");
    select(
        body,
        "label",
        "Label",
        filters.label.as_deref(),
        &pairs(&[
            ("", "any"),
            ("none", "unlabelled"),
            ("true-positive", "true positive"),
            ("false-positive", "false positive"),
        ]),
    );
    body.raw("<button type=\"submit\">Filter</button><a class=\"reset\" href=\"/console/flags\">Reset</a></form>");
}

fn rule_counts(body: &mut Html, filters: &Filters, stats: &FlagStats) {
    body.raw("<section class=\"counts\"><h2>")
        .show(stats.total)
        .raw(" flags");
    if filters.since.is_some() {
        body.raw(" in range");
    }
    body.raw("</h2><p>Labelled: ")
        .show(stats.true_positives)
        .raw(" true positive, ")
        .show(stats.false_positives)
        .raw(" false positive");
    if let Some(share) = stats.false_positive_share() {
        body.raw(" (")
            .text(&format!("{:.0}%", share * 100.0))
            .raw(" false)");
    }
    body.raw("</p><ul class=\"rules\">");
    for (rule, n, tp, fp) in &stats.by_rule {
        let link = Filters {
            rule: Some(rule.clone()),
            since: filters.since.clone(),
            severity: None,
            model: None,
            route: None,
            label: None,
        };
        body.raw("<li><a href=\"")
            .text(&format!("/console/flags{}", link.query(&[])))
            .raw("\"><span class=\"rule-name\">")
            .text(rule)
            .raw("</span> <span class=\"n\">")
            .show(n)
            .raw("</span></a>");
        if tp + fp > 0 {
            body.raw(" <span class=\"labels\">")
                .show(tp)
                .raw(" TP · ")
                .show(fp)
                .raw(" FP</span>");
        }
        body.raw("</li>");
    }
    body.raw("</ul></section>");
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
                Verdict::TruePositive => "<span class=\"label tp\">",
                Verdict::FalsePositive => "<span class=\"label fp\">",
            };
            body.raw(class).text(label.verdict.as_str()).raw("</span>");
        }
        None => {
            body.raw("<span class=\"label none\">unlabelled</span>");
        }
    }
}

fn flag_table(body: &mut Html, flags: &[Flag]) {
    if flags.is_empty() {
        body.raw("<p class=\"empty\">No flags match.</p>");
        return;
    }
    body.raw(
        "<table class=\"flags\"><thead><tr><th>Time (UTC)</th><th>Severity</th><th>Rules</th>\
         <th>Model</th><th>Route</th><th>Output</th><th>Label</th></tr></thead><tbody>",
    );
    for flag in flags {
        let rules: Vec<&str> = flag.policies.iter().map(|p| p.name.as_str()).collect();
        body.raw("<tr data-id=\"")
            .show(flag.id)
            .raw("\" data-request-id=\"")
            .text(&flag.request_id)
            .raw("\"><td><a href=\"/console/flags/")
            .show(flag.id)
            .raw("\">")
            .text(&flag.created_at)
            .raw("</a></td><td>");
        severity_badge(body, flag.severity);
        body.raw("</td><td>")
            .text(&rules.join(", "))
            .raw("</td><td>")
            .text(flag.model.as_deref().unwrap_or("-"))
            .raw("</td><td>")
            .text(&flag.route)
            .raw("</td><td class=\"excerpt\">")
            .text(&excerpt(&flag.output, 120))
            .raw("</td><td>");
        label_badge(body, flag);
        body.raw("</td></tr>");
    }
    body.raw("</tbody></table>");
}

/// `GET /console/flags/poll?after=µs&…filters`: how many flags newer than `after` match
/// (at most 100). The list page's script asks every few seconds.
async fn poll(state: &Arc<AdminState>, query_text: &str) -> Response<Full<Bytes>> {
    let mut filter = match flag_filter(&Filters::without_empty(query_text)) {
        Ok(filter) => filter,
        Err(message) => {
            return json_response(&serde_json::json!({ "error": { "message": message } }));
        }
    };
    let after = param(query_text, "after")
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(0);
    filter.since_us = Some(filter.since_us.unwrap_or(0).max(after.saturating_add(1)));
    filter.limit = Some(100);
    match state
        .with_store(move |store| store.list_flags(&filter))
        .await
    {
        Ok(flags) => json_response(&serde_json::json!({ "new": flags.len() })),
        Err(err) => {
            tracing::warn!(kind = err.kind(), error = %err, "console store error");
            json_response(&serde_json::json!({ "error": { "message": "store unavailable" } }))
        }
    }
}

/// `GET /console/flags/{id}`: one flag.
async fn detail(state: &Arc<AdminState>, viewer: &Viewer, id: &str) -> Response<Full<Bytes>> {
    let id = id.to_owned();
    let flag = match state.with_store(move |store| store.get_flag(&id)).await {
        Ok(Some(flag)) => flag,
        Ok(None) => return page_error(StatusCode::NOT_FOUND, "no such flag"),
        Err(err) => return store_error(&err),
    };
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
    label_badge(&mut body, &flag);
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

    scope_reference(&mut body, state, &flag);
    page(StatusCode::OK, "Flag", Some((viewer, "Flags")), body)
}

/// The drift reference and latest statistics of the flag's scope.
fn scope_reference(body: &mut Html, state: &AdminState, flag: &Flag) {
    let model = flag.model.clone().unwrap_or_default();
    let link = format!(
        "/console/drift{}",
        query(&[("model", Some(&model)), ("route", Some(&flag.route))])
    );
    body.raw("<section class=\"reference\"><h2>This scope's reference</h2>");
    let Some(monitor) = state.drift() else {
        body.raw(
            "<p>No drift detectors are configured, so this scope has no reference.</p></section>",
        );
        return;
    };
    let history = monitor
        .history()
        .into_iter()
        .find(|(scope, _)| scope.model == model && scope.route == flag.route);
    let Some((_, history)) = history else {
        body.raw("<p>The drift monitor has not seen this scope yet.</p></section>");
        return;
    };
    body.raw("<p>")
        .show(history.observed)
        .raw(" exchanges of this scope observed. <a href=\"")
        .text(&link)
        .raw("\">Drift charts »</a></p>");
    reference_table(body, &history);
    body.raw("</section>");
}

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
pub(super) async fn label(state: &Arc<AdminState>, id: &str, form: &str) -> Response<Full<Bytes>> {
    let Some(verdict) = param(form, "verdict").and_then(|v| Verdict::parse(&v)) else {
        return page_error(
            StatusCode::BAD_REQUEST,
            "verdict must be true-positive or false-positive",
        );
    };
    let note = param(form, "note").filter(|n| !n.trim().is_empty());
    let flag_id = id.to_owned();
    let result = state
        .with_store(move |store| store.label_flag(&flag_id, verdict, note.as_deref()))
        .await;
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

/// `GET /console/drift?model=…&route=…`: each scope, and one scope's tests as charts.
fn drift(state: &AdminState, viewer: &Viewer, query_text: &str) -> Response<Full<Bytes>> {
    let mut body = Html::new();
    body.raw("<h1>Drift</h1>");
    let Some(monitor) = state.drift() else {
        body.raw(
            "<p>No drift detectors are configured: add an <code>embedding_drift</code> or \
             <code>feature_drift</code> detector and a rule on its <code>alarm</code> to a policy.</p>",
        );
        return page(StatusCode::OK, "Drift", Some((viewer, "Drift")), body);
    };
    let scopes = monitor.history();
    if scopes.is_empty() {
        body.raw("<p>No traffic has reached the drift monitor yet.</p>");
        return page(StatusCode::OK, "Drift", Some((viewer, "Drift")), body);
    }
    let want_model = param(query_text, "model");
    let want_route = param(query_text, "route");
    let alarms = |h: &ScopeHistory| h.tests.iter().map(|t| t.alarms).sum::<u64>();
    let selected = scopes
        .iter()
        .position(|(scope, _)| {
            Some(&scope.model) == want_model.as_ref() && Some(scope.route) == want_route.as_deref()
        })
        .or_else(|| scopes.iter().position(|(_, h)| alarms(h) > 0))
        .unwrap_or(0);
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
                .append(super::chart::drift_chart(test))
                .raw("</figure>");
        }
    }
    page(StatusCode::OK, "Drift", Some((viewer, "Drift")), body)
}

/// Exchanges read for trigger attribution.
const TRIGGER_WINDOW: u32 = 20_000;
/// Flagged exchanges searched for each candidate's examples.
const TRIGGER_FLAGS: u32 = 2_000;

/// `GET /console/triggers?model=…&route=…`: `tripwire flags triggers`, with the flagged
/// exchanges that carry each candidate.
async fn triggers(
    state: &Arc<AdminState>,
    viewer: &Viewer,
    query_text: &str,
) -> Response<Full<Bytes>> {
    let model = param(query_text, "model").filter(|v| !v.is_empty());
    let route = param(query_text, "route").filter(|v| !v.is_empty());
    let (m, r) = (model.clone(), route.clone());
    let result = state
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
        .await;
    let (prompts, flags) = match result {
        Ok(found) => found,
        Err(err) => return store_error(&err),
    };
    let mut attribution = crate::inspect::attribution::Attribution::new(200_000);
    for (prompt, flagged) in &prompts {
        attribution.add(prompt, *flagged);
    }
    let candidates = attribution.candidates(3, 0.05, 20);
    let (flagged, unflagged) = attribution.totals();
    let mut body = Html::new();
    body.raw("<h1>Trigger attribution</h1><form class=\"filters\" method=\"get\" action=\"/console/triggers\">\
              <label>Model<input name=\"model\" value=\"")
        .text(model.as_deref().unwrap_or(""))
        .raw("\"></label><label>Route<input name=\"route\" value=\"")
        .text(route.as_deref().unwrap_or(""))
        .raw("\"></label><button type=\"submit\">Show</button></form><p>Prompt n-grams over-represented among \
              flagged exchanges (Fisher's exact test, Benjamini–Hochberg q ≤ 0.05, in at least 3 flagged prompts), \
              over the newest ")
        .show(prompts.len())
        .raw(" exchanges: ")
        .show(flagged)
        .raw(" flagged, ")
        .show(unflagged)
        .raw(" not.</p>");
    if candidates.is_empty() {
        body.raw("<p class=\"empty\">No candidate trigger stands out.</p>");
        return page(StatusCode::OK, "Triggers", Some((viewer, "Triggers")), body);
    }
    let flag_ngrams: Vec<(&Flag, std::collections::HashSet<String>)> = flags
        .iter()
        .map(|f| (f, crate::inspect::attribution::ngrams(&f.prompt)))
        .collect();
    body.raw(
        "<table class=\"triggers\"><thead><tr><th>N-gram</th><th>Flagged</th><th>Unflagged</th>\
         <th>Share of flagged</th><th>q</th><th>Flagged exchanges carrying it</th></tr></thead><tbody>",
    );
    for candidate in &candidates {
        let carrying: Vec<&Flag> = flag_ngrams
            .iter()
            .filter(|(_, ngrams)| ngrams.contains(&candidate.ngram))
            .map(|(f, _)| *f)
            .collect();
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
        for flag in carrying.iter().take(5) {
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
    page(StatusCode::OK, "Triggers", Some((viewer, "Triggers")), body)
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

    #[test]
    fn list_links_keep_the_filters() {
        let filters = Filters::read("since=1h&rule=a%20b&severity=&model=m<1>");
        assert_eq!(
            filters.query(&[("before", Some("12"))]),
            "?since=1h&rule=a%20b&model=m%3C1%3E&before=12"
        );
        let filter = flag_filter(&Filters::without_empty(
            "since=&rule=feature-drift&severity=&model=&route=&label=",
        ))
        .unwrap();
        assert_eq!(filter.rule.as_deref(), Some("feature-drift"));
        assert_eq!(filter.min_severity, None);
    }
}
