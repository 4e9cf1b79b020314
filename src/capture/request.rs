//! Request body parsing: the model, the stream flag and the prompt as role-tagged text.
//!
//! Capture reads the request body the proxy buffered before forwarding it. Each API spells its
//! prompt differently; all of them are flattened here into [`Message`]s whose content is the text
//! parts joined with newlines. Fields of an unexpected type are skipped, never an error: only a
//! body that is not JSON, or whose top level is not an object, fails.

use serde_json::Value;

use super::json::{array_at, str_at, type_name};
use super::{CaptureError, Message, ParsedRequest, Route};

/// Parses a request body sent on `route`.
///
/// # Errors
///
/// [`CaptureError::NotCaptured`] for [`Route::Other`], [`CaptureError::Json`] when the body is
/// not JSON, and [`CaptureError::NotAnObject`] when its top level is not an object.
pub fn parse_request(route: Route, body: &[u8]) -> Result<ParsedRequest, CaptureError> {
    if route == Route::Other {
        return Err(CaptureError::NotCaptured);
    }
    let v: Value = serde_json::from_slice(body)?;
    if !v.is_object() {
        return Err(CaptureError::NotAnObject {
            found: type_name(&v),
        });
    }
    let prompt = match route {
        Route::ChatCompletions => chat_prompt(&v),
        Route::Completions => completions_prompt(&v),
        Route::Responses => responses_prompt(&v),
        Route::AnthropicMessages => anthropic_prompt(&v),
        Route::Other => Vec::new(),
    };
    Ok(ParsedRequest {
        model: str_at(&v, "model").map(str::to_owned),
        stream: v.get("stream").and_then(Value::as_bool).unwrap_or(false),
        prompt,
    })
}

fn message(role: &str, content: String) -> Message {
    Message {
        role: role.to_owned(),
        content,
    }
}

/// Joins with newlines the text that `text_of` finds in each of `parts`; parts where it finds
/// none are skipped.
fn join_parts<'a>(parts: &'a [Value], text_of: impl Fn(&'a Value) -> Option<&'a str>) -> String {
    let texts: Vec<&str> = parts.iter().filter_map(text_of).collect();
    texts.join("\n")
}

/// A message's `content`: a string, null, or an array of parts read by `text_of`.
fn content_text<'a>(
    content: Option<&'a Value>,
    text_of: impl Fn(&'a Value) -> Option<&'a str>,
) -> String {
    match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => join_parts(parts, text_of),
        _ => String::new(),
    }
}

fn typed_text<'a>(part: &'a Value, types: &[&str]) -> Option<&'a str> {
    match str_at(part, "type") {
        Some(t) if types.contains(&t) => str_at(part, "text"),
        _ => None,
    }
}

/// Chat completions: `messages[]` with string, null or array-of-parts content.
fn chat_prompt(v: &Value) -> Vec<Message> {
    array_at(v, "messages")
        .iter()
        .filter(|m| m.is_object())
        .map(|m| {
            let content = content_text(m.get("content"), |p| match str_at(p, "type") {
                Some("text") | None => str_at(p, "text"),
                Some("refusal") => str_at(p, "refusal"),
                Some(_) => None,
            });
            message(str_at(m, "role").unwrap_or_default(), content)
        })
        .collect()
}

