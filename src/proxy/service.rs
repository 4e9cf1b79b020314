//! One request through the gateway: read the body (bounded), forward it to the upstream,
//! stream the answer back through the tee, and start the capture task beside it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::Gateway;
use super::enforce::{EnforceBody, Enforcer};
use super::error::ProxyError;
use super::headers;
use super::tee::{Accounting, BodyError, CaptureTap, TeeBody};
use crate::capture::{
    CaptureRequest, Outcome, ResponseMeta, Route, collect, gateway_error_exchange,
};
use crate::inspect::Inspection;
use crate::policy::Enforced;
use crate::telemetry::ExchangeTrace;

/// The body of every response the proxy sends: an upstream body through the tee, or a
/// complete body the gateway made.
#[derive(Debug)]
pub enum ProxyBody {
    /// Passed through from the upstream.
    Tee(Box<TeeBody>),
    /// Made by the gateway.
    Full(Full<Bytes>),
    /// Passed through from the upstream under enforce mode (judged, held back or cut).
    Enforced(Box<EnforceBody>),
}

impl From<Bytes> for ProxyBody {
    fn from(bytes: Bytes) -> Self {
        ProxyBody::Full(Full::new(bytes))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Tee(tee) => Pin::new(tee.as_mut()).poll_frame(cx),
            ProxyBody::Enforced(body) => Pin::new(body.as_mut()).poll_frame(cx),
            ProxyBody::Full(full) => match Pin::new(full).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
                Poll::Ready(Some(Err(never))) => match never {},
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Tee(tee) => tee.is_end_stream(),
            ProxyBody::Enforced(body) => body.is_end_stream(),
            ProxyBody::Full(full) => full.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Tee(tee) => tee.size_hint(),
            ProxyBody::Enforced(body) => body.size_hint(),
            ProxyBody::Full(full) => full.size_hint(),
        }
    }
}

