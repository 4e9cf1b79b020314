//! The tables' rows: the records read back ([`ExchangeRow`], [`Flag`] with its [`Label`]),
//! the columns each table is read and written by, and one mapping per table between a record
//! and its row, which both backends call.
//!
//! Reads go by column name through [`Columns`], which each backend implements for its row type,
//! so a SELECT list can change without shifting positions. Writes produce the [`Value`]s of a
//! named column list, which each backend binds in its own way (PostgreSQL replaces NUL in
//! text); the backends keep only their dialect (placeholders, conflict clauses, filters).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::capture::{Exchange, Outcome, Route, Usage};
use crate::policy::Severity;
use crate::policy::judge::{DetectorEvidence, FiredRule};

/// An exchange as read back from the store.
pub type ExchangeRow = Exchange;

/// A person's review of a flag: was it right? (Stored and sent as `verdict`; not to be
/// confused with [`crate::policy::Verdict`], what the rules concluded.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Review {
    /// The flag was right: the model misbehaved.
    TruePositive,
    /// The flag was wrong.
    FalsePositive,
}

impl Review {
    /// `true-positive` or `false-positive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Review::TruePositive => "true-positive",
            Review::FalsePositive => "false-positive",
        }
    }

    /// Parses `true-positive` / `false-positive` (also `tp` / `fp`).
    pub fn parse(text: &str) -> Option<Review> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true-positive" | "true_positive" | "tp" => Some(Review::TruePositive),
            "false-positive" | "false_positive" | "fp" => Some(Review::FalsePositive),
            _ => None,
        }
    }
}

/// A label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// The verdict.
    pub verdict: Review,
    /// Why, in the labeller's words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// When (RFC 3339).
    pub labelled_at: String,
}

/// One flagged exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flag {
    /// The flag's id (UUID v7).
    pub id: uuid::Uuid,
    /// The exchange it is about.
    pub exchange_id: uuid::Uuid,
    /// The exchange's `x-request-id`.
    pub request_id: String,
    /// When the exchange started (RFC 3339, UTC).
    pub created_at: String,
    /// The requested model.
    pub model: Option<String>,
    /// The route.
    pub route: String,
    /// Hash of the caller's API key.
    pub api_key_hash: Option<String>,
    /// The highest severity among the rules that fired.
    pub severity: Severity,
    /// Each rule that fired, with the detector scores that made it fire.
    pub policies: Vec<FiredRule>,
    /// The prompt text (redacted per policy).
    pub prompt: String,
    /// The output text (redacted per policy).
    pub output: String,
    /// Spans of the prompt or output that support the flag.
    pub evidence: Vec<DetectorEvidence>,
    /// Whether the answer was streamed.
    pub stream: bool,
    /// Whether the answer did not reach its end.
    pub truncated: bool,
    /// The label, once given.
    pub label: Option<Label>,
    /// Microseconds since the epoch (for sorting; not part of the JSON record).
    #[serde(skip)]
    pub created_at_us: i64,
}

