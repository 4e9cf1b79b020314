//! Incremental response parsing: teed body chunks in, one [`ParsedResponse`] out.
//!
//! The proxy pushes each response chunk it forwards into a [`ResponseParser`] and calls
//! [`ResponseParser::finish`] when the body ends. The parser undoes the content-encoding
//! (gzip, zlib or raw deflate) as bytes arrive, then either decodes server-sent events as they
//! complete (`text/event-stream`) or buffers the body and parses it as JSON at the end. The
//! per-API formats live in [`super::openai`] and [`super::anthropic`]; they all fill the same
//! [`Accumulator`].
//!
//! Parsing never fails: whatever goes wrong is written to [`ParsedResponse::error`] and what was
//! understood before is kept. Memory is bounded by the capture limit: the buffered JSON body, and
//! the text and tool-call arguments of each choice, stop growing there.

use std::collections::BTreeMap;
use std::io::{self, Write};

use flate2::write::{DeflateDecoder, GzDecoder, ZlibDecoder};
use serde_json::Value;

use super::json::{object_at, str_at, type_name};
use super::providers::{anthropic, openai};
use super::sse::{SseDecoder, SseEvent};
use super::{Choice, ParsedResponse, Route, ToolCall, Usage};

/// Default capture limit: the most bytes of JSON body buffered, and of text kept per choice.
pub const DEFAULT_CAPTURE_LIMIT: usize = 8 * 1024 * 1024;

/// The most choices one response may have; more are ignored (with an error).
const MAX_CHOICES: usize = 128;
/// The most tool calls one choice may have; more are ignored (with an error).
const MAX_TOOL_CALLS: usize = 256;

/// Parses one response body incrementally; see the module docs.
pub struct ResponseParser {
    decoding: Decoding,
    /// The content-encoding as given, for error messages.
    encoding: String,
    /// Whether any body bytes arrived.
    saw_input: bool,
}

impl std::fmt::Debug for ResponseParser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseParser")
            .field("encoding", &self.encoding)
            .field("saw_input", &self.saw_input)
            .finish_non_exhaustive()
    }
}

/// The content-decoding stage, which owns the body sink it writes decoded bytes into.
enum Decoding {
    Identity(BodySink),
    Gzip(Box<GzDecoder<BodySink>>),
    Zlib(Box<ZlibDecoder<BodySink>>),
    Deflate(Box<DeflateDecoder<BodySink>>),
    /// `deflate` before two bytes have told a zlib header from raw deflate.
    SniffDeflate(Vec<u8>, BodySink),
    /// Decoding failed or the encoding is unsupported: further input is dropped.
    Failed(BodySink),
}

impl ResponseParser {
    /// A parser for a response on `route` with the given headers, with the default capture limit.
    pub fn new(
        route: Route,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
    ) -> ResponseParser {
        ResponseParser::with_limit(route, content_type, content_encoding, DEFAULT_CAPTURE_LIMIT)
    }

    /// Like [`ResponseParser::new`], with a capture limit of `limit` bytes.
    pub fn with_limit(
        route: Route,
        content_type: Option<&str>,
        content_encoding: Option<&str>,
        limit: usize,
    ) -> ResponseParser {
        let mut sink = BodySink::new(route, content_type, limit);
        let encoding = content_encoding.unwrap_or_default().trim().to_owned();
        let decoding = match encoding.to_ascii_lowercase().as_str() {
            "" | "identity" => Decoding::Identity(sink),
            "gzip" | "x-gzip" => Decoding::Gzip(Box::new(GzDecoder::new(sink))),
            "deflate" => Decoding::SniffDeflate(Vec::new(), sink),
            _ => {
                sink.acc
                    .error(format!("unsupported content-encoding {encoding}"));
                Decoding::Failed(sink)
            }
        };
        ResponseParser {
            decoding,
            encoding,
            saw_input: false,
        }
    }

