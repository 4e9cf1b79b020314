//! Structured logs to stderr, filtered by `TRIPWIRE_LOG` (or `RUST_LOG`), default `info`;
//! colours only on a terminal (and never with `NO_COLOR` set).
//!
//! Request headers are never logged: that is where API keys travel. Logging never stops the
//! gateway: a stderr whose reader went away (`make run | tee`, then Ctrl-C) loses the lines
//! and the gateway goes on serving and stops cleanly.

use std::io::{IsTerminal, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

/// Installs the global subscriber. `json` switches to one JSON object per line.
/// Calling it twice is harmless (the second call does nothing).
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_env("TRIPWIRE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(LossyStderr);
    // An error here only means a subscriber is already installed (tests, a second call).
    let _ignored = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Stderr that never reports a failed write. tracing-subscriber answers a writer error with
/// `eprintln!`, which panics when stderr itself is what failed (a closed pipe): the log line is
/// lost instead, and the gateway keeps running.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossyStderr;

impl Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // A closed or full stderr drops the line; nothing here may fail or panic.
        let _lost = std::io::stderr().lock().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _lost = std::io::stderr().lock().flush();
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LossyStderr {
    type Writer = LossyStderr;

    fn make_writer(&'a self) -> Self::Writer {
        LossyStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_is_swallowed() {
        let mut writer = LossyStderr.make_writer();
        assert_eq!(writer.write(b"tripwire test line\n").unwrap(), 19);
        writer.flush().unwrap();
    }
}
