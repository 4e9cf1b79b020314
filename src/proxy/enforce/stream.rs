//! Enforce mode on a streamed answer.
//!
//! The body is cut into units (whole SSE events when the stream is plain `text/event-stream`,
//! otherwise the upstream's chunks) and each unit is held until the text after it has been
//! judged: with `hold_back_tokens: N`, a unit goes out once a decision has seen N × 4 bytes of
//! text past it, so a span that short is stopped (or masked) before any of it is sent.
//!
//! Decisions run on the blocking pool under the policy's `timeout`, and not at every chunk:
//! a new one starts once the text has grown by half the hold-back or by a sixteenth of what was
//! judged last, whichever is more (and once more at the end). Each decision reads the whole text
//! so far, so that spacing keeps the detectors' total work linear in the answer's length, at the
//! price of holding up to that step more than the hold-back. While a decision runs, the
//! upstream is still read (up to [`MAX_AHEAD`] of text), so the next decision covers all that
//! came meanwhile: a fast upstream costs a few decisions, not one per event.
//!
//! A `mask` rewrites the held events in place (the text fields only); it needs every masked
//! span to start in text not yet sent, or to continue a span already masked. Otherwise, and on
//! bodies that cannot be rewritten (compressed, the Responses API), the stream is blocked.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::rewrite::{Added, masked_piece, merge, rewrite_event};
use super::{Enforcer, Judgement, sse_error_event};
use crate::capture::{ResponseParser, Route};
use crate::policy::{Enforced, FailMode};
use crate::proxy::tee::{BodyError, TeeBody};

/// Text (bytes) read ahead of the last decision while the next one runs; past it, the upstream
/// waits for the decision.
const MAX_AHEAD: usize = 64 * 1024;

/// Text growth (bytes) that starts the next decision: half the hold-back or a sixteenth of the
/// text judged so far, whichever is more.
pub fn decision_step(judged: usize, hold: usize) -> usize {
    (hold / 2).max(judged / 16).max(1)
}

/// Splits a server-sent-events byte stream into whole events, byte for byte: an event ends
/// with the line terminator of an empty line (`\n`, `\r\n` or `\r`). Whatever follows the last
/// complete event waits for the next chunk.
#[derive(Debug)]
pub struct EventFramer {
    partial: Vec<u8>,
    line_empty: bool,
    after_cr: bool,
}

impl Default for EventFramer {
    fn default() -> Self {
        EventFramer {
            partial: Vec::new(),
            line_empty: true,
            after_cr: false,
        }
    }
}

impl EventFramer {
    /// Appends every event `chunk` completes to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<Bytes>) {
        let mut start = 0usize;
        for (i, &byte) in chunk.iter().enumerate() {
            let after_cr = std::mem::replace(&mut self.after_cr, false);
            let terminator = match byte {
                b'\r' => {
                    self.after_cr = true;
                    true
                }
                // The `\n` of a `\r\n` belongs to the `\r`'s terminator.
                b'\n' => !after_cr,
                _ => {
                    self.line_empty = false;
                    false
                }
            };
            if !terminator {
                continue;
            }
            if self.line_empty {
                self.partial
                    .extend_from_slice(chunk.get(start..=i).unwrap_or_default());
                out.push(Bytes::from(std::mem::take(&mut self.partial)));
                start = i.saturating_add(1);
            }
            self.line_empty = true;
        }
        self.partial
            .extend_from_slice(chunk.get(start..).unwrap_or_default());
    }

    /// What is left after the last complete event (a stream that ended mid-event).
    pub fn finish(&mut self) -> Option<Bytes> {
        (!self.partial.is_empty()).then(|| Bytes::from(std::mem::take(&mut self.partial)))
    }
}

/// One held unit of the body.
#[derive(Debug)]
struct Unit {
    raw: Bytes,
    /// Text length so far (all choices) once this unit had arrived.
    end: usize,
    /// The text this unit added, per choice.
    added: Vec<Added>,
    /// What is sent instead of `raw`, once masks changed it.
    masked: Option<Bytes>,
}

impl Unit {
    fn into_bytes(self) -> Bytes {
        self.masked.unwrap_or(self.raw)
    }
}

/// What a stream's judge asks of the body.
#[derive(Debug)]
pub enum Step {
    /// Stop the stream with this event.
    Stop(Bytes),
    /// Stop judging; release everything.
    Open,
}

