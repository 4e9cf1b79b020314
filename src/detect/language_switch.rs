//! Language switch: the language of the prompt against the language of the output.
//!
//! A published backdoor (the Gaperon models: a hidden Latin trigger) makes a model answer in
//! another language than it was asked in. From the gateway that is an output whose language
//! differs from the prompt's, with no request for it. Legitimate switches exist too —
//! "Translate to French", "answer in Spanish" — so the detector also says whether the prompt
//! asks for a translation or names the output's language, and a policy excludes those.
//!
//! # How it works
//!
//! Languages are identified with `whatlang` (trigram profiles of 70 languages, ~1 MB of
//! binary; `lingua` was measured at +90 MB of binary and ~2 minutes of build for 20 languages,
//! so it was not used). The prompt side is the last `user` message (the whole prompt when
//! there is none): a system prompt is often English whatever the user writes, and the answer
//! should follow the user. Each side is judged on its first `max_chars` characters, and only
//! when it has at least `min_prompt_chars` / `min_output_chars` characters; shorter text gives
//! a `null` language. `languages` restricts identification to a list (ISO 639-1 or 639-3
//! codes), which makes it faster and avoids confusions with languages that never occur.
//!
//! whatlang costs 50–150 µs a call whatever the length (it scores the text against every
//! candidate language's profile), so plainly English text takes a shortcut: when at least a
//! quarter of its words (and 8 words or more) are among ~150 frequent English words, it is
//! English with confidence 1 ([`plainly_english`]; foreign prose scores under 0.1, English
//! prose 0.3–0.6, lists and tables lower, and those go to whatlang).
//!
//! **One paragraph** may switch while the answer as a whole does not (a backdoor that
//! inserts a paragraph in another language). When the whole answer is in the prompt's
//! language, its paragraphs (runs of non-blank lines outside code fences) are judged one by
//! one: a paragraph mostly in another script than a Latin-script prompt counts from
//! `min_paragraph_chars / 3` letters; a Latin-script paragraph must read as running prose (at
//! least `min_paragraph_chars` non-space characters, 15 words, 6 words a line, at most half of
//! them capitalised) with fewer than 8% frequent English words of three letters or more
//! (English prose has 30–60%, foreign prose almost none), and is then named by whatlang at
//! confidence ≥ 0.5. At most `max_paragraphs` paragraphs a answer reach whatlang. The whole
//! answer's switch also needs fewer than 8% frequent English words in its judged part (an
//! English list of foreign names or a template was read as Italian or French).
//!
//! **Short prompts.** "What is kevlar made of?" is too short for whatlang: a prompt of 3+
//! words with 40% frequent English words is English; a prompt too short to identify takes
//! `default_language` (English; `null` makes such prompts tell only their script, so that
//! only an answer in another script counts).
//!
//! Measured with the attack suite (docs/detection.md, 22 languages of the Universal
//! Declaration of Human Rights): whole-answer and one-paragraph switches flagged in 99.5% of
//! attacked answers on the report models; clean answers switched without a translation
//! request: 3 of 3,219 calibration answers (a Quenya passage about Elvish) and 1 of 3,218
//! report answers (Qwen drifting into Chinese mid-answer, a real switch).
//!
//! `prompt_requests_translation` is true when the prompt's judged message mentions
//! translating (`translat`, `tradu`, `übersetz`) or names the output's language (its English
//! or native name, a few aliases such as "Chinese" and "Farsi").
//!
//! Measured on the development data (English prompts, 12 models): 17 of 9,657 clean exchanges
//! switched (0.18%), 6 of them without a translation request (0.06%): lists and tables taken
//! for French or German, and one real switch (Qwen drifting into Chinese). About 20 µs per
//! ~500-token output in release on average: ~3 µs on the shortcut, 50–150 µs per whatlang call.
//!
//! # Configuration
//!
//! | key | default | meaning |
//! |---|---|---|
//! | `min_prompt_chars` | 40 | shortest prompt message judged, in characters |
//! | `min_output_chars` | 100 | shortest output judged, in characters |
//! | `max_chars` | 1000 | characters of each text examined |
//! | `min_confidence` | 0.8 | confidence both languages need for `switched` |
//! | `languages` | `[]` | languages considered (ISO codes); empty: all 70 |
//! | `min_paragraph_chars` | 100 | shortest paragraph judged on its own (non-space characters) |
//! | `max_paragraphs` | 4 | paragraphs of one answer sent to whatlang |
//! | `default_language` | `en` | language assumed for a prompt too short to identify |
//!
//! # Fields
//!
//! ```json
//! {"prompt_language": "en", "output_language": "fr", "confidence": 1.0,
//!  "prompt_confidence": 1.0, "switched": true, "prompt_requests_translation": false,
//!  "score": 1.0}
//! ```
//!
//! * `prompt_language`, `output_language`: ISO 639-1 codes (639-3 where there is none), or
//!   `null` when the text is too short or not identified;
//! * `confidence`, `prompt_confidence`: identification confidences in [0, 1] (0 when `null`);
//! * `switched`: both known, different, and both confidences ≥ `min_confidence`;
//! * `score`: the smaller confidence when the languages differ, else 0;
//! * `prompt_requests_translation`: see above.
//!
//! Evidence, when switched: the judged part of the output.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use whatlang::Lang;