/// RFC 3339 text of a µs timestamp.
pub fn rfc3339(us: i64) -> String {
    let time =
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The `exchanges` columns a read selects; [`exchange`] reads them by name.
pub(super) const EXCHANGE_COLUMNS: &str = "id, request_id, started_at_us, method, path, route, \
    api_key_hash, model, response_model, stream, status, ttfb_us, latency_us, outcome, truncated, \
    capture_incomplete, parse_error, prompt_json, choices_json, input_tokens, output_tokens";

/// The `exchanges` columns a write fills, in the order of [`exchange_values`].
pub(super) const EXCHANGE_INSERT: &[&str] = &[
    "id",
    "request_id",
    "started_at_us",
    "method",
    "path",
    "route",
    "api_key_hash",
    "model",
    "response_model",
    "stream",
    "status",
    "ttfb_us",
    "latency_us",
    "outcome",
    "truncated",
    "capture_incomplete",
    "parse_error",
    "prompt_json",
    "choices_json",
    "output",
    "finish_reason",
    "input_tokens",
    "output_tokens",
    "annotations",
    "flagged",
];

/// The `flags` columns a read selects; [`flag`] reads them by name.
pub(super) const FLAG_COLUMNS: &str = "id, exchange_id, request_id, created_at_us, model, route, \
    api_key_hash, severity, policies_json, prompt, output, evidence_json, stream, truncated, label, \
    label_note, labelled_at_us";

/// The `flags` columns a write fills, in the order of [`flag_values`]. The label columns are
/// set later, by a person.
pub(super) const FLAG_INSERT: &[&str] = &[
    "id",
    "exchange_id",
    "request_id",
    "created_at_us",
    "model",
    "route",
    "api_key_hash",
    "severity",
    "severity_rank",
    "policies_json",
    "rules",
    "prompt",
    "output",
    "evidence_json",
    "stream",
    "truncated",
];

/// Records `now` as the last alert of (rule, scope) unless one was sent within the cooldown;
/// one row changed means claimed. The same statement on both backends.
pub(super) const CLAIM_ALERT: &str = "INSERT INTO alert_claims (rule, scope, last_sent_us) \
    VALUES ($1, $2, $3) ON CONFLICT (rule, scope) DO UPDATE SET last_sent_us = excluded.last_sent_us \
    WHERE alert_claims.last_sent_us <= excluded.last_sent_us - $4";

/// `(a, b, …) VALUES (?1, ?2, …)` for `columns`, numbering placeholders after `marker` (`?` for
/// SQLite, `$` for PostgreSQL): the part of an INSERT both backends share, around which each
/// puts its own way of leaving a row already stored alone.
pub(super) fn insert_values(columns: &[&str], marker: char) -> String {
    let placeholders: Vec<String> = (1..=columns.len())
        .map(|n| format!("{marker}{n}"))
        .collect();
    format!(
        "({}) VALUES ({})",
        columns.join(", "),
        placeholders.join(", ")
    )
}

/// A row of either backend, read by column name.
pub(super) trait Columns {
    /// The value of `column` as a `T`; a missing column or a type that does not fit is the
    /// backend's error.
    fn column<T>(&self, column: &str) -> Result<T, StoreError>
    where
        T: rusqlite::types::FromSql + postgres::types::FromSqlOwned;
}

/// One value written to a column: the kinds of value the tables hold. Each backend binds it
/// (`sqlite/` as is; `postgres` with NUL in text replaced and integers narrowed to the
/// column's width).
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value<'a> {
    /// SQL NULL.
    Null,
    /// Text.
    Text(Cow<'a, str>),
    /// An integer.
    Int(i64),
    /// A boolean (an integer 0 or 1 in SQLite).
    Bool(bool),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(text: &'a str) -> Self {
        Value::Text(Cow::Borrowed(text))
    }
}

impl From<String> for Value<'_> {
    fn from(text: String) -> Self {
        Value::Text(Cow::Owned(text))
    }
}

impl From<i64> for Value<'_> {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

impl From<bool> for Value<'_> {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(value: Option<T>) -> Self {
        value.map_or(Value::Null, Into::into)
    }
}

/// The values of [`EXCHANGE_INSERT`] for a captured exchange, the rules that annotated it and
/// whether it was flagged.
pub(super) fn exchange_values<'a>(
    e: &'a Exchange,
    annotations: &[String],
    flagged: bool,
) -> Result<[Value<'a>; EXCHANGE_INSERT.len()], StoreError> {
    let usage = e.usage.unwrap_or_default();
    let annotations = (!annotations.is_empty()).then(|| annotations.join(","));
    Ok([
        e.id.to_string().into(),
        e.request_id.as_str().into(),
        e.started_at_us.into(),
        e.method.as_str().into(),
        e.path.as_str().into(),
        e.route.as_str().into(),
        e.api_key_hash.as_deref().into(),
        e.model.as_deref().into(),
        e.response_model.as_deref().into(),
        e.stream.into(),
        e.status.map(i64::from).into(),
        e.ttfb_us.map(clamp).into(),
        clamp(e.latency_us).into(),
        e.outcome.as_str().into(),
        e.truncated.into(),
        e.capture_incomplete.into(),
        e.parse_error.as_deref().into(),
        serde_json::to_string(&e.prompt)?.into(),
        serde_json::to_string(&e.choices)?.into(),
        e.output().into(),
        e.finish_reason().into(),
        usage.input_tokens.map(clamp).into(),
        usage.output_tokens.map(clamp).into(),
        annotations.into(),
        flagged.into(),
    ])
}

