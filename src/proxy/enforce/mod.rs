//! Enforce mode on the request path: the only place where the client waits for a detector,
//! and only when an enforce-mode policy has a `block` or `mask` rule whose scope admits the
//! request. Every other request takes the plain tee path untouched.
//!
//! * A non-streamed answer is buffered (up to `limits.max_capture_body_bytes`), judged on a
//!   blocking thread within the policy's `timeout`, and forwarded, masked, replaced or answered
//!   with the configured error.
//! * A stream is judged as it arrives, on the text so far of each choice ([`stream`]). With
//!   `hold_back_tokens`, text is released only once a decision has seen that much (4 bytes per
//!   token) after it, so a span is stopped or masked before the client sees it; without,
//!   blocking is best effort. A block ends the stream with an SSE `error` event and no
//!   `[DONE]`. What is held back, whole SSE events cut by capture's framer, is [`held`]; the
//!   body the client reads is [`body`].
//!
//! The capture tee sits below this layer, so the flag log always gets the original answer.

mod body;
mod held;
mod rewrite;
mod stream;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use tokio::sync::oneshot;

pub use body::EnforceBody;
pub use rewrite::mask;
use rewrite::rewrite_body;
use stream::StreamJudge;

use super::Gateway;
use super::service::ProxyBody;
use super::tee::{BodyError, TeeBody};
use crate::capture::{Exchange, ResponseParser, Route, parse_request};
use crate::policy::{BlockResponse, Decision, EnforcePlan, Enforced, Engine, FailMode};
use crate::runtime::Tasks;
use crate::telemetry::Metrics;

/// Bytes of text counted as one token for `hold_back_tokens`.
pub const BYTES_PER_TOKEN: usize = 4;

/// What one request needs to be judged: the rules in force when it arrived, the plan, and
/// the request as detectors see it.
#[derive(Debug)]
pub struct Enforcer {
    judge: Arc<Judge>,
    route: Route,
    metrics: Metrics,
    /// Where decisions run (the blocking pool, tracked for shutdown).
    tasks: Tasks,
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
            judge: Arc::new(Judge {
                engine: Arc::clone(&rules.engine),
                plan,
                exchange,
            }),
            route,
            metrics: gateway.metrics.clone(),
            tasks: gateway.capture_tasks.clone(),
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
        let fail = self.judge.plan.fail;
        tracing::debug!(reason, ?fail, "enforce decision failed");
        self.record(Some(match fail {
            FailMode::Open => Enforced::FailedOpen,
            FailMode::Closed => Enforced::FailedClosed,
        }));
        fail
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
                            FailMode::Closed => block(parts, &self.judge.plan.block_response),
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
                FailMode::Closed => block(parts, &self.judge.plan.block_response),
            };
        }
        let texts: Vec<(u32, String)> = parsed
            .choices
            .into_iter()
            .map(|c| (c.index, c.text))
            .collect();
        let budget = self.judge.plan.timeout;
        let judged = if budget.is_zero() {
            None
        } else {
            let judge = Arc::clone(&self.judge);
            let task = self
                .tasks
                .spawn_blocking("enforce-judge", move || judge.judge(&texts));
            match tokio::time::timeout(budget, task).await {
                Ok(Ok(judgement)) => Some(judgement),
                Ok(Err(_join)) => Some(Judgement::Error("detector task failed".to_owned())),
                Err(_elapsed) => None,
            }
        };
        let judgement = match judged {
            Some(judgement) => judgement,
            None => match self.fail("timeout") {
                FailMode::Open => return full(parts, body),
                FailMode::Closed => return block(parts, &self.judge.plan.block_response),
            },
        };
        match judgement {
            Judgement::Pass => {
                self.record(None);
                full(parts, body)
            }
            Judgement::Error(error) => {
                tracing::debug!(%error, "enforce detector error");
                match self.fail("detector_error") {
                    FailMode::Open => full(parts, body),
                    FailMode::Closed => block(parts, &self.judge.plan.block_response),
                }
            }
            Judgement::Block(response) => {
                self.record(Some(Enforced::Blocked));
                match &response.replace_with {
                    Some(text) if encoding.is_none() => {
                        match rewrite_body(self.route, &body, &|_, _| Some(text.clone())) {
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
                        rewrite_body(self.route, &body, &|index, text| {
                            let spans = masks.iter().find(|(i, _)| *i == index)?;
                            Some(mask(text, &spans.1, &self.judge.plan.mask_with))
                        })
                    })
                    .flatten();
                match masked {
                    Some(masked) => {
                        self.record(Some(Enforced::Masked));
                        parts.headers.remove(header::CONTENT_LENGTH);
                        full(parts, masked)
                    }
                    // A compressed or unusual body cannot be rewritten: block rather than leak.
                    None => {
                        self.record(Some(Enforced::Blocked));
                        block(parts, &self.judge.plan.block_response)
                    }
                }
            }
        }
    }

    /// Wraps a streamed answer so it is judged as it arrives; past `limit` bytes the stream
    /// fails open or closed.
    pub fn stream(self, parts: &http::response::Parts, tee: TeeBody, limit: usize) -> EnforceBody {
        let content_type = header_str(&parts.headers, header::CONTENT_TYPE);
        let encoding = header_str(&parts.headers, header::CONTENT_ENCODING);
        let parser = ResponseParser::with_limit(self.route, content_type, encoding, limit);
        // Events can be rewritten in place only when the bytes are the events themselves.
        let maskable = encoding.is_none_or(|e| e.trim().eq_ignore_ascii_case("identity"))
            && content_type.is_some_and(|t| t.trim_start().starts_with("text/event-stream"));
        EnforceBody::judged(tee, StreamJudge::new(self, parser, maskable, limit))
    }
}

/// What a decision needs, shared with the blocking thread that runs it: the rules in force
/// when the request arrived, the plan, and the request as detectors see it.
#[derive(Debug)]
struct Judge {
    engine: Arc<Engine>,
    plan: EnforcePlan,
    exchange: Exchange,
}

impl Judge {
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
}

#[derive(Debug)]
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
    let body = EnforceBody::replay(VecDeque::from(chunks), rest, error);
    Response::from_parts(parts, ProxyBody::Enforced(Box::new(body)))
}
