//! Alert policies: YAML files that declare detectors and the rules that turn what the
//! detectors report into flags, alerts and annotations.
//!
//! `compile` parses and checks a file (the same code runs for `tripwire policy check` and for
//! `serve`); [`judge`] runs the detectors of every policy on an exchange and judges its rules,
//! in one place for the monitor path, enforce decisions and drift alarms.

pub mod allow;
pub mod calibrate;
mod compile;
mod file;
pub mod judge;
mod locate;
pub use locate::{yaml_error_parts, yaml_error_parts_in};

use std::path::PathBuf;

pub use compile::{
    CompiledPolicy, CompiledRule, DEFAULT_POLICY, compile_text, default_policy, load_file,
    load_path, policy_files,
};
pub use file::{
    Action, AlertsConfig, BlockResponse, EnforceConfig, FailMode, LogAlertConfig, Mode, PolicyFile,
    RuleConfig, ScopeSelector, Severity, WebhookConfig, WebhookFormat,
};
pub use judge::{Decision, EnforcePlan, Enforced, Engine, FiredRule, Verdict};

/// Why a policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file or directory could not be read.
    #[error("cannot read policy {path}: {source}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A directory without policy files.
    #[error("{path}: no *.yaml policy files in this directory")]
    Empty {
        /// The directory.
        path: PathBuf,
    },
    /// Something in a file is wrong, at a place.
    #[error("{source_name}:{line}:{column}: {message}")]
    At {
        /// The file (or `<built-in …>`).
        source_name: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong, naming the field.
        message: String,
    },
}

impl PolicyError {
    fn at(source: &str, line: usize, column: usize, message: String) -> PolicyError {
        PolicyError::At {
            source_name: source.to_owned(),
            line: line.max(1),
            column: column.max(1),
            message,
        }
    }
}

/// Replaces `${NAME}` with the environment variable `NAME` (empty when unset).
pub fn expand_env(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(rest.get(..start).unwrap_or(""));
        let after = rest.get(start + 2..).unwrap_or("");
        match after.find('}') {
            Some(end) => {
                let name = after.get(..end).unwrap_or("");
                out.push_str(&std::env::var(name).unwrap_or_default());
                rest = after.get(end + 1..).unwrap_or("");
            }
            None => {
                out.push_str(rest.get(start..).unwrap_or(""));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests;
