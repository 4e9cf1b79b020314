//! The `tripwire` binary: parses the command line and hands over to [`tripwire::cli`].

fn main() {}
