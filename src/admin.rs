//! The admin listener: `/healthz` (the process answers), `/readyz` (it accepts traffic; turns
//! 503 as soon as shutdown begins so load balancers stop sending), and `/metrics` in the
//! Prometheus text format.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use prometheus_client::registry::Registry;

/// What the admin endpoints read.
#[derive(Debug)]
pub struct AdminState {
    registry: Registry,
    ready: AtomicBool,
}

impl AdminState {
    /// State over a filled registry; not ready until [`AdminState::set_ready`].
    pub fn new(registry: Registry) -> AdminState {
        AdminState {
            registry,
            ready: AtomicBool::new(false),
        }
    }

    /// Marks the gateway ready (or not) for traffic.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// The metrics as Prometheus text.
    pub fn encode_metrics(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::warn!(error = %err, "metrics encoding failed");
        }
        text
    }
}

/// Serves one admin request (none of them waits on anything).
pub fn handle<B>(
    state: Arc<AdminState>,
    request: Request<B>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET | &Method::HEAD, "/readyz") => {
            if state.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut response = Response::new(Full::new(Bytes::from(state.encode_metrics())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    };
    Ok(response)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
