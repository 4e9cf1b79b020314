//! Structured logs to stderr, filtered by `TRIPWIRE_LOG` (or `RUST_LOG`), default `info`.
//!
//! Request headers are never logged: that is where API keys travel.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `json` switches to one JSON object per line.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("TRIPWIRE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // An error here only means a subscriber is already installed (tests, a second call).
    let _ignored = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
