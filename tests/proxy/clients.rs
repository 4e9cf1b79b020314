//! Real clients through the gateway: the official `openai` Python package, unchanged but for
//! its `base_url`.

use std::path::PathBuf;
use std::time::Duration;

use crate::util::{Gateway, MockUpstream, Script};

const CHAT_JSON: &[u8] = br#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"Paris."},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":2,"total_tokens":11}}"#;
const RATE_LIMITED: &[u8] =
    br#"{"error":{"message":"slow down","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
const SSE: [&[u8]; 4] = [
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Par\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is.\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];

/// The Python interpreter of the virtual environment `make test` creates.
pub fn python() -> PathBuf {
    let python = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make test` (it creates .venv with the openai client)",
        python.display()
    );
    python
}

#[tokio::test]
async fn official_openai_python_client_works_through_the_gateway() {
    let upstream = MockUpstream::start(|req| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        if body.get("trigger_error").is_some() {
            Script {
                status: http::StatusCode::TOO_MANY_REQUESTS,
                ..Script::json(RATE_LIMITED)
            }
        } else if body["stream"] == true {
            Script::sse(&SSE, Duration::from_millis(20))
        } else {
            Script::json(CHAT_JSON)
        }
    })
    .await;
    let mut gateway = Gateway::start(&upstream.url(), |_| {}).await;
    let base_url = gateway.url("/v1");
    let output = tokio::process::Command::new(python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/openai_client.py"
        ))
        .arg(&base_url)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(seen["plain"], "Paris.");
    assert_eq!(seen["streamed"], "Paris.");
    assert_eq!(seen["chunks"], 3);
    assert_eq!(seen["error_type"], "RateLimitError");

    let requests = upstream.requests();
    assert_eq!(requests.len(), 3);
    assert_eq!(requests[0].uri.path(), "/v1/chat/completions");
    // The key travels to the upstream untouched.
    assert_eq!(
        requests[0].headers["authorization"],
        "Bearer sk-python-client-test"
    );

    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 3);
    assert_eq!(exchanges[0].output(), "Paris.");
    assert!(exchanges[1].stream);
    assert_eq!(exchanges[1].output(), "Paris.");
    assert_eq!(exchanges[2].status, Some(429));
    upstream.stop().await;
}
