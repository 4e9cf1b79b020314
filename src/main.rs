//! The `tripwire` binary: parses the command line and hands over to [`tripwire::cli`].

use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of the system allocator: the proxy allocates and frees many small buffers
/// per request, and glibc's malloc took over a tenth of the gateway's CPU under load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = tripwire::cli::Cli::parse();
    tripwire::cli::run(cli)
}
