//! Server-sent events: the one framer of the wire format, and the two readers built on it.
//!
//! [`SseFramer`] says where lines and events end in a `text/event-stream` byte stream, byte for
//! byte, however the stream is cut into chunks: a line ends at `\n`, `\r\n` or `\r` (a `\r\n`
//! may be split across chunks) and an empty line ends an event. Capture owns the wire format,
//! so the framing lives here once, and both readers of a stream use it:
//!
//! * [`SseDecoder`] parses events for response capture, following the WHATWG "event stream
//!   interpretation" rules: comment lines starting with `:`, `data:` lines joined with `\n`, one
//!   optional space after the colon, fields without a colon, and a UTF-8 byte order mark at the
//!   very start. Each input byte is scanned once: only the unfinished tail of a line is kept
//!   between chunks, and that tail is bounded by a maximum line length (as is the data of one
//!   event). Going over the bound puts the decoder into a sticky error state instead of growing
//!   without limit.
//! * [`SseSplitter`] keeps each event's raw bytes, for enforce mode, which holds back, rewrites
//!   or releases whole events exactly as the upstream sent them. It keeps the unfinished event
//!   between chunks; its caller bounds the body.

use bytes::Bytes;

/// Default bound on one line, and on the data of one event: 4 MiB.
pub const DEFAULT_MAX_LINE: usize = 4 * 1024 * 1024;

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Where the lines and events of a server-sent-events byte stream end; see the module docs.
///
/// [`SseFramer::cut`] takes the stream apart into [`SsePiece`]s, every byte in exactly one
/// piece, in order. A `\r` ends its line at once, so no piece waits on the byte after it; a `\n`
/// right after it, in the same chunk or the next, is an [`SsePiece::LfAfterCr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseFramer {
    /// No text since the last line end: a terminator now ends an empty line, and an event.
    line_empty: bool,
    /// The last byte was a `\r`, so a `\n` now completes its `\r\n`.
    after_cr: bool,
}

impl Default for SseFramer {
    fn default() -> Self {
        SseFramer {
            line_empty: true,
            after_cr: false,
        }
    }
}

/// One piece of a server-sent-events byte stream, as [`SseFramer::cut`] takes it off a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SsePiece<'a> {
    /// Bytes on a line: never empty, never a line terminator. A line cut across chunks comes
    /// as one piece per chunk.
    Text(&'a [u8]),
    /// The `\n` or `\r` that ends a line with text on it.
    LineEnd(&'a [u8]),
    /// The `\n` or `\r` that ends an empty line, and with it an event (an empty one when
    /// nothing came since the last event ended).
    EventEnd(&'a [u8]),
    /// The `\n` of a `\r\n`: part of the line end the `\r` made, which may have come in an
    /// earlier chunk.
    LfAfterCr(&'a [u8]),
}

impl<'a> SsePiece<'a> {
    /// The bytes of the stream this piece stands for.
    pub fn bytes(self) -> &'a [u8] {
        match self {
            SsePiece::Text(bytes)
            | SsePiece::LineEnd(bytes)
            | SsePiece::EventEnd(bytes)
            | SsePiece::LfAfterCr(bytes) => bytes,
        }
    }
}

impl SseFramer {
    /// Cuts the next piece off the front of `chunk` and returns it with the rest of `chunk`;
    /// `None` once `chunk` is empty.
    pub fn cut<'a>(&mut self, chunk: &'a [u8]) -> Option<(SsePiece<'a>, &'a [u8])> {
        let &first = chunk.first()?;
        let after_cr = std::mem::replace(&mut self.after_cr, false);
        if first != b'\n' && first != b'\r' {
            let end = chunk
                .iter()
                .position(|&b| b == b'\n' || b == b'\r')
                .unwrap_or(chunk.len());
            let (text, rest) = chunk.split_at_checked(end)?;
            self.line_empty = false;
            return Some((SsePiece::Text(text), rest));
        }
        let (terminator, rest) = chunk.split_at_checked(1)?;
        if first == b'\n' && after_cr {
            return Some((SsePiece::LfAfterCr(terminator), rest));
        }
        self.after_cr = first == b'\r';
        let piece = if std::mem::replace(&mut self.line_empty, true) {
            SsePiece::EventEnd(terminator)
        } else {
            SsePiece::LineEnd(terminator)
        };
        Some((piece, rest))
    }
}

/// Splits a server-sent-events byte stream into whole events, byte for byte, with the
/// framing of [`SseFramer`]: an event runs through the terminator of its empty line, and the
/// `\n` of a `\r\n` ending that line starts the next event. Whatever follows the last complete
/// event waits for the next chunk; the events and the rest add up to the stream.
#[derive(Debug, Default)]
pub struct SseSplitter {
    framer: SseFramer,
    /// The unfinished event carried over from earlier chunks.
    partial: Vec<u8>,
}

impl SseSplitter {
    /// Appends every event `chunk` completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) {
        let mut start = 0usize;
        let mut rest = chunk;
        while let Some((piece, tail)) = self.framer.cut(rest) {
            rest = tail;
            if let SsePiece::EventEnd(_) = piece {
                let end = chunk.len().saturating_sub(rest.len());
                self.partial
                    .extend_from_slice(chunk.get(start..end).unwrap_or_default());
                out.push(Bytes::from(std::mem::take(&mut self.partial)));
                start = end;
            }
        }
        self.partial
            .extend_from_slice(chunk.get(start..).unwrap_or_default());
    }

    /// What is left after the last complete event (a stream that ended mid-event).
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.partial)))
    }
}

