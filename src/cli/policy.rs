//! `tripwire policy check FILE...`: validates policy files with the same code `serve` runs,
//! without starting anything.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Subcommand;

use super::output::emit;

/// `tripwire policy …`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate policy files (or directories of them); errors name file:line:col.
    Check {
        /// Policy files or directories. With none, checks the built-in default policy.
        paths: Vec<PathBuf>,
    },
    /// Print the built-in default policy.
    Default,
}

/// Runs the subcommand.
pub fn run(command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Default => emit(crate::policy::DEFAULT_POLICY),
        PolicyCommand::Check { paths } => {
            let mut report = String::new();
            let mut failed = Vec::new();
            if paths.is_empty() {
                let policy = crate::policy::default_policy()?;
                let _ok = writeln!(
                    report,
                    "ok  {} ({} detectors, {} rules)",
                    policy.source,
                    policy.detectors.len(),
                    policy.rules.len()
                );
            }
            for path in &paths {
                match crate::policy::load_path(path) {
                    Ok(policies) => {
                        for policy in policies {
                            let _ok = writeln!(
                                report,
                                "ok  {} ({} detectors, {} rules)",
                                policy.source,
                                policy.detectors.len(),
                                policy.rules.len()
                            );
                        }
                    }
                    Err(err) => failed.push(err.to_string()),
                }
            }
            emit(&report)?;
            if failed.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{}", failed.join("\n"))
            }
        }
    }
}
