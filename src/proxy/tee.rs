//! The response body the client reads: the upstream body passed through frame by frame, with a
//! copy of each data frame offered to capture.
//!
//! Nothing here waits for capture. A copy that does not fit in the capture queue is dropped and
//! counted; the exchange is marked incomplete. The same body enforces the idle-gap and total
//! timeouts, measures the time spent waiting on the upstream (for the overhead histogram), and
//! reports how the body ended exactly once: on the last frame, on an error, or from `Drop` when
//! the client went away first.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, Sleep};

use crate::capture::{BodyEnd, Outcome};
use crate::telemetry::{Metrics, RouteLabels};

/// Why the body stopped early. The client sees its connection (or stream) reset.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// The upstream body failed.
    #[error("upstream body failed: {0}")]
    Upstream(String),
    /// No chunk for longer than `upstream.idle_timeout`.
    #[error("upstream sent nothing for {0:?} (upstream.idle_timeout)")]
    IdleTimeout(Duration),
    /// The exchange ran past `upstream.total_timeout`.
    #[error("exchange exceeded upstream.total_timeout")]
    TotalTimeout,
}

/// Where the tee sends its copies and its end.
#[derive(Debug)]
pub struct CaptureTap {
    /// Chunk copies.
    pub chunks: mpsc::Sender<Bytes>,
    /// How the body ended.
    pub end: oneshot::Sender<BodyEnd>,
}

/// Timing and metrics of one response, finished once.
#[derive(Debug)]
pub struct Accounting {
    /// When the gateway received the request.
    pub received: Instant,
    /// Time already spent waiting on the upstream (request sent → response headers).
    pub upstream_wait: Duration,
    /// Route label for metrics.
    pub route: &'static str,
    /// Where metrics go.
    pub metrics: Metrics,
    /// Where the exchange's span wants the time of the first body byte (traces on only).
    pub first_byte: Option<Arc<OnceLock<Duration>>>,
}

/// The tee body. See the module docs.
pub struct TeeBody {
    inner: Option<reqwest::Body>,
    idle_timeout: Duration,
    idle: Pin<Box<Sleep>>,
    total: Pin<Box<Sleep>>,
    waiting_since: Option<Instant>,
    first_byte_seen: bool,
    chunks: Option<mpsc::Sender<Bytes>>,
    chunks_dropped: bool,
    end: Option<oneshot::Sender<BodyEnd>>,
    accounting: Option<Accounting>,
}

impl std::fmt::Debug for TeeBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeeBody")
            .field("done", &self.inner.is_none())
            .field("chunks_dropped", &self.chunks_dropped)
            .finish_non_exhaustive()
    }
}

impl TeeBody {
    /// Wraps `inner`. `deadline` is when the whole exchange must be over.
    pub fn new(
        inner: reqwest::Body,
        tap: Option<CaptureTap>,
        accounting: Accounting,
        idle_timeout: Duration,
        deadline: Instant,
    ) -> TeeBody {
        let (chunks, end) = match tap {
            Some(tap) => (Some(tap.chunks), Some(tap.end)),
            None => (None, None),
        };
        TeeBody {
            inner: Some(inner),
            idle_timeout,
            idle: Box::pin(tokio::time::sleep(idle_timeout)),
            total: Box::pin(tokio::time::sleep_until(deadline)),
            waiting_since: None,
            first_byte_seen: false,
            chunks,
            chunks_dropped: false,
            end,
            accounting: Some(accounting),
        }
    }

    fn tee(&mut self, data: &Bytes) {
        if let Some(chunks) = &self.chunks {
            match chunks.try_send(data.clone()) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.chunks_dropped = true;
                    if let Some(acc) = &self.accounting {
                        acc.metrics.capture_dropped_chunks.inc();
                    }
                }
                // The capture task is gone (it hit its limit): stop copying.
                Err(mpsc::error::TrySendError::Closed(_)) => self.chunks = None,
            }
        }
    }

    /// Records how the body ended, once. Later calls do nothing.
    fn finish(&mut self, outcome: Outcome) {
        self.inner = None;
        // Closing the chunk channel tells the capture task the body is over.
        self.chunks = None;
        let Some(acc) = self.accounting.take() else {
            return;
        };
        let now = Instant::now();
        let total = now.saturating_duration_since(acc.received);
        let labels = RouteLabels { route: acc.route };
        acc.metrics
            .duration
            .get_or_create(&labels)
            .observe(total.as_secs_f64());
        if outcome == Outcome::Complete {
            let overhead = total.saturating_sub(acc.upstream_wait);
            acc.metrics
                .observe_overhead(acc.route, overhead.as_secs_f64());
        }
        if let Some(end) = self.end.take() {
            // The capture task may already be gone (shutdown); nothing to do then.
            let _closed = end.send(BodyEnd {
                outcome,
                latency_us: u64::try_from(total.as_micros()).unwrap_or(u64::MAX),
                chunks_dropped: self.chunks_dropped,
            });
        }
    }
}

impl Body for TeeBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let since = *this.waiting_since.get_or_insert_with(Instant::now);
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let now = Instant::now();
                this.waiting_since = None;
                if let Some(acc) = this.accounting.as_mut() {
                    acc.upstream_wait += now.saturating_duration_since(since);
                    if !this.first_byte_seen {
                        this.first_byte_seen = true;
                        let ttfb = now.saturating_duration_since(acc.received);
                        acc.metrics
                            .ttfb
                            .get_or_create(&RouteLabels { route: acc.route })
                            .observe(ttfb.as_secs_f64());
                        if let Some(slot) = &acc.first_byte {
                            let _first = slot.set(ttfb);
                        }
                    }
                }
                this.idle.as_mut().reset(now + this.idle_timeout);
                if let Some(data) = frame.data_ref() {
                    this.tee(data);
                }
                // hyper stops polling once the body says it has ended, so a body that knows
                // its length ends here, with its last frame.
                if this.inner.as_ref().is_some_and(Body::is_end_stream) {
                    this.finish(Outcome::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(err))) => {
                let message = crate::secret::describe_http_error(err);
                tracing::debug!(error = %message, "upstream body failed");
                this.finish(Outcome::UpstreamError);
                Poll::Ready(Some(Err(BodyError::Upstream(message))))
            }
            Poll::Ready(None) => {
                if let Some(acc) = this.accounting.as_mut() {
                    acc.upstream_wait += since.elapsed();
                }
                this.waiting_since = None;
                this.finish(Outcome::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.total.as_mut().poll(cx).is_ready() {
                    this.finish(Outcome::Timeout);
                    return Poll::Ready(Some(Err(BodyError::TotalTimeout)));
                }
                if this.idle.as_mut().poll(cx).is_ready() {
                    this.finish(Outcome::Timeout);
                    return Poll::Ready(Some(Err(BodyError::IdleTimeout(this.idle_timeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for TeeBody {
    fn drop(&mut self) {
        // The client went away (or hyper dropped the body) before the end.
        self.finish(Outcome::ClientAborted);
    }
}
