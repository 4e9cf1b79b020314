//! Incremental server-sent-events decoder.
//!
//! Response capture feeds the teed body chunks of a `text/event-stream` response into an
//! [`SseDecoder`], which hands back every event a chunk completes. Decoding follows the WHATWG
//! "event stream interpretation" rules: `\n`, `\r\n` and `\r` line endings (a `\r\n` may be split
//! across chunks), comment lines starting with `:`, `data:` lines joined with `\n`, one optional
//! space after the colon, fields without a colon, and a UTF-8 byte order mark at the very start.
//!
//! Each input byte is scanned once: only the unfinished tail of a line is kept between chunks,
//! and that tail is bounded by a maximum line length (as is the data of one event). Going over the
//! bound puts the decoder into a sticky error state instead of growing without limit.

/// Default bound on one line, and on the data of one event: 4 MiB.
pub const DEFAULT_MAX_LINE: usize = 4 * 1024 * 1024;

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

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
    /// The unfinished line carried over from earlier chunks.
    line: Vec<u8>,
    /// The previous line ended with `\r`, so a `\n` starting the next chunk belongs to it.
    skip_lf: bool,
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
            line: Vec::new(),
            skip_lf: false,
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
        let mut rest = self.strip_bom(chunk);
        while !rest.is_empty() {
            if self.skip_lf {
                self.skip_lf = false;
                if let Some((b'\n', tail)) = rest.split_first() {
                    rest = tail;
                    continue;
                }
            }
            let Some(pos) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                if self.line.len() + rest.len() > self.max_line {
                    self.fail(SseError::LineTooLong { max: self.max_line });
                    return;
                }
                self.line.extend_from_slice(rest);
                return;
            };
            let (part, tail) = rest.split_at(pos);
            let Some((&terminator, tail)) = tail.split_first() else {
                return;
            };
            if self.line.len() + part.len() > self.max_line {
                self.fail(SseError::LineTooLong { max: self.max_line });
                return;
            }
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
            self.skip_lf = terminator == b'\r';
            rest = tail;
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
        self.skip_lf = false;
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
    fn strip_bom<'a>(&mut self, chunk: &'a [u8]) -> &'a [u8] {
        let Some(mut matched) = self.bom_matched else {
            return chunk;
        };
        let mut rest = chunk;
        while let Some((&b, tail)) = rest.split_first() {
            if BOM.get(matched) == Some(&b) {
                matched += 1;
                rest = tail;
                if matched == BOM.len() {
                    self.bom_matched = None;
                    return rest;
                }
            } else {
                // Not a BOM after all: the bytes held back start the first line (none of them
                // is a line terminator).
                self.line
                    .extend_from_slice(BOM.get(..matched).unwrap_or_default());
                self.bom_matched = None;
                return rest;
            }
        }
        self.bom_matched = Some(matched);
        rest
    }

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
    }
}
