//! Enforce mode on the request path: the only place where the client waits for a detector,
//! and only when an enforce-mode policy has a `block` or `mask` rule whose scope admits the
//! request. Every other request takes the plain tee path untouched.
//!
//! * A non-streamed answer is buffered (up to `limits.max_capture_body_bytes`), judged on a
//!   blocking thread within the policy's `timeout`, and forwarded, masked, replaced or answered
//!   with the configured error.
//! * A stream is judged as its chunks arrive, on the text so far of each choice. With
//!   `hold_back_tokens`, chunks are released only once that much text (4 bytes per token)
//!   follows them, so a span is stopped before the client sees it; without, blocking is best
//!   effort. A block ends the stream with an SSE `error` event and no `[DONE]`.
//!
//! The capture tee sits below this layer, so the flag log always gets the original answer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Gateway;
use super::service::ProxyBody;
use super::tee::{BodyError, TeeBody};
use crate::capture::{Exchange, ResponseParser, Route, parse_request};
use crate::policy::{BlockResponse, Decision, EnforcePlan, Enforced, Engine, FailMode};
use crate::telemetry::Metrics;

/// Bytes of text counted as one token for `hold_back_tokens`.
pub const BYTES_PER_TOKEN: usize = 4;

/// What one request needs to be judged: the rules in force when it arrived, the plan, and
/// the request as detectors see it.
#[derive(Debug)]
pub struct Enforcer {
    engine: Arc<Engine>,
    plan: EnforcePlan,
    exchange: Exchange,
    route: Route,
    metrics: Metrics,
    /// Where what was done goes: the capture task waits for it (or for this to be dropped)
    /// once the body has ended, so the flag records it.
    done: Mutex<Option<oneshot::Sender<Enforced>>>,
    /// The receiving end, until the capture task takes it.
    outcome: Option<oneshot::Receiver<Enforced>>,
}

impl Enforcer {
    /// The enforcer of a request, when an enforce-mode blocking rule applies to it. Costs one
    /// atomic load and one boolean test when no policy enforces.
    pub fn for_request(
        gateway: &Gateway,
        route: Route,
        api_key_hash: Option<&str>,
        body: &[u8],
    ) -> Option<Enforcer> {
        let rules = gateway.rules.load();
        if !rules.engine.has_enforcing_rules() || !route.is_captured() {
            return None;
        }
        let request = parse_request(route, body).ok();
        let model = request.as_ref().and_then(|r| r.model.as_deref());
        let plan = rules.engine.enforce_plan(model, route, api_key_hash)?;
        let mut exchange = Exchange::from_texts("", "", "");
        exchange.route = route;
        exchange.api_key_hash = api_key_hash.map(str::to_owned);
        if let Some(request) = request {
            exchange.model = request.model;
            exchange.stream = request.stream;
            exchange.prompt = request.prompt;
        } else {
            exchange.model = None;
            exchange.prompt.clear();
        }
        exchange.choices.clear();
        let (done, outcome) = oneshot::channel();
        Some(Enforcer {
            engine: Arc::clone(&rules.engine),
            plan,
            exchange,
            route,
            metrics: gateway.metrics.clone(),
            done: Mutex::new(Some(done)),
            outcome: Some(outcome),
        })
    }

    /// What enforce mode did, for the capture task (once).
    pub fn outcome(&mut self) -> Option<oneshot::Receiver<Enforced>> {
        self.outcome.take()
    }

    fn record(&self, enforced: Option<Enforced>) {
        self.metrics
            .enforce_decision(enforced.map_or("pass", Enforced::as_str));
        if let Some(enforced) = enforced
            && let Ok(mut done) = self.done.lock()
            && let Some(done) = done.take()
        {
            // The capture task may be gone (no capture slot); nothing to record then.
            let _gone = done.send(enforced);
        }
    }

    /// A failed decision: counted, then open or closed as the plan says.
    fn fail(&self, reason: &'static str) -> FailMode {
        self.metrics.enforce_failure(reason);
        tracing::debug!(reason, fail = ?self.plan.fail, "enforce decision failed");
        self.record(Some(match self.plan.fail {
            FailMode::Open => Enforced::FailedOpen,
            FailMode::Closed => Enforced::FailedClosed,
        }));
        self.plan.fail
    }

    /// Judges every choice's text; a block wins, masks gather per choice.
    fn judge(&self, texts: &[(u32, String)]) -> Judgement {
        let mut masks = Vec::new();
        for (index, text) in texts {
            match self.engine.decide(&self.plan, &self.exchange, text) {
                Decision::Pass => {}
                Decision::Block(response) => return Judgement::Block(response),
                Decision::Mask(spans) => masks.push((*index, spans)),
                Decision::Error(error) => return Judgement::Error(error),
            }
        }
        if masks.is_empty() {
            Judgement::Pass
        } else {
            Judgement::Mask(masks)
        }
    }