    /// Feeds the next chunk of the response body, as it came over the wire.
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.is_empty() {
            return;
        }
        self.saw_input = true;
        let result = match &mut self.decoding {
            Decoding::Identity(sink) => {
                sink.feed(chunk);
                Ok(())
            }
            Decoding::Gzip(d) => write_lenient(d.as_mut(), chunk),
            Decoding::Zlib(d) => write_lenient(d.as_mut(), chunk),
            Decoding::Deflate(d) => write_lenient(d.as_mut(), chunk),
            Decoding::SniffDeflate(head, _) => {
                head.extend_from_slice(chunk);
                if head.len() >= 2 {
                    self.resolve_deflate()
                } else {
                    Ok(())
                }
            }
            Decoding::Failed(_) => Ok(()),
        };
        if let Err(e) = result {
            self.fail(&e);
        }
    }

    /// The text of each choice understood so far (an SSE stream in progress), by index.
    /// A compressed body contributes what has been decoded so far.
    pub fn texts_so_far(&self) -> impl Iterator<Item = (u32, &str)> {
        let sink = match &self.decoding {
            Decoding::Identity(sink) | Decoding::Failed(sink) | Decoding::SniffDeflate(_, sink) => {
                Some(sink)
            }
            Decoding::Gzip(d) => Some(d.get_ref()),
            Decoding::Zlib(d) => Some(d.get_ref()),
            Decoding::Deflate(d) => Some(d.get_ref()),
        };
        sink.into_iter()
            .flat_map(|s| s.acc.choices.iter().map(|(i, c)| (*i, c.text.as_str())))
    }

    /// Ends the body and returns what was understood of it.
    pub fn finish(mut self) -> ParsedResponse {
        let mut result = Ok(());
        if matches!(self.decoding, Decoding::SniffDeflate(..)) {
            result = self.resolve_deflate();
        }
        if result.is_ok() && self.saw_input {
            result = match &mut self.decoding {
                Decoding::Gzip(d) => d.try_finish(),
                Decoding::Zlib(d) => d.try_finish(),
                Decoding::Deflate(d) => d.try_finish(),
                Decoding::Identity(_) | Decoding::SniffDeflate(..) | Decoding::Failed(_) => Ok(()),
            };
        }
        if let Err(e) = result {
            self.fail(&e);
        }
        take_sink(self.decoding).finish()
    }

    /// Picks zlib or raw deflate from the buffered first bytes, and feeds them through.
    fn resolve_deflate(&mut self) -> io::Result<()> {
        let Decoding::SniffDeflate(head, sink) =
            std::mem::replace(&mut self.decoding, Decoding::Failed(BodySink::default()))
        else {
            return Ok(());
        };
        self.decoding = match head.as_slice() {
            [cmf, flg, ..]
                if cmf & 0x0F == 8 && (u16::from(*cmf) << 8 | u16::from(*flg)) % 31 == 0 =>
            {
                Decoding::Zlib(Box::new(ZlibDecoder::new(sink)))
            }
            _ => Decoding::Deflate(Box::new(DeflateDecoder::new(sink))),
        };
        match &mut self.decoding {
            Decoding::Zlib(d) => write_lenient(d.as_mut(), &head),
            Decoding::Deflate(d) => write_lenient(d.as_mut(), &head),
            _ => Ok(()),
        }
    }

    fn fail(&mut self, e: &io::Error) {
        let decoding = std::mem::replace(&mut self.decoding, Decoding::Failed(BodySink::default()));
        let mut sink = take_sink(decoding);
        sink.acc
            .error(format!("content-encoding {}: {e}", self.encoding));
        self.decoding = Decoding::Failed(sink);
    }
}

/// Takes the body sink out of a decoding stage (a dropped decoder flushes into a discarding one).
fn take_sink(decoding: Decoding) -> BodySink {
    match decoding {
        Decoding::Identity(sink) | Decoding::SniffDeflate(_, sink) | Decoding::Failed(sink) => sink,
        Decoding::Gzip(mut d) => std::mem::take(d.get_mut()),
        Decoding::Zlib(mut d) => std::mem::take(d.get_mut()),
        Decoding::Deflate(mut d) => std::mem::take(d.get_mut()),
    }
}

