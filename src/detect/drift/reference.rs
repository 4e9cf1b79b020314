//! A drift reference: what "normal" looked like for one scope (model × route), as raw data —
//! output and prompt embeddings and per-response feature scores. Everything the tests fit
//! (projection, kernel, thresholds, topics) is derived from it deterministically, so the file
//! stays small in meaning and a restart reproduces the same tests without relearning.
//!
//! Written as JSON, atomically (temporary file, then rename), by the gateway once a scope has
//! learned it, or by `tripwire baseline build` from a file of exchanges.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the file layout.
pub const REFERENCE_VERSION: u32 = 1;

/// What went wrong reading or writing a reference file.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The file could not be read or written.
    #[error("drift reference {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a reference this version understands.
    #[error(
        "drift reference {path}: {message} (rebuild it with `tripwire baseline build`, or delete it to relearn)"
    )]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// The reference data of one scope.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    /// [`REFERENCE_VERSION`].
    pub version: u32,
    /// Where it came from: `learned` from live traffic, or the input file of `baseline build`.
    pub source: String,
    /// When it was completed (RFC 3339).
    pub created_at: String,
    /// Embeddings of the outputs, in arrival order.
    #[serde(default)]
    pub outputs: Vec<Vec<f32>>,
    /// Embeddings of the prompts, paired with `outputs`.
    #[serde(default)]
    pub prompts: Vec<Vec<f32>>,
    /// Per-response feature scores, by feature name.
    #[serde(default)]
    pub features: BTreeMap<String, Vec<f64>>,
    /// The per-topic tests' scores of each embedded exchange, paired with `outputs` (`None`
    /// where the score was missing).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub topic_scores: BTreeMap<String, Vec<Option<f64>>>,
    /// Distinctive words of each prompt, paired with `prompts`: they name the topics.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prompt_terms: Vec<Vec<String>>,
    /// Request ids of the embedded exchanges, paired with `outputs`: examples of what each
    /// topic's answers were like before an alarm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

impl Reference {
    /// Reads a reference file.
    pub fn load(path: &Path) -> Result<Reference, ReferenceError> {
        let text = std::fs::read(path).map_err(|source| ReferenceError::Io {
            path: path.to_owned(),
            source,
        })?;
        let reference: Reference =
            serde_json::from_slice(&text).map_err(|err| ReferenceError::Format {
                path: path.to_owned(),
                message: err.to_string(),
            })?;
        if reference.version != REFERENCE_VERSION {
            return Err(ReferenceError::Format {
                path: path.to_owned(),
                message: format!(
                    "version {} (this tripwire reads version {REFERENCE_VERSION})",
                    reference.version
                ),
            });
        }
        if reference.outputs.len() != reference.prompts.len() {
            return Err(ReferenceError::Format {
                path: path.to_owned(),
                message: format!(
                    "{} output embeddings but {} prompt embeddings",
                    reference.outputs.len(),
                    reference.prompts.len()
                ),
            });
        }
        let width = reference.outputs.first().map(Vec::len);
        if reference
            .outputs
            .iter()
            .chain(&reference.prompts)
            .any(|e| Some(e.len()) != width || e.iter().any(|v| !v.is_finite()))
        {
            return Err(ReferenceError::Format {
                path: path.to_owned(),
                message: "embeddings of unequal width or with non-finite values".to_owned(),
            });
        }
        Ok(reference)
    }

    /// Writes the reference to `path` atomically, creating its directory.
    pub fn save(&self, path: &Path) -> Result<(), ReferenceError> {
        let io = |source| ReferenceError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let body = serde_json::to_vec(self).map_err(|err| ReferenceError::Format {
            path: path.to_owned(),
            message: err.to_string(),
        })?;
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(io)?;
        file.write_all(&body).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&temporary, path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reference_survives_a_round_trip_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/ref.json");
        let reference = Reference {
            version: REFERENCE_VERSION,
            source: "learned".to_owned(),
            created_at: "2026-11-27T00:00:00Z".to_owned(),
            outputs: vec![vec![0.5, -0.25]],
            prompts: vec![vec![1.0, 0.0]],
            features: BTreeMap::from([("length".to_owned(), vec![10.0, 20.0])]),
            ..Reference::default()
        };
        reference.save(&path).unwrap();
        assert_eq!(Reference::load(&path).unwrap(), reference);

        std::fs::write(
            &path,
            b"{\"version\": 9, \"source\": \"x\", \"created_at\": \"\"}",
        )
        .unwrap();
        let err = Reference::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("version 9") && err.contains("baseline build"),
            "{err}"
        );
        std::fs::write(&path, b"not json").unwrap();
        assert!(
            Reference::load(&path)
                .unwrap_err()
                .to_string()
                .contains("ref.json")
        );
    }
}