    /// Judges a non-streamed answer: buffers it, decides within the budget, and answers.
    pub async fn answer(
        self,
        gateway: &Gateway,
        mut parts: http::response::Parts,
        mut tee: TeeBody,
    ) -> Response<ProxyBody> {
        let limit = gateway.config.limits.max_capture_body_bytes;
        let mut chunks = Vec::new();
        let mut size = 0usize;
        loop {
            match tee.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        size = size.saturating_add(data.len());
                        chunks.push(data);
                    }
                    if size > limit {
                        return match self.fail("body_too_large") {
                            FailMode::Open => replay(parts, chunks, Some(tee), None),
                            FailMode::Closed => block(parts, &self.plan.block_response),
                        };
                    }
                }
                // The upstream failed mid-body: the client sees what came and the failure.
                Some(Err(err)) => return replay(parts, chunks, None, Some(err)),
                None => break,
            }
        }
        drop(tee);
        let body: Bytes = chunks.concat().into();
        let content_type = header_str(&parts.headers, header::CONTENT_TYPE);
        let encoding = header_str(&parts.headers, header::CONTENT_ENCODING);
        let mut parser = ResponseParser::with_limit(self.route, content_type, encoding, limit);
        parser.push(&body);
        let parsed = parser.finish();
        if parsed.error.is_some() {
            return match self.fail("unreadable") {
                FailMode::Open => full(parts, body),
                FailMode::Closed => block(parts, &self.plan.block_response),
            };
        }
        let texts: Vec<(u32, String)> = parsed
            .choices
            .into_iter()
            .map(|c| (c.index, c.text))
            .collect();
        let budget = self.plan.timeout;
        let this = Arc::new(self);
        let judged = if budget.is_zero() {
            None
        } else {
            let judge = Arc::clone(&this);
            let task = gateway
                .capture_tasks
                .spawn_blocking("enforce-judge", move || judge.judge(&texts));
            match tokio::time::timeout(budget, task).await {
                Ok(Ok(judgement)) => Some(judgement),
                Ok(Err(_join)) => Some(Judgement::Error("detector task failed".to_owned())),
                Err(_elapsed) => None,
            }
        };
        let judgement = match judged {
            Some(judgement) => judgement,
            None => match this.fail("timeout") {
                FailMode::Open => return full(parts, body),
                FailMode::Closed => return block(parts, &this.plan.block_response),
            },
        };
        match judgement {
            Judgement::Pass => {
                this.record(None);
                full(parts, body)
            }
            Judgement::Error(error) => {
                tracing::debug!(%error, "enforce detector error");
                match this.fail("detector_error") {
                    FailMode::Open => full(parts, body),
                    FailMode::Closed => block(parts, &this.plan.block_response),
                }
            }
            Judgement::Block(response) => {
                this.record(Some(Enforced::Blocked));
                match &response.replace_with {
                    Some(text) if encoding.is_none() => {
                        match rewrite(this.route, &body, &|_, _| Some(text.clone())) {
                            Some(replaced) => {
                                parts.headers.remove(header::CONTENT_LENGTH);
                                full(parts, replaced)
                            }
                            None => block(parts, &response),
                        }
                    }
                    _ => block(parts, &response),
                }
            }
            Judgement::Mask(masks) => {
                let masked = encoding
                    .is_none()
                    .then(|| {
                        rewrite(this.route, &body, &|index, text| {
                            let spans = masks.iter().find(|(i, _)| *i == index)?;
                            Some(mask(text, &spans.1, &this.plan.mask_with))
                        })
                    })
                    .flatten();
                match masked {
                    Some(masked) => {
                        this.record(Some(Enforced::Masked));
                        parts.headers.remove(header::CONTENT_LENGTH);
                        full(parts, masked)
                    }
                    // A compressed or unusual body cannot be rewritten: block rather than leak.
                    None => {
                        this.record(Some(Enforced::Blocked));
                        block(parts, &this.plan.block_response)
                    }
                }
            }
        }
    }

    /// Wraps a streamed answer so it is judged as it arrives; past `limit` bytes the stream
    /// fails open or closed.
    pub fn stream(self, parts: &http::response::Parts, tee: TeeBody, limit: usize) -> EnforceBody {
        let parser = ResponseParser::with_limit(
            self.route,
            header_str(&parts.headers, header::CONTENT_TYPE),
            header_str(&parts.headers, header::CONTENT_ENCODING),
            limit,
        );
        let hold = self.plan.hold_back_tokens.saturating_mul(BYTES_PER_TOKEN);
        EnforceBody {
            ready: VecDeque::new(),
            inner: Some(tee),
            error: None,
            judge: Some(StreamJudge {
                enforcer: self,
                parser,
                held: VecDeque::new(),
                total: 0,
                hold,
                seen: 0,
                limit,
            }),
        }
    }
}

