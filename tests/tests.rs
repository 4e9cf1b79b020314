//! The integration tests: one binary, real sockets, a real gateway.

mod proxy;
mod util;