/// Writes all of `buf`; bytes after the end of the compressed stream are ignored.
fn write_lenient(w: &mut impl Write, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match w.write(buf) {
            Ok(0) => return Ok(()),
            Ok(n) => buf = buf.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Receives the decoded body: decodes events as they complete, or buffers JSON.
#[derive(Default)]
struct BodySink {
    mode: Mode,
    acc: Accumulator,
}

#[derive(Default)]
enum Mode {
    /// Nothing is parsed (route not captured, or a placeholder).
    #[default]
    Discard,
    Sse {
        decoder: SseDecoder,
        events: Vec<SseEvent>,
        error_reported: bool,
    },
    Json {
        body: Vec<u8>,
        overflow: bool,
    },
}

impl BodySink {
    fn new(route: Route, content_type: Option<&str>, limit: usize) -> BodySink {
        let mut acc = Accumulator::new(route, limit);
        let is_sse = content_type.is_some_and(|ct| {
            ct.trim_start()
                .get(..17)
                .is_some_and(|p| p.eq_ignore_ascii_case("text/event-stream"))
        });
        let mode = if !route.is_captured() {
            acc.error("route is not captured");
            Mode::Discard
        } else if is_sse {
            Mode::Sse {
                decoder: SseDecoder::default(),
                events: Vec::new(),
                error_reported: false,
            }
        } else {
            Mode::Json {
                body: Vec::new(),
                overflow: false,
            }
        };
        BodySink { mode, acc }
    }

    fn feed(&mut self, chunk: &[u8]) {
        match &mut self.mode {
            Mode::Discard => {}
            Mode::Sse {
                decoder,
                events,
                error_reported,
            } => {
                decoder.push(chunk, events);
                drain_events(&mut self.acc, decoder, events, error_reported);
            }
            Mode::Json { body, overflow } => {
                if *overflow {
                    return;
                }
                if body.len() + chunk.len() > self.acc.limit {
                    *overflow = true;
                    *body = Vec::new();
                    self.acc.error("body larger than capture limit");
                    return;
                }
                body.extend_from_slice(chunk);
            }
        }
    }

    fn finish(mut self) -> ParsedResponse {
        match &mut self.mode {
            Mode::Discard => {}
            Mode::Sse {
                decoder,
                events,
                error_reported,
            } => {
                decoder.finish(events);
                drain_events(&mut self.acc, decoder, events, error_reported);
            }
            Mode::Json { body, overflow } => {
                if !*overflow {
                    parse_json_body(&mut self.acc, body);
                }
            }
        }
        self.acc.finish()
    }
}

impl Write for BodySink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn drain_events(
    acc: &mut Accumulator,
    decoder: &SseDecoder,
    events: &mut Vec<SseEvent>,
    error_reported: &mut bool,
) {
    for event in events.drain(..) {
        let data = event.data.trim();
        // Some gateways end every stream with OpenAI's `[DONE]`; only OpenAI formats use it.
        if data.is_empty()
            || (data == "[DONE]"
                && matches!(acc.route, Route::Responses | Route::AnthropicMessages))
        {
            continue;
        }
        match acc.route {
            Route::ChatCompletions => openai::chat_event(acc, &event),
            Route::Completions => openai::completions_event(acc, &event),
            Route::Responses => openai::responses_event(acc, &event),
            Route::AnthropicMessages => anthropic::messages_event(acc, &event),
            Route::Other => {}
        }
    }
    if let Some(e) = decoder.error()
        && !*error_reported
    {
        *error_reported = true;
        acc.error(e.to_string());
    }
}

fn parse_json_body(acc: &mut Accumulator, body: &[u8]) {
    if body.iter().all(u8::is_ascii_whitespace) {
        acc.error("empty response body");
        return;
    }
    let v: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            acc.error(format!("invalid JSON response body: {e}"));
            return;
        }
    };
    if !v.is_object() {
        acc.error(format!(
            "response body is a JSON {}, not an object",
            type_name(&v)
        ));
        return;
    }
    if let Some(error) = object_at(&v, "error") {
        acc.upstream_error(error);
    }
    match acc.route {
        Route::ChatCompletions => openai::chat_json(acc, &v),
        Route::Completions => openai::completions_json(acc, &v),
        Route::Responses => openai::responses_json(acc, &v),
        Route::AnthropicMessages => anthropic::messages_json(acc, &v),
        Route::Other => {}
    }
    acc.mark_complete();
}

