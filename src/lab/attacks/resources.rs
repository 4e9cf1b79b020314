//! What the generators draw from, loaded once: a real tokenizer vocabulary (the embedding
//! model's WordPiece vocabulary in `models/`), two word-piece vocabularies (the simulated
//! model's built-in one and one built from the train split), and real text in 22 languages
//! (the Universal Declaration of Human Rights, `models/udhr/`, fetched by `make models`).

use std::path::{Path, PathBuf};

use super::AttackError;
use crate::lab::devset::{TRAIN_MODELS, corpus_pieces_vocab, model_file};
use crate::lab::lm_training::read_jsonl;
use crate::lab::sim::PoisonVocab;

/// The tokenizer whose vocabulary the `vocab-tokens` gibberish draws from.
pub const TOKENIZER_FILE: &str = "all-MiniLM-L6-v2-tokenizer.json";
/// The directory of the language texts under `models/`.
pub const LANGUAGES_DIR: &str = "udhr";

/// Real text in one language.
#[derive(Debug, Clone)]
pub struct Language {
    /// The file's code (`fra`, `cmn_hans`, …).
    pub code: String,
    /// Its paragraphs, in order.
    pub paragraphs: Vec<String>,
}

/// Everything the generators draw from.
#[derive(Debug)]
pub struct Resources {
    /// WordPiece tokens as written in the vocabulary (`##` marks a continuation), without
    /// special and unused tokens.
    pub wordpiece: Vec<String>,
    /// The simulated model's built-in pieces (several scripts, byte pieces).
    pub builtin_pieces: Vec<String>,
    /// Word pieces of the train split's outputs (Latin only).
    pub corpus_pieces: Vec<String>,
    /// Real text per language.
    pub languages: Vec<Language>,
}

impl Resources {
    /// Loads from `models_dir` (`models/`) and `data_dir` (`data/`).
    pub fn load(models_dir: &Path, data_dir: &Path) -> Result<Resources, AttackError> {
        let wordpiece = wordpiece_vocab(&models_dir.join(TOKENIZER_FILE))?;
        let mut train = Vec::new();
        for model in TRAIN_MODELS {
            let path = model_file(data_dir, model);
            let lines = read_jsonl(&path).map_err(|e| AttackError::Data {
                path: path.clone(),
                message: e.to_string(),
            })?;
            train.extend(lines.into_iter().map(|(_, output)| output));
        }
        let corpus = corpus_pieces_vocab(train.iter().map(String::as_str));
        let builtin = PoisonVocab::builtin();
        let languages = languages(&models_dir.join(LANGUAGES_DIR))?;
        Ok(Resources {
            wordpiece,
            builtin_pieces: builtin.tokens().map(str::to_owned).collect(),
            corpus_pieces: corpus.tokens().map(str::to_owned).collect(),
            languages,
        })
    }
}

fn missing(path: &Path, what: &str) -> AttackError {
    AttackError::Data {
        path: path.to_path_buf(),
        message: format!("{what}; run `make models` to fetch the pinned artifacts"),
    }
}

/// The `model.vocab` keys of a WordPiece `tokenizer.json`, special tokens left out.
fn wordpiece_vocab(path: &Path) -> Result<Vec<String>, AttackError> {
    let raw = std::fs::read(path).map_err(|e| missing(path, &format!("cannot read: {e}")))?;
    let json: serde_json::Value = serde_json::from_slice(&raw).map_err(|e| AttackError::Data {
        path: path.to_path_buf(),
        message: format!("invalid JSON: {e}"),
    })?;
    let vocab = json
        .get("model")
        .and_then(|m| m.get("vocab"))
        .and_then(serde_json::Value::as_object)
        .ok_or_else(|| AttackError::Data {
            path: path.to_path_buf(),
            message: "no `model.vocab` object (a WordPiece tokenizer is expected)".to_owned(),
        })?;
    let mut tokens: Vec<(u64, String)> = vocab
        .iter()
        .filter(|(token, _)| !(token.starts_with('[') && token.ends_with(']')))
        .map(|(token, id)| (id.as_u64().unwrap_or(u64::MAX), token.clone()))
        .collect();
    tokens.sort();
    if tokens.len() < 1000 {
        return Err(AttackError::Data {
            path: path.to_path_buf(),
            message: format!("only {} tokens in `model.vocab`", tokens.len()),
        });
    }
    Ok(tokens.into_iter().map(|(_, t)| t).collect())
}

/// The paragraphs of every `*.html` declaration in `dir`, ordered by file name.
fn languages(dir: &Path) -> Result<Vec<Language>, AttackError> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| missing(dir, &format!("cannot list the language texts: {e}")))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "html"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).map_err(|e| AttackError::Data {
            path: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let paragraphs = paragraphs(&text);
        if paragraphs.len() < 10 {
            return Err(AttackError::Data {
                path: file,
                message: format!("only {} paragraphs", paragraphs.len()),
            });
        }
        let code = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(Language { code, paragraphs });
    }
    if out.is_empty() {
        return Err(missing(dir, "no language texts (*.html)"));
    }
    Ok(out)
}

/// The text of every `<p>` element, tags removed and the common entities decoded.
fn paragraphs(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some((_, after)) = rest.split_once("<p>") {
        let Some((inner, next)) = after.split_once("</p>") else {
            break;
        };
        let text = decode(&strip_tags(inner));
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        if text.chars().count() >= 20 {
            out.push(text);
        }
        rest = next;
    }
    out
}

fn strip_tags(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_tag = false;
    for c in s.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

fn decode(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#x27;", "'")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_are_the_text_of_p_elements() {
        let html = "<h1>T</h1><p>Considérant que la <em>dignité</em> &amp; les droits</p>\n<p>short</p><p>Tous les êtres humains naissent libres</p>";
        assert_eq!(
            paragraphs(html),
            vec![
                "Considérant que la dignité & les droits".to_owned(),
                "Tous les êtres humains naissent libres".to_owned()
            ]
        );
    }
}
