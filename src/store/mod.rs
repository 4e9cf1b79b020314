//! The store: captured exchanges (and, with the detectors, the flags raised on them) in
//! SQLite, written by one batch writer off the request path.
//!
//! SQLite runs in WAL mode with `synchronous=NORMAL`: a committed batch survives a crash of the
//! process; a power cut may lose the last batches. Every call here blocks, so async code calls
//! it from a blocking thread.

mod flags;
mod migrations;
mod query;
mod writer;

use std::path::{Path, PathBuf};

use rusqlite::Connection;

pub use flags::{Flag, FlagFilter, FlagStats, Label, Verdict, rfc3339};
pub use query::{ExchangeFilter, ExchangeRow};
pub use writer::{WriterConfig, run_writer};

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
    /// A query or write failed.
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    /// A stored JSON column could not be read back.
    #[error("store: corrupt JSON column: {0}")]
    Json(#[from] serde_json::Error),
    /// The database was written by a newer tripwire.
    #[error(
        "store {path} has schema version {found}, newer than this tripwire knows ({known}); upgrade tripwire"
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
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
            StoreError::Open { .. } | StoreError::Directory { .. } => "open",
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull =>
            {
                "disk_full"
            }
            StoreError::Sql(_) => "sql",
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

/// An open store.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
}

impl Store {
    /// Opens (creating when missing) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
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
        Ok(Store { conn })
    }

    /// Opens an existing database for reading (CLI). Fails when the file does not exist.
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
}
