//! The `tripwire` binary: parses the command line and hands over to [`tripwire::cli`].

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tripwire::cli::Cli::parse();
    tripwire::cli::run(cli)
}