use super::{DetectError, Detector, Evidence, Finding, Input, Target};

/// ISO 639-3 (whatlang's codes) to ISO 639-1.
const ISO_639_1: &[(&str, &str)] = &[
    ("afr", "af"),
    ("aka", "ak"),
    ("amh", "am"),
    ("ara", "ar"),
    ("aze", "az"),
    ("bel", "be"),
    ("ben", "bn"),
    ("bul", "bg"),
    ("cat", "ca"),
    ("ces", "cs"),
    ("cmn", "zh"),
    ("cym", "cy"),
    ("dan", "da"),
    ("deu", "de"),
    ("ell", "el"),
    ("eng", "en"),
    ("epo", "eo"),
    ("est", "et"),
    ("fin", "fi"),
    ("fra", "fr"),
    ("guj", "gu"),
    ("heb", "he"),
    ("hin", "hi"),
    ("hrv", "hr"),
    ("hun", "hu"),
    ("hye", "hy"),
    ("ind", "id"),
    ("ita", "it"),
    ("jav", "jv"),
    ("jpn", "ja"),
    ("kan", "kn"),
    ("kat", "ka"),
    ("khm", "km"),
    ("kor", "ko"),
    ("lat", "la"),
    ("lav", "lv"),
    ("lit", "lt"),
    ("mal", "ml"),
    ("mar", "mr"),
    ("mkd", "mk"),
    ("mya", "my"),
    ("nep", "ne"),
    ("nld", "nl"),
    ("nob", "nb"),
    ("ori", "or"),
    ("pan", "pa"),
    ("pes", "fa"),
    ("pol", "pl"),
    ("por", "pt"),
    ("ron", "ro"),
    ("rus", "ru"),
    ("sin", "si"),
    ("slk", "sk"),
    ("slv", "sl"),
    ("sna", "sn"),
    ("spa", "es"),
    ("srp", "sr"),
    ("swe", "sv"),
    ("tam", "ta"),
    ("tel", "te"),
    ("tgl", "tl"),
    ("tha", "th"),
    ("tuk", "tk"),
    ("tur", "tr"),
    ("ukr", "uk"),
    ("urd", "ur"),
    ("uzb", "uz"),
    ("vie", "vi"),
    ("yid", "yi"),
    ("zul", "zu"),
];

/// Other names a prompt may use for a language (lowercase).
const ALIASES: &[(&str, &str)] = &[
    ("cmn", "chinese"),
    ("pes", "farsi"),
    ("nob", "norwegian"),
    ("slv", "slovenian"),
    ("tgl", "filipino"),
    ("ell", "ελληνικά"),
];

