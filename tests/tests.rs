//! The integration tests: one binary, real sockets, a real gateway.

#![expect(
    clippy::unwrap_used,
    clippy::panic,
    reason = "test helpers fail loudly"
)]

// One module per room of the library (app, proxy, detect, store, admin, telemetry, lab), then
// what crosses them: the command line, deployment files, the dependency audit, the layout
// rule and the soak.
mod admin;
mod app;
mod detect;
mod lab;
mod proxy;
mod store;
mod telemetry;

mod audit;
mod cli;
mod deploy;
mod layout;
mod soak;
mod util;
