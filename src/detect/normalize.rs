//! Text normalisation for matching, with a map back to the original text.
//!
//! Detectors that match phrases ([`super::trigger_phrase`]) must not be fooled by text that
//! looks the same to a reader (and often to the model's tokenizer) but differs in bytes:
//! full-width letters, ligatures, zero-width characters slipped inside a word. They match on
//! a normalised copy of the text: Unicode NFKC, invisible format characters removed, and
//! optionally case-folded (simple lowercase, [`char::to_lowercase`]). Their evidence must still
//! point into the text the model saw, so every byte of the normalised text remembers the span
//! of the original text it came from.
//!
//! # How it works
//!
//! The input is cut into *units*: a character that cannot combine with what precedes it,
//! followed by every character that can (combining marks, Hangul vowel and final jamo,
//! characters whose compatibility decomposition starts with such a mark). Each unit is
//! normalised on its own and every byte of its output maps to the unit's original span. A
//! unit is only complete when the next one starts, so a stream holds back its last unit until
//! the next chunk or [`StreamNormalizer::finish`]; chunks that split a combining sequence
//! normalise exactly as the whole text does. A unit longer than [`MAX_UNIT_CHARS`] characters
//! (only abusive text has them) is cut there, as in Unicode's stream-safe format.
//!
//! Invisible characters are removed *before* normalising, so `e`, U+200B, U+0301 becomes
//! `é`. Normalising unit by unit then gives the NFKC of the visible text (the tests check it
//! against `unicode-normalization` run on the whole text); the only departure is the cut of
//! over-long units, and it is the same whether the text comes whole or in chunks. Runs of
//! ASCII text, which normalise to themselves, take a fast path ([`NormSink::push_ascii`]).
//!
//! Case folding is simple lowercasing, not full Unicode case folding (`ß` and `SS` stay
//! apart).

use unicode_normalization::char::{canonical_combining_class, decompose_compatible};
use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};

/// Longest unit (starter plus combining characters) normalised as one piece; longer runs are
/// cut, which bounds how much a stream holds back.
pub const MAX_UNIT_CHARS: usize = 32;

/// Whether `c` is an invisible character that normalisation removes: zero-width characters,
/// bidirectional controls, variation selectors, tag characters, the soft hyphen and other
/// format characters that render as nothing.
#[inline]
pub fn is_invisible(c: char) -> bool {
    if c.is_ascii() {
        return false;
    }
    matches!(
        c,
        '\u{00AD}'                      // soft hyphen
        | '\u{034F}'                    // combining grapheme joiner
        | '\u{061C}'                    // Arabic letter mark
        | '\u{115F}' | '\u{1160}'       // Hangul choseong / jungseong fillers
        | '\u{17B4}' | '\u{17B5}'       // Khmer inherent vowels
        | '\u{180B}'..='\u{180F}'       // Mongolian variation selectors, vowel separator
        | '\u{200B}'..='\u{200F}'       // zero-width space, (non-)joiner, LRM, RLM
        | '\u{202A}'..='\u{202E}'       // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}'       // word joiner, invisible operators
        | '\u{2066}'..='\u{206F}'       // bidi isolates, deprecated format characters
        | '\u{3164}'                    // Hangul filler
        | '\u{FE00}'..='\u{FE0F}'       // variation selectors
        | '\u{FEFF}'                    // zero-width no-break space (BOM)
        | '\u{FFA0}'                    // half-width Hangul filler
        | '\u{FFF9}'..='\u{FFFB}'       // interlinear annotation controls
        | '\u{1BCA0}'..='\u{1BCA3}'     // shorthand format controls
        | '\u{1D173}'..='\u{1D17A}'     // musical symbol format controls
        | '\u{E0000}'..='\u{E007F}'     // tag characters
        | '\u{E0100}'..='\u{E01EF}' // variation selectors supplement
    )
}

/// Whether `c` begins a new unit: it is a starter, and the first character of its
/// compatibility decomposition is a starter that cannot compose with a preceding character.
#[inline]
fn starts_unit(c: char) -> bool {
    if c.is_ascii() {
        return true;
    }
    if canonical_combining_class(c) != 0 {
        return false;
    }
    let mut first = None;
    decompose_compatible(c, |d| {
        if first.is_none() {
            first = Some(d);
        }
    });
    let d = first.unwrap_or(c);
    canonical_combining_class(d) == 0 && is_nfkc_quick(std::iter::once(d)) != IsNormalized::Maybe
}