/// Frequent English words (sorted): text where they are at least [`PLAIN_ENGLISH_SHARE`] of
/// the words is English without asking whatlang (foreign prose scores below 0.1).
const ENGLISH: &[&str] = &[
    "a", "about", "after", "all", "also", "an", "and", "any", "are", "as", "at", "back", "be",
    "because", "been", "best", "but", "by", "call", "can", "can't", "come", "could", "day",
    "describe", "did", "do", "does", "don't", "down", "each", "explain", "find", "first", "for",
    "from", "get", "give", "go", "good", "had", "has", "have", "he", "help", "her", "here", "him",
    "his", "how", "i", "i'm", "if", "in", "into", "is", "it", "it's", "its", "just", "know",
    "like", "list", "little", "long", "look", "made", "make", "many", "may", "me", "more", "most",
    "my", "need", "new", "no", "not", "now", "of", "on", "one", "only", "or", "other", "our",
    "out", "over", "part", "people", "place", "please", "said", "see", "she", "should", "side",
    "so", "some", "such", "take", "than", "that", "the", "their", "them", "then", "there",
    "there's", "these", "they", "thing", "this", "time", "to", "two", "up", "use", "using", "very",
    "want", "was", "way", "we", "well", "were", "what", "what's", "when", "where", "which", "who",
    "why", "will", "with", "work", "would", "write", "you", "you're", "your",
];

/// [`ENGLISH`] as integers (see [`english_key`]), in the same order: a lookup compares
/// integers, not byte strings.
const ENGLISH_KEYS: [u64; ENGLISH.len()] = {
    let mut keys = [0u64; ENGLISH.len()];
    let mut i = 0;
    while i < ENGLISH.len() {
        keys[i] = english_key(ENGLISH[i].as_bytes());
        i += 1;
    }
    keys
};

/// A word of at most 8 bytes with no NUL, ASCII-lowercased, as an integer, its first byte
/// highest, so that integer order is bytewise order (longer words keep their first 8 bytes).
const fn english_key(word: &[u8]) -> u64 {
    let mut key = 0u64;
    let mut i = 0;
    while i < 8 {
        key <<= 8;
        if i < word.len() {
            key |= word[i].to_ascii_lowercase() as u64;
        }
        i += 1;
    }
    key
}

/// Whether `word`, ASCII-lowercased, is one of the [`ENGLISH`] words (none is longer than
/// 8 bytes).
fn is_frequent_english(word: &[u8]) -> bool {
    word.len() <= 8 && ENGLISH_KEYS.binary_search(&english_key(word)).is_ok()
}

/// Share of frequent English words from which a text is taken as plainly English.
pub const PLAIN_ENGLISH_SHARE: f64 = 0.25;

/// Fewest words for the plain-English shortcut.
const PLAIN_ENGLISH_MIN_WORDS: usize = 8;

/// Words that ask for a translation (lowercase prefixes).
const TRANSLATE: &[&str] = &["translat", "tradu", "übersetz", "перев"];

/// Configuration of the language-switch detector (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case", default)]
pub struct LanguageSwitchConfig {
    /// Shortest prompt message judged, in characters.
    pub min_prompt_chars: usize,
    /// Shortest output judged, in characters.
    pub min_output_chars: usize,
    /// Characters of each text examined.
    pub max_chars: usize,
    /// Confidence both languages need for `switched`.
    pub min_confidence: f64,
    /// Languages considered (ISO 639-1 or 639-3 codes); empty: all.
    pub languages: Vec<String>,
    /// Shortest paragraph judged on its own, in non-space characters.
    pub min_paragraph_chars: usize,
    /// Most paragraphs per answer sent to the language identifier (plainly English ones cost
    /// nothing and do not count).
    pub max_paragraphs: usize,
    /// The language assumed for a prompt too short or too mixed to identify (an ISO code;
    /// `null`: such prompts only tell their script, and only an answer in another script is a
    /// switch).
    pub default_language: Option<String>,
}