/// Parses an SSE event's data as a JSON object, recording an error when it is not one.
pub(super) fn event_json(acc: &mut Accumulator, event: &SseEvent) -> Option<Value> {
    match serde_json::from_str::<Value>(&event.data) {
        Ok(v) if v.is_object() => Some(v),
        Ok(v) => {
            acc.error(format!(
                "malformed SSE data: a JSON {}, not an object",
                type_name(&v)
            ));
            None
        }
        Err(e) => {
            acc.error(format!("malformed SSE data: {e}"));
            None
        }
    }
}

/// The state of one choice while it is being assembled.
#[derive(Debug, Default)]
struct ChoiceState {
    text: String,
    /// The text reached the capture limit and takes no more.
    text_full: bool,
    finish_reason: Option<String>,
    /// Tool calls keyed by their position in the stream (OpenAI's `index`, Anthropic's content
    /// block index, the responses API's output index).
    tool_calls: BTreeMap<u64, ToolCallState>,
}

/// A tool call being assembled.
#[derive(Debug, Default)]
struct ToolCallState {
    call: ToolCall,
    /// The arguments reached the capture limit and take no more.
    arguments_full: bool,
}

/// What the format parsers have understood so far; becomes the [`ParsedResponse`].
#[derive(Debug)]
pub(super) struct Accumulator {
    route: Route,
    limit: usize,
    model: Option<String>,
    choices: BTreeMap<u32, ChoiceState>,
    usage: Option<Usage>,
    complete: bool,
    error: Option<String>,
    more_errors: usize,
    /// The capture limit cut some text or arguments.
    truncated: bool,
    /// Choices or tool calls past their maximum were dropped.
    capped: bool,
}

impl Default for Accumulator {
    fn default() -> Self {
        Accumulator::new(Route::Other, DEFAULT_CAPTURE_LIMIT)
    }
}

impl Accumulator {
    fn new(route: Route, limit: usize) -> Accumulator {
        Accumulator {
            route,
            limit,
            model: None,
            choices: BTreeMap::new(),
            usage: None,
            complete: false,
            error: None,
            more_errors: 0,
            truncated: false,
            capped: false,
        }
    }

    /// Records the model, unless one is known already.
    pub(super) fn set_model(&mut self, model: Option<&str>) {
        if self.model.is_none()
            && let Some(model) = model.filter(|m| !m.is_empty())
        {
            self.model = Some(model.to_owned());
        }
    }

    /// Records an error; the first one is kept and later ones are counted.
    pub(super) fn error(&mut self, message: impl Into<String>) {
        if self.error.is_none() {
            self.error = Some(message.into());
        } else {
            self.more_errors += 1;
        }
    }

    /// Records an error object sent by the upstream (`{"message": …}` or a nested `error`).
    pub(super) fn upstream_error(&mut self, error: &Value) {
        let inner = object_at(error, "error").unwrap_or(error);
        let message = str_at(inner, "message")
            .or_else(|| str_at(error, "message"))
            .or_else(|| error.as_str())
            .or_else(|| str_at(error, "error"))
            .map_or_else(|| "(no message)".to_owned(), str::to_owned);
        self.error(format!("upstream error: {message}"));
    }

    /// Marks the response as having reached its proper end.
    pub(super) fn mark_complete(&mut self) {
        self.complete = true;
    }

    /// The usage record, created empty on first use.
    pub(super) fn usage(&mut self) -> &mut Usage {
        self.usage.get_or_insert_default()
    }

    /// Makes sure choice `index` exists, even with no text.
    pub(super) fn touch_choice(&mut self, index: u32) {
        self.choice(index);
    }

    fn choice(&mut self, index: u32) -> Option<&mut ChoiceState> {
        if !self.choices.contains_key(&index) && self.choices.len() >= MAX_CHOICES {
            self.note_capped(format!("more than {MAX_CHOICES} choices"));
            return None;
        }
        Some(self.choices.entry(index).or_default())
    }

