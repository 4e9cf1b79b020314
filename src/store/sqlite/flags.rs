//! The flag log in SQLite: listing and finding flags, labelling one (with the allowed evidence
//! the label brings or takes away), and the counts of `flag_stats`, read in one pass over the
//! covering index `flags_stats`. The SQL is SQLite's; the rows map through `rows`.

use std::collections::HashMap;

use rusqlite::params;

use super::Sqlite;
use crate::store::allowed::{self, AllowedEvidence};
use crate::store::rows::{self, FLAG_COLUMNS, rank};
use crate::store::{Flag, FlagFilter, FlagStats, Review, StoreError};

impl Sqlite {
    /// Lists flags, newest first.
    pub(in crate::store) fn list_flags(
        &self,
        filter: &FlagFilter,
    ) -> Result<Vec<Flag>, StoreError> {
        let (label_any, label_value) = match filter.label {
            None => (true, None),
            Some(v) => (false, v.map(Review::as_str)),
        };
        let sql = format!(
            "SELECT {FLAG_COLUMNS} FROM flags \
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
        stmt.query_and_then(
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
            |row| rows::flag(row),
        )?
        .collect()
    }

    /// One flag by its id, its exchange's id, or its request id.
    pub(in crate::store) fn get_flag(&self, id: &str) -> Result<Option<Flag>, StoreError> {
        let sql = format!(
            "SELECT {FLAG_COLUMNS} FROM flags WHERE id = ?1 OR exchange_id = ?1 OR request_id = ?1 \
             ORDER BY created_at_us DESC LIMIT 1"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut found = stmt.query_and_then(params![id], |row| rows::flag(row))?;
        found.next().transpose()
    }

    /// Sets the label of the flag with id `id`.
    pub(in crate::store) fn set_label(
        &self,
        id: &str,
        verdict: Review,
        note: Option<&str>,
        now_us: i64,
        allowed: &[AllowedEvidence],
    ) -> Result<(), StoreError> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "UPDATE flags SET label = ?2, label_note = ?3, labelled_at_us = ?4 WHERE id = ?1",
            params![id, verdict.as_str(), note, now_us],
        )?;
        tx.execute(allowed::DELETE_FLAG, params![id])?;
        for e in allowed {
            tx.prepare_cached(allowed::INSERT)?.execute(params![
                e.flag_id,
                e.rule,
                e.model,
                e.route,
                e.text,
                e.created_at_us
            ])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Every allowed evidence entry, oldest first.
    pub(in crate::store) fn list_allowed(&self) -> Result<Vec<AllowedEvidence>, StoreError> {
        let mut stmt = self.conn.prepare(allowed::LIST)?;
        stmt.query_and_then([], |row| allowed::entry(row))?
            .collect()
    }

    /// Counts by rule, severity and model, and the labels.
    pub(in crate::store) fn flag_stats(
        &self,
        since_us: Option<i64>,
    ) -> Result<FlagStats, StoreError> {
        // One pass over the covering index `flags_stats` (schema 4), tallied here: five
        // queries over the wide rows took ~260 ms at 100,000 flags.
        let mut stmt = self.conn.prepare_cached(
            "SELECT severity, severity_rank, model, label, rules FROM flags \
             WHERE created_at_us >= ?1",
        )?;
        let mut found = stmt.query(params![since_us.unwrap_or(i64::MIN)])?;
        let mut stats = FlagStats::default();
        let mut severities: HashMap<String, (i64, u64)> = HashMap::new();
        let mut models: HashMap<String, u64> = HashMap::new();
        let mut rules = Vec::new();
        while let Some(row) = found.next()? {
            let severity: String = row.get("severity")?;
            let rank: i64 = row.get("severity_rank")?;
            let model: Option<String> = row.get("model")?;
            let label: Option<String> = row.get("label")?;
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
            rules.push((row.get::<_, String>("rules")?, label));
        }
        let mut by_severity: Vec<(String, (i64, u64))> = severities.into_iter().collect();
        by_severity.sort_by_key(|(_, (rank, _))| std::cmp::Reverse(*rank));
        stats.by_severity = by_severity.into_iter().map(|(k, (_, n))| (k, n)).collect();
        let mut by_model: Vec<(String, u64)> = models.into_iter().collect();
        by_model.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        stats.by_model = by_model;
        stats.by_rule = rows::tally_rules(rules);
        Ok(stats)
    }

    /// Number of stored flags.
    pub(in crate::store) fn count_flags(&self) -> Result<u64, StoreError> {
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
