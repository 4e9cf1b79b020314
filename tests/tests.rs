//! The integration tests: one binary, real sockets, a real gateway.

mod cli;
mod clients;
mod proxy;
mod util;
