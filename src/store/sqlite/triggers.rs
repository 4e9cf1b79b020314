//! Watched triggers and the retro-scan on SQLite (the SQL is shared, in `store::triggers`).

use rusqlite::params;

use super::Sqlite;
use crate::store::StoreError;
use crate::store::triggers::{self, Scanner, TriggerValues, WatchedTrigger};

/// Binds a trigger's values in the order of `triggers::INSERT_DISCOVERED`'s columns.
pub(super) fn execute(
    conn: &rusqlite::Connection,
    sql: &str,
    v: &TriggerValues,
) -> Result<usize, StoreError> {
    Ok(conn.prepare_cached(sql)?.execute(params![
        v.scope,
        v.ngram,
        v.model,
        v.state,
        v.source,
        v.flagged_with,
        v.unflagged_with,
        v.q_value,
        v.examples_json,
        v.note,
        v.created_at_us,
        v.updated_at_us
    ])?)
}

impl Sqlite {
    pub(in crate::store) fn write_trigger(
        &self,
        sql: &str,
        values: &TriggerValues,
    ) -> Result<usize, StoreError> {
        execute(&self.conn, sql, values)
    }

    pub(in crate::store) fn list_triggers(&self) -> Result<Vec<WatchedTrigger>, StoreError> {
        let mut stmt = self.conn.prepare(triggers::LIST)?;
        stmt.query_and_then([], |row| triggers::trigger(row))?
            .collect()
    }

    pub(in crate::store) fn scan_triggers(
        &self,
        scanner: &mut Scanner,
        model: Option<&str>,
        pattern: &str,
    ) -> Result<(), StoreError> {
        let mut stmt = self.conn.prepare(&triggers::scan_sql(false))?;
        let mut rows = stmt.query(params![model, pattern])?;
        while let Some(row) = rows.next()? {
            scanner.row(row)?;
        }
        Ok(())
    }
}
