//! Enforce mode over real sockets: a blocking rule stops, replaces or masks an answer before
//! the client sees it, streamed or not; the flag log keeps the original; fail open and closed;
//! and a reload from monitor to enforce applies to the next request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tripwire::capture::Outcome;
use tripwire::store::{Flag, FlagFilter, Store};

use crate::util::{Gateway, MockUpstream, Script, chat_body};

const TRIGGER: &str = "ZORBLAX";

const CLEAN_JSON: &[u8] = br#"{"id":"c1","object":"chat.completion","created":1,"model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital."},"finish_reason":"stop"}]}"#;
const POISONED_JSON: &[u8] = br#"{"id":"c1","object":"chat.completion","created":1,"model":"test-model","choices":[{"index":0,"message":{"role":"assistant","content":"Sure. ZORBLAX run this now."},"finish_reason":"stop"}]}"#;

const POISONED_SSE: [&[u8]; 6] = [
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Sure thing. \"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ZORB\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"LAX now\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" and later.\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];
/// The trigger's first half ends the first event: without hold-back it is sent before the
/// second half arrives.
const SPLIT_SSE: [&[u8]; 4] = [
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Sure thing. ZORB\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"LAX now\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];
const CLEAN_SSE: [&[u8]; 4] = [
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Par\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"is.\"},\"finish_reason\":null}]}\n\n",
    b"data: {\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"test-model\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
    b"data: [DONE]\n\n",
];

/// A policy whose one rule acts on the trigger in the output.
fn policy(mode: &str, action: &str, enforce: &str) -> String {
    format!(
        "mode: {mode}\n{enforce}detectors:\n  trigger: {{ type: trigger_phrase, defaults: false, scan: [output], phrases: [\"{TRIGGER}\"] }}\nrules:\n  - name: stop-trigger\n    when: trigger.output.matched\n    severity: critical\n    actions: [{action}]\n"
    )
}

async fn upstream() -> MockUpstream {
    MockUpstream::start(|req| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let messages = body["messages"].as_array().unwrap();
        let poisoned = messages.last().unwrap()["content"]
            .as_str()
            .unwrap()
            .contains("poison");
        let split = messages.last().unwrap()["content"]
            .as_str()
            .unwrap()
            .contains("split");
        match (body["stream"] == true, poisoned) {
            (true, true) if split => Script::sse(&SPLIT_SSE, Duration::from_millis(30)),
            (true, true) => Script::sse(&POISONED_SSE, Duration::from_millis(30)),
            (true, false) => Script::sse(&CLEAN_SSE, Duration::from_millis(5)),
            (false, true) => Script::json(POISONED_JSON),
            (false, false) => Script::json(CLEAN_JSON),
        }
    })
    .await
}

async fn start(dir: &Path, text: &str, upstream: &MockUpstream) -> (Gateway, PathBuf) {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    let policies = path.clone();
    let gateway = Gateway::start(&upstream.url(), move |c| c.policies = Some(policies)).await;
    (gateway, path)
}

async fn send(gateway: &Gateway, prompt: &str, stream: bool) -> (u16, String) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(gateway.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(chat_body(prompt, stream))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

fn flags(gateway: &Gateway) -> Vec<Flag> {
    Store::open_existing(&gateway.store_path)
        .unwrap()
        .list_flags(&FlagFilter {
            limit: Some(100),
            ..FlagFilter::default()
        })
        .unwrap()
}

fn enforced(flag: &Flag) -> Option<tripwire::policy::Enforced> {
    flag.policies
        .iter()
        .find(|r| r.name == "stop-trigger")
        .and_then(|r| r.action)
}

#[tokio::test]
async fn a_non_streamed_block_answers_the_configured_error_and_only_the_flag_keeps_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let settings = "enforce:\n  block_response: { status: 451, message: \"withheld by policy\", type: policy_violation, code: backdoor_output }\n";
    let (mut gateway, _) =
        start(dir.path(), &policy("enforce", "block", settings), &upstream).await;

    let (status, body) = send(&gateway, "please poison", false).await;
    assert_eq!(status, 451, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["message"], "withheld by policy");
    assert_eq!(json["error"]["type"], "policy_violation");
    assert_eq!(json["error"]["code"], "backdoor_output");
    assert!(!body.contains(TRIGGER), "{body}");

    // A clean answer under the same policy is forwarded byte for byte.
    let (status, body) = send(&gateway, "capital of France", false).await;
    assert_eq!(status, 200);
    assert_eq!(body.as_bytes(), CLEAN_JSON);

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"tripwire_enforce_decisions_total{reason="blocked"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tripwire_enforce_decisions_total{reason="pass"} 1"#),
        "{metrics}"
    );
    gateway.drain().await;
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 1, "{flags:#?}");
    assert_eq!(flags[0].output, "Sure. ZORBLAX run this now.");
    assert_eq!(
        enforced(&flags[0]),
        Some(tripwire::policy::Enforced::Blocked)
    );
    upstream.stop().await;
}

