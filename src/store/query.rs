//! Writing exchanges in batches and reading them back: the SQLite side, and the row
//! conversions both backends share.

use rusqlite::{OptionalExtension, Row, params};

use super::{Retention, Sqlite, StoreError, StoreItem};
use crate::capture::{Exchange, Outcome, Route};

/// An exchange as read back from the store.
pub type ExchangeRow = Exchange;

/// Which exchanges to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct ExchangeFilter {
    /// At most this many (default 50).
    pub limit: Option<u32>,
    /// Only this route (`chat_completions`, …).
    pub route: Option<String>,
    /// Only this requested model.
    pub model: Option<String>,
    /// Only exchanges marked truncated.
    pub truncated_only: bool,
}

const COLUMNS: &str = "id, request_id, started_at_us, method, path, route, api_key_hash, model, \
    response_model, stream, status, ttfb_us, latency_us, outcome, truncated, capture_incomplete, \
    parse_error, prompt_json, choices_json, input_tokens, output_tokens";

impl Sqlite {
    /// Writes a batch (exchanges and flags) in one transaction. A row already stored (same
    /// id) is left as is.
    pub(super) fn insert_batch(&mut self, batch: &[StoreItem]) -> Result<usize, StoreError> {
        let tx = self.conn.transaction()?;
        let mut written = 0;
        let mut flags = Vec::new();
        {
            let mut insert = tx.prepare_cached(
                "INSERT OR IGNORE INTO exchanges (id, request_id, started_at_us, method, path, \
                 route, api_key_hash, model, response_model, stream, status, ttfb_us, latency_us, \
                 outcome, truncated, capture_incomplete, parse_error, prompt_json, choices_json, \
                 output, finish_reason, input_tokens, output_tokens, annotations, flagged) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, \
                 ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
            )?;
            for item in batch {
                let (e, annotations, flagged) = match item {
                    StoreItem::Flag(flag) => {
                        flags.push(flag.as_ref().clone());
                        continue;
                    }
                    StoreItem::Exchange {
                        exchange,
                        annotations,
                        flagged,
                    } => (exchange, annotations, flagged),
                };
                let usage = e.usage.unwrap_or_default();
                let annotations = (!annotations.is_empty()).then(|| annotations.join(","));
                written += insert.execute(params![
                    e.id.to_string(),
                    e.request_id,
                    e.started_at_us,
                    e.method,
                    e.path,
                    e.route.as_str(),
                    e.api_key_hash,
                    e.model,
                    e.response_model,
                    e.stream,
                    e.status,
                    e.ttfb_us.map(clamp),
                    clamp(e.latency_us),
                    e.outcome.as_str(),
                    e.truncated,
                    e.capture_incomplete,
                    e.parse_error,
                    serde_json::to_string(&e.prompt)?,
                    serde_json::to_string(&e.choices)?,
                    e.output(),
                    e.finish_reason(),
                    usage.input_tokens.map(clamp),
                    usage.output_tokens.map(clamp),
                    annotations,
                    flagged,
                ])?;
            }
        }
        written += Sqlite::insert_flags_tx(&tx, &flags)?;
        tx.commit()?;
        Ok(written)
    }

