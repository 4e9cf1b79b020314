//! The integration tests: one binary, real sockets, a real gateway.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly"
)]

mod cli;
mod clients;
mod drift;
mod flags;
mod proxy;
mod sim;
mod store;
mod util;