/// One dispatched server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` field, when the event set a non-empty one (the spec's default is `message`).
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`, decoded as UTF-8 lossily.
    pub data: String,
    /// The last event ID at dispatch time. As in the spec, an `id:` field persists for later
    /// events until another `id:` field changes it; an empty `id:` resets it to `None`.
    pub id: Option<String>,
}

/// Why an [`SseDecoder`] stopped decoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line grew past the configured maximum without a line terminator.
    #[error("server-sent-events line longer than {max} bytes")]
    LineTooLong {
        /// The configured maximum.
        max: usize,
    },
    /// The `data:` lines of one event added up to more than the configured maximum.
    #[error("server-sent event data longer than {max} bytes")]
    EventTooLarge {
        /// The configured maximum.
        max: usize,
    },
}

impl SseError {
    /// A short, low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            SseError::LineTooLong { .. } => "sse_line_too_long",
            SseError::EventTooLarge { .. } => "sse_event_too_large",
        }
    }
}

/// An incremental server-sent-events decoder; see the module docs.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    max_line: usize,
    /// How many bytes of a leading BOM have matched so far; `None` once past the start.
    bom_matched: Option<usize>,
    /// Where lines and events end (it sees the stream without its BOM).
    framer: SseFramer,
    /// The unfinished line carried over from earlier chunks.
    line: Vec<u8>,
    /// The event being assembled.
    event_type: Option<String>,
    data: Vec<u8>,
    last_id: Option<String>,
    /// A field line has been seen since the last blank line.
    in_event: bool,
    /// `finish` discarded an unterminated event.
    ended_mid_event: bool,
    error: Option<SseError>,
}

impl Default for SseDecoder {
    fn default() -> Self {
        SseDecoder::with_max_line(DEFAULT_MAX_LINE)
    }
}

impl SseDecoder {
    /// A decoder whose lines, and the data of each event, may be at most `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        SseDecoder {
            max_line,
            bom_matched: Some(0),
            framer: SseFramer::default(),
            line: Vec::new(),
            event_type: None,
            data: Vec::new(),
            last_id: None,
            in_event: false,
            ended_mid_event: false,
            error: None,
        }
    }

    /// Decodes `chunk`, appending every event it completes to `out`.
    ///
    /// Once the decoder is in an error state (see [`SseDecoder::error`]) input is ignored.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        if self.error.is_some() {
            return;
        }
        let (held, rest) = self.strip_bom(chunk);
        self.decode(held, out);
        if self.error.is_none() {
            self.decode(rest, out);
        }
    }

    /// Ends the stream.
    ///
    /// Following the spec, an event whose terminating blank line never came is discarded, so
    /// this never appends to `out` today; it takes `out` so that callers need not change should
    /// a lenient mode be added. [`SseDecoder::has_partial`] tells whether something was
    /// discarded.
    pub fn finish(&mut self, _out: &mut Vec<SseEvent>) {
        if let Some(matched) = self.bom_matched.take()
            && matched > 0
        {
            self.line
                .extend_from_slice(BOM.get(..matched).unwrap_or_default());
        }
        self.ended_mid_event |= self.pending();
        self.line.clear();
        self.data.clear();
        self.event_type = None;
        self.in_event = false;
        self.framer = SseFramer::default();
    }

    /// Whether the stream so far ends inside an event: an unterminated line, or fields not yet
    /// dispatched by a blank line. After [`SseDecoder::finish`], whether it discarded such a tail.
    pub fn has_partial(&self) -> bool {
        self.ended_mid_event || self.pending()
    }

    /// The error that stopped decoding, if any.
    pub fn error(&self) -> Option<&SseError> {
        self.error.as_ref()
    }

    fn pending(&self) -> bool {
        self.in_event || !self.line.is_empty() || self.bom_matched.is_some_and(|m| m > 0)
    }

    fn fail(&mut self, error: SseError) {
        self.error = Some(error);
        self.line = Vec::new();
        self.data = Vec::new();
    }

    /// Strips a byte order mark at the very start of the stream, which may arrive split.
    /// Returns the bytes held back by an earlier chunk that turned out not to be a BOM (they
    /// start the first line; none of them is a line terminator), then the rest of `chunk`.
    fn strip_bom<'a>(&mut self, chunk: &'a [u8]) -> (&'static [u8], &'a [u8]) {
        let Some(mut matched) = self.bom_matched else {
            return (&[], chunk);
        };
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if BOM.get(matched) == Some(&b) {
                matched += 1;
                rest = tail;
                if matched == BOM.len() {
                    self.bom_matched = None;
                    return (&[], rest);
                }
            } else {
                self.bom_matched = None;
                return (BOM.get(..matched).unwrap_or_default(), rest);
            }
        }
        self.bom_matched = Some(matched);
        (&[], rest)
    }

    /// Decodes bytes past the BOM: the text of a line is gathered (within `max_line`) until the
    /// framer ends the line, then parsed; the end of an event dispatches it.
    fn decode(&mut self, mut rest: &[u8], out: &mut Vec<SseEvent>) {
        // The current line's text in this chunk, not yet copied into `self.line`.
        let mut text: &[u8] = &[];
        while let Some((piece, tail)) = self.framer.cut(rest) {
            rest = tail;
            match piece {
                SsePiece::Text(bytes) => {
                    if self.line.len() + text.len() + bytes.len() > self.max_line {
                        self.fail(SseError::LineTooLong { max: self.max_line });
                        return;
                    }
                    self.line.extend_from_slice(text);
                    text = bytes;
                }
                SsePiece::LineEnd(_) => {
                    let part = std::mem::take(&mut text);
                    if self.line.is_empty() {
                        self.process_line(part, out);
                    } else {
                        let mut line = std::mem::take(&mut self.line);
                        line.extend_from_slice(part);
                        self.process_line(&line, out);
                        line.clear();
                        self.line = line;
                    }
                    if self.error.is_some() {
                        return;
                    }
                }
                SsePiece::EventEnd(_) => self.dispatch(out),
                SsePiece::LfAfterCr(_) => {}
            }
        }
        self.line.extend_from_slice(text);
    }

    /// Parses one line; an empty one ends the event.
    fn process_line(&mut self, line: &[u8], out: &mut Vec<SseEvent>) {
        let Some((&first, _)) = line.split_first() else {
            self.dispatch(out);
            return;
        };
        if first == b':' {
            return;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(colon) => {
                let (name, value) = line.split_at(colon);
                let value = value.get(1..).unwrap_or_default();
                (name, value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &[][..]),
        };
        self.in_event = true;
        match name {
            b"event" => self.event_type = non_empty(value),
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max_line {
                    self.fail(SseError::EventTooLarge { max: self.max_line });
                    return;
                }
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
            }
            b"id" if !value.contains(&0) => self.last_id = non_empty(value),
            // `retry` only matters to a reconnecting client; unknown fields are ignored.
            _ => {}
        }
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) {
        self.in_event = false;
        let event = self.event_type.take();
        if self.data.is_empty() {
            return;
        }
        if self.data.last() == Some(&b'\n') {
            self.data.pop();
        }
        let data = String::from_utf8_lossy(&self.data).into_owned();
        self.data.clear();
        out.push(SseEvent {
            event,
            data,
            id: self.last_id.clone(),
        });
    }
}

