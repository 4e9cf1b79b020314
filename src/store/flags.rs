//! The flag log: one record per flagged exchange, with the rules that fired, the detector
//! scores that made them fire, the evidence spans, and the label people give it.

use std::collections::HashMap;

use rusqlite::{OptionalExtension, Row, params};
use serde::{Deserialize, Serialize};

use super::{Sqlite, StoreError};
use crate::policy::Severity;
use crate::policy::judge::{DetectorEvidence, FiredRule};

/// A person's verdict on a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The flag was right: the model misbehaved.
    TruePositive,
    /// The flag was wrong.
    FalsePositive,
}

impl Verdict {
    /// `true-positive` or `false-positive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::TruePositive => "true-positive",
            Verdict::FalsePositive => "false-positive",
        }
    }

    /// Parses `true-positive` / `false-positive` (also `tp` / `fp`).
    pub fn parse(text: &str) -> Option<Verdict> {
        match text.trim().to_ascii_lowercase().as_str() {
            "true-positive" | "true_positive" | "tp" => Some(Verdict::TruePositive),
            "false-positive" | "false_positive" | "fp" => Some(Verdict::FalsePositive),
            _ => None,
        }
    }
}

/// A label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// The verdict.
    pub verdict: Verdict,
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

/// Which flags to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct FlagFilter {
    /// Only flags created at or after this time (µs since the epoch).
    pub since_us: Option<i64>,
    /// Only flags created before this time (µs since the epoch); for paging.
    pub before_us: Option<i64>,
    /// Only flags where this rule fired.
    pub rule: Option<String>,
    /// Only flags of at least this severity.
    pub min_severity: Option<Severity>,
    /// Only this model.
    pub model: Option<String>,
    /// Only this route.
    pub route: Option<String>,
    /// `Some(None)`: unlabelled only; `Some(Some(v))`: with that verdict.
    pub label: Option<Option<Verdict>>,
    /// At most this many (default 50).
    pub limit: Option<u32>,
}

/// Counts over the flag log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagStats {
    /// All flags.
    pub total: u64,
    /// Per rule: (rule, flags, true positives, false positives).
    pub by_rule: Vec<(String, u64, u64, u64)>,
    /// Per severity.
    pub by_severity: Vec<(String, u64)>,
    /// Per model.
    pub by_model: Vec<(String, u64)>,
    /// Labelled true positive.
    pub true_positives: u64,
    /// Labelled false positive.
    pub false_positives: u64,
}

impl FlagStats {
    /// Share of labelled flags that are false positives, when any are labelled.
    pub fn false_positive_share(&self) -> Option<f64> {
        let labelled = self.true_positives + self.false_positives;
        (labelled > 0).then(|| self.false_positives as f64 / labelled as f64)
    }
}

pub(super) fn rank(severity: Severity) -> i64 {
    match severity {
        Severity::Info => 0,
        Severity::Warning => 1,
        Severity::High => 2,
        Severity::Critical => 3,
    }
}

pub(super) const COLUMNS: &str = "id, exchange_id, request_id, created_at_us, model, route, api_key_hash, \
    severity, policies_json, prompt, output, evidence_json, stream, truncated, label, label_note, \
    labelled_at_us";

/// RFC 3339 text of a µs timestamp.
pub fn rfc3339(us: i64) -> String {
    let time =
        std::time::UNIX_EPOCH + std::time::Duration::from_micros(u64::try_from(us).unwrap_or(0));
    humantime::format_rfc3339_millis(time).to_string()
}

/// Microseconds since the epoch, now.
pub(super) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

/// The `rules` column: every rule name between commas, so `,name,` finds one exactly.
pub(super) fn rules_column(flag: &Flag) -> String {
    flag.policies
        .iter()
        .map(|p| format!(",{}", p.name))
        .collect::<String>()
        + ","
}

/// Per-rule counts from (rules column, label) pairs, most flags first.
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

