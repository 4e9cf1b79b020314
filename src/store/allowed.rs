//! Allowed evidence: the spans of flags labelled false positive, kept per rule and scope so
//! the gateway's allow-list (`policy::allow`) survives restarts and reaches every replica.
//!
//! Each row remembers the flag it came from: labelling that flag true positive again deletes
//! its rows, and labelling it false positive again replaces them. The SQL uses `$n`
//! placeholders, which both SQLite and PostgreSQL accept.

use serde::{Deserialize, Serialize};

use super::StoreError;
use super::rows::{Columns, Flag};
use crate::detect::Target;

/// One allowed text: a rule does not fire in this scope when all its evidence is allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedEvidence {
    /// The flag labelled false positive it came from.
    pub flag_id: String,
    /// The rule it is allowed for.
    pub rule: String,
    /// The scope's model (`None`: exchanges without one).
    pub model: Option<String>,
    /// The scope's route.
    pub route: String,
    /// The span's text, normalised (`policy::allow::allowable`).
    pub text: String,
    /// When it was allowed (µs since the epoch).
    pub created_at_us: i64,
}

impl AllowedEvidence {
    /// The entry as the allow-list takes it.
    pub fn entry(&self) -> crate::policy::allow::Entry<'_> {
        crate::policy::allow::Entry {
            rule: &self.rule,
            model: self.model.as_deref(),
            route: &self.route,
            text: &self.text,
        }
    }
}

/// The allow-list of stored entries.
pub fn allow_list(entries: &[AllowedEvidence]) -> crate::policy::allow::Allowed {
    crate::policy::allow::Allowed::new(entries.iter().map(AllowedEvidence::entry))
}

/// One entry, kept once per flag, rule and text.
pub(super) const INSERT: &str = "INSERT INTO allowed_evidence (flag_id, rule, model, route, \
    text, created_at_us) VALUES ($1, $2, $3, $4, $5, $6) \
    ON CONFLICT (flag_id, rule, text) DO NOTHING";

/// Every entry of one flag.
pub(super) const DELETE_FLAG: &str = "DELETE FROM allowed_evidence WHERE flag_id = $1";

/// Every entry, oldest first.
pub(super) const LIST: &str = "SELECT flag_id, rule, model, route, text, created_at_us \
    FROM allowed_evidence ORDER BY created_at_us, rule, text";

/// An entry read back.
pub(super) fn entry(row: &impl Columns) -> Result<AllowedEvidence, StoreError> {
    Ok(AllowedEvidence {
        flag_id: row.column("flag_id")?,
        rule: row.column("rule")?,
        model: row.column("model")?,
        route: row.column("route")?,
        text: row.column("text")?,
        created_at_us: row.column("created_at_us")?,
    })
}

/// What labelling `flag` false positive allows: for each rule that fired, the text of each
/// evidence span of the detectors that rule reads, normalised; spans too short, and spans
/// whose offsets do not fall on the stored texts, are skipped. A flag stored without evidence
/// (its texts were redacted) allows nothing.
pub(super) fn from_flag(flag: &Flag, now_us: i64) -> Vec<AllowedEvidence> {
    let mut entries: Vec<AllowedEvidence> = Vec::new();
    for rule in &flag.policies {
        for item in &flag.evidence {
            if !rule.scores.contains_key(&item.detector) {
                continue;
            }
            let source = match item.evidence.target {
                Target::Prompt => &flag.prompt,
                Target::Output => &flag.output,
            };
            let Some(text) = source
                .get(item.evidence.start..item.evidence.end)
                .and_then(crate::policy::allow::allowable)
            else {
                continue;
            };
            if entries
                .iter()
                .any(|e| e.rule == rule.name && e.text == text)
            {
                continue;
            }
            entries.push(AllowedEvidence {
                flag_id: flag.id.to_string(),
                rule: rule.name.clone(),
                model: flag.model.clone(),
                route: flag.route.clone(),
                text,
                created_at_us: now_us,
            });
        }
    }
    entries
}