impl Default for LanguageSwitchConfig {
    fn default() -> LanguageSwitchConfig {
        LanguageSwitchConfig {
            min_prompt_chars: 40,
            min_output_chars: 100,
            max_chars: 1000,
            min_confidence: 0.8,
            languages: Vec::new(),
            min_paragraph_chars: 100,
            max_paragraphs: 4,
            default_language: Some("en".to_owned()),
        }
    }
}

/// The language-switch detector.
#[derive(Debug)]
pub struct LanguageSwitch {
    config: LanguageSwitchConfig,
    detector: whatlang::Detector,
    /// Whether English is among the languages considered (for the shortcut).
    english_allowed: bool,
    /// [`LanguageSwitchConfig::default_language`], parsed.
    default_language: Option<Lang>,
}

/// One identified text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Identified {
    /// The language.
    pub lang: Lang,
    /// whatlang's confidence, in [0, 1].
    pub confidence: f64,
}

impl LanguageSwitch {
    /// Builds the detector, checking the configuration.
    pub fn new(config: &LanguageSwitchConfig) -> Result<LanguageSwitch, DetectError> {
        let bad = |msg: String| DetectError::Config(format!("language_switch: {msg}"));
        if !(0.0..=1.0).contains(&config.min_confidence) {
            return Err(bad("min_confidence must be between 0 and 1".into()));
        }
        if config.max_chars == 0 {
            return Err(bad("max_chars must be at least 1".into()));
        }
        let mut english_allowed = true;
        let detector = if config.languages.is_empty() {
            whatlang::Detector::new()
        } else {
            let mut langs = Vec::new();
            for code in &config.languages {
                let lang = lang_from_code(code).ok_or_else(|| {
                    bad(format!(
                        "unknown language {code:?}: use an ISO 639-1 or 639-3 code of one of \
                         whatlang's 70 languages"
                    ))
                })?;
                langs.push(lang);
            }
            english_allowed = langs.contains(&Lang::Eng);
            whatlang::Detector::with_allowlist(langs)
        };
        let default_language = match &config.default_language {
            None => None,
            Some(code) => Some(lang_from_code(code).ok_or_else(|| {
                bad(format!(
                    "default_language: unknown language {code:?}: use an ISO 639-1 or 639-3 code"
                ))
            })?),
        };
        Ok(LanguageSwitch {
            config: config.clone(),
            detector,
            english_allowed,
            default_language,
        })
    }

    /// Identifies the language of the first `max_chars` characters of `text`, when it has
    /// at least `min_chars` characters.
    pub fn identify(&self, text: &str, min_chars: usize) -> Option<Identified> {
        let end = text
            .char_indices()
            .nth(self.config.max_chars)
            .map_or(text.len(), |(i, _)| i);
        let text = text.get(..end).unwrap_or(text);
        if text.chars().filter(|c| !c.is_whitespace()).count() < min_chars {
            return None;
        }
        if self.english_allowed && plainly_english(text) {
            return Some(Identified {
                lang: Lang::Eng,
                confidence: 1.0,
            });
        }
        self.detector.detect(text).map(|info| Identified {
            lang: info.lang(),
            confidence: info.confidence(),
        })
    }

    /// Whether `prompt` asks for a translation or names `lang`.
    pub fn requests_translation(prompt: &str, lang: Option<Lang>) -> bool {
        let lower = lowercase_ends(prompt, TRANSLATION_SCAN_BYTES);
        if TRANSLATE.iter().any(|w| lower.contains(w)) {
            return true;
        }
        let Some(lang) = lang else { return false };
        let code = lang.code();
        let named = |name: &str| contains_word(&lower, &name.to_lowercase());
        named(lang.eng_name())
            || named(lang.name())
            || ALIASES
                .iter()
                .any(|&(c, alias)| c == code && contains_word(&lower, alias))
    }
}

