//! The response body of a request under enforce mode.
//!
//! [`EnforceBody`] sends what is ready, then reads the upstream (through the capture tee) and,
//! when a [`StreamJudge`] is set, hands each chunk to it and sends only what its decisions
//! release. A judge that stops the stream replaces what it held with its last event; one that
//! opens releases everything and the rest passes unjudged. While a decision runs the upstream
//! is still read, up to [`MAX_AHEAD`] of text. How units are held and when decisions run is
//! [`super::stream`]'s concern.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::stream::{Step, StreamJudge};
use crate::proxy::tee::{BodyError, TeeBody};

/// Text (bytes) read ahead of the last decision while the next one runs; past it, the upstream
/// waits for the decision.
const MAX_AHEAD: usize = 64 * 1024;

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
