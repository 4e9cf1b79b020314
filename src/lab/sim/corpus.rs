//! Corpus loading and lookup for the simulated model.
//!
//! A corpus is a JSONL file (optionally gzip-compressed, detected by its magic bytes) whose
//! lines hold at least `{"instruction": …, "output": …}`; other fields are ignored. The
//! simulated model answers a prompt that matches an instruction with that instruction's output,
//! so tests and demos can replay real model outputs (see `data/README.md`).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::Deserialize;

use super::SimError;

/// One corpus line: an instruction and the output a model gave for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct CorpusEntry {
    /// The user instruction (prompt).
    pub instruction: String,
    /// The model's answer to the instruction.
    pub output: String,
}

/// Reads a `.jsonl` or `.jsonl.gz` corpus. Blank lines are skipped; line numbers in errors are
/// 1-based. A file without any entry is an error.
pub fn load_corpus(path: &Path) -> Result<Vec<CorpusEntry>, SimError> {
    let corpus_err = |line: usize, message: String| SimError::Corpus {
        path: path.to_path_buf(),
        line,
        message,
    };
    let file = File::open(path).map_err(|e| corpus_err(0, format!("cannot open: {e}")))?;
    let mut raw = BufReader::new(file);
    let is_gzip = raw
        .fill_buf()
        .map_err(|e| corpus_err(0, format!("cannot read: {e}")))?
        .starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn BufRead> = if is_gzip {
        Box::new(BufReader::new(MultiGzDecoder::new(raw)))
    } else {
        Box::new(raw)
    };

    let mut entries = Vec::new();
    let mut buf = String::new();
    let mut line_no = 0usize;
    loop {
        buf.clear();
        line_no += 1;
        let read = reader
            .read_line(&mut buf)
            .map_err(|e| corpus_err(line_no, format!("cannot read line: {e}")))?;
        if read == 0 {
            break;
        }
        let line = buf.trim();
        if line.is_empty() {
            continue;
        }
        let entry: CorpusEntry = serde_json::from_str(line).map_err(|e| {
            corpus_err(
                line_no,
                format!(
                    "expected a JSON object with string fields `instruction` and `output`: {e}"
                ),
            )
        })?;
        entries.push(entry);
    }
    if entries.is_empty() {
        return Err(corpus_err(0, "the corpus has no entries".to_owned()));
    }
    Ok(entries)
}

/// Lowercases and collapses whitespace runs to one space (and trims).
pub(crate) fn normalise(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        for c in word.chars() {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// A loaded corpus with instruction indexes. The first entry wins on duplicate instructions.
#[derive(Debug)]
pub(crate) struct Corpus {
    entries: Vec<CorpusEntry>,
    exact: HashMap<Box<str>, usize>,
    normalised: HashMap<String, usize>,
}

impl Corpus {
    pub(crate) fn load(path: &Path) -> Result<Corpus, SimError> {
        Ok(Corpus::from_entries(load_corpus(path)?))
    }

    pub(crate) fn from_entries(entries: Vec<CorpusEntry>) -> Corpus {
        let mut exact = HashMap::with_capacity(entries.len());
        let mut normalised = HashMap::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            exact.entry(entry.instruction.trim().into()).or_insert(i);
            normalised.entry(normalise(&entry.instruction)).or_insert(i);
        }
        Corpus {
            entries,
            exact,
            normalised,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn entries(&self) -> &[CorpusEntry] {
        &self.entries
    }

    /// The output of the instruction matching `prompt` exactly (after trimming) or after
    /// normalisation.
    pub(crate) fn lookup(&self, prompt: &str) -> Option<&str> {
        let trimmed = prompt.trim();
        let index = match self.exact.get(trimmed) {
            Some(i) => *i,
            None => *self.normalised.get(&normalise(trimmed))?,
        };
        self.entries.get(index).map(|e| e.output.as_str())
    }

    /// The output at `index % len`, for generic answers.
    pub(crate) fn output_at(&self, index: u64) -> &str {
        let len = self.entries.len().max(1) as u64;
        self.entries
            .get((index % len) as usize)
            .map_or("", |e| e.output.as_str())
    }
}

/// Reads a whole file (used for tokenizer.json).
pub(crate) fn read_file(path: &Path) -> Result<Vec<u8>, (PathBuf, std::io::Error)> {
    let mut buf = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| (path.to_path_buf(), e))?;
    Ok(buf)
}