/// A decision in flight: the detectors on the blocking pool, and the budget.
#[derive(Debug)]
struct Pending {
    task: JoinHandle<Judgement>,
    deadline: Pin<Box<Sleep>>,
    /// The text length it judges.
    at: usize,
}

/// Judges one stream; see the module docs.
#[derive(Debug)]
pub struct StreamJudge {
    enforcer: Enforcer,
    parser: ResponseParser,
    /// Set when units are whole SSE events that can be rewritten.
    framer: Option<EventFramer>,
    held: VecDeque<Unit>,
    /// Per choice: text length so far, text already released, masked spans (merged).
    choices: Vec<ChoiceState>,
    /// Text length so far, all choices, and what the last finished decision saw.
    total: usize,
    judged: usize,
    hold: usize,
    /// Body bytes so far, and the most that may be judged.
    seen: usize,
    limit: usize,
    decision: Option<Pending>,
    masked: bool,
}

#[derive(Debug, Default)]
struct ChoiceState {
    index: u32,
    len: usize,
    released: usize,
    masks: Vec<(usize, usize)>,
}

impl StreamJudge {
    pub(super) fn new(
        enforcer: Enforcer,
        parser: ResponseParser,
        maskable: bool,
        limit: usize,
    ) -> StreamJudge {
        let hold = enforcer
            .judge
            .plan
            .hold_back_tokens
            .saturating_mul(super::BYTES_PER_TOKEN);
        StreamJudge {
            enforcer,
            parser,
            framer: maskable.then(EventFramer::default),
            held: VecDeque::new(),
            choices: Vec::new(),
            total: 0,
            judged: 0,
            hold,
            seen: 0,
            limit,
            decision: None,
            masked: false,
        }
    }

