//! The PostgreSQL backend: the same tables, queries and semantics as SQLite, so several
//! replicas write one flag log and one query sees all of it.
//!
//! It uses the synchronous `postgres` client: the store is already called from blocking threads
//! (the writer's batches, the admin API, the CLI), so a blocking client fits that design
//! without a second async path; `postgres` is `tokio-postgres` driven by a private
//! current-thread runtime. That runtime must not be dropped on an async thread, so dropping a
//! [`Postgres`] there hands the connection to a short-lived thread to close.
//!
//! Differences from SQLite: `max_bytes` is not applied (rows are deleted by age; the
//! database's size is the DBA's to manage), and NUL characters, which PostgreSQL text cannot
//! hold, are stored as U+FFFD. Connections are plain TCP or a Unix socket (no TLS). The
//! columns and the row mapping are the ones in `rows`, shared with SQLite; the SQL here is
//! PostgreSQL's.

use std::sync::Mutex;

use bytes::BytesMut;
use postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use postgres::{Client, NoTls, Row};

use super::allowed::{self, AllowedEvidence};
use super::rows::{self, CLAIM_ALERT, Columns, EXCHANGE_COLUMNS, FLAG_COLUMNS, Value, rank};
use super::triggers::{self, Scanner, TriggerValues};
use super::{
    ExchangeFilter, ExchangeRow, Flag, FlagFilter, FlagStats, PostgresUrl, Retention, Review,
    StoreError, StoreItem, WatchedTrigger,
};

/// One connection to the database, opened again on the next call once it is lost (a server
/// restart): the writer's retries then reconnect instead of failing for good.
#[derive(Debug)]
pub(super) struct Postgres {
    client: Mutex<Option<ClientCell>>,
    url: PostgresUrl,
}

struct ClientCell(Client);

impl std::fmt::Debug for ClientCell {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let client = self.client.get_mut().ok().and_then(Option::take);
        if let Some(client) = client
            && tokio::runtime::Handle::try_current().is_ok()
        {
            // Closing blocks on the client's own runtime, which an async thread must not do.
            let _closer = std::thread::Builder::new()
                .name("store-close".to_owned())
                .spawn(move || drop(client));
        }
    }
}

fn open(url: &PostgresUrl) -> Result<Client, StoreError> {
    let mut config = url.config()?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(std::time::Duration::from_secs(10));
    }
    config.application_name("tripwire");
    config.connect(NoTls).map_err(|source| StoreError::Connect {
        url: url.redacted().to_owned(),
        source,
    })
}

/// PostgreSQL text cannot hold NUL; everything else is kept as is.
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
}

impl Columns for Row {
    fn column<T>(&self, column: &str) -> Result<T, StoreError>
    where
        T: rusqlite::types::FromSql + postgres::types::FromSqlOwned,
    {
        Ok(self.try_get(column)?)
    }
}

impl ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(s) => text(s).to_sql_checked(ty, out),
            Value::Int(n) if *ty == Type::INT4 => i32::try_from(*n)?.to_sql_checked(ty, out),
            Value::Int(n) => n.to_sql_checked(ty, out),
            Value::Bool(b) => b.to_sql_checked(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        <String as ToSql>::accepts(ty)
            || <i64 as ToSql>::accepts(ty)
            || <i32 as ToSql>::accepts(ty)
            || <bool as ToSql>::accepts(ty)
    }

    to_sql_checked!();
}

/// A trigger's values as the client's parameters, in the order of `triggers::INSERT_DISCOVERED`'s columns.
fn trigger_params(v: &TriggerValues) -> [&(dyn ToSql + Sync); 12] {
    [
        &v.scope,
        &v.ngram,
        &v.model,
        &v.state,
        &v.source,
        &v.flagged_with,
        &v.unflagged_with,
        &v.q_value,
        &v.examples_json,
        &v.note,
        &v.created_at_us,
        &v.updated_at_us,
    ]
}

