//! OpenAI response formats: chat completions, legacy completions and the responses API.
//!
//! Each format has a JSON handler (the whole, non-streamed body) and an event handler (one
//! server-sent event of a streamed body). Both fill the response [`Accumulator`]: streamed
//! deltas are appended per choice index, and streamed tool-call fragments are merged by their
//! `index`.

use serde_json::Value;

use crate::capture::SseEvent;
use crate::capture::json::{array_at, object_at, str_at, u64_at};
use crate::capture::response::{Accumulator, event_json};

/// The key of a legacy `function_call`, kept apart from `tool_calls` indexes.
const LEGACY_FUNCTION_CALL: u64 = u64::MAX;

/// A choice's `index`, or its position in the array when missing.
fn choice_index(choice: &Value, position: usize) -> u32 {
    u64_at(choice, "index")
        .and_then(|i| u32::try_from(i).ok())
        .unwrap_or_else(|| u32::try_from(position).unwrap_or(u32::MAX))
}

/// `usage` with the given key names, when the body has a usage object.
fn read_usage(acc: &mut Accumulator, v: &Value, input: &str, output: &str) {
    if let Some(u) = object_at(v, "usage") {
        let usage = acc.usage();
        usage.input_tokens = u64_at(u, input);
        usage.output_tokens = u64_at(u, output);
        usage.total_tokens = u64_at(u, "total_tokens");
    }
}

/// Text of a chat message `content`: a string or an array of `text` parts, concatenated.
fn push_chat_content(acc: &mut Accumulator, index: u32, content: Option<&Value>) -> bool {
    match content {
        Some(Value::String(s)) => acc.push_text(index, s),
        Some(Value::Array(parts)) => {
            for part in parts {
                match str_at(part, "type") {
                    Some("text" | "output_text") | None => {
                        acc.push_text(index, str_at(part, "text").unwrap_or_default());
                    }
                    Some("refusal") => {
                        acc.push_text(index, str_at(part, "refusal").unwrap_or_default());
                    }
                    Some(_) => {}
                }
            }
        }
        _ => return false,
    }
    true
}

/// A non-streamed chat completion.
pub(crate) fn chat_json(acc: &mut Accumulator, v: &Value) {
    acc.set_model(str_at(v, "model"));
    for (position, choice) in array_at(v, "choices").iter().enumerate() {
        let index = choice_index(choice, position);
        acc.touch_choice(index);
        if let Some(message) = object_at(choice, "message") {
            if !push_chat_content(acc, index, message.get("content"))
                && let Some(refusal) = str_at(message, "refusal")
            {
                acc.push_text(index, refusal);
            }
            for (key, call) in array_at(message, "tool_calls").iter().enumerate() {
                let key = u64::try_from(key).unwrap_or(u64::MAX - 1);
                tool_call_delta(acc, index, key, call);
            }
            if let Some(call) = object_at(message, "function_call") {
                function_delta(acc, index, LEGACY_FUNCTION_CALL, Some(call));
            }
        }
        acc.set_finish_reason(index, str_at(choice, "finish_reason"));
    }
    read_usage(acc, v, "prompt_tokens", "completion_tokens");
}

/// A non-streamed legacy completion.
pub(crate) fn completions_json(acc: &mut Accumulator, v: &Value) {
    acc.set_model(str_at(v, "model"));
    completions_choices(acc, v);
    read_usage(acc, v, "prompt_tokens", "completion_tokens");
}

fn completions_choices(acc: &mut Accumulator, v: &Value) {
    for (position, choice) in array_at(v, "choices").iter().enumerate() {
        let index = choice_index(choice, position);
        acc.touch_choice(index);
        if let Some(text) = str_at(choice, "text") {
            acc.push_text(index, text);
        }
        acc.set_finish_reason(index, str_at(choice, "finish_reason"));
    }
}

/// Merges one tool-call object (whole or a stream fragment) into the call at `key`.
fn tool_call_delta(acc: &mut Accumulator, index: u32, key: u64, call: &Value) {
    acc.name_tool_call(index, key, str_at(call, "id"), None);
    function_delta(acc, index, key, object_at(call, "function"));
}

/// Merges a `function` object (`name`, `arguments`) into the call at `key`.
fn function_delta(acc: &mut Accumulator, index: u32, key: u64, function: Option<&Value>) {
    let name = function.and_then(|f| str_at(f, "name"));
    acc.name_tool_call(index, key, None, name);
    if let Some(arguments) = function.and_then(|f| str_at(f, "arguments")) {
        acc.push_arguments(index, key, arguments);
    }
}

/// The part shared by chat and completions chunks: `[DONE]`, errors, model and usage. Returns
/// the chunk when its choices are still to be read.
fn openai_chunk(acc: &mut Accumulator, event: &SseEvent) -> Option<Value> {
    if event.data.trim() == "[DONE]" {
        acc.mark_complete();
        return None;
    }
    let v = event_json(acc, event)?;
    if let Some(error) = object_at(&v, "error") {
        acc.upstream_error(error);
        return None;
    }
    if event.event.as_deref() == Some("error") {
        acc.upstream_error(&v);
        return None;
    }
    acc.set_model(str_at(&v, "model"));
    read_usage(acc, &v, "prompt_tokens", "completion_tokens");
    Some(v)
}