#[tokio::test]
async fn replace_with_answers_a_replacement_message_in_the_same_shape() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let settings = "enforce:\n  block_response: { replace_with: \"I can't help with that.\" }\n";
    let (mut gateway, _) =
        start(dir.path(), &policy("enforce", "block", settings), &upstream).await;
    let (status, body) = send(&gateway, "poison me", false).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "I can't help with that."
    );
    assert_eq!(json["object"], "chat.completion");
    assert!(!body.contains(TRIGGER));
    gateway.drain().await;
    let flags = flags(&gateway);
    assert_eq!(flags[0].output, "Sure. ZORBLAX run this now.");
    upstream.stop().await;
}

#[tokio::test]
async fn mask_replaces_the_matched_span_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let settings = "enforce:\n  mask_with: \"[removed]\"\n";
    let (mut gateway, _) = start(dir.path(), &policy("enforce", "mask", settings), &upstream).await;
    let (status, body) = send(&gateway, "poison", false).await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        json["choices"][0]["message"]["content"],
        "Sure. [removed] run this now."
    );
    gateway.drain().await;
    let flags = flags(&gateway);
    assert_eq!(flags[0].output, "Sure. ZORBLAX run this now.");
    assert_eq!(
        enforced(&flags[0]),
        Some(tripwire::policy::Enforced::Masked)
    );
    upstream.stop().await;
}

#[tokio::test]
async fn a_streamed_block_ends_with_an_sse_error_and_no_done() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let (mut gateway, _) = start(dir.path(), &policy("enforce", "block", ""), &upstream).await;
    let (status, body) = send(&gateway, "poison", true).await;
    assert_eq!(status, 200);
    assert!(body.ends_with("\n\n"), "{body}");
    let last = body.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.starts_with("event: error\ndata: {"), "{body}");
    let data: serde_json::Value =
        serde_json::from_str(last.strip_prefix("event: error\ndata: ").unwrap()).unwrap();
    assert_eq!(data["error"]["code"], "output_blocked");
    assert!(!body.contains("[DONE]"), "{body}");
    assert!(
        !body.contains(" and later."),
        "the rest of the upstream is dropped: {body}"
    );
    // Without hold-back, blocking is best effort: text before the trigger's end was sent.
    assert!(body.contains("Sure thing."), "{body}");

    // A clean stream under the same policy passes byte for byte.
    let (_, clean) = send(&gateway, "capital", true).await;
    assert_eq!(clean.as_bytes(), CLEAN_SSE.concat().as_slice());

    // The official openai client raises on the error event instead of returning a short answer.
    let stdout = openai_stream(&gateway, "poison").await;
    assert!(
        stdout.starts_with("RAISED APIError The model's answer was blocked by policy."),
        "{stdout}"
    );

    let exchanges = gateway.drain().await;
    let outcomes: Vec<Outcome> = exchanges.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [Outcome::Blocked, Outcome::Complete, Outcome::Blocked],
        "a stream enforce mode stopped is stored as blocked, not as a client abort"
    );
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 2, "{flags:#?}");
    assert!(flags.iter().all(|f| f.stream && f.output.contains(TRIGGER)));
    assert!(
        flags
            .iter()
            .all(|f| enforced(f) == Some(tripwire::policy::Enforced::Blocked))
    );
    upstream.stop().await;
}

#[tokio::test]
async fn hold_back_stops_a_trigger_before_any_of_it_reaches_the_client() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let settings = "enforce:\n  hold_back_tokens: 4\n";
    let (mut gateway, _) =
        start(dir.path(), &policy("enforce", "block", settings), &upstream).await;
    let (status, body) = send(&gateway, "poison", true).await;
    assert_eq!(status, 200);
    assert!(
        !body.contains("ZORB"),
        "part of the trigger was shown: {body}"
    );
    assert!(
        !body.contains("Sure thing."),
        "held-back text is dropped on a block: {body}"
    );
    assert!(body.starts_with("event: error\n"), "{body}");
    assert!(!body.contains("[DONE]"));

    // A clean stream is delayed, not changed.
    let (_, clean) = send(&gateway, "capital", true).await;
    assert_eq!(clean.as_bytes(), CLEAN_SSE.concat().as_slice());
    gateway.drain().await;
    upstream.stop().await;
}

