//! The SQLite backend: one connection to one file, in WAL mode with `synchronous=NORMAL` and
//! foreign keys on, and the writes (batches of exchanges and flags, retention, the size cap,
//! alert claims). Reads are in `query` (exchanges) and `flags` (the flag log); the columns and
//! the row mapping are the ones in `rows`, shared with PostgreSQL.

mod flags;
mod query;
mod triggers;

use std::path::Path;

use rusqlite::types::ToSqlOutput;
use rusqlite::{Connection, params, params_from_iter};

use super::rows::{self, Columns, Value};
use super::{Retention, StoreError, StoreItem, migrations};

/// The SQLite backend: one connection.
#[derive(Debug)]
pub(super) struct Sqlite {
    conn: Connection,
}

impl Columns for rusqlite::Row<'_> {
    fn column<T>(&self, column: &str) -> Result<T, StoreError>
    where
        T: rusqlite::types::FromSql + postgres::types::FromSqlOwned,
    {
        Ok(self.get(column)?)
    }
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        match self {
            Value::Null => Ok(ToSqlOutput::from(rusqlite::types::Null)),
            Value::Text(text) => text.as_ref().to_sql(),
            Value::Int(n) => n.to_sql(),
            Value::Bool(b) => b.to_sql(),
        }
    }
}

impl Sqlite {
    /// Opens (creating when missing, with its directory) the database at `path`, sets the
    /// pragmas and brings the schema up to date.
    pub(super) fn open(path: &Path) -> Result<Sqlite, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Directory {
                path: path.to_owned(),
                source,
            })?;
        }
        let conn = Connection::open(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations::migrate(&conn, path)?;
        Ok(Sqlite { conn })
    }

    /// Writes a batch (exchanges and flags) in one transaction. A row already stored (same
    /// id) is left as is.
    pub(super) fn insert_batch(&mut self, batch: &[StoreItem]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut written = 0;
        let mut flags = Vec::new();
        let mut discovered = Vec::new();
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO exchanges {}",
                rows::insert_values(rows::EXCHANGE_INSERT, '?')
            ))?;
            for item in batch {
                match item {
                    StoreItem::Flag(flag) => flags.push(flag.as_ref()),
                    StoreItem::Trigger(trigger) => discovered.push(trigger.as_ref()),
                    StoreItem::Exchange {
                        exchange,
                        annotations,
                        flagged,
                    } => {
                        let values = rows::exchange_values(exchange, annotations, *flagged)?;
                        written += insert.execute(params_from_iter(&values))?;
                    }
                }
            }
        }
        {
            let mut insert = tx.prepare_cached(&format!(
                "INSERT OR IGNORE INTO flags {}",
                rows::insert_values(rows::FLAG_INSERT, '?')
            ))?;
            for flag in flags {
                written += insert.execute(params_from_iter(&rows::flag_values(flag)?))?;
            }
        }
        for trigger in discovered {
            let values = super::triggers::values(trigger)?;
            written += triggers::execute(&tx, super::triggers::INSERT_DISCOVERED, &values)?;
        }
        tx.commit()?;
        Ok(written)
    }

    /// Deletes rows past their age, then the oldest rows while the database is over
    /// `max_bytes` (0: no size limit). Returns (exchanges, flags) deleted.
    pub(super) fn apply_retention(&self, retention: &Retention) -> Result<(u64, u64), StoreError> {
        let now = rows::now_us();
        let age = |d: std::time::Duration| now - i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        let mut exchanges = self.conn.execute(
            "DELETE FROM exchanges WHERE started_at_us < ?1",
            params![age(retention.exchange_max_age)],
        )? as u64;
        let mut flags = self.conn.execute(
            "DELETE FROM flags WHERE created_at_us < ?1",
            params![age(retention.flag_max_age)],
        )? as u64;
        if retention.max_bytes > 0 {
            // Free pages are reused by SQLite, so the used size is what must stay under the
            // limit; delete in chunks of the oldest until it does.
            for _ in 0..1000 {
                let used: i64 = self.conn.query_row(
                    "SELECT (page_count - freelist_count) * page_size \
                     FROM pragma_page_count(), pragma_freelist_count(), pragma_page_size()",
                    [],
                    |r| r.get(0),
                )?;
                if u64::try_from(used).unwrap_or(0) <= retention.max_bytes {
                    break;
                }
                let deleted = self.conn.execute(
                    "DELETE FROM exchanges WHERE id IN \
                     (SELECT id FROM exchanges ORDER BY started_at_us LIMIT 1000)",
                    [],
                )? as u64;
                exchanges += deleted;
                if deleted == 0 {
                    let deleted = self.conn.execute(
                        "DELETE FROM flags WHERE id IN \
                         (SELECT id FROM flags ORDER BY created_at_us LIMIT 1000)",
                        [],
                    )? as u64;
                    flags += deleted;
                    if deleted == 0 {
                        break;
                    }
                }
            }
        }
        Ok((exchanges, flags))
    }

    /// Sets `max_page_count` so the database stays within `bytes` (at least its current size,
    /// which SQLite will not go under).
    pub(super) fn cap_size(&self, bytes: u64) -> Result<(), StoreError> {
        let page_size: i64 = self.conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = i64::try_from(bytes).unwrap_or(i64::MAX) / page_size.max(1);
        self.conn.query_row(
            &format!("PRAGMA max_page_count = {}", pages.max(1)),
            [],
            |_| Ok(()),
        )?;
        Ok(())
    }

    /// See [`super::Store::claim_alert`].
    pub(super) fn claim_alert(
        &self,
        rule: &str,
        scope: &str,
        now_us: i64,
        cooldown_us: i64,
    ) -> Result<bool, StoreError> {
        let claimed = self
            .conn
            .execute(rows::CLAIM_ALERT, params![rule, scope, now_us, cooldown_us])?;
        Ok(claimed == 1)
    }
}
