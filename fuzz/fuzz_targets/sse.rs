//! The incremental SSE decoder: arbitrary bytes, split at fuzzer-chosen points, never panic;
//! the events, the partial flag and the error are the same as for the bytes in one chunk; no
//! event's data exceeds the line bound.
//!
//! Layout: byte 0 picks the line bound (odd: 1..=128 bytes, even: the default 4 MiB); bytes
//! 1..3 are the split seed; the rest is the stream.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tripwire::capture::{DEFAULT_MAX_LINE, SseDecoder, SseError, SseEvent};
use tripwire_fuzz::{cuts, split};

fn decode(chunks: &[&[u8]], max: usize) -> (Vec<SseEvent>, bool, Option<SseError>) {
    let mut decoder = SseDecoder::with_max_line(max);
    let mut out = Vec::new();
    for chunk in chunks {
        decoder.push(chunk, &mut out);
    }
    decoder.finish(&mut out);
    (out, decoder.has_partial(), decoder.error().cloned())
}

fuzz_target!(|data: &[u8]| {
    let Some((&[bound, s0, s1], stream)) = data.split_first_chunk::<3>() else {
        return;
    };
    let max = if bound & 1 == 1 {
        usize::from(bound >> 1) + 1
    } else {
        DEFAULT_MAX_LINE
    };
    let whole = decode(&[stream], max);
    for event in &whole.0 {
        // Lossy UTF-8 may turn one byte into three.
        assert!(event.data.len() <= 3 * max, "event data over the bound");
    }
    let chunks = split(stream, &cuts(stream.len(), u16::from_le_bytes([s0, s1])));
    assert_eq!(decode(&chunks, max), whole, "chunking changed the events");
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(
        decode(&bytes, max),
        whole,
        "byte-by-byte changed the events"
    );
});