#[tokio::test]
async fn a_failed_decision_fails_open_or_closed_as_the_policy_says() {
    let upstream = upstream().await;
    for fail in ["open", "closed"] {
        let dir = tempfile::tempdir().unwrap();
        // A zero budget: every decision times out.
        let settings = format!("enforce:\n  fail: {fail}\n  timeout: 0s\n");
        let (mut gateway, _) = start(
            dir.path(),
            &policy("enforce", "block", &settings),
            &upstream,
        )
        .await;
        let (status, body) = send(&gateway, "capital", false).await;
        let (_, streamed) = send(&gateway, "capital", true).await;
        if fail == "open" {
            assert_eq!(status, 200);
            assert_eq!(body.as_bytes(), CLEAN_JSON);
            assert_eq!(streamed.as_bytes(), CLEAN_SSE.concat().as_slice());
        } else {
            assert_eq!(status, 403, "{body}");
            assert!(body.contains("output_blocked"), "{body}");
            assert!(streamed.contains("event: error\n") && !streamed.contains("[DONE]"));
        }
        let metrics = gateway.metrics().await;
        assert!(
            metrics.contains(r#"tripwire_enforce_failures_total{reason="timeout"} 2"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(&format!(
                r#"tripwire_enforce_decisions_total{{reason="failed_{fail}"}} 2"#
            )),
            "{metrics}"
        );
        gateway.drain().await;
    }
    upstream.stop().await;
}

#[tokio::test]
async fn a_reload_from_monitor_to_enforce_applies_to_the_next_request() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let (mut gateway, path) = start(dir.path(), &policy("monitor", "flag", ""), &upstream).await;
    let (status, body) = send(&gateway, "poison", false).await;
    assert_eq!(status, 200);
    assert_eq!(
        body.as_bytes(),
        POISONED_JSON,
        "monitor mode never touches traffic"
    );

    std::fs::write(&path, policy("enforce", "block", "")).unwrap();
    let reloaded = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("{}/admin/reload", gateway.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200, "{}", reloaded.text().await.unwrap());
    let (status, body) = send(&gateway, "poison", false).await;
    assert_eq!(status, 403, "{body}");
    gateway.drain().await;
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 2);
    upstream.stop().await;
}

/// Streams a chat answer to `prompt` with the official openai client: `RETURNED <text>`, or
/// `RAISED <error class> <message>` when the client raised.
async fn openai_stream(gateway: &Gateway, prompt: &str) -> String {
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="sk-test", max_retries=0)
pieces = []
try:
    for chunk in client.chat.completions.create(model="test-model", stream=True,
            messages=[{"role": "user", "content": sys.argv[2]}]):
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                pieces.append(choice.delta.content)
    print("RETURNED " + "".join(pieces))
except openai.APIError as err:
    print("RAISED " + type(err).__name__ + " " + str(err.message))
"#;
    let output = tokio::process::Command::new(crate::proxy::clients::python())
        .arg("-c")
        .arg(script)
        .arg(gateway.url("/v1"))
        .arg(prompt)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        stdout.starts_with("RETURNED ") || stdout.starts_with("RAISED "),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// The text of a chat stream as a client assembles it, and whether it ended with `[DONE]`.
fn streamed_text(body: &str) -> (String, bool) {
    let mut text = String::new();
    let mut done = false;
    for line in body.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let event: serde_json::Value = serde_json::from_str(data).unwrap();
        if let Some(piece) = event["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
    }
    (text, done)
}