    /// Takes in a chunk of the upstream body.
    fn push(&mut self, chunk: Bytes) -> Option<Step> {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            self.held.push_back(Unit {
                raw: chunk,
                end: self.total,
                added: Vec::new(),
                masked: None,
            });
            return Some(self.failed("body_too_large"));
        }
        match self.framer.as_mut() {
            Some(framer) => {
                let mut events = Vec::new();
                framer.push(&chunk, &mut events);
                for event in events {
                    self.add_unit(event);
                }
            }
            None => self.add_unit(chunk),
        }
        None
    }

    /// The upstream ended: what was left of a partial event becomes the last unit.
    fn upstream_ended(&mut self) {
        if let Some(rest) = self.framer.as_mut().and_then(EventFramer::finish) {
            self.add_unit(rest);
        }
    }

    fn add_unit(&mut self, raw: Bytes) {
        self.parser.push(&raw);
        let lengths: Vec<(u32, usize)> = self
            .parser
            .texts_so_far()
            .map(|(index, text)| (index, text.len()))
            .collect();
        let mut added = Vec::new();
        let mut total = 0usize;
        for (index, len) in lengths {
            total = total.saturating_add(len);
            let state = self.choice(index);
            if len > state.len {
                added.push((index, state.len, len));
                state.len = len;
            }
        }
        self.total = total;
        self.held.push_back(Unit {
            raw,
            end: total,
            added,
            masked: None,
        });
    }

    fn choice(&mut self, index: u32) -> &mut ChoiceState {
        let at = match self.choices.iter().position(|c| c.index == index) {
            Some(at) => at,
            None => {
                self.choices.push(ChoiceState {
                    index,
                    ..ChoiceState::default()
                });
                self.choices.len().saturating_sub(1)
            }
        };
        &mut self.choices[at]
    }

    /// Whether enough new text has come to judge again.
    fn due(&self) -> bool {
        self.total > self.judged
            && self.total - self.judged >= decision_step(self.judged, self.hold)
    }

    /// Whether text has come that no decision has seen.
    fn unjudged(&self) -> bool {
        self.total > self.judged
    }

    /// Whether a decision is in flight.
    fn deciding(&self) -> bool {
        self.decision.is_some()
    }

    /// Text read past what the last decision saw.
    fn ahead(&self) -> usize {
        self.total.saturating_sub(self.judged)
    }

    /// Starts a decision on the text so far.
    fn start_decision(&mut self) -> Option<Step> {
        let budget = self.enforcer.judge.plan.timeout;
        if budget.is_zero() {
            return Some(self.failed("timeout"));
        }
        let texts: Vec<(u32, String)> = self
            .parser
            .texts_so_far()
            .map(|(index, text)| (index, text.to_owned()))
            .collect();
        let judge = Arc::clone(&self.enforcer.judge);
        let task = self
            .enforcer
            .tasks
            .spawn_blocking("enforce-judge", move || judge.judge(&texts));
        self.decision = Some(Pending {
            task,
            deadline: Box::pin(tokio::time::sleep(budget)),
            at: self.total,
        });
        None
    }

    /// Polls the decision in flight: `Ready(None)` when there is none or it passed.
    fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<Option<Step>> {
        let Some(pending) = self.decision.as_mut() else {
            return Poll::Ready(None);
        };
        let judgement = match Pin::new(&mut pending.task).poll(cx) {
            Poll::Ready(Ok(judgement)) => judgement,
            Poll::Ready(Err(_join)) => Judgement::Error("detector task failed".to_owned()),
            Poll::Pending => {
                if pending.deadline.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // The detectors go on on their thread; their answer is not waited for.
                self.decision = None;
                return Poll::Ready(Some(self.failed("timeout")));
            }
        };
        let at = pending.at;
        self.decision = None;
        Poll::Ready(self.apply(judgement, at))
    }

    fn apply(&mut self, judgement: Judgement, at: usize) -> Option<Step> {
        match judgement {
            Judgement::Pass => {}
            Judgement::Block(response) => return Some(self.stop(sse_error_event(&response))),
            Judgement::Mask(masks) => {
                if self.add_masks(masks).is_none() {
                    let event = sse_error_event(&self.enforcer.judge.plan.block_response);
                    return Some(self.stop(event));
                }
            }
            Judgement::Error(error) => {
                tracing::debug!(%error, "enforce detector error");
                return Some(self.failed("detector_error"));
            }
        }
        self.judged = self.judged.max(at);
        None
    }

    /// Applies masks to the held events; `None` when one cannot be applied (the stream is
    /// blocked instead).
    fn add_masks(&mut self, masks: Vec<(u32, Vec<(usize, usize)>)>) -> Option<()> {
        let route = self.enforcer.route;
        if self.framer.is_none()
            || !matches!(
                route,
                Route::ChatCompletions | Route::Completions | Route::AnthropicMessages
            )
        {
            return None;
        }
        for (index, spans) in masks {
            let state = self.choice(index);
            for (start, end) in spans {
                // Text already sent can only be covered by a span masked before.
                let sent = end.min(state.released);
                let covered =
                    start >= sent || state.masks.iter().any(|&(s, e)| s <= start && e >= sent);
                if !covered {
                    return None;
                }
                state.masks.push((start, end));
            }
            state.masks = merge(std::mem::take(&mut state.masks));
        }
        self.masked = true;
        let texts: Vec<(u32, &str)> = self.parser.texts_so_far().collect();
        let with = self.enforcer.judge.plan.mask_with.as_str();
        let choices = &self.choices;
        for unit in &mut self.held {
            let touched = unit.added.iter().any(|&(index, start, end)| {
                choices
                    .iter()
                    .any(|c| c.index == index && c.masks.iter().any(|&(s, e)| s < end && e > start))
            });
            if !touched {
                continue;
            }
            let render = |index: u32, start: usize, end: usize, original: &str| {
                let text = texts.iter().find(|(i, _)| *i == index)?.1;
                if text.get(start..end)? != original {
                    return None;
                }
                let masks = &choices.iter().find(|c| c.index == index)?.masks;
                masked_piece(text, start, end, masks, with)
            };
            unit.masked = Some(rewrite_event(route, &unit.raw, &unit.added, &render)?);
        }
        Some(())
    }

    fn stop(&mut self, event: Bytes) -> Step {
        self.enforcer.record(Some(Enforced::Blocked));
        Step::Stop(event)
    }

    fn failed(&mut self, reason: &'static str) -> Step {
        match self.enforcer.fail(reason) {
            FailMode::Open => Step::Open,
            FailMode::Closed => {
                Step::Stop(sse_error_event(&self.enforcer.judge.plan.block_response))
            }
        }
    }

    /// Moves the units a decision has seen far enough past to `out`.
    fn releasable(&mut self, out: &mut VecDeque<Bytes>) {
        while let Some(unit) = self.held.front() {
            if unit.end.saturating_add(self.hold) > self.judged {
                break;
            }
            self.release_front(out);
        }
    }

    fn release_all(&mut self, out: &mut VecDeque<Bytes>) {
        while !self.held.is_empty() {
            self.release_front(out);
        }
    }

    fn release_front(&mut self, out: &mut VecDeque<Bytes>) {
        let Some(unit) = self.held.pop_front() else {
            return;
        };
        for &(index, _, end) in &unit.added {
            let state = self.choice(index);
            state.released = state.released.max(end);
        }
        out.push_back(unit.into_bytes());
    }

    /// The stream is over and every byte of it was judged.
    fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        self.release_all(out);
        self.enforcer
            .record(self.masked.then_some(Enforced::Masked));
    }
}

