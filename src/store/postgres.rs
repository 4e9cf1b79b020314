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
//! hold, are stored as U+FFFD. Connections are plain TCP or a Unix socket (no TLS).

use std::sync::Mutex;

use postgres::{Client, NoTls, Row};

use super::flags::{COLUMNS as FLAG_COLUMNS, Flag, FlagFilter, FlagStats, Verdict, rank, rfc3339};
use super::query::{CLAIM_ALERT, ExchangeFilter, clamp, parse_outcome, parse_route, unclamp};
use super::{PostgresUrl, Retention, StoreError, StoreItem};
use crate::capture::Exchange;
use crate::policy::Severity;

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

const EXCHANGE_COLUMNS: &str = "id, request_id, started_at_us, method, path, route, \
    api_key_hash, model, response_model, stream, status, ttfb_us, latency_us, outcome, truncated, \
    capture_incomplete, parse_error, prompt_json, choices_json, input_tokens, output_tokens";

/// PostgreSQL text cannot hold NUL; everything else is kept as is.
fn text(s: &str) -> String {
    s.replace('\0', "\u{FFFD}")
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
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
            let insert_exchange = tx.prepare(
                "INSERT INTO exchanges (id, request_id, started_at_us, method, path, route, \
                 api_key_hash, model, response_model, stream, status, ttfb_us, latency_us, \
                 outcome, truncated, capture_incomplete, parse_error, prompt_json, choices_json, \
                 output, finish_reason, input_tokens, output_tokens, annotations, flagged) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
                 $17, $18, $19, $20, $21, $22, $23, $24, $25) ON CONFLICT (id) DO NOTHING",
            )?;
            let insert_flag = tx.prepare(
                "INSERT INTO flags (id, exchange_id, request_id, created_at_us, model, route, \
                 api_key_hash, severity, severity_rank, policies_json, rules, prompt, output, \
                 evidence_json, stream, truncated) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
                 ON CONFLICT (id) DO NOTHING",
            )?;
            let mut written = 0u64;
            for item in batch {
                match item {
                    StoreItem::Exchange {
                        exchange: e,
                        annotations,
                        flagged,
                    } => {
                        let usage = e.usage.unwrap_or_default();
                        let annotations =
                            (!annotations.is_empty()).then(|| text(&annotations.join(",")));
                        written += tx.execute(
                            &insert_exchange,
                            &[
                                &e.id.to_string(),
                                &text(&e.request_id),
                                &e.started_at_us,
                                &text(&e.method),
                                &text(&e.path),
                                &e.route.as_str(),
                                &opt_text(e.api_key_hash.as_deref()),
                                &opt_text(e.model.as_deref()),
                                &opt_text(e.response_model.as_deref()),
                                &e.stream,
                                &e.status.map(i32::from),
                                &e.ttfb_us.map(clamp),
                                &clamp(e.latency_us),
                                &e.outcome.as_str(),
                                &e.truncated,
                                &e.capture_incomplete,
                                &opt_text(e.parse_error.as_deref()),
                                &text(&serde_json::to_string(&e.prompt)?),
                                &text(&serde_json::to_string(&e.choices)?),
                                &text(e.output()),
                                &opt_text(e.finish_reason()),
                                &usage.input_tokens.map(clamp),
                                &usage.output_tokens.map(clamp),
                                &annotations,
                                flagged,
                            ],
                        )?;
                    }
                    StoreItem::Flag(f) => {
                        written += tx.execute(
                            &insert_flag,
                            &[
                                &f.id.to_string(),
                                &f.exchange_id.to_string(),
                                &text(&f.request_id),
                                &f.created_at_us,
                                &opt_text(f.model.as_deref()),
                                &text(&f.route),
                                &opt_text(f.api_key_hash.as_deref()),
                                &f.severity.as_str(),
                                &rank(f.severity),
                                &text(&serde_json::to_string(&f.policies)?),
                                &text(&super::flags::rules_column(f)),
                                &text(&f.prompt),
                                &text(&f.output),
                                &text(&serde_json::to_string(&f.evidence)?),
                                &f.stream,
                                &f.truncated,
                            ],
                        )?;
                    }
                }
            }
            tx.commit()?;
            Ok(usize::try_from(written).unwrap_or(usize::MAX))
        })
    }

    pub(super) fn list_exchanges(
        &self,
        filter: &ExchangeFilter,
    ) -> Result<Vec<Exchange>, StoreError> {
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
                .map(read_exchange)
                .collect()
        })
    }

    pub(super) fn get_exchange(&self, id: &str) -> Result<Option<Exchange>, StoreError> {
        let sql = format!(
            "SELECT {EXCHANGE_COLUMNS} FROM exchanges WHERE id = $1 OR request_id = $1 \
             ORDER BY started_at_us DESC LIMIT 1"
        );
        self.with(|client| {
            client
                .query_opt(&sql, &[&text(id)])?
                .as_ref()
                .map(read_exchange)
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
                .map(|row| {
                    let prompt_json: String = row.try_get(0)?;
                    Ok((super::query::user_text(&prompt_json)?, row.try_get(1)?))
                })
                .collect()
        })
    }

    pub(super) fn apply_retention(&self, retention: &Retention) -> Result<(u64, u64), StoreError> {
        let now = super::flags::now_us();
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
            Some(v) => (false, v.map(Verdict::as_str)),
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
                .map(read_flag)
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
                .map(read_flag)
                .transpose()
        })
    }

    pub(super) fn set_label(
        &self,
        id: &str,
        verdict: Verdict,
        note: Option<&str>,
        now_us: i64,
    ) -> Result<(), StoreError> {
        self.with(|client| {
            client.execute(
                "UPDATE flags SET label = $2, label_note = $3, labelled_at_us = $4 WHERE id = $1",
                &[&id, &verdict.as_str(), &opt_text(note), &now_us],
            )?;
            Ok(())
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
                "SELECT severity, COUNT(*) FROM flags WHERE created_at_us >= $1 \
                 GROUP BY severity ORDER BY MAX(severity_rank) DESC",
                &[&since],
            )? {
                let n: i64 = row.try_get(1)?;
                stats
                    .by_severity
                    .push((row.try_get(0)?, u64::try_from(n).unwrap_or(0)));
            }
            for row in client.query(
                "SELECT COALESCE(model, '-'), COUNT(*) FROM flags WHERE created_at_us >= $1 \
                 GROUP BY model ORDER BY COUNT(*) DESC",
                &[&since],
            )? {
                let n: i64 = row.try_get(1)?;
                stats
                    .by_model
                    .push((row.try_get(0)?, u64::try_from(n).unwrap_or(0)));
            }
            let rows = client
                .query(
                    "SELECT rules, label FROM flags WHERE created_at_us >= $1",
                    &[&since],
                )?
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            stats.by_rule = super::flags::tally_rules(rows);
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

    fn count(&self, sql: &str, since: i64) -> Result<u64, StoreError> {
        self.with(|client| {
            let n: i64 = client.query_one(sql, &[&since])?.try_get(0)?;
            Ok(u64::try_from(n).unwrap_or(0))
        })
    }
}

fn read_exchange(row: &Row) -> Result<Exchange, StoreError> {
    let id: String = row.try_get(0)?;
    let route: String = row.try_get(5)?;
    let outcome: String = row.try_get(13)?;
    let status: Option<i32> = row.try_get(10)?;
    let prompt_json: String = row.try_get(17)?;
    let choices_json: String = row.try_get(18)?;
    let input_tokens: Option<i64> = row.try_get(19)?;
    let output_tokens: Option<i64> = row.try_get(20)?;
    let latency_us: i64 = row.try_get(12)?;
    Ok(Exchange {
        id: id.parse().unwrap_or_default(),
        request_id: row.try_get(1)?,
        started_at_us: row.try_get(2)?,
        method: row.try_get(3)?,
        path: row.try_get(4)?,
        route: parse_route(&route),
        api_key_hash: row.try_get(6)?,
        model: row.try_get(7)?,
        response_model: row.try_get(8)?,
        stream: row.try_get(9)?,
        status: status.and_then(|s| u16::try_from(s).ok()),
        ttfb_us: unclamp(row.try_get(11)?),
        latency_us: u64::try_from(latency_us).unwrap_or(0),
        outcome: parse_outcome(&outcome),
        truncated: row.try_get(14)?,
        capture_incomplete: row.try_get(15)?,
        parse_error: row.try_get(16)?,
        prompt: serde_json::from_str(&prompt_json)?,
        choices: serde_json::from_str(&choices_json)?,
        usage: (input_tokens.is_some() || output_tokens.is_some()).then(|| crate::capture::Usage {
            input_tokens: unclamp(input_tokens),
            output_tokens: unclamp(output_tokens),
            total_tokens: None,
        }),
    })
}

fn read_flag(row: &Row) -> Result<Flag, StoreError> {
    let id: String = row.try_get(0)?;
    let exchange_id: String = row.try_get(1)?;
    let created_at_us: i64 = row.try_get(3)?;
    let severity: String = row.try_get(7)?;
    let policies_json: String = row.try_get(8)?;
    let evidence_json: String = row.try_get(11)?;
    let label: Option<String> = row.try_get(14)?;
    let label_note: Option<String> = row.try_get(15)?;
    let labelled_at_us: Option<i64> = row.try_get(16)?;
    Ok(Flag {
        id: id.parse().unwrap_or_default(),
        exchange_id: exchange_id.parse().unwrap_or_default(),
        request_id: row.try_get(2)?,
        created_at: rfc3339(created_at_us),
        model: row.try_get(4)?,
        route: row.try_get(5)?,
        api_key_hash: row.try_get(6)?,
        severity: Severity::parse(&severity).unwrap_or(Severity::Info),
        policies: serde_json::from_str(&policies_json)?,
        prompt: row.try_get(9)?,
        output: row.try_get(10)?,
        evidence: serde_json::from_str(&evidence_json)?,
        stream: row.try_get(12)?,
        truncated: row.try_get(13)?,
        label: label
            .and_then(|l| Verdict::parse(&l))
            .map(|verdict| super::Label {
                verdict,
                note: label_note,
                labelled_at: rfc3339(labelled_at_us.unwrap_or(0)),
            }),
        created_at_us,
    })
}