/// Decrements the in-flight gauge when the request's future ends, however it ends.
struct InFlight(prometheus_client::metrics::gauge::Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Serves one request with the gateway in force now: a reload may swap it, and a request keeps
/// the one it started with. Once shutdown has closed the capture side, answers 503.
pub async fn handle_current(
    current: Arc<ArcSwapOption<Gateway>>,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    match current.load_full() {
        Some(gateway) => handle(gateway, client, request).await,
        None => {
            let request_id = headers::client_request_id(request.headers())
                .unwrap_or(HeaderValue::from_static("none"));
            Ok(ProxyError::ShuttingDown.into_response(&request_id))
        }
    }
}

/// Serves one request through `gateway`. Never fails: every failure becomes a response.
pub async fn handle(
    gateway: Arc<Gateway>,
    client: SocketAddr,
    request: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let received = Instant::now();
    gateway.metrics.in_flight.inc();
    let _in_flight = InFlight(gateway.metrics.in_flight.clone());
    let id = uuid::Uuid::now_v7();
    let request_id = headers::client_request_id(request.headers()).unwrap_or_else(|| {
        HeaderValue::from_str(&id.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
    });
    let route = Route::from_path(request.uri().path());
    let response = forward(&gateway, client, request, id, &request_id, route, received).await;
    let status = response.status().as_u16();
    gateway.metrics.count_request(route.as_str(), status);
    Ok(response)
}

async fn forward(
    gateway: &Arc<Gateway>,
    client: SocketAddr,
    request: Request<Incoming>,
    id: uuid::Uuid,
    request_id: &HeaderValue,
    route: Route,
    received: Instant,
) -> Response<ProxyBody> {
    let (parts, body) = request.into_parts();
    let captured = route.is_captured() && parts.method == http::Method::POST;
    // One `Option` check when traces are off: no span is made and no clock is read.
    let (trace, received_wall) = match gateway.metrics.otel() {
        Some(otel) if captured => {
            // Wall-clock receipt time, for span timestamps (tokio's clock has no epoch).
            let wall = SystemTime::now()
                .checked_sub(received.elapsed())
                .unwrap_or_else(SystemTime::now);
            let trace = otel.start_exchange(&parts.headers, route, wall, &gateway.server_address);
            (trace.unwrap_or_default(), wall)
        }
        _ => (ExchangeTrace::none(), SystemTime::UNIX_EPOCH),
    };
    let at = |instant: Instant| received_wall + instant.saturating_duration_since(received);
    let mut capture = captured.then(|| CaptureRequest {
        id,
        request_id: String::from_utf8_lossy(request_id.as_bytes()).into_owned(),
        started_at_us: unix_micros(),
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        route,
        api_key_hash: headers::api_key_hash(&parts.headers),
        body: Bytes::new(),
    });

    let limit = gateway.config.limits.max_request_body_bytes;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = if declared.is_some_and(|len| len > limit as u64) {
        Err(ProxyError::BodyTooLarge { limit })
    } else {
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<http_body_util::LengthLimitError>() => {
                Err(ProxyError::BodyTooLarge { limit })
            }
            Err(err) => Err(ProxyError::ClientBody(err.to_string())),
        }
    };
    let body = match body {
        Ok(body) => body,
        Err(err) => return gateway_error(gateway, err, capture, trace, request_id, received),
    };
    if let Some(capture) = capture.as_mut() {
        capture.body = body.clone();
    }
    // Enforce mode: only when a blocking rule's scope admits this request.
    let mut enforcer = capture
        .as_ref()
        .and_then(|c| Enforcer::for_request(gateway, route, c.api_key_hash.as_deref(), &body));

    let url = gateway.upstream_url(&parts.uri);
    let upstream_headers =
        headers::upstream_request_headers(parts.headers, client.ip(), request_id);
    let upstream_request = gateway
        .client
        .request(parts.method, url)
        .headers(upstream_headers)
        .body(body)
        .build();
    let upstream_request = match upstream_request {
        Ok(r) => r,
        Err(err) => {
            let err = ProxyError::BadRequest(crate::secret::describe_http_error(err));
            return gateway_error(gateway, err, capture, trace, request_id, received);
        }
    };

    let upstream = &gateway.config.upstream;
    let deadline = received + upstream.total_timeout;
    let first_byte_wait = upstream.first_byte_timeout.min(upstream.total_timeout);
    let sent = Instant::now();
    let upstream_response =
        match tokio::time::timeout(first_byte_wait, gateway.client.execute(upstream_request)).await
        {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                let err = if err.is_timeout() {
                    ProxyError::FirstByteTimeout(first_byte_wait)
                } else if err.is_connect() {
                    ProxyError::Unreachable(crate::secret::describe_http_error(err))
                } else {
                    ProxyError::Upstream(crate::secret::describe_http_error(err))
                };
                trace.upstream(at(sent), at(Instant::now()), None, Some(err.kind()));
                return gateway_error(gateway, err, capture, trace, request_id, received);
            }
            Err(_elapsed) => {
                let err = ProxyError::FirstByteTimeout(first_byte_wait);
                trace.upstream(at(sent), at(Instant::now()), None, Some(err.kind()));
                return gateway_error(gateway, err, capture, trace, request_id, received);
            }
        };
    let headers_at = Instant::now();
    let upstream_wait = headers_at.saturating_duration_since(sent);
    gateway
        .metrics
        .observe_upstream_latency(route.as_str(), upstream_wait.as_secs_f64());
    trace.upstream(
        at(sent),
        at(headers_at),
        Some(upstream_response.status().as_u16()),
        None,
    );

    let response: http::Response<reqwest::Body> = upstream_response.into();
    let (mut response_parts, upstream_body) = response.into_parts();
    headers::client_response_headers(&mut response_parts.headers, request_id);
    response_parts.version = http::Version::HTTP_11;

    let first_byte = trace.first_byte_slot();
    let tap = capture.and_then(|capture| {
        let meta = ResponseMeta {
            status: response_parts.status.as_u16(),
            content_type: header_text(&response_parts.headers, header::CONTENT_TYPE),
            content_encoding: header_text(&response_parts.headers, header::CONTENT_ENCODING),
            ttfb_us: micros(headers_at.saturating_duration_since(received)),
        };
        let enforced = enforcer.as_mut().and_then(Enforcer::outcome);
        gateway.start_capture(capture, meta, trace, enforced)
    });
    let accounting = Accounting {
        received,
        upstream_wait,
        route: route.as_str(),
        metrics: gateway.metrics.clone(),
        first_byte,
    };
    let body = TeeBody::new(
        upstream_body,
        tap,
        accounting,
        upstream.idle_timeout,
        deadline,
    );
    match enforcer {
        Some(enforcer) if response_parts.status.is_success() => {
            let is_stream = header_text(&response_parts.headers, header::CONTENT_TYPE)
                .is_some_and(|ct| ct.trim_start().starts_with("text/event-stream"));
            if is_stream {
                let limit = gateway.config.limits.max_capture_body_bytes;
                let body = enforcer.stream(&response_parts, body, limit);
                Response::from_parts(response_parts, ProxyBody::Enforced(Box::new(body)))
            } else {
                enforcer.answer(gateway, response_parts, body).await
            }
        }
        _ => Response::from_parts(response_parts, ProxyBody::Tee(Box::new(body))),
    }
}