/// A captured exchange from a row holding [`EXCHANGE_COLUMNS`].
pub(super) fn exchange(row: &impl Columns) -> Result<ExchangeRow, StoreError> {
    let id: String = row.column("id")?;
    let route: String = row.column("route")?;
    let status: Option<i32> = row.column("status")?;
    let latency_us: i64 = row.column("latency_us")?;
    let outcome: String = row.column("outcome")?;
    let prompt_json: String = row.column("prompt_json")?;
    let choices_json: String = row.column("choices_json")?;
    let input_tokens: Option<i64> = row.column("input_tokens")?;
    let output_tokens: Option<i64> = row.column("output_tokens")?;
    Ok(Exchange {
        id: id.parse().unwrap_or_default(),
        request_id: row.column("request_id")?,
        started_at_us: row.column("started_at_us")?,
        method: row.column("method")?,
        path: row.column("path")?,
        route: parse_route(&route),
        api_key_hash: row.column("api_key_hash")?,
        model: row.column("model")?,
        response_model: row.column("response_model")?,
        stream: row.column("stream")?,
        status: status.and_then(|s| u16::try_from(s).ok()),
        ttfb_us: unclamp(row.column("ttfb_us")?),
        latency_us: u64::try_from(latency_us).unwrap_or(0),
        outcome: parse_outcome(&outcome),
        truncated: row.column("truncated")?,
        capture_incomplete: row.column("capture_incomplete")?,
        parse_error: row.column("parse_error")?,
        prompt: serde_json::from_str(&prompt_json)?,
        choices: serde_json::from_str(&choices_json)?,
        usage: (input_tokens.is_some() || output_tokens.is_some()).then(|| Usage {
            input_tokens: unclamp(input_tokens),
            output_tokens: unclamp(output_tokens),
            total_tokens: None,
        }),
    })
}

/// The user text of a row's `prompt_json` and its `flagged` column: one input of trigger
/// attribution.
pub(super) fn prompt_and_flagged(row: &impl Columns) -> Result<(String, bool), StoreError> {
    let prompt_json: String = row.column("prompt_json")?;
    Ok((user_text(&prompt_json)?, row.column("flagged")?))
}

/// The values of [`FLAG_INSERT`] for a flag.
pub(super) fn flag_values(f: &Flag) -> Result<[Value<'_>; FLAG_INSERT.len()], StoreError> {
    Ok([
        f.id.to_string().into(),
        f.exchange_id.to_string().into(),
        f.request_id.as_str().into(),
        f.created_at_us.into(),
        f.model.as_deref().into(),
        f.route.as_str().into(),
        f.api_key_hash.as_deref().into(),
        f.severity.as_str().into(),
        rank(f.severity).into(),
        serde_json::to_string(&f.policies)?.into(),
        rules_column(f).into(),
        f.prompt.as_str().into(),
        f.output.as_str().into(),
        serde_json::to_string(&f.evidence)?.into(),
        f.stream.into(),
        f.truncated.into(),
    ])
}

/// A flag from a row holding [`FLAG_COLUMNS`].
pub(super) fn flag(row: &impl Columns) -> Result<Flag, StoreError> {
    let id: String = row.column("id")?;
    let exchange_id: String = row.column("exchange_id")?;
    let created_at_us: i64 = row.column("created_at_us")?;
    let severity: String = row.column("severity")?;
    let policies_json: String = row.column("policies_json")?;
    let evidence_json: String = row.column("evidence_json")?;
    let label: Option<String> = row.column("label")?;
    let label_note: Option<String> = row.column("label_note")?;
    let labelled_at_us: Option<i64> = row.column("labelled_at_us")?;
    Ok(Flag {
        id: id.parse().unwrap_or_default(),
        exchange_id: exchange_id.parse().unwrap_or_default(),
        request_id: row.column("request_id")?,
        created_at: rfc3339(created_at_us),
        model: row.column("model")?,
        route: row.column("route")?,
        api_key_hash: row.column("api_key_hash")?,
        severity: Severity::parse(&severity).unwrap_or(Severity::Info),
        policies: serde_json::from_str(&policies_json)?,
        prompt: row.column("prompt")?,
        output: row.column("output")?,
        evidence: serde_json::from_str(&evidence_json)?,
        stream: row.column("stream")?,
        truncated: row.column("truncated")?,
        label: label.and_then(|l| Review::parse(&l)).map(|verdict| Label {
            verdict,
            note: label_note,
            labelled_at: rfc3339(labelled_at_us.unwrap_or(0)),
        }),
        created_at_us,
    })
}

