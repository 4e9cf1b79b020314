//! Anthropic messages response format, whole and streamed.
//!
//! A message has one choice (index 0). Its `text` content blocks are concatenated into the
//! choice's text and its `tool_use` blocks become tool calls keyed by content block index, whose
//! arguments are the JSON input (streamed as `input_json_delta` fragments).

use serde_json::Value;

use crate::capture::SseEvent;
use crate::capture::json::{array_at, object_at, str_at, u64_at};
use crate::capture::response::{Accumulator, event_json};

/// Reads Anthropic `usage` (`input_tokens`, `output_tokens`), keeping counts it does not carry.
fn read_usage(acc: &mut Accumulator, v: &Value) {
    if let Some(u) = object_at(v, "usage") {
        let usage = acc.usage();
        if let Some(n) = u64_at(u, "input_tokens") {
            usage.input_tokens = Some(n);
        }
        if let Some(n) = u64_at(u, "output_tokens") {
            usage.output_tokens = Some(n);
        }
    }
}

/// A non-streamed message.
pub(crate) fn messages_json(acc: &mut Accumulator, v: &Value) {
    acc.set_model(str_at(v, "model"));
    if v.get("content").is_some_and(Value::is_array) {
        acc.touch_choice(0);
    }
    for (position, block) in array_at(v, "content").iter().enumerate() {
        let key = u64::try_from(position).unwrap_or(u64::MAX);
        match str_at(block, "type") {
            Some("text") => acc.push_text(0, str_at(block, "text").unwrap_or_default()),
            Some("tool_use") => {
                acc.name_tool_call(0, key, str_at(block, "id"), str_at(block, "name"));
                if let Some(input) = block.get("input") {
                    acc.push_arguments(0, key, &input.to_string());
                }
            }
            _ => {}
        }
    }
    acc.set_finish_reason(0, str_at(v, "stop_reason"));
    read_usage(acc, v);
}

/// One streamed message event.
pub(crate) fn messages_event(acc: &mut Accumulator, event: &SseEvent) {
    let Some(v) = event_json(acc, event) else {
        return;
    };
    let index = u64_at(&v, "index").unwrap_or(0);
    match str_at(&v, "type").or(event.event.as_deref()) {
        Some("message_start") => {
            if let Some(message) = object_at(&v, "message") {
                acc.set_model(str_at(message, "model"));
                acc.touch_choice(0);
                read_usage(acc, message);
            }
        }
        Some("content_block_start") => {
            let Some(block) = object_at(&v, "content_block") else {
                return;
            };
            match str_at(block, "type") {
                Some("text") => acc.push_text(0, str_at(block, "text").unwrap_or_default()),
                Some("tool_use") => {
                    acc.name_tool_call(0, index, str_at(block, "id"), str_at(block, "name"));
                }
                _ => {}
            }
        }
        Some("content_block_delta") => {
            let Some(delta) = object_at(&v, "delta") else {
                return;
            };
            match str_at(delta, "type") {
                Some("text_delta") => acc.push_text(0, str_at(delta, "text").unwrap_or_default()),
                Some("input_json_delta") => {
                    acc.push_arguments(0, index, str_at(delta, "partial_json").unwrap_or_default());
                }
                _ => {}
            }
        }
        Some("message_delta") => {
            if let Some(delta) = object_at(&v, "delta") {
                acc.set_finish_reason(0, str_at(delta, "stop_reason"));
            }
            read_usage(acc, &v);
        }
        Some("message_stop") => acc.mark_complete(),
        Some("error") => acc.upstream_error(&v),
        _ => {}
    }
}