enum Judgement {
    Pass,
    Block(BlockResponse),
    Mask(Vec<(u32, Vec<(usize, usize)>)>),
    Error(String),
}

fn header_str(headers: &http::HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn full(mut parts: http::response::Parts, body: Bytes) -> Response<ProxyBody> {
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, ProxyBody::from(body))
}

/// The configured error answer, keeping the upstream's other headers (`x-request-id`…).
fn block(mut parts: http::response::Parts, response: &BlockResponse) -> Response<ProxyBody> {
    parts.status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::FORBIDDEN);
    parts.headers.remove(header::CONTENT_ENCODING);
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({ "error": error_object(response) });
    full(parts, Bytes::from(body.to_string()))
}

fn error_object(response: &BlockResponse) -> serde_json::Value {
    serde_json::json!({
        "message": response.message,
        "type": response.kind,
        "code": response.code,
    })
}

/// The SSE event that ends a blocked stream: OpenAI's SDKs raise on an `error` event carrying
/// an `error` object, and Anthropic's on an `error` event of `type: error`.
pub fn sse_error_event(response: &BlockResponse) -> Bytes {
    let data = serde_json::json!({ "type": "error", "error": error_object(response) });
    Bytes::from(format!("event: error\ndata: {data}\n\n"))
}

fn replay(
    parts: http::response::Parts,
    chunks: Vec<Bytes>,
    rest: Option<TeeBody>,
    error: Option<BodyError>,
) -> Response<ProxyBody> {
    let body = EnforceBody {
        ready: chunks.into(),
        inner: rest,
        error,
        judge: None,
    };
    Response::from_parts(parts, ProxyBody::Enforced(Box::new(body)))
}

