//! Enforce mode on a streamed answer: when to judge, and what to release.
//!
//! The body is cut into units (whole SSE events when the stream is plain `text/event-stream`,
//! otherwise the upstream's chunks; see [`super::held`]) and each unit is held until the text
//! after it has been judged: with `hold_back_tokens: N`, a unit goes out once a decision has
//! seen N × 4 bytes of text past it, so a span that short is stopped (or masked) before any of
//! it is sent.
//!
//! Decisions run on the blocking pool under the policy's `timeout`, and not at every chunk:
//! a new one starts once the text has grown by half the hold-back or by a sixteenth of what was
//! judged last, whichever is more (and once more at the end). Each decision reads the whole text
//! so far, so that spacing keeps the detectors' total work linear in the answer's length, at the
//! price of holding up to that step more than the hold-back. While a decision runs, the
//! upstream is still read (up to a bound, in [`super::body`]), so the next decision covers all
//! that came meanwhile: a fast upstream costs a few decisions, not one per event.
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
use tokio::task::JoinHandle;
use tokio::time::Sleep;

use super::held::Held;
use super::{Enforcer, Judgement, sse_error_event};
use crate::capture::ResponseParser;
use crate::policy::{Enforced, FailMode};

/// Text growth (bytes) that starts the next decision: half the hold-back or a sixteenth of the
/// text judged so far, whichever is more.
pub fn decision_step(judged: usize, hold: usize) -> usize {
    (hold / 2).max(judged / 16).max(1)
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
    /// The units held back, and the text so far.
    held: Held,
    /// What the last finished decision saw (text length, all choices).
    judged: usize,
    hold: usize,
    /// Body bytes so far, and the most that may be judged.
    seen: usize,
    limit: usize,
    decision: Option<Pending>,
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
            held: Held::new(parser, maskable),
            judged: 0,
            hold,
            seen: 0,
            limit,
            decision: None,
        }
    }

    /// Takes in a chunk of the upstream body.
    pub(super) fn push(&mut self, chunk: Bytes) -> Option<Step> {
        self.seen = self.seen.saturating_add(chunk.len());
        if self.seen > self.limit {
            self.held.push_unread(chunk);
            return Some(self.failed("body_too_large"));
        }
        self.held.push(chunk);
        None
    }

    /// The upstream ended: what was left of a partial event becomes the last unit.
    pub(super) fn upstream_ended(&mut self) {
        self.held.upstream_ended();
    }

    /// Whether enough new text has come to judge again.
    pub(super) fn due(&self) -> bool {
        let total = self.held.total();
        total > self.judged && total - self.judged >= decision_step(self.judged, self.hold)
    }

    /// Whether text has come that no decision has seen.
    pub(super) fn unjudged(&self) -> bool {
        self.held.total() > self.judged
    }

    /// Whether a decision is in flight.
    pub(super) fn deciding(&self) -> bool {
        self.decision.is_some()
    }

    /// Text read past what the last decision saw.
    pub(super) fn ahead(&self) -> usize {
        self.held.total().saturating_sub(self.judged)
    }

    /// Starts a decision on the text so far.
    pub(super) fn start_decision(&mut self) -> Option<Step> {
        let budget = self.enforcer.judge.plan.timeout;
        if budget.is_zero() {
            return Some(self.failed("timeout"));
        }
        let texts: Vec<(u32, String)> = self
            .held
            .texts()
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
            at: self.held.total(),
        });
        None
    }

    /// Polls the decision in flight: `Ready(None)` when there is none or it passed.
    pub(super) fn poll_decision(&mut self, cx: &mut Context<'_>) -> Poll<Option<Step>> {
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
                let plan = &self.enforcer.judge.plan;
                if self
                    .held
                    .mask(self.enforcer.route, masks, &plan.mask_with)
                    .is_none()
                {
                    let event = sse_error_event(&plan.block_response);
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
    pub(super) fn releasable(&mut self, out: &mut VecDeque<Bytes>) {
        self.held.release_judged(self.judged, self.hold, out);
    }

    /// Moves every held unit to `out`.
    pub(super) fn release_all(&mut self, out: &mut VecDeque<Bytes>) {
        self.held.release_all(out);
    }

    /// The stream is over and every byte of it was judged.
    pub(super) fn finish(&mut self, out: &mut VecDeque<Bytes>) {
        self.release_all(out);
        self.enforcer
            .record(self.held.masked().then_some(Enforced::Masked));
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
    use crate::capture::{Exchange, Route};
    use crate::policy::{Decision, Engine, compile_text};
    use crate::proxy::enforce::EnforceBody;
    use crate::proxy::enforce::Judge;
    use crate::proxy::tee::{Accounting, TeeBody};
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