    /// Whether choice `index` has neither text nor tool calls yet.
    pub(super) fn choice_is_empty(&self, index: u32) -> bool {
        self.choices
            .get(&index)
            .is_none_or(|c| c.text.is_empty() && c.tool_calls.is_empty())
    }

    /// Appends generated text to choice `index`, up to the capture limit.
    pub(super) fn push_text(&mut self, index: u32, text: &str) {
        let limit = self.limit;
        let Some(choice) = self.choice(index) else {
            return;
        };
        if push_bounded(&mut choice.text, &mut choice.text_full, text, limit) {
            self.note_truncated();
        }
    }

    /// Sets choice `index`'s finish reason when `reason` is given.
    pub(super) fn set_finish_reason(&mut self, index: u32, reason: Option<&str>) {
        if let Some(reason) = reason
            && let Some(choice) = self.choice(index)
        {
            choice.finish_reason = Some(reason.to_owned());
        }
    }

    /// The tool call at `key` of choice `index`, created empty on first use.
    fn tool_call(&mut self, index: u32, key: u64) -> Option<&mut ToolCallState> {
        let full = {
            let choice = self.choice(index)?;
            !choice.tool_calls.contains_key(&key) && choice.tool_calls.len() >= MAX_TOOL_CALLS
        };
        if full {
            self.note_capped(format!("more than {MAX_TOOL_CALLS} tool calls in a choice"));
            return None;
        }
        Some(self.choice(index)?.tool_calls.entry(key).or_default())
    }

    /// Sets a tool call's id and name where given and not yet known.
    pub(super) fn name_tool_call(
        &mut self,
        index: u32,
        key: u64,
        id: Option<&str>,
        name: Option<&str>,
    ) {
        let Some(ToolCallState { call, .. }) = self.tool_call(index, key) else {
            return;
        };
        if call.id.is_none()
            && let Some(id) = id.filter(|id| !id.is_empty())
        {
            call.id = Some(id.to_owned());
        }
        if call.name.is_empty()
            && let Some(name) = name
        {
            call.name = name.to_owned();
        }
    }

    /// Appends argument text to a tool call, up to the capture limit.
    pub(super) fn push_arguments(&mut self, index: u32, key: u64, arguments: &str) {
        let limit = self.limit;
        let Some(state) = self.tool_call(index, key) else {
            return;
        };
        if push_bounded(
            &mut state.call.arguments,
            &mut state.arguments_full,
            arguments,
            limit,
        ) {
            self.note_truncated();
        }
    }

    fn note_truncated(&mut self) {
        if !self.truncated {
            self.truncated = true;
            self.error("output larger than capture limit");
        }
    }

    fn note_capped(&mut self, message: String) {
        if !self.capped {
            self.capped = true;
            self.error(message);
        }
    }

    fn finish(self) -> ParsedResponse {
        let error = self.error.map(|e| match self.more_errors {
            0 => e,
            n => format!("{e} (and {n} more)"),
        });
        ParsedResponse {
            model: self.model,
            choices: self
                .choices
                .into_iter()
                .map(|(index, c)| Choice {
                    index,
                    text: c.text,
                    finish_reason: c.finish_reason,
                    tool_calls: c.tool_calls.into_values().map(|t| t.call).collect(),
                })
                .collect(),
            usage: self.usage,
            complete: self.complete,
            error,
        }
    }
}

/// Appends as much of `s` to `dst` as keeps it within `limit` bytes (on a character boundary).
/// Once something was cut, `full` is set and nothing more is appended. Returns whether this call
/// cut something.
fn push_bounded(dst: &mut String, full: &mut bool, s: &str, limit: usize) -> bool {
    if *full {
        return false;
    }
    let room = limit.saturating_sub(dst.len());
    if s.len() <= room {
        dst.push_str(s);
        return false;
    }
    let cut = s.floor_char_boundary(room);
    dst.push_str(s.get(..cut).unwrap_or_default());
    *full = true;
    true
}

#[cfg(test)]
mod tests;