/// Whether a unit of the one character `c` is already normalised.
#[inline]
fn is_stable(c: char) -> bool {
    c.is_ascii() || is_nfkc_quick(std::iter::once(c)) == IsNormalized::Yes
}

/// Text normalised for matching, and where each of its bytes came from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Normalized {
    /// The normalised text.
    pub text: String,
    /// The offset map, as runs over `text` in order (the first at byte 0 once text exists).
    map: Vec<Run>,
}

/// A run of normalised bytes from `norm` up to the next run's `norm`.
///
/// `Same` runs are characters that came one for one from original characters of the same
/// UTF-8 length, contiguous in the original (plain text, mostly): normalised byte `norm + k`
/// is original byte `orig + k`. `Unit` runs are the output of one unit that changed length
/// (a ligature, full-width letters, a composed accent, or a unit with invisible characters
/// in it): every byte maps to the whole unit `orig..orig_end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Same {
        norm: usize,
        orig: usize,
    },
    Unit {
        norm: usize,
        orig: usize,
        orig_end: usize,
    },
}

impl Run {
    fn norm(&self) -> usize {
        match *self {
            Run::Same { norm, .. } | Run::Unit { norm, .. } => norm,
        }
    }
}

impl Normalized {
    /// Normalises `original`: NFKC, invisible characters removed, lowercased when `fold`.
    pub fn new(original: &str, fold: bool) -> Normalized {
        let mut out = Normalized {
            text: String::with_capacity(original.len()),
            map: Vec::new(),
        };
        let mut stream = StreamNormalizer::new(fold);
        stream.feed(original, &mut out);
        stream.finish(&mut out);
        out
    }

    /// Appends one normalised character that came from original bytes `start..end`.
    #[inline]
    pub fn push(&mut self, c: char, start: usize, end: usize) {
        let at = self.text.len();
        self.text.push(c);
        if end - start == c.len_utf8() {
            if let Some(&Run::Same { norm, orig }) = self.map.last()
                && orig + (at - norm) == start
            {
                return;
            }
            self.map.push(Run::Same {
                norm: at,
                orig: start,
            });
        } else {
            if let Some(&Run::Unit { orig, orig_end, .. }) = self.map.last()
                && orig == start
                && orig_end == end
            {
                return;
            }
            self.map.push(Run::Unit {
                norm: at,
                orig: start,
                orig_end: end,
            });
        }
    }

    /// Reserves room for `additional` more bytes of normalised text.
    pub fn reserve(&mut self, additional: usize) {
        self.text.reserve(additional);
    }

    /// Drops the first `n` bytes of the normalised text (fewer, down to a character boundary)
    /// and their map entries; returns how many bytes were dropped. Later offsets shift down.
    pub fn discard_front(&mut self, n: usize) -> usize {
        let mut n = n.min(self.text.len());
        while !self.text.is_char_boundary(n) {
            n -= 1;
        }
        if n == 0 {
            return 0;
        }
        self.text.drain(..n);
        let first = self.run_index(n);
        self.map.drain(..first);
        // Only the first run can start before `n`; a `Same` run moves its origin with it.
        for run in &mut self.map {
            match run {
                Run::Same { norm, orig } => {
                    *orig += n.saturating_sub(*norm);
                    *norm = norm.saturating_sub(n);
                }
                Run::Unit { norm, .. } => *norm = norm.saturating_sub(n),
            }
        }
        n
    }

    /// Index of the run holding byte `pos` (the last run when past the end).
    fn run_index(&self, pos: usize) -> usize {
        self.map
            .partition_point(|r| r.norm() <= pos)
            .saturating_sub(1)
    }

    /// Length of the normalised text in bytes.
    pub fn len(&self) -> usize {
        self.text.len()
    }

    /// Whether the normalised text is empty.
    pub fn is_empty(&self) -> bool {
        self.text.is_empty()
    }

    /// The original span covered by the normalised bytes `start..end` (character
    /// boundaries): from the original start of the character at `start` to the original end
    /// of the character ending at `end`. A character that came from a unit of several
    /// original characters maps to the whole unit. Offsets past the end are clamped; an empty
    /// range gives an empty span.
    pub fn original_span(&self, start: usize, end: usize) -> (usize, usize) {
        let len = self.text.len();
        let (start, end) = (start.min(len), end.min(len));
        let first = self.original_start(start);
        if end <= start {
            return (first, first);
        }
        (first, self.original_end(end).max(first))
    }

