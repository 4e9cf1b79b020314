//! The capture task of one exchange: reads the teed response chunks as they arrive, feeds the
//! incremental parser, waits for the body's end, and hands the finished [`Exchange`] on.
//!
//! It runs beside the client's response, never in front of it: the proxy only `try_send`s
//! chunks to it, and the end of the body reaches it through a oneshot sent by the tee's drop
//! guard, so an aborted stream is captured too.

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Exchange, Outcome, ResponseParser, Route, parse_request};

/// What the proxy knows of a request when it starts capturing it.
#[derive(Debug, Clone)]
pub struct CaptureRequest {
    /// Internal id (UUID v7).
    pub id: uuid::Uuid,
    /// The `x-request-id` sent back to the client.
    pub request_id: String,
    /// Receipt time, microseconds since the Unix epoch.
    pub started_at_us: i64,
    /// HTTP method.
    pub method: String,
    /// Path without query.
    pub path: String,
    /// The API route.
    pub route: Route,
    /// Hash of the caller's API key.
    pub api_key_hash: Option<String>,
    /// The request body as forwarded.
    pub body: Bytes,
}

/// What the proxy knows of the upstream response headers.
#[derive(Debug, Clone, Default)]
pub struct ResponseMeta {
    /// Upstream status.
    pub status: u16,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// Request received → upstream response headers, microseconds.
    pub ttfb_us: u64,
}

/// How the response body ended, sent once by the tee (or its drop guard).
#[derive(Debug, Clone, Copy)]
pub struct BodyEnd {
    /// How it ended.
    pub outcome: Outcome,
    /// Request received → last byte handed to the client (or the end), microseconds.
    pub latency_us: u64,
    /// Whether any chunk was not copied to capture.
    pub chunks_dropped: bool,
}

/// Captures one exchange: consumes `chunks` until the tee closes it, then waits for `end`.
pub async fn collect(
    request: CaptureRequest,
    response: ResponseMeta,
    mut chunks: mpsc::Receiver<Bytes>,
    end: oneshot::Receiver<BodyEnd>,
    max_capture_bytes: usize,
) -> Exchange {
    let mut parser = ResponseParser::with_limit(
        request.route,
        response.content_type.as_deref(),
        response.content_encoding.as_deref(),
        max_capture_bytes,
    );
    let mut seen = 0usize;
    let mut over_limit = false;
    while let Some(chunk) = chunks.recv().await {
        // The bytes up to the limit are parsed however the body was chunked: the chunk that
        // crosses the limit gives its head.
        let room = max_capture_bytes.saturating_sub(seen);
        seen = seen.saturating_add(chunk.len());
        if chunk.len() > room {
            over_limit = true;
        }
        parser.push(chunk.get(..room.min(chunk.len())).unwrap_or_default());
    }
    // The tee always sends its end before the channel closes; a missing end means the tee
    // was dropped by a panic elsewhere, which is as good as an abort.
    let end = end.await.unwrap_or(BodyEnd {
        outcome: Outcome::ClientAborted,
        latency_us: 0,
        chunks_dropped: false,
    });
    let parsed = parser.finish();
    let body = request.body.clone();
    let mut exchange = base_exchange(request);
    let (prompt_error, model, stream) = match parse_request(exchange.route, &body) {
        Ok(req) => {
            exchange.prompt = req.prompt;
            (None, req.model, req.stream)
        }
        Err(err) => (Some(format!("request: {err}")), None, false),
    };
    exchange.model = model;
    exchange.stream = stream;
    exchange.response_model = parsed.model;
    exchange.choices = parsed.choices;
    exchange.usage = parsed.usage;
    exchange.status = Some(response.status);
    exchange.ttfb_us = Some(response.ttfb_us);
    exchange.latency_us = end.latency_us;
    exchange.outcome = end.outcome;
    exchange.capture_incomplete = end.chunks_dropped || over_limit;
    // A body that arrived whole but lacks its terminator (an SSE stream without `[DONE]`)
    // counts as truncated too; error statuses have no terminator to look for.
    let success = (200..300).contains(&response.status);
    exchange.truncated =
        end.outcome != Outcome::Complete || (success && !parsed.complete && !over_limit);
    let response_error = parsed.error.map(|e| format!("response: {e}"));
    exchange.parse_error = match (prompt_error, response_error) {
        (None, None) => None,
        (Some(a), None) | (None, Some(a)) => Some(a),
        (Some(a), Some(b)) => Some(format!("{a}; {b}")),
    };
    exchange
}

/// Exchange for an answer the gateway made itself (413, 502, 504): no upstream response.
pub fn gateway_error_exchange(request: CaptureRequest, status: u16, latency_us: u64) -> Exchange {
    let parsed = if request.body.is_empty() {
        None
    } else {
        parse_request(request.route, &request.body).ok()
    };
    let mut exchange = base_exchange(request);
    if let Some(req) = parsed {
        exchange.model = req.model;
        exchange.stream = req.stream;
        exchange.prompt = req.prompt;
    }
    exchange.status = Some(status);
    exchange.latency_us = latency_us;
    exchange.outcome = Outcome::GatewayError;
    exchange.truncated = true;
    exchange
}

fn base_exchange(request: CaptureRequest) -> Exchange {
    Exchange {
        id: request.id,
        request_id: request.request_id,
        started_at_us: request.started_at_us,
        method: request.method,
        path: request.path,
        route: request.route,
        api_key_hash: request.api_key_hash,
        model: None,
        response_model: None,
        stream: false,
        prompt: Vec::new(),
        choices: Vec::new(),
        usage: None,
        status: None,
        ttfb_us: None,
        latency_us: 0,
        outcome: Outcome::Complete,
        truncated: false,
        capture_incomplete: false,
        parse_error: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn capture(chunks: &[&[u8]], limit: usize) -> Exchange {
        let request = CaptureRequest {
            id: uuid::Uuid::nil(),
            request_id: "r".to_owned(),
            started_at_us: 0,
            method: "POST".to_owned(),
            path: "/v1/chat/completions".to_owned(),
            route: Route::ChatCompletions,
            api_key_hash: None,
            body: Bytes::from_static(br#"{"model":"m","stream":true,"messages":[]}"#),
        };
        let response = ResponseMeta {
            status: 200,
            content_type: Some("text/event-stream".to_owned()),
            content_encoding: None,
            ttfb_us: 0,
        };
        let (tx, rx) = mpsc::channel(chunks.len() + 1);
        for chunk in chunks {
            tx.try_send(Bytes::copy_from_slice(chunk)).unwrap();
        }
        drop(tx);
        let (end_tx, end_rx) = oneshot::channel();
        end_tx
            .send(BodyEnd {
                outcome: Outcome::Complete,
                latency_us: 1,
                chunks_dropped: false,
            })
            .unwrap();
        collect(request, response, rx, end_rx, limit).await
    }

    /// Found by `cargo fuzz run capture_openai` (fuzz/regressions/capture_openai/): a body over
    /// the capture limit in one chunk was captured as nothing, the same body in several chunks
    /// kept the events before the limit.
    #[tokio::test]
    async fn fuzz_capture_over_limit_is_the_same_however_chunked() {
        let body: &[u8] =
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}]}\n\n\
            data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}]}\n\n\
            data: [DONE]\n\n";
        let limit = 80;
        let whole = capture(&[body], limit).await;
        assert_eq!(whole.output(), "Hello");
        assert!(whole.capture_incomplete);
        for cut in 0..=body.len() {
            let (a, b) = body.split_at(cut);
            assert_eq!(capture(&[a, b], limit).await, whole, "cut at {cut}");
        }
    }
}