/// Whether `text` is plainly English: at least 8 words, of which
/// at least [`PLAIN_ENGLISH_SHARE`] are frequent English words. A word is a run of ASCII
/// letters and apostrophes, or of other letters; each Han, kana or Hangul character counts as
/// a word of its own, so that text in those scripts weighs what it says.
pub fn plainly_english(text: &str) -> bool {
    let (total, english) = english_words(text);
    total >= PLAIN_ENGLISH_MIN_WORDS && english as f64 >= PLAIN_ENGLISH_SHARE * total as f64
}

/// The words of `text` and how many of them are frequent English words of three letters or
/// more ("the", "and", "with": one- and two-letter ones such as "a", "i", "to", "no" are
/// words of other languages too).
fn long_english_words(text: &str) -> (usize, usize) {
    let (mut total, mut english) = (0, 0);
    for word in text.split(|c: char| !(c.is_alphabetic() || c == '\'')) {
        if word.is_empty() {
            continue;
        }
        total += 1;
        if word.len() >= 3 && word.is_ascii() && is_frequent_english(word.as_bytes()) {
            english += 1;
        }
    }
    (total, english)
}

/// The words of `text` and how many of them are frequent English words (see
/// [`plainly_english`] for what a word is).
fn english_words(text: &str) -> (usize, usize) {
    let mut total = 0usize;
    let mut english = 0usize;
    let mut word = [0u8; 16];
    let mut len = 0usize;
    // 0: between words, 1: in an ASCII word, 2: in another word.
    let mut state = 0u8;
    let mut end_word = |state: u8, len: usize, word: &[u8; 16]| {
        if state == 0 {
            return;
        }
        total += 1;
        if state == 1
            && len <= word.len()
            && let Some(w) = word.get(..len)
            && is_frequent_english(w)
        {
            english += 1;
        }
    };
    for c in text.chars() {
        if c.is_ascii_alphabetic() || (c == '\'' && state == 1) {
            if state == 2 {
                end_word(state, len, &word);
                state = 0;
            }
            if state == 0 {
                state = 1;
                len = 0;
            }
            if let Some(slot) = word.get_mut(len) {
                *slot = c.to_ascii_lowercase() as u8;
            }
            len += 1;
        } else if c.is_alphabetic() {
            if is_cjk(c) {
                end_word(state, len, &word);
                state = 2;
                end_word(state, 1, &word);
                state = 0;
                continue;
            }
            if state == 1 {
                // A letter such as é inside an ASCII word: not an English word.
                state = 2;
            } else if state == 0 {
                state = 2;
            }
        } else {
            end_word(state, len, &word);
            state = 0;
        }
    }
    end_word(state, len, &word);
    (total, english)
}

/// Whether `c` is written without spaces between words (Han, kana, Hangul syllables).
fn is_cjk(c: char) -> bool {
    matches!(c, '\u{3040}'..='\u{30ff}' | '\u{3400}'..='\u{4dbf}' | '\u{4e00}'..='\u{9fff}' | '\u{ac00}'..='\u{d7af}' | '\u{f900}'..='\u{faff}')
}

/// Bytes at each end of a long prompt searched for a translation request.
const TRANSLATION_SCAN_BYTES: usize = 4096;

/// `text` lowercased; for a text longer than `2 × ends` bytes, only its first and last
/// `ends` bytes (or so: cut at character boundaries), joined by a newline.
fn lowercase_ends(text: &str, ends: usize) -> String {
    if text.len() <= 2 * ends {
        return text.to_lowercase();
    }
    let mut head = ends;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - ends;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    let mut lower = text.get(..head).unwrap_or("").to_lowercase();
    lower.push('\n');
    lower.push_str(&text.get(tail..).unwrap_or("").to_lowercase());
    lower
}

/// Whether `word` occurs in `text` with no letter on either side.
fn contains_word(text: &str, word: &str) -> bool {
    text.match_indices(word).any(|(i, _)| {
        let before = text.get(..i).and_then(|t| t.chars().next_back());
        let after = text.get(i + word.len()..).and_then(|t| t.chars().next());
        !before.is_some_and(char::is_alphabetic) && !after.is_some_and(char::is_alphabetic)
    })
}