    /// Original offset of the start of the character at normalised byte `pos`.
    fn original_start(&self, pos: usize) -> usize {
        if pos >= self.text.len() {
            return self.original_end(self.text.len());
        }
        match self.map.get(self.run_index(pos)) {
            Some(&Run::Same { norm, orig }) => orig + (pos - norm),
            Some(&Run::Unit { orig, .. }) => orig,
            None => 0,
        }
    }

    /// Original offset of the end of the character that ends at normalised byte `pos > 0`.
    fn original_end(&self, pos: usize) -> usize {
        match self.map.get(self.run_index(pos.saturating_sub(1))) {
            Some(&Run::Same { norm, orig }) => orig + (pos - norm),
            Some(&Run::Unit { orig_end, .. }) => orig_end,
            None => 0,
        }
    }
}

/// Normalises text that arrives in chunks, holding back the last unit until it is complete.
///
/// Offsets are counted in bytes from the start of the stream.
#[derive(Debug, Clone, Default)]
pub struct StreamNormalizer {
    fold: bool,
    /// Original bytes seen so far.
    offset: usize,
    /// The unit being collected.
    unit: Vec<char>,
    unit_start: usize,
    unit_end: usize,
}

impl StreamNormalizer {
    /// A normaliser that lowercases its output when `fold`.
    pub fn new(fold: bool) -> StreamNormalizer {
        StreamNormalizer {
            fold,
            ..StreamNormalizer::default()
        }
    }

    /// Normalises the next chunk and appends what is complete to `out`.
    pub fn feed(&mut self, chunk: &str, out: &mut Normalized) {
        self.feed_into(chunk, out);
    }

    /// Appends what was held back to `out`; the stream is over.
    pub fn finish(&mut self, out: &mut Normalized) {
        self.finish_into(out);
    }

    /// Normalises the next chunk and hands each complete normalised character to `emit`
    /// with the original span it came from.
    pub fn feed_with(&mut self, chunk: &str, emit: impl FnMut(char, usize, usize)) {
        self.feed_into(chunk, &mut FnSink(emit));
    }

    /// Emits what was held back; the stream is over (a later chunk starts a new unit).
    pub fn finish_with(&mut self, emit: impl FnMut(char, usize, usize)) {
        self.finish_into(&mut FnSink(emit));
    }

    /// Normalises the next chunk into `sink`. Runs of ASCII text, which normalise to
    /// themselves, go to [`NormSink::push_ascii`] in one piece.
    pub fn feed_into(&mut self, chunk: &str, sink: &mut impl NormSink) {
        let bytes = chunk.as_bytes();
        let mut i = 0;
        while let Some(rest) = bytes.get(i..).filter(|r| !r.is_empty()) {
            let ascii = rest
                .iter()
                .position(|b| !b.is_ascii())
                .unwrap_or(rest.len());
            if ascii >= 2 {
                // Every ASCII character but the last is followed by an ASCII character, so
                // its unit is complete; the last one is held back like any unit.
                self.flush(sink);
                let run = chunk.get(i..i + ascii - 1).unwrap_or_default();
                sink.push_ascii(run, self.offset + i, self.fold);
                i += ascii - 1;
            }
            let Some(c) = chunk.get(i..).and_then(|t| t.chars().next()) else {
                break;
            };
            let start = self.offset + i;
            self.push_char(c, start, start + c.len_utf8(), sink);
            i += c.len_utf8();
        }
        self.offset += chunk.len();
    }

    /// Emits what was held back into `sink`; the stream is over.
    pub fn finish_into(&mut self, sink: &mut impl NormSink) {
        self.flush(sink);
    }

    #[inline]
    fn push_char(&mut self, c: char, start: usize, end: usize, sink: &mut impl NormSink) {
        if c.is_ascii() {
            // An ASCII character ends the unit before it and starts its own.
            self.flush(sink);
            self.unit.push(c);
            self.unit_start = start;
            self.unit_end = end;
            return;
        }
        if is_invisible(c) {
            return;
        }
        if !self.unit.is_empty() && (starts_unit(c) || self.unit.len() >= MAX_UNIT_CHARS) {
            self.flush(sink);
        }
        if self.unit.is_empty() {
            self.unit_start = start;
        }
        self.unit.push(c);
        self.unit_end = end;
    }

