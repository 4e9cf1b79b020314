//! Faults and bad input on loopback, each with the same three checks: the client gets a
//! well-formed answer or a clean error, the gateway keeps serving others, and the exchange is
//! captured with what was seen. docs/reliability.md lists them, one row per test.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tripwire::capture::Outcome;
use tripwire::runtime::Tasks;

use crate::util::process::metric;
use crate::util::{Gateway, MockUpstream, Script, Step, chat_body, send_chat};

const GOOD_SSE: [&[u8]; 3] = [
    b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Fine\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c\",\"object\":\"chat.completion.chunk\",\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A healthy request through the same gateway still succeeds, whole.
async fn others_still_served(gateway: &Gateway) {
    let response = client()
        .post(gateway.url("/v1/chat/completions"))
        .body(chat_body("are you still there?", true))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
}

/// Routes requests whose prompt says "healthy" to a well-behaved script, others to `bad`.
async fn upstream_with(bad: impl Fn() -> Script + Send + Sync + 'static) -> MockUpstream {
    MockUpstream::start(move |request| {
        if String::from_utf8_lossy(&request.body).contains("are you still there?") {
            Script::sse(&GOOD_SSE, Duration::ZERO)
        } else {
            bad()
        }
    })
    .await
}

#[tokio::test]
async fn malformed_sse_passes_through_unchanged_and_is_captured_with_a_parse_error() {
    const BROKEN: [&[u8]; 4] = [
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Half\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\n\n",
        b"event without a colon\nid\n: comment\n\nretry: soon\n\n",
        b"data: [DONE]\n\n",
    ];
    let upstream = upstream_with(|| Script::sse(&BROKEN, Duration::from_millis(5))).await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = send_chat(&gateway, "hi", true).await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(
        body,
        Bytes::from(BROKEN.concat()),
        "bytes changed in transit"
    );
    others_still_served(&gateway).await;
    let exchanges = gateway.drain().await;
    let broken = exchanges
        .iter()
        .find(|e| e.output().starts_with("Half"))
        .unwrap();
    assert!(broken.parse_error.is_some(), "{broken:?}");
    assert_eq!(broken.status, Some(200));
    upstream.stop().await;
}

#[tokio::test]
async fn invalid_utf8_passes_through_byte_for_byte_and_is_captured_lossily() {
    const BAD_SSE: [&[u8]; 3] = [
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"caf\xc3\"}}]}\n\n",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"\xff\xfe ok\"},\"finish_reason\":\"stop\"}]}\n\n",
        b"data: [DONE]\n\n",
    ];
    const BAD_JSON: &[u8] = b"{\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\",\"content\":\"\xc0\xaf bad\"}}]}";
    let upstream = MockUpstream::start(|request| {
        if String::from_utf8_lossy(&request.body).contains("\"stream\":true") {
            Script::sse(&BAD_SSE, Duration::from_millis(5))
        } else {
            Script::json(BAD_JSON)
        }
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let streamed = send_chat(&gateway, "hi", true).await.bytes().await.unwrap();
    assert_eq!(streamed, Bytes::from(BAD_SSE.concat()));
    let whole = send_chat(&gateway, "hi", false).await;
    assert_eq!(whole.status(), 200);
    assert_eq!(whole.bytes().await.unwrap(), Bytes::from_static(BAD_JSON));
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 2);
    for exchange in &exchanges {
        assert_eq!(exchange.status, Some(200));
        // Captured with what was seen: the invalid bytes are flagged as a parse problem or
        // replaced, never a reason to drop the exchange.
        assert!(
            exchange.parse_error.is_some() || exchange.output().contains('\u{fffd}'),
            "{exchange:?}"
        );
    }
    upstream.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_forwarded_unchanged_and_captured() {
    const LIMITED: &[u8] = br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#;
    let upstream = upstream_with(|| Script {
        status: http::StatusCode::TOO_MANY_REQUESTS,
        headers: vec![
            ("content-type".into(), "application/json".into()),
            ("retry-after".into(), "7".into()),
            ("x-ratelimit-remaining-requests".into(), "0".into()),
        ],
        delay: Duration::ZERO,
        steps: vec![Step::Chunk(Bytes::from_static(LIMITED))],
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let response = send_chat(&gateway, "hi", false).await;
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
    assert_eq!(response.bytes().await.unwrap(), Bytes::from_static(LIMITED));
    others_still_served(&gateway).await;
    let exchanges = gateway.drain().await;
    assert!(exchanges.iter().any(|e| e.status == Some(429)));
    upstream.stop().await;
}

/// A raw HTTP/1.1 upstream that answers each request with a small JSON body and then, for a
/// pseudo-random share of requests, closes the kept-alive connection without a word.
async fn flaky_keep_alive_upstream(tasks: &Tasks, closes: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let conn_tasks = tasks.clone();
    let seed = Arc::new(AtomicU64::new(0x9e37_79b9_7f4a_7c15));
    tasks.spawn("flaky-accept", async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (seed, closes) = (Arc::clone(&seed), Arc::clone(&closes));
            conn_tasks.spawn("flaky-conn", async move {
                let mut buf = Vec::new();
                loop {
                    let Some(request_len) = read_request(&mut socket, &mut buf).await else {
                        return;
                    };
                    buf.drain(..request_len);
                    let body = br#"{"choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}]}"#;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: keep-alive\r\n\r\n",
                        body.len()
                    );
                    let answer = [head.as_bytes(), body].concat();
                    if socket.write_all(&answer).await.is_err() {
                        return;
                    }
                    // xorshift: a third of the connections close after this answer.
                    let mut x = seed.load(Ordering::Relaxed);
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    seed.store(x, Ordering::Relaxed);
                    if x % 3 == 0 {
                        closes.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                }
            });
        }
    });
    url
}

/// Reads one request (head and content-length body) into `buf`; its length, or `None` at EOF.
async fn read_request(socket: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap_or(0));
            if buf.len() >= end + 4 + length {
                return Some(end + 4 + length);
            }
        }
        let mut chunk = [0u8; 8192];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn upstream_closing_keep_alive_connections_at_random_gives_clean_answers() {
    let tasks = Tasks::new();
    let closes = Arc::new(AtomicUsize::new(0));
    let url = flaky_keep_alive_upstream(&tasks, Arc::clone(&closes)).await;
    let mut gateway = Gateway::start(&url, |_| {}).await;
    let client = client();
    let (mut ok, mut clean_errors) = (0, 0);
    for i in 0..200 {
        let response = client
            .post(gateway.url("/v1/chat/completions"))
            .body(chat_body(&format!("request {i}"), false))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap())
            .expect("every answer is well-formed JSON");
        if status == 200 {
            assert_eq!(body["choices"][0]["message"]["content"], "ok");
            ok += 1;
        } else {
            // A connection the upstream closed under a request: an OpenAI-shaped 502.
            assert_eq!(status, 502, "{body}");
            assert_eq!(body["error"]["type"], "gateway_error", "{body}");
            clean_errors += 1;
        }
    }
    assert!(
        closes.load(Ordering::Relaxed) >= 30,
        "the upstream hardly closed"
    );
    assert!(ok >= 190, "{ok} answered, {clean_errors} clean errors");
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 200, "every request captured");
    tasks.cancel();
    let _stopped = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_leaves_nothing_upstream() {
    let upstream = upstream_with(|| Script::sse(&GOOD_SSE, Duration::ZERO)).await;
    let gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let addr = gateway.base.trim_start_matches("http://").to_owned();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 5000\r\n\r\n{\"model\":\"m\",\"messages\":[",
        )
        .await
        .unwrap();
    drop(socket);
    // The gateway counts the broken body once it sees the connection close.
    let counted = r#"tripwire_proxy_gateway_errors_total{reason="client_body_error"} 1"#;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut metrics = gateway.metrics().await;
    while !metrics.contains(counted) {
        assert!(tokio::time::Instant::now() < deadline, "{metrics}");
        tokio::task::yield_now().await;
        metrics = gateway.metrics().await;
    }
    others_still_served(&gateway).await;
    // Only the healthy request reached the upstream; the half-sent one was never forwarded.
    assert_eq!(upstream.requests().len(), 1);
    upstream.stop().await;
}

/// A raw upstream that streams `total` bytes of SSE as fast as the socket takes them and
/// counts what it managed to write.
async fn firehose_upstream(tasks: &Tasks, total: usize, written: Arc<AtomicUsize>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tasks.spawn("firehose", async move {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        let mut buf = Vec::new();
        if read_request(&mut socket, &mut buf).await.is_none() {
            return;
        }
        let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "x".repeat(16_000)
        );
        let frame = format!("{:x}\r\n{event}\r\n", event.len());
        while written.load(Ordering::Relaxed) < total {
            if socket.write_all(frame.as_bytes()).await.is_err() {
                return;
            }
            written.fetch_add(event.len(), Ordering::Relaxed);
        }
        let done = "data: [DONE]\n\n";
        let _end = socket
            .write_all(format!("{:x}\r\n{done}\r\n0\r\n\r\n", done.len()).as_bytes())
            .await;
    });
    url
}

