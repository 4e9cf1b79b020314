//! Changing an answer's text in place: masking spans, and rewriting the text fields of a JSON
//! body or of one server-sent event while keeping everything else the upstream sent.

use bytes::Bytes;
use serde_json::Value;

use crate::capture::{Route, SseDecoder};

/// Replaces spans of `text` (byte ranges, possibly overlapping) with `with`. Spans that do not
/// fall on character boundaries are skipped.
pub fn mask(text: &str, spans: &[(usize, usize)], with: &str) -> String {
    let valid: Vec<(usize, usize)> = spans
        .iter()
        .copied()
        .filter(|&(start, end)| start < end && text.get(start..end).is_some())
        .collect();
    masked_piece(text, 0, text.len(), &merge(valid), with).unwrap_or_else(|| text.to_owned())
}

/// Sorts spans and merges the ones that overlap (or touch) into one.
pub fn merge(mut spans: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    spans.retain(|&(start, end)| start < end);
    spans.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// What survives of `text[start..end]` under `spans` (merged and sorted): masked text is
/// dropped, and `with` stands where a span begins inside the range. A span that began before
/// `start` has had its placeholder already. `None` when a cut is off a character boundary.
pub fn masked_piece(
    text: &str,
    start: usize,
    end: usize,
    spans: &[(usize, usize)],
    with: &str,
) -> Option<String> {
    let mut out = String::with_capacity(end.saturating_sub(start));
    let mut at = start;
    for &(span_start, span_end) in spans {
        if span_end <= start || span_start >= end {
            continue;
        }
        if span_start > at {
            out.push_str(text.get(at..span_start)?);
        }
        if span_start >= start {
            out.push_str(with);
        }
        at = at.max(span_end.min(end));
    }
    if at < end {
        out.push_str(text.get(at..end)?);
    }
    Some(out)
}

/// Rewrites the answer text of each choice of a JSON body (`change(index, text)` returns the
/// new text, or `None` to keep it). `None` when the body is not in a shape this knows.
pub fn rewrite_body(
    route: Route,
    body: &[u8],
    change: &dyn Fn(u32, &str) -> Option<String>,
) -> Option<Bytes> {
    let mut value: Value = serde_json::from_slice(body).ok()?;
    let edit = |slot: &mut Value, index: u32| {
        if let Some(text) = slot.as_str()
            && let Some(new) = change(index, text)
        {
            *slot = Value::String(new);
        }
    };
    match route {
        Route::ChatCompletions | Route::Completions => {
            for (i, choice) in value
                .get_mut("choices")?
                .as_array_mut()?
                .iter_mut()
                .enumerate()
            {
                let index = choice_index(choice, i);
                let slot = if route == Route::ChatCompletions {
                    choice.get_mut("message")?.get_mut("content")?
                } else {
                    choice.get_mut("text")?
                };
                edit(slot, index);
            }
        }
        Route::AnthropicMessages => {
            let slots = text_parts(value.get_mut("content")?.as_array_mut()?, "text");
            if slots.len() != 1 {
                return None;
            }
            edit(slots.into_iter().next()?, 0);
        }
        Route::Responses => {
            let mut slots = Vec::new();
            for item in value.get_mut("output")?.as_array_mut()? {
                if item.get("type").and_then(Value::as_str) == Some("message")
                    && let Some(content) = item.get_mut("content").and_then(|c| c.as_array_mut())
                {
                    slots.extend(text_parts(content, "output_text"));
                }
            }
            if slots.len() != 1 {
                return None;
            }
            let slot = slots.into_iter().next()?;
            edit(slot, 0);
        }
        Route::Other => return None,
    }
    serde_json::to_vec(&value).ok().map(Bytes::from)
}

/// Where one event's text goes: the choice, and the byte range of that choice's text the event
/// added (as the capture parser counted it).
pub type Added = (u32, usize, usize);

/// Rewrites the text one server-sent event (`raw`, exactly one whole event) added to each
/// choice: `render(choice, start, end, original)` gives what replaces `original`, the bytes
/// `start..end` of that choice's text. The event's name, id and every other field stay;
/// the data is re-serialised. `None` when the event is not one whose text fields this knows
/// (the Responses API repeats the whole text in later events, so it is never rewritten), or
/// when its text fields do not add up to `added`.
pub fn rewrite_event(
    route: Route,
    raw: &[u8],
    added: &[Added],
    render: &dyn Fn(u32, usize, usize, &str) -> Option<String>,
) -> Option<Bytes> {
    let mut decoder = SseDecoder::default();
    let mut events = Vec::new();
    decoder.push(raw, &mut events);
    let [event] = events.as_slice() else {
        return None;
    };
    let mut value: Value = serde_json::from_str(&event.data).ok()?;
    let mut cursor: Vec<(u32, usize)> = added.iter().map(|&(c, start, _)| (c, start)).collect();
    for (choice, slot) in event_text_slots(route, &mut value)? {
        let original = slot.as_str()?;
        let at = cursor.iter_mut().find(|(c, _)| *c == choice)?;
        let end = at.1.checked_add(original.len())?;
        let new = render(choice, at.1, end, original)?;
        at.1 = end;
        *slot = Value::String(new);
    }
    // Every byte the parser counted must have come from a field rewritten here.
    let consumed = added
        .iter()
        .all(|&(c, _, end)| cursor.iter().any(|&(k, at)| k == c && at == end));
    if !consumed {
        return None;
    }
    let mut out = String::with_capacity(raw.len() + 16);
    if let Some(name) = &event.event {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    if let Some(id) = &event.id {
        out.push_str("id: ");
        out.push_str(id);
        out.push('\n');
    }
    out.push_str("data: ");
    out.push_str(&serde_json::to_string(&value).ok()?);
    out.push_str("\n\n");
    Some(Bytes::from(out))
}

/// The text fields of one streamed event, in the order the capture parser reads them.
fn event_text_slots(route: Route, value: &mut Value) -> Option<Vec<(u32, &mut Value)>> {
    let mut slots = Vec::new();
    match route {
        Route::ChatCompletions | Route::Completions => {
            let choices = match value.get_mut("choices") {
                Some(choices) => choices.as_array_mut()?,
                None => return Some(slots),
            };
            for (i, choice) in choices.iter_mut().enumerate() {
                let index = choice_index(choice, i);
                if route == Route::Completions {
                    if let Some(text) = choice.get_mut("text").filter(|t| t.is_string()) {
                        slots.push((index, text));
                    }
                    continue;
                }
                let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut) else {
                    continue;
                };
                // The parser reads `content`, then `refusal`.
                let mut fields: Vec<(u8, &mut Value)> = delta
                    .iter_mut()
                    .filter(|(_, v)| v.is_string())
                    .filter_map(|(k, v)| match k.as_str() {
                        "content" => Some((0, v)),
                        "refusal" => Some((1, v)),
                        _ => None,
                    })
                    .collect();
                fields.sort_by_key(|(rank, _)| *rank);
                slots.extend(fields.into_iter().map(|(_, v)| (index, v)));
            }
        }
        Route::AnthropicMessages => {
            let kind = value.get("type").and_then(Value::as_str).map(str::to_owned);
            let (holder, wanted) = match kind.as_deref() {
                Some("content_block_delta") => ("delta", "text_delta"),
                Some("content_block_start") => ("content_block", "text"),
                _ => return Some(slots),
            };
            if let Some(part) = value.get_mut(holder)
                && part.get("type").and_then(Value::as_str) == Some(wanted)
                && let Some(text) = part.get_mut("text").filter(|t| t.is_string())
            {
                slots.push((0, text));
            }
        }
        Route::Responses | Route::Other => return None,
    }
    Some(slots)
}

fn choice_index(choice: &Value, position: usize) -> u32 {
    choice
        .get("index")
        .and_then(Value::as_u64)
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or(u32::try_from(position).unwrap_or(u32::MAX))
}

fn text_parts<'a>(content: &'a mut [Value], kind: &str) -> Vec<&'a mut Value> {
    content
        .iter_mut()
        .filter(|part| part.get("type").and_then(Value::as_str) == Some(kind))
        .filter_map(|part| part.get_mut("text"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_merges_overlapping_spans_and_skips_ones_off_char_boundaries() {
        assert_eq!(
            mask("a ZORB b ZORB", &[(9, 13), (2, 6)], "[x]"),
            "a [x] b [x]"
        );
        assert_eq!(mask("abcdef", &[(1, 4), (2, 5)], "_"), "a_f");
        // "é" is two bytes: a span ending inside it is not applied.
        assert_eq!(mask("é!", &[(0, 1)], "_"), "é!");
        assert_eq!(mask("text", &[], "_"), "text");
    }

    #[test]
    fn masked_pieces_put_one_placeholder_where_a_span_starts() {
        let text = "say ZORBZORB now";
        let spans = [(4, 12)];
        // The span starts in the first piece and ends in the third.
        let pieces: Vec<String> = [(0, 6), (6, 10), (10, 16)]
            .iter()
            .map(|&(a, b)| masked_piece(text, a, b, &spans, "[m]").unwrap())
            .collect();
        assert_eq!(pieces, ["say [m]", "", " now"]);
        assert_eq!(pieces.concat(), mask(text, &spans, "[m]"));
        assert_eq!(masked_piece("é", 0, 1, &[], "_"), None);
    }

    #[test]
    fn rewrite_body_replaces_chat_and_anthropic_text_in_place() {
        let chat = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"bad"}}]}"#;
        let out =
            rewrite_body(Route::ChatCompletions, chat, &|_, t| Some(t.to_uppercase())).unwrap();
        let json: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["choices"][0]["message"]["content"], "BAD");
        let anthropic = br#"{"type":"message","content":[{"type":"text","text":"bad"}]}"#;
        let out = rewrite_body(Route::AnthropicMessages, anthropic, &|_, _| {
            Some("ok".into())
        })
        .unwrap();
        let json: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["content"][0]["text"], "ok");
        assert!(rewrite_body(Route::ChatCompletions, b"not json", &|_, _| None).is_none());
    }

    fn upper(_: u32, _: usize, _: usize, text: &str) -> Option<String> {
        Some(text.to_uppercase())
    }

    #[test]
    fn rewrite_event_changes_only_the_text_fields() {
        let raw = b"id: 7\ndata: {\"id\":\"c1\",\"choices\":[{\"index\":1,\"delta\":{\"content\":\"ab\"}}]}\r\n\r\n";
        let out = rewrite_event(Route::ChatCompletions, raw, &[(1, 5, 7)], &upper).unwrap();
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "id: 7\ndata: {\"choices\":[{\"delta\":{\"content\":\"AB\"},\"index\":1}],\"id\":\"c1\"}\n\n"
        );
        let anthropic = b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"hi\"}}\n\n";
        let out = rewrite_event(Route::AnthropicMessages, anthropic, &[(0, 0, 2)], &upper).unwrap();
        assert!(out.starts_with(b"event: content_block_delta\ndata: {"));
        assert!(String::from_utf8_lossy(&out).contains("\"text\":\"HI\""));
    }

    #[test]
    fn rewrite_event_refuses_what_it_cannot_account_for() {
        let raw = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ab\"}}]}\n\n";
        // The parser counted three bytes, the event holds two.
        assert!(rewrite_event(Route::ChatCompletions, raw, &[(0, 0, 3)], &upper).is_none());
        // Two events in one unit, or none.
        let two = [&raw[..], &raw[..]].concat();
        assert!(rewrite_event(Route::ChatCompletions, &two, &[(0, 0, 4)], &upper).is_none());
        assert!(rewrite_event(Route::ChatCompletions, b"data: x", &[], &upper).is_none());
        // The Responses API repeats the text later in the stream: never rewritten.
        let responses = b"data: {\"type\":\"response.output_text.delta\",\"delta\":\"ab\"}\n\n";
        assert!(rewrite_event(Route::Responses, responses, &[(0, 0, 2)], &upper).is_none());
    }
}