    #[inline]
    fn flush(&mut self, sink: &mut impl NormSink) {
        let (start, end, fold) = (self.unit_start, self.unit_end, self.fold);
        let mut put = |c: char| {
            if !fold {
                sink.push_char(c, start, end);
            } else if c.is_ascii() {
                sink.push_char(c.to_ascii_lowercase(), start, end);
            } else {
                for l in c.to_lowercase() {
                    sink.push_char(l, start, end);
                }
            }
        };
        match self.unit.as_slice() {
            [] => {}
            &[c] if is_stable(c) => put(c),
            unit => {
                for c in unit.iter().copied().nfkc() {
                    if !is_invisible(c) {
                        put(c);
                    }
                }
            }
        }
        self.unit.clear();
    }
}

/// Receives the output of a [`StreamNormalizer`].
pub trait NormSink {
    /// One normalised character that came from original bytes `start..end`.
    fn push_char(&mut self, c: char, start: usize, end: usize);

    /// A run of ASCII characters, each its own unit, from original bytes
    /// `start..start + run.len()`; lowercased first when `lowercase`. The default hands
    /// them to [`NormSink::push_char`] one by one.
    fn push_ascii(&mut self, run: &str, start: usize, lowercase: bool) {
        for (i, b) in run.bytes().enumerate() {
            let c = char::from(if lowercase { b.to_ascii_lowercase() } else { b });
            self.push_char(c, start + i, start + i + 1);
        }
    }
}

impl NormSink for Normalized {
    #[inline]
    fn push_char(&mut self, c: char, start: usize, end: usize) {
        self.push(c, start, end);
    }

    fn push_ascii(&mut self, run: &str, start: usize, lowercase: bool) {
        let Some(first) = run.chars().next() else {
            return;
        };
        // The first character settles the map (a new run or the current one extended);
        // the rest follow it byte for byte.
        self.push(
            if lowercase {
                first.to_ascii_lowercase()
            } else {
                first
            },
            start,
            start + 1,
        );
        let rest = run.get(1..).unwrap_or_default();
        if lowercase {
            self.text
                .extend(rest.chars().map(|c| c.to_ascii_lowercase()));
        } else {
            self.text.push_str(rest);
        }
    }
}

/// A sink that hands characters to a closure.
struct FnSink<F>(F);