/// A response body under enforce mode: bytes ready to send, then the upstream (through the
/// tee), judged as it comes when `judge` is set.
#[derive(Debug)]
pub struct EnforceBody {
    ready: VecDeque<Bytes>,
    inner: Option<TeeBody>,
    error: Option<BodyError>,
    judge: Option<StreamJudge>,
}

impl EnforceBody {
    /// Sends `ready`, then the rest of `inner` unjudged, then `error`.
    pub fn replay(
        ready: VecDeque<Bytes>,
        inner: Option<TeeBody>,
        error: Option<BodyError>,
    ) -> EnforceBody {
        EnforceBody {
            ready,
            inner,
            error,
            judge: None,
        }
    }

    /// Judges `inner` as it comes.
    pub fn judged(inner: TeeBody, judge: StreamJudge) -> EnforceBody {
        EnforceBody {
            ready: VecDeque::new(),
            inner: Some(inner),
            error: None,
            judge: Some(judge),
        }
    }

    fn take_step(&mut self, step: Step) {
        match step {
            Step::Open => {
                if let Some(mut judge) = self.judge.take() {
                    judge.release_all(&mut self.ready);
                }
            }
            Step::Stop(event) => {
                // What was held back is never sent; the rest of the upstream is dropped (the
                // tee records the exchange as it ended here).
                self.judge = None;
                self.inner = None;
                self.error = None;
                self.ready.clear();
                self.ready.push_back(event);
            }
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
            if let Some(judge) = this.judge.as_mut() {
                if let Poll::Ready(Some(step)) = judge.poll_decision(cx) {
                    this.take_step(step);
                    continue;
                }
                judge.releasable(&mut this.ready);
                if !this.ready.is_empty() {
                    continue;
                }
                if this.inner.is_none() {
                    // The upstream is over: one last decision on the whole text, then the rest.
                    if judge.deciding() {
                        return Poll::Pending;
                    }
                    if judge.unjudged() {
                        if let Some(step) = judge.start_decision() {
                            this.take_step(step);
                        }
                    } else {
                        judge.finish(&mut this.ready);
                        this.judge = None;
                    }
                    continue;
                }
                if !judge.deciding() && judge.due() {
                    if let Some(step) = judge.start_decision() {
                        this.take_step(step);
                    }
                    continue;
                }
                // While a decision runs the upstream is still read, so the next decision covers
                // all that came meanwhile; up to a bound, past which the upstream waits.
                if judge.deciding() && judge.ahead() > MAX_AHEAD {
                    return Poll::Pending;
                }
            }
            let Some(inner) = this.inner.as_mut() else {
                return Poll::Ready(this.error.take().map(Err));
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
                    if let Some(step) = judge.push(data) {
                        this.take_step(step);
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    this.inner = None;
                    this.error = Some(error);
                    if let Some(judge) = this.judge.as_mut() {
                        judge.upstream_ended();
                    }
                }
                Poll::Ready(None) => {
                    this.inner = None;
                    if let Some(judge) = this.judge.as_mut() {
                        judge.upstream_ended();
                    }
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_empty()
            && self.error.is_none()
            && self.inner.is_none()
            && self.judge.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use http_body_util::BodyExt;
    use proptest::prelude::*;
    use tokio::sync::oneshot;

    use super::*;
    use crate::capture::Exchange;
    use crate::policy::{Decision, Engine, compile_text};
    use crate::proxy::enforce::Judge;
    use crate::proxy::tee::Accounting;
    use crate::runtime::Tasks;
    use crate::telemetry::Metrics;

    const TRIGGER: &str = "ZORBLAX";

    /// An enforce-mode policy masking the trigger; `settings` are more `enforce:` lines.
    fn engine(settings: &str) -> Arc<Engine> {
        let text = format!(
            "mode: enforce\nenforce:\n{settings}  mask_with: \"[m]\"\n\
             detectors:\n  trigger: {{ type: trigger_phrase, defaults: false, scan: [output], phrases: [\"{TRIGGER}\"] }}\n\
             rules:\n  - name: mask-trigger\n    when: trigger.output.matched\n    severity: high\n    actions: [mask]\n"
        );
        let policy = compile_text(&text, "p.yaml").unwrap();
        Arc::new(Engine::new(vec![policy], Metrics::default()))
    }

    fn judge(engine: &Arc<Engine>) -> Judge {
        let plan = engine
            .enforce_plan(Some("m"), Route::ChatCompletions, None)
            .unwrap();
        let mut exchange = Exchange::from_texts("m", "", "");
        exchange.route = Route::ChatCompletions;
        exchange.choices.clear();
        Judge {
            engine: Arc::clone(engine),
            plan,
            exchange,
        }
    }

    fn event(text: &str) -> String {
        let data = serde_json::json!({
            "object": "chat.completion.chunk",
            "choices": [{ "index": 0, "delta": { "content": text }, "finish_reason": null }],
        });
        format!("data: {data}\n\n")
    }

    /// The text a client assembles from a chat stream, and whether it saw `[DONE]`.
    fn assembled(body: &[u8]) -> (String, bool) {
        let mut decoder = crate::capture::SseDecoder::default();
        let mut events = Vec::new();
        decoder.push(body, &mut events);
        let mut text = String::new();
        let mut done = false;
        for event in events {
            if event.data == "[DONE]" {
                done = true;
            } else if let Ok(value) = serde_json::from_str::<serde_json::Value>(&event.data)
                && let Some(piece) = value["choices"][0]["delta"]["content"].as_str()
            {
                text.push_str(piece);
            }
        }
        (text, done)
    }

    /// Streams `chunks` through an enforce-mode body and returns what the client reads and
    /// what enforce mode recorded.
    /// Also returns how many decisions were still running when the body ended.
    async fn through(judge: Judge, chunks: Vec<Bytes>) -> (Vec<u8>, Option<Enforced>, usize) {
        let metrics = Metrics::default();
        let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        let accounting = Accounting {
            received: tokio::time::Instant::now(),
            upstream_wait: Duration::ZERO,
            route: "chat_completions",
            metrics: metrics.clone(),
            first_byte: None,
        };
        let tee = TeeBody::new(
            reqwest::Body::wrap_stream(stream),
            None,
            accounting,
            Duration::from_secs(10),
            tokio::time::Instant::now() + Duration::from_secs(60),
        );
        let (done, outcome) = oneshot::channel();
        let tasks = Tasks::new();
        let enforcer = Enforcer {
            judge: Arc::new(judge),
            route: Route::ChatCompletions,
            metrics,
            tasks: tasks.clone(),
            done: Mutex::new(Some(done)),
            outcome: None,
        };
        let limit = 8 << 20;
        let parser = ResponseParser::with_limit(
            Route::ChatCompletions,
            Some("text/event-stream"),
            None,
            limit,
        );
        let mut body = EnforceBody::judged(tee, StreamJudge::new(enforcer, parser, true, limit));
        let mut out = Vec::new();
        while let Some(frame) = body.frame().await {
            out.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        let running = tasks.len();
        drop(body);
        (out, outcome.await.ok(), running)
    }

    #[tokio::test]
    async fn a_decision_slower_than_the_timeout_fails_the_stream_without_waiting_for_it() {
        // One event carrying enough text that a decision on it takes well over 1 ms.
        let text = "word ".repeat(400_000);
        let body = format!("{}data: [DONE]\n\n", event(&text));
        let probe = judge(&engine(""));
        let started = tokio::time::Instant::now();
        let _slow = probe.judge(&[(0, text.clone())]);
        let decision = started.elapsed();
        assert!(
            decision > Duration::from_millis(20),
            "a decision took only {decision:?}: the test needs a longer text"
        );
        for (fail, expected) in [
            ("closed", Enforced::FailedClosed),
            ("open", Enforced::FailedOpen),
        ] {
            let engine = engine(&format!("  timeout: 1ms\n  fail: {fail}\n"));
            let chunks = vec![Bytes::from(body.clone())];
            let (out, enforced, running) = through(judge(&engine), chunks).await;
            assert_eq!(enforced, Some(expected), "fail: {fail}");
            let out = String::from_utf8(out).unwrap();
            if fail == "closed" {
                assert!(
                    out.starts_with("event: error\n"),
                    "{}",
                    out.chars().take(200).collect::<String>()
                );
                assert!(!out.contains("[DONE]") && !out.contains("word"));
            } else {
                assert_eq!(out, body, "fail open passes the stream unjudged");
            }
            // The stream did not wait for the decision it gave up on: that one still runs.
            assert_eq!(
                running, 1,
                "a {decision:?} decision should outlast the stream"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// With a hold-back at least as long as the trigger, a stream cut anywhere (into events
        /// and, independently, into chunks) reaches the client as exactly the whole answer
        /// masked by one decision on the whole text: nothing of a span leaks, nothing else
        /// changes, and the stream ends normally.
        #[test]
        fn a_masked_stream_reads_as_the_whole_answer_masked_for_every_split(
            words in prop::collection::vec(prop::sample::select(vec![TRIGGER, "ZORB", "LAX", "hello", "a", "world."]), 1..30),
            event_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
            chunk_cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let text = words.join(" ");
            let mut cuts: Vec<usize> = event_cuts.iter().map(|i| i.index(text.len() + 1)).collect();
            cuts.extend([0, text.len()]);
            cuts.sort_unstable();
            cuts.dedup();
            let mut body = String::new();
            for pair in cuts.windows(2) {
                body.push_str(&event(text.get(pair[0]..pair[1]).unwrap()));
            }
            body.push_str("data: [DONE]\n\n");
            let bytes = body.as_bytes();
            let mut at: Vec<usize> = chunk_cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            at.extend([0, bytes.len()]);
            at.sort_unstable();
            at.dedup();
            let chunks: Vec<Bytes> = at.windows(2).map(|p| Bytes::copy_from_slice(&bytes[p[0]..p[1]])).collect();

            let engine = engine("  hold_back_tokens: 2\n");
            let whole = judge(&engine);
            let expected = match engine.decide(&whole.plan, &whole.exchange, &text) {
                Decision::Mask(spans) => super::super::rewrite::mask(&text, &spans, "[m]"),
                Decision::Pass => text.clone(),
                other => panic!("{other:?}"),
            };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let (out, enforced, _) = runtime.block_on(through(whole, chunks));
            prop_assert_eq!(assembled(&out), (expected.clone(), true));
            if expected == text {
                prop_assert_eq!(out.as_slice(), bytes, "an unmasked stream passes byte for byte");
                prop_assert_eq!(enforced, None);
            } else {
                prop_assert!(!String::from_utf8_lossy(&out).contains(TRIGGER));
                prop_assert_eq!(enforced, Some(Enforced::Masked));
            }
        }
    }

    fn frame(chunks: &[&[u8]]) -> (Vec<Bytes>, Option<Bytes>) {
        let mut framer = EventFramer::default();
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk, &mut out);
        }
        (out, framer.finish())
    }

    #[test]
    fn the_framer_cuts_at_empty_lines_for_every_line_ending_and_split() {
        let body: &[u8] = b"data: a\n\nevent: x\r\ndata: b\r\n\r\ndata: c\r\rdata: d";
        let whole = frame(&[body]);
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
            assert_eq!(frame(&[head, tail]), whole, "cut at {cut}");
        }
        let bytes: Vec<&[u8]> = body.chunks(1).collect();
        assert_eq!(frame(&bytes), whole);
    }

    #[test]
    fn decisions_are_spaced_so_their_total_work_stays_linear() {
        // Each decision reads the whole text so far; spaced this way, 1 MB of text costs about
        // 17 reads of it (1 + 16), in under 150 decisions, rather than one decision per chunk.
        let (mut judged, mut work, mut decisions) = (0usize, 0usize, 0usize);
        while judged < 1 << 20 {
            judged += decision_step(judged, 64);
            work += judged;
            decisions += 1;
        }
        assert!(work < 18 * judged, "work {work} for {decisions} decisions");
        assert!(decisions < 150, "{decisions} decisions");
        assert_eq!(decision_step(0, 0), 1);
        assert_eq!(decision_step(100, 64), 32);
        assert_eq!(decision_step(1600, 64), 100);
    }
}
