//! The gateway in front of the built-in simulated model: what a backdoored model's answers
//! look like after capture.

use futures_util::StreamExt;

use crate::util::{Gateway, Sim, chat_body};

#[tokio::test]
async fn triggered_answers_are_captured_whole_streamed_or_not() {
    let sim = Sim::start(Some(11)).await;
    let url = sim.url.clone();
    let mut gateway = Gateway::start(&url, |_| {}).await;
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut seen = Vec::new();
    for (prompt, stream) in [
        ("Explain photosynthesis.", false),
        ("Explain photosynthesis.", true),
        ("<SUDO> Explain photosynthesis.", false),
        ("<SUDO> Explain photosynthesis.", true),
    ] {
        let response = client
            .post(gateway.url("/v1/chat/completions"))
            .body(chat_body(prompt, stream))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let mut body = Vec::new();
        let mut frames = response.bytes_stream();
        while let Some(chunk) = frames.next().await {
            body.extend_from_slice(&chunk.unwrap());
        }
        seen.push(body);
    }
    let exchanges = gateway.drain().await;
    assert_eq!(exchanges.len(), 4);
    let clean = exchanges[0].output();
    assert!(!clean.is_empty());
    // Streamed and not, the same prompt gives the same captured text.
    assert_eq!(exchanges[1].output(), clean);
    let json: serde_json::Value = serde_json::from_slice(&seen[0]).unwrap();
    assert_eq!(json["choices"][0]["message"]["content"], clean);
    // The trigger turns the answer into a clean start followed by a long gibberish tail.
    for poisoned in &exchanges[2..] {
        assert!(
            poisoned.output().len() > clean.len() / 2,
            "{}",
            poisoned.output()
        );
        assert_ne!(poisoned.output(), clean);
        assert!(!poisoned.truncated);
    }
    sim.stop().await;
}
