//! Schema versions, applied in order: SQLite records its version in `PRAGMA user_version`,
//! PostgreSQL in the table `tripwire_schema`, migrated under an advisory lock so replicas
//! starting together apply each version once.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// Each entry brings the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: captured exchanges.
    "CREATE TABLE exchanges (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        started_at_us INTEGER NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        route TEXT NOT NULL,
        api_key_hash TEXT,
        model TEXT,
        response_model TEXT,
        stream INTEGER NOT NULL,
        status INTEGER,
        ttfb_us INTEGER,
        latency_us INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        truncated INTEGER NOT NULL,
        capture_incomplete INTEGER NOT NULL,
        parse_error TEXT,
        prompt_json TEXT NOT NULL,
        choices_json TEXT NOT NULL,
        output TEXT NOT NULL,
        finish_reason TEXT,
        input_tokens INTEGER,
        output_tokens INTEGER
    );
    CREATE INDEX exchanges_started ON exchanges (started_at_us);
    CREATE INDEX exchanges_request_id ON exchanges (request_id);
    CREATE INDEX exchanges_scope ON exchanges (model, route, started_at_us);",
    // 2: the flag log, and rule annotations on exchanges.
    "CREATE TABLE flags (
        id TEXT PRIMARY KEY,
        exchange_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at_us INTEGER NOT NULL,
        model TEXT,
        route TEXT NOT NULL,
        api_key_hash TEXT,
        severity TEXT NOT NULL,
        severity_rank INTEGER NOT NULL,
        policies_json TEXT NOT NULL,
        rules TEXT NOT NULL,
        prompt TEXT NOT NULL,
        output TEXT NOT NULL,
        evidence_json TEXT NOT NULL,
        stream INTEGER NOT NULL,
        truncated INTEGER NOT NULL,
        label TEXT,
        label_note TEXT,
        labelled_at_us INTEGER
    );
    CREATE INDEX flags_created ON flags (created_at_us);
    CREATE INDEX flags_severity ON flags (severity_rank, created_at_us);
    CREATE INDEX flags_request_id ON flags (request_id);
    ALTER TABLE exchanges ADD COLUMN annotations TEXT;
    ALTER TABLE exchanges ADD COLUMN flagged INTEGER NOT NULL DEFAULT 0;",
    // 3: the last alert sent per rule and scope (cooldown de-duplication).
    "CREATE TABLE alert_claims (
        rule TEXT NOT NULL,
        scope TEXT NOT NULL,
        last_sent_us INTEGER NOT NULL,
        PRIMARY KEY (rule, scope)
    );",
    // 4: the counts of `flag_stats` (console, `flags stats`) read this index alone instead of
    // the wide rows with their prompts and outputs.
    "CREATE INDEX flags_stats ON flags (created_at_us, severity, severity_rank, model, label, rules);",
    // 5: watched triggers (discovered or added by a person; rejected ones stay, never promoted
    // again).
    "CREATE TABLE triggers (
        scope TEXT NOT NULL,
        ngram TEXT NOT NULL,
        model TEXT,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        flagged_with INTEGER NOT NULL,
        unflagged_with INTEGER NOT NULL,
        q_value REAL,
        examples_json TEXT NOT NULL,
        note TEXT,
        created_at_us INTEGER NOT NULL,
        updated_at_us INTEGER NOT NULL,
        PRIMARY KEY (scope, ngram)
    );",
    // 6: the evidence of flags labelled false positive, allowed for their rule and scope (the
    // rule does not fire on it there again).
    "CREATE TABLE allowed_evidence (
        flag_id TEXT NOT NULL,
        rule TEXT NOT NULL,
        model TEXT,
        route TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at_us INTEGER NOT NULL,
        PRIMARY KEY (flag_id, rule, text)
    );",
];

/// Applies every migration the database has not seen, each in its own transaction.
pub fn migrate(conn: &Connection, path: &Path) -> Result<(), StoreError> {
    let known = i64::try_from(MIGRATIONS.len()).unwrap_or(i64::MAX);
    let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if version > known {
        return Err(StoreError::TooNew {
            store: path.display().to_string(),
            found: version,
            known,
        });
    }
    for (index, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        let tx = conn.unchecked_transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(index + 1).unwrap_or(i64::MAX),
        )?;
        tx.commit()?;
    }
    Ok(())
}