/// Replaces spans of `text` (byte ranges, possibly overlapping) with `with`.
pub fn mask(text: &str, spans: &[(usize, usize)], with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0usize;
    let mut sorted: Vec<(usize, usize)> = spans
        .iter()
        .copied()
        .filter(|&(start, end)| start < end && text.get(start..end).is_some())
        .collect();
    sorted.sort_unstable();
    // Overlapping spans merge into one placeholder.
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(sorted.len());
    for (start, end) in sorted {
        match merged.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (start, end) in merged {
        out.push_str(text.get(at..start).unwrap_or(""));
        out.push_str(with);
        at = end;
    }
    out.push_str(text.get(at..).unwrap_or(""));
    out
}

/// Rewrites the answer text of each choice of a JSON body (`change(index, text)` returns the
/// new text, or `None` to keep it). `None` when the body is not in a shape this knows.
fn rewrite(
    route: Route,
    body: &[u8],
    change: &dyn Fn(u32, &str) -> Option<String>,
) -> Option<Bytes> {
    let mut value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let edit = |slot: &mut serde_json::Value, index: u32| {
        if let Some(text) = slot.as_str()
            && let Some(new) = change(index, text)
        {
            *slot = serde_json::Value::String(new);
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
                let index = choice
                    .get("index")
                    .and_then(serde_json::Value::as_u64)
                    .and_then(|i| u32::try_from(i).ok())
                    .unwrap_or(u32::try_from(i).unwrap_or(u32::MAX));
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
                if item.get("type").and_then(serde_json::Value::as_str) == Some("message")
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

fn text_parts<'a>(
    content: &'a mut [serde_json::Value],
    kind: &str,
) -> Vec<&'a mut serde_json::Value> {
    content
        .iter_mut()
        .filter(|part| part.get("type").and_then(serde_json::Value::as_str) == Some(kind))
        .filter_map(|part| part.get_mut("text"))
        .collect()
}

/// Judges a stream as it arrives; see the module docs.
#[derive(Debug)]
struct StreamJudge {
    enforcer: Enforcer,
    parser: ResponseParser,
    /// Chunks not yet released, each with the total text length once it had arrived.
    held: VecDeque<(Bytes, usize)>,
    /// Text length so far, all choices.
    total: usize,
    /// Bytes of text that must follow a chunk before it is released.
    hold: usize,
    /// Body bytes so far, and the most that may be judged.
    seen: usize,
    limit: usize,
}

enum Step {
    /// Release what may be released.
    Continue,
    /// Stop the stream with this event.
    Stop(Bytes),
    /// Stop judging; release everything.
    Open,
}

impl StreamJudge {
    fn push(&mut self, chunk: Bytes) -> Step {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            self.held.push_back((chunk, self.total));
            return self.failed("body_too_large");
        }
        self.parser.push(&chunk);
        let texts: Vec<(u32, String)> = self
            .parser
            .texts_so_far()
            .map(|(i, t)| (i, t.to_owned()))
            .collect();
        let total = texts.iter().map(|(_, t)| t.len()).sum();
        let grew = total > self.total;
        self.total = total;
        self.held.push_back((chunk, total));
        if !grew {
            return Step::Continue;
        }
        let budget = self.enforcer.plan.timeout;
        let started = Instant::now();
        let judgement = if budget.is_zero() {
            None
        } else {
            Some(self.enforcer.judge(&texts))
        };
        // Inline on the stream's task: the detectors that can judge partial text take
        // microseconds, so the budget is checked after the fact rather than enforced.
        let judgement = judgement.filter(|_| started.elapsed() <= budget);
        match judgement {
            Some(Judgement::Pass) => Step::Continue,
            Some(Judgement::Block(response)) => {
                self.enforcer.record(Some(Enforced::Blocked));
                Step::Stop(sse_error_event(&response))
            }
            // Spans already split across released SSE events cannot be masked in place:
            // a stream is stopped instead.
            Some(Judgement::Mask(_)) => {
                self.enforcer.record(Some(Enforced::Blocked));
                Step::Stop(sse_error_event(&self.enforcer.plan.block_response))
            }
            Some(Judgement::Error(error)) => {
                tracing::debug!(%error, "enforce detector error");
                self.failed("detector_error")
            }
            None => self.failed("timeout"),
        }
    }

    fn failed(&self, reason: &'static str) -> Step {
        match self.enforcer.fail(reason) {
            FailMode::Open => Step::Open,
            FailMode::Closed => Step::Stop(sse_error_event(&self.enforcer.plan.block_response)),
        }
    }

    /// Chunks with enough text after them to be released.
    fn releasable(&mut self, out: &mut VecDeque<Bytes>) {
        while let Some((_, end)) = self.held.front() {
            if self.total.saturating_sub(*end) < self.hold {
                break;
            }
            if let Some((chunk, _)) = self.held.pop_front() {
                out.push_back(chunk);
            }
        }
    }

    fn release_all(&mut self, out: &mut VecDeque<Bytes>) {
        out.extend(self.held.drain(..).map(|(chunk, _)| chunk));
    }
}

/// A response body under enforce mode: bytes ready to send, then the upstream (through the
/// tee), judged chunk by chunk when `judge` is set.
#[derive(Debug)]
pub struct EnforceBody {
    ready: VecDeque<Bytes>,
    inner: Option<TeeBody>,
    error: Option<BodyError>,
    judge: Option<StreamJudge>,
}

impl EnforceBody {
    fn end_of_stream(&mut self) {
        if let Some(mut judge) = self.judge.take() {
            judge.release_all(&mut self.ready);
            judge.enforcer.record(None);
        }
    }
}

impl Body for EnforceBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(error) = this.error.take() {
                return Poll::Ready(Some(Err(error)));
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(None);
            };
            match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let Some(judge) = this.judge.as_mut() else {
                        return Poll::Ready(Some(Ok(frame)));
                    };
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    match judge.push(data) {
                        Step::Continue => judge.releasable(&mut this.ready),
                        Step::Open => {
                            judge.release_all(&mut this.ready);
                            this.judge = None;
                        }
                        Step::Stop(event) => {
                            // What was held back is never sent; the rest of the upstream is
                            // dropped (the tee records the exchange as it ended here).
                            this.judge = None;
                            this.inner = None;
                            this.ready.clear();
                            this.ready.push_back(event);
                        }
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    this.end_of_stream();
                    this.inner = None;
                    this.error = Some(error);
                }
                Poll::Ready(None) => {
                    this.end_of_stream();
                    this.inner = None;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty() && self.error.is_none() && self.inner.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
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
    fn rewrite_replaces_chat_and_anthropic_text_in_place() {
        let chat = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"bad"}}]}"#;
        let out = rewrite(Route::ChatCompletions, chat, &|_, t| Some(t.to_uppercase())).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["choices"][0]["message"]["content"], "BAD");
        let anthropic = br#"{"type":"message","content":[{"type":"text","text":"bad"}]}"#;
        let out = rewrite(Route::AnthropicMessages, anthropic, &|_, _| {
            Some("ok".into())
        })
        .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(json["content"][0]["text"], "ok");
        assert!(rewrite(Route::ChatCompletions, b"not json", &|_, _| None).is_none());
    }
}
