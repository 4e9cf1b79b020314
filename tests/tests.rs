//! The integration tests: one binary, real sockets, a real gateway.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly"
)]

mod audit;
mod cli;
mod clients;
mod console;
mod deploy;
mod drift;
mod enforce;
mod faults;
mod flags;
mod layout;
mod otel;
mod overload;
mod proxy;
mod reload;
mod shutdown;
mod sim;
mod soak;
mod store;
mod util;