impl<F: FnMut(char, usize, usize)> NormSink for FnSink<F> {
    fn push_char(&mut self, c: char, start: usize, end: usize) {
        (self.0)(c, start, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn norm(s: &str) -> String {
        Normalized::new(s, false).text
    }

    /// NFKC of the text with invisible characters removed, by the library alone.
    fn reference(s: &str) -> String {
        s.chars()
            .filter(|c| !is_invisible(*c))
            .nfkc()
            .filter(|c| !is_invisible(*c))
            .collect()
    }

    #[test]
    fn nfkc_and_invisible_removal() {
        let cases: &[(&str, &str)] = &[
            ("plain text", "plain text"),
            ("<SU\u{200B}DO>", "<SUDO>"),
            ("＜ＳＵＤＯ＞", "<SUDO>"),
            ("\u{FB01}le", "file"),
            ("e\u{0301}", "\u{e9}"),
            ("e\u{200D}\u{0301}", "\u{e9}"),
            (
                "a\u{00AD}b\u{2060}c\u{FEFF}d\u{202E}e\u{2066}f\u{FE0F}g\u{E0041}h",
                "abcdefgh",
            ),
            ("\u{1100}\u{1161}", "\u{AC00}"),
            ("\u{FF76}\u{FF9E}", "\u{30AC}"),
            ("x\u{00A0}y", "x y"),
            ("①", "1"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), *want, "input {input:?}");
            assert_eq!(norm(input), reference(input), "input {input:?}");
        }
    }

    #[test]
    fn folding_lowercases() {
        assert_eq!(Normalized::new("ＳＵＤＯ Bond", true).text, "sudo bond");
        assert_eq!(Normalized::new("SUDO", false).text, "SUDO");
    }

    #[test]
    fn spans_point_into_the_original() {
        let original = "x＜ＳＵ\u{200B}ＤＯ＞\u{200B}y";
        let n = Normalized::new(original, false);
        assert_eq!(n.text, "x<SUDO>y");
        let start = n.text.find('<').unwrap();
        let end = n.text.find('>').unwrap() + 1;
        let (s, e) = n.original_span(start, end);
        assert_eq!(original.get(s..e), Some("＜ＳＵ\u{200B}ＤＯ＞"));
        // A ligature maps to its whole original character, even for one letter of it.
        let n = Normalized::new("a\u{FB01}b", false);
        assert_eq!(n.text, "afib");
        assert_eq!(n.original_span(2, 3), (1, 4));
        assert_eq!(n.original_span(0, 4), (0, 5));
    }

    #[test]
    fn original_span_clamps() {
        let n = Normalized::new("ab", false);
        assert_eq!(n.original_span(5, 9), (2, 2));
        assert_eq!(n.original_span(1, 1), (1, 1));
        assert_eq!(Normalized::default().original_span(0, 3), (0, 0));
    }

    /// Normalises `s` fed in the given chunks.
    fn chunked(s: &str, cuts: &[usize], fold: bool) -> Normalized {
        let mut out = Normalized::default();
        let mut stream = StreamNormalizer::new(fold);
        let mut last = 0;
        for &cut in cuts {
            stream.feed(s.get(last..cut).unwrap(), &mut out);
            last = cut;
        }
        stream.feed(s.get(last..).unwrap(), &mut out);
        stream.finish(&mut out);
        out
    }

    #[test]
    fn stream_split_anywhere_matches_whole() {
        let texts = [
            "e\u{0301}\u{0323}x",
            "\u{1100}\u{1161}\u{11A8}",
            "\u{FF76}\u{FF9E}\u{FF8A}\u{FF9F}",
            "<SU\u{200B}DO> and ＜ＳＵＤＯ＞ and \u{FB01}",
            "A\u{030A}\u{0301}ngstr\u{F6}m \u{212B}",
        ];
        for text in texts {
            for fold in [false, true] {
                let whole = Normalized::new(text, fold);
                for (cut, _) in text.char_indices() {
                    assert_eq!(chunked(text, &[cut], fold), whole, "{text:?} cut at {cut}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn stream_equals_whole(
            text in "(\\PC|\u{0301}|\u{0323}|\u{200B}|\u{FF9E}|\u{1161}|\u{11A8}){0,40}",
            fracs in proptest::collection::vec(0.0f64..1.0, 0..5),
            fold in any::<bool>(),
        ) {
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
            let mut cuts: Vec<usize> = fracs
                .iter()
                .filter_map(|f| bounds.get((f * bounds.len() as f64) as usize).copied())
                .collect();
            cuts.sort_unstable();
            let whole = Normalized::new(&text, fold);
            prop_assert_eq!(chunked(&text, &cuts, fold), whole);
        }

        /// Every two-way split of a generated text, and one character at a time, normalise
        /// exactly as the whole text does.
        #[test]
        fn every_split_equals_whole(
            text in "(\\PC|\u{0301}|\u{0323}|\u{200B}|\u{FF9E}|\u{1161}|\u{11A8}){0,40}",
            fold in any::<bool>(),
        ) {
            let whole = Normalized::new(&text, fold);
            let bounds: Vec<usize> = text.char_indices().map(|(i, _)| i).skip(1).collect();
            for &cut in &bounds {
                prop_assert_eq!(&chunked(&text, &[cut], fold), &whole, "cut at {}", cut);
            }
            prop_assert_eq!(chunked(&text, &bounds, fold), whole);
        }

        #[test]
        fn spans_lie_on_char_boundaries(text in "(\\PC|\u{0301}|\u{200B}|\u{FB01}){0,40}", fold in any::<bool>()) {
            let n = Normalized::new(&text, fold);
            for (i, _) in n.text.char_indices() {
                for (j, c) in n.text.char_indices().skip_while(|(j, _)| *j < i) {
                    let (s, e) = n.original_span(i, j + c.len_utf8());
                    prop_assert!(s <= e && e <= text.len());
                    prop_assert!(text.is_char_boundary(s) && text.is_char_boundary(e));
                }
            }
            // Without folding, the whole normalised text is the NFKC of the visible text.
            if !fold {
                prop_assert_eq!(norm(&text), reference(&text));
            }
        }
    }
}