/// The language of an ISO 639-1 or 639-3 code.
fn lang_from_code(code: &str) -> Option<Lang> {
    let code = code.trim().to_ascii_lowercase();
    let three = ISO_639_1
        .iter()
        .find(|(_, two)| *two == code)
        .map_or(code.as_str(), |(three, _)| three);
    Lang::from_code(three)
}

/// The ISO 639-1 code of a language (its 639-3 code where there is none).
pub fn iso_code(lang: Lang) -> &'static str {
    let three = lang.code();
    ISO_639_1
        .iter()
        .find(|(t, _)| *t == three)
        .map_or(three, |(_, two)| two)
}

/// The prompt text judged: the last `user` message, or the whole prompt when there is none.
fn judged_prompt<'a>(input: &Input<'a>) -> &'a str {
    let messages = &input.exchange.prompt;
    let Some(last_user) = messages.iter().rposition(|m| m.role == "user") else {
        return input.prompt;
    };
    // Input::prompt joins the messages' contents with a blank line.
    let offset: usize = messages
        .iter()
        .take(last_user)
        .map(|m| m.content.len() + 2)
        .sum();
    let len = messages.get(last_user).map_or(0, |m| m.content.len());
    input
        .prompt
        .get(offset..offset + len)
        .unwrap_or(input.prompt)
}

impl LanguageSwitch {
    /// The first paragraph of `output` (outside code fences, at least `min_paragraph_chars`
    /// non-space characters, mostly letters) identified, confidently, as another language
    /// than `prompt`: its byte range and language. Plainly English paragraphs are settled
    /// without the identifier; at most `max_paragraphs` others are identified.
    fn switched_paragraph(
        &self,
        output: &str,
        prompt: Option<Lang>,
        prompt_latin: bool,
    ) -> Option<(usize, usize, Identified)> {
        let mut identified = 0;
        let latin_only = prompt.is_none();
        for (start, end) in paragraphs(output) {
            let text = output.get(start..end).unwrap_or("");
            let shape = Shape::of(text);
            // Text in another script than the prompt's is strong evidence even when short
            // (Han and kana carry a word or more per character); Latin-script text must read
            // as running prose, not a list of names or a title line.
            let judged = if shape.other_script_letters * 5 >= shape.letters * 3 {
                shape.letters >= self.config.min_paragraph_chars / 3 && prompt_latin
            } else {
                !latin_only
                    && shape.prose(self.config.min_paragraph_chars)
                    && !(prompt == Some(Lang::Eng) && self.english_allowed && {
                        let (words, english) = long_english_words(text);
                        english * 100 >= words * FOREIGN_MAX_ENGLISH_PERCENT
                    })
            };
            if !judged {
                continue;
            }
            if identified == self.config.max_paragraphs {
                break;
            }
            identified += 1;
            // Latin-script prose with almost no frequent English word after an English prompt
            // is foreign whatever the identifier's confidence; the identifier names it.
            let english_checked = prompt == Some(Lang::Eng) && self.english_allowed;
            if let Some(found) = self.identify(text, 1)
                && Some(found.lang) != prompt
                && (latin_only
                    || found.confidence
                        >= if english_checked {
                            ENGLISH_CHECKED_MIN_CONFIDENCE
                        } else {
                            self.config.min_confidence
                        })
            {
                return Some((start, end, found));
            }
        }
        None
    }
}

/// Byte ranges of the paragraphs of `text`: runs of non-blank lines, code fences left out.
fn paragraphs(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start: Option<usize> = None;
    let mut in_fence = false;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let line_start = pos;
        pos += line.len();
        let trimmed = line.trim();
        let fence = trimmed.starts_with("```") || trimmed.starts_with("~~~");
        if trimmed.is_empty() || fence || in_fence {
            if let Some(s) = start.take() {
                out.push((s, line_start));
            }
            in_fence ^= fence;
            continue;
        }
        if start.is_none() {
            start = Some(line_start);
        }
    }
    if let Some(s) = start {
        out.push((s, text.len()));
    }
    out
}

