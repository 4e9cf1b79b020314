//! Reading exchanges back from SQLite: the listing, one exchange, the prompts trigger
//! attribution reads, the count. The SQL is SQLite's; the rows map through `rows`.

use rusqlite::params;

use super::Sqlite;
use crate::store::rows::{self, EXCHANGE_COLUMNS};
use crate::store::{ExchangeFilter, ExchangeRow, StoreError};

impl Sqlite {
    /// Lists exchanges, newest first.
    pub(in crate::store) fn list_exchanges(
        &self,
        filter: &ExchangeFilter,
    ) -> Result<Vec<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {EXCHANGE_COLUMNS} FROM exchanges \
             WHERE (?1 IS NULL OR route = ?1) AND (?2 IS NULL OR model = ?2) \
             AND (?3 = 0 OR truncated = 1) \
             ORDER BY started_at_us DESC, id DESC LIMIT ?4"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        stmt.query_and_then(
            params![
                filter.route,
                filter.model,
                filter.truncated_only,
                filter.limit.unwrap_or(50)
            ],
            |row| rows::exchange(row),
        )?
        .collect()
    }

    /// One exchange by its id or its request id.
    pub(in crate::store) fn get_exchange(
        &self,
        id: &str,
    ) -> Result<Option<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {EXCHANGE_COLUMNS} FROM exchanges WHERE id = ?1 OR request_id = ?1 \
             ORDER BY started_at_us DESC LIMIT 1"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let mut found = stmt.query_and_then(params![id], |row| rows::exchange(row))?;
        found.next().transpose()
    }

    /// The prompts of the newest `limit` captured exchanges (optionally of one model and
    /// route), each with whether it was flagged: the input of trigger attribution.
    pub(in crate::store) fn prompts_with_flags(
        &self,
        model: Option<&str>,
        route: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        let mut stmt = self.conn.prepare(
            "SELECT prompt_json, flagged FROM exchanges \
             WHERE (?1 IS NULL OR model = ?1) AND (?2 IS NULL OR route = ?2) \
             ORDER BY started_at_us DESC LIMIT ?3",
        )?;
        stmt.query_and_then(params![model, route, limit], |row| {
            rows::prompt_and_flagged(row)
        })?
        .collect()
    }

    /// Number of stored exchanges.
    pub(in crate::store) fn count_exchanges(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM exchanges", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use crate::capture::{Choice, Exchange, Message, Outcome, Route, Usage};
    use crate::store::{ExchangeFilter, Store};

    fn exchange(n: i64) -> Exchange {
        Exchange {
            id: uuid::Uuid::now_v7(),
            request_id: format!("req-{n}"),
            started_at_us: 1_000 + n,
            method: "POST".into(),
            path: "/v1/chat/completions".into(),
            route: Route::ChatCompletions,
            api_key_hash: Some("abcd".into()),
            model: Some("m".into()),
            response_model: Some("m-1".into()),
            stream: n % 2 == 0,
            prompt: vec![Message {
                role: "user".into(),
                content: format!("hello {n}"),
            }],
            choices: vec![Choice {
                index: 0,
                text: format!("answer {n}"),
                finish_reason: Some("stop".into()),
                tool_calls: vec![],
            }],
            usage: Some(Usage {
                input_tokens: Some(3),
                output_tokens: Some(5),
                total_tokens: None,
            }),
            status: Some(200),
            ttfb_us: Some(10),
            latency_us: 20,
            outcome: if n == 2 {
                Outcome::ClientAborted
            } else {
                Outcome::Complete
            },
            truncated: n == 2,
            capture_incomplete: false,
            parse_error: None,
        }
    }

    #[test]
    fn write_then_read_round_trips() {
        let dir = std::env::temp_dir().join(format!("tripwire-store-{}", uuid::Uuid::now_v7()));
        let path = dir.join("sub/t.db");
        let mut store = Store::open(&path).unwrap();
        let batch: Vec<_> = (1..=3).map(exchange).collect();
        assert_eq!(store.insert_exchanges(&batch).unwrap(), 3);
        // Writing the same batch again changes nothing.
        assert_eq!(store.insert_exchanges(&batch).unwrap(), 0);
        let listed = store.list_exchanges(&ExchangeFilter::default()).unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(listed[0], batch[2], "newest first, every field kept");
        let truncated = store
            .list_exchanges(&ExchangeFilter {
                truncated_only: true,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(truncated.len(), 1);
        assert_eq!(truncated[0].outcome, Outcome::ClientAborted);
        let by_request = store.get_exchange("req-1").unwrap().unwrap();
        assert_eq!(by_request, batch[0]);
        assert!(store.get_exchange("nope").unwrap().is_none());
        drop(store);
        // Reopening keeps the data and does not re-run migrations.
        let store = Store::open(&path).unwrap();
        assert_eq!(store.count_exchanges().unwrap(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn retention_deletes_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(&dir.path().join("r.db")).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as i64;
        let mut old = exchange(1);
        old.started_at_us = now - 3_600_000_000 * 48;
        let mut fresh = exchange(2);
        fresh.started_at_us = now;
        store.insert_exchanges(&[old, fresh.clone()]).unwrap();
        let retention = crate::store::Retention {
            exchange_max_age: std::time::Duration::from_secs(24 * 3600),
            flag_max_age: std::time::Duration::from_secs(24 * 3600),
            max_bytes: 0,
            interval: std::time::Duration::from_secs(60),
        };
        assert_eq!(store.apply_retention(&retention).unwrap(), (1, 0));
        let left = store.list_exchanges(&ExchangeFilter::default()).unwrap();
        assert_eq!(left, vec![fresh]);
    }

    #[test]
    fn open_existing_refuses_a_missing_file() {
        let err = Store::open_existing(std::path::Path::new("/nonexistent/x.db")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/x.db"), "{err}");
    }
}
