//! The store: captured exchanges and the flags raised on them, written by one batch writer off
//! the request path, read by the CLI, the admin API and trigger attribution; the alert claims
//! through which several replicas send one alert per rule, scope and cooldown; watched
//! triggers; and the evidence that false-positive labels allow (`allowed`).
//!
//! Two backends behind one API, [`Store`]. SQLite (`sqlite/`, the default, one gateway) runs
//! in WAL mode with `synchronous=NORMAL`: a committed batch survives a crash of the process; a
//! power cut may lose the last batches. PostgreSQL (`postgres`, `store.url`) lets several
//! replicas write one log. Both read and write rows through one mapping per table (`rows`);
//! each keeps only its SQL dialect. Every call here blocks, so async code calls it from a
//! blocking thread.

mod allowed;
mod location;
mod migrations;
mod postgres;
mod rows;
mod sqlite;
mod triggers;
mod writer;

use std::path::{Path, PathBuf};

use serde::Serialize;

pub use allowed::{AllowedEvidence, allow_list};
pub use location::{PostgresUrl, StoreLocation, UrlError};
pub use rows::{ExchangeRow, Flag, Label, Review, now_us, rfc3339};
pub use triggers::{RetroScan, ScanHit, TriggerSource, TriggerState, WatchedTrigger};
pub use writer::{WriterConfig, run_writer};

use crate::policy::Severity;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or created.
    #[error("cannot open store {path}: {source}")]
    Open {
        /// The database file.
        path: PathBuf,
        /// The SQLite error.
        source: rusqlite::Error,
    },
    /// Its directory could not be created.
    #[error("cannot create directory for store {path}: {source}")]
    Directory {
        /// The database file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The PostgreSQL server could not be reached or refused the connection.
    #[error("cannot connect to store {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The client error.
        source: ::postgres::Error,
    },
    /// The store URL is not usable.
    #[error("store URL: {0}")]
    Url(#[from] UrlError),
    /// A query or write failed.
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A PostgreSQL query or write failed.
    #[error("store: {0}")]
    Postgres(#[from] ::postgres::Error),
    /// A stored JSON column could not be read back.
    #[error("store: corrupt JSON column: {0}")]
    Json(#[from] serde_json::Error),
    /// The database was written by a newer tripwire.
    #[error(
        "store {store} has schema version {found}, newer than this tripwire knows ({known}); upgrade tripwire"
    )]
    TooNew {
        /// The database (file, or URL with the password redacted).
        store: String,
        /// Its schema version.
        found: i64,
        /// The newest this build knows.
        known: i64,
    },
    /// A blocking task failed to complete.
    #[error("store task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// A low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            StoreError::Open { .. }
            | StoreError::Directory { .. }
            | StoreError::Connect { .. }
            | StoreError::Url(_) => "open",
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                "disk_full"
            }
            StoreError::Sql(_) | StoreError::Postgres(_) => "sql",
            StoreError::Json(_) => "json",
            StoreError::TooNew { .. } => "schema",
            StoreError::Task(_) => "task",
        }
    }
}

/// What the writer writes: a captured exchange (with the rules that annotated it), or a flag.
#[derive(Debug, Clone)]
pub enum StoreItem {
    /// A captured exchange.
    Exchange {
        /// The exchange.
        exchange: Box<crate::capture::Exchange>,
        /// Rules with the `annotate` action that fired on it.
        annotations: Vec<String>,
        /// Whether a flag was raised on it.
        flagged: bool,
    },
    /// A flag.
    Flag(Box<Flag>),
    /// A discovered trigger (kept unless a person already decided about it).
    Trigger(Box<WatchedTrigger>),
}

/// How long rows are kept, and how large the database may grow.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Exchanges older than this are deleted.
    pub exchange_max_age: std::time::Duration,
    /// Flags older than this are deleted.
    pub flag_max_age: std::time::Duration,
    /// Size limit in bytes (0: none).
    pub max_bytes: u64,
    /// How often to apply it.
    pub interval: std::time::Duration,
}

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

/// Which flags to list, newest first.
#[derive(Debug, Clone, Default)]
pub struct FlagFilter {
    /// Only flags created at or after this time (µs since the epoch).
    pub since_us: Option<i64>,
    /// Only flags created before this time (µs since the epoch); for paging.
    pub before_us: Option<i64>,
    /// Only flags where this rule fired.
    pub rule: Option<String>,
    /// Only flags of at least this severity.
    pub min_severity: Option<Severity>,
    /// Only this model.
    pub model: Option<String>,
    /// Only this route.
    pub route: Option<String>,
    /// `Some(None)`: unlabelled only; `Some(Some(v))`: with that verdict.
    pub label: Option<Option<Review>>,
    /// At most this many (default 50).
    pub limit: Option<u32>,
}

/// Counts over the flag log.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FlagStats {
    /// All flags.
    pub total: u64,
    /// Per rule: (rule, flags, true positives, false positives).
    pub by_rule: Vec<(String, u64, u64, u64)>,
    /// Per severity.
    pub by_severity: Vec<(String, u64)>,
    /// Per model.
    pub by_model: Vec<(String, u64)>,
    /// Labelled true positive.
    pub true_positives: u64,
    /// Labelled false positive.
    pub false_positives: u64,
}

