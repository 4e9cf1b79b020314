//! The proxy over real sockets: byte-exact pass-through, streaming without buffering, the
//! gateway's own error answers, headers, and capture of what went through.

use std::time::Duration;

use futures_util::StreamExt;
use http::StatusCode;
use tokio::time::Instant;
use tripwire::capture::{Outcome, Route};

use crate::util::{Gateway, MockUpstream, Script, Step, chat_body, send_chat};

const CHAT_JSON: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"test-model-0613",
  "choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop"}],
  "usage":{"prompt_tokens":12,"completion_tokens":7,"total_tokens":19}}"#;

const SSE: [&[u8]; 4] = [
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"test-model-0613\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hello\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"test-model-0613\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" there\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"model\":\"test-model-0613\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

#[tokio::test]
async fn json_passes_through_byte_for_byte_and_is_captured() {
    let upstream = MockUpstream::start(|_| {
        let mut script = Script::json(CHAT_JSON);
        script
            .headers
            .push(("x-upstream-custom".into(), "kept".into()));
        script
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = client()
        .post(gateway.url("/v1/chat/completions?api-version=1"))
        .header("content-type", "application/json")
        .body(chat_body("What is the capital of France?", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-upstream-custom"], "kept");
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(&response.bytes().await.unwrap()[..], CHAT_JSON);

    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri.path(), "/v1/chat/completions");
    assert_eq!(seen[0].uri.query(), Some("api-version=1"));
    assert_eq!(
        seen[0].body,
        chat_body("What is the capital of France?", false)
    );

    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 1);
    let e = &exchanges[0];
    assert_eq!(e.route, Route::ChatCompletions);
    assert_eq!(e.status, Some(200));
    assert_eq!(e.outcome, Outcome::Complete);
    assert!(!e.truncated && !e.capture_incomplete && !e.stream);
    assert_eq!(e.model.as_deref(), Some("test-model"));
    assert_eq!(e.response_model.as_deref(), Some("test-model-0613"));
    assert_eq!(e.output(), "Paris is the capital of France.");
    assert_eq!(e.finish_reason(), Some("stop"));
    assert_eq!(e.prompt.len(), 2);
    assert_eq!(e.prompt[1].role, "user");
    assert_eq!(e.prompt[1].content, "What is the capital of France?");
    assert_eq!(e.usage.and_then(|u| u.output_tokens), Some(7));
    assert!(e.parse_error.is_none(), "{:?}", e.parse_error);
    upstream.stop().await;
}

#[tokio::test]
async fn sse_streams_each_chunk_before_the_upstream_finishes() {
    let gap = Duration::from_millis(300);
    let upstream = MockUpstream::start(move |_| Script::sse(&SSE, gap)).await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let started = Instant::now();
    let response = send_chat(&gateway, "hi", true).await;
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut stream = response.bytes_stream();
    let mut received = Vec::new();
    let mut arrivals = Vec::new();
    while let Some(chunk) = stream.next().await {
        received.extend_from_slice(&chunk.unwrap());
        arrivals.push(started.elapsed());
    }
    // The upstream needs 3 gaps (900 ms) to finish; the first chunk must come long before.
    assert!(
        arrivals[0] < Duration::from_millis(250),
        "first chunk after {:?}",
        arrivals[0]
    );
    assert!(*arrivals.last().unwrap() >= gap * 3, "{arrivals:?}");
    assert_eq!(received, SSE.concat(), "byte-for-byte");

    let exchanges = gateway.drain().await;
    let e = &exchanges[0];
    assert!(e.stream);
    assert_eq!(e.output(), "Hello there");
    assert_eq!(e.finish_reason(), Some("stop"));
    assert_eq!(e.outcome, Outcome::Complete);
    assert!(!e.truncated);
    upstream.stop().await;
}

#[tokio::test]
async fn client_abort_cancels_upstream_and_is_captured_as_truncated() {
    let mut steps = vec![Step::Chunk(bytes::Bytes::from_static(SSE[0]))];
    for _ in 0..50 {
        steps.push(Step::Sleep(Duration::from_millis(100)));
        steps.push(Step::Chunk(bytes::Bytes::from_static(SSE[1])));
    }
    let upstream = MockUpstream::start(move |_| Script {
        steps: steps.clone(),
        ..Script::sse(&[], Duration::ZERO)
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = send_chat(&gateway, "tell me a long story", true).await;
    let mut stream = response.bytes_stream();
    let first = stream.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    drop(stream);
    // The gateway drops the upstream request, so the mock sees its peer go away well before
    // its 5 seconds of chunks are over.
    tokio::time::timeout(Duration::from_secs(3), upstream.peer_gone.notified())
        .await
        .expect("upstream request was not cancelled");

    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 1);
    let e = &exchanges[0];
    assert_eq!(e.outcome, Outcome::ClientAborted);
    assert!(e.truncated);
    assert!(e.output().starts_with("Hello"), "{:?}", e.output());
    upstream.stop().await;
}

#[tokio::test]
async fn oversized_request_gets_413_and_never_reaches_upstream() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.limits.max_request_body_bytes = 1024;
    })
    .await;
    let big = chat_body(&"x".repeat(4096), false);
    // Declared length over the limit.
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .body(big.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(response.headers().contains_key("x-request-id"));
    let body: serde_json::Value = response.json_body().await;
    assert_eq!(body["error"]["code"], "request_too_large");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // No declared length (chunked): the limit is enforced while reading.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(500)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(upstream.requests().is_empty());
    // A body under the limit still goes through on the same gateway.
    let response = send_chat(&gateway, "small", false).await;
    assert_eq!(response.status(), StatusCode::OK);

    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 3);
    assert_eq!(exchanges[0].status, Some(413));
    assert_eq!(exchanges[0].outcome, Outcome::GatewayError);
    upstream.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_gets_502() {
    // Bind and drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut gateway = Gateway::start(&format!("http://127.0.0.1:{port}"), |_| {}).await;
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-request-id", "trace-502")
        .body(chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(response.headers()["x-request-id"], "trace-502");
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: serde_json::Value = response.json_body().await;
    assert_eq!(body["error"]["code"], "upstream_unreachable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("tripwire: ")
    );
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("tripwire_proxy_gateway_errors_total{reason=\"upstream_unreachable\"} 1"),
        "{metrics}"
    );
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges[0].status, Some(502));
    assert_eq!(exchanges[0].request_id, "trace-502");
}

#[tokio::test]
async fn silent_upstream_gets_504_after_first_byte_timeout() {
    let upstream = MockUpstream::start(|_| Script {
        delay: Duration::from_secs(30),
        ..Script::json(CHAT_JSON)
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.upstream.first_byte_timeout = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let response = send_chat(&gateway, "hi", false).await;
    assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    let body: serde_json::Value = response.json_body().await;
    assert_eq!(body["error"]["code"], "upstream_timeout");
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges[0].status, Some(504));
    upstream.stop().await;
}

#[tokio::test]
async fn stalled_stream_is_cut_by_the_idle_timeout_and_captured() {
    let upstream = MockUpstream::start(|_| Script {
        steps: vec![
            Step::Chunk(bytes::Bytes::from_static(SSE[0])),
            Step::Sleep(Duration::from_secs(30)),
            Step::Chunk(bytes::Bytes::from_static(SSE[3])),
        ],
        ..Script::sse(&[], Duration::ZERO)
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.upstream.idle_timeout = Duration::from_millis(300);
    })
    .await;
    let response = send_chat(&gateway, "hi", true).await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut stream = response.bytes_stream();
    assert_eq!(&stream.next().await.unwrap().unwrap()[..], SSE[0]);
    // The client sees the stream end in an error rather than hang.
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("stream hung past the idle timeout");
    assert!(matches!(next, Some(Err(_)) | None), "{next:?}");
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges[0].outcome, Outcome::Timeout);
    assert!(exchanges[0].truncated);
    assert_eq!(exchanges[0].output(), "Hello");
    upstream.stop().await;
}

#[tokio::test]
async fn upstream_errors_are_forwarded_unchanged() {
    const RATE_LIMITED: &[u8] =
        br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    let upstream = MockUpstream::start(|_| Script {
        status: StatusCode::TOO_MANY_REQUESTS,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "7".into()),
        ],
        ..Script::json(RATE_LIMITED)
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = send_chat(&gateway, "hi", false).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(&response.bytes().await.unwrap()[..], RATE_LIMITED);
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges[0].status, Some(429));
    assert!(exchanges[0].choices.is_empty());
    upstream.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_both_ways() {
    let upstream = MockUpstream::start(|_| {
        let mut script = Script::json(CHAT_JSON);
        script.headers.extend([
            ("connection".into(), "x-upstream-hop".into()),
            ("x-upstream-hop".into(), "1".into()),
            ("keep-alive".into(), "timeout=5".into()),
            ("proxy-authenticate".into(), "Basic".into()),
            ("x-end-to-end".into(), "kept".into()),
        ]);
        script
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("connection", "keep-alive, x-client-hop")
        .header("x-client-hop", "secret-hop")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic dXNlcjpwYXNz")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .body(chat_body("hi", false))
        .send()
        .await
        .unwrap();
    for name in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(
            !response.headers().contains_key(name),
            "{name} reached the client"
        );
    }
    assert_eq!(response.headers()["x-end-to-end"], "kept");
    let seen = &upstream.requests()[0];
    for name in ["x-client-hop", "te", "proxy-authorization"] {
        assert!(
            !seen.headers.contains_key(name),
            "{name} reached the upstream"
        );
    }
    assert_eq!(seen.headers["x-end-to-end"], "kept");
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    let _ = gateway.drain().await;
    upstream.stop().await;
}

#[tokio::test]
async fn request_id_is_echoed_or_generated_and_sent_upstream() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let given = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-request-id", "client-id-42")
        .body(chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(given.headers()["x-request-id"], "client-id-42");
    let made = send_chat(&gateway, "hi", false).await;
    let made_id = made.headers()["x-request-id"].to_str().unwrap().to_owned();
    let uuid = uuid::Uuid::parse_str(&made_id).unwrap();
    assert_eq!(uuid.get_version_num(), 7);
    let seen = upstream.requests();
    assert_eq!(seen[0].headers["x-request-id"], "client-id-42");
    assert_eq!(seen[1].headers["x-request-id"], made_id.as_str());
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges[0].request_id, "client-id-42");
    assert_eq!(exchanges[1].request_id, made_id);
    assert_eq!(
        exchanges[1].id, uuid,
        "a generated request id is the exchange id"
    );
    upstream.stop().await;
}

#[tokio::test]
async fn other_paths_are_forwarded_but_not_captured() {
    const MODELS: &[u8] = br#"{"object":"list","data":[{"id":"m","object":"model"}]}"#;
    let upstream = MockUpstream::start(|_| Script::json(MODELS)).await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = client()
        .get(gateway.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert_eq!(&response.bytes().await.unwrap()[..], MODELS);
    assert_eq!(upstream.requests()[0].method, http::Method::GET);
    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains("tripwire_proxy_requests_total{route=\"other\",status=\"200\"} 1"),
        "{metrics}"
    );
    assert!(gateway.drain().await.is_empty());
    upstream.stop().await;
}

#[tokio::test]
async fn metrics_report_requests_latency_overhead_and_capture() {
    let upstream = MockUpstream::start(|_| Script::sse(&SSE, Duration::ZERO)).await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    for _ in 0..3 {
        let response = send_chat(&gateway, "hi", true).await;
        response.bytes().await.unwrap();
    }
    let metrics = gateway.metrics().await;
    for needle in [
        "tripwire_proxy_requests_total{route=\"chat_completions\",status=\"200\"} 3",
        "tripwire_proxy_upstream_latency_seconds_count{route=\"chat_completions\"} 3",
        "tripwire_proxy_overhead_seconds_count{route=\"chat_completions\"} 3",
        "tripwire_proxy_ttfb_seconds_count{route=\"chat_completions\"} 3",
        "tripwire_capture_dropped_chunks_total 0",
    ] {
        assert!(metrics.contains(needle), "missing {needle}:\n{metrics}");
    }
    let health = reqwest::get(format!("{}/healthz", gateway.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    let ready = reqwest::get(format!("{}/readyz", gateway.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
    assert_eq!(gateway.drain().await.len(), 3);
    upstream.stop().await;
}

#[tokio::test]
async fn a_full_capture_queue_drops_copies_but_never_the_client_bytes() {
    // A capture queue of one chunk and a burst of many chunks: copies are dropped, counted,
    // and the exchange is marked incomplete, while the client still gets every byte.
    let chunk: &'static [u8] =
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n";
    let many: Vec<&'static [u8]> = std::iter::repeat_n(chunk, 2000).chain([SSE[3]]).collect();
    let expected = many.concat();
    let upstream = MockUpstream::start(move |_| Script::sse(&many, Duration::ZERO)).await;
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.limits.capture_queue_chunks = 1;
    })
    .await;
    let response = send_chat(&gateway, "hi", true).await;
    assert_eq!(response.bytes().await.unwrap(), expected);
    let metrics = gateway.metrics().await;
    let dropped: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tripwire_capture_dropped_chunks_total "))
        .unwrap()
        .parse()
        .unwrap();
    let exchanges = gateway.drain().await;
    if dropped > 0 {
        assert!(exchanges[0].capture_incomplete);
    } else {
        // The capture task kept up with every chunk; then nothing may be marked missing.
        assert!(!exchanges[0].capture_incomplete);
        assert_eq!(exchanges[0].output().len(), 2000);
    }
    upstream.stop().await;
}

trait JsonBody {
    async fn json_body(self) -> serde_json::Value;
}

impl JsonBody for reqwest::Response {
    async fn json_body(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

#[tokio::test]
async fn upstream_reset_mid_stream_ends_the_client_stream_and_is_captured() {
    let upstream = MockUpstream::start(|_| Script {
        steps: vec![
            Step::Chunk(bytes::Bytes::from_static(SSE[0])),
            Step::Sleep(Duration::from_millis(50)),
            Step::Fail,
        ],
        ..Script::sse(&[], Duration::ZERO)
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = send_chat(&gateway, "hi", true).await;
    let mut stream = response.bytes_stream();
    assert_eq!(&stream.next().await.unwrap().unwrap()[..], SSE[0]);
    let next = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("client stream hung after the upstream reset");
    assert!(matches!(next, Some(Err(_)) | None), "{next:?}");
    // The gateway keeps serving.
    let again = client()
        .get(gateway.url("/v1/models"))
        .send()
        .await
        .unwrap();
    assert!(again.status().is_success() || again.status().is_client_error());
    let exchanges = gateway.drain().await;
    let streamed = exchanges.iter().find(|e| e.stream).unwrap();
    assert_eq!(streamed.outcome, Outcome::UpstreamError);
    assert!(streamed.truncated);
    assert_eq!(streamed.output(), "Hello");
    upstream.stop().await;
}

#[tokio::test]
async fn oversized_headers_are_refused_before_the_upstream() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-padding", "a".repeat(100 * 1024))
        .body(chat_body("hi", false))
        .send()
        .await;
    // hyper answers 431 and closes; a client may also see the connection end first.
    match response {
        Ok(response) => assert_eq!(response.status(), 431),
        Err(err) => assert!(err.is_request() || err.is_connect(), "{err}"),
    }
    assert!(
        upstream.requests().is_empty(),
        "oversized headers reached the upstream"
    );
    // Headers under the limit pass, and the gateway keeps serving.
    let ok = client()
        .post(gateway.url("/v1/chat/completions"))
        .header("x-padding", "a".repeat(16 * 1024))
        .body(chat_body("hi", false))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    upstream.stop().await;
}