#[tokio::test]
async fn a_slow_reader_holds_the_upstream_back_instead_of_filling_memory() {
    const TOTAL: usize = 48 * 1024 * 1024;
    let tasks = Tasks::new();
    let written = Arc::new(AtomicUsize::new(0));
    let url = firehose_upstream(&tasks, TOTAL, Arc::clone(&written)).await;
    // The default policy reads the whole captured answer (8 MB): in a debug build on two
    // loaded cores that takes seconds, so the drain gets a grace that fits it.
    let mut gateway = Gateway::start(&url, |config| {
        config.shutdown_grace = Duration::from_secs(60);
    })
    .await;
    let response = send_chat(&gateway, "everything, please", true).await;
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut read = stream.next().await.unwrap().unwrap().len();
    // The client stops reading: the upstream must stall once the socket buffers on both
    // hops are full, not stream 48 MB into the gateway's memory. Stalled: no byte written for
    // half a second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut stalled_at = written.load(Ordering::Relaxed);
    let mut still_since = tokio::time::Instant::now();
    while still_since.elapsed() < Duration::from_millis(500) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "upstream not held back: {} bytes written and counting",
            written.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = written.load(Ordering::Relaxed);
        if now != stalled_at {
            stalled_at = now;
            still_since = tokio::time::Instant::now();
        }
    }
    assert!(
        stalled_at < 32 * 1024 * 1024,
        "{stalled_at} bytes written while the client read {read}"
    );
    // Reading again lets it finish, whole.
    while let Some(chunk) = stream.next().await {
        read += chunk.unwrap().len();
    }
    assert!(read > TOTAL, "client got {read} of {TOTAL} bytes");
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].outcome, Outcome::Complete);
    tasks.cancel();
    let _stopped = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_keeps_the_proxy_serving_says_so_and_resumes_when_space_returns() {
    // 8 KB answers against a database capped at 256 KiB: full within a few dozen exchanges.
    let answer: &'static [u8] = Box::leak(
        format!(
            r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"finish_reason":"stop"}}]}}"#,
            "words and more words ".repeat(400)
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let upstream = MockUpstream::start(move |_| Script::json(answer)).await;
    // A cheap policy, so exchanges reach the store as fast as they come.
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "detectors:\n  trigger: { type: trigger_phrase }\nrules:\n  - name: t\n    when: trigger.prompt.matched\n    severity: high\n",
    )
    .unwrap();
    let mut gateway = Gateway::start(&upstream.url(), |c| {
        c.policies = Some(policy);
        c.store.hard_max_bytes = 256 * 1024;
        // A short backlog, so the room freed later outlasts it.
        c.store.queue = 8;
        c.store.batch_rows = 4;
    })
    .await;
    let client = client();
    let ask = |i: usize| {
        let client = client.clone();
        let url = gateway.url("/v1/chat/completions");
        async move {
            let response = client
                .post(url)
                .body(chat_body(&format!("question {i}"), false))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "the proxy must keep serving");
            assert_eq!(response.bytes().await.unwrap().len(), answer.len());
        }
    };
    let mut i = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        ask(i).await;
        i += 1;
        let text = gateway.metrics().await;
        if metric(&text, "tripwire_store_write_failing") == 1.0 {
            assert!(
                text.contains(r#"tripwire_store_write_errors_total{reason="disk_full"}"#),
                "{text}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the store never filled"
        );
    }
    // Full: traffic still flows, and what cannot be written is shed and counted.
    for _ in 0..100 {
        ask(i).await;
        i += 1;
    }
    let text = gateway.metrics().await;
    assert_eq!(metric(&text, "tripwire_store_write_failing"), 1.0);
    assert!(
        metric(&text, "tripwire_store_dropped_total") > 0.0,
        "{text}"
    );

    // Space returns (an operator deletes old rows): writing resumes by itself.
    let path = gateway.store_path.clone();
    crate::util::blocking(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        conn.execute("DELETE FROM exchanges", []).unwrap();
    })
    .await;
    let written_before = metric(
        &gateway.metrics().await,
        "tripwire_store_rows_written_total",
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while metric(&gateway.metrics().await, "tripwire_store_write_failing") != 0.0 {
        ask(i).await;
        i += 1;
        assert!(
            tokio::time::Instant::now() < deadline,
            "writes never resumed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    ask(i).await;
    let written_after = metric(
        &gateway.metrics().await,
        "tripwire_store_rows_written_total",
    );
    assert!(
        written_after > written_before,
        "nothing written after space returned"
    );
    let exchanges = gateway.drain().await;
    assert!(
        exchanges
            .iter()
            .any(|e| tripwire::detect::prompt_text(e).contains(&format!("question {i}"))),
        "the last exchange is not in the store ({written_before} rows written before)"
    );
    upstream.stop().await;
}