impl FlagStats {
    /// Share of labelled flags that are false positives, when any are labelled.
    pub fn false_positive_share(&self) -> Option<f64> {
        let labelled = self.true_positives + self.false_positives;
        (labelled > 0).then(|| self.false_positives as f64 / labelled as f64)
    }
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<postgres::Postgres>),
}

/// Calls the same method on whichever backend the store has.
macro_rules! dispatch {
    ($store:expr, $backend:ident => $call:expr) => {
        match $store {
            Backend::Sqlite($backend) => $call,
            Backend::Postgres($backend) => $call,
        }
    };
}

impl Store {
    /// Opens (creating when missing) the SQLite database at `path` and brings its schema up to
    /// date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(sqlite::Sqlite::open(path)?),
        })
    }

    /// Opens an existing SQLite database for reading (CLI). Fails when the file does not exist.
    pub fn open_existing(path: &Path) -> Result<Store, StoreError> {
        if !path.exists() {
            return Err(StoreError::Open {
                path: path.to_owned(),
                source: rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                    Some("no such file; start the gateway first or pass --store".to_owned()),
                ),
            });
        }
        Store::open(path)
    }

    /// Opens the store at `location` (a SQLite file is created when missing; a PostgreSQL
    /// database must exist) and brings its schema up to date.
    pub fn connect(location: &StoreLocation) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Store::open(path),
            StoreLocation::Postgres(url) => Ok(Store {
                backend: Backend::Postgres(Box::new(postgres::Postgres::connect(url)?)),
            }),
        }
    }

    /// Like [`Store::connect`], but a SQLite file must already exist (CLI).
    pub fn connect_existing(location: &StoreLocation) -> Result<Store, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Store::open_existing(path),
            StoreLocation::Postgres(_) => Store::connect(location),
        }
    }

    /// Caps the database at `bytes` (SQLite's `max_page_count`; 0: no cap): past it, writes
    /// fail with `disk_full` as on a full disk. PostgreSQL has no such cap (a no-op).
    pub fn cap_size(&self, bytes: u64) -> Result<(), StoreError> {
        if bytes == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Sqlite(sqlite) => sqlite.cap_size(bytes),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Whether `max_bytes` retention applies (SQLite only; PostgreSQL deletes by age).
    pub fn enforces_size_limit(&self) -> bool {
        matches!(self.backend, Backend::Sqlite(_))
    }

    /// Writes a batch (exchanges and flags) in one transaction. A row already stored (same
    /// id) is left as is.
    pub fn insert_batch(&mut self, batch: &[StoreItem]) -> Result<usize, StoreError> {
        dispatch!(&mut self.backend, b => b.insert_batch(batch))
    }

    /// Writes exchanges alone (no annotations, not flagged).
    pub fn insert_exchanges(
        &mut self,
        batch: &[crate::capture::Exchange],
    ) -> Result<usize, StoreError> {
        let items: Vec<StoreItem> = batch
            .iter()
            .map(|e| StoreItem::Exchange {
                exchange: Box::new(e.clone()),
                annotations: Vec::new(),
                flagged: false,
            })
            .collect();
        self.insert_batch(&items)
    }

    /// Lists exchanges, newest first.
    pub fn list_exchanges(&self, filter: &ExchangeFilter) -> Result<Vec<ExchangeRow>, StoreError> {
        dispatch!(&self.backend, b => b.list_exchanges(filter))
    }

    /// One exchange by its id or its request id.
    pub fn get_exchange(&self, id: &str) -> Result<Option<ExchangeRow>, StoreError> {
        dispatch!(&self.backend, b => b.get_exchange(id))
    }

    /// The prompts of the newest `limit` captured exchanges (optionally of one model and
    /// route), each with whether it was flagged: the input of trigger attribution.
    pub fn prompts_with_flags(
        &self,
        model: Option<&str>,
        route: Option<&str>,
        limit: u32,
    ) -> Result<Vec<(String, bool)>, StoreError> {
        dispatch!(&self.backend, b => b.prompts_with_flags(model, route, limit))
    }

    /// Deletes rows past their age, then (SQLite) the oldest rows while the database is over
    /// `max_bytes` (0: no size limit). Returns (exchanges, flags) deleted.
    pub fn apply_retention(&self, retention: &Retention) -> Result<(u64, u64), StoreError> {
        dispatch!(&self.backend, b => b.apply_retention(retention))
    }

    /// Number of stored exchanges.
    pub fn count_exchanges(&self) -> Result<u64, StoreError> {
        dispatch!(&self.backend, b => b.count_exchanges())
    }

    /// Lists flags, newest first.
    pub fn list_flags(&self, filter: &FlagFilter) -> Result<Vec<Flag>, StoreError> {
        dispatch!(&self.backend, b => b.list_flags(filter))
    }

    /// One flag by its id, its exchange's id, or its request id.
    pub fn get_flag(&self, id: &str) -> Result<Option<Flag>, StoreError> {
        dispatch!(&self.backend, b => b.get_flag(id))
    }

    /// Labels a flag; returns the updated flag, or `None` when there is no such flag. In the
    /// same transaction, the flag's allowed evidence follows the label: a false positive
    /// allows the evidence of each of its rules in its scope (model × route; see
    /// `policy::allow`), a true positive allows nothing (entries from an earlier false-positive
    /// label of this flag are deleted).
    pub fn label_flag(
        &self,
        id: &str,
        verdict: Review,
        note: Option<&str>,
    ) -> Result<Option<Flag>, StoreError> {
        let Some(flag) = self.get_flag(id)? else {
            return Ok(None);
        };
        let flag_id = flag.id.to_string();
        let now = rows::now_us();
        let allowed = match verdict {
            Review::FalsePositive => allowed::from_flag(&flag, now),
            Review::TruePositive => Vec::new(),
        };
        dispatch!(&self.backend, b => b.set_label(&flag_id, verdict, note, now, &allowed))?;
        self.get_flag(&flag_id)
    }

    /// Every allowed evidence entry (from flags labelled false positive), oldest first.
    pub fn list_allowed(&self) -> Result<Vec<AllowedEvidence>, StoreError> {
        dispatch!(&self.backend, b => b.list_allowed())
    }

    /// Counts by rule, severity and model, and the labels.
    pub fn flag_stats(&self, since_us: Option<i64>) -> Result<FlagStats, StoreError> {
        dispatch!(&self.backend, b => b.flag_stats(since_us))
    }

    /// Number of stored flags.
    pub fn count_flags(&self) -> Result<u64, StoreError> {
        dispatch!(&self.backend, b => b.count_flags())
    }

    /// Every trigger ever watched, rejected or removed, oldest first.
    pub fn list_triggers(&self) -> Result<Vec<WatchedTrigger>, StoreError> {
        dispatch!(&self.backend, b => b.list_triggers())
    }

    /// One trigger by n-gram (normalised as prompts are) and model (`None`: every model).
    pub fn get_trigger(
        &self,
        ngram: &str,
        model: Option<&str>,
    ) -> Result<Option<WatchedTrigger>, StoreError> {
        let Some(watch) = crate::detect::discovered_trigger::Watch::new(ngram, None) else {
            return Ok(None);
        };
        Ok(self
            .list_triggers()?
            .into_iter()
            .find(|t| t.ngram == watch.ngram && t.model.as_deref() == model))
    }

    /// Records a person's decision about an n-gram: watch it (`Watched`, added when missing),
    /// stop watching it (`Removed`; `None` when it is not on the list), or reject it for good
    /// (`Rejected`, added when missing, so a candidate can be rejected before it is promoted).
    /// Returns the row as it now stands; `None` also for an n-gram without words.
    pub fn decide_trigger(
        &self,
        ngram: &str,
        model: Option<&str>,
        state: TriggerState,
        note: Option<&str>,
    ) -> Result<Option<WatchedTrigger>, StoreError> {
        let Some(watch) = crate::detect::discovered_trigger::Watch::new(ngram, None) else {
            return Ok(None);
        };
        if state == TriggerState::Removed && self.get_trigger(&watch.ngram, model)?.is_none() {
            return Ok(None);
        }
        let now = rows::now_us();
        let trigger = WatchedTrigger {
            ngram: watch.ngram,
            model: model.map(str::to_owned),
            state,
            source: TriggerSource::Manual,
            flagged_with: 0,
            unflagged_with: 0,
            q_value: None,
            examples: Vec::new(),
            note: note.map(str::to_owned),
            created_at_us: now,
            updated_at_us: now,
        };
        let values = triggers::values(&trigger)?;
        dispatch!(&self.backend, b => b.write_trigger(triggers::UPSERT_STATE, &values))?;
        self.get_trigger(&trigger.ngram, model)
    }

    /// Every stored exchange (of `model`, or all) whose prompt carries `ngram`: how many, when
    /// first and last, which callers and models, and the newest `limit` of them.
    pub fn retro_scan(
        &self,
        ngram: &str,
        model: Option<&str>,
        limit: usize,
    ) -> Result<RetroScan, StoreError> {
        let mut scanner = triggers::Scanner::new(ngram, model, limit);
        dispatch!(&self.backend, b => b.scan_triggers(&mut scanner, model, &triggers::like_pattern(ngram)))?;
        Ok(scanner.finish())
    }

    /// Claims the right to send the alert of `rule` for `scope` at `now_us` (µs since the
    /// epoch): true, and the claim recorded, when no alert for them was claimed within the
    /// last `cooldown_us`; false when one was (by this process or another replica). Atomic:
    /// of replicas claiming at once, exactly one gets true.
    pub fn claim_alert(
        &self,
        rule: &str,
        scope: &str,
        now_us: i64,
        cooldown_us: i64,
    ) -> Result<bool, StoreError> {
        dispatch!(&self.backend, b => b.claim_alert(rule, scope, now_us, cooldown_us))
    }
}