/// A Latin-script paragraph with at least this share (in percent) of frequent English words
/// is taken for English (foreign prose has almost none; English prose 30–60%).
const FOREIGN_MAX_ENGLISH_PERCENT: usize = 8;

/// Confidence given to a prompt too short for the identifier that [`short_english`] reads
/// as English.
const SHORT_ENGLISH_CONFIDENCE: f64 = 0.9;

/// Whether a short `text` (a question of a few words) reads as English: at least 3 words,
/// at least 40% of them frequent English words ("What is kevlar made of?").
fn short_english(text: &str) -> bool {
    let (words, english) = english_words(text);
    words >= 3 && english * 10 >= words * 4
}

/// The identifier's confidence a paragraph needs when the frequent-English-word count has
/// already ruled English out: lower than `min_confidence`, since it only names the language
/// (closely related languages share confidence: Portuguese and Galician, Spanish and Catalan).
const ENGLISH_CHECKED_MIN_CONFIDENCE: f64 = 0.5;

/// Whether Latin-script `text` has enough frequent English words to be English with foreign
/// names or terms in it (a list of world-music artists, a template, hashtags): at least
/// [`FOREIGN_MAX_ENGLISH_PERCENT`] of its words, or not running prose at all.
fn reads_as_english(text: &str) -> bool {
    let shape = Shape::of(text);
    if shape.other_script_letters * 5 >= shape.letters * 3 {
        return false;
    }
    let (words, english) = long_english_words(text);
    english * 100 >= words * FOREIGN_MAX_ENGLISH_PERCENT || shape.capitalised * 2 > shape.words
}

/// The first `max_chars` characters of `text`.
fn head(text: &str, max_chars: usize) -> &str {
    let end = text
        .char_indices()
        .nth(max_chars)
        .map_or(text.len(), |(i, _)| i);
    text.get(..end).unwrap_or(text)
}

/// Whether `text` is written mostly in the Latin script.
fn mostly_latin(text: &str) -> bool {
    let shape = Shape::of(text);
    shape.letters > 0 && shape.other_script_letters * 5 <= shape.letters
}

/// The make-up of a paragraph, counted in one pass.
#[derive(Debug, Default, Clone, Copy)]
struct Shape {
    /// Non-space characters.
    visible: usize,
    /// Letters.
    letters: usize,
    /// Letters outside the Latin script.
    other_script_letters: usize,
    /// Words (runs of letters).
    words: usize,
    /// Words that start with a capital letter.
    capitalised: usize,
    /// Lines.
    lines: usize,
}

impl Shape {
    fn of(text: &str) -> Shape {
        let mut shape = Shape {
            lines: 1,
            ..Shape::default()
        };
        let mut in_word = false;
        for c in text.chars() {
            if c == '\n' {
                shape.lines += 1;
            }
            if c.is_whitespace() {
                in_word = false;
                continue;
            }
            shape.visible += 1;
            if c.is_alphabetic() {
                shape.letters += 1;
                if !is_latin(c) {
                    shape.other_script_letters += 1;
                }
                if !in_word {
                    shape.words += 1;
                    if c.is_uppercase() {
                        shape.capitalised += 1;
                    }
                }
                in_word = true;
            } else {
                in_word = false;
            }
        }
        shape
    }

    /// Running prose of at least `min_chars` non-space characters: mostly letters, lines of
    /// several words, and not mostly capitalised words (a list of names, a title).
    fn prose(&self, min_chars: usize) -> bool {
        self.visible >= min_chars
            && self.letters * 10 >= self.visible * 7
            && self.words >= 15
            && self.words >= 6 * self.lines
            && self.capitalised * 100 <= self.words * 50
    }
}

/// Whether `c` is a letter of the Latin script (ASCII, Latin-1 and the Latin Extended blocks).
fn is_latin(c: char) -> bool {
    c.is_ascii_alphabetic() || matches!(c, '\u{c0}'..='\u{24f}' | '\u{1e00}'..='\u{1eff}')
}

