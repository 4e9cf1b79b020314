//! Writing to stdout from the CLI: a closed pipe (`tripwire exchanges list | head`) ends the
//! command quietly instead of panicking.

use std::io::Write;
use std::path::PathBuf;

use crate::store::{PostgresUrl, Store, StoreLocation};

/// The store a read-only command opens.
#[derive(Debug, clap::Args)]
pub struct StoreArg {
    /// SQLite file the gateway writes (its --store).
    #[arg(long, env = "TRIPWIRE_STORE", default_value = "tripwire.db")]
    pub store: PathBuf,
    /// PostgreSQL store the gateways write (postgres://user:password@host:port/db); takes
    /// precedence over --store.
    #[arg(long, env = "TRIPWIRE_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
}

impl StoreArg {
    /// The store named on the command line. A bad URL's error never repeats it (it holds a
    /// password).
    pub fn location(&self) -> anyhow::Result<StoreLocation> {
        match self.store_url.as_deref().filter(|u| !u.trim().is_empty()) {
            Some(url) => Ok(StoreLocation::Postgres(
                PostgresUrl::parse(url).map_err(|e| anyhow::anyhow!("--store-url: {e}"))?,
            )),
            None => Ok(StoreLocation::Sqlite(self.store.clone())),
        }
    }

    /// Opens it for reading.
    pub fn open(&self) -> anyhow::Result<Store> {
        Ok(Store::connect_existing(&self.location()?)?)
    }
}

/// Writes `text` to stdout.
pub fn emit(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Whether the error is a closed stdout pipe.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Shortens `text` to `max` characters, ending in `…` when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut clipped: String = text.chars().take(max.saturating_sub(1)).collect();
    clipped.push('…');
    clipped
}