/// The values of one row as the client's parameters.
fn params<'a>(values: &'a [Value<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    values.iter().map(|v| v as &(dyn ToSql + Sync)).collect()
}

impl Postgres {
    /// Connects and brings the schema up to date.
    pub(super) fn connect(url: &PostgresUrl) -> Result<Postgres, StoreError> {
        let mut client = open(url)?;
        super::migrations::migrate_postgres(&mut client, url.redacted())?;
        Ok(Postgres {
            client: Mutex::new(Some(ClientCell(client))),
            url: url.clone(),
        })
    }

    /// Runs `f` on the connection, reconnecting first when it was lost.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self
            .client
            .lock()
            .map_err(|_| StoreError::Task("store connection mutex poisoned".to_owned()))?;
        if guard.as_ref().is_none_or(|c| c.0.is_closed()) {
            *guard = None;
            *guard = Some(ClientCell(open(&self.url)?));
        }
        match guard.as_mut() {
            Some(client) => f(&mut client.0),
            None => Err(StoreError::Task("store connection closed".to_owned())),
        }
    }

    pub(super) fn insert_batch(&mut self, batch: &[StoreItem]) -> Result<usize, StoreError> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            let insert_exchange = tx.prepare(&format!(
                "INSERT INTO exchanges {} ON CONFLICT (id) DO NOTHING",
                rows::insert_values(rows::EXCHANGE_INSERT, '$')
            ))?;
            let insert_flag = tx.prepare(&format!(
                "INSERT INTO flags {} ON CONFLICT (id) DO NOTHING",
                rows::insert_values(rows::FLAG_INSERT, '$')
            ))?;
            let mut written = 0u64;
            for item in batch {
                written += match item {
                    StoreItem::Exchange {
                        exchange,
                        annotations,
                        flagged,
                    } => {
                        let values = rows::exchange_values(exchange, annotations, *flagged)?;
                        tx.execute(&insert_exchange, &params(&values))?
                    }
                    StoreItem::Flag(flag) => {
                        tx.execute(&insert_flag, &params(&rows::flag_values(flag)?))?
                    }
                    StoreItem::Trigger(trigger) => {
                        let v = triggers::values(trigger)?;
                        tx.execute(triggers::INSERT_DISCOVERED, &trigger_params(&v))?
                    }
                };
            }
            tx.commit()?;
            Ok(usize::try_from(written).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn list_exchanges(
        &self,
        filter: &ExchangeFilter,
    ) -> Result<Vec<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {EXCHANGE_COLUMNS} FROM exchanges \
             WHERE ($1::text IS NULL OR route = $1) AND ($2::text IS NULL OR model = $2) \
             AND (NOT $3 OR truncated) \
             ORDER BY started_at_us DESC, id DESC LIMIT $4"
        );
        self.with(|client| {
            client
                .query(
                    &sql,
                    &[
                        &filter.route,
                        &filter.model,
                        &filter.truncated_only,
                        &i64::from(filter.limit.unwrap_or(50)),
                    ],
                )?
                .iter()
                .map(rows::exchange)
                .collect()
        })
    }

    pub(super) fn get_exchange(&self, id: &str) -> Result<Option<ExchangeRow>, StoreError> {
        let sql = format!(
            "SELECT {EXCHANGE_COLUMNS} FROM exchanges WHERE id = $1 OR request_id = $1 \
             ORDER BY started_at_us DESC LIMIT 1"
        );
        self.with(|client| {
            client
                .query_opt(&sql, &[&text(id)])?
                .as_ref()
                .map(rows::exchange)
                .transpose()
        })
    }

    pub(super) fn prompts_with_flags(
        &self,
        model: Option<&str>,
        route: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        self.with(|client| {
            client
                .query(
                    "SELECT prompt_json, flagged FROM exchanges \
                     WHERE ($1::text IS NULL OR model = $1) AND ($2::text IS NULL OR route = $2) \
                     ORDER BY started_at_us DESC LIMIT $3",
                    &[&model, &route, &i64::from(limit)],
                )?
                .iter()
                .map(rows::prompt_and_flagged)
                .collect()
        })
    }

    pub(super) fn apply_retention(&self, retention: &Retention) -> Result<(u64, u64), StoreError> {
        let now = rows::now_us();
        let age = |d: std::time::Duration| now - i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        self.with(|client| {
            let exchanges = client.execute(
                "DELETE FROM exchanges WHERE started_at_us < $1",
                &[&age(retention.exchange_max_age)],
            )?;
            let flags = client.execute(
                "DELETE FROM flags WHERE created_at_us < $1",
                &[&age(retention.flag_max_age)],
            )?;
            Ok((exchanges, flags))
        })
    }

    pub(super) fn count_exchanges(&self) -> Result<u64, StoreError> {
        self.count(
            "SELECT COUNT(*) FROM exchanges WHERE started_at_us >= $1",
            i64::MIN,
        )
    }

    pub(super) fn list_flags(&self, filter: &FlagFilter) -> Result<Vec<Flag>, StoreError> {
        let (label_any, label_value) = match filter.label {
            None => (true, None),
            Some(v) => (false, v.map(Review::as_str)),
        };
        let sql = format!(
            "SELECT {FLAG_COLUMNS} FROM flags \
             WHERE ($1::bigint IS NULL OR created_at_us >= $1) \
             AND ($2::bigint IS NULL OR created_at_us < $2) \
             AND ($3::text IS NULL OR strpos(rules, ',' || $3 || ',') > 0) \
             AND ($4::bigint IS NULL OR severity_rank >= $4) \
             AND ($5::text IS NULL OR model = $5) \
             AND ($6::text IS NULL OR route = $6) \
             AND ($7 OR label IS NOT DISTINCT FROM $8::text) \
             ORDER BY created_at_us DESC, id DESC LIMIT $9"
        );
        self.with(|client| {
            client
                .query(
                    &sql,
                    &[
                        &filter.since_us,
                        &filter.before_us,
                        &opt_text(filter.rule.as_deref()),
                        &filter.min_severity.map(rank),
                        &opt_text(filter.model.as_deref()),
                        &opt_text(filter.route.as_deref()),
                        &label_any,
                        &label_value,
                        &i64::from(filter.limit.unwrap_or(50)),
                    ],
                )?
                .iter()
                .map(rows::flag)
                .collect()
        })
    }

    pub(super) fn get_flag(&self, id: &str) -> Result<Option<Flag>, StoreError> {
        let sql = format!(
            "SELECT {FLAG_COLUMNS} FROM flags \
             WHERE id = $1 OR exchange_id = $1 OR request_id = $1 \
             ORDER BY created_at_us DESC LIMIT 1"
        );
        self.with(|client| {
            client
                .query_opt(&sql, &[&text(id)])?
                .as_ref()
                .map(rows::flag)
                .transpose()
        })
    }

    pub(super) fn set_label(
        &self,
        id: &str,
        verdict: Review,
        note: Option<&str>,
        now_us: i64,
        allowed: &[AllowedEvidence],
    ) -> Result<(), StoreError> {
        self.with(|client| {
            let mut tx = client.transaction()?;
            tx.execute(
                "UPDATE flags SET label = $2, label_note = $3, labelled_at_us = $4 WHERE id = $1",
                &[&id, &verdict.as_str(), &opt_text(note), &now_us],
            )?;
            tx.execute(allowed::DELETE_FLAG, &[&id])?;
            for e in allowed {
                tx.execute(
                    allowed::INSERT,
                    &[
                        &text(&e.flag_id),
                        &text(&e.rule),
                        &opt_text(e.model.as_deref()),
                        &text(&e.route),
                        &text(&e.text),
                        &e.created_at_us,
                    ],
                )?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub(super) fn list_allowed(&self) -> Result<Vec<AllowedEvidence>, StoreError> {
        self.with(|client| {
            client
                .query(allowed::LIST, &[])?
                .iter()
                .map(allowed::entry)
                .collect()
        })
    }

    pub(super) fn flag_stats(&self, since_us: Option<i64>) -> Result<FlagStats, StoreError> {
        let since = since_us.unwrap_or(i64::MIN);
        let mut stats = FlagStats {
            total: self.count(
                "SELECT COUNT(*) FROM flags WHERE created_at_us >= $1",
                since,
            )?,
            true_positives: self.count(
                "SELECT COUNT(*) FROM flags WHERE created_at_us >= $1 AND label = 'true-positive'",
                since,
            )?,
            false_positives: self.count(
                "SELECT COUNT(*) FROM flags WHERE created_at_us >= $1 AND label = 'false-positive'",
                since,
            )?,
            ..FlagStats::default()
        };
        self.with(|client| {
            for row in client.query(
                "SELECT severity, COUNT(*) AS flags FROM flags WHERE created_at_us >= $1 \
                 GROUP BY severity ORDER BY MAX(severity_rank) DESC",
                &[&since],
            )? {
                let n: i64 = row.try_get("flags")?;
                stats
                    .by_severity
                    .push((row.try_get("severity")?, u64::try_from(n).unwrap_or(0)));
            }
            for row in client.query(
                "SELECT COALESCE(model, '-') AS model_or_dash, COUNT(*) AS flags FROM flags \
                 WHERE created_at_us >= $1 GROUP BY model ORDER BY COUNT(*) DESC",
                &[&since],
            )? {
                let n: i64 = row.try_get("flags")?;
                stats
                    .by_model
                    .push((row.try_get("model_or_dash")?, u64::try_from(n).unwrap_or(0)));
            }
            let rules = client
                .query(
                    "SELECT rules, label FROM flags WHERE created_at_us >= $1",
                    &[&since],
                )?
                .iter()
                .map(|r| Ok((r.try_get("rules")?, r.try_get("label")?)))
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            stats.by_rule = rows::tally_rules(rules);
            Ok(())
        })?;
        Ok(stats)
    }

    pub(super) fn count_flags(&self) -> Result<u64, StoreError> {
        self.count(
            "SELECT COUNT(*) FROM flags WHERE created_at_us >= $1",
            i64::MIN,
        )
    }

    pub(super) fn claim_alert(
        &self,
        rule: &str,
        scope: &str,
        now_us: i64,
        cooldown_us: i64,
    ) -> Result<bool, StoreError> {
        self.with(|client| {
            let claimed = client.execute(
                CLAIM_ALERT,
                &[&text(rule), &text(scope), &now_us, &cooldown_us],
            )?;
            Ok(claimed == 1)
        })
    }

    pub(super) fn write_trigger(
        &self,
        sql: &str,
        values: &TriggerValues,
    ) -> Result<usize, StoreError> {
        self.with(|client| {
            let n = client.execute(sql, &trigger_params(values))?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn list_triggers(&self) -> Result<Vec<WatchedTrigger>, StoreError> {
        self.with(|client| {
            client
                .query(triggers::LIST, &[])?
                .iter()
                .map(triggers::trigger)
                .collect()
        })
    }

    pub(super) fn scan_triggers(
        &self,
        scanner: &mut Scanner,
        model: Option<&str>,
        pattern: &str,
    ) -> Result<(), StoreError> {
        self.with(|client| {
            for row in client.query(&triggers::scan_sql(true), &[&model, &pattern])? {
                scanner.row(&row)?;
            }
            Ok(())
        })
    }

    fn count(&self, sql: &str, since: i64) -> Result<u64, StoreError> {
        self.with(|client| {
            let n: i64 = client.query_one(sql, &[&since])?.try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}