/// The `severity_rank` column: severities in order, so `>=` filters by minimum severity.
pub(super) fn rank(severity: Severity) -> i64 {
    match severity {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::High => 2,
        Severity::Critical => 3,
    }
}

/// The `rules` column: every rule name between commas, so `,name,` finds one exactly.
pub(super) fn rules_column(flag: &Flag) -> String {
    flag.policies
        .iter()
        .map(|p| format!(",{}", p.name))
        .collect::<String>()
        + ","
}

/// Per-rule counts from (`rules` column, `label` column) pairs, most flags first.
pub(super) fn tally_rules(
    rows: impl IntoIterator<Item = (String, Option<String>)>,
) -> Vec<(String, u64, u64, u64)> {
    let mut per_rule: std::collections::BTreeMap<String, (u64, u64, u64)> =
        std::collections::BTreeMap::new();
    for (rules, label) in rows {
        for rule in rules.split(',').filter(|r| !r.is_empty()) {
            let entry = per_rule.entry(rule.to_owned()).or_default();
            entry.0 += 1;
            match label.as_deref() {
                Some("true-positive") => entry.1 += 1,
                Some("false-positive") => entry.2 += 1,
                _ => {}
            }
        }
    }
    let mut by_rule: Vec<_> = per_rule
        .into_iter()
        .map(|(rule, (n, tp, fp))| (rule, n, tp, fp))
        .collect();
    by_rule.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    by_rule
}

/// The messages' user turns, joined: the text trigger attribution reads.
pub(super) fn user_text(prompt_json: &str) -> Result<String, StoreError> {
    let messages: Vec<crate::capture::Message> = serde_json::from_str(prompt_json)?;
    Ok(messages
        .iter()
        .filter(|m| m.role == "user")
        .map(|m| m.content.as_str())
        .collect::<Vec<_>>()
        .join("\n\n"))
}

/// A count or duration as a 64-bit integer column, saturating.
pub(super) fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn unclamp(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

fn parse_route(s: &str) -> Route {
    match s {
        "chat_completions" => Route::ChatCompletions,
        "completions" => Route::Completions,
        "responses" => Route::Responses,
        "anthropic_messages" => Route::AnthropicMessages,
        _ => Route::Other,
    }
}

fn parse_outcome(s: &str) -> Outcome {
    match s {
        "client_aborted" => Outcome::ClientAborted,
        "upstream_error" => Outcome::UpstreamError,
        "timeout" => Outcome::Timeout,
        "gateway_error" => Outcome::GatewayError,
        "blocked" => Outcome::Blocked,
        _ => Outcome::Complete,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_values_numbers_one_placeholder_per_column() {
        assert_eq!(
            insert_values(&["id", "model"], '?'),
            "(id, model) VALUES (?1, ?2)"
        );
        assert_eq!(
            insert_values(&["a", "b", "c"], '$'),
            "(a, b, c) VALUES ($1, $2, $3)"
        );
    }

    #[test]
    fn every_column_a_read_selects_is_one_a_write_fills() {
        for (read, written) in [
            (EXCHANGE_COLUMNS, EXCHANGE_INSERT),
            (FLAG_COLUMNS, FLAG_INSERT),
        ] {
            for column in read.split(',').map(str::trim) {
                assert!(
                    written.contains(&column) || column.starts_with("label"),
                    "{column} is read but never written"
                );
            }
        }
    }

    #[test]
    fn the_rules_column_tallies_back_per_rule() {
        let rows = vec![
            (",a,b,".to_owned(), Some("true-positive".to_owned())),
            (",b,".to_owned(), Some("false-positive".to_owned())),
            (",c,".to_owned(), None),
        ];
        assert_eq!(
            tally_rules(rows),
            vec![
                ("b".to_owned(), 2, 1, 1),
                ("a".to_owned(), 1, 1, 0),
                ("c".to_owned(), 1, 0, 0),
            ]
        );
    }
}