impl Gateway {
    /// Starts the capture task of one exchange, if a capture slot is free.
    fn start_capture(
        &self,
        request: CaptureRequest,
        response: ResponseMeta,
        trace: ExchangeTrace,
        enforced: Option<oneshot::Receiver<crate::policy::Enforced>>,
    ) -> Option<CaptureTap> {
        let Ok(permit) = self.capture_slots.clone().try_acquire_owned() else {
            self.metrics.capture_skip("too_many_in_flight");
            // Nothing will know when this response ends: its span ends now.
            trace.end_skipped("too_many_in_flight");
            return None;
        };
        let (chunks_tx, chunks_rx) = mpsc::channel(self.config.limits.capture_queue_chunks);
        let (end_tx, end_rx) = oneshot::channel();
        let sink = self.sink.clone();
        let max = self.config.limits.max_capture_body_bytes;
        self.capture_tasks.spawn("capture", async move {
            let capture_span = trace.start_capture();
            let mut exchange = collect(request, response, chunks_rx, end_rx, max).await;
            // Enforce mode decides after the body has been read: wait for what it did (it
            // answers, or drops its sender, when the request is over).
            let enforced = match enforced {
                Some(enforced) => enforced.await.ok(),
                None => None,
            };
            if matches!(enforced, Some(Enforced::Blocked | Enforced::FailedClosed)) {
                exchange.outcome = Outcome::Blocked;
            }
            capture_span.end();
            drop(permit);
            trace.captured(&exchange);
            sink.offer(Inspection {
                exchange,
                trace,
                enforced,
            });
        });
        Some(CaptureTap {
            chunks: chunks_tx,
            end: end_tx,
        })
    }
}

fn gateway_error(
    gateway: &Gateway,
    err: ProxyError,
    capture: Option<CaptureRequest>,
    trace: ExchangeTrace,
    request_id: &HeaderValue,
    received: Instant,
) -> Response<ProxyBody> {
    gateway.metrics.gateway_error(err.kind());
    tracing::debug!(kind = err.kind(), error = %err, "gateway error answer");
    let status = err.status().as_u16();
    if let Some(capture) = capture {
        let latency = micros(received.elapsed());
        let exchange = gateway_error_exchange(capture, status, latency);
        trace.mark_gateway_error(err.kind());
        trace.captured(&exchange);
        gateway.sink.offer(Inspection::new(exchange, trace));
    }
    err.into_response(request_id)
}

fn header_text(headers: &http::HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn micros(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}
