//! Shutdown: every phase under the one grace timeout, and nothing that waits for the grace to
//! run out when there is nothing left to do.

use std::time::Duration;

use crate::util::{Gateway, MockUpstream, Script};

const CHAT_JSON: &[u8] = br#"{"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Paris is the capital of France."},"finish_reason":"stop"}]}"#;

/// Regression (the first-hour issue, item 2): with the default policy the drift monitor's
/// embedding batcher outlived the drift worker (the admin listener kept the monitor, and with
/// it the batcher's queue, alive), so every shutdown waited out the whole grace and logged
/// "exchanges still queued for drift tests".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_shutdown_with_the_default_policy_takes_under_a_second() {
    let upstream = MockUpstream::start(|_| Script::json(br#"{"choices":[]}"#)).await;
    let mut gateway = Gateway::start(&upstream.url(), |config| {
        config.policies = None;
        config.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    let started = tokio::time::Instant::now();
    gateway.drain().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "idle shutdown with the default policy took {took:?} (grace 30 s)"
    );
}

/// The same after traffic: a few answers go through detection and drift, then shutdown stops
/// well inside the grace with everything stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_after_traffic_with_the_default_policy_does_not_wait_for_the_grace() {
    let upstream = MockUpstream::start(|_| Script::json(CHAT_JSON)).await;
    let mut gateway = Gateway::start(&upstream.url(), |config| {
        config.policies = None;
        config.shutdown_grace = Duration::from_secs(30);
    })
    .await;
    for i in 0..8 {
        let response = crate::util::send_chat(&gateway, &format!("Question {i}?"), false).await;
        assert_eq!(response.status(), 200);
    }
    let started = tokio::time::Instant::now();
    let stored = gateway.drain().await;
    let took = started.elapsed();
    assert_eq!(stored.len(), 8);
    assert!(
        took < Duration::from_secs(5),
        "shutdown after 8 exchanges with the default policy took {took:?} (grace 30 s)"
    );
}