    /// Lists exchanges, newest first.
    pub(super) fn list_exchanges(
        &self,
        filter: &ExchangeFilter,
    ) -> Result<Vec<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM exchanges \
             WHERE (?1 IS NULL OR route = ?1) AND (?2 IS NULL OR model = ?2) \
             AND (?3 = 0 OR truncated = 1) \
             ORDER BY started_at_us DESC, id DESC LIMIT ?4"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![
                filter.route,
                filter.model,
                filter.truncated_only,
                filter.limit.unwrap_or(50)
            ],
            read_row,
        )?;
        let mut out = Vec::new();
        for row in rows {
            out.push(row??);
        }
        Ok(out)
    }

    /// One exchange by its id or its request id.
    pub(super) fn get_exchange(&self, id: &str) -> Result<Option<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM exchanges WHERE id = ?1 OR request_id = ?1 \
             ORDER BY started_at_us DESC LIMIT 1"
        );
        let row = self
            .conn
            .query_row(&sql, params![id], read_row)
            .optional()?;
        row.transpose()
    }

    /// The prompts of the newest `limit` captured exchanges (optionally of one model and
    /// route), each with whether it was flagged: the input of trigger attribution.
    pub(super) fn prompts_with_flags(
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
        let rows = stmt.query_map(params![model, route, limit], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, bool>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (prompt_json, flagged) = row?;
            out.push((user_text(&prompt_json)?, flagged));
        }
        Ok(out)
    }

    /// Deletes rows past their age, then the oldest rows while the database is over
    /// `max_bytes` (0: no size limit). Returns (exchanges, flags) deleted.
    pub(super) fn apply_retention(&self, retention: &Retention) -> Result<(u64, u64), StoreError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
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

    /// Number of stored exchanges.
    pub(super) fn count_exchanges(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .query_row("SELECT COUNT(*) FROM exchanges", [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
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
            .execute(CLAIM_ALERT, params![rule, scope, now_us, cooldown_us])?;
        Ok(claimed == 1)
    }
}

/// Records `now` as the last alert of (rule, scope) unless one was sent within the cooldown;
/// one row changed means claimed. The same statement on both backends.
pub(super) const CLAIM_ALERT: &str = "INSERT INTO alert_claims (rule, scope, last_sent_us) \
    VALUES ($1, $2, $3) ON CONFLICT (rule, scope) DO UPDATE SET last_sent_us = excluded.last_sent_us \
    WHERE alert_claims.last_sent_us <= excluded.last_sent_us - $4";

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

pub(super) fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(super) fn unclamp(v: Option<i64>) -> Option<u64> {
    v.map(|v| u64::try_from(v).unwrap_or(0))
}

fn read_row(row: &Row<'_>) -> rusqlite::Result<Result<ExchangeRow, StoreError>> {
    let id: String = row.get(0)?;
    let route: String = row.get(5)?;
    let outcome: String = row.get(13)?;
    let prompt_json: String = row.get(17)?;
    let choices_json: String = row.get(18)?;
    let input_tokens: Option<i64> = row.get(19)?;
    let output_tokens: Option<i64> = row.get(20)?;
    let latency_us: i64 = row.get(12)?;
    let parsed = (|| -> Result<ExchangeRow, StoreError> {
        Ok(Exchange {
            id: id.parse().unwrap_or_default(),
            request_id: row.get(1)?,
            started_at_us: row.get(2)?,
            method: row.get(3)?,
            path: row.get(4)?,
            route: parse_route(&route),
            api_key_hash: row.get(6)?,
            model: row.get(7)?,
            response_model: row.get(8)?,
            stream: row.get(9)?,
            status: row.get(10)?,
            ttfb_us: unclamp(row.get(11)?),
            latency_us: u64::try_from(latency_us).unwrap_or(0),
            outcome: parse_outcome(&outcome),
            truncated: row.get(14)?,
            capture_incomplete: row.get(15)?,
            parse_error: row.get(16)?,
            prompt: serde_json::from_str(&prompt_json)?,
            choices: serde_json::from_str(&choices_json)?,
            usage: (input_tokens.is_some() || output_tokens.is_some()).then(|| {
                crate::capture::Usage {
                    input_tokens: unclamp(input_tokens),
                    output_tokens: unclamp(output_tokens),
                    total_tokens: None,
                }
            }),
        })
    })();
    Ok(parsed)
}

pub(super) fn parse_route(s: &str) -> Route {
    match s {
        "chat_completions" => Route::ChatCompletions,
        "completions" => Route::Completions,
        "responses" => Route::Responses,
        "anthropic_messages" => Route::AnthropicMessages,
        _ => Route::Other,
    }
}

pub(super) fn parse_outcome(s: &str) -> Outcome {
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
    use crate::capture::{Choice, Message, Usage};
    use crate::store::Store;

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
