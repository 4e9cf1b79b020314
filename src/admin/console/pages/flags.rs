//! The flag list (`/console/flags`) and its live count (`/console/flags/poll`): newest first,
//! filtered, a page at a time, with counts per rule. [`read_list`] reads one page of flags and
//! the counts from the store; [`render_list`] draws them with the filters echoed into the form
//! and the links.

use std::sync::Arc;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;

use super::{excerpt, label_badge, severity_badge, store_error};
use crate::admin::console::html::{Html, query};
use crate::admin::console::{Viewer, json_response, page, page_error};
use crate::admin::{AdminState, flag_filter, param};
use crate::store::{Flag, FlagFilter, FlagStats, StoreError};

/// Flags per page of the list.
pub const PAGE_SIZE: u32 = 50;

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

/// One page of the list, as read.
struct FlagList {
    /// The filters as given.
    filters: Filters,
    /// The filter's start (µs), when it has one.
    since_us: Option<i64>,
    /// The page's end (µs): none on the first page.
    before_us: Option<i64>,
    /// The flags of this page, newest first.
    flags: Vec<Flag>,
    /// Counts over the whole range.
    stats: FlagStats,
}

/// `GET /console/flags`: newest first, filtered, a page at a time, with counts per rule.
pub(super) async fn flags(
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
    match read_list(state, filter, Filters::read(query_text)).await {
        Ok(list) => page(
            StatusCode::OK,
            "Flags",
            Some((viewer, "Flags")),
            render_list(&list),
        ),
        Err(err) => store_error(&err),
    }
}

/// The flags `filter` selects and the counts per rule since its start.
async fn read_list(
    state: &Arc<AdminState>,
    filter: FlagFilter,
    filters: Filters,
) -> Result<FlagList, StoreError> {
    let since_us = filter.since_us;
    let before_us = filter.before_us;
    let (flags, stats) = state
        .with_store(move |store| Ok((store.list_flags(&filter)?, store.flag_stats(since_us)?)))
        .await?;
    Ok(FlagList {
        filters,
        since_us,
        before_us,
        flags,
        stats,
    })
}

/// The list page's body.
fn render_list(list: &FlagList) -> Html {
    let FlagList {
        filters,
        since_us,
        before_us,
        flags,
        stats,
    } = list;
    let mut body = Html::new();
    body.raw("<h1>Flags</h1>");
    filter_form(&mut body, filters, stats);
    rule_counts(&mut body, filters, stats);
    if before_us.is_none() {
        let newest = flags
            .first()
            .map_or(since_us.unwrap_or(0), |f| f.created_at_us);
        body.raw("<p id=\"live\" class=\"live\" hidden data-poll=\"")
            .text(&format!(
                "/console/flags/poll{}",
                filters.query(&[("after", Some(&newest.to_string()))])
            ))
            .raw("\"><span></span> · <a href=\"")
            .text(&format!("/console/flags{}", filters.query(&[])))
            .raw("\">show them</a></p>");
    }
    flag_table(&mut body, flags);
    body.raw("<nav class=\"pages\">");
    if before_us.is_some() {
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
    body
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
pub(super) async fn poll(state: &Arc<AdminState>, query_text: &str) -> Response<Full<Bytes>> {
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
    match count_new(state, filter).await {
        Ok(new) => json_response(&serde_json::json!({ "new": new })),
        Err(err) => {
            tracing::warn!(kind = err.kind(), error = %err, "console store error");
            json_response(&serde_json::json!({ "error": { "message": "store unavailable" } }))
        }
    }
}

/// How many flags `filter` selects (up to its limit).
async fn count_new(state: &Arc<AdminState>, filter: FlagFilter) -> Result<usize, StoreError> {
    state
        .with_store(move |store| Ok(store.list_flags(&filter)?.len()))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

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