/// Legacy completions: `prompt` as a string, strings, or token arrays.
fn completions_prompt(v: &Value) -> Vec<Message> {
    match v.get("prompt") {
        Some(Value::String(s)) => vec![message("user", s.clone())],
        Some(Value::Array(items)) if items.iter().all(Value::is_number) => {
            // One prompt given as token ids: the text is unknown.
            vec![message("user", String::new())]
        }
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|item| match item {
                Value::String(s) => Some(message("user", s.clone())),
                Value::Array(_) => Some(message("user", String::new())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// Responses: `instructions`, then `input` as a string or an array of items.
fn responses_prompt(v: &Value) -> Vec<Message> {
    let mut prompt = Vec::new();
    if let Some(instructions) = str_at(v, "instructions") {
        prompt.push(message("system", instructions.to_owned()));
    }
    match v.get("input") {
        Some(Value::String(s)) => prompt.push(message("user", s.clone())),
        Some(Value::Array(items)) => {
            for item in items {
                if let Some(role) = str_at(item, "role") {
                    let content = content_text(item.get("content"), |p| {
                        typed_text(p, &["input_text", "output_text", "text"])
                    });
                    prompt.push(message(role, content));
                } else if str_at(item, "type") == Some("function_call_output") {
                    let output = str_at(item, "output").unwrap_or_default();
                    prompt.push(message("tool", output.to_owned()));
                }
            }
        }
        _ => {}
    }
    prompt
}

/// Anthropic messages: `system`, then `messages[]` with string or block content.
fn anthropic_prompt(v: &Value) -> Vec<Message> {
    let mut prompt = Vec::new();
    match v.get("system") {
        Some(Value::String(s)) => prompt.push(message("system", s.clone())),
        Some(Value::Array(blocks)) => {
            prompt.push(message(
                "system",
                join_parts(blocks, |b| typed_text(b, &["text"])),
            ));
        }
        _ => {}
    }
    for m in array_at(v, "messages").iter().filter(|m| m.is_object()) {
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(blocks)) => {
                let texts: Vec<String> = blocks.iter().filter_map(anthropic_block_text).collect();
                texts.join("\n")
            }
            _ => String::new(),
        };
        prompt.push(message(str_at(m, "role").unwrap_or_default(), content));
    }
    prompt
}

/// The text of one Anthropic content block: `text`, or a `tool_result`'s text content.
fn anthropic_block_text(block: &Value) -> Option<String> {
    match str_at(block, "type")? {
        "text" => str_at(block, "text").map(str::to_owned),
        "tool_result" => match block.get("content") {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Array(inner)) => Some(join_parts(inner, |b| typed_text(b, &["text"]))),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs
            .iter()
            .map(|(r, c)| message(r, (*c).to_owned()))
            .collect()
    }

    #[test]
    fn parses_table() {
        /// Name, route, body, model, stream, prompt as (role, content) pairs.
        type Case<'a> = (
            &'a str,
            Route,
            &'a str,
            Option<&'a str>,
            bool,
            &'a [(&'a str, &'a str)],
        );
        let table: &[Case] = &[
            (
                "chat strings",
                Route::ChatCompletions,
                r#"{"model":"gpt-4o","stream":true,"messages":[
                    {"role":"system","content":"Be brief."},
                    {"role":"user","content":"Hi"}]}"#,
                Some("gpt-4o"),
                true,
                &[("system", "Be brief."), ("user", "Hi")],
            ),
            (
                "chat parts, null, tools",
                Route::ChatCompletions,
                r#"{"model":"gpt-4o","messages":[
                    {"role":"user","content":[{"type":"text","text":"What is"},
                        {"type":"image_url","image_url":{"url":"data:x"}},{"type":"text","text":"this?"}]},
                    {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function",
                        "function":{"name":"look","arguments":"{}"}}]},
                    {"role":"assistant","tool_calls":[]},
                    {"role":"tool","tool_call_id":"call_1","content":"a cat"},
                    {"role":"user","content":42},
                    "not a message"]}"#,
                Some("gpt-4o"),
                false,
                &[
                    ("user", "What is\nthis?"),
                    ("assistant", ""),
                    ("assistant", ""),
                    ("tool", "a cat"),
                    ("user", ""),
                ],
            ),
            (
                "chat wrong types skipped",
                Route::ChatCompletions,
                r#"{"model":7,"stream":"yes","messages":{"role":"user"}}"#,
                None,
                false,
                &[],
            ),
            (
                "completions string",
                Route::Completions,
                r#"{"model":"gpt-3.5-turbo-instruct","prompt":"Say this is a test","stream":true}"#,
                Some("gpt-3.5-turbo-instruct"),
                true,
                &[("user", "Say this is a test")],
            ),
            (
                "completions strings",
                Route::Completions,
                r#"{"prompt":["one","two"]}"#,
                None,
                false,
                &[("user", "one"), ("user", "two")],
            ),
            (
                "completions tokens",
                Route::Completions,
                r#"{"prompt":[1212,318,257]}"#,
                None,
                false,
                &[("user", "")],
            ),
            (
                "completions token batches",
                Route::Completions,
                r#"{"prompt":[[1,2],[3]]}"#,
                None,
                false,
                &[("user", ""), ("user", "")],
            ),
            (
                "responses string input",
                Route::Responses,
                r#"{"model":"gpt-4.1","instructions":"Talk like a pirate.","input":"Hello"}"#,
                Some("gpt-4.1"),
                false,
                &[("system", "Talk like a pirate."), ("user", "Hello")],
            ),
            (
                "responses items",
                Route::Responses,
                r#"{"model":"gpt-4.1","stream":true,"input":[
                    {"role":"developer","content":"Rules."},
                    {"type":"message","role":"user","content":[{"type":"input_text","text":"Look"},
                        {"type":"input_image","image_url":"https://x"}]},
                    {"type":"message","role":"assistant","content":[{"type":"output_text","text":"Ok"}]},
                    {"type":"function_call","call_id":"c1","name":"f","arguments":"{}"},
                    {"type":"function_call_output","call_id":"c1","output":"42"}]}"#,
                Some("gpt-4.1"),
                true,
                &[
                    ("developer", "Rules."),
                    ("user", "Look"),
                    ("assistant", "Ok"),
                    ("tool", "42"),
                ],
            ),
            (
                "anthropic string system",
                Route::AnthropicMessages,
                r#"{"model":"claude-sonnet-4-5","max_tokens":1024,"system":"You are terse.",
                    "messages":[{"role":"user","content":"Hello, Claude"}],"stream":true}"#,
                Some("claude-sonnet-4-5"),
                true,
                &[("system", "You are terse."), ("user", "Hello, Claude")],
            ),
            (
                "anthropic blocks",
                Route::AnthropicMessages,
                r#"{"model":"claude-sonnet-4-5","system":[{"type":"text","text":"A"},{"type":"text","text":"B",
                    "cache_control":{"type":"ephemeral"}}],
                    "messages":[
                    {"role":"user","content":[{"type":"image","source":{"type":"base64"}},{"type":"text","text":"Weather?"}]},
                    {"role":"assistant","content":[{"type":"text","text":"Checking."},
                        {"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
                    {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":"15C"},
                        {"type":"tool_result","tool_use_id":"toolu_2","content":[{"type":"text","text":"rain"}]}]}]}"#,
                Some("claude-sonnet-4-5"),
                false,
                &[
                    ("system", "A\nB"),
                    ("user", "Weather?"),
                    ("assistant", "Checking."),
                    ("user", "15C\nrain"),
                ],
            ),
        ];
        for (name, route, body, model, stream, prompt) in table {
            let got =
                parse_request(*route, body.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(got.model.as_deref(), *model, "{name}");
            assert_eq!(got.stream, *stream, "{name}");
            assert_eq!(got.prompt, msgs(prompt), "{name}");
        }
    }

    #[test]
    fn errors_table() {
        let table: &[(&str, Route, &[u8], &str)] = &[
            (
                "other route",
                Route::Other,
                br#"{"model":"x"}"#,
                "not_captured",
            ),
            (
                "invalid json",
                Route::ChatCompletions,
                b"{\"model\":",
                "json",
            ),
            ("empty body", Route::Completions, b"", "json"),
            (
                "invalid utf-8",
                Route::Responses,
                b"{\"model\":\"\xFF\"}",
                "json",
            ),
            (
                "array top level",
                Route::AnthropicMessages,
                b"[1]",
                "not_an_object",
            ),
            (
                "string top level",
                Route::ChatCompletions,
                b"\"hi\"",
                "not_an_object",
            ),
        ];
        for (name, route, body, kind) in table {
            let err = parse_request(*route, body).err();
            assert_eq!(err.as_ref().map(CaptureError::kind), Some(*kind), "{name}");
        }
        let err = parse_request(Route::ChatCompletions, b"{\n\"model\": }");
        let message = err.map_or_else(|e| e.to_string(), |_| String::new());
        assert!(message.contains("line 2 column"), "{message}");
    }
}