/// PostgreSQL: each entry brings the schema from version `index` to `index + 1`. The tables
/// and columns of SQLite's latest version, with native booleans and 64-bit integers.
const POSTGRES: &[&str] = &[
    // 1: exchanges, flags, alert claims.
    "CREATE TABLE exchanges (
        id TEXT PRIMARY KEY,
        request_id TEXT NOT NULL,
        started_at_us BIGINT NOT NULL,
        method TEXT NOT NULL,
        path TEXT NOT NULL,
        route TEXT NOT NULL,
        api_key_hash TEXT,
        model TEXT,
        response_model TEXT,
        stream BOOLEAN NOT NULL,
        status INTEGER,
        ttfb_us BIGINT,
        latency_us BIGINT NOT NULL,
        outcome TEXT NOT NULL,
        truncated BOOLEAN NOT NULL,
        capture_incomplete BOOLEAN NOT NULL,
        parse_error TEXT,
        prompt_json TEXT NOT NULL,
        choices_json TEXT NOT NULL,
        output TEXT NOT NULL,
        finish_reason TEXT,
        input_tokens BIGINT,
        output_tokens BIGINT,
        annotations TEXT,
        flagged BOOLEAN NOT NULL DEFAULT FALSE
    );
    CREATE INDEX exchanges_started ON exchanges (started_at_us);
    CREATE INDEX exchanges_request_id ON exchanges (request_id);
    CREATE INDEX exchanges_scope ON exchanges (model, route, started_at_us);
    CREATE TABLE flags (
        id TEXT PRIMARY KEY,
        exchange_id TEXT NOT NULL,
        request_id TEXT NOT NULL,
        created_at_us BIGINT NOT NULL,
        model TEXT,
        route TEXT NOT NULL,
        api_key_hash TEXT,
        severity TEXT NOT NULL,
        severity_rank BIGINT NOT NULL,
        policies_json TEXT NOT NULL,
        rules TEXT NOT NULL,
        prompt TEXT NOT NULL,
        output TEXT NOT NULL,
        evidence_json TEXT NOT NULL,
        stream BOOLEAN NOT NULL,
        truncated BOOLEAN NOT NULL,
        label TEXT,
        label_note TEXT,
        labelled_at_us BIGINT
    );
    CREATE INDEX flags_created ON flags (created_at_us);
    CREATE INDEX flags_severity ON flags (severity_rank, created_at_us);
    CREATE INDEX flags_request_id ON flags (request_id);
    CREATE INDEX flags_exchange_id ON flags (exchange_id);
    CREATE TABLE alert_claims (
        rule TEXT NOT NULL,
        scope TEXT NOT NULL,
        last_sent_us BIGINT NOT NULL,
        PRIMARY KEY (rule, scope)
    );",
    // 2: watched triggers.
    "CREATE TABLE triggers (
        scope TEXT NOT NULL,
        ngram TEXT NOT NULL,
        model TEXT,
        state TEXT NOT NULL,
        source TEXT NOT NULL,
        flagged_with BIGINT NOT NULL,
        unflagged_with BIGINT NOT NULL,
        q_value DOUBLE PRECISION,
        examples_json TEXT NOT NULL,
        note TEXT,
        created_at_us BIGINT NOT NULL,
        updated_at_us BIGINT NOT NULL,
        PRIMARY KEY (scope, ngram)
    );",
    // 3: allowed evidence (from flags labelled false positive).
    "CREATE TABLE allowed_evidence (
        flag_id TEXT NOT NULL,
        rule TEXT NOT NULL,
        model TEXT,
        route TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at_us BIGINT NOT NULL,
        PRIMARY KEY (flag_id, rule, text)
    );",
];

/// The advisory lock replicas take while migrating ("tripwire" in ASCII).
const MIGRATION_LOCK: i64 = 0x7472_6970_7769_7265;

/// Applies every PostgreSQL migration the database has not seen, in one transaction under an
/// advisory lock: a replica that starts while another migrates waits, then finds nothing to do.
pub fn migrate_postgres(client: &mut postgres::Client, store: &str) -> Result<(), StoreError> {
    let known = i64::try_from(POSTGRES.len()).unwrap_or(i64::MAX);
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS tripwire_schema (version BIGINT NOT NULL)")?;
    let version: i64 = tx
        .query_one("SELECT COALESCE(MAX(version), 0) FROM tripwire_schema", &[])?
        .try_get(0)?;
    if version > known {
        return Err(StoreError::TooNew {
            store: store.to_owned(),
            found: version,
            known,
        });
    }
    for (index, sql) in POSTGRES
        .iter()
        .enumerate()
        .skip(usize::try_from(version).unwrap_or(0))
    {
        tx.batch_execute(sql)?;
        tx.execute(
            "INSERT INTO tripwire_schema (version) VALUES ($1)",
            &[&i64::try_from(index + 1).unwrap_or(i64::MAX)],
        )?;
    }
    tx.commit()?;
    Ok(())
}