impl Sqlite {
    /// Writes flags in the current transaction set-up (one transaction for the batch).
    pub(super) fn insert_flags_tx(
        tx: &rusqlite::Transaction<'_>,
        flags: &[Flag],
    ) -> Result<usize, StoreError> {
        let mut insert = tx.prepare_cached(
            "INSERT OR IGNORE INTO flags (id, exchange_id, request_id, created_at_us, model, \
             route, api_key_hash, severity, severity_rank, policies_json, rules, prompt, output, \
             evidence_json, stream, truncated) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?;
        let mut written = 0;
        for f in flags {
            let rules = rules_column(f);
            written += insert.execute(params![
                f.id.to_string(),
                f.exchange_id.to_string(),
                f.request_id,
                f.created_at_us,
                f.model,
                f.route,
                f.api_key_hash,
                f.severity.as_str(),
                rank(f.severity),
                serde_json::to_string(&f.policies)?,
                rules,
                f.prompt,
                f.output,
                serde_json::to_string(&f.evidence)?,
                f.stream,
                f.truncated,
            ])?;
        }
        Ok(written)
    }

    /// Lists flags, newest first.
    pub(super) fn list_flags(&self, filter: &FlagFilter) -> Result<Vec<Flag>, StoreError> {
        let (label_any, label_value) = match filter.label {
            None => (true, None),
            Some(v) => (false, v.map(Verdict::as_str)),
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM flags \
             WHERE (?1 IS NULL OR created_at_us >= ?1) \
             AND (?2 IS NULL OR created_at_us < ?2) \
             AND (?3 IS NULL OR rules LIKE '%,' || ?3 || ',%') \
             AND (?4 IS NULL OR severity_rank >= ?4) \
             AND (?5 IS NULL OR model = ?5) \
             AND (?6 IS NULL OR route = ?6) \
             AND (?7 = 1 OR label IS ?8) \
             ORDER BY created_at_us DESC, id DESC LIMIT ?9"
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(
            params![
                filter.since_us,
                filter.before_us,
                filter.rule,
                filter.min_severity.map(rank),
                filter.model,
                filter.route,
                label_any,
                label_value,
                filter.limit.unwrap_or(50),
            ],
            read_flag,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// One flag by its id, its exchange's id, or its request id.
    pub(super) fn get_flag(&self, id: &str) -> Result<Option<Flag>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM flags WHERE id = ?1 OR exchange_id = ?1 OR request_id = ?1 \
             ORDER BY created_at_us DESC LIMIT 1"
        );
        self.conn
            .query_row(&sql, params![id], read_flag)
            .optional()?
            .transpose()
    }

    /// Sets the label of the flag with id `id`.
    pub(super) fn set_label(
        &self,
        id: &str,
        verdict: Verdict,
        note: Option<&str>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.conn.execute(
            "UPDATE flags SET label = ?2, label_note = ?3, labelled_at_us = ?4 WHERE id = ?1",
            params![id, verdict.as_str(), note, now_us],
        )?;
        Ok(())
    }

    /// Counts by rule, severity and model, and the labels.
    pub(super) fn flag_stats(&self, since_us: Option<i64>) -> Result<FlagStats, StoreError> {
        // One pass over the covering index `flags_stats` (schema 4), tallied here: five
        // queries over the wide rows took ~260 ms at 100,000 flags.
        let mut stmt = self.conn.prepare_cached(
            "SELECT severity, severity_rank, model, label, rules FROM flags \
             WHERE created_at_us >= ?1",
        )?;
        let mut rows = stmt.query(params![since_us.unwrap_or(i64::MIN)])?;
        let mut stats = FlagStats::default();
        let mut severities: HashMap<String, (i64, u64)> = HashMap::new();
        let mut models: HashMap<String, u64> = HashMap::new();
        let mut rules = Vec::new();
        while let Some(row) = rows.next()? {
            let severity: String = row.get(0)?;
            let rank: i64 = row.get(1)?;
            let model: Option<String> = row.get(2)?;
            let label: Option<String> = row.get(3)?;
            stats.total += 1;
            match label.as_deref() {
                Some("true-positive") => stats.true_positives += 1,
                Some("false-positive") => stats.false_positives += 1,
                _ => {}
            }
            let entry = severities.entry(severity).or_insert((rank, 0));
            entry.0 = entry.0.max(rank);
            entry.1 += 1;
            *models
                .entry(model.unwrap_or_else(|| "-".to_owned()))
                .or_insert(0) += 1;
            rules.push((row.get::<_, String>(4)?, label));
        }
        let mut by_severity: Vec<(String, (i64, u64))> = severities.into_iter().collect();
        by_severity.sort_by_key(|(_, (rank, _))| std::cmp::Reverse(*rank));
        stats.by_severity = by_severity.into_iter().map(|(k, (_, n))| (k, n)).collect();
        let mut by_model: Vec<(String, u64)> = models.into_iter().collect();
        by_model.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        stats.by_model = by_model;
        stats.by_rule = tally_rules(rules);
        Ok(stats)
    }

    /// Number of stored flags.
    pub(super) fn count_flags(&self) -> Result<u64, StoreError> {
        count(
            &self.conn,
            "SELECT COUNT(*) FROM flags WHERE created_at_us >= ?1",
            i64::MIN,
        )
    }
}

fn count(conn: &rusqlite::Connection, sql: &str, since: i64) -> Result<u64, StoreError> {
    let n: i64 = conn.query_row(sql, params![since], |r| r.get(0))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

fn read_flag(row: &Row<'_>) -> rusqlite::Result<Result<Flag, StoreError>> {
    let id: String = row.get(0)?;
    let exchange_id: String = row.get(1)?;
    let created_at_us: i64 = row.get(3)?;
    let severity: String = row.get(7)?;
    let policies_json: String = row.get(8)?;
    let evidence_json: String = row.get(11)?;
    let label: Option<String> = row.get(14)?;
    let label_note: Option<String> = row.get(15)?;
    let labelled_at_us: Option<i64> = row.get(16)?;
    let request_id: String = row.get(2)?;
    let model: Option<String> = row.get(4)?;
    let route: String = row.get(5)?;
    let api_key_hash: Option<String> = row.get(6)?;
    let prompt: String = row.get(9)?;
    let output: String = row.get(10)?;
    let stream: bool = row.get(12)?;
    let truncated: bool = row.get(13)?;
    let parsed = (|| -> Result<Flag, StoreError> {
        Ok(Flag {
            id: id.parse().unwrap_or_default(),
            exchange_id: exchange_id.parse().unwrap_or_default(),
            request_id,
            created_at: rfc3339(created_at_us),
            model,
            route,
            api_key_hash,
            severity: Severity::parse(&severity).unwrap_or(Severity::Info),
            policies: serde_json::from_str(&policies_json)?,
            prompt,
            output,
            evidence: serde_json::from_str(&evidence_json)?,
            stream,
            truncated,
            label: label.and_then(|l| Verdict::parse(&l)).map(|verdict| Label {
                verdict,
                note: label_note,
                labelled_at: rfc3339(labelled_at_us.unwrap_or(0)),
            }),
            created_at_us,
        })
    })();
    Ok(parsed)
}