fn non_empty(value: &[u8]) -> Option<String> {
    (!value.is_empty()).then(|| String::from_utf8_lossy(value).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ev(event: Option<&str>, data: &str, id: Option<&str>) -> SseEvent {
        SseEvent {
            event: event.map(str::to_owned),
            data: data.to_owned(),
            id: id.map(str::to_owned),
        }
    }

    fn decode_chunks(chunks: &[&[u8]], max: usize) -> (Vec<SseEvent>, bool, Option<SseError>) {
        let mut decoder = SseDecoder::with_max_line(max);
        let mut out = Vec::new();
        for chunk in chunks {
            decoder.push(chunk, &mut out);
        }
        decoder.finish(&mut out);
        (out, decoder.has_partial(), decoder.error().cloned())
    }

    fn decode(input: &[u8]) -> (Vec<SseEvent>, bool, Option<SseError>) {
        decode_chunks(&[input], DEFAULT_MAX_LINE)
    }

    #[test]
    fn decodes_table() {
        let table: &[(&str, &[u8], &[SseEvent], bool)] = &[
            (
                "single event",
                b"data: hi\n\n",
                &[ev(None, "hi", None)],
                false,
            ),
            (
                "crlf endings",
                b"event: a\r\ndata: x\r\n\r\n",
                &[ev(Some("a"), "x", None)],
                false,
            ),
            (
                "cr endings",
                b"data: x\r\rdata: y\r\r",
                &[ev(None, "x", None), ev(None, "y", None)],
                false,
            ),
            (
                "mixed endings",
                b"data: x\r\n\ndata: y\n\r\n",
                &[ev(None, "x", None), ev(None, "y", None)],
                false,
            ),
            (
                "multi-line data",
                b"data: a\ndata:b\ndata:  c\n\n",
                &[ev(None, "a\nb\n c", None)],
                false,
            ),
            (
                "comments ignored",
                b": ping\n\n:x\ndata: y\n\n",
                &[ev(None, "y", None)],
                false,
            ),
            (
                "field without colon",
                b"data\n\n",
                &[ev(None, "", None)],
                false,
            ),
            (
                "data without colon then data",
                b"data\ndata\n\n",
                &[ev(None, "\n", None)],
                false,
            ),
            (
                "empty data dispatches",
                b"data:\n\n",
                &[ev(None, "", None)],
                false,
            ),
            ("no data no event", b"event: x\n\n", &[], false),
            (
                "event type resets",
                b"event: a\n\ndata: 1\n\n",
                &[ev(None, "1", None)],
                false,
            ),
            (
                "id persists",
                b"id: 7\ndata: 1\n\ndata: 2\n\nid\ndata: 3\n\n",
                &[
                    ev(None, "1", Some("7")),
                    ev(None, "2", Some("7")),
                    ev(None, "3", None),
                ],
                false,
            ),
            (
                "id with nul ignored",
                b"id: a\0b\ndata: 1\n\n",
                &[ev(None, "1", None)],
                false,
            ),
            (
                "unknown field ignored",
                b"retry: 10\nfoo: bar\ndata: 1\n\n",
                &[ev(None, "1", None)],
                false,
            ),
            (
                "bom stripped",
                b"\xEF\xBB\xBFdata: 1\n\n",
                &[ev(None, "1", None)],
                false,
            ),
            (
                "bom only at start",
                b"data: 1\n\n\xEF\xBB\xBFdata: 2\n\n",
                &[ev(None, "1", None)],
                false,
            ),
            (
                "unterminated event discarded",
                b"data: 1\n\ndata: 2\n",
                &[ev(None, "1", None)],
                true,
            ),
            (
                "unterminated line discarded",
                b"data: 1\n\ndata: 2",
                &[ev(None, "1", None)],
                true,
            ),
            (
                "trailing comment only",
                b"data: 1\n\n: bye\n",
                &[ev(None, "1", None)],
                false,
            ),
            ("partial bom", b"\xEF\xBB", &[], true),
            (
                "invalid utf-8 lossy",
                b"data: \xFF\xFEok\n\n",
                &[ev(None, "\u{FFFD}\u{FFFD}ok", None)],
                false,
            ),
            (
                "colon in value",
                b"data: a: b\n\n",
                &[ev(None, "a: b", None)],
                false,
            ),
            (
                "only one space stripped",
                b"event:  x\ndata:1\n\n",
                &[ev(Some(" x"), "1", None)],
                false,
            ),
        ];
        for (name, input, want, partial) in table {
            let (got, got_partial, err) = decode(input);
            assert_eq!(&got, want, "{name}");
            assert_eq!(got_partial, *partial, "{name}: has_partial");
            assert_eq!(err, None, "{name}");
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                let (got, got_partial, _) = decode_chunks(&[a, b], DEFAULT_MAX_LINE);
                assert_eq!(&got, want, "{name} split at {split}");
                assert_eq!(
                    got_partial, *partial,
                    "{name} split at {split}: has_partial"
                );
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(
                &decode_chunks(&bytes, DEFAULT_MAX_LINE).0,
                want,
                "{name} bytewise"
            );
        }
    }

    #[test]
    fn crlf_split_across_chunks_is_one_line_end() {
        let (got, _, _) = decode_chunks(&[b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"], 64);
        assert_eq!(got, vec![ev(None, "a\nb", None)]);
    }

    #[test]
    fn has_partial_while_streaming() {
        let mut decoder = SseDecoder::default();
        let mut out = Vec::new();
        decoder.push(b"data: 1\n", &mut out);
        assert!(decoder.has_partial());
        decoder.push(b"\n", &mut out);
        assert!(!decoder.has_partial());
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn bounded_table() {
        /// Name, input, max line, error, number of events.
        type Case<'a> = (&'a str, &'a [u8], usize, Option<SseError>, usize);
        let table: &[Case] = &[
            ("line fits", b"data: 12345\n\n", 11, None, 1),
            (
                "line too long",
                b"data: 123456\n\n",
                11,
                Some(SseError::LineTooLong { max: 11 }),
                0,
            ),
            (
                "unterminated too long",
                b"data: 1\n\ndata: 123456",
                11,
                Some(SseError::LineTooLong { max: 11 }),
                1,
            ),
            (
                "event too large",
                b"data: 12345\ndata: 12345\n\n",
                11,
                Some(SseError::EventTooLarge { max: 11 }),
                0,
            ),
            (
                "sticky error",
                b"data: 123456789\n\ndata: 1\n\n",
                8,
                Some(SseError::LineTooLong { max: 8 }),
                0,
            ),
        ];
        for (name, input, max, want_err, want_events) in table {
            let (got, _, err) = decode_chunks(&[input], *max);
            assert_eq!(&err, want_err, "{name}");
            assert_eq!(got.len(), *want_events, "{name}");
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            let (got, _, err) = decode_chunks(&bytes, *max);
            assert_eq!(&err, want_err, "{name} bytewise");
            assert_eq!(got.len(), *want_events, "{name} bytewise");
        }
    }

    /// A piece as the framer tables write it: a tag (`t`ext, `l`ine end, `e`vent end, `c`r's
    /// lf), and its bytes.
    type Tagged = (char, Vec<u8>);

    fn tagged(piece: SsePiece<'_>) -> Tagged {
        let tag = match piece {
            SsePiece::Text(_) => 't',
            SsePiece::LineEnd(_) => 'l',
            SsePiece::EventEnd(_) => 'e',
            SsePiece::LfAfterCr(_) => 'c',
        };
        (tag, piece.bytes().to_vec())
    }

    /// The pieces of `chunks` fed in turn to one framer, with the text of a line that the
    /// chunks cut joined back into one piece.
    fn pieces(chunks: &[&[u8]]) -> Vec<Tagged> {
        let mut framer = SseFramer::default();
        let mut out: Vec<Tagged> = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            while let Some((piece, tail)) = framer.cut(rest) {
                rest = tail;
                let (tag, bytes) = tagged(piece);
                assert!(!bytes.is_empty(), "empty {tag} piece");
                match out.last_mut() {
                    Some(('t', text)) if tag == 't' => text.extend_from_slice(&bytes),
                    _ => out.push((tag, bytes)),
                }
            }
        }
        out
    }

    #[test]
    fn framer_table() {
        let t = |b: &[u8]| ('t', b.to_vec());
        let l = |b: &[u8]| ('l', b.to_vec());
        let e = |b: &[u8]| ('e', b.to_vec());
        let c = || ('c', b"\n".to_vec());
        let table: Vec<(&str, &[u8], Vec<Tagged>)> = vec![
            ("empty stream", b"", vec![]),
            (
                "lf endings",
                b"data: a\n\n",
                vec![t(b"data: a"), l(b"\n"), e(b"\n")],
            ),
            (
                "crlf endings",
                b"data: a\r\n\r\n",
                vec![t(b"data: a"), l(b"\r"), c(), e(b"\r"), c()],
            ),
            (
                "cr endings",
                b"data: a\rdata: b\r\r",
                vec![t(b"data: a"), l(b"\r"), t(b"data: b"), l(b"\r"), e(b"\r")],
            ),
            (
                "mixed endings",
                b"a\r\n\nb\n\r\n",
                vec![
                    t(b"a"),
                    l(b"\r"),
                    c(),
                    e(b"\n"),
                    t(b"b"),
                    l(b"\n"),
                    e(b"\r"),
                    c(),
                ],
            ),
            (
                "blank lines are empty events",
                b"\n\r\n\r",
                vec![e(b"\n"), e(b"\r"), c(), e(b"\r")],
            ),
            (
                "only one lf completes a cr",
                b"x\r\n\n",
                vec![t(b"x"), l(b"\r"), c(), e(b"\n")],
            ),
            (
                "cr cr lf",
                b"x\r\r\n",
                vec![t(b"x"), l(b"\r"), e(b"\r"), c()],
            ),
            (
                "comments and fields are text",
                b": ping\nevent: x\ndata\n\n",
                vec![
                    t(b": ping"),
                    l(b"\n"),
                    t(b"event: x"),
                    l(b"\n"),
                    t(b"data"),
                    l(b"\n"),
                    e(b"\n"),
                ],
            ),
            (
                "a bom is text to the framer",
                b"\xEF\xBB\xBF\n\n",
                vec![t(b"\xEF\xBB\xBF"), l(b"\n"), e(b"\n")],
            ),
            (
                "unterminated line",
                b"data: 1\n\ndata: 2",
                vec![t(b"data: 1"), l(b"\n"), e(b"\n"), t(b"data: 2")],
            ),
            (
                "other control bytes are text",
                b"a\0\x0b\x0cb\n\n",
                vec![t(b"a\0\x0b\x0cb"), l(b"\n"), e(b"\n")],
            ),
        ];
        for (name, input, want) in &table {
            assert_eq!(&pieces(&[input]), want, "{name}");
            let joined: Vec<u8> = want.iter().flat_map(|(_, b)| b.clone()).collect();
            assert_eq!(&joined, input, "{name}: the pieces add up to the input");
            for split in 0..=input.len() {
                let (a, b) = input.split_at(split);
                assert_eq!(&pieces(&[a, b]), want, "{name} split at {split}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(&pieces(&bytes), want, "{name} bytewise");
        }
    }

    fn split(chunks: &[&[u8]]) -> (Vec<Bytes>, Option<Bytes>) {
        let mut splitter = SseSplitter::default();
        let mut out = Vec::new();
        for chunk in chunks {
            splitter.push(chunk, &mut out);
        }
        (out, splitter.finish())
    }

    #[test]
    fn the_framer_cuts_at_empty_lines_for_every_line_ending_and_split() {
        let body: &[u8] = b"data: a\n\nevent: x\r\ndata: b\r\n\r\ndata: c\r\rdata: d";
        let whole = split(&[body]);
        assert_eq!(
            whole.0,
            vec![
                Bytes::from_static(b"data: a\n\n"),
                Bytes::from_static(b"event: x\r\ndata: b\r\n\r"),
                Bytes::from_static(b"\ndata: c\r\r"),
            ]
        );
        assert_eq!(whole.1, Some(Bytes::from_static(b"data: d")));
        // Split anywhere, the same bytes come out in the same events.
        for cut in 0..=body.len() {
            let (head, tail) = body.split_at(cut);
            assert_eq!(split(&[head, tail]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(split(&bytes), whole);
    }

    #[test]
    fn splitter_table() {
        type Case<'a> = (&'a str, &'a [u8], &'a [&'a [u8]], Option<&'a [u8]>);
        let table: &[Case] = &[
            ("empty stream", b"", &[], None),
            (
                "two events",
                b"data: 1\n\ndata: 2\n\n",
                &[b"data: 1\n\n", b"data: 2\n\n"],
                None,
            ),
            ("blank lines", b"\n\n", &[b"\n", b"\n"], None),
            (
                "the lf ending an event's crlf starts the next",
                b"data: 1\r\n\r\ndata: 2\r\n\r\n",
                &[b"data: 1\r\n\r", b"\ndata: 2\r\n\r"],
                Some(b"\n"),
            ),
            (
                "cr endings",
                b"data: 1\r\rdata: 2\r\r",
                &[b"data: 1\r\r", b"data: 2\r\r"],
                None,
            ),
            (
                "a bom stays",
                b"\xEF\xBB\xBFdata: 1\n\n",
                &[b"\xEF\xBB\xBFdata: 1\n\n"],
                None,
            ),
            (
                "comments belong to their event",
                b": ping\n\ndata: 1\n: x\n\n",
                &[b": ping\n\n", b"data: 1\n: x\n\n"],
                None,
            ),
            (
                "unterminated event",
                b"data: 1\n\ndata: 2\n",
                &[b"data: 1\n\n"],
                Some(b"data: 2\n"),
            ),
        ];
        for (name, input, events, rest) in table {
            let want: (Vec<Bytes>, Option<Bytes>) = (
                events.iter().map(|e| Bytes::copy_from_slice(e)).collect(),
                rest.map(Bytes::copy_from_slice),
            );
            assert_eq!(split(&[input]), want, "{name}");
            for cut in 0..=input.len() {
                let (a, b) = input.split_at(cut);
                assert_eq!(split(&[a, b]), want, "{name} split at {cut}");
            }
            let bytes: Vec<&[u8]> = input.chunks(1).collect();
            assert_eq!(split(&bytes), want, "{name} bytewise");
        }
    }

    fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
        let byte = prop_oneof![
            3 => prop::sample::select(b"\n\r: dataeventid\xEF\xBB\xBF".to_vec()),
            1 => any::<u8>(),
        ];
        prop::collection::vec(byte, 0..200)
    }

    proptest! {
        #[test]
        fn chunked_equals_whole(input in sse_bytes(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8), max in prop_oneof![Just(DEFAULT_MAX_LINE), 1usize..24]) {
            let whole = decode_chunks(&[&input], max);
            let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            offsets.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for offset in offsets {
                chunks.push(&input[start..offset]);
                start = offset;
            }
            chunks.push(&input[start..]);
            prop_assert_eq!(decode_chunks(&chunks, max), whole);
        }

        #[test]
        fn the_splitter_gives_back_the_stream_in_the_same_events_for_every_chunking(input in sse_bytes(), cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8)) {
            let whole = split(&[&input]);
            let mut joined: Vec<u8> = whole.0.iter().flat_map(|e| e.to_vec()).collect();
            joined.extend_from_slice(whole.1.as_deref().unwrap_or_default());
            prop_assert_eq!(&joined, &input);
            let mut offsets: Vec<usize> = cuts.iter().map(|c| c.index(input.len() + 1)).collect();
            offsets.sort_unstable();
            let mut chunks = Vec::new();
            let mut start = 0;
            for offset in offsets {
                chunks.push(&input[start..offset]);
                start = offset;
            }
            chunks.push(&input[start..]);
            prop_assert_eq!(split(&chunks), whole);
        }
    }
}