/// One streamed chat completion chunk.
pub(crate) fn chat_event(acc: &mut Accumulator, event: &SseEvent) {
    let Some(v) = openai_chunk(acc, event) else {
        return;
    };
    for (position, choice) in array_at(&v, "choices").iter().enumerate() {
        let index = choice_index(choice, position);
        acc.touch_choice(index);
        if let Some(delta) = object_at(choice, "delta") {
            if let Some(content) = str_at(delta, "content") {
                acc.push_text(index, content);
            }
            if let Some(refusal) = str_at(delta, "refusal") {
                acc.push_text(index, refusal);
            }
            for (position, call) in array_at(delta, "tool_calls").iter().enumerate() {
                let key = u64_at(call, "index")
                    .unwrap_or_else(|| u64::try_from(position).unwrap_or(u64::MAX - 1));
                tool_call_delta(acc, index, key, call);
            }
            if let Some(call) = object_at(delta, "function_call") {
                function_delta(acc, index, LEGACY_FUNCTION_CALL, Some(call));
            }
        }
        acc.set_finish_reason(index, str_at(choice, "finish_reason"));
    }
}

/// One streamed legacy completion chunk.
pub(crate) fn completions_event(acc: &mut Accumulator, event: &SseEvent) {
    if let Some(v) = openai_chunk(acc, event) {
        completions_choices(acc, &v);
    }
}

/// The `output` items of a responses API `response` object: message text into choice 0, function
/// calls into its tool calls keyed by output position.
fn responses_output(acc: &mut Accumulator, response: &Value) {
    for (position, item) in array_at(response, "output").iter().enumerate() {
        let key = u64::try_from(position).unwrap_or(u64::MAX);
        match str_at(item, "type") {
            Some("message") => {
                for part in array_at(item, "content") {
                    match str_at(part, "type") {
                        Some("output_text") => {
                            acc.push_text(0, str_at(part, "text").unwrap_or_default());
                        }
                        Some("refusal") => {
                            acc.push_text(0, str_at(part, "refusal").unwrap_or_default());
                        }
                        _ => {}
                    }
                }
            }
            Some("function_call") => function_call_item(acc, key, item),
            _ => {}
        }
    }
}

/// A responses API `function_call` output item.
fn function_call_item(acc: &mut Accumulator, key: u64, item: &Value) {
    let id = str_at(item, "call_id").or_else(|| str_at(item, "id"));
    acc.name_tool_call(0, key, id, str_at(item, "name"));
    if let Some(arguments) = str_at(item, "arguments") {
        acc.push_arguments(0, key, arguments);
    }
}

/// The top-level fields of a responses API `response` object, streamed or not.
fn response_object(acc: &mut Accumulator, response: &Value) {
    acc.set_model(str_at(response, "model"));
    if response.get("output").is_some_and(Value::is_array) || response.get("status").is_some() {
        acc.touch_choice(0);
    }
    acc.set_finish_reason(0, str_at(response, "status"));
    read_usage(acc, response, "input_tokens", "output_tokens");
}

/// A non-streamed responses API body.
pub(crate) fn responses_json(acc: &mut Accumulator, v: &Value) {
    responses_output(acc, v);
    response_object(acc, v);
}

/// One streamed responses API event.
pub(crate) fn responses_event(acc: &mut Accumulator, event: &SseEvent) {
    let Some(v) = event_json(acc, event) else {
        return;
    };
    let kind = str_at(&v, "type").or(event.event.as_deref());
    let output_index = u64_at(&v, "output_index").unwrap_or(0);
    match kind {
        Some("response.created" | "response.in_progress" | "response.queued") => {
            if let Some(response) = object_at(&v, "response") {
                acc.set_model(str_at(response, "model"));
            }
        }
        Some("response.output_text.delta" | "response.refusal.delta") => {
            acc.push_text(0, str_at(&v, "delta").unwrap_or_default());
        }
        Some("response.output_item.added") => {
            if let Some(item) = object_at(&v, "item")
                && str_at(item, "type") == Some("function_call")
            {
                function_call_item(acc, output_index, item);
            }
        }
        Some("response.function_call_arguments.delta") => {
            acc.push_arguments(0, output_index, str_at(&v, "delta").unwrap_or_default());
        }
        Some(end @ ("response.completed" | "response.incomplete" | "response.failed")) => {
            let Some(response) = object_at(&v, "response") else {
                acc.error(format!("malformed SSE data: {end} without a response"));
                return;
            };
            if acc.choice_is_empty(0) {
                // Nothing was streamed (or the deltas were lost): the final object has it all.
                responses_output(acc, response);
            }
            response_object(acc, response);
            if end == "response.failed" {
                acc.upstream_error(object_at(response, "error").unwrap_or(response));
            } else {
                acc.mark_complete();
            }
        }
        Some("error") => acc.upstream_error(&v),
        _ => {}
    }
}