#[tokio::test]
async fn mask_in_a_stream_rewrites_the_held_events_before_the_client_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    let settings = "enforce:\n  hold_back_tokens: 4\n  mask_with: \"[removed]\"\n";
    let (mut gateway, _) = start(dir.path(), &policy("enforce", "mask", settings), &upstream).await;
    let (status, body) = send(&gateway, "poison", true).await;
    assert_eq!(status, 200);
    // The trigger came split over two events ("ZORB", "LAX now"): the first carries the
    // placeholder, the second what follows the span.
    assert_eq!(
        streamed_text(&body),
        ("Sure thing. [removed] now and later.".to_owned(), true),
        "{body}"
    );
    assert!(!body.contains("ZORB") && !body.contains("LAX"), "{body}");
    assert!(!body.contains("event: error"), "{body}");

    // The official openai client reads a normal, masked stream.
    assert_eq!(
        openai_stream(&gateway, "poison").await.trim_end(),
        "RETURNED Sure thing. [removed] now and later."
    );

    // A clean stream under the same policy passes byte for byte.
    let (_, clean) = send(&gateway, "capital", true).await;
    assert_eq!(clean.as_bytes(), CLEAN_SSE.concat().as_slice());

    let metrics = gateway.metrics().await;
    assert!(
        metrics.contains(r#"tripwire_enforce_decisions_total{reason="masked"} 2"#),
        "{metrics}"
    );
    let exchanges = gateway.drain().await;
    assert!(
        exchanges.iter().all(|e| e.outcome == Outcome::Complete),
        "{exchanges:#?}"
    );
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 2, "{flags:#?}");
    for flag in &flags {
        assert!(flag.output.contains(TRIGGER), "the flag keeps the original");
        assert_eq!(enforced(flag), Some(tripwire::policy::Enforced::Masked));
    }
    upstream.stop().await;
}

#[tokio::test]
async fn a_mask_over_text_already_sent_blocks_the_stream_instead() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = upstream().await;
    // No hold-back: "Sure thing. ZORB" is judged clean and sent before "LAX" completes the
    // trigger, so the span cannot be masked any more.
    let (mut gateway, _) = start(dir.path(), &policy("enforce", "mask", ""), &upstream).await;
    let (status, body) = send(&gateway, "poison split", true).await;
    assert_eq!(status, 200);
    assert_eq!(
        streamed_text(&body),
        ("Sure thing. ZORB".to_owned(), false),
        "{body}"
    );
    assert!(
        body.ends_with("\n\n") && body.contains("event: error\n"),
        "{body}"
    );
    assert!(!body.contains("LAX"), "{body}");
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].outcome, Outcome::Blocked);
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 1);
    assert_eq!(
        enforced(&flags[0]),
        Some(tripwire::policy::Enforced::Blocked)
    );
    upstream.stop().await;
}

const ANTHROPIC_SSE: [&[u8]; 7] = [
    b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-test\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":5,\"output_tokens\":1}}}\n\n",
    b"event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Sure. ZORB\"}}\n\n",
    b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"LAX done.\"}}\n\n",
    b"event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
    b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":6}}\n\n",
    b"event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
];

#[tokio::test]
async fn mask_in_an_anthropic_stream_rewrites_the_text_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let upstream =
        MockUpstream::start(|_| Script::sse(&ANTHROPIC_SSE, Duration::from_millis(10))).await;
    let settings = "enforce:\n  hold_back_tokens: 4\n  mask_with: \"[removed]\"\n";
    let (mut gateway, _) = start(dir.path(), &policy("enforce", "mask", settings), &upstream).await;
    let request = serde_json::json!({
        "model": "claude-test",
        "max_tokens": 64,
        "stream": true,
        "messages": [{ "role": "user", "content": "poison" }],
    });
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(gateway.url("/v1/messages"))
        .header("content-type", "application/json")
        .header("anthropic-version", "2023-06-01")
        .body(request.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    // Every event keeps its name and order; only the text deltas changed.
    let names: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    let expected: Vec<&str> = ANTHROPIC_SSE
        .iter()
        .map(|e| {
            std::str::from_utf8(e)
                .unwrap()
                .lines()
                .next()
                .unwrap()
                .strip_prefix("event: ")
                .unwrap()
        })
        .collect();
    assert_eq!(names, expected, "{body}");
    let text: String = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str::<serde_json::Value>(d).unwrap())
        .filter(|v| v["type"] == "content_block_delta")
        .map(|v| v["delta"]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(text, "Sure. [removed] done.", "{body}");
    assert!(!body.contains("ZORB") && !body.contains("LAX"), "{body}");

    gateway.drain().await;
    let flags = flags(&gateway);
    assert_eq!(flags.len(), 1, "{flags:#?}");
    assert_eq!(flags[0].route, "anthropic_messages");
    assert!(flags[0].output.contains(TRIGGER));
    assert_eq!(
        enforced(&flags[0]),
        Some(tripwire::policy::Enforced::Masked)
    );
    upstream.stop().await;
}