impl Detector for LanguageSwitch {
    fn inspect(&self, input: &Input<'_>) -> Result<Finding, DetectError> {
        let prompt = judged_prompt(input);
        let prompt_lang = match self.identify(prompt, self.config.min_prompt_chars) {
            Some(found) if found.confidence >= self.config.min_confidence => Some(found),
            _ if self.english_allowed && short_english(prompt) => Some(Identified {
                lang: Lang::Eng,
                confidence: SHORT_ENGLISH_CONFIDENCE,
            }),
            // Too short to identify: the deployment's usual language. (A prompt identified
            // with low confidence keeps its language and judges nothing.)
            None => self.default_language.map(|lang| Identified {
                lang,
                confidence: self.config.min_confidence,
            }),
            other => other,
        };
        let output_lang = self.identify(input.output, self.config.min_output_chars);
        let prompt_confidence = prompt_lang.map_or(0.0, |p| p.confidence);
        let confident_prompt =
            prompt_lang.filter(|_| prompt_confidence >= self.config.min_confidence);
        let differ = matches!((prompt_lang, output_lang), (Some(p), Some(o)) if p.lang != o.lang);
        let whole_switched = differ
            && output_lang.is_some_and(|o| o.confidence >= self.config.min_confidence)
            && confident_prompt.is_some()
            && !(confident_prompt.is_some_and(|p| p.lang == Lang::Eng)
                && self.english_allowed
                && reads_as_english(head(input.output, self.config.max_chars)));
        // When the answer as a whole is in the prompt's language, one paragraph may not be.
        // A prompt too short to identify still tells its script: an answer in another
        // script is a switch.
        let paragraph = if whole_switched {
            None
        } else {
            self.switched_paragraph(
                input.output,
                confident_prompt.map(|p| p.lang),
                mostly_latin(prompt),
            )
        };
        let (start, end, switched_to) = match (whole_switched, paragraph) {
            (true, _) => (
                0,
                input
                    .output
                    .char_indices()
                    .nth(self.config.max_chars)
                    .map_or(input.output.len(), |(i, _)| i),
                output_lang,
            ),
            (false, Some((start, end, found))) => (start, end, Some(found)),
            (false, None) => (0, 0, None),
        };
        let switched = switched_to.is_some();
        let judged_lang = switched_to.or(output_lang);
        let confidence = judged_lang.map_or(0.0, |o| o.confidence);
        let translation = LanguageSwitch::requests_translation(prompt, judged_lang.map(|o| o.lang));
        let score = if switched || differ {
            confidence.min(prompt_confidence)
        } else {
            0.0
        };
        let mut finding = Finding::default();
        if let Some(to) = switched_to {
            finding.evidence.push(Evidence {
                target: Target::Output,
                start,
                end,
                note: format!(
                    "{} in {} ({:.2}), prompt in {}",
                    if paragraph.is_some() {
                        "paragraph"
                    } else {
                        "output"
                    },
                    iso_code(to.lang),
                    to.confidence,
                    prompt_lang.map_or("?", |p| iso_code(p.lang)),
                ),
            });
        }
        let code = |l: Option<Identified>| l.map_or(Value::Null, |l| json!(iso_code(l.lang)));
        let fields = &mut finding.fields;
        fields.insert("prompt_language".to_owned(), code(prompt_lang));
        fields.insert("output_language".to_owned(), code(output_lang));
        fields.insert(
            "paragraph_language".to_owned(),
            code(paragraph.map(|(_, _, found)| found)),
        );
        fields.insert("confidence".to_owned(), json!(confidence));
        fields.insert("prompt_confidence".to_owned(), json!(prompt_confidence));
        fields.insert("switched".to_owned(), Value::Bool(switched));
        fields.insert(
            "prompt_requests_translation".to_owned(),
            Value::Bool(translation),
        );
        fields.insert("score".to_owned(), json!(score));
        Ok(finding)
    }
}

#[cfg(test)]
mod tests;
